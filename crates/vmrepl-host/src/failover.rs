//! The failover family (Hyper-V's Start-/Stop-/Complete-VMFailover and reverse replication),
//! top-down. See docs/design/failover.md for the flows and why they keep I1, I2, I6 and I7.
//!
//! ```text
//! primary A                                replica B
//! ─────────                                ─────────
//! prepare: VM off → locked, final log S
//!   (state SyncedReplicationComplete)
//!                                          start: ask A (running? prepared at S?) ── I6
//!                                            overlay over point S, bitmap <rel'>-S added
//!                                            before the first boot; planned ⇒ streamed
//!                                            standalone at once and the store dropped
//!                                            (state FailedOver), else FailedOverWaitingCompletion
//!                                          complete: stream standalone, drop the other points
//!                                          cancel:   delete the VM, back to Replicating
//!                                          reverse:  ask A to become the replica ──────────┐
//! accept reverse: prepared at S and the same disks?                                        │
//!   yes: tracking removed, disks adopted as the replica's base at S (deltas at once)  ◄────┘
//!   no:  old VM dropped, empty replica (full copy, and the status says why)
//! ```
//!
//! Failback is the same planned failover in the other direction.

use crate::host::Host;
use crate::peer::client::PeerClient;
use crate::peer::proto::{PeerRequest, PeerResponse, RefusalCode};
use crate::primary;
use crate::replica::{self, FailoverRecord, ReplicaRow, TestFailover};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;
use vmrepl_store::{PointRef, ReplicaStore, StoreError};
use vmrepl_tracking::RelTag;
use vmrepl_types::api::{ApiError, ErrorCode};
use vmrepl_types::replication::{RecoveryPointInfo, ReplicationSettings, ReplicationState};
use vmrepl_types::vm::{NicDef, NicMode};
use vmrepl_types::{VmDefinition, VmName};

/// How long streaming a failed-over VM's disks off its recovery point may take.
const STREAM_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Internal, e.to_string())
}

fn store_err(e: StoreError) -> ApiError {
    match e {
        StoreError::NoSuchPoint { .. } => ApiError::new(ErrorCode::InvalidInput, format!("{e}.")),
        other => ApiError::new(ErrorCode::Io, other.to_string()),
    }
}

/// The replica row of the VM called `name` on this host.
/// The recovery points of a replica VM, oldest first, the latest state last.
pub async fn points(d: &Arc<Host>, name: &VmName) -> Result<Vec<RecoveryPointInfo>, ApiError> {
    let row = replica::named(d, name)?;
    if row.state == ReplicationState::FailedOver {
        return Err(ApiError::new(
            ErrorCode::WrongState,
            format!("VM {name} has failed over and its recovery points were dropped."),
        ));
    }
    let lock = d.replica_locks.vm(&replica::vm_dir(&row));
    let _g = lock.lock().await;
    let root = row.storage_root.clone();
    let pts = tokio::task::spawn_blocking(move || ReplicaStore::open(&root, row.vm_uuid))
        .await
        .map_err(internal)?
        .map_err(store_err)?
        .points();
    Ok(pts
        .into_iter()
        .map(|p| RecoveryPointInfo {
            seq: p.seq,
            unix_ms: p.unix_ms,
            consistency: p.consistency,
            latest: p.kind == vmrepl_store::PointKind::Latest,
        })
        .collect())
}

// ------------------------------------------------------------------ primary: prepare, cancel

