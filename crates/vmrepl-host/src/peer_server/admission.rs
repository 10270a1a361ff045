//! Who may ask what: the replica server must be enabled, the primary authorized by an
//! entry (its verified certificate name, issuer and pin), and a request about a replica VM
//! must come from the primary that owns it; what a primary sends must fit this host.

use super::Refusal;
use crate::host::Host;
use crate::peer::proto::{PointPolicy, RefusalCode, NVRAM_DISK_ID};
use crate::peer_server::refuse;
use crate::peer_server::PEER;
use crate::replica::ReplicaRow;
use std::path::Path;
use uuid::Uuid;
use vmrepl_transport::authz::{Authorization, Grant};
use vmrepl_types::VmDefinition;

/// Longest recovery-point interval a primary may ask for (a week).
pub(super) const MAX_POINT_INTERVAL_SECS: u32 = 7 * 86400;
/// Most vCPUs a peer's VM definition may ask for.
pub(super) const MAX_VCPUS: u32 = 288;
/// Most memory a peer's VM definition may ask for (4 TiB).
pub(super) const MAX_MEMORY_MIB: u64 = 4 << 20;

pub(super) fn server_enabled(daemon: &Host) -> Result<Authorization, Refusal> {
    let cfg = daemon.cfg();
    if !cfg.replica_server.enabled {
        return Err(refuse(
            RefusalCode::Disabled,
            format!(
                "the replica server on {} is disabled; enable it with `vmrepl replication server \
                 set --enable`",
                cfg.host_name
            ),
        ));
    }
    Authorization::try_from(&cfg.replica_server).map_err(|e| {
        refuse(
            RefusalCode::Internal,
            format!(
                "the replica server settings on {} are not valid: {e}",
                cfg.host_name
            ),
        )
    })
}

/// The grant of the primary whose request is being handled: its verified certificate (the
/// connection's [`PEER`]: every request runs in that scope) checked against the matching
/// entry, `issuer` and `pin` included.
pub(super) fn authorize(daemon: &Host) -> Result<Grant, Refusal> {
    let authz = server_enabled(daemon)?;
    PEER.try_with(|p| authz.authorize_peer(p))
        .map_err(|_| {
            refuse(
                RefusalCode::Internal,
                "a request was handled outside its connection (no verified peer)",
            )
        })?
        .map_err(|e| refuse(RefusalCode::NotAuthorized, e.to_string()))
}

pub(super) fn lookup(daemon: &Host, vm_uuid: Uuid) -> Result<Option<ReplicaRow>, Refusal> {
    let db = daemon.db();
    db.replica(vm_uuid)
        .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))
}

/// The replica of `vm_uuid`, if the (authorized) primary may act on it.
pub(super) fn own_replica(
    daemon: &Host,
    peer: &str,
    grant: &Grant,
    vm_uuid: Uuid,
) -> Result<ReplicaRow, Refusal> {
    let row = lookup(daemon, vm_uuid)?.ok_or_else(|| {
        refuse(
            RefusalCode::UnknownVm,
            format!("this host keeps no replica of VM {vm_uuid}; create it first"),
        )
    })?;
    if row.trust_group != grant.trust_group {
        return Err(refuse(
            RefusalCode::WrongTrustGroup,
            format!(
                "the replica of {} ({vm_uuid}) belongs to trust group {:?}; primary {peer} is in \
                 trust group {:?}",
                row.name, row.trust_group, grant.trust_group
            ),
        ));
    }
    if !row.primary_host.eq_ignore_ascii_case(peer) {
        return Err(refuse(
            RefusalCode::Conflict,
            format!(
                "the replica of {} ({vm_uuid}) is replicated from {}, not from {peer}",
                row.name, row.primary_host
            ),
        ));
    }
    Ok(row)
}

pub(super) fn failed_over(row: &ReplicaRow, f: &crate::replica::FailoverRecord) -> Refusal {
    refuse(
        RefusalCode::FailedOver,
        format!(
            "the replica of {} failed over to point {} on this host; it takes no more logs \
             (reverse replication or a new relationship replaces it)",
            row.name, f.point_seq
        ),
    )
}

/// The replica of `vm_uuid` that the authorized primary `peer` may still feed: its own, and
/// not failed over.
pub(super) fn live_replica(
    daemon: &Host,
    peer: &str,
    vm_uuid: Uuid,
) -> Result<ReplicaRow, Refusal> {
    let grant = authorize(daemon)?;
    let row = own_replica(daemon, peer, &grant, vm_uuid)?;
    match &row.failover {
        Some(f) => Err(failed_over(&row, f)),
        None => Ok(row),
    }
}

pub(super) fn free_bytes(path: &Path) -> Option<u64> {
    vmrepl_store::spool::free_bytes(path).ok()
}

/// This host's QEMU must run the VM exactly as it is (I7).
pub(super) fn runs_here(daemon: &Host, vm: &VmDefinition) -> Result<(), Refusal> {
    daemon
        .vmm
        .caps()
        .check_runs(vm)
        .map_err(|why| refuse(RefusalCode::Incompatible, why))
}

