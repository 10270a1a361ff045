//! End-to-end tests of the replica store with the real qemu-img (QEMU 7.2).

use std::path::{Path, PathBuf};
use std::process::Command;
use uuid::Uuid;
use vmrepl_store::{Begin, Consistency, PointKind, PointRef, ReplicaStore, ReplicaVm, StoreError};

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 8 * MIB;

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs")
}

/// Raw content of a qcow2 chain (through its headers; our chains are verified).
fn raw(path: &Path, tmp: &Path) -> Vec<u8> {
    let out = tmp.join(format!("raw-{}.img", Uuid::new_v4()));
    let o = qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        path.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    v
}

fn same_image(a: &Path, b: &Path) -> bool {
    qemu_img(&["compare", "-q", a.to_str().unwrap(), b.to_str().unwrap()])
        .status
        .success()
}

fn images(vm: &ReplicaVm, p: PointRef) -> Vec<(String, PathBuf)> {
    vm.point_image_paths(p).unwrap()
}

fn image(vm: &ReplicaVm, p: PointRef, disk: &str) -> PathBuf {
    images(vm, p)
        .into_iter()
        .find(|(d, _)| d == disk)
        .unwrap()
        .1
}

fn new_vm(root: &Path) -> ReplicaVm {
    ReplicaStore::create(
        root,
        Uuid::new_v4(),
        &serde_json::json!({"name": "web01", "disks": ["a", "b"]}),
        &[("a", SIZE), ("b", SIZE)],
    )
    .unwrap()
}