/// Planned failover, step 1 on the primary: the VM must be off; it is locked against starting,
/// its last changes are shipped as a planned point, and replication waits.
pub async fn prepare(d: &Arc<Host>, name: &VmName) -> Result<String, ApiError> {
    let vm = d.vmm.show(name)?.definition;
    let rel = primary::load(d, vm.uuid).ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            format!("VM {name} is not replicated from this host, so there is nothing to prepare; on a replica server use `vmrepl failover start`."),
        )
    })?;
    match rel.state {
        ReplicationState::SyncedReplicationComplete => {
            return Ok(format!(
                "VM {name} is already prepared for a planned failover (last log {}).",
                rel.acked_seq
            ))
        }
        ReplicationState::Replicating => {}
        s => {
            return Err(ApiError::new(
                ErrorCode::WrongState,
                format!("Replication of {name} is {s}; a planned failover needs it replicating (resume it or let initial replication finish first)."),
            ))
        }
    }
    d.vmm.set_failover_lock(vm.uuid, true).await?;
    match primary::replicate_now(d, vm.uuid, vmrepl_log::Consistency::Planned).await {
        Ok((seq, _)) if primary::load(d, vm.uuid).is_some_and(|r| r.last_error.is_none()) => {
            primary::set_state(
                d,
                vm.uuid,
                ReplicationState::SyncedReplicationComplete,
                None,
            );
            Ok(format!(
                "VM {name} is prepared for a planned failover: its last changes (log {seq}) are on {} and it cannot be started here. Next, on {}: `vmrepl failover start {name}`.",
                rel.replica_name, rel.replica_name
            ))
        }
        res => {
            let why = match res {
                Err(e) => e,
                Ok(_) => primary::load(d, vm.uuid)
                    .and_then(|r| r.last_error)
                    .unwrap_or_default(),
            };
            let _ = d.vmm.set_failover_lock(vm.uuid, false).await;
            Err(ApiError::new(
                ErrorCode::Peer,
                format!("The last changes of {name} could not be sent to {}: {why}. Nothing changed; the VM can still start here.", rel.replica_name),
            ))
        }
    }
}

/// Cancels a prepare (on the primary) or a failover waiting for completion (on the replica).
pub async fn cancel(d: &Arc<Host>, name: &VmName) -> Result<String, ApiError> {
    let prepared = d
        .vmm
        .show(name)
        .ok()
        .and_then(|v| primary::load(d, v.definition.uuid));
    if let Some(rel) = prepared {
        if rel.state != ReplicationState::SyncedReplicationComplete {
            return Err(ApiError::new(
                ErrorCode::WrongState,
                format!("VM {name} is not prepared for a failover (replication is {}); there is nothing to cancel.", rel.state),
            ));
        }
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
                return Err(ApiError::new(
                    ErrorCode::WrongState,
                    format!("{} has already failed VM {name} over; it runs there now. Fail back instead of cancelling.", rel.replica_name),
                ));
            }
        }
        d.vmm.set_failover_lock(rel.vm_uuid, false).await?;
        primary::set_state(d, rel.vm_uuid, ReplicationState::Replicating, None);
        primary::wake(d, rel.vm_uuid);
        return Ok(format!(
            "Planned failover of {name} cancelled; the VM can start here and replication goes on."
        ));
    }
    let row = replica::named(d, name)?;
    let Some(f) = row.failover.clone() else {
        return Err(ApiError::new(
            ErrorCode::WrongState,
            format!("VM {name} has not failed over; there is nothing to cancel."),
        ));
    };
    if row.state != ReplicationState::FailedOverWaitingCompletion {
        return Err(ApiError::new(
            ErrorCode::WrongState,
            format!("The failover of {name} is complete and cannot be cancelled any more."),
        ));
    }
    if d.vmm.live_process(row.vm_uuid).await.is_some() {
        d.vmm.stop(name).await?;
    }
    d.vmm.delete(name, false).await?;
    let db = d.db();
    replica::set_failover(&db, row.vm_uuid, None, ReplicationState::Replicating)
        .map_err(internal)?;
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

/// What the primary says before a failover.
enum PrimaryView {
    Answered {
        running: bool,
        prepared_seq: Option<u64>,
    },
    Unreachable(String),
}

