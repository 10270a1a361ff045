//! `vmrepl-tracking`: dirty-bitmap lifecycle and point-in-time delta extraction.
//!
//! Works against any QMP endpoint that holds a VM's block nodes: the VM's own QEMU while it
//! runs, or a `qemu-storage-daemon` ([`OfflineDisks`]) while it is off. Node names are the
//! same in both (disk format node = disk id such as `disk0`, its file node `disk0-file`,
//! UEFI vars node `fw-vars`), so every function here works unchanged online and offline.
//!
//! # Bitmaps
//! Each relationship owns persistent bitmaps named `vmrepl-<relid8>-<seq>` ([`BitmapName`]),
//! one per disk format node, so several relationships or owners never collide. At any time a
//! disk has exactly one *recording* (enabled) bitmap of the relationship, plus at most the
//! *frozen* (disabled) one of the cycle in flight. A cycle's sequence number is always the
//! sequence of the bitmap that is recording when the cycle begins.
//!
//! ```text
//!                 start_tracking(s0) / begin_full(s0)
//!                              |
//!                              v
//!            +------->  [ N recording ]
//!            |                 |
//!            |                 | begin_cycle(N): one transaction
//!            |                 |   add N+1, disable N, backup (pull: sync=none into a
//!            |                 |   fleecing node; push: sync=bitmap N into staging)
//!            |                 v
//!            |     [ N frozen, N+1 recording ]  -- delta N (NBD export or staged copy)
//!            |          |                  |        is shipped as log N
//!            |          |                  |
//!            |          | replica made     | failure before the ack
//!            |          | log N durable    | (job error, ship error, restart)
//!            |          v                  v
//!            |   commit_cycle(N):     rollback_cycle(N):
//!            |   remove N             merge N into N+1, remove N
//!            |          |                  |
//!            +---- N := N+1 <--------------+
//!
//!   QEMU/host crash (bitmaps `inconsistent` or the recording one missing):
//!   reconcile() -> ResyncRequired: the relationship's bitmaps are removed; the caller
//!   marks the VM "resynchronization required" and starts over with begin_full / a resync.
//! ```
//!
//! **Invariant I1 (nothing acknowledged is lost): a bitmap is dropped only after the replica
//! made the log durable.** [`commit_cycle`] is the only function that removes a consistent
//! bitmap without merging it into its successor, and the caller calls it only after the
//! replica's acknowledgement of log N. Every other path ([`rollback_cycle`], a failed
//! [`begin_cycle`], [`reconcile`] when the replica lacks N) merges N into N+1 first, in the
//! same transaction as the removal. `commit_cycle` refuses to remove a bitmap that is still
//! recording.
//!
//! Persistence: QEMU writes persistent bitmaps to the qcow2 only on a clean close (`quit`).
//! After SIGKILL or a host crash, bitmaps loaded at start come back `inconsistent` and those
//! created during that run are absent; [`reconcile`] turns both into
//! [`ReconcileOutcome::ResyncRequired`].
//!
//! # Extraction
//! Delta cycles pull by default ([`Staging::pull`]): the transaction starts a `sync=none`
//! backup of each disk into a fleecing image backed by the disk itself, which keeps the point
//! in time by copy-before-write while the guest writes on; each fleecing node is then exported
//! read-only over NBD with the frozen bitmap as meta context. [`NbdClient`] lists the dirty
//! ranges and [`NbdRangeReader`] reads them in order with a window of reads in flight;
//! [`release_exports`] takes it all down once the log is built. Full copies (and delta cycles
//! in push mode) stage into a local qcow2 with no backing file instead. [`extents`] maps it
//! in-process: data extents are read straight from the qcow2 file at their host offset, zero
//! extents are explicit zeroes, unallocated ranges are not part of the delta.
//! [`ExtentReader`] yields a staged delta in chunks of at most [`MAX_CHUNK`] bytes.

mod bitmaps;
mod cycle;
mod error;
mod extents;
#[doc(hidden)]
pub mod fuzzing;
mod names;
mod nbd;
mod offline;
mod resize;

pub use bitmaps::{
    commit_cycle, list_owned, reconcile, recording_seq, rollback_cycle, start_tracking,
    stop_tracking, OwnedBitmap, ReconcileOutcome,
};
pub use cycle::{
    begin_cycle, begin_cycle_with_new, begin_full, begin_point, release_exports, stream_into_top,
    CycleHandle, CycleKind, NbdExport, PointSignal, StagedImage, Staging,
};
pub use error::TrackingError;
pub use extents::{
    extents, read_extent, Chunk, ChunkData, Extent, ExtentKind, ExtentReader, MAX_CHUNK,
};
pub use names::{BitmapName, RelTag};
pub use nbd::{NbdClient, NbdError, NbdRangeReader};
pub use offline::OfflineDisks;
pub use resize::{grow_node, GrownNode, NodeBitmap};

/// The log target every record of this crate uses.
pub const LOG_TARGET: &str = "vmrepl::tracking";

/// Node name of the UEFI vars (NVRAM) block node, online and offline (the QEMU wrapper's).
pub use vmrepl_qemu::cmdline::VARS_NODE;