/// An extent of a decoded log: data or an explicit zero range.
#[derive(Clone)]
enum Ext {
    Data(&'static str, u64, Vec<u8>),
    Zero(&'static str, u64, u64),
}

fn apply(vm: &mut ReplicaVm, seq: u64, base: u64, exts: &[Ext]) {
    let Begin::Apply(mut t) = vm.begin_apply(seq, base).unwrap() else {
        panic!("seq {seq} unexpectedly already applied");
    };
    for e in exts {
        match e {
            Ext::Data(d, off, buf) => t.write(d, *off, buf).unwrap(),
            Ext::Zero(d, off, len) => t.write_zeroes(d, *off, *len).unwrap(),
        }
    }
    t.commit(1_700_000_000_000 + seq as i64, Consistency::Crash)
        .unwrap();
}

/// Applies extents to expected raw buffers.
fn expect(bufs: &mut [(&'static str, Vec<u8>)], exts: &[Ext]) {
    for e in exts {
        let (d, off, data): (&str, u64, Vec<u8>) = match e {
            Ext::Data(d, off, buf) => (d, *off, buf.clone()),
            Ext::Zero(d, off, len) => (d, *off, vec![0; *len as usize]),
        };
        let b = &mut bufs.iter_mut().find(|(id, _)| *id == d).unwrap().1;
        b[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

fn log1() -> Vec<Ext> {
    vec![
        Ext::Data("a", 0, pattern(0x11, 128 * 1024)),
        Ext::Data("a", MIB + 4096, pattern(0x22, 8192)), // sub-cluster, COW
        Ext::Data("b", 2 * MIB, pattern(0x33, 64 * 1024)),
        Ext::Data("b", SIZE - 4096, pattern(0x55, 4096)), // last block
        Ext::Zero("b", 3 * MIB, 64 * 1024),               // zero over nothing
    ]
}

fn log2() -> Vec<Ext> {
    vec![
        Ext::Zero("a", 0, 64 * 1024),     // shadows seq 1 data (full cluster)
        Ext::Zero("a", MIB + 6144, 2048), // partial zero inside seq 1 data
        Ext::Data("a", 100 * 1024, pattern(0x44, 40 * 1024)), // crosses a cluster boundary
        Ext::Zero("b", 2 * MIB + 4096, 8192),
    ]
}

fn log3() -> Vec<Ext> {
    vec![
        Ext::Data("a", 4 * MIB, pattern(0x66, 64 * 1024)),
        Ext::Zero("b", SIZE - 4096, 4096),
    ]
}

fn log4() -> Vec<Ext> {
    vec![
        Ext::Data("a", 0, pattern(0x77, 4096)),
        Ext::Data("b", 5 * MIB, pattern(0x88, 128 * 1024)),
    ]
}

fn empty_bufs() -> Vec<(&'static str, Vec<u8>)> {
    vec![("a", vec![0; SIZE as usize]), ("b", vec![0; SIZE as usize])]
}

fn assert_point(vm: &ReplicaVm, p: PointRef, want: &[(&'static str, Vec<u8>)], tmp: &Path) {
    for (d, buf) in want {
        let got = raw(&image(vm, p, d), tmp);
        assert!(
            got == *buf,
            "disk {d} of point {p:?} differs from the expected content"
        );
    }
}

#[test]
fn apply_freeze_apply_and_read_points() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = new_vm(tmp.path());
    assert_eq!(vm.last_applied(), 0);
    assert_eq!(
        vm.vm_definition().unwrap()["name"],
        serde_json::json!("web01")
    );

    apply(&mut vm, 1, 0, &log1());
    let mut want1 = empty_bufs();
    expect(&mut want1, &log1());
    let p = vm
        .freeze_point(1, 1_700_000_000_001, Consistency::AppConsistent)
        .unwrap();
    assert_eq!(p.kind, PointKind::Frozen);

    apply(&mut vm, 2, 1, &log2());
    let mut want2 = want1.clone();
    expect(&mut want2, &log2());
    // Zero extents shadow older data.
    assert!(want2[0].1[..64 * 1024].iter().all(|b| *b == 0));
    assert!(want1[0].1[..64 * 1024].iter().any(|b| *b != 0));

    assert_point(&vm, PointRef::Frozen(1), &want1, tmp.path());
    assert_point(&vm, PointRef::Latest, &want2, tmp.path());

    let pts = vm.points();
    assert_eq!(pts.len(), 2);
    assert_eq!(
        (pts[0].seq, pts[0].kind, pts[0].consistency),
        (1, PointKind::Frozen, Consistency::AppConsistent)
    );
    assert_eq!((pts[1].seq, pts[1].kind), (2, PointKind::Latest));

    // The zero ranges are explicit zero clusters in the top layer.
    let top = image(&vm, PointRef::Latest, "a");
    let map = qemu_img(&["map", "--output=json", top.to_str().unwrap()]);
    let map = String::from_utf8_lossy(&map.stdout);
    assert!(map.contains("\"zero\": true, \"data\": false"), "{map}");

    // Reopen: same state, chains verified.
    let dir = vm.dir().to_path_buf();
    let uuid = vm.vm_uuid();
    drop(vm);
    let vm = ReplicaStore::open(tmp.path(), uuid).unwrap();
    assert_eq!(vm.dir(), dir);
    assert_eq!(vm.last_applied(), 2);
    assert_point(&vm, PointRef::Frozen(1), &want1, tmp.path());
    assert_point(&vm, PointRef::Latest, &want2, tmp.path());
    for (_, p) in images(&vm, PointRef::Latest) {
        assert!(qemu_img(&["check", "-q", p.to_str().unwrap()])
            .status
            .success());
    }
}

#[test]
fn sequence_rules_out_of_order_and_already_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = new_vm(tmp.path());
    apply(&mut vm, 1, 0, &log1());
    // A gap: log 3 built on 2, but only 1 is applied.
    match vm.begin_apply(3, 2) {
        Err(StoreError::OutOfOrder {
            expected: 1,
            got: 2,
            got_seq: 3,
        }) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("out-of-order log accepted"),
    }
    assert!(vm.begin_apply(3, 2).err().unwrap().needs_resync());
    // Re-applying 1 is a no-op.
    match vm.begin_apply(1, 0).unwrap() {
        Begin::AlreadyApplied {
            seq: 1,
            last_applied: 1,
        } => {}
        Begin::AlreadyApplied { .. } | Begin::Apply(_) => panic!("seq 1 should be already applied"),
    }
    assert!(matches!(
        vm.begin_apply(5, 5),
        Err(StoreError::SeqNotAfterBase {
            seq: 5,
            base_seq: 5
        })
    ));
    assert_eq!(vm.last_applied(), 1);
}

#[test]
fn out_of_bounds_write_is_refused_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = new_vm(tmp.path());
    apply(&mut vm, 1, 0, &log1());
    let mut want = empty_bufs();
    expect(&mut want, &log1());
    let before_a = std::fs::read(image(&vm, PointRef::Latest, "a")).unwrap();
    {
        let Begin::Apply(mut t) = vm.begin_apply(2, 1).unwrap() else {
            panic!()
        };
        let e = t.write("a", SIZE - 512, &[1u8; 1024]).unwrap_err();
        match &e {
            StoreError::OutOfBounds {
                disk,
                offset,
                len,
                size,
            } => {
                assert_eq!(
                    (disk.as_str(), *offset, *len, *size),
                    ("a", SIZE - 512, 1024, SIZE)
                );
            }
            other => panic!("unexpected {other}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("\"a\"") && msg.contains(&SIZE.to_string()),
            "{msg}"
        );
        assert!(matches!(
            t.write_zeroes("b", u64::MAX - 10, 100),
            Err(StoreError::OutOfBounds { .. })
        ));
        assert!(matches!(
            t.write("nope", 0, &[1]),
            Err(StoreError::UnknownDisk { .. })
        ));
        t.abort();
    }
    assert_eq!(vm.last_applied(), 1);
    assert_eq!(
        std::fs::read(image(&vm, PointRef::Latest, "a")).unwrap(),
        before_a
    );
    assert_point(&vm, PointRef::Latest, &want, tmp.path());
}

/// Builds points 1..=4 (frozen) plus latest 5; returns expected content per seq.
fn four_points(vm: &mut ReplicaVm) -> Vec<Vec<(&'static str, Vec<u8>)>> {
    let logs = [
        log1(),
        log2(),
        log3(),
        log4(),
        vec![Ext::Data("b", 0, pattern(9, 4096))],
    ];
    let mut wants = vec![empty_bufs()];
    for (i, l) in logs.iter().enumerate() {
        let seq = i as u64 + 1;
        apply(vm, seq, seq - 1, l);
        let mut w = wants.last().unwrap().clone();
        expect(&mut w, l);
        wants.push(w);
        if seq <= 4 {
            vm.freeze_point(seq, seq as i64 * 1000, Consistency::Crash)
                .unwrap();
        }
    }
    wants
}

#[test]
fn prune_keeps_n_and_points_keep_their_content() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = new_vm(tmp.path());
    let wants = four_points(&mut vm);
    // Reference copies of every point before pruning.
    let mut refs = Vec::new();
    for seq in 1..=4u64 {
        let f = vm
            .flatten_point(PointRef::Frozen(seq), &tmp.path().join(format!("ref{seq}")))
            .unwrap();
        refs.push(f);
    }
    let latest_ref = vm
        .flatten_point(PointRef::Latest, &tmp.path().join("ref-latest"))
        .unwrap();
    let report = vm.prune(2).unwrap();
    assert_eq!(report.merged, vec![1, 2]);
    assert!(report.blocked_by_lock.is_empty());
    let seqs: Vec<_> = vm.points().iter().map(|p| (p.seq, p.kind)).collect();
    assert_eq!(
        seqs,
        vec![
            (3, PointKind::Frozen),
            (4, PointKind::Frozen),
            (5, PointKind::Latest)
        ]
    );
    for seq in [3u64, 4] {
        let r = &refs[seq as usize - 1];
        for (d, p) in images(&vm, PointRef::Frozen(seq)) {
            let refimg = &r.disks.iter().find(|(id, _)| *id == d).unwrap().1;
            assert!(
                same_image(&p, refimg),
                "point {seq} disk {d} changed by prune"
            );
        }
        assert_point(&vm, PointRef::Frozen(seq), &wants[seq as usize], tmp.path());
    }
    for (d, p) in images(&vm, PointRef::Latest) {
        let refimg = &latest_ref.disks.iter().find(|(id, _)| *id == d).unwrap().1;
        assert!(same_image(&p, refimg));
    }
    // Old layer files are gone; prune to zero works too.
    let adir = vm.dir().join("disks/a");
    assert!(!adir.join("rp-1.qcow2").exists() && !adir.join("rp-2.qcow2").exists());
    vm.prune(0).unwrap();
    assert_eq!(vm.points().len(), 1);
    assert_point(&vm, PointRef::Latest, &wants[5], tmp.path());
    let uuid = vm.vm_uuid();
    drop(vm);
    let vm = ReplicaStore::open(tmp.path(), uuid).unwrap();
    assert_point(&vm, PointRef::Latest, &wants[5], tmp.path());
}

#[test]
fn locked_point_and_below_are_not_pruned() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = new_vm(tmp.path());
    let wants = four_points(&mut vm);
    let lock = vm.lock_point(2).unwrap();
    assert_eq!(lock.seq(), 2);
    // keep 1: 1 and 2 are at/below the lock; 3 can go (folded into 4).
    let report = vm.prune(1).unwrap();
    assert_eq!(report.merged, vec![3]);
    assert_eq!(report.blocked_by_lock, vec![1, 2]);
    let seqs: Vec<_> = vm.points().iter().map(|p| p.seq).collect();
    assert_eq!(seqs, vec![1, 2, 4, 5]);
    for seq in [1u64, 2, 4] {
        assert_point(&vm, PointRef::Frozen(seq), &wants[seq as usize], tmp.path());
    }
    assert_point(&vm, PointRef::Latest, &wants[5], tmp.path());
    drop(lock);
    let report = vm.prune(1).unwrap();
    assert_eq!(report.merged, vec![1, 2]);
    assert_point(&vm, PointRef::Frozen(4), &wants[4], tmp.path());
    assert!(matches!(
        vm.lock_point(1),
        Err(StoreError::NoSuchPoint { seq: 1, .. })
    ));
}

#[test]
fn overlay_reads_the_point_and_writes_do_not_change_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = new_vm(tmp.path());
    apply(&mut vm, 1, 0, &log1());
    {
        let Begin::Apply(mut t) = vm.begin_apply(2, 1).unwrap() else {
            panic!()
        };
        t.set_nvram(b"nvram-as-of-2");
        for e in log2() {
            match e {
                Ext::Data(d, o, b) => t.write(d, o, &b).unwrap(),
                Ext::Zero(d, o, l) => t.write_zeroes(d, o, l).unwrap(),
            }
        }
        t.commit(2000, Consistency::Crash).unwrap();
    }
    let mut want = empty_bufs();
    expect(&mut want, &log1());
    expect(&mut want, &log2());
    // Latest is frozen on demand for the overlay.
    let dest = tmp.path().join("testfo");
    let ov = vm.overlay_for(PointRef::Latest, &dest).unwrap();
    assert_eq!((ov.point.seq, ov.point.kind), (2, PointKind::Frozen));
    assert_eq!(
        std::fs::read(ov.nvram.as_ref().unwrap()).unwrap(),
        b"nvram-as-of-2"
    );
    let rp_a = image(&vm, PointRef::Frozen(2), "a");
    let rp_bytes = std::fs::read(&rp_a).unwrap();
    for (d, p) in &ov.disks {
        let w = &want.iter().find(|(id, _)| id == d).unwrap().1;
        assert!(
            raw(p, tmp.path()) == *w,
            "overlay {d} does not read the point"
        );
        let info =
            String::from_utf8_lossy(&qemu_img(&["info", p.to_str().unwrap()]).stdout).into_owned();
        assert!(
            info.contains(&format!(
                "backing file: {}",
                vm.dir()
                    .canonicalize()
                    .unwrap()
                    .join("disks")
                    .join(d)
                    .join("rp-2.qcow2")
                    .display()
            )),
            "{info}"
        );
    }
    let a = &ov.disks.iter().find(|(d, _)| d == "a").unwrap().1;
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x99 0 1M",
            a.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(raw(a, tmp.path())[..MIB as usize]
        .iter()
        .all(|b| *b == 0x99));
    assert_eq!(std::fs::read(&rp_a).unwrap(), rp_bytes);
    assert_point(&vm, PointRef::Frozen(2), &want, tmp.path());
    // The overlay's lock keeps point 2 from being pruned.
    let r = vm.prune(0).unwrap();
    assert_eq!(r.blocked_by_lock, vec![2]);
    drop(ov);
    assert_eq!(vm.prune(0).unwrap().merged, vec![2]);
}

#[test]
fn flatten_gives_standalone_images() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = new_vm(tmp.path());
    apply(&mut vm, 1, 0, &log1());
    vm.freeze_point(1, 1, Consistency::Crash).unwrap();
    apply(&mut vm, 2, 1, &log2());
    let mut want = empty_bufs();
    expect(&mut want, &log1());
    let f = vm
        .flatten_point(PointRef::Frozen(1), &tmp.path().join("flat"))
        .unwrap();
    for (d, p) in &f.disks {
        let info =
            String::from_utf8_lossy(&qemu_img(&["info", p.to_str().unwrap()]).stdout).into_owned();
        assert!(!info.contains("backing file"), "{info}");
        let w = &want.iter().find(|(id, _)| id == d).unwrap().1;
        assert!(raw(p, tmp.path()) == *w);
    }
    assert!(f.nvram.is_none());
}

#[test]
fn foreign_backing_file_in_a_layer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = new_vm(tmp.path());
    apply(&mut vm, 1, 0, &log1());
    let evil = tmp.path().join("evil.qcow2");
    let o = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/etc/passwd",
        "-F",
        "raw",
        evil.to_str().unwrap(),
        &SIZE.to_string(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let top = vm.dir().join("disks/a/top.qcow2");
    std::fs::copy(&evil, &top).unwrap();
    // Applying into it is refused before anything is written.
    {
        let Begin::Apply(mut t) = vm.begin_apply(2, 1).unwrap() else {
            panic!()
        };
        match t.write("a", 0, &[1u8; 512]) {
            Err(StoreError::UntrustedBacking {
                named, expected, ..
            }) => {
                assert_eq!(named.as_deref(), Some("/etc/passwd"));
                assert_eq!(expected.as_deref(), Some("base.qcow2"));
            }
            other => panic!("foreign layer accepted: {:?}", other.err()),
        }
        t.abort();
    }
    assert!(matches!(
        vm.point_image_paths(PointRef::Latest),
        Err(StoreError::UntrustedBacking { .. })
    ));
    let uuid = vm.vm_uuid();
    drop(vm);
    let e = ReplicaStore::open(tmp.path(), uuid).unwrap_err();
    assert!(matches!(e, StoreError::UntrustedBacking { .. }), "{e}");
    assert!(e.to_string().contains("/etc/passwd"), "{e}");
}

#[test]
fn bad_disk_ids_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for bad in [
        "..",
        "../x",
        "a/b",
        "",
        "A",
        "a.b",
        "x".repeat(33).as_str(),
        "/etc",
    ] {
        let e = ReplicaStore::create(
            tmp.path(),
            Uuid::new_v4(),
            &serde_json::json!({}),
            &[(bad, SIZE)],
        )
        .unwrap_err();
        assert!(
            matches!(e, StoreError::InvalidDiskId { .. }),
            "{bad:?}: {e}"
        );
    }
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "nothing created"
    );
    assert!(vmrepl_store::validate_disk_id("disk_0-1").is_ok());
    let mut vm = new_vm(tmp.path());
    let Begin::Apply(mut t) = vm.begin_apply(1, 0).unwrap() else {
        panic!()
    };
    assert!(matches!(
        t.write("../a", 0, &[1]),
        Err(StoreError::InvalidDiskId { .. })
    ));
    assert!(matches!(
        t.write_zeroes("a/../b", 0, 1),
        Err(StoreError::InvalidDiskId { .. })
    ));
    t.abort();
    assert!(matches!(
        ReplicaStore::create(
            tmp.path(),
            Uuid::new_v4(),
            &serde_json::json!({}),
            &[("a", 1000)]
        ),
        Err(StoreError::BadDiskSize { .. })
    ));
    assert!(matches!(
        ReplicaStore::create(
            tmp.path(),
            Uuid::new_v4(),
            &serde_json::json!({}),
            &[("a", SIZE), ("a", SIZE)]
        ),
        Err(StoreError::DuplicateDisk { .. })
    ));
}

