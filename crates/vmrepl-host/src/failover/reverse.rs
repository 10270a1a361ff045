//! Reverse replication after a failover: the failed-over VM becomes the primary of a new
//! relationship, and the old primary takes over as its replica, keeping its disks as the
//! base where they match the failover point (no full copy).

use crate::db::NewRelationship;
use crate::error::ApiAnswer;
use crate::error::HostError;
use crate::failover::FailoverError;
use crate::host::Host;
use crate::lifecycle::{PrimaryEvent, ReplicaEvent, ReverseStart};
use crate::peer::proto::{PeerRequest, PeerResponse, RefusalCode};
use crate::primary;
use crate::replica::{self};
use std::path::Path;
use std::sync::Arc;
use uuid::Uuid;
use vmrepl_types::replication::{ReplicationSettings, ReplicationState};
use vmrepl_types::{VmDefinition, VmName};

/// After a failover, replicates the VM back to the old primary (which must authorize this
/// host). Only the changes since the failover go when the old primary prepared the VM at the
/// failover's point; otherwise a full copy, and the status says why.
pub async fn reverse(
    d: &Arc<Host>,
    name: &VmName,
    settings: ReplicationSettings,
) -> Result<String, HostError> {
    let row = replica::named(d, name)?;
    let f = match (&row.failover, row.state) {
        (Some(f), ReplicationState::FailedOver) => f.clone(),
        (Some(_), _) => {
            return Err(FailoverError::CompleteFirst {
                vm: name.to_string(),
            }
            .into())
        }
        (None, _) => {
            return Err(FailoverError::NotFailedOver {
                vm: name.to_string(),
            }
            .into())
        }
    };
    let mut settings = settings;
    if settings.replica_server.is_empty() {
        // Back to where the old primary said it listens, under the name its certificate has.
        settings.replica_server =
            row.primary_server
                .clone()
                .ok_or_else(|| FailoverError::NoPrimaryAddress {
                    primary: row.primary_host.clone(),
                })?;
        settings
            .replica_host_name
            .get_or_insert_with(|| row.primary_host.clone());
    }
    settings
        .validate()
        .map_err(|why| FailoverError::InvalidSettings { why })?;
    let def = d
        .vmm
        .definition(row.vm_uuid)
        .ok_or_else(|| FailoverError::VmGone {
            vm: name.to_string(),
        })?;
    let (mut client, theirs) = primary::reach_replica(d, &settings, &def).await?;
    let replica_vm = primary::replica_view(&def, &settings);
    let policy = primary::point_policy(&settings);
    let my_addr = d
        .cfg()
        .advertised()
        .map_err(|why| crate::primary::EnableError::NoAdvertisedAddress { why })?;
    let answer = client
        .request(&PeerRequest::ReverseReplica {
            vm: Box::new(replica_vm),
            relationship: f.relationship,
            policy,
            base_sequence: if f.planned { f.point_seq } else { 0 },
            primary_server: Some(my_addr),
            old_relationship: Some(row.relationship),
        })
        .await
        .map_err(|source| FailoverError::ReverseRequest { source })?;
    let (delta, resync, reason) = match answer {
        PeerResponse::Reversed {
            delta,
            resync,
            full_copy_reason,
        } => (delta, resync, full_copy_reason),
        PeerResponse::Refused { message, code } => {
            return Err(FailoverError::ReverseRefused {
                vm: name.to_string(),
                replica: theirs.host_name,
                message,
                code,
                this_host: d.vmm.caps().host_name.clone(),
            }
            .into());
        }
        other => {
            return Err(FailoverError::UnexpectedAnswer {
                from: theirs.host_name,
                answer: format!("{other:?}"),
            }
            .into())
        }
    };
    if let Err(e) = primary::send_boot_files(&mut client, &def, &[]).await {
        tracing::warn!(target: "vmrepl::failover", vm = %name, "boot files not sent yet: {e}");
    }
    let (start, acked) = if delta {
        (ReverseStart::CommonPoint, f.point_seq)
    } else if resync {
        (ReverseStart::Resynchronize, 0)
    } else {
        (ReverseStart::FullCopy, 0)
    };
    let note = reason.as_ref().map(|r| {
        if resync {
            format!(
                "no common base with {} ({r}): its disks are kept and resynchronized by block compare",
                theirs.host_name
            )
        } else {
            format!("full copy: no common base with {} ({r})", theirs.host_name)
        }
    });
    primary::insert(
        d,
        NewRelationship {
            vm: row.vm_uuid,
            rel_id: f.relationship,
            settings: &settings,
            replica_name: &theirs.host_name,
            acked_seq: acked,
            note: note.as_deref(),
        },
        PrimaryEvent::ReverseReplicationStarted { start },
    )?;
    {
        let db = d.db();
        replica::change(
            &db,
            row.vm_uuid,
            ReplicaEvent::ReverseReplicationStarted,
            None,
            crate::db::ReplicaUpdate::None,
        )
        .map_err(HostError::from)?;
    }
    primary::spawn(d, row.vm_uuid);
    Ok(if delta {
        format!("Replication of {name} reversed: this host is now its primary and {} its replica; only the changes since the failover (log {}) are sent.", theirs.host_name, f.point_seq)
    } else if resync {
        format!(
            "Replication of {name} reversed to {}, which kept its copy: {}; it is resynchronized by block compare, only the blocks that differ are sent.",
            theirs.host_name,
            reason.unwrap_or_default()
        )
    } else {
        format!(
            "Replication of {name} reversed to {}, with a full copy: {}.",
            theirs.host_name,
            reason.unwrap_or_default()
        )
    })
}

