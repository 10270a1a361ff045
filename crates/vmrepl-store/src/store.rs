//! The replica store: one folder per replicated VM, its disks' layer chains and its catalog.

use crate::catalog::{Catalog, DiskEntry, Journal, PointEntry, CATALOG_VERSION};
use crate::chain;
use crate::digest_map::{DigestMap, MAP_BLOCK};
use crate::error::{Result, StoreError};
use crate::fsutil;
use crate::qemu_img;
use imago::file::File;
use imago::SyncFormatAccess;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use uuid::Uuid;
use vmrepl_types::replication::Consistency;

const BASE: &str = "base.qcow2";
const TOP: &str = "top.qcow2";
const STATE: &str = "state.json";
const VM_JSON: &str = "vm.json";
const NVRAM_LATEST: &str = "latest.fd";
/// Headroom demanded on top of a log's payload by [`ReplicaVm::check_space`]: qcow2 metadata
/// (L2 tables, refcount blocks) and the catalog.
pub const SPACE_HEADROOM: u64 = 16 * 1024 * 1024;

/// Checks a disk id: `[a-z0-9_-]{1,32}`. Done before any path is built from it (I5).
pub fn validate_disk_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidDiskId { id: id.to_string() })
    }
}

fn rp_layer(seq: u64) -> String {
    format!("rp-{seq}.qcow2")
}

fn rp_nvram(seq: u64) -> String {
    format!("rp-{seq}.fd")
}

fn parse_rp_layer(name: &str) -> Option<u64> {
    let n = name.strip_prefix("rp-")?.strip_suffix(".qcow2")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Whether a point is a frozen layer or the latest applied state (the live top layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointKind {
    /// The latest applied state. Always present; it moves forward with every applied log.
    Latest,
    /// A frozen recovery point (`rp-<seq>.qcow2`); never written again.
    Frozen,
}

/// A recovery point as callers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPoint {
    /// Sequence of the last log contained in this point (0 = initial, nothing applied).
    pub seq: u64,
    /// Point-in-time of the primary, unix milliseconds.
    pub unix_ms: i64,
    pub consistency: Consistency,
    pub kind: PointKind,
}

impl RecoveryPoint {
    /// The reference to pass to the point-taking calls.
    pub fn point_ref(&self) -> PointRef {
        match self.kind {
            PointKind::Latest => PointRef::Latest,
            PointKind::Frozen => PointRef::Frozen(self.seq),
        }
    }
}

/// Which point an operation works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointRef {
    Latest,
    Frozen(u64),
}

/// Result of [`ReplicaVm::begin_apply`].
#[must_use]
pub enum Begin<'a> {
    /// Apply the log through this transaction.
    Apply(ApplyTxn<'a>),
    /// The log was applied before (I3): nothing to do, acknowledge it again.
    AlreadyApplied { seq: u64, last_applied: u64 },
}

/// What [`ReplicaVm::prune`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Points removed, in order.
    pub merged: Vec<u64>,
    /// Points that should have gone (among the oldest beyond `keep`) but are at or below a
    /// locked point; they stay until the lock is released and `prune` runs again.
    pub blocked_by_lock: Vec<u64>,
}

/// A throwaway overlay over a frozen point (test failover or failover boot).
/// It holds a lock on the point: the point and everything below it are not pruned while it lives.
#[derive(Debug)]
pub struct Overlay {
    pub point: RecoveryPoint,
    /// One overlay image per disk, `(disk_id, path)`, each backed by the point's layer
    /// (absolute path, format qcow2).
    pub disks: Vec<(String, PathBuf)>,
    /// Copy of the point's NVRAM, if the VM has one.
    pub nvram: Option<PathBuf>,
    pub lock: PointLock,
}

/// Standalone images of a point (see [`ReplicaVm::flatten_point`]).
#[derive(Debug, Clone)]
pub struct Flattened {
    pub point: RecoveryPoint,
    pub disks: Vec<(String, PathBuf)>,
    pub nvram: Option<PathBuf>,
}

type LockTable = Arc<Mutex<BTreeMap<u64, usize>>>;

/// Keeps a frozen point (and every layer below it) from being pruned while held.
/// Locks live in memory: after a daemon restart, re-lock the points of test failovers that are
/// still running.
#[derive(Debug)]
pub struct PointLock {
    table: LockTable,
    seq: u64,
}

impl PointLock {
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl Drop for PointLock {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = t.get_mut(&self.seq) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.seq);
            }
        }
    }
}

/// Entry points: create or open a replica VM's folder under a storage folder.
pub struct ReplicaStore;

impl ReplicaStore {
    /// The folder of a replica VM: `<root>/<vm-uuid>` (never the VM's name, I5).
    pub fn vm_dir(root: &Path, vm_uuid: Uuid) -> PathBuf {
        root.join(vm_uuid.hyphenated().to_string())
    }

    /// Creates the replica folder for `vm_uuid` under `root`: `vm.json`, one empty base image
    /// (qcow2 v3, compat=1.1) and an empty top layer per disk, and the catalog. The folder is built
    /// as `<uuid>.partial` and renamed into place, so a crash leaves no half replica.
    pub fn create(
        root: &Path,
        vm_uuid: Uuid,
        vm_def: &serde_json::Value,
        disks: &[(&str, u64)],
    ) -> Result<ReplicaVm> {
        let sources: Vec<(&str, u64, Option<&Path>)> =
            disks.iter().map(|(id, size)| (*id, *size, None)).collect();
        Self::build(root, vm_uuid, vm_def, &sources, None, None)
    }

    /// Makes a replica of existing, standalone qcow2 images: each becomes the base of its disk,
    /// with `last_applied` already at `seq` (the common point both sides hold), so that deltas
    /// flow at once. This is how an old primary becomes the replica of its failed-over VM
    /// without a full copy (reverse replication).
    ///
    /// The images are hard-linked into the store (copied with `qemu-img convert` when they are
    /// on another file system); the originals are left for the caller to delete once the store
    /// is in place, so a crash at any step loses nothing. An image with a backing file, another
    /// format or another size is refused.
    pub fn adopt(
        root: &Path,
        vm_uuid: Uuid,
        vm_def: &serde_json::Value,
        disks: &[(&str, u64, &Path)],
        nvram: Option<&Path>,
        at: (u64, i64),
    ) -> Result<ReplicaVm> {
        let sources: Vec<(&str, u64, Option<&Path>)> = disks
            .iter()
            .map(|(id, size, p)| (*id, *size, Some(*p)))
            .collect();
        Self::build(root, vm_uuid, vm_def, &sources, nvram, Some(at))
    }

    /// Removes a replica VM's store: the catalog first (after that the folder is no replica),
    /// then its layers, NVRAM, logs and definition, then the folder if nothing else is in it
    /// (a failed-over VM's own disks may share it).
    pub fn destroy(root: &Path, vm_uuid: Uuid) -> Result<()> {
        let dir = Self::vm_dir(root, vm_uuid);
        let state = dir.join(STATE);
        if state.exists() {
            fs::remove_file(&state).map_err(|e| StoreError::io("remove", &state, e))?;
            fsutil::sync_dir(&dir)?;
        }
        for sub in ["disks", "nvram", "logs", "boot"] {
            let p = dir.join(sub);
            if p.exists() {
                make_writable_tree(&p);
                fs::remove_dir_all(&p).map_err(|e| StoreError::io("remove", &p, e))?;
            }
        }
        let _ = fs::remove_file(dir.join(VM_JSON));
        let _ = fs::remove_dir(&dir);
        tracing::info!(vm = %vm_uuid, dir = %dir.display(), "replica store removed");
        Ok(())
    }

    fn build(
        root: &Path,
        vm_uuid: Uuid,
        vm_def: &serde_json::Value,
        disks: &[(&str, u64, Option<&Path>)],
        nvram: Option<&Path>,
        at: Option<(u64, i64)>,
    ) -> Result<ReplicaVm> {
        if disks.is_empty() {
            return Err(StoreError::NoDisks);
        }
        let mut seen = std::collections::BTreeSet::new();
        for (id, size, _) in disks {
            validate_disk_id(id)?;
            if !seen.insert(*id) {
                return Err(StoreError::DuplicateDisk { id: id.to_string() });
            }
            if *size == 0 || size % 512 != 0 {
                return Err(StoreError::BadDiskSize {
                    disk: id.to_string(),
                    size: *size,
                });
            }
        }
        let dir = Self::vm_dir(root, vm_uuid);
        if dir.join(STATE).exists() {
            return Err(StoreError::AlreadyExists { path: dir });
        }
        let partial = root.join(format!("{}.partial", vm_uuid.hyphenated()));
        if partial.exists() {
            fs::remove_dir_all(&partial)
                .map_err(|e| StoreError::io("remove the leftover folder", &partial, e))?;
        }
        let mkdir = |p: &Path| fsutil::create_private_dir_all(p);
        mkdir(&partial)?;
        mkdir(&partial.join("nvram"))?;
        mkdir(&partial.join("logs"))?;
        for (id, size, source) in disks {
            let ddir = partial.join("disks").join(id);
            mkdir(&ddir)?;
            match source {
                None => qemu_img::create_qcow2(Some(&ddir), Path::new(BASE), *size, None)?,
                Some(src) => adopt_image(src, &ddir.join(BASE), *size)?,
            }
            create_top(&ddir, BASE, *size)?;
            set_readonly(&ddir.join(BASE), true)?;
            fsutil::sync_dir(&ddir)?;
        }
        let vm_bytes = serde_json::to_vec_pretty(vm_def).map_err(|e| StoreError::Io {
            action: "serialize the VM definition for",
            path: partial.join(VM_JSON),
            source: e.into(),
        })?;
        fsutil::write_atomic(&partial.join(VM_JSON), &vm_bytes)?;
        if let Some(nv) = nvram {
            copy_durable(nv, &partial.join("nvram").join(NVRAM_LATEST))?;
        }
        let (last_applied, last_applied_unix_ms) = at.unwrap_or((0, 0));
        let mut cat = Catalog {
            version: CATALOG_VERSION,
            vm_uuid,
            disks: disks
                .iter()
                .map(|(id, size, _)| DiskEntry {
                    id: id.to_string(),
                    size_bytes: *size,
                    pending: false,
                })
                .collect(),
            last_applied,
            last_applied_unix_ms,
            last_applied_consistency: if at.is_some() {
                Consistency::Planned
            } else {
                Consistency::Crash
            },
            points: Vec::new(),
            journal: None,
            resync_since: None,
            checksum: String::new(),
        };
        cat.store(&partial.join(STATE))?;
        fsutil::sync_dir(&partial.join("disks"))?;
        if dir.exists() {
            // A failed-over VM's folder that this store shares: move the entries in.
            for sub in ["disks", "nvram", "logs", VM_JSON, STATE] {
                let (from, to) = (partial.join(sub), dir.join(sub));
                if to.exists() {
                    return Err(StoreError::AlreadyExists { path: to });
                }
                fs::rename(&from, &to).map_err(|e| StoreError::io("move into place", &to, e))?;
            }
            let _ = fs::remove_dir(&partial);
            fsutil::sync_dir(&dir)?;
        } else {
            fs::rename(&partial, &dir).map_err(|e| StoreError::io("rename into place", &dir, e))?;
        }
        fsutil::sync_dir(root)?;
        tracing::info!(vm = %vm_uuid, dir = %dir.display(), disks = disks.len(), "replica created");
        Ok(ReplicaVm {
            dir,
            cat,
            locks: Arc::default(),
        })
    }

    /// Opens an existing replica: verifies the catalog, finishes an interrupted freeze or prune
    /// (roll forward), removes leftovers, and checks every disk's chain headers (I5).
    pub fn open(root: &Path, vm_uuid: Uuid) -> Result<ReplicaVm> {
        let dir = Self::vm_dir(root, vm_uuid);
        let state = dir.join(STATE);
        if !state.is_file() {
            return Err(StoreError::NotFound { path: dir });
        }
        let (cat, found_version) = Catalog::load_versioned(&state)?;
        if cat.vm_uuid != vm_uuid {
            return Err(StoreError::CatalogCorrupt {
                path: state,
                reason: format!("it belongs to VM {} not {vm_uuid}", cat.vm_uuid),
            });
        }
        for d in &cat.disks {
            validate_disk_id(&d.id)?;
        }
        let mut vm = ReplicaVm {
            dir,
            cat,
            locks: Arc::default(),
        };
        if found_version != CATALOG_VERSION {
            // Written back at once in the current version (an older vmrepl then refuses it
            // with a clear message rather than misreading it).
            vm.save()?;
            tracing::info!(vm = %vm_uuid, from = found_version, to = CATALOG_VERSION, "replica catalog migrated");
        }
        vm.repair()?;
        vm.verify_chains()?;
        Ok(vm)
    }
}

