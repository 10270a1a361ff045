//! The primary role's relationships (table `relationships`, migration 2): one row per VM this
//! host replicates. Its state changes only through [`Db::change_primary`], which asks the
//! state machine ([`crate::lifecycle::on_primary`]) and records the transition with its cause
//! in the same transaction.

use super::{now_ms, Db, DbError};
use crate::lifecycle::{on_primary, PrimaryEvent, Refusal};
use rusqlite::{params, OptionalExtension};
use uuid::Uuid;
use vmrepl_types::replication::{ReplicationSettings, ReplicationState, Role};

/// A relationship as stored.
#[derive(Debug, Clone)]
pub struct Relationship {
    pub vm_uuid: Uuid,
    pub rel_id: Uuid,
    pub settings: ReplicationSettings,
    pub replica_name: String,
    pub state: ReplicationState,
    pub acked_seq: u64,
    pub last_error: Option<String>,
    pub created_ms: u64,
    pub last_success_ms: Option<u64>,
    /// A remark `status` shows: why a reverse needed a full copy or a resynchronization,
    /// where an exported initial copy waits to be imported, or that an existing copy is being
    /// reconciled.
    pub note: Option<String>,
}

/// A relationship about to be recorded (enable, or reverse replication after a failover,
/// which starts at the common point `acked_seq`).
#[derive(Debug, Clone, Copy)]
pub struct NewRelationship<'a> {
    pub vm: Uuid,
    pub rel_id: Uuid,
    pub settings: &'a ReplicationSettings,
    pub replica_name: &'a str,
    pub acked_seq: u64,
    pub note: Option<&'a str>,
}

/// A state change that was made: from, to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: ReplicationState,
    pub to: ReplicationState,
}

/// Why a state change was not made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The state machine refused the event in the current state.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// There is no row for the VM (in this role).
    #[error("No replication relationship of VM {vm} is recorded on this host.")]
    Missing { vm: Uuid },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<rusqlite::Error> for ChangeError {
    fn from(e: rusqlite::Error) -> Self {
        ChangeError::Db(e.into())
    }
}

const REL_COLS: &str = "vm_uuid, rel_id, settings, replica_name, state, acked_seq, last_error, \
                        created_ms, last_success_ms, note";

fn row_to_relationship(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Relationship, DbError>> {
    let texts: [String; 5] = [r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?];
    let acked: i64 = r.get(5)?;
    let last_error: Option<String> = r.get(6)?;
    let created: i64 = r.get(7)?;
    let success: Option<i64> = r.get(8)?;
    let note: Option<String> = r.get(9)?;
    let [vm, rel, settings, replica_name, state] = texts;
    Ok((|| {
        let bad = |what: &str, v: &str| {
            DbError::Corrupt(format!(
                "the relationship of VM {vm} has an unreadable {what} ({v})"
            ))
        };
        Ok(Relationship {
            vm_uuid: vm.parse().map_err(|_| bad("VM id", &vm))?,
            rel_id: rel.parse().map_err(|_| bad("relationship id", &rel))?,
            settings: serde_json::from_str(&settings)
                .map_err(|e| bad("settings", &e.to_string()))?,
            replica_name,
            // A state this build does not know reads as Error, which every operator action
            // can leave (pause, remove); the row is not lost.
            state: vmrepl_types::from_wire_name(&state).unwrap_or(ReplicationState::Error),
            acked_seq: acked as u64,
            last_error,
            created_ms: created as u64,
            last_success_ms: success.map(|v| v as u64),
            note,
        })
    })())
}

/// What a primary event writes into `last_error`: a failure's cause, nothing after anything
/// else, and the restart of the daemon leaves it as it was.
enum ErrorColumn<'a> {
    Set(Option<&'a str>),
    Keep,
}

fn error_column<'a>(event: &PrimaryEvent, cause: Option<&'a str>) -> ErrorColumn<'a> {
    match event {
        PrimaryEvent::CycleFailed { .. }
        | PrimaryEvent::TrackingLost
        | PrimaryEvent::OutOfOrderRefused => ErrorColumn::Set(cause),
        PrimaryEvent::DaemonRestarted => ErrorColumn::Keep,
        _ => ErrorColumn::Set(None),
    }
}

