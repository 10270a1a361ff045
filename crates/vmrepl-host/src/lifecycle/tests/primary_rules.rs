//! The primary's rules, one test each.

use super::*;

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
fn lost_tracking_or_a_log_refused_out_of_order_requires_resynchronization_wherever_a_log_was_sent()
{
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
