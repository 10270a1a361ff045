//! Listing, starting, committing, rolling back and reconciling a relationship's bitmaps.

use crate::names::{check_node_name, BitmapName, RelTag};
use crate::{TrackingError, LOG_TARGET};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use vmrepl_qemu::QmpClient;

/// How long cancelled jobs may take to go away.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(60);

/// One bitmap of the relationship on one node, as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedBitmap {
    pub seq: u64,
    /// Enabled: tracks writes (QEMU's `recording`).
    pub recording: bool,
    /// Dirty bytes (an upper bound of the delta's size).
    pub count: u64,
    pub granularity: u64,
    /// In use by a job (a backup reading it); cannot be changed now.
    pub busy: bool,
    /// Not saved cleanly (QEMU was killed); only removal is allowed, tracking is lost.
    pub inconsistent: bool,
    pub persistent: bool,
}

/// The nodes of `query-named-block-nodes {"flat":true}` by name.
pub(crate) async fn named_nodes(qmp: &QmpClient) -> Result<BTreeMap<String, Value>, TrackingError> {
    let v = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .map_err(TrackingError::qmp(
            "list the block nodes (query-named-block-nodes)",
        ))?;
    let mut out = BTreeMap::new();
    for n in v.as_array().into_iter().flatten() {
        if let Some(name) = n.get("node-name").and_then(Value::as_str) {
            out.insert(name.to_string(), n.clone());
        }
    }
    Ok(out)
}

fn owned_on(node: &Value, rel: RelTag) -> Vec<OwnedBitmap> {
    let mut v: Vec<OwnedBitmap> = node
        .get("dirty-bitmaps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|b| {
            let name = BitmapName::parse(b.get("name")?.as_str()?).ok()?;
            if name.rel != rel {
                return None;
            }
            let flag = |k: &str| b.get(k).and_then(Value::as_bool).unwrap_or(false);
            Some(OwnedBitmap {
                seq: name.seq,
                recording: flag("recording"),
                count: b.get("count").and_then(Value::as_u64).unwrap_or(0),
                granularity: b.get("granularity").and_then(Value::as_u64).unwrap_or(0),
                busy: flag("busy"),
                inconsistent: flag("inconsistent"),
                persistent: flag("persistent"),
            })
        })
        .collect();
    v.sort_by_key(|b| b.seq);
    v
}

/// The relationship's bitmaps on each of `nodes`, sorted by sequence. Bitmaps of other
/// relationships or owners are ignored. Fails if a node does not exist.
pub async fn list_owned<N: AsRef<str>>(
    qmp: &QmpClient,
    rel: RelTag,
    nodes: &[N],
) -> Result<BTreeMap<String, Vec<OwnedBitmap>>, TrackingError> {
    let all = named_nodes(qmp).await?;
    let mut out = BTreeMap::new();
    for n in nodes {
        let n = n.as_ref();
        let info = all.get(n).ok_or_else(|| TrackingError::NodeNotFound {
            node: n.to_string(),
            endpoint: qmp.path().to_path_buf(),
        })?;
        out.insert(n.to_string(), owned_on(info, rel));
    }
    Ok(out)
}

/// The sequence of the recording bitmap if every node has exactly the same one, else None.
pub async fn recording_seq<N: AsRef<str>>(
    qmp: &QmpClient,
    rel: RelTag,
    nodes: &[N],
) -> Result<Option<u64>, TrackingError> {
    let owned = list_owned(qmp, rel, nodes).await?;
    let mut seqs = owned.values().map(|bs| {
        let rec: Vec<u64> = bs.iter().filter(|b| b.recording).map(|b| b.seq).collect();
        (rec.len() == 1).then(|| rec[0])
    });
    let first = seqs.next().flatten();
    Ok(if seqs.all(|s| s == first) {
        first
    } else {
        None
    })
}

/// Runs one `transaction`; an empty action list is a no-op.
pub(crate) async fn transaction(
    qmp: &QmpClient,
    actions: Vec<Value>,
    what: &str,
) -> Result<(), TrackingError> {
    if actions.is_empty() {
        return Ok(());
    }
    let n = actions.len();
    qmp.execute("transaction", json!({ "actions": actions }))
        .await
        .map_err(TrackingError::qmp(format!(
            "run the transaction that {what}"
        )))?;
    tracing::info!(target: LOG_TARGET, what, actions = n, "transaction done");
    Ok(())
}

