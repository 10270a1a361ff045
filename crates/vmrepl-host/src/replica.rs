//! The replica side: replica VMs this host keeps for primaries, their durable rows (table
//! `replicas`, migration 3), applying received logs to the store, recovery points, status.
//!
//! The peer server ([`crate::peer::server`]) receives and verifies logs; this module applies
//! them. A replica VM's storage is `<grant storage>/<vm uuid>` (never its name, I5), managed by
//! `vmrepl_store`.
//!
//! At daemon start call [`recover`]: it re-applies every durable, verified log that was received
//! but not applied (a crash during apply is repaired by applying the same log again, I3).

use crate::db::{now_ms, Db};
use crate::host::Host;
use crate::peer::proto::{PointPolicy, RefusalCode, MAX_NVRAM_BYTES, NVRAM_DISK_ID};
use rusqlite::{params, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;
use vmrepl_store::{ReplicaStore, ReplicaVm, StoreError};
use vmrepl_types::api::{ApiError, ErrorCode};
use vmrepl_types::replication::{
    Consistency, Health, ReplicationState, ReplicationStats, ReplicationStatus, Role,
};
use vmrepl_types::VmDefinition;

/// How long without a received log before a replica's health is Warning (Hyper-V: 1 h).
pub const RECEIVE_WARNING_MS: u64 = 3600 * 1000;

/// One replica VM as recorded on this host.
#[derive(Debug, Clone)]
pub struct ReplicaRow {
    pub vm_uuid: Uuid,
    pub name: String,
    pub primary_host: String,
    pub trust_group: String,
    /// The storage folder the grant named; the VM's folder is `<storage_root>/<uuid>`.
    pub storage_root: PathBuf,
    pub relationship: Uuid,
    pub definition: VmDefinition,
    pub policy: PointPolicy,
    pub state: ReplicationState,
    pub last_applied: u64,
    pub created_ms: u64,
    pub last_receive_ms: Option<u64>,
    pub last_apply_ms: Option<u64>,
    pub last_point_ms: Option<u64>,
    pub bytes_received: u64,
    pub logs_received: u64,
    pub last_error: Option<String>,
    /// The primary's peer address (`host:port`), if it told us.
    pub primary_server: Option<String>,
    /// Set once the replica failed over.
    pub failover: Option<FailoverRecord>,
    /// Set while a test failover runs.
    pub test_failover: Option<TestFailover>,
}

/// A failover of a replica VM, kept until the replica is removed or reversed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FailoverRecord {
    /// The recovery point the VM was failed over to.
    pub point_seq: u64,
    pub point_unix_ms: i64,
    /// Planned (the primary prepared, no data lost) or not.
    pub planned: bool,
    /// The relationship reverse replication will use; its recording bitmap was added on the
    /// failed-over VM's disks before their first boot.
    pub relationship: Uuid,
}

/// A running test failover.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TestFailover {
    pub vm_uuid: Uuid,
    pub name: String,
    pub point_seq: u64,
}

fn corrupt(e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(e.to_string().into())
}

const COLS: &str = "vm_uuid, name, primary_host, trust_group, storage_root, relationship, \
    definition, policy, state, last_applied, created_ms, last_receive_ms, last_apply_ms, \
    last_point_ms, bytes_received, logs_received, last_error, primary_server, failover, \
    test_failover";

fn json_col<T: serde::de::DeserializeOwned>(v: Option<String>) -> rusqlite::Result<Option<T>> {
    v.map(|t| serde_json::from_str(&t).map_err(corrupt))
        .transpose()
}

fn to_json_col<T: serde::Serialize>(v: Option<&T>) -> rusqlite::Result<Option<String>> {
    v.map(|t| serde_json::to_string(t).map_err(corrupt))
        .transpose()
}

