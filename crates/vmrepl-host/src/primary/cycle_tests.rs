//! The cycle engine's decisions, against scripted fakes of the replica, the block nodes and
//! the guest agent (`fakes.rs`): no QEMU, no network, no root.

use super::fakes::*;
use crate::peer::client::PeerError;
use crate::peer::proto::{PeerResponse, RefusalCode, Resume};
use crate::primary::acked;
use crate::primary::classify;
use crate::primary::export_file;
use crate::primary::Done;
use std::sync::atomic::Ordering;
use vmrepl_log::{Compression, LogKind};
use vmrepl_tracking::TrackingError;
use vmrepl_types::replication::{InitialReplication, ReplicationState};

const MIB: u64 = 1 << 20;
const DISK: (&str, u64) = ("disk0", 4 * MIB);

/// The guest writes one cluster of fresh bytes at each of `clusters` of disk0.
fn write(rig: &Rig, seed: u64, clusters: &[u64]) {
    for c in clusters {
        rig.nodes.write(
            "disk0",
            c * CLUSTER,
            &noise(seed * 1000 + c, CLUSTER as usize),
        );
    }
}

/// Six separate changed clusters: a log of six records, about 400 KB.
fn six_changes(rig: &Rig) {
    write(rig, 1, &[0, 2, 4, 6, 8, 10]);
}

/// The data records of a log as (offset, length) on disk0.
fn data_on_disk0(rig: &Rig, seq: u64) -> Vec<(u64, u64)> {
    rig.replica
        .records(seq)
        .into_iter()
        .filter(|(id, _, _, zero)| id == "disk0" && !zero)
        .map(|(_, o, l, _)| (o, l))
        .collect()
}

fn clusters(cs: &[u64]) -> Vec<(u64, u64)> {
    cs.iter().map(|c| (c * CLUSTER, CLUSTER)).collect()
}

fn connect_error() -> PeerError {
    PeerError::Connect {
        host: "b".into(),
        addr: "b:7443".into(),
        detail: "refused".into(),
    }
}

/// The resume point the replica offers now.
fn offered(rig: &Rig) -> Option<Resume> {
    let s = rig.replica.state();
    let (_, p) = s.partial.as_ref()?;
    let v = vmrepl_log::scan_valid_prefix(&p[..]).unwrap();
    Some(Resume {
        records: v.records,
        bytes: v.bytes,
    })
}

// --- Error classes -----------------------------------------------------------------------

#[test]
fn a_lost_connection_is_the_network_and_an_out_of_order_refusal_means_resynchronization() {
    assert_eq!(class(&classify(connect_error())).0, "network");
    let e = classify(PeerError::Refused {
        code: RefusalCode::OutOfOrder,
        message: "replica has applied 4".into(),
    });
    assert_eq!(
        class(&e),
        (
            "resync",
            "the replica refused the log as out of order: replica has applied 4"
        )
    );
    for code in [
        RefusalCode::BadLog,
        RefusalCode::DiskFull,
        RefusalCode::FailedOver,
        RefusalCode::Internal,
        RefusalCode::BadRequest,
    ] {
        let e = classify(PeerError::Refused {
            code,
            message: "no".into(),
        });
        assert_eq!(class(&e).0, "other", "{code:?}");
    }
    for e in [
        PeerError::Tls("certificate expired".into()),
        PeerError::Protocol {
            host: "b".into(),
            detail: "garbage".into(),
        },
        PeerError::Io {
            action: "read",
            path: "/x".into(),
            source: std::io::Error::other("gone"),
        },
    ] {
        assert_eq!(class(&classify(e)).0, "other");
    }
}

#[test]
fn an_acknowledgement_counts_only_for_the_log_that_was_sent() {
    let ack = |sequence| PeerResponse::LogAck { sequence, bytes: 1 };
    // The bytes counted are those this host sent, not the replica's figure.
    assert_eq!(acked(ack(7), 7, 300).unwrap(), 300);
    let wrong = acked(ack(8), 7, 300).unwrap_err();
    assert_eq!(class(&wrong).0, "other");
    assert!(
        class(&wrong).1.starts_with("unexpected answer to log 7"),
        "{wrong:?}"
    );
    let refused = |code| PeerResponse::Refused {
        code,
        message: "m".into(),
    };
    assert_eq!(
        class(&acked(refused(RefusalCode::OutOfOrder), 7, 1).unwrap_err()).0,
        "resync"
    );
    assert_eq!(
        class(&acked(refused(RefusalCode::DiskFull), 7, 1).unwrap_err()).0,
        "other"
    );
    assert_eq!(
        class(&acked(PeerResponse::Ok, 7, 1).unwrap_err()).0,
        "other"
    );
}

// --- Delta: settle ------------------------------------------------------------------------

#[tokio::test]
async fn a_delta_drops_its_frozen_bitmap_only_after_the_replica_made_the_log_durable() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    six_changes(&rig);
    let (seq, bytes) = rig.delta().await.unwrap();
    assert_eq!(seq, 2);
    assert_eq!(bytes, rig.replica.state().logs[&2].len() as u64);
    assert_eq!(
        rig.nodes.ops(),
        vec![
            Op::reconciled(),
            Op::BeginCycle(1),
            Op::Release(1),
            Op::Commit(1)
        ]
    );
    // I1: the commit comes after the replica's durability, never before.
    assert!(rig.journal.at("replica: log 2 durable") < rig.journal.at("nodes: bitmap 1 committed"));
    assert_eq!(rig.nodes.bitmaps(), vec![(2, true)]);
    assert!(!rig.kept_log(2).exists(), "nothing is kept after an ack");
    assert!(rig.replica_equals_primary());
}

