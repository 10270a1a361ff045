//! Failover on the replica: planned or unplanned, to a chosen recovery point; complete and
//! cancel. The VM boots from an overlay over the point; its disks are tracked before the
//! first boot (I2) so reverse replication sends only what changed.

use crate::db::ReplicaUpdate;
use crate::error::HostError;
use crate::failover::FailoverError;
use crate::failover::STREAM_TIMEOUT;
use crate::host::Host;
use crate::lifecycle::ReplicaEvent;
use crate::peer::client::PeerClient;
use crate::peer::proto::{PeerRequest, PeerResponse};
use crate::primary;
use crate::replica::{self, FailoverRecord, ReplicaRow};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;
use vmrepl_store::{PointRef, ReplicaStore, StoreError};
use vmrepl_tracking::RelTag;
use vmrepl_types::replication::ReplicationState;
use vmrepl_types::vm::NicMode;
use vmrepl_types::{VmDefinition, VmName};

/// What the primary says before a failover.
pub(crate) enum PrimaryView {
    Answered {
        running: bool,
        prepared_seq: Option<u64>,
    },
    Unreachable(String),
}

pub(crate) async fn ask_primary(d: &Host, row: &ReplicaRow) -> PrimaryView {
    let Some(addr) = row.primary_server.as_deref() else {
        return PrimaryView::Unreachable(format!(
            "the primary {} never said where it listens",
            row.primary_host
        ));
    };
    let mut c = match PeerClient::connect(&d.identity, d.vmm.caps(), addr, &row.primary_host).await
    {
        Ok((c, _)) => c,
        Err(e) => return PrimaryView::Unreachable(e.to_string()),
    };
    match c
        .call(&PeerRequest::PrimaryState {
            vm_uuid: row.vm_uuid,
        })
        .await
    {
        Ok(PeerResponse::PrimaryState {
            running,
            prepared_seq,
        }) => PrimaryView::Answered {
            running,
            prepared_seq,
        },
        Ok(other) => PrimaryView::Unreachable(format!("it answered {other:?}")),
        Err(e) => PrimaryView::Unreachable(e.to_string()),
    }
}

/// I7: this host must run the VM exactly as it is.
pub(crate) fn check_runnable(d: &Host, def: &VmDefinition) -> Result<(), HostError> {
    d.vmm.caps().check_runs(def).map_err(|why| {
        FailoverError::CannotRunHere {
            host: d.vmm.caps().host_name.clone(),
            vm: def.name.to_string(),
            why,
        }
        .into()
    })
}

/// Points a replica's definition at this host's own copy of its boot files (received from
/// the primary, verified, kept in the replica's store), copied into `dir`, the folder of the
/// VM being made. The paths the primary named are never opened here.
pub(crate) fn boot_here(
    row: &ReplicaRow,
    def: &mut VmDefinition,
    dir: &Path,
) -> Result<(), HostError> {
    use crate::peer::proto::BootFile;
    let Some(k) = def.kernel.as_mut() else {
        return Ok(());
    };
    let held = replica::vm_dir(row).join("boot");
    let copy = |file: BootFile| -> Result<PathBuf, HostError> {
        let src = held.join(file.file_name());
        let dest = dir.join(file.file_name());
        if !src.is_file() {
            return Err(FailoverError::BootFileMissing {
                vm: row.name.clone(),
                primary: row.primary_host.clone(),
                file: file.file_name(),
            }
            .into());
        }
        if let Err(source) = std::fs::copy(&src, &dest) {
            return Err(FailoverError::CopyBootFile {
                from: src,
                to: dest,
                source,
            }
            .into());
        }
        Ok(dest)
    };
    k.kernel = copy(BootFile::Kernel)?;
    if k.initrd.is_some() {
        k.initrd = Some(copy(BootFile::Initrd)?);
    }
    Ok(())
}