fn row_to_replica(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReplicaRow> {
    let uuid: String = r.get(0)?;
    let rel: String = r.get(5)?;
    let def: String = r.get(6)?;
    let pol: String = r.get(7)?;
    let state: String = r.get(8)?;
    let root: String = r.get(4)?;
    Ok(ReplicaRow {
        vm_uuid: uuid.parse().map_err(corrupt)?,
        name: r.get(1)?,
        primary_host: r.get(2)?,
        trust_group: r.get(3)?,
        storage_root: PathBuf::from(root),
        relationship: rel.parse().map_err(corrupt)?,
        definition: serde_json::from_str(&def).map_err(corrupt)?,
        policy: serde_json::from_str(&pol).map_err(corrupt)?,
        state: vmrepl_types::from_wire_name(&state).unwrap_or(ReplicationState::Error),
        last_applied: r.get::<_, i64>(9)? as u64,
        created_ms: r.get::<_, i64>(10)? as u64,
        last_receive_ms: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
        last_apply_ms: r.get::<_, Option<i64>>(12)?.map(|v| v as u64),
        last_point_ms: r.get::<_, Option<i64>>(13)?.map(|v| v as u64),
        bytes_received: r.get::<_, i64>(14)? as u64,
        logs_received: r.get::<_, i64>(15)? as u64,
        last_error: r.get(16)?,
        primary_server: r.get(17)?,
        failover: json_col(r.get(18)?)?,
        test_failover: json_col(r.get(19)?)?,
    })
}

/// The replica row of a VM, if this host keeps a replica of it.
pub fn get(db: &Db, vm_uuid: Uuid) -> rusqlite::Result<Option<ReplicaRow>> {
    db.conn()
        .query_row(
            &format!("SELECT {COLS} FROM replicas WHERE vm_uuid = ?1"),
            params![vm_uuid.to_string()],
            row_to_replica,
        )
        .optional()
}

/// Every replica row, by name.
pub fn list(db: &Db) -> rusqlite::Result<Vec<ReplicaRow>> {
    let mut st = db
        .conn()
        .prepare(&format!("SELECT {COLS} FROM replicas ORDER BY name"))?;
    let rows = st.query_map([], row_to_replica)?;
    rows.collect()
}

/// Records a new replica.
pub fn insert(db: &Db, r: &ReplicaRow) -> rusqlite::Result<()> {
    db.conn().execute(
        &format!(
            "INSERT INTO replicas ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, \
             ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)"
        ),
        params![
            r.vm_uuid.to_string(),
            r.name,
            r.primary_host,
            r.trust_group,
            r.storage_root.to_string_lossy(),
            r.relationship.to_string(),
            serde_json::to_string(&r.definition).map_err(corrupt)?,
            serde_json::to_string(&r.policy).map_err(corrupt)?,
            vmrepl_types::wire_name(&r.state),
            r.last_applied as i64,
            r.created_ms as i64,
            r.last_receive_ms.map(|v| v as i64),
            r.last_apply_ms.map(|v| v as i64),
            r.last_point_ms.map(|v| v as i64),
            r.bytes_received as i64,
            r.logs_received as i64,
            r.last_error,
            r.primary_server,
            to_json_col(r.failover.as_ref())?,
            to_json_col(r.test_failover.as_ref())?,
        ],
    )?;
    Ok(())
}

/// Drops a replica's row (and its network settings).
pub fn delete(db: &Db, vm_uuid: Uuid) -> rusqlite::Result<()> {
    db.conn().execute(
        "DELETE FROM replicas WHERE vm_uuid = ?1",
        params![vm_uuid.to_string()],
    )?;
    db.conn().execute(
        "DELETE FROM replica_networks WHERE vm_uuid = ?1",
        params![vm_uuid.to_string()],
    )?;
    Ok(())
}

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
) -> Result<Vec<vmrepl_types::api::AdapterNetwork>, ApiError> {
    let row = named(d, name)?;
    let db = d.db();
    let mut nets = networks(&db, &row);
    if let Some(a) = adapter {
        if a >= nets.len() {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!(
                    "VM {name} has {} network adapters (0 to {}); there is no adapter {a}.",
                    nets.len(),
                    nets.len().saturating_sub(1)
                ),
            ));
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

/// Records (or clears) a failover and the state it leaves the replica in.
pub fn set_failover(
    db: &Db,
    vm_uuid: Uuid,
    f: Option<&FailoverRecord>,
    state: ReplicationState,
) -> rusqlite::Result<()> {
    db.conn().execute(
        "UPDATE replicas SET failover = ?2, state = ?3, last_error = NULL WHERE vm_uuid = ?1",
        params![
            vm_uuid.to_string(),
            to_json_col(f)?,
            vmrepl_types::wire_name(&state)
        ],
    )?;
    Ok(())
}

/// Records (or clears) a running test failover.
pub fn set_test_failover(db: &Db, vm_uuid: Uuid, t: Option<&TestFailover>) -> rusqlite::Result<()> {
    db.conn().execute(
        "UPDATE replicas SET test_failover = ?2 WHERE vm_uuid = ?1",
        params![vm_uuid.to_string(), to_json_col(t)?],
    )?;
    Ok(())
}

/// The replica row of the VM with this name.
pub fn by_name(db: &Db, name: &str) -> rusqlite::Result<Option<ReplicaRow>> {
    db.conn()
        .query_row(
            &format!("SELECT {COLS} FROM replicas WHERE name = ?1"),
            params![name],
            row_to_replica,
        )
        .optional()
}

/// The name a new replica of `uuid` gets on this host: the primary's name `wanted` when no
/// other replica and no VM of this host has it, else `wanted-2`, `wanted-3`, ... (shortened to
/// fit). Names are unique per replica host whatever the primaries call their VMs, so one
/// primary cannot take the name another's VM (or a local VM) answers to.
pub fn unique_name(db: &Db, wanted: &str, uuid: Uuid) -> rusqlite::Result<String> {
    let taken = |n: &str| -> rusqlite::Result<bool> {
        let replica = by_name(db, n)?.is_some_and(|r| r.vm_uuid != uuid);
        let local = db.vm_by_name(n).ok().flatten().is_some();
        Ok(replica || local)
    };
    if !taken(wanted)? {
        return Ok(wanted.to_string());
    }
    for i in 2..1000u32 {
        let candidate = vmrepl_types::name::with_suffix(wanted, &format!("-{i}"));
        if !taken(&candidate)? {
            return Ok(candidate);
        }
    }
    Ok(uuid.to_string())
}

/// Updates the recovery-point policy.
pub fn set_policy(db: &Db, vm_uuid: Uuid, p: &PointPolicy) -> rusqlite::Result<()> {
    db.conn().execute(
        "UPDATE replicas SET policy = ?2 WHERE vm_uuid = ?1",
        params![
            vm_uuid.to_string(),
            serde_json::to_string(p).map_err(corrupt)?
        ],
    )?;
    Ok(())
}

/// Records a received (durable, verified) log.
pub fn record_received(db: &Db, vm_uuid: Uuid, bytes: u64) -> rusqlite::Result<()> {
    db.conn().execute(
        "UPDATE replicas SET last_receive_ms = ?2, bytes_received = bytes_received + ?3, \
         logs_received = logs_received + 1 WHERE vm_uuid = ?1",
        params![vm_uuid.to_string(), now_ms() as i64, bytes as i64],
    )?;
    Ok(())
}

/// Records the outcome of applying: the last applied sequence and state, or an error.
pub fn record_applied(
    db: &Db,
    vm_uuid: Uuid,
    last_applied: u64,
    point_frozen: bool,
    error: Option<&str>,
    state: ReplicationState,
) -> rusqlite::Result<()> {
    let now = now_ms() as i64;
    db.conn().execute(
        "UPDATE replicas SET last_applied = ?2, state = ?3, last_error = ?4, \
         last_apply_ms = CASE WHEN ?4 IS NULL THEN ?5 ELSE last_apply_ms END, \
         last_point_ms = CASE WHEN ?6 THEN ?5 ELSE last_point_ms END WHERE vm_uuid = ?1",
        params![
            vm_uuid.to_string(),
            last_applied as i64,
            vmrepl_types::wire_name(&state),
            error,
            now,
            point_frozen
        ],
    )?;
    Ok(())
}

/// Records an error (and a state) without touching the rest.
pub fn record_error(
    db: &Db,
    vm_uuid: Uuid,
    state: ReplicationState,
    error: &str,
) -> rusqlite::Result<()> {
    db.conn().execute(
        "UPDATE replicas SET state = ?2, last_error = ?3 WHERE vm_uuid = ?1",
        params![vm_uuid.to_string(), vmrepl_types::wire_name(&state), error],
    )?;
    Ok(())
}

/// Whether a VM with this uuid runs on this host (a normal VM in the `vms` table).
pub fn vm_running(daemon: &Host, vm_uuid: Uuid) -> bool {
    let db = daemon.db();
    match db.vm_by_uuid(vm_uuid) {
        Ok(Some(row)) => !row.state.is_stopped(),
        _ => false,
    }
}

// ------------------------------------------------------------------ adoption

/// Makes the disks (and NVRAM) of `local`, a VM of this host, the base of the replica store
/// of `vm` at sequence `at`. Hard links (a copy across file systems), so a crash at any step
/// loses nothing; the caller deletes the local VM afterwards. Only the disks `vm` replicates
/// are taken.
pub(crate) async fn adopt_disks(
    local: &VmDefinition,
    vm: &VmDefinition,
    storage_root: &Path,
    at: u64,
) -> Result<(), String> {
    let root = storage_root.to_path_buf();
    let local = local.clone();
    let wanted: Vec<String> = vm.disks.iter().map(|x| x.id.clone()).collect();
    let defv = serde_json::to_value(vm).map_err(|e| e.to_string())?;
    let uuid = vm.uuid;
    let unix_ms = now_ms() as i64;
    tokio::task::spawn_blocking(move || {
        crate::fsutil::create_private_dir_all(&root).map_err(|e| e.to_string())?;
        let disks: Vec<(&str, u64, &Path)> = local
            .disks
            .iter()
            .filter(|x| wanted.contains(&x.id))
            .map(|x| (x.id.as_str(), x.size_bytes, x.path.as_path()))
            .collect();
        // Stored under the replicated VM's identity (a restored copy has its own UUID).
        ReplicaStore::adopt(
            &root,
            uuid,
            &defv,
            &disks,
            local.nvram.as_deref(),
            (at, unix_ms),
        )
        .map(drop)
        .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Why a VM of this host cannot serve as the existing copy of `vm` (Hyper-V: the generation
/// and the disks must match), or None when it can.
pub fn existing_copy_mismatch(local: &VmDefinition, vm: &VmDefinition) -> Option<String> {
    if local.generation != vm.generation {
        return Some(format!(
            "it is generation {}, the VM is generation {}",
            local.generation, vm.generation
        ));
    }
    if local.nvram.is_some() != vm.nvram.is_some() {
        return Some(if vm.nvram.is_some() {
            "it has no NVRAM file and the VM has one".into()
        } else {
            "it has an NVRAM file and the VM has none".into()
        });
    }
    let show = |v: &VmDefinition| {
        v.disks
            .iter()
            .map(|x| format!("{} {} bytes", x.id, x.size_bytes))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let fits = vm.disks.iter().all(|want| {
        local
            .disks
            .iter()
            .any(|x| x.id == want.id && x.size_bytes == want.size_bytes)
    });
    (!fits).then(|| {
        format!(
            "its disks ({}) do not match the VM's ({})",
            show(local),
            show(vm)
        )
    })
}

/// `replication server accept-copy`: this host's admin designates the stopped local VM
/// `name` as the existing copy that `primary` may adopt (or withdraws that). Only a designated
/// VM can ever be adopted, and only by the primary named here.
pub fn accept_copy(
    d: &Host,
    name: &vmrepl_types::VmName,
    primary: &str,
    withdraw: bool,
) -> Result<String, ApiError> {
    let primary = vmrepl_transport::authz::normalize_host_name(primary).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidInput,
            format!("{primary:?} is not a host name: {e}."),
        )
    })?;
    let vm = d.vmm.show(name)?;
    let uuid = vm.definition.uuid;
    let replicated = crate::primary::load(d, uuid).is_some();
    let db = d.db();
    let sql = |e: rusqlite::Error| ApiError::new(ErrorCode::Internal, e.to_string());
    if withdraw {
        let n = db
            .conn()
            .execute(
                "DELETE FROM accepted_copies WHERE vm_uuid = ?1",
                [uuid.to_string()],
            )
            .map_err(sql)?;
        return Ok(if n == 0 {
            format!("VM {name} was not designated as an existing copy; nothing changed.")
        } else {
            let _ = db.event(
                Some(uuid),
                &format!("{name} is no longer an existing copy for a primary"),
            );
            format!("VM {name} can no longer be adopted by any primary.")
        });
    }
    if replicated {
        return Err(ApiError::new(
            ErrorCode::WrongState,
            format!("VM {name} is itself replicated; remove its replication first (`vmrepl replication remove {name}`)."),
        ));
    }
    db.conn()
        .execute(
            "INSERT INTO accepted_copies (vm_uuid, primary_host, created_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (vm_uuid) DO UPDATE SET primary_host = excluded.primary_host, created_ms = excluded.created_ms",
            rusqlite::params![uuid.to_string(), primary, now_ms() as i64],
        )
        .map_err(sql)?;
    let _ = db.event(
        Some(uuid),
        &format!("{name} designated as the existing copy for primary {primary}"),
    );
    Ok(format!(
        "VM {name} may now be adopted by {primary} as the replica of its VM {name} \
         (`vmrepl replication enable {name} --initial-existing-copy ...` on {primary}); its \
         replicated disks then belong to the replica, and no other primary can take it."
    ))
}

/// The local VM that `peer` may adopt as the existing copy of `vm`: the stopped VM named like
/// it that this host's admin designated for `peer`. The refusal says the same whether or not
/// a VM of that name exists, so a peer learns nothing of this host's VMs.
fn designated_copy(
    d: &Host,
    peer: &str,
    vm: &VmDefinition,
) -> Result<VmDefinition, (RefusalCode, String)> {
    let host = d.cfg().host_name.clone();
    let peer_norm = vmrepl_transport::authz::normalize_host_name(peer).unwrap_or_default();
    let refused = || {
        (
            RefusalCode::NotAuthorized,
            format!(
                "no VM on {host} is designated as the existing copy of {} for {peer}; the admin \
                 of {host} designates one with `vmrepl replication server accept-copy {} \
                 --primary {peer}`",
                vm.name, vm.name
            ),
        )
    };
    let local = d.vmm.show(&vm.name).map_err(|_| refused())?;
    let uuid = local.definition.uuid;
    let designated: Option<String> = {
        let db = d.db();
        db.conn()
            .query_row(
                "SELECT primary_host FROM accepted_copies WHERE vm_uuid = ?1",
                [uuid.to_string()],
                |r| r.get(0),
            )
            .ok()
    };
    if designated.as_deref() != Some(peer_norm.as_str()) || peer_norm.is_empty() {
        return Err(refused());
    }
    if !local.state.is_stopped() {
        return Err((
            RefusalCode::VmRunning,
            format!(
                "the existing copy {} on {host} is {}; shut it down first",
                vm.name, local.state
            ),
        ));
    }
    Ok(local.definition)
}

/// Initial replication from an existing copy: the stopped VM named like `vm` on this host,
/// designated by this host's admin for `peer`, becomes the base of `vm`'s replica store at
/// sequence 0 and is no longer a VM of its own. Only its replicated disks are taken; any
/// other disk stays where it is.
pub async fn adopt_existing_copy(
    d: &Arc<Host>,
    peer: &str,
    vm: &VmDefinition,
    storage_root: &Path,
) -> Result<(), (RefusalCode, String)> {
    let host = d.cfg().host_name.clone();
    let local = designated_copy(d, peer, vm)?;
    if crate::primary::load(d, local.uuid).is_some() {
        return Err((
            RefusalCode::Conflict,
            format!(
                "VM {} on {host} is itself replicated; remove its replication before using it as an existing copy",
                vm.name
            ),
        ));
    }
    if let Some(why) = existing_copy_mismatch(&local, vm) {
        return Err((
            RefusalCode::Incompatible,
            format!(
                "VM {} on {host} cannot be the existing copy: {why}",
                vm.name
            ),
        ));
    }
    d.vmm
        .set_failover_lock(local.uuid, true)
        .await
        .map_err(|e| (RefusalCode::VmRunning, e.message))?;
    if let Err(e) = adopt_disks(&local, vm, storage_root, 0).await {
        // Nothing was taken: the copy stays a VM of this host, free to start again.
        let _ = d.vmm.set_failover_lock(local.uuid, false).await;
        return Err((
            RefusalCode::Internal,
            format!("cannot take the disks of {} as the replica: {e}", vm.name),
        ));
    }
    // The adopted disks live on in the store (hard links or copies); the VM's own names for
    // them go, the disks it did not replicate stay.
    d.vmm
        .delete(&vm.name, true)
        .await
        .map_err(|e| (RefusalCode::Internal, e.message))?;
    for x in local.disks.iter().filter(|x| vm.disk(&x.id).is_some()) {
        let _ = std::fs::remove_file(&x.path);
    }
    if let Some(n) = &local.nvram {
        let _ = std::fs::remove_file(n);
    }
    {
        let db = d.db();
        let _ = db.conn().execute(
            "DELETE FROM accepted_copies WHERE vm_uuid = ?1",
            [local.uuid.to_string()],
        );
    }
    tracing::info!(target: "vmrepl::replica", vm = %vm.uuid, name = %vm.name, peer, "existing copy adopted at sequence 0");
    Ok(())
}

// ------------------------------------------------------------------ receiving logs

/// The replica VM named `name` on this host, or an error that says where replica-side
/// commands run.
pub(crate) fn named(d: &Host, name: &vmrepl_types::VmName) -> Result<ReplicaRow, ApiError> {
    let db = d.db();
    let sql = |e: rusqlite::Error| ApiError::new(ErrorCode::Internal, e.to_string());
    let found = match by_name(&db, name.as_str()).map_err(sql)? {
        Some(r) => Some(r),
        // Every replica-side command also takes the VM's UUID.
        None => match name.as_str().parse::<Uuid>() {
            Ok(u) => get(&db, u).map_err(sql)?,
            Err(_) => None,
        },
    };
    found.ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("This host keeps no replica of a VM named {name}; failover and import run on the replica server. `vmrepl replication status` lists what this host replicates."),
            )
        })
}

