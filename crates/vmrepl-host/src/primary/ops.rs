//! Operator actions on a relationship: pause, replicate now, resume (with or without a
//! resynchronization) and remove.

use crate::error::HostError;
use crate::host::Host;
use crate::lifecycle::PrimaryEvent;
use crate::peer::proto::{PeerRequest, PeerResponse};
use crate::primary::change;
use crate::primary::connect;
use crate::primary::end;
use crate::primary::load;
use crate::primary::replicate_now;
use crate::primary::replicated_disks;
use crate::primary::stop_scheduler;
use crate::primary::wake;
use crate::primary::Endpoint;
use crate::primary::Relationship;
use crate::primary::{point_policy, EnableError};
use std::sync::Arc;
use vmrepl_tracking::RelTag;
use vmrepl_types::replication::{ReplicationSettings, ReplicationState, SettingsChange};
use vmrepl_types::{VmDefinition, VmName};

/// Pauses (Suspend-VMReplication): no cycles until resumed; tracking continues.
pub fn pause(d: &Arc<Host>, name: &VmName) -> Result<String, HostError> {
    let vm = d.vmm.show(name)?.definition;
    let rel = load(d, vm.uuid)?.ok_or_else(|| not_enabled(name))?;
    if rel.state == ReplicationState::Suspended {
        return Ok(format!("Replication of {name} is already paused."));
    }
    change(d, vm.uuid, PrimaryEvent::Paused, None)?;
    wake(d, vm.uuid);
    Ok(format!(
        "Replication of {name} paused; changes are still tracked and go out when it resumes."
    ))
}

/// Changes a relationship's settings in place (Set-VMReplication). Frequency, compression,
/// the resynchronization policy and the bandwidth limit are in force from the next cycle;
/// the recovery-point policy is told to the replica at once (or by the next cycle when it
/// cannot be reached now). A new replica server is a new relationship: the old replica is
/// told and keeps its data, the new one gets a new initial copy.
pub async fn set(
    d: &Arc<Host>,
    name: &VmName,
    change: SettingsChange,
) -> Result<String, HostError> {
    let vm = d.vmm.show(name)?.definition;
    let rel = load(d, vm.uuid)?.ok_or_else(|| not_enabled(name))?;
    let (next, what) = change
        .apply(&rel.settings)
        .map_err(|why| EnableError::InvalidSettings { why })?;
    if what.is_empty() {
        return Ok(format!(
            "Nothing to change for {name}: every setting given has that value already."
        ));
    }
    // Held while a change of the disk set is made, so that no cycle runs in between.
    let mut _op = None;
    if next.exclude_disks != rel.settings.exclude_disks {
        check_disk_change(d, name, &vm, &rel, &change, &next).await?;
        _op = Some(d.vmm.op_lock(vm.uuid).await);
    }
    if next.replica_server != rel.settings.replica_server
        || next.replica_host_name != rel.settings.replica_host_name
    {
        return repoint(d, name, &vm, &rel, next).await;
    }
    d.db()
        .set_relationship_settings(vm.uuid, &next)
        .map_err(HostError::db("saving the relationship's settings"))?;
    let released = release_excluded(d, &vm, &rel, &next).await;
    drop(_op);
    let summary = what.join(", ");
    let _ = d.db().event(
        Some(vm.uuid),
        &format!("replication settings changed: {summary}"),
    );
    let mut note = String::new();
    if point_policy(&next) != point_policy(&rel.settings) {
        let rt = runtime(d, vm.uuid);
        rt.policy_sent
            .store(false, std::sync::atomic::Ordering::SeqCst);
        match connect(d, &next).await {
            Ok((mut c, _)) => {
                crate::primary::tell_policy(&rt, &mut c, vm.uuid, &next).await;
            }
            Err(e) => {
                tracing::info!(target: "vmrepl::replication", vm = %vm.uuid, "the replica server is not reachable now ({e})")
            }
        }
        if !rt.policy_sent.load(std::sync::atomic::Ordering::SeqCst) {
            note = format!(
                " The replica server {} could not be told the recovery-point policy now; the next cycle tells it.",
                rel.replica_name
            );
        }
    }
    if let Err(e) = released {
        note.push_str(&format!(
            " The change-tracking bitmaps of the excluded disks could not be removed ({e}); they are removed when replication is removed."
        ));
    }
    wake(d, vm.uuid);
    Ok(format!(
        "Replication of {name} changed: {summary}; in force from the next cycle, without a new initial copy of the other disks.{note}"
    ))
}

