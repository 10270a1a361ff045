//! Disks a replica did not receive as logs: an initial copy imported from an export, an
//! existing copy the admin designated, and the disks of an old primary taking over as replica.

use crate::db::now_ms;
use crate::db::ReplicaRow;
use crate::error::ApiAnswer;
use crate::error::HostError;
use crate::host::Host;
use crate::peer::proto::{Refusal, RefusalCode};
use crate::replica::accept_spooled;
use crate::replica::apply_and_record;
use crate::replica::named;
use crate::replica::vm_dir;
use crate::replica::ReplicaError;
use crate::replica::Unaccepted;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;
use vmrepl_store::ReplicaStore;
use vmrepl_types::VmDefinition;

/// Whether a VM with this uuid runs on this host (a normal VM in the `vms` table).
pub fn vm_running(daemon: &Host, vm_uuid: Uuid) -> bool {
    let db = daemon.db();
    match db.vm_by_uuid(vm_uuid) {
        Ok(Some(row)) => !row.state.is_stopped(),
        _ => false,
    }
}

// ------------------------------------------------------------------ adoption

/// Makes the disks (and NVRAM) of `local`, a VM of this host, the base of the replica store
/// of `vm` at sequence `at`. Hard links (a copy across file systems), so a crash at any step
/// loses nothing; the caller deletes the local VM afterwards. Only the disks `vm` replicates
/// are taken.
pub(crate) async fn adopt_disks(
    local: &VmDefinition,
    vm: &VmDefinition,
    storage_root: &Path,
    at: u64,
) -> Result<(), String> {
    let root = storage_root.to_path_buf();
    let local = local.clone();
    let wanted: Vec<String> = vm.disks.iter().map(|x| x.id.clone()).collect();
    let defv = serde_json::to_value(vm).map_err(|e| e.to_string())?;
    let uuid = vm.uuid;
    let unix_ms = now_ms() as i64;
    tokio::task::spawn_blocking(move || {
        crate::fsutil::create_private_dir_all(&root).map_err(|e| e.to_string())?;
        let disks: Vec<(&str, u64, &Path)> = local
            .disks
            .iter()
            .filter(|x| wanted.contains(&x.id))
            .map(|x| (x.id.as_str(), x.size_bytes, x.path.as_path()))
            .collect();
        // Stored under the replicated VM's identity (a restored copy has its own UUID).
        ReplicaStore::adopt(
            &root,
            uuid,
            &defv,
            &disks,
            local.nvram.as_deref(),
            (at, unix_ms),
        )
        .map(drop)
        .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Why a VM of this host cannot serve as the existing copy of `vm` (Hyper-V: the generation
/// and the disks must match), or None when it can.
pub fn existing_copy_mismatch(local: &VmDefinition, vm: &VmDefinition) -> Option<String> {
    if local.generation != vm.generation {
        return Some(format!(
            "it is generation {}, the VM is generation {}",
            local.generation, vm.generation
        ));
    }
    if local.nvram.is_some() != vm.nvram.is_some() {
        return Some(if vm.nvram.is_some() {
            "it has no NVRAM file and the VM has one".into()
        } else {
            "it has an NVRAM file and the VM has none".into()
        });
    }
    let show = |v: &VmDefinition| {
        v.disks
            .iter()
            .map(|x| format!("{} {} bytes", x.id, x.size_bytes))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let fits = vm.disks.iter().all(|want| {
        local
            .disks
            .iter()
            .any(|x| x.id == want.id && x.size_bytes == want.size_bytes)
    });
    (!fits).then(|| {
        format!(
            "its disks ({}) do not match the VM's ({})",
            show(local),
            show(vm)
        )
    })
}

/// `replication server accept-copy`: this host's admin designates the stopped local VM
/// `name` as the existing copy that `primary` may adopt (or withdraws that). Only a designated
/// VM can ever be adopted, and only by the primary named here.
pub fn accept_copy(
    d: &Host,
    name: &vmrepl_types::VmName,
    primary: &str,
    withdraw: bool,
) -> Result<String, HostError> {
    let primary = vmrepl_transport::authz::normalize_host_name(primary).map_err(|e| {
        ReplicaError::NotAHostName {
            primary: primary.to_string(),
            reason: e.to_string(),
        }
    })?;
    let vm = d.vmm.show(name)?;
    let uuid = vm.definition.uuid;
    let replicated = d
        .db()
        .relationship(uuid)
        .map_err(HostError::db("reading the relationships"))?
        .is_some();
    let db = d.db();
    if withdraw {
        let had = db
            .withdraw_copy(uuid)
            .map_err(HostError::db("withdrawing an existing copy"))?;
        return Ok(if !had {
            format!("VM {name} was not designated as an existing copy; nothing changed.")
        } else {
            let _ = db.event(
                Some(uuid),
                &format!("{name} is no longer an existing copy for a primary"),
            );
            format!("VM {name} can no longer be adopted by any primary.")
        });
    }
    if replicated {
        return Err(ReplicaError::ItselfReplicated {
            vm: name.to_string(),
        }
        .into());
    }
    db.accept_copy(uuid, &primary)
        .map_err(HostError::db("designating an existing copy"))?;
    let _ = db.event(
        Some(uuid),
        &format!("{name} designated as the existing copy for primary {primary}"),
    );
    Ok(format!(
        "VM {name} may now be adopted by {primary} as the replica of its VM {name} \
         (`vmrepl replication enable {name} --initial-existing-copy ...` on {primary}); its \
         replicated disks then belong to the replica, and no other primary can take it."
    ))
}

/// The local VM that `peer` may adopt as the existing copy of `vm`: the stopped VM named like
/// it that this host's admin designated for `peer`. The refusal says the same whether or not
/// a VM of that name exists, so a peer learns nothing of this host's VMs.
pub(crate) fn designated_copy(
    d: &Host,
    peer: &str,
    vm: &VmDefinition,
) -> Result<VmDefinition, Refusal> {
    let host = d.cfg().host_name.clone();
    let peer_norm = vmrepl_transport::authz::normalize_host_name(peer).unwrap_or_default();
    let refused = || {
        Refusal::new(
            RefusalCode::NotAuthorized,
            format!(
                "no VM on {host} is designated as the existing copy of {} for {peer}; the admin \
                 of {host} designates one with `vmrepl replication server accept-copy {} \
                 --primary {peer}`",
                vm.name, vm.name
            ),
        )
    };
    let local = d.vmm.show(&vm.name).map_err(|_| refused())?;
    let uuid = local.definition.uuid;
    let designated: Option<String> = {
        d.db()
            .accepted_copy(uuid)
            .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_string()))?
    };
    if designated.as_deref() != Some(peer_norm.as_str()) || peer_norm.is_empty() {
        return Err(refused());
    }
    if !local.state.is_stopped() {
        return Err(Refusal::new(
            RefusalCode::VmRunning,
            format!(
                "the existing copy {} on {host} is {}; shut it down first",
                vm.name, local.state
            ),
        ));
    }
    Ok(local.definition)
}

/// Initial replication from an existing copy: the stopped VM named like `vm` on this host,
/// designated by this host's admin for `peer`, becomes the base of `vm`'s replica store at
/// sequence 0 and is no longer a VM of its own. Only its replicated disks are taken; any
/// other disk stays where it is.
/// Whether the VM designated on this host as the existing copy of `vm` for `peer` could become
/// its replica: designated, stopped, not replicated itself, and the same generation and disks.
/// Returns that copy. What `vmrepl doctor` asks before an `--initial-existing-copy`.
pub fn check_existing_copy(
    d: &Host,
    peer: &str,
    vm: &VmDefinition,
) -> Result<VmDefinition, Refusal> {
    let host = d.cfg().host_name.clone();
    let local = designated_copy(d, peer, vm)?;
    if d.db()
        .relationship(local.uuid)
        .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_string()))?
        .is_some()
    {
        return Err(Refusal::new(
            RefusalCode::Conflict,
            format!(
                "VM {} on {host} is itself replicated; remove its replication before using it as an existing copy",
                vm.name
            ),
        ));
    }
    if let Some(why) = existing_copy_mismatch(&local, vm) {
        return Err(Refusal::new(
            RefusalCode::Incompatible,
            format!(
                "VM {} on {host} cannot be the existing copy: {why}",
                vm.name
            ),
        ));
    }
    Ok(local)
}

pub async fn adopt_existing_copy(
    d: &Arc<Host>,
    peer: &str,
    vm: &VmDefinition,
    storage_root: &Path,
) -> Result<(), Refusal> {
    let local = check_existing_copy(d, peer, vm)?;
    d.vmm
        .set_failover_lock(local.uuid, true)
        .await
        .map_err(|e| Refusal::new(RefusalCode::VmRunning, e.to_api().message))?;
    if let Err(e) = adopt_disks(&local, vm, storage_root, 0).await {
        // Nothing was taken: the copy stays a VM of this host, free to start again.
        let _ = d.vmm.set_failover_lock(local.uuid, false).await;
        return Err(Refusal::new(
            RefusalCode::Internal,
            format!("cannot take the disks of {} as the replica: {e}", vm.name),
        ));
    }
    // The adopted disks live on in the store (hard links or copies); the VM's own names for
    // them go, the disks it did not replicate stay.
    d.vmm
        .delete(&vm.name, true)
        .await
        .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_api().message))?;
    for x in local.disks.iter().filter(|x| vm.disk(&x.id).is_some()) {
        let _ = std::fs::remove_file(&x.path);
    }
    if let Some(n) = &local.nvram {
        let _ = std::fs::remove_file(n);
    }
    {
        let _ = d.db().withdraw_copy(local.uuid);
    }
    tracing::info!(target: "vmrepl::replica", vm = %vm.uuid, name = %vm.name, peer, "existing copy adopted at sequence 0");
    Ok(())
}

