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
                failover_ip: s.and_then(|a| a.failover_ip.clone()),
            }
        })
        .collect()
}

/// What `replication network` changes on a replica's adapters; unset fields stay.
#[derive(Debug, Default)]
pub struct NetworkChange {
    pub failover: Option<vmrepl_types::NicMode>,
    pub test: Option<vmrepl_types::NicMode>,
    pub failover_ip: Option<vmrepl_types::api::FailoverIp>,
    pub clear_failover_ip: bool,
}

/// `replication network`: sets (or shows) the networks of a replica's adapters.
pub fn set_networks(
    d: &Host,
    name: &vmrepl_types::VmName,
    adapter: Option<usize>,
    change: NetworkChange,
) -> Result<Vec<vmrepl_types::api::AdapterNetwork>, HostError> {
    let NetworkChange {
        failover,
        test,
        failover_ip,
        clear_failover_ip,
    } = change;
    if let Some(ip) = &failover_ip {
        ip.validate()
            .map_err(|why| ReplicaError::BadFailoverIp { why })?;
        if adapter.is_none() {
            return Err(ReplicaError::BadFailoverIp {
                why: "a failover address is for one adapter: give --adapter N".into(),
            }
            .into());
        }
    }
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
    if failover.is_none() && test.is_none() && failover_ip.is_none() && !clear_failover_ip {
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
        if clear_failover_ip {
            n.failover_ip = None;
        }
        if let Some(ip) = &failover_ip {
            n.failover_ip = Some(ip.clone());
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
