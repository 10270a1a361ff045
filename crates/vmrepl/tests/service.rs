//! End to end: the daemon as a systemd service (docs/install.md). It tells systemd when it is
//! ready, pings the watchdog and says when it stops (sd_notify), and a stop of the service
//! (SIGTERM, as `systemctl stop` sends with `KillMode=process`, or `vmrepl stop`) leaves its
//! VMs running for the next daemon to adopt. Also the completions and manual pages the .deb
//! ships. systemd itself is not running here: a test socket plays its notification socket.

mod common;
use common::*;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(120);

/// One message as systemd would have received it, and what the daemon answered right then.
#[derive(Debug, Clone)]
struct Heard {
    at: Instant,
    text: String,
    /// For `READY=1`: whether `vmrepl vm list` succeeded at once after it arrived.
    answered: Option<bool>,
}

/// Plays systemd's notification socket: a datagram socket in a temporary folder, read by a
/// thread until the test ends.
struct FakeSystemd {
    path: std::path::PathBuf,
    heard: Arc<Mutex<Vec<Heard>>>,
    _dir: tempfile::TempDir,
}

impl FakeSystemd {
    /// `data`: the daemon's data folder, asked at once when `READY=1` arrives.
    fn listen(data: &std::path::Path) -> FakeSystemd {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let (h, data) = (heard.clone(), data.to_path_buf());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            // Ends when the test drops its side (the Arc is the last owner left).
            while Arc::strong_count(&h) > 1 {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                let at = Instant::now();
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let answered = text.lines().any(|l| l == "READY=1").then(|| {
                    Command::new(bin())
                        .arg("--data")
                        .arg(&data)
                        .args(["vm", "list"])
                        .output()
                        .map(|o| o.status.success())
                        .unwrap_or(false)
                });
                h.lock().unwrap().push(Heard { at, text, answered });
            }
        });
        FakeSystemd {
            path,
            heard,
            _dir: dir,
        }
    }

    fn socket(&self) -> &str {
        self.path.to_str().unwrap()
    }

    fn heard(&self) -> Vec<Heard> {
        self.heard.lock().unwrap().clone()
    }

    /// Messages whose first line is `first`.
    fn count(&self, first: &str) -> usize {
        self.heard()
            .iter()
            .filter(|m| m.text.lines().next() == Some(first))
            .count()
    }
}

#[test]
fn systemd_hears_ready_once_the_daemon_answers_then_watchdog_pings_and_stopping_at_stop() {
    let mut h = Host::init("notify.test", "127.0.0.171");
    let systemd = FakeSystemd::listen(h.data());
    let socket = systemd.socket().to_string();
    h.start_with(
        &[],
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "1000000")],
    );
    wait_until("READY=1", Duration::from_secs(30), || {
        systemd.count("READY=1") == 1
    });
    let heard = systemd.heard();
    let ready = &heard[0];
    assert_eq!(
        ready.text.lines().next(),
        Some("READY=1"),
        "nothing comes before READY=1: {heard:?}"
    );
    assert_eq!(
        ready.answered,
        Some(true),
        "the daemon answers when it says it is ready"
    );
    assert!(
        ready.text.contains("STATUS=serving host notify.test")
            && ready.text.contains("127.0.0.171"),
        "{:?}",
        ready.text
    );

    // Every half of WATCHDOG_USEC: at least 4 within 3 s, and not a flood.
    wait_until("four watchdog pings", Duration::from_secs(10), || {
        systemd.count("WATCHDOG=1") >= 4
    });
    let pings: Vec<Instant> = systemd
        .heard()
        .iter()
        .filter(|m| m.text == "WATCHDOG=1\n")
        .map(|m| m.at)
        .collect();
    let span = pings[pings.len() - 1].duration_since(pings[0]);
    assert!(
        span >= Duration::from_millis(400 * (pings.len() as u64 - 1)),
        "{} pings in {span:?}",
        pings.len()
    );

    h.stop_daemon();
    wait_until("STOPPING=1", Duration::from_secs(10), || {
        systemd.count("STOPPING=1") == 1
    });
    let heard = systemd.heard();
    let stopping = heard
        .iter()
        .position(|m| m.text.starts_with("STOPPING=1\n"))
        .unwrap();
    assert!(
        heard[stopping].text.contains("running VMs keep running"),
        "{:?}",
        heard[stopping].text
    );
    // The daemon has exited (stop_daemon waited for its lock): nothing may follow.
    std::thread::sleep(Duration::from_millis(300));
    let after: Vec<_> = systemd.heard().into_iter().skip(stopping + 1).collect();
    assert!(after.is_empty(), "messages after STOPPING=1: {after:?}");
    assert_eq!(systemd.count("READY=1"), 1);
}