/// Before `replication set` changes which disks replicate: every disk named exists, at least
/// one stays replicated, and the replica server's release can take a changed set of disks
/// (its `disk-set-changes` feature); an older one would refuse the new definition (or the
/// logs), so the change is refused here, with nothing changed.
async fn check_disk_change(
    d: &Arc<Host>,
    name: &VmName,
    vm: &VmDefinition,
    rel: &Relationship,
    change: &SettingsChange,
    next: &ReplicationSettings,
) -> Result<(), HostError> {
    let named = change
        .include_disk
        .iter()
        .chain(&change.exclude_disk)
        .chain(change.exclude_disks.iter().flatten());
    crate::primary::disks_exist(vm, name.as_str(), named)?;
    if replicated_disks(vm, next).is_empty() {
        return Err(EnableError::NoDiskLeft {
            vm: name.to_string(),
        }
        .into());
    }
    match connect(d, &rel.settings).await {
        Ok((_, theirs)) if theirs.has_feature(vmrepl_types::caps::FEATURE_DISK_SET) => Ok(()),
        Ok((_, theirs)) => Err(EnableError::DisksInPlace {
            vm: name.to_string(),
            server: theirs.host_name,
            release: theirs.release,
        }
        .into()),
        Err(why) => Err(EnableError::DisksNeedReplica {
            vm: name.to_string(),
            server: rel.replica_name.clone(),
            why,
        }
        .into()),
    }
}

/// Releases the change-tracking bitmaps of the disks `next` excludes and `rel` replicated
/// (a bitmap left behind would record every write of a disk nobody replicates). The caller
/// holds the VM's operation lock.
async fn release_excluded(
    d: &Host,
    vm: &VmDefinition,
    rel: &Relationship,
    next: &ReplicationSettings,
) -> Result<(), String> {
    let nodes: Vec<String> = next
        .exclude_disks
        .iter()
        .filter(|x| !rel.settings.exclude_disks.contains(x))
        .cloned()
        .collect();
    if nodes.is_empty() {
        return Ok(());
    }
    let tag = RelTag::from_uuid(&rel.rel_id);
    let ep = Endpoint::open_anyway(d, vm, &nodes, None).await?;
    let r = vmrepl_tracking::stop_tracking(ep.qmp(), tag, &nodes, None).await;
    ep.close().await;
    let _ = d.db().event(
        Some(vm.uuid),
        &format!(
            "disk {} no longer replicated; its change-tracking bitmaps were released",
            nodes.join(", ")
        ),
    );
    r.map_err(|e| e.to_string())
}

/// The runtime of a relationship (its scheduler's, or a fresh one when none runs).
fn runtime(d: &Host, vm: uuid::Uuid) -> Arc<crate::host::RelRuntime> {
    crate::locks::unpoisoned(&d.repl.rels)
        .get(&vm)
        .cloned()
        .unwrap_or_default()
}

/// `set` with a new replica server: it must be able to host the VM before anything changes;
/// then the old replica is told (and keeps its data) and replication starts over there.
async fn repoint(
    d: &Arc<Host>,
    name: &VmName,
    vm: &VmDefinition,
    rel: &Relationship,
    next: ReplicationSettings,
) -> Result<String, HostError> {
    // Nothing changes unless the new server would host the VM.
    let (_, theirs) = crate::primary::check_replica_server(d, &next, vm).await?;
    let mut next = next;
    next.initial = vmrepl_types::replication::InitialReplication::NetworkNow;
    let removed = remove(d, name, false).await?;
    match crate::primary::enable(d, name, next.clone()).await {
        Ok(enabled) => Ok(format!(
            "The replica server of {name} changed from {} to {}: this needs a new initial copy there. {removed} {enabled}",
            rel.replica_name, theirs.host_name
        )),
        Err(e) => Err(HostError::RepointFailed {
            vm: name.to_string(),
            old: rel.replica_name.clone(),
            new: next.replica_server.clone(),
            why: e.to_string(),
        }),
    }
}

/// Replicates now, outside the schedule (and counts no missed cycle); with `app_consistent`
/// the guest is frozen through its agent for the point. Says which point was made.
pub async fn now(d: &Arc<Host>, name: &VmName, app_consistent: bool) -> Result<String, HostError> {
    let vm = d.vmm.show(name)?.definition;
    let rel = load(d, vm.uuid)?.ok_or_else(|| not_enabled(name))?;
    if rel.state != ReplicationState::Replicating {
        return Err(HostError::NotReplicating {
            vm: name.to_string(),
            state: rel.state,
        });
    }
    let consistency = if app_consistent {
        vmrepl_log::Consistency::AppConsistent
    } else {
        vmrepl_log::Consistency::Crash
    };
    let (seq, freeze) = replicate_now(d, vm.uuid, consistency)
        .await
        .map_err(|why| HostError::ReplicateNowFailed {
            vm: name.to_string(),
            why,
        })?;
    let kind = match (app_consistent, freeze) {
        (false, _) => "a crash-consistent point".to_string(),
        (true, Some(Ok(_))) => "an app-consistent point (the guest was frozen)".to_string(),
        (true, Some(Err(why))) => why,
        (true, None) => {
            "a crash-consistent point: the VM is off, its disks were at rest".to_string()
        }
    };
    Ok(format!(
        "Log {seq} of {name} is on {}: {}.",
        rel.replica_name,
        kind.trim_end_matches('.')
    ))
}

