//! Primary-side replication: relationships, the per-VM scheduler and one cycle, top-down.
//!
//! ```text
//! enable ──► WaitingForInitialReplication ──(initial log 1 acked)──► Replicating
//!                 ▲                                                   │  ▲
//!                 │ failure: bitmaps removed, retried                 │  │ resume
//!                 │                                                   ▼  │
//!                 │                                                 Suspended (pause)
//!                 │
//!   tracking cannot be trusted / replica refused a log as out of order
//!                 ──► ResynchronizationRequired
//! ```
//!
//! One cycle (for the relationship's recording bitmap N, last acknowledged log N):
//! 1. take the VM's operation lock (no start/stop while a cycle runs); reach its block nodes
//!    through the running QEMU, or through qemu-storage-daemon when the VM is off;
//! 2. if a built log N+1 is still waiting (a transfer was cut), resume it from what the
//!    replica holds durably; else one QMP transaction freezes bitmap N, starts N+1 and
//!    copies the dirty clusters of every disk (and the UEFI vars) into staging images;
//! 3. encode log N+1 (extents from the staging images, zstd, checksums) into a local file;
//! 4. send it; the replica acknowledges once it is durable and verified;
//! 5. only then drop bitmap N (I1). Any failure before the acknowledgement merges bitmap N
//!    back into N+1, so the next cycle carries the changes.

use crate::daemon::Daemon;
use crate::db::now_ms;
use crate::peer::client::{LogGrowth, PeerClient};
use crate::peer::proto::{PeerRequest, PeerResponse, PointPolicy, RefusalCode, Resume};
use rusqlite::{params, OptionalExtension};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;
use vmrepl_log::{Compression, DiskInfo, LogHeader, LogKind, LogWriter};
use vmrepl_tracking::{ChunkData, ExtentReader, RelTag, Staging};
use vmrepl_types::api::{ApiError, ErrorCode};
use vmrepl_types::replication::{
    Health, InitialReplication, Progress, ReplicationSettings, ReplicationState, ReplicationStats,
    ReplicationStatus, Role,
};
use vmrepl_types::{Generation, VmDefinition, VmName};

/// Hyper-V's default monitoring window for health and statistics.
pub const MONITORING_WINDOW_MS: u64 = 12 * 3600 * 1000;

/// In-memory state of the running relationships.
#[derive(Default)]
pub struct Runtime {
    rels: Mutex<HashMap<Uuid, Arc<RelRuntime>>>,
}

/// One relationship's live handles.
#[derive(Default)]
pub struct RelRuntime {
    wake: tokio::sync::Notify,
    progress: Mutex<Option<Progress>>,
    stop: std::sync::atomic::AtomicBool,
}

/// A relationship as stored.
#[derive(Debug, Clone)]
pub struct Relationship {
    pub vm_uuid: Uuid,
    pub rel_id: Uuid,
    pub settings: ReplicationSettings,
    pub replica_name: String,
    pub state: ReplicationState,
    pub acked_seq: u64,
    pub last_error: Option<String>,
    pub created_ms: u64,
    pub last_success_ms: Option<u64>,
    /// A remark `status` shows: why a reverse needed a full copy or a resynchronization,
    /// where an exported initial copy waits to be imported, or that an existing copy is being
    /// reconciled.
    pub note: Option<String>,
}

pub(crate) fn load(d: &Daemon, vm: Uuid) -> Option<Relationship> {
    let db = d.db.lock().expect("db");
    db.conn()
        .query_row(
            "SELECT rel_id, settings, replica_name, state, acked_seq, last_error, created_ms, last_success_ms, note FROM relationships WHERE vm_uuid = ?1",
            params![vm.to_string()],
            |r| {
                Ok(Relationship {
                    vm_uuid: vm,
                    rel_id: r.get::<_, String>(0)?.parse().unwrap_or_default(),
                    settings: serde_json::from_str(&r.get::<_, String>(1)?).map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e))
                    })?,
                    replica_name: r.get(2)?,
                    state: vmrepl_types::from_wire_name(&r.get::<_, String>(3)?).unwrap_or(ReplicationState::Error),
                    acked_seq: r.get::<_, i64>(4)? as u64,
                    last_error: r.get(5)?,
                    created_ms: r.get::<_, i64>(6)? as u64,
                    last_success_ms: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
                    note: r.get(8)?,
                })
            },
        )
        .optional()
        .ok()
        .flatten()
}

fn all_vm_uuids(d: &Daemon) -> Vec<Uuid> {
    let db = d.db.lock().expect("db");
    let mut st = match db.conn().prepare("SELECT vm_uuid FROM relationships") {
        Ok(s) => s,
        Err(_) => return vec![],
    };
    st.query_map([], |r| r.get::<_, String>(0))
        .map(|rows| rows.flatten().filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_default()
}

pub(crate) fn set_state(d: &Daemon, vm: Uuid, state: ReplicationState, error: Option<&str>) {
    let db = d.db.lock().expect("db");
    let _ = db.conn().execute(
        "UPDATE relationships SET state = ?2, last_error = ?3 WHERE vm_uuid = ?1",
        params![vm.to_string(), vmrepl_types::wire_name(&state), error],
    );
    let _ = db.event(
        Some(vm),
        &format!(
            "replication {state}{}",
            error.map(|e| format!(": {e}")).unwrap_or_default()
        ),
    );
}

#[allow(clippy::too_many_arguments)]
fn record_cycle(
    d: &Daemon,
    vm: Uuid,
    seq: u64,
    kind: &str,
    start_ms: u64,
    bytes: u64,
    outcome: &str,
    error: Option<&str>,
) {
    let db = d.db.lock().expect("db");
    let _ = db.conn().execute(
        "INSERT INTO cycles (vm_uuid, seq, kind, start_ms, duration_ms, bytes, outcome, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            vm.to_string(),
            seq as i64,
            kind,
            start_ms as i64,
            (now_ms().saturating_sub(start_ms)) as i64,
            bytes as i64,
            outcome,
            error
        ],
    );
}

fn record_success(d: &Daemon, vm: Uuid, acked: u64, state: ReplicationState) {
    let db = d.db.lock().expect("db");
    let _ = db.conn().execute(
        "UPDATE relationships SET acked_seq = ?2, state = ?3, last_error = NULL, last_success_ms = ?4 WHERE vm_uuid = ?1",
        params![vm.to_string(), acked as i64, vmrepl_types::wire_name(&state), now_ms() as i64],
    );
}

/// Splits `host:port` and gives the name the replica's certificate must carry.
fn replica_target(s: &ReplicationSettings) -> Result<(String, String), ApiError> {
    let (host, port) = s.replica_server.rsplit_once(':').ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidInput,
            format!(
                "Replica server {:?} is not HOST:PORT (for example hostb.example.org:7443).",
                s.replica_server
            ),
        )
    })?;
    port.parse::<u16>().map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidInput,
            format!("Port {port:?} of the replica server is not a number."),
        )
    })?;
    let name = s
        .replica_host_name
        .clone()
        .unwrap_or_else(|| host.to_string());
    Ok((s.replica_server.clone(), name))
}

pub(crate) async fn connect(
    d: &Daemon,
    s: &ReplicationSettings,
) -> Result<(PeerClient, vmrepl_types::HostInfo), String> {
    let (addr, name) = replica_target(s).map_err(|e| e.message)?;
    PeerClient::connect(&d.identity, d.vmm.caps(), &addr, &name)
        .await
        .map_err(|e| e.to_string())
}

/// The disks a relationship replicates, as (node, size).
pub(crate) fn replicated_disks(vm: &VmDefinition, s: &ReplicationSettings) -> Vec<(String, u64)> {
    vm.disks
        .iter()
        .filter(|d| !s.exclude_disks.contains(&d.id))
        .map(|d| (d.id.clone(), d.size_bytes))
        .collect()
}

/// The VM as its replica keeps it: without the excluded disks.
pub(crate) fn replica_view(vm: &VmDefinition, s: &ReplicationSettings) -> VmDefinition {
    let mut out = vm.clone();
    out.disks.retain(|x| !s.exclude_disks.contains(&x.id));
    out
}

/// The recovery-point policy the replica is asked to keep.
pub(crate) fn point_policy(s: &ReplicationSettings) -> PointPolicy {
    PointPolicy {
        keep: s.recovery_points,
        interval_secs: s.recovery_point_interval_secs,
    }
}