/// Why a spooled log was not accepted.
#[derive(Debug)]
pub enum Unaccepted {
    /// It failed verification and was removed.
    Bad(String),
    /// It verified but could not be made durable; it stays in the spool.
    NotDurable(String),
}

/// A log checked whole as it was received: its header, or why it is bad.
pub type Verified = Result<vmrepl_log::LogHeader, String>;

/// Verifies the partial log `seq` (on `base`) in the replica's spool whole: its checksums, then
/// VM, sequence, base, disks and sizes against the replica (I4), and its kind when `kind` is
/// given; then makes it durable under its verified name (I1). A log that fails verification is
/// removed. Logs received over the network and initial copies imported from external media
/// both come through here. `verified` is the result of checking the log while it arrived
/// ([`vmrepl_log::verify_reader`] over the received bytes); without it the file is verified
/// here.
pub async fn accept_spooled(
    row: &ReplicaRow,
    seq: u64,
    base: u64,
    kind: Option<vmrepl_log::LogKind>,
    verified: Option<Verified>,
) -> Result<(), Unaccepted> {
    let (dir, uuid) = (vm_dir(row), row.vm_uuid);
    let disks: Vec<(String, u64)> = row
        .definition
        .disks
        .iter()
        .map(|x| (x.id.clone(), x.size_bytes))
        .collect();
    tokio::task::spawn_blocking(move || {
        let partial = vmrepl_store::spool::partial_path(&dir, seq);
        let verified = verified
            .unwrap_or_else(|| {
                vmrepl_log::verify(&partial)
                    .map(|(h, _)| h)
                    .map_err(|e| e.to_string())
            })
            .and_then(|h| {
                check_header(&h, uuid, seq, base, &disks)?;
                match kind {
                    Some(k) if h.kind != k => Err(format!(
                        "it is a {:?} log where a {k:?} log was expected",
                        h.kind
                    )),
                    _ => Ok(()),
                }
            });
        if let Err(e) = verified {
            let _ = std::fs::remove_file(&partial);
            return Err(Unaccepted::Bad(e));
        }
        vmrepl_store::spool::accept(&dir, seq)
            .map(drop)
            .map_err(|e| Unaccepted::NotDurable(e.to_string()))
    })
    .await
    .unwrap_or_else(|e| Err(Unaccepted::NotDurable(e.to_string())))
}

