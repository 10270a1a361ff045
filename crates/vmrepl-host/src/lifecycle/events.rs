//! The events each role's state machine takes, with their stable names and sentences.

use std::fmt;
use vmrepl_types::replication::InitialReplication;

/// How the first full copy reaches the replica (the kind of [`InitialReplication`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InitialMethod {
    /// Over the network, now.
    Network,
    /// Over the network at a set time.
    Scheduled,
    /// Exported to external media, imported on the replica.
    Export,
    /// The replica host's existing copy, brought to this VM's state by block compare.
    ExistingCopy,
}

impl From<&InitialReplication> for InitialMethod {
    fn from(i: &InitialReplication) -> Self {
        match i {
            InitialReplication::NetworkNow => InitialMethod::Network,
            InitialReplication::NetworkAt { .. } => InitialMethod::Scheduled,
            InitialReplication::Export { .. } => InitialMethod::Export,
            InitialReplication::ExistingCopy => InitialMethod::ExistingCopy,
        }
    }
}

/// What a replication cycle was sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CycleKind {
    /// The initial copy (log 1, every block).
    Initial,
    /// The changes since the last acknowledged log.
    Delta,
    /// A resynchronization: the blocks that differ from the replica's latest state.
    Resync,
}

/// Where reverse replication starts, as the old primary answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReverseStart {
    /// The old primary holds exactly the failover point: only the changes since go.
    CommonPoint,
    /// The old primary kept its disks but they may differ anywhere: resynchronized by compare.
    Resynchronize,
    /// The old primary has no usable copy: a full initial copy.
    FullCopy,
}

/// What happens to a relationship on the primary (the host the VM runs on).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PrimaryEvent {
    /// Enable-VMReplication: the replica server took the VM; initial replication as `initial` says.
    Enabled { initial: InitialMethod },
    /// Start-VMInitialReplication: the initial copy begins (now, or at its scheduled time).
    InitialReplicationStarted,
    /// The initial copy was written whole to external media; it waits to be imported there.
    InitialCopyExported,
    /// Import-VMInitialReplication was run on the replica: the exported copy is its log 1.
    InitialCopyImported,
    /// The replica acknowledged the log of a cycle of this kind: it is durable there.
    CycleAcknowledged { kind: CycleKind },
    /// A cycle of this kind failed (network, the replica refused, the VM's disks could not be
    /// read); its changes go with the next cycle.
    CycleFailed { kind: CycleKind },
    /// Change tracking cannot be trusted any more (QEMU was killed, a bitmap is missing): the
    /// changes since the last log are unknown, so resynchronization is required.
    TrackingLost,
    /// The replica refused a log as out of sequence, or holds another log than this host
    /// expects (it was restored from a backup, or altered): resynchronization is required.
    OutOfOrderRefused,
    /// Suspend-VMReplication: no cycle runs until resumed; changes are still tracked.
    Paused,
    /// Resume-VMReplication: cycles run again; `initial_done` when the replica acknowledged a
    /// log already (else initial replication starts over).
    Resumed { initial_done: bool },
    /// Resume-VMReplication -Resynchronize: compare the disks and send the blocks that differ.
    ResynchronizationRequested,
    /// Start-VMFailover -Prepare: the VM is off, its last changes were acknowledged as a
    /// planned point, and it is locked against starting here.
    PreparedForFailover,
    /// Stop-VMFailover on the primary: the prepare is undone; the VM may start, cycles resume.
    PrepareCancelled,
    /// Set-VMReplication -Reverse, on the host the VM failed over to: this host becomes the
    /// primary of a new relationship towards the old primary.
    ReverseReplicationStarted { start: ReverseStart },
    /// The old primary accepted to become the replica of the failed-over VM: this host's
    /// relationship ends (its VM is now the replica's base, or gone).
    ReverseReplicationAccepted,
    /// Remove-VMReplication on the primary.
    Removed,
    /// The daemon started again: a cycle that was running when it stopped did not finish.
    DaemonRestarted,
}

