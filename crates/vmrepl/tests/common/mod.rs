//! Test harness for end-to-end tests: hosts as real `vmrepl` daemons in temp data folders on
//! loopback addresses, VMs running the test guest under TCG. Every process a test starts is
//! stopped when its guard drops, also when the test panics.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The vmrepl binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmrepl"))
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The test guest (built by scripts/setup.sh). Missing guest = failed test, never a skip.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub blockio: PathBuf,
}

pub fn guest() -> Guest {
    let dir = std::env::var_os("VMREPL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".cache/guest"));
    let g = Guest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        blockio: dir.join("blockio"),
    };
    for p in [&g.kernel, &g.initrd, &g.blockio] {
        assert!(
            p.exists(),
            "the test guest is missing ({}); run ./scripts/setup.sh first",
            p.display()
        );
    }
    g
}

/// A free TCP port on `ip`, as the OS hands it out.
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One vmrepl host: a data folder, an address, and (once started) a daemon.
pub struct Host {
    pub name: String,
    pub ip: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
    started: bool,
    /// The daemon's pid, when this harness started it.
    pid: Option<u32>,
}

impl Host {
    /// Creates a host on `ip` (127.0.0.x).
    pub fn init(name: &str, ip: &str) -> Host {
        Host::init_with(name, ip, &[])
    }

    /// Creates a host on `ip` with more `host init` arguments.
    pub fn init_with(name: &str, ip: &str, extra: &[&str]) -> Host {
        Host::init_at(name, ip, free_port(ip), extra)
    }

    /// Creates a host that listens on `ip:port` (an address this network namespace may not
    /// have: the daemon may run in another one).
    pub fn init_at(name: &str, ip: &str, port: u16, extra: &[&str]) -> Host {
        let dir = tempfile::Builder::new()
            .prefix("vmrepl-e2e-")
            .tempdir()
            .unwrap();
        let h = Host {
            name: name.to_string(),
            ip: ip.to_string(),
            port,
            dir,
            started: false,
            pid: None,
        };
        let listen = format!("{ip}:{port}");
        // The metrics page on a port the system picks (`host info` tells which).
        let metrics = format!("{ip}:0");
        // The dashboard likewise (`vmrepl dashboard` prints its URL).
        let dashboard = format!("{ip}:0");
        let mut args = vec![
            "host",
            "init",
            "--name",
            name,
            "--listen",
            &listen,
            "--accel",
            "tcg",
            "--metrics",
            &metrics,
            "--dashboard",
            &dashboard,
        ];
        args.extend_from_slice(extra);
        h.ok(&args);
        h
    }

    pub fn data(&self) -> &Path {
        self.dir.path()
    }

