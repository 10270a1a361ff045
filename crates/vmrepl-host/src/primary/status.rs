//! Status, statistics and health of the primary's relationships, by Hyper-V's rules.

use crate::db::now_ms;
use crate::error::HostError;
use crate::host::Host;
use crate::primary::all;
use crate::primary::CycleOutcome;
use crate::primary::Relationship;
use uuid::Uuid;
use vmrepl_types::replication::{
    Health, ReplicationState, ReplicationStats, ReplicationStatus, Role,
};

/// Hyper-V's statistics over the monitoring window, counting only this relationship's cycles
/// (a VM that failed over and back has had several) and only what crossed the network: an
/// initial copy exported to media and imported on the replica is recorded, but it is not a
/// replication cycle (no bytes sent, no latency).
pub(crate) fn stats(
    d: &Host,
    vm: Uuid,
    rel_created_ms: u64,
) -> Result<ReplicationStats, HostError> {
    let window_ms = u64::from(d.cfg().monitoring_window_hours) * 3600 * 1000;
    let now = now_ms();
    let db = d.db();
    let reset = db
        .stats_reset(vm)
        .map_err(HostError::db("reading the statistics' reset"))?
        .unwrap_or(0);
    let since = now.saturating_sub(window_ms).max(rel_created_ms).max(reset);
    let cycles = db
        .cycles_since(vm, since)
        .map_err(HostError::db("reading the cycle record"))?;
    let mut s = stats_of(&cycles);
    s.window_from_unix = Some(since / 1000);
    s.window_to_unix = Some(now / 1000);
    Ok(s)
}

/// Hyper-V's statistics of these cycles.
pub(crate) fn stats_of(cycles: &[crate::db::CycleSample]) -> ReplicationStats {
    let mut s = ReplicationStats::default();
    let mut lat_total = 0.0;
    for c in cycles {
        if c.app_freeze_ok == Some(false) {
            s.app_consistent_failure_count += 1;
        }
        match c.outcome {
            CycleOutcome::Ok => {
                s.success_count += 1;
                s.total_bytes += c.bytes;
                s.max_bytes = s.max_bytes.max(c.bytes);
                let secs = c.duration_ms as f64 / 1000.0;
                lat_total += secs;
                s.max_latency_secs = s.max_latency_secs.max(secs);
                s.last_replication_unix = Some((c.start_ms + c.duration_ms) / 1000);
                if c.app_freeze_ok == Some(true) {
                    s.last_app_consistent_unix = s.last_replication_unix;
                }
            }
            CycleOutcome::Missed => s.miss_count += 1,
            CycleOutcome::NetworkFailure => {
                s.failure_count += 1;
                s.network_failure_count += 1;
            }
            CycleOutcome::Failure => s.failure_count += 1,
        }
    }
    if s.success_count > 0 {
        s.avg_latency_secs = lat_total / s.success_count as f64;
    }
    s
}

/// Health by Hyper-V's rules, with a sentence per finding. `failed_in_a_row`: the last cycles
/// that failed one after the other: one is a Warning (the next cycle retries), two or more mean
/// the primary cannot send, Critical.
pub fn health(
    rel: &Relationship,
    stats: &ReplicationStats,
    failed_in_a_row: u32,
) -> (Health, Vec<String>) {
    let mut crit = Vec::new();
    let mut warn = Vec::new();
    match rel.state {
        ReplicationState::ResynchronizationRequired => crit.push(format!(
            "Resynchronization is required: {}",
            rel.last_error
                .clone()
                .unwrap_or_else(|| "change tracking cannot be trusted".into())
        )),
        ReplicationState::Error => crit.push("Replication is in an error state.".into()),
        ReplicationState::Suspended => warn.push("Replication is paused on the primary.".into()),
        ReplicationState::Resynchronizing => warn.push("Resynchronization is in progress.".into()),
        ReplicationState::WaitingForInitialReplication
        | ReplicationState::ReadyForInitialReplication
        | ReplicationState::InitialReplicationInProgress => {
            warn.push("Initial replication is not complete.".into())
        }
        _ => {}
    }
    if failed_in_a_row >= 2 && rel.state != ReplicationState::ResynchronizationRequired {
        crit.push(format!(
            "The primary cannot send changes to the replica ({failed_in_a_row} cycles failed in a \
             row): {}",
            rel.last_error.clone().unwrap_or_default()
        ));
    } else if failed_in_a_row == 1 && rel.state != ReplicationState::ResynchronizationRequired {
        warn.push(format!(
            "The last cycle failed; the next one retries: {}",
            rel.last_error.clone().unwrap_or_default()
        ));
    }
    let total = stats.success_count + stats.miss_count + stats.failure_count;
    if total >= 5 && stats.miss_count * 5 > total {
        warn.push(format!(
            "More than 20 percent of replication cycles have been missed ({} of {}).",
            stats.miss_count, total
        ));
    }
    let since = rel.last_success_ms.unwrap_or(rel.created_ms);
    if now_ms().saturating_sub(since) > 3_600_000 {
        warn.push("The replica is behind the primary by more than an hour.".into());
    }
    if !crit.is_empty() {
        crit.extend(warn);
        (Health::Critical, crit)
    } else if !warn.is_empty() {
        (Health::Warning, warn)
    } else {
        (Health::Normal, vec![])
    }
}

