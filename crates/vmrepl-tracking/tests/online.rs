//! The bitmap lifecycle and delta extraction against a real QEMU 7.2 (TCG, no guest).
mod common;

use common::*;
use std::path::Path;
use vmrepl_qemu::img::QemuImg;
use vmrepl_tracking::{
    begin_cycle, begin_full, commit_cycle, grow_node, list_owned, reconcile, rollback_cycle,
    start_tracking, Chunk, ChunkData, CycleHandle, Extent, ExtentKind, ExtentReader,
    ReconcileOutcome, Staging, TrackingError, VARS_NODE,
};

const K: u64 = 1024;
const M: u64 = 1 << 20;

/// Push mode (staged copies): these tests read the staged images themselves.
fn staging(dir: &Path) -> Staging {
    let mut s = Staging::new(dir.join("staging"));
    s.job_timeout = T;
    s.pull = false;
    s
}

/// (offset, len, is_data) of a staged image.
async fn shape(path: &Path) -> Vec<(u64, u64, bool)> {
    map_off_thread(path)
        .await
        .unwrap()
        .iter()
        .map(|e| (e.offset, e.len, matches!(e.kind, ExtentKind::Data { .. })))
        .collect()
}

/// Reads the whole delta through ExtentReader (small chunks) and checks every byte against
/// the staging image read through `qemu-img convert`.
async fn check_against_convert(path: &Path, tmp: &Path) -> Vec<Chunk> {
    let ex: Vec<Extent> = map_off_thread(path).await.unwrap();
    let raw = raw_of(path, &tmp.join("check.raw")).await;
    let chunks: Vec<Chunk> = ExtentReader::with_chunk(path, ex.clone(), 48 * 1024)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut covered = 0;
    for c in &chunks {
        let at = c.offset as usize;
        match &c.data {
            ChunkData::Data(d) => {
                assert!(d.len() <= 48 * 1024);
                assert_eq!(&raw[at..at + d.len()], &d[..], "data at {at}");
            }
            ChunkData::Zero(n) => {
                assert!(
                    raw[at..at + *n as usize].iter().all(|b| *b == 0),
                    "zero at {at}"
                )
            }
        }
        covered += c.len();
    }
    assert_eq!(covered, ex.iter().map(|e| e.len).sum::<u64>());
    chunks
}

/// The relationship's staging files in `dir` (the empty-image templates are not cycle files).
fn cycle_files(dir: &Path, rel: vmrepl_tracking::RelTag) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{rel}-"))
        })
        .count()
}

fn seqs(owned: &[vmrepl_tracking::OwnedBitmap]) -> Vec<(u64, bool)> {
    owned.iter().map(|b| (b.seq, b.recording)).collect()
}

