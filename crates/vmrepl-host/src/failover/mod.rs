//! The failover family (Hyper-V's Start-/Stop-/Complete-VMFailover and reverse replication),
//! top-down. See docs/design/failover.md for the flows and why they keep I1, I2, I6 and I7.
//!
//! ```text
//! primary A                                replica B
//! ─────────                                ─────────
//! prepare: VM off → locked, final log S
//!   (state SyncedReplicationComplete)
//!                                          start: ask A (running? prepared at S?) ── I6
//!                                            overlay over point S, bitmap <rel'>-S added
//!                                            before the first boot; planned ⇒ streamed
//!                                            standalone at once and the store dropped
//!                                            (state FailedOver), else FailedOverWaitingCompletion
//!                                          complete: stream standalone, drop the other points
//!                                          cancel:   delete the VM, back to Replicating
//!                                          reverse:  ask A to become the replica ──────────┐
//! accept reverse: prepared at S and the same disks?                                        │
//!   yes: tracking removed, disks adopted as the replica's base at S (deltas at once)  ◄────┘
//!   no:  old VM dropped, empty replica (full copy, and the status says why)
//! ```
//!
//! Failback is the same planned failover in the other direction.

use crate::error::HostError;
use crate::host::Host;
use crate::replica::{self};
use std::sync::Arc;
use std::time::Duration;
use vmrepl_store::ReplicaStore;
use vmrepl_types::replication::{RecoveryPointInfo, ReplicationState};
use vmrepl_types::VmName;

/// How long streaming a failed-over VM's disks off its recovery point may take.
const STREAM_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// The replica row of the VM called `name` on this host.
/// The recovery points of a replica VM, oldest first, the latest state last.
pub async fn points(d: &Arc<Host>, name: &VmName) -> Result<Vec<RecoveryPointInfo>, HostError> {
    let row = replica::named(d, name)?;
    if row.state == ReplicationState::FailedOver {
        return Err(FailoverError::PointsDropped {
            vm: name.to_string(),
        }
        .into());
    }
    let lock = d.replica_locks.vm(&replica::vm_dir(&row));
    let _g = lock.lock().await;
    let root = row.storage_root.clone();
    let pts = tokio::task::spawn_blocking(move || ReplicaStore::open(&root, row.vm_uuid))
        .await
        .map_err(FailoverError::Task)?
        .map_err(FailoverError::from)?
        .points();
    Ok(pts
        .into_iter()
        .map(|p| RecoveryPointInfo {
            seq: p.seq,
            unix_ms: p.unix_ms,
            consistency: p.consistency,
            latest: p.kind == vmrepl_store::PointKind::Latest,
        })
        .collect())
}

// ------------------------------------------------------------------ primary: prepare, cancel

mod error;
mod ip;
mod primary_side;
mod reverse;
mod start;
mod test;

pub use error::FailoverError;
pub use primary_side::*;
pub use reverse::*;
pub use start::*;
pub use test::*;
