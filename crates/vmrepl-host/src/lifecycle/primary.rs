//! The primary's state machine: [`on_primary`].

use super::{CycleKind, InitialMethod, PrimaryEvent, Refusal, ReverseStart};
use vmrepl_types::replication::{ReplicationState, Role};

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