pub(crate) fn act(kind: &str, data: Value) -> Value {
    json!({"type": kind, "data": data})
}

/// Starts tracking: adds persistent bitmap `seq0` on every node in one transaction. Nodes
/// that already have it are skipped (idempotent).
pub async fn start_tracking<N: AsRef<str>>(
    qmp: &QmpClient,
    rel: RelTag,
    nodes: &[N],
    seq0: u64,
) -> Result<(), TrackingError> {
    let name = BitmapName::new(rel, seq0).to_string();
    let owned = list_owned(qmp, rel, nodes).await?;
    let mut actions = Vec::new();
    for (node, bs) in &owned {
        match bs.iter().find(|b| b.seq == seq0) {
            Some(b) if b.recording && !b.inconsistent => {}
            Some(b) => {
                return Err(TrackingError::BitmapState {
                    node: node.clone(),
                    bitmap: name,
                    detail: format!(
                        "it exists but is {}",
                        if b.inconsistent {
                            "inconsistent"
                        } else {
                            "not recording"
                        }
                    ),
                })
            }
            None => actions.push(act(
                "block-dirty-bitmap-add",
                json!({"node": node, "name": name, "persistent": true}),
            )),
        }
    }
    transaction(qmp, actions, &format!("adds bitmap {name}")).await?;
    tracing::info!(target: LOG_TARGET, rel = %rel, seq = seq0, "tracking started");
    Ok(())
}

/// After the replica acknowledged log `seq` (made it durable): removes frozen bitmap `seq`
/// on every node, in one transaction. Nodes where it is already gone are skipped. Refuses
/// to remove a bitmap that is still recording (that would lose changes).
pub async fn commit_cycle<N: AsRef<str>>(
    qmp: &QmpClient,
    rel: RelTag,
    nodes: &[N],
    seq: u64,
) -> Result<(), TrackingError> {
    let name = BitmapName::new(rel, seq).to_string();
    let owned = list_owned(qmp, rel, nodes).await?;
    let mut actions = Vec::new();
    for (node, bs) in &owned {
        if let Some(b) = bs.iter().find(|b| b.seq == seq) {
            if b.recording {
                return Err(TrackingError::BitmapState {
                    node: node.clone(),
                    bitmap: name,
                    detail: "it is still recording, so no cycle froze it; removing it would lose changes".into(),
                });
            }
            actions.push(act(
                "block-dirty-bitmap-remove",
                json!({"node": node, "name": name}),
            ));
        }
    }
    transaction(qmp, actions, &format!("removes acknowledged bitmap {name}")).await?;
    tracing::info!(target: LOG_TARGET, rel = %rel, seq, "cycle committed");
    Ok(())
}

/// The `key` field of every entry `query` lists (block jobs by `device`, exports by `id`) that
/// starts with `prefix`.
async fn listed(
    qmp: &QmpClient,
    query: &str,
    key: &str,
    prefix: &str,
) -> Result<Vec<String>, TrackingError> {
    let v = qmp
        .execute(query, Value::Null)
        .await
        .map_err(TrackingError::qmp(format!("list what {query} reports")))?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.get(key).and_then(Value::as_str))
        .filter(|id| id.starts_with(prefix))
        .map(str::to_string)
        .collect())
}