    /// Runs the CLI against this host.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--data")
            .arg(self.data())
            .args(args)
            .output()
            .expect("run vmrepl")
    }

    /// Runs the CLI and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "vmrepl {args:?} failed ({}):\nstdout: {}\nstderr: {}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs the CLI and requires failure; returns stderr+stdout.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            !o.status.success(),
            "vmrepl {args:?} should have failed but printed {}",
            String::from_utf8_lossy(&o.stdout)
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        )
    }

    /// Runs the CLI with --json and parses the answer.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    pub fn start(&mut self) {
        self.start_with(&[], &[]);
    }

    /// Starts the daemon through `wrapper` (e.g. `ip netns exec NS`, empty for none) with
    /// `env` added to its environment; returns its pid.
    pub fn start_with(&mut self, wrapper: &[&str], env: &[(&str, &str)]) -> u32 {
        self.try_start_with(wrapper, env)
            .unwrap_or_else(|e| panic!("the daemon of {} did not start: {e}", self.name))
    }

    /// [`Host::start_with`] for a daemon that may end before it answers (one asked to crash
    /// early): returns what the start printed when it did not answer.
    pub fn try_start_with(
        &mut self,
        wrapper: &[&str],
        env: &[(&str, &str)],
    ) -> Result<u32, String> {
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        cmd.arg("--data")
            .arg(self.data())
            .args(["daemon", "--background"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let o = cmd.output().expect("run vmrepl daemon");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if !o.status.success() {
            return Err(format!(
                "{out}{}\n{}",
                String::from_utf8_lossy(&o.stderr),
                self.log_tail()
            ));
        }
        // "daemon started (pid N), log: ..."
        let pid = out
            .split("(pid ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("no pid in {out:?}"))?;
        self.started = true;
        self.pid = Some(pid);
        Ok(pid)
    }

    /// The pid of the daemon this harness started, if it runs.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.pid
    }

    /// Sends SIGKILL to the daemon (a crash: nothing is flushed or closed) without waiting.
    pub fn kill_daemon_now(&mut self) {
        let pid = self
            .pid
            .take()
            .expect("the daemon was started by this harness");
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        self.started = false;
    }

    /// Waits until the daemon is gone (its lock released), after a kill or a crash.
    pub fn wait_daemon_gone(&mut self, timeout: Duration) {
        wait_until(
            &format!("the daemon of {} gone", self.name),
            timeout,
            || {
                std::fs::File::open(self.data().join("daemon.lock"))
                    .map(|f| f.try_lock().is_ok())
                    .unwrap_or(true)
            },
        );
        self.started = false;
        self.pid = None;
    }

    /// `kill -9` of the daemon, then waits until it is gone.
    pub fn kill_daemon(&mut self) {
        self.kill_daemon_now();
        self.wait_daemon_gone(Duration::from_secs(15));
    }

    pub fn stop_daemon(&mut self) {
        self.ok(&["stop"]);
        wait_until("daemon socket gone", Duration::from_secs(15), || {
            !self.data().join("mgmt.sock").exists()
        });
        // The lock is released when the process exits.
        wait_until("daemon exited", Duration::from_secs(15), || {
            std::fs::File::open(self.data().join("daemon.lock"))
                .map(|f| f.try_lock().is_ok())
                .unwrap_or(true)
        });
        self.started = false;
        self.pid = None;
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.data().join("daemon.log")).unwrap_or_default();
        let n = s.len().saturating_sub(3000);
        format!(
            "--- daemon.log tail ---\n{}",
            &s[s.floor_char_boundary(n)..]
        )
    }

    /// The VM's current state string.
    pub fn vm_state(&self, vm: &str) -> String {
        self.json(&["vm", "show", vm])["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn vm_pid(&self, vm: &str) -> Option<u32> {
        self.json(&["vm", "show", vm])["pid"]
            .as_u64()
            .map(|p| p as u32)
    }

    pub fn console(&self, vm: &str) -> String {
        // All of it (up to the 16 MiB limit), not only the default 64 KiB tail.
        self.ok(&["vm", "console", vm, "--tail", "16777216"])
    }

    /// Waits until the VM's console contains `needle`.
    pub fn wait_console(&self, vm: &str, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let c = self.console(vm);
            if c.contains(needle) {
                return c;
            }
            if c.contains("VMREPL FAIL") || c.contains("Kernel panic") {
                panic!("guest {vm} failed while waiting for {needle:?}:\n{c}");
            }
            if start.elapsed() > timeout {
                panic!("guest {vm} did not print {needle:?} within {timeout:?}; console:\n{c}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn wait_state(&self, vm: &str, state: &str, timeout: Duration) {
        wait_until(&format!("{vm} {state}"), timeout, || {
            self.vm_state(vm) == state
        });
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Stop every VM QEMU we know of, then the daemon.
        if let Ok(list) = std::fs::read_dir(self.data().join("run")) {
            for e in list.flatten() {
                if let Ok(pid) = std::fs::read_to_string(e.path().join("qemu.pid")) {
                    let _ = Command::new("kill").arg("-9").arg(pid.trim()).status();
                }
            }
        }
        if self.started {
            let _ = self.run(&["stop"]);
        }
        // A storage daemon a killed daemon left behind (its own daemon stops the ones it runs).
        if let Ok(list) = std::fs::read_dir(self.data().join("run")) {
            let mine = self.data().to_string_lossy().into_owned();
            for e in list.flatten() {
                let Ok(pid) = std::fs::read_to_string(e.path().join("offline/qsd.pid")) else {
                    continue;
                };
                let pid = pid.trim().to_string();
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmd).contains(&mine) {
                    let _ = Command::new("kill").arg("-9").arg(&pid).status();
                }
            }
        }
        // VMREPL_KEEP_FAILED=1 keeps a failed test's data folders (daemon.log, images).
        if std::thread::panicking() && std::env::var_os("VMREPL_KEEP_FAILED").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            eprintln!("kept {} for {}", dir.keep().display(), self.name);
        }
    }
}

/// Defines a VM that boots the test guest with workload `work` (generation "1" or "2"), one
/// disk per size (or absolute path of an image to import) in `disks`, and its network
/// adapter not connected.
pub fn create_guest_vm(h: &Host, name: &str, generation: &str, disks: &[&str], work: &str) {
    let g = guest();
    let mut args: Vec<String> = vec![
        "vm".into(),
        "create".into(),
        name.into(),
        "--generation".into(),
        generation.into(),
        "--memory".into(),
        "256".into(),
        "--kernel".into(),
        g.kernel.display().to_string(),
        "--initrd".into(),
        g.initrd.display().to_string(),
        "--cmdline".into(),
        format!("console=ttyS0 quiet vmrepl.work={work}"),
        "--nic".into(),
        "none".into(),
    ];
    for d in disks {
        // A path imports an existing image; anything else is the size of a new disk.
        args.push(
            if d.starts_with('/') {
                "--import"
            } else {
                "--disk"
            }
            .into(),
        );
        args.push(d.to_string());
    }
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    h.ok(&a);
}

/// Polls `cond` every 100 ms until it holds or `timeout` passes (then panics naming `what`).
/// Every file and folder under `root` (itself included) that another local user could read,
/// with its mode: folders must be 0700, files 0600 or stricter. Sockets count as files.
pub fn shared_entries(root: &Path) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let mode = md.permissions().mode() & 0o7777;
        if md.is_dir() {
            if mode != 0o700 {
                out.push((p.clone(), mode));
            }
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        } else if mode & 0o077 != 0 {
            out.push((p, mode));
        }
    }
    out
}

pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Converts a qcow2 image to raw and runs blockio verify on it; returns the summary line.
pub fn verify_image(img: &Path, blocks: u32, gen_arg: &str, gen: u64) -> String {
    let g = guest();
    let raw = tempfile::NamedTempFile::new().unwrap();
    let st = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(img)
        .arg(raw.path())
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert {} failed", img.display());
    let o = Command::new(&g.blockio)
        .arg("verify")
        .arg(raw.path())
        .args(["--blocks", &blocks.to_string(), gen_arg, &gen.to_string()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "blockio verify of {} failed: {out}{}",
        img.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// One e2e test at a time boots guests: the machine has two cores.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static M: std::sync::Mutex<()> = std::sync::Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

/// Two hosts that trust each other's built-in CA; B is a replica server authorizing A.
pub fn pair(a_ip: &str, b_ip: &str, trust_group: &str) -> (Host, Host, PathBuf) {
    let mut a = Host::init("hosta.test", a_ip);
    let mut b = Host::init("hostb.test", b_ip);
    let a_ca = a.data().join("tls/ca.pem");
    let b_ca = b.data().join("tls/ca.pem");
    a.ok(&["host", "trust", b_ca.to_str().unwrap()]);
    b.ok(&["host", "trust", a_ca.to_str().unwrap()]);
    a.start();
    b.start();
    let store = b.data().join("replicas-from-a");
    b.ok(&["replication", "server", "set", "--enable"]);
    authorize(&b, "hosta.test", &store, trust_group);
    (a, b, store)
}

/// On the replica server `h`: authorizes `primary` into `storage`, in `trust_group`.
pub fn authorize(h: &Host, primary: &str, storage: &Path, trust_group: &str) {
    h.ok(&[
        "replication",
        "server",
        "authorize",
        "--primary",
        primary,
        "--storage",
        storage.to_str().unwrap(),
        "--trust-group",
        trust_group,
    ]);
}

/// `replication enable VM` towards `b`, under the certificate name `name`, with `extra` options.
pub fn enable(a: &Host, b: &Host, vm: &str, name: &str, extra: &[&str]) -> std::process::Output {
    enable_via(a, &format!("{}:{}", b.ip, b.port), vm, name, extra)
}

/// `replication enable VM` towards the replica server at `server` (HOST:PORT).
pub fn enable_via(
    a: &Host,
    server: &str,
    vm: &str,
    name: &str,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "replication",
        "enable",
        vm,
        "--replica-server",
        server,
        "--replica-name",
        name,
    ];
    args.extend_from_slice(extra);
    a.run(&args)
}

/// [`enable`], which must succeed (the failure shows its stderr and the daemon's log);
/// returns what it printed.
pub fn enable_ok(a: &Host, b: &Host, vm: &str, name: &str, extra: &[&str]) -> String {
    let o = enable(a, b, vm, name, extra);
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stderr),
        a.log_tail()
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn refused(o: std::process::Output) -> String {
    assert!(
        !o.status.success(),
        "accepted: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn status(h: &Host, vm: &str) -> serde_json::Value {
    h.json(&["replication", "status", vm])["relationships"][0].clone()
}

pub fn acked(h: &Host, vm: &str) -> u64 {
    status(h, vm)["last_sequence"].as_u64().unwrap()
}

pub fn last_stopped_gen(console: &str, dev: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| {
            l.trim_end_matches('\r')
                .strip_prefix(&format!("VMREPL STOPPED dev={dev} gen="))
        })
        .filter_map(|g| g.trim().parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no STOPPED line for {dev} in:\n{console}"))
}

/// Makes `h` a replica server that authorizes `primary` into `storage`.
pub fn serve_replicas_for(h: &Host, primary: &str, storage: &Path) {
    h.ok(&["replication", "server", "set", "--enable"]);
    authorize(h, primary, storage, "DEFAULT");
}

/// What the guest's `check` step found on a disk (its VERIFY line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub ok: u64,
    pub bad: u64,
    pub zero: u64,
    pub min_gen: Option<u64>,
    pub max_gen: Option<u64>,
    pub pass: bool,
}

/// The guest's last VERIFY line for `dev` on the console, once it printed one.
pub fn guest_check(h: &Host, vm: &str, dev: &str) -> Check {
    let needle = format!("VMREPL VERIFY dev={dev} ");
    let console = h.wait_console(vm, &needle, Duration::from_secs(180));
    let line = console
        .lines()
        .rfind(|l| l.contains(&needle))
        .unwrap()
        .trim_end_matches('\r')
        .to_string();
    let field = |k: &str| -> Option<String> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_string))
    };
    let num = |k: &str| field(k).and_then(|v| v.parse().ok());
    Check {
        ok: num("ok").unwrap_or(0),
        bad: num("bad").unwrap_or(u64::MAX),
        zero: num("zero").unwrap_or(u64::MAX),
        min_gen: num("min_gen"),
        max_gen: num("max_gen"),
        pass: field("result").as_deref() == Some("pass"),
    }
}

