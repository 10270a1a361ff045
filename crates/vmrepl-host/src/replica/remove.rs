//! Removing a replica on the replica server itself (Remove-VMReplication run on the replica
//! host): the relationship ends here; the data stays unless asked to go.

use crate::db::ReplicaUpdate;
use crate::error::HostError;
use crate::host::Host;
use crate::lifecycle::ReplicaEvent;
use crate::replica::{change, named, vm_dir, ReplicaError};
use std::sync::Arc;
use vmrepl_types::VmName;

/// Removes the replica `name` (its name here, or its UUID) on this host. Its primary is not
/// told (it may be gone): its next cycle is refused, and its admin removes replication there
/// too. `delete` also deletes the replica's disks and recovery points.
pub async fn remove_here(d: &Arc<Host>, name: &VmName, delete: bool) -> Result<String, HostError> {
    let row = named(d, name)?;
    let dir = vm_dir(&row);
    let lock = d.replica_locks.vm(&dir);
    let _g = lock.lock().await;
    change(
        &d.db(),
        row.vm_uuid,
        ReplicaEvent::Removed,
        Some("removed on the replica server"),
        ReplicaUpdate::None,
    )?;
    let data = if delete {
        let root = row.storage_root.clone();
        let uuid = row.vm_uuid;
        let failed = |why: String| ReplicaError::CannotDelete {
            vm: row.name.clone(),
            dir: dir.clone(),
            why,
        };
        tokio::task::spawn_blocking(move || vmrepl_store::ReplicaStore::destroy(&root, uuid))
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(e.to_string()))?;
        "its data deleted".to_string()
    } else {
        format!("its data kept in {}", dir.display())
    };
    let _ = d.db().event(
        Some(row.vm_uuid),
        &format!(
            "replica of {} from {} removed on this host, {data}",
            row.name, row.primary_host
        ),
    );
    Ok(format!(
        "Replica of {} from {} removed on this host, {data}. Its primary's next cycle will be refused: run `vmrepl replication remove {}` on {} too.",
        row.name, row.primary_host, row.definition.name, row.primary_host
    ))
}
