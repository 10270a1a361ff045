//! Applying verified logs to the replica store, in order, and keeping the recovery points
//! the policy asks for; at daemon start, re-applying what was received but not applied (I3).

use crate::db::now_ms;
use crate::db::ReplicaRow;
use crate::db::ReplicaUpdate;
use crate::host::Host;
use crate::lifecycle::ReplicaEvent;
use crate::peer::proto::{PointPolicy, MAX_NVRAM_BYTES, NVRAM_DISK_ID};
use crate::replica::change;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;
use vmrepl_store::{ReplicaStore, ReplicaVm, StoreError};
use vmrepl_types::replication::{Consistency, ReplicationState};

/// The folder of a replica VM.
pub fn vm_dir(row: &ReplicaRow) -> PathBuf {
    ReplicaStore::vm_dir(&row.storage_root, row.vm_uuid)
}

// ------------------------------------------------------------------ apply

/// What applying one log did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub seq: u64,
    /// False when the log had been applied before (idempotent no-op, I3).
    pub applied: bool,
    pub unix_ms: i64,
    pub consistency: Consistency,
}

pub(crate) fn consistency(c: vmrepl_log::Consistency) -> Consistency {
    match c {
        vmrepl_log::Consistency::Crash => Consistency::Crash,
        vmrepl_log::Consistency::AppConsistent => Consistency::AppConsistent,
        vmrepl_log::Consistency::Planned => Consistency::Planned,
    }
}

/// Why a log could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("log {path} cannot be applied: {reason}")]
    Log { path: PathBuf, reason: String },
    #[error(
        "log {path} is damaged on this host ({reason}); it was set aside, and the primary \
         resynchronizes the replica by block compare"
    )]
    Damaged { path: PathBuf, reason: String },
    #[error("the apply task failed: {0}")]
    Task(String),
}

impl ApplyError {
    /// The replication state an apply failure leaves the replica in.
    pub fn state(&self) -> ReplicationState {
        match self {
            ApplyError::Store(e) if e.needs_resync() => ReplicationState::ResynchronizationRequired,
            ApplyError::Damaged { .. } => ReplicationState::ResynchronizationRequired,
            _ => ReplicationState::Error,
        }
    }

    /// Whether the failure is a full replica storage.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, ApplyError::Store(StoreError::DiskFull { .. }))
    }
}