#[test]
fn crash_between_writes_and_commit_is_repaired_by_reapplying() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = new_vm(tmp.path());
    apply(&mut vm, 1, 0, &log1());
    vm.freeze_point(1, 1, Consistency::Crash).unwrap();
    // The engine spools log 2 durably (received, verified, accepted), then crashes mid-apply.
    std::fs::write(vm.partial_log_path(2), b"log two").unwrap();
    assert!(
        vm.pending_logs().unwrap().is_empty(),
        "a partial log is never pending"
    );
    vmrepl_store::spool::accept(vm.dir(), 2).unwrap();
    {
        let Begin::Apply(mut t) = vm.begin_apply(2, 1).unwrap() else {
            panic!()
        };
        let l = log2();
        for e in &l[..2] {
            match e {
                Ext::Data(d, o, b) => t.write(d, *o, b).unwrap(),
                Ext::Zero(d, o, n) => t.write_zeroes(d, *o, *n).unwrap(),
            }
        }
        // Garbage a half-written extent would leave: overwritten by the re-apply.
        t.write("a", 100 * 1024, &[0xEE; 1000]).unwrap();
        drop(t); // crash: no commit
    }
    let uuid = vm.vm_uuid();
    drop(vm);
    let mut vm = ReplicaStore::open(tmp.path(), uuid).unwrap();
    assert_eq!(vm.last_applied(), 1);
    let pending = vm.pending_logs().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].0, 2);
    assert_eq!(std::fs::read(&pending[0].1).unwrap(), b"log two");
    apply(&mut vm, 2, 1, &log2());
    assert!(vm.pending_logs().unwrap().is_empty());
    let mut want1 = empty_bufs();
    expect(&mut want1, &log1());
    let mut want2 = want1.clone();
    expect(&mut want2, &log2());
    assert_point(&vm, PointRef::Frozen(1), &want1, tmp.path());
    assert_point(&vm, PointRef::Latest, &want2, tmp.path());
}

