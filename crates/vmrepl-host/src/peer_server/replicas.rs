//! The replica VM's lifecycle as a primary drives it: create (empty, from an existing copy,
//! or by reverse replication), its state and block digests, and removal.

use super::Refusal;
use crate::db::now_ms;
use crate::host::Host;
use crate::lifecycle::ReplicaEvent;
use crate::peer::proto::{PeerResponse, PointPolicy, RefusalCode, Resume};
use crate::peer_server::authorize;
use crate::peer_server::check_definition;
use crate::peer_server::check_policy;
use crate::peer_server::check_vm;
use crate::peer_server::existing_replica;
use crate::peer_server::live_replica;
use crate::peer_server::own_replica;
use crate::peer_server::refuse;
use crate::peer_server::T;
use crate::replica::{self, ReplicaRow};
use std::sync::Arc;
use uuid::Uuid;
use vmrepl_transport::authz::Grant;
use vmrepl_types::replication::ReplicationState;
use vmrepl_types::VmDefinition;

/// The old primary's side of reverse replication (see `crate::failover`).
pub(super) async fn reverse_replica(
    daemon: &Arc<Host>,
    peer: &str,
    vm: VmDefinition,
    (relationship, old_relationship): (Uuid, Option<Uuid>),
    policy: PointPolicy,
    base_seq: u64,
    primary_server: Option<String>,
) -> Result<PeerResponse, Refusal> {
    let grant = authorize(daemon)?;
    check_policy(&policy)?;
    if let Some(row) = existing_replica(daemon, peer, &grant, vm.uuid, relationship)? {
        return Ok(PeerResponse::Reversed {
            delta: row.last_applied == base_seq && base_seq > 0,
            resync: false,
            full_copy_reason: None,
        });
    }
    check_definition(daemon, &vm)?;
    let base = crate::failover::take_over_as_replica(
        daemon,
        peer,
        &vm,
        old_relationship,
        &grant.storage,
        base_seq,
    )
    .await?;
    use crate::failover::TakeOver;
    let adopted = match &base {
        TakeOver::Common => Some(base_seq),
        TakeOver::Diverged(_) => Some(0),
        TakeOver::Nothing(_) => None,
    };
    create_replica(
        daemon,
        peer,
        &grant,
        vm,
        relationship,
        policy,
        primary_server,
        adopted,
    )
    .await?;
    Ok(match base {
        TakeOver::Common => PeerResponse::Reversed {
            delta: true,
            resync: false,
            full_copy_reason: None,
        },
        TakeOver::Diverged(reason) => PeerResponse::Reversed {
            delta: false,
            resync: true,
            full_copy_reason: Some(reason),
        },
        TakeOver::Nothing(reason) => PeerResponse::Reversed {
            delta: false,
            resync: false,
            full_copy_reason: Some(reason),
        },
    })
}

/// Initial replication from an existing copy: the stopped VM of the same name on this host
/// (restored from a backup, say) becomes the replica at sequence 0, once its generation and
/// disks are checked to match; the primary then sends only the blocks that differ.
pub(super) async fn from_existing_copy(
    daemon: &Arc<Host>,
    peer: &str,
    vm: VmDefinition,
    relationship: Uuid,
    policy: PointPolicy,
    primary_server: Option<String>,
) -> Result<PeerResponse, Refusal> {
    let grant = authorize(daemon)?;
    check_policy(&policy)?;
    if existing_replica(daemon, peer, &grant, vm.uuid, relationship)?.is_some() {
        return Ok(PeerResponse::Ok); // the copy was taken already
    }
    check_definition(daemon, &vm)?;
    replica::adopt_existing_copy(daemon, peer, &vm, &grant.storage).await?;
    create_replica(
        daemon,
        peer,
        &grant,
        vm,
        relationship,
        policy,
        primary_server,
        Some(0),
    )
    .await
}

