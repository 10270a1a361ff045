//! Growing a disk's format node while QEMU runs (`block_resize`), with its change tracking.
//!
//! QEMU 7.2's `block_resize` truncates the node through a BlockBackend that takes the resize
//! permission (virtio-blk shares it, so the guest's device stays attached). Before the qcow2
//! driver grows its tables it checks that every persistent bitmap stored in the image is
//! loaded in memory, not busy and not inconsistent (`qcow2_truncate_bitmaps_check`), and the
//! generic truncate then resizes every dirty bitmap of the node, recording or not
//! (`bdrv_dirty_bitmap_truncate`): the dirty bits already set stay, the new range starts clean
//! (it reads as zeros), and a recording bitmap records writes there from then on. So the
//! relationship's bitmaps simply cover the larger disk, and no resynchronization is needed.
//! [`grow_node`] checks exactly that afterwards (same bitmaps, same granularity, still
//! consistent, the node at the new size) rather than trusting it.

use crate::bitmaps::named_nodes;
use crate::names::check_node_name;
use crate::{TrackingError, LOG_TARGET};
use serde_json::{json, Value};
use vmrepl_qemu::QmpClient;

/// One dirty bitmap of a node (any owner's), as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeBitmap {
    pub name: String,
    pub granularity: u64,
    /// Dirty bytes.
    pub count: u64,
    pub recording: bool,
}

/// A node after [`grow_node`]: its size before and now, and its bitmaps now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrownNode {
    pub from: u64,
    pub to: u64,
    pub bitmaps: Vec<NodeBitmap>,
}

/// The virtual size and the bitmaps of `node`, with whether each is busy or inconsistent.
async fn node_state(
    qmp: &QmpClient,
    node: &str,
) -> Result<(u64, Vec<(NodeBitmap, bool, bool)>), TrackingError> {
    let all = named_nodes(qmp).await?;
    let info = all.get(node).ok_or_else(|| TrackingError::NodeNotFound {
        node: node.to_string(),
        endpoint: qmp.path().to_path_buf(),
    })?;
    let size = info
        .pointer("/image/virtual-size")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let bitmaps = info
        .get("dirty-bitmaps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|b| {
            let flag = |k: &str| b.get(k).and_then(Value::as_bool).unwrap_or(false);
            Some((
                NodeBitmap {
                    name: b.get("name")?.as_str()?.to_string(),
                    granularity: b.get("granularity").and_then(Value::as_u64).unwrap_or(0),
                    count: b.get("count").and_then(Value::as_u64).unwrap_or(0),
                    recording: flag("recording"),
                },
                flag("busy"),
                flag("inconsistent"),
            ))
        })
        .collect();
    Ok((size, bitmaps))
}

/// Grows the format node `node` of a running QEMU (or qemu-storage-daemon) to `size` bytes
/// with `block_resize`, and checks that its dirty bitmaps came along: each one is still there
/// with the same granularity and recording state, consistent, and the node is `size` bytes.
/// A node at `size` already is left alone. Refuses to shrink, and refuses (before anything
/// changes) while a bitmap is busy (a backup job reads it) or inconsistent.
pub async fn grow_node(qmp: &QmpClient, node: &str, size: u64) -> Result<GrownNode, TrackingError> {
    check_node_name(node)?;
    let (from, before) = node_state(qmp, node).await?;
    if size < from {
        return Err(TrackingError::Shrink {
            node: node.to_string(),
            from,
            to: size,
        });
    }
    for (b, busy, inconsistent) in &before {
        let detail = match (busy, inconsistent) {
            (true, _) => "in use by a block job; retry once the replication cycle is over",
            (_, true) => "inconsistent (QEMU was killed with it loaded); QEMU refuses to resize a node with such a bitmap: resynchronize the relationship, which replaces it",
            _ => continue,
        };
        return Err(TrackingError::ResizeBlocked {
            node: node.to_string(),
            bitmap: b.name.clone(),
            detail,
        });
    }
    if size > from {
        qmp.execute("block_resize", json!({"node-name": node, "size": size}))
            .await
            .map_err(TrackingError::qmp(format!(
                "grow node {node:?} from {from} to {size} bytes (block_resize)"
            )))?;
    }
    let (to, after) = node_state(qmp, node).await?;
    if to != size {
        return Err(TrackingError::ResizeMismatch {
            node: node.to_string(),
            asked: size,
            now: to,
        });
    }
    for (b, _, _) in &before {
        let now = after.iter().find(|(a, _, _)| a.name == b.name);
        let Some((a, _, inconsistent)) = now else {
            return Err(TrackingError::BitmapMissing {
                node: node.to_string(),
                bitmap: b.name.clone(),
            });
        };
        if *inconsistent || a.granularity != b.granularity || a.recording != b.recording {
            return Err(TrackingError::BitmapState {
                node: node.to_string(),
                bitmap: b.name.clone(),
                detail: format!(
                    "after growing the node it is {}, granularity {} (was {}), {} (was {})",
                    if *inconsistent {
                        "inconsistent"
                    } else {
                        "consistent"
                    },
                    a.granularity,
                    b.granularity,
                    if a.recording { "recording" } else { "frozen" },
                    if b.recording { "recording" } else { "frozen" },
                ),
            });
        }
    }
    let bitmaps: Vec<NodeBitmap> = after.into_iter().map(|(b, _, _)| b).collect();
    tracing::info!(target: LOG_TARGET, node, from, to, bitmaps = ?bitmaps, "node grown online");
    Ok(GrownNode { from, to, bitmaps })
}
