//! Finding a replica VM by the name (or UUID) an operator gives.

use crate::db::ReplicaRow;
use crate::error::HostError;
use crate::host::Host;
use uuid::Uuid;
use vmrepl_types::api::{ApiError, ErrorCode};

/// The replica VM named `name` on this host, or an error that says where replica-side
/// commands run.
pub(crate) fn named(d: &Host, name: &vmrepl_types::VmName) -> Result<ReplicaRow, HostError> {
    let db = d.db();
    let sql = |e: crate::db::DbError| ApiError::new(ErrorCode::Internal, e.to_string());
    let found = match db.replica_named(name.as_str()).map_err(sql)? {
        Some(r) => Some(r),
        // Every replica-side command also takes the VM's UUID.
        None => match name.as_str().parse::<Uuid>() {
            Ok(u) => db.replica(u).map_err(sql)?,
            Err(_) => None,
        },
    };
    found.ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("This host keeps no replica of a VM named {name}; failover and import run on the replica server. `vmrepl replication status` lists what this host replicates."),
            )
            .into()
        })
}
