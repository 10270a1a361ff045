//! Scripted fakes of the cycle engine's seams (`ports.rs`), for unit tests of its decisions
//! without QEMU, a network or root.
//!
//! - [`FakeNodes`] keeps the primary's disks in memory and the relationship's bitmaps the way
//!   `vmrepl-tracking` does (one recording, at most one frozen; commit drops, rollback merges,
//!   reconcile repairs), records every tracking call ([`Op`]) and serves the staged points in
//!   time from memory until they are released.
//! - [`FakeReplica`] follows the replica server's rules for a log (acknowledged again when
//!   applied already, `OutOfOrder` on a wrong base, verified whole before `LogAck`, a cut
//!   transfer leaves its valid prefix to resume) and applies what it accepts to disks of its
//!   own. Its faults are zrepl's: a transfer cut after some bytes (`PartialSender`), an answer
//!   lost after the log was made durable (`FailSendCompletedSender`), a refusal, a wrong
//!   answer, an unreachable or failed-over replica.
//! - [`FakeGuest`] freezes or fails to.
//!
//! All three write to one [`Journal`], so a test can check the order of events across seams.

use super::*;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use uuid::Uuid;
use vmrepl_tracking::TrackingError;
use vmrepl_tracking::{RelTag, Staging};
use vmrepl_types::replication::{Progress, ReplicationSettings, ReplicationState};
use vmrepl_types::VmDefinition;

mod nodes;
mod replica;

pub(crate) use nodes::*;
pub(crate) use replica::*;

/// The granularity of the fake bitmaps.
pub(crate) const CLUSTER: u64 = 64 * 1024;

/// One timeline of what happened at the seams, shared by the fakes.
#[derive(Clone, Default)]
pub(crate) struct Journal(Arc<Mutex<Vec<String>>>);

impl Journal {
    pub(crate) fn push(&self, what: impl Into<String>) {
        self.0.lock().unwrap().push(what.into());
    }

    pub(crate) fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Where `what` happened first; panics when it never did.
    pub(crate) fn at(&self, what: &str) -> usize {
        let all = self.entries();
        all.iter()
            .position(|e| e == what)
            .unwrap_or_else(|| panic!("{what:?} never happened: {all:?}"))
    }
}

/// Deterministic bytes that do not compress away.
pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A generation 1 VM with these disks (id, size).
pub(crate) fn vm(disks: &[(&str, u64)]) -> VmDefinition {
    crate::replica::tests::def(disks)
}

/// A relationship of `vm` in `state`, with log `acked` acknowledged.
pub(crate) fn relationship(vm: &VmDefinition, state: ReplicationState, acked: u64) -> Relationship {
    Relationship {
        vm_uuid: vm.uuid,
        rel_id: Uuid::new_v4(),
        settings: ReplicationSettings::new("replica.test:7443"),
        replica_name: "replica.test".into(),
        state,
        acked_seq: acked,
        last_error: None,
        created_ms: 1,
        last_success_ms: None,
        note: None,
        resync_sweep: None,
    }
}

/// A primary with its VM, its relationship, the fakes and a staging folder: what one cycle
/// works with.
pub(crate) struct Rig {
    pub(crate) staging: tempfile::TempDir,
    pub(crate) vm: VmDefinition,
    pub(crate) rel: Relationship,
    pub(crate) nodes: FakeNodes,
    pub(crate) replica: FakeReplica,
    pub(crate) guest: FakeGuest,
    pub(crate) journal: Journal,
    pub(crate) progress: Mutex<Option<Progress>>,
    /// The UEFI vars node, for a generation 2 VM.
    pub(crate) vars: Option<&'static str>,
    pub(crate) consistency: vmrepl_log::Consistency,
    /// The relationship row's record of a resynchronization in parts.
    pub(crate) sweeps: FakeSweeps,
    /// The size of a resynchronization's ranges (None: by disk size).
    pub(crate) resync_range: Option<u64>,
    /// The differing data a resynchronization keeps per range.
    pub(crate) resync_keep: u64,
}

/// The relationship row's record of a resynchronization in parts, in memory.
#[derive(Clone, Default)]
pub(crate) struct FakeSweeps(pub(crate) Arc<Mutex<Option<crate::db::ResyncSweep>>>);