/// Creates a replica VM for an authorized peer; with `adopted` the store exists already
/// (this host's disks were adopted at that sequence: reverse replication, or an existing
/// copy) and only the row is recorded.
#[allow(clippy::too_many_arguments)]
pub(super) async fn create_replica(
    daemon: &Arc<Host>,
    peer: &str,
    grant: &Grant,
    vm: VmDefinition,
    relationship: Uuid,
    policy: PointPolicy,
    primary_server: Option<String>,
    adopted: Option<u64>,
) -> Result<PeerResponse, Refusal> {
    check_policy(&policy)?;
    {
        let db = daemon.db();
        if let Ok(Some(_)) = db.vm_by_uuid(vm.uuid) {
            return Err(refuse(
                RefusalCode::Conflict,
                format!(
                    "VM {} exists on this host as a VM of its own; it cannot also be a replica",
                    vm.uuid
                ),
            ));
        }
    }
    if existing_replica(daemon, peer, grant, vm.uuid, relationship)?.is_some() {
        return Ok(PeerResponse::Ok);
    }
    if adopted.is_none() {
        check_vm(daemon, &vm, grant)?;
    }
    let root = grant.storage.clone();
    let def =
        serde_json::to_value(&vm).map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
    let disks: Vec<(String, u64)> = vm
        .disks
        .iter()
        .map(|d| (d.id.clone(), d.size_bytes))
        .collect();
    let uuid = vm.uuid;
    let dir = vmrepl_store::ReplicaStore::vm_dir(&root, uuid);
    let lock = daemon.replica_locks.vm(&dir);
    let _g = lock.lock().await;
    let created = tokio::task::spawn_blocking(move || -> Result<(), String> {
        if adopted.is_some() {
            return Ok(());
        }
        crate::fsutil::create_private_dir_all(&root)
            .map_err(|e| format!("cannot create the storage folder {}: {e}", root.display()))?;
        let ds: Vec<(&str, u64)> = disks.iter().map(|(i, s)| (i.as_str(), *s)).collect();
        vmrepl_store::ReplicaStore::create(&root, uuid, &def, &ds)
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
    created.map_err(|e| refuse(RefusalCode::Internal, e))?;
    let row = ReplicaRow {
        vm_uuid: uuid,
        name: vm.name.as_str().to_string(),
        primary_host: peer.to_string(),
        trust_group: grant.trust_group.clone(),
        storage_root: grant.storage.clone(),
        relationship,
        definition: vm,
        policy,
        state: if adopted.is_some() {
            ReplicationState::Replicating
        } else {
            ReplicationState::WaitingForInitialReplication
        },
        last_applied: adopted.unwrap_or(0),
        created_ms: now_ms(),
        last_receive_ms: None,
        last_apply_ms: None,
        last_point_ms: None,
        bytes_received: 0,
        logs_received: 0,
        last_error: None,
        primary_server,
        failover: None,
        test_failover: None,
    };
    let db = daemon.db();
    let mut row = row;
    row.name = db
        .unique_replica_name(&row.name, uuid)
        .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
    let holds_point = adopted.is_some_and(|seq| seq > 0);
    db.insert_replica(&row, &ReplicaEvent::ReplicaCreated { holds_point })
        .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
    let _ = db.event(
        Some(uuid),
        &format!("replica of {} created for primary {peer}", row.name),
    );
    tracing::info!(target: T, peer, vm = %uuid, name = %row.name, dir = %dir.display(), "replica created");
    Ok(PeerResponse::Ok)
}

/// `UpdateDefinition`: the primary's VM changed. Its replica keeps the new definition when
/// this host can still run it (I7) and its disks are the ones replicated; its name here stays.
pub(super) async fn update_definition(
    daemon: &Arc<Host>,
    peer: &str,
    vm: VmDefinition,
) -> Result<PeerResponse, Refusal> {
    let row = live_replica(daemon, peer, vm.uuid)?;
    let disks = |d: &VmDefinition| -> Vec<(String, u64)> {
        d.disks
            .iter()
            .map(|x| (x.id.clone(), x.size_bytes))
            .collect()
    };
    // Disks may grow (the replica's copy grows with them), a disk may be added (included on
    // the primary: it joins the store pending, and the log that carries its initial copy
    // makes it part of the points from then on) or removed (excluded: the store drops it from
    // every point); a disk never shrinks.
    let (now, had) = (disks(&vm), disks(&row.definition));
    let size_in = |set: &[(String, u64)], id: &str| set.iter().find(|(i, _)| i == id).map(|x| x.1);
    let grown: Vec<(String, u64)> = now
        .iter()
        .filter(|(i, n)| size_in(&had, i).is_some_and(|o| *n > o))
        .cloned()
        .collect();
    let added: Vec<(String, u64)> = now
        .iter()
        .filter(|(i, _)| size_in(&had, i).is_none())
        .cloned()
        .collect();
    let removed: Vec<String> = had
        .iter()
        .filter(|(i, _)| size_in(&now, i).is_none())
        .map(|(i, _)| i.clone())
        .collect();
    if let Some((i, n)) = now
        .iter()
        .find(|(i, n)| size_in(&had, i).is_some_and(|o| *n < o))
    {
        return Err(refuse(
            RefusalCode::BadRequest,
            format!(
                "disk {i} of VM {} is smaller than its replica ({n} bytes); a disk never shrinks, so the replica needs a new initial copy (remove and enable replication again)",
                vm.name
            ),
        ));
    }
    if now.is_empty() {
        return Err(refuse(
            RefusalCode::BadRequest,
            format!("VM {} would have no replicated disk left", vm.name),
        ));
    }
    if let Some((i, _)) = added.iter().find(|(i, _)| {
        i == crate::peer::proto::NVRAM_DISK_ID || vmrepl_store::validate_disk_id(i).is_err()
    }) {
        return Err(refuse(
            RefusalCode::BadRequest,
            format!("disk id {i:?} cannot be a replica disk (ids are [a-z0-9_-], never \"nvram\")"),
        ));
    }
    if vm.generation != row.definition.generation || vm.machine_type != row.definition.machine_type
    {
        return Err(refuse(
            RefusalCode::BadRequest,
            format!(
                "VM {} changed its generation or machine type, which a VM never does",
                vm.name
            ),
        ));
    }
    check_definition(daemon, &vm)?;
    let dir = replica::vm_dir(&row);
    let lock = daemon.replica_locks.vm(&dir);
    let _g = lock.lock().await;
    if !grown.is_empty() || !added.is_empty() || !removed.is_empty() {
        // Logs received with the old disks are applied first.
        let _ = replica::apply_and_record(daemon, &row).await;
    }
    let def =
        serde_json::to_value(&vm).map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
    let (root, uuid) = (row.storage_root.clone(), vm.uuid);
    let (added2, removed2) = (added.clone(), removed.clone());
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let (added, removed) = (added2, removed2);
        let mut store = vmrepl_store::ReplicaStore::open(&root, uuid).map_err(|e| e.to_string())?;
        for (id, size) in &grown {
            store
                .grow_disk(id, *size)
                .map_err(|e| format!("cannot grow disk {id}: {e}"))?;
        }
        for id in &removed {
            store
                .remove_disk(id)
                .map_err(|e| format!("cannot remove disk {id}: {e}"))?;
        }
        for (id, size) in &added {
            store
                .add_disk(id, *size)
                .map_err(|e| format!("cannot add disk {id}: {e}"))?;
        }
        store.set_vm_definition(&def).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?
    .map_err(|e| refuse(RefusalCode::Internal, e))?;
    let db = daemon.db();
    db.set_replica_definition(uuid, &vm)
        .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
    let _ = db.event(
        Some(uuid),
        &format!(
            "replica of {} now has the primary's definition: {} vCPUs, {} MiB of memory, {} adapter(s)",
            row.name, vm.vcpus, vm.memory_mib, vm.nics.len()
        ),
    );
    for (id, _) in &added {
        let _ = db.event(
            Some(uuid),
            &format!("replica of {}: disk {id} added; it joins the recovery points with the log that carries its initial copy", row.name),
        );
    }
    for id in &removed {
        let _ = db.event(
            Some(uuid),
            &format!("replica of {}: disk {id} is no longer replicated; its copy was removed from every recovery point", row.name),
        );
    }
    Ok(PeerResponse::Ok)
}

pub(super) async fn replica_state(
    daemon: &Arc<Host>,
    peer: &str,
    vm_uuid: Uuid,
) -> Result<PeerResponse, Refusal> {
    let grant = authorize(daemon)?;
    let row = own_replica(daemon, peer, &grant, vm_uuid)?;
    if row.failover.is_some() {
        return Ok(PeerResponse::ReplicaState {
            last_applied: row.last_applied,
            partial: None,
            points: Vec::new(),
            failed_over: true,
            boot: Vec::new(),
        });
    }
    let lock = daemon.replica_locks.vm(&replica::vm_dir(&row));
    let _g = lock.lock().await;
    // Apply what is durable first, so that last_applied is accurate (errors are recorded).
    let _ = replica::apply_and_record(daemon, &row).await;
    let root = row.storage_root.clone();
    let boot = replica::boot_files(&replica::vm_dir(&row));
    // A partial log is a resume point only once nobody writes it any more: while a transfer
    // still holds the receive slot (one cut without a close, say, until its frame deadline),
    // its prefix is still growing.
    let slot = daemon.replica_locks.receive_slot(&replica::vm_dir(&row));
    let receiving = slot.try_lock().is_err();
    tokio::task::spawn_blocking(move || -> Result<PeerResponse, Refusal> {
        let vm = vmrepl_store::ReplicaStore::open(&root, vm_uuid)
            .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
        let last = vm.last_applied();
        let next = vm.partial_log_path(last + 1);
        let partial = match std::fs::File::open(&next) {
            Ok(_) if receiving => None,
            Ok(f) => match vmrepl_log::scan_valid_prefix(std::io::BufReader::new(f)) {
                Ok(p) if p.bytes > 0 => Some((
                    last + 1,
                    Resume {
                        records: p.records,
                        bytes: p.bytes,
                    },
                )),
                _ => None,
            },
            Err(_) => None,
        };
        let points = vm
            .points()
            .into_iter()
            .filter(|p| p.kind == vmrepl_store::PointKind::Frozen)
            .map(|p| (p.seq, p.unix_ms))
            .collect();
        Ok(PeerResponse::ReplicaState {
            last_applied: last,
            partial,
            points,
            failed_over: false,
            boot,
        })
    })
    .await
    .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?
}

pub(super) async fn block_digests(
    daemon: &Arc<Host>,
    peer: &str,
    vm_uuid: Uuid,
) -> Result<PeerResponse, Refusal> {
    let row = live_replica(daemon, peer, vm_uuid)?;
    let lock = daemon.replica_locks.vm(&replica::vm_dir(&row));
    let _g = lock.lock().await;
    let _ = replica::apply_and_record(daemon, &row).await;
    let root = row.storage_root.clone();
    tokio::task::spawn_blocking(move || -> Result<PeerResponse, Refusal> {
        let vm = vmrepl_store::ReplicaStore::open(&root, vm_uuid)
            .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
        let mut disks = Vec::new();
        for (id, _) in vm.disks() {
            let (block_size, ds) = vm
                .block_digests(&id)
                .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
            disks.push(crate::peer::proto::DiskDigests::new(id, block_size, &ds));
        }
        Ok(PeerResponse::BlockDigests { disks })
    })
    .await
    .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?
}

/// `RangeDigests`: the digests of one range of one disk of the replica's latest state (with
/// every received log applied first), for one part of a resynchronization in parts.
pub(super) async fn range_digests(
    daemon: &Arc<Host>,
    peer: &str,
    vm_uuid: Uuid,
    r: crate::peer::proto::DigestRange,
) -> Result<PeerResponse, Refusal> {
    let row = live_replica(daemon, peer, vm_uuid)?;
    let lock = daemon.replica_locks.vm(&replica::vm_dir(&row));
    let _g = lock.lock().await;
    let _ = replica::apply_and_record(daemon, &row).await;
    let root = row.storage_root.clone();
    tokio::task::spawn_blocking(move || -> Result<PeerResponse, Refusal> {
        let vm = vmrepl_store::ReplicaStore::open(&root, vm_uuid)
            .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
        let ds = vm
            .range_digests(&r.disk, r.offset, r.len, r.block_size)
            .map_err(|e| match e {
                vmrepl_store::StoreError::OutOfBounds { .. }
                | vmrepl_store::StoreError::UnknownDisk { .. }
                | vmrepl_store::StoreError::InvalidDiskId { .. } => {
                    refuse(RefusalCode::BadRequest, e.to_string())
                }
                e => refuse(RefusalCode::Internal, e.to_string()),
            })?;
        Ok(PeerResponse::RangeDigests {
            digests: crate::peer::proto::DiskDigests::new(r.disk, r.block_size, &ds),
        })
    })
    .await
    .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?
}

pub(super) async fn remove_replica(
    daemon: &Arc<Host>,
    peer: &str,
    vm_uuid: Uuid,
    delete: bool,
) -> Result<PeerResponse, Refusal> {
    let row = live_replica(daemon, peer, vm_uuid)?;
    // A primary deletes the replica's data only where this host allows it: by default the
    // disaster-recovery copy outlives a primary that is told (or tricked) to drop it.
    let delete = delete && daemon.cfg().replica_server.allow_remote_delete;
    let dir = replica::vm_dir(&row);
    let lock = daemon.replica_locks.vm(&dir);
    let _g = lock.lock().await;
    {
        let db = daemon.db();
        replica::change(
            &db,
            vm_uuid,
            ReplicaEvent::Removed,
            None,
            crate::db::ReplicaUpdate::None,
        )
        .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
        let _ = db.event(
            Some(vm_uuid),
            &format!(
                "replica of {} removed by {peer}{}",
                row.name,
                if delete {
                    ", data deleted".to_string()
                } else {
                    format!(", data kept in {}", dir.display())
                }
            ),
        );
    }
    if delete {
        let root = row.storage_root.clone();
        let r = tokio::task::spawn_blocking(move || {
            vmrepl_store::ReplicaStore::destroy(&root, vm_uuid)
        })
        .await;
        if let Ok(Err(e)) = r {
            tracing::warn!(target: T, dir = %dir.display(), "cannot delete the replica's data: {e}");
        }
    }
    Ok(PeerResponse::Ok)
}
