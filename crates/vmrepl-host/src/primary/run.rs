//! One cycle, top-down: lock, endpoint, freeze (app-consistent points), the cycle itself,
//! and what its outcome records.

use crate::db::now_ms;
use crate::db::CycleRecord;
use crate::host::{Host, RelRuntime};
use crate::lifecycle::{CycleKind, PrimaryEvent};
use crate::peer::client::PeerClient;
use crate::peer::proto::{PeerRequest, PeerResponse};
use crate::primary::acknowledged;
use crate::primary::change;
use crate::primary::connect;
use crate::primary::export_file;
use crate::primary::happened;
use crate::primary::last_marked_ms;
use crate::primary::load;
use crate::primary::log_file;
use crate::primary::record_cycle;
use crate::primary::record_freeze;
use crate::primary::replicated_disks;
use crate::primary::set_note;
use crate::primary::Cycle;
use crate::primary::CycleError;
use crate::primary::CycleOutcome;
use crate::primary::DbSweeps;
use crate::primary::Done;
use crate::primary::Endpoint;
use crate::primary::EndpointError;
use crate::primary::Marked;
use crate::primary::RecordedKind;
use crate::primary::Relationship;
use crate::primary::VmAgent;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;
use vmrepl_tracking::{RelTag, Staging};
use vmrepl_types::replication::{InitialReplication, ReplicationSettings, ReplicationState};
use vmrepl_types::Generation;

pub(crate) fn log_path(d: &Host, rel: RelTag, seq: u64) -> PathBuf {
    log_file(&d.dd.staging(), rel, seq)
}

/// One cycle, top-down.
/// How freezing the guest for an app-consistent point went: the file systems frozen, or why
/// it could not be done.
pub(crate) type Freeze = Result<u64, String>;