#[tokio::test]
async fn a_delta_carries_exactly_the_clusters_its_bitmap_marked_as_log_n_plus_1_on_n() {
    let mut rig = Rig::replicating(&[DISK], 4, 9);
    write(&rig, 3, &[1, 7, 8]);
    rig.delta().await.unwrap();
    let h = rig.replica.header(5);
    assert_eq!((h.sequence, h.base_sequence), (5, 4));
    assert_eq!(h.kind, LogKind::Delta);
    assert_eq!(h.consistency, vmrepl_log::Consistency::Crash);
    assert_eq!(h.compression, Compression::Zstd);
    assert_eq!(
        data_on_disk0(&rig, 5),
        vec![(CLUSTER, CLUSTER), (7 * CLUSTER, 2 * CLUSTER)]
    );
    assert_eq!(
        rig.nodes.ops()[1],
        Op::BeginCycle(9),
        "the recording bitmap, not the log number"
    );
    let p = rig.progress.lock().unwrap().clone().unwrap();
    assert_eq!(p.what, "delta");
    assert_eq!(p.bytes_done, rig.replica.state().logs[&5].len() as u64);
}

#[tokio::test]
async fn a_delta_cut_mid_transfer_keeps_the_bitmap_and_the_whole_log_for_the_next_cycle() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    six_changes(&rig);
    rig.replica.state().cut_after = Some(150_000);
    let e = rig.delta().await.unwrap_err();
    assert_eq!(class(&e).0, "network", "{e:?}");
    // Neither committed nor merged back: the frozen bitmap waits for the resumed log.
    assert_eq!(
        rig.nodes.ops(),
        vec![Op::reconciled(), Op::BeginCycle(1), Op::Release(1)]
    );
    assert_eq!(rig.nodes.bitmaps(), vec![(1, false), (2, true)]);
    let (h, _) = vmrepl_log::verify(&rig.kept_log(2)).expect("a whole, valid log is kept");
    assert_eq!((h.sequence, h.base_sequence), (2, 1));
    assert_eq!(rig.rel.acked_seq, 1);
}

#[tokio::test]
async fn the_next_cycle_resumes_a_cut_log_from_the_bytes_the_replica_holds() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    six_changes(&rig);
    rig.replica.state().cut_after = Some(150_000);
    rig.delta().await.unwrap_err();
    let kept = std::fs::read(rig.kept_log(2)).unwrap();
    let from = offered(&rig).expect("the replica offers a resume point");
    assert!(from.bytes > 0 && from.bytes <= 150_000, "{from:?}");
    // Changes after the cut go with the next log, not this one.
    write(&rig, 2, &[20]);
    let (seq, bytes) = rig.delta().await.unwrap();
    assert_eq!((seq, bytes), (2, kept.len() as u64 - from.bytes));
    assert_eq!(
        rig.replica.requests().last().unwrap(),
        &format!("send-log 2 on 1 from {}", from.bytes)
    );
    // Nothing staged again: the kept log is sent and its frozen bitmap committed.
    assert_eq!(
        rig.nodes.ops(),
        vec![
            Op::reconciled(),
            Op::BeginCycle(1),
            Op::Release(1),
            Op::Commit(1)
        ]
    );
    assert_eq!(rig.replica.state().logs[&2], kept);
    assert!(!rig.kept_log(2).exists());
    assert_eq!(rig.nodes.bitmaps(), vec![(2, true)]);
    // The next delta carries the later change from bitmap 2.
    rig.delta().await.unwrap();
    assert_eq!(data_on_disk0(&rig, 3), clusters(&[20]));
    assert!(rig.replica_equals_primary());
}

#[tokio::test]
async fn a_resumed_transfer_reports_progress_from_the_bytes_the_replica_held() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    six_changes(&rig);
    rig.replica.state().cut_after = Some(200_000);
    rig.delta().await.unwrap_err();
    let total = std::fs::metadata(rig.kept_log(2)).unwrap().len();
    rig.delta().await.unwrap();
    let p = rig.progress.lock().unwrap().clone().unwrap();
    assert_eq!(p.what, "resumed transfer");
    assert_eq!((p.bytes_done, p.bytes_total), (total, total));
}

#[tokio::test]
async fn a_resumed_transfer_cut_again_keeps_its_log_and_the_third_try_finishes_it() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    six_changes(&rig);
    rig.replica.state().cut_after = Some(100_000);
    rig.delta().await.unwrap_err();
    let first = offered(&rig).unwrap();
    rig.replica.state().cut_after = Some(150_000);
    let e = rig.delta().await.unwrap_err();
    assert_eq!(class(&e).0, "network");
    assert!(rig.kept_log(2).exists());
    let second = offered(&rig).unwrap();
    assert!(second.bytes > first.bytes, "{first:?} then {second:?}");
    rig.delta().await.unwrap();
    assert!(!rig.nodes.ops().contains(&Op::Rollback(1)));
    assert_eq!(rig.nodes.bitmaps(), vec![(2, true)]);
    assert!(rig.replica_equals_primary());
}

#[tokio::test]
async fn a_kept_log_the_replica_holds_nothing_of_is_sent_again_whole() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    six_changes(&rig);
    // Cut inside the header: no valid prefix to resume from.
    rig.replica.state().cut_after = Some(10);
    rig.delta().await.unwrap_err();
    assert_eq!(offered(&rig).map(|r| r.bytes), Some(0));
    let total = std::fs::metadata(rig.kept_log(2)).unwrap().len();
    assert_eq!(rig.delta().await.unwrap(), (2, total));
    assert_eq!(
        rig.replica.requests().last().unwrap(),
        "send-log 2 on 1 from 0"
    );
    assert!(rig.replica_equals_primary());
}

#[tokio::test]
async fn a_resumed_log_the_replica_refuses_is_deleted_and_its_bitmap_merged_back() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    six_changes(&rig);
    rig.replica.state().cut_after = Some(150_000);
    rig.delta().await.unwrap_err();
    rig.replica.state().refuse = Some(RefusalCode::BadLog);
    let e = rig.delta().await.unwrap_err();
    assert_eq!(class(&e).0, "other");
    assert_eq!(rig.nodes.ops().last(), Some(&Op::Rollback(1)));
    assert!(!rig.kept_log(2).exists());
    assert_eq!(rig.nodes.bitmaps(), vec![(2, true)]);
    // The next cycle starts over from the merged bitmap and loses nothing.
    rig.delta().await.unwrap();
    assert_eq!(rig.nodes.ops()[5], Op::BeginCycle(2));
    assert_eq!(data_on_disk0(&rig, 2), clusters(&[0, 2, 4, 6, 8, 10]));
    assert!(rig.replica_equals_primary());
}