// ------------------------------------------------------------------ receiving logs

/// Imports the initial copy a primary exported to external media (Import-VMInitialReplication):
/// `from` is the exported `NAME.vmrlog`, or the folder that holds it. The log is copied into
/// the replica's spool, verified whole (checksums, VM, sequence 1 on 0, disks), made durable
/// and applied, exactly as a log received over the network; the primary notices at its next
/// cycle and continues with the changes since the export.
pub async fn import_initial(
    d: &Arc<Host>,
    name: &vmrepl_types::VmName,
    from: &Path,
) -> Result<String, HostError> {
    let vm = name.to_string();
    let row = named(d, name)?;
    if row.failover.is_some() {
        return Err(ReplicaError::FailedOver { vm }.into());
    }
    let file = if from.is_dir() {
        from.join(format!("{name}.vmrlog"))
    } else {
        from.to_path_buf()
    };
    let size = std::fs::metadata(&file)
        .map_err(|source| ReplicaError::UnreadableExport {
            file: file.clone(),
            source,
        })?
        .len();
    let dir = vm_dir(&row);
    let lock = d.replica_locks.vm(&dir);
    let _g = lock.lock().await;
    let last = apply_and_record(d, &row)
        .await
        .map_err(|source| ReplicaError::CannotApply {
            vm: vm.clone(),
            source,
        })?;
    if last >= 1 {
        return Err(ReplicaError::AlreadyHoldsCopy { vm, last }.into());
    }
    let free = vmrepl_store::spool::free_bytes(&dir).unwrap_or(u64::MAX);
    if free < size.saturating_add(vmrepl_store::SPACE_HEADROOM) {
        return Err(ReplicaError::NoSpace {
            dir,
            file,
            free,
            size,
        }
        .into());
    }
    let unusable = |why: String| ReplicaError::Unusable {
        file: file.clone(),
        vm: vm.clone(),
        why,
    };
    // The primary must still be authorized here, in the replica's trust group (an entry
    // revoked since the export takes its media with it). Its certificate was checked, pins
    // included, when it announced the export below.
    let authorized = {
        let cfg = d.cfg();
        vmrepl_transport::authz::Authorization::try_from(&cfg.replica_server)
            .map_err(|x| x.to_string())
            .and_then(|a| match a.authorize(&row.primary_host) {
                Ok(g) if g.trust_group == row.trust_group => Ok(()),
                Ok(g) => Err(format!(
                    "it is now in trust group {:?}, the replica in {:?}",
                    g.trust_group, row.trust_group
                )),
                Err(vmrepl_transport::authz::AuthzError::NoCertificateToCheck { .. }) => Ok(()),
                Err(x) => Err(x.to_string()),
            })
    };
    if let Err(why) = authorized {
        return Err(ReplicaError::PrimaryNotAuthorized {
            primary: row.primary_host.clone(),
            vm,
            why,
        }
        .into());
    }
    // Only the very file the primary announced (over TLS) is imported: media can be altered
    // or forged on the way, and a forged log can be valid.
    let expected: ExpectedImport = std::fs::read(expected_import_path(&row))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| ReplicaError::NotAnnounced {
            primary: row.primary_host.clone(),
            vm: vm.clone(),
        })?;
    let (src, partial) = (file.clone(), vmrepl_store::spool::partial_path(&dir, 1));
    let primary = row.primary_host.clone();
    tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_file(&partial);
        let copied = crate::fsutil::copy_private(&src, &partial)
            .map(drop)
            .map_err(|x| format!("cannot copy it: {x}"))
            .and_then(|()| {
                let mut h = blake3::Hasher::new();
                let f = std::fs::File::open(&partial).map_err(|x| x.to_string())?;
                let n = f.metadata().map_err(|x| x.to_string())?.len();
                h.update_reader(f).map_err(|x| x.to_string())?;
                let got = h.finalize().to_hex().to_string();
                if n != expected.bytes || got != expected.blake3 {
                    return Err(format!(
                        "it does not match what {primary} exported ({n} bytes with digest {got}, not {} bytes with digest {}); it was altered on the way, or it is another export",
                        expected.bytes, expected.blake3
                    ));
                }
                Ok(())
            });
        if copied.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        copied
    })
    .await
    .map_err(|source| ReplicaError::ImportTask {
        vm: vm.clone(),
        source,
    })?
    .map_err(unusable)?;
    // From here on exactly as a log that came over the network.
    match accept_spooled(&row, 1, 0, Some(vmrepl_log::LogKind::Initial), None).await {
        Ok(()) => {}
        Err(Unaccepted::Bad(why)) => return Err(unusable(why).into()),
        Err(Unaccepted::NotDurable(why)) => return Err(ReplicaError::NotDurable { vm, why }.into()),
    }
    {
        let db = d.db();
        let _ = db.record_received(row.vm_uuid, size);
        let _ = db.event(
            Some(row.vm_uuid),
            &format!("initial copy of {name} imported from {}", file.display()),
        );
    }
    let applied = apply_and_record(d, &row)
        .await
        .map_err(|source| ReplicaError::AppliedLater {
            vm: vm.clone(),
            source,
        })?;
    Ok(format!(
        "Initial copy of {name} imported from {} ({} MiB); log {applied} applied. The primary {} continues with the changes since the export at its next cycle.",
        file.display(),
        size >> 20,
        row.primary_host
    ))
}

