//! Capability probe and qemu-storage-daemon against the installed binaries.
mod common;

use common::{init_logs, KillGuard, QEMU};
use serde_json::json;
use std::path::Path;
use std::time::Duration;
use vmrepl_qemu::caps::{machine_types, probe, resolve_accel, resolve_machine_alias, ProbeOptions};
use vmrepl_qemu::img::{CreateOpts, QemuImg};
use vmrepl_qemu::storage_daemon::{SdDisk, StorageDaemon};
use vmrepl_qemu::ResolvedAccel;
use vmrepl_types::vm::FirmwareVariantId;
use vmrepl_types::Accel;

#[tokio::test]
async fn probe_reports_machine_types_firmware_and_storage() {
    init_logs();
    let d = tempfile::tempdir().unwrap();
    let mut opts = ProbeOptions::new(QEMU, vec![d.path().to_path_buf()], Accel::Tcg);
    opts.host_name = Some("host-a".into());
    let p = probe(&opts).await.unwrap();
    let h = &p.info;
    assert_eq!(h.host_name, "host-a");
    assert!(h.qemu_version.starts_with("7.2"), "{}", h.qemu_version);
    assert!(h.has_machine_type("pc-i440fx-7.2") && h.has_machine_type("pc-q35-7.2"));
    assert!(
        !h.has_machine_type("pc") && !h.has_machine_type("q35"),
        "aliases are not machine types"
    );
    assert_eq!(
        resolve_machine_alias(&p.machines, "pc").as_deref(),
        Some("pc-i440fx-7.2")
    );
    assert_eq!(
        resolve_machine_alias(&p.machines, "q35").as_deref(),
        Some("pc-q35-7.2")
    );
    let ids: Vec<_> = h.firmware.iter().map(|f| f.id).collect();
    assert_eq!(
        ids,
        [
            FirmwareVariantId::Seabios,
            FirmwareVariantId::Ovmf4m,
            FirmwareVariantId::Ovmf4mSecureBoot
        ]
    );
    assert!(!h.kvm_usable && h.kvm_reason.as_deref().unwrap().contains("tcg"));
    assert_eq!(resolve_accel(Accel::Auto, h).unwrap(), ResolvedAccel::Tcg);
    assert!(resolve_accel(Accel::Kvm, h)
        .unwrap_err()
        .to_string()
        .contains("use --accel tcg"));
    assert_eq!(h.storage.len(), 1);
    assert!(h.storage[0].total_bytes >= h.storage[0].free_bytes && h.storage[0].total_bytes > 0);

    // Another firmware folder (an empty one) and no descriptors: nothing found, and the probe
    // says so as data.
    opts.firmware_descriptor_dirs = vec![];
    opts.ovmf_dir = d.path().into();
    opts.seabios_dir = d.path().into();
    assert!(probe(&opts).await.unwrap().info.firmware.is_empty());
    assert!(machine_types(Path::new("/nonexistent/qemu")).await.is_err());
}

#[tokio::test]
async fn kvm_probe_gives_a_verdict_within_its_timeout() {
    init_logs();
    // Whatever this host's KVM does (absent, working, or hanging when nested), the probe
    // must come back in about its timeout with a reason when unusable.
    let mut opts = ProbeOptions::new(QEMU, vec![], Accel::Auto);
    opts.kvm_probe_timeout = Duration::from_secs(5);
    let start = std::time::Instant::now();
    let h = probe(&opts).await.unwrap().info;
    assert!(start.elapsed() < Duration::from_secs(15));
    assert_eq!(h.kvm_usable, h.kvm_reason.is_none(), "{:?}", h.kvm_reason);
    let mut opts = ProbeOptions::new(QEMU, vec![], Accel::Auto);
    opts.kvm_device = "/nonexistent/kvm".into();
    let h = probe(&opts).await.unwrap().info;
    assert!(!h.kvm_usable && h.kvm_reason.unwrap().contains("/nonexistent/kvm"));
}

/// A 16 MiB qcow2 `disk0.qcow2` in `dir`, as the one disk a storage daemon opens.
async fn one_disk(dir: &Path) -> (QemuImg, std::path::PathBuf, [SdDisk; 1]) {
    let img = QemuImg::default();
    let disk = dir.join("disk0.qcow2");
    img.create(&disk, 16 << 20, &CreateOpts::default())
        .await
        .unwrap();
    let disks = [SdDisk {
        id: "disk0".into(),
        path: disk.clone(),
        read_only: false,
        format: Default::default(),
    }];
    (img, disk, disks)
}

#[tokio::test]
async fn storage_daemon_adds_a_bitmap_that_persists_after_quit() {
    init_logs();
    let d = tempfile::tempdir().unwrap();
    let (img, disk, disks) = one_disk(d.path()).await;
    let sd = StorageDaemon::start(
        Path::new("qemu-storage-daemon"),
        &disks,
        &d.path().join("qsd.sock"),
        &d.path().join("qsd.log"),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let _g = KillGuard(sd.pid());
    let nodes = sd
        .qmp()
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .collect();
    assert!(
        names.contains(&"disk0") && names.contains(&"disk0-file"),
        "{names:?}"
    );
    sd.qmp()
        .execute(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "off-0", "persistent": true}),
        )
        .await
        .unwrap();
    sd.quit(Duration::from_secs(30)).await.unwrap();
    let info = img.info(&disk).await.unwrap();
    assert_eq!(info.bitmaps.len(), 1);
    assert_eq!(info.bitmaps[0].name, "off-0");
    assert!(info.bitmaps[0].enabled());
}