#[tokio::test]
async fn an_answer_lost_after_the_log_was_made_durable_is_settled_by_the_next_cycle_without_resending(
) {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    six_changes(&rig);
    rig.replica.state().lose_ack = true;
    let e = rig.delta().await.unwrap_err();
    assert_eq!(class(&e).0, "network");
    assert_eq!(rig.replica.state().last_applied, 2);
    assert!(rig.kept_log(2).exists());
    assert_eq!(rig.nodes.bitmaps(), vec![(1, false), (2, true)]);
    let before = rig.replica.requests().len();
    assert_eq!(rig.delta().await.unwrap(), (2, 0));
    assert_eq!(
        rig.replica.requests()[before..],
        ["replica-state", "boot-files"],
        "asked, not sent again"
    );
    assert_eq!(rig.nodes.ops().last(), Some(&Op::Commit(1)));
    assert_eq!(rig.nodes.bitmaps(), vec![(2, true)]);
    assert!(!rig.kept_log(2).exists());
}

#[tokio::test]
async fn an_out_of_order_refusal_merges_the_bitmap_back_and_asks_for_resynchronization() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    six_changes(&rig);
    rig.replica.state().refuse = Some(RefusalCode::OutOfOrder);
    let e = rig.delta().await.unwrap_err();
    assert_eq!(class(&e).0, "resync", "{e:?}");
    assert_eq!(
        rig.nodes.ops(),
        vec![
            Op::reconciled(),
            Op::BeginCycle(1),
            Op::Release(1),
            Op::Rollback(1)
        ]
    );
    let s = rig.nodes.state();
    assert_eq!(s.bitmaps.keys().copied().collect::<Vec<_>>(), vec![2]);
    assert_eq!(
        s.bitmaps[&2].dirty["disk0"]
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        vec![0, 2, 4, 6, 8, 10],
        "the changes are in the recording bitmap again"
    );
    drop(s);
    assert!(!rig.kept_log(2).exists());
}

#[tokio::test]
async fn an_acknowledgement_of_another_log_is_not_taken_for_durability() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    six_changes(&rig);
    rig.replica.state().answer = Some(PeerResponse::LogAck {
        sequence: 9,
        bytes: 0,
    });
    let e = rig.delta().await.unwrap_err();
    assert_eq!(class(&e).0, "other");
    assert!(
        class(&e).1.starts_with("unexpected answer to log 2"),
        "{e:?}"
    );
    assert!(!rig.nodes.ops().contains(&Op::Commit(1)));
    assert_eq!(rig.nodes.ops().last(), Some(&Op::Rollback(1)));
    assert_eq!(rig.rel.acked_seq, 1);
}

#[tokio::test]
async fn a_rolled_back_cycle_carries_its_changes_into_the_next_log() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    write(&rig, 1, &[3]);
    rig.replica.state().refuse = Some(RefusalCode::DiskFull);
    rig.delta().await.unwrap_err();
    write(&rig, 2, &[12]);
    // Log 2 again, now from bitmap 2: log and bitmap numbers part ways.
    assert_eq!(rig.delta().await.unwrap().0, 2);
    assert_eq!(rig.nodes.ops()[4..6], [Op::reconciled(), Op::BeginCycle(2)]);
    assert_eq!(data_on_disk0(&rig, 2), clusters(&[3, 12]));
    assert_eq!(rig.nodes.bitmaps(), vec![(3, true)]);
    assert!(rig.replica_equals_primary());
}

#[tokio::test]
async fn a_log_that_cannot_be_built_merges_the_bitmap_back_and_keeps_nothing() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    six_changes(&rig);
    rig.nodes.state().fail_build_from = Some(1);
    let e = rig.delta().await.unwrap_err();
    assert_eq!(class(&e).0, "other");
    assert!(class(&e).1.contains("cannot encode log 2"), "{e:?}");
    assert_eq!(
        rig.nodes.ops(),
        vec![
            Op::reconciled(),
            Op::BeginCycle(1),
            Op::Release(1),
            Op::Rollback(1)
        ]
    );
    assert!(!rig.kept_log(2).exists());
    assert!(!rig.replica.state().logs.contains_key(&2));
}

#[tokio::test]
async fn a_cut_transfer_whose_log_cannot_be_kept_merges_the_bitmap_back() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    six_changes(&rig);
    rig.replica.state().cut_after = Some(150_000);
    // The streamed build (1) works; writing the log to keep (2) fails.
    rig.nodes.state().fail_build_from = Some(2);
    let e = rig.delta().await.unwrap_err();
    assert_eq!(
        class(&e).0,
        "other",
        "nothing to resume: not worth a retry as is"
    );
    assert!(
        class(&e)
            .1
            .ends_with("the log could not be kept for a resume either"),
        "{e:?}"
    );
    assert_eq!(rig.nodes.ops().last(), Some(&Op::Rollback(1)));
    assert_eq!(rig.nodes.bitmaps(), vec![(2, true)]);
    assert!(!rig.kept_log(2).exists());
}

// --- Delta: before anything is staged --------------------------------------------------------

#[tokio::test]
async fn a_replica_that_failed_over_stops_the_cycle_before_anything_is_staged() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    six_changes(&rig);
    rig.replica.state().failed_over = true;
    let e = rig.delta().await.unwrap_err();
    assert_eq!(
        class(&e),
        (
            "other",
            "the replica has failed over; it takes no more logs"
        )
    );
    assert_eq!(rig.nodes.ops(), vec![]);
    assert_eq!(rig.replica.requests(), ["replica-state"]);
    assert_eq!(rig.nodes.bitmaps(), vec![(1, true)]);
}

