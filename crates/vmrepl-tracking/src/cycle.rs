//! One point in time across all disks: the cycle transaction and its staging images.

use crate::bitmaps::{
    act, cleanup_jobs_and_nodes, delete_staging_nodes, list_owned, named_nodes, rollback_cycle,
    transaction,
};
use crate::names::{check_node_name, BitmapName, RelTag};
use crate::{TrackingError, LOG_TARGET};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vmrepl_qemu::img::{CreateOpts, QemuImg};
use vmrepl_qemu::QmpClient;

/// Where and how cycles stage their deltas.
#[derive(Debug, Clone)]
pub struct Staging {
    /// Folder of the staging images (local, with room for the delta).
    pub dir: PathBuf,
    /// How long all backup jobs of one cycle may take together.
    pub job_timeout: Duration,
    pub qemu_img: QemuImg,
    /// Delta cycles read their point in time from QEMU over NBD (pull) instead of copying the
    /// dirty clusters into staging images first (push). On by default; see [`begin_cycle`].
    pub pull: bool,
}

/// Told the point in time (Unix ms) the moment a cycle's transaction has taken it, or dropped
/// unsent when the cycle fails before: an app-consistent cycle thaws the guest on either,
/// without waiting for the copy jobs (see [`begin_cycle`]).
pub type PointSignal = tokio::sync::oneshot::Sender<u64>;

impl Staging {
    pub fn new(dir: impl Into<PathBuf>) -> Staging {
        Staging {
            dir: dir.into(),
            job_timeout: Duration::from_secs(3600),
            qemu_img: QemuImg::default(),
            pull: true,
        }
    }
}

/// Whether a cycle copied only the changes or everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CycleKind {
    /// `sync=bitmap`: the clusters dirty in bitmap `seq`.
    Delta,
    /// `sync=full`: the whole disk (initial replication / resync); bitmap `seq` started at
    /// the same instant.
    Full,
}

/// One staged image: a local qcow2 with no backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedImage {
    pub node: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// The staged copy (push), or the fleecing image that keeps the point in time while the
    /// guest writes (pull): then only readable through [`StagedImage::export`].
    pub path: PathBuf,
    /// Pull mode: the NBD export that serves this disk as of the point in time, and the meta
    /// context that lists its changed ranges.
    pub export: Option<NbdExport>,
}

/// Where a pulled disk is read from: `export` on the NBD server at `socket`, whose meta context
/// `context` marks the ranges to read: `qemu:dirty-bitmap:<frozen bitmap>` for a delta
/// ([`NbdExport::delta`]), `base:allocation` for a full copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdExport {
    pub socket: PathBuf,
    pub name: String,
    pub context: String,
}

impl NbdExport {
    /// True when the context lists changed ranges (a delta), false when it lists the disk's
    /// allocation (a full copy: read the ranges that hold data).
    pub fn delta(&self) -> bool {
        self.context.starts_with("qemu:dirty-bitmap:")
    }
}

/// A staged cycle: every disk's delta (and the vars copy) as of one point in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CycleHandle {
    pub rel: RelTag,
    /// The cycle's sequence: the bitmap that was frozen (Delta) or started (Full).
    pub seq: u64,
    pub kind: CycleKind,
    /// Unix time in ms when the transaction returned: the point in time of the copy.
    pub point_in_time_ms: u64,
    pub disks: Vec<StagedImage>,
    /// The UEFI vars copy (always a full copy), if asked for.
    pub vars: Option<StagedImage>,
}

impl CycleHandle {
    /// All staged images, disks first.
    pub fn images(&self) -> impl Iterator<Item = &StagedImage> {
        self.disks.iter().chain(self.vars.iter())
    }

