//! The replica VMs this host keeps (table `replicas`, migration 3, and their networks,
//! migration 7): read, insert, delete and the bookkeeping of received and applied logs,
//! failovers and test failovers.

use super::{now_ms, ChangeError, Db, DbError, Transition};
use crate::lifecycle::{on_replica, LastError, ReplicaEvent};
use crate::peer::proto::PointPolicy;
use rusqlite::{params, OptionalExtension};
use std::path::PathBuf;
use uuid::Uuid;
use vmrepl_types::replication::{ReplicationState, Role};
use vmrepl_types::VmDefinition;

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

pub(crate) fn corrupt(e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(e.to_string().into())
}

pub(crate) const COLS: &str =
    "vm_uuid, name, primary_host, trust_group, storage_root, relationship, \
    definition, policy, state, last_applied, created_ms, last_receive_ms, last_apply_ms, \
    last_point_ms, bytes_received, logs_received, last_error, primary_server, failover, \
    test_failover";

pub(crate) fn json_col<T: serde::de::DeserializeOwned>(
    v: Option<String>,
) -> rusqlite::Result<Option<T>> {
    v.map(|t| serde_json::from_str(&t).map_err(corrupt))
        .transpose()
}

pub(crate) fn to_json_col<T: serde::Serialize>(v: Option<&T>) -> rusqlite::Result<Option<String>> {
    v.map(|t| serde_json::to_string(t).map_err(corrupt))
        .transpose()
}

