//! The relationship state machines, one per role: which events move a replication relationship
//! from one of Hyper-V's states ([`ReplicationState`], kept as the wire and database value) to
//! another, and which are refused, with the sentence an operator reads.
//!
//! Pure: no I/O and nothing of the other host modules. A caller reads the state as stored,
//! asks [`on_primary`] or [`on_replica`] what an event makes of it, writes the answer (and
//! records the transition, [`crate::db::Db::record_transition`]) under the same database lock,
//! so that two writers never compute a state from a stale read. The tables are drawn in
//! `docs/design/states.md`, together with where each event is raised.
//!
//! Two kinds of events:
//! * commands (enable, pause, resume, prepare, failover, ...): a refusal is the answer to the
//!   operator, and nothing is changed;
//! * facts (a cycle was acknowledged, a log was applied, ...): they happened, so in every state
//!   where they can happen they give a state, even an unchanged one (a cycle that ends while
//!   replication was paused leaves it paused). A refused fact is one that cannot happen in that
//!   state: a bug in the caller, worth a log line and a look.
//!
//! The main paths (every other transition is in the tables):
//!
//! ```text
//! primary
//! NotEnabled ─enabled─► Waiting (Ready when scheduled, Resynchronizing from an existing copy)
//! Waiting ─initial-replication-started─► InProgress ─cycle-acknowledged─► Replicating
//! Replicating ─paused─► Suspended ─resumed─► Replicating
//! Replicating ─tracking-lost / out-of-order-refused─► ResynchronizationRequired
//!   ─resynchronization-requested─► Resynchronizing ─cycle-acknowledged─► Replicating
//! Replicating ─prepared-for-failover─► SyncedReplicationComplete ─prepare-cancelled─► Replicating
//!
//! replica
//! NotEnabled ─replica-created─► Waiting ─log-applied─► Replicating
//! Replicating ─apply-failed / out-of-order-refused─► Error / ResynchronizationRequired
//! Replicating ─failover-started─► FailedOverWaitingCompletion ─failover-completed─► FailedOver
//! FailedOver ─reverse-replication-started─► NotEnabled (the VM is a primary now)
//! ```

use std::fmt;
use vmrepl_types::replication::{InitialReplication, ReplicationState, Role};

/// The states a primary's relationship can be in. `Error` is written by no event: it is what an
/// unreadable stored state reads back as, and a cycle that succeeds brings it back to
/// Replicating.
pub fn primary_states() -> &'static [ReplicationState] {
    use ReplicationState as S;
    &[
        S::NotEnabled,
        S::ReadyForInitialReplication,
        S::WaitingForInitialReplication,
        S::InitialReplicationInProgress,
        S::Replicating,
        S::SyncedReplicationComplete,
        S::Suspended,
        S::Error,
        S::ResynchronizationRequired,
        S::Resynchronizing,
    ]
}

/// The states a replica can be in. A replica is never ready for, nor in the middle of, initial
/// replication (the primary drives it), never prepared for a planned failover, never paused
/// (vmrepl has no pause on the replica) and never resynchronizing (only the primary knows a
/// resynchronization runs; the replica applies its log like any other).
pub fn replica_states() -> &'static [ReplicationState] {
    use ReplicationState as S;
    &[
        S::NotEnabled,
        S::WaitingForInitialReplication,
        S::Replicating,
        S::FailedOverWaitingCompletion,
        S::FailedOver,
        S::Error,
        S::ResynchronizationRequired,
    ]
}

/// Every replication state, in the order of the tables.
pub const ALL_STATES: [ReplicationState; 12] = [
    ReplicationState::NotEnabled,
    ReplicationState::ReadyForInitialReplication,
    ReplicationState::WaitingForInitialReplication,
    ReplicationState::InitialReplicationInProgress,
    ReplicationState::Replicating,
    ReplicationState::SyncedReplicationComplete,
    ReplicationState::FailedOverWaitingCompletion,
    ReplicationState::FailedOver,
    ReplicationState::Suspended,
    ReplicationState::Error,
    ReplicationState::ResynchronizationRequired,
    ReplicationState::Resynchronizing,
];

// ------------------------------------------------------------------ events

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

// ------------------------------------------------------------------ refusal

/// An event the state machine of `role` refuses in `state`. Its message is one sentence:
/// what was refused, in which state, why and what the operator can do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{action} is refused on the {} in state \"{state}\": {reason}", role_word(.role))]
pub struct Refusal {
    pub role: Role,
    pub state: ReplicationState,
    /// The event's stable name ([`PrimaryEvent::name`], [`ReplicaEvent::name`]).
    pub event: &'static str,
    /// The event as the subject of the sentence ([`PrimaryEvent::action`]).
    pub action: &'static str,
    /// Why, and what the operator can do (lower case, ends with a full stop).
    pub reason: String,
}

fn role_word(r: &Role) -> &'static str {
    match r {
        Role::Primary => "primary",
        Role::Replica => "replica",
        Role::TestReplica => "test replica",
    }
}

// Reasons shared by several arms (each names the state it is about and the way out).
const P_NOT_ENABLED: &str =
    "this host does not replicate this VM; enable replication first (`replication enable`).";
const P_ALREADY: &str = "replication of this VM is already set up from this host; remove it first (`replication remove`) to set it up again.";
const P_FOREIGN: &str = "a primary is never in this state, which belongs to a replica, so the stored state is damaged; remove replication of this VM (`replication remove`) and enable it again.";
const P_PREPARED: &str = "the VM is prepared for a planned failover and nothing moves until that is cancelled (`failover cancel` on this host) or the replica fails over.";
const P_PREPARED_NO_CYCLE: &str = "no cycle runs while the VM is prepared for a planned failover; cancel the prepare (`failover cancel`) to replicate again.";
const P_PAUSED: &str = "replication of this VM is paused; resume it first (`replication resume`).";
const P_NEEDS_RESYNC: &str = "replication of this VM needs a resynchronization and sends nothing until then; start it with `replication resume --resynchronize`.";
const P_NEEDS_RESYNC_NOT_PAUSED: &str = "replication of this VM is not paused: it needs a resynchronization, which `replication resume --resynchronize` starts.";
const P_NO_CYCLE_IN_RESYNC_REQUIRED: &str = "no cycle runs while resynchronization is required, so none can end; start one with `replication resume --resynchronize`.";
const P_RESYNCING: &str = "a resynchronization of this VM is running and goes on by itself; wait until it is done (`replication status` shows its progress).";
const P_IN_ERROR: &str = "replication of this VM is in error; pause it (`replication pause`) and resume it, or resume it with `--resynchronize`.";
const P_INITIAL_NOT_DONE: &str = "initial replication of this VM is not complete; let it finish first (`replication status` shows where it is).";
const P_SCHEDULED: &str = "initial replication of this VM is scheduled and has not started, so no cycle has run; it starts at its set time.";
const P_INITIAL_RUNNING: &str = "initial replication of this VM is in progress and no other cycle runs beside it (a copy cut by a daemon restart starts over: raise daemon-restarted first).";
const P_WAITING_NO_DELTA: &str =
    "initial replication of this VM is not complete, so no delta cycle runs yet.";
const P_NOT_PAUSED: &str = "replication of this VM is not paused, so there is nothing to resume.";
const P_NOT_PREPARED: &str =
    "the VM is not prepared for a planned failover, so there is nothing to cancel.";
const P_NOT_EXPORTING: &str =
    "no initial copy of this VM is being written, so none can have been exported.";
const P_NO_IMPORT: &str = "no exported initial copy of this VM waits to be imported.";
const P_NO_TRACKING_YET: &str = "initial replication of this VM has not started, so there is no change tracking to lose and no log to refuse.";
const P_RESYNC_AFTER_PAUSE: &str = "as in Hyper-V, pause replication first (`replication pause`), then resume it with `--resynchronize`.";
const P_INITIAL_SENDS_ALL: &str = "initial replication of this VM is not complete, and it sends every block anyway; let it finish.";

