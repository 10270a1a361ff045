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
use std::sync::Arc;
use vmrepl_tracking::RelTag;
use vmrepl_types::replication::ReplicationState;
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

/// Changes a relationship's settings in place (Set-VMReplication): for now its
/// resynchronization policy, in force from the scheduler's next look.
pub fn set(
    d: &Arc<Host>,
    name: &VmName,
    resync: Option<vmrepl_types::replication::ResyncPolicy>,
) -> Result<String, HostError> {
    let vm = d.vmm.show(name)?.definition;
    let mut rel = load(d, vm.uuid)?.ok_or_else(|| not_enabled(name))?;
    let Some(policy) = resync else {
        return Ok(format!(
            "Nothing to change for {name}; its resynchronization policy is {}.",
            rel.settings.resync
        ));
    };
    rel.settings.resync = policy;
    d.db()
        .set_relationship_settings(vm.uuid, &rel.settings)
        .map_err(HostError::db("saving the relationship's settings"))?;
    let _ = d.db().event(
        Some(vm.uuid),
        &format!("resynchronization policy set to {policy}"),
    );
    wake(d, vm.uuid);
    Ok(format!(
        "The resynchronization policy of {name} is now {policy}."
    ))
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

pub(crate) fn not_enabled(name: &VmName) -> HostError {
    HostError::NotEnabled {
        vm: name.to_string(),
    }
}