/// Imports the initial copy a primary exported to external media (Import-VMInitialReplication):
/// `from` is the exported `NAME.vmrlog`, or the folder that holds it. The log is copied into
/// the replica's spool, verified whole (checksums, VM, sequence 1 on 0, disks), made durable
/// and applied, exactly as a log received over the network; the primary notices at its next
/// cycle and continues with the changes since the export.
pub async fn import_initial(
    d: &Arc<Host>,
    name: &vmrepl_types::VmName,
    from: &Path,
) -> Result<String, ApiError> {
    let e = |code: ErrorCode, m: String| ApiError::new(code, m);
    let row = named(d, name)?;
    if row.failover.is_some() {
        return Err(e(
            ErrorCode::WrongState,
            format!("The replica of {name} has failed over; it takes no initial copy."),
        ));
    }
    let file = if from.is_dir() {
        from.join(format!("{name}.vmrlog"))
    } else {
        from.to_path_buf()
    };
    let size = std::fs::metadata(&file)
        .map_err(|x| {
            e(
                ErrorCode::NotFound,
                format!(
                    "Cannot read the exported initial copy {}: {x}.",
                    file.display()
                ),
            )
        })?
        .len();
    let dir = vm_dir(&row);
    let lock = d.replica_locks.vm(&dir);
    let _g = lock.lock().await;
    let last = apply_and_record(d, &row).await.map_err(|x| {
        e(
            ErrorCode::Internal,
            format!("The replica of {name} cannot apply its logs: {x}"),
        )
    })?;
    if last >= 1 {
        return Err(e(
            ErrorCode::WrongState,
            format!("The replica of {name} already holds its initial copy (log {last} applied); nothing was imported."),
        ));
    }
    let free = vmrepl_store::spool::free_bytes(&dir).unwrap_or(u64::MAX);
    if free < size.saturating_add(vmrepl_store::SPACE_HEADROOM) {
        return Err(e(
            ErrorCode::Internal,
            format!(
                "The replica storage {} has {free} bytes free; importing {} needs {size} bytes and more to apply it. Free some space and import again.",
                dir.display(),
                file.display()
            ),
        ));
    }
    let unusable = |why: String| {
        e(
            ErrorCode::InvalidInput,
            format!(
                "{} is not a usable initial copy of {name}: {why}. Nothing was changed; export it again on the primary if it is damaged.",
                file.display()
            ),
        )
    };
    // The primary must still be authorized here, in the replica's trust group (an entry
    // revoked since the export takes its media with it). Its certificate was checked, pins
    // included, when it announced the export below.
    let authorized = {
        let cfg = d.cfg.read().unwrap_or_else(|p| p.into_inner());
        vmrepl_transport::authz::Authorization::try_from(&cfg.replica_server)
            .map_err(|x| x.to_string())
            .and_then(|a| match a.authorize(&row.primary_host) {
                Ok(g) if g.trust_group == row.trust_group => Ok(()),
                Ok(g) => Err(format!(
                    "it is now in trust group {:?}, the replica in {:?}",
                    g.trust_group, row.trust_group
                )),
                Err(vmrepl_transport::authz::AuthzError::NoCertificateToCheck { .. }) => Ok(()),
                Err(x) => Err(x.to_string()),
            })
    };
    if let Err(why) = authorized {
        return Err(e(
            ErrorCode::WrongState,
            format!(
                "The primary {} of {name} is not authorized on this host any more ({why}); nothing was imported. Authorize it again (`vmrepl replication server authorize`) or remove the replica.",
                row.primary_host
            ),
        ));
    }
    // Only the very file the primary announced (over TLS) is imported: media can be altered
    // or forged on the way, and a forged log can be valid.
    let expected: ExpectedImport = std::fs::read(expected_import_path(&row))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| {
            e(
                ErrorCode::WrongState,
                format!(
                    "The primary {} has not announced an exported initial copy of {name}; it does when it writes the export (with `--initial-export`). Nothing was imported.",
                    row.primary_host
                ),
            )
        })?;
    let (src, partial) = (file.clone(), vmrepl_store::spool::partial_path(&dir, 1));
    let primary = row.primary_host.clone();
    tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_file(&partial);
        let copied = crate::fsutil::copy_private(&src, &partial)
            .map(drop)
            .map_err(|x| format!("cannot copy it: {x}"))
            .and_then(|()| {
                let mut h = blake3::Hasher::new();
                let f = std::fs::File::open(&partial).map_err(|x| x.to_string())?;
                let n = f.metadata().map_err(|x| x.to_string())?.len();
                h.update_reader(f).map_err(|x| x.to_string())?;
                let got = h.finalize().to_hex().to_string();
                if n != expected.bytes || got != expected.blake3 {
                    return Err(format!(
                        "it does not match what {primary} exported ({n} bytes with digest {got}, not {} bytes with digest {}); it was altered on the way, or it is another export",
                        expected.bytes, expected.blake3
                    ));
                }
                Ok(())
            });
        if copied.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        copied
    })
    .await
    .map_err(|x| e(ErrorCode::Internal, x.to_string()))?
    .map_err(unusable)?;
    // From here on exactly as a log that came over the network.
    match accept_spooled(&row, 1, 0, Some(vmrepl_log::LogKind::Initial), None).await {
        Ok(()) => {}
        Err(Unaccepted::Bad(why)) => return Err(unusable(why)),
        Err(Unaccepted::NotDurable(why)) => {
            return Err(e(
                ErrorCode::Internal,
                format!("The initial copy of {name} could not be made durable: {why}."),
            ))
        }
    }
    {
        let db = d.db();
        let _ = record_received(&db, row.vm_uuid, size);
        let _ = db.event(
            Some(row.vm_uuid),
            &format!("initial copy of {name} imported from {}", file.display()),
        );
    }
    let applied = apply_and_record(d, &row)
        .await
        .map_err(|x| e(ErrorCode::Internal, format!("The initial copy of {name} was imported but could not be applied yet: {x}. It is kept and applied again at the next log or daemon start.")))?;
    Ok(format!(
        "Initial copy of {name} imported from {} ({} MiB); log {applied} applied. The primary {} continues with the changes since the export at its next cycle.",
        file.display(),
        size >> 20,
        row.primary_host
    ))
}

