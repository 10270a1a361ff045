//! The tables as data, checked against the state machines for every (state, event) pair.

use super::*;
use std::collections::{HashMap, HashSet};
use vmrepl_types::replication::InitialReplication;
use ReplicationState as S;

/// Two-letter codes of the states, in the order of [`ALL_STATES`] (the table columns).
pub(super) const CODES: [&str; 12] = [
    "NE", "RI", "WI", "IP", "RE", "SC", "FW", "FO", "SU", "ER", "RR", "RS",
];

pub(super) fn code(s: ReplicationState) -> &'static str {
    CODES[ALL_STATES.iter().position(|x| *x == s).unwrap()]
}

pub(super) fn from_code(c: &str) -> Option<ReplicationState> {
    CODES.iter().position(|x| *x == c).map(|i| ALL_STATES[i])
}

pub(super) fn primary_label(e: &PrimaryEvent) -> String {
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

pub(super) fn replica_label(e: &ReplicaEvent) -> String {
    use ReplicaEvent as E;
    let detail = match e {
        E::ReplicaCreated { holds_point } => Some(if *holds_point { "at-point" } else { "empty" }),
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
pub(super) const PRIMARY_TABLE: &[&str] = &[
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
pub(super) const REPLICA_TABLE: &[&str] = &[
    //                                   NE RI WI IP RE SC FW FO SU ER RR RS
    "replica-created(empty)              WI -- -- -- -- -- -- -- -- -- -- --",
    "replica-created(at-point)           RE -- -- -- -- -- -- -- -- -- -- --",
    "log-applied                         -- -- RE -- RE -- -- -- -- RE RE RE",
    "resync-part-applied                 -- -- WI -- RS -- -- -- -- RS RS RS",
    "no-log-pending(initial-done)        -- -- RE -- RE -- -- -- -- RE RR RE",
    "no-log-pending(no-log-yet)          -- -- WI -- WI -- -- -- -- WI RR WI",
    "apply-failed(needs-resync)          -- -- RR -- RR -- -- -- -- RR RR RR",
    "apply-failed(retried)               -- -- ER -- ER -- -- -- -- ER RR ER",
    "out-of-order-refused                -- -- RR -- RR -- -- -- -- RR RR RR",
    "failover-started(planned)           -- -- -- -- FO -- -- -- -- -- -- --",
    "failover-started(unplanned)         -- -- -- -- FW -- -- -- -- FW FW FW",
    "failover-completed                  -- -- -- -- -- -- FO FO -- -- -- --",
    "failover-cancelled                  -- -- -- -- -- -- RE -- -- -- -- --",
    "test-failover-started               -- -- -- -- RE -- -- -- -- ER RR RS",
    "test-failover-stopped               -- -- WI -- RE -- FW FO -- ER RR RS",
    "reverse-replication-started         -- -- -- -- -- -- -- NE -- -- -- --",
    "removed                             -- NE NE NE NE NE -- -- NE NE NE NE",
];

/// Checks `f` against `table` for every (state, event) pair; every event must have
/// exactly one row. Returns every difference, to be read at once.
pub(super) fn check_table<E>(
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
pub(super) fn the_primary_follows_its_table_for_every_state_and_event() {
    let diffs = check_table(
        PRIMARY_TABLE,
        &PrimaryEvent::every(),
        primary_label,
        on_primary,
    );
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

#[test]
pub(super) fn the_replica_follows_its_table_for_every_state_and_event() {
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
pub(super) fn primary_variant(e: &PrimaryEvent) -> usize {
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

pub(super) fn replica_variant(e: &ReplicaEvent) -> usize {
    use ReplicaEvent as E;
    match e {
        E::ReplicaCreated { .. } => 0,
        E::LogApplied => 1,
        E::ResyncPartApplied => 12,
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
pub(super) fn every_event_variant_and_payload_is_listed_once() {
    let p = PrimaryEvent::every();
    let variants: HashSet<usize> = p.iter().map(primary_variant).collect();
    assert_eq!(variants, (0..17).collect());
    assert_eq!(p.iter().collect::<HashSet<_>>().len(), p.len());
    assert_eq!(p.len(), PRIMARY_TABLE.len());
    let r = ReplicaEvent::every();
    let variants: HashSet<usize> = r.iter().map(replica_variant).collect();
    assert_eq!(variants, (0..13).collect());
    assert_eq!(r.iter().collect::<HashSet<_>>().len(), r.len());
    assert_eq!(r.len(), REPLICA_TABLE.len());
}

#[test]
pub(super) fn event_names_are_the_stable_kebab_case_ones_recorded_in_the_database() {
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
            "resync-part-applied",
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
pub(super) fn reachable<E>(
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
pub(super) fn a_primary_reaches_only_primary_states_and_all_of_them_but_error() {
    let got = reachable(S::NotEnabled, &PrimaryEvent::every(), on_primary);
    let listed: HashSet<_> = primary_states().iter().copied().collect();
    assert!(got.is_subset(&listed), "{got:?}");
    // Error is only what an unreadable stored state reads back as.
    let mut want = listed;
    want.remove(&S::Error);
    assert_eq!(got, want);
}

#[test]
pub(super) fn a_replica_reaches_only_replica_states_and_all_of_them() {
    let got = reachable(S::NotEnabled, &ReplicaEvent::every(), on_replica);
    let listed: HashSet<_> = replica_states().iter().copied().collect();
    assert_eq!(got, listed);
}

#[test]
pub(super) fn no_event_takes_either_role_into_the_other_roles_states_from_anywhere() {
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
pub(super) fn states_of_the_other_role_only_allow_removal() {
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
pub(super) fn refusals_are_sentences_naming_the_event_the_state_and_a_way_out() {
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
pub(super) fn a_refusal_reads_as_one_sentence_with_its_remedy() {
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

mod primary_rules;
mod replica_rules;