const R_NOT_REPLICA: &str = "this host keeps no replica of this VM.";
const R_ALREADY: &str = "this host already keeps a replica of this VM; it must be removed first (`replication remove` on its primary).";
const R_FOREIGN: &str = "a replica is never in this state, which belongs to a primary, so the stored state is damaged; have the primary remove replication of this VM and enable it again.";
const R_FAILED_OVER_NO_LOGS: &str = "the replica failed over and takes no more logs; reverse replication (`replication reverse`) or a new relationship replaces it.";
const R_NO_POINT: &str = "initial replication of this VM is not complete, so there is no recovery point yet; wait until the first log is applied.";
const R_NOT_FAILED_OVER: &str = "the VM has not failed over, so there is nothing to complete or cancel (`failover start` first).";
const R_WAITING_COMPLETION: &str = "the VM has already failed over to a recovery point; complete (`failover complete`) or cancel (`failover cancel`) that failover first.";
const R_FAILED_OVER: &str = "the VM has already failed over to this host; reverse replication (`replication reverse`) replicates it back.";
const R_TEST_NEEDS_REPLICA: &str =
    "the VM has failed over, and a test failover is for a replica that still receives logs.";

// ------------------------------------------------------------------ the primary

/// What `event` makes of a primary relationship in `state`.
pub fn on_primary(
    state: ReplicationState,
    event: &PrimaryEvent,
) -> Result<ReplicationState, Refusal> {
    use CycleKind as K;
    use PrimaryEvent as E;
    use ReplicationState as S;
    let no = |reason: &str| {
        Err(Refusal {
            role: Role::Primary,
            state,
            event: event.name(),
            action: event.action(),
            reason: reason.to_string(),
        })
    };
    match state {
        S::NotEnabled => match event {
            E::Enabled { initial } => Ok(match initial {
                InitialMethod::Network | InitialMethod::Export => S::WaitingForInitialReplication,
                InitialMethod::Scheduled => S::ReadyForInitialReplication,
                InitialMethod::ExistingCopy => S::Resynchronizing,
            }),
            E::ReverseReplicationStarted { start } => Ok(match start {
                ReverseStart::CommonPoint => S::Replicating,
                ReverseStart::Resynchronize => S::Resynchronizing,
                ReverseStart::FullCopy => S::WaitingForInitialReplication,
            }),
            E::InitialReplicationStarted
            | E::InitialCopyExported
            | E::InitialCopyImported
            | E::CycleAcknowledged { .. }
            | E::CycleFailed { .. }
            | E::TrackingLost
            | E::OutOfOrderRefused
            | E::Paused
            | E::Resumed { .. }
            | E::ResynchronizationRequested
            | E::PreparedForFailover
            | E::PrepareCancelled
            | E::ReverseReplicationAccepted
            | E::Removed
            | E::DaemonRestarted => no(P_NOT_ENABLED),
        },

        S::ReadyForInitialReplication => match event {
            E::InitialReplicationStarted => Ok(S::InitialReplicationInProgress),
            // The set time came and the copy could not start: it is due, and retried after one
            // interval like any initial copy (not at once, over and over).
            E::CycleFailed { kind: K::Initial } => Ok(S::WaitingForInitialReplication),
            E::Paused => Ok(S::Suspended),
            E::ReverseReplicationAccepted | E::Removed => Ok(S::NotEnabled),
            E::DaemonRestarted => Ok(state),
            E::Enabled { .. } | E::ReverseReplicationStarted { .. } => no(P_ALREADY),
            E::InitialCopyExported => no(P_NOT_EXPORTING),
            E::InitialCopyImported => no(P_NO_IMPORT),
            E::CycleAcknowledged { .. } | E::CycleFailed { .. } => no(P_SCHEDULED),
            E::TrackingLost | E::OutOfOrderRefused => no(P_NO_TRACKING_YET),
            E::Resumed { .. } => no(P_NOT_PAUSED),
            E::ResynchronizationRequested => no(P_INITIAL_SENDS_ALL),
            E::PreparedForFailover => no(P_INITIAL_NOT_DONE),
            E::PrepareCancelled => no(P_NOT_PREPARED),
        },

        S::WaitingForInitialReplication => match event {
            E::InitialReplicationStarted => Ok(S::InitialReplicationInProgress),
            E::InitialCopyImported => Ok(S::Replicating),
            // Paused and resumed while the copy (or the existing copy's compare) was on its way.
            E::CycleAcknowledged {
                kind: K::Initial | K::Resync,
            } => Ok(S::Replicating),
            E::CycleFailed {
                kind: K::Initial | K::Resync,
            } => Ok(state),
            // After an export, the bitmap has recorded since the export's point in time.
            E::TrackingLost | E::OutOfOrderRefused => Ok(S::ResynchronizationRequired),
            E::Paused => Ok(S::Suspended),
            E::ReverseReplicationAccepted | E::Removed => Ok(S::NotEnabled),
            E::DaemonRestarted => Ok(state),
            E::Enabled { .. } | E::ReverseReplicationStarted { .. } => no(P_ALREADY),
            E::InitialCopyExported => no(P_NOT_EXPORTING),
            E::CycleAcknowledged { kind: K::Delta } | E::CycleFailed { kind: K::Delta } => {
                no(P_WAITING_NO_DELTA)
            }
            E::Resumed { .. } => no(P_NOT_PAUSED),
            E::ResynchronizationRequested => no(P_INITIAL_SENDS_ALL),
            E::PreparedForFailover => no(P_INITIAL_NOT_DONE),
            E::PrepareCancelled => no(P_NOT_PREPARED),
        },

        S::InitialReplicationInProgress => match event {
            E::InitialCopyExported => Ok(S::WaitingForInitialReplication),
            E::CycleAcknowledged { kind: K::Initial } => Ok(S::Replicating),
            E::CycleFailed { kind: K::Initial } => Ok(S::WaitingForInitialReplication),
            E::TrackingLost | E::OutOfOrderRefused => Ok(S::ResynchronizationRequired),
            E::Paused => Ok(S::Suspended),
            E::ReverseReplicationAccepted | E::Removed => Ok(S::NotEnabled),
            // The copy was cut: it starts over, from a clean slate.
            E::DaemonRestarted => Ok(S::WaitingForInitialReplication),
            E::Enabled { .. } | E::ReverseReplicationStarted { .. } => no(P_ALREADY),
            E::InitialReplicationStarted => {
                no("initial replication of this VM is already in progress; `replication status` shows how far it is.")
            }
            E::InitialCopyImported => no(P_NO_IMPORT),
            E::CycleAcknowledged {
                kind: K::Delta | K::Resync,
            }
            | E::CycleFailed {
                kind: K::Delta | K::Resync,
            } => no(P_INITIAL_RUNNING),
            E::Resumed { .. } => no(P_NOT_PAUSED),
            E::ResynchronizationRequested => no(P_INITIAL_SENDS_ALL),
            E::PreparedForFailover => no(P_INITIAL_NOT_DONE),
            E::PrepareCancelled => no(P_NOT_PREPARED),
        },

        S::Replicating => match event {
            E::CycleAcknowledged { .. } | E::CycleFailed { .. } => Ok(state),
            E::TrackingLost | E::OutOfOrderRefused => Ok(S::ResynchronizationRequired),
            E::Paused => Ok(S::Suspended),
            E::PreparedForFailover => Ok(S::SyncedReplicationComplete),
            E::ReverseReplicationAccepted | E::Removed => Ok(S::NotEnabled),
            E::DaemonRestarted => Ok(state),
            E::Enabled { .. } | E::ReverseReplicationStarted { .. } => no(P_ALREADY),
            E::InitialReplicationStarted => no("initial replication of this VM is done; a full compare again is a resynchronization (`replication pause`, then `replication resume --resynchronize`)."),
            E::InitialCopyExported => no(P_NOT_EXPORTING),
            E::InitialCopyImported => no(P_NO_IMPORT),
            E::Resumed { .. } => no(P_NOT_PAUSED),
            E::ResynchronizationRequested => no(P_RESYNC_AFTER_PAUSE),
            E::PrepareCancelled => no(P_NOT_PREPARED),
        },

        S::SyncedReplicationComplete => match event {
            E::PreparedForFailover => Ok(state),
            E::PrepareCancelled => Ok(S::Replicating),
            // The replica failed over at the prepared point: the old primary becomes its replica.
            E::ReverseReplicationAccepted => Ok(S::NotEnabled),
            E::DaemonRestarted => Ok(state),
            E::Enabled { .. } | E::ReverseReplicationStarted { .. } => no(P_ALREADY),
            E::InitialReplicationStarted
            | E::InitialCopyExported
            | E::InitialCopyImported
            | E::CycleAcknowledged { .. }
            | E::CycleFailed { .. }
            | E::TrackingLost
            | E::OutOfOrderRefused => no(P_PREPARED_NO_CYCLE),
            E::Paused | E::Resumed { .. } | E::ResynchronizationRequested => no(P_PREPARED),
            E::Removed => no("the VM is prepared for a planned failover, and removing replication now would leave it locked against starting; cancel the prepare first (`failover cancel`), then remove replication."),
        },

        S::FailedOverWaitingCompletion | S::FailedOver => match event {
            // Whatever the damage, an admin can always drop the relationship.
            E::Removed => Ok(S::NotEnabled),
            E::Enabled { .. }
            | E::InitialReplicationStarted
            | E::InitialCopyExported
            | E::InitialCopyImported
            | E::CycleAcknowledged { .. }
            | E::CycleFailed { .. }
            | E::TrackingLost
            | E::OutOfOrderRefused
            | E::Paused
            | E::Resumed { .. }
            | E::ResynchronizationRequested
            | E::PreparedForFailover
            | E::PrepareCancelled
            | E::ReverseReplicationStarted { .. }
            | E::ReverseReplicationAccepted
            | E::DaemonRestarted => no(P_FOREIGN),
        },

        S::Suspended => match event {
            // A cycle that was on its way when replication was paused ends: still paused.
            E::InitialCopyExported
            | E::InitialCopyImported
            | E::CycleAcknowledged { .. }
            | E::CycleFailed { .. }
            | E::Paused
            | E::DaemonRestarted => Ok(state),
            // Pausing does not hide that the changes are unknown.
            E::TrackingLost | E::OutOfOrderRefused => Ok(S::ResynchronizationRequired),
            E::Resumed { initial_done: true } => Ok(S::Replicating),
            E::Resumed {
                initial_done: false,
            } => Ok(S::WaitingForInitialReplication),
            E::ResynchronizationRequested => Ok(S::Resynchronizing),
            E::ReverseReplicationAccepted | E::Removed => Ok(S::NotEnabled),
            E::Enabled { .. } | E::ReverseReplicationStarted { .. } => no(P_ALREADY),
            E::InitialReplicationStarted | E::PreparedForFailover => no(P_PAUSED),
            E::PrepareCancelled => no(P_NOT_PREPARED),
        },

        S::Error => match event {
            E::CycleAcknowledged { .. } => Ok(S::Replicating),
            E::CycleFailed { .. } | E::DaemonRestarted => Ok(state),
            E::TrackingLost | E::OutOfOrderRefused => Ok(S::ResynchronizationRequired),
            E::Paused => Ok(S::Suspended),
            E::ReverseReplicationAccepted | E::Removed => Ok(S::NotEnabled),
            E::Enabled { .. } | E::ReverseReplicationStarted { .. } => no(P_ALREADY),
            E::InitialReplicationStarted
            | E::Resumed { .. }
            | E::ResynchronizationRequested
            | E::PreparedForFailover => no(P_IN_ERROR),
            E::InitialCopyExported => no(P_NOT_EXPORTING),
            E::InitialCopyImported => no(P_NO_IMPORT),
            E::PrepareCancelled => no(P_NOT_PREPARED),
        },

        S::ResynchronizationRequired => match event {
            // Only a resynchronization leaves this state.
            E::CycleFailed { .. }
            | E::TrackingLost
            | E::OutOfOrderRefused
            | E::DaemonRestarted => Ok(state),
            E::ResynchronizationRequested => Ok(S::Resynchronizing),
            E::ReverseReplicationAccepted | E::Removed => Ok(S::NotEnabled),
            E::Enabled { .. } | E::ReverseReplicationStarted { .. } => no(P_ALREADY),
            E::InitialReplicationStarted | E::Paused | E::PreparedForFailover => {
                no(P_NEEDS_RESYNC)
            }
            E::Resumed { .. } => no(P_NEEDS_RESYNC_NOT_PAUSED),
            E::InitialCopyExported => no(P_NOT_EXPORTING),
            E::InitialCopyImported => no(P_NO_IMPORT),
            E::CycleAcknowledged { .. } => no(P_NO_CYCLE_IN_RESYNC_REQUIRED),
            E::PrepareCancelled => no(P_NOT_PREPARED),
        },

        S::Resynchronizing => match event {
            E::CycleAcknowledged { kind: K::Resync } => Ok(S::Replicating),
            // A delta (or initial copy) that was on its way when the resynchronization was
            // asked for: the resynchronization still runs next.
            E::CycleAcknowledged {
                kind: K::Delta | K::Initial,
            }
            | E::CycleFailed {
                kind: K::Delta | K::Initial,
            } => Ok(state),
            // As in Hyper-V, a resynchronization that stops stays required and starts over.
            E::CycleFailed { kind: K::Resync } | E::TrackingLost | E::OutOfOrderRefused => {
                Ok(S::ResynchronizationRequired)
            }
            // Asked again: it starts over (a cut one cannot be continued).
            E::ResynchronizationRequested | E::DaemonRestarted => Ok(state),
            E::ReverseReplicationAccepted | E::Removed => Ok(S::NotEnabled),
            E::Enabled { .. } | E::ReverseReplicationStarted { .. } => no(P_ALREADY),
            E::InitialReplicationStarted | E::Resumed { .. } => no(P_RESYNCING),
            E::InitialCopyExported => no(P_NOT_EXPORTING),
            E::InitialCopyImported => no(P_NO_IMPORT),
            E::Paused => no("a resynchronization cannot be paused and continued here (it would start over); let it finish, or remove replication."),
            E::PreparedForFailover => no("a resynchronization of this VM is running, and as in Hyper-V a planned failover waits until it is done."),
            E::PrepareCancelled => no(P_NOT_PREPARED),
        },
    }
}