#[test]
fn create_refuses_an_existing_folder_and_open_checks_the_catalog() {
    let tmp = tempfile::tempdir().unwrap();
    let uuid = Uuid::new_v4();
    let vm = ReplicaStore::create(
        tmp.path(),
        uuid,
        &serde_json::json!({"x": 1}),
        &[("a", SIZE)],
    )
    .unwrap();
    assert_eq!(vm.dir(), tmp.path().join(uuid.to_string()));
    let e =
        ReplicaStore::create(tmp.path(), uuid, &serde_json::json!({}), &[("a", SIZE)]).unwrap_err();
    assert!(matches!(e, StoreError::AlreadyExists { .. }));
    assert!(e.to_string().contains("rm -r"), "{e}");
    // base is qcow2 v3 compat 1.1
    let info = String::from_utf8_lossy(
        &qemu_img(&[
            "info",
            vm.dir().join("disks/a/base.qcow2").to_str().unwrap(),
        ])
        .stdout,
    )
    .into_owned();
    assert!(info.contains("compat: 1.1"), "{info}");
    let state = vm.dir().join("state.json");
    drop(vm);
    let text = std::fs::read_to_string(&state).unwrap();
    std::fs::write(
        &state,
        text.replace("\"last_applied\": 0", "\"last_applied\": 7"),
    )
    .unwrap();
    assert!(matches!(
        ReplicaStore::open(tmp.path(), uuid),
        Err(StoreError::CatalogCorrupt { .. })
    ));
    assert!(matches!(
        ReplicaStore::open(tmp.path(), Uuid::new_v4()),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn space_check_refuses_a_full_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = new_vm(tmp.path());
    vm.check_space(4096).unwrap();
    match vm.check_space(u64::MAX / 2) {
        Err(StoreError::DiskFull { needed, free, .. }) => assert!(needed > free),
        other => panic!("{other:?}"),
    }
}

#[test]
fn freeze_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = new_vm(tmp.path());
    apply(&mut vm, 1, 0, &log1());
    assert!(matches!(
        vm.freeze_point(0, 0, Consistency::Crash),
        Err(StoreError::FreezeNotLatest { .. })
    ));
    vm.freeze_point(1, 0, Consistency::Crash).unwrap();
    assert!(matches!(
        vm.freeze_point(1, 0, Consistency::Crash),
        Err(StoreError::AlreadyFrozen { seq: 1 })
    ));
    // The frozen layer is read-only on disk.
    let rp = vm.dir().join("disks/a/rp-1.qcow2");
    assert!(std::fs::metadata(rp).unwrap().permissions().readonly());
}

/// A small tmpfs (mounted by the test, so it needs root) fills up mid-log: the write reports DiskFull,
/// nothing is recorded, and after space is freed the same log applies with the right content.
#[test]
fn enospc_mid_log_is_disk_full_and_the_log_reapplies() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=3m",
            "tmpfs",
            mnt.to_str().unwrap(),
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "this test mounts a 3 MiB tmpfs to fill the disk for real: run the suite as root (as \
         scripts/test.sh and CI do)"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let mut vm = new_vm(&mnt);
    apply(&mut vm, 1, 0, &log1());
    let big = vec![Ext::Data("a", MIB, pattern(0x5a, 4 * MIB as usize))];
    // The up-front check refuses it already.
    assert!(matches!(
        vm.check_space(4 * MIB),
        Err(StoreError::DiskFull { .. })
    ));
    {
        let Begin::Apply(mut t) = vm.begin_apply(2, 1).unwrap() else {
            panic!()
        };
        let Ext::Data(d, o, b) = &big[0] else {
            unreachable!()
        };
        match t.write(d, *o, b) {
            Err(StoreError::DiskFull { needed, free, path }) => {
                assert!(needed > free, "{needed} {free}");
                assert!(path.ends_with("disks/a/top.qcow2"), "{}", path.display());
            }
            other => panic!("expected DiskFull, got {:?}", other.err()),
        }
        t.abort();
    }
    assert_eq!(vm.last_applied(), 1);
    let o = Command::new("mount")
        .args(["-o", "remount,size=64m", mnt.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success());
    let uuid = vm.vm_uuid();
    drop(vm);
    let mut vm = ReplicaStore::open(&mnt, uuid).unwrap();
    apply(&mut vm, 2, 1, &big);
    let mut want = empty_bufs();
    expect(&mut want, &log1());
    expect(&mut want, &big);
    assert_point(&vm, PointRef::Latest, &want, tmp.path());
    drop(vm);
}

/// A standalone qcow2 image of `size` holding `data` at offset 0.
fn standalone(dir: &Path, name: &str, size: u64, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    assert!(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        p.to_str().unwrap(),
        &size.to_string()
    ])
    .status
    .success());
    let rawf = dir.join(format!("{name}.raw"));
    let mut buf = vec![0u8; size as usize];
    buf[..data.len()].copy_from_slice(data);
    std::fs::write(&rawf, &buf).unwrap();
    let o = qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        rawf.to_str().unwrap(),
        p.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_file(rawf).unwrap();
    p
}

