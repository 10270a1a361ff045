#![allow(dead_code)]
//! A real QEMU (TCG, no guest, paused) with two virtio-blk disks and a raw vars node.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmrepl_qemu::img::{CreateOpts, QemuImg};
use vmrepl_qemu::process::{QemuProcess, SpawnOptions};
use vmrepl_qemu::{is_alive, QmpClient};
use vmrepl_tracking::RelTag;

pub const T: Duration = Duration::from_secs(30);
pub const DISK_SIZE: u64 = 64 << 20;
pub const VARS_SIZE: u64 = 528 << 10;
pub const NODES: [&str; 2] = ["disk0", "disk1"];

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("vmrepl=info")
        .try_init();
}

pub fn rel() -> RelTag {
    RelTag::from_uuid(&uuid::Uuid::parse_str("0badc0de-1111-4222-8333-444455556666").unwrap())
}

pub fn disks() -> Vec<(&'static str, u64)> {
    NODES.iter().map(|n| (*n, DISK_SIZE)).collect()
}

/// A temp folder holding the test disks (logging on).
pub async fn images() -> tempfile::TempDir {
    init_logs();
    let d = tempfile::tempdir().unwrap();
    make_images(d.path()).await;
    d
}

/// Images of a test VM in `dir`: disk0/disk1 qcow2 and a raw vars file with a pattern.
pub async fn make_images(dir: &Path) {
    for n in NODES {
        QemuImg::default()
            .create(
                &dir.join(format!("{n}.qcow2")),
                DISK_SIZE,
                &CreateOpts::default(),
            )
            .await
            .unwrap();
    }
    let vars: Vec<u8> = (0..VARS_SIZE).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.join("vars.fd"), vars).unwrap();
}

/// A running QEMU; SIGKILLed on drop if still alive.
pub struct Vm {
    pub p: QemuProcess,
    pub dir: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if is_alive(self.p.pid()) {
            let _ = kill(Pid::from_raw(self.p.pid()), Signal::SIGKILL);
        }
    }
}

impl Vm {
    pub async fn start(dir: &Path) -> Vm {
        let sock = dir.join("qmp.sock");
        let mut argv: Vec<String> = [
            "-machine",
            "pc-i440fx-7.2,accel=tcg",
            "-nodefaults",
            "-display",
            "none",
            "-S",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.push("-qmp".into());
        argv.push(format!("unix:{},server=on,wait=off", sock.display()));
        for (i, n) in NODES.iter().enumerate() {
            let f = dir.join(format!("{n}.qcow2"));
            argv.push("-blockdev".into());
            argv.push(
                json!({"driver":"file","filename":f.to_string_lossy(),"node-name":format!("{n}-file")})
                    .to_string(),
            );
            argv.push("-blockdev".into());
            argv.push(
                json!({"driver":"qcow2","file":format!("{n}-file"),"node-name":n}).to_string(),
            );
            argv.push("-device".into());
            argv.push(format!("virtio-blk-pci,drive={n},id=vd{i}"));
        }
        let vars = dir.join("vars.fd");
        argv.push("-blockdev".into());
        argv.push(
            json!({"driver":"file","filename":vars.to_string_lossy(),"node-name":"fw-vars-file"})
                .to_string(),
        );
        argv.push("-blockdev".into());
        argv.push(json!({"driver":"raw","file":"fw-vars-file","node-name":"fw-vars"}).to_string());
        let mut opts = SpawnOptions::new(dir.join("qemu.log"), &sock);
        opts.own_process_group = false;
        let p = QemuProcess::spawn(Path::new("qemu-system-x86_64"), &argv, &opts)
            .await
            .unwrap();
        Vm {
            p,
            dir: dir.to_path_buf(),
        }
    }

    pub fn qmp(&self) -> &QmpClient {
        self.p.qmp()
    }

    /// A guest-like write through disk `i`'s device (`qemu-io` command, e.g. `write -P 0xab 1M 64k`).
    pub async fn io(&self, i: usize, cmd: &str) {
        let line = format!("qemu-io -d /machine/peripheral/vd{i}/virtio-backend \"{cmd}\"");
        let out = self
            .qmp()
            .execute("human-monitor-command", json!({"command-line": line}))
            .await
            .unwrap();
        let out = out.as_str().unwrap_or_default();
        assert!(
            !out.to_lowercase().contains("error") && !out.contains("failed"),
            "{line}: {out}"
        );
    }

    pub async fn quit(self) {
        self.p.quit(T).await.unwrap();
    }

    pub fn sigkill(self) {
        self.p.kill();
        let pid = self.p.pid();
        let deadline = std::time::Instant::now() + T;
        while is_alive(pid) {
            assert!(std::time::Instant::now() < deadline, "QEMU did not die");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Reads `len` bytes at `off` of a qcow2 image through qemu-img (convert to raw).
pub async fn raw_of(img: &Path, out: &Path) -> Vec<u8> {
    let st = tokio::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(img)
        .arg(out)
        .status()
        .await
        .unwrap();
    assert!(st.success());
    std::fs::read(out).unwrap()
}

/// [`vmrepl_tracking::extents`] (blocking file I/O) on a blocking thread.
pub async fn map_off_thread(
    path: &Path,
) -> Result<Vec<vmrepl_tracking::Extent>, vmrepl_tracking::TrackingError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || vmrepl_tracking::extents(&p))
        .await
        .expect("the mapping thread ran")
}
