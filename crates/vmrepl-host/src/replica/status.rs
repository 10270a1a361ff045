//! Status and health of the replica VMs this host keeps, by Hyper-V's rules.

use crate::db::now_ms;
use crate::db::ReplicaRow;
use crate::host::Host;
use vmrepl_types::replication::{
    Health, ReplicationState, ReplicationStats, ReplicationStatus, Role,
};

/// How long without a received log before a replica's health is Warning (Hyper-V: 1 h).
pub const RECEIVE_WARNING_MS: u64 = 3600 * 1000;

/// Health of a replica per Hyper-V's replica-side rules, with the sentences that explain it.
pub(crate) fn health(r: &ReplicaRow, now: u64) -> (Health, Vec<String>) {
    let mut details = Vec::new();
    let mut h = Health::Normal;
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
    if now.saturating_sub(last) > RECEIVE_WARNING_MS {
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
            let (health, health_details) = health(&r, now);
            ReplicationStatus {
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
                last_sequence: r.last_applied,
                waiting_on: None,
                last_error: r.last_error.clone(),
                note: failover_note(&r),
                progress: None,
                stats: ReplicationStats {
                    success_count: r.logs_received,
                    total_bytes: r.bytes_received,
                    last_replication_unix: r.last_receive_ms.map(|m| m / 1000),
                    ..Default::default()
                },
            }
        })
        .collect()
}
