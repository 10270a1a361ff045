//! Every VM this host knows, with its replication role: its own VMs (and the relationship each
//! is the primary of) and the replica VMs it keeps for primaries, which are not VMs of this
//! host until they fail over. What `vm list` and `vm show` answer.

use crate::error::HostError;
use crate::host::Host;
use crate::replica::ReplicaRow;
use vmrepl_types::api::VmSummary;
use vmrepl_types::replication::ReplicationState;
use vmrepl_types::vm::VmRunState;
use vmrepl_types::VmName;

/// The VMs of this host, then the replicas it keeps (by name each).
pub fn list(d: &Host) -> Result<Vec<VmSummary>, HostError> {
    let mut vms = d.vmm.list()?;
    let db = d.db();
    let sql = |e| HostError::db("listing the VMs' replication")(e);
    let rels = db.relationships().map_err(sql)?;
    let replicas: Vec<ReplicaRow> = db
        .replicas()
        .map_err(sql)?
        .into_iter()
        .filter(|r| r.state != ReplicationState::NotEnabled)
        .collect();
    for v in &mut vms {
        if let Some(rel) = rels.iter().find(|r| r.vm_uuid == v.definition.uuid) {
            v.replication = Some(format!(
                "primary, replicating to {} ({})",
                rel.replica_name, rel.state
            ));
        } else if let Some(r) = replicas.iter().find(|r| r.vm_uuid == v.definition.uuid) {
            v.replication = Some(replica_role(r));
        }
    }
    let extra: Vec<VmSummary> = replicas
        .iter()
        .filter(|r| !vms.iter().any(|v| v.definition.uuid == r.vm_uuid))
        .map(replica_summary)
        .collect();
    vms.extend(extra);
    Ok(vms)
}

/// One VM by its name or UUID: a VM of this host, or a replica it keeps.
pub fn show(d: &Host, name: &VmName) -> Result<VmSummary, HostError> {
    match list(d)?
        .into_iter()
        .find(|v| v.definition.name == *name || v.definition.uuid.to_string() == name.as_str())
    {
        Some(v) => Ok(v),
        // Not known here: the VM manager's own error names the VM.
        None => Ok(d.vmm.show(name)?),
    }
}

fn replica_role(r: &ReplicaRow) -> String {
    format!(
        "replica of {} on {} ({})",
        r.definition.name, r.primary_host, r.state
    )
}

/// A replica VM as `vm list` shows it: under its name on this host, off until failed over.
fn replica_summary(r: &ReplicaRow) -> VmSummary {
    let mut definition = r.definition.clone();
    if let Ok(n) = VmName::new(&r.name) {
        definition.name = n;
    }
    VmSummary {
        definition,
        state: VmRunState::Off,
        pid: None,
        note: None,
        replication: Some(replica_role(r)),
        kept_replica: true,
    }
}