#[tokio::test]
async fn cycles_stage_exactly_the_writes_commit_and_rollback_keep_everything() {
    let d = images().await;
    let vm = Vm::start(d.path()).await;
    let q = vm.qmp();
    let rel = rel();
    let st = staging(d.path());

    start_tracking(q, rel, &NODES, 0).await.unwrap();
    start_tracking(q, rel, &NODES, 0).await.unwrap(); // idempotent
                                                      // Another owner's bitmap on the same node is ignored.
    q.execute(
        "block-dirty-bitmap-add",
        serde_json::json!({"node":"disk0","name":"someone-else"}),
    )
    .await
    .unwrap();

    vm.io(0, "write -P 0xab 1M 64k").await;
    vm.io(0, "write -z 4M 128k").await;
    vm.io(1, "write -P 0xcd 2M 192k").await;
    let owned = list_owned(q, rel, &NODES).await.unwrap();
    assert_eq!(seqs(&owned["disk0"]), vec![(0, true)]);
    assert_eq!(owned["disk0"][0].count, 192 * K);
    assert!(owned["disk0"][0].persistent && !owned["disk0"][0].inconsistent);

    // Cycle 0 with the vars node.
    let h = begin_cycle(q, rel, &disks(), 0, &st, Some(VARS_NODE), None)
        .await
        .unwrap();
    assert_eq!(h.seq, 0);
    assert!(h.point_in_time_ms > 1_600_000_000_000);
    assert_eq!(h.disks.len(), 2);
    assert!(h.disks[0].path.ends_with(rel.staging_file(0, "disk0")));
    assert_eq!(
        shape(&h.disks[0].path).await,
        vec![(M, 64 * K, true), (4 * M, 128 * K, false)]
    );
    assert_eq!(shape(&h.disks[1].path).await, vec![(2 * M, 192 * K, true)]);
    let chunks = check_against_convert(&h.disks[1].path, d.path()).await;
    assert_eq!(chunks.len(), 4, "192k in 48k chunks");
    for c in &chunks {
        let ChunkData::Data(b) = &c.data else {
            panic!("zero chunk")
        };
        assert!(b.iter().all(|x| *x == 0xcd));
    }
    check_against_convert(&h.disks[0].path, d.path()).await;
    let vars = h.vars.as_ref().unwrap();
    assert_eq!(vars.size, VARS_SIZE);
    let vchunks = check_against_convert(&vars.path, d.path()).await;
    let got: Vec<u8> = vchunks
        .into_iter()
        .flat_map(|c| match c.data {
            ChunkData::Data(d) => d,
            ChunkData::Zero(n) => vec![0; n as usize],
        })
        .collect();
    assert_eq!(got, std::fs::read(d.path().join("vars.fd")).unwrap());
    // Staging nodes are gone, bitmaps rotated.
    let nodes = q
        .execute("query-named-block-nodes", serde_json::json!({"flat":true}))
        .await
        .unwrap();
    assert!(!nodes.to_string().contains("stg-"), "{nodes}");

    // A write after the point in time lands in the next cycle.
    vm.io(0, "write -P 0x11 8M 64k").await;
    let owned = list_owned(q, rel, &NODES).await.unwrap();
    assert_eq!(seqs(&owned["disk0"]), vec![(0, false), (1, true)]);
    assert_eq!(owned["disk0"][0].count, 192 * K, "frozen bitmap untouched");
    assert_eq!(owned["disk0"][1].count, 64 * K);

    // Committing a recording bitmap is refused (it would lose changes).
    let e = commit_cycle(q, rel, &NODES, 1).await.unwrap_err();
    assert!(matches!(e, TrackingError::BitmapState { .. }), "{e}");
    commit_cycle(q, rel, &NODES, 0).await.unwrap();
    commit_cycle(q, rel, &NODES, 0).await.unwrap(); // idempotent
    h.remove_files().unwrap();
    assert!(!h.disks[0].path.exists());

    // Cycle 1, then a failure before the ack: roll back.
    let h1 = begin_cycle(q, rel, &disks(), 1, &st, None, None)
        .await
        .unwrap();
    assert_eq!(shape(&h1.disks[0].path).await, vec![(8 * M, 64 * K, true)]);
    assert_eq!(shape(&h1.disks[1].path).await, vec![]);
    rollback_cycle(q, rel, &NODES, 1).await.unwrap();
    rollback_cycle(q, rel, &NODES, 1).await.unwrap(); // idempotent
    h1.remove_files().unwrap();
    let owned = list_owned(q, rel, &NODES).await.unwrap();
    assert_eq!(seqs(&owned["disk0"]), vec![(2, true)]);
    assert_eq!(owned["disk0"][0].count, 64 * K);

    // The next cycle carries the union. Its point-in-time signal (what an app-consistent
    // cycle thaws its guest on) carries the handle's point in time.
    vm.io(0, "write -P 0x22 9M 64k").await;
    let (tx, point) = tokio::sync::oneshot::channel();
    let h2 = begin_cycle(q, rel, &disks(), 2, &st, None, Some(tx))
        .await
        .unwrap();
    assert_eq!(point.await.unwrap(), h2.point_in_time_ms);
    assert_eq!(
        shape(&h2.disks[0].path).await,
        vec![(8 * M, 64 * K, true), (9 * M, 64 * K, true)]
    );
    let c = check_against_convert(&h2.disks[0].path, d.path()).await;
    assert!(matches!(&c[0].data, ChunkData::Data(b) if b.iter().all(|x| *x == 0x11)));
    commit_cycle(q, rel, &NODES, 2).await.unwrap();
    h2.remove_files().unwrap();

    // Wrong sequence: the bitmap is not there. The signal is dropped unsent: no point.
    let (tx, point) = tokio::sync::oneshot::channel::<u64>();
    let e = begin_cycle(q, rel, &disks(), 7, &st, None, Some(tx))
        .await
        .unwrap_err();
    assert!(e.needs_resync(), "{e}");
    assert!(point.await.is_err());
    // A transaction that QEMU rejects (target size differs) changes nothing.
    let bad = vec![("disk0", DISK_SIZE / 2), ("disk1", DISK_SIZE)];
    let e = begin_cycle(q, rel, &bad, 3, &st, None, None)
        .await
        .unwrap_err();
    assert!(matches!(e, TrackingError::Qmp { .. }), "{e}");
    let owned = list_owned(q, rel, &NODES).await.unwrap();
    assert_eq!(seqs(&owned["disk0"]), vec![(3, true)]);
    assert_eq!(seqs(&owned["disk1"]), vec![(3, true)]);
    assert_eq!(
        cycle_files(&st.dir, rel),
        0,
        "staging files of the failed attempt removed"
    );
    // Unknown node.
    let e = list_owned(q, rel, &["nope"]).await.unwrap_err();
    assert!(matches!(e, TrackingError::NodeNotFound { .. }), "{e}");
    vm.quit().await;
}