/// What happens to a replica VM (on the replica server).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReplicaEvent {
    /// The replica VM was created for its primary. `holds_point`: this host's own disks were
    /// adopted at a failover point (reverse replication after a planned failover), so deltas
    /// follow at once; otherwise nothing is applied yet (an empty store, or disks adopted at
    /// sequence 0 that the primary brings up to date by resynchronization).
    ReplicaCreated { holds_point: bool },
    /// One or more received logs were applied: the replica is at a recovery point.
    LogApplied,
    /// An apply pass left the replica in the middle of a resynchronization in parts: parts
    /// were applied (or are all it holds since the last whole state), so its latest state is
    /// not a point until the resynchronization ends; the recovery points from before stay.
    ResyncPartApplied,
    /// An apply pass found no received log waiting (at daemon start, before a failover, when
    /// the primary asks what this host holds). `initial_done`: a log was applied before.
    NoLogPending { initial_done: bool },
    /// A received log could not be applied; `needs_resync` when the replica's latest state is
    /// not whole any more (a damaged log set aside), else it is retried (a full disk, say).
    ApplyFailed { needs_resync: bool },
    /// A log was refused because it does not follow the last applied one.
    OutOfOrderRefused,
    /// Start-VMFailover on the replica: planned when the primary prepared the VM (complete at
    /// once), else unplanned to a chosen recovery point (waiting for complete or cancel).
    FailoverStarted { planned: bool },
    /// Complete-VMFailover: the failed-over VM keeps its point; the other points are dropped.
    FailoverCompleted,
    /// Stop-VMFailover on the replica: the failed-over VM is deleted; the points are as before.
    FailoverCancelled,
    /// Start-VMFailover -AsTest: a test VM on throwaway overlays; replication goes on.
    TestFailoverStarted,
    /// Stop-VMFailover of a test failover: the test VM is deleted.
    TestFailoverStopped,
    /// Set-VMReplication -Reverse on this host: the failed-over VM becomes the primary of a new
    /// relationship; this replica ends.
    ReverseReplicationStarted,
    /// Remove-VMReplication, asked by the primary.
    Removed,
}

impl PrimaryEvent {
    /// The stable kebab-case name, as recorded in the `transitions` table.
    pub fn name(&self) -> &'static str {
        use PrimaryEvent as E;
        match self {
            E::Enabled { .. } => "enabled",
            E::InitialReplicationStarted => "initial-replication-started",
            E::InitialCopyExported => "initial-copy-exported",
            E::InitialCopyImported => "initial-copy-imported",
            E::CycleAcknowledged { .. } => "cycle-acknowledged",
            E::CycleFailed { .. } => "cycle-failed",
            E::TrackingLost => "tracking-lost",
            E::OutOfOrderRefused => "out-of-order-refused",
            E::Paused => "paused",
            E::Resumed { .. } => "resumed",
            E::ResynchronizationRequested => "resynchronization-requested",
            E::PreparedForFailover => "prepared-for-failover",
            E::PrepareCancelled => "prepare-cancelled",
            E::ReverseReplicationStarted { .. } => "reverse-replication-started",
            E::ReverseReplicationAccepted => "reverse-replication-accepted",
            E::Removed => "removed",
            E::DaemonRestarted => "daemon-restarted",
        }
    }

    /// What was asked or what happened, as the subject of a refusal ("Pausing replication").
    pub fn action(&self) -> &'static str {
        use PrimaryEvent as E;
        match self {
            E::Enabled { .. } => "Enabling replication",
            E::InitialReplicationStarted => "Starting initial replication",
            E::InitialCopyExported => "Recording an exported initial copy",
            E::InitialCopyImported => "Recording the import of the initial copy",
            E::CycleAcknowledged { .. } => "Recording an acknowledged cycle",
            E::CycleFailed { .. } => "Recording a failed cycle",
            E::TrackingLost => "Recording lost change tracking",
            E::OutOfOrderRefused => "Recording a log refused as out of order",
            E::Paused => "Pausing replication",
            E::Resumed { .. } => "Resuming replication",
            E::ResynchronizationRequested => "Resynchronizing",
            E::PreparedForFailover => "Preparing a planned failover",
            E::PrepareCancelled => "Cancelling a planned failover",
            E::ReverseReplicationStarted { .. } => "Reversing replication to this host",
            E::ReverseReplicationAccepted => "Handing this VM over to reverse replication",
            E::Removed => "Removing replication",
            E::DaemonRestarted => "Recovering after a daemon restart",
        }
    }

    /// A sentence fragment with the event's details, for the log and the `cause` of a
    /// recorded transition when the caller has nothing more precise.
    pub fn describe(&self) -> String {
        use PrimaryEvent as E;
        match self {
            E::Enabled { initial } => format!(
                "replication enabled, initial replication {}",
                match initial {
                    InitialMethod::Network => "over the network now",
                    InitialMethod::Scheduled => "over the network at a set time",
                    InitialMethod::Export => "exported to external media",
                    InitialMethod::ExistingCopy => "from the replica's existing copy",
                }
            ),
            E::CycleAcknowledged { kind } => format!("the log of {} was acknowledged", kind.what()),
            E::CycleFailed { kind } => format!("{} failed", kind.what()),
            E::Resumed { initial_done: true } => "replication resumed".into(),
            E::Resumed {
                initial_done: false,
            } => "replication resumed; initial replication starts over".into(),
            E::ReverseReplicationStarted { start } => format!(
                "replication reversed to the old primary, {}",
                match start {
                    ReverseStart::CommonPoint => "sending the changes since the failover point",
                    ReverseStart::Resynchronize => "resynchronizing its kept disks by compare",
                    ReverseStart::FullCopy => "with a full initial copy",
                }
            ),
            E::InitialReplicationStarted => "initial replication started".into(),
            E::InitialCopyExported => "the initial copy was exported".into(),
            E::InitialCopyImported => "the replica imported the initial copy".into(),
            E::TrackingLost => "change tracking cannot be trusted".into(),
            E::OutOfOrderRefused => "the replica refused a log as out of order".into(),
            E::Paused => "replication paused".into(),
            E::ResynchronizationRequested => "resynchronization requested".into(),
            E::PreparedForFailover => "prepared for a planned failover".into(),
            E::PrepareCancelled => "planned failover cancelled".into(),
            E::ReverseReplicationAccepted => {
                "this host became the replica of the failed-over VM".into()
            }
            E::Removed => "replication removed".into(),
            E::DaemonRestarted => "the daemon started again".into(),
        }
    }

    /// Every event, each payload variant once (for tables and views).
    pub fn every() -> Vec<PrimaryEvent> {
        use PrimaryEvent as E;
        let mut v = Vec::new();
        for initial in [
            InitialMethod::Network,
            InitialMethod::Scheduled,
            InitialMethod::Export,
            InitialMethod::ExistingCopy,
        ] {
            v.push(E::Enabled { initial });
        }
        v.extend([
            E::InitialReplicationStarted,
            E::InitialCopyExported,
            E::InitialCopyImported,
        ]);
        for kind in CycleKind::ALL {
            v.push(E::CycleAcknowledged { kind });
        }
        for kind in CycleKind::ALL {
            v.push(E::CycleFailed { kind });
        }
        v.extend([E::TrackingLost, E::OutOfOrderRefused, E::Paused]);
        v.push(E::Resumed { initial_done: true });
        v.push(E::Resumed {
            initial_done: false,
        });
        v.extend([
            E::ResynchronizationRequested,
            E::PreparedForFailover,
            E::PrepareCancelled,
        ]);
        for start in [
            ReverseStart::CommonPoint,
            ReverseStart::Resynchronize,
            ReverseStart::FullCopy,
        ] {
            v.push(E::ReverseReplicationStarted { start });
        }
        v.extend([
            E::ReverseReplicationAccepted,
            E::Removed,
            E::DaemonRestarted,
        ]);
        v
    }
}

