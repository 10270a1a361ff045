//! # vmrepl-store: the replica side's storage of a replicated VM
//!
//! A synchronous library (the daemon calls it from `spawn_blocking`). One [`ReplicaVm`] per
//! replicated VM, created with [`ReplicaStore::create`] and reopened with [`ReplicaStore::open`].
//!
//! ## On-disk layout
//!
//! ```text
//! <storage>/<vm-uuid>/                 the folder is the VM's UUID, never its name (I5)
//!   vm.json                            VM definition, opaque JSON given by the caller
//!   state.json                         catalog (see below), written tmp+fsync+rename+dir fsync
//!   nvram/latest.fd                    NVRAM as of the last applied log (if the VM has one)
//!   nvram/rp-<seq>.fd                  NVRAM of frozen point <seq>
//!   logs/<seq, 20 digits>.log          received logs, durable, not yet applied
//!   disks/<disk-id>/base.qcow2         qcow2 v3 (compat=1.1), oldest data, read-only
//!   disks/<disk-id>/rp-<seq>.qcow2     frozen recovery point layers, read-only, oldest first
//!   disks/<disk-id>/top.qcow2          the in-progress layer: logs are applied here
//!   disks/<disk-id>/digests.map        BLAKE3 of each 64 KiB block of the latest state, kept by
//!                                      every apply (see the digest_map module): a
//!                                      resynchronization compares without reading the replica
//! ```
//!
//! Chain per disk: `base.qcow2 ← rp-<s1>.qcow2 ← … ← rp-<sn>.qcow2 ← top.qcow2`. A disk that
//! grew ([`ReplicaVm::grow_disk`]) has layers smaller than the disk below its top: each
//! recovery point keeps the size the disk had then, and what lies past a layer's end reads as
//! zeros; no layer is ever larger than the disk. Each header names
//! its backing by bare file name (same folder), format `qcow2`. Disk ids are `[a-z0-9_-]{1,32}`
//! and are checked before any path is built ([`validate_disk_id`]).
//!
//! `state.json` holds: format `version` (2), the VM UUID, the disks and their sizes (a disk
//! not yet carried by a log is `pending`), the last applied sequence with its time and
//! consistency, the frozen points (`seq`, `unix_ms`, `consistency`, `layer`, whether it has
//! NVRAM, and the `disks` it has a layer in), a `journal` entry for a freeze or prune in
//! progress, and `checksum`: BLAKE3 of the document serialized with an empty checksum. A catalog
//! that fails its checksum is refused ([`StoreError::CatalogCorrupt`]). A version-1 catalog
//! (written before disks could be added or removed: every point has every disk) is verified
//! over its own layout, migrated and written back as version 2 by [`ReplicaStore::open`].
//!
//! ## A changing set of disks
//!
//! Each recovery point records which disks it has, and each disk's chain is made of the layers
//! of the points that have it: `base.qcow2 ← rp-<s>.qcow2 (points with the disk) ← top.qcow2`.
//! [`ReplicaVm::add_disk`] adds a disk as *pending* (empty base and top); the first log that
//! carries it ([`ApplyTxn::carries`], or any write to it) makes it a member of the latest state
//! at its commit, so every point from then on has it and the older points never do (I2: the
//! point that first has it is one instant across all disks). [`ReplicaVm::remove_disk`] takes a
//! disk out of the catalog and out of every point and deletes its folder (as Hyper-V, an
//! excluded disk keeps no placeholder on the replica). [`ReplicaVm::point_disks`] says which
//! disks a point has; overlays, flattened copies and image paths give exactly those. Pruning
//! merges each disk's layer into that disk's own neighbours.
//!
//! ## Applying logs (I3, I4)
//!
//! The engine receives a log into the [`spool`] (`<seq>.partial`) and fsyncs it, verifies it
//! whole, gives it its verified name durably ([`spool::accept`]), acknowledges it, then
//! applies it:
//! [`ReplicaVm::check_space`], [`ReplicaVm::begin_apply`]`(seq, base_seq)`, then
//! [`ApplyTxn::write`] / [`ApplyTxn::write_zeroes`] / [`ApplyTxn::set_nvram`], then
//! [`ApplyTxn::commit`]. Sequence rules:
//!
//! | log | result |
//! |---|---|
//! | `seq <= last_applied` | [`Begin::AlreadyApplied`]: a no-op, acknowledge again |
//! | `base_seq == last_applied`, `seq > base_seq` | [`Begin::Apply`] |
//! | `base_seq != last_applied` | [`StoreError::OutOfOrder`]: mark "resynchronization required" |
//!
//! Every write is bounds-checked against the disk size before anything is written
//! ([`StoreError::OutOfBounds`]). Zero extents become explicit qcow2 zero clusters that shadow
//! older layers. Commit flushes and fsyncs the written layers, writes the NVRAM, and only then
//! records the sequence in `state.json` (atomically).
//!
//! **Crash repair.** The top layer is the in-progress layer; recovery points are only ever frozen
//! layers. A crash (or an abort, or ENOSPC) between the first write and commit leaves the top layer
//! partly written while `state.json` still names the previous sequence. The log is still in the
//! spool ([`ReplicaVm::pending_logs`]), and applying the *same* log again performs the same writes,
//! which yields exactly the right content. So at start the engine re-applies every pending log in
//! order. A frozen point is never touched by an apply.
//!
//! Freeze and prune change several files; each is journaled in `state.json` before it starts and
//! rolled forward by [`ReplicaStore::open`] (every step is idempotent). Leftover layer files that
//! no catalog entry names are removed at open.
//!
//! **Resynchronization in parts.** A log of kind `ResyncPart` is committed with
//! [`ApplyTxn::commit_part`]: durable like any other, but the catalog's `resync_since` (the last
//! applied log before the first part) says the latest state mixes old and new blocks. While it is
//! set the latest state is not offered as a point ([`ReplicaVm::points`]) and cannot be frozen
//! ([`StoreError::ResyncInProgress`]); the frozen points below stay as they are. The next log
//! that is not a part commits with [`ApplyTxn::commit`], which clears it.
//! [`ReplicaVm::range_digests`] gives the digests of one range of a disk for the compare.
//!
//! ## Recovery points and locks
//!
//! [`ReplicaVm::freeze_point`] renames `top.qcow2` to `rp-<seq>.qcow2` (read-only) in every disk
//! and creates a fresh `top.qcow2` over it: one instant across all disks (I2).
//! [`ReplicaVm::points`] lists frozen points oldest first, then the latest applied state
//! ([`PointKind::Latest`], always present). [`ReplicaVm::prune`] removes points until `keep`
//! frozen points remain.
//!
//! A [`PointLock`] ([`ReplicaVm::lock_point`], also held inside an [`Overlay`]) pins a point. The
//! rule: **a locked point and every layer below it are never modified or removed.**
//!
//! | point `p` to prune, with locks | allowed? | how |
//! |---|---|---|
//! | no locks, `p` is the oldest | yes | `qemu-img commit -d rp-p` into base, `rebase -u` the layer above onto base |
//! | `p` is locked | no | skipped |
//! | some locked point `L >= p` (p is at or below a lock) | no | base/lower layers of `L` would change |
//! | every locked point `L < p` | yes | `qemu-img rebase` (safe) of the layer above onto the layer below `p` |
//!
//! Prune only ever removes the oldest `len - keep` points (the newest `keep` always stay); those it
//! must skip because of a lock are reported in
//! [`PruneReport::blocked_by_lock`]. Locks live in memory only: after a restart the engine re-locks
//! the points of test failovers still running.
//!
//! ## Failover and compare
//!
//! [`ReplicaVm::overlay_for`] makes throwaway overlays (backing = absolute path of the point's
//! layer, `-F qcow2`) plus an NVRAM copy; [`ReplicaVm::flatten_point`] writes standalone images;
//! [`ReplicaVm::point_image_paths`] gives the top file of a point's chain for `qemu-img compare`.
//!
//! ## Images from a peer are not trusted (I5)
//!
//! Layers are opened with imago's [`imago::DenyImplicitOpenGate`]: imago never opens a file named
//! in a header. The chain is built explicitly, each layer's backing set to the layer below that
//! this crate opened, and every header's backing name, backing format, size and external-data-file
//! flag is checked against the catalog; a mismatch is [`StoreError::UntrustedBacking`] or
//! [`StoreError::BadLayer`]. qemu-img is only run on chains that passed this check.
//!
//! Every `qemu-img` call is logged with its duration through `tracing`.

mod bulk_write;
mod catalog;
mod chain;
mod digest_map;
mod error;
mod fsutil;
mod qemu_img;
pub mod spool;
mod store;
mod writeback;

pub use catalog::CATALOG_VERSION;
pub use error::{Result, StoreError};
pub use store::{
    block_size, validate_disk_id, ApplyTxn, Begin, Flattened, Overlay, PointKind, PointLock,
    PointRef, PruneReport, RecoveryPoint, ReplicaStore, ReplicaVm, BULK_APPLY_BYTES,
    MAX_DIGEST_BLOCK, MAX_RANGE_DIGESTS, SPACE_HEADROOM,
};
pub use vmrepl_types::replication::Consistency;
pub use writeback::{EarlyWriteback, WRITEBACK_EVERY};