/// Checks a received log's header against the replica (VM id, sequence, base, disks and sizes).
pub fn check_header(
    h: &vmrepl_log::LogHeader,
    vm_uuid: Uuid,
    seq: u64,
    base: u64,
    disks: &[(String, u64)],
) -> Result<(), String> {
    if h.vm_id != vm_uuid {
        return Err(format!(
            "the log belongs to VM {} but was sent for VM {vm_uuid}",
            h.vm_id
        ));
    }
    if h.sequence != seq || h.base_sequence != base {
        return Err(format!(
            "the log is sequence {} on base {}, but was sent as sequence {seq} on base {base}",
            h.sequence, h.base_sequence
        ));
    }
    for d in &h.disks {
        if d.id == NVRAM_DISK_ID {
            if d.virtual_size > MAX_NVRAM_BYTES {
                return Err(format!(
                    "the NVRAM in the log is {} bytes; at most {MAX_NVRAM_BYTES} are accepted",
                    d.virtual_size
                ));
            }
            continue;
        }
        match disks.iter().find(|(id, _)| *id == d.id) {
            None => {
                return Err(format!(
                    "the log names disk {:?}, which the replica VM does not have (it has {})",
                    d.id,
                    disks
                        .iter()
                        .map(|(i, _)| i.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
            Some((_, size)) if *size != d.virtual_size => {
                return Err(format!(
                    "the log gives disk {} a size of {} bytes; the replica's disk is {size} bytes \
                     (disk resizes are not replicated; resynchronize)",
                    d.id, d.virtual_size
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Applies the verified log file `path` to `vm` (blocking; call from `spawn_blocking` with the
/// VM's lock held). Logs at or below the last applied sequence are a no-op.
pub fn apply_log(vm: &mut ReplicaVm, path: &Path, verified: bool) -> Result<Applied, ApplyError> {
    let lerr = |reason: String| ApplyError::Log {
        path: path.to_path_buf(),
        reason,
    };
    // The log's own content is wrong (it verified when it arrived, so the disk damaged it).
    let derr = |reason: String| ApplyError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    let f = std::fs::File::open(path).map_err(|e| lerr(e.to_string()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let buffered = std::io::BufReader::with_capacity(256 * 1024, f);
    let reader = if verified {
        vmrepl_log::LogReader::verified_before(buffered)
    } else {
        vmrepl_log::LogReader::new(buffered)
    }
    .map_err(|e| derr(e.to_string()))?;
    let mut reader = reader;
    apply_records(
        vm,
        &mut reader,
        Sizes {
            space: len,
            log: len,
        },
        &derr,
    )
}

/// What applying an initial copy in place as it arrives ([`apply_initial_in_place`]) came to.
#[derive(Debug)]
pub enum InPlace {
    /// Verified whole and committed: durable, so it may be acknowledged (I1, I4).
    Applied(vmrepl_log::LogHeader, Applied),
    /// The log is not valid (a check of its own, its header against the replica, or it ends
    /// early): nothing of it counts.
    Bad(String),
    /// The store failed (a full disk).
    Store(ApplyError),
}

/// The replica under `root`, opened, when it awaits its initial copy with nothing received
/// before it: one arriving is then applied in place as it arrives ([`apply_initial_in_place`]).
pub fn open_for_in_place(root: &Path, vm_uuid: Uuid) -> Option<ReplicaVm> {
    ReplicaStore::open(root, vm_uuid)
        .ok()
        .filter(|vm| vm.awaits_initial_copy() && vm.pending_logs().is_ok_and(|l| l.is_empty()))
}

/// Applies an initial copy straight into the replica's images while it arrives (`input`), so
/// that its bytes are written once, not to the spool and then again into the images.
///
/// * Each record is written only once its own checksums verified; the apply commits (durable,
///   recorded as log 1) only once the whole log verified: its trailer's counts and digest
///   cover every record (I4). So the acknowledgement that follows finds the log durable (I1).
/// * Until the commit the images hold an unfinished apply that no point shows (the store's
///   apply journal). A log that turns out bad, a cut transfer or a crash leave it behind, and
///   the next initial copy clears it first ([`ReplicaVm::restart_initial_copy`]): an initial
///   copy is never resumed, the primary sends a new one from a new point in time.
/// * Only an initial copy (log 1 on 0, of this VM) is applied this way; anything else is bad.
///
/// `vm` is the replica as [`open_for_in_place`] opened it under `root`.
pub fn apply_initial_in_place<R: std::io::Read>(
    root: &Path,
    mut vm: ReplicaVm,
    input: R,
) -> InPlace {
    let vm_uuid = vm.vm_uuid();
    let mut reader = match vmrepl_log::LogReader::new(input) {
        Ok(r) => r,
        Err(e) => return InPlace::Bad(e.to_string()),
    };
    let h = reader.header().clone();
    if h.kind != vmrepl_log::LogKind::Initial
        || (h.sequence, h.base_sequence) != (1, 0)
        || h.vm_id != vm_uuid
    {
        return InPlace::Bad(format!(
            "an initial copy (log 1 on 0 of VM {vm_uuid}) was expected; this is a {:?} log {} \
             on {} of VM {}",
            h.kind, h.sequence, h.base_sequence, h.vm_id
        ));
    }
    if !vm.awaits_initial_copy() {
        return InPlace::Store(ApplyError::Log {
            path: vm_dir_of(root, vm_uuid),
            reason: "the replica holds a recovery point already; an initial copy is not \
                     applied over it"
                .into(),
        });
    }
    if let Err(e) = vm.restart_initial_copy() {
        return InPlace::Store(e.into());
    }
    let bad = std::cell::RefCell::new(None::<String>);
    let derr = |reason: String| {
        *bad.borrow_mut() = Some(reason.clone());
        ApplyError::Log {
            path: vm_dir_of(root, vm_uuid),
            reason,
        }
    };
    // The length is unknown before the end: the receive loop watches the free space as the
    // bytes arrive (and a write that finds the disk full fails as such), so no space is
    // asked for up front; the images are written as for a large log.
    let size = Sizes {
        space: 0,
        log: vmrepl_store::BULK_APPLY_BYTES,
    };
    match apply_records(&mut vm, &mut reader, size, &derr) {
        Ok(a) => InPlace::Applied(h, a),
        Err(_) if bad.borrow().is_some() => InPlace::Bad(bad.into_inner().unwrap_or_default()),
        Err(e) => InPlace::Store(e),
    }
}

fn vm_dir_of(root: &Path, vm_uuid: Uuid) -> PathBuf {
    ReplicaStore::vm_dir(root, vm_uuid)
}

/// The sizes an apply plans with: the space it needs on the replica storage, and the log's
/// length (which chooses direct I/O, see [`vmrepl_store::ApplyTxn::bulk`]).
#[derive(Debug, Clone, Copy)]
struct Sizes {
    space: u64,
    log: u64,
}

/// Applies the records of the log `reader` reads. An error of the log's content is `derr`'s.
fn apply_records<R: std::io::Read>(
    vm: &mut ReplicaVm,
    reader: &mut vmrepl_log::LogReader<R>,
    size: Sizes,
    derr: &dyn Fn(String) -> ApplyError,
) -> Result<Applied, ApplyError> {
    let h = reader.header().clone();
    let disks = vm.disks();
    check_header(&h, vm.vm_uuid(), h.sequence, h.base_sequence, &disks).map_err(derr)?;
    let out = Applied {
        seq: h.sequence,
        applied: true,
        unix_ms: h.timestamp_unix_ms as i64,
        consistency: consistency(h.consistency),
    };
    vm.check_space(size.space)?;
    let part = h.kind == vmrepl_log::LogKind::ResyncPart;
    if part {
        keep_whole_latest(vm)?;
    }
    let mut txn = match vm.begin_apply(h.sequence, h.base_sequence)? {
        vmrepl_store::Begin::AlreadyApplied { .. } => {
            return Ok(Applied {
                applied: false,
                ..out
            })
        }
        vmrepl_store::Begin::Apply(txn) => txn,
    };
    txn.bulk(size.log);
    // A disk the log lists is in the point it makes, written or not (a disk added to the
    // replica joins the points with the log that carries its initial copy).
    for d in h.disks.iter().filter(|d| d.id != NVRAM_DISK_ID) {
        txn.carries(&d.id)?;
    }
    let mut nvram: Option<Vec<u8>> = None;
    while let Some(rec) = reader.next_record().map_err(|e| derr(e.to_string()))? {
        let Some(d) = h.disks.get(usize::from(rec.disk_index)) else {
            return Err(derr(format!("record for unknown disk #{}", rec.disk_index)));
        };
        if d.id == NVRAM_DISK_ID {
            let buf = nvram.get_or_insert_with(|| vec![0u8; d.virtual_size as usize]);
            let (off, n) = match rec.content {
                vmrepl_log::ContentRef::Data(b) => (rec.offset, b.len() as u64),
                vmrepl_log::ContentRef::Zero(n) => (rec.offset, u64::from(n)),
            };
            let end = off
                .checked_add(n)
                .filter(|e| *e <= buf.len() as u64)
                .ok_or_else(|| derr(format!("NVRAM extent {off}+{n} beyond its size")))?;
            let range = off as usize..end as usize;
            match rec.content {
                vmrepl_log::ContentRef::Data(b) => buf[range].copy_from_slice(b),
                vmrepl_log::ContentRef::Zero(_) => buf[range].fill(0),
            }
            continue;
        }
        match rec.content {
            vmrepl_log::ContentRef::Data(b) => txn.write(&d.id, rec.offset, b)?,
            vmrepl_log::ContentRef::Zero(n) => txn.write_zeroes(&d.id, rec.offset, u64::from(n))?,
        }
    }
    if let Some(nv) = nvram {
        txn.set_nvram(&nv);
    }
    crate::faults::crash_point(crate::faults::CrashPoint::ReplicaApplying);
    if part {
        txn.commit_part()?;
    } else {
        txn.commit(out.unix_ms, out.consistency)?;
    }
    Ok(out)
}

/// Before the first part of a resynchronization in parts: the latest state is whole, and the
/// parts will leave it mixed until the resynchronization ends, so it is frozen as a recovery
/// point first (whatever the policy says; the policy prunes it afterwards). A failover during
/// the resynchronization then still has the newest whole state to start from.
fn keep_whole_latest(vm: &mut ReplicaVm) -> Result<(), StoreError> {
    if vm.resyncing().is_some() || vm.torn().is_some() || vm.last_applied() == 0 {
        return Ok(());
    }
    let Some(latest) = vm
        .points()
        .into_iter()
        .find(|p| p.kind == vmrepl_store::PointKind::Latest)
    else {
        return Ok(());
    };
    let frozen = vm
        .points()
        .iter()
        .any(|p| p.kind == vmrepl_store::PointKind::Frozen && p.seq == latest.seq);
    if !frozen {
        vm.freeze_point(latest.seq, latest.unix_ms, latest.consistency)?;
        tracing::info!(target: "vmrepl::replica", vm = %vm.vm_uuid(), seq = latest.seq, "the whole state before a resynchronization in parts is kept as a recovery point");
    }
    Ok(())
}

/// Applies every pending log of `vm` in order (blocking). Pending logs were verified whole
/// before they got their spool name (`vmrepl_store::spool`), so they are not read twice; a log
/// that does not build on what is applied (a gap) waits for the primary.
pub fn apply_pending(
    vm: &mut ReplicaVm,
    verified: Option<u64>,
) -> Result<Vec<Applied>, ApplyError> {
    let mut done = Vec::new();
    for (seq, path) in vm.pending_logs()? {
        if seq != vm.last_applied() + 1 {
            break;
        }
        let t0 = std::time::Instant::now();
        match apply_log(vm, &path, verified == Some(seq)) {
            Ok(a) => done.push(a),
            // A damaged log never applies: set it aside (kept for a post-mortem) so that
            // nothing waits on it, and let a resynchronization repair the replica.
            Err(ApplyError::Damaged { path, reason }) => {
                let aside = path.with_extension("damaged");
                let _ = std::fs::rename(&path, &aside);
                tracing::error!(target: "vmrepl::replica", seq, path = %aside.display(), "damaged log set aside: {reason}");
                return Err(ApplyError::Damaged {
                    path: aside,
                    reason,
                });
            }
            Err(e) => return Err(e),
        }
        tracing::info!(target: "vmrepl::replica", seq, ms = t0.elapsed().as_millis() as u64, "log applied");
    }
    vm.discard_applied_logs()?;
    Ok(done)
}

/// After logs were applied: freeze a recovery point when the policy says so, and prune.
/// Returns whether a point was frozen.
pub fn points_after_apply(
    vm: &mut ReplicaVm,
    last: &Applied,
    policy: &PointPolicy,
    last_point_ms: Option<u64>,
) -> Result<bool, StoreError> {
    if vm.resyncing().is_some() {
        // In the middle of a resynchronization in parts: no whole state to freeze, and the
        // points from before it stay until it ends.
        return Ok(false);
    }
    if policy.keep == 0 {
        // Only the latest point is kept.
        vm.prune(0)?;
        return Ok(false);
    }
    let has_frozen = vm
        .points()
        .iter()
        .any(|p| p.kind == vmrepl_store::PointKind::Frozen);
    // An app-consistent log always becomes a recovery point (Hyper-V's app-consistent
    // snapshots are recovery points too), whatever the interval says.
    let due = match last_point_ms {
        _ if !has_frozen => true,
        _ if last.consistency == Consistency::AppConsistent => true,
        None => true,
        Some(t) => now_ms().saturating_sub(t) >= u64::from(policy.interval_secs) * 1000,
    };
    let frozen = if due
        && !vm
            .points()
            .iter()
            .any(|p| p.kind == vmrepl_store::PointKind::Frozen && p.seq == last.seq)
    {
        vm.freeze_point(last.seq, last.unix_ms, last.consistency)?;
        true
    } else {
        false
    };
    vm.prune(policy.keep as usize)?;
    Ok(frozen)
}

/// Opens the store, applies pending logs, manages points and updates the row. Blocking part
/// run under the VM's lock. Returns the last applied sequence.
pub async fn apply_and_record(daemon: &Arc<Host>, row: &ReplicaRow) -> Result<u64, ApplyError> {
    apply_with(daemon, row, None, None).await
}

/// [`apply_and_record`] right after log `seq` was verified whole on its way in: that log's
/// content checksums are not computed a second time ([`vmrepl_log::LogReader::verified_before`]).
/// `streamed` is that log's apply when it was done while it arrived
/// ([`verify_and_apply_initial`]): it is recorded like one applied here.
pub async fn apply_verified(
    daemon: &Arc<Host>,
    row: &ReplicaRow,
    seq: u64,
    streamed: Option<Applied>,
) -> Result<u64, ApplyError> {
    apply_with(daemon, row, Some(seq), streamed).await
}

pub(crate) async fn apply_with(
    daemon: &Arc<Host>,
    row: &ReplicaRow,
    verified: Option<u64>,
    streamed: Option<Applied>,
) -> Result<u64, ApplyError> {
    let root = row.storage_root.clone();
    let uuid = row.vm_uuid;
    let policy = row.policy;
    let last_point_ms = row.last_point_ms;
    let test_point = row.test_failover.as_ref().map(|t| t.point_seq);
    let res = tokio::task::spawn_blocking(move || -> Result<(u64, bool, bool, bool), ApplyError> {
        let mut vm = ReplicaStore::open(&root, uuid)?;
        // A running test failover pins its point (and everything below) against pruning.
        let _pins: Vec<vmrepl_store::PointLock> = test_point
            .iter()
            .filter_map(|s| vm.lock_point(*s).ok())
            .collect();
        let applied = apply_pending(&mut vm, verified).map(|mut list| {
            if let Some(a) = streamed.filter(|a| list.is_empty() && a.seq == vm.last_applied()) {
                list.push(a);
            }
            list
        });
        let frozen = match &applied {
            Ok(list) if !list.is_empty() => {
                let last = list[list.len() - 1];
                match points_after_apply(&mut vm, &last, &policy, last_point_ms) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::warn!(target: "vmrepl::replica", vm = %uuid, "recovery point: {e}");
                        false
                    }
                }
            }
            _ => false,
        };
        applied.map(|list| {
            (
                vm.last_applied(),
                frozen,
                !list.is_empty(),
                vm.resyncing().is_some(),
            )
        })
    })
    .await
    .map_err(|e| ApplyError::Task(e.to_string()))?;
    let db = daemon.db();
    match res {
        Ok((last, frozen, any, resyncing)) => {
            let event = if resyncing {
                ReplicaEvent::ResyncPartApplied
            } else if any {
                ReplicaEvent::LogApplied
            } else {
                ReplicaEvent::NoLogPending {
                    initial_done: last > 0,
                }
            };
            let update = ReplicaUpdate::Applied {
                last,
                new_point: frozen,
            };
            let _ = change(&db, uuid, event, None, update);
            Ok(last)
        }
        Err(e) => {
            tracing::error!(target: "vmrepl::replica", vm = %uuid, "apply failed: {e}");
            let event = ReplicaEvent::ApplyFailed {
                needs_resync: e.state() == ReplicationState::ResynchronizationRequired,
            };
            let _ = change(&db, uuid, event, Some(&e.to_string()), ReplicaUpdate::None);
            Err(e)
        }
    }
}

/// At daemon start: for every replica, re-apply the logs that were received (durable and
/// verified) but not applied, e.g. because the host crashed during apply (I3).
pub async fn recover(daemon: &Arc<Host>) {
    let rows = {
        let db = daemon.db();
        db.replicas().unwrap_or_else(|e| {
            tracing::error!(target: "vmrepl::replica", "cannot list replicas: {e}");
            Vec::new()
        })
    };
    // A failed-over replica takes no logs, and after completion it has no store any more.
    for row in rows.into_iter().filter(|r| r.failover.is_none()) {
        let lock = daemon.replica_locks.vm(&vm_dir(&row));
        let _g = lock.lock().await;
        match apply_and_record(daemon, &row).await {
            Ok(last) => {
                tracing::info!(target: "vmrepl::replica", vm = %row.vm_uuid, name = %row.name, last_applied = last, "replica recovered")
            }
            Err(e) => {
                tracing::warn!(target: "vmrepl::replica", vm = %row.vm_uuid, name = %row.name, "replica recovery: {e}")
            }
        }
    }
}

// ------------------------------------------------------------------ status