#[tokio::test]
async fn an_unreachable_replica_is_a_network_failure_that_touches_no_bitmap() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    six_changes(&rig);
    rig.replica.state().unreachable = true;
    let e = rig.delta().await.unwrap_err();
    assert_eq!(class(&e).0, "network");
    assert_eq!(rig.nodes.ops(), vec![]);
    assert_eq!(rig.nodes.bitmaps(), vec![(1, true)]);
}

#[tokio::test]
async fn boot_files_that_cannot_be_sent_or_an_odd_answer_stop_the_cycle_before_anything_is_staged()
{
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    rig.replica.state().boot_files_fail = Some("the replica did not keep the vmlinuz".into());
    let e = rig.delta().await.unwrap_err();
    assert_eq!(class(&e), ("other", "the replica did not keep the vmlinuz"));
    rig.replica.state().state_answer = Some(PeerResponse::Ok);
    let e = rig.delta().await.unwrap_err();
    assert_eq!(class(&e), ("other", "unexpected answer Ok"));
    assert_eq!(rig.nodes.ops(), vec![]);
}

#[tokio::test]
async fn a_replica_that_applied_another_log_needs_resynchronization_and_nothing_is_staged() {
    let mut rig = Rig::replicating(&[DISK], 3, 3);
    rig.replica.state().last_applied = 1;
    let e = rig.delta().await.unwrap_err();
    assert_eq!(
        class(&e),
        (
            "resync",
            "the replica has applied log 1 but this host expected 3"
        )
    );
    assert_eq!(rig.nodes.ops(), vec![Op::reconciled()]);
    assert_eq!(rig.nodes.bitmaps(), vec![(3, true)]);
}

#[tokio::test]
async fn an_inconsistent_bitmap_after_a_crash_means_resynchronization() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    rig.nodes.state().bitmaps.get_mut(&1).unwrap().inconsistent = true;
    let e = rig.delta().await.unwrap_err();
    assert_eq!(class(&e).0, "resync");
    assert!(class(&e).1.contains("inconsistent"), "{e:?}");
    assert_eq!(rig.nodes.ops(), vec![Op::reconciled()]);
    assert_eq!(rig.replica.state().logs.len(), 0);
}

#[tokio::test]
async fn a_bitmap_missing_at_the_freeze_means_resynchronization_and_a_failed_job_does_not() {
    fn gone() -> TrackingError {
        TrackingError::BitmapMissing {
            node: "disk0".into(),
            bitmap: "vmrepl-x-1".into(),
        }
    }
    fn job() -> TrackingError {
        TrackingError::JobFailed {
            job: "j".into(),
            node: "disk0".into(),
            reason: "EIO".into(),
        }
    }
    for (fail, want) in [(gone as fn() -> TrackingError, "resync"), (job, "other")] {
        let mut rig = Rig::replicating(&[DISK], 1, 1);
        rig.nodes.state().fail_begin = Some(fail);
        let e = rig.delta().await.unwrap_err();
        assert_eq!(class(&e).0, want, "{e:?}");
        if want == "other" {
            assert!(class(&e).1.starts_with("cannot stage the changes"), "{e:?}");
        }
        // Nothing was frozen, so there is nothing to settle and nothing is sent.
        assert_eq!(rig.nodes.ops(), vec![Op::reconciled(), Op::BeginCycle(1)]);
        assert!(!rig
            .replica
            .requests()
            .iter()
            .any(|r| r.starts_with("send-log")));
    }
}

#[tokio::test]
async fn a_frozen_bitmap_without_its_log_is_merged_back_when_the_replica_lacks_the_log() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    // A cycle froze bitmap 1 and the daemon restarted before the log was kept.
    write(&rig, 1, &[0, 2]);
    {
        let mut s = rig.nodes.state();
        s.bitmaps.get_mut(&1).unwrap().recording = false;
        s.bitmaps.insert(
            2,
            Bitmap {
                recording: true,
                ..Bitmap::default()
            },
        );
    }
    write(&rig, 2, &[5]);
    assert_eq!(rig.delta().await.unwrap().0, 2);
    assert_eq!(rig.nodes.state().replica_has, vec![(1, false)]);
    assert_eq!(
        rig.nodes.ops()[..2],
        [
            Op::Reconcile {
                committed: vec![],
                merged_back: vec![1]
            },
            Op::BeginCycle(2)
        ]
    );
    assert_eq!(data_on_disk0(&rig, 2), clusters(&[0, 2, 5]));
    assert!(rig.replica_equals_primary());
}

// --- App-consistent points -------------------------------------------------------------

#[tokio::test]
async fn an_app_consistent_delta_thaws_the_guest_once_the_point_is_taken_and_before_the_log_is_sent(
) {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    rig.consistency = vmrepl_log::Consistency::AppConsistent;
    six_changes(&rig);
    let mut c = rig.cycle();
    c.delta().await.unwrap();
    assert_eq!(c.app_freeze, Some(Ok(2)));
    let j = &rig.journal;
    assert!(j.at("guest: frozen") < j.at("nodes: point of bitmap 1 taken"));
    assert!(j.at("nodes: point of bitmap 1 taken") < j.at("guest: thawed"));
    assert!(j.at("guest: thawed") < j.at("replica: log 2 durable"));
    assert_eq!(
        rig.replica.header(2).consistency,
        vmrepl_log::Consistency::AppConsistent
    );
    let g = rig.guest.state();
    assert_eq!((g.freezes, g.thaws, g.frozen), (1, 1, false));
}

#[tokio::test]
async fn a_guest_that_cannot_be_frozen_gives_a_crash_consistent_point_and_says_why() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    rig.consistency = vmrepl_log::Consistency::AppConsistent;
    rig.guest.state().freeze = Err("no agent on qga.sock".into());
    let mut c = rig.cycle();
    c.delta().await.unwrap();
    let why = c.app_freeze.clone().unwrap().unwrap_err();
    assert!(why.contains("VM app could not be frozen"), "{why}");
    assert!(why.contains("no agent on qga.sock"), "{why}");
    assert_eq!(c.consistency, vmrepl_log::Consistency::Crash);
    assert_eq!(
        rig.replica.header(2).consistency,
        vmrepl_log::Consistency::Crash
    );
    assert_eq!(
        rig.guest.state().thaws,
        0,
        "nothing frozen, nothing to thaw"
    );
}

