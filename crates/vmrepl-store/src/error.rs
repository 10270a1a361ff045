//! The store's one error type. Every message is a sentence that names the value at fault, the
//! cause, and what to do about it.

use std::path::PathBuf;

/// Why a replica-store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("The disk id {id:?} is not valid: use 1 to 32 characters of a-z, 0-9, '_' and '-' (no '/', '.' or '..').")]
    InvalidDiskId { id: String },

    #[error("The disk id {id:?} is listed twice; give every disk of a VM its own id.")]
    DuplicateDisk { id: String },

    #[error("Disk {disk:?} has size {size} bytes; a replica disk must be larger than 0 and a multiple of 512 bytes.")]
    BadDiskSize { disk: String, size: u64 },

    #[error("A replica VM has no disks; give at least one disk.")]
    NoDisks,

    #[error("The replica folder {path} already exists, so a replica for this VM UUID is already stored there; remove the replica first (or delete the folder with `rm -r {path}` if it is a leftover), then create it again.")]
    AlreadyExists { path: PathBuf },

    #[error("No replica is stored at {path}; check the storage folder and the VM UUID, or create the replica first.")]
    NotFound { path: PathBuf },

    #[error("Could not {action} {path}: {source}. Check that the path exists, is writable by the daemon and that the file system is healthy.")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("Image operation '{action}' on {path} failed: {source}. Run `qemu-img check {path}`; if the image is damaged the VM needs a resynchronization.")]
    Image {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("`{command}` failed with {status}: {stderr}. Check that qemu-img (QEMU 7.2 or newer) is installed and that the images are intact.")]
    QemuImg {
        command: String,
        status: String,
        stderr: String,
    },

    #[error("The catalog {path} cannot be trusted ({reason}); restore it from a backup or resynchronize the replica from the primary.")]
    CatalogCorrupt { path: PathBuf, reason: String },

    #[error("The catalog {path} has format version {found}, but this vmrepl reads versions 1 to {supported}; run the vmrepl release that wrote it or a newer one.")]
    CatalogVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    #[error("Log {got_seq} builds on sequence {got} but the replica's last applied sequence is {expected}; logs must apply in order, so this replica needs a resynchronization.")]
    OutOfOrder {
        expected: u64,
        got: u64,
        got_seq: u64,
    },

    #[error("Log sequence {seq} is not after its base sequence {base_seq}; the sender is broken or the log was altered, so resynchronize the replica.")]
    SeqNotAfterBase { seq: u64, base_seq: u64 },

    #[error("The replica has no disk {disk:?} (it has {known}); the log does not match this VM, so resynchronize it.")]
    UnknownDisk { disk: String, known: String },

    #[error("A write to disk {disk:?} at offset {offset} of {len} bytes ends past the disk size of {size} bytes; the log was refused before anything was written. Resynchronize if the primary's disk was resized.")]
    OutOfBounds {
        disk: String,
        offset: u64,
        len: u64,
        size: u64,
    },

    #[error("The file system holding {path} has {free} bytes free but {needed} bytes are needed; free space on it or move the replica storage, then the log will be applied again.")]
    DiskFull {
        path: PathBuf,
        needed: u64,
        free: u64,
    },

    #[error("The image {layer} names backing file {named:?} but this replica expects {expected:?}; images are never allowed to open backing files on their own, so the image was not opened. Remove the foreign file or resynchronize the replica.")]
    UntrustedBacking {
        layer: PathBuf,
        named: Option<String>,
        expected: Option<String>,
    },

    #[error(
        "The image {layer} is not a valid replica layer ({reason}); resynchronize the replica."
    )]
    BadLayer { layer: PathBuf, reason: String },

    #[error("There is no frozen recovery point with sequence {seq}; the points are {known}. Pick one of them.")]
    NoSuchPoint { seq: u64, known: String },

    #[error("Cannot remove disk {disk:?} from this replica: recovery point {seq}, which has it, is in use (a test failover runs on it). Stop the test failover first, then exclude the disk again.")]
    DiskInUse { disk: String, seq: u64 },

    #[error("Cannot freeze sequence {seq} as a recovery point: the last applied sequence is {last_applied}; only the latest applied state can be frozen.")]
    FreezeNotLatest { seq: u64, last_applied: u64 },

    #[error("The newest state of this replica holds part of log {seq}, whose apply did not finish; it is not a whole point. Use an older recovery point, or let the log be applied again (or the primary resynchronize).")]
    TornLatest { seq: u64 },

    #[error("This replica is being resynchronized in parts since log {since} (applied up to log {seq}); its newest state mixes old and new blocks and is not a whole point until the resynchronization ends. Use a recovery point from before it (the newest one was kept for this).")]
    ResyncInProgress { since: u64, seq: u64 },

    #[error("Sequence {seq} is already frozen as a recovery point; nothing to do.")]
    AlreadyFrozen { seq: u64 },

    #[error(
        "The destination {path} already exists; pick a new path or remove the old file first."
    )]
    DestinationExists { path: PathBuf },
}

impl StoreError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        StoreError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// True for errors after which the replica must be resynchronized from the primary
    /// (out-of-order or foreign logs, untrusted images).
    pub fn needs_resync(&self) -> bool {
        matches!(
            self,
            StoreError::OutOfOrder { .. }
                | StoreError::SeqNotAfterBase { .. }
                | StoreError::UnknownDisk { .. }
                | StoreError::UntrustedBacking { .. }
                | StoreError::BadLayer { .. }
                | StoreError::CatalogCorrupt { .. }
        )
    }
}

/// Result alias for this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
