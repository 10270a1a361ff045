//! The networks a replica VM's adapters join when it fails over or runs a test failover
//! (`vmrepl replication network`).

use crate::db::Db;
use crate::db::ReplicaRow;
use crate::error::HostError;
use crate::host::Host;
use crate::replica::named;
use rusqlite::params;
use vmrepl_types::api::{ApiError, ErrorCode};

/// The networks each adapter of a replica joins on failover and test failover, as this
/// host's admin set them; an adapter nobody set is not connected.
pub fn networks(db: &Db, row: &ReplicaRow) -> Vec<vmrepl_types::api::AdapterNetwork> {
    use vmrepl_types::NicMode;
    let stored: Vec<vmrepl_types::api::AdapterNetwork> = db
        .conn()
        .query_row(
            "SELECT networks FROM replica_networks WHERE vm_uuid = ?1",
            params![row.vm_uuid.to_string()],
            |r| r.get::<_, String>(0),
        )
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    row.definition
        .nics
        .iter()
        .enumerate()
        .map(|(i, nic)| {
            let s = stored.iter().find(|a| a.adapter == i);
            vmrepl_types::api::AdapterNetwork {
                adapter: i,
                mac: nic.mac.clone(),
                failover: s.map_or(NicMode::NotConnected, |a| a.failover.clone()),
                test: s.map_or(NicMode::NotConnected, |a| a.test.clone()),
            }
        })
        .collect()
}

/// `replication network`: sets (or shows) the networks of a replica's adapters.
pub fn set_networks(
    d: &Host,
    name: &vmrepl_types::VmName,
    adapter: Option<usize>,
    failover: Option<vmrepl_types::NicMode>,
    test: Option<vmrepl_types::NicMode>,
) -> Result<Vec<vmrepl_types::api::AdapterNetwork>, HostError> {
    let row = named(d, name)?;
    let db = d.db();
    let mut nets = networks(&db, &row);
    if let Some(a) = adapter {
        if a >= nets.len() {
            return Err(HostError::Api(ApiError::new(
                ErrorCode::InvalidInput,
                format!(
                    "VM {name} has {} network adapters (0 to {}); there is no adapter {a}.",
                    nets.len(),
                    nets.len().saturating_sub(1)
                ),
            )));
        }
    }
    if failover.is_none() && test.is_none() {
        return Ok(nets);
    }
    for n in nets
        .iter_mut()
        .filter(|n| adapter.is_none_or(|a| a == n.adapter))
    {
        if let Some(f) = &failover {
            n.failover = f.clone();
        }
        if let Some(t) = &test {
            n.test = t.clone();
        }
    }
    let json = serde_json::to_string(&nets)
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    db.conn()
        .execute(
            "INSERT INTO replica_networks (vm_uuid, networks) VALUES (?1, ?2)
             ON CONFLICT (vm_uuid) DO UPDATE SET networks = excluded.networks",
            params![row.vm_uuid.to_string(), json],
        )
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let _ = db.event(
        Some(row.vm_uuid),
        &format!("failover networks of {name} changed"),
    );
    Ok(nets)
}