impl Db {
    /// The relationship of `vm`, if this host replicates it.
    pub fn relationship(&self, vm: Uuid) -> Result<Option<Relationship>, DbError> {
        self.conn
            .query_row(
                &format!("SELECT {REL_COLS} FROM relationships WHERE vm_uuid = ?1"),
                params![vm.to_string()],
                row_to_relationship,
            )
            .optional()?
            .transpose()
    }

    /// Every relationship this host is the primary of.
    pub fn relationships(&self) -> Result<Vec<Relationship>, DbError> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {REL_COLS} FROM relationships ORDER BY created_ms"
        ))?;
        let rows = st.query_map([], row_to_relationship)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }

    /// Records a new relationship in the state `event` (enable or reverse replication) makes
    /// of "not enabled".
    pub fn insert_relationship(
        &self,
        new: NewRelationship<'_>,
        event: &PrimaryEvent,
        cause: Option<&str>,
    ) -> Result<Transition, ChangeError> {
        let from = ReplicationState::NotEnabled;
        let to = on_primary(from, event)?;
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
            "INSERT INTO relationships (vm_uuid, rel_id, settings, replica_name, state, \
             created_ms, acked_seq, note) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                new.vm.to_string(),
                new.rel_id.to_string(),
                serde_json::to_string(new.settings).map_err(|e| DbError::Corrupt(e.to_string()))?,
                new.replica_name,
                vmrepl_types::wire_name(&to),
                now_ms() as i64,
                new.acked_seq as i64,
                new.note
            ],
        )?;
        self.record_transition(new.vm, Role::Primary, from, to, event.name(), cause)?;
        self.event(
            Some(new.vm),
            &format!(
                "replication to {} set up{}",
                new.replica_name,
                new.note.map(|n| format!(": {n}")).unwrap_or_default()
            ),
        )?;
        tx.commit()?;
        Ok(Transition { from, to })
    }

    /// Applies `event` to the relationship of `vm`: the state machine decides the next state,
    /// which is written with the transition and its `cause` in one transaction. `acked`, when
    /// given, is the sequence the replica acknowledged (a successful cycle).
    pub fn change_primary(
        &self,
        vm: Uuid,
        event: &PrimaryEvent,
        cause: Option<&str>,
        acked: Option<u64>,
    ) -> Result<Transition, ChangeError> {
        let tx = self.conn.unchecked_transaction()?;
        let state: Option<String> = tx
            .query_row(
                "SELECT state FROM relationships WHERE vm_uuid = ?1",
                params![vm.to_string()],
                |r| r.get(0),
            )
            .optional()?;
        let Some(state) = state else {
            return Err(ChangeError::Missing { vm });
        };
        let from = vmrepl_types::from_wire_name(&state).unwrap_or(ReplicationState::Error);
        let to = on_primary(from, event)?;
        if matches!(
            event,
            PrimaryEvent::Removed | PrimaryEvent::ReverseReplicationAccepted
        ) {
            tx.execute(
                "DELETE FROM relationships WHERE vm_uuid = ?1",
                params![vm.to_string()],
            )?;
        } else {
            tx.execute(
                "UPDATE relationships SET state = ?2 WHERE vm_uuid = ?1",
                params![vm.to_string(), vmrepl_types::wire_name(&to)],
            )?;
        }
        if let ErrorColumn::Set(e) = error_column(event, cause) {
            tx.execute(
                "UPDATE relationships SET last_error = ?2 WHERE vm_uuid = ?1",
                params![vm.to_string(), e],
            )?;
        }
        if let Some(seq) = acked {
            tx.execute(
                "UPDATE relationships SET acked_seq = ?2, last_success_ms = ?3 WHERE vm_uuid = ?1",
                params![vm.to_string(), seq as i64, now_ms() as i64],
            )?;
        }
        self.record_transition(vm, Role::Primary, from, to, event.name(), cause)?;
        self.event(
            Some(vm),
            &format!(
                "replication {to} ({}){}",
                event.describe(),
                cause.map(|e| format!(": {e}")).unwrap_or_default()
            ),
        )?;
        tx.commit()?;
        Ok(Transition { from, to })
    }

    /// Sets or clears a relationship's remark.
    pub fn set_relationship_note(&self, vm: Uuid, note: Option<&str>) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE relationships SET note = ?2 WHERE vm_uuid = ?1",
            params![vm.to_string(), note],
        )?;
        Ok(())
    }
}