/// `qemu-img create` of an empty top layer over `backing` (a file name in `ddir`).
fn create_top(ddir: &Path, backing: &str, size: u64) -> Result<()> {
    let tmp = format!("{TOP}.tmp");
    let _ = fs::remove_file(ddir.join(&tmp));
    qemu_img::create_qcow2(Some(ddir), Path::new(&tmp), size, Some(Path::new(backing)))?;
    fs::File::open(ddir.join(&tmp))
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::io("fsync", ddir.join(&tmp), e))?;
    fs::rename(ddir.join(&tmp), ddir.join(TOP))
        .map_err(|e| StoreError::io("rename into place", ddir.join(TOP), e))?;
    fsutil::sync_dir(ddir)
}

/// The largest block [`ReplicaVm::range_digests`] hashes on its own.
pub const MAX_DIGEST_BLOCK: u64 = 16 << 20;
/// The most digests one [`ReplicaVm::range_digests`] call gives (4 GiB in 64 KiB blocks): an
/// answer stays a few MiB, whoever asks.
pub const MAX_RANGE_DIGESTS: u64 = 65536;
/// How much [`ReplicaVm::range_digests`] reads at a time.
const DIGEST_WINDOW: u64 = 4 << 20;

/// The block size of [`ReplicaVm::block_digests`] for a disk of `size` bytes: 1 MiB, or larger
/// so that a disk has at most 65536 blocks.
pub fn block_size(size: u64) -> u64 {
    (size.div_ceil(65536)).next_power_of_two().max(1 << 20)
}

/// Puts an existing standalone image at `dest` (a hard link, or a copy across file systems)
/// after checking that it is qcow2, has no backing file and has the disk's size.
fn adopt_image(src: &Path, dest: &Path, size: u64) -> Result<()> {
    let bad = |reason: String| StoreError::BadLayer {
        layer: src.to_path_buf(),
        reason,
    };
    if chain::header_backing(src)?.is_some() {
        return Err(bad(
            "it has a backing file; only standalone images can be adopted".into(),
        ));
    }
    let acc = chain::open_chain(
        src.parent().unwrap_or(Path::new(".")),
        &[src
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()],
        false,
        size,
    )?;
    // A layer may be smaller than its disk inside a store (a grown disk); an adopted image
    // must be the disk, exactly.
    if acc.size() != size {
        return Err(bad(format!(
            "its virtual size is {} bytes, the disk is {size}",
            acc.size()
        )));
    }
    drop(acc);
    if fs::hard_link(src, dest).is_err() {
        convert_standalone(src, dest)?;
    }
    // A hard link shares the source's inode and mode: both become owner-only.
    fsutil::make_owner_only(dest)?;
    fs::File::open(dest)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::io("fsync", dest, e))
}

/// `qemu-img convert` of the (verified) chain ending at `src` into a standalone qcow2 v3 image.
fn convert_standalone(src: &Path, dest: &Path) -> Result<()> {
    qemu_img::run(
        None,
        [
            "convert".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            "-o".as_ref(),
            "compat=1.1".as_ref(),
            src.as_os_str(),
            dest.as_os_str(),
        ]
        .map(std::ffi::OsStr::to_os_string),
    )
    .map(drop)
}

/// Clears read-only bits below `dir` so that it can be removed.
fn make_writable_tree(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                make_writable_tree(&p);
            } else {
                let _ = set_readonly(&p, false);
            }
        }
    }
}

/// Makes `path` read-only (0400) or writable by its owner (0600). Never group- or
/// world-writable: `Permissions::set_readonly(false)` would add every write bit.
fn set_readonly(path: &Path, ro: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = if ro { 0o400 } else { 0o600 };
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| StoreError::io("change permissions of", path, e))
}

/// Whether merging the oldest point's `layer` into `base.qcow2` is cheaper the other way round:
/// the layer made standalone and renamed to the base. True when the layer holds more data
/// than the base (a replica kept without extra points after an initial copy holds everything
/// in one layer above an empty base), and when a merge done that way was cut after the layer
/// lost its backing file.
fn becomes_base(ddir: &Path, layer: &str) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let lp = ddir.join(layer);
    if chain::header_backing(&lp)?.is_none() {
        return Ok(true);
    }
    let allocated = |p: &Path| {
        fs::metadata(p)
            .map(|m| m.blocks() * 512)
            .map_err(|e| StoreError::io("read the size of", p, e))
    };
    Ok(allocated(&lp)? > allocated(&ddir.join(BASE))?)
}

/// The first half of [`becomes_base`]'s merge. Every step leaves a consistent chain: the layer
/// first takes in the base's data it does not cover and drops its backing file (`qemu-img
/// rebase` in safe mode onto nothing), then a second name for it replaces `base.qcow2`
/// atomically. The layer above still names the layer's old name until the caller rebases it
/// onto the base; the old name is removed as a leftover afterwards. Idempotent.
fn make_base(ddir: &Path, layer: &str) -> Result<()> {
    let lp = ddir.join(layer);
    if chain::header_backing(&lp)?.is_some() {
        set_readonly(&lp, false)?;
        qemu_img::run(Some(ddir), ["rebase", "-q", "-f", "qcow2", "-b", "", layer])?;
        fs::File::open(&lp)
            .and_then(|f| f.sync_all())
            .map_err(|e| StoreError::io("fsync", &lp, e))?;
        set_readonly(&lp, true)?;
    }
    let tmp = ddir.join(format!("{BASE}.{layer}.tmp"));
    let _ = fs::remove_file(&tmp);
    fs::hard_link(&lp, &tmp).map_err(|e| StoreError::io("link", &tmp, e))?;
    let base = ddir.join(BASE);
    fs::rename(&tmp, &base).map_err(|e| StoreError::io("rename", &base, e))?;
    fsutil::sync_dir(ddir)
}

fn copy_durable(from: &Path, to: &Path) -> Result<()> {
    let bytes = fs::read(from).map_err(|e| StoreError::io("read", from, e))?;
    fsutil::write_atomic(to, &bytes)
}

/// One replicated VM's storage. See the crate docs for the layout and the rules.
#[derive(Debug)]
pub struct ReplicaVm {
    dir: PathBuf,
    cat: Catalog,
    locks: LockTable,
}

