//! Primary-side replication: relationships, the per-VM scheduler and one cycle, top-down.
//!
//! ```text
//! enable ──► WaitingForInitialReplication ──(initial log 1 acked)──► Replicating
//!                 ▲                                                   │  ▲
//!                 │ failure: bitmaps removed, retried                 │  │ resume
//!                 │                                                   ▼  │
//!                 │                                                 Suspended (pause)
//!                 │
//!   tracking cannot be trusted / replica refused a log as out of order
//!                 ──► ResynchronizationRequired
//! ```
//!
//! One cycle (for the relationship's recording bitmap N, last acknowledged log N):
//! 1. take the VM's operation lock (no start/stop while a cycle runs); reach its block nodes
//!    through the running QEMU, or through qemu-storage-daemon when the VM is off;
//! 2. if a built log N+1 is still waiting (a transfer was cut), resume it from what the
//!    replica holds durably; else one QMP transaction freezes bitmap N, starts N+1 and
//!    copies the dirty clusters of every disk (and the UEFI vars) into staging images;
//! 3. encode log N+1 (extents from the staging images, zstd, checksums) into a local file;
//! 4. send it; the replica acknowledges once it is durable and verified;
//! 5. only then drop bitmap N (I1). Any failure before the acknowledgement merges bitmap N
//!    back into N+1, so the next cycle carries the changes.

mod cycle;
mod enable;
mod enable_error;
mod endpoint;
mod log_build;
mod ops;
mod ports;
mod relationships;
mod resync;
mod run;
mod scheduler;
mod status;

#[cfg(test)]
mod cycle_tests;
#[cfg(test)]
mod fakes;

pub(crate) use cycle::*;
pub use enable::*;
pub use enable_error::{BootFileError, EnableError};
pub(crate) use endpoint::*;
pub(crate) use log_build::*;
pub use ops::*;
pub(crate) use ports::*;
pub use relationships::*;
pub(crate) use resync::KEEP_PER_RANGE;
pub(crate) use run::*;
pub use scheduler::*;
pub use status::*;