#[tokio::test]
async fn a_vm_that_is_off_or_a_crash_consistent_cycle_never_asks_the_guest() {
    for (live, consistency) in [
        (false, vmrepl_log::Consistency::AppConsistent),
        (true, vmrepl_log::Consistency::Crash),
    ] {
        let mut rig = Rig::replicating(&[DISK], 1, 1);
        rig.nodes.state().live = live;
        rig.consistency = consistency;
        let mut c = rig.cycle();
        c.delta().await.unwrap();
        assert_eq!(c.app_freeze, None, "no app-consistent failure is counted");
        assert_eq!(
            rig.replica.header(2).consistency,
            vmrepl_log::Consistency::Crash
        );
        assert_eq!(rig.guest.state().freezes, 0);
    }
}

#[tokio::test]
async fn a_frozen_guest_is_thawed_even_when_the_transaction_fails() {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    rig.consistency = vmrepl_log::Consistency::AppConsistent;
    rig.nodes.state().fail_begin = Some(|| TrackingError::JobTimeout {
        jobs: vec!["j".into()],
        secs: 1,
    });
    let e = rig.cycle().delta().await.unwrap_err();
    assert_eq!(class(&e).0, "other");
    let g = rig.guest.state();
    assert_eq!((g.freezes, g.thaws, g.frozen), (1, 1, false));
}

// --- Initial copy --------------------------------------------------------------------------

#[tokio::test]
async fn an_initial_copy_sends_log_1_with_every_disk_whole_and_leaves_bitmap_1_recording() {
    let mut rig = Rig::new(
        &[DISK, ("disk1", 2 * MIB)],
        ReplicationState::WaitingForInitialReplication,
        0,
    );
    write(&rig, 1, &[0, 1, 30]);
    rig.nodes.write("disk1", MIB, &noise(9, 4096));
    let done = rig.initial().await.unwrap();
    assert!(matches!(done, Done::Acked { seq: 1, .. }), "{done:?}");
    assert_eq!(
        rig.nodes.ops(),
        vec![Op::StopTracking, Op::BeginFull(1), Op::Release(1)]
    );
    assert_eq!(rig.nodes.bitmaps(), vec![(1, true)], "nothing to commit");
    let h = rig.replica.header(1);
    assert_eq!(
        (h.sequence, h.base_sequence, h.kind),
        (1, 0, LogKind::Initial)
    );
    let disks: Vec<(String, u64)> = h
        .disks
        .iter()
        .map(|d| (d.id.clone(), d.virtual_size))
        .collect();
    assert_eq!(
        disks,
        vec![("disk0".into(), 4 * MIB), ("disk1".into(), 2 * MIB)]
    );
    assert!(rig.replica_equals_primary());
    assert!(!rig.kept_log(1).exists());
}

#[tokio::test]
async fn a_failed_initial_copy_removes_its_bitmaps_and_keeps_nothing_to_resume() {
    let mut rig = Rig::new(&[DISK], ReplicationState::WaitingForInitialReplication, 0);
    six_changes(&rig);
    rig.replica.state().cut_after = Some(150_000);
    let e = rig.initial().await.unwrap_err();
    assert_eq!(class(&e).0, "network");
    assert_eq!(
        rig.nodes.ops(),
        vec![
            Op::StopTracking,
            Op::BeginFull(1),
            Op::Release(1),
            Op::StopTracking
        ]
    );
    assert_eq!(rig.nodes.bitmaps(), vec![]);
    assert!(!rig.kept_log(1).exists());
    // The retry starts clean and succeeds.
    assert!(rig.initial().await.is_ok());
    assert!(rig.replica_equals_primary());
}

#[tokio::test]
async fn an_exported_initial_copy_is_written_whole_and_announced_with_its_size_and_digest() {
    let mut rig = Rig::new(&[DISK], ReplicationState::WaitingForInitialReplication, 0);
    let media = tempfile::tempdir().unwrap();
    rig.rel.settings.initial = InitialReplication::Export {
        folder: media.path().to_path_buf(),
    };
    six_changes(&rig);
    let done = rig.initial().await.unwrap();
    let file = export_file(media.path(), &rig.vm.name);
    let bytes = std::fs::read(&file).unwrap();
    assert!(matches!(done, Done::Exported { bytes: b } if b == bytes.len() as u64));
    assert!(!file.with_extension("vmrlog.partial").exists());
    let (h, _) = vmrepl_log::verify(&file).unwrap();
    assert_eq!(
        (h.sequence, h.base_sequence, h.kind),
        (1, 0, LogKind::Initial)
    );
    assert_eq!(
        rig.replica.state().expected_import,
        Some((
            bytes.len() as u64,
            blake3::hash(&bytes).to_hex().to_string()
        ))
    );
    assert!(!rig
        .replica
        .requests()
        .iter()
        .any(|r| r.starts_with("send-log")));
    // Bitmap 1 records every write while the media travels.
    assert_eq!(rig.nodes.bitmaps(), vec![(1, true)]);
    assert_eq!(
        rig.nodes.ops(),
        vec![Op::StopTracking, Op::BeginFull(1), Op::Release(1)]
    );
}

// --- Resynchronization -------------------------------------------------------------------------