// ------------------------------------------------------------------ the replica

/// What `event` makes of a replica in `state`.
pub fn on_replica(
    state: ReplicationState,
    event: &ReplicaEvent,
) -> Result<ReplicationState, Refusal> {
    use ReplicaEvent as E;
    use ReplicationState as S;
    let no = |reason: &str| {
        Err(Refusal {
            role: Role::Replica,
            state,
            event: event.name(),
            action: event.action(),
            reason: reason.to_string(),
        })
    };
    // What an apply pass that found nothing to apply leaves behind.
    let settled = |initial_done: bool| {
        if initial_done {
            S::Replicating
        } else {
            S::WaitingForInitialReplication
        }
    };
    match state {
        S::NotEnabled => match event {
            E::ReplicaCreated { holds_point: true } => Ok(S::Replicating),
            E::ReplicaCreated { holds_point: false } => Ok(S::WaitingForInitialReplication),
            E::LogApplied
            | E::NoLogPending { .. }
            | E::ApplyFailed { .. }
            | E::OutOfOrderRefused
            | E::FailoverStarted { .. }
            | E::FailoverCompleted
            | E::FailoverCancelled
            | E::TestFailoverStarted
            | E::TestFailoverStopped
            | E::ReverseReplicationStarted
            | E::Removed => no(R_NOT_REPLICA),
        },

        S::WaitingForInitialReplication => match event {
            E::LogApplied => Ok(S::Replicating),
            E::NoLogPending { initial_done } => Ok(settled(*initial_done)),
            E::ApplyFailed { needs_resync: true } | E::OutOfOrderRefused => {
                Ok(S::ResynchronizationRequired)
            }
            E::ApplyFailed {
                needs_resync: false,
            } => Ok(S::Error),
            E::TestFailoverStopped => Ok(state),
            E::Removed => Ok(S::NotEnabled),
            E::ReplicaCreated { .. } => no(R_ALREADY),
            E::FailoverStarted { .. } | E::TestFailoverStarted => no(R_NO_POINT),
            E::FailoverCompleted | E::FailoverCancelled => no(R_NOT_FAILED_OVER),
            E::ReverseReplicationStarted => no("the VM has not failed over to this host; reverse replication follows a failover."),
        },

        S::Replicating => match event {
            E::LogApplied => Ok(state),
            E::NoLogPending { initial_done } => Ok(settled(*initial_done)),
            E::ApplyFailed { needs_resync: true } | E::OutOfOrderRefused => {
                Ok(S::ResynchronizationRequired)
            }
            E::ApplyFailed {
                needs_resync: false,
            } => Ok(S::Error),
            E::FailoverStarted { planned: true } => Ok(S::FailedOver),
            E::FailoverStarted { planned: false } => Ok(S::FailedOverWaitingCompletion),
            E::TestFailoverStarted | E::TestFailoverStopped => Ok(state),
            E::Removed => Ok(S::NotEnabled),
            E::ReplicaCreated { .. } => no(R_ALREADY),
            E::FailoverCompleted | E::FailoverCancelled => no(R_NOT_FAILED_OVER),
            E::ReverseReplicationStarted => no("the VM has not failed over to this host; reverse replication follows a failover (`failover start`)."),
        },

        S::Error => match event {
            E::LogApplied => Ok(S::Replicating),
            E::NoLogPending { initial_done } => Ok(settled(*initial_done)),
            E::ApplyFailed { needs_resync: true } | E::OutOfOrderRefused => {
                Ok(S::ResynchronizationRequired)
            }
            E::ApplyFailed {
                needs_resync: false,
            } => Ok(state),
            // The newest log is not applied, but an older point is whole.
            E::FailoverStarted { planned: false } => Ok(S::FailedOverWaitingCompletion),
            E::TestFailoverStarted | E::TestFailoverStopped => Ok(state),
            E::Removed => Ok(S::NotEnabled),
            E::ReplicaCreated { .. } => no(R_ALREADY),
            E::FailoverStarted { planned: true } => no("the replica's last apply failed, and a planned failover needs every log applied; fix the cause (the log is applied again at the next request), or cancel the prepare on the primary and fail over to an older point with `--point`."),
            E::FailoverCompleted | E::FailoverCancelled => no(R_NOT_FAILED_OVER),
            E::ReverseReplicationStarted => no("the VM has not failed over to this host; reverse replication follows a failover (`failover start`)."),
        },

        S::ResynchronizationRequired => match event {
            // A log that applies in order proves the chain whole again (the primary's
            // resynchronization); an apply pass that found nothing proves nothing.
            E::LogApplied => Ok(S::Replicating),
            E::NoLogPending { .. } | E::ApplyFailed { .. } | E::OutOfOrderRefused => Ok(state),
            // Hyper-V allows an unplanned failover while resynchronization is required.
            E::FailoverStarted { planned: false } => Ok(S::FailedOverWaitingCompletion),
            E::TestFailoverStarted | E::TestFailoverStopped => Ok(state),
            E::Removed => Ok(S::NotEnabled),
            E::ReplicaCreated { .. } => no(R_ALREADY),
            E::FailoverStarted { planned: true } => no("the replica needs a resynchronization, so it does not hold the prepared point whole; cancel the prepare on the primary (`failover cancel` there) and resynchronize, or fail over to an older point with `--point`."),
            E::FailoverCompleted | E::FailoverCancelled => no(R_NOT_FAILED_OVER),
            E::ReverseReplicationStarted => no("the VM has not failed over to this host; reverse replication follows a failover (`failover start`)."),
        },

        S::FailedOverWaitingCompletion => match event {
            E::FailoverCompleted => Ok(S::FailedOver),
            E::FailoverCancelled => Ok(S::Replicating),
            E::TestFailoverStopped => Ok(state),
            E::ReplicaCreated { .. } => no(R_ALREADY),
            E::LogApplied
            | E::NoLogPending { .. }
            | E::ApplyFailed { .. }
            | E::OutOfOrderRefused => no(R_FAILED_OVER_NO_LOGS),
            E::FailoverStarted { .. } => no(R_WAITING_COMPLETION),
            E::TestFailoverStarted => no(R_TEST_NEEDS_REPLICA),
            E::ReverseReplicationStarted => no("the failover is not complete yet; complete it first (`failover complete`), then reverse replication."),
            E::Removed => no("the replica failed over, so its primary no longer owns it; cancel the failover (`failover cancel`) first, or complete it and reverse replication."),
        },

        S::FailedOver => match event {
            E::FailoverCompleted | E::TestFailoverStopped => Ok(state),
            E::ReverseReplicationStarted => Ok(S::NotEnabled),
            E::ReplicaCreated { .. } => no(R_ALREADY),
            E::LogApplied
            | E::NoLogPending { .. }
            | E::ApplyFailed { .. }
            | E::OutOfOrderRefused => no(R_FAILED_OVER_NO_LOGS),
            E::FailoverStarted { .. } => no(R_FAILED_OVER),
            E::FailoverCancelled => no("the failover is complete and cannot be cancelled any more; fail back with reverse replication (`replication reverse`) and a planned failover instead."),
            E::TestFailoverStarted => no(R_TEST_NEEDS_REPLICA),
            E::Removed => no("the replica failed over, so its primary no longer owns it; reverse replication (`replication reverse`) replaces the relationship."),
        },

        S::ReadyForInitialReplication
        | S::InitialReplicationInProgress
        | S::SyncedReplicationComplete
        | S::Suspended
        | S::Resynchronizing => match event {
            // Whatever the damage, the primary can always drop the replica.
            E::Removed => Ok(S::NotEnabled),
            E::ReplicaCreated { .. }
            | E::LogApplied
            | E::NoLogPending { .. }
            | E::ApplyFailed { .. }
            | E::OutOfOrderRefused
            | E::FailoverStarted { .. }
            | E::FailoverCompleted
            | E::FailoverCancelled
            | E::TestFailoverStarted
            | E::TestFailoverStopped
            | E::ReverseReplicationStarted => no(R_FOREIGN),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};
    use ReplicationState as S;

    /// Two-letter codes of the states, in the order of [`ALL_STATES`] (the table columns).
    const CODES: [&str; 12] = [
        "NE", "RI", "WI", "IP", "RE", "SC", "FW", "FO", "SU", "ER", "RR", "RS",
    ];

    fn code(s: ReplicationState) -> &'static str {
        CODES[ALL_STATES.iter().position(|x| *x == s).unwrap()]
    }

    fn from_code(c: &str) -> Option<ReplicationState> {
        CODES.iter().position(|x| *x == c).map(|i| ALL_STATES[i])
    }

    fn primary_label(e: &PrimaryEvent) -> String {
        use PrimaryEvent as E;
        let detail = match e {
            E::Enabled { initial } => Some(
                match initial {
                    InitialMethod::Network => "network",
                    InitialMethod::Scheduled => "scheduled",
                    InitialMethod::Export => "export",
                    InitialMethod::ExistingCopy => "existing-copy",
                }
                .to_string(),
            ),
            E::CycleAcknowledged { kind } | E::CycleFailed { kind } => Some(
                match kind {
                    CycleKind::Initial => "initial",
                    CycleKind::Delta => "delta",
                    CycleKind::Resync => "resync",
                }
                .to_string(),
            ),
            E::Resumed { initial_done } => Some(
                if *initial_done {
                    "initial-done"
                } else {
                    "no-log-yet"
                }
                .to_string(),
            ),
            E::ReverseReplicationStarted { start } => Some(
                match start {
                    ReverseStart::CommonPoint => "common-point",
                    ReverseStart::Resynchronize => "resynchronize",
                    ReverseStart::FullCopy => "full-copy",
                }
                .to_string(),
            ),
            _ => None,
        };
        match detail {
            Some(d) => format!("{}({d})", e.name()),
            None => e.name().to_string(),
        }
    }

    fn replica_label(e: &ReplicaEvent) -> String {
        use ReplicaEvent as E;
        let detail = match e {
            E::ReplicaCreated { holds_point } => {
                Some(if *holds_point { "at-point" } else { "empty" })
            }
            E::NoLogPending { initial_done } => Some(if *initial_done {
                "initial-done"
            } else {
                "no-log-yet"
            }),
            E::ApplyFailed { needs_resync } => Some(if *needs_resync {
                "needs-resync"
            } else {
                "retried"
            }),
            E::FailoverStarted { planned } => Some(if *planned { "planned" } else { "unplanned" }),
            _ => None,
        };
        match detail {
            Some(d) => format!("{}({d})", e.name()),
            None => e.name().to_string(),
        }
    }

    /// The primary's table, written by hand: one row per event, one column per state (in the
    /// order of `CODES`); `--` is a refusal. docs/design/states.md draws the same table.
    const PRIMARY_TABLE: &[&str] = &[
        //                                   NE RI WI IP RE SC FW FO SU ER RR RS
        "enabled(network)                    WI -- -- -- -- -- -- -- -- -- -- --",
        "enabled(scheduled)                  RI -- -- -- -- -- -- -- -- -- -- --",
        "enabled(export)                     WI -- -- -- -- -- -- -- -- -- -- --",
        "enabled(existing-copy)              RS -- -- -- -- -- -- -- -- -- -- --",
        "initial-replication-started         -- IP IP -- -- -- -- -- -- -- -- --",
        "initial-copy-exported               -- -- -- WI -- -- -- -- SU -- -- --",
        "initial-copy-imported               -- -- RE -- -- -- -- -- SU -- -- --",
        "cycle-acknowledged(initial)         -- -- RE RE RE -- -- -- SU RE -- RS",
        "cycle-acknowledged(delta)           -- -- -- -- RE -- -- -- SU RE -- RS",
        "cycle-acknowledged(resync)          -- -- RE -- RE -- -- -- SU RE -- RE",
        "cycle-failed(initial)               -- WI WI WI RE -- -- -- SU ER RR RS",
        "cycle-failed(delta)                 -- -- -- -- RE -- -- -- SU ER RR RS",
        "cycle-failed(resync)                -- -- WI -- RE -- -- -- SU ER RR RR",
        "tracking-lost                       -- -- RR RR RR -- -- -- RR RR RR RR",
        "out-of-order-refused                -- -- RR RR RR -- -- -- RR RR RR RR",
        "paused                              -- SU SU SU SU -- -- -- SU SU -- --",
        "resumed(initial-done)               -- -- -- -- -- -- -- -- RE -- -- --",
        "resumed(no-log-yet)                 -- -- -- -- -- -- -- -- WI -- -- --",
        "resynchronization-requested         -- -- -- -- -- -- -- -- RS -- RS RS",
        "prepared-for-failover               -- -- -- -- SC SC -- -- -- -- -- --",
        "prepare-cancelled                   -- -- -- -- -- RE -- -- -- -- -- --",
        "reverse-replication-started(common-point)  RE -- -- -- -- -- -- -- -- -- -- --",
        "reverse-replication-started(resynchronize) RS -- -- -- -- -- -- -- -- -- -- --",
        "reverse-replication-started(full-copy)     WI -- -- -- -- -- -- -- -- -- -- --",
        "reverse-replication-accepted        -- NE NE NE NE NE -- -- NE NE NE NE",
        "removed                             -- NE NE NE NE -- NE NE NE NE NE NE",
        "daemon-restarted                    -- RI WI WI RE SC -- -- SU ER RR RS",
    ];

    /// The replica's table, as [`PRIMARY_TABLE`].
    const REPLICA_TABLE: &[&str] = &[
        //                                   NE RI WI IP RE SC FW FO SU ER RR RS
        "replica-created(empty)              WI -- -- -- -- -- -- -- -- -- -- --",
        "replica-created(at-point)           RE -- -- -- -- -- -- -- -- -- -- --",
        "log-applied                         -- -- RE -- RE -- -- -- -- RE RE --",
        "no-log-pending(initial-done)        -- -- RE -- RE -- -- -- -- RE RR --",
        "no-log-pending(no-log-yet)          -- -- WI -- WI -- -- -- -- WI RR --",
        "apply-failed(needs-resync)          -- -- RR -- RR -- -- -- -- RR RR --",
        "apply-failed(retried)               -- -- ER -- ER -- -- -- -- ER RR --",
        "out-of-order-refused                -- -- RR -- RR -- -- -- -- RR RR --",
        "failover-started(planned)           -- -- -- -- FO -- -- -- -- -- -- --",
        "failover-started(unplanned)         -- -- -- -- FW -- -- -- -- FW FW --",
        "failover-completed                  -- -- -- -- -- -- FO FO -- -- -- --",
        "failover-cancelled                  -- -- -- -- -- -- RE -- -- -- -- --",
        "test-failover-started               -- -- -- -- RE -- -- -- -- ER RR --",
        "test-failover-stopped               -- -- WI -- RE -- FW FO -- ER RR --",
        "reverse-replication-started         -- -- -- -- -- -- -- NE -- -- -- --",
        "removed                             -- NE NE NE NE NE -- -- NE NE NE NE",
    ];

    /// Checks `f` against `table` for every (state, event) pair; every event must have
    /// exactly one row. Returns every difference, to be read at once.
    fn check_table<E>(
        table: &[&str],
        events: &[E],
        label: impl Fn(&E) -> String,
        f: impl Fn(ReplicationState, &E) -> Result<ReplicationState, Refusal>,
    ) -> Vec<String> {
        let mut rows: HashMap<String, Vec<Option<ReplicationState>>> = HashMap::new();
        for line in table {
            let mut cells = line.split_whitespace();
            let name = cells.next().unwrap().to_string();
            let cols: Vec<Option<ReplicationState>> = cells
                .map(|c| match c {
                    "--" => None,
                    c => Some(from_code(c).unwrap_or_else(|| panic!("bad code {c} in {line}"))),
                })
                .collect();
            assert_eq!(cols.len(), 12, "row {name} needs 12 columns");
            assert!(
                rows.insert(name.clone(), cols).is_none(),
                "row {name} twice"
            );
        }
        let mut diffs = Vec::new();
        let mut seen = HashSet::new();
        for e in events {
            let l = label(e);
            seen.insert(l.clone());
            let Some(row) = rows.get(&l) else {
                diffs.push(format!("no row for {l}"));
                continue;
            };
            for (i, s) in ALL_STATES.iter().enumerate() {
                let got = f(*s, e).ok();
                if got != row[i] {
                    diffs.push(format!(
                        "{l} in {}: table says {}, code says {}",
                        code(*s),
                        row[i].map_or("--", code),
                        got.map_or("--", code)
                    ));
                }
            }
        }
        for name in rows.keys() {
            if !seen.contains(name) {
                diffs.push(format!("row {name} names no event"));
            }
        }
        diffs
    }

    #[test]
    fn the_primary_follows_its_table_for_every_state_and_event() {
        let diffs = check_table(
            PRIMARY_TABLE,
            &PrimaryEvent::every(),
            primary_label,
            on_primary,
        );
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    }

    #[test]
    fn the_replica_follows_its_table_for_every_state_and_event() {
        let diffs = check_table(
            REPLICA_TABLE,
            &ReplicaEvent::every(),
            replica_label,
            on_replica,
        );
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    }

    /// Each variant's index; adding a variant breaks this match, and the test below then
    /// wants it in `every()` (and so in the tables).
    fn primary_variant(e: &PrimaryEvent) -> usize {
        use PrimaryEvent as E;
        match e {
            E::Enabled { .. } => 0,
            E::InitialReplicationStarted => 1,
            E::InitialCopyExported => 2,
            E::InitialCopyImported => 3,
            E::CycleAcknowledged { .. } => 4,
            E::CycleFailed { .. } => 5,
            E::TrackingLost => 6,
            E::OutOfOrderRefused => 7,
            E::Paused => 8,
            E::Resumed { .. } => 9,
            E::ResynchronizationRequested => 10,
            E::PreparedForFailover => 11,
            E::PrepareCancelled => 12,
            E::ReverseReplicationStarted { .. } => 13,
            E::ReverseReplicationAccepted => 14,
            E::Removed => 15,
            E::DaemonRestarted => 16,
        }
    }

    fn replica_variant(e: &ReplicaEvent) -> usize {
        use ReplicaEvent as E;
        match e {
            E::ReplicaCreated { .. } => 0,
            E::LogApplied => 1,
            E::NoLogPending { .. } => 2,
            E::ApplyFailed { .. } => 3,
            E::OutOfOrderRefused => 4,
            E::FailoverStarted { .. } => 5,
            E::FailoverCompleted => 6,
            E::FailoverCancelled => 7,
            E::TestFailoverStarted => 8,
            E::TestFailoverStopped => 9,
            E::ReverseReplicationStarted => 10,
            E::Removed => 11,
        }
    }

    #[test]
    fn every_event_variant_and_payload_is_listed_once() {
        let p = PrimaryEvent::every();
        let variants: HashSet<usize> = p.iter().map(primary_variant).collect();
        assert_eq!(variants, (0..17).collect());
        assert_eq!(p.iter().collect::<HashSet<_>>().len(), p.len());
        assert_eq!(p.len(), PRIMARY_TABLE.len());
        let r = ReplicaEvent::every();
        let variants: HashSet<usize> = r.iter().map(replica_variant).collect();
        assert_eq!(variants, (0..12).collect());
        assert_eq!(r.iter().collect::<HashSet<_>>().len(), r.len());
        assert_eq!(r.len(), REPLICA_TABLE.len());
    }

    #[test]
    fn event_names_are_the_stable_kebab_case_ones_recorded_in_the_database() {
        // These strings are stored in `transitions.event`: changing one is a migration.
        let mut p: Vec<&str> = PrimaryEvent::every().iter().map(|e| e.name()).collect();
        p.dedup();
        assert_eq!(
            p,
            [
                "enabled",
                "initial-replication-started",
                "initial-copy-exported",
                "initial-copy-imported",
                "cycle-acknowledged",
                "cycle-failed",
                "tracking-lost",
                "out-of-order-refused",
                "paused",
                "resumed",
                "resynchronization-requested",
                "prepared-for-failover",
                "prepare-cancelled",
                "reverse-replication-started",
                "reverse-replication-accepted",
                "removed",
                "daemon-restarted",
            ]
        );
        let mut r: Vec<&str> = ReplicaEvent::every().iter().map(|e| e.name()).collect();
        r.dedup();
        assert_eq!(
            r,
            [
                "replica-created",
                "log-applied",
                "no-log-pending",
                "apply-failed",
                "out-of-order-refused",
                "failover-started",
                "failover-completed",
                "failover-cancelled",
                "test-failover-started",
                "test-failover-stopped",
                "reverse-replication-started",
                "removed",
            ]
        );
        for n in p.iter().chain(&r) {
            assert!(
                n.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                    && !n.starts_with('-')
                    && !n.ends_with('-')
                    && !n.contains("--"),
                "{n} is not kebab-case"
            );
        }
    }

    /// Every state some sequence of events reaches from `start`.
    fn reachable<E>(
        start: ReplicationState,
        events: &[E],
        f: impl Fn(ReplicationState, &E) -> Result<ReplicationState, Refusal>,
    ) -> HashSet<ReplicationState> {
        let mut seen = HashSet::from([start]);
        let mut todo = vec![start];
        while let Some(s) = todo.pop() {
            for e in events {
                if let Ok(n) = f(s, e) {
                    if seen.insert(n) {
                        todo.push(n);
                    }
                }
            }
        }
        seen
    }

    #[test]
    fn a_primary_reaches_only_primary_states_and_all_of_them_but_error() {
        let got = reachable(S::NotEnabled, &PrimaryEvent::every(), on_primary);
        let listed: HashSet<_> = primary_states().iter().copied().collect();
        assert!(got.is_subset(&listed), "{got:?}");
        // Error is only what an unreadable stored state reads back as.
        let mut want = listed;
        want.remove(&S::Error);
        assert_eq!(got, want);
    }

    #[test]
    fn a_replica_reaches_only_replica_states_and_all_of_them() {
        let got = reachable(S::NotEnabled, &ReplicaEvent::every(), on_replica);
        let listed: HashSet<_> = replica_states().iter().copied().collect();
        assert_eq!(got, listed);
    }

    #[test]
    fn no_event_takes_either_role_into_the_other_roles_states_from_anywhere() {
        let primary: HashSet<_> = primary_states().iter().copied().collect();
        let replica: HashSet<_> = replica_states().iter().copied().collect();
        for s in ALL_STATES {
            for e in PrimaryEvent::every() {
                if let Ok(n) = on_primary(s, &e) {
                    assert!(primary.contains(&n), "{s:?} --{}--> {n:?}", e.name());
                }
            }
            for e in ReplicaEvent::every() {
                if let Ok(n) = on_replica(s, &e) {
                    assert!(replica.contains(&n), "{s:?} --{}--> {n:?}", e.name());
                }
            }
        }
    }

    #[test]
    fn states_of_the_other_role_only_allow_removal() {
        for s in ALL_STATES {
            if !primary_states().contains(&s) {
                for e in PrimaryEvent::every() {
                    let r = on_primary(s, &e);
                    assert_eq!(r.is_ok(), e == PrimaryEvent::Removed, "{s:?} {}", e.name());
                }
            }
            if !replica_states().contains(&s) {
                for e in ReplicaEvent::every() {
                    let r = on_replica(s, &e);
                    assert_eq!(r.is_ok(), e == ReplicaEvent::Removed, "{s:?} {}", e.name());
                }
            }
        }
    }

    #[test]
    fn refusals_are_sentences_naming_the_event_the_state_and_a_way_out() {
        let mut refusals = Vec::new();
        for s in ALL_STATES {
            refusals.extend(
                PrimaryEvent::every()
                    .iter()
                    .filter_map(|e| on_primary(s, e).err()),
            );
            refusals.extend(
                ReplicaEvent::every()
                    .iter()
                    .filter_map(|e| on_replica(s, e).err()),
            );
        }
        assert!(refusals.len() > 200, "{}", refusals.len());
        for r in refusals {
            let msg = r.to_string();
            assert!(msg.starts_with(r.action), "{msg}");
            assert!(msg.contains(&format!("\"{}\"", r.state)), "{msg}");
            assert!(msg.ends_with('.'), "{msg}");
            assert!(
                r.reason.starts_with(|c: char| c.is_lowercase()),
                "the reason follows a colon: {msg}"
            );
            assert!(msg.matches(". ").count() == 0, "one sentence: {msg}");
        }
    }

    #[test]
    fn a_refusal_reads_as_one_sentence_with_its_remedy() {
        let r = on_primary(S::SyncedReplicationComplete, &PrimaryEvent::Paused).unwrap_err();
        assert_eq!(r.event, "paused");
        assert_eq!(r.role, Role::Primary);
        assert_eq!(
            r.to_string(),
            "Pausing replication is refused on the primary in state \"Prepared for planned \
             failover\": the VM is prepared for a planned failover and nothing moves until that \
             is cancelled (`failover cancel` on this host) or the replica fails over."
        );
    }

    // ---------------------------------------------------------------- primary rules

    #[test]
    fn the_initial_method_chooses_the_first_state() {
        let first = |i: InitialReplication| {
            on_primary(
                S::NotEnabled,
                &PrimaryEvent::Enabled {
                    initial: InitialMethod::from(&i),
                },
            )
            .unwrap()
        };
        assert_eq!(
            first(InitialReplication::NetworkNow),
            S::WaitingForInitialReplication
        );
        assert_eq!(
            first(InitialReplication::NetworkAt { unix_secs: 1 }),
            S::ReadyForInitialReplication
        );
        assert_eq!(
            first(InitialReplication::Export {
                folder: "/media".into()
            }),
            S::WaitingForInitialReplication
        );
        // The existing copy is brought up to date by block compare from sequence 0.
        assert_eq!(first(InitialReplication::ExistingCopy), S::Resynchronizing);
    }

    #[test]
    fn enabling_or_reversing_onto_an_existing_relationship_is_refused() {
        for s in primary_states().iter().filter(|s| **s != S::NotEnabled) {
            let e = PrimaryEvent::Enabled {
                initial: InitialMethod::Network,
            };
            let r = on_primary(*s, &e).unwrap_err();
            assert!(r.reason.contains("remove it first"), "{r}");
            let rev = PrimaryEvent::ReverseReplicationStarted {
                start: ReverseStart::CommonPoint,
            };
            assert!(on_primary(*s, &rev).is_err());
        }
    }

    #[test]
    fn an_initial_copy_goes_through_in_progress_to_replicating() {
        let mut s = S::NotEnabled;
        for e in [
            PrimaryEvent::Enabled {
                initial: InitialMethod::Scheduled,
            },
            PrimaryEvent::InitialReplicationStarted,
            PrimaryEvent::CycleAcknowledged {
                kind: CycleKind::Initial,
            },
        ] {
            s = on_primary(s, &e).unwrap();
        }
        assert_eq!(s, S::Replicating);
    }

    #[test]
    fn an_exported_copy_waits_for_its_import_then_replicates() {
        let s = on_primary(
            S::InitialReplicationInProgress,
            &PrimaryEvent::InitialCopyExported,
        )
        .unwrap();
        assert_eq!(s, S::WaitingForInitialReplication);
        // A failed look at the replica changes nothing; the import does.
        let s = on_primary(
            s,
            &PrimaryEvent::CycleFailed {
                kind: CycleKind::Initial,
            },
        )
        .unwrap();
        assert_eq!(s, S::WaitingForInitialReplication);
        assert_eq!(
            on_primary(s, &PrimaryEvent::InitialCopyImported).unwrap(),
            S::Replicating
        );
        assert!(on_primary(S::Replicating, &PrimaryEvent::InitialCopyImported).is_err());
    }

    #[test]
    fn a_failed_scheduled_initial_copy_waits_an_interval_instead_of_retrying_at_once() {
        let e = PrimaryEvent::CycleFailed {
            kind: CycleKind::Initial,
        };
        // Before the copy started (the replica unreachable at the set time) and after.
        assert_eq!(
            on_primary(S::ReadyForInitialReplication, &e).unwrap(),
            S::WaitingForInitialReplication
        );
        assert_eq!(
            on_primary(S::InitialReplicationInProgress, &e).unwrap(),
            S::WaitingForInitialReplication
        );
    }

    #[test]
    fn a_delta_is_never_acknowledged_or_failed_during_initial_replication() {
        for s in [
            S::ReadyForInitialReplication,
            S::WaitingForInitialReplication,
            S::InitialReplicationInProgress,
        ] {
            for e in [
                PrimaryEvent::CycleAcknowledged {
                    kind: CycleKind::Delta,
                },
                PrimaryEvent::CycleFailed {
                    kind: CycleKind::Delta,
                },
            ] {
                assert!(on_primary(s, &e).is_err(), "{s:?} {e:?}");
            }
        }
    }

    #[test]
    fn a_daemon_restart_sends_an_interrupted_initial_copy_back_to_waiting_and_nothing_else_moves() {
        for s in primary_states() {
            let r = on_primary(*s, &PrimaryEvent::DaemonRestarted);
            match s {
                S::NotEnabled => assert!(r.is_err()),
                S::InitialReplicationInProgress => {
                    assert_eq!(r.unwrap(), S::WaitingForInitialReplication)
                }
                other => assert_eq!(r.unwrap(), *other),
            }
        }
    }

    #[test]
    fn a_cycle_failure_never_leaves_resynchronization_required() {
        for kind in CycleKind::ALL {
            assert_eq!(
                on_primary(
                    S::ResynchronizationRequired,
                    &PrimaryEvent::CycleFailed { kind }
                )
                .unwrap(),
                S::ResynchronizationRequired
            );
        }
        // Nothing but a resynchronization (or the end of the relationship) leaves it.
        for e in PrimaryEvent::every() {
            if let Ok(n) = on_primary(S::ResynchronizationRequired, &e) {
                assert!(
                    matches!(
                        n,
                        S::ResynchronizationRequired | S::Resynchronizing | S::NotEnabled
                    ),
                    "{} leads to {n:?}",
                    e.name()
                );
            }
        }
    }

    #[test]
    fn a_resynchronization_that_fails_is_required_again_and_one_that_succeeds_replicates() {
        let failed = PrimaryEvent::CycleFailed {
            kind: CycleKind::Resync,
        };
        assert_eq!(
            on_primary(S::Resynchronizing, &failed).unwrap(),
            S::ResynchronizationRequired
        );
        let acked = PrimaryEvent::CycleAcknowledged {
            kind: CycleKind::Resync,
        };
        assert_eq!(
            on_primary(S::Resynchronizing, &acked).unwrap(),
            S::Replicating
        );
    }

    #[test]
    fn a_delta_that_ends_after_a_resynchronization_was_asked_keeps_it_pending() {
        for e in [
            PrimaryEvent::CycleAcknowledged {
                kind: CycleKind::Delta,
            },
            PrimaryEvent::CycleFailed {
                kind: CycleKind::Delta,
            },
        ] {
            assert_eq!(
                on_primary(S::Resynchronizing, &e).unwrap(),
                S::Resynchronizing
            );
        }
    }

    #[test]
    fn lost_tracking_or_a_log_refused_out_of_order_requires_resynchronization_wherever_a_log_was_sent(
    ) {
        for e in [PrimaryEvent::TrackingLost, PrimaryEvent::OutOfOrderRefused] {
            for s in [
                S::WaitingForInitialReplication,
                S::InitialReplicationInProgress,
                S::Replicating,
                S::Suspended,
                S::Error,
                S::ResynchronizationRequired,
                S::Resynchronizing,
            ] {
                assert_eq!(
                    on_primary(s, &e).unwrap(),
                    S::ResynchronizationRequired,
                    "{s:?}"
                );
            }
        }
    }

    #[test]
    fn pause_is_refused_while_prepared_for_planned_failover() {
        let r = on_primary(S::SyncedReplicationComplete, &PrimaryEvent::Paused).unwrap_err();
        assert!(r.reason.contains("failover cancel"), "{r}");
    }

    #[test]
    fn pause_is_refused_while_resynchronization_is_required_or_running() {
        let r = on_primary(S::ResynchronizationRequired, &PrimaryEvent::Paused).unwrap_err();
        assert!(r.reason.contains("--resynchronize"), "{r}");
        assert!(on_primary(S::Resynchronizing, &PrimaryEvent::Paused).is_err());
    }

    #[test]
    fn pausing_twice_is_harmless() {
        let s = on_primary(S::Replicating, &PrimaryEvent::Paused).unwrap();
        assert_eq!(s, S::Suspended);
        assert_eq!(on_primary(s, &PrimaryEvent::Paused).unwrap(), S::Suspended);
    }

    #[test]
    fn a_cycle_that_ends_while_paused_leaves_replication_paused() {
        for kind in CycleKind::ALL {
            for e in [
                PrimaryEvent::CycleAcknowledged { kind },
                PrimaryEvent::CycleFailed { kind },
            ] {
                assert_eq!(on_primary(S::Suspended, &e).unwrap(), S::Suspended);
            }
        }
        assert_eq!(
            on_primary(S::Suspended, &PrimaryEvent::InitialCopyExported).unwrap(),
            S::Suspended
        );
    }

    #[test]
    fn resume_goes_back_to_initial_replication_when_no_log_was_acknowledged() {
        assert_eq!(
            on_primary(
                S::Suspended,
                &PrimaryEvent::Resumed {
                    initial_done: false
                }
            )
            .unwrap(),
            S::WaitingForInitialReplication
        );
        assert_eq!(
            on_primary(S::Suspended, &PrimaryEvent::Resumed { initial_done: true }).unwrap(),
            S::Replicating
        );
    }

    #[test]
    fn plain_resume_is_refused_when_resynchronization_is_required_and_names_the_flag() {
        let r = on_primary(
            S::ResynchronizationRequired,
            &PrimaryEvent::Resumed { initial_done: true },
        )
        .unwrap_err();
        assert!(r.reason.contains("--resynchronize"), "{r}");
        let r = on_primary(
            S::Replicating,
            &PrimaryEvent::Resumed { initial_done: true },
        )
        .unwrap_err();
        assert!(r.reason.contains("not paused"), "{r}");
    }

    #[test]
    fn resynchronization_is_asked_of_a_paused_or_resync_required_relationship_as_in_hyper_v() {
        let e = PrimaryEvent::ResynchronizationRequested;
        assert_eq!(on_primary(S::Suspended, &e).unwrap(), S::Resynchronizing);
        assert_eq!(
            on_primary(S::ResynchronizationRequired, &e).unwrap(),
            S::Resynchronizing
        );
        assert_eq!(
            on_primary(S::Resynchronizing, &e).unwrap(),
            S::Resynchronizing
        );
        let r = on_primary(S::Replicating, &e).unwrap_err();
        assert!(r.reason.contains("pause"), "{r}");
    }

    #[test]
    fn prepare_needs_replication_running_and_repeating_it_is_harmless() {
        let e = PrimaryEvent::PreparedForFailover;
        let s = on_primary(S::Replicating, &e).unwrap();
        assert_eq!(s, S::SyncedReplicationComplete);
        assert_eq!(on_primary(s, &e).unwrap(), s);
        for s in primary_states() {
            if !matches!(s, S::Replicating | S::SyncedReplicationComplete) {
                assert!(on_primary(*s, &e).is_err(), "{s:?}");
            }
        }
    }

    #[test]
    fn cancelling_a_prepare_replicates_again_and_nothing_else_can_be_cancelled() {
        let e = PrimaryEvent::PrepareCancelled;
        assert_eq!(
            on_primary(S::SyncedReplicationComplete, &e).unwrap(),
            S::Replicating
        );
        for s in primary_states() {
            if *s != S::SyncedReplicationComplete {
                assert!(on_primary(*s, &e).is_err(), "{s:?}");
            }
        }
    }

    #[test]
    fn no_cycle_moves_a_relationship_prepared_for_planned_failover() {
        for e in PrimaryEvent::every() {
            if matches!(
                e,
                PrimaryEvent::CycleAcknowledged { .. }
                    | PrimaryEvent::CycleFailed { .. }
                    | PrimaryEvent::TrackingLost
                    | PrimaryEvent::OutOfOrderRefused
            ) {
                assert!(on_primary(S::SyncedReplicationComplete, &e).is_err());
            }
        }
    }

    #[test]
    fn removing_a_prepared_relationship_is_refused_until_the_prepare_is_cancelled() {
        let r = on_primary(S::SyncedReplicationComplete, &PrimaryEvent::Removed).unwrap_err();
        assert!(r.reason.contains("locked against starting"), "{r}");
        let s = on_primary(
            S::SyncedReplicationComplete,
            &PrimaryEvent::PrepareCancelled,
        )
        .unwrap();
        assert_eq!(
            on_primary(s, &PrimaryEvent::Removed).unwrap(),
            S::NotEnabled
        );
    }

    #[test]
    fn reverse_replication_starts_where_the_old_primarys_copy_allows() {
        let at = |start| {
            on_primary(
                S::NotEnabled,
                &PrimaryEvent::ReverseReplicationStarted { start },
            )
            .unwrap()
        };
        assert_eq!(at(ReverseStart::CommonPoint), S::Replicating);
        assert_eq!(at(ReverseStart::Resynchronize), S::Resynchronizing);
        assert_eq!(at(ReverseStart::FullCopy), S::WaitingForInitialReplication);
    }

    #[test]
    fn the_old_primary_hands_its_relationship_over_to_a_reverse_from_any_state() {
        for s in primary_states() {
            let r = on_primary(*s, &PrimaryEvent::ReverseReplicationAccepted);
            if *s == S::NotEnabled {
                assert!(r.is_err());
            } else {
                assert_eq!(r.unwrap(), S::NotEnabled, "{s:?}");
            }
        }
    }

    // ---------------------------------------------------------------- replica rules

    #[test]
    fn a_replica_that_failed_over_accepts_no_log() {
        for s in [S::FailedOverWaitingCompletion, S::FailedOver] {
            for e in [
                ReplicaEvent::LogApplied,
                ReplicaEvent::NoLogPending { initial_done: true },
                ReplicaEvent::ApplyFailed { needs_resync: true },
                ReplicaEvent::OutOfOrderRefused,
            ] {
                let r = on_replica(s, &e).unwrap_err();
                assert!(r.reason.contains("takes no more logs"), "{r}");
            }
        }
    }

    #[test]
    fn a_replica_waits_for_initial_replication_until_a_log_is_applied() {
        let s = on_replica(
            S::NotEnabled,
            &ReplicaEvent::ReplicaCreated { holds_point: false },
        )
        .unwrap();
        assert_eq!(s, S::WaitingForInitialReplication);
        let r = on_replica(s, &ReplicaEvent::FailoverStarted { planned: false }).unwrap_err();
        assert!(r.reason.contains("no recovery point"), "{r}");
        let s = on_replica(s, &ReplicaEvent::LogApplied).unwrap();
        assert_eq!(s, S::Replicating);
        // Disks adopted at a failover point are a recovery point already.
        assert_eq!(
            on_replica(
                S::NotEnabled,
                &ReplicaEvent::ReplicaCreated { holds_point: true }
            )
            .unwrap(),
            S::Replicating
        );
    }

    #[test]
    fn a_planned_failover_completes_at_once_and_an_unplanned_one_waits() {
        assert_eq!(
            on_replica(
                S::Replicating,
                &ReplicaEvent::FailoverStarted { planned: true }
            )
            .unwrap(),
            S::FailedOver
        );
        let s = on_replica(
            S::Replicating,
            &ReplicaEvent::FailoverStarted { planned: false },
        )
        .unwrap();
        assert_eq!(s, S::FailedOverWaitingCompletion);
        assert_eq!(
            on_replica(s, &ReplicaEvent::FailoverCompleted).unwrap(),
            S::FailedOver
        );
        assert_eq!(
            on_replica(s, &ReplicaEvent::FailoverCancelled).unwrap(),
            S::Replicating
        );
    }

    #[test]
    fn an_unplanned_failover_is_allowed_while_resynchronization_is_required_a_planned_one_is_not() {
        assert_eq!(
            on_replica(
                S::ResynchronizationRequired,
                &ReplicaEvent::FailoverStarted { planned: false }
            )
            .unwrap(),
            S::FailedOverWaitingCompletion
        );
        assert!(on_replica(
            S::ResynchronizationRequired,
            &ReplicaEvent::FailoverStarted { planned: true }
        )
        .is_err());
        assert!(on_replica(S::Error, &ReplicaEvent::FailoverStarted { planned: true }).is_err());
    }

    #[test]
    fn a_completed_failover_cannot_be_cancelled_and_completing_twice_is_harmless() {
        let r = on_replica(S::FailedOver, &ReplicaEvent::FailoverCancelled).unwrap_err();
        assert!(r.reason.contains("cannot be cancelled"), "{r}");
        assert_eq!(
            on_replica(S::FailedOver, &ReplicaEvent::FailoverCompleted).unwrap(),
            S::FailedOver
        );
    }

    #[test]
    fn a_second_failover_is_refused_until_the_first_is_completed_or_cancelled() {
        for planned in [true, false] {
            let e = ReplicaEvent::FailoverStarted { planned };
            let r = on_replica(S::FailedOverWaitingCompletion, &e).unwrap_err();
            assert!(r.reason.contains("complete"), "{r}");
            assert!(on_replica(S::FailedOver, &e).is_err());
        }
    }

    #[test]
    fn reverse_replication_follows_a_completed_failover_and_ends_the_replica() {
        let e = ReplicaEvent::ReverseReplicationStarted;
        let r = on_replica(S::FailedOverWaitingCompletion, &e).unwrap_err();
        assert!(r.reason.contains("failover complete"), "{r}");
        assert_eq!(on_replica(S::FailedOver, &e).unwrap(), S::NotEnabled);
        assert!(on_replica(S::Replicating, &e).is_err());
    }

    #[test]
    fn resynchronization_required_on_a_replica_ends_only_when_a_log_applies() {
        let s = on_replica(S::Replicating, &ReplicaEvent::OutOfOrderRefused).unwrap();
        assert_eq!(s, S::ResynchronizationRequired);
        // The primary asking what this host holds proves nothing.
        for initial_done in [true, false] {
            assert_eq!(
                on_replica(s, &ReplicaEvent::NoLogPending { initial_done }).unwrap(),
                s
            );
        }
        assert_eq!(
            on_replica(s, &ReplicaEvent::LogApplied).unwrap(),
            S::Replicating
        );
    }

    #[test]
    fn an_apply_error_never_downgrades_resynchronization_required_to_error() {
        for needs_resync in [true, false] {
            assert_eq!(
                on_replica(
                    S::ResynchronizationRequired,
                    &ReplicaEvent::ApplyFailed { needs_resync }
                )
                .unwrap(),
                S::ResynchronizationRequired
            );
        }
        assert_eq!(
            on_replica(
                S::Replicating,
                &ReplicaEvent::ApplyFailed {
                    needs_resync: false
                }
            )
            .unwrap(),
            S::Error
        );
    }

    #[test]
    fn an_apply_error_clears_once_nothing_is_left_to_apply() {
        assert_eq!(
            on_replica(S::Error, &ReplicaEvent::NoLogPending { initial_done: true }).unwrap(),
            S::Replicating
        );
        assert_eq!(
            on_replica(
                S::Error,
                &ReplicaEvent::NoLogPending {
                    initial_done: false
                }
            )
            .unwrap(),
            S::WaitingForInitialReplication
        );
    }

    #[test]
    fn test_failover_keeps_the_state_and_needs_a_recovery_point() {
        for s in [S::Replicating, S::Error, S::ResynchronizationRequired] {
            assert_eq!(
                on_replica(s, &ReplicaEvent::TestFailoverStarted).unwrap(),
                s
            );
            assert_eq!(
                on_replica(s, &ReplicaEvent::TestFailoverStopped).unwrap(),
                s
            );
        }
        assert!(on_replica(
            S::WaitingForInitialReplication,
            &ReplicaEvent::TestFailoverStarted
        )
        .is_err());
        assert!(on_replica(S::FailedOver, &ReplicaEvent::TestFailoverStarted).is_err());
        // A test VM left running across a failover can still be stopped.
        assert_eq!(
            on_replica(S::FailedOver, &ReplicaEvent::TestFailoverStopped).unwrap(),
            S::FailedOver
        );
    }

    #[test]
    fn the_primary_cannot_remove_a_replica_that_failed_over() {
        for s in [S::FailedOverWaitingCompletion, S::FailedOver] {
            let r = on_replica(s, &ReplicaEvent::Removed).unwrap_err();
            assert!(r.reason.contains("no longer owns it"), "{r}");
        }
        assert_eq!(
            on_replica(S::Replicating, &ReplicaEvent::Removed).unwrap(),
            S::NotEnabled
        );
    }

    #[test]
    fn creating_a_replica_twice_is_refused() {
        for s in replica_states().iter().filter(|s| **s != S::NotEnabled) {
            for holds_point in [true, false] {
                assert!(on_replica(*s, &ReplicaEvent::ReplicaCreated { holds_point }).is_err());
            }
        }
    }
}