#[test]
fn adopted_images_become_the_base_at_the_common_point_and_deltas_apply_on_top() {
    let tmp = tempfile::tempdir().unwrap();
    let vmdir = tmp.path().join("vm");
    std::fs::create_dir(&vmdir).unwrap();
    let a = standalone(&vmdir, "a.qcow2", SIZE, &pattern(1, 65536));
    let b = standalone(&vmdir, "b.qcow2", SIZE, &pattern(2, 4096));
    let nv = vmdir.join("nvram.fd");
    std::fs::write(&nv, pattern(3, 8192)).unwrap();
    let uuid = Uuid::new_v4();
    let root = tmp.path().join("store");
    std::fs::create_dir(&root).unwrap();
    let mut vm = ReplicaStore::adopt(
        &root,
        uuid,
        &serde_json::json!({"name": "web01"}),
        &[("a", SIZE, &a), ("b", SIZE, &b)],
        Some(&nv),
        (41, 1234),
    )
    .unwrap();
    assert_eq!(vm.last_applied(), 41);
    let (bs, digests) = vm.block_digests("a").unwrap();
    assert_eq!((bs, digests.len()), (1 << 20, 8));
    let mut first = vec![0u8; 1 << 20];
    first[..65536].copy_from_slice(&pattern(1, 65536));
    assert_eq!(digests[0], *blake3::hash(&first).as_bytes());
    assert_eq!(digests[1], *blake3::hash(&vec![0u8; 1 << 20]).as_bytes());
    let latest = vm.points().pop().unwrap();
    assert_eq!((latest.seq, latest.consistency), (41, Consistency::Planned));
    assert!(same_image(&image(&vm, PointRef::Latest, "a"), &a));
    assert!(same_image(&image(&vm, PointRef::Latest, "b"), &b));
    assert_eq!(
        std::fs::read(vm.point_nvram_path(PointRef::Latest).unwrap().unwrap()).unwrap(),
        pattern(3, 8192)
    );
    // The next log must build on the common point.
    assert!(matches!(
        vm.begin_apply(43, 42),
        Err(StoreError::OutOfOrder { .. })
    ));
    apply(&mut vm, 42, 41, &[Ext::Data("a", 0, pattern(9, 4096))]);
    let mut want = pattern(1, 65536);
    want[..4096].copy_from_slice(&pattern(9, 4096));
    let got = raw(&image(&vm, PointRef::Latest, "a"), tmp.path());
    assert_eq!(&got[..65536], &want[..]);
    // The originals are untouched (the caller deletes them once the store is in place).
    assert_eq!(&raw(&a, tmp.path())[..65536], &pattern(1, 65536)[..]);
    drop(vm);
    assert_eq!(ReplicaStore::open(&root, uuid).unwrap().last_applied(), 42);

    // Destroy removes the store and nothing else.
    let keep = ReplicaStore::vm_dir(&root, uuid).join("disk0.qcow2");
    std::fs::write(&keep, b"a failed-over VM's own disk").unwrap();
    ReplicaStore::destroy(&root, uuid).unwrap();
    assert!(matches!(
        ReplicaStore::open(&root, uuid),
        Err(StoreError::NotFound { .. })
    ));
    assert!(keep.exists());
    assert!(!ReplicaStore::vm_dir(&root, uuid).join("disks").exists());
}