/// Enables replication of a VM (Hyper-V's Enable-VMReplication).
pub async fn enable(
    d: &Arc<Daemon>,
    name: &VmName,
    settings: ReplicationSettings,
) -> Result<String, ApiError> {
    settings.validate().map_err(|m| {
        ApiError::new(
            ErrorCode::InvalidInput,
            format!("Invalid replication settings: {m}."),
        )
    })?;
    let vm = d.vmm.show(name)?.definition;
    if load(d, vm.uuid).is_some() {
        return Err(ApiError::new(
            ErrorCode::AlreadyExists,
            format!("Replication is already enabled for VM {name}; `vmrepl replication status {name}` shows it, `replication remove` removes it."),
        ));
    }
    for x in &settings.exclude_disks {
        if vm.disk(x).is_none() {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!(
                    "VM {name} has no disk {x:?} to exclude; its disks are {}.",
                    vm.disks
                        .iter()
                        .map(|d| d.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    if replicated_disks(&vm, &settings).is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidInput,
            format!("VM {name} would replicate no disk; exclude fewer."),
        ));
    }
    match &settings.initial {
        InitialReplication::NetworkNow => {}
        InitialReplication::NetworkAt { unix_secs } => {
            let now = now_ms() / 1000;
            if *unix_secs > now + 7 * 86400 {
                return Err(ApiError::new(
                    ErrorCode::InvalidInput,
                    "Initial replication can be scheduled at most 7 days ahead (as in Hyper-V).",
                ));
            }
        }
        InitialReplication::Export { folder } => check_export_folder(folder)?,
        InitialReplication::ExistingCopy => {}
    }
    let (mut client, theirs) = reach_replica(d, &settings, &vm).await?;
    let replica_vm = replica_view(&vm, &settings);
    let ask = |r: PeerResponse, what: &str| -> Result<(), ApiError> {
        match r {
            PeerResponse::Ok => Ok(()),
            PeerResponse::Refused { message, .. } => Err(ApiError::new(
                ErrorCode::Peer,
                format!(
                    "The replica server {} refused to {what}: {message}",
                    theirs.host_name
                ),
            )),
            other => Err(ApiError::new(
                ErrorCode::Peer,
                format!("Unexpected answer from the replica server: {other:?}"),
            )),
        }
    };
    let r = client
        .request(&PeerRequest::CheckReplica {
            vm: Box::new(replica_vm.clone()),
        })
        .await
        .map_err(|e| ApiError::new(ErrorCode::Peer, e.to_string()))?;
    ask(r, "host this VM")?;
    let rel_id = Uuid::new_v4();
    let policy = point_policy(&settings);
    let my_addr = d.cfg.read().expect("cfg").listen.clone();
    let existing_copy = settings.initial == InitialReplication::ExistingCopy;
    let r = client
        .request(&PeerRequest::CreateReplica {
            vm: Box::new(replica_vm),
            relationship: rel_id,
            policy,
            primary_server: Some(my_addr),
            existing_copy,
        })
        .await
        .map_err(|e| ApiError::new(ErrorCode::Peer, e.to_string()))?;
    ask(
        r,
        if existing_copy {
            "take its existing copy of the VM as the replica"
        } else {
            "create the replica VM"
        },
    )?;
    if let Err(e) = send_boot_files(&mut client, &vm, &[]).await {
        // Every cycle tries again; a failover on the replica waits for them and says so.
        tracing::warn!(target: "vmrepl::replication", vm = %name, "boot files not sent yet: {e}");
    }
    // An existing copy on the replica is brought to this VM's state by block compare: the
    // resynchronization algorithm, from sequence 0.
    let (state, note) = match &settings.initial {
        InitialReplication::NetworkAt { .. } => {
            (ReplicationState::ReadyForInitialReplication, None)
        }
        InitialReplication::ExistingCopy => (
            ReplicationState::Resynchronizing,
            Some(format!(
                "Initial replication from the existing copy on {}: only the blocks that differ are sent.",
                theirs.host_name
            )),
        ),
        _ => (ReplicationState::WaitingForInitialReplication, None),
    };
    insert(
        d,
        vm.uuid,
        rel_id,
        &settings,
        &theirs.host_name,
        state,
        0,
        note.as_deref(),
    )?;
    spawn(d, vm.uuid);
    Ok(format!(
        "Replication of {name} to {} enabled ({}); initial replication {}.",
        theirs.host_name,
        settings.replica_server,
        match &settings.initial {
            InitialReplication::NetworkAt { unix_secs } =>
                format!("scheduled at unix time {unix_secs}"),
            InitialReplication::Export { folder } => format!(
                "is being exported to {}; carry it to {} and run `vmrepl replication import {name} --from {}` there",
                export_file(folder, name).display(),
                theirs.host_name,
                export_file(folder, name).display()
            ),
            InitialReplication::ExistingCopy => format!(
                "compares the copy on {} with this VM and sends only the blocks that differ",
                theirs.host_name
            ),
            InitialReplication::NetworkNow => "starts now".into(),
        }
    ))
}

/// Connects to the replica server `settings` name and checks that its QEMU runs `vm` exactly
/// as it is (I7), before a relationship is set up towards it (enable, reverse).
pub(crate) async fn reach_replica(
    d: &Daemon,
    settings: &ReplicationSettings,
    vm: &VmDefinition,
) -> Result<(PeerClient, vmrepl_types::HostInfo), ApiError> {
    let (client, theirs) = connect(d, settings).await.map_err(|e| {
        ApiError::new(
            ErrorCode::Peer,
            format!(
                "Cannot reach the replica server {}: {e}. Nothing was changed.",
                settings.replica_server
            ),
        )
    })?;
    theirs.check_runs(vm).map_err(|why| {
        ApiError::new(
            ErrorCode::Unsupported,
            format!(
                "The replica server {} cannot run VM {}: {why}. Nothing was changed.",
                theirs.host_name, vm.name
            ),
        )
    })?;
    Ok((client, theirs))
}

/// A VM that boots a kernel directly: its kernel and initrd travel to the replica like its
/// disks (the replica never boots a path this host names), sent at enable and reverse and
/// again by any cycle that finds the replica's copy different (`held`: what the replica
/// holds, with digests).
pub(crate) async fn send_boot_files(
    client: &mut PeerClient,
    vm: &VmDefinition,
    held: &[(crate::peer::proto::BootFile, String)],
) -> Result<(), String> {
    use crate::peer::proto::BootFile;
    let Some(k) = &vm.kernel else {
        return Ok(());
    };
    let files = [
        (BootFile::Kernel, Some(&k.kernel)),
        (BootFile::Initrd, k.initrd.as_ref()),
    ];
    for (file, path) in files {
        let Some(path) = path else { continue };
        let p = path.clone();
        let sum = tokio::task::spawn_blocking(move || boot_file_digest(&p))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| {
                format!(
                    "cannot read the {} {}: {e}",
                    file.file_name(),
                    path.display()
                )
            })?;
        if held
            .iter()
            .any(|(f, h)| *f == file && h.eq_ignore_ascii_case(&sum.1))
        {
            continue;
        }
        match client
            .put_boot_file(vm.uuid, file, path, sum)
            .await
            .map_err(|e| e.to_string())?
        {
            PeerResponse::Ok => {
                tracing::info!(target: "vmrepl::replication", vm = %vm.name, file = file.file_name(), "boot file sent to the replica");
            }
            other => {
                return Err(format!(
                    "the replica did not keep the {}: {other:?}",
                    file.file_name()
                ))
            }
        }
    }
    Ok(())
}

