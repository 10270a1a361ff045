#![allow(dead_code)]
//! Shared helpers for the component tests.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::Path;
use std::time::{Duration, Instant};
use vmrepl_qemu::cmdline::{build_command, RunPaths};
use vmrepl_qemu::img::{CreateOpts, QemuImg};
use vmrepl_qemu::{is_alive, ResolvedAccel};
use vmrepl_types::vm::{ConfigVersion, FirmwareVariantId};
use vmrepl_types::{DiskDef, FirmwareVariant, Generation, NicDef, NicMode, VmDefinition, VmName};

pub const QEMU: &str = "qemu-system-x86_64";

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("vmrepl=info")
        .try_init();
}

/// Kills a pid on drop, whatever the test did.
pub struct KillGuard(pub i32);

impl Drop for KillGuard {
    fn drop(&mut self) {
        if is_alive(self.0) {
            let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
        }
    }
}

/// Polls `cond` until true or the deadline; panics with `what` on timeout.
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A BIOS VM with one 64 MiB disk in `dir`, its argv for TCG, and its run paths.
pub async fn small_vm(dir: &Path) -> (VmDefinition, Vec<String>, RunPaths) {
    let disk = dir.join("disk0.qcow2");
    QemuImg::default()
        .create(&disk, 64 << 20, &CreateOpts::default())
        .await
        .unwrap();
    let vm = VmDefinition {
        name: VmName::new("t1").unwrap(),
        uuid: uuid::Uuid::new_v4(),
        generation: Generation::Bios,
        firmware: FirmwareVariantId::Seabios,
        machine_type: "pc-i440fx-7.2".into(),
        config_version: ConfigVersion::CURRENT,
        vcpus: 1,
        memory_mib: 64,
        disks: vec![DiskDef {
            id: "disk0".into(),
            path: disk,
            size_bytes: 64 << 20,
        }],
        nics: vec![NicDef {
            mac: "52:54:00:00:00:01".into(),
            mode: NicMode::NotConnected,
        }],
        kernel: None,
        nvram: None,
    };
    let fw = FirmwareVariant::fixed(
        FirmwareVariantId::Seabios,
        "/usr/share/seabios/bios-256k.bin".into(),
        None,
    );
    let paths = RunPaths::in_dir(dir);
    let cmd = build_command(&vm, &fw, &paths, ResolvedAccel::Tcg).unwrap();
    (vm, cmd.argv, paths)
}