#[tokio::test]
async fn a_node_grown_online_keeps_its_bitmaps_and_the_next_cycle_carries_writes_past_the_old_end()
{
    let d = images().await;
    let vm = Vm::start(d.path()).await;
    let q = vm.qmp();
    let rel = rel();
    let st = staging(d.path());
    start_tracking(q, rel, &NODES, 0).await.unwrap();
    vm.io(0, "write -P 0xab 1M 64k").await;
    // A point frozen before the resize: its bitmap is frozen, its staged copy the old size.
    let h0 = begin_cycle(q, rel, &disks(), 0, &st, None, None)
        .await
        .unwrap();
    assert_eq!(shape(&h0.disks[0].path).await, vec![(M, 64 * K, true)]);
    vm.io(0, "write -P 0xcd 2M 64k").await;

    let big = 2 * DISK_SIZE;
    let e = grow_node(q, "disk0", DISK_SIZE / 2).await.unwrap_err();
    assert!(matches!(e, TrackingError::Shrink { .. }), "{e}");
    assert!(e.to_string().contains(&DISK_SIZE.to_string()), "{e}");
    let g = grow_node(q, "disk0", big).await.unwrap();
    assert_eq!((g.from, g.to), (DISK_SIZE, big));
    // query-named-block-nodes: both bitmaps are still there, same granularity (64 KiB),
    // their dirty bits kept; the recording one still records.
    assert_eq!(g.bitmaps.len(), 2, "{:?}", g.bitmaps);
    assert!(g.bitmaps.iter().all(|b| b.granularity == 64 * K), "{g:?}");
    let owned = list_owned(q, rel, &NODES).await.unwrap();
    assert_eq!(seqs(&owned["disk0"]), vec![(0, false), (1, true)]);
    assert_eq!(owned["disk0"][0].count, 64 * K, "frozen bitmap kept");
    assert_eq!(owned["disk0"][1].count, 64 * K, "recording bitmap kept");
    let again = grow_node(q, "disk0", big).await.unwrap();
    assert_eq!(
        (again.from, again.to),
        (big, big),
        "growing to the size it has is a no-op"
    );
    // The point frozen before the resize is still whole at the old size.
    commit_cycle(q, rel, &NODES, 0).await.unwrap();
    h0.remove_files().unwrap();

    // A write past the old end is recorded, and the next point is the new size.
    vm.io(0, "write -P 0x5a 100M 1M").await;
    let owned = list_owned(q, rel, &NODES).await.unwrap();
    assert_eq!(owned["disk0"][0].count, 64 * K + M);
    let sizes = vec![("disk0", big), ("disk1", DISK_SIZE)];
    let h1 = begin_cycle(q, rel, &sizes, 1, &st, None, None)
        .await
        .unwrap();
    assert_eq!(
        shape(&h1.disks[0].path).await,
        vec![(2 * M, 64 * K, true), (100 * M, M, true)]
    );
    let c = check_against_convert(&h1.disks[0].path, d.path()).await;
    assert!(c
        .iter()
        .filter(|c| c.offset >= 100 * M)
        .all(|c| matches!(&c.data, ChunkData::Data(b) if b.iter().all(|x| *x == 0x5a))));
    commit_cycle(q, rel, &NODES, 1).await.unwrap();
    h1.remove_files().unwrap();
    vm.quit().await;
    // The image is the new size, with the bitmap persisted.
    let info = QemuImg::default()
        .info(&d.path().join("disk0.qcow2"))
        .await
        .unwrap();
    assert_eq!(info.virtual_size, big);
}