#[tokio::test]
async fn storage_daemon_start_failure_carries_its_message() {
    init_logs();
    let d = tempfile::tempdir().unwrap();
    let disks = [SdDisk {
        id: "disk0".into(),
        path: d.path().join("missing.qcow2"),
        read_only: false,
        format: Default::default(),
    }];
    let e = StorageDaemon::start(
        Path::new("qemu-storage-daemon"),
        &disks,
        &d.path().join("qsd.sock"),
        &d.path().join("qsd.log"),
        Duration::from_secs(30),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("missing.qcow2"), "{e}");
}

#[tokio::test]
async fn a_storage_daemon_left_behind_by_a_killed_owner_is_stopped_cleanly_by_the_next_start() {
    init_logs();
    let d = tempfile::tempdir().unwrap();
    let (_, _, disks) = one_disk(d.path()).await;
    let (sock, log) = (d.path().join("qsd.sock"), d.path().join("qsd.log"));
    let qsd = Path::new("qemu-storage-daemon");
    let first = StorageDaemon::start(qsd, &disks, &sock, &log, Duration::from_secs(30))
        .await
        .unwrap();
    let _g1 = KillGuard(first.pid());
    first
        .qmp()
        .execute(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "kept", "persistent": true}),
        )
        .await
        .unwrap();
    let old = first.pid();
    // Its owner dies without a word: nothing tells it to quit, and it keeps the write lock.
    std::mem::forget(first);
    let second = StorageDaemon::start(qsd, &disks, &sock, &log, Duration::from_secs(30))
        .await
        .expect("the leftover is stopped and the images open again");
    let _g2 = KillGuard(second.pid());
    assert_ne!(second.pid(), old);
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), None).is_err()
            || std::fs::read_to_string(format!("/proc/{old}/stat"))
                .is_ok_and(|s| s.contains(") Z")),
        "the leftover is gone"
    );
    let bitmaps = second
        .qmp()
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    assert!(
        bitmaps.to_string().contains("\"kept\""),
        "it saved its bitmaps on the way out (SIGTERM, not SIGKILL): {bitmaps}"
    );
    second.quit(Duration::from_secs(30)).await.unwrap();
}

#[test]
fn the_firmware_descriptors_installed_here_give_both_ovmf_variants_at_the_distribution_paths() {
    // The ovmf package installs QEMU's firmware descriptors (scripts/setup.sh installs it); on
    // Debian 12, Debian 13 and Ubuntu 24.04 they name the files of /usr/share/OVMF.
    let dirs = vmrepl_qemu::firmware::default_descriptor_dirs();
    let (descs, unreadable) = vmrepl_qemu::firmware::load(&dirs);
    assert!(unreadable.is_empty(), "{unreadable:?}");
    assert!(
        !descs.is_empty(),
        "no firmware descriptor in {dirs:?}: is the ovmf package installed? (scripts/setup.sh)"
    );
    let fw = vmrepl_qemu::caps::discover_firmware(
        &dirs,
        Path::new("/usr/share/OVMF"),
        Path::new("/usr/share/seabios"),
    );
    for (id, code, vars) in [
        (
            FirmwareVariantId::Ovmf4m,
            "/usr/share/OVMF/OVMF_CODE_4M.fd",
            "/usr/share/OVMF/OVMF_VARS_4M.fd",
        ),
        (
            FirmwareVariantId::Ovmf4mSecureBoot,
            "/usr/share/OVMF/OVMF_CODE_4M.ms.fd",
            "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
        ),
    ] {
        let v: Vec<_> = fw.iter().filter(|f| f.id == id).collect();
        assert_eq!(v.len(), 1, "one entry for {id}: {fw:#?}");
        let f = v[0];
        let d = f.descriptor.as_deref().expect("found through a descriptor");
        assert!(
            d.starts_with("/usr/share/qemu/firmware"),
            "{id} from {}",
            d.display()
        );
        assert_eq!(f.code, Path::new(code), "{id}");
        assert_eq!(f.vars_template.as_deref(), Some(Path::new(vars)), "{id}");
        assert!(f.runs_on("pc-q35-7.2"), "{id}: {:?}", f.machines);
        // the same pick for a VM's machine type through the one-descriptor lookup
        let (p, c, _) = vmrepl_qemu::firmware::select_uefi(&descs, id, "pc-q35-7.2").unwrap();
        assert_eq!((p, c.as_path()), (d, Path::new(code)));
    }
    assert!(
        fw.iter()
            .any(|f| f.id == FirmwareVariantId::Ovmf4m && f.runs_on("pc-i440fx-7.2")),
        "a generation 2 VM on i440fx gets OVMF too: {fw:#?}"
    );
}