/// Bytes changed since the last acknowledged log, as QEMU's recording bitmaps count them
/// (cluster-granular, so an upper bound): for a running VM. A VM that is off changes nothing
/// (until it runs again) and its bitmaps sit in its image files, so it gets None, as does a
/// relationship between cycles of a resynchronization.
pub async fn pending_bytes(d: &Host, vm: Uuid) -> Option<u64> {
    let rel = crate::primary::load(d, vm).ok().flatten()?;
    let def = d.vmm.definition(vm)?;
    let proc = d.vmm.live_process(vm).await?;
    let nodes: Vec<String> = crate::primary::replicated_disks(&def, &rel.settings)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let tag = vmrepl_tracking::RelTag::from_uuid(&rel.rel_id);
    let owned = vmrepl_tracking::list_owned(proc.qmp(), tag, &nodes)
        .await
        .ok()?;
    Some(
        owned
            .values()
            .flat_map(|bs| bs.iter().filter(|b| b.recording).map(|b| b.count))
            .sum(),
    )
}

/// [`statuses`] with the pending bytes of running VMs filled in ([`pending_bytes`]).
pub async fn statuses_with_pending(d: &Host) -> Result<Vec<ReplicationStatus>, HostError> {
    let mut all = statuses(d)?;
    for s in &mut all {
        if let Some(p) = pending_bytes(d, s.vm_uuid).await {
            s.stats.pending_bytes = p;
        }
    }
    Ok(all)
}

/// Status of every relationship on this host (primary side).
pub fn statuses(d: &Host) -> Result<Vec<ReplicationStatus>, HostError> {
    let mut out = Vec::new();
    for rel in all(d)? {
        out.extend(status_of(d, &rel)?);
    }
    Ok(out)
}

/// Status of one relationship; None when its VM is gone.
pub fn status_of(d: &Host, rel: &Relationship) -> Result<Option<ReplicationStatus>, HostError> {
    let vm = rel.vm_uuid;
    let Some(def) = d.vmm.definition(vm) else {
        return Ok(None);
    };
    let st = stats(d, vm, rel.created_ms)?;
    let failed = d
        .db()
        .failed_in_a_row(vm, 2)
        .map_err(HostError::db("reading the cycle record"))?;
    let (health, details) = health(rel, &st, failed);
    let progress = crate::locks::unpoisoned(&d.repl.rels)
        .get(&vm)
        .and_then(|r| crate::locks::unpoisoned(&r.progress).clone());
    let host = d.cfg().host_name.clone();
    Ok(Some(ReplicationStatus {
        vm: def.name.clone(),
        vm_uuid: vm,
        role: Role::Primary,
        state: rel.state,
        health,
        health_details: details,
        primary_host: host,
        replica_host: format!("{} ({})", rel.replica_name, rel.settings.replica_server),
        frequency_secs: Some(rel.settings.frequency_secs),
        resync: Some(rel.settings.resync),
        app_consistent_hours: rel.settings.app_consistent_hours,
        recovery_points: Some(rel.settings.recovery_points),
        recovery_point_interval_secs: Some(rel.settings.recovery_point_interval_secs),
        compression: Some(rel.settings.compression),
        bandwidth_limit: rel.settings.bandwidth_limit,
        last_sequence: rel.acked_seq,
        waiting_on: match rel.state {
            ReplicationState::Suspended => Some("resume (replication is paused)".into()),
            ReplicationState::ResynchronizationRequired => Some("a resynchronization".into()),
            _ => None,
        },
        last_error: rel.last_error.clone(),
        note: rel.note.clone(),
        warnings: disk_warnings(&def.name, rel),
        progress,
        stats: st,
    }))
}

