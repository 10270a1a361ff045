//! Finding a replica VM by the name (or UUID) an operator gives.

use crate::db::ReplicaRow;
use crate::error::HostError;
use crate::host::Host;
use crate::replica::ReplicaError;
use uuid::Uuid;

/// The replica VM named `name` on this host, or an error that says where replica-side
/// commands run.
pub(crate) fn named(d: &Host, name: &vmrepl_types::VmName) -> Result<ReplicaRow, HostError> {
    let db = d.db();
    let sql = |e| HostError::db("finding a replica")(e);
    let found = match db.replica_named(name.as_str()).map_err(sql)? {
        Some(r) => Some(r),
        // Every replica-side command also takes the VM's UUID.
        None => match name.as_str().parse::<Uuid>() {
            Ok(u) => db.replica(u).map_err(sql)?,
            Err(_) => None,
        },
    };
    found.ok_or_else(|| {
        ReplicaError::NoSuchReplica {
            name: name.to_string(),
        }
        .into()
    })
}