async fn ask_primary(d: &Host, row: &ReplicaRow) -> PrimaryView {
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
fn check_runnable(d: &Host, def: &VmDefinition) -> Result<(), ApiError> {
    d.vmm.caps().check_runs(def).map_err(|why| {
        ApiError::new(
            ErrorCode::Unsupported,
            format!(
                "This host ({}) cannot run VM {}: {why}. Nothing was changed.",
                d.vmm.caps().host_name,
                def.name
            ),
        )
    })
}

/// Points a replica's definition at this host's own copy of its boot files (received from
/// the primary, verified, kept in the replica's store), copied into `dir`, the folder of the
/// VM being made. The paths the primary named are never opened here.
fn boot_here(row: &ReplicaRow, def: &mut VmDefinition, dir: &Path) -> Result<(), ApiError> {
    use crate::peer::proto::BootFile;
    let Some(k) = def.kernel.as_mut() else {
        return Ok(());
    };
    let held = replica::vm_dir(row).join("boot");
    let copy = |file: BootFile| -> Result<PathBuf, ApiError> {
        let src = held.join(file.file_name());
        let dest = dir.join(file.file_name());
        if !src.is_file() {
            return Err(ApiError::new(
                ErrorCode::WrongState,
                format!(
                    "VM {} boots a kernel directly, and the primary {} has not sent its {} yet (it does with its next cycle); retry then. Nothing was changed.",
                    row.name, row.primary_host, file.file_name()
                ),
            ));
        }
        std::fs::copy(&src, &dest).map_err(|e| {
            ApiError::new(
                ErrorCode::Io,
                format!("Cannot copy {} to {}: {e}", src.display(), dest.display()),
            )
        })?;
        Ok(dest)
    };
    k.kernel = copy(BootFile::Kernel)?;
    if k.initrd.is_some() {
        k.initrd = Some(copy(BootFile::Initrd)?);
    }
    Ok(())
}

/// A failover that needs the newest state while the replica cannot apply its last log.
fn unapplied(name: &VmName, e: replica::ApplyError) -> ApiError {
    ApiError::new(
        ErrorCode::Io,
        format!(
            "The replica of {name} cannot apply its received logs: {e}. Its newest state is not \
             whole; choose an older recovery point with --point SEQ (`vmrepl replication points \
             {name}` lists them). Nothing was changed."
        ),
    )
}

/// Makes overlays of `point` in `dest` under the replica's lock; returns them and the point.
async fn overlays(
    row: &ReplicaRow,
    point: Option<u64>,
    dest: PathBuf,
) -> Result<vmrepl_store::Overlay, ApiError> {
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
    .map_err(internal)?
    .map_err(store_err)
}

/// The definition of a VM built on overlays: same VM (machine type, firmware, generation
/// unchanged, I7), its disks and NVRAM replaced by the overlay files.
fn on_overlay(def: &VmDefinition, ov: &vmrepl_store::Overlay) -> VmDefinition {
    let mut out = def.clone();
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
async fn on_disks<F, Fut>(d: &Host, def: &VmDefinition, f: F) -> Result<(), ApiError>
where
    F: FnOnce(vmrepl_qemu::QmpClient, Vec<String>) -> Fut,
    Fut: std::future::Future<Output = Result<(), vmrepl_tracking::TrackingError>>,
{
    let ids: Vec<String> = def.disks.iter().map(|x| x.id.clone()).collect();
    let ep = primary::Endpoint::open(d, def, &ids, None)
        .await
        .map_err(|e| ApiError::new(ErrorCode::Qemu, e))?;
    let r = f(ep.qmp().clone(), ids).await;
    ep.close().await;
    r.map_err(|e| ApiError::new(ErrorCode::Qemu, e.to_string()))
}

/// Fails a replica VM over (on the replica server). Planned when the primary prepared it.
pub async fn start(
    d: &Arc<Host>,
    name: &VmName,
    point: Option<u64>,
    (start_vm, risk_split_brain): (bool, bool),
    network: Option<NicMode>,
) -> Result<String, ApiError> {
    let row = replica::named(d, name)?;
    if let Some(f) = &row.failover {
        return Err(ApiError::new(
            ErrorCode::WrongState,
            format!("VM {name} has already failed over to point {}; complete or cancel that failover first.", f.point_seq),
        ));
    }
    if row.last_applied == 0 {
        return Err(ApiError::new(
            ErrorCode::WrongState,
            format!("Initial replication of {name} is not complete; there is no recovery point to fail over to."),
        ));
    }
    check_runnable(d, &row.definition)?;
    // I6: one host at a time.
    let prepared = match ask_primary(d, &row).await {
        PrimaryView::Answered { running: true, .. } if !risk_split_brain => {
            return Err(ApiError::new(
                ErrorCode::WrongState,
                format!("VM {name} is running on the primary {}. Shut it down there and run `vmrepl failover prepare {name}` for a planned failover; nothing was changed.", row.primary_host),
            ))
        }
        PrimaryView::Unreachable(why) if !risk_split_brain => {
            return Err(ApiError::new(
                ErrorCode::Peer,
                format!("The primary {} cannot be asked whether VM {name} runs there ({why}). If that host is lost, repeat with --risk-split-brain: two running copies of the VM would diverge. Nothing was changed.", row.primary_host),
            ))
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
        Err(e) => return Err(unapplied(name, e)),
    };
    if let Some(s) = prepared {
        if last != s {
            return Err(ApiError::new(
                ErrorCode::WrongState,
                format!("The primary prepared {name} at log {s} but this replica holds log {last}; wait for the primary to finish sending and retry. Nothing was changed."),
            ));
        }
        if point.is_some_and(|p| p != s) {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!("A planned failover goes to the prepared point {s}; drop --point."),
            ));
        }
    }
    let rel_id = Uuid::new_v4();
    let vm_dir = d.vmm.default_storage().join(row.vm_uuid.to_string());
    let ov = overlays(&row, point, vm_dir.clone()).await?;
    let mut def = on_overlay(&row.definition, &ov);
    // The replica's own name on this host (unique here; the primary's name where it was free).
    def.name = VmName::new(&row.name).map_err(internal)?;
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
    let state = if planned {
        ReplicationState::FailedOver
    } else {
        ReplicationState::FailedOverWaitingCompletion
    };
    {
        let db = d.db();
        replica::set_failover(&db, row.vm_uuid, Some(&record), state).map_err(internal)?;
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
    }
    Ok(msg)
}

fn remove_files(def: &VmDefinition) {
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
async fn drop_store(row: &ReplicaRow) {
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
pub async fn complete(d: &Arc<Host>, name: &VmName) -> Result<String, ApiError> {
    let row = replica::named(d, name)?;
    match (&row.failover, row.state) {
        (Some(_), ReplicationState::FailedOverWaitingCompletion) => {}
        (Some(_), _) => return Ok(format!("The failover of {name} is already complete.")),
        (None, _) => {
            return Err(ApiError::new(
                ErrorCode::WrongState,
                format!("VM {name} has not failed over; there is nothing to complete (`vmrepl failover start {name}` first)."),
            ))
        }
    }
    let def = d.vmm.definition(row.vm_uuid).ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            format!("The failed-over VM {name} is gone."),
        )
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
    replica::set_failover(
        &db,
        row.vm_uuid,
        row.failover.as_ref(),
        ReplicationState::FailedOver,
    )
    .map_err(internal)?;
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

/// Test failover: a VM "NAME - Test" on throwaway overlays of a point, adapters not connected
/// unless a test network is given. Replication goes on; the point stays until it is stopped.
pub async fn test(
    d: &Arc<Host>,
    name: &VmName,
    point: Option<u64>,
    test_network: Option<NicMode>,
) -> Result<String, ApiError> {
    let row = replica::named(d, name)?;
    if let Some(t) = &row.test_failover {
        return Err(ApiError::new(
            ErrorCode::AlreadyExists,
            format!("A test failover of {name} runs already as VM {:?}; stop it with `vmrepl failover stop-test {name}` first.", t.name),
        ));
    }
    if row.failover.is_some() {
        return Err(ApiError::new(
            ErrorCode::WrongState,
            format!("VM {name} has failed over; test failover is for a replica."),
        ));
    }
    if row.last_applied == 0 {
        return Err(ApiError::new(
            ErrorCode::WrongState,
            format!("Initial replication of {name} is not complete; there is no point to test."),
        ));
    }
    check_runnable(d, &row.definition)?;
    let test_name = VmName::new(&vmrepl_types::name::with_suffix(&row.name, " - Test"))
        .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))?;
    let uuid = Uuid::new_v4();
    let lock = d.replica_locks.vm(&replica::vm_dir(&row));
    let _g = lock.lock().await;
    if let Err(e) = replica::apply_and_record(d, &row).await {
        // Only an explicit older point may be tested while the newest state is not whole.
        if point.is_none_or(|p| p > row.last_applied) {
            return Err(unapplied(name, e));
        }
    }
    let dir = d.vmm.default_storage().join(uuid.to_string());
    let ov = overlays(&row, point, dir.clone()).await?;
    let mut def = on_overlay(&row.definition, &ov);
    def.name = test_name.clone();
    def.uuid = uuid;
    if let Err(e) = boot_here(&row, &mut def, &dir) {
        remove_files(&def);
        let _ = std::fs::remove_dir(&dir);
        return Err(e);
    }
    let nets = {
        let db = d.db();
        replica::networks(&db, &row)
    };
    def.nics = def
        .nics
        .iter()
        .enumerate()
        .map(|(i, _)| NicDef {
            mac: crate::vmm::mac_for(uuid, i),
            mode: test_network
                .clone()
                .or_else(|| nets.get(i).map(|n| n.test.clone()))
                .unwrap_or(NicMode::NotConnected),
        })
        .collect();
    let def_nics_connected = def.nics.iter().any(|n| n.mode != NicMode::NotConnected);
    if let Err(e) = d.vmm.register(&def) {
        remove_files(&def);
        let _ = std::fs::remove_dir(&dir);
        return Err(e);
    }
    let t = TestFailover {
        vm_uuid: uuid,
        name: test_name.as_str().to_string(),
        point_seq: ov.point.seq,
    };
    let db = d.db();
    replica::set_test_failover(&db, row.vm_uuid, Some(&t)).map_err(internal)?;
    let _ = db.event(
        Some(row.vm_uuid),
        &format!("test failover to point {} as {:?}", t.point_seq, t.name),
    );
    Ok(format!(
        "Test VM {:?} created from point {} of {name}; its network adapters are {}. Start it with `vmrepl vm start {:?}`; `vmrepl failover stop-test {name}` deletes it and everything it wrote. Replication goes on meanwhile.",
        t.name,
        t.point_seq,
        if def_nics_connected { "on the test network" } else { "not connected" },
        t.name
    ))
}

/// Stops a test failover: the test VM and everything it wrote are deleted.
pub async fn stop_test(d: &Arc<Host>, name: &VmName) -> Result<String, ApiError> {
    let row = replica::named(d, name)?;
    let Some(t) = row.test_failover.clone() else {
        return Err(ApiError::new(
            ErrorCode::WrongState,
            format!("No test failover of {name} runs."),
        ));
    };
    let test_name = VmName::new(&t.name).map_err(internal)?;
    if d.vmm.show(&test_name).is_ok() {
        if d.vmm.live_process(t.vm_uuid).await.is_some() {
            d.vmm.stop(&test_name).await?;
        }
        d.vmm.delete(&test_name, false).await?;
    }
    let _ = std::fs::remove_dir(d.vmm.default_storage().join(t.vm_uuid.to_string()));
    let db = d.db();
    replica::set_test_failover(&db, row.vm_uuid, None).map_err(internal)?;
    let _ = db.event(Some(row.vm_uuid), "test failover stopped");
    Ok(format!(
        "Test failover of {name} stopped; VM {:?} and what it wrote are deleted.",
        t.name
    ))
}

// ------------------------------------------------------------------ reverse replication

/// After a failover, replicates the VM back to the old primary (which must authorize this
/// host). Only the changes since the failover go when the old primary prepared the VM at the
/// failover's point; otherwise a full copy, and the status says why.
pub async fn reverse(
    d: &Arc<Host>,
    name: &VmName,
    settings: ReplicationSettings,
) -> Result<String, ApiError> {
    let row = replica::named(d, name)?;
    let f = match (&row.failover, row.state) {
        (Some(f), ReplicationState::FailedOver) => f.clone(),
        (Some(_), _) => {
            return Err(ApiError::new(
                ErrorCode::WrongState,
                format!("Complete the failover of {name} first (`vmrepl failover complete {name}`)."),
            ))
        }
        (None, _) => {
            return Err(ApiError::new(
                ErrorCode::WrongState,
                format!("VM {name} has not failed over to this host; reverse replication follows a failover."),
            ))
        }
    };
    let mut settings = settings;
    if settings.replica_server.is_empty() {
        // Back to where the old primary said it listens, under the name its certificate has.
        settings.replica_server = row.primary_server.clone().ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidInput,
                format!("The old primary {} never said where it listens; give --replica-server HOST:PORT.", row.primary_host),
            )
        })?;
        settings
            .replica_host_name
            .get_or_insert_with(|| row.primary_host.clone());
    }
    settings.validate().map_err(|m| {
        ApiError::new(
            ErrorCode::InvalidInput,
            format!("Invalid replication settings: {m}."),
        )
    })?;
    let def = d.vmm.definition(row.vm_uuid).ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            format!("The failed-over VM {name} is gone."),
        )
    })?;
    let (mut client, theirs) = primary::reach_replica(d, &settings, &def).await?;
    let replica_vm = primary::replica_view(&def, &settings);
    let policy = primary::point_policy(&settings);
    let my_addr = d.cfg().listen.clone();
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
        .map_err(|e| ApiError::new(ErrorCode::Peer, format!("{e}. Nothing was changed.")))?;
    let (delta, resync, reason) = match answer {
        PeerResponse::Reversed {
            delta,
            resync,
            full_copy_reason,
        } => (delta, resync, full_copy_reason),
        PeerResponse::Refused { message, code } => {
            let hint = if code == RefusalCode::NotAuthorized || code == RefusalCode::Disabled {
                format!(
                    " On {}, enable its replica server and authorize this host ({}).",
                    theirs.host_name,
                    d.vmm.caps().host_name
                )
            } else {
                String::new()
            };
            return Err(ApiError::new(
                ErrorCode::Peer,
                format!("{} refused to become the replica of {name}: {message}.{hint} Nothing was changed.", theirs.host_name),
            ));
        }
        other => {
            return Err(ApiError::new(
                ErrorCode::Peer,
                format!("Unexpected answer from {}: {other:?}", theirs.host_name),
            ))
        }
    };
    if let Err(e) = primary::send_boot_files(&mut client, &def, &[]).await {
        tracing::warn!(target: "vmrepl::failover", vm = %name, "boot files not sent yet: {e}");
    }
    let (state, acked) = if delta {
        (ReplicationState::Replicating, f.point_seq)
    } else if resync {
        (ReplicationState::Resynchronizing, 0)
    } else {
        (ReplicationState::WaitingForInitialReplication, 0)
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
        row.vm_uuid,
        f.relationship,
        &settings,
        &theirs.host_name,
        state,
        acked,
        note.as_deref(),
    )?;
    {
        let db = d.db();
        replica::delete(&db, row.vm_uuid).map_err(internal)?;
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

type Refusal = (RefusalCode, String);

/// `PrimaryState`: answered only to the host this one replicates the VM to.
pub fn primary_state(d: &Host, peer: &str, vm_uuid: Uuid) -> Result<PeerResponse, Refusal> {
    let rel = primary::load(d, vm_uuid)
        .filter(|r| r.replica_name.eq_ignore_ascii_case(peer))
        .ok_or_else(|| {
            (
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
        (
            RefusalCode::NotAuthorized,
            format!(
                "VM {vm_uuid} exists on this host but is not replicated to {peer} under \
                 relationship {}; a peer may only reverse the replication of a VM this host \
                 replicates to it, so nothing was changed",
                relationship.map_or("(none given)".to_string(), |r| r.to_string())
            ),
        )
    };
    let rel = primary::load(d, vm_uuid).ok_or_else(refused)?;
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
        return Err((
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
    let (outcome, adopt_at) = match common_base(&local, &rel, vm, base_seq) {
        Ok(()) => (TakeOver::Common, base_seq),
        Err(why) if same_disks => (TakeOver::Diverged(why), 0),
        Err(why) => {
            // Never delete this host's disks because a peer asked: its admin decides.
            return Err((
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
    let internal = |e: String| (RefusalCode::Internal, e);
    // No cycle of the old relationship may run from here on, and nobody may start the VM.
    primary::stop_scheduler(d, vm.uuid);
    d.vmm
        .set_failover_lock(vm.uuid, true)
        .await
        .map_err(|e| (RefusalCode::VmRunning, e.message))?;
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
    primary::delete_row(d, vm.uuid);
    drop(op);
    // The VM now lives on the peer: drop it here (with the adoption its data lives on as the
    // replica's base, through the store's own links).
    d.vmm
        .delete(&local.name, false)
        .await
        .map_err(|e| internal(e.message))?;
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
            settings: primary::default_settings("h:1"),
            replica_name: "h".into(),
            state,
            acked_seq: seq,
            last_error: None,
            created_ms: 0,
            last_success_ms: None,
            note: None,
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