/// A sentence per disk added to the VM after replication was enabled and not included yet,
/// naming the command that includes it, and per included disk whose initial copy is pending.
pub(crate) fn disk_warnings(vm: &vmrepl_types::VmName, rel: &Relationship) -> Vec<String> {
    let s = &rel.settings;
    let mut out: Vec<String> = s
        .new_disks
        .iter()
        .map(|id| format!("Disk {id} was added to {vm} after replication was enabled and is not replicated: a failover starts {vm} without it. Include it with `vmrepl replication set {vm} --include-disk {id}` (or keep it out with `--exclude-disk {id}`)."))
        .collect();
    out.extend(s.disks_awaiting_copy.iter().map(|id| {
        format!("Disk {id} of {vm} is included; its initial copy goes with the next cycle.")
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmrepl_types::replication::ReplicationSettings;

    fn rel(state: ReplicationState) -> Relationship {
        Relationship {
            vm_uuid: Uuid::new_v4(),
            rel_id: Uuid::new_v4(),
            settings: ReplicationSettings::new("h:1"),
            replica_name: "h".into(),
            state,
            acked_seq: 3,
            last_error: Some("boom".into()),
            created_ms: now_ms(),
            last_success_ms: Some(now_ms()),
            note: None,
            resync_sweep: None,
        }
    }

    #[test]
    fn statistics_count_outcomes_sizes_latencies_and_the_last_app_consistent_point() {
        use crate::db::CycleSample;
        let c = |outcome, bytes, start_ms, app_freeze_ok| CycleSample {
            outcome,
            bytes,
            duration_ms: 2000,
            start_ms,
            app_freeze_ok,
        };
        let s = stats_of(&[
            c(CycleOutcome::Ok, 100, 10_000, Some(true)),
            c(CycleOutcome::Ok, 300, 20_000, None),
            c(CycleOutcome::Missed, 0, 30_000, None),
            c(CycleOutcome::NetworkFailure, 0, 40_000, None),
            c(CycleOutcome::Ok, 200, 50_000, Some(false)),
        ]);
        assert_eq!(
            (
                s.success_count,
                s.miss_count,
                s.failure_count,
                s.network_failure_count
            ),
            (3, 1, 1, 1)
        );
        assert_eq!((s.total_bytes, s.max_bytes), (600, 300));
        assert_eq!((s.avg_latency_secs, s.max_latency_secs), (2.0, 2.0));
        assert_eq!(s.last_replication_unix, Some(52));
        // The last point whose guest was frozen, not the last attempt.
        assert_eq!(s.last_app_consistent_unix, Some(12));
        assert_eq!(s.app_consistent_failure_count, 1);
    }

    #[test]
    fn a_healthy_replicating_relationship_is_normal() {
        let (h, d) = health(
            &rel(ReplicationState::Replicating),
            &ReplicationStats::default(),
            0,
        );
        assert_eq!(h, Health::Normal, "{d:?}");
    }

    #[test]
    fn resync_required_and_send_failures_are_critical() {
        let (h, _) = health(
            &rel(ReplicationState::ResynchronizationRequired),
            &ReplicationStats::default(),
            0,
        );
        assert_eq!(h, Health::Critical);
        // One failed cycle is a Warning: the next one retries.
        let (h, d) = health(
            &rel(ReplicationState::Replicating),
            &ReplicationStats::default(),
            1,
        );
        assert_eq!(h, Health::Warning);
        assert!(d[0].contains("retries") && d[0].contains("boom"), "{d:?}");
        // Two in a row: the primary cannot send.
        let (h, d) = health(
            &rel(ReplicationState::Replicating),
            &ReplicationStats::default(),
            2,
        );
        assert_eq!(h, Health::Critical);
        assert!(
            d[0].contains("cannot send") && d[0].contains("2 cycles"),
            "{d:?}"
        );
    }

    #[test]
    fn pause_on_the_primary_and_incomplete_initial_replication_are_warnings() {
        assert_eq!(
            health(
                &rel(ReplicationState::Suspended),
                &ReplicationStats::default(),
                0
            )
            .0,
            Health::Warning
        );
        assert_eq!(
            health(
                &rel(ReplicationState::WaitingForInitialReplication),
                &ReplicationStats::default(),
                0
            )
            .0,
            Health::Warning
        );
    }

    #[test]
    fn more_than_a_fifth_of_cycles_missed_is_a_warning() {
        let st = ReplicationStats {
            success_count: 7,
            miss_count: 3,
            ..Default::default()
        };
        let (h, d) = health(&rel(ReplicationState::Replicating), &st, 0);
        assert_eq!(h, Health::Warning);
        assert!(d[0].contains("20 percent"));
        let st = ReplicationStats {
            success_count: 9,
            miss_count: 1,
            ..Default::default()
        };
        assert_eq!(
            health(&rel(ReplicationState::Replicating), &st, 0).0,
            Health::Normal
        );
    }

    #[test]
    fn a_replica_behind_by_more_than_an_hour_is_a_warning() {
        let mut r = rel(ReplicationState::Replicating);
        r.last_success_ms = Some(now_ms() - 2 * 3_600_000);
        let (h, d) = health(&r, &ReplicationStats::default(), 0);
        assert_eq!(h, Health::Warning);
        assert!(d[0].contains("more than an hour"));
    }
}
