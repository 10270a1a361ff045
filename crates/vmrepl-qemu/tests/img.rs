mod common;

use vmrepl_qemu::img::{BitmapOp, Comparison, CreateOpts, ImgError, QemuImg};

#[tokio::test]
async fn create_info_map_bitmap_compare_round_trip() {
    common::init_logs();
    let d = tempfile::tempdir().unwrap();
    let img = QemuImg::default();
    let a = d.path().join("a.qcow2");
    let b = d.path().join("b.qcow2");
    img.create(&a, 32 << 20, &CreateOpts::default())
        .await
        .unwrap();
    let i = img.info(&a).await.unwrap();
    assert_eq!(
        (i.format.as_str(), i.virtual_size, i.compat.as_deref()),
        ("qcow2", 32 << 20, Some("1.1"))
    );
    assert!(i.bitmaps.is_empty());

    // Fresh image: one unallocated extent.
    let m = img.map(&a).await.unwrap();
    assert_eq!(m.len(), 1);
    assert!(!m[0].data && m[0].length == 32 << 20);

    img.bitmap_add(&a, "repl-0").await.unwrap();
    img.bitmap(
        &a,
        "frozen",
        &BitmapOp::Add {
            granularity: Some(128 << 10),
            disabled: true,
        },
    )
    .await
    .unwrap();
    img.bitmap_merge(&a, "repl-0", "frozen").await.unwrap();
    let i = img.info(&a).await.unwrap();
    assert_eq!(i.bitmaps.len(), 2);
    let r0 = i.bitmaps.iter().find(|b| b.name == "repl-0").unwrap();
    assert!(r0.enabled() && !r0.inconsistent());
    let fr = i.bitmaps.iter().find(|b| b.name == "frozen").unwrap();
    assert!(!fr.enabled());
    assert_eq!(fr.granularity, 128 << 10);
    img.bitmap_disable(&a, "repl-0").await.unwrap();
    img.bitmap_enable(&a, "repl-0").await.unwrap();
    img.bitmap_remove(&a, "frozen").await.unwrap();
    assert_eq!(img.info(&a).await.unwrap().bitmaps.len(), 1);
    let e = img.bitmap_remove(&a, "nope").await.unwrap_err();
    assert!(
        matches!(&e, ImgError::Failed { stderr, .. } if stderr.contains("nope")),
        "{e}"
    );

    // Compare: convert makes an identical copy; then they differ after a resize.
    img.convert(&a, Some("qcow2"), &b).await.unwrap();
    assert_eq!(
        img.compare(&a, &b, true).await.unwrap(),
        Comparison::Identical
    );
    assert!(img.check(&b).await.unwrap().clean());
    img.resize(&b, 64 << 20).await.unwrap();
    assert!(matches!(
        img.compare(&a, &b, true).await.unwrap(),
        Comparison::Differ(_)
    ));
    assert_eq!(
        img.compare(&a, &b, false).await.unwrap(),
        Comparison::Identical,
        "the extra part reads as zeros"
    );

    // A missing file is an error with qemu-img's message, not "differ".
    let e = img
        .compare(&a, &d.path().join("missing.qcow2"), false)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("missing.qcow2"), "{e}");
}

#[tokio::test]
async fn untrusted_images_never_open_their_backing_file() {
    common::init_logs();
    let d = tempfile::tempdir().unwrap();
    let img = QemuImg::default();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    img.create(&base, 16 << 20, &CreateOpts::default())
        .await
        .unwrap();
    // Header names a backing file that must not be read (here: one that does not exist).
    img.create(
        &top,
        16 << 20,
        &CreateOpts {
            backing: Some(("/nonexistent/secret".into(), "raw".into())),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(
        img.map(&top).await.is_err(),
        "the trusted path follows the backing file"
    );
    let m = img.map_untrusted(&top).await.unwrap();
    assert!(m.iter().all(|e| e.depth == 0 && !e.data));
    let i = img.info_untrusted(&top).await.unwrap();
    assert_eq!(i.backing_filename.as_deref(), Some("/nonexistent/secret"));
    img.rebase_unsafe(&top, Some((&base, "qcow2")))
        .await
        .unwrap();
    assert_eq!(
        img.info(&top).await.unwrap().backing_filename.as_deref(),
        Some(base.to_str().unwrap())
    );
    img.rebase_unsafe(&top, None).await.unwrap();
    assert_eq!(img.info(&top).await.unwrap().backing_filename, None);

    img.rebase_unsafe(&top, Some((&base, "qcow2")))
        .await
        .unwrap();
    img.commit(&top, true).await.unwrap();
}

#[test]
fn the_blocking_runner_returns_output_runs_in_its_folder_reports_failures_and_kills_on_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let img = QemuImg::default();
    img.run_blocking(
        Some(dir.path()),
        &["create", "-q", "-f", "qcow2", "rel.qcow2", "1M"],
    )
    .unwrap();
    assert!(dir.path().join("rel.qcow2").exists(), "cwd was not used");
    let out = img
        .run_blocking(Some(dir.path()), &["info", "-f", "qcow2", "rel.qcow2"])
        .unwrap();
    assert!(out.contains("virtual size: 1 MiB"), "{out}");
    match img.run_blocking(None, &["info", "-f", "qcow2", "/nonexistent.qcow2"]) {
        Err(ImgError::Failed {
            code: Some(1),
            stderr,
            ..
        }) => {
            assert!(stderr.contains("nonexistent"), "{stderr}")
        }
        other => panic!("{other:?}"),
    }
    let slow = QemuImg::new("sleep").with_timeout(std::time::Duration::from_millis(200));
    let t = std::time::Instant::now();
    match slow.run_blocking(None, &["30"]) {
        Err(ImgError::Exec(vmrepl_qemu::ExecError::Timeout { .. })) => {}
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
}
