//! Errors: each one says what failed, with the values involved, and what to do.

use std::path::PathBuf;
use vmrepl_qemu::{ImgError, QmpError, StorageDaemonError};

/// Failures of change tracking and delta extraction.
#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    #[error("{name:?} is not a valid name: {why}")]
    BadName { name: String, why: &'static str },

    #[error("could not {action}: {source}")]
    Qmp {
        action: String,
        #[source]
        source: QmpError,
    },

    #[error("could not {action}: {source}")]
    Img {
        action: String,
        #[source]
        source: ImgError,
    },

    #[error("could not {action} {path}: {source}; check the staging folder's permissions and free space")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("block node {node:?} does not exist on the QMP endpoint {endpoint}; check the VM's disk ids (the format node is named after the disk id)")]
    NodeNotFound { node: String, endpoint: PathBuf },

    #[error("bitmap {bitmap} is missing on node {node:?}; change tracking for this disk was lost (QEMU crashed or the image was edited), run a resynchronization")]
    BitmapMissing { node: String, bitmap: String },

    #[error("bitmap {bitmap} on node {node:?} is not in the state this step needs: {detail}; run reconcile() to repair the relationship's bitmaps")]
    BitmapState {
        node: String,
        bitmap: String,
        detail: String,
    },

    #[error("the backup job {job} of node {node:?} failed: {reason}; the cycle was rolled back (bitmap merged back, nothing lost), retry the cycle")]
    JobFailed {
        job: String,
        node: String,
        reason: String,
    },

    #[error("backup jobs {jobs:?} did not finish within {secs} s; the cycle was rolled back (nothing lost); check the staging storage's speed or raise the timeout")]
    JobTimeout { jobs: Vec<String>, secs: u64 },

    #[error("NBD exports {exports:?} were still there {secs} s after they were removed (a client still connected?); the next cycle removes them again before it starts")]
    ExportTimeout { exports: Vec<String>, secs: u64 },

    #[error("the cycle failed ({cause}) and rolling it back failed too ({rollback}); do not drop any bitmap: run reconcile() before the next cycle")]
    RollbackFailed {
        cause: Box<TrackingError>,
        rollback: Box<TrackingError>,
    },

    #[error("the staging image {path} cannot be read as a delta: {detail}")]
    BadStaging { path: PathBuf, detail: String },

    #[error("block node {node:?} is {from} bytes; a disk only grows ({to} bytes asked): ask for {from} bytes or more")]
    Shrink { node: String, from: u64, to: u64 },

    #[error("block node {node:?} cannot grow now: its bitmap {bitmap} is {detail}")]
    ResizeBlocked {
        node: String,
        bitmap: String,
        detail: &'static str,
    },

    #[error("block node {node:?} is {now} bytes after block_resize to {asked} bytes; check the QEMU log of the VM and retry")]
    ResizeMismatch { node: String, asked: u64, now: u64 },

    #[error("could not run qemu-storage-daemon for the stopped VM: {0}")]
    StorageDaemon(#[from] StorageDaemonError),
}

impl TrackingError {
    pub(crate) fn qmp(action: impl Into<String>) -> impl FnOnce(QmpError) -> TrackingError {
        let action = action.into();
        move |source| TrackingError::Qmp { action, source }
    }

    pub(crate) fn img(action: impl Into<String>) -> impl FnOnce(ImgError) -> TrackingError {
        let action = action.into();
        move |source| TrackingError::Img { action, source }
    }

    /// True when this error means tracking is lost and only a resync can recover.
    pub fn needs_resync(&self) -> bool {
        matches!(self, TrackingError::BitmapMissing { .. })
    }
}