/// Resumes a paused relationship, or resynchronizes one (Resume-VMReplication -Resynchronize).
pub fn resume(d: &Arc<Host>, name: &VmName, resynchronize: bool) -> Result<String, HostError> {
    let vm = d.vmm.show(name)?.definition;
    let rel = load(d, vm.uuid)?.ok_or_else(|| not_enabled(name))?;
    if resynchronize {
        change(d, vm.uuid, PrimaryEvent::ResynchronizationRequested, None)?;
        wake(d, vm.uuid);
        return Ok(format!("Resynchronization of {name} started; `vmrepl replication status {name}` shows its progress."));
    }
    let initial_done = rel.acked_seq > 0;
    change(d, vm.uuid, PrimaryEvent::Resumed { initial_done }, None)?;
    wake(d, vm.uuid);
    Ok(format!("Replication of {name} resumed."))
}

/// Removes the relationship on this side (Remove-VMReplication); the replica is told too,
/// and keeps its data unless `delete_replica`.
pub async fn remove(
    d: &Arc<Host>,
    name: &VmName,
    delete_replica: bool,
) -> Result<String, HostError> {
    let vm = d.vmm.show(name)?.definition;
    let rel = load(d, vm.uuid)?.ok_or_else(|| not_enabled(name))?;
    // Asked of the state machine before anything is undone (the row goes at the end).
    crate::lifecycle::on_primary(rel.state, &PrimaryEvent::Removed)?;
    stop_scheduler(d, vm.uuid);
    let _op = d.vmm.op_lock(vm.uuid).await;
    let replica_note = match connect(d, &rel.settings).await {
        Ok((mut c, _)) => match c
            .request(&PeerRequest::RemoveReplica {
                vm_uuid: vm.uuid,
                delete: delete_replica,
            })
            .await
        {
            Ok(PeerResponse::Ok) if delete_replica => format!(
                "the replica on {} was removed, and its data deleted if that host allows it \
                 (`replication server set --allow-remote-delete` there; by default its admin \
                 keeps it)",
                rel.replica_name
            ),
            Ok(PeerResponse::Ok) => format!(
                "the replica on {} was removed and its data kept",
                rel.replica_name
            ),
            Ok(other) => format!("the replica server answered {other:?}; remove it there too"),
            Err(e) => format!(
                "the replica server could not be told ({e}); run `replication remove` there too"
            ),
        },
        Err(e) => {
            format!("the replica server is unreachable ({e}); run `replication remove` there too")
        }
    };
    // Change tracking ends with the relationship: a bitmap left behind records every write.
    let tracking_note = match end_tracking(d, &vm, &rel).await {
        Ok(()) => String::new(),
        Err(e) => format!("; its change-tracking bitmaps could not be removed ({e})"),
    };
    end(d, vm.uuid, PrimaryEvent::Removed)?;
    Ok(format!(
        "Replication of {name} removed; {replica_note}{tracking_note}."
    ))
}

/// Removes every bitmap (and leftover staging) of `rel` from the VM's replicated disks, through
/// its QEMU or qemu-storage-daemon. The caller holds the VM's operation lock.
pub(crate) async fn end_tracking(
    d: &Host,
    vm: &VmDefinition,
    rel: &Relationship,
) -> Result<(), String> {
    let tag = RelTag::from_uuid(&rel.rel_id);
    let nodes: Vec<String> = replicated_disks(vm, &rel.settings)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let ep = Endpoint::open_anyway(d, vm, &nodes, None).await?;
    let r = vmrepl_tracking::stop_tracking(ep.qmp(), tag, &nodes, Some(&d.dd.staging())).await;
    ep.close().await;
    r.map_err(|e| e.to_string())
}

/// A disk was added to VM `vm`: when it is replicated, the new disk is excluded and noted as
/// new (status warns about it until `replication set --include-disk` or `--exclude-disk`
/// names it). Returns whether the VM is replicated.
pub fn new_disk_added(d: &Host, vm: &VmDefinition, id: &str) -> Result<bool, HostError> {
    let Some(rel) = load(d, vm.uuid)? else {
        return Ok(false);
    };
    let mut s = rel.settings.clone();
    if !s.exclude_disks.iter().any(|x| x == id) {
        s.exclude_disks.push(id.to_string());
        s.exclude_disks.sort();
    }
    if !s.new_disks.iter().any(|x| x == id) {
        s.new_disks.push(id.to_string());
    }
    d.db()
        .set_relationship_settings(vm.uuid, &s)
        .map_err(HostError::db("saving the relationship's settings"))?;
    let _ = d.db().event(
        Some(vm.uuid),
        &format!("disk {id} added to a replicated VM; it is not replicated until it is included"),
    );
    Ok(true)
}

pub(crate) fn not_enabled(name: &VmName) -> HostError {
    HostError::NotEnabled {
        vm: name.to_string(),
    }
}
