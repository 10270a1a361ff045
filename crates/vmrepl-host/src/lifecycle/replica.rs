//! The replica's state machine: [`on_replica`].

use super::{Refusal, ReplicaEvent};
use vmrepl_types::replication::{ReplicationState, Role};

// Reasons shared by several arms (each names the state it is about and the way out).
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
            | E::ResyncPartApplied
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
            // A copy adopted at sequence 0 being brought up to date: not a point until it ends.
            E::ResyncPartApplied => Ok(state),
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
            E::ResyncPartApplied => Ok(S::Resynchronizing),
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
            E::ResyncPartApplied => Ok(S::Resynchronizing),
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
            E::ResyncPartApplied => Ok(S::Resynchronizing),
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
            | E::ResyncPartApplied
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
            | E::ResyncPartApplied
            | E::NoLogPending { .. }
            | E::ApplyFailed { .. }
            | E::OutOfOrderRefused => no(R_FAILED_OVER_NO_LOGS),
            E::FailoverStarted { .. } => no(R_FAILED_OVER),
            E::FailoverCancelled => no("the failover is complete and cannot be cancelled any more; fail back with reverse replication (`replication reverse`) and a planned failover instead."),
            E::TestFailoverStarted => no(R_TEST_NEEDS_REPLICA),
            E::Removed => no("the replica failed over, so its primary no longer owns it; reverse replication (`replication reverse`) replaces the relationship."),
        },

        S::Resynchronizing => match event {
            // The log after the last part makes the latest state whole again.
            E::LogApplied => Ok(S::Replicating),
            E::ResyncPartApplied => Ok(state),
            E::NoLogPending { initial_done } => Ok(settled(*initial_done)),
            E::ApplyFailed { needs_resync: true } | E::OutOfOrderRefused => {
                Ok(S::ResynchronizationRequired)
            }
            E::ApplyFailed {
                needs_resync: false,
            } => Ok(S::Error),
            // To a recovery point from before the resynchronization (the newest whole state
            // was kept as one when it began).
            E::FailoverStarted { planned: false } => Ok(S::FailedOverWaitingCompletion),
            E::TestFailoverStarted | E::TestFailoverStopped => Ok(state),
            E::Removed => Ok(S::NotEnabled),
            E::ReplicaCreated { .. } => no(R_ALREADY),
            E::FailoverStarted { planned: true } => no("a resynchronization of this replica is under way, so it does not hold the prepared point; let it finish, or fail over to a point from before it with `--point`."),
            E::FailoverCompleted | E::FailoverCancelled => no(R_NOT_FAILED_OVER),
            E::ReverseReplicationStarted => no("the VM has not failed over to this host; reverse replication follows a failover (`failover start`)."),
        },

        S::ReadyForInitialReplication
        | S::InitialReplicationInProgress
        | S::SyncedReplicationComplete
        | S::Suspended => match event {
            // Whatever the damage, the primary can always drop the replica.
            E::Removed => Ok(S::NotEnabled),
            E::ReplicaCreated { .. }
            | E::LogApplied
            | E::ResyncPartApplied
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
