//! Status and health of the replica VMs this host keeps, by Hyper-V's rules.

use crate::db::now_ms;
use crate::db::ReplicaRow;
use crate::host::Host;
use vmrepl_types::replication::{
    Health, ReplicationState, ReplicationStats, ReplicationStatus, Role,
};

/// How long without a received log before a replica's health is Warning (Hyper-V: 1 h).
pub const RECEIVE_WARNING_MS: u64 = 3600 * 1000;

/// Below this share of its folder free, a replica's storage is nearly full (Warning).
pub const STORAGE_WARNING_PERCENT: u64 = 10;
/// ... or below this many bytes free, whatever the share.
pub const STORAGE_WARNING_BYTES: u64 = 2 << 30;

/// Health of a replica per Hyper-V's replica-side rules, with the sentences that explain it.
/// `storage` is the replica storage folder's (free, total) bytes, when known.
pub(crate) fn health(
    r: &ReplicaRow,
    now: u64,
    storage: Option<(u64, u64)>,
) -> (Health, Vec<String>) {
    let mut details = Vec::new();
    let mut h = Health::Normal;
    let failed_over = matches!(
        r.state,
        ReplicationState::FailedOver | ReplicationState::FailedOverWaitingCompletion
    );
    if failed_over {
        h = Health::Warning;
        details.push(format!(
            "{} failed over to this host, and replication was not reversed: its changes are \
             replicated nowhere. Run `vmrepl replication reverse {}` once the old primary is back \
             (or enable replication to another host).",
            r.name, r.name
        ));
    }
    if let Some((free, total)) = storage {
        if free < STORAGE_WARNING_BYTES
            || free.saturating_mul(100) < total * STORAGE_WARNING_PERCENT
        {
            h = h.max(Health::Warning);
            details.push(format!(
                "The replica storage {} is nearly full: {} MiB free of {} MiB. Free space there \
                 or authorize the primary into another folder before logs stop being accepted.",
                r.storage_root.display(),
                free >> 20,
                total >> 20
            ));
        }
    }
    match r.state {
        ReplicationState::Error | ReplicationState::ResynchronizationRequired => {
            h = Health::Critical;
            details.push(format!(
                "Replication of {} is in state {}: {}",
                r.name,
                r.state,
                r.last_error.as_deref().unwrap_or("see the host log")
            ));
        }
        ReplicationState::Resynchronizing => {
            h = Health::Warning;
            details.push(format!(
                "A resynchronization of {} is in progress: until it ends, its newest whole recovery point is the one from before it.",
                r.name
            ));
        }
        _ => {}
    }
    if r.last_applied == 0 {
        h = h.max(Health::Warning);
        details.push(format!(
            "Initial replication of {} is not complete yet.",
            r.name
        ));
    }
    let last = r.last_receive_ms.unwrap_or(r.created_ms);
    if !failed_over && now.saturating_sub(last) > RECEIVE_WARNING_MS {
        h = h.max(Health::Warning);
        details.push(format!(
            "Replica virtual machine '{}' has received nothing from {} for more than an hour.",
            r.name, r.primary_host
        ));
    }
    (h, details)
}

pub(crate) fn failover_note(r: &ReplicaRow) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(f) = &r.failover {
        parts.push(format!(
            "{} failover to point {}{}",
            if f.planned { "planned" } else { "unplanned" },
            f.point_seq,
            if r.state == ReplicationState::FailedOver {
                "; `vmrepl replication reverse` replicates back to the old primary"
            } else {
                "; `vmrepl failover complete` keeps it, `failover cancel` undoes it"
            }
        ));
    }
    if let Some(t) = &r.test_failover {
        parts.push(format!(
            "test failover running as VM {:?} from point {}",
            t.name, t.point_seq
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// When the last test failover of replica `vm` started, from its recorded transitions.
fn last_test_failover(daemon: &Host, vm: uuid::Uuid) -> Option<u64> {
    let db = daemon.db();
    db.last_event_ms(
        vm,
        crate::lifecycle::ReplicaEvent::TestFailoverStarted.name(),
    )
    .ok()
    .flatten()
    .map(|ms| ms / 1000)
}

/// The status of every replica VM on this host.
pub fn statuses(daemon: &Host) -> Vec<ReplicationStatus> {
    let rows = {
        let db = daemon.db();
        db.replicas().unwrap_or_default()
    };
    let me = daemon.cfg().host_name.clone();
    let now = now_ms();
    rows.into_iter()
        .map(|r| {
            let storage = vmrepl_qemu::caps::storage_info(&r.storage_root)
                .ok()
                .map(|i| (i.free_bytes, i.total_bytes));
            let (health, health_details) = health(&r, now, storage);
            ReplicationStatus {
                warnings: vec![],
                // Its name on this host (unique here), which replica-side commands take.
                vm: vmrepl_types::VmName::new(&r.name)
                    .unwrap_or_else(|_| r.definition.name.clone()),
                vm_uuid: r.vm_uuid,
                role: Role::Replica,
                state: r.state,
                health,
                health_details,
                primary_host: r.primary_host.clone(),
                replica_host: me.clone(),
                frequency_secs: None,
                resync: None,
                app_consistent_hours: None,
                recovery_points: Some(r.policy.keep),
                recovery_point_interval_secs: Some(r.policy.interval_secs),
                compression: None,
                bandwidth_limit: None,
                last_sequence: r.last_applied,
                waiting_on: None,
                last_error: r.last_error.clone(),
                note: failover_note(&r),
                progress: None,
                stats: ReplicationStats {
                    success_count: r.logs_received,
                    total_bytes: r.bytes_received,
                    last_replication_unix: r.last_receive_ms.map(|m| m / 1000),
                    last_test_failover_unix: last_test_failover(daemon, r.vm_uuid),
                    ..Default::default()
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: ReplicationState) -> ReplicaRow {
        let mut r = crate::replica::tests::row("web");
        r.state = state;
        r.last_applied = 5;
        r.last_receive_ms = Some(1_000);
        r
    }

    #[test]
    fn a_failover_not_followed_by_reverse_replication_is_a_warning_that_says_what_to_run() {
        let (h, d) = health(&row(ReplicationState::Replicating), 2_000, None);
        assert_eq!(h, Health::Normal, "{d:?}");
        let (h, d) = health(
            &row(ReplicationState::FailedOver),
            10 * RECEIVE_WARNING_MS,
            None,
        );
        assert_eq!(h, Health::Warning);
        assert_eq!(
            d.len(),
            1,
            "the receive rule does not apply after a failover: {d:?}"
        );
        assert!(d[0].contains("replication reverse web"), "{d:?}");
    }

    #[test]
    fn a_nearly_full_replica_storage_is_a_warning_with_the_figures() {
        let total = 100u64 << 30;
        let (h, _) = health(
            &row(ReplicationState::Replicating),
            2_000,
            Some((50 << 30, total)),
        );
        assert_eq!(h, Health::Normal);
        let (h, d) = health(
            &row(ReplicationState::Replicating),
            2_000,
            Some((5 << 30, total)),
        );
        assert_eq!(h, Health::Warning);
        assert!(
            d[0].contains("nearly full") && d[0].contains("5120 MiB free"),
            "{d:?}"
        );
        // Small folders: under 2 GiB free is nearly full whatever the share.
        let (h, _) = health(
            &row(ReplicationState::Replicating),
            2_000,
            Some((1 << 30, 4 << 30)),
        );
        assert_eq!(h, Health::Warning);
    }
}