#[test]
fn a_watchdog_meant_for_another_pid_gets_no_pings_and_without_notify_socket_nothing_is_sent() {
    let mut h = Host::init("nowatch.test", "127.0.0.172");
    let systemd = FakeSystemd::listen(h.data());
    let socket = systemd.socket().to_string();
    // The watchdog watches another process (systemd names its main pid): READY only.
    h.start_with(
        &[],
        &[
            ("NOTIFY_SOCKET", &socket),
            ("WATCHDOG_USEC", "200000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    wait_until("READY=1", Duration::from_secs(30), || {
        systemd.count("READY=1") == 1
    });
    // Five periods of 200 ms without a ping.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(systemd.count("WATCHDOG=1"), 0, "{:?}", systemd.heard());
    h.stop_daemon();
    wait_until("STOPPING=1", Duration::from_secs(10), || {
        systemd.count("STOPPING=1") == 1
    });
    // Without NOTIFY_SOCKET the daemon runs as before and sends nothing anywhere.
    h.start();
    assert_eq!(h.json(&["vm", "list"])["vms"], serde_json::json!([]));
    h.stop_daemon();
    assert_eq!(systemd.count("READY=1"), 1, "{:?}", systemd.heard());
}

/// Whether `pid` runs (exists and is not a zombie).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next()),
            Some("Z") | Some("X")
        ),
        Err(_) => false,
    }
}

/// The highest generation the guest reported durable on `dev`.
fn last_written_gen(console: &str, dev: &str) -> u64 {
    let prefix = format!("VMREPL WROTE dev={dev} gen=");
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix(&prefix))
        .filter_map(|g| g.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// The guest goes on writing: a generation above `after` appears on its console.
fn wait_guest_writes_past(h: &Host, vm: &str, after: u64) -> u64 {
    let mut last = after;
    wait_until(
        &format!("{vm} writes past generation {after}"),
        Duration::from_secs(60),
        || {
            last = last_written_gen(&h.console(vm), "vda");
            last > after
        },
    );
    last
}

#[test]
fn a_service_stop_by_sigterm_or_vmrepl_stop_leaves_the_vm_running_and_the_next_daemon_adopts_it() {
    let _s = serial();
    let mut h = Host::init("survive.test", "127.0.0.173");
    h.start();
    create_guest_vm(&h, "keeper", "1", &["8M"], "writeloop:vda:16:200");
    h.ok(&["vm", "start", "keeper"]);
    h.wait_console("keeper", "VMREPL WROTE", BOOT);
    let qemu = h.vm_pid("keeper").unwrap();

    // `systemctl stop vmrepl` with KillMode=process: SIGTERM to the daemon alone.
    let daemon = h.daemon_pid().unwrap();
    let st = Command::new("kill")
        .args(["-TERM", &daemon.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    h.wait_daemon_gone(Duration::from_secs(15));
    assert!(!alive(daemon), "the daemon ended at SIGTERM");
    assert!(alive(qemu), "QEMU (pid {qemu}) ended with the daemon");
    let log = std::fs::read_to_string(h.data().join("daemon.log")).unwrap();
    assert!(log.contains("running VMs keep running"), "{log}");

    // The next daemon adopts it: same process, still running, still writing.
    h.start();
    let list = h.json(&["vm", "list"]);
    let row = list["vms"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["definition"]["name"] == "keeper"))
        .unwrap_or_else(|| panic!("keeper missing from {list}"));
    assert_eq!(row["state"], "running", "{row}");
    assert_eq!(row["pid"], qemu, "{row}");
    assert_eq!(h.vm_state("keeper"), "running");
    assert_eq!(h.vm_pid("keeper"), Some(qemu));
    let gen = last_written_gen(&h.console("keeper"), "vda");
    let gen = wait_guest_writes_past(&h, "keeper", gen);

    // `vmrepl stop` (what the unit's ExecStop would run by hand) likewise.
    h.stop_daemon();
    assert!(alive(qemu), "QEMU (pid {qemu}) ended at `vmrepl stop`");
    h.start();
    assert_eq!(h.vm_state("keeper"), "running");
    assert_eq!(h.vm_pid("keeper"), Some(qemu));
    wait_guest_writes_past(&h, "keeper", gen);

    // And it is still controlled: a clean shutdown ends that very QEMU.
    h.ok(&["vm", "shutdown", "keeper", "--timeout", "60"]);
    assert_eq!(h.vm_state("keeper"), "off");
    wait_until("QEMU gone", Duration::from_secs(15), || !alive(qemu));
}

#[test]
fn the_binary_prints_completions_and_writes_manual_pages_that_man_reads() {
    let o = Command::new(bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let bash = String::from_utf8(o.stdout).unwrap();
    assert!(
        bash.contains("replication") && bash.contains("failover"),
        "{bash:.300}"
    );
    let o = Command::new(bin())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "an unknown shell is refused");
    assert!(String::from_utf8_lossy(&o.stderr).contains("possible values"));

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let o = Command::new(bin()).arg("man").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for page in [
        "vmrepl.1",
        "vmrepl-replication.1",
        "vmrepl-failover-start.1",
    ] {
        let path = out.join(page);
        let text = std::fs::read_to_string(&path).unwrap();
        let name = page.trim_end_matches(".1");
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!(".TH {name} 1 "))),
            "{page}: {text:.300}"
        );
        // man-db renders it (when installed) without a warning.
        if Command::new("man").arg("--version").output().is_ok() {
            let o = Command::new("man")
                .args(["-l", "-P", "cat", "--warnings"])
                .arg(&path)
                .env("MANWIDTH", "80")
                .output()
                .unwrap();
            let shown = String::from_utf8_lossy(&o.stdout);
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(
                o.status.success() && stderr.trim().is_empty(),
                "{page}: {stderr}"
            );
            assert!(shown.contains("NAME") && shown.contains(name), "{shown}");
        }
    }
}