/// Waits until none of `ids` is listed by `query` any more, waking on QMP events (`rx` was
/// subscribed before they were asked to go). Err: those still there at the deadline.
async fn wait_gone(
    qmp: &QmpClient,
    rx: &mut tokio::sync::broadcast::Receiver<vmrepl_qemu::QmpEvent>,
    query: &str,
    key: &str,
    ids: &[String],
) -> Result<Result<(), Vec<String>>, TrackingError> {
    let deadline = Instant::now() + CANCEL_TIMEOUT;
    loop {
        let left: Vec<String> = listed(qmp, query, key, "")
            .await?
            .into_iter()
            .filter(|x| ids.contains(x))
            .collect();
        if left.is_empty() {
            return Ok(Ok(()));
        }
        if Instant::now() >= deadline {
            return Ok(Err(left));
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
    }
}

/// Removes the relationship's NBD exports (pull mode), waits until QEMU has dropped them,
/// then stops the NBD server (vmrepl is its only user).
async fn delete_exports(qmp: &QmpClient, rel: RelTag) -> Result<(), TrackingError> {
    let ids = listed(qmp, "query-block-exports", "id", &rel.export_prefix()).await?;
    if !ids.is_empty() {
        let mut rx = qmp.subscribe();
        for id in &ids {
            match qmp
                .execute("block-export-del", json!({"id": id, "mode": "hard"}))
                .await
            {
                Ok(_) => {}
                // Already on its way out.
                Err(e) if e.class() == Some("GenericError") => {
                    tracing::info!(target: LOG_TARGET, export = %id, error = %e, "export already going");
                }
                Err(e) => return Err(TrackingError::qmp(format!("remove NBD export {id}"))(e)),
            }
        }
        if let Err(left) = wait_gone(qmp, &mut rx, "query-block-exports", "id", &ids).await? {
            return Err(TrackingError::ExportTimeout {
                exports: left,
                secs: CANCEL_TIMEOUT.as_secs(),
            });
        }
    }
    match qmp.execute("nbd-server-stop", Value::Null).await {
        Ok(_) => Ok(()),
        // Not running: nothing to stop.
        Err(e) if e.class() == Some("GenericError") => Ok(()),
        Err(e) => Err(TrackingError::qmp("stop the NBD server")(e)),
    }
}

/// Removes the relationship's NBD exports, cancels its running backup jobs (all of them if
/// `seq` is None) and deletes its staging nodes. Waits for cancelled jobs to go away.
pub(crate) async fn cleanup_jobs_and_nodes(
    qmp: &QmpClient,
    rel: RelTag,
    seq: Option<u64>,
) -> Result<(), TrackingError> {
    delete_exports(qmp, rel).await?;
    let prefix = match seq {
        Some(s) => format!("{}{s}-", rel.job_prefix()),
        None => rel.job_prefix(),
    };
    let ours = listed(qmp, "query-block-jobs", "device", &prefix).await?;
    if !ours.is_empty() {
        let mut rx = qmp.subscribe();
        for j in &ours {
            tracing::info!(target: LOG_TARGET, job = %j, "cancelling backup job");
            match qmp
                .execute("block-job-cancel", json!({"device": j, "force": true}))
                .await
            {
                Ok(_) => {}
                // Finished between the query and the cancel.
                Err(e)
                    if e.class() == Some("DeviceNotActive")
                        || e.class() == Some("GenericError") =>
                {
                    tracing::info!(target: LOG_TARGET, job = %j, error = %e, "job not cancellable (already ending)");
                }
                Err(e) => return Err(TrackingError::qmp(format!("cancel backup job {j}"))(e)),
            }
        }
        if let Err(left) = wait_gone(qmp, &mut rx, "query-block-jobs", "device", &ours).await? {
            return Err(TrackingError::JobTimeout {
                jobs: left,
                secs: CANCEL_TIMEOUT.as_secs(),
            });
        }
    }
    delete_staging_nodes(qmp, rel).await
}

/// `blockdev-del` of every staging node of the relationship (format nodes first).
pub(crate) async fn delete_staging_nodes(
    qmp: &QmpClient,
    rel: RelTag,
) -> Result<(), TrackingError> {
    let nodes = named_nodes(qmp).await?;
    let prefix = rel.staging_prefix();
    for name in nodes.keys().filter(|n| n.starts_with(&prefix)) {
        // Nodes we added with an inline file child: deleting the format node removes both.
        if name.ends_with("-file") && nodes.contains_key(name.trim_end_matches("-file")) {
            continue;
        }
        tracing::info!(target: LOG_TARGET, node = %name, "deleting staging node");
        match qmp
            .execute("blockdev-del", json!({"node-name": name}))
            .await
        {
            Ok(_) => {}
            Err(e) if e.class() == Some("DeviceNotFound") => {}
            Err(e) => return Err(TrackingError::qmp(format!("delete staging node {name}"))(e)),
        }
    }
    Ok(())
}

/// Undoes cycle `seq` after a failure before the replica's acknowledgement: cancels its
/// jobs still running, deletes its staging nodes, then in one transaction merges bitmap
/// `seq` into `seq+1` and removes `seq` on every node (I1: no change is lost). Nodes where
/// `seq` is already gone, or still recording (the cycle never froze it), are skipped.
/// Staging files are the caller's ([`crate::CycleHandle::remove_files`]).
pub async fn rollback_cycle<N: AsRef<str>>(
    qmp: &QmpClient,
    rel: RelTag,
    nodes: &[N],
    seq: u64,
) -> Result<(), TrackingError> {
    cleanup_jobs_and_nodes(qmp, rel, Some(seq)).await?;
    let name = BitmapName::new(rel, seq).to_string();
    let next = BitmapName::new(rel, seq + 1).to_string();
    let owned = list_owned(qmp, rel, nodes).await?;
    let mut actions = Vec::new();
    for (node, bs) in &owned {
        let Some(b) = bs.iter().find(|b| b.seq == seq) else {
            continue;
        };
        let has_next = bs.iter().any(|b| b.seq == seq + 1 && !b.inconsistent);
        match (b.recording, has_next) {
            (_, true) => {
                actions.push(act(
                    "block-dirty-bitmap-merge",
                    json!({"node": node, "target": next, "bitmaps": [name]}),
                ));
                actions.push(act(
                    "block-dirty-bitmap-remove",
                    json!({"node": node, "name": name}),
                ));
            }
            (true, false) => {}
            (false, false) => {
                return Err(TrackingError::BitmapMissing {
                    node: node.clone(),
                    bitmap: next,
                })
            }
        }
    }
    transaction(
        qmp,
        actions,
        &format!("merges bitmap {name} back into {next}"),
    )
    .await?;
    tracing::warn!(target: LOG_TARGET, rel = %rel, seq, "cycle rolled back; its changes go with the next cycle");
    Ok(())
}

/// Removes every bitmap in `owned` (all of one relationship) in one transaction.
async fn remove_owned(
    qmp: &QmpClient,
    rel: RelTag,
    owned: &BTreeMap<String, Vec<OwnedBitmap>>,
    what: &str,
) -> Result<(), TrackingError> {
    let mut actions = Vec::new();
    for (node, bs) in owned {
        for b in bs {
            actions.push(act(
                "block-dirty-bitmap-remove",
                json!({"node": node, "name": BitmapName::new(rel, b.seq).to_string()}),
            ));
        }
    }
    transaction(qmp, actions, what).await
}

/// Checks the node names, removes the relationship's leftover jobs, staging nodes and staging
/// files (of a cycle that never finished), and lists the relationship's bitmaps per node.
async fn clear_leftovers<N: AsRef<str>>(
    qmp: &QmpClient,
    rel: RelTag,
    nodes: &[N],
    staging_dir: Option<&Path>,
) -> Result<BTreeMap<String, Vec<OwnedBitmap>>, TrackingError> {
    for n in nodes {
        check_node_name(n.as_ref())?;
    }
    cleanup_jobs_and_nodes(qmp, rel, None).await?;
    if let Some(dir) = staging_dir {
        remove_staging_files(dir, rel)?;
    }
    list_owned(qmp, rel, nodes).await
}

/// Ends change tracking for the relationship on `nodes`: cancels its backup jobs, deletes its
/// staging nodes (and, if `staging_dir` is given, its staging files), and removes all its
/// bitmaps in one transaction. Idempotent. For a fresh initial copy, after a failed one, and
/// when replication is removed (a bitmap left behind would record every write forever).
pub async fn stop_tracking<N: AsRef<str>>(
    qmp: &QmpClient,
    rel: RelTag,
    nodes: &[N],
    staging_dir: Option<&Path>,
) -> Result<(), TrackingError> {
    let owned = clear_leftovers(qmp, rel, nodes, staging_dir).await?;
    remove_owned(qmp, rel, &owned, "removes the relationship's bitmaps").await?;
    tracing::info!(target: LOG_TARGET, rel = %rel, "tracking stopped");
    Ok(())
}

/// The result of [`reconcile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReconcileOutcome {
    /// Tracking is sound; the next cycle uses `recording`.
    Ready {
        recording: u64,
        /// Frozen bitmaps removed because the replica holds their log.
        committed: Vec<u64>,
        /// Frozen bitmaps merged into the recording one because the replica lacks their log.
        merged_back: Vec<u64>,
    },
    /// Tracking cannot be trusted. The relationship's bitmaps were removed; mark the VM
    /// "resynchronization required", then start again with a fresh bitmap and a resync.
    ResyncRequired { reason: String },
}