/// Makes overlays of `point` in `dest` under the replica's lock; returns them and the point.
pub(crate) async fn overlays(
    row: &ReplicaRow,
    point: Option<u64>,
    dest: PathBuf,
) -> Result<vmrepl_store::Overlay, HostError> {
    let root = row.storage_root.clone();
    let uuid = row.vm_uuid;
    tokio::task::spawn_blocking(move || -> Result<vmrepl_store::Overlay, StoreError> {
        let mut vm = ReplicaStore::open(&root, uuid)?;
        let p = match point {
            None => PointRef::Latest,
            Some(s) if s == vm.last_applied() && vm.torn().is_none() => PointRef::Latest,
            Some(s) => PointRef::Frozen(s),
        };
        vm.overlay_for(p, &dest)
    })
    .await
    .map_err(FailoverError::Task)?
    .map_err(|e| FailoverError::from(e).into())
}

/// The definition of a VM built on overlays: same VM (machine type, firmware, generation
/// unchanged, I7), its disks and NVRAM replaced by the overlay files. It has exactly the disks
/// the point has: a disk added later (or removed since) is not in it.
pub(crate) fn on_overlay(def: &VmDefinition, ov: &vmrepl_store::Overlay) -> VmDefinition {
    let mut out = def.clone();
    out.disks
        .retain(|disk| ov.disks.iter().any(|(id, _)| *id == disk.id));
    for disk in &mut out.disks {
        if let Some((_, p)) = ov.disks.iter().find(|(id, _)| *id == disk.id) {
            disk.path = p.clone();
        }
    }
    out.nvram = ov.nvram.clone();
    out
}

/// Runs `f` on every disk of `def`, reached like a replication cycle reaches them: through the
/// VM's QEMU if it runs, through qemu-storage-daemon otherwise. The caller holds the VM's
/// operation lock (or the VM is not registered yet).
pub(crate) async fn on_disks<F, Fut>(d: &Host, def: &VmDefinition, f: F) -> Result<(), HostError>
where
    F: FnOnce(vmrepl_qemu::QmpClient, Vec<String>) -> Fut,
    Fut: std::future::Future<Output = Result<(), vmrepl_tracking::TrackingError>>,
{
    let ids: Vec<String> = def.disks.iter().map(|x| x.id.clone()).collect();
    let ep = primary::Endpoint::open_anyway(d, def, &ids, None)
        .await
        .map_err(|e| FailoverError::OpenDisks { why: e.to_string() })?;
    let r = f(ep.qmp().clone(), ids).await;
    ep.close().await;
    Ok(r.map_err(FailoverError::Tracking)?)
}