// ------------------------------------------------------------------ per-VM locks

/// Puts the received, verified boot file `tmp` in place as `file` in the replica's `boot`
/// folder, with its digest beside it (`NAME.b3`): durable before it is acknowledged.
pub fn place_boot_file(
    boot: &Path,
    file: crate::peer::proto::BootFile,
    tmp: &Path,
    hex: &str,
) -> Result<(), String> {
    let to = boot.join(file.file_name());
    let sum = boot.join(format!("{}.b3", file.file_name()));
    // The digest goes first: a crash between the two leaves a digest that does not match the
    // file, and the primary sends the file again.
    crate::fsutil::write_atomic(&sum, hex.as_bytes()).map_err(|e| e.to_string())?;
    std::fs::rename(tmp, &to).map_err(|e| format!("{}: {e}", to.display()))?;
    std::fs::File::open(boot)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", boot.display()))
}

/// The boot files a replica keeps, with their digests (see [`place_boot_file`]).
pub fn boot_files(vm_dir: &Path) -> Vec<(crate::peer::proto::BootFile, String)> {
    use crate::peer::proto::BootFile;
    let boot = vm_dir.join("boot");
    [BootFile::Kernel, BootFile::Initrd]
        .into_iter()
        .filter(|f| boot.join(f.file_name()).is_file())
        .filter_map(|f| {
            let hex = std::fs::read_to_string(boot.join(format!("{}.b3", f.file_name()))).ok()?;
            Some((f, hex.trim().to_string()))
        })
        .collect()
}

