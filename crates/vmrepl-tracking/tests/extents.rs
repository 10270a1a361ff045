//! The in-process staging map (imago) against `qemu-img map` on real images written by qemu-io.

mod common;

use common::map_off_thread;
use std::path::Path;
use std::process::Command;
use vmrepl_qemu::img::QemuImg;
use vmrepl_tracking::ExtentKind;

const M: u64 = 1 << 20;

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let st = c.arg(img).status().expect("qemu-io runs");
    assert!(st.success(), "qemu-io {cmds:?} failed");
}

/// (offset, len, kind) as qemu-img reports it: present ranges only, data with host offsets.
async fn qemu_img_view(img: &Path) -> Vec<(u64, u64, ExtentKind)> {
    let mut out: Vec<(u64, u64, ExtentKind)> = Vec::new();
    for e in QemuImg::default().map(img).await.unwrap() {
        if !e.present {
            continue;
        }
        let kind = if e.zero {
            ExtentKind::Zero
        } else {
            ExtentKind::Data {
                file_offset: e.offset.unwrap(),
            }
        };
        out.push((e.start, e.length, kind));
    }
    out
}

#[tokio::test]
async fn the_in_process_map_equals_qemu_img_map_for_data_zeroes_and_holes() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("stg.qcow2");
    QemuImg::default()
        .create(&img, 64 * M, &Default::default())
        .await
        .unwrap();
    // Data written out of order (host offsets not monotonic), adjacent clusters, a zero
    // range that is explicit, and data touching the last cluster.
    qemu_io(
        &img,
        &[
            "write -P 0x11 40M 128k",
            "write -P 0x22 1M 64k",
            "write -P 0x33 1088k 64k",
            "write -z 8M 3M",
            "write -P 0x44 63M 1M",
        ],
    );
    let ours: Vec<(u64, u64, ExtentKind)> = map_off_thread(&img)
        .await
        .unwrap()
        .iter()
        .map(|e| (e.offset, e.len, e.kind))
        .collect();
    assert_eq!(ours, qemu_img_view(&img).await);
    assert_eq!(ours.len(), 4, "{ours:?}");
    assert!(ours.iter().any(|e| e.2 == ExtentKind::Zero && e.1 == 3 * M));
}

#[tokio::test]
async fn an_empty_staging_image_has_no_extents_and_a_backed_one_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    QemuImg::default()
        .create(&base, 16 * M, &Default::default())
        .await
        .unwrap();
    assert!(map_off_thread(&base).await.unwrap().is_empty());
    let top = d.path().join("top.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&top)
        .status()
        .unwrap();
    assert!(st.success());
    let err = map_off_thread(&top).await.unwrap_err().to_string();
    assert!(err.contains("backing file"), "{err}");
    let junk = d.path().join("junk.qcow2");
    std::fs::write(&junk, b"not an image").unwrap();
    let err = map_off_thread(&junk).await.unwrap_err().to_string();
    assert!(err.contains("not a readable qcow2"), "{err}");
}