/// The replica of `vm_uuid` kept here, if any: `Some` when it is the one `peer` asked for under
/// `relationship` (the answer to an earlier request was lost, so the peer asks again), a
/// refusal when the VM is replicated here for anyone or anything else.
pub(super) fn existing_replica(
    daemon: &Host,
    peer: &str,
    grant: &Grant,
    vm_uuid: Uuid,
    relationship: Uuid,
) -> Result<Option<ReplicaRow>, Refusal> {
    match lookup(daemon, vm_uuid)? {
        None => Ok(None),
        Some(row)
            if row.relationship == relationship
                && row.primary_host.eq_ignore_ascii_case(peer)
                && row.trust_group == grant.trust_group =>
        {
            Ok(Some(row))
        }
        Some(row) => Err(refuse(
            RefusalCode::Conflict,
            format!(
                "this host already keeps a replica of VM {} ({}) for primary {} (relationship {}); \
                 remove it first",
                row.name, vm_uuid, row.primary_host, row.relationship
            ),
        )),
    }
}

pub(super) fn check_vm(daemon: &Host, vm: &VmDefinition, grant: &Grant) -> Result<(), Refusal> {
    check_definition(daemon, vm)?;
    let needed: u64 = vm
        .disks
        .iter()
        .try_fold(0u64, |a, d| a.checked_add(d.size_bytes))
        .ok_or_else(|| refuse(RefusalCode::BadRequest, "the VM's disk sizes overflow"))?
        .saturating_add(vmrepl_store::SPACE_HEADROOM);
    if let Some(free) = free_bytes(&grant.storage) {
        if free < needed {
            return Err(refuse(
                RefusalCode::DiskFull,
                format!(
                    "the replica storage {} has {free} bytes free; VM {} needs {needed} bytes",
                    grant.storage.display(),
                    vm.name
                ),
            ));
        }
    }
    Ok(())
}

/// What a peer's VM definition must be before anything is done with it: runnable here (I7),
/// with valid, bounded disks.
pub(super) fn check_definition(daemon: &Host, vm: &VmDefinition) -> Result<(), Refusal> {
    runs_here(daemon, vm)?;
    if vm.disks.is_empty() {
        return Err(refuse(RefusalCode::BadRequest, "the VM has no disks"));
    }
    if vm.disks.len() >= vmrepl_log::MAX_DISKS {
        return Err(refuse(
            RefusalCode::BadRequest,
            format!(
                "the VM has {} disks; a replica takes at most {}",
                vm.disks.len(),
                vmrepl_log::MAX_DISKS - 1
            ),
        ));
    }
    if vm.vcpus == 0 || vm.vcpus > MAX_VCPUS || vm.memory_mib == 0 || vm.memory_mib > MAX_MEMORY_MIB
    {
        return Err(refuse(
            RefusalCode::BadRequest,
            format!(
                "the VM asks for {} vCPUs and {} MiB; a replica takes 1 to {MAX_VCPUS} vCPUs and \
                 1 to {MAX_MEMORY_MIB} MiB",
                vm.vcpus, vm.memory_mib
            ),
        ));
    }
    for d in &vm.disks {
        if d.id == NVRAM_DISK_ID {
            return Err(refuse(
                RefusalCode::BadRequest,
                format!("disk id {NVRAM_DISK_ID:?} is reserved for the NVRAM"),
            ));
        }
        vmrepl_store::validate_disk_id(&d.id)
            .map_err(|e| refuse(RefusalCode::BadRequest, e.to_string()))?;
        if d.size_bytes == 0 || d.size_bytes % 512 != 0 {
            return Err(refuse(
                RefusalCode::BadRequest,
                format!(
                    "disk {} has size {} bytes; sizes are positive multiples of 512",
                    d.id, d.size_bytes
                ),
            ));
        }
    }
    Ok(())
}

/// The recovery-point policy a primary may ask for: what `replication enable` itself allows
/// (0 to 24 points, an interval no shorter than the shortest frequency and at most a week).
pub(super) fn check_policy(policy: &PointPolicy) -> Result<(), Refusal> {
    use vmrepl_types::replication::ReplicationSettings as S;
    if policy.keep > S::MAX_RECOVERY_POINTS {
        return Err(refuse(
            RefusalCode::BadRequest,
            format!(
                "{} recovery points asked; 0 to {} are kept",
                policy.keep,
                S::MAX_RECOVERY_POINTS
            ),
        ));
    }
    if policy.interval_secs < S::MIN_FREQUENCY || policy.interval_secs > MAX_POINT_INTERVAL_SECS {
        return Err(refuse(
            RefusalCode::BadRequest,
            format!(
                "a recovery point every {} s asked; {} to {MAX_POINT_INTERVAL_SECS} s are allowed",
                policy.interval_secs,
                S::MIN_FREQUENCY
            ),
        ));
    }
    Ok(())
}