/// One cycle, top-down. Returns how freezing the guest went, when the cycle tried.
pub(crate) async fn run_cycle(
    d: &Arc<Host>,
    vm_uuid: Uuid,
    rt: &RelRuntime,
    consistency: vmrepl_log::Consistency,
) -> Result<Option<Freeze>, String> {
    let _op = d.vmm.op_lock(vm_uuid).await;
    if rt.stop.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(None);
    }
    let Some(rel) = load(d, vm_uuid).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    if rel.state == ReplicationState::SyncedReplicationComplete {
        // Prepared for a planned failover: nothing moves until it is cancelled.
        return Ok(None);
    }
    let vm = d
        .vmm
        .definition(vm_uuid)
        .ok_or_else(|| "the VM no longer exists".to_string())?;
    let tag = RelTag::from_uuid(&rel.rel_id);
    let disks = replicated_disks(&vm, &rel.settings);
    let nodes: Vec<String> = disks.iter().map(|(n, _)| n.clone()).collect();
    let vars = (vm.generation == Generation::Uefi && vm.nvram.is_some())
        .then_some(vmrepl_tracking::VARS_NODE);
    let start = now_ms();
    let initial = matches!(
        rel.state,
        ReplicationState::WaitingForInitialReplication
            | ReplicationState::ReadyForInitialReplication
    );
    let resync = rel.state == ReplicationState::Resynchronizing;
    let kind = if initial {
        CycleKind::Initial
    } else if resync {
        CycleKind::Resync
    } else {
        CycleKind::Delta
    };
    let recorded = match kind {
        CycleKind::Initial => RecordedKind::Initial,
        CycleKind::Resync => RecordedKind::Resync,
        CycleKind::Delta => RecordedKind::Delta,
    };
    fn cycle_record<'e>(
        (vm, start): (Uuid, u64),
        seq: u64,
        kind: RecordedKind,
        bytes: u64,
        outcome: CycleOutcome,
        error: Option<&'e str>,
    ) -> CycleRecord<'e> {
        CycleRecord {
            vm,
            seq,
            kind,
            start_ms: start,
            bytes,
            outcome,
            error,
        }
    }
    let me = (vm_uuid, start);
    let fail = |msg: String, network: bool| {
        let outcome = if network {
            CycleOutcome::NetworkFailure
        } else {
            CycleOutcome::Failure
        };
        record_cycle(
            d,
            cycle_record(me, rel.acked_seq + 1, recorded, 0, outcome, Some(&msg)),
        );
        happened(d, vm_uuid, PrimaryEvent::CycleFailed { kind }, Some(&msg));
        msg
    };
    // A connection to the replica server, paced by the relationship's and the host's limits.
    let reach = || async {
        match connect(d, &rel.settings).await {
            Ok((mut c, _)) => {
                c.set_rate_limit(rel.settings.bandwidth_limit);
                c.set_host_pacer(d.host_pacer.clone());
                Ok(c)
            }
            Err(e) => Err(fail(
                format!(
                    "cannot reach the replica server {}: {e}",
                    rel.settings.replica_server
                ),
                true,
            )),
        }
    };
    let mut client = reach().await?;
    tell_policy(rt, &mut client, vm_uuid, &rel.settings).await;
    // The definition goes out before this cycle freezes its point, so a grown disk reaches
    // the replica before the first log of its new size; but not while a log built before
    // (its transfer was cut) waits to be resumed: that log says the disk sizes of its own
    // point, and the replica must apply it before it grows its disks. The scheduler runs the
    // next cycle right after a resumed one, and that one tells the definition.
    let waiting = log_path(d, tag, rel.acked_seq + 1).exists();
    if !waiting
        && tell_definition(rt, &mut client, &vm, &rel.settings)
            .await
            .map_err(|e| fail(e, false))?
    {
        // An older replica closes the connection after a request it does not know.
        client = reach().await?;
    }
    let exported = initial
        && matches!(rel.settings.initial, InitialReplication::Export { .. })
        && last_marked_ms(d, vm_uuid, rel.created_ms, Marked::Exported)
            .map_err(|e| fail(e.to_string(), false))?
            .is_some();
    if exported {
        // The initial copy went out on external media: wait until the replica imported it.
        // Bitmap 1 has recorded every change since the export's point in time.
        return await_import(d, vm_uuid, &rel, client)
            .await
            .map(|()| None)
            .map_err(|e| fail(e, false));
    }
    let endpoint = match Endpoint::open(d, &vm, &nodes, vars).await {
        Ok(e) => e,
        // A disk was changed while the VM was off: the relationship took the lost-tracking
        // event with this cause already; the cycle is recorded as what found it.
        Err(EndpointError::ChangedWhileOff { cause }) => {
            record_cycle(
                d,
                cycle_record(
                    me,
                    rel.acked_seq + 1,
                    recorded,
                    0,
                    CycleOutcome::Failure,
                    Some(&cause),
                ),
            );
            return Err(cause);
        }
        Err(e) => return Err(fail(e.to_string(), false)),
    };
    let sweeps = DbSweeps { d, vm: vm_uuid };
    // Disks included after the replica was created, whose initial copy goes with this cycle.
    let fresh: Vec<String> = rel
        .settings
        .disks_awaiting_copy
        .iter()
        .filter(|x| nodes.contains(x))
        .cloned()
        .collect();
    let resync_range = d.cfg().resync_range_mib.map(|m| m << 20);
    let mut cycle = Cycle {
        rel: &rel,
        vm: &vm,
        client,
        endpoint: &endpoint,
        guest: VmAgent { d, vm: vm_uuid },
        tag,
        disks,
        vars,
        staging: Staging::new(d.dd.staging()),
        progress: &rt.progress,
        consistency,
        app_freeze: None,
        resync_range,
        resync_keep: crate::primary::KEEP_PER_RANGE,
        sweeps: &sweeps,
        fresh: if initial || resync { vec![] } else { fresh },
        fresh_carried: false,
    };
    let result = if initial {
        // The state machine takes the relationship to "in progress" before anything is
        // staged; the cycle's failure (below) takes it back to waiting.
        match change(d, vm_uuid, PrimaryEvent::InitialReplicationStarted, None) {
            Ok(_) => cycle.initial().await,
            Err(e) => Err(CycleError::Other(e.to_string())),
        }
    } else if resync {
        cycle.resync().await.map(Done::acked)
    } else {
        cycle.delta().await.map(Done::acked)
    };
    let app_freeze = cycle.app_freeze.take();
    let fresh_carried = cycle.fresh_carried.then(|| cycle.fresh.clone());
    drop(cycle);
    endpoint.close().await;
    // The replica refused the log, or this host's tracking cannot be trusted: the relationship
    // needs a resynchronization (the state machine decides from which state).
    let needs_resync = |event: PrimaryEvent, m: String| {
        record_cycle(
            d,
            cycle_record(
                me,
                rel.acked_seq + 1,
                recorded,
                0,
                CycleOutcome::Failure,
                Some(&m),
            ),
        );
        happened(d, vm_uuid, event, Some(&m));
        m
    };
    let outcome = match result {
        Ok(Done::Exported { bytes }) => {
            // Log 1 is on the media, not acknowledged: the replica has yet to import it.
            record_cycle(
                d,
                cycle_record(me, 1, RecordedKind::Export, bytes, CycleOutcome::Ok, None),
            );
            happened(d, vm_uuid, PrimaryEvent::InitialCopyExported, None);
            if let InitialReplication::Export { folder } = &rel.settings.initial {
                set_note(d, vm_uuid, Some(&format!(
                    "The initial copy was exported to {}; import it on {} with `vmrepl replication import {} --from FILE`.",
                    export_file(folder, &vm.name).display(),
                    rel.replica_name,
                    vm.name
                )));
            }
            Ok(())
        }
        Ok(Done::Acked { seq, bytes }) => {
            record_cycle(
                d,
                cycle_record(me, seq, recorded, bytes, CycleOutcome::Ok, None),
            );
            // A full copy (initial or resynchronization) covers every disk; a delta the disks
            // whose initial copy it carried.
            let copied = match (&fresh_carried, kind) {
                (_, CycleKind::Initial | CycleKind::Resync) => {
                    rel.settings.disks_awaiting_copy.clone()
                }
                (Some(f), CycleKind::Delta) => f.clone(),
                (None, CycleKind::Delta) => vec![],
            };
            disks_copied(d, vm_uuid, seq, bytes, &copied, kind == CycleKind::Delta);
            let _ = acknowledged(d, vm_uuid, PrimaryEvent::CycleAcknowledged { kind }, seq);
            Ok(())
        }
        Err(CycleError::OutOfOrder(m)) => Err(needs_resync(PrimaryEvent::OutOfOrderRefused, m)),
        Err(CycleError::TrackingLost(m)) => Err(needs_resync(PrimaryEvent::TrackingLost, m)),
        Err(CycleError::Network(m)) => Err(fail(m, true)),
        Err(CycleError::Other(m)) => Err(fail(m, false)),
    };
    if let Some(freeze) = &app_freeze {
        record_freeze(d, vm_uuid, start, freeze);
    }
    outcome.map(|()| app_freeze)
}