#[tokio::test]
async fn full_copy_starts_the_bitmap_at_the_same_instant() {
    let d = images().await;
    let vm = Vm::start(d.path()).await;
    let q = vm.qmp();
    let rel = rel();
    let st = staging(d.path());
    vm.io(0, "write -P 0x5a 0 128k").await;
    vm.io(1, "write -z 1M 64k").await;

    let h: CycleHandle = begin_full(q, rel, &disks(), 0, &st, Some(VARS_NODE))
        .await
        .unwrap();
    // Unallocated ranges are not copied; the explicit zero write is not data.
    let s0 = shape(&h.disks[0].path).await;
    assert_eq!(
        s0.iter().filter(|e| e.2).map(|e| e.1).sum::<u64>(),
        128 * K,
        "{s0:?}"
    );
    let s1 = shape(&h.disks[1].path).await;
    assert!(s1.iter().all(|e| !e.2), "{s1:?}");
    check_against_convert(&h.disks[0].path, d.path()).await;
    let owned = list_owned(q, rel, &NODES).await.unwrap();
    assert_eq!(seqs(&owned["disk0"]), vec![(0, true)]);
    assert_eq!(owned["disk0"][0].count, 0);

    vm.io(1, "write -P 0x77 3M 64k").await;
    let h0 = begin_cycle(q, rel, &disks(), 0, &st, None, None)
        .await
        .unwrap();
    assert_eq!(shape(&h0.disks[0].path).await, vec![]);
    assert_eq!(shape(&h0.disks[1].path).await, vec![(3 * M, 64 * K, true)]);
    vm.quit().await;
}

#[tokio::test]
async fn reconcile_after_clean_restart_merges_or_drops_the_frozen_bitmap() {
    let d = images().await;
    let rel = rel();
    let st = staging(d.path());

    let vm = Vm::start(d.path()).await;
    start_tracking(vm.qmp(), rel, &NODES, 0).await.unwrap();
    vm.io(0, "write -P 0xab 1M 64k").await;
    let _h = begin_cycle(vm.qmp(), rel, &disks(), 0, &st, None, None)
        .await
        .unwrap();
    vm.io(0, "write -P 0xac 2M 64k").await;
    vm.quit().await; // the log of cycle 0 never got acknowledged

    let info = QemuImg::default()
        .info(&d.path().join("disk0.qcow2"))
        .await
        .unwrap();
    let names: Vec<_> = info
        .bitmaps
        .iter()
        .map(|b| (b.name.clone(), b.enabled()))
        .collect();
    assert!(
        names.contains(&(format!("vmrepl-{rel}-0"), false)),
        "{names:?}"
    );
    assert!(
        names.contains(&(format!("vmrepl-{rel}-1"), true)),
        "{names:?}"
    );

    let vm = Vm::start(d.path()).await;
    let out = reconcile(vm.qmp(), rel, &NODES, Some(&st.dir), |_| false)
        .await
        .unwrap();
    assert_eq!(
        out,
        ReconcileOutcome::Ready {
            recording: 1,
            committed: vec![],
            merged_back: vec![0]
        }
    );
    assert_eq!(cycle_files(&st.dir, rel), 0, "staging cleaned");
    let owned = list_owned(vm.qmp(), rel, &NODES).await.unwrap();
    assert_eq!(seqs(&owned["disk0"]), vec![(1, true)]);
    assert_eq!(owned["disk0"][0].count, 128 * K, "union of both writes");

    // Again, this time the replica holds the log.
    let h1 = begin_cycle(vm.qmp(), rel, &disks(), 1, &st, None, None)
        .await
        .unwrap();
    assert_eq!(
        shape(&h1.disks[0].path).await,
        vec![(M, 64 * K, true), (2 * M, 64 * K, true)]
    );
    vm.io(0, "write -P 0xad 3M 64k").await;
    vm.quit().await;
    let vm = Vm::start(d.path()).await;
    let out = reconcile(vm.qmp(), rel, &NODES, Some(&st.dir), |s| s == 1)
        .await
        .unwrap();
    assert_eq!(
        out,
        ReconcileOutcome::Ready {
            recording: 2,
            committed: vec![1],
            merged_back: vec![]
        }
    );
    let owned = list_owned(vm.qmp(), rel, &NODES).await.unwrap();
    assert_eq!(seqs(&owned["disk0"]), vec![(2, true)]);
    assert_eq!(owned["disk0"][0].count, 64 * K);
    // Nothing to do the second time.
    let out = reconcile(vm.qmp(), rel, &NODES, None, |_| true)
        .await
        .unwrap();
    assert!(
        matches!(out, ReconcileOutcome::Ready { recording: 2, .. }),
        "{out:?}"
    );
    vm.quit().await;
}