#[test]
fn adopting_an_image_with_a_backing_file_or_another_size_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = standalone(tmp.path(), "base.qcow2", SIZE, &pattern(1, 512));
    let over = tmp.path().join("over.qcow2");
    assert!(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        over.to_str().unwrap(),
    ])
    .status
    .success());
    let def = serde_json::json!({});
    let e = ReplicaStore::adopt(
        tmp.path(),
        Uuid::new_v4(),
        &def,
        &[("a", SIZE, &over)],
        None,
        (3, 0),
    )
    .unwrap_err();
    assert!(e.to_string().contains("backing file"), "{e}");
    let e = ReplicaStore::adopt(
        tmp.path(),
        Uuid::new_v4(),
        &def,
        &[("a", 2 * SIZE, &base)],
        None,
        (3, 0),
    )
    .unwrap_err();
    assert!(matches!(e, StoreError::BadLayer { .. }), "{e}");
}

#[test]
fn a_store_can_be_built_in_the_folder_that_holds_the_vm_s_own_disks() {
    // A host whose VM folders and replica storage are the same folder: the VM's disk sits
    // in <root>/<uuid>/ and becomes the replica's base there.
    let tmp = tempfile::tempdir().unwrap();
    let uuid = Uuid::new_v4();
    let dir = ReplicaStore::vm_dir(tmp.path(), uuid);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = standalone(&dir, "disk0.qcow2", SIZE, &pattern(5, 4096));
    let vm = ReplicaStore::adopt(
        tmp.path(),
        uuid,
        &serde_json::json!({}),
        &[("disk0", SIZE, &disk)],
        None,
        (7, 0),
    )
    .unwrap();
    assert_eq!(vm.dir(), dir);
    assert!(same_image(&image(&vm, PointRef::Latest, "disk0"), &disk));
    drop(vm);
    // The VM's own file goes; the store keeps the data through its link.
    std::fs::remove_file(&disk).unwrap();
    let vm = ReplicaStore::open(tmp.path(), uuid).unwrap();
    assert_eq!(vm.last_applied(), 7);
    let got = raw(&image(&vm, PointRef::Latest, "disk0"), tmp.path());
    assert_eq!(&got[..4096], &pattern(5, 4096)[..]);
    // Adopting again over an existing store is refused.
    let again = standalone(&dir, "disk0.qcow2", SIZE, &pattern(6, 4096));
    let e = ReplicaStore::adopt(
        tmp.path(),
        uuid,
        &serde_json::json!({}),
        &[("disk0", SIZE, &again)],
        None,
        (7, 0),
    )
    .unwrap_err();
    assert!(matches!(e, StoreError::AlreadyExists { .. }), "{e}");
}

