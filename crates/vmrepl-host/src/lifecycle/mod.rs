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

use vmrepl_types::replication::{ReplicationState, Role};

pub mod codes;
mod events;
mod primary;
mod replica;
#[cfg(test)]
mod tests;

pub use events::*;
pub use primary::on_primary;
pub use replica::on_replica;

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
/// replication (the primary drives it), never prepared for a planned failover and never
/// paused (vmrepl has no pause on the replica). It is resynchronizing between the parts of a
/// resynchronization in parts, when its latest state is not a point.
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
        S::Resynchronizing,
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