#[tokio::test]
async fn a_resync_sends_only_the_64k_blocks_that_differ_then_a_delta_makes_the_replica_whole() {
    let mut rig = Rig::replicating(&[DISK], 5, 7);
    // The primary has data in its first 3 MiB and none in the last.
    for b in 0..3 {
        rig.nodes.write("disk0", b * MIB, &noise(b, MIB as usize));
    }
    {
        let mut r = rig.replica.state();
        r.disks = rig.nodes.state().disks.clone();
        let d = r.disks.get_mut("disk0").unwrap();
        d[(MIB + 5) as usize] ^= 0xff; // one byte off at 1 MiB
        d[(3 * MIB) as usize..(3 * MIB + 10) as usize].fill(7); // data where the primary has none
    }
    // One part (log 6, the whole 4 MiB disk in one range), then the final delta (log 7).
    assert_eq!(rig.resync().await.unwrap().0, 7);
    assert_eq!(
        rig.replica.records(6),
        vec![
            ("disk0".to_string(), MIB, CLUSTER, false),
            ("disk0".to_string(), 3 * MIB, CLUSTER, true)
        ],
        "one 64 KiB block each, not a whole MiB"
    );
    let part = rig.replica.header(6);
    assert_eq!(
        (part.sequence, part.base_sequence, part.kind),
        (6, 5, LogKind::ResyncPart)
    );
    let last = rig.replica.header(7);
    assert_eq!(
        (last.sequence, last.base_sequence, last.kind),
        (7, 6, LogKind::Delta)
    );
    assert_eq!(
        rig.nodes.ops(),
        vec![
            Op::StopTracking,
            Op::BeginFull(6),
            Op::Release(6),
            Op::reconciled(),
            Op::BeginCycle(6),
            Op::Release(6),
            Op::Commit(6)
        ]
    );
    assert_eq!(rig.nodes.bitmaps(), vec![(7, true)]);
    assert_eq!(
        rig.replica
            .requests()
            .iter()
            .filter(|r| r.starts_with("range-digests"))
            .count(),
        1
    );
    assert!(!rig
        .replica
        .requests()
        .contains(&"block-digests".to_string()));
    assert!(rig.replica_equals_primary());
    assert_eq!(
        *rig.sweeps.0.lock().unwrap(),
        None,
        "nothing left to continue"
    );
}

#[tokio::test]
async fn writes_made_during_the_compare_reach_the_replica_with_the_final_delta() {
    let mut rig = Rig::replicating(&[DISK], 5, 7);
    rig.resync_range = Some(MIB);
    write(&rig, 1, &[1, 20, 40]);
    rig.replica.state().disks = rig.nodes.state().disks.clone();
    write(&rig, 2, &[20]);
    // The link goes down once two of the four parts are in.
    rig.replica.state().link_lost_at = Some(7);
    let e = rig.resync().await.unwrap_err();
    assert_eq!(class(&e).0, "network");
    assert_eq!(rig.replica.state().last_applied, 7, "parts 6 and 7 are in");
    // The guest writes in a range already compared, and in one not yet compared.
    write(&rig, 3, &[2, 50]);
    rig.replica.state().link_lost_at = None;
    assert_eq!(rig.resync().await.unwrap().0, 10);
    assert!(rig.replica_equals_primary());
    assert_eq!(
        data_on_disk0(&rig, 10),
        clusters(&[2, 50]),
        "the final delta carries what was written since the compare began"
    );
}

#[tokio::test]
async fn a_cut_resync_continues_from_the_part_after_the_last_acknowledged_one() {
    let mut rig = Rig::replicating(&[DISK], 5, 7);
    rig.resync_range = Some(MIB); // four parts of 1 MiB
    write(&rig, 1, &[3, 17, 33, 49]); // one block in each MiB
    rig.replica.state().link_lost_at = Some(7);
    let e = rig.resync().await.unwrap_err();
    assert_eq!(class(&e).0, "network");
    assert_eq!(rig.replica.state().last_applied, 7);
    let sweep = rig.sweeps.0.lock().unwrap().expect("the sweep is recorded");
    assert_eq!((sweep.base, sweep.parts, sweep.range_bytes), (5, 4, MIB));
    // How far the compare got, in the status.
    let p = rig.progress.lock().unwrap().clone().expect("progress");
    assert!(p.what.contains("part 2 of 4"), "{p:?}");
    assert_eq!((p.bytes_done, p.bytes_total), (2 * MIB, 4 * MIB));
    assert_eq!(p.blocks_differing, Some(2));
    // Tracking held: the next attempt takes a new point and goes on with part 3.
    rig.replica.state().link_lost_at = None;
    rig.replica.state().requests.clear();
    let ops_before = rig.nodes.ops().len();
    assert_eq!(rig.resync().await.unwrap().0, 10);
    let asked: Vec<String> = rig
        .replica
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("range-digests"))
        .collect();
    assert_eq!(
        asked,
        vec![
            format!("range-digests disk0 {}+{MIB}", 2 * MIB),
            format!("range-digests disk0 {}+{MIB}", 3 * MIB)
        ],
        "the first two ranges are not compared again"
    );
    assert_eq!(
        rig.nodes.ops()[ops_before..],
        [
            Op::reconciled(),
            Op::BeginPoint(6),
            Op::Release(6),
            Op::reconciled(),
            Op::BeginCycle(6),
            Op::Release(6),
            Op::Commit(6)
        ]
    );
    assert_eq!(data_on_disk0(&rig, 8), clusters(&[33]));
    assert_eq!(data_on_disk0(&rig, 9), clusters(&[49]));
    assert!(rig.replica_equals_primary());
    assert_eq!(*rig.sweeps.0.lock().unwrap(), None);
}

#[tokio::test]
async fn a_resync_sends_the_blocks_its_compare_read_without_reading_the_disk_again() {
    let mut rig = Rig::replicating(&[DISK], 5, 7);
    rig.resync_range = Some(MIB);
    write(&rig, 1, &[3, 17, 18, 33, 49]);
    assert_eq!(
        rig.resync().await.unwrap().0,
        10,
        "parts 6..9, then the delta"
    );
    assert!(rig.replica_equals_primary());
    assert_eq!(data_on_disk0(&rig, 7), clusters(&[17, 18]));
    let read_again = rig.nodes.state().blocks_read.load(Ordering::Relaxed);
    assert_eq!(read_again, 0, "every differing block came from the compare");
}