/// Size and BLAKE3 digest (hex) of a boot file, remembered while its size and modification
/// time stay the same (a kernel is read once, not every cycle).
fn boot_file_digest(path: &Path) -> std::io::Result<(u64, String)> {
    type Seen = HashMap<PathBuf, (u64, std::time::SystemTime, String)>;
    static SEEN: std::sync::OnceLock<Mutex<Seen>> = std::sync::OnceLock::new();
    let meta = std::fs::metadata(path)?;
    let (len, mtime) = (meta.len(), meta.modified()?);
    let seen = SEEN.get_or_init(Default::default);
    if let Some((l, m, h)) = seen.lock().unwrap_or_else(|p| p.into_inner()).get(path) {
        if *l == len && *m == mtime {
            return Ok((len, h.clone()));
        }
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(std::fs::File::open(path)?)?;
    let hex = hasher.finalize().to_hex().to_string();
    seen.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(path.to_path_buf(), (len, mtime, hex.clone()));
    Ok((len, hex))
}

/// Where the initial copy of VM `name` goes when exported to `folder` (external media).
pub fn export_file(folder: &Path, name: &VmName) -> PathBuf {
    folder.join(format!("{name}.vmrlog"))
}

/// An export folder must be an existing, writable directory given by an absolute path.
fn check_export_folder(folder: &Path) -> Result<(), ApiError> {
    let bad = |why: String| ApiError::new(ErrorCode::InvalidInput, why);
    if !folder.is_absolute() {
        return Err(bad(format!(
            "The export folder {} is not an absolute path.",
            folder.display()
        )));
    }
    if !folder.is_dir() {
        return Err(bad(format!(
            "The export folder {} does not exist or is not a folder; create it (for example on the external disk) first.",
            folder.display()
        )));
    }
    let probe = folder.join(format!(".vmrepl-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| {
        bad(format!(
            "This host cannot write into the export folder {}: {e}.",
            folder.display()
        ))
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Records a new relationship (enable, or reverse replication after a failover, which starts
/// at the common point `acked_seq`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn insert(
    d: &Daemon,
    vm: Uuid,
    rel_id: Uuid,
    settings: &ReplicationSettings,
    replica_name: &str,
    state: ReplicationState,
    acked_seq: u64,
    note: Option<&str>,
) -> Result<(), ApiError> {
    let db = d.db.lock().expect("db");
    db.conn()
        .execute(
            "INSERT INTO relationships (vm_uuid, rel_id, settings, replica_name, state, created_ms, acked_seq, note) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                vm.to_string(),
                rel_id.to_string(),
                serde_json::to_string(settings).unwrap_or_default(),
                replica_name,
                vmrepl_types::wire_name(&state),
                now_ms() as i64,
                acked_seq as i64,
                note
            ],
        )
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let _ = db.event(
        Some(vm),
        &format!(
            "replication to {replica_name} set up{}",
            note.map(|n| format!(": {n}")).unwrap_or_default()
        ),
    );
    Ok(())
}

/// Ends a relationship's scheduler (a cycle in flight finishes; none starts after it).
pub(crate) fn stop_scheduler(d: &Daemon, vm: Uuid) {
    if let Some(rt) = d.repl.rels.lock().expect("rels").remove(&vm) {
        rt.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        rt.wake.notify_one();
    }
}

/// Drops a relationship's row and ends its scheduler.
pub(crate) fn delete_row(d: &Daemon, vm: Uuid) {
    stop_scheduler(d, vm);
    let db = d.db.lock().expect("db");
    let _ = db.conn().execute(
        "DELETE FROM relationships WHERE vm_uuid = ?1",
        params![vm.to_string()],
    );
}

/// Runs cycles now, outside the schedule, until one built and shipped a fresh log of every
/// change so far (a cut transfer waiting to resume is finished first). Used by a planned
/// failover's prepare with `Consistency::Planned`. Returns the acknowledged sequence and, for
/// an app-consistent point, how freezing the guest went.
pub(crate) async fn replicate_now(
    d: &Arc<Daemon>,
    vm: Uuid,
    consistency: vmrepl_log::Consistency,
) -> Result<(u64, Option<Freeze>), String> {
    let rt = d
        .repl
        .rels
        .lock()
        .expect("rels")
        .get(&vm)
        .cloned()
        .unwrap_or_default();
    for _ in 0..3 {
        let rel = load(d, vm).ok_or("replication was removed")?;
        let waiting = log_path(d, RelTag::from_uuid(&rel.rel_id), rel.acked_seq + 1).exists();
        let freeze = run_cycle(d, vm, &rt, consistency).await?;
        *rt.progress.lock().expect("progress") = None;
        if !waiting {
            return Ok((load(d, vm).map(|r| r.acked_seq).unwrap_or_default(), freeze));
        }
    }
    Err("a cut transfer kept failing to resume".into())
}

/// Starts the scheduler of every stored relationship (daemon start).
pub fn start_all(d: &Arc<Daemon>) {
    for vm in all_vm_uuids(d) {
        spawn(d, vm);
    }
}

pub(crate) fn spawn(d: &Arc<Daemon>, vm: Uuid) {
    let rt = Arc::new(RelRuntime::default());
    d.repl.rels.lock().expect("rels").insert(vm, rt.clone());
    let d = d.clone();
    tokio::spawn(async move { scheduler(d, vm, rt).await });
}

async fn scheduler(d: Arc<Daemon>, vm: Uuid, rt: Arc<RelRuntime>) {
    let mut last_start: Option<u64> = None;
    loop {
        if rt.stop.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let Some(rel) = load(&d, vm) else { return };
        let freq_ms = u64::from(rel.settings.frequency_secs) * 1000;
        let wait_ms = match rel.state {
            ReplicationState::Suspended
            | ReplicationState::ResynchronizationRequired
            | ReplicationState::SyncedReplicationComplete => u64::MAX,
            ReplicationState::ReadyForInitialReplication => match rel.settings.initial {
                InitialReplication::NetworkAt { unix_secs } => {
                    (unix_secs * 1000).saturating_sub(now_ms())
                }
                _ => 0,
            },
            ReplicationState::WaitingForInitialReplication => {
                // Retry a failed initial copy after one interval.
                if last_start.is_some() {
                    freq_ms
                } else {
                    0
                }
            }
            _ => last_start
                .map(|s| (s + freq_ms).saturating_sub(now_ms()))
                .unwrap_or(0),
        };
        if wait_ms > 0 {
            let sleep = Duration::from_millis(wait_ms.min(3_600_000));
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                // Pause, resume or remove: look again. A resumed relationship replicates at
                // once, and the time it spent paused is not counted as missed cycles.
                _ = rt.wake.notified() => { last_start = None; continue; }
            }
            if wait_ms > 3_600_000 {
                continue;
            }
        }
        if let Some(prev) = last_start {
            // Hyper-V counts a cycle as missed when the log could not go out within its interval.
            let late = now_ms().saturating_sub(prev);
            let missed = late / freq_ms.max(1);
            for _ in 1..missed {
                record_cycle(
                    &d,
                    vm,
                    rel.acked_seq + 1,
                    "delta",
                    now_ms(),
                    0,
                    "missed",
                    None,
                );
            }
        }
        let start = now_ms();
        last_start = Some(start);
        let running = d.vmm.live_process(vm).await.is_some();
        let consistency = if app_consistent_due(
            &rel.settings,
            rel.state,
            running,
            last_marked_ms(&d, vm, rel.created_ms, Marked::AppFreezeTried),
            start,
        ) {
            vmrepl_log::Consistency::AppConsistent
        } else {
            vmrepl_log::Consistency::Crash
        };
        if let Err(e) = run_cycle(&d, vm, &rt, consistency).await {
            tracing::warn!(target: "vmrepl::replication", %vm, "cycle failed: {e}");
        }
        *rt.progress.lock().expect("progress") = None;
    }
}

/// Where a cycle reaches the VM's block nodes.
pub(crate) enum Endpoint {
    Live(Arc<vmrepl_qemu::process::QemuProcess>),
    Offline(vmrepl_tracking::OfflineDisks),
}

impl Endpoint {
    /// The running VM's QEMU, or qemu-storage-daemon over the replicated disks (and the vars
    /// image) when the VM is off. The caller holds the VM's operation lock.
    pub(crate) async fn open(
        d: &Daemon,
        vm: &VmDefinition,
        nodes: &[String],
        vars: Option<&str>,
    ) -> Result<Endpoint, String> {
        if let Some(p) = d.vmm.live_process(vm.uuid).await {
            return Ok(Endpoint::Live(p));
        }
        let disk_paths: Vec<(String, PathBuf)> = vm
            .disks
            .iter()
            .filter(|x| nodes.contains(&x.id))
            .map(|x| (x.id.clone(), x.path.clone()))
            .collect();
        let run = d.dd.run_dir(vm.uuid).join("offline");
        vmrepl_tracking::OfflineDisks::open(
            &disk_paths,
            vm.nvram.as_deref().filter(|_| vars.is_some()),
            &run,
        )
        .await
        .map(Endpoint::Offline)
        .map_err(|e| format!("cannot open the VM's disks while it is off: {e}"))
    }

    pub(crate) fn qmp(&self) -> &vmrepl_qemu::qmp::QmpClient {
        match self {
            Endpoint::Live(p) => p.qmp(),
            Endpoint::Offline(o) => o.qmp(),
        }
    }
    pub(crate) async fn close(self) {
        if let Endpoint::Offline(o) = self {
            if let Err(e) = o.close().await {
                tracing::warn!(target: "vmrepl::replication", "closing offline disks: {e}");
            }
        }
    }
}

fn log_path(d: &Daemon, rel: RelTag, seq: u64) -> PathBuf {
    d.dd.staging()
        .join(format!("{}-{seq}.vmrlog", rel.as_str()))
}

/// One cycle, top-down.
/// How freezing the guest for an app-consistent point went: the file systems frozen, or why
/// it could not be done.
pub(crate) type Freeze = Result<u64, String>;

/// One cycle, top-down. Returns how freezing the guest went, when the cycle tried.
async fn run_cycle(
    d: &Arc<Daemon>,
    vm_uuid: Uuid,
    rt: &RelRuntime,
    consistency: vmrepl_log::Consistency,
) -> Result<Option<Freeze>, String> {
    let _op = d.vmm.op_lock(vm_uuid).await;
    if rt.stop.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(None);
    }
    let Some(rel) = load(d, vm_uuid) else {
        return Ok(None);
    };
    if rel.state == ReplicationState::SyncedReplicationComplete {
        // Prepared for a planned failover: nothing moves until it is cancelled.
        return Ok(None);
    }
    let vm = d
        .vmm
        .definition(vm_uuid)
        .ok_or_else(|| "the VM no longer exists".to_string())?;
    let tag = RelTag::from_uuid(&rel.rel_id);
    let disks = replicated_disks(&vm, &rel.settings);
    let nodes: Vec<String> = disks.iter().map(|(n, _)| n.clone()).collect();
    let vars = (vm.generation == Generation::Uefi && vm.nvram.is_some())
        .then_some(vmrepl_tracking::VARS_NODE);
    let start = now_ms();
    let initial = matches!(
        rel.state,
        ReplicationState::WaitingForInitialReplication
            | ReplicationState::ReadyForInitialReplication
    );
    let resync = rel.state == ReplicationState::Resynchronizing;
    let kind = if initial {
        "initial"
    } else if resync {
        "resync"
    } else {
        "delta"
    };
    let fail = |msg: String, network: bool| {
        record_cycle(
            d,
            vm_uuid,
            rel.acked_seq + 1,
            kind,
            start,
            0,
            if network {
                "network-failure"
            } else {
                "failure"
            },
            Some(&msg),
        );
        let st = if initial {
            rel.state
        } else if resync {
            ReplicationState::ResynchronizationRequired
        } else {
            ReplicationState::Replicating
        };
        set_state(d, vm_uuid, st, Some(&msg));
        msg
    };
    let (client, _theirs) = match connect(d, &rel.settings).await {
        Ok(c) => c,
        Err(e) => {
            return Err(fail(
                format!(
                    "cannot reach the replica server {}: {e}",
                    rel.settings.replica_server
                ),
                true,
            ))
        }
    };
    let exported = initial
        && matches!(rel.settings.initial, InitialReplication::Export { .. })
        && last_marked_ms(d, vm_uuid, rel.created_ms, Marked::Exported).is_some();
    if exported {
        // The initial copy went out on external media: wait until the replica imported it.
        // Bitmap 1 has recorded every change since the export's point in time.
        return await_import(d, vm_uuid, &rel, client)
            .await
            .map(|()| None)
            .map_err(|e| fail(e, false));
    }
    let endpoint = match Endpoint::open(d, &vm, &nodes, vars).await {
        Ok(e) => e,
        Err(e) => return Err(fail(e, false)),
    };
    let mut cycle = Cycle {
        d,
        rel: &rel,
        vm: &vm,
        client,
        endpoint: &endpoint,
        tag,
        disks,
        vars,
        staging: Staging::new(d.dd.staging()),
        rt,
        consistency,
        app_freeze: None,
    };
    let result = if initial {
        cycle.initial().await
    } else if resync {
        cycle.resync().await.map(Done::acked)
    } else {
        cycle.delta().await.map(Done::acked)
    };
    let app_freeze = cycle.app_freeze.take();
    drop(cycle);
    endpoint.close().await;
    let outcome = match result {
        Ok(Done::Exported { bytes }) => {
            // Log 1 is on the media, not acknowledged: the replica has yet to import it.
            record_cycle(d, vm_uuid, 1, "export", start, bytes, "ok", None);
            set_state(
                d,
                vm_uuid,
                ReplicationState::WaitingForInitialReplication,
                None,
            );
            if let InitialReplication::Export { folder } = &rel.settings.initial {
                set_note(d, vm_uuid, Some(&format!(
                    "The initial copy was exported to {}; import it on {} with `vmrepl replication import {} --from FILE`.",
                    export_file(folder, &vm.name).display(),
                    rel.replica_name,
                    vm.name
                )));
            }
            Ok(())
        }
        Ok(Done::Acked { seq, bytes }) => {
            record_cycle(d, vm_uuid, seq, kind, start, bytes, "ok", None);
            record_success(d, vm_uuid, seq, ReplicationState::Replicating);
            Ok(())
        }
        Err(CycleError::Resync(m)) => {
            record_cycle(
                d,
                vm_uuid,
                rel.acked_seq + 1,
                kind,
                start,
                0,
                "failure",
                Some(&m),
            );
            set_state(
                d,
                vm_uuid,
                ReplicationState::ResynchronizationRequired,
                Some(&m),
            );
            Err(m)
        }
        Err(CycleError::Network(m)) => Err(fail(m, true)),
        Err(CycleError::Other(m)) => Err(fail(m, false)),
    };
    if let Some(freeze) = &app_freeze {
        record_freeze(d, vm_uuid, start, freeze);
    }
    outcome.map(|()| app_freeze)
}

/// Cycles worth finding again in a relationship's record.
#[derive(Clone, Copy)]
enum Marked {
    /// The initial copy was exported to external media.
    Exported,
    /// An app-consistent point was tried (the guest frozen or not).
    AppFreezeTried,
}

/// When the last cycle of `vm` since `since_ms` (the relationship's creation) that is
/// `marked` started, if there was one.
fn last_marked_ms(d: &Daemon, vm: Uuid, since_ms: u64, marked: Marked) -> Option<u64> {
    let condition = match marked {
        Marked::Exported => "kind = 'export' AND outcome = 'ok'",
        Marked::AppFreezeTried => "app_freeze_ok IS NOT NULL",
    };
    let db = d.db.lock().expect("db");
    db.conn()
        .query_row(
            &format!(
                "SELECT MAX(start_ms) FROM cycles WHERE vm_uuid = ?1 AND start_ms >= ?2 AND {condition}"
            ),
            params![vm.to_string(), since_ms as i64],
            |r| r.get::<_, Option<i64>>(0),
        )
        .ok()
        .flatten()
        .map(|v| v as u64)
}

/// Sets or clears a relationship's remark.
pub(crate) fn set_note(d: &Daemon, vm: Uuid, note: Option<&str>) {
    let db = d.db.lock().expect("db");
    let _ = db.conn().execute(
        "UPDATE relationships SET note = ?2 WHERE vm_uuid = ?1",
        params![vm.to_string(), note],
    );
}

/// After an export: asks the replica whether it imported log 1; once it has, the relationship
/// replicates (bitmap 1 has recorded since the export's point in time).
async fn await_import(
    d: &Daemon,
    vm: Uuid,
    rel: &Relationship,
    mut client: PeerClient,
) -> Result<(), String> {
    let start = now_ms();
    match client
        .call(&PeerRequest::ReplicaState { vm_uuid: vm })
        .await
        .map_err(|e| e.to_string())?
    {
        PeerResponse::ReplicaState { last_applied, .. } if last_applied >= 1 => {
            record_cycle(d, vm, 1, "import", start, 0, "ok", None);
            record_success(d, vm, 1, ReplicationState::Replicating);
            set_note(d, vm, None);
            let _ = d.db.lock().expect("db").event(
                Some(vm),
                &format!(
                    "{} imported the initial copy; replicating",
                    rel.replica_name
                ),
            );
            Ok(())
        }
        PeerResponse::ReplicaState { .. } => Ok(()),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// Notes on the cycle started at `start_ms` whether the guest was frozen for it.
fn record_freeze(d: &Daemon, vm: Uuid, start_ms: u64, freeze: &Result<u64, String>) {
    let db = d.db.lock().expect("db");
    let _ = db.conn().execute(
        "UPDATE cycles SET app_freeze_ok = ?3, app_freeze_error = ?4 WHERE vm_uuid = ?1 AND start_ms = ?2",
        params![
            vm.to_string(),
            start_ms as i64,
            freeze.is_ok(),
            freeze.as_ref().err()
        ],
    );
    if let Err(e) = freeze {
        let _ = db.event(Some(vm), e);
    }
}

/// Hyper-V's app-consistent schedule: a replicating VM that runs gets an app-consistent
/// point when none was tried for `hours` (the first one right after initial replication).
fn app_consistent_due(
    settings: &ReplicationSettings,
    state: ReplicationState,
    running: bool,
    last_attempt_ms: Option<u64>,
    now_ms: u64,
) -> bool {
    let Some(hours) = settings.app_consistent_hours else {
        return false;
    };
    state == ReplicationState::Replicating
        && running
        && last_attempt_ms
            .map(|t| now_ms.saturating_sub(t) >= u64::from(hours) * 3_600_000)
            .unwrap_or(true)
}

/// How long the guest agent may take to freeze (it runs the guest's freeze hooks first).
const FREEZE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting and each other agent command may take.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Thaws a guest frozen for an app-consistent point: at once, and again on failure.
async fn thaw_guest(d: &Daemon, vm: Uuid, qga: vmrepl_qemu::Qga) {
    let qga = qga.with_timeout(AGENT_TIMEOUT);
    let mut last = String::new();
    for _ in 0..3 {
        match qga.fsfreeze_thaw().await {
            Ok(_) => return,
            Err(e) => {
                last = e.to_string();
                let _ = qga.sync().await;
            }
        }
    }
    let msg = format!("The guest could not be thawed after an app-consistent point ({last}); it may still be frozen: thaw it from the guest console (fsfreeze --unfreeze) or restart the VM.");
    tracing::error!(target: "vmrepl::replication", %vm, "{msg}");
    if let Ok(db) = d.db.lock() {
        let _ = db.event(Some(vm), &msg);
    }
}

/// What a successful cycle achieved.
enum Done {
    /// Log `seq` is durable on the replica; `bytes` of it went over the network.
    Acked { seq: u64, bytes: u64 },
    /// Log 1 was written whole to external media (`bytes`), for the replica to import.
    Exported { bytes: u64 },
}

impl Done {
    fn acked((seq, bytes): (u64, u64)) -> Done {
        Done::Acked { seq, bytes }
    }
}

enum CycleError {
    Network(String),
    Resync(String),
    Other(String),
}

fn classify(e: crate::peer::client::PeerError) -> CycleError {
    use crate::peer::client::PeerError;
    match e {
        PeerError::Refused {
            code: RefusalCode::OutOfOrder,
            message,
        } => CycleError::Resync(format!(
            "the replica refused the log as out of order: {message}"
        )),
        PeerError::Connect { .. } => CycleError::Network(e.to_string()),
        other => CycleError::Other(other.to_string()),
    }
}

/// Everything one cycle works with: the relationship, the VM and its replicated disks, the
/// peer connection and the QMP endpoint that reaches the disks.
struct Cycle<'a> {
    d: &'a Arc<Daemon>,
    rel: &'a Relationship,
    vm: &'a VmDefinition,
    client: PeerClient,
    /// The VM's running QEMU, or the storage daemon that holds its disks while it is off.
    endpoint: &'a Endpoint,
    tag: RelTag,
    /// Replicated disks as (node, size).
    disks: Vec<(String, u64)>,
    vars: Option<&'a str>,
    staging: Staging,
    rt: &'a RelRuntime,
    /// What the log's point in time is (crash-consistent, app-consistent when the guest
    /// could be frozen, or planned for a failover).
    consistency: vmrepl_log::Consistency,
    /// For an app-consistent attempt: the filesystems the agent froze, or why it could not.
    app_freeze: Option<Result<u64, String>>,
}

impl<'a> Cycle<'a> {
    fn nodes(&self) -> Vec<&str> {
        self.disks.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// What the replica holds: its last applied log and a partial transfer to resume. A replica
    /// that failed over takes no more logs, so the cycle stops before anything is staged.
    async fn replica_state(&mut self) -> Result<(u64, Option<(u64, Resume)>), CycleError> {
        match self
            .client
            .call(&PeerRequest::ReplicaState {
                vm_uuid: self.vm.uuid,
            })
            .await
            .map_err(classify)?
        {
            PeerResponse::ReplicaState {
                failed_over: true, ..
            } => Err(CycleError::Other(
                "the replica has failed over; it takes no more logs".into(),
            )),
            PeerResponse::ReplicaState {
                last_applied,
                partial,
                boot,
                ..
            } => {
                send_boot_files(&mut self.client, self.vm, &boot)
                    .await
                    .map_err(CycleError::Other)?;
                Ok((last_applied, partial))
            }
            other => Err(CycleError::Other(format!("unexpected answer {other:?}"))),
        }
    }

    /// The initial copy: log 1, the whole of every disk as of one instant, with bitmap 1
    /// recording from that instant on.
    async fn initial(&mut self) -> Result<Done, CycleError> {
        set_state(
            self.d,
            self.vm.uuid,
            ReplicationState::InitialReplicationInProgress,
            None,
        );
        let (qmp, tag) = (self.endpoint.qmp(), self.tag);
        // Start clean: no bitmap of this relationship may linger from an earlier attempt.
        vmrepl_tracking::stop_tracking(qmp, tag, &self.nodes(), Some(self.staging.dir.as_path()))
            .await
            .map_err(|e| CycleError::Other(format!("cannot reset change tracking: {e}")))?;
        let h = vmrepl_tracking::begin_full(qmp, tag, &self.disks, 1, &self.staging, self.vars)
            .await
            .map_err(|e| CycleError::Other(format!("cannot stage the initial copy: {e}")))?;
        let export = match &self.rel.settings.initial {
            InitialReplication::Export { folder } => Some(export_file(folder, &self.vm.name)),
            _ => None,
        };
        let path = match &export {
            Some(f) => f.with_extension("vmrlog.partial"),
            None => log_path(self.d, tag, 1),
        };
        let res = async {
            match &export {
                // On external media the log must be whole and durable under its final name.
                Some(f) => {
                    let hasher = Arc::new(Mutex::new(blake3::Hasher::new()));
                    let total = build_log(
                        self.spec(),
                        &h,
                        LogOut::Export(path.clone(), hasher.clone()),
                        (1, 0),
                        LogKind::Initial,
                        None,
                        None,
                    )
                    .await;
                    self.release(&h, 1).await;
                    let total = total?;
                    crate::fsutil::rename_durable(&path, f).map_err(|e| {
                        CycleError::Other(format!(
                            "cannot write the initial copy to {}: {e}",
                            f.display()
                        ))
                    })?;
                    // The replica imports exactly this file: tell it over TLS what it is.
                    let bytes = std::fs::metadata(f)
                        .map_err(|e| CycleError::Other(format!("{}: {e}", f.display())))?
                        .len();
                    let blake3 = hasher
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .finalize()
                        .to_hex()
                        .to_string();
                    match self
                        .client
                        .call(&PeerRequest::ExpectImport {
                            vm_uuid: self.vm.uuid,
                            bytes,
                            blake3,
                        })
                        .await
                        .map_err(classify)?
                    {
                        PeerResponse::Ok => Ok(Done::Exported { bytes: total }),
                        other => Err(CycleError::Other(format!(
                            "the replica did not take note of the export: {other:?}"
                        ))),
                    }
                }
                None => {
                    let (built, sent) = self
                        .build_and_send(
                            &h,
                            &path,
                            (1, 0),
                            LogKind::Initial,
                            None,
                            "initial replication",
                        )
                        .await;
                    built?;
                    sent.map(|bytes| Done::Acked { seq: 1, bytes })
                }
            }
        }
        .await;
        let _ = h.remove_files();
        let _ = std::fs::remove_file(&path);
        match res {
            Ok(done) => Ok(done),
            Err(e) => {
                let _ = vmrepl_tracking::stop_tracking(qmp, tag, &self.nodes(), None).await;
                set_state(
                    self.d,
                    self.vm.uuid,
                    ReplicationState::WaitingForInitialReplication,
                    None,
                );
                Err(e)
            }
        }
    }

    /// Resynchronization: the replica's latest state `l` may differ from the primary anywhere,
    /// so tracking restarts (bitmap l+1 from one instant) and log l+1 on base l carries every
    /// block of that instant, with the unallocated ranges as explicit zeros: applied on top of
    /// `l` it makes the replica equal to the primary, and deltas follow. The recovery points
    /// the replica kept stay as they were.
    async fn resync(&mut self) -> Result<(u64, u64), CycleError> {
        let (qmp, tag) = (self.endpoint.qmp(), self.tag);
        let (l, _) = self.replica_state().await?;
        // The replica's digests of its state `l` (a replica that cannot give them gets every
        // block).
        let digests = match self
            .client
            .call_within(
                &PeerRequest::BlockDigests {
                    vm_uuid: self.vm.uuid,
                },
                crate::peer::client::ANSWER_TO_DIGESTS,
            )
            .await
        {
            Ok(PeerResponse::BlockDigests { disks }) => decode_digests(disks, &self.disks),
            _ => Digests::new(),
        };
        let staging = self.staging.dir.clone();
        vmrepl_tracking::stop_tracking(qmp, tag, &self.nodes(), Some(staging.as_path()))
            .await
            .map_err(|e| CycleError::Other(format!("cannot reset change tracking: {e}")))?;
        let h = vmrepl_tracking::begin_full(qmp, tag, &self.disks, l + 1, &self.staging, self.vars)
            .await
            .map_err(|e| CycleError::Other(format!("cannot stage the resynchronization: {e}")))?;
        let path = log_path(self.d, tag, l + 1);
        let res = async {
            let (built, sent) = self
                .build_and_send(
                    &h,
                    &path,
                    (l + 1, l),
                    LogKind::Resync,
                    Some(&digests),
                    "resynchronization",
                )
                .await;
            built?;
            sent
        }
        .await;
        let _ = h.remove_files();
        let _ = std::fs::remove_file(&path);
        match res {
            Ok(bytes) => Ok((l + 1, bytes)),
            Err(e) => {
                let _ = vmrepl_tracking::stop_tracking(qmp, tag, &self.nodes(), None).await;
                Err(e)
            }
        }
    }

    /// A delta: log n+1 from bitmap n, or the rest of a log n+1 whose transfer was cut.
    async fn delta(&mut self) -> Result<(u64, u64), CycleError> {
        let (qmp, tag) = (self.endpoint.qmp(), self.tag);
        let n = self.rel.acked_seq;
        let next = n + 1;
        let path = log_path(self.d, tag, next);
        let (replica_applied, partial) = self.replica_state().await?;
        if path.exists() {
            // A built log is waiting: its transfer was cut. Its bitmap is the frozen one (if a
            // daemon restart merged it back meanwhile, its changes simply go out again later).
            let frozen = self.frozen_bitmap().await;
            if replica_applied >= next {
                // The acknowledgement was lost but the replica has it: finish the cycle.
                if let Some(f) = frozen {
                    let _ = vmrepl_tracking::commit_cycle(qmp, tag, &self.nodes(), f).await;
                }
                let _ = std::fs::remove_file(&path);
                return Ok((next, 0));
            }
            let resume = partial.filter(|(s, _)| *s == next).map(|(_, r)| r);
            let total = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let sent = self
                .send(&path, (next, n), total, resume, "resumed transfer")
                .await;
            return self.settle(&path, next, frozen, sent).await;
        }
        // Bring the bitmaps back to one recording bitmap (after a daemon restart, say). Log
        // numbers and bitmap numbers need not match: a rolled-back cycle merges its frozen
        // bitmap into the next one, so the recording bitmap can be ahead of log n. At most one
        // cycle is in flight, so a frozen bitmap is always that of log n+1.
        let staging = self.staging.dir.as_path();
        let bitmap =
            match vmrepl_tracking::reconcile(qmp, tag, &self.nodes(), Some(staging), |_| {
                replica_applied > n
            })
            .await
            {
                Ok(vmrepl_tracking::ReconcileOutcome::Ready { recording, .. }) => recording,
                Ok(vmrepl_tracking::ReconcileOutcome::ResyncRequired { reason }) => {
                    return Err(CycleError::Resync(reason))
                }
                Err(e) => {
                    return Err(CycleError::Other(format!(
                        "cannot check change tracking: {e}"
                    )))
                }
            };
        if replica_applied != n {
            return Err(CycleError::Resync(format!(
                "the replica has applied log {replica_applied} but this host expected {n}"
            )));
        }
        let frozen = self.freeze_guest().await;
        let (on_point, point) = tokio::sync::oneshot::channel();
        let begin = vmrepl_tracking::begin_cycle(
            qmp,
            tag,
            &self.disks,
            bitmap,
            &self.staging,
            self.vars,
            Some(on_point),
        );
        // Thaw a frozen guest the moment the transaction has taken the point (or failed),
        // while the backup jobs go on copying.
        let (d, vm) = (self.d, self.vm.uuid);
        let thaw = async move {
            if let Some(qga) = frozen {
                let _ = point.await;
                thaw_guest(d, vm, qga).await;
            }
        };
        let h = tokio::join!(begin, thaw).0.map_err(|e| {
            if e.needs_resync() {
                CycleError::Resync(e.to_string())
            } else {
                CycleError::Other(format!("cannot stage the changes: {e}"))
            }
        })?;
        let (built, sent) = self
            .build_and_send(&h, &path, (next, n), LogKind::Delta, None, "delta")
            .await;
        let _ = h.remove_files();
        if let Err(e) = built {
            let _ = vmrepl_tracking::rollback_cycle(qmp, tag, &self.nodes(), bitmap).await;
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        self.settle(&path, next, Some(bitmap), sent).await
    }

    /// The relationship's frozen bitmap, if any (that of a log whose transfer was cut).
    async fn frozen_bitmap(&self) -> Option<u64> {
        let owned = vmrepl_tracking::list_owned(self.endpoint.qmp(), self.tag, &self.nodes())
            .await
            .ok()?;
        owned
            .values()
            .flatten()
            .filter(|b| !b.recording)
            .map(|b| b.seq)
            .min()
    }

    /// For an app-consistent point: freezes the guest through its agent and returns it to
    /// be thawed. A VM that is off has nothing to freeze, and its point stays crash-consistent;
    /// a running guest that cannot be frozen gives a crash-consistent point too, and the
    /// failure is recorded (Hyper-V's count of app-consistent failures).
    async fn freeze_guest(&mut self) -> Option<vmrepl_qemu::Qga> {
        if self.consistency != vmrepl_log::Consistency::AppConsistent {
            return None;
        }
        if !matches!(self.endpoint, Endpoint::Live(_)) {
            self.consistency = vmrepl_log::Consistency::Crash;
            return None;
        }
        let sock =
            vmrepl_qemu::cmdline::RunPaths::in_dir(&self.d.dd.run_dir(self.vm.uuid)).qga_sock;
        let attempt = async {
            let qga = vmrepl_qemu::Qga::connect(&sock, AGENT_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?
                .with_timeout(FREEZE_TIMEOUT);
            match qga.fsfreeze_freeze().await {
                Ok(n) => Ok((qga, n)),
                Err(e) => {
                    // A freeze that timed out may still complete in the guest: thaw anyway.
                    thaw_guest(self.d, self.vm.uuid, qga).await;
                    Err(e.to_string())
                }
            }
        };
        match attempt.await {
            Ok((qga, n)) => {
                self.app_freeze = Some(Ok(n));
                Some(qga)
            }
            Err(e) => {
                self.consistency = vmrepl_log::Consistency::Crash;
                self.app_freeze = Some(Err(format!(
                    "The guest of VM {} could not be frozen for an app-consistent point, so the point is crash-consistent: {e}. Check that the QEMU guest agent runs in the guest.",
                    self.vm.name
                )));
                None
            }
        }
    }

    /// Settles the frozen `bitmap` of log `next` once it was sent: on the
    /// replica's acknowledgement it is dropped (I1); a cut transfer keeps both the log and the
    /// bitmap so that the next cycle resumes it; any other failure merges the bitmap back.
    async fn settle(
        &mut self,
        path: &Path,
        next: u64,
        bitmap: Option<u64>,
        sent: Result<u64, CycleError>,
    ) -> Result<(u64, u64), CycleError> {
        let (qmp, tag) = (self.endpoint.qmp(), self.tag);
        match sent {
            Ok(bytes) => {
                if let Some(b) = bitmap {
                    vmrepl_tracking::commit_cycle(qmp, tag, &self.nodes(), b)
                        .await
                        .map_err(|e| CycleError::Other(e.to_string()))?;
                }
                let _ = std::fs::remove_file(path);
                Ok((next, bytes))
            }
            Err(CycleError::Network(m)) => Err(CycleError::Network(m)),
            Err(e) => {
                if let Some(b) = bitmap {
                    let _ = vmrepl_tracking::rollback_cycle(qmp, tag, &self.nodes(), b).await;
                }
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }

    /// What a log of this cycle is about: the VM, the relationship and the point's kind.
    fn spec(&self) -> (&'a VmDefinition, &'a Relationship, vmrepl_log::Consistency) {
        (self.vm, self.rel, self.consistency)
    }

    /// Encodes log `seq` (on `base`) and streams it to the replica while it is being encoded, so
    /// that reading the disks, encoding, TLS and the replica's receiving overlap; nothing is
    /// written on this host. Only when the transfer is cut (a network failure) is the log encoded
    /// again, whole, into `path`, from the same point in time (the exports or staging images are
    /// still there, and encoding is deterministic): the next cycle resumes the transfer from
    /// that file. Returns the build's outcome (the log's size) and the transfer's (the bytes
    /// sent once the replica acknowledged it). A build that fails abandons the transfer.
    /// (Initial copies and resynchronizations start over instead, so they keep nothing.)
    async fn build_and_send(
        &mut self,
        h: &vmrepl_tracking::CycleHandle,
        path: &Path,
        (seq, base): (u64, u64),
        kind: LogKind,
        digests: Option<&Digests>,
        what: &str,
    ) -> (Result<u64, CycleError>, Result<u64, CycleError>) {
        let (tx, rx) = tokio::sync::watch::channel(LogGrowth::default());
        let (chunks_tx, chunks) = tokio::sync::mpsc::channel(4);
        let spec = self.spec();
        let build = build_log(
            spec,
            h,
            LogOut::Stream(chunks_tx),
            (seq, base),
            kind,
            digests,
            Some(tx),
        );
        let t0 = std::time::Instant::now();
        let rt = self.rt;
        let watch = rx.clone();
        let progress = |done: u64| {
            let secs = t0.elapsed().as_secs_f64().max(0.001);
            *rt.progress.lock().expect("progress") = Some(Progress {
                what: what.to_string(),
                bytes_done: done,
                bytes_total: watch.borrow().written.max(done),
                rate_bytes_per_sec: done as f64 / secs,
            });
        };
        let uuid = self.vm.uuid;
        let send = self
            .client
            .send_log_stream(uuid, (seq, base), chunks, rx, progress);
        let (built, sent) = tokio::join!(build, send);
        tracing::info!(target: "vmrepl::replication", seq, ms = t0.elapsed().as_millis() as u64, "log built, sent and acknowledged");
        let sent = match (&built, sent) {
            // A cut transfer stops the encoder too (it has nowhere to write): the network
            // failure is what happened.
            (_, Err(e)) => Err(classify(e)),
            (Err(_), Ok(_)) => Err(CycleError::Other("the log could not be built".into())),
            (Ok(total), Ok(r)) => acked(r, seq, *total),
        };
        if kind == LogKind::Delta && matches!(sent, Err(CycleError::Network(_))) {
            // Keep the whole log for resuming the cut transfer.
            let kept = build_log(
                spec,
                h,
                LogOut::File(path.to_path_buf()),
                (seq, base),
                kind,
                digests,
                None,
            )
            .await;
            if let Ok(total) = kept {
                self.release(h, seq).await;
                return (Ok(total), sent);
            } else {
                // Without a whole local copy there is nothing to resume: the cycle fails as a
                // whole (its bitmap is merged back) and the next one starts over.
                let _ = std::fs::remove_file(path);
                let sent = match sent {
                    Err(CycleError::Network(m)) => Err(CycleError::Other(format!(
                        "{m}; the log could not be kept for a resume either"
                    ))),
                    other => other,
                };
                self.release(h, seq).await;
                return (built, sent);
            }
        }
        self.release(h, seq).await;
        (built, sent)
    }

    /// Pull mode: the point in time is in the log now; let QEMU drop it (the frozen bitmap
    /// stays until the replica acknowledges the log).
    async fn release(&self, h: &vmrepl_tracking::CycleHandle, seq: u64) {
        if let Err(e) = vmrepl_tracking::release_exports(self.endpoint.qmp(), h).await {
            tracing::warn!(target: "vmrepl::replication", seq, error = %e, "cannot release the NBD exports");
        }
    }

    /// Streams log `seq` (on `base`) from `path`, from the resume point if any, publishing
    /// progress; returns the bytes sent once the replica acknowledged it.
    async fn send(
        &mut self,
        path: &Path,
        (seq, base): (u64, u64),
        total: u64,
        resume: Option<Resume>,
        what: &str,
    ) -> Result<u64, CycleError> {
        let from = resume.map(|r| r.bytes).unwrap_or(0);
        let t0 = std::time::Instant::now();
        let rt = self.rt;
        let progress = |done: u64| {
            let secs = t0.elapsed().as_secs_f64().max(0.001);
            *rt.progress.lock().expect("progress") = Some(Progress {
                what: what.to_string(),
                bytes_done: from + done,
                bytes_total: total,
                rate_bytes_per_sec: done as f64 / secs,
            });
        };
        let r = self
            .client
            .send_log(self.vm.uuid, (seq, base), resume, path, progress)
            .await
            .map_err(classify)?;
        acked(r, seq, total.saturating_sub(from))
    }
}

/// The replica's answer to log `seq`: `bytes` sent once it acknowledged the log.
fn acked(r: PeerResponse, seq: u64, bytes: u64) -> Result<u64, CycleError> {
    match r {
        PeerResponse::LogAck { sequence, .. } if sequence == seq => Ok(bytes),
        PeerResponse::Refused { code, message } => {
            Err(classify(crate::peer::client::PeerError::Refused {
                code,
                message,
            }))
        }
        other => Err(CycleError::Other(format!(
            "unexpected answer to log {seq}: {other:?}"
        ))),
    }
}

/// The replica's block digests per disk id: (block size, one digest per block).
type Digests = std::collections::HashMap<String, (u64, Vec<[u8; 32]>)>;

/// Decodes a `BlockDigests` answer, keeping only disks whose block size and count fit.
fn decode_digests(disks: Vec<crate::peer::proto::DiskDigests>, sizes: &[(String, u64)]) -> Digests {
    let mut out = Digests::new();
    for d in disks {
        let Some((_, size)) = sizes.iter().find(|(id, _)| *id == d.id) else {
            continue;
        };
        if d.block_size != vmrepl_store::block_size(*size) {
            continue;
        }
        match d.decode() {
            Some(p) if p.len() as u64 == size.div_ceil(d.block_size) => {
                out.insert(d.id, (d.block_size, p));
            }
            _ => {}
        }
    }
    out
}

/// Writes the blocks of a staged full copy whose digest differs from the replica's; returns
/// how many. Unallocated ranges of the staging image read as zeros.
fn write_differing<W: std::io::Write>(
    w: &mut LogWriter<W>,
    disk: u16,
    size: u64,
    staging: &Path,
    ex: &[vmrepl_tracking::Extent],
    bs: u64,
    theirs: &[[u8; 32]],
) -> Result<u64, String> {
    let f = std::fs::File::open(staging).map_err(|e| format!("{}: {e}", staging.display()))?;
    let mut first = 0usize;
    compare_blocks(w, disk, size, bs, theirs, |start, buf| {
        let end = start + buf.len() as u64;
        while first < ex.len() && ex[first].offset + ex[first].len <= start {
            first += 1;
        }
        for e in ex[first..].iter().take_while(|e| e.offset < end) {
            if let vmrepl_tracking::ExtentKind::Data { file_offset } = e.kind {
                let (s, t) = (e.offset.max(start), (e.offset + e.len).min(end));
                vmrepl_tracking::read_extent(
                    &f,
                    file_offset + (s - e.offset),
                    &mut buf[(s - start) as usize..(t - start) as usize],
                )
                .map_err(|e| format!("{}: {e}", staging.display()))?;
            }
        }
        Ok(())
    })
}

/// Compares every block of a disk (`fill` puts block `start` into a zeroed buffer) with the
/// replica's digest and writes the differing ones (all-zero blocks as zero records); returns
/// how many differed.
fn compare_blocks<W: std::io::Write>(
    w: &mut LogWriter<W>,
    disk: u16,
    size: u64,
    bs: u64,
    theirs: &[[u8; 32]],
    mut fill: impl FnMut(u64, &mut [u8]) -> Result<(), String>,
) -> Result<u64, String> {
    let mut buf = vec![0u8; bs as usize];
    let mut differing = 0u64;
    for (b, digest) in theirs.iter().enumerate() {
        let start = b as u64 * bs;
        let end = (start + bs).min(size);
        let len = (end - start) as usize;
        buf[..len].fill(0);
        fill(start, &mut buf[..len])?;
        if blake3::hash(&buf[..len]).as_bytes() == digest {
            continue;
        }
        differing += 1;
        if buf[..len].iter().all(|x| *x == 0) {
            w.write_zero(disk, start, len as u64)
        } else {
            w.write_data(disk, start, &buf[..len])
        }
        .map_err(|e| e.to_string())?;
    }
    Ok(differing)
}

/// Encodes the staged images into log `seq` at `path`; returns its size.
#[allow(clippy::too_many_arguments)]
/// Where [`build_log`] puts the encoded log.
enum LogOut {
    /// A file (created or truncated).
    File(PathBuf),
    /// An exported initial copy: a file, and the BLAKE3 of every byte written to it (what the
    /// replica will take from the media), computed on the way instead of reading it back.
    Export(PathBuf, Arc<Mutex<blake3::Hasher>>),
    /// Chunks of at most 1 MiB for a sender ([`crate::peer::client::PeerClient::send_log_stream`]).
    Stream(tokio::sync::mpsc::Sender<Vec<u8>>),
}

async fn build_log(
    (vm, rel, consistency): (&VmDefinition, &Relationship, vmrepl_log::Consistency),
    h: &vmrepl_tracking::CycleHandle,
    out: LogOut,
    (seq, base): (u64, u64),
    kind: LogKind,
    replica_digests: Option<&Digests>,
    growth: Option<tokio::sync::watch::Sender<LogGrowth>>,
) -> Result<u64, CycleError> {
    let digests = replica_digests.cloned().unwrap_or_default();
    type Image = (String, u64, PathBuf, Option<vmrepl_tracking::NbdExport>);
    let mut images: Vec<Image> = h
        .disks
        .iter()
        .map(|i| (i.node.clone(), i.size, i.path.clone(), i.export.clone()))
        .collect();
    if let Some(v) = &h.vars {
        images.push((
            crate::peer::proto::NVRAM_DISK_ID.to_string(),
            v.size,
            v.path.clone(),
            None,
        ));
    }
    let mapped = tokio::task::spawn_blocking(move || {
        images
            .into_iter()
            .map(|(id, size, p, export)| {
                if export.is_some() {
                    // Pulled: the changed ranges come from the export's bitmap context.
                    return Ok((id, size, p, export, Vec::new()));
                }
                let ex = vmrepl_tracking::extents(&p).map_err(|e| {
                    CycleError::Other(format!("cannot map staging image {}: {e}", p.display()))
                })?;
                Ok((id, size, p, None, ex))
            })
            .collect::<Result<Vec<_>, CycleError>>()
    })
    .await
    .map_err(|e| CycleError::Other(e.to_string()))??;
    let header = LogHeader {
        vm_id: vm.uuid,
        sequence: seq,
        base_sequence: base,
        timestamp_unix_ms: h.point_in_time_ms,
        kind,
        consistency,
        compression: if rel.settings.compression {
            Compression::Zstd
        } else {
            Compression::None
        },
        disks: mapped
            .iter()
            .map(|(id, size, _, _, _)| DiskInfo {
                id: id.clone(),
                virtual_size: *size,
            })
            .collect(),
    };
    let growth = growth.map(Arc::new);
    let tally = growth.clone();
    let built = tokio::task::spawn_blocking(move || -> Result<u64, String> {
        let t0 = std::time::Instant::now();
        let inner: Box<dyn std::io::Write + Send> = match out {
            // A leftover of an earlier attempt is replaced; the new file is created 0600
            // (an export holds the whole of every disk), refusing a symbolic link.
            LogOut::File(path) => Box::new(new_log_file(&path)?),
            LogOut::Export(path, hasher) => Box::new(Hashing {
                inner: new_log_file(&path)?,
                hasher,
            }),
            LogOut::Stream(tx) => Box::new(Pipe { tx }),
        };
        let f = Tally { inner, growth: tally };
        let mut w = LogWriter::new(std::io::BufWriter::with_capacity(1 << 20, f), header)
            .map_err(|e| e.to_string())?;
        for (i, (id, size, p, export, ex)) in mapped.into_iter().enumerate() {
            let disk = i as u16;
            // A full resync leaves nothing out: ranges without data are sent as zeroes, or
            // the replica would keep whatever it held there.
            let zero_gaps = kind == LogKind::Resync && id != crate::peer::proto::NVRAM_DISK_ID;
            match (digests.get(&id), export) {
                // Resynchronization by compare: only the blocks whose digest differs.
                (Some((bs, theirs)), x) => {
                    let sent = match x {
                        Some(x) => write_differing_pulled(&mut w, disk, size, &x, *bs, theirs)?,
                        None => write_differing(&mut w, disk, size, &p, &ex, *bs, theirs)?,
                    };
                    tracing::info!(target: "vmrepl::replication", disk = %id, blocks = theirs.len(), differing = sent, "resynchronization compare");
                }
                (None, Some(x)) => pull_disk(&mut w, disk, size, &x, zero_gaps)?,
                (None, None) => {
                    let ranges: Vec<(u64, u64)> = ex.iter().map(|e| (e.offset, e.len)).collect();
                    let chunks = ExtentReader::open(&p, ex).map_err(|e| e.to_string())?;
                    let chunks = chunks.map(|c| c.map_err(|e| e.to_string()));
                    write_ranges(&mut w, disk, size, &ranges, chunks, zero_gaps)?;
                }
            }
        }
        // No fsync: this file only serves to resume a cut transfer. After a host crash the
        // persistent bitmaps are untrustworthy anyway (resynchronization), so durability here
        // would buy nothing; the replica makes the log durable before acknowledging it (I1).
        let (summary, bw) = w.finish_into_inner().map_err(|e| e.to_string())?;
        bw.into_inner().map_err(|e| e.to_string())?;
        tracing::info!(target: "vmrepl::replication", seq, bytes = summary.encoded_bytes, ms = t0.elapsed().as_millis() as u64, "log built");
        Ok(summary.encoded_bytes)
    })
    .await
    .map_err(|e| CycleError::Other(e.to_string()))
    .and_then(|r| r.map_err(|e| CycleError::Other(format!("cannot encode log {seq}: {e}"))));
    if let Some(g) = growth {
        g.send_modify(|g| g.done = Some(built.is_ok()));
    }
    built
}

/// How many reads a pulled disk keeps in flight.
const PULL_WINDOW: usize = 16;
/// How long one NBD read or write may block before the cycle gives up.
const PULL_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Writes a pulled disk into the log, reading it over NBD as of the cycle's point in time: the
/// changed ranges of a delta export, or the ranges holding data of a full-copy export (see
/// [`write_ranges`] for `zero_gaps`). Holes within what is read come out as zero records.
fn pull_disk<W: std::io::Write>(
    w: &mut LogWriter<W>,
    disk: u16,
    size: u64,
    x: &vmrepl_tracking::NbdExport,
    zero_gaps: bool,
) -> Result<(), String> {
    let mut c =
        vmrepl_tracking::NbdClient::connect(&x.socket, &x.name, Some(&x.context), PULL_IO_TIMEOUT)
            .map_err(|e| e.to_string())?;
    let ranges = if x.delta() {
        c.dirty_ranges()
    } else {
        c.data_ranges()
    }
    .map_err(|e| e.to_string())?;
    let mut reader =
        vmrepl_tracking::NbdRangeReader::new(c, &ranges, vmrepl_tracking::MAX_CHUNK, PULL_WINDOW);
    let chunks = reader.by_ref().map(|c| c.map_err(|e| e.to_string()));
    write_ranges(w, disk, size, &ranges, chunks, zero_gaps)?;
    reader.finish();
    Ok(())
}

/// Writes the chunks read from `ranges` of a disk (in order) into the log; with `zero_gaps`
/// every range between them, up to the disk's `size`, becomes a zero record in its place, so
/// that the log describes the whole disk and its records stay in order.
fn write_ranges<W: std::io::Write>(
    w: &mut LogWriter<W>,
    disk: u16,
    size: u64,
    ranges: &[(u64, u64)],
    chunks: impl Iterator<Item = Result<vmrepl_tracking::Chunk, String>>,
    zero_gaps: bool,
) -> Result<(), String> {
    let mut gaps: std::collections::VecDeque<(u64, u64)> = std::collections::VecDeque::new();
    if zero_gaps {
        let mut at = 0;
        for &(o, l) in ranges.iter().chain([(size, 0)].iter()) {
            if o > at {
                gaps.push_back((at, o - at));
            }
            at = at.max(o + l);
        }
    }
    let mut gap_before = |w: &mut LogWriter<W>, upto: u64| -> Result<(), String> {
        while let Some(&(o, l)) = gaps.front() {
            if o >= upto {
                break;
            }
            gaps.pop_front();
            w.write_zero(disk, o, l).map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    for chunk in chunks {
        let c = chunk?;
        gap_before(w, c.offset)?;
        match c.data {
            ChunkData::Data(buf) => w.write_data(disk, c.offset, &buf),
            ChunkData::Zero(len) => w.write_zero(disk, c.offset, len),
        }
        .map_err(|e| e.to_string())?;
    }
    gap_before(w, u64::MAX)
}

/// [`write_differing`] for a pulled full copy: every block is read over NBD (1 MiB reads in
/// flight) and compared with the replica's digest.
fn write_differing_pulled<W: std::io::Write>(
    w: &mut LogWriter<W>,
    disk: u16,
    size: u64,
    x: &vmrepl_tracking::NbdExport,
    bs: u64,
    theirs: &[[u8; 32]],
) -> Result<u64, String> {
    let c = vmrepl_tracking::NbdClient::connect(&x.socket, &x.name, None, PULL_IO_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let reader = vmrepl_tracking::NbdRangeReader::new(
        c,
        &[(0, size)],
        vmrepl_tracking::MAX_CHUNK,
        PULL_WINDOW,
    );
    let mut chunks = reader.peekable();
    compare_blocks(w, disk, size, bs, theirs, |start, buf| {
        let end = start + buf.len() as u64;
        // The chunks of this block (reads are block-aligned), or the error that stops them.
        while let Some(c) = chunks.next_if(|c| c.as_ref().map_or(true, |c| c.offset < end)) {
            let c = c.map_err(|e| e.to_string())?;
            if let ChunkData::Data(d) = c.data {
                let at = (c.offset - start) as usize;
                buf[at..at + d.len()].copy_from_slice(&d);
            }
        }
        Ok(())
    })
}

/// Hands the encoded log to the sender in chunks (the writer's buffer, at most 1 MiB), waiting
/// while the sender is 4 chunks behind; fails once the sender has stopped.
struct Pipe {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
}

impl std::io::Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tx.blocking_send(buf.to_vec()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the sender stopped")
        })?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A writer that reports every byte it has written (progress, and the end of the log).
/// A log file of its own: a leftover of an earlier attempt is replaced, and the new file is
/// created 0600 (an export holds the whole of every disk), refusing a symbolic link.
fn new_log_file(path: &Path) -> Result<std::fs::File, String> {
    let _ = std::fs::remove_file(path);
    crate::fsutil::create_private_new(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))
}

/// Passes writes through and hashes what was written.
struct Hashing {
    inner: std::fs::File,
    hasher: Arc<Mutex<blake3::Hasher>>,
}

impl std::io::Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct Tally {
    inner: Box<dyn std::io::Write + Send>,
    growth: Option<Arc<tokio::sync::watch::Sender<LogGrowth>>>,
}

impl std::io::Write for Tally {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(g) = &self.growth {
            g.send_modify(|g| g.written += n as u64);
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Pauses (Suspend-VMReplication): no cycles until resumed; tracking continues.
pub fn pause(d: &Arc<Daemon>, name: &VmName) -> Result<String, ApiError> {
    let vm = d.vmm.show(name)?.definition;
    let rel = load(d, vm.uuid).ok_or_else(|| not_enabled(name))?;
    if rel.state == ReplicationState::SyncedReplicationComplete {
        return Err(ApiError::new(
            ErrorCode::WrongState,
            format!("VM {name} is prepared for a planned failover; `vmrepl failover cancel {name}` ends that first."),
        ));
    }
    if rel.state == ReplicationState::Suspended {
        return Ok(format!("Replication of {name} is already paused."));
    }
    set_state(d, vm.uuid, ReplicationState::Suspended, None);
    wake(d, vm.uuid);
    Ok(format!(
        "Replication of {name} paused; changes are still tracked and go out when it resumes."
    ))
}

/// Replicates now, outside the schedule (and counts no missed cycle); with `app_consistent`
/// the guest is frozen through its agent for the point. Says which point was made.
pub async fn now(d: &Arc<Daemon>, name: &VmName, app_consistent: bool) -> Result<String, ApiError> {
    let vm = d.vmm.show(name)?.definition;
    let rel = load(d, vm.uuid).ok_or_else(|| not_enabled(name))?;
    if rel.state != ReplicationState::Replicating {
        return Err(ApiError::new(
            ErrorCode::WrongState,
            format!("Replication of {name} is {}; replicating now needs it replicating (initial replication done, not paused, no resynchronization pending).", rel.state),
        ));
    }
    let consistency = if app_consistent {
        vmrepl_log::Consistency::AppConsistent
    } else {
        vmrepl_log::Consistency::Crash
    };
    let (seq, freeze) = replicate_now(d, vm.uuid, consistency).await.map_err(|e| {
        ApiError::new(
            ErrorCode::Peer,
            format!("Replicating {name} now failed: {e}"),
        )
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
pub fn resume(d: &Arc<Daemon>, name: &VmName, resynchronize: bool) -> Result<String, ApiError> {
    let vm = d.vmm.show(name)?.definition;
    let rel = load(d, vm.uuid).ok_or_else(|| not_enabled(name))?;
    if resynchronize {
        let ok = rel.acked_seq > 0
            && matches!(
                rel.state,
                ReplicationState::ResynchronizationRequired
                    | ReplicationState::Suspended
                    | ReplicationState::Resynchronizing
            );
        if !ok {
            return Err(ApiError::new(
                ErrorCode::WrongState,
                format!("Replication of {name} is {}; resynchronization is for a relationship that requires it (or is paused) after its initial replication.", rel.state),
            ));
        }
        set_state(d, vm.uuid, ReplicationState::Resynchronizing, None);
        wake(d, vm.uuid);
        return Ok(format!("Resynchronization of {name} started; `vmrepl replication status {name}` shows its progress."));
    }
    if rel.state != ReplicationState::Suspended {
        return Err(ApiError::new(
            ErrorCode::WrongState,
            format!("Replication of {name} is {}, not paused.", rel.state),
        ));
    }
    let st = if rel.acked_seq == 0 {
        ReplicationState::WaitingForInitialReplication
    } else {
        ReplicationState::Replicating
    };
    set_state(d, vm.uuid, st, None);
    wake(d, vm.uuid);
    Ok(format!("Replication of {name} resumed."))
}

/// Removes the relationship on this side (Remove-VMReplication); the replica is told too,
/// and keeps its data unless `delete_replica`.
pub async fn remove(
    d: &Arc<Daemon>,
    name: &VmName,
    delete_replica: bool,
) -> Result<String, ApiError> {
    let vm = d.vmm.show(name)?.definition;
    let rel = load(d, vm.uuid).ok_or_else(|| not_enabled(name))?;
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
    let db = d.db.lock().expect("db");
    let _ = db.conn().execute(
        "DELETE FROM relationships WHERE vm_uuid = ?1",
        params![vm.uuid.to_string()],
    );
    let _ = db.event(Some(vm.uuid), "replication removed");
    Ok(format!(
        "Replication of {name} removed; {replica_note}{tracking_note}."
    ))
}

/// Removes every bitmap (and leftover staging) of `rel` from the VM's replicated disks, through
/// its QEMU or qemu-storage-daemon. The caller holds the VM's operation lock.
pub(crate) async fn end_tracking(
    d: &Daemon,
    vm: &VmDefinition,
    rel: &Relationship,
) -> Result<(), String> {
    let tag = RelTag::from_uuid(&rel.rel_id);
    let nodes: Vec<String> = replicated_disks(vm, &rel.settings)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let ep = Endpoint::open(d, vm, &nodes, None).await?;
    let r = vmrepl_tracking::stop_tracking(ep.qmp(), tag, &nodes, Some(&d.dd.staging())).await;
    ep.close().await;
    r.map_err(|e| e.to_string())
}

fn not_enabled(name: &VmName) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("Replication is not enabled for VM {name}; enable it with `vmrepl replication enable {name} --replica-server HOST:PORT`."))
}

pub(crate) fn wake(d: &Daemon, vm: Uuid) {
    if let Some(rt) = d.repl.rels.lock().expect("rels").get(&vm) {
        rt.wake.notify_one();
    }
}

/// Hyper-V's statistics over the monitoring window, counting only this relationship's cycles
/// (a VM that failed over and back has had several) and only what crossed the network: an
/// initial copy exported to media and imported on the replica is recorded, but it is not a
/// replication cycle (no bytes sent, no latency).
fn stats(d: &Daemon, vm: Uuid, rel_created_ms: u64) -> ReplicationStats {
    let since = now_ms()
        .saturating_sub(MONITORING_WINDOW_MS)
        .max(rel_created_ms) as i64;
    let db = d.db.lock().expect("db");
    let mut s = ReplicationStats::default();
    let mut lat_total = 0.0;
    if let Ok(mut st) = db.conn().prepare(
        "SELECT outcome, bytes, duration_ms, start_ms, app_freeze_ok FROM cycles WHERE vm_uuid = ?1 AND start_ms >= ?2 AND kind NOT IN ('export', 'import')",
    ) {
        let rows = st.query_map(params![vm.to_string(), since], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?, r.get::<_, Option<bool>>(4)?))
        });
        if let Ok(rows) = rows {
            for (outcome, bytes, dur, start, frozen) in rows.flatten() {
                if frozen == Some(false) {
                    s.app_consistent_failure_count += 1;
                }
                match outcome.as_str() {
                    "ok" => {
                        s.success_count += 1;
                        s.total_bytes += bytes as u64;
                        s.max_bytes = s.max_bytes.max(bytes as u64);
                        let secs = dur as f64 / 1000.0;
                        lat_total += secs;
                        s.max_latency_secs = s.max_latency_secs.max(secs);
                        s.last_replication_unix = Some((start as u64 + dur as u64) / 1000);
                    }
                    "missed" => s.miss_count += 1,
                    "network-failure" => {
                        s.failure_count += 1;
                        s.network_failure_count += 1;
                    }
                    _ => s.failure_count += 1,
                }
            }
        }
    }
    if s.success_count > 0 {
        s.avg_latency_secs = lat_total / s.success_count as f64;
    }
    s
}

/// Health by Hyper-V's rules, with a sentence per finding.
pub fn health(
    rel: &Relationship,
    stats: &ReplicationStats,
    last_cycle_failed: bool,
) -> (Health, Vec<String>) {
    let mut crit = Vec::new();
    let mut warn = Vec::new();
    match rel.state {
        ReplicationState::ResynchronizationRequired => crit.push(format!(
            "Resynchronization is required: {}",
            rel.last_error
                .clone()
                .unwrap_or_else(|| "change tracking cannot be trusted".into())
        )),
        ReplicationState::Error => crit.push("Replication is in an error state.".into()),
        ReplicationState::Suspended => warn.push("Replication is paused on the primary.".into()),
        ReplicationState::Resynchronizing => warn.push("Resynchronization is in progress.".into()),
        ReplicationState::WaitingForInitialReplication
        | ReplicationState::ReadyForInitialReplication
        | ReplicationState::InitialReplicationInProgress => {
            warn.push("Initial replication is not complete.".into())
        }
        _ => {}
    }
    if last_cycle_failed && rel.state != ReplicationState::ResynchronizationRequired {
        crit.push(format!(
            "The primary cannot send changes to the replica: {}",
            rel.last_error.clone().unwrap_or_default()
        ));
    }
    let total = stats.success_count + stats.miss_count + stats.failure_count;
    if total >= 5 && stats.miss_count * 5 > total {
        warn.push(format!(
            "More than 20 percent of replication cycles have been missed ({} of {}).",
            stats.miss_count, total
        ));
    }
    let since = rel.last_success_ms.unwrap_or(rel.created_ms);
    if now_ms().saturating_sub(since) > 3_600_000 {
        warn.push("The replica is behind the primary by more than an hour.".into());
    }
    if !crit.is_empty() {
        crit.extend(warn);
        (Health::Critical, crit)
    } else if !warn.is_empty() {
        (Health::Warning, warn)
    } else {
        (Health::Normal, vec![])
    }
}

/// Status of one or all relationships on this host (primary side).
pub fn statuses(d: &Daemon) -> Vec<ReplicationStatus> {
    let mut out = Vec::new();
    for vm in all_vm_uuids(d) {
        let Some(rel) = load(d, vm) else { continue };
        let Some(def) = d.vmm.definition(vm) else {
            continue;
        };
        let st = stats(d, vm, rel.created_ms);
        let last_failed = {
            let db = d.db.lock().expect("db");
            db.conn()
                .query_row(
                    "SELECT outcome FROM cycles WHERE vm_uuid = ?1 AND outcome != 'missed' ORDER BY id DESC LIMIT 1",
                    params![vm.to_string()],
                    |r| r.get::<_, String>(0),
                )
                .map(|o| o != "ok")
                .unwrap_or(false)
        };
        let (health, details) = health(&rel, &st, last_failed);
        let progress = d
            .repl
            .rels
            .lock()
            .expect("rels")
            .get(&vm)
            .and_then(|r| r.progress.lock().expect("progress").clone());
        let host = d.cfg.read().expect("cfg").host_name.clone();
        out.push(ReplicationStatus {
            vm: def.name.clone(),
            vm_uuid: vm,
            role: Role::Primary,
            state: rel.state,
            health,
            health_details: details,
            primary_host: host,
            replica_host: format!("{} ({})", rel.replica_name, rel.settings.replica_server),
            frequency_secs: Some(rel.settings.frequency_secs),
            app_consistent_hours: rel.settings.app_consistent_hours,
            last_sequence: rel.acked_seq,
            waiting_on: match rel.state {
                ReplicationState::Suspended => Some("resume (replication is paused)".into()),
                ReplicationState::ResynchronizationRequired => Some("a resynchronization".into()),
                _ => None,
            },
            last_error: rel.last_error.clone(),
            note: rel.note.clone(),
            progress,
            stats: st,
        });
    }
    out
}

/// Replication settings from the CLI's defaults.
pub fn default_settings(replica_server: &str) -> ReplicationSettings {
    ReplicationSettings {
        replica_server: replica_server.to_string(),
        replica_host_name: None,
        frequency_secs: ReplicationSettings::DEFAULT_FREQUENCY,
        recovery_points: 0,
        recovery_point_interval_secs: 3600,
        app_consistent_hours: None,
        compression: true,
        exclude_disks: vec![],
        initial: InitialReplication::NetworkNow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_gaps_go_between_the_ranges_read_so_that_records_stay_in_order() {
        const K: u64 = 1024;
        let header = LogHeader {
            vm_id: Uuid::nil(),
            sequence: 2,
            base_sequence: 1,
            timestamp_unix_ms: 1,
            kind: LogKind::Resync,
            consistency: vmrepl_log::Consistency::Crash,
            compression: Compression::None,
            disks: vec![DiskInfo {
                id: "disk0".into(),
                virtual_size: 256 * K,
            }],
        };
        let mut w = LogWriter::new(Vec::new(), header).unwrap();
        let ranges = [(64 * K, 64 * K), (192 * K, 32 * K)];
        let chunks = [(64 * K, 7u8), (192 * K, 9u8)].map(|(o, b)| {
            Ok(vmrepl_tracking::Chunk {
                offset: o,
                data: ChunkData::Data(vec![b; if o == 64 * K { 64 * K } else { 32 * K } as usize]),
            })
        });
        write_ranges(&mut w, 0, 256 * K, &ranges, chunks.into_iter(), true).unwrap();
        let (_, bytes) = w.finish_into_inner().unwrap();
        let shape: Vec<(u64, u32, bool)> = vmrepl_log::LogReader::new(&bytes[..])
            .unwrap()
            .map(|r| {
                let r = r.unwrap();
                (
                    r.offset,
                    r.len(),
                    matches!(r.content, vmrepl_log::Content::Zero(_)),
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, 64 * 1024, true),
                (64 * K, 64 * 1024, false),
                (128 * K, 64 * 1024, true),
                (192 * K, 32 * 1024, false),
                (224 * K, 32 * 1024, true),
            ]
        );
    }

    #[test]
    fn replica_digests_decode_only_when_block_size_count_and_hex_fit() {
        use crate::peer::proto::DiskDigests;
        let size = 3 << 20; // three 1 MiB blocks
        let ds = [[1u8; 32], [2u8; 32], [0xab; 32]];
        let sizes = vec![("disk0".to_string(), size)];
        let got = decode_digests(vec![DiskDigests::new("disk0".into(), 1 << 20, &ds)], &sizes);
        assert_eq!(got["disk0"], (1 << 20, ds.to_vec()));
        // Another block size, a short list, text that is not hex, an unknown disk: left out,
        // so those disks are sent whole.
        let mut not_hex = DiskDigests::new("disk0".into(), 1 << 20, &ds);
        not_hex.digests.replace_range(0..1, "z");
        for bad in [
            DiskDigests::new("disk0".into(), 2 << 20, &ds),
            DiskDigests::new("disk0".into(), 1 << 20, &ds[..2]),
            not_hex,
            DiskDigests::new("disk9".into(), 1 << 20, &ds),
        ] {
            assert!(
                decode_digests(vec![bad.clone()], &sizes).is_empty(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_app_consistent_point_is_due_every_n_hours_for_a_running_replicating_vm() {
        let mut s = default_settings("127.0.0.2:7443");
        let h = 3_600_000;
        let now = 100 * h;
        let rep = ReplicationState::Replicating;
        assert!(
            !app_consistent_due(&s, rep, true, None, now),
            "off by default"
        );
        s.app_consistent_hours = Some(2);
        assert!(
            app_consistent_due(&s, rep, true, None, now),
            "first one at once"
        );
        assert!(!app_consistent_due(&s, rep, true, Some(now - h), now));
        assert!(app_consistent_due(&s, rep, true, Some(now - 2 * h), now));
        assert!(
            !app_consistent_due(&s, rep, false, None, now),
            "a VM that is off has no guest to freeze"
        );
        for st in [
            ReplicationState::WaitingForInitialReplication,
            ReplicationState::Resynchronizing,
            ReplicationState::Suspended,
        ] {
            assert!(!app_consistent_due(&s, st, true, None, now), "{st:?}");
        }
    }

    fn rel(state: ReplicationState) -> Relationship {
        Relationship {
            vm_uuid: Uuid::new_v4(),
            rel_id: Uuid::new_v4(),
            settings: default_settings("h:1"),
            replica_name: "h".into(),
            state,
            acked_seq: 3,
            last_error: Some("boom".into()),
            created_ms: now_ms(),
            last_success_ms: Some(now_ms()),
            note: None,
        }
    }

    #[test]
    fn a_healthy_replicating_relationship_is_normal() {
        let (h, d) = health(
            &rel(ReplicationState::Replicating),
            &ReplicationStats::default(),
            false,
        );
        assert_eq!(h, Health::Normal, "{d:?}");
    }

    #[test]
    fn resync_required_and_send_failures_are_critical() {
        let (h, _) = health(
            &rel(ReplicationState::ResynchronizationRequired),
            &ReplicationStats::default(),
            false,
        );
        assert_eq!(h, Health::Critical);
        let (h, d) = health(
            &rel(ReplicationState::Replicating),
            &ReplicationStats::default(),
            true,
        );
        assert_eq!(h, Health::Critical);
        assert!(d[0].contains("cannot send"), "{d:?}");
    }

    #[test]
    fn pause_on_the_primary_and_incomplete_initial_replication_are_warnings() {
        assert_eq!(
            health(
                &rel(ReplicationState::Suspended),
                &ReplicationStats::default(),
                false
            )
            .0,
            Health::Warning
        );
        assert_eq!(
            health(
                &rel(ReplicationState::WaitingForInitialReplication),
                &ReplicationStats::default(),
                false
            )
            .0,
            Health::Warning
        );
    }

    #[test]
    fn more_than_a_fifth_of_cycles_missed_is_a_warning() {
        let st = ReplicationStats {
            success_count: 7,
            miss_count: 3,
            ..Default::default()
        };
        let (h, d) = health(&rel(ReplicationState::Replicating), &st, false);
        assert_eq!(h, Health::Warning);
        assert!(d[0].contains("20 percent"));
        let st = ReplicationStats {
            success_count: 9,
            miss_count: 1,
            ..Default::default()
        };
        assert_eq!(
            health(&rel(ReplicationState::Replicating), &st, false).0,
            Health::Normal
        );
    }

    #[test]
    fn a_replica_behind_by_more_than_an_hour_is_a_warning() {
        let mut r = rel(ReplicationState::Replicating);
        r.last_success_ms = Some(now_ms() - 2 * 3_600_000);
        let (h, d) = health(&r, &ReplicationStats::default(), false);
        assert_eq!(h, Health::Warning);
        assert!(d[0].contains("more than an hour"));
    }

    #[test]
    fn replica_targets_need_a_port_and_default_to_the_host_part_as_name() {
        let s = default_settings("hostb.example:7443");
        assert_eq!(replica_target(&s).unwrap().1, "hostb.example");
        assert!(replica_target(&default_settings("nohost")).is_err());
        assert!(replica_target(&default_settings("h:xx")).is_err());
    }
}
