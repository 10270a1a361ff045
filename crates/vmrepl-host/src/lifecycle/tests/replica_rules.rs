//! The replica's rules, one test each.

use super::*;

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

#[test]
fn only_failures_record_a_cause_and_only_a_daemon_restart_or_a_test_failover_keeps_the_last_one() {
    for e in PrimaryEvent::every() {
        let failure = matches!(
            e,
            PrimaryEvent::CycleFailed { .. }
                | PrimaryEvent::TrackingLost
                | PrimaryEvent::OutOfOrderRefused
        );
        let want = if failure {
            LastError::Cause
        } else if e == PrimaryEvent::DaemonRestarted {
            LastError::Keep
        } else {
            LastError::Clear
        };
        assert_eq!(e.last_error(), want, "{}", e.name());
    }
    for e in ReplicaEvent::every() {
        let want = match e {
            ReplicaEvent::ApplyFailed { .. } | ReplicaEvent::OutOfOrderRefused => LastError::Cause,
            ReplicaEvent::TestFailoverStarted | ReplicaEvent::TestFailoverStopped => {
                LastError::Keep
            }
            _ => LastError::Clear,
        };
        assert_eq!(e.last_error(), want, "{}", e.name());
    }
}