/// The path of a VM's disk `i` on host `h`.
pub fn disk_path(h: &Host, vm: &str, i: usize) -> PathBuf {
    h.json(&["vm", "show", vm])["definition"]["disks"][i]["path"]
        .as_str()
        .unwrap()
        .into()
}

/// A layer of disk `disk` of the replica, in `store`, of `primary`'s VM `vm`: `top.qcow2`
/// (the latest state) or `rp-SEQ.qcow2` (a kept recovery point).
pub fn replica_image(store: &Path, primary: &Host, vm: &str, disk: usize, layer: &str) -> PathBuf {
    let uuid = primary.json(&["vm", "show", vm])["definition"]["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    store
        .join(uuid)
        .join("disks")
        .join(format!("disk{disk}"))
        .join(layer)
}

/// `qemu-img compare` of two images (read without locks).
pub fn same_content(a: &Path, b: &Path) -> Result<(), String> {
    let o = Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

/// A TCP forwarder between a primary and a replica server (real TLS passes through it) that
/// can cut a connection mid-transfer: once armed with `cut_after(n)`, the first connection
/// that carries more than `n` bytes towards the server is closed on both sides. It stands in
/// for a network failure, which the real parts cannot produce on demand.
pub struct CuttingProxy {
    pub addr: std::net::SocketAddr,
    limit: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cuts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CuttingProxy {
    /// Listens on `ip` (a port the OS gives) and forwards to `target`.
    pub fn start(ip: &str, target: std::net::SocketAddr) -> CuttingProxy {
        use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
        use std::sync::Arc;
        let l = std::net::TcpListener::bind((ip, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        let limit = Arc::new(AtomicU64::new(0));
        let cuts = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (lim, cut, st) = (limit.clone(), cuts.clone(), stop.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = c else { continue };
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let (lim, cut) = (lim.clone(), cut.clone());
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                // Towards the server, counting; back to the client, plain.
                std::thread::spawn(move || {
                    let (mut from, mut to) = (client, server);
                    let mut buf = vec![0u8; 64 << 10];
                    let mut total = 0u64;
                    loop {
                        let n = match std::io::Read::read(&mut from, &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        total += n as u64;
                        let l = lim.load(Ordering::SeqCst);
                        if l > 0 && total > l {
                            lim.store(0, Ordering::SeqCst);
                            cut.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let (mut from, mut to) = (s2, c2);
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CuttingProxy {
            addr,
            limit,
            cuts,
            stop,
        }
    }

    /// Cuts the next connection that sends more than `bytes` bytes towards the server.
    pub fn cut_after(&self, bytes: u64) {
        self.limit.store(bytes, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many connections were cut so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        // Wake the accept loop so that it sees the stop flag and ends.
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

/// A TCP forwarder between a primary and a replica server (real TLS passes through it) that
/// can slow the way towards the server to `throttle` bytes per second, flip one byte of it,
/// take the link down and up again, and counts what it forwarded. It stands in for a slow,
/// damaging or lost network.
pub struct FaultProxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    rate: Arc<AtomicU64>,
    flip_at: Arc<AtomicU64>,
    flips: Arc<AtomicUsize>,
    forwarded: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Listens on `ip` (a port the OS gives) and forwards to `target`.
    pub fn start(ip: &str, target: SocketAddr) -> FaultProxy {
        let l = TcpListener::bind((ip, 0)).unwrap();
        let p = FaultProxy {
            addr: l.local_addr().unwrap(),
            down: Arc::default(),
            rate: Arc::default(),
            flip_at: Arc::default(),
            flips: Arc::default(),
            forwarded: Arc::default(),
            stop: Arc::default(),
        };
        let (down, rate, flip_at, flips, fwd, stop) = (
            p.down.clone(),
            p.rate.clone(),
            p.flip_at.clone(),
            p.flips.clone(),
            p.forwarded.clone(),
            p.stop.clone(),
        );
        std::thread::spawn(move || {
            for c in l.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = c else { continue };
                if down.load(Ordering::SeqCst) {
                    continue; // dropped: the link is down
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (rate, flip_at, flips, fwd) =
                    (rate.clone(), flip_at.clone(), flips.clone(), fwd.clone());
                let (down1, down2) = (down.clone(), down.clone());
                std::thread::spawn(move || {
                    let (mut from, mut to) = (client, server);
                    let mut buf = vec![0u8; 16 << 10];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if down1.load(Ordering::SeqCst) {
                            break;
                        }
                        let r = rate.load(Ordering::SeqCst);
                        if r > 0 {
                            std::thread::sleep(Duration::from_secs_f64(n as f64 / r as f64));
                        }
                        let total = fwd.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                        let at = flip_at.load(Ordering::SeqCst);
                        if at > 0 && total >= at {
                            flip_at.store(0, Ordering::SeqCst);
                            flips.fetch_add(1, Ordering::SeqCst);
                            buf[n / 2] ^= 0x5a;
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let (mut from, mut to) = (s2, c2);
                    let mut buf = vec![0u8; 16 << 10];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if down2.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        p
    }

    /// Limits the way towards the server to `bytes_per_sec` (0: no limit).
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Flips one byte of the stream towards the server once `bytes` more went through.
    pub fn flip_after(&self, bytes: u64) {
        let now = self.forwarded.load(Ordering::SeqCst);
        self.flip_at.store(now + bytes.max(1), Ordering::SeqCst);
    }

    pub fn flips(&self) -> usize {
        self.flips.load(Ordering::SeqCst)
    }

    /// Takes the link down: open connections break at their next byte in either direction,
    /// new ones are dropped.
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
    }

    /// Brings the link back up.
    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    /// Waits until `bytes` more went towards the server.
    pub fn wait_forwarded(&self, bytes: u64, timeout: Duration) {
        let from = self.forwarded.load(Ordering::SeqCst);
        wait_until("bytes through the proxy", timeout, || {
            self.forwarded.load(Ordering::SeqCst) >= from + bytes
        });
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.down.store(true, Ordering::SeqCst);
        self.rate.store(0, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// A network namespace with a veth pair to this one, deleted when dropped.
pub struct Netns {
    pub name: String,
    /// The veth end in this namespace.
    outer: String,
}

impl Netns {
    /// `vmrt-<tag>` with `outer_ip/30` here and `inner_ip/30` inside.
    pub fn create(tag: &str, outer_ip: &str, inner_ip: &str) -> Netns {
        let name = format!("vmrt-{tag}");
        let outer = format!("vmrt-{tag}o");
        let inner = format!("vmrt-{tag}i");
        let ns = Netns {
            name: name.clone(),
            outer: outer.clone(),
        };
        // Leftovers of a run that was killed before its guards ran.
        ns.delete();
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &name,
        ]);
        ip(&["addr", "add", &format!("{outer_ip}/30"), "dev", &outer]);
        ip(&["link", "set", &outer, "up"]);
        let inside = |args: &[&str]| {
            let mut v = vec!["netns", "exec", &name, "ip"];
            v.extend_from_slice(args);
            ip(&v);
        };
        inside(&["addr", "add", &format!("{inner_ip}/30"), "dev", &inner]);
        inside(&["link", "set", &inner, "up"]);
        inside(&["link", "set", "lo", "up"]);
        ns
    }

    /// Limits what this side sends to the namespace to `rate` (tc's units, e.g. `24mbit`).
    pub fn throttle(&self, rate: &str) {
        let o = Command::new("tc")
            .args([
                "qdisc",
                "replace",
                "dev",
                &self.outer,
                "root",
                "tbf",
                "rate",
                rate,
            ])
            .args(["burst", "64kb", "latency", "500ms"])
            .output()
            .expect("run tc");
        assert!(
            o.status.success(),
            "tc failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    pub fn link(&self, up: bool) {
        ip(&["link", "set", &self.outer, if up { "up" } else { "down" }]);
    }

    /// Inside the namespace, a firewall rule (nft) that silently drops TCP to `port`
    /// (`None`: no rule).
    pub fn drop_tcp(&self, port: Option<u16>) {
        let nft = |script: &str| {
            let o = Command::new("ip")
                .args(["netns", "exec", &self.name, "nft", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write;
                    c.stdin.take().unwrap().write_all(script.as_bytes())?;
                    c.wait_with_output()
                })
                .expect("run nft (apt-get install nftables)");
            assert!(
                o.status.success(),
                "nft failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        nft("flush ruleset\n");
        if let Some(p) = port {
            nft(&format!(
                "table inet vmrt {{\n  chain input {{\n    type filter hook input priority 0;\n    tcp dport {p} drop\n  }}\n}}\n"
            ));
        }
    }

    fn delete(&self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.outer])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

pub fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        o.status.success(),
        "ip {args:?} failed (the fault matrix runs as root): {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The environment that runs a daemon under libfaketime, its wall clock offset by what `file` says
/// (re-read every second); its monotonic clock stays true.
pub fn faketime_env(file: &Path) -> Vec<(String, String)> {
    let lib = ["/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("libfaketime is not installed; run ./scripts/setup.sh");
    vec![
        ("LD_PRELOAD".into(), lib.into()),
        ("FAKETIME_TIMESTAMP_FILE".into(), file.display().to_string()),
        ("FAKETIME_CACHE_DURATION".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ("FAKETIME_DONT_RESET".into(), "1".into()),
    ]
}

/// A QEMU that lacks `hidden` machine types; aliases fall back to `alias_to`.
pub fn older_qemu(dir: &Path, name: &str, hidden: &[&str], alias_to: &str) -> PathBuf {
    let p = dir.join(name);
    let del: String = hidden
        .iter()
        .map(|m| format!("/^{} /d;", m.replace('.', "\\.")))
        .collect();
    let script = format!(
        "#!/bin/sh\n# vmrepl test: the real QEMU without {hidden:?}\nfor a in \"$@\"; do\n  if [ \"$a\" = help ]; then\n    qemu-system-x86_64 \"$@\" | sed -e '{del}' -e 's/(alias of pc-i440fx-[0-9.]*)/(alias of {alias_to})/' -e 's/ (default)//'\n    exit 0\n  fi\ndone\nexec qemu-system-x86_64 \"$@\"\n"
    );
    std::fs::write(&p, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Points `h`'s configuration at another QEMU and restarts its daemon.
pub fn switch_qemu(h: &mut Host, qemu: &Path) {
    h.stop_daemon();
    let cfg = h.data().join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("qemu_binary"))
        .map(|l| format!("{l}\n"))
        .collect();
    let text = format!("qemu_binary = {:?}\n{text}", qemu.display().to_string());
    std::fs::write(&cfg, text).unwrap();
    h.start();
}

/// A tmpfs of `size` mounted on a folder for the test (root only), unmounted when dropped.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    pub fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let opt = format!("size={size}");
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opt, "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs needs root");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A VM that is off, generation 1, 128 MiB, with one empty 64 MiB disk: enough to replicate
/// without booting anything.
pub fn create_small_vm(h: &Host, name: &str) {
    h.ok(&[
        "vm",
        "create",
        name,
        "--generation",
        "1",
        "--memory",
        "128",
        "--disk",
        "64M",
    ]);
}

/// The VMs defined on `h` itself: `vm list` without the replicas it keeps for primaries.
pub fn local_vms(h: &Host) -> Vec<serde_json::Value> {
    h.json(&["vm", "list"])["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["kept_replica"] != true)
        .cloned()
        .collect()
}

/// Writes `mib` MiB of incompressible data (an xorshift stream from `seed`) at `at` (a qemu-io
/// offset such as "8M") into the qcow2 image `image` with qemu-io, which keeps the image's
/// bitmaps; tell vmrepl with `vm trust-disks` afterwards. The data goes through a file in `dir`.
pub fn qemu_io_random(dir: &Path, image: &Path, at: &str, mib: usize, seed: u64) {
    let file = dir.join("random.bin");
    let mut bytes = vec![0u8; mib << 20];
    let mut x = seed;
    for c in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&file, &bytes).unwrap();
    let w = format!("write -q -s {} {at} {mib}M", file.display());
    let st = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &w])
        .arg(image)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-io {w} {}", image.display());
}
