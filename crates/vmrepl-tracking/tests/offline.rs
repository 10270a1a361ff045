//! Tracking while the VM is off: qemu-io writes tracked by an enabled persistent bitmap,
//! then the same cycle through qemu-storage-daemon.
mod common;

use common::*;
use std::path::Path;
use vmrepl_qemu::img::QemuImg;
use vmrepl_tracking::{
    begin_cycle, commit_cycle, list_owned, start_tracking, ExtentKind, OfflineDisks, Staging,
    VARS_NODE,
};

async fn qemu_io(img: &Path, cmd: &str) {
    let out = tokio::process::Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(img)
        .args(["-c", cmd])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn offline_cycle_through_the_storage_daemon() {
    let d = images().await;
    let rel = rel();
    let imgs: Vec<(&str, std::path::PathBuf)> = NODES
        .iter()
        .map(|n| (*n, d.path().join(format!("{n}.qcow2"))))
        .collect();
    let run = d.path().join("run");
    let mut st = Staging::new(d.path().join("staging"));
    st.pull = false; // this test reads the staged copies
    st.job_timeout = T;

    // Start tracking offline, close: bitmap 0 persists enabled.
    let off = OfflineDisks::open(&imgs, None, &run).await.unwrap();
    start_tracking(off.qmp(), rel, &NODES, 0).await.unwrap();
    off.close().await.unwrap();
    let info = QemuImg::default().info(&imgs[0].1).await.unwrap();
    assert_eq!(info.bitmaps[0].name, format!("vmrepl-{rel}-0"));
    assert!(info.bitmaps[0].enabled() && !info.bitmaps[0].inconsistent());

    // Any QEMU block-layer writer updates the enabled bitmap.
    qemu_io(&imgs[0].1, "write -P 0xab 12M 64k").await;
    qemu_io(&imgs[0].1, "write -z 13M 64k").await;
    qemu_io(&imgs[1].1, "write -P 0xcd 14M 64k").await;

    let off = OfflineDisks::open(&imgs, Some(&d.path().join("vars.fd")), &run)
        .await
        .unwrap();
    let q = off.qmp();
    let owned = list_owned(q, rel, &NODES).await.unwrap();
    assert_eq!(owned["disk0"][0].count, 128 << 10);
    let h = begin_cycle(q, rel, &disks(), 0, &st, Some(VARS_NODE), None)
        .await
        .unwrap();
    let ex = map_off_thread(&h.disks[0].path).await.unwrap();
    let shape: Vec<_> = ex
        .iter()
        .map(|e| {
            (
                e.offset >> 20,
                e.len >> 10,
                matches!(e.kind, ExtentKind::Data { .. }),
            )
        })
        .collect();
    assert_eq!(shape, vec![(12, 64, true), (13, 64, false)]);
    let ex1 = map_off_thread(&h.disks[1].path).await.unwrap();
    assert_eq!(ex1.len(), 1);
    assert_eq!(h.vars.as_ref().unwrap().size, VARS_SIZE);
    commit_cycle(q, rel, &NODES, 0).await.unwrap();
    h.remove_files().unwrap();
    off.close().await.unwrap();

    // Bitmap 1 was created in the daemon's run and persisted by the clean quit.
    let info = QemuImg::default().info(&imgs[1].1).await.unwrap();
    let b: Vec<_> = info
        .bitmaps
        .iter()
        .map(|b| (b.name.clone(), b.enabled(), b.inconsistent()))
        .collect();
    assert_eq!(b, vec![(format!("vmrepl-{rel}-1"), true, false)]);

    // And a running VM picks it up with the same node names.
    let vm = Vm::start(d.path()).await;
    let owned = list_owned(vm.qmp(), rel, &NODES).await.unwrap();
    assert_eq!(owned["disk1"].len(), 1);
    assert!(owned["disk1"][0].recording && owned["disk1"][0].seq == 1);
    vm.quit().await;
}

#[tokio::test]
async fn streaming_makes_overlays_standalone_with_their_content_and_bitmaps_kept() {
    let d = images().await;
    let base = d.path().join("disk0.qcow2");
    qemu_io(&base, "write -P 0x5a 1M 128k").await;
    let over = d.path().join("over").join("disk0.qcow2");
    std::fs::create_dir(over.parent().unwrap()).unwrap();
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&over)
        .status()
        .unwrap();
    assert!(st.success());
    let run = d.path().join("run");
    let rel = rel();
    let off = OfflineDisks::open(&[("disk0", &over)], None, &run)
        .await
        .unwrap();
    start_tracking(off.qmp(), rel, &["disk0"], 7).await.unwrap();
    vmrepl_tracking::stream_into_top(off.qmp(), &["disk0"], T)
        .await
        .unwrap();
    off.close().await.unwrap();
    let info = QemuImg::default().info(&over).await.unwrap();
    assert_eq!(info.backing_filename, None, "{info:?}");
    assert_eq!(info.bitmaps[0].name, format!("vmrepl-{rel}-7"));
    // The base may go: the overlay holds the data itself.
    std::fs::remove_file(&base).unwrap();
    qemu_io(&over, "read -P 0x5a 1M 128k").await;
}