impl ReplicaEvent {
    /// The stable kebab-case name, as recorded in the `transitions` table.
    pub fn name(&self) -> &'static str {
        use ReplicaEvent as E;
        match self {
            E::ReplicaCreated { .. } => "replica-created",
            E::LogApplied => "log-applied",
            E::ResyncPartApplied => "resync-part-applied",
            E::NoLogPending { .. } => "no-log-pending",
            E::ApplyFailed { .. } => "apply-failed",
            E::OutOfOrderRefused => "out-of-order-refused",
            E::FailoverStarted { .. } => "failover-started",
            E::FailoverCompleted => "failover-completed",
            E::FailoverCancelled => "failover-cancelled",
            E::TestFailoverStarted => "test-failover-started",
            E::TestFailoverStopped => "test-failover-stopped",
            E::ReverseReplicationStarted => "reverse-replication-started",
            E::Removed => "removed",
        }
    }

    /// What was asked or what happened, as the subject of a refusal ("Completing the failover").
    pub fn action(&self) -> &'static str {
        use ReplicaEvent as E;
        match self {
            E::ReplicaCreated { .. } => "Creating the replica",
            E::LogApplied => "Applying a log",
            E::ResyncPartApplied => "Applying a part of a resynchronization",
            E::NoLogPending { .. } => "Recording an apply pass with no log waiting",
            E::ApplyFailed { .. } => "Recording a failed apply",
            E::OutOfOrderRefused => "Refusing a log as out of order",
            E::FailoverStarted { planned: true } => "A planned failover",
            E::FailoverStarted { planned: false } => "A failover",
            E::FailoverCompleted => "Completing the failover",
            E::FailoverCancelled => "Cancelling the failover",
            E::TestFailoverStarted => "A test failover",
            E::TestFailoverStopped => "Stopping the test failover",
            E::ReverseReplicationStarted => "Reverse replication",
            E::Removed => "Removing the replica",
        }
    }

    /// A sentence fragment with the event's details, for the log and the `cause` of a
    /// recorded transition when the caller has nothing more precise.
    pub fn describe(&self) -> String {
        use ReplicaEvent as E;
        match self {
            E::ReplicaCreated { holds_point: true } => {
                "replica created on this host's disks, at the failover point".into()
            }
            E::ReplicaCreated { holds_point: false } => "replica created".into(),
            E::LogApplied => "a log was applied".into(),
            E::ResyncPartApplied => {
                "a part of a resynchronization was applied; the replica is a point again once it ends"
                    .into()
            }
            E::NoLogPending { .. } => "no received log waits to be applied".into(),
            E::ApplyFailed { needs_resync: true } => {
                "a log could not be applied; resynchronization is required".into()
            }
            E::ApplyFailed {
                needs_resync: false,
            } => "a log could not be applied; it is retried".into(),
            E::OutOfOrderRefused => "a log was refused as out of order".into(),
            E::FailoverStarted { planned: true } => "planned failover".into(),
            E::FailoverStarted { planned: false } => "failover to a recovery point".into(),
            E::FailoverCompleted => "failover completed".into(),
            E::FailoverCancelled => "failover cancelled".into(),
            E::TestFailoverStarted => "test failover started".into(),
            E::TestFailoverStopped => "test failover stopped".into(),
            E::ReverseReplicationStarted => "replication reversed from this host".into(),
            E::Removed => "replica removed".into(),
        }
    }

    /// Every event, each payload variant once (for tables and views).
    pub fn every() -> Vec<ReplicaEvent> {
        use ReplicaEvent as E;
        vec![
            E::ReplicaCreated { holds_point: false },
            E::ReplicaCreated { holds_point: true },
            E::LogApplied,
            E::ResyncPartApplied,
            E::NoLogPending { initial_done: true },
            E::NoLogPending {
                initial_done: false,
            },
            E::ApplyFailed { needs_resync: true },
            E::ApplyFailed {
                needs_resync: false,
            },
            E::OutOfOrderRefused,
            E::FailoverStarted { planned: true },
            E::FailoverStarted { planned: false },
            E::FailoverCompleted,
            E::FailoverCancelled,
            E::TestFailoverStarted,
            E::TestFailoverStopped,
            E::ReverseReplicationStarted,
            E::Removed,
        ]
    }
}