/// Fails a replica VM over (on the replica server). Planned when the primary prepared it.
pub async fn start(
    d: &Arc<Host>,
    name: &VmName,
    point: Option<u64>,
    (start_vm, risk_split_brain): (bool, bool),
    network: Option<NicMode>,
) -> Result<String, HostError> {
    let row = replica::named(d, name)?;
    if let Some(f) = &row.failover {
        return Err(FailoverError::AlreadyFailedOver {
            vm: name.to_string(),
            seq: f.point_seq,
        }
        .into());
    }
    if row.last_applied == 0 {
        return Err(FailoverError::NoPointYet {
            vm: name.to_string(),
        }
        .into());
    }
    check_runnable(d, &row.definition)?;
    // I6: one host at a time.
    let prepared = match ask_primary(d, &row).await {
        PrimaryView::Answered { running: true, .. } if !risk_split_brain => {
            return Err(FailoverError::RunningOnPrimary {
                vm: name.to_string(),
                primary: row.primary_host.clone(),
            }
            .into())
        }
        PrimaryView::Unreachable(why) if !risk_split_brain => {
            return Err(FailoverError::PrimaryUnreachable {
                vm: name.to_string(),
                primary: row.primary_host.clone(),
                why,
            }
            .into())
        }
        PrimaryView::Answered { prepared_seq, .. } => prepared_seq,
        PrimaryView::Unreachable(_) => None,
    };
    let dir = replica::vm_dir(&row);
    let lock = d.replica_locks.vm(&dir);
    let _g = lock.lock().await;
    let last = match replica::apply_and_record(d, &row).await {
        Ok(l) => l,
        // The newest state is not whole, but an older point is: an explicit, frozen point may
        // still be failed over to (a disaster must not wait for a repair).
        Err(e) if prepared.is_none() && point.is_some_and(|p| p <= row.last_applied) => {
            tracing::warn!(target: "vmrepl::failover", vm = %row.vm_uuid, "failing over to point {point:?} although the newest log cannot be applied: {e}");
            row.last_applied
        }
        Err(source) => {
            return Err(FailoverError::Unapplied {
                vm: name.to_string(),
                source,
            }
            .into())
        }
    };
    if let Some(s) = prepared {
        if last != s {
            return Err(FailoverError::PreparedAtOtherPoint {
                vm: name.to_string(),
                prepared: s,
                held: last,
            }
            .into());
        }
        if point.is_some_and(|p| p != s) {
            return Err(FailoverError::PlannedToOtherPoint { prepared: s }.into());
        }
    }
    // The replica's state after that apply pass decides whether this failover may start.
    let state = d
        .db()
        .replica(row.vm_uuid)
        .map_err(HostError::db("reading the replica"))?
        .map_or(row.state, |r| r.state);
    crate::lifecycle::on_replica(
        state,
        &ReplicaEvent::FailoverStarted {
            planned: prepared.is_some(),
        },
    )?;
    let rel_id = Uuid::new_v4();
    let vm_dir = d.vmm.default_storage().join(row.vm_uuid.to_string());
    let ov = overlays(&row, point, vm_dir.clone()).await?;
    let mut def = on_overlay(&row.definition, &ov);
    // The replica's own name on this host (unique here; the primary's name where it was free).
    def.name = VmName::new(&row.name).map_err(FailoverError::StoredName)?;
    // What the failed-over VM touches is this host's choice, not the primary's: its own copy
    // of the boot files, and adapters connected as this host's admin says (not connected by
    // default), never the primary's tap or bridge names.
    if let Err(e) = boot_here(&row, &mut def, &vm_dir) {
        remove_files(&def);
        return Err(e);
    }
    let nets = {
        let db = d.db();
        replica::networks(&db, &row)
    };
    for (nic, net) in def.nics.iter_mut().zip(&nets) {
        nic.mode = network.clone().unwrap_or_else(|| net.failover.clone());
    }
    let seq = ov.point.seq;
    let planned = prepared.is_some();
    let tag = RelTag::from_uuid(&rel_id);
    let prepared_disks = on_disks(d, &def, |qmp, ids| async move {
        if planned {
            // Planned failover completes at once: the disks leave the point before first boot.
            vmrepl_tracking::stream_into_top(&qmp, &ids, STREAM_TIMEOUT).await?;
        }
        // Reverse replication needs every write since the point: track from before first boot.
        vmrepl_tracking::start_tracking(&qmp, tag, &ids, seq).await
    })
    .await;
    let registered = prepared_disks.and_then(|()| d.vmm.register(&def));
    if let Err(e) = registered {
        remove_files(&def);
        return Err(e);
    }
    let record = FailoverRecord {
        point_seq: seq,
        point_unix_ms: ov.point.unix_ms,
        planned,
        relationship: rel_id,
    };
    drop(ov);
    {
        let db = d.db();
        replica::change(
            &db,
            row.vm_uuid,
            ReplicaEvent::FailoverStarted { planned },
            None,
            ReplicaUpdate::Failover(Some(&record)),
        )
        .map_err(HostError::from)?;
        let _ = db.event(
            Some(row.vm_uuid),
            &format!(
                "{} failover to point {seq}",
                if planned { "planned" } else { "unplanned" }
            ),
        );
    }
    if planned {
        drop_store(&row).await;
    }
    let mut msg = if planned {
        format!("Planned failover of {name} done: the VM is here as of log {seq}, with no data lost. Next: `vmrepl replication reverse {name}` replicates it back to {}.", row.primary_host)
    } else {
        format!("VM {name} failed over to point {seq}. Check it, then `vmrepl failover complete {name}` to keep it (the other points are dropped), or `vmrepl failover cancel {name}` to choose another point.")
    };
    if start_vm {
        d.vmm.start(&def.name).await?;
        msg.push_str(" The VM is started.");
        let want: Vec<super::ip::Wanted> = nets
            .iter()
            .filter_map(|n| {
                n.failover_ip
                    .clone()
                    .map(|ip| (n.adapter, n.mac.clone(), ip))
            })
            .collect();
        if !want.is_empty() {
            msg.push_str(" Its failover TCP/IP is set through the guest agent once the guest answers (`vmrepl events --vm` tells the outcome).");
            super::ip::spawn(d.clone(), row.vm_uuid, name.to_string(), want);
        }
    }
    Ok(msg)
}

