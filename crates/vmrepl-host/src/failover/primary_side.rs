//! The primary's half of a planned failover: prepare (VM off, final log sent, locked) and
//! cancel; and the answers the old primary gives the replica (`primary_state`).

use crate::db::ReplicaUpdate;
use crate::error::HostError;
use crate::failover::{FailoverError, Refusal};
use crate::host::Host;
use crate::lifecycle::{PrimaryEvent, ReplicaEvent};
use crate::peer::proto::{PeerRequest, PeerResponse, RefusalCode};
use crate::primary;
use crate::replica::{self};
use std::sync::Arc;
use uuid::Uuid;
use vmrepl_types::replication::ReplicationState;
use vmrepl_types::VmName;

/// Planned failover, step 1 on the primary: the VM must be off; it is locked against starting,
/// its last changes are shipped as a planned point, and replication waits.
pub async fn prepare(d: &Arc<Host>, name: &VmName) -> Result<String, HostError> {
    let vm = d.vmm.show(name)?.definition;
    let rel = primary::load(d, vm.uuid)?.ok_or_else(|| FailoverError::NothingToPrepare {
        vm: name.to_string(),
    })?;
    match rel.state {
        ReplicationState::SyncedReplicationComplete => {
            return Ok(format!(
                "VM {name} is already prepared for a planned failover (last log {}).",
                rel.acked_seq
            ))
        }
        s => {
            crate::lifecycle::on_primary(s, &PrimaryEvent::PreparedForFailover)?;
        }
    }
    d.vmm.set_failover_lock(vm.uuid, true).await?;
    match primary::replicate_now(d, vm.uuid, vmrepl_log::Consistency::Planned).await {
        Ok((seq, _)) if primary::load(d, vm.uuid)?.is_some_and(|r| r.last_error.is_none()) => {
            if let Err(e) = primary::change(d, vm.uuid, PrimaryEvent::PreparedForFailover, None) {
                let _ = d.vmm.set_failover_lock(vm.uuid, false).await;
                return Err(e);
            }
            Ok(format!(
                "VM {name} is prepared for a planned failover: its last changes (log {seq}) are on {} and it cannot be started here. Next, on {}: `vmrepl failover start {name}`.",
                rel.replica_name, rel.replica_name
            ))
        }
        res => {
            let why = match res {
                Err(e) => e,
                Ok(_) => primary::load(d, vm.uuid)?
                    .and_then(|r| r.last_error)
                    .unwrap_or_default(),
            };
            let _ = d.vmm.set_failover_lock(vm.uuid, false).await;
            Err(FailoverError::LastChangesNotSent {
                vm: name.to_string(),
                replica: rel.replica_name,
                why,
            }
            .into())
        }
    }
}

/// Cancels a prepare (on the primary) or a failover waiting for completion (on the replica).
pub async fn cancel(d: &Arc<Host>, name: &VmName) -> Result<String, HostError> {
    let prepared = match d.vmm.show(name) {
        Ok(v) => primary::load(d, v.definition.uuid)?,
        Err(_) => None,
    };
    if let Some(rel) = prepared {
        crate::lifecycle::on_primary(rel.state, &PrimaryEvent::PrepareCancelled)?;
        // If the replica already failed over, the VM lives there now (I6).
        if let Ok((mut c, _)) = primary::connect(d, &rel.settings).await {
            if let Ok(PeerResponse::ReplicaState {
                failed_over: true, ..
            }) = c
                .call(&PeerRequest::ReplicaState {
                    vm_uuid: rel.vm_uuid,
                })
                .await
            {
                return Err(FailoverError::AlreadyRunsOnReplica {
                    vm: name.to_string(),
                    replica: rel.replica_name,
                }
                .into());
            }
        }
        d.vmm.set_failover_lock(rel.vm_uuid, false).await?;
        primary::change(d, rel.vm_uuid, PrimaryEvent::PrepareCancelled, None)?;
        primary::wake(d, rel.vm_uuid);
        return Ok(format!(
            "Planned failover of {name} cancelled; the VM can start here and replication goes on."
        ));
    }
    let row = replica::named(d, name)?;
    let Some(f) = row.failover.clone() else {
        return Err(FailoverError::NothingToCancel {
            vm: name.to_string(),
        }
        .into());
    };
    if row.state != ReplicationState::FailedOverWaitingCompletion {
        return Err(FailoverError::AlreadyComplete {
            vm: name.to_string(),
        }
        .into());
    }
    if d.vmm.live_process(row.vm_uuid).await.is_some() {
        d.vmm.stop(name).await?;
    }
    d.vmm.delete(name, false).await?;
    let db = d.db();
    replica::change(
        &db,
        row.vm_uuid,
        ReplicaEvent::FailoverCancelled,
        None,
        ReplicaUpdate::Failover(None),
    )
    .map_err(HostError::from)?;
    let _ = db.event(
        Some(row.vm_uuid),
        &format!("failover to point {} cancelled", f.point_seq),
    );
    Ok(format!(
        "Failover of {name} to point {} cancelled: the failed-over VM and what it wrote are gone; the recovery points are as before. Choose another with `vmrepl failover start {name} --point SEQ`.",
        f.point_seq
    ))
}

// ------------------------------------------------------------------ replica: start, complete

/// `PrimaryState`: answered only to the host this one replicates the VM to.
pub fn primary_state(d: &Host, peer: &str, vm_uuid: Uuid) -> Result<PeerResponse, Refusal> {
    let rel = primary::load(d, vm_uuid)
        .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_string()))?
        .filter(|r| r.replica_name.eq_ignore_ascii_case(peer))
        .ok_or_else(|| {
            Refusal::new(
                RefusalCode::UnknownVm,
                format!("this host does not replicate VM {vm_uuid} to {peer}"),
            )
        })?;
    Ok(PeerResponse::PrimaryState {
        running: replica::vm_running(d, vm_uuid),
        prepared_seq: (rel.state == ReplicationState::SyncedReplicationComplete)
            .then_some(rel.acked_seq),
    })
}