/// At daemon start (or before the first cycle after any interruption): puts the
/// relationship's bitmaps back into the one-recording-bitmap state.
///
/// Cancels leftover jobs, deletes leftover staging nodes and (if `staging_dir` is given)
/// the relationship's staging files. Then for every frozen bitmap N below the recording one:
/// if `replica_has(N)` it is removed, else merged into the recording one (I1). Inconsistent
/// bitmaps (QEMU was killed), a missing recording bitmap, or nodes that disagree give
/// [`ReconcileOutcome::ResyncRequired`]; in that case all of the relationship's bitmaps on
/// `nodes` are removed so that a fresh start cannot collide with them.
pub async fn reconcile<N: AsRef<str>>(
    qmp: &QmpClient,
    rel: RelTag,
    nodes: &[N],
    staging_dir: Option<&Path>,
    replica_has: impl Fn(u64) -> bool,
) -> Result<ReconcileOutcome, TrackingError> {
    let owned = clear_leftovers(qmp, rel, nodes, staging_dir).await?;

    // Find the reason to resync, if any.
    let mut reason = None;
    let mut recording = None;
    for (node, bs) in &owned {
        if let Some(b) = bs.iter().find(|b| b.inconsistent) {
            reason = Some(format!(
                "bitmap {} on node {node} is inconsistent: QEMU did not close the disk cleanly (killed or host crash)",
                BitmapName::new(rel, b.seq)
            ));
            break;
        }
        let rec: Vec<u64> = bs.iter().filter(|b| b.recording).map(|b| b.seq).collect();
        let r = match rec.as_slice() {
            [r] => *r,
            [] => {
                reason = Some(format!(
                    "node {node} has no recording bitmap of relationship {rel} (it was created after the last clean shutdown of QEMU, or the disk is new)"
                ));
                break;
            }
            _ => {
                reason = Some(format!(
                    "node {node} has several recording bitmaps of relationship {rel}: {rec:?}"
                ));
                break;
            }
        };
        if let Some(b) = bs.iter().find(|b| b.seq > r) {
            reason = Some(format!(
                "node {node} has frozen bitmap {} newer than the recording one {}",
                BitmapName::new(rel, b.seq),
                BitmapName::new(rel, r)
            ));
            break;
        }
        match recording {
            None => recording = Some(r),
            Some(prev) if prev != r => {
                reason = Some(format!(
                    "the disks disagree on the recording bitmap ({} vs {})",
                    BitmapName::new(rel, prev),
                    BitmapName::new(rel, r)
                ));
                break;
            }
            Some(_) => {}
        }
    }

    if let Some(reason) = reason {
        remove_owned(qmp, rel, &owned, "removes untrustworthy bitmaps").await?;
        tracing::warn!(target: LOG_TARGET, rel = %rel, reason = %reason, "resynchronization required");
        return Ok(ReconcileOutcome::ResyncRequired { reason });
    }
    let Some(recording) = recording else {
        return Ok(ReconcileOutcome::ResyncRequired {
            reason: "no disk nodes were given to reconcile".into(),
        });
    };

    let rec_name = BitmapName::new(rel, recording).to_string();
    let mut actions = Vec::new();
    let mut committed = Vec::new();
    let mut merged_back = Vec::new();
    let frozen: std::collections::BTreeSet<u64> = owned
        .values()
        .flatten()
        .filter(|b| !b.recording)
        .map(|b| b.seq)
        .collect();
    for seq in frozen {
        let keep = !replica_has(seq);
        let name = BitmapName::new(rel, seq).to_string();
        for (node, bs) in &owned {
            if !bs.iter().any(|b| b.seq == seq) {
                continue;
            }
            if keep {
                actions.push(act(
                    "block-dirty-bitmap-merge",
                    json!({"node": node, "target": rec_name, "bitmaps": [name]}),
                ));
            }
            actions.push(act(
                "block-dirty-bitmap-remove",
                json!({"node": node, "name": name}),
            ));
        }
        if keep {
            merged_back.push(seq);
        } else {
            committed.push(seq);
        }
    }
    transaction(qmp, actions, "settles frozen bitmaps").await?;
    tracing::info!(target: LOG_TARGET, rel = %rel, recording, ?committed, ?merged_back, "bitmaps reconciled");
    Ok(ReconcileOutcome::Ready {
        recording,
        committed,
        merged_back,
    })
}

/// Removes `<relid8>-*.qcow2` staging files of the relationship in `dir`.
pub(crate) fn remove_staging_files(dir: &Path, rel: RelTag) -> Result<(), TrackingError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(TrackingError::Io {
                action: "list the staging folder",
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let prefix = format!("{rel}-");
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".qcow2") {
            tracing::info!(target: LOG_TARGET, file = %e.path().display(), "removing leftover staging file");
            std::fs::remove_file(e.path()).map_err(|source| TrackingError::Io {
                action: "remove the staging file",
                path: e.path(),
                source,
            })?;
        }
    }
    Ok(())
}