// ------------------------------------------------------------------ peer side

pub(crate) use crate::peer::proto::Refusal;

/// Decides whether this host's copy of `vm` is the common base at `base_seq` for `peer`.
pub fn common_base(
    local: &VmDefinition,
    rel: &primary::Relationship,
    vm: &VmDefinition,
    base_seq: u64,
) -> Result<(), String> {
    if base_seq == 0 {
        return Err(
            "the failover was not planned, so this host may hold writes the replica never received"
                .into(),
        );
    }
    if rel.state != ReplicationState::SyncedReplicationComplete || rel.acked_seq != base_seq {
        return Err(format!(
            "this host was not prepared for a planned failover at log {base_seq} (replication is {}, last log {})",
            rel.state, rel.acked_seq
        ));
    }
    let mine: Vec<(&str, u64)> = local
        .disks
        .iter()
        .map(|x| (x.id.as_str(), x.size_bytes))
        .collect();
    let theirs: Vec<(&str, u64)> = vm
        .disks
        .iter()
        .map(|x| (x.id.as_str(), x.size_bytes))
        .collect();
    if mine != theirs {
        return Err(format!(
            "the disks differ (here {mine:?}, there {theirs:?})"
        ));
    }
    if !rel.settings.exclude_disks.is_empty() {
        return Err(
            "some disks were excluded from replication, so this host's copy is not the replica's"
                .into(),
        );
    }
    Ok(())
}

/// A peer may turn this host's VM `vm_uuid` into a replica only when this host replicates
/// that VM to it under `relationship` (the relationship the failover on the peer came from).
/// Returns that relationship. The refusal names neither the VM nor its disks: the peer may
/// know nothing of them.
pub fn may_take_over(
    d: &Host,
    peer: &str,
    vm_uuid: Uuid,
    relationship: Option<Uuid>,
) -> Result<primary::Relationship, Refusal> {
    let refused = || {
        Refusal::new(
            RefusalCode::NotAuthorized,
            format!(
                "VM {vm_uuid} exists on this host but is not replicated to {peer} under \
                 relationship {}; a peer may only reverse the replication of a VM this host \
                 replicates to it, so nothing was changed",
                relationship.map_or("(none given)".to_string(), |r| r.to_string())
            ),
        )
    };
    let rel = primary::load(d, vm_uuid)
        .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_string()))?
        .ok_or_else(refused)?;
    let to_peer = vmrepl_transport::authz::normalize_host_name(&rel.replica_name)
        .ok()
        .zip(vmrepl_transport::authz::normalize_host_name(peer).ok())
        .is_some_and(|(a, b)| a == b);
    if !to_peer || Some(rel.rel_id) != relationship {
        return Err(refused());
    }
    Ok(rel)
}

/// What the old primary's copy of a VM is to the failed-over one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeOver {
    /// Exactly the failover point: adopted at that sequence, deltas flow at once.
    Common,
    /// The same disks, but they may differ anywhere (the reason): adopted at sequence 0, and
    /// the new primary resynchronizes them by compare.
    Diverged(String),
    /// No usable copy (the reason): the replica starts empty, a full copy follows.
    Nothing(String),
}