#[tokio::test]
async fn a_range_whose_differing_data_passes_the_cap_is_read_again_and_arrives_whole() {
    let mut rig = Rig::replicating(&[DISK], 5, 7);
    rig.resync_range = Some(MIB);
    rig.resync_keep = CLUSTER; // one differing block per range is kept, not two
    write(&rig, 1, &[3, 17, 18, 33, 49]);
    assert_eq!(rig.resync().await.unwrap().0, 10);
    assert!(rig.replica_equals_primary());
    assert_eq!(data_on_disk0(&rig, 7), vec![(17 * CLUSTER, 2 * CLUSTER)]);
    let read_again = rig.nodes.state().blocks_read.load(Ordering::Relaxed);
    assert_eq!(read_again, 2 * CLUSTER, "only the second range's blocks");
}

#[tokio::test]
async fn a_resync_whose_tracking_was_lost_starts_again_from_the_first_range() {
    let mut rig = Rig::replicating(&[DISK], 5, 7);
    rig.resync_range = Some(MIB);
    write(&rig, 1, &[3, 17, 33, 49]);
    rig.replica.state().link_lost_at = Some(7);
    rig.resync().await.unwrap_err();
    // QEMU was killed: the bitmap the sweep started is not saved cleanly.
    for b in rig.nodes.state().bitmaps.values_mut() {
        b.inconsistent = true;
    }
    rig.replica.state().link_lost_at = None;
    rig.replica.state().requests.clear();
    assert_eq!(
        rig.resync().await.unwrap().0,
        12,
        "parts 8..11, then the delta"
    );
    let asked = rig
        .replica
        .requests()
        .iter()
        .filter(|r| r.starts_with("range-digests"))
        .count();
    assert_eq!(asked, 4, "every range is compared again");
    // The ranges sent before match now: only the two not sent before differ.
    assert!(data_on_disk0(&rig, 8).is_empty());
    assert!(data_on_disk0(&rig, 9).is_empty());
    assert_eq!(data_on_disk0(&rig, 10), clusters(&[33]));
    assert!(rig.replica_equals_primary());
}

#[tokio::test]
async fn a_part_the_replica_refuses_stops_the_resync_and_the_next_one_continues() {
    let mut rig = Rig::replicating(&[DISK], 2, 3);
    rig.resync_range = Some(2 * MIB);
    write(&rig, 1, &[1, 40]);
    rig.replica.state().refuse = Some(RefusalCode::Internal);
    let e = rig.resync().await.unwrap_err();
    assert_eq!(class(&e).0, "other");
    assert_eq!(rig.replica.state().last_applied, 2);
    assert!(rig.sweeps.0.lock().unwrap().is_some());
    assert_eq!(rig.nodes.bitmaps(), vec![(3, true)], "tracking goes on");
    assert!(!rig.kept_log(3).exists(), "a part keeps nothing to resume");
    assert_eq!(rig.resync().await.unwrap().0, 5);
    assert!(rig.replica_equals_primary());
}

#[tokio::test]
async fn a_resync_in_parts_carries_the_uefi_vars_in_its_final_delta_only() {
    let mut rig = Rig::replicating(&[DISK], 2, 3);
    rig.vars = Some(vmrepl_tracking::VARS_NODE);
    {
        let mut n = rig.nodes.state();
        n.vars = vec![0u8; 256 * 1024];
        n.vars[..1000].copy_from_slice(&noise(4, 1000));
    }
    write(&rig, 1, &[1]);
    assert_eq!(rig.resync().await.unwrap().0, 4);
    let nvram = crate::peer::proto::NVRAM_DISK_ID;
    assert!(rig.replica.header(3).disks.iter().all(|d| d.id != nvram));
    assert_eq!(rig.replica.header(4).disks.last().unwrap().id, nvram);
    assert!(rig.replica_equals_primary());
}

#[tokio::test]
async fn a_replica_of_an_older_release_gets_the_whole_disk_compare_in_one_log() {
    let mut rig = Rig::replicating(&[DISK], 5, 7);
    for b in 0..3 {
        rig.nodes.write("disk0", b * MIB, &noise(b, MIB as usize));
    }
    {
        let mut r = rig.replica.state();
        r.gives_range_digests = false;
        r.disks = rig.nodes.state().disks.clone();
        let d = r.disks.get_mut("disk0").unwrap();
        d[(MIB + 5) as usize] ^= 0xff; // one byte off in block 1
        d[(3 * MIB) as usize..(3 * MIB + 10) as usize].fill(7); // data where the primary has none
    }
    assert_eq!(rig.resync().await.unwrap().0, 6);
    assert_eq!(
        rig.replica.records(6),
        vec![
            ("disk0".to_string(), MIB, MIB, false),
            ("disk0".to_string(), 3 * MIB, MIB, true)
        ]
    );
    let h = rig.replica.header(6);
    assert_eq!(
        (h.sequence, h.base_sequence, h.kind),
        (6, 5, LogKind::Resync)
    );
    assert_eq!(
        rig.nodes.ops(),
        vec![
            Op::StopTracking,
            Op::BeginFull(6),
            Op::Release(6),
            Op::StopTracking,
            Op::BeginFull(6),
            Op::Release(6)
        ]
    );
    assert_eq!(rig.nodes.bitmaps(), vec![(6, true)]);
    assert!(rig
        .replica
        .requests()
        .contains(&"block-digests".to_string()));
    assert!(rig.replica_equals_primary());
    assert_eq!(*rig.sweeps.0.lock().unwrap(), None);
}

#[tokio::test]
async fn a_whole_disk_compare_reports_every_byte_compared_and_the_blocks_that_differed() {
    let mut rig = Rig::replicating(&[DISK], 5, 7);
    for b in 0..3 {
        rig.nodes.write("disk0", b * MIB, &noise(b, MIB as usize));
    }
    {
        let mut r = rig.replica.state();
        r.gives_range_digests = false;
        r.disks = rig.nodes.state().disks.clone();
        let d = r.disks.get_mut("disk0").unwrap();
        d[(2 * MIB + 1) as usize] ^= 0x01; // one byte off in block 2
    }
    assert_eq!(rig.resync().await.unwrap().0, 6);
    let p = rig
        .progress
        .lock()
        .unwrap()
        .clone()
        .expect("progress was published");
    assert!(p.what.contains("comparing"), "{p:?}");
    assert_eq!((p.bytes_done, p.bytes_total), (DISK.1, DISK.1), "{p:?}");
    assert_eq!(p.blocks_differing, Some(1), "{p:?}");
    assert_eq!(p.eta_secs(), None, "nothing is left to compare");
}