pub(crate) fn row_to_replica(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReplicaRow> {
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

/// What a replica's state change also writes.
#[derive(Debug, Clone, Copy)]
pub enum ReplicaUpdate<'a> {
    None,
    /// An apply pass: the last applied sequence, and whether it made a new recovery point.
    Applied {
        last: u64,
        new_point: bool,
    },
    /// The failover record (set at a failover, cleared when it is cancelled).
    Failover(Option<&'a FailoverRecord>),
}

impl Db {
    /// The replica row of a VM, if this host keeps a replica of it.
    pub fn replica(&self, vm_uuid: Uuid) -> Result<Option<ReplicaRow>, DbError> {
        self.conn
            .query_row(
                &format!("SELECT {COLS} FROM replicas WHERE vm_uuid = ?1"),
                params![vm_uuid.to_string()],
                row_to_replica,
            )
            .optional()
            .map_err(DbError::from)
    }

    /// Every replica row, by name.
    pub fn replicas(&self) -> Result<Vec<ReplicaRow>, DbError> {
        let mut st = self
            .conn
            .prepare(&format!("SELECT {COLS} FROM replicas ORDER BY name"))?;
        let rows = st.query_map([], row_to_replica)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records a new replica, in the state `event` gives it (see [`on_replica`]).
    pub fn insert_replica(
        &self,
        r: &ReplicaRow,
        event: &ReplicaEvent,
    ) -> Result<Transition, ChangeError> {
        let from = ReplicationState::NotEnabled;
        let to = on_replica(from, event)?;
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
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
                vmrepl_types::wire_name(&to),
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
        self.record_transition(r.vm_uuid, Role::Replica, from, to, event.name(), None)?;
        tx.commit()?;
        Ok(Transition { from, to })
    }

    /// Records (or clears) a running test failover.
    pub fn set_test_failover(
        &self,
        vm_uuid: Uuid,
        t: Option<&TestFailover>,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE replicas SET test_failover = ?2 WHERE vm_uuid = ?1",
            params![vm_uuid.to_string(), to_json_col(t)?],
        )?;
        Ok(())
    }

    /// The replica row of the VM with this name.
    pub fn replica_named(&self, name: &str) -> Result<Option<ReplicaRow>, DbError> {
        self.conn
            .query_row(
                &format!("SELECT {COLS} FROM replicas WHERE name = ?1"),
                params![name],
                row_to_replica,
            )
            .optional()
            .map_err(DbError::from)
    }

    /// The name a new replica of `uuid` gets on this host: the primary's name `wanted` when no
    /// other replica and no VM of this host has it, else `wanted-2`, `wanted-3`, ... (shortened to
    /// fit). Names are unique per replica host whatever the primaries call their VMs, so one
    /// primary cannot take the name another's VM (or a local VM) answers to.
    pub fn unique_replica_name(&self, wanted: &str, uuid: Uuid) -> Result<String, DbError> {
        let taken = |n: &str| -> Result<bool, DbError> {
            let replica = self.replica_named(n)?.is_some_and(|r| r.vm_uuid != uuid);
            let local = self.vm_by_name(n).ok().flatten().is_some();
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

    /// Replaces a replica VM's definition (its primary changed the VM).
    pub fn set_replica_definition(&self, vm_uuid: Uuid, def: &VmDefinition) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE replicas SET definition = ?2 WHERE vm_uuid = ?1",
            params![
                vm_uuid.to_string(),
                serde_json::to_string(def).map_err(corrupt)?
            ],
        )?;
        Ok(())
    }

    /// Updates the recovery-point policy.
    pub fn set_replica_policy(&self, vm_uuid: Uuid, p: &PointPolicy) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE replicas SET policy = ?2 WHERE vm_uuid = ?1",
            params![
                vm_uuid.to_string(),
                serde_json::to_string(p).map_err(corrupt)?
            ],
        )?;
        Ok(())
    }

    /// Records a received (durable, verified) log.
    pub fn record_received(&self, vm_uuid: Uuid, bytes: u64) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE replicas SET last_receive_ms = ?2, bytes_received = bytes_received + ?3, \
             logs_received = logs_received + 1 WHERE vm_uuid = ?1",
            params![vm_uuid.to_string(), now_ms() as i64, bytes as i64],
        )?;
        Ok(())
    }

    /// The networks this host's admin set for a replica's adapters (`replication network`),
    /// as stored; an adapter not listed is not connected.
    pub fn replica_networks(
        &self,
        vm_uuid: Uuid,
    ) -> Result<Vec<vmrepl_types::api::AdapterNetwork>, DbError> {
        let json: Option<String> = self
            .conn
            .query_row(
                "SELECT networks FROM replica_networks WHERE vm_uuid = ?1",
                params![vm_uuid.to_string()],
                |r| r.get(0),
            )
            .optional()?;
        json.map(|t| {
            serde_json::from_str(&t).map_err(|e| {
                DbError::Corrupt(format!(
                    "the networks of replica {vm_uuid} are unreadable: {e}"
                ))
            })
        })
        .transpose()
        .map(Option::unwrap_or_default)
    }

    /// Stores the networks of a replica's adapters.
    pub fn set_replica_networks(
        &self,
        vm_uuid: Uuid,
        nets: &[vmrepl_types::api::AdapterNetwork],
    ) -> Result<(), DbError> {
        let json = serde_json::to_string(nets).map_err(|e| DbError::Corrupt(e.to_string()))?;
        self.conn.execute(
            "INSERT INTO replica_networks (vm_uuid, networks) VALUES (?1, ?2) \
             ON CONFLICT (vm_uuid) DO UPDATE SET networks = excluded.networks",
            params![vm_uuid.to_string(), json],
        )?;
        Ok(())
    }

    /// Designates the local VM `vm_uuid` as the existing copy `primary` may adopt (table
    /// `accepted_copies`, migration 6).
    pub fn accept_copy(&self, vm_uuid: Uuid, primary: &str) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO accepted_copies (vm_uuid, primary_host, created_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (vm_uuid) DO UPDATE SET primary_host = excluded.primary_host, \
             created_ms = excluded.created_ms",
            params![vm_uuid.to_string(), primary, now_ms() as i64],
        )?;
        Ok(())
    }

    /// Withdraws a designation; whether there was one.
    pub fn withdraw_copy(&self, vm_uuid: Uuid) -> Result<bool, DbError> {
        let n = self.conn.execute(
            "DELETE FROM accepted_copies WHERE vm_uuid = ?1",
            params![vm_uuid.to_string()],
        )?;
        Ok(n > 0)
    }

    /// The primary the local VM `vm_uuid` is designated for as an existing copy, if any.
    pub fn accepted_copy(&self, vm_uuid: Uuid) -> Result<Option<String>, DbError> {
        Ok(self
            .conn
            .query_row(
                "SELECT primary_host FROM accepted_copies WHERE vm_uuid = ?1",
                params![vm_uuid.to_string()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Applies `event` to the replica of `vm_uuid` (the one way its state changes): the state
    /// machine ([`on_replica`]) decides, and the state, its error and the transition with its
    /// `cause` are written in one transaction. `applied` records an apply pass (the last
    /// applied sequence, and whether it made a new recovery point); `failover` sets or clears
    /// the failover record.
    pub fn change_replica(
        &self,
        vm_uuid: Uuid,
        event: &ReplicaEvent,
        cause: Option<&str>,
        update: ReplicaUpdate<'_>,
    ) -> Result<Transition, ChangeError> {
        let tx = self.conn.unchecked_transaction()?;
        let state: Option<String> = tx
            .query_row(
                "SELECT state FROM replicas WHERE vm_uuid = ?1",
                params![vm_uuid.to_string()],
                |r| r.get(0),
            )
            .optional()?;
        let Some(state) = state else {
            return Err(ChangeError::Missing { vm: vm_uuid });
        };
        let from = vmrepl_types::from_wire_name(&state).unwrap_or(ReplicationState::Error);
        let to = on_replica(from, event)?;
        let id = vm_uuid.to_string();
        tx.execute(
            "UPDATE replicas SET state = ?2 WHERE vm_uuid = ?1",
            params![id, vmrepl_types::wire_name(&to)],
        )?;
        let error = match event.last_error() {
            LastError::Cause => Some(cause),
            LastError::Clear => Some(None),
            LastError::Keep => None,
        };
        if let Some(e) = error {
            tx.execute(
                "UPDATE replicas SET last_error = ?2 WHERE vm_uuid = ?1",
                params![id, e],
            )?;
        }
        match update {
            ReplicaUpdate::None => {}
            ReplicaUpdate::Applied { last, new_point } => {
                let now = now_ms() as i64;
                tx.execute(
                    "UPDATE replicas SET last_applied = ?2, last_apply_ms = ?3, \
                     last_point_ms = CASE WHEN ?4 THEN ?3 ELSE last_point_ms END WHERE vm_uuid = ?1",
                    params![id, last as i64, now, new_point],
                )?;
            }
            ReplicaUpdate::Failover(f) => {
                tx.execute(
                    "UPDATE replicas SET failover = ?2 WHERE vm_uuid = ?1",
                    params![id, to_json_col(f)?],
                )?;
            }
        }
        if to == ReplicationState::NotEnabled {
            tx.execute("DELETE FROM replicas WHERE vm_uuid = ?1", params![id])?;
            tx.execute(
                "DELETE FROM replica_networks WHERE vm_uuid = ?1",
                params![id],
            )?;
        }
        self.record_transition(vm_uuid, Role::Replica, from, to, event.name(), cause)?;
        tx.commit()?;
        Ok(Transition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::tests::row;
    use ReplicationState as S;

    fn open() -> (tempfile::TempDir, Db) {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("s.db")).unwrap();
        (d, db)
    }

    fn created(db: &Db, name: &str) -> Uuid {
        let r = row(name);
        db.insert_replica(&r, &ReplicaEvent::ReplicaCreated { holds_point: false })
            .unwrap();
        r.vm_uuid
    }

    #[test]
    fn a_new_replica_waits_for_its_initial_copy_unless_it_holds_a_point() {
        let (_d, db) = open();
        let empty = created(&db, "a");
        assert_eq!(
            db.replica(empty).unwrap().unwrap().state,
            S::WaitingForInitialReplication
        );
        let adopted = row("b");
        db.insert_replica(
            &adopted,
            &ReplicaEvent::ReplicaCreated { holds_point: true },
        )
        .unwrap();
        assert_eq!(
            db.replica(adopted.vm_uuid).unwrap().unwrap().state,
            S::Replicating
        );
        assert_eq!(
            db.transitions(Some(empty), 5).unwrap()[0].event,
            "replica-created"
        );
    }

    #[test]
    fn an_apply_pass_records_the_sequence_and_a_point_and_only_an_applied_log_clears_resync() {
        let (_d, db) = open();
        let vm = created(&db, "a");
        let applied = ReplicaUpdate::Applied {
            last: 1,
            new_point: true,
        };
        db.change_replica(vm, &ReplicaEvent::LogApplied, None, applied)
            .unwrap();
        let r = db.replica(vm).unwrap().unwrap();
        assert_eq!((r.state, r.last_applied), (S::Replicating, 1));
        assert!(r.last_apply_ms.is_some() && r.last_point_ms.is_some());
        let why = "log 3 builds on 1";
        db.change_replica(
            vm,
            &ReplicaEvent::OutOfOrderRefused,
            Some(why),
            ReplicaUpdate::None,
        )
        .unwrap();
        let r = db.replica(vm).unwrap().unwrap();
        assert_eq!(r.state, S::ResynchronizationRequired);
        assert_eq!(r.last_error.as_deref(), Some(why));
        // An apply pass that found nothing proves nothing.
        let nothing = ReplicaEvent::NoLogPending { initial_done: true };
        db.change_replica(vm, &nothing, None, ReplicaUpdate::None)
            .unwrap();
        assert_eq!(
            db.replica(vm).unwrap().unwrap().state,
            S::ResynchronizationRequired
        );
        // The primary's resynchronization log does.
        let again = ReplicaUpdate::Applied {
            last: 2,
            new_point: false,
        };
        db.change_replica(vm, &ReplicaEvent::LogApplied, None, again)
            .unwrap();
        let r = db.replica(vm).unwrap().unwrap();
        assert_eq!(
            (r.state, r.last_applied, r.last_error),
            (S::Replicating, 2, None)
        );
    }

    #[test]
    fn a_failover_record_is_kept_and_cleared_with_the_state_and_a_failed_over_replica_takes_no_log()
    {
        let (_d, db) = open();
        let vm = created(&db, "a");
        let applied = ReplicaUpdate::Applied {
            last: 4,
            new_point: true,
        };
        db.change_replica(vm, &ReplicaEvent::LogApplied, None, applied)
            .unwrap();
        let f = FailoverRecord {
            point_seq: 4,
            point_unix_ms: 9,
            planned: false,
            relationship: Uuid::new_v4(),
        };
        let start = ReplicaEvent::FailoverStarted { planned: false };
        db.change_replica(vm, &start, None, ReplicaUpdate::Failover(Some(&f)))
            .unwrap();
        let r = db.replica(vm).unwrap().unwrap();
        assert_eq!(r.state, S::FailedOverWaitingCompletion);
        assert_eq!(r.failover, Some(f));
        let e = db
            .change_replica(vm, &ReplicaEvent::LogApplied, None, ReplicaUpdate::None)
            .unwrap_err();
        assert!(matches!(e, ChangeError::Refused(_)), "{e}");
        db.change_replica(
            vm,
            &ReplicaEvent::FailoverCancelled,
            None,
            ReplicaUpdate::Failover(None),
        )
        .unwrap();
        let r = db.replica(vm).unwrap().unwrap();
        assert_eq!((r.state, r.failover), (S::Replicating, None));
    }

    #[test]
    fn removal_drops_the_row_and_its_networks_and_is_refused_after_a_failover() {
        let (_d, db) = open();
        let vm = created(&db, "a");
        db.conn
            .execute(
                "INSERT INTO replica_networks (vm_uuid, networks) VALUES (?1, '[]')",
                params![vm.to_string()],
            )
            .unwrap();
        db.change_replica(vm, &ReplicaEvent::Removed, None, ReplicaUpdate::None)
            .unwrap();
        assert!(db.replica(vm).unwrap().is_none());
        let n: i64 = db
            .conn
            .query_row("SELECT COUNT(*) FROM replica_networks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
        let other = created(&db, "b");
        let applied = ReplicaUpdate::Applied {
            last: 1,
            new_point: true,
        };
        db.change_replica(other, &ReplicaEvent::LogApplied, None, applied)
            .unwrap();
        db.change_replica(
            other,
            &ReplicaEvent::FailoverStarted { planned: true },
            None,
            ReplicaUpdate::None,
        )
        .unwrap();
        assert!(db
            .change_replica(other, &ReplicaEvent::Removed, None, ReplicaUpdate::None)
            .is_err());
        assert!(db.replica(other).unwrap().is_some());
    }

    #[test]
    fn replica_names_stay_unique_per_host_whatever_the_primaries_call_their_vms() {
        let (_d, db) = open();
        created(&db, "web");
        let newcomer = Uuid::new_v4();
        assert_eq!(db.unique_replica_name("web", newcomer).unwrap(), "web-2");
        assert_eq!(db.unique_replica_name("db", newcomer).unwrap(), "db");
    }
}