/// What the primary said it exported as the initial copy (see `PeerRequest::ExpectImport`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ExpectedImport {
    bytes: u64,
    blake3: String,
}

fn expected_import_path(row: &ReplicaRow) -> PathBuf {
    // In the spool folder, which goes with the store (the spool ignores names it does not know).
    vm_dir(row).join("logs").join("import-expected.json")
}

/// Records the size and digest of the initial copy the primary exported, durably.
pub fn expect_import(row: &ReplicaRow, bytes: u64, blake3: &str) -> Result<(), String> {
    if blake3.len() != 64 || !blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{blake3:?} is not a BLAKE3 digest in hex"));
    }
    let e = ExpectedImport {
        bytes,
        blake3: blake3.to_ascii_lowercase(),
    };
    let json = serde_json::to_vec(&e).map_err(|e| e.to_string())?;
    let p = expected_import_path(row);
    crate::fsutil::write_atomic(&p, &json).map_err(|e| format!("{}: {e}", p.display()))
}

/// The folder of a replica VM.
pub fn vm_dir(row: &ReplicaRow) -> PathBuf {
    ReplicaStore::vm_dir(&row.storage_root, row.vm_uuid)
}

// ------------------------------------------------------------------ apply

/// What applying one log did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub seq: u64,
    /// False when the log had been applied before (idempotent no-op, I3).
    pub applied: bool,
    pub unix_ms: i64,
    pub consistency: Consistency,
}

fn consistency(c: vmrepl_log::Consistency) -> Consistency {
    match c {
        vmrepl_log::Consistency::Crash => Consistency::Crash,
        vmrepl_log::Consistency::AppConsistent => Consistency::AppConsistent,
        vmrepl_log::Consistency::Planned => Consistency::Planned,
    }
}

/// Why a log could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("log {path} cannot be applied: {reason}")]
    Log { path: PathBuf, reason: String },
    #[error(
        "log {path} is damaged on this host ({reason}); it was set aside, and the primary \
         resynchronizes the replica by block compare"
    )]
    Damaged { path: PathBuf, reason: String },
    #[error("the apply task failed: {0}")]
    Task(String),
}

impl ApplyError {
    /// The replication state an apply failure leaves the replica in.
    pub fn state(&self) -> ReplicationState {
        match self {
            ApplyError::Store(e) if e.needs_resync() => ReplicationState::ResynchronizationRequired,
            ApplyError::Damaged { .. } => ReplicationState::ResynchronizationRequired,
            _ => ReplicationState::Error,
        }
    }

    /// Whether the failure is a full replica storage.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, ApplyError::Store(StoreError::DiskFull { .. }))
    }
}

