//! The networks a replica VM's adapters join when it fails over or runs a test failover
//! (`vmrepl replication network`).

use crate::db::Db;
use crate::db::ReplicaRow;
use crate::error::HostError;
use crate::host::Host;
use crate::replica::named;
use crate::replica::ReplicaError;

/// The networks each adapter of a replica joins on failover and test failover, as this
/// host's admin set them; an adapter nobody set is not connected.
pub fn networks(db: &Db, row: &ReplicaRow) -> Vec<vmrepl_types::api::AdapterNetwork> {
    use vmrepl_types::NicMode;
    // A damaged value reads as no setting (not connected), and says so in the log.
    let stored = db.replica_networks(row.vm_uuid).unwrap_or_else(|e| {
        tracing::warn!(target: "vmrepl::replica", vm = %row.vm_uuid, "{e}");
        Vec::new()
    });
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
            return Err(ReplicaError::NoSuchAdapter {
                vm: name.to_string(),
                count: nets.len(),
                adapter: a,
            }
            .into());
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
    db.set_replica_networks(row.vm_uuid, &nets)
        .map_err(HostError::db("saving the failover networks"))?;
    let _ = db.event(
        Some(row.vm_uuid),
        &format!("failover networks of {name} changed"),
    );
    Ok(nets)
}