/// After log `seq` (`bytes` sent) was acknowledged: the disks in `copied` have their copy on
/// the replica now; they leave the relationship's list of disks awaiting one. With `own_copy`
/// the log carried their initial copy beside the other disks' changes, which the journal says.
fn disks_copied(d: &Host, vm: Uuid, seq: u64, bytes: u64, copied: &[String], own_copy: bool) {
    if copied.is_empty() {
        return;
    }
    let Ok(Some(rel)) = load(d, vm) else { return };
    let mut s = rel.settings.clone();
    s.disks_awaiting_copy.retain(|x| !copied.contains(x));
    if let Err(e) = d.db().set_relationship_settings(vm, &s) {
        tracing::warn!(target: "vmrepl::replication", %vm, "cannot record the disks copied: {e}");
        return;
    }
    if own_copy {
        let _ = d.db().event(
            Some(vm),
            &format!(
                "disk-initial-copy: initial copy of disk {} sent with log {seq} ({bytes} bytes, with the other disks' changes at the same point in time)",
                copied.join(", ")
            ),
        );
    }
}

/// After an export: asks the replica whether it imported log 1; once it has, the relationship
/// replicates (bitmap 1 has recorded since the export's point in time).
pub(crate) async fn await_import(
    d: &Host,
    vm: Uuid,
    rel: &Relationship,
    mut client: PeerClient,
) -> Result<(), String> {
    let start = now_ms();
    match client
        .call(&PeerRequest::ReplicaState { vm_uuid: vm })
        .await
        .map_err(|e| e.to_string())?
    {
        PeerResponse::ReplicaState { last_applied, .. } if last_applied >= 1 => {
            record_cycle(
                d,
                CycleRecord {
                    vm,
                    seq: 1,
                    kind: RecordedKind::Import,
                    start_ms: start,
                    bytes: 0,
                    outcome: CycleOutcome::Ok,
                    error: None,
                },
            );
            acknowledged(d, vm, PrimaryEvent::InitialCopyImported, 1).map_err(|e| e.to_string())?;
            set_note(d, vm, None);
            let _ = d.db().event(
                Some(vm),
                &format!(
                    "{} imported the initial copy; replicating",
                    rel.replica_name
                ),
            );
            Ok(())
        }
        PeerResponse::ReplicaState { .. } => Ok(()),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// Hyper-V's app-consistent schedule: a replicating VM that runs gets an app-consistent
/// point when none was tried for `hours` (the first one right after initial replication).
pub(crate) fn app_consistent_due(
    settings: &ReplicationSettings,
    state: ReplicationState,
    running: bool,
    last_attempt_ms: Option<u64>,
    now_ms: u64,
) -> bool {
    let Some(hours) = settings.app_consistent_hours else {
        return false;
    };
    state == ReplicationState::Replicating
        && running
        && last_attempt_ms
            .map(|t| now_ms.saturating_sub(t) >= u64::from(hours) * 3_600_000)
            .unwrap_or(true)
}

/// How long the guest agent may take to freeze (it runs the guest's freeze hooks first).
pub(crate) const FREEZE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting and each other agent command may take.
pub(crate) const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Thaws a guest frozen for an app-consistent point: at once, and again on failure.
pub(crate) async fn thaw_guest(d: &Host, vm: Uuid, qga: vmrepl_qemu::Qga) {
    let qga = qga.with_timeout(AGENT_TIMEOUT);
    let mut last = String::new();
    for _ in 0..3 {
        match qga.fsfreeze_thaw().await {
            Ok(_) => return,
            Err(e) => {
                last = e.to_string();
                let _ = qga.sync().await;
            }
        }
    }
    let msg = format!("The guest could not be thawed after an app-consistent point ({last}); it may still be frozen: thaw it from the guest console (fsfreeze --unfreeze) or restart the VM.");
    tracing::error!(target: "vmrepl::replication", %vm, "{msg}");
    let _ = d.db().event(Some(vm), &msg);
}

/// Gives the replica the VM's current definition (as the replica keeps it) when it changed
/// since the replica was last given it, so that a failover starts the VM as it is now. A
/// replica of an older release does not know the request: it keeps the definition it was
/// created with (said once per daemon start). Err: the replica refused the new definition
/// (it cannot run the VM as it is now), which fails the cycle with its reason.
pub(crate) async fn tell_definition(
    rt: &RelRuntime,
    client: &mut crate::peer::client::PeerClient,
    vm: &vmrepl_types::VmDefinition,
    s: &vmrepl_types::replication::ReplicationSettings,
) -> Result<bool, String> {
    let view = crate::primary::replica_view(vm, s);
    let digest = *blake3::hash(&serde_json::to_vec(&view).unwrap_or_default()).as_bytes();
    if *crate::locks::unpoisoned(&rt.definition_sent) == Some(digest) {
        return Ok(false);
    }
    let mut reconnect = false;
    let req = crate::peer::proto::PeerRequest::UpdateDefinition { vm: Box::new(view) };
    match client.request(&req).await {
        Ok(crate::peer::proto::PeerResponse::Ok) => {}
        Err(crate::peer::client::PeerError::Refused {
            code: crate::peer::proto::RefusalCode::BadRequest,
            message,
        }) if message.contains("closing the connection") => {
            tracing::info!(target: "vmrepl::replication", vm = %vm.uuid, "the replica server is of an older release and keeps the VM definition it was created with");
            reconnect = true;
        }
        Err(e) => {
            return Err(format!(
                "the replica server did not take the VM's changed definition: {e}"
            ))
        }
        Ok(other) => {
            return Err(format!(
                "unexpected answer to the VM's definition: {other:?}"
            ))
        }
    }
    *crate::locks::unpoisoned(&rt.definition_sent) = Some(digest);
    Ok(reconnect)
}

/// Tells the replica the relationship's recovery-point policy when it was not told since the
/// daemon started or since `replication set` changed it; a refusal or a lost connection is
/// tried again at the next cycle.
pub(crate) async fn tell_policy(
    rt: &RelRuntime,
    client: &mut crate::peer::client::PeerClient,
    vm_uuid: Uuid,
    s: &vmrepl_types::replication::ReplicationSettings,
) {
    use std::sync::atomic::Ordering;
    if rt.policy_sent.load(Ordering::SeqCst) {
        return;
    }
    let req = crate::peer::proto::PeerRequest::SetPolicy {
        vm_uuid,
        policy: crate::primary::point_policy(s),
    };
    match client.request(&req).await {
        Ok(crate::peer::proto::PeerResponse::Ok) => rt.policy_sent.store(true, Ordering::SeqCst),
        other => {
            tracing::warn!(target: "vmrepl::replication", vm = %vm_uuid, "the replica was not told the recovery-point policy ({other:?}); the next cycle tries again")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_app_consistent_point_is_due_every_n_hours_for_a_running_replicating_vm() {
        let mut s = ReplicationSettings::new("127.0.0.2:7443");
        let h = 3_600_000;
        let now = 100 * h;
        let rep = ReplicationState::Replicating;
        assert!(
            !app_consistent_due(&s, rep, true, None, now),
            "off by default"
        );
        s.app_consistent_hours = Some(2);
        assert!(
            app_consistent_due(&s, rep, true, None, now),
            "first one at once"
        );
        assert!(!app_consistent_due(&s, rep, true, Some(now - h), now));
        assert!(app_consistent_due(&s, rep, true, Some(now - 2 * h), now));
        assert!(
            !app_consistent_due(&s, rep, false, None, now),
            "a VM that is off has no guest to freeze"
        );
        for st in [
            ReplicationState::WaitingForInitialReplication,
            ReplicationState::Resynchronizing,
            ReplicationState::Suspended,
        ] {
            assert!(!app_consistent_due(&s, st, true, None, now), "{st:?}");
        }
    }
}
