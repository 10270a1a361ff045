//! The stable numbers and severities of the events in a host's journal (`vmrepl events`): one
//! per state-machine event and role, and one for notes. Scripts and alert rules use the
//! numbers, so they are never reused or renumbered; a new event gets the next free one.
//! `docs/events.md` lists them.

use vmrepl_types::api::Severity;
use vmrepl_types::replication::Role;

/// An entry of the journal that is not a state change: a VM created, a replica's networks set,
/// a disk edited while its VM was off, ...
pub const NOTE: u32 = 9000;
/// A primary-side event this release does not know by name (from a newer release's database).
pub const PRIMARY_OTHER: u32 = 1999;
/// A replica-side event this release does not know by name.
pub const REPLICA_OTHER: u32 = 2999;

use Severity::{Error as E, Info as I, Warning as W};

/// Primary-side events (the host the VM runs on): 1001-1998.
pub const PRIMARY: &[(&str, u32, Severity)] = &[
    ("enabled", 1001, I),
    ("initial-replication-started", 1002, I),
    ("initial-copy-exported", 1003, I),
    ("initial-copy-imported", 1004, I),
    ("cycle-acknowledged", 1005, I),
    ("cycle-failed", 1006, W),
    ("tracking-lost", 1007, E),
    ("out-of-order-refused", 1008, E),
    ("paused", 1009, W),
    ("resumed", 1010, I),
    ("resynchronization-requested", 1011, I),
    ("prepared-for-failover", 1012, I),
    ("prepare-cancelled", 1013, I),
    ("reverse-replication-started", 1014, I),
    ("reverse-replication-accepted", 1015, I),
    ("removed", 1016, I),
    ("daemon-restarted", 1017, I),
];

/// Replica-side events (the replica server): 2001-2998.
pub const REPLICA: &[(&str, u32, Severity)] = &[
    ("replica-created", 2001, I),
    ("log-applied", 2002, I),
    ("resync-part-applied", 2003, I),
    ("no-log-pending", 2004, I),
    ("apply-failed", 2005, E),
    ("out-of-order-refused", 2006, E),
    ("failover-started", 2007, W),
    ("failover-completed", 2008, I),
    ("failover-cancelled", 2009, I),
    ("test-failover-started", 2010, I),
    ("test-failover-stopped", 2011, I),
    ("reverse-replication-started", 2012, I),
    ("removed", 2013, I),
];

/// A primary relationship's health changed (journaled after a cycle): 1101 back to Normal,
/// 1102 Warning, 1103 Critical.
pub fn health_code(h: vmrepl_types::replication::Health) -> (u32, Severity) {
    use vmrepl_types::replication::Health;
    match h {
        Health::Normal | Health::NotApplicable => (1101, Severity::Info),
        Health::Warning => (1102, Severity::Warning),
        Health::Critical => (1103, Severity::Error),
    }
}

/// The code and severity of the state-machine event `name` of `role`.
pub fn code_of(role: Role, name: &str) -> (u32, Severity) {
    let (table, other) = match role {
        Role::Primary => (PRIMARY, PRIMARY_OTHER),
        Role::Replica | Role::TestReplica => (REPLICA, REPLICA_OTHER),
    };
    table
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, c, s)| (*c, *s))
        .unwrap_or((other, Severity::Warning))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{CycleKind, InitialMethod, PrimaryEvent, ReplicaEvent, ReverseStart};

    #[test]
    fn every_event_has_its_own_code_and_the_codes_never_move() {
        // Every event the state machines know, by its stable name.
        let primary = [
            PrimaryEvent::Enabled {
                initial: InitialMethod::Network,
            },
            PrimaryEvent::InitialReplicationStarted,
            PrimaryEvent::InitialCopyExported,
            PrimaryEvent::InitialCopyImported,
            PrimaryEvent::CycleAcknowledged {
                kind: CycleKind::Delta,
            },
            PrimaryEvent::CycleFailed {
                kind: CycleKind::Delta,
            },
            PrimaryEvent::TrackingLost,
            PrimaryEvent::OutOfOrderRefused,
            PrimaryEvent::Paused,
            PrimaryEvent::Resumed { initial_done: true },
            PrimaryEvent::ResynchronizationRequested,
            PrimaryEvent::PreparedForFailover,
            PrimaryEvent::PrepareCancelled,
            PrimaryEvent::ReverseReplicationStarted {
                start: ReverseStart::CommonPoint,
            },
            PrimaryEvent::ReverseReplicationAccepted,
            PrimaryEvent::Removed,
            PrimaryEvent::DaemonRestarted,
        ];
        for e in &primary {
            let (code, _) = code_of(Role::Primary, e.name());
            assert_ne!(code, PRIMARY_OTHER, "{} has no code", e.name());
        }
        let replica = [
            ReplicaEvent::ReplicaCreated { holds_point: false },
            ReplicaEvent::LogApplied,
            ReplicaEvent::NoLogPending { initial_done: true },
            ReplicaEvent::ApplyFailed {
                needs_resync: false,
            },
            ReplicaEvent::FailoverStarted { planned: true },
            ReplicaEvent::ResyncPartApplied,
            ReplicaEvent::OutOfOrderRefused,
            ReplicaEvent::FailoverCompleted,
            ReplicaEvent::FailoverCancelled,
            ReplicaEvent::TestFailoverStarted,
            ReplicaEvent::TestFailoverStopped,
            ReplicaEvent::ReverseReplicationStarted,
            ReplicaEvent::Removed,
        ];
        for e in &replica {
            let (code, _) = code_of(Role::Replica, e.name());
            assert_ne!(code, REPLICA_OTHER, "{} has no code", e.name());
        }
        for table in [PRIMARY, REPLICA] {
            let mut codes: Vec<u32> = table.iter().map(|(_, c, _)| *c).collect();
            codes.sort_unstable();
            codes.dedup();
            assert_eq!(codes.len(), table.len(), "a code is used twice");
        }
        for h in [
            vmrepl_types::replication::Health::Normal,
            vmrepl_types::replication::Health::Warning,
            vmrepl_types::replication::Health::Critical,
        ] {
            let (c, _) = health_code(h);
            assert!(
                PRIMARY.iter().all(|(_, p, _)| *p != c),
                "health code {c} taken"
            );
        }
        // A few pinned, as a reminder that these numbers are an interface.
        assert_eq!(code_of(Role::Primary, "enabled"), (1001, Severity::Info));
        assert_eq!(
            code_of(Role::Primary, "tracking-lost"),
            (1007, Severity::Error)
        );
        assert_eq!(
            code_of(Role::Replica, "apply-failed"),
            (2005, Severity::Error)
        );
        assert_eq!(
            code_of(Role::Replica, "something-new"),
            (REPLICA_OTHER, Severity::Warning)
        );
    }
}
