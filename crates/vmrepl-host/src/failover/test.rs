//! Test failover: a throw-away VM on an overlay over a recovery point, on its own test
//! network, while replication goes on; stop-test deletes it.

use crate::error::HostError;
use crate::failover::boot_here;
use crate::failover::check_runnable;
use crate::failover::on_overlay;
use crate::failover::overlays;
use crate::failover::remove_files;
use crate::failover::FailoverError;
use crate::host::Host;
use crate::replica::{self, TestFailover};
use std::sync::Arc;
use uuid::Uuid;
use vmrepl_types::vm::{NicDef, NicMode};
use vmrepl_types::VmName;

/// Test failover: a VM "NAME - Test" on throwaway overlays of a point, adapters not connected
/// unless a test network is given. Replication goes on; the point stays until it is stopped.
pub async fn test(
    d: &Arc<Host>,
    name: &VmName,
    point: Option<u64>,
    test_network: Option<NicMode>,
) -> Result<String, HostError> {
    let row = replica::named(d, name)?;
    if let Some(t) = &row.test_failover {
        return Err(FailoverError::TestRunning {
            vm: name.to_string(),
            test_vm: t.name.clone(),
        }
        .into());
    }
    if row.failover.is_some() {
        return Err(FailoverError::TestOfFailedOver {
            vm: name.to_string(),
        }
        .into());
    }
    if row.last_applied == 0 {
        return Err(FailoverError::NoPointToTest {
            vm: name.to_string(),
        }
        .into());
    }
    check_runnable(d, &row.definition)?;
    let test_name = VmName::new(&vmrepl_types::name::with_suffix(&row.name, " - Test"))
        .map_err(FailoverError::TestName)?;
    let uuid = Uuid::new_v4();
    let lock = d.replica_locks.vm(&replica::vm_dir(&row));
    let _g = lock.lock().await;
    if let Err(e) = replica::apply_and_record(d, &row).await {
        // Only an explicit older point may be tested while the newest state is not whole.
        if point.is_none_or(|p| p > row.last_applied) {
            return Err(FailoverError::Unapplied {
                vm: name.to_string(),
                source: e,
            }
            .into());
        }
    }
    let dir = d.vmm.default_storage().join(uuid.to_string());
    let ov = overlays(&row, point, dir.clone()).await?;
    let mut def = on_overlay(&row.definition, &ov);
    def.name = test_name.clone();
    def.uuid = uuid;
    if let Err(e) = boot_here(&row, &mut def, &dir) {
        remove_files(&def);
        let _ = std::fs::remove_dir(&dir);
        return Err(e);
    }
    let nets = {
        let db = d.db();
        replica::networks(&db, &row)
    };
    def.nics = def
        .nics
        .iter()
        .enumerate()
        .map(|(i, _)| NicDef {
            mac: crate::vmm::mac_for(uuid, i),
            mode: test_network
                .clone()
                .or_else(|| nets.get(i).map(|n| n.test.clone()))
                .unwrap_or(NicMode::NotConnected),
        })
        .collect();
    let def_nics_connected = def.nics.iter().any(|n| n.mode != NicMode::NotConnected);
    if let Err(e) = d.vmm.register(&def) {
        remove_files(&def);
        let _ = std::fs::remove_dir(&dir);
        return Err(e);
    }
    let t = TestFailover {
        vm_uuid: uuid,
        name: test_name.as_str().to_string(),
        point_seq: ov.point.seq,
    };
    let db = d.db();
    db.set_test_failover(row.vm_uuid, Some(&t))
        .map_err(FailoverError::RecordTest)?;
    // Journaled as the replica's event (its state stays), which `replication measure` reads.
    let cause = format!("test failover to point {} as {:?}", t.point_seq, t.name);
    if crate::replica::change(
        &db,
        row.vm_uuid,
        crate::lifecycle::ReplicaEvent::TestFailoverStarted,
        Some(&cause),
        crate::db::ReplicaUpdate::None,
    )
    .is_err()
    {
        let _ = db.event(Some(row.vm_uuid), &cause);
    }
    Ok(format!(
        "Test VM {:?} created from point {} of {name}; its network adapters are {}. Start it with `vmrepl vm start {:?}`; `vmrepl failover stop-test {name}` deletes it and everything it wrote. Replication goes on meanwhile.",
        t.name,
        t.point_seq,
        if def_nics_connected { "on the test network" } else { "not connected" },
        t.name
    ))
}

/// Stops a test failover: the test VM and everything it wrote are deleted.
pub async fn stop_test(d: &Arc<Host>, name: &VmName) -> Result<String, HostError> {
    let row = replica::named(d, name)?;
    let Some(t) = row.test_failover.clone() else {
        return Err(FailoverError::NoTestRunning {
            vm: name.to_string(),
        }
        .into());
    };
    let test_name = VmName::new(&t.name).map_err(FailoverError::StoredName)?;
    if d.vmm.show(&test_name).is_ok() {
        if d.vmm.live_process(t.vm_uuid).await.is_some() {
            d.vmm.stop(&test_name).await?;
        }
        d.vmm.delete(&test_name, false).await?;
    }
    let _ = std::fs::remove_dir(d.vmm.default_storage().join(t.vm_uuid.to_string()));
    let db = d.db();
    db.set_test_failover(row.vm_uuid, None)
        .map_err(FailoverError::RecordTest)?;
    if crate::replica::change(
        &db,
        row.vm_uuid,
        crate::lifecycle::ReplicaEvent::TestFailoverStopped,
        Some(&format!("test VM {:?} deleted", t.name)),
        crate::db::ReplicaUpdate::None,
    )
    .is_err()
    {
        let _ = db.event(Some(row.vm_uuid), "test failover stopped");
    }
    Ok(format!(
        "Test failover of {name} stopped; VM {:?} and what it wrote are deleted.",
        t.name
    ))
}

// ------------------------------------------------------------------ reverse replication