/// The old primary's side of a reverse: its VM stops being a VM here and becomes the
/// replica of the failed-over one. Its disks (and NVRAM) are adopted as the replica's base,
/// at `base_seq` when they hold the failover point, else at 0 for a resynchronization. With no
/// copy here the replica starts empty (a full copy follows).
///
/// Only the host this one replicates the VM to, under the same relationship, may ask: a
/// local VM that was never replicated to `peer` is refused before anything is touched (a peer
/// must never be able to delete or take over this host's own VMs). A copy whose disks differ
/// in shape is refused too rather than deleted: this host's admin decides what happens to it.
pub async fn take_over_as_replica(
    d: &Arc<Host>,
    peer: &str,
    vm: &VmDefinition,
    relationship: Option<Uuid>,
    storage_root: &Path,
    base_seq: u64,
) -> Result<TakeOver, Refusal> {
    let Some(local) = d.vmm.definition(vm.uuid) else {
        return Ok(TakeOver::Nothing("this host has no copy of the VM".into()));
    };
    let rel = may_take_over(d, peer, vm.uuid, relationship)?;
    if replica::vm_running(d, vm.uuid) {
        return Err(Refusal::new(
            RefusalCode::VmRunning,
            format!(
                "VM {} runs on this host; it cannot become a replica while it runs",
                local.name
            ),
        ));
    }
    let same_disks = local
        .disks
        .iter()
        .map(|x| (x.id.as_str(), x.size_bytes))
        .eq(vm.disks.iter().map(|x| (x.id.as_str(), x.size_bytes)));
    // A copy changed outside vmrepl since the prepare shut it down is no common base, even
    // with every log acknowledged: it may differ anywhere.
    let changed = crate::fingerprint::changed_since_closed(&d.db(), &local)
        .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_string()))?;
    let (outcome, adopt_at) = match (common_base(&local, &rel, vm, base_seq), changed) {
        (Ok(()), None) => (TakeOver::Common, base_seq),
        (Ok(()), Some(why)) => (TakeOver::Diverged(why), 0),
        (Err(why), _) if same_disks => (TakeOver::Diverged(why), 0),
        (Err(why), _) => {
            // Never delete this host's disks because a peer asked: its admin decides.
            return Err(Refusal::new(
                RefusalCode::Incompatible,
                format!(
                    "VM {} on this host has other disks than the failed-over VM ({why}), so it \
                     cannot become its replica; on this host delete it (`vmrepl vm delete {}`), \
                     then reverse replication again",
                    local.name, local.name
                ),
            ));
        }
    };
    let internal = |e: String| Refusal::new(RefusalCode::Internal, e);
    // No cycle of the old relationship may run from here on, and nobody may start the VM.
    primary::stop_scheduler(d, vm.uuid);
    d.vmm
        .set_failover_lock(vm.uuid, true)
        .await
        .map_err(|e| Refusal::new(RefusalCode::VmRunning, e.to_api().message))?;
    let op = d.vmm.op_lock(vm.uuid).await;
    // Tracking of the old relationship ends here (its bitmaps would record forever).
    primary::end_tracking(d, &local, &rel).await.map_err(|e| {
        internal(format!(
            "cannot end change tracking on this host's copy: {e}"
        ))
    })?;
    replica::adopt_disks(&local, vm, storage_root, adopt_at)
        .await
        .map_err(|e| {
            internal(format!(
                "cannot adopt this host's disks as the replica: {e}"
            ))
        })?;
    primary::end(d, vm.uuid, PrimaryEvent::ReverseReplicationAccepted)
        .map_err(|e| internal(e.to_string()))?;
    drop(op);
    // The VM now lives on the peer: drop it here (with the adoption its data lives on as the
    // replica's base, through the store's own links).
    d.vmm
        .delete(&local.name, false)
        .await
        .map_err(|e| internal(e.to_api().message))?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::tests::def;

    fn prepared_at(seq: u64, state: ReplicationState) -> primary::Relationship {
        primary::Relationship {
            vm_uuid: Uuid::new_v4(),
            rel_id: Uuid::new_v4(),
            settings: vmrepl_types::replication::ReplicationSettings::new("h:1"),
            replica_name: "h".into(),
            state,
            acked_seq: seq,
            last_error: None,
            created_ms: 0,
            last_success_ms: None,
            note: None,
            resync_sweep: None,
        }
    }

    #[test]
    fn the_old_primarys_disks_are_the_common_base_only_when_prepared_at_the_failover_point() {
        let disks = [("disk0", 1 << 20), ("disk1", 2 << 20)];
        let (local, vm) = (def(&disks), def(&disks));
        let prepared = prepared_at(7, ReplicationState::SyncedReplicationComplete);
        assert_eq!(common_base(&local, &prepared, &vm, 7), Ok(()));
        // An unplanned failover, a prepare at another log, or no prepare at all: not whole.
        let e = common_base(&local, &prepared, &vm, 0).unwrap_err();
        assert!(e.contains("not planned"), "{e}");
        let e = common_base(&local, &prepared, &vm, 8).unwrap_err();
        assert!(e.contains("at log 8") && e.contains("last log 7"), "{e}");
        let running = prepared_at(7, ReplicationState::Replicating);
        assert!(common_base(&local, &running, &vm, 7).is_err());
        // Other disks, or disks left out of replication.
        let e = common_base(&local, &prepared, &def(&[("disk0", 1 << 20)]), 7).unwrap_err();
        assert!(e.contains("disks differ"), "{e}");
        let mut partial = prepared_at(7, ReplicationState::SyncedReplicationComplete);
        partial.settings.exclude_disks = vec!["disk1".into()];
        assert!(common_base(&local, &partial, &vm, 7).is_err());
    }
}