impl ReplicaVm {
    /// The VM's folder, `<storage>/<vm-uuid>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn vm_uuid(&self) -> Uuid {
        self.cat.vm_uuid
    }

    /// `(disk_id, size_bytes)` of every disk.
    pub fn disks(&self) -> Vec<(String, u64)> {
        self.cat
            .disks
            .iter()
            .map(|d| (d.id.clone(), d.size_bytes))
            .collect()
    }

    /// Sequence of the last applied log (0 = none).
    pub fn last_applied(&self) -> u64 {
        self.cat.last_applied
    }

    /// The VM definition as stored (opaque JSON).
    pub fn vm_definition(&self) -> Result<serde_json::Value> {
        let p = self.dir.join(VM_JSON);
        let bytes = fs::read(&p).map_err(|e| StoreError::io("read", &p, e))?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::CatalogCorrupt {
            path: p,
            reason: format!("the VM definition is not JSON: {e}"),
        })
    }

    /// Replaces the stored VM definition atomically.
    pub fn set_vm_definition(&mut self, def: &serde_json::Value) -> Result<()> {
        let p = self.dir.join(VM_JSON);
        let bytes = serde_json::to_vec_pretty(def).map_err(|e| StoreError::Io {
            action: "serialize the VM definition for",
            path: p.clone(),
            source: e.into(),
        })?;
        fsutil::write_atomic(&p, &bytes)
    }

    fn disk_dir(&self, id: &str) -> PathBuf {
        self.dir.join("disks").join(id)
    }

    fn nvram_dir(&self) -> PathBuf {
        self.dir.join("nvram")
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join(STATE)
    }

    fn save(&mut self) -> Result<()> {
        let p = self.state_path();
        self.cat.store(&p)
    }

    /// Layer file names of disk `disk`'s chain ending at `point`, base first: the layers of
    /// the points that have the disk (a disk added later has none in older points). For
    /// [`PointRef::Latest`] the chain ends with the top layer (a pending disk's too).
    fn chain_layers_for(&self, disk: &str, point: PointRef) -> Result<Vec<String>> {
        let mut layers = vec![BASE.to_string()];
        match point {
            PointRef::Latest => {
                layers.extend(
                    self.cat
                        .points
                        .iter()
                        .filter(|p| p.has(disk))
                        .map(|p| p.layer.clone()),
                );
                layers.push(TOP.to_string());
            }
            PointRef::Frozen(seq) => {
                let idx = self.point_index(seq)?;
                layers.extend(
                    self.cat.points[..=idx]
                        .iter()
                        .filter(|p| p.has(disk))
                        .map(|p| p.layer.clone()),
                );
            }
        }
        Ok(layers)
    }

    /// `(disk_id, size_bytes)` of the disks `point` has: for a frozen point those it lists,
    /// for the latest state every disk that is not pending (see [`ReplicaVm::add_disk`]).
    /// A failover to the point starts the VM with exactly these disks.
    pub fn point_disks(&self, point: PointRef) -> Result<Vec<(String, u64)>> {
        let member: Box<dyn Fn(&DiskEntry) -> bool> = match point {
            PointRef::Latest => Box::new(|d: &DiskEntry| !d.pending),
            PointRef::Frozen(seq) => {
                let p = self.cat.points[self.point_index(seq)?].clone();
                Box::new(move |d: &DiskEntry| p.has(&d.id))
            }
        };
        Ok(self
            .cat
            .disks
            .iter()
            .filter(|d| member(d))
            .map(|d| (d.id.clone(), d.size_bytes))
            .collect())
    }

    /// Disks added to the replica whose initial copy no applied log has carried yet.
    pub fn pending_disks(&self) -> Vec<String> {
        self.cat
            .disks
            .iter()
            .filter(|d| d.pending)
            .map(|d| d.id.clone())
            .collect()
    }

    /// Adds disk `id` of `size` bytes to the replica (the primary included a disk): an empty
    /// base and top layer, and a catalog entry that is *pending*: the disk is in no point until
    /// the log that carries its initial copy commits ([`ApplyTxn::commit`]); from then on
    /// every new point has it, the older points never do. Idempotent for the same disk and
    /// size (pending or not).
    pub fn add_disk(&mut self, id: &str, size: u64) -> Result<()> {
        validate_disk_id(id)?;
        if let Some(d) = self.cat.disks.iter().find(|d| d.id == id) {
            if d.size_bytes == size {
                return Ok(());
            }
            return Err(StoreError::DuplicateDisk { id: id.to_string() });
        }
        if size == 0 || !size.is_multiple_of(512) {
            return Err(StoreError::BadDiskSize {
                disk: id.to_string(),
                size,
            });
        }
        let ddir = self.disk_dir(id);
        if ddir.exists() {
            // A leftover of an add that did not reach the catalog.
            make_writable_tree(&ddir);
            fs::remove_dir_all(&ddir).map_err(|e| StoreError::io("remove", &ddir, e))?;
        }
        fsutil::create_private_dir_all(&ddir)?;
        qemu_img::create_qcow2(Some(&ddir), Path::new(BASE), size, None)?;
        create_top(&ddir, BASE, size)?;
        set_readonly(&ddir.join(BASE), true)?;
        fsutil::sync_dir(&ddir)?;
        fsutil::sync_dir(&self.dir.join("disks"))?;
        self.cat.disks.push(DiskEntry {
            id: id.to_string(),
            size_bytes: size,
            pending: true,
        });
        self.save()?;
        tracing::info!(vm = %self.cat.vm_uuid, disk = id, size, "disk added; it joins the points from the log that carries its initial copy");
        Ok(())
    }

    /// Removes disk `id` from the replica (the primary excluded it): from the catalog and
    /// from every recovery point, then its folder. Like Hyper-V, an excluded disk keeps no
    /// placeholder: a failover to any point afterwards starts the VM without it. Refused while
    /// a locked point (a test failover) has the disk, and when it is the last disk.
    pub fn remove_disk(&mut self, id: &str) -> Result<()> {
        validate_disk_id(id)?;
        if !self.cat.disks.iter().any(|d| d.id == id) {
            return Ok(());
        }
        if self.cat.disks.len() == 1 {
            return Err(StoreError::NoDisks);
        }
        let locked: Vec<u64> = {
            let t = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            t.keys().copied().collect()
        };
        if let Some(p) = self
            .cat
            .points
            .iter()
            .find(|p| locked.contains(&p.seq) && p.has(id))
        {
            return Err(StoreError::DiskInUse {
                disk: id.to_string(),
                seq: p.seq,
            });
        }
        self.cat.disks.retain(|d| d.id != id);
        for p in &mut self.cat.points {
            p.disks.retain(|d| d != id);
        }
        self.save()?;
        let ddir = self.disk_dir(id);
        if ddir.exists() {
            make_writable_tree(&ddir);
            fs::remove_dir_all(&ddir).map_err(|e| StoreError::io("remove", &ddir, e))?;
        }
        fsutil::sync_dir(&self.dir.join("disks"))?;
        tracing::info!(vm = %self.cat.vm_uuid, disk = id, "disk removed from the replica and its points");
        Ok(())
    }

    fn point_index(&self, seq: u64) -> Result<usize> {
        self.cat
            .points
            .iter()
            .position(|p| p.seq == seq)
            .ok_or_else(|| StoreError::NoSuchPoint {
                seq,
                known: self.known_points(),
            })
    }

    fn known_points(&self) -> String {
        if self.cat.points.is_empty() {
            "none (only the latest state)".into()
        } else {
            self.cat
                .points
                .iter()
                .map(|p| p.seq.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    }

    fn disk_size(&self, id: &str) -> Result<u64> {
        self.cat
            .disks
            .iter()
            .find(|d| d.id == id)
            .map(|d| d.size_bytes)
            .ok_or_else(|| StoreError::UnknownDisk {
                disk: id.to_string(),
                known: self
                    .cat
                    .disks
                    .iter()
                    .map(|d| d.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Opens every disk's full chain read-only through imago with the deny gate, checking each
    /// header's backing name, format and size. Nothing named in a header is opened.
    pub fn verify_chains(&self) -> Result<()> {
        for d in &self.cat.disks {
            let layers = self.chain_layers_for(&d.id, PointRef::Latest)?;
            let acc = chain::open_chain(&self.disk_dir(&d.id), &layers, false, d.size_bytes)?;
            drop(acc);
        }
        Ok(())
    }

    // ---------------------------------------------------------------- log spool

    /// Where the verified log `seq` waits to be applied ([`crate::spool::log_path`]).
    pub fn store_log_path(&self, seq: u64) -> PathBuf {
        crate::spool::log_path(&self.dir, seq)
    }

    /// Where log `seq` is being received ([`crate::spool::partial_path`]).
    pub fn partial_log_path(&self, seq: u64) -> PathBuf {
        crate::spool::partial_path(&self.dir, seq)
    }

    /// Verified logs received (durable) but not yet applied, oldest first. Re-apply them at
    /// start. Partial (unverified) transfers are never listed.
    pub fn pending_logs(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut out: Vec<(u64, PathBuf)> = self
            .spool_entries()?
            .into_iter()
            .filter(|(seq, verified, _)| *verified && *seq > self.cat.last_applied)
            .map(|(seq, _, p)| (seq, p))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Removes spooled logs (verified or partial) at or below the last applied sequence.
    pub fn discard_applied_logs(&self) -> Result<()> {
        for (seq, _, p) in self.spool_entries()? {
            if seq <= self.cat.last_applied {
                let _ = fs::remove_file(p);
            }
        }
        Ok(())
    }

    /// Every spool file: (sequence, verified, path).
    fn spool_entries(&self) -> Result<Vec<(u64, bool, PathBuf)>> {
        let dir = self.dir.join("logs");
        let mut out = Vec::new();
        let rd = fs::read_dir(&dir).map_err(|e| StoreError::io("list", &dir, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| StoreError::io("list", &dir, e))?;
            if let Some((seq, verified)) =
                ent.file_name().to_str().and_then(crate::spool::parse_name)
            {
                out.push((seq, verified, ent.path()));
            }
        }
        Ok(out)
    }

    // ---------------------------------------------------------------- space

    /// Refuses with [`StoreError::DiskFull`] unless the file system holding this VM has
    /// `bytes_needed` plus [`SPACE_HEADROOM`] available (statvfs). Call before applying a log.
    pub fn check_space(&self, bytes_needed: u64) -> Result<()> {
        let free = fsutil::free_bytes(&self.dir)?;
        let needed = bytes_needed.saturating_add(SPACE_HEADROOM);
        if free < needed {
            return Err(StoreError::DiskFull {
                path: self.dir.clone(),
                needed,
                free,
            });
        }
        Ok(())
    }

    // ---------------------------------------------------------------- apply

    /// Starts applying log `seq`, which the primary built on top of `base_seq`.
    ///
    /// * `seq <= last_applied` → [`Begin::AlreadyApplied`] (idempotent, I3).
    /// * `base_seq != last_applied` → [`StoreError::OutOfOrder`]: mark the VM
    ///   "resynchronization required".
    pub fn begin_apply(&mut self, seq: u64, base_seq: u64) -> Result<Begin<'_>> {
        let last = self.cat.last_applied;
        if seq <= last {
            return Ok(Begin::AlreadyApplied {
                seq,
                last_applied: last,
            });
        }
        if seq <= base_seq {
            return Err(StoreError::SeqNotAfterBase { seq, base_seq });
        }
        if base_seq != last {
            return Err(StoreError::OutOfOrder {
                expected: last,
                got: base_seq,
                got_seq: seq,
            });
        }
        tracing::debug!(vm = %self.cat.vm_uuid, seq, "apply begins");
        let whole_before = self.torn().is_none();
        Ok(Begin::Apply(ApplyTxn {
            vm: self,
            seq,
            open: BTreeMap::new(),
            writeback: BTreeMap::new(),
            nvram: None,
            bytes: 0,
            write_time: std::time::Duration::ZERO,
            direct: false,
            digests: BTreeMap::new(),
            whole_before,
            bulk: None,
            direct_files: BTreeMap::new(),
            carried: Default::default(),
        }))
    }

    // ---------------------------------------------------------------- points

    /// Whether this replica has applied nothing yet and keeps no point: its latest state is
    /// empty, or holds part of an initial copy that did not finish.
    pub fn awaits_initial_copy(&self) -> bool {
        self.cat.last_applied == 0 && self.cat.points.is_empty()
    }

    /// Empties the latest state of a replica that [awaits its initial
    /// copy](ReplicaVm::awaits_initial_copy), before a new initial copy is applied: whatever an
    /// earlier, unfinished one left in the top layers is dropped (a new copy comes from a new
    /// point in time and need not cover the same blocks). Each disk's top layer is created anew
    /// over the base; a no-op otherwise.
    pub fn restart_initial_copy(&mut self) -> Result<()> {
        if !self.awaits_initial_copy() {
            return Ok(());
        }
        for d in self.cat.disks.clone() {
            let ddir = self.disk_dir(&d.id);
            DigestMap::remove(&ddir);
            create_top(&ddir, BASE, d.size_bytes)?;
        }
        if self.cat.journal.is_some() {
            self.cat.journal = None;
            self.save()?;
        }
        Ok(())
    }

    /// Why disk `id` cannot grow to `new_size` now, if it cannot: it must exist, only grow
    /// (in 512-byte units), and the latest state must be whole (no apply in progress, no
    /// resynchronization in parts).
    pub fn grow_disk_check(&self, id: &str, new_size: u64) -> Result<u64> {
        let old = self.disk_size(id)?;
        if new_size < old || !new_size.is_multiple_of(512) {
            return Err(StoreError::BadDiskSize {
                disk: id.to_string(),
                size: new_size,
            });
        }
        if let Some(seq) = self.torn() {
            return Err(StoreError::TornLatest { seq });
        }
        Ok(old)
    }

    /// Grows disk `id` to `new_size` bytes (its primary grew the VM's disk): the top layer is
    /// resized; the recovery points keep their size (what lies past a layer's end reads as
    /// zeros). The digest map starts afresh.
    pub fn grow_disk(&mut self, id: &str, new_size: u64) -> Result<()> {
        let old = self.grow_disk_check(id, new_size)?;
        if old == new_size {
            return Ok(());
        }
        let ddir = self.disk_dir(id);
        qemu_img::resize(&ddir.join(TOP), new_size)?;
        DigestMap::remove(&ddir);
        if let Some(d) = self.cat.disks.iter_mut().find(|d| d.id == id) {
            d.size_bytes = new_size;
        }
        self.save()
    }

    /// The log whose apply started but did not finish, if any: the top layer may hold part
    /// of it, so the latest state is not a whole point (see [`StoreError::TornLatest`]).
    pub fn torn(&self) -> Option<u64> {
        match self.cat.journal {
            Some(Journal::Apply { seq }) => Some(seq),
            _ => None,
        }
    }

    /// While a resynchronization in parts runs: the last applied log before its first part
    /// (the latest state mixes old and new blocks until it ends, see
    /// [`StoreError::ResyncInProgress`]).
    pub fn resyncing(&self) -> Option<u64> {
        self.cat.resync_since
    }

    fn whole_latest(&self) -> Result<()> {
        if let Some(seq) = self.torn() {
            return Err(StoreError::TornLatest { seq });
        }
        match self.cat.resync_since {
            Some(since) => Err(StoreError::ResyncInProgress {
                since,
                seq: self.cat.last_applied,
            }),
            None => Ok(()),
        }
    }

    /// Frozen points (oldest first) followed by the latest applied state ([`PointKind::Latest`];
    /// it may have the same `seq` as the newest frozen point). The latest state is left out
    /// while it is torn ([`ReplicaVm::torn`]) or in the middle of a resynchronization in parts
    /// ([`ReplicaVm::resyncing`]): only whole points are ever offered.
    pub fn points(&self) -> Vec<RecoveryPoint> {
        let mut v: Vec<RecoveryPoint> = self
            .cat
            .points
            .iter()
            .map(|p| RecoveryPoint {
                seq: p.seq,
                unix_ms: p.unix_ms,
                consistency: p.consistency,
                kind: PointKind::Frozen,
            })
            .collect();
        if self.whole_latest().is_ok() {
            v.push(self.latest_point());
        }
        v
    }

    fn latest_point(&self) -> RecoveryPoint {
        RecoveryPoint {
            seq: self.cat.last_applied,
            unix_ms: self.cat.last_applied_unix_ms,
            consistency: self.cat.last_applied_consistency,
            kind: PointKind::Latest,
        }
    }

    fn resolve(&self, point: PointRef) -> Result<RecoveryPoint> {
        match point {
            PointRef::Latest => self.whole_latest().map(|()| self.latest_point()),
            PointRef::Frozen(seq) => {
                let p = &self.cat.points[self.point_index(seq)?];
                Ok(RecoveryPoint {
                    seq: p.seq,
                    unix_ms: p.unix_ms,
                    consistency: p.consistency,
                    kind: PointKind::Frozen,
                })
            }
        }
    }

    /// Freezes the current top layer as recovery point `seq` (which must be the last applied
    /// sequence): `top.qcow2` becomes the read-only `rp-<seq>.qcow2` in every disk and a fresh
    /// empty `top.qcow2` is created over it. The latest NVRAM is copied to `nvram/rp-<seq>.fd`.
    /// `unix_ms`/`consistency` describe the point (normally those of log `seq`).
    pub fn freeze_point(
        &mut self,
        seq: u64,
        unix_ms: i64,
        consistency: Consistency,
    ) -> Result<RecoveryPoint> {
        self.whole_latest()?;
        if seq != self.cat.last_applied {
            return Err(StoreError::FreezeNotLatest {
                seq,
                last_applied: self.cat.last_applied,
            });
        }
        if self.cat.points.iter().any(|p| p.seq == seq) {
            return Err(StoreError::AlreadyFrozen { seq });
        }
        self.cat.journal = Some(Journal::Freeze {
            seq,
            unix_ms,
            consistency,
        });
        self.save()?;
        self.finish_freeze(seq, unix_ms, consistency)?;
        tracing::info!(vm = %self.cat.vm_uuid, seq, "recovery point frozen");
        self.resolve(PointRef::Frozen(seq))
    }

    /// The idempotent body of a freeze (also used to roll a journaled freeze forward).
    fn finish_freeze(&mut self, seq: u64, unix_ms: i64, consistency: Consistency) -> Result<()> {
        let layer = rp_layer(seq);
        // A pending disk (no log carried it yet) is not part of this point: its top layer
        // stays as it is.
        let members: Vec<DiskEntry> = self
            .cat
            .disks
            .iter()
            .filter(|d| !d.pending)
            .cloned()
            .collect();
        for d in &members {
            let ddir = self.disk_dir(&d.id);
            let top = ddir.join(TOP);
            let rp = ddir.join(&layer);
            if !rp.exists() {
                fs::rename(&top, &rp)
                    .map_err(|e| StoreError::io("rename the top layer to", &rp, e))?;
                fsutil::sync_dir(&ddir)?;
            }
            if !top.exists() {
                create_top(&ddir, &layer, d.size_bytes)?;
            }
            set_readonly(&rp, true)?;
        }
        let latest = self.nvram_dir().join(NVRAM_LATEST);
        let has_nvram = latest.exists();
        if has_nvram {
            copy_durable(&latest, &self.nvram_dir().join(rp_nvram(seq)))?;
        }
        self.cat.points.push(PointEntry {
            seq,
            unix_ms,
            consistency,
            layer,
            has_nvram,
            disks: members.into_iter().map(|d| d.id).collect(),
        });
        self.cat.journal = None;
        self.save()
    }

    /// Locks frozen point `seq` against pruning (see the locking table in the crate docs).
    pub fn lock_point(&self, seq: u64) -> Result<PointLock> {
        self.point_index(seq)?;
        let mut t = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        *t.entry(seq).or_insert(0) += 1;
        Ok(PointLock {
            table: Arc::clone(&self.locks),
            seq,
        })
    }

    fn max_locked(&self) -> Option<u64> {
        let t = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        t.keys().next_back().copied()
    }

    /// Removes the oldest frozen points so that at most `keep` remain, skipping those at or below
    /// a locked point (the newest `keep` points are never removed in their place). A point can go
    /// only if every locked point is older than it; the oldest point is merged into `base.qcow2`
    /// (`qemu-img commit` + `rebase -u` of the layer above), a newer one is folded into the layer
    /// above it (`qemu-img rebase` in safe mode onto the layer below). No point that remains
    /// changes content.
    pub fn prune(&mut self, keep: usize) -> Result<PruneReport> {
        let mut report = PruneReport::default();
        let excess = self.cat.points.len().saturating_sub(keep);
        // Only the oldest `excess` points are candidates: the newest `keep` always stay, even
        // when an older point cannot go because of a lock.
        let candidates: Vec<u64> = self.cat.points[..excess].iter().map(|p| p.seq).collect();
        for seq in candidates {
            if self.max_locked().is_some_and(|locked| locked >= seq) {
                report.blocked_by_lock.push(seq);
                continue;
            }
            self.cat.journal = Some(Journal::Prune { seq });
            self.save()?;
            self.finish_prune(seq)?;
            report.merged.push(seq);
        }
        Ok(report)
    }

    /// The idempotent body of a prune of point `seq` (also rolls a journaled prune forward).
    fn finish_prune(&mut self, seq: u64) -> Result<()> {
        let Some(idx) = self.cat.points.iter().position(|p| p.seq == seq) else {
            // Already out of the catalog: only the leftovers remain.
            self.cat.journal = None;
            self.save()?;
            return self.remove_orphans();
        };
        let layer = self.cat.points[idx].layer.clone();
        let members = self.cat.points[idx].disks.clone();
        for d in self.cat.disks.clone() {
            if !members.contains(&d.id) {
                continue; // the point has no layer in this disk
            }
            // This disk's own neighbours: the points around `idx` that have it.
            let below = self.cat.points[..idx].iter().rev().find(|p| p.has(&d.id));
            let first = below.is_none();
            let lower = below
                .map(|p| p.layer.clone())
                .unwrap_or_else(|| BASE.to_string());
            let upper = self.cat.points[idx + 1..]
                .iter()
                .find(|p| p.has(&d.id))
                .map(|p| p.layer.clone())
                .unwrap_or_else(|| TOP.to_string());
            let ddir = self.disk_dir(&d.id);
            let upper_path = ddir.join(&upper);
            if chain::header_backing(&upper_path)?.as_deref() != Some(layer.as_str()) {
                continue; // this disk is done already
            }
            // Verify the chain up to the upper layer before qemu-img follows its headers.
            let mut layers = self.chain_layers_for(&d.id, PointRef::Latest)?;
            if let Some(pos) = layers.iter().position(|l| *l == upper) {
                layers.truncate(pos + 1);
            }
            if first && chain::header_backing(&ddir.join(&layer))?.is_none() {
                // A merge into the base cut after the layer dropped its backing file
                // ([`make_base`]): the chain starts at the layer now.
                layers.remove(0);
            }
            drop(chain::open_chain(&ddir, &layers, false, d.size_bytes)?);
            let upper_ro = upper != TOP;
            if upper_ro {
                set_readonly(&upper_path, false)?;
            }
            if first && becomes_base(&ddir, &layer)? {
                // The layer holds more than the base: the base's few clusters go up into the
                // layer, and the layer takes the base's name, instead of copying the layer down.
                make_base(&ddir, &layer)?;
                qemu_img::run(
                    Some(&ddir),
                    [
                        "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", BASE, &upper,
                    ],
                )?;
            } else if first {
                set_readonly(&ddir.join(BASE), false)?;
                qemu_img::run(Some(&ddir), ["commit", "-q", "-d", "-f", "qcow2", &layer])?;
                set_readonly(&ddir.join(BASE), true)?;
                qemu_img::run(
                    Some(&ddir),
                    [
                        "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", BASE, &upper,
                    ],
                )?;
            } else {
                qemu_img::run(
                    Some(&ddir),
                    [
                        "rebase", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &lower, &upper,
                    ],
                )?;
            }
            fs::File::open(&upper_path)
                .and_then(|f| f.sync_all())
                .map_err(|e| StoreError::io("fsync", &upper_path, e))?;
            if first {
                let b = ddir.join(BASE);
                fs::File::open(&b)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| StoreError::io("fsync", &b, e))?;
            }
            if upper_ro {
                set_readonly(&upper_path, true)?;
            }
        }
        self.cat.points.remove(idx);
        self.cat.journal = None;
        self.save()?;
        tracing::info!(vm = %self.cat.vm_uuid, seq, "recovery point pruned");
        self.remove_orphans()
    }

    /// Deletes layer and NVRAM files that no catalog entry names (after a prune), and `.tmp`
    /// leftovers.
    fn remove_orphans(&self) -> Result<()> {
        let known: std::collections::BTreeSet<u64> =
            self.cat.points.iter().map(|p| p.seq).collect();
        let freezing = match self.cat.journal {
            Some(Journal::Freeze { seq, .. }) => Some(seq),
            _ => None,
        };
        // Folders of disks the catalog does not name (a removal or an add cut short).
        let disks_dir = self.dir.join("disks");
        if let Ok(rd) = fs::read_dir(&disks_dir) {
            for ent in rd.flatten() {
                let name = ent.file_name().to_string_lossy().into_owned();
                if ent.path().is_dir() && !self.cat.disks.iter().any(|d| d.id == name) {
                    tracing::info!(dir = %ent.path().display(), "removing the folder of a disk the replica no longer has");
                    make_writable_tree(&ent.path());
                    fs::remove_dir_all(ent.path())
                        .map_err(|e| StoreError::io("remove", ent.path(), e))?;
                }
            }
        }
        for d in &self.cat.disks {
            let known: std::collections::BTreeSet<u64> = self
                .cat
                .points
                .iter()
                .filter(|p| p.has(&d.id))
                .map(|p| p.seq)
                .collect();
            let ddir = self.disk_dir(&d.id);
            let rd = fs::read_dir(&ddir).map_err(|e| StoreError::io("list", &ddir, e))?;
            for ent in rd.flatten() {
                let name = ent.file_name().to_string_lossy().into_owned();
                let orphan = match parse_rp_layer(&name) {
                    Some(s) => !known.contains(&s) && freezing != Some(s),
                    None => name.ends_with(".tmp"),
                };
                if orphan {
                    tracing::info!(file = %ent.path().display(), "removing leftover layer");
                    fs::remove_file(ent.path())
                        .map_err(|e| StoreError::io("remove", ent.path(), e))?;
                }
            }
            fsutil::sync_dir(&ddir)?;
        }
        let nd = self.nvram_dir();
        if let Ok(rd) = fs::read_dir(&nd) {
            for ent in rd.flatten() {
                let name = ent.file_name().to_string_lossy().into_owned();
                let seq = name
                    .strip_prefix("rp-")
                    .and_then(|n| n.strip_suffix(".fd"))
                    .and_then(|n| n.parse::<u64>().ok());
                let orphan = match seq {
                    Some(s) => !known.contains(&s) && freezing != Some(s),
                    None => name.ends_with(".tmp"),
                };
                if orphan {
                    let _ = fs::remove_file(ent.path());
                }
            }
        }
        Ok(())
    }

    /// Finishes a journaled freeze or prune and removes leftovers (called by `open`).
    fn repair(&mut self) -> Result<()> {
        match self.cat.journal.clone() {
            Some(Journal::Freeze {
                seq,
                unix_ms,
                consistency,
            }) => {
                tracing::warn!(vm = %self.cat.vm_uuid, seq, "finishing an interrupted freeze");
                if self.cat.points.iter().any(|p| p.seq == seq) {
                    self.cat.journal = None;
                    self.save()?;
                } else {
                    self.finish_freeze(seq, unix_ms, consistency)?;
                }
            }
            Some(Journal::Prune { seq }) => {
                tracing::warn!(vm = %self.cat.vm_uuid, seq, "finishing an interrupted prune");
                self.finish_prune(seq)?;
            }
            Some(Journal::Apply { seq }) => {
                // The log itself is in the spool (or gone): the host applies it again, and
                // until then the latest state is not offered as a point. The layer's qcow2
                // metadata, though, may be half written (a mapping whose cluster is not
                // counted as allocated): repaired first, or the next apply would allocate
                // that cluster a second time and corrupt the layer and every point frozen
                // from it.
                tracing::warn!(vm = %self.cat.vm_uuid, seq, "the newest layer holds part of a log whose apply did not finish; checking its metadata");
                for d in &self.cat.disks {
                    let ddir = self.disk_dir(&d.id);
                    qemu_img::repair_layer(&ddir, TOP)?;
                }
            }
            None => {}
        }
        self.remove_orphans()
    }

    // ---------------------------------------------------------------- read access, overlays

    /// The top file of `point`'s chain for every disk, `(disk_id, path)`, for `qemu-img compare`
    /// or reading. For [`PointRef::Latest`] this is the live `top.qcow2`: do not read it while a
    /// log is being applied. The chains are verified (I5) before the paths are returned.
    pub fn point_image_paths(&self, point: PointRef) -> Result<Vec<(String, PathBuf)>> {
        if point == PointRef::Latest {
            self.whole_latest()?;
        }
        let mut out = Vec::new();
        for (id, size) in self.point_disks(point)? {
            let layers = self.chain_layers_for(&id, point)?;
            let top = layers.last().cloned().unwrap_or_default();
            let ddir = self.disk_dir(&id);
            drop(chain::open_chain(&ddir, &layers, false, size)?);
            out.push((id, ddir.join(&top)));
        }
        Ok(out)
    }

    /// BLAKE3 digests of the latest state of disk `disk`, one per `block_size(size)` bytes
    /// (the last block may be short), read through the verified chain. A resynchronization
    /// compares them with the primary's disk and sends only the blocks that differ.
    pub fn block_digests(&self, disk: &str) -> Result<(u64, Vec<[u8; 32]>)> {
        let size = self.disk_size(disk)?;
        let bs = block_size(size);
        let layers = self.chain_layers_for(disk, PointRef::Latest)?;
        let ddir = self.disk_dir(disk);
        let acc = chain::open_chain(&ddir, &layers, false, size)?;
        let mut buf = vec![0u8; bs as usize];
        let mut out = Vec::with_capacity(size.div_ceil(bs) as usize);
        let mut off = 0;
        while off < size {
            let n = bs.min(size - off) as usize;
            acc.read(&mut buf[..n], off)
                .map_err(|e| StoreError::io("read", ddir.join(TOP), e))?;
            out.push(*blake3::hash(&buf[..n]).as_bytes());
            off += n as u64;
        }
        Ok((bs, out))
    }

    /// BLAKE3 digests of the latest state of disk `disk` from `offset` for `len` bytes, one
    /// per `bs` bytes (the last block may be short at the end of the disk), read through the
    /// verified chain: what a resynchronization in parts compares one range of the disk with.
    /// `offset` must be a multiple of `bs` and the range inside the disk. Stretches that read as
    /// zeros in every layer are not read (their digest is known), so a sparse disk costs
    /// little.
    pub fn range_digests(
        &self,
        disk: &str,
        offset: u64,
        len: u64,
        bs: u64,
    ) -> Result<Vec<[u8; 32]>> {
        let size = self.disk_size(disk)?;
        let bad = || StoreError::OutOfBounds {
            disk: disk.to_string(),
            offset,
            len,
            size,
        };
        if !(4096..=MAX_DIGEST_BLOCK).contains(&bs)
            || !offset.is_multiple_of(bs)
            || len.div_ceil(bs) > MAX_RANGE_DIGESTS
        {
            return Err(bad());
        }
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= size)
            .ok_or_else(bad)?;
        let layers = self.chain_layers_for(disk, PointRef::Latest)?;
        let ddir = self.disk_dir(disk);
        let acc = chain::open_chain(&ddir, &layers, false, size)?;
        // Blocks of the map's size on a whole state: what the map knows is not read, what it
        // does not know is read once and remembered.
        if bs == MAP_BLOCK && self.torn().is_none() && len > 0 {
            let map = match DigestMap::open_valid(&ddir, size, self.cat.last_applied) {
                Some(m) => Some(m),
                None => DigestMap::fresh(&ddir, size, self.cat.last_applied)
                    .map_err(|e| tracing::warn!(disk, "cannot start a digest map: {e}"))
                    .ok(),
            };
            if let Some(map) = map {
                return self.digests_through_map(&acc, &map, (disk, offset, end));
            }
        }
        let mut out = Vec::with_capacity(len.div_ceil(bs) as usize);
        read_digests(&acc, (&ddir, offset, end), bs, &mut out)?;
        Ok(out)
    }

    /// [`ReplicaVm::range_digests`] in map blocks with the disk's digest map: the blocks it
    /// does not know are read (in runs), and their digests written to it.
    fn digests_through_map(
        &self,
        acc: &SyncFormatAccess<File>,
        map: &DigestMap,
        (disk, offset, end): (&str, u64, u64),
    ) -> Result<Vec<[u8; 32]>> {
        let ddir = self.disk_dir(disk);
        let first = offset / MAP_BLOCK;
        let n = (end - offset).div_ceil(MAP_BLOCK);
        let map_err = |e: std::io::Error| StoreError::io("read", map.path(), e);
        let mut out = map.read(first, n).map_err(map_err)?;
        let mut learned = BTreeMap::new();
        let mut k = 0u64;
        while k < n {
            if out[k as usize] != crate::digest_map::UNKNOWN {
                k += 1;
                continue;
            }
            let run = k;
            while k < n && out[k as usize] == crate::digest_map::UNKNOWN {
                k += 1;
            }
            let (from, to) = (
                (first + run) * MAP_BLOCK,
                ((first + k) * MAP_BLOCK).min(end),
            );
            let mut got = Vec::with_capacity((k - run) as usize);
            read_digests(acc, (&ddir, from, to), MAP_BLOCK, &mut got)?;
            for (i, d) in got.into_iter().enumerate() {
                out[run as usize + i] = d;
                learned.insert(first + run + i as u64, d);
            }
        }
        if !learned.is_empty() {
            if let Err(e) = map.write(&learned) {
                tracing::warn!(map = %map.path().display(), "cannot remember digests: {e}; the map is dropped");
                DigestMap::remove(&ddir);
            }
        }
        tracing::debug!(
            disk,
            offset,
            blocks = n,
            read = learned.len(),
            "range digests"
        );
        Ok(out)
    }

    /// After the commit of an apply that started from sequence `before`: every disk's digest
    /// map moves to the new sequence with the digests of the blocks this apply wrote
    /// (`written`). A map that did not describe `before`, or a state that was torn when the
    /// apply began (`whole_before` false), gets a fresh map knowing only those blocks. A
    /// failure drops the map: it costs a later comparison reads, never a wrong digest.
    fn carry_digest_maps(
        &self,
        before: u64,
        whole_before: bool,
        mut written: BTreeMap<String, crate::digest_map::Pending>,
    ) {
        for d in &self.cat.disks {
            let ddir = self.disk_dir(&d.id);
            let pending = written.remove(&d.id).unwrap_or_default();
            let r = (|| -> std::io::Result<()> {
                let map = match whole_before
                    .then(|| DigestMap::open_valid(&ddir, d.size_bytes, before))
                    .flatten()
                {
                    Some(m) => m,
                    None => DigestMap::fresh(&ddir, d.size_bytes, before)?,
                };
                if !pending.blocks.is_empty() {
                    map.write(&pending.blocks)?;
                }
                map.stamp(self.cat.last_applied)
            })();
            if let Err(e) = r {
                tracing::warn!(disk = %d.id, "cannot keep the digest map: {e}; it is dropped, and a later comparison reads the disk instead");
                DigestMap::remove(&ddir);
            }
        }
    }

    /// The NVRAM of a point, if the VM has one.
    pub fn point_nvram_path(&self, point: PointRef) -> Result<Option<PathBuf>> {
        let p = match point {
            PointRef::Latest => self.nvram_dir().join(NVRAM_LATEST),
            PointRef::Frozen(seq) => {
                let e = &self.cat.points[self.point_index(seq)?];
                if !e.has_nvram {
                    return Ok(None);
                }
                self.nvram_dir().join(rp_nvram(seq))
            }
        };
        Ok(p.exists().then_some(p))
    }

    /// Creates a throwaway overlay per disk in `dest_dir` (`<disk_id>.qcow2`, backed by the point's
    /// layer by absolute path, `-F qcow2`) and a copy of the point's NVRAM (`nvram.fd`).
    ///
    /// [`PointRef::Latest`] is first frozen as a point if anything was applied since the newest
    /// frozen point, so an overlay's backing never changes under it. The returned [`Overlay`]
    /// holds a [`PointLock`]; keep it while the overlay is in use, and delete the overlay files
    /// afterwards.
    pub fn overlay_for(&mut self, point: PointRef, dest_dir: &Path) -> Result<Overlay> {
        let seq = self.frozen_for(point)?;
        let lock = self.lock_point(seq)?;
        let rp = self.resolve(PointRef::Frozen(seq))?;
        fsutil::create_private_dir_all(dest_dir)?;
        let images = self.point_image_paths(PointRef::Frozen(seq))?;
        for (id, _) in &images {
            let dest = dest_dir.join(format!("{id}.qcow2"));
            if dest.exists() {
                return Err(StoreError::DestinationExists { path: dest });
            }
        }
        let mut disks = Vec::new();
        for (id, backing) in images {
            let size = self.disk_size(&id)?;
            let dest = dest_dir.join(format!("{id}.qcow2"));
            let backing = fs::canonicalize(&backing)
                .map_err(|e| StoreError::io("resolve the absolute path of", &backing, e))?;
            qemu_img::create_qcow2(None, &dest, size, Some(&backing))?;
            disks.push((id, dest));
        }
        let nvram = match self.point_nvram_path(PointRef::Frozen(seq))? {
            Some(src) => {
                let dest = dest_dir.join("nvram.fd");
                copy_durable(&src, &dest)?;
                Some(dest)
            }
            None => None,
        };
        tracing::info!(vm = %self.cat.vm_uuid, seq, dest = %dest_dir.display(), "overlay created");
        Ok(Overlay {
            point: rp,
            disks,
            nvram,
            lock,
        })
    }

    /// The frozen point to use for `point`, freezing the latest state if needed.
    fn frozen_for(&mut self, point: PointRef) -> Result<u64> {
        match point {
            PointRef::Frozen(seq) => {
                self.point_index(seq)?;
                Ok(seq)
            }
            PointRef::Latest => {
                self.whole_latest()?;
                let last = self.cat.last_applied;
                if self.cat.points.last().map(|p| p.seq) == Some(last) {
                    Ok(last)
                } else {
                    let unix_ms = self.cat.last_applied_unix_ms;
                    let c = self.cat.last_applied_consistency;
                    self.freeze_point(last, unix_ms, c)?;
                    Ok(last)
                }
            }
        }
    }

    /// Writes standalone qcow2 images (no backing file) of `point` into `dest_dir`
    /// (`<disk_id>.qcow2`, `qemu-img convert` of the verified chain) plus `nvram.fd`.
    pub fn flatten_point(&self, point: PointRef, dest_dir: &Path) -> Result<Flattened> {
        let rp = self.resolve(point)?;
        fsutil::create_private_dir_all(dest_dir)?;
        let images = self.point_image_paths(point)?;
        let mut disks = Vec::new();
        for (id, src) in images {
            let dest = dest_dir.join(format!("{id}.qcow2"));
            if dest.exists() {
                return Err(StoreError::DestinationExists { path: dest });
            }
            convert_standalone(&src, &dest)?;
            disks.push((id, dest));
        }
        let nvram = match self.point_nvram_path(point)? {
            Some(src) => {
                let dest = dest_dir.join("nvram.fd");
                copy_durable(&src, &dest)?;
                Some(dest)
            }
            None => None,
        };
        Ok(Flattened {
            point: rp,
            disks,
            nvram,
        })
    }
}

/// Applied logs from this size on are released on a helper thread (see [`drop_applied_log`]).
const RELEASE_IN_BACKGROUND_FROM: u64 = 16 << 20;

/// Appends the BLAKE3 digest of every `bs`-byte block of `[offset, end)` of the chain `acc`
/// to `out` (the last block may be short), reading in windows of whole blocks; a window that
/// maps to zeros in every layer is not read (its digest is known).
fn read_digests(
    acc: &SyncFormatAccess<File>,
    (ddir, offset, end): (&Path, u64, u64),
    bs: u64,
    out: &mut Vec<[u8; 32]>,
) -> Result<()> {
    let window = (DIGEST_WINDOW / bs).max(1) * bs;
    let zero_block = *blake3::hash(&vec![0u8; bs as usize]).as_bytes();
    let mut buf = vec![0u8; window.min(end - offset) as usize];
    let mut at = offset;
    while at < end {
        let n = window.min(end - at);
        let zeros = matches!(
            acc.get_mapping_sync(at, n),
            Ok((imago::Mapping::Zero { .. }, l)) if l >= n
        );
        if !zeros {
            acc.read(&mut buf[..n as usize], at)
                .map_err(|e| StoreError::io("read", ddir.join(TOP), e))?;
        }
        for block in buf[..n as usize].chunks(bs as usize) {
            out.push(if zeros && block.len() as u64 == bs {
                zero_block
            } else if zeros {
                *blake3::hash(&vec![0u8; block.len()]).as_bytes()
            } else {
                *blake3::hash(block).as_bytes()
            });
        }
        at += n;
    }
    Ok(())
}

/// Removes the applied log `path` from the spool. The unlink is quick, but a large file's
/// blocks and page cache are freed only when its last descriptor closes, and that costs about
/// 0.2 s per GiB on the development machine: the apply's reader would pay it when it closes the
/// log, after the commit, and the replica would record the apply that much later (and hold the
/// VM's lock that much longer). So from `background_from` bytes on, a helper thread holding
/// its own descriptor truncates the unlinked file: whoever closes last finds it empty. Returns
/// that thread, if any (for the tests).
fn drop_applied_log(path: &Path, background_from: u64) -> Option<std::thread::JoinHandle<()>> {
    let held = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .ok()
        .filter(|f| f.metadata().is_ok_and(|m| m.len() >= background_from));
    let _ = fs::remove_file(path);
    let f = held?;
    std::thread::Builder::new()
        .name("vmrepl-drop-log".into())
        .spawn(move || {
            let _ = f.set_len(0);
        })
        .ok()
}

/// Applying one log into the top layer. Dropping it without [`ApplyTxn::commit`] is an abort:
/// the writes made so far stay in the top layer but the log is not recorded as applied, so the
/// same log must be applied again (its writes are the same, so the result is right).
pub struct ApplyTxn<'a> {
    vm: &'a mut ReplicaVm,
    seq: u64,
    open: BTreeMap<String, SyncFormatAccess<File>>,
    /// Per written disk: its top layer's write-back, started early (see [`EarlyWriteback`]).
    writeback: BTreeMap<String, crate::EarlyWriteback>,
    nvram: Option<Vec<u8>>,
    bytes: u64,
    /// Time spent in the layers' writes (for the per-phase timing logged at commit).
    write_time: std::time::Duration,
    /// Write the top layers with direct I/O ([`ApplyTxn::bulk`]).
    direct: bool,
    /// Per written disk: the digests of the blocks written, for its digest map.
    digests: BTreeMap<String, crate::digest_map::Pending>,
    /// Whether the latest state was whole when the apply began: only then may the digest
    /// maps be carried on (a torn state may differ from what they say anywhere).
    whole_before: bool,
    /// A large apply's data writes, on a helper thread ([`crate::bulk_write`]).
    bulk: Option<Box<crate::bulk_write::BulkWriter>>,
    /// Per written disk: its top layer opened for direct writes (`None`: the file system
    /// refuses direct I/O, so imago writes it).
    direct_files: BTreeMap<String, Option<Arc<fs::File>>>,
    /// The disks this log carries (its header lists them): a pending disk among them joins
    /// the points at the commit.
    carried: std::collections::BTreeSet<String>,
}

/// The cluster size of the layers the store creates (`qemu-img create`'s default): a write of
/// whole clusters maps to whole clusters of the top layer.
const LAYER_CLUSTER: u64 = 64 << 10;

/// From this many bytes of log on, an apply writes with direct I/O ([`ApplyTxn::bulk`]).
pub const BULK_APPLY_BYTES: u64 = 256 << 20;

impl ApplyTxn<'_> {
    /// Marks a large apply (a log of at least [`BULK_APPLY_BYTES`], such as an initial copy):
    /// the top layers are written with direct I/O, past the page cache. On this kind of host
    /// copying gigabytes into the page cache costs more CPU than the rest of the apply, and the
    /// data is not read back soon; small applies stay buffered (one fsync at the commit).
    /// Call before the first write.
    pub fn bulk(&mut self, log_bytes: u64) {
        self.direct = log_bytes >= BULK_APPLY_BYTES;
    }

    /// The log sequence being applied.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Says that this log carries disk `disk` (its header lists it), even if it writes
    /// nothing to it: a pending disk (see [`ReplicaVm::add_disk`]) joins the points when this
    /// log commits, its initial copy being in it.
    pub fn carries(&mut self, disk: &str) -> Result<()> {
        validate_disk_id(disk)?;
        self.vm.disk_size(disk)?;
        self.carried.insert(disk.to_string());
        Ok(())
    }

    /// Checks a write's bounds; returns the disk's size.
    fn check(&self, disk: &str, offset: u64, len: u64) -> Result<u64> {
        validate_disk_id(disk)?;
        let size = self.vm.disk_size(disk)?;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(size),
            _ => Err(StoreError::OutOfBounds {
                disk: disk.to_string(),
                offset,
                len,
                size,
            }),
        }
    }

    fn access(&mut self, disk: &str) -> Result<&SyncFormatAccess<File>> {
        if !self.open.contains_key(disk) {
            let size = self.vm.disk_size(disk)?;
            let layers = self.vm.chain_layers_for(disk, PointRef::Latest)?;
            let acc = chain::open_chain_with(
                &self.vm.disk_dir(disk),
                &layers,
                (true, self.direct),
                size,
            )?;
            // Before the first write: the top layer may be torn from here until the commit.
            if self.vm.torn() != Some(self.seq) {
                self.vm.cat.journal = Some(Journal::Apply { seq: self.seq });
                self.vm.save()?;
            }
            self.open.insert(disk.to_string(), acc);
            self.carried.insert(disk.to_string());
        }
        Ok(&self.open[disk])
    }

    fn map_write_err(&self, disk: &str, needed: u64, e: std::io::Error) -> StoreError {
        let path = self.vm.disk_dir(disk).join(TOP);
        if fsutil::is_no_space(&e) {
            StoreError::DiskFull {
                free: fsutil::free_bytes(&path).unwrap_or(0),
                path,
                needed,
            }
        } else {
            StoreError::Image {
                action: "write",
                path,
                source: e,
            }
        }
    }

    /// The top layer of `disk` opened for direct writes, once per apply; `None` when the file
    /// system refuses direct I/O.
    fn direct_file(&mut self, disk: &str) -> std::io::Result<Option<Arc<fs::File>>> {
        if let Some(f) = self.direct_files.get(disk) {
            return Ok(f.clone());
        }
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.vm.disk_dir(disk).join(TOP);
        let f = match fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(&path)
        {
            Ok(f) => Some(Arc::new(f)),
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => None,
            Err(e) => return Err(e),
        };
        self.direct_files.insert(disk.to_string(), f.clone());
        Ok(f)
    }

    /// A large apply's write of whole clusters: the clusters are mapped here (imago keeps the
    /// qcow2 metadata) and the data is queued for the writer thread. False when it does not
    /// apply (not a large apply, not whole clusters, no direct I/O); imago writes it then.
    /// The disk's layers are open already ([`ApplyTxn::access`]).
    fn write_beside(&mut self, disk: &str, offset: u64, data: &[u8]) -> std::io::Result<bool> {
        let len = data.len() as u64;
        if !Self::beside_fits(self.direct, offset, len) || !self.open.contains_key(disk) {
            return Ok(false);
        }
        let Some(file) = self.direct_file(disk)? else {
            return Ok(false);
        };
        if self.bulk.is_none() {
            self.bulk = Some(Box::new(crate::bulk_write::BulkWriter::new()?));
        }
        let (acc, bulk) = (&self.open[disk], self.bulk.as_mut().expect("set above"));
        let mut done = 0u64;
        while done < len {
            let (_, at, n) = acc.ensure_data_mapping(offset + done, len - done, true)?;
            let n = n.min(len - done);
            if n == 0 {
                return Err(std::io::Error::other("imago mapped no bytes"));
            }
            let piece = &data[done as usize..(done + n) as usize];
            if !crate::bulk_write::BulkWriter::fits(at, piece) {
                // Not expected for whole clusters; imago writes the rest.
                bulk.drain()?;
                acc.write(&data[done as usize..], offset + done)?;
                return Ok(true);
            }
            bulk.submit(&file, at, piece)?;
            done += n;
        }
        Ok(true)
    }

    /// Whether a write of `len` bytes at `offset` goes to the writer thread: a large apply's
    /// whole clusters, at most one buffer.
    fn beside_fits(direct: bool, offset: u64, len: u64) -> bool {
        direct
            && offset.is_multiple_of(LAYER_CLUSTER)
            && len.is_multiple_of(LAYER_CLUSTER)
            && len <= crate::bulk_write::BUF as u64
    }

    /// Writes `data` at `offset` of disk `disk` (bounds-checked before anything is written).
    pub fn write(&mut self, disk: &str, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let size = self.check(disk, offset, len)?;
        if data.is_empty() {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        if Self::beside_fits(self.direct, offset, len) {
            self.access(disk)?;
        }
        let beside = match self.write_beside(disk, offset, data) {
            Ok(b) => b,
            Err(e) => return Err(self.map_write_err(disk, len, e)),
        };
        if beside {
            self.write_time += t0.elapsed();
            self.bytes += len;
            self.digests
                .entry(disk.to_string())
                .or_default()
                .wrote(size, offset, data);
            return Ok(());
        }
        // An imago write must not race a queued write of the same layer.
        if let Some(b) = self.bulk.as_mut() {
            let r = b.drain();
            r.map_err(|e| self.map_write_err(disk, len, e))?;
        }
        let r = self.access(disk)?.write(data, offset);
        self.write_time += t0.elapsed();
        r.map_err(|e| self.map_write_err(disk, len, e))?;
        self.bytes += len;
        if !self.writeback.contains_key(disk) {
            let top = self.vm.disk_dir(disk).join(TOP);
            self.writeback
                .insert(disk.to_string(), crate::EarlyWriteback::new(&top));
        }
        if let Some(wb) = self.writeback.get_mut(disk) {
            wb.wrote(len);
        }
        self.digests
            .entry(disk.to_string())
            .or_default()
            .wrote(size, offset, data);
        Ok(())
    }

    /// Writes an explicit zero range: the clusters become zero clusters in the top layer and
    /// shadow any older data below them.
    pub fn write_zeroes(&mut self, disk: &str, offset: u64, len: u64) -> Result<()> {
        let size = self.check(disk, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let r = self.access(disk)?.write_zeroes(offset, len);
        r.map_err(|e| self.map_write_err(disk, len, e))?;
        self.digests
            .entry(disk.to_string())
            .or_default()
            .zeroed(size, offset, len);
        Ok(())
    }

    /// Sets the VM's NVRAM (UEFI variable store) as of this log. Written at commit.
    pub fn set_nvram(&mut self, bytes: &[u8]) {
        self.nvram = Some(bytes.to_vec());
    }

    /// Makes the log durable as applied: flush and fsync every written layer, write the NVRAM,
    /// then record `seq` atomically in `state.json`, and drop the spooled log file. The latest
    /// state becomes the whole point `point_unix_ms` (a resynchronization in parts ends here).
    pub fn commit(self, point_unix_ms: i64, consistency: Consistency) -> Result<()> {
        self.finish(Some((point_unix_ms, consistency)))
    }

    /// [`ApplyTxn::commit`] for one part of a resynchronization in parts
    /// ([`vmrepl_log::LogKind::ResyncPart`]): durable the same way, but the latest state stays
    /// incomplete ([`ReplicaVm::resyncing`]) until a log that is not a part commits.
    pub fn commit_part(self) -> Result<()> {
        self.finish(None)
    }

    fn finish(mut self, point: Option<(i64, Consistency)>) -> Result<()> {
        let t0 = std::time::Instant::now();
        if let Some(mut b) = self.bulk.take() {
            if let Err(e) = b.drain() {
                let disk = self.direct_files.keys().next().cloned().unwrap_or_default();
                return Err(self.map_write_err(&disk, 0, e));
            }
        }
        for (disk, wb) in self.writeback.iter_mut() {
            let path = self.vm.disk_dir(disk).join(TOP);
            wb.finish().map_err(|e| fsutil::write_error(&path, 0, e))?;
        }
        for (disk, acc) in std::mem::take(&mut self.open) {
            let path = self.vm.disk_dir(&disk).join(TOP);
            acc.flush()
                .and_then(|()| acc.sync())
                .map_err(|e| fsutil::write_error(&path, 0, e))?;
        }
        let sync_ms = t0.elapsed().as_millis() as u64;
        if let Some(nv) = self.nvram.take() {
            let p = self.vm.nvram_dir().join(NVRAM_LATEST);
            fsutil::write_atomic(&p, &nv)?;
        }
        let seq = self.seq;
        let vm = &mut *self.vm;
        let before = vm.cat.last_applied;
        vm.cat.last_applied = seq;
        for d in vm.cat.disks.iter_mut() {
            if d.pending && self.carried.contains(&d.id) {
                d.pending = false;
                tracing::info!(vm = %vm.cat.vm_uuid, disk = %d.id, seq, "disk joins the replica's points with this log");
            }
        }
        if matches!(vm.cat.journal, Some(Journal::Apply { .. })) {
            vm.cat.journal = None;
        }
        match point {
            Some((point_unix_ms, consistency)) => {
                vm.cat.last_applied_unix_ms = point_unix_ms;
                vm.cat.last_applied_consistency = consistency;
                vm.cat.resync_since = None;
            }
            None => {
                vm.cat.resync_since.get_or_insert(before);
            }
        }
        if let Err(e) = vm.save() {
            // Keep memory equal to disk: reload what is durable.
            if let Ok(c) = Catalog::load(&vm.state_path()) {
                vm.cat = c;
            }
            return Err(e);
        }
        let t_maps = std::time::Instant::now();
        vm.carry_digest_maps(before, self.whole_before, std::mem::take(&mut self.digests));
        let maps_ms = t_maps.elapsed().as_millis() as u64;
        let t1 = std::time::Instant::now();
        drop_applied_log(&vm.store_log_path(seq), RELEASE_IN_BACKGROUND_FROM);
        // write_ms: in the layers' writes (the rest of an apply is reading the log);
        // sync_ms: making the layers durable; maps_ms: carrying the digest maps on;
        // drop_ms: removing the applied log.
        tracing::info!(vm = %vm.cat.vm_uuid, seq, bytes = self.bytes, part = point.is_none(),
            write_ms = self.write_time.as_millis() as u64, sync_ms, maps_ms,
            drop_ms = t1.elapsed().as_millis() as u64, "log applied");
        Ok(())
    }

    /// Abandons the log: nothing is recorded. Writes already made stay in the top layer (the
    /// in-progress layer) and are overwritten when the same log is applied again.
    pub fn abort(self) {
        tracing::warn!(vm = %self.vm.cat.vm_uuid, seq = self.seq, "apply aborted; the log must be applied again");
        drop(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_applied_log_leaves_the_spool_at_once_and_a_large_one_is_emptied_on_a_helper_thread() {
        let t = tempfile::tempdir().unwrap();
        let small = t.path().join("small.log");
        fs::write(&small, [1u8; 100]).unwrap();
        assert!(
            drop_applied_log(&small, 4096).is_none(),
            "small logs are just removed"
        );
        assert!(!small.exists());
        // A large one, still open in the apply's reader: gone from the folder at once, its
        // content freed by the helper, so the reader's close frees nothing.
        let large = t.path().join("large.log");
        fs::write(&large, vec![2u8; 1 << 20]).unwrap();
        let reader = fs::File::open(&large).unwrap();
        let helper = drop_applied_log(&large, 4096).expect("a helper thread");
        assert!(!large.exists());
        helper.join().unwrap();
        assert_eq!(reader.metadata().unwrap().len(), 0);
        // A log that is not there (removed already) is no error.
        assert!(drop_applied_log(&large, 0).is_none());
    }

    fn vm_with_data(root: &Path) -> ReplicaVm {
        let mut vm = ReplicaStore::create(
            root,
            Uuid::new_v4(),
            &serde_json::json!({}),
            &[("a", 4 << 20), ("b", 4 << 20)],
        )
        .unwrap();
        for seq in 1..=2u64 {
            let Begin::Apply(mut t) = vm.begin_apply(seq, seq - 1).unwrap() else {
                panic!()
            };
            t.write("a", seq * 65536, &[seq as u8; 70000]).unwrap();
            t.write_zeroes("b", 0, 65536 * seq).unwrap();
            t.write("b", 1 << 20, &[seq as u8 + 7; 4096]).unwrap();
            t.commit(seq as i64, Consistency::Crash).unwrap();
            vm.freeze_point(seq, seq as i64, Consistency::Crash)
                .unwrap();
        }
        let Begin::Apply(mut t) = vm.begin_apply(3, 2).unwrap() else {
            panic!()
        };
        t.write("a", 0, &[3; 512]).unwrap();
        t.commit(3, Consistency::Crash).unwrap();
        vm
    }

    /// Rewrites `root`'s only replica catalog in the version-1 layout (every point has every
    /// disk), checksummed as version 1 wrote it.
    fn write_v1_catalog(vm: &ReplicaVm) {
        use crate::catalog::v1;
        let c = &vm.cat;
        let mut old = v1::Catalog {
            version: 1,
            vm_uuid: c.vm_uuid,
            disks: c
                .disks
                .iter()
                .map(|d| v1::DiskEntry {
                    id: d.id.clone(),
                    size_bytes: d.size_bytes,
                })
                .collect(),
            last_applied: c.last_applied,
            last_applied_unix_ms: c.last_applied_unix_ms,
            last_applied_consistency: c.last_applied_consistency,
            points: c
                .points
                .iter()
                .map(|p| v1::PointEntry {
                    seq: p.seq,
                    unix_ms: p.unix_ms,
                    consistency: p.consistency,
                    layer: p.layer.clone(),
                    has_nvram: p.has_nvram,
                })
                .collect(),
            journal: c.journal.clone(),
            resync_since: c.resync_since,
            checksum: String::new(),
        };
        old.checksum = blake3::hash(&serde_json::to_vec(&old).unwrap())
            .to_hex()
            .to_string();
        fsutil::write_atomic(&vm.state_path(), &serde_json::to_vec_pretty(&old).unwrap()).unwrap();
    }

    #[test]
    fn a_version_1_catalog_opens_with_every_disk_in_every_point_and_is_written_back_as_version_2() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("s");
        let vm = vm_with_data(&root);
        let uuid = vm.vm_uuid();
        let before: Vec<_> = [PointRef::Frozen(1), PointRef::Frozen(2), PointRef::Latest]
            .into_iter()
            .map(|p| vm.block_digests("a").map(|_| p))
            .collect::<Result<_>>()
            .unwrap();
        let flat = tmp.path().join("before");
        vm.flatten_point(PointRef::Frozen(1), &flat).unwrap();
        write_v1_catalog(&vm);
        let state = vm.state_path();
        drop(vm);
        let text = std::fs::read_to_string(&state).unwrap();
        assert!(text.contains("\"version\": 1") && !text.contains("\"disks\": [\n        \"a\""));

        let vm = ReplicaStore::open(&root, uuid).unwrap();
        for p in before {
            let disks: Vec<String> = vm
                .point_disks(p)
                .unwrap()
                .into_iter()
                .map(|d| d.0)
                .collect();
            assert_eq!(disks, ["a", "b"], "{p:?}");
        }
        assert!(vm.pending_disks().is_empty());
        let flat2 = tmp.path().join("after");
        vm.flatten_point(PointRef::Frozen(1), &flat2).unwrap();
        for d in ["a", "b"] {
            assert!(same(
                &flat.join(format!("{d}.qcow2")),
                &flat2.join(format!("{d}.qcow2"))
            ));
        }
        drop(vm);
        // Written back in the current version, checksummed; it opens again as it is.
        let (cat, found) = Catalog::load_versioned(&state).unwrap();
        assert_eq!((found, cat.version), (CATALOG_VERSION, 2));
        assert!(cat.points.iter().all(|p| p.disks == ["a", "b"]));
        ReplicaStore::open(&root, uuid).unwrap();

        // A version-1 catalog whose checksum does not match is refused, not migrated.
        let vm = ReplicaStore::open(&root, uuid).unwrap();
        write_v1_catalog(&vm);
        drop(vm);
        let text = std::fs::read_to_string(&state).unwrap();
        std::fs::write(
            &state,
            text.replace("\"last_applied\": 3", "\"last_applied\": 9"),
        )
        .unwrap();
        let e = ReplicaStore::open(&root, uuid).unwrap_err();
        assert!(matches!(e, StoreError::CatalogCorrupt { .. }), "{e}");
        // And a version from the future is refused by name.
        std::fs::write(&state, br#"{"version": 3}"#).unwrap();
        let e = ReplicaStore::open(&root, uuid).unwrap_err();
        assert!(e.to_string().contains("versions 1 to 2"), "{e}");
    }

    #[test]
    fn a_resynchronization_in_parts_hides_the_latest_state_until_a_whole_log_ends_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("s");
        let mut vm = vm_with_data(&root);
        let uuid = vm.vm_uuid();
        let before: Vec<u64> = vm.points().iter().map(|p| p.seq).collect();
        assert_eq!(
            before,
            vec![1, 2, 3],
            "two frozen points and the latest state"
        );
        // Two parts: each durable, neither a point.
        for seq in 4..=5u64 {
            let Begin::Apply(mut t) = vm.begin_apply(seq, seq - 1).unwrap() else {
                panic!()
            };
            t.write("a", (seq - 4) * (2 << 20), &[seq as u8; 65536])
                .unwrap();
            t.commit_part().unwrap();
            assert_eq!(vm.resyncing(), Some(3), "since the last whole state");
            assert_eq!(vm.last_applied(), seq);
            let seqs: Vec<u64> = vm.points().iter().map(|p| p.seq).collect();
            assert_eq!(seqs, vec![1, 2], "only the frozen points are offered");
        }
        // It survives a reopen, and nothing may treat the mixed state as a point.
        let mut vm = ReplicaStore::open(&root, uuid).unwrap();
        assert_eq!(vm.resyncing(), Some(3));
        assert!(matches!(
            vm.freeze_point(5, 5, Consistency::Crash),
            Err(StoreError::ResyncInProgress { since: 3, seq: 5 })
        ));
        assert!(matches!(
            vm.overlay_for(PointRef::Latest, &tmp.path().join("o")),
            Err(StoreError::ResyncInProgress { .. })
        ));
        // The digests of a range see the parts applied so far.
        let d = vm.range_digests("a", 0, 4 << 20, 65536).unwrap();
        assert_eq!(d.len(), 64);
        assert_eq!(d[0], *blake3::hash(&[4u8; 65536]).as_bytes());
        assert_eq!(d[32], *blake3::hash(&[5u8; 65536]).as_bytes());
        let zero = *blake3::hash(&[0u8; 65536]).as_bytes();
        assert_eq!(d[63], zero, "never written: zeros, not read");
        // A log that is not a part ends it: the latest state is a point again.
        let Begin::Apply(t) = vm.begin_apply(6, 5).unwrap() else {
            panic!()
        };
        t.commit(6, Consistency::Crash).unwrap();
        assert_eq!(vm.resyncing(), None);
        let seqs: Vec<u64> = vm.points().iter().map(|p| p.seq).collect();
        assert_eq!(seqs, vec![1, 2, 6]);
        vm.freeze_point(6, 6, Consistency::Crash).unwrap();
    }

    #[test]
    fn range_digests_refuse_ranges_outside_the_disk_and_misaligned_starts() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = vm_with_data(&tmp.path().join("s"));
        for (off, len, bs) in [
            (0, (4 << 20) + 1, 65536),
            (4096, 65536, 65536),
            (0, 65536, 1),
            (0, 65536, MAX_DIGEST_BLOCK * 2),
            (u64::MAX - 10, 20, 65536),
        ] {
            assert!(
                matches!(
                    vm.range_digests("a", off, len, bs),
                    Err(StoreError::OutOfBounds { .. })
                ),
                "{off} {len} {bs}"
            );
        }
        assert!(vm.range_digests("zz", 0, 65536, 65536).is_err());
        // At most 65536 digests per answer, whoever asks.
        let big = ReplicaStore::create(
            &tmp.path().join("big"),
            Uuid::new_v4(),
            &serde_json::json!({}),
            &[("a", 512 << 20)],
        )
        .unwrap();
        let d = big
            .range_digests("a", 0, MAX_RANGE_DIGESTS * 4096, 4096)
            .unwrap();
        assert_eq!(d.len() as u64, MAX_RANGE_DIGESTS);
        assert!(matches!(
            big.range_digests("a", 0, (MAX_RANGE_DIGESTS + 1) * 4096, 4096),
            Err(StoreError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn an_apply_that_stops_half_way_exposes_only_whole_points_until_the_log_is_applied_again() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("s");
        let mut vm = vm_with_data(&root);
        vm.freeze_point(3, 3, Consistency::Crash).unwrap();
        let whole = tmp.path().join("whole");
        vm.flatten_point(PointRef::Frozen(3), &whole).unwrap();
        // Log 4 writes part of its data, then fails (a full disk, an I/O error, a crash).
        let Begin::Apply(mut t) = vm.begin_apply(4, 3).unwrap() else {
            panic!()
        };
        t.write("a", 0, &[4; 65536]).unwrap();
        t.abort();
        assert_eq!(vm.torn(), Some(4));
        assert_eq!(vm.last_applied(), 3);
        // The torn latest state is no point: not listed, not frozen, not overlaid, not read.
        let pts = vm.points();
        assert!(pts.iter().all(|p| p.kind == PointKind::Frozen), "{pts:?}");
        let dest = tmp.path().join("ov");
        for e in [
            vm.overlay_for(PointRef::Latest, &dest).err().unwrap(),
            vm.freeze_point(3, 3, Consistency::Crash).err().unwrap(),
            vm.point_image_paths(PointRef::Latest).err().unwrap(),
        ] {
            assert!(matches!(e, StoreError::TornLatest { seq: 4 }), "{e}");
            assert!(e.to_string().contains("older recovery point"), "{e}");
        }
        // Every frozen point stays usable, and whole.
        let ov = vm.overlay_for(PointRef::Frozen(3), &dest).unwrap();
        assert!(same(&ov.disks[0].1, &whole.join("a.qcow2")));
        drop(ov);
        // The state survives a restart, and applying the log again makes the latest whole.
        drop(vm);
        let mut vm = ReplicaStore::open(&root, vm_uuid_of(&root)).unwrap();
        assert_eq!(vm.torn(), Some(4));
        let Begin::Apply(mut t) = vm.begin_apply(4, 3).unwrap() else {
            panic!()
        };
        t.write("a", 0, &[4; 65536]).unwrap();
        t.write("b", 0, &[5; 512]).unwrap();
        t.commit(4, Consistency::Crash).unwrap();
        assert_eq!(vm.torn(), None);
        assert_eq!(vm.points().last().unwrap().kind, PointKind::Latest);
        assert_eq!(vm.points().last().unwrap().seq, 4);
    }

    #[test]
    fn the_digest_map_answers_as_reading_would_and_is_not_trusted_after_a_torn_apply_or_a_lost_stamp(
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("s");
        let mut vm = vm_with_data(&root);
        let size = 4u64 << 20;
        let ddir = vm.disk_dir("a");
        // The applies kept the map: log 2 wrote block 2 of disk a whole, block 3 in part.
        let map = DigestMap::open_valid(&ddir, size, 3).expect("a map for log 3");
        let known = map.read(0, 64).unwrap();
        assert_ne!(known[2], crate::digest_map::UNKNOWN);
        assert_eq!(known[3], crate::digest_map::UNKNOWN);
        drop(map);
        let with_map = vm.range_digests("a", 0, size, MAP_BLOCK).unwrap();
        // The same answer by reading every block.
        let read_all = |vm: &ReplicaVm| {
            let acc = chain::open_chain(
                &ddir,
                &vm.chain_layers_for("a", PointRef::Latest).unwrap(),
                false,
                size,
            )
            .unwrap();
            let mut out = Vec::new();
            read_digests(&acc, (&ddir, 0, size), MAP_BLOCK, &mut out).unwrap();
            out
        };
        assert_eq!(with_map, read_all(&vm));
        // Once asked, the map knows every block; it is what answers (a planted digest shows).
        let map = DigestMap::open_valid(&ddir, size, 3).unwrap();
        assert!(map
            .read(0, 64)
            .unwrap()
            .iter()
            .all(|d| *d != crate::digest_map::UNKNOWN));
        let planted: BTreeMap<u64, [u8; 32]> = [(5, [9u8; 32])].into();
        map.write(&planted).unwrap();
        drop(map);
        assert_eq!(
            vm.range_digests("a", 0, size, MAP_BLOCK).unwrap()[5],
            [9u8; 32]
        );
        // A torn apply: the map is not used while the state is torn, nor carried on after.
        let Begin::Apply(mut t) = vm.begin_apply(4, 3).unwrap() else {
            panic!()
        };
        t.write("a", 5 * MAP_BLOCK, &[4; 100]).unwrap();
        t.abort();
        assert_eq!(
            vm.range_digests("a", 0, size, MAP_BLOCK).unwrap(),
            read_all(&vm)
        );
        let Begin::Apply(mut t) = vm.begin_apply(4, 3).unwrap() else {
            panic!()
        };
        t.write("a", 5 * MAP_BLOCK, &[4; 100]).unwrap();
        t.write("a", 8 * MAP_BLOCK, &[4; MAP_BLOCK as usize])
            .unwrap();
        t.commit(4, Consistency::Crash).unwrap();
        let map = DigestMap::open_valid(&ddir, size, 4).expect("a fresh map for log 4");
        let fresh = map.read(0, 64).unwrap();
        drop(map);
        assert_eq!(
            fresh
                .iter()
                .filter(|d| **d != crate::digest_map::UNKNOWN)
                .count(),
            1
        );
        assert_eq!(fresh[8], *blake3::hash(&[4; MAP_BLOCK as usize]).as_bytes());
        assert_eq!(
            vm.range_digests("a", 0, size, MAP_BLOCK).unwrap(),
            read_all(&vm)
        );
        // A map stamped for the log before (a crash between the commit and the stamp) is not
        // used, and is replaced.
        let stale = DigestMap::fresh(&ddir, size, 3).unwrap();
        stale.write(&planted).unwrap();
        drop(stale);
        assert_eq!(
            vm.range_digests("a", 0, size, MAP_BLOCK).unwrap(),
            read_all(&vm)
        );
        assert!(DigestMap::open_valid(&ddir, size, 4).is_some());
        // Other block sizes are read as before.
        let small = vm.range_digests("a", 0, 1 << 20, 4096).unwrap();
        assert_eq!(small.len(), 256);
    }

    #[test]
    fn a_grown_disk_reads_its_old_blocks_through_smaller_layers_and_zeros_past_them() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("s");
        let mut vm = vm_with_data(&root); // disk a: 4 MiB, log 1 wrote [1; 70000] at 64 KiB
        vm.freeze_point(3, 3, Consistency::Crash).unwrap();
        vm.grow_disk("a", 8 << 20).unwrap();
        assert_eq!(vm.disk_size("a").unwrap(), 8 << 20);
        let Begin::Apply(mut t) = vm.begin_apply(4, 3).unwrap() else {
            panic!()
        };
        t.write("a", 6 << 20, &[9; 4096]).unwrap();
        t.commit(4, Consistency::Crash).unwrap();
        let ddir = vm.disk_dir("a");
        let acc = chain::open_chain(
            &ddir,
            &vm.chain_layers_for("a", PointRef::Latest).unwrap(),
            false,
            8 << 20,
        )
        .unwrap();
        let mut b = vec![0u8; 4096];
        acc.read(&mut b, 65536).unwrap();
        assert_eq!(b[0], 1, "an old block through the smaller layers");
        acc.read(&mut b, 5 << 20).unwrap();
        assert!(b.iter().all(|x| *x == 0), "past the old end: zeros");
        acc.read(&mut b, 6 << 20).unwrap();
        assert_eq!(b[0], 9, "the new block");
        // The old point is still whole at its old size, and the store reopens.
        assert!(vm.point_image_paths(PointRef::Frozen(3)).is_ok());
        drop(vm);
        let vm = ReplicaStore::open(&root, vm_uuid_of(&root)).unwrap();
        assert_eq!(vm.disk_size("a").unwrap(), 8 << 20);
        assert!(vm.grow_disk_check("a", 4 << 20).is_err(), "never shrinks");
    }

    fn vm_uuid_of(root: &Path) -> Uuid {
        let dir = fs::read_dir(root).unwrap().next().unwrap().unwrap();
        dir.file_name().to_str().unwrap().parse().unwrap()
    }

    fn same(a: &Path, b: &Path) -> bool {
        let args = [
            "compare".as_ref(),
            "-q".as_ref(),
            a.as_os_str(),
            b.as_os_str(),
        ];
        qemu_img::run(None, args.map(std::ffi::OsStr::to_os_string)).is_ok()
    }

    #[test]
    fn interrupted_freeze_is_rolled_forward_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        let mut vm = vm_with_data(tmp.path());
        let before = vm
            .flatten_point(PointRef::Latest, &tmp.path().join("ref"))
            .unwrap();
        vm.cat.journal = Some(Journal::Freeze {
            seq: 3,
            unix_ms: 3,
            consistency: Consistency::Crash,
        });
        vm.save().unwrap();
        // Crash after only disk a's top was renamed.
        let a = vm.disk_dir("a");
        fs::rename(a.join(TOP), a.join(rp_layer(3))).unwrap();
        let uuid = vm.vm_uuid();
        drop(vm);
        let vm = ReplicaStore::open(tmp.path(), uuid).unwrap();
        assert!(vm.cat.journal.is_none());
        assert_eq!(
            vm.points().iter().map(|p| p.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 3]
        );
        for (d, p) in vm.point_image_paths(PointRef::Frozen(3)).unwrap() {
            let r = &before.disks.iter().find(|(id, _)| *id == d).unwrap().1;
            assert!(same(&p, r), "disk {d}");
        }
    }

    #[test]
    fn a_point_larger_than_the_base_becomes_the_base_and_a_cut_merge_rolls_forward() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let mut vm = vm_with_data(tmp.path());
        let ref2 = vm
            .flatten_point(PointRef::Frozen(2), &tmp.path().join("r2"))
            .unwrap();
        let refl = vm
            .flatten_point(PointRef::Latest, &tmp.path().join("rl"))
            .unwrap();
        let a = vm.disk_dir("a");
        let b = vm.disk_dir("b");
        // The base is empty and point 1 holds the data: the merge renames instead of copying.
        assert!(becomes_base(&a, "rp-1.qcow2").unwrap());
        let layer_inode = |d: &Path| fs::metadata(d.join("rp-1.qcow2")).unwrap().ino();
        let (ino_a, ino_b) = (layer_inode(&a), layer_inode(&b));
        vm.cat.journal = Some(Journal::Prune { seq: 1 });
        vm.save().unwrap();
        // Cut after disk a's layer took the base's name, before the layer above was rebased
        // and before disk b was touched.
        make_base(&a, "rp-1.qcow2").unwrap();
        assert_eq!(fs::metadata(a.join(BASE)).unwrap().ino(), ino_a);
        let uuid = vm.vm_uuid();
        drop(vm);
        let vm = ReplicaStore::open(tmp.path(), uuid).unwrap();
        assert_eq!(
            vm.points().iter().map(|p| p.seq).collect::<Vec<_>>(),
            vec![2, 3]
        );
        for (point, r) in [(PointRef::Frozen(2), &ref2), (PointRef::Latest, &refl)] {
            for (d, p) in vm.point_image_paths(point).unwrap() {
                let want = &r.disks.iter().find(|(id, _)| *id == d).unwrap().1;
                assert!(same(&p, want), "disk {d} of {point:?}");
            }
        }
        for (dir, ino) in [(&a, ino_a), (&b, ino_b)] {
            assert!(!dir.join("rp-1.qcow2").exists());
            assert_eq!(fs::metadata(dir.join(BASE)).unwrap().ino(), ino);
            assert_eq!(chain::header_backing(&dir.join(BASE)).unwrap(), None);
        }
    }

    #[test]
    fn interrupted_prune_is_rolled_forward_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        let mut vm = vm_with_data(tmp.path());
        let ref2 = vm
            .flatten_point(PointRef::Frozen(2), &tmp.path().join("r2"))
            .unwrap();
        let refl = vm
            .flatten_point(PointRef::Latest, &tmp.path().join("rl"))
            .unwrap();
        vm.cat.journal = Some(Journal::Prune { seq: 1 });
        vm.save().unwrap();
        // Crash after disk a was committed and rebased, before disk b and the catalog.
        let a = vm.disk_dir("a");
        set_readonly(&a.join(BASE), false).unwrap();
        set_readonly(&a.join(rp_layer(2)), false).unwrap();
        qemu_img::run(
            Some(&a),
            ["commit", "-q", "-d", "-f", "qcow2", "rp-1.qcow2"],
        )
        .unwrap();
        qemu_img::run(
            Some(&a),
            [
                "rebase",
                "-q",
                "-u",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                BASE,
                "rp-2.qcow2",
            ],
        )
        .unwrap();
        let uuid = vm.vm_uuid();
        drop(vm);
        let vm = ReplicaStore::open(tmp.path(), uuid).unwrap();
        assert_eq!(
            vm.points().iter().map(|p| p.seq).collect::<Vec<_>>(),
            vec![2, 3]
        );
        for (point, r) in [(PointRef::Frozen(2), &ref2), (PointRef::Latest, &refl)] {
            for (d, p) in vm.point_image_paths(point).unwrap() {
                let want = &r.disks.iter().find(|(id, _)| *id == d).unwrap().1;
                assert!(same(&p, want), "disk {d} of {point:?}");
            }
        }
        assert!(!vm.disk_dir("a").join("rp-1.qcow2").exists());
        assert!(!vm.disk_dir("b").join("rp-1.qcow2").exists());
    }

    #[test]
    fn store_folders_are_owner_only_and_layers_are_never_writable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let vm = vm_with_data(&tmp.path().join("replica"));
        let flat = tmp.path().join("flat").join("point");
        vm.flatten_point(PointRef::Frozen(1), &flat).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let mut todo = vec![tmp.path().join("replica"), tmp.path().join("flat")];
        let mut files = 0;
        while let Some(p) = todo.pop() {
            if p.is_dir() {
                assert_eq!(mode(&p), 0o700, "{}", p.display());
                todo.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            } else {
                files += 1;
                assert_eq!(mode(&p) & 0o022, 0, "{} is writable by others", p.display());
            }
        }
        assert!(files > 5, "{files}");
        // Making a read-only layer writable again gives write access to the owner only.
        let base = vm.disk_dir("a").join(BASE);
        assert_eq!(mode(&base), 0o400);
        set_readonly(&base, false).unwrap();
        assert_eq!(mode(&base), 0o600);
        set_readonly(&base, true).unwrap();
    }
}