#[tokio::test]
async fn a_replica_without_digests_gets_every_block_with_the_gaps_as_zeroes() {
    let mut rig = Rig::replicating(&[DISK], 2, 3);
    write(&rig, 1, &[4, 5, 40]);
    {
        let mut r = rig.replica.state();
        r.gives_digests = false;
        r.gives_range_digests = false;
        r.disks.get_mut("disk0").unwrap()[(20 * CLUSTER) as usize] = 1;
    }
    rig.resync().await.unwrap();
    let recs = rig.replica.records(3);
    // The records tile the whole disk: data where the primary holds some, zeroes elsewhere.
    let mut at = 0;
    for (_, o, l, _) in &recs {
        assert_eq!(*o, at, "{recs:?}");
        at += l;
    }
    assert_eq!(at, 4 * MIB);
    assert_eq!(
        data_on_disk0(&rig, 3),
        vec![(4 * CLUSTER, 2 * CLUSTER), (40 * CLUSTER, CLUSTER)]
    );
    assert!(rig.replica_equals_primary());
}

#[tokio::test]
async fn a_whole_disk_resync_zero_fills_the_disks_but_never_the_uefi_vars() {
    let mut rig = Rig::replicating(&[DISK], 2, 3);
    rig.vars = Some(vmrepl_tracking::VARS_NODE);
    {
        let mut n = rig.nodes.state();
        n.vars = vec![0u8; 256 * 1024];
        n.vars[..1000].copy_from_slice(&noise(4, 1000));
    }
    {
        let mut r = rig.replica.state();
        r.gives_digests = false;
        r.gives_range_digests = false;
    }
    write(&rig, 1, &[1]);
    rig.resync().await.unwrap();
    let nvram = crate::peer::proto::NVRAM_DISK_ID;
    let h = rig.replica.header(3);
    assert_eq!(h.disks.last().unwrap().id, nvram);
    assert_eq!(h.disks.last().unwrap().virtual_size, 256 * 1024);
    let recs = rig.replica.records(3);
    let vars: Vec<_> = recs.iter().filter(|r| r.0 == nvram).collect();
    assert_eq!(vars, [&(nvram.to_string(), 0, CLUSTER, false)]);
    assert!(
        recs.iter().any(|r| r.0 == "disk0" && r.3),
        "disk0 is zero-filled"
    );
}

// --- Whatever happens -------------------------------------------------------------------------

#[tokio::test]
async fn after_any_run_of_cuts_lost_answers_and_refusals_the_replica_catches_up_and_the_bitmaps_stay_sound(
) {
    for seed in 1..=3u64 {
        let mut rig = Rig::replicating(&[DISK], 1, 1);
        let mut x = noise(seed, 64);
        for round in 0..12u64 {
            let r = x[round as usize % 64] as u64;
            write(&rig, seed * 100 + round, &[r % 64, (r * 7 + round) % 64]);
            {
                let mut s = rig.replica.state();
                match r % 6 {
                    0 => {}
                    1 => s.cut_after = Some(1000 + r * 500),
                    2 => s.lose_ack = true,
                    3 => s.refuse = Some(RefusalCode::BadLog),
                    4 => s.unreachable = true,
                    _ => {
                        drop(s);
                        rig.nodes.state().fail_build_from = Some(1);
                    }
                }
            }
            let _ = rig.delta().await;
            rig.replica.state().unreachable = false;
            rig.nodes.state().fail_build_from = None;
            assert!(
                rig.nodes.bitmaps_sound(),
                "seed {seed} round {round}: {:?}",
                rig.nodes.bitmaps()
            );
            let applied = rig.replica.state().last_applied;
            let acked = rig.rel.acked_seq;
            // Only a lost answer leaves the replica ahead, and then the log is kept to settle.
            assert!(
                applied == acked || (applied == acked + 1 && rig.kept_log(applied).exists()),
                "seed {seed} round {round}: applied {applied}, acked {acked}"
            );
            x.rotate_left(1);
        }
        // Two quiet cycles: one settles what is pending, the next carries the rest.
        rig.delta().await.unwrap();
        rig.delta().await.unwrap();
        assert!(rig.replica_equals_primary(), "seed {seed}");
        assert_eq!(rig.nodes.bitmaps().len(), 1);
    }
}

#[tokio::test]
async fn a_frozen_bitmap_whose_log_the_replica_applied_settles_the_lost_acknowledgement_without_a_resync(
) {
    let mut rig = Rig::replicating(&[DISK], 1, 1);
    // A cycle froze bitmap 1, the replica made log 2 durable and acknowledged it, and this
    // host's daemon died before it released the bitmap or recorded the acknowledgement.
    write(&rig, 1, &[0, 2]);
    {
        let mut s = rig.nodes.state();
        s.bitmaps.get_mut(&1).unwrap().recording = false;
        s.bitmaps.insert(
            2,
            Bitmap {
                recording: true,
                ..Bitmap::default()
            },
        );
    }
    rig.replica.state().last_applied = 2;
    assert_eq!(rig.delta().await.unwrap(), (2, 0), "no resynchronization");
    assert_eq!(
        rig.nodes.ops()[..1],
        [Op::Reconcile {
            committed: vec![1],
            merged_back: vec![]
        }]
    );
    assert_eq!(rig.nodes.bitmaps(), vec![(2, true)]);
    assert!(!rig
        .replica
        .requests()
        .iter()
        .any(|r| r.starts_with("send-log")));
    // The next cycle goes on from bitmap 2 as log 3.
    write(&rig, 2, &[4]);
    assert_eq!(rig.delta().await.unwrap().0, 3);
}