    /// Deletes the staging files (after the log is shipped, or on rollback).
    pub fn remove_files(&self) -> Result<(), TrackingError> {
        for i in self.images() {
            match std::fs::remove_file(&i.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(TrackingError::Io {
                        action: "remove the staging file",
                        path: i.path.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn remove_quiet(p: &Path) {
    let _ = std::fs::remove_file(p);
}

/// Creates the staging image and adds it as node `stg-<relid8>-<node>`; with `fleece` its
/// backing is the disk node itself (the fleecing image of pull mode: reads fall through to the
/// disk, and the old data of clusters the guest overwrites is copied in first).
async fn add_target(
    qmp: &QmpClient,
    staging: &Staging,
    rel: RelTag,
    seq: u64,
    node: &str,
    size: u64,
    fleece: bool,
) -> Result<StagedImage, TrackingError> {
    let path = staging.dir.join(rel.staging_file(seq, node));
    remove_quiet(&path);
    let template = fresh_image(staging, &path, size).await?;
    let stg = rel.staging_node(node);
    check_node_name(&stg)?;
    let mut add = json!({"node-name": stg, "driver": "qcow2",
                         "file": {"driver": "file", "filename": path.to_string_lossy()}});
    if fleece {
        add["backing"] = node.into();
    }
    if let Err(e) = qmp.execute("blockdev-add", add).await {
        // Should the template be damaged, the next cycle makes a new one.
        remove_quiet(&template);
        return Err(TrackingError::qmp(format!(
            "open the staging image {} as node {stg}",
            path.display()
        ))(e));
    }
    Ok(StagedImage {
        node: node.to_string(),
        size,
        path,
        export: None,
    })
}

/// Makes `path` a fresh empty qcow2 of `size` bytes by copying the staging folder's template
/// for that size (`empty-<size>.qcow2`, a few hundred KiB), which is created with qemu-img the
/// first time. A cycle thus starts no process to create its images. Returns the template's path.
async fn fresh_image(staging: &Staging, path: &Path, size: u64) -> Result<PathBuf, TrackingError> {
    let template = staging.dir.join(format!("empty-{size}.qcow2"));
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| TrackingError::Io {
            action,
            path,
            source,
        }
    };
    if !template.is_file() {
        // Made under a unique name and renamed, so a concurrent cycle never copies half of it.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = staging
            .dir
            .join(format!("empty-{size}-{}-{nanos}.tmp", std::process::id()));
        staging
            .qemu_img
            .create(&tmp, size, &CreateOpts::default())
            .await
            .map_err(TrackingError::img(format!(
                "create the staging template {} ({size} bytes)",
                tmp.display()
            )))?;
        std::fs::rename(&tmp, &template).map_err(io("name the staging template", &template))?;
    }
    std::fs::copy(&template, path).map_err(io("copy the staging template to", path))?;
    Ok(template)
}

async fn node_size(qmp: &QmpClient, node: &str) -> Result<u64, TrackingError> {
    let nodes = named_nodes(qmp).await?;
    nodes
        .get(node)
        .and_then(|n| n.pointer("/image/virtual-size"))
        .and_then(Value::as_u64)
        .ok_or_else(|| TrackingError::NodeNotFound {
            node: node.to_string(),
            endpoint: qmp.path().to_path_buf(),
        })
}

/// Waits for every job in `jobs` (job id → node) to end; Err names the first failure.
async fn wait_jobs(
    qmp: &QmpClient,
    rx: &mut tokio::sync::broadcast::Receiver<vmrepl_qemu::QmpEvent>,
    jobs: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<(), TrackingError> {
    let deadline = Instant::now() + timeout;
    let mut left: BTreeMap<String, String> = jobs.clone();
    while !left.is_empty() {
        let ev = qmp
            .wait_event(
                rx,
                |e| {
                    matches!(
                        e.event.as_str(),
                        "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED"
                    ) && e
                        .data
                        .get("device")
                        .and_then(Value::as_str)
                        .is_some_and(|d| left.contains_key(d))
                },
                deadline,
            )
            .await;
        let ev = match ev {
            Ok(ev) => ev,
            Err(vmrepl_qemu::QmpError::EventTimeout { .. }) => {
                return Err(TrackingError::JobTimeout {
                    jobs: left.keys().cloned().collect(),
                    secs: timeout.as_secs(),
                })
            }
            Err(e) => return Err(TrackingError::qmp("wait for the backup jobs")(e)),
        };
        let job = ev.data["device"].as_str().unwrap_or_default().to_string();
        let node = left.remove(&job).unwrap_or_default();
        if ev.event == "BLOCK_JOB_CANCELLED" {
            return Err(TrackingError::JobFailed {
                job,
                node,
                reason: "it was cancelled".into(),
            });
        }
        if let Some(err) = ev.data.get("error").and_then(Value::as_str) {
            return Err(TrackingError::JobFailed {
                job,
                node,
                reason: err.to_string(),
            });
        }
        let bytes = ev.data.get("len").and_then(Value::as_u64).unwrap_or(0);
        tracing::info!(target: LOG_TARGET, job = %job, bytes, "backup job completed");
    }
    Ok(())
}

fn validate<N: AsRef<str>>(disks: &[(N, u64)], vars: Option<&str>) -> Result<(), TrackingError> {
    for (n, _) in disks {
        check_node_name(n.as_ref())?;
    }
    if let Some(v) = vars {
        check_node_name(v)?;
    }
    Ok(())
}

/// Stages a delta cycle `seq` (`seq` = the recording bitmap).
///
/// Creates one staging qcow2 per disk (`<staging>/<relid8>-<seq>-<node>.qcow2`, no backing)
/// and adds it as node `stg-<relid8>-<node>`; then ONE transaction: per disk {add bitmap
/// seq+1 (persistent), disable bitmap seq, `blockdev-backup sync=bitmap bitmap=seq
/// bitmap-mode=never`}, plus a `sync=full` copy of the vars node if given. Waits for every
/// job, deletes the staging nodes and returns the images and the point in time.
///
/// On failure after the transaction the cycle is rolled back (bitmap seq merged into
/// seq+1, files deleted): the recording bitmap is then `seq+1`, so the retry uses `seq+1`.
/// If the transaction itself fails nothing changed and the retry uses `seq` again.
///
/// `on_point`, if given, gets the point in time as soon as the transaction returns (before the
/// copy jobs finish), or is dropped unsent if the cycle fails before: an app-consistent cycle
/// thaws its guest on either.
pub async fn begin_cycle<N: AsRef<str>>(
    qmp: &QmpClient,
    rel: RelTag,
    disks: &[(N, u64)],
    seq: u64,
    staging: &Staging,
    vars: Option<&str>,
    on_point: Option<PointSignal>,
) -> Result<CycleHandle, TrackingError> {
    begin_cycle_with_new(qmp, rel, disks, &[], seq, staging, vars, on_point).await
}

/// [`begin_cycle`] where the disks named in `fresh` are new to the replica (a disk included
/// after replication was enabled): in the same transaction, each of them starts recording
/// bitmap `seq+1` and is copied whole (pull: exported with its allocation, so only the ranges
/// holding data are read; push: `sync=full`), while the other disks give their delta. The
/// cycle is one point in time across all of them (I2). Any bitmap of this relationship left
/// on a fresh disk (an earlier attempt) is removed first; a fresh disk needs none.
#[allow(clippy::too_many_arguments)]
pub async fn begin_cycle_with_new<N: AsRef<str>>(
    qmp: &QmpClient,
    rel: RelTag,
    disks: &[(N, u64)],
    fresh: &[&str],
    seq: u64,
    staging: &Staging,
    vars: Option<&str>,
    on_point: Option<PointSignal>,
) -> Result<CycleHandle, TrackingError> {
    validate(disks, vars)?;
    let name = BitmapName::new(rel, seq).to_string();
    let next = BitmapName::new(rel, seq + 1).to_string();
    let is_fresh = |n: &str| fresh.contains(&n);
    let nodes: Vec<&str> = disks
        .iter()
        .map(|(n, _)| n.as_ref())
        .filter(|n| !is_fresh(n))
        .collect();
    let fresh_nodes: Vec<&str> = disks
        .iter()
        .map(|(n, _)| n.as_ref())
        .filter(|n| is_fresh(n))
        .collect();
    if !fresh_nodes.is_empty() {
        let left = list_owned(qmp, rel, &fresh_nodes).await?;
        let rm: Vec<Value> = left
            .iter()
            .flat_map(|(node, bs)| {
                bs.iter().map(move |b| {
                    act(
                        "block-dirty-bitmap-remove",
                        json!({"node": node, "name": BitmapName::new(rel, b.seq).to_string()}),
                    )
                })
            })
            .collect();
        transaction(
            qmp,
            rm,
            &format!(
                "removes leftover bitmaps of relationship {rel} from disks new to the replica"
            ),
        )
        .await?;
    }
    let owned = list_owned(qmp, rel, &nodes).await?;
    for (node, bs) in &owned {
        match bs.iter().find(|b| b.seq == seq) {
            None => {
                return Err(TrackingError::BitmapMissing {
                    node: node.clone(),
                    bitmap: name,
                })
            }
            Some(b) if !b.recording || b.inconsistent || b.busy => {
                return Err(TrackingError::BitmapState {
                    node: node.clone(),
                    bitmap: name,
                    detail: format!(
                        "a cycle needs it recording and idle (recording {}, inconsistent {}, busy {})",
                        b.recording, b.inconsistent, b.busy
                    ),
                })
            }
            Some(_) => {}
        }
        if bs.iter().any(|b| b.seq > seq) {
            return Err(TrackingError::BitmapState {
                node: node.clone(),
                bitmap: next,
                detail: "a newer bitmap already exists (an earlier cycle was interrupted)".into(),
            });
        }
    }
    let mut actions = Vec::new();
    for (node, _) in disks {
        let node = node.as_ref();
        actions.push(act(
            "block-dirty-bitmap-add",
            json!({"node": node, "name": next, "persistent": true}),
        ));
        if !is_fresh(node) {
            actions.push(act(
                "block-dirty-bitmap-disable",
                json!({"node": node, "name": name}),
            ));
        }
    }
    run_cycle(
        qmp,
        rel,
        disks,
        seq,
        staging,
        vars,
        (CycleKind::Delta, fresh),
        actions,
        on_point,
    )
    .await
}

/// Stages a point in time of every disk as a full copy, as [`begin_full`] does, but leaves
/// the bitmaps alone: a resynchronization in parts that continues after a cut reads its
/// remaining ranges from a new point while the bitmap it started goes on recording (the
/// changes since then are sent after the last range). `seq` only names the staging files.
pub async fn begin_point<N: AsRef<str>>(
    qmp: &QmpClient,
    rel: RelTag,
    disks: &[(N, u64)],
    seq: u64,
    staging: &Staging,
) -> Result<CycleHandle, TrackingError> {
    validate(disks, None)?;
    run_cycle(
        qmp,
        rel,
        disks,
        seq,
        staging,
        None,
        (CycleKind::Full, &[]),
        Vec::new(),
        None,
    )
    .await
}

/// Stages a full copy of every disk for initial replication or resync, and starts bitmap
/// `seq0` at the same instant: one transaction {add bitmap seq0 (persistent),
/// `blockdev-backup sync=full`} per disk (plus the vars copy). Changes after the copy's
/// point in time are in bitmap `seq0`, so the first delta cycle is `seq0`.
///
/// Any earlier bitmap `seq0` on a disk is an error (use [`crate::stop_tracking`] first). On
/// failure the new bitmaps are removed again (nothing was acknowledged yet).
pub async fn begin_full<N: AsRef<str>>(
    qmp: &QmpClient,
    rel: RelTag,
    disks: &[(N, u64)],
    seq0: u64,
    staging: &Staging,
    vars: Option<&str>,
) -> Result<CycleHandle, TrackingError> {
    validate(disks, vars)?;
    let name = BitmapName::new(rel, seq0).to_string();
    let mut actions = Vec::new();
    for (node, _) in disks {
        actions.push(act(
            "block-dirty-bitmap-add",
            json!({"node": node.as_ref(), "name": name, "persistent": true}),
        ));
    }
    let r = run_cycle(
        qmp,
        rel,
        disks,
        seq0,
        staging,
        vars,
        (CycleKind::Full, &[]),
        actions,
        None,
    )
    .await;
    if r.is_err() {
        // Undo the bitmap start so that a retry can add it again.
        let nodes: Vec<&str> = disks.iter().map(|(n, _)| n.as_ref()).collect();
        if let Ok(owned) = list_owned(qmp, rel, &nodes).await {
            let rm: Vec<Value> = owned
                .iter()
                .filter(|(_, bs)| bs.iter().any(|b| b.seq == seq0))
                .map(|(node, _)| {
                    act(
                        "block-dirty-bitmap-remove",
                        json!({"node": node, "name": name}),
                    )
                })
                .collect();
            let _ = transaction(
                qmp,
                rm,
                &format!("removes bitmap {name} of a failed full copy"),
            )
            .await;
        }
    }
    r
}

#[allow(clippy::too_many_arguments)]
async fn run_cycle<N: AsRef<str>>(
    qmp: &QmpClient,
    rel: RelTag,
    disks: &[(N, u64)],
    seq: u64,
    staging: &Staging,
    vars: Option<&str>,
    // With the disks copied whole in a delta cycle (new to the replica).
    (kind, fresh): (CycleKind, &[&str]),
    mut actions: Vec<Value>,
    // Dropped on every early return: whoever waits for the point learns there is none.
    point_signal: Option<PointSignal>,
) -> Result<CycleHandle, TrackingError> {
    let start = Instant::now();
    let pull = staging.pull;
    // Leftovers of an interrupted attempt in this QEMU would make blockdev-add fail.
    cleanup_jobs_and_nodes(qmp, rel, None).await?;
    std::fs::create_dir_all(&staging.dir).map_err(|source| TrackingError::Io {
        action: "create the staging folder",
        path: staging.dir.clone(),
        source,
    })?;

    let mut images = Vec::new();
    let mut vars_img = None;
    let setup = async {
        for (node, size) in disks {
            images.push(add_target(qmp, staging, rel, seq, node.as_ref(), *size, pull).await?);
        }
        if let Some(v) = vars {
            let size = node_size(qmp, v).await?;
            vars_img = Some(add_target(qmp, staging, rel, seq, v, size, false).await?);
        }
        Ok::<(), TrackingError>(())
    }
    .await;
    let files: Vec<PathBuf> = images
        .iter()
        .chain(vars_img.iter())
        .map(|i| i.path.clone())
        .collect();
    let drop_targets = |files: Vec<PathBuf>| async move {
        let _ = delete_staging_nodes(qmp, rel).await;
        for f in &files {
            remove_quiet(f);
        }
    };
    if let Err(e) = setup {
        drop_targets(files).await;
        return Err(e);
    }

    let mut jobs = BTreeMap::new();
    for (node, _) in disks {
        let node = node.as_ref();
        let job = rel.job_id(seq, node);
        let mut data = json!({"job-id": job, "device": node, "target": rel.staging_node(node)});
        match kind {
            // Copy-before-write only: the job runs until the exports are released.
            _ if pull => data["sync"] = "none".into(),
            CycleKind::Delta if fresh.contains(&node) => data["sync"] = "full".into(),
            CycleKind::Delta => {
                data["sync"] = "bitmap".into();
                data["bitmap"] = BitmapName::new(rel, seq).to_string().into();
                data["bitmap-mode"] = "never".into();
            }
            CycleKind::Full => data["sync"] = "full".into(),
        }
        actions.push(act("blockdev-backup", data));
        if !pull {
            jobs.insert(job, node.to_string());
        }
    }
    if let Some(v) = vars {
        let job = rel.job_id(seq, v);
        actions.push(act(
            "blockdev-backup",
            json!({"job-id": job, "device": v, "target": rel.staging_node(v), "sync": "full"}),
        ));
        jobs.insert(job, v.to_string());
    }

    // Subscribe before the transaction so that no completion is missed.
    let mut rx = qmp.subscribe();
    if let Err(e) = transaction(
        qmp,
        actions,
        &format!("starts cycle {seq} of relationship {rel}"),
    )
    .await
    {
        // The transaction is atomic: nothing changed but our staging nodes.
        drop_targets(files).await;
        return Err(e);
    }
    let point_in_time_ms = now_ms();
    if let Some(tx) = point_signal {
        let _ = tx.send(point_in_time_ms);
    }
    tracing::info!(target: LOG_TARGET, rel = %rel, seq, ?kind, point_in_time_ms, "point in time taken");

    let waited = wait_jobs(qmp, &mut rx, &jobs, staging.job_timeout).await;
    let result = match waited {
        Ok(()) if pull => {
            // The vars copy is complete: close its node so that QEMU writes out the image's
            // metadata before the file is read.
            let closed = match vars {
                Some(v) => qmp
                    .execute("blockdev-del", json!({"node-name": rel.staging_node(v)}))
                    .await
                    .map(drop)
                    .map_err(TrackingError::qmp("close the staged copy of the UEFI vars")),
                None => Ok(()),
            };
            let bitmap = (kind == CycleKind::Delta).then(|| BitmapName::new(rel, seq).to_string());
            match closed {
                Ok(()) => export_disks(qmp, rel, bitmap.as_deref(), fresh, &mut images).await,
                Err(e) => Err(e),
            }
        }
        Ok(()) => delete_staging_nodes(qmp, rel).await,
        Err(e) => Err(e),
    };
    if let Err(cause) = result {
        tracing::warn!(target: LOG_TARGET, rel = %rel, seq, error = %cause, "cycle failed; rolling back");
        let rb = match kind {
            CycleKind::Delta => {
                let nodes: Vec<&str> = disks.iter().map(|(n, _)| n.as_ref()).collect();
                rollback_cycle(qmp, rel, &nodes, seq).await
            }
            CycleKind::Full => cleanup_jobs_and_nodes(qmp, rel, Some(seq)).await,
        };
        for f in &files {
            remove_quiet(f);
        }
        return Err(match rb {
            Ok(()) => cause,
            Err(rollback) => TrackingError::RollbackFailed {
                cause: Box::new(cause),
                rollback: Box::new(rollback),
            },
        });
    }
    tracing::info!(target: LOG_TARGET, rel = %rel, seq, ?kind, ms = start.elapsed().as_millis() as u64, "cycle staged");
    Ok(CycleHandle {
        rel,
        seq,
        kind,
        point_in_time_ms,
        disks: images,
        vars: vars_img,
    })
}

/// Pull mode, after the transaction: starts the NBD server on a socket beside the QMP socket
/// and exports every disk's fleecing node (read-only), with the frozen `bitmap` for a delta.
async fn export_disks(
    qmp: &QmpClient,
    rel: RelTag,
    bitmap: Option<&str>,
    fresh: &[&str],
    images: &mut [StagedImage],
) -> Result<(), TrackingError> {
    let socket = qmp
        .path()
        .parent()
        .map(|d| d.join("nbd.sock"))
        .unwrap_or_else(|| PathBuf::from("nbd.sock"));
    remove_quiet(&socket);
    qmp.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": socket.to_string_lossy()}}}),
    )
    .await
    .map_err(TrackingError::qmp(format!(
        "start the NBD server on {}",
        socket.display()
    )))?;
    for img in images.iter_mut() {
        // A disk new to the replica is read whole (its allocation), not by bitmap.
        let bitmap = bitmap.filter(|_| !fresh.contains(&img.node.as_str()));
        let id = rel.export_id(&img.node);
        let mut args = json!({"type": "nbd", "id": id, "node-name": rel.staging_node(&img.node),
                              "name": img.node, "writable": false});
        if let Some(b) = bitmap {
            args["bitmaps"] = json!([{"node": img.node, "name": b}]);
        }
        qmp.execute("block-export-add", args)
            .await
            .map_err(TrackingError::qmp(format!(
                "export disk {} over NBD (bitmap {bitmap:?})",
                img.node
            )))?;
        img.export = Some(NbdExport {
            socket: socket.clone(),
            name: img.node.clone(),
            context: match bitmap {
                Some(b) => format!("qemu:dirty-bitmap:{b}"),
                None => "base:allocation".into(),
            },
        });
    }
    Ok(())
}

/// Pull mode, once the log is built (or the cycle is abandoned): removes the cycle's NBD
/// exports, stops the server, ends the copy-before-write jobs and deletes the fleecing nodes
/// and files. The frozen bitmap stays for [`crate::commit_cycle`] or
/// [`crate::rollback_cycle`]. Harmless on a push-mode handle.
pub async fn release_exports(qmp: &QmpClient, h: &CycleHandle) -> Result<(), TrackingError> {
    cleanup_jobs_and_nodes(qmp, h.rel, Some(h.seq)).await?;
    h.remove_files()
}

/// Makes every node in `nodes` standalone: one `block-stream` job per node copies the data
/// of its whole backing chain into the node's own image, after which QEMU drops the backing
/// file from the image header. Works on a running VM (the guest keeps writing) and on
/// qemu-storage-daemon alike. This is how a failed-over VM leaves the recovery point it
/// booted from (complete failover).
///
/// Streamed clusters count as written: a recording bitmap on the node marks them dirty, so
/// the next cycle sends more than the guest changed, never less.
pub async fn stream_into_top<N: AsRef<str>>(
    qmp: &QmpClient,
    nodes: &[N],
    timeout: Duration,
) -> Result<(), TrackingError> {
    let mut rx = qmp.subscribe();
    let mut jobs = BTreeMap::new();
    for n in nodes {
        let node = n.as_ref();
        check_node_name(node)?;
        let job = format!("vmrepl-stream-{node}");
        qmp.execute("block-stream", json!({"job-id": job, "device": node}))
            .await
            .map_err(TrackingError::qmp("start streaming the backing chain"))?;
        jobs.insert(job, node.to_string());
    }
    wait_jobs(qmp, &mut rx, &jobs, timeout).await?;
    tracing::info!(target: LOG_TARGET, nodes = nodes.len(), "backing chains streamed into the top images");
    Ok(())
}
