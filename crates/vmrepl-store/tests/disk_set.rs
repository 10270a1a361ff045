//! A replica's set of disks changes: a disk added on the primary joins the recovery points
//! from the log that carries its initial copy (older points never have it), and a disk
//! excluded on the primary leaves the replica and every point. Real qemu-img.

use std::path::Path;
use std::process::Command;
use uuid::Uuid;
use vmrepl_store::{Begin, Consistency, PointRef, ReplicaStore, ReplicaVm, StoreError};

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 4 * MIB;

fn raw(path: &Path, tmp: &Path) -> Vec<u8> {
    let out = tmp.join(format!("raw-{}.img", Uuid::new_v4()));
    let o = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(path)
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    v
}

fn apply(vm: &mut ReplicaVm, seq: u64, writes: &[(&str, u64, u8)], carries: &[&str]) {
    let Begin::Apply(mut t) = vm.begin_apply(seq, seq - 1).unwrap() else {
        panic!("log {seq} already applied");
    };
    for d in carries {
        t.carries(d).unwrap();
    }
    for (d, off, byte) in writes {
        t.write(d, *off, &[*byte; 65536]).unwrap();
    }
    t.commit(seq as i64, Consistency::Crash).unwrap();
}

fn ids(vm: &ReplicaVm, p: PointRef) -> Vec<String> {
    vm.point_disks(p)
        .unwrap()
        .into_iter()
        .map(|d| d.0)
        .collect()
}

fn content(vm: &ReplicaVm, p: PointRef, disk: &str, tmp: &Path) -> Vec<u8> {
    let (_, path) = vm
        .point_image_paths(p)
        .unwrap()
        .into_iter()
        .find(|(d, _)| d == disk)
        .unwrap();
    raw(&path, tmp)
}

fn block(byte: u8, at: u64) -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    v[at as usize..(at + 65536) as usize].fill(byte);
    v
}

#[test]
fn a_disk_added_later_has_no_layer_in_older_points_and_joins_from_the_log_that_carries_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let uuid = Uuid::new_v4();
    let mut vm =
        ReplicaStore::create(&root, uuid, &serde_json::json!({}), &[("disk0", SIZE)]).unwrap();
    apply(&mut vm, 1, &[("disk0", 0, 1)], &[]);
    vm.freeze_point(1, 1, Consistency::Crash).unwrap();

    // Added: pending, in no point, not even the latest state; a point frozen now lacks it.
    vm.add_disk("disk1", SIZE).unwrap();
    vm.add_disk("disk1", SIZE).unwrap(); // idempotent
    assert!(matches!(
        vm.add_disk("disk1", 2 * SIZE),
        Err(StoreError::DuplicateDisk { .. })
    ));
    assert_eq!(vm.pending_disks(), ["disk1"]);
    assert_eq!(ids(&vm, PointRef::Latest), ["disk0"]);
    apply(&mut vm, 2, &[("disk0", MIB, 2)], &[]);
    assert_eq!(vm.pending_disks(), ["disk1"], "log 2 did not carry it");
    vm.freeze_point(2, 2, Consistency::Crash).unwrap();
    assert_eq!(ids(&vm, PointRef::Frozen(2)), ["disk0"]);

    // Log 3 carries its initial copy (with a delta of disk0): one instant, both disks.
    apply(
        &mut vm,
        3,
        &[("disk0", 0, 3), ("disk1", 2 * MIB, 9)],
        &["disk0", "disk1"],
    );
    assert!(vm.pending_disks().is_empty());
    assert_eq!(ids(&vm, PointRef::Latest), ["disk0", "disk1"]);
    vm.freeze_point(3, 3, Consistency::Crash).unwrap();
    apply(&mut vm, 4, &[("disk1", 0, 4)], &[]);
    vm.freeze_point(4, 4, Consistency::Crash).unwrap();
    assert_eq!(ids(&vm, PointRef::Frozen(1)), ["disk0"]);
    assert_eq!(ids(&vm, PointRef::Frozen(3)), ["disk0", "disk1"]);
    assert_eq!(
        content(&vm, PointRef::Frozen(3), "disk1", tmp.path()),
        block(9, 2 * MIB)
    );
    // A failover to an older point gets the disks it had; to a newer one, both.
    let ov = vm
        .overlay_for(PointRef::Frozen(2), &tmp.path().join("ov2"))
        .unwrap();
    assert_eq!(ov.disks.len(), 1);
    drop(ov);
    let flat = vm
        .flatten_point(PointRef::Frozen(4), &tmp.path().join("flat4"))
        .unwrap();
    assert_eq!(flat.disks.len(), 2);

    // Pruning merges each disk's own layers: disk1's first layer (point 3) goes into its base.
    let want4 = content(&vm, PointRef::Frozen(4), "disk1", tmp.path());
    let want0 = content(&vm, PointRef::Frozen(4), "disk0", tmp.path());
    let r = vm.prune(1).unwrap();
    assert_eq!(r.merged, [1, 2, 3]);
    drop(vm);
    let mut vm = ReplicaStore::open(&root, uuid).unwrap();
    assert_eq!(
        content(&vm, PointRef::Frozen(4), "disk1", tmp.path()),
        want4
    );
    assert_eq!(
        content(&vm, PointRef::Frozen(4), "disk0", tmp.path()),
        want0
    );

    // A log that carries a pending disk without writing to it (an empty disk) makes it join.
    vm.add_disk("disk2", SIZE).unwrap();
    apply(&mut vm, 5, &[], &["disk2"]);
    assert_eq!(ids(&vm, PointRef::Latest), ["disk0", "disk1", "disk2"]);
    assert_eq!(
        content(&vm, PointRef::Latest, "disk2", tmp.path()),
        vec![0; SIZE as usize]
    );
    vm.freeze_point(5, 5, Consistency::Crash).unwrap();

    // Excluded: gone from the replica and from every point; the rest is untouched.
    let lock = vm.lock_point(5).unwrap();
    assert!(matches!(
        vm.remove_disk("disk1"),
        Err(StoreError::DiskInUse { seq: 5, .. })
    ));
    drop(lock);
    vm.remove_disk("disk1").unwrap();
    assert_eq!(ids(&vm, PointRef::Frozen(4)), ["disk0"]);
    assert_eq!(ids(&vm, PointRef::Frozen(5)), ["disk0", "disk2"]);
    assert!(!vm.dir().join("disks/disk1").exists());
    apply(&mut vm, 6, &[("disk0", 0, 6)], &[]);
    vm.freeze_point(6, 6, Consistency::Crash).unwrap();
    vm.prune(1).unwrap();
    drop(vm);
    let vm = ReplicaStore::open(&root, uuid).unwrap();
    assert_eq!(ids(&vm, PointRef::Frozen(6)), ["disk0", "disk2"]);
    assert_eq!(
        content(&vm, PointRef::Frozen(6), "disk0", tmp.path())[..65536],
        [6u8; 65536]
    );
    assert!(!vm.disks().iter().any(|d| d.0 == "disk1"));
}

#[test]
fn a_disk_folder_the_catalog_does_not_name_is_removed_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let uuid = Uuid::new_v4();
    let vm = ReplicaStore::create(&root, uuid, &serde_json::json!({}), &[("disk0", SIZE)]).unwrap();
    // An add cut before its catalog entry (or a removal cut after it).
    let stray = vm.dir().join("disks/disk7");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("base.qcow2"), b"x").unwrap();
    drop(vm);
    let mut vm = ReplicaStore::open(&root, uuid).unwrap();
    assert!(!stray.exists());
    assert!(matches!(vm.remove_disk("disk0"), Err(StoreError::NoDisks)));
}