pub(crate) fn remove_files(def: &VmDefinition) {
    for disk in &def.disks {
        let _ = std::fs::remove_file(&disk.path);
    }
    for p in crate::vmm::own_boot_files(def) {
        let _ = std::fs::remove_file(p);
    }
    if let Some(n) = &def.nvram {
        let _ = std::fs::remove_file(n);
    }
}

/// Removes the replica store once the failed-over VM no longer needs it. A failure leaves
/// files behind (logged), never the VM without its disks.
pub(crate) async fn drop_store(row: &ReplicaRow) {
    let (root, uuid) = (row.storage_root.clone(), row.vm_uuid);
    let r = tokio::task::spawn_blocking(move || ReplicaStore::destroy(&root, uuid))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    if let Err(e) = r {
        tracing::warn!(target: "vmrepl::failover", vm = %row.vm_uuid, "cannot remove the replica store: {e}");
    }
}

/// Completes an unplanned failover: the VM's disks leave the recovery point (streamed into
/// their own images, live if it runs) and the other points are dropped for good.
pub async fn complete(d: &Arc<Host>, name: &VmName) -> Result<String, HostError> {
    let row = replica::named(d, name)?;
    match (&row.failover, row.state) {
        (Some(_), ReplicationState::FailedOverWaitingCompletion) => {}
        (Some(_), _) => return Ok(format!("The failover of {name} is already complete.")),
        (None, _) => {
            return Err(FailoverError::NothingToComplete {
                vm: name.to_string(),
            }
            .into())
        }
    }
    let def = d
        .vmm
        .definition(row.vm_uuid)
        .ok_or_else(|| FailoverError::VmGone {
            vm: name.to_string(),
        })?;
    {
        let _op = d.vmm.op_lock(row.vm_uuid).await;
        // Live through the VM's QEMU if it runs: the guest keeps writing meanwhile.
        on_disks(d, &def, |qmp, ids| async move {
            vmrepl_tracking::stream_into_top(&qmp, &ids, STREAM_TIMEOUT).await
        })
        .await?;
    }
    let lock = d.replica_locks.vm(&replica::vm_dir(&row));
    let _g = lock.lock().await;
    drop_store(&row).await;
    let db = d.db();
    replica::change(
        &db,
        row.vm_uuid,
        ReplicaEvent::FailoverCompleted,
        None,
        ReplicaUpdate::None,
    )
    .map_err(HostError::from)?;
    let _ = db.event(
        Some(row.vm_uuid),
        "failover completed; other recovery points dropped",
    );
    Ok(format!(
        "Failover of {name} completed: the VM keeps point {} and everything it wrote since; the other recovery points are gone. `vmrepl replication reverse {name}` replicates it back to {}.",
        row.failover.as_ref().map(|f| f.point_seq).unwrap_or_default(),
        row.primary_host
    ))
}

// ------------------------------------------------------------------ replica: test failover