#[tokio::test]
async fn sigkill_makes_reconcile_require_a_resync() {
    let d = images().await;
    let rel = rel();
    let st = staging(d.path());

    let vm = Vm::start(d.path()).await;
    start_tracking(vm.qmp(), rel, &NODES, 0).await.unwrap();
    vm.quit().await; // bitmap 0 persisted

    let vm = Vm::start(d.path()).await;
    vm.io(0, "write -P 0xab 1M 64k").await;
    let _h = begin_cycle(vm.qmp(), rel, &disks(), 0, &st, None, None)
        .await
        .unwrap();
    vm.sigkill();

    let vm = Vm::start(d.path()).await;
    let owned = list_owned(vm.qmp(), rel, &NODES).await.unwrap();
    assert!(
        owned["disk0"].iter().all(|b| b.seq == 0 && b.inconsistent),
        "{owned:?}"
    );
    let out = reconcile(vm.qmp(), rel, &NODES, Some(&st.dir), |_| true)
        .await
        .unwrap();
    let ReconcileOutcome::ResyncRequired { reason } = out else {
        panic!("{out:?}")
    };
    assert!(reason.contains("inconsistent"), "{reason}");
    let owned = list_owned(vm.qmp(), rel, &NODES).await.unwrap();
    assert!(owned.values().all(|v| v.is_empty()), "{owned:?}");
    // A fresh start works after that.
    let h = begin_full(vm.qmp(), rel, &disks(), 0, &st, None)
        .await
        .unwrap();
    assert_eq!(h.disks.len(), 2);
    vm.quit().await;
}

#[tokio::test]
async fn missing_recording_bitmap_requires_a_resync() {
    let d = images().await;
    let rel = rel();
    // Tracking started but QEMU was killed before any clean close: nothing persisted.
    let vm = Vm::start(d.path()).await;
    start_tracking(vm.qmp(), rel, &NODES, 0).await.unwrap();
    vm.sigkill();
    let vm = Vm::start(d.path()).await;
    let out = reconcile(vm.qmp(), rel, &NODES, None, |_| true)
        .await
        .unwrap();
    let ReconcileOutcome::ResyncRequired { reason } = out else {
        panic!("{out:?}")
    };
    assert!(reason.contains("no recording bitmap"), "{reason}");
    vm.quit().await;
}

#[tokio::test]
async fn stop_tracking_removes_every_bitmap_of_the_relationship_and_nothing_else() {
    let d = images().await;
    let vm = Vm::start(d.path()).await;
    let q = vm.qmp();
    let rel = rel();
    let st = staging(d.path());
    start_tracking(q, rel, &NODES, 0).await.unwrap();
    q.execute(
        "block-dirty-bitmap-add",
        serde_json::json!({"node":"disk0","name":"someone-else"}),
    )
    .await
    .unwrap();
    vm.io(0, "write -P 0xab 1M 64k").await;
    // A cycle left in flight: bitmap 0 frozen, 1 recording, staging files on disk.
    let h = begin_cycle(q, rel, &disks(), 0, &st, None, None)
        .await
        .unwrap();
    assert!(h.disks[0].path.exists());
    let owned = list_owned(q, rel, &NODES).await.unwrap();
    assert_eq!(seqs(&owned["disk0"]), vec![(0, false), (1, true)]);

    vmrepl_tracking::stop_tracking(q, rel, &NODES, Some(&st.dir))
        .await
        .unwrap();
    let owned = list_owned(q, rel, &NODES).await.unwrap();
    assert!(owned.values().all(|b| b.is_empty()), "{owned:?}");
    assert!(!h.disks[0].path.exists(), "staging files remain");
    let nodes = q
        .execute("query-named-block-nodes", serde_json::json!({"flat": true}))
        .await
        .unwrap();
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["node-name"] == "disk0")
        .flat_map(|n| n["dirty-bitmaps"].as_array().unwrap().iter())
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["someone-else"]);
    // Idempotent; and a fresh full copy can start again at 1.
    vmrepl_tracking::stop_tracking(q, rel, &NODES, Some(&st.dir))
        .await
        .unwrap();
    begin_full(q, rel, &disks(), 1, &st, None).await.unwrap();
    vm.quit().await;
}
