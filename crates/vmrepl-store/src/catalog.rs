//! `state.json`, the per-VM catalog: disks, recovery points, last applied sequence, and the
//! journal of a freeze or prune in progress. Written atomically with a version and a BLAKE3
//! checksum over its own canonical JSON.
//!
//! Versions:
//! * **1**: every recovery point has a layer in every disk of the catalog.
//! * **2** (current): each point lists the disks it has (`disks`), and a disk may be
//!   `pending`: added to the replica (a disk newly included on the primary) but not yet carried
//!   by an applied log, so it belongs to no point yet. A disk removed from the replica (excluded
//!   on the primary) leaves the catalog and every point. A version-1 catalog is read (its
//!   checksum verified over its own layout) and migrated: every point has every disk, no disk
//!   is pending.

use crate::error::{Result, StoreError};
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::path::Path;
use vmrepl_types::replication::Consistency;

/// The catalog format version this crate writes and reads.
pub const CATALOG_VERSION: u32 = 2;

/// One replicated disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DiskEntry {
    pub id: String,
    pub size_bytes: u64,
    /// Added to the replica, waiting for the log that carries its initial copy: it is in no
    /// point, not even the latest state, until that log commits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

/// One frozen recovery point: layer `rp-<seq>.qcow2` in the folder of each disk it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PointEntry {
    pub seq: u64,
    pub unix_ms: i64,
    pub consistency: Consistency,
    /// File name of the layer in each `disks/<id>/` folder.
    pub layer: String,
    /// Whether `nvram/rp-<seq>.fd` exists for this point.
    pub has_nvram: bool,
    /// The disks this point has a layer in (the VM's disks at that instant).
    pub disks: Vec<String>,
}

impl PointEntry {
    pub fn has(&self, disk: &str) -> bool {
        self.disks.iter().any(|d| d == disk)
    }
}

/// The version-1 layout, kept only to read (and verify) old catalogs.
pub(crate) mod v1 {
    use super::{Consistency, Journal};
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct DiskEntry {
        pub id: String,
        pub size_bytes: u64,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct PointEntry {
        pub seq: u64,
        pub unix_ms: i64,
        pub consistency: Consistency,
        pub layer: String,
        pub has_nvram: bool,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Catalog {
        pub version: u32,
        pub vm_uuid: uuid::Uuid,
        pub disks: Vec<DiskEntry>,
        pub last_applied: u64,
        pub last_applied_unix_ms: i64,
        pub last_applied_consistency: Consistency,
        pub points: Vec<PointEntry>,
        pub journal: Option<Journal>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub resync_since: Option<u64>,
        #[serde(default)]
        pub checksum: String,
    }
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

    /// Loads and verifies the catalog at `path` (a version-1 catalog is migrated in memory).
    pub fn load(path: &Path) -> Result<Catalog> {
        Self::load_versioned(path).map(|(c, _)| c)
    }

    /// [`Catalog::load`], with the version the file holds (older than [`CATALOG_VERSION`]
    /// when it was migrated: the caller writes it back in the current version).
    pub fn load_versioned(path: &Path) -> Result<(Catalog, u32)> {
        let bytes = std::fs::read(path).map_err(|e| StoreError::io("read the catalog", path, e))?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::CatalogCorrupt {
                path: path.into(),
                reason: format!("not JSON: {e}"),
            })?;
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version == 1 {
            return Self::from_v1(path, value).map(|c| (c, 1));
        }
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
        Ok((cat, CATALOG_VERSION))
    }

    /// Reads a version-1 catalog: its checksum is verified over the version-1 layout, then
    /// every point gets every disk (what version 1 meant) and no disk is pending.
    fn from_v1(path: &Path, value: serde_json::Value) -> Result<Catalog> {
        let corrupt = |reason: String| StoreError::CatalogCorrupt {
            path: path.into(),
            reason,
        };
        let old: v1::Catalog = serde_json::from_value(value)
            .map_err(|e| corrupt(format!("unexpected content for version 1: {e}")))?;
        let mut blank = old.clone();
        blank.checksum = String::new();
        let bytes =
            serde_json::to_vec(&blank).map_err(|e| corrupt(format!("cannot serialize: {e}")))?;
        let want = blake3::hash(&bytes).to_hex().to_string();
        if want != old.checksum {
            return Err(corrupt(format!(
                "checksum {} does not match content {want}",
                old.checksum
            )));
        }
        let ids: Vec<String> = old.disks.iter().map(|d| d.id.clone()).collect();
        Ok(Catalog {
            version: CATALOG_VERSION,
            vm_uuid: old.vm_uuid,
            disks: old
                .disks
                .into_iter()
                .map(|d| DiskEntry {
                    id: d.id,
                    size_bytes: d.size_bytes,
                    pending: false,
                })
                .collect(),
            last_applied: old.last_applied,
            last_applied_unix_ms: old.last_applied_unix_ms,
            last_applied_consistency: old.last_applied_consistency,
            points: old
                .points
                .into_iter()
                .map(|p| PointEntry {
                    seq: p.seq,
                    unix_ms: p.unix_ms,
                    consistency: p.consistency,
                    layer: p.layer,
                    has_nvram: p.has_nvram,
                    disks: ids.clone(),
                })
                .collect(),
            journal: old.journal,
            resync_since: old.resync_since,
            checksum: String::new(),
        })
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