impl SweepRecord for FakeSweeps {
    fn record(&self, sweep: Option<&crate::db::ResyncSweep>) -> Result<(), String> {
        *self.0.lock().unwrap() = sweep.copied();
        Ok(())
    }
}

/// Which step of a cycle a [`CycleError`] is: "network", "resync" or "other", and its message.
pub(crate) fn class(e: &CycleError) -> (&'static str, &str) {
    match e {
        CycleError::Network(m) => ("network", m),
        CycleError::OutOfOrder(m) | CycleError::TrackingLost(m) => ("resync", m),
        CycleError::Other(m) => ("other", m),
    }
}

impl Rig {
    /// A VM with these disks whose relationship is in `state` at log `acked`; the replica has
    /// applied `acked` too.
    pub(crate) fn new(disks: &[(&str, u64)], state: ReplicationState, acked: u64) -> Rig {
        let journal = Journal::default();
        let vm = vm(disks);
        let rel = relationship(&vm, state, acked);
        let replica = FakeReplica::new(vm.uuid, &journal);
        replica.state().last_applied = acked;
        Rig {
            staging: tempfile::tempdir().unwrap(),
            nodes: FakeNodes::new(disks, &journal),
            guest: FakeGuest::new(&journal),
            replica,
            journal,
            vm,
            rel,
            progress: Mutex::new(None),
            vars: None,
            consistency: vmrepl_log::Consistency::Crash,
            sweeps: FakeSweeps::default(),
            resync_range: None,
            resync_keep: crate::primary::KEEP_PER_RANGE,
        }
    }

    /// A replicating VM at log `acked` whose recording bitmap is `bitmap` and whose replica
    /// equals the primary (both disks zero).
    pub(crate) fn replicating(disks: &[(&str, u64)], acked: u64, bitmap: u64) -> Rig {
        let rig = Rig::new(disks, ReplicationState::Replicating, acked);
        rig.nodes.track_from(bitmap);
        rig.replica.state().disks = rig.nodes.state().disks.clone();
        rig
    }

    /// One cycle over the fakes.
    pub(crate) fn cycle(&self) -> Cycle<'_, FakeReplica, FakeNodes, FakeGuest> {
        Cycle {
            rel: &self.rel,
            vm: &self.vm,
            client: self.replica.clone(),
            endpoint: &self.nodes,
            guest: self.guest.clone(),
            tag: RelTag::from_uuid(&self.rel.rel_id),
            disks: replicated_disks(&self.vm, &self.rel.settings),
            vars: self.vars,
            staging: Staging::new(self.staging.path()),
            progress: &self.progress,
            consistency: self.consistency,
            app_freeze: None,
            resync_range: self.resync_range,
            resync_keep: self.resync_keep,
            sweeps: &self.sweeps,
            fresh: vec![],
            fresh_carried: false,
        }
    }

    /// A delta cycle; its acknowledged log becomes the relationship's.
    pub(crate) async fn delta(&mut self) -> Result<(u64, u64), CycleError> {
        let r = self.cycle().delta().await;
        if let Ok((seq, _)) = r {
            self.rel.acked_seq = seq;
        }
        r
    }

    /// A resynchronization; its acknowledged log becomes the relationship's.
    pub(crate) async fn resync(&mut self) -> Result<(u64, u64), CycleError> {
        // As the daemon does, the relationship is read again before each cycle.
        self.rel.resync_sweep = *self.sweeps.0.lock().unwrap();
        let r = self.cycle().resync().await;
        if let Ok((seq, _)) = r {
            self.rel.acked_seq = seq;
        }
        r
    }

    /// The initial copy; log 1 becomes the relationship's once acknowledged.
    pub(crate) async fn initial(&mut self) -> Result<Done, CycleError> {
        let r = self.cycle().initial().await;
        if let Ok(Done::Acked { seq, .. }) = r {
            self.rel.acked_seq = seq;
        }
        r
    }

    /// Where a log kept for a resume lies.
    pub(crate) fn kept_log(&self, seq: u64) -> PathBuf {
        log_file(
            self.staging.path(),
            RelTag::from_uuid(&self.rel.rel_id),
            seq,
        )
    }

    /// Whether the replica's disks hold what the primary's do.
    pub(crate) fn replica_equals_primary(&self) -> bool {
        let primary = self.nodes.state().disks.clone();
        let replica = self.replica.state().disks.clone();
        primary
            .iter()
            .all(|(id, data)| replica.get(id) == Some(data))
    }
}