impl CycleKind {
    /// Every kind.
    pub const ALL: [CycleKind; 3] = [CycleKind::Initial, CycleKind::Delta, CycleKind::Resync];

    fn what(self) -> &'static str {
        match self {
            CycleKind::Initial => "the initial copy",
            CycleKind::Delta => "a delta cycle",
            CycleKind::Resync => "a resynchronization",
        }
    }
}

impl fmt::Display for PrimaryEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl fmt::Display for ReplicaEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// What an event does to the relationship's `last_error`: a failure records its cause, the
/// events that leave the state's story unchanged keep it, every other event clears it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastError {
    Cause,
    Keep,
    Clear,
}

impl PrimaryEvent {
    /// What this event does to `last_error` (see [`LastError`]).
    pub fn last_error(&self) -> LastError {
        use PrimaryEvent as E;
        match self {
            E::CycleFailed { .. } | E::TrackingLost | E::OutOfOrderRefused => LastError::Cause,
            E::DaemonRestarted => LastError::Keep,
            E::Enabled { .. }
            | E::InitialReplicationStarted
            | E::InitialCopyExported
            | E::InitialCopyImported
            | E::CycleAcknowledged { .. }
            | E::Paused
            | E::Resumed { .. }
            | E::ResynchronizationRequested
            | E::PreparedForFailover
            | E::PrepareCancelled
            | E::ReverseReplicationStarted { .. }
            | E::ReverseReplicationAccepted
            | E::Removed => LastError::Clear,
        }
    }
}

impl ReplicaEvent {
    /// What this event does to `last_error` (see [`LastError`]).
    pub fn last_error(&self) -> LastError {
        use ReplicaEvent as E;
        match self {
            E::ApplyFailed { .. } | E::OutOfOrderRefused => LastError::Cause,
            E::TestFailoverStarted | E::TestFailoverStopped => LastError::Keep,
            E::ReplicaCreated { .. }
            | E::LogApplied
            | E::ResyncPartApplied
            | E::NoLogPending { .. }
            | E::FailoverStarted { .. }
            | E::FailoverCompleted
            | E::FailoverCancelled
            | E::ReverseReplicationStarted
            | E::Removed => LastError::Clear,
        }
    }
}