#[test]
fn the_shipped_unit_runs_the_real_daemon_command_as_a_notify_service_that_leaves_vms_at_stop() {
    let unit = std::fs::read_to_string(repo().join("packaging/vmrepl.service")).unwrap();
    let lines: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for want in [
        "Type=notify",
        "NotifyAccess=main",
        "KillMode=process",
        "WatchdogSec=60",
        "Restart=on-failure",
        "WantedBy=multi-user.target",
    ] {
        assert!(lines.contains(&want), "{want} missing from the unit");
    }
    for absent in [
        "PrivateDevices=",
        "MemoryDenyWriteExecute=",
        "DeviceAllow=",
        "PrivateTmp=",
    ] {
        assert!(
            !lines.iter().any(|l| l.starts_with(absent)),
            "{absent} would break QEMU, KVM or imports"
        );
    }
    let exec = lines
        .iter()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(argv[0], "/usr/bin/vmrepl");
    // The binary under test accepts the very arguments (`--help` after them parses them all).
    let o = Command::new(bin())
        .args(&argv[1..])
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{exec}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // It names the CLI's default data folder and configuration file, so `vmrepl` commands
    // reach the service, and the service waits for the admin's configuration file.
    let arg = |name: &str| argv[argv.iter().position(|a| *a == name).unwrap() + 1];
    assert_eq!(arg("--data"), "/var/lib/vmrepl");
    assert_eq!(arg("--config"), "/etc/vmrepl/vmrepl.toml");
    let dd = vmrepl_host::datadir::DataDir::locate(None, None);
    assert_eq!(dd.root(), std::path::Path::new("/var/lib/vmrepl"));
    let condition = "ConditionPathExists=/etc/vmrepl/vmrepl.toml";
    assert!(lines.contains(&condition), "{condition} missing");
}

#[test]
fn the_example_configuration_is_a_valid_host_configuration_with_the_defaults() {
    use vmrepl_host::config::HostConfig;
    let path = repo().join("packaging/vmrepl.toml");
    let cfg = HostConfig::parse(&std::fs::read_to_string(&path).unwrap(), &path)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut defaults = HostConfig::new(&cfg.host_name, &cfg.listen, cfg.storage.clone());
    defaults.replica_server.default_storage = Some("/srv/vms/replica".into());
    assert_eq!(cfg, defaults, "the example shows every default as it is");
}