#[test]
fn a_process_killed_mid_apply_leaves_a_layer_whose_metadata_is_repaired_before_the_log_is_applied_again(
) {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = new_vm(tmp.path());
    apply(&mut vm, 1, 0, &log1());
    vm.freeze_point(1, 1, Consistency::Crash).unwrap();
    std::fs::write(vm.partial_log_path(2), b"log two").unwrap();
    vmrepl_store::spool::accept(vm.dir(), 2).unwrap();
    {
        let Begin::Apply(mut t) = vm.begin_apply(2, 1).unwrap() else {
            panic!()
        };
        for e in &log2() {
            match e {
                Ext::Data(d, o, b) => t.write(d, *o, b).unwrap(),
                Ext::Zero(d, o, n) => t.write_zeroes(d, *o, *n).unwrap(),
            }
        }
        // Killed: no destructor runs, nothing cached is flushed (what `kill -9` leaves).
        std::mem::forget(t);
    }
    let uuid = vm.vm_uuid();
    std::mem::forget(vm);
    let mut vm = ReplicaStore::open(tmp.path(), uuid).unwrap();
    assert_eq!(vm.last_applied(), 1);
    apply(&mut vm, 2, 1, &log2());
    // The re-applied layer is sound qcow2 (no cluster allocated twice) ...
    let top = vm.dir().join("disks/a/top.qcow2");
    let spec = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}},"backing":null}}"#,
        top.display()
    );
    let check = qemu_img(&["check", &spec]);
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // ... and holds what the two logs wrote, also once frozen as a point.
    let mut want = empty_bufs();
    expect(&mut want, &log1());
    expect(&mut want, &log2());
    assert_point(&vm, PointRef::Latest, &want, tmp.path());
    vm.freeze_point(2, 2, Consistency::Crash).unwrap();
    assert_point(&vm, PointRef::Frozen(2), &want, tmp.path());
}