/// Checks a received log's header against the replica (VM id, sequence, base, disks and sizes).
pub fn check_header(
    h: &vmrepl_log::LogHeader,
    vm_uuid: Uuid,
    seq: u64,
    base: u64,
    disks: &[(String, u64)],
) -> Result<(), String> {
    if h.vm_id != vm_uuid {
        return Err(format!(
            "the log belongs to VM {} but was sent for VM {vm_uuid}",
            h.vm_id
        ));
    }
    if h.sequence != seq || h.base_sequence != base {
        return Err(format!(
            "the log is sequence {} on base {}, but was sent as sequence {seq} on base {base}",
            h.sequence, h.base_sequence
        ));
    }
    for d in &h.disks {
        if d.id == NVRAM_DISK_ID {
            if d.virtual_size > MAX_NVRAM_BYTES {
                return Err(format!(
                    "the NVRAM in the log is {} bytes; at most {MAX_NVRAM_BYTES} are accepted",
                    d.virtual_size
                ));
            }
            continue;
        }
        match disks.iter().find(|(id, _)| *id == d.id) {
            None => {
                return Err(format!(
                    "the log names disk {:?}, which the replica VM does not have (it has {})",
                    d.id,
                    disks
                        .iter()
                        .map(|(i, _)| i.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
            Some((_, size)) if *size != d.virtual_size => {
                return Err(format!(
                    "the log gives disk {} a size of {} bytes; the replica's disk is {size} bytes \
                     (disk resizes are not replicated; resynchronize)",
                    d.id, d.virtual_size
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Applies the verified log file `path` to `vm` (blocking; call from `spawn_blocking` with the
/// VM's lock held). Logs at or below the last applied sequence are a no-op.
pub fn apply_log(vm: &mut ReplicaVm, path: &Path, verified: bool) -> Result<Applied, ApplyError> {
    let lerr = |reason: String| ApplyError::Log {
        path: path.to_path_buf(),
        reason,
    };
    // The log's own content is wrong (it verified when it arrived, so the disk damaged it).
    let derr = |reason: String| ApplyError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    let f = std::fs::File::open(path).map_err(|e| lerr(e.to_string()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let buffered = std::io::BufReader::with_capacity(256 * 1024, f);
    let mut reader = if verified {
        vmrepl_log::LogReader::verified_before(buffered)
    } else {
        vmrepl_log::LogReader::new(buffered)
    }
    .map_err(|e| derr(e.to_string()))?;
    let h = reader.header().clone();
    let disks = vm.disks();
    check_header(&h, vm.vm_uuid(), h.sequence, h.base_sequence, &disks).map_err(derr)?;
    let out = Applied {
        seq: h.sequence,
        applied: true,
        unix_ms: h.timestamp_unix_ms as i64,
        consistency: consistency(h.consistency),
    };
    vm.check_space(len)?;
    let mut txn = match vm.begin_apply(h.sequence, h.base_sequence)? {
        vmrepl_store::Begin::AlreadyApplied { .. } => {
            return Ok(Applied {
                applied: false,
                ..out
            })
        }
        vmrepl_store::Begin::Apply(txn) => txn,
    };
    let mut nvram: Option<Vec<u8>> = None;
    while let Some(rec) = reader.next_record().map_err(|e| derr(e.to_string()))? {
        let Some(d) = h.disks.get(usize::from(rec.disk_index)) else {
            return Err(derr(format!("record for unknown disk #{}", rec.disk_index)));
        };
        if d.id == NVRAM_DISK_ID {
            let buf = nvram.get_or_insert_with(|| vec![0u8; d.virtual_size as usize]);
            let (off, n) = match rec.content {
                vmrepl_log::ContentRef::Data(b) => (rec.offset, b.len() as u64),
                vmrepl_log::ContentRef::Zero(n) => (rec.offset, u64::from(n)),
            };
            let end = off
                .checked_add(n)
                .filter(|e| *e <= buf.len() as u64)
                .ok_or_else(|| derr(format!("NVRAM extent {off}+{n} beyond its size")))?;
            let range = off as usize..end as usize;
            match rec.content {
                vmrepl_log::ContentRef::Data(b) => buf[range].copy_from_slice(b),
                vmrepl_log::ContentRef::Zero(_) => buf[range].fill(0),
            }
            continue;
        }
        match rec.content {
            vmrepl_log::ContentRef::Data(b) => txn.write(&d.id, rec.offset, b)?,
            vmrepl_log::ContentRef::Zero(n) => txn.write_zeroes(&d.id, rec.offset, u64::from(n))?,
        }
    }
    if let Some(nv) = nvram {
        txn.set_nvram(&nv);
    }
    txn.commit(out.unix_ms, out.consistency)?;
    Ok(out)
}

/// Applies every pending log of `vm` in order (blocking). Pending logs were verified whole
/// before they got their spool name (`vmrepl_store::spool`), so they are not read twice; a log
/// that does not build on what is applied (a gap) waits for the primary.
pub fn apply_pending(
    vm: &mut ReplicaVm,
    verified: Option<u64>,
) -> Result<Vec<Applied>, ApplyError> {
    let mut done = Vec::new();
    for (seq, path) in vm.pending_logs()? {
        if seq != vm.last_applied() + 1 {
            break;
        }
        let t0 = std::time::Instant::now();
        match apply_log(vm, &path, verified == Some(seq)) {
            Ok(a) => done.push(a),
            // A damaged log never applies: set it aside (kept for a post-mortem) so that
            // nothing waits on it, and let a resynchronization repair the replica.
            Err(ApplyError::Damaged { path, reason }) => {
                let aside = path.with_extension("damaged");
                let _ = std::fs::rename(&path, &aside);
                tracing::error!(target: "vmrepl::replica", seq, path = %aside.display(), "damaged log set aside: {reason}");
                return Err(ApplyError::Damaged {
                    path: aside,
                    reason,
                });
            }
            Err(e) => return Err(e),
        }
        tracing::info!(target: "vmrepl::replica", seq, ms = t0.elapsed().as_millis() as u64, "log applied");
    }
    vm.discard_applied_logs()?;
    Ok(done)
}

/// After logs were applied: freeze a recovery point when the policy says so, and prune.
/// Returns whether a point was frozen.
pub fn points_after_apply(
    vm: &mut ReplicaVm,
    last: &Applied,
    policy: &PointPolicy,
    last_point_ms: Option<u64>,
) -> Result<bool, StoreError> {
    if policy.keep == 0 {
        // Only the latest point is kept.
        vm.prune(0)?;
        return Ok(false);
    }
    let has_frozen = vm
        .points()
        .iter()
        .any(|p| p.kind == vmrepl_store::PointKind::Frozen);
    // An app-consistent log always becomes a recovery point (Hyper-V's app-consistent
    // snapshots are recovery points too), whatever the interval says.
    let due = match last_point_ms {
        _ if !has_frozen => true,
        _ if last.consistency == Consistency::AppConsistent => true,
        None => true,
        Some(t) => now_ms().saturating_sub(t) >= u64::from(policy.interval_secs) * 1000,
    };
    let frozen = if due
        && !vm
            .points()
            .iter()
            .any(|p| p.kind == vmrepl_store::PointKind::Frozen && p.seq == last.seq)
    {
        vm.freeze_point(last.seq, last.unix_ms, last.consistency)?;
        true
    } else {
        false
    };
    vm.prune(policy.keep as usize)?;
    Ok(frozen)
}

/// Opens the store, applies pending logs, manages points and updates the row. Blocking part
/// run under the VM's lock. Returns the last applied sequence.
pub async fn apply_and_record(daemon: &Arc<Host>, row: &ReplicaRow) -> Result<u64, ApplyError> {
    apply_with(daemon, row, None).await
}

/// [`apply_and_record`] right after log `seq` was verified whole on its way in: that log's
/// content checksums are not computed a second time ([`vmrepl_log::LogReader::verified_before`]).
pub async fn apply_verified(
    daemon: &Arc<Host>,
    row: &ReplicaRow,
    seq: u64,
) -> Result<u64, ApplyError> {
    apply_with(daemon, row, Some(seq)).await
}

async fn apply_with(
    daemon: &Arc<Host>,
    row: &ReplicaRow,
    verified: Option<u64>,
) -> Result<u64, ApplyError> {
    let root = row.storage_root.clone();
    let uuid = row.vm_uuid;
    let policy = row.policy;
    let last_point_ms = row.last_point_ms;
    let test_point = row.test_failover.as_ref().map(|t| t.point_seq);
    let res = tokio::task::spawn_blocking(move || -> Result<(u64, bool), ApplyError> {
        let mut vm = ReplicaStore::open(&root, uuid)?;
        // A running test failover pins its point (and everything below) against pruning.
        let _pins: Vec<vmrepl_store::PointLock> = test_point
            .iter()
            .filter_map(|s| vm.lock_point(*s).ok())
            .collect();
        let applied = apply_pending(&mut vm, verified);
        let frozen = match &applied {
            Ok(list) if !list.is_empty() => {
                let last = list[list.len() - 1];
                match points_after_apply(&mut vm, &last, &policy, last_point_ms) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::warn!(target: "vmrepl::replica", vm = %uuid, "recovery point: {e}");
                        false
                    }
                }
            }
            _ => false,
        };
        applied.map(|_| (vm.last_applied(), frozen))
    })
    .await
    .map_err(|e| ApplyError::Task(e.to_string()))?;
    let db = daemon.db();
    match res {
        Ok((last, frozen)) => {
            let state = if last == 0 {
                ReplicationState::WaitingForInitialReplication
            } else {
                ReplicationState::Replicating
            };
            if let Err(e) = record_applied(&db, uuid, last, frozen, None, state) {
                tracing::error!(target: "vmrepl::replica", vm = %uuid, "cannot record: {e}");
            }
            Ok(last)
        }
        Err(e) => {
            tracing::error!(target: "vmrepl::replica", vm = %uuid, "apply failed: {e}");
            let _ = record_error(&db, uuid, e.state(), &e.to_string());
            Err(e)
        }
    }
}

/// At daemon start: for every replica, re-apply the logs that were received (durable and
/// verified) but not applied, e.g. because the host crashed during apply (I3).
pub async fn recover(daemon: &Arc<Host>) {
    let rows = {
        let db = daemon.db();
        list(&db).unwrap_or_else(|e| {
            tracing::error!(target: "vmrepl::replica", "cannot list replicas: {e}");
            Vec::new()
        })
    };
    // A failed-over replica takes no logs, and after completion it has no store any more.
    for row in rows.into_iter().filter(|r| r.failover.is_none()) {
        let lock = daemon.replica_locks.vm(&vm_dir(&row));
        let _g = lock.lock().await;
        match apply_and_record(daemon, &row).await {
            Ok(last) => {
                tracing::info!(target: "vmrepl::replica", vm = %row.vm_uuid, name = %row.name, last_applied = last, "replica recovered")
            }
            Err(e) => {
                tracing::warn!(target: "vmrepl::replica", vm = %row.vm_uuid, name = %row.name, "replica recovery: {e}")
            }
        }
    }
}

// ------------------------------------------------------------------ status

/// Health of a replica per Hyper-V's replica-side rules, with the sentences that explain it.
fn health(r: &ReplicaRow, now: u64) -> (Health, Vec<String>) {
    let mut details = Vec::new();
    let mut h = Health::Normal;
    match r.state {
        ReplicationState::Error | ReplicationState::ResynchronizationRequired => {
            h = Health::Critical;
            details.push(format!(
                "Replication of {} is in state {}: {}",
                r.name,
                r.state,
                r.last_error.as_deref().unwrap_or("see the host log")
            ));
        }
        _ => {}
    }
    if r.last_applied == 0 {
        h = h.max(Health::Warning);
        details.push(format!(
            "Initial replication of {} is not complete yet.",
            r.name
        ));
    }
    let last = r.last_receive_ms.unwrap_or(r.created_ms);
    if now.saturating_sub(last) > RECEIVE_WARNING_MS {
        h = h.max(Health::Warning);
        details.push(format!(
            "Replica virtual machine '{}' has received nothing from {} for more than an hour.",
            r.name, r.primary_host
        ));
    }
    (h, details)
}

fn failover_note(r: &ReplicaRow) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(f) = &r.failover {
        parts.push(format!(
            "{} failover to point {}{}",
            if f.planned { "planned" } else { "unplanned" },
            f.point_seq,
            if r.state == ReplicationState::FailedOver {
                "; `vmrepl replication reverse` replicates back to the old primary"
            } else {
                "; `vmrepl failover complete` keeps it, `failover cancel` undoes it"
            }
        ));
    }
    if let Some(t) = &r.test_failover {
        parts.push(format!(
            "test failover running as VM {:?} from point {}",
            t.name, t.point_seq
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// The status of every replica VM on this host.
pub fn statuses(daemon: &Host) -> Vec<ReplicationStatus> {
    let rows = {
        let db = daemon.db();
        list(&db).unwrap_or_default()
    };
    let me = daemon
        .cfg
        .read()
        .map(|c| c.host_name.clone())
        .unwrap_or_default();
    let now = now_ms();
    rows.into_iter()
        .map(|r| {
            let (health, health_details) = health(&r, now);
            ReplicationStatus {
                // Its name on this host (unique here), which replica-side commands take.
                vm: vmrepl_types::VmName::new(&r.name)
                    .unwrap_or_else(|_| r.definition.name.clone()),
                vm_uuid: r.vm_uuid,
                role: Role::Replica,
                state: r.state,
                health,
                health_details,
                primary_host: r.primary_host.clone(),
                replica_host: me.clone(),
                frequency_secs: None,
                app_consistent_hours: None,
                last_sequence: r.last_applied,
                waiting_on: None,
                last_error: r.last_error.clone(),
                note: failover_note(&r),
                progress: None,
                stats: ReplicationStats {
                    success_count: r.logs_received,
                    total_bytes: r.bytes_received,
                    last_replication_unix: r.last_receive_ms.map(|m| m / 1000),
                    ..Default::default()
                },
            }
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vmrepl_types::vm::{ConfigVersion, DiskDef, FirmwareVariantId, Generation};
    use vmrepl_types::VmName;

    /// A generation 1 VM with these disks (id, size).
    pub(crate) fn def(disks: &[(&str, u64)]) -> VmDefinition {
        VmDefinition {
            name: VmName::new("app").unwrap(),
            uuid: Uuid::new_v4(),
            generation: Generation::Bios,
            firmware: FirmwareVariantId::Seabios,
            machine_type: "pc-i440fx-7.2".into(),
            config_version: ConfigVersion::CURRENT,
            vcpus: 1,
            memory_mib: 128,
            disks: disks
                .iter()
                .map(|(id, size)| DiskDef {
                    id: id.to_string(),
                    path: PathBuf::from(format!("/srv/{id}.qcow2")),
                    size_bytes: *size,
                })
                .collect(),
            nics: vec![],
            kernel: None,
            nvram: None,
        }
    }

    #[test]
    fn an_existing_copy_needs_the_generation_nvram_and_every_replicated_disk_of_the_vm() {
        let vm = def(&[("disk0", 1 << 30), ("disk1", 1 << 20)]);
        // Same disks, another UUID and other paths: fine.
        assert_eq!(
            existing_copy_mismatch(&def(&[("disk0", 1 << 30), ("disk1", 1 << 20)]), &vm),
            None
        );
        // An extra disk on the copy is not taken; it does not stand in the way.
        let extra = def(&[("disk0", 1 << 30), ("disk1", 1 << 20), ("disk2", 4096)]);
        assert_eq!(existing_copy_mismatch(&extra, &vm), None);
        // A missing disk or one of another size is named with both sides' disks.
        for copy in [
            def(&[("disk0", 1 << 30)]),
            def(&[("disk0", 1 << 30), ("disk1", 2 << 20)]),
        ] {
            let why = existing_copy_mismatch(&copy, &vm).unwrap();
            assert!(why.contains("do not match"), "{why}");
            assert!(why.contains("disk1 1048576 bytes"), "{why}");
        }
        let mut uefi = def(&[("disk0", 1 << 30), ("disk1", 1 << 20)]);
        uefi.generation = Generation::Uefi;
        let why = existing_copy_mismatch(&uefi, &vm).unwrap();
        assert!(why.contains("generation 2 (UEFI)"), "{why}");
        let mut with_nvram = def(&[("disk0", 1 << 30), ("disk1", 1 << 20)]);
        with_nvram.nvram = Some(PathBuf::from("/srv/vars.fd"));
        let why = existing_copy_mismatch(&with_nvram, &vm).unwrap();
        assert!(why.contains("NVRAM"), "{why}");
    }
}