// ------------------------------------------------------------------ per-VM locks

/// What the primary said it exported as the initial copy (see `PeerRequest::ExpectImport`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ExpectedImport {
    bytes: u64,
    blake3: String,
}

pub(crate) fn expected_import_path(row: &ReplicaRow) -> PathBuf {
    // In the spool folder, which goes with the store (the spool ignores names it does not know).
    vm_dir(row).join("logs").join("import-expected.json")
}

/// Records the size and digest of the initial copy the primary exported, durably.
pub fn expect_import(row: &ReplicaRow, bytes: u64, blake3: &str) -> Result<(), String> {
    if blake3.len() != 64 || !blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{blake3:?} is not a BLAKE3 digest in hex"));
    }
    let e = ExpectedImport {
        bytes,
        blake3: blake3.to_ascii_lowercase(),
    };
    let json = serde_json::to_vec(&e).map_err(|e| e.to_string())?;
    let p = expected_import_path(row);
    crate::fsutil::write_atomic(&p, &json).map_err(|e| format!("{}: {e}", p.display()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vmrepl_types::vm::{ConfigVersion, DiskDef, FirmwareVariantId, Generation};
    use vmrepl_types::VmName;

    /// A replica row of VM `name` ([`def`], one 1 MiB disk), replicating, nothing applied.
    pub(crate) fn row(name: &str) -> crate::db::ReplicaRow {
        let def = def(&[("disk0", 1 << 20)]);
        crate::db::ReplicaRow {
            vm_uuid: Uuid::new_v4(),
            name: name.into(),
            primary_host: "primary.example".into(),
            trust_group: "DEFAULT".into(),
            storage_root: "/srv/replicas".into(),
            relationship: Uuid::new_v4(),
            definition: def,
            policy: crate::peer::proto::PointPolicy {
                keep: 0,
                interval_secs: 3600,
            },
            // Whatever the caller puts here, the creation event decides.
            state: vmrepl_types::replication::ReplicationState::Replicating,
            last_applied: 0,
            created_ms: 1,
            last_receive_ms: None,
            last_apply_ms: None,
            last_point_ms: None,
            bytes_received: 0,
            logs_received: 0,
            last_error: None,
            primary_server: None,
            failover: None,
            test_failover: None,
        }
    }

    /// A generation 1 VM with these disks (id, size).
    pub(crate) fn def(disks: &[(&str, u64)]) -> VmDefinition {
        VmDefinition {
            name: VmName::new("app").unwrap(),
            uuid: Uuid::new_v4(),
            generation: Generation::Bios,
            firmware: FirmwareVariantId::Seabios,
            machine_type: "pc-i440fx-7.2".into(),
            config_version: ConfigVersion::CURRENT,
            vcpus: 1,
            memory_mib: 128,
            disks: disks
                .iter()
                .map(|(id, size)| DiskDef {
                    id: id.to_string(),
                    path: PathBuf::from(format!("/srv/{id}.qcow2")),
                    size_bytes: *size,
                })
                .collect(),
            nics: vec![],
            kernel: None,
            nvram: None,
        }
    }

    #[test]
    fn an_existing_copy_needs_the_generation_nvram_and_every_replicated_disk_of_the_vm() {
        let vm = def(&[("disk0", 1 << 30), ("disk1", 1 << 20)]);
        // Same disks, another UUID and other paths: fine.
        assert_eq!(
            existing_copy_mismatch(&def(&[("disk0", 1 << 30), ("disk1", 1 << 20)]), &vm),
            None
        );
        // An extra disk on the copy is not taken; it does not stand in the way.
        let extra = def(&[("disk0", 1 << 30), ("disk1", 1 << 20), ("disk2", 4096)]);
        assert_eq!(existing_copy_mismatch(&extra, &vm), None);
        // A missing disk or one of another size is named with both sides' disks.
        for copy in [
            def(&[("disk0", 1 << 30)]),
            def(&[("disk0", 1 << 30), ("disk1", 2 << 20)]),
        ] {
            let why = existing_copy_mismatch(&copy, &vm).unwrap();
            assert!(why.contains("do not match"), "{why}");
            assert!(why.contains("disk1 1048576 bytes"), "{why}");
        }
        let mut uefi = def(&[("disk0", 1 << 30), ("disk1", 1 << 20)]);
        uefi.generation = Generation::Uefi;
        let why = existing_copy_mismatch(&uefi, &vm).unwrap();
        assert!(why.contains("generation 2 (UEFI)"), "{why}");
        let mut with_nvram = def(&[("disk0", 1 << 30), ("disk1", 1 << 20)]);
        with_nvram.nvram = Some(PathBuf::from("/srv/vars.fd"));
        let why = existing_copy_mismatch(&with_nvram, &vm).unwrap();
        assert!(why.contains("NVRAM"), "{why}");
    }
}
