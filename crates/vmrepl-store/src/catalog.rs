//! `state.json`, the per-VM catalog: disks, recovery points, last applied sequence, and the
//! journal of a freeze or prune in progress. Written atomically with a version and a BLAKE3
//! checksum over its own canonical JSON.

use crate::error::{Result, StoreError};
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::path::Path;
use vmrepl_types::replication::Consistency;

/// The catalog format version this crate writes and reads.
pub const CATALOG_VERSION: u32 = 1;

/// One replicated disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DiskEntry {
    pub id: String,
    pub size_bytes: u64,
}

/// One frozen recovery point: layer `rp-<seq>.qcow2` in every disk folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PointEntry {
    pub seq: u64,
    pub unix_ms: i64,
    pub consistency: Consistency,
    /// File name of the layer in each `disks/<id>/` folder.
    pub layer: String,
    /// Whether `nvram/rp-<seq>.fd` exists for this point.
    pub has_nvram: bool,
}

/// An operation that changes several files; recorded before it starts so that `open` can finish
/// it after a crash (roll forward).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "op")]
pub(crate) enum Journal {
    Freeze {
        seq: u64,
        unix_ms: i64,
        consistency: Consistency,
    },
    Prune {
        seq: u64,
    },
    /// Log `seq` is being applied into the top layer: until its commit the top layer may hold
    /// part of it (torn), so the latest state is not a whole point. Cleared by the commit that
    /// records `seq`; a failed apply leaves it, and only re-applying the log (or a
    /// resynchronization, whose commit clears it too) makes the latest state whole again.
    Apply {
        seq: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Catalog {
    pub version: u32,
    pub vm_uuid: uuid::Uuid,
    pub disks: Vec<DiskEntry>,
    /// Last applied log sequence; 0 = nothing applied yet.
    pub last_applied: u64,
    pub last_applied_unix_ms: i64,
    pub last_applied_consistency: Consistency,
    /// Frozen points, oldest first.
    pub points: Vec<PointEntry>,
    pub journal: Option<Journal>,
    /// Set while a resynchronization in parts runs: the last applied log before its first
    /// part. The latest state is not a whole point until a log that is not a part commits.
    /// Left out of the document when unset, so catalogs without it keep their checksum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_since: Option<u64>,
    /// BLAKE3 (hex) of this document serialized with `checksum` set to "".
    #[serde(default)]
    pub checksum: String,
}

impl Catalog {
    fn digest(&self) -> Result<String> {
        let mut c = self.clone();
        c.checksum = String::new();
        let bytes = serde_json::to_vec(&c).map_err(|e| StoreError::CatalogCorrupt {
            path: "state.json".into(),
            reason: format!("cannot serialize: {e}"),
        })?;
        Ok(blake3::hash(&bytes).to_hex().to_string())
    }

    /// Loads and verifies the catalog at `path`.
    pub fn load(path: &Path) -> Result<Catalog> {
        let bytes = std::fs::read(path).map_err(|e| StoreError::io("read the catalog", path, e))?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::CatalogCorrupt {
                path: path.into(),
                reason: format!("not JSON: {e}"),
            })?;
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version != CATALOG_VERSION as u64 {
            return Err(StoreError::CatalogVersion {
                path: path.into(),
                found: version as u32,
                supported: CATALOG_VERSION,
            });
        }
        let cat: Catalog =
            serde_json::from_value(value).map_err(|e| StoreError::CatalogCorrupt {
                path: path.into(),
                reason: format!("unexpected content: {e}"),
            })?;
        let want = cat.digest()?;
        if want != cat.checksum {
            return Err(StoreError::CatalogCorrupt {
                path: path.into(),
                reason: format!("checksum {} does not match content {want}", cat.checksum),
            });
        }
        Ok(cat)
    }

    /// Writes the catalog atomically (tmp + fsync + rename + directory fsync).
    pub fn store(&mut self, path: &Path) -> Result<()> {
        self.checksum = self.digest()?;
        let bytes = serde_json::to_vec_pretty(&*self).map_err(|e| StoreError::CatalogCorrupt {
            path: path.into(),
            reason: format!("cannot serialize: {e}"),
        })?;
        fsutil::write_atomic(path, &bytes)
    }
}