#[cfg(test)]
mod apply_speed {
    use super::*;

    /// Not a test: `VMREPL_APPLY_GIB=1 cargo test --release -p vmrepl-store apply_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn apply_speed() {
        let gib: u64 = std::env::var("VMREPL_APPLY_GIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let root = std::env::var("VMREPL_APPLY_DIR").unwrap_or_else(|_| "/var/tmp".into());
        let t = tempfile::tempdir_in(root).unwrap();
        let mut vm = ReplicaStore::create(
            t.path(),
            Uuid::new_v4(),
            &serde_json::json!({}),
            &[("a", gib << 30)],
        )
        .unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i * 7919 % 251) as u8 ^ 0x5a;
        }
        let Begin::Apply(mut txn) = vm.begin_apply(1, 0).unwrap() else {
            panic!()
        };
        let t0 = std::time::Instant::now();
        for i in 0..(gib << 10) {
            buf[0] = i as u8;
            buf[4096] = (i >> 8) as u8;
            txn.write("a", i << 20, &buf).unwrap();
        }
        let w = t0.elapsed();
        txn.commit(1, Consistency::Crash).unwrap();
        eprintln!(
            "APPLY {gib} GiB: writes {:?}, with commit {:?}",
            w,
            t0.elapsed()
        );
    }
}
