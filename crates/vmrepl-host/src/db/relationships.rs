//! The primary role's relationships (table `relationships`, migration 2): one row per VM this
//! host replicates. Its state changes only through [`Db::change_primary`], which asks the
//! state machine ([`crate::lifecycle::on_primary`]) and records the transition with its cause
//! in the same transaction.

use super::{now_ms, Db, DbError};
use crate::lifecycle::{on_primary, LastError, PrimaryEvent, Refusal};
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
    /// A resynchronization in parts under way, if any.
    pub resync_sweep: Option<ResyncSweep>,
}

/// A resynchronization in parts under way (`primary::resync`): the disks are compared range
/// by range, each range one log (a part) that the replica acknowledges. Recorded when it
/// starts, so that after a cut (a daemon restart, a lost link, a reboot) it continues from
/// the replica's last applied part, as long as change tracking held since it started; a
/// relationship whose tracking is lost forgets it ([`Db::change_primary`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResyncSweep {
    /// The replica's last applied log when it started: part `i` (from 0) is log `base + 1 + i`.
    pub base: u64,
    /// How many parts.
    pub parts: u64,
    /// The size of the ranges the disks are cut into.
    pub range_bytes: u64,
    /// When it started (Unix ms).
    pub started_ms: u64,
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
                        created_ms, last_success_ms, note, resync_sweep";

fn row_to_relationship(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Relationship, DbError>> {
    let texts: [String; 5] = [r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?];
    let acked: i64 = r.get(5)?;
    let last_error: Option<String> = r.get(6)?;
    let created: i64 = r.get(7)?;
    let success: Option<i64> = r.get(8)?;
    let note: Option<String> = r.get(9)?;
    let sweep: Option<String> = r.get(10)?;
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
            // An unreadable record only costs the resynchronization its head start.
            resync_sweep: sweep.and_then(|j| serde_json::from_str(&j).ok()),
        })
    })())
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
        let error = match event.last_error() {
            LastError::Cause => Some(cause),
            LastError::Clear => Some(None),
            LastError::Keep => None,
        };
        if let Some(e) = error {
            tx.execute(
                "UPDATE relationships SET last_error = ?2 WHERE vm_uuid = ?1",
                params![vm.to_string(), e],
            )?;
        }
        if matches!(
            event,
            PrimaryEvent::TrackingLost | PrimaryEvent::OutOfOrderRefused
        ) {
            // What the parts already sent were compared with can no longer be vouched for:
            // the next resynchronization starts from the first range.
            tx.execute(
                "UPDATE relationships SET resync_sweep = NULL WHERE vm_uuid = ?1",
                params![vm.to_string()],
            )?;
        }
        if let Some(seq) = acked {
            tx.execute(
                "UPDATE relationships SET acked_seq = ?2, last_success_ms = ?3 WHERE vm_uuid = ?1",
                params![vm.to_string(), seq as i64, now_ms() as i64],
            )?;
        }
        self.record_transition(vm, Role::Primary, from, to, event.name(), cause)?;
        tx.commit()?;
        Ok(Transition { from, to })
    }

    /// Stores a relationship's changed settings.
    pub fn set_relationship_settings(
        &self,
        vm: Uuid,
        settings: &ReplicationSettings,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE relationships SET settings = ?2 WHERE vm_uuid = ?1",
            params![
                vm.to_string(),
                serde_json::to_string(settings).map_err(|e| DbError::Corrupt(e.to_string()))?
            ],
        )?;
        Ok(())
    }

    /// Records (or clears) the resynchronization in parts under way.
    pub fn set_resync_sweep(&self, vm: Uuid, sweep: Option<&ResyncSweep>) -> Result<(), DbError> {
        let json = sweep
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| DbError::Corrupt(e.to_string()))?;
        self.conn.execute(
            "UPDATE relationships SET resync_sweep = ?2 WHERE vm_uuid = ?1",
            params![vm.to_string(), json],
        )?;
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{CycleKind, InitialMethod};
    use ReplicationState as S;

    fn settings() -> ReplicationSettings {
        vmrepl_types::replication::ReplicationSettings::new("replica.example:7443")
    }

    fn enabled(db: &Db, initial: InitialMethod) -> Uuid {
        let vm = Uuid::new_v4();
        let s = settings();
        db.insert_relationship(
            NewRelationship {
                vm,
                rel_id: Uuid::new_v4(),
                settings: &s,
                replica_name: "replica.example",
                acked_seq: 0,
                note: None,
            },
            &PrimaryEvent::Enabled { initial },
            None,
        )
        .unwrap();
        vm
    }

    fn open() -> (tempfile::TempDir, Db) {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("s.db")).unwrap();
        (d, db)
    }

    #[test]
    fn enabling_records_the_state_the_initial_method_gives_and_the_transition() {
        let (_d, db) = open();
        let now = enabled(&db, InitialMethod::Network);
        let later = enabled(&db, InitialMethod::Scheduled);
        let copy = enabled(&db, InitialMethod::ExistingCopy);
        let state = |vm| db.relationship(vm).unwrap().unwrap().state;
        assert_eq!(state(now), S::WaitingForInitialReplication);
        assert_eq!(state(later), S::ReadyForInitialReplication);
        assert_eq!(state(copy), S::Resynchronizing);
        let t = db.transitions(Some(now), 10).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(
            (t[0].from, t[0].to),
            (S::NotEnabled, S::WaitingForInitialReplication)
        );
        assert_eq!(t[0].event, "enabled");
    }

    #[test]
    fn an_acknowledged_cycle_moves_the_sequence_and_clears_the_error_in_one_change() {
        let (_d, db) = open();
        let vm = enabled(&db, InitialMethod::Network);
        db.change_primary(vm, &PrimaryEvent::InitialReplicationStarted, None, None)
            .unwrap();
        let failed = PrimaryEvent::CycleFailed {
            kind: CycleKind::Initial,
        };
        db.change_primary(vm, &failed, Some("the replica server is unreachable"), None)
            .unwrap();
        let r = db.relationship(vm).unwrap().unwrap();
        assert_eq!(r.state, S::WaitingForInitialReplication);
        assert_eq!(
            r.last_error.as_deref(),
            Some("the replica server is unreachable")
        );
        db.change_primary(vm, &PrimaryEvent::InitialReplicationStarted, None, None)
            .unwrap();
        let ack = PrimaryEvent::CycleAcknowledged {
            kind: CycleKind::Initial,
        };
        let t = db.change_primary(vm, &ack, None, Some(1)).unwrap();
        assert_eq!(
            t,
            Transition {
                from: S::InitialReplicationInProgress,
                to: S::Replicating
            }
        );
        let r = db.relationship(vm).unwrap().unwrap();
        assert_eq!(
            (r.state, r.acked_seq, r.last_error),
            (S::Replicating, 1, None)
        );
        assert!(r.last_success_ms.is_some());
        // Every step is on record, newest first, with its cause.
        let t = db.transitions(Some(vm), 10).unwrap();
        let events: Vec<_> = t.iter().rev().map(|t| t.event.as_str()).collect();
        assert_eq!(
            events,
            [
                "enabled",
                "initial-replication-started",
                "cycle-failed",
                "initial-replication-started",
                "cycle-acknowledged"
            ]
        );
        assert_eq!(
            t[2].cause.as_deref(),
            Some("the replica server is unreachable")
        );
    }

    #[test]
    fn a_refused_event_changes_nothing_and_records_nothing() {
        let (_d, db) = open();
        let vm = enabled(&db, InitialMethod::Network);
        let before = db.transitions(Some(vm), 10).unwrap().len();
        let e = db
            .change_primary(vm, &PrimaryEvent::ResynchronizationRequested, None, None)
            .unwrap_err();
        assert!(matches!(e, ChangeError::Refused(_)), "{e}");
        assert!(
            e.to_string().contains("Waiting for initial replication"),
            "{e}"
        );
        assert_eq!(
            db.relationship(vm).unwrap().unwrap().state,
            S::WaitingForInitialReplication
        );
        assert_eq!(db.transitions(Some(vm), 10).unwrap().len(), before);
    }

    #[test]
    fn a_change_to_a_vm_without_a_relationship_says_so() {
        let (_d, db) = open();
        let vm = Uuid::new_v4();
        let e = db
            .change_primary(vm, &PrimaryEvent::Paused, None, None)
            .unwrap_err();
        assert!(
            matches!(e, ChangeError::Missing { vm: v } if v == vm),
            "{e}"
        );
    }

    #[test]
    fn removal_deletes_the_row_and_keeps_the_transition() {
        let (_d, db) = open();
        let vm = enabled(&db, InitialMethod::Network);
        let t = db
            .change_primary(vm, &PrimaryEvent::Removed, None, None)
            .unwrap();
        assert_eq!(t.to, S::NotEnabled);
        assert!(db.relationship(vm).unwrap().is_none());
        assert_eq!(db.transitions(Some(vm), 1).unwrap()[0].event, "removed");
    }

    #[test]
    fn a_daemon_restart_keeps_the_last_error_and_restarts_a_cut_initial_copy() {
        let (_d, db) = open();
        let vm = enabled(&db, InitialMethod::Network);
        db.change_primary(vm, &PrimaryEvent::InitialReplicationStarted, None, None)
            .unwrap();
        db.conn
            .execute(
                "UPDATE relationships SET last_error = 'earlier' WHERE vm_uuid = ?1",
                params![vm.to_string()],
            )
            .unwrap();
        db.change_primary(vm, &PrimaryEvent::DaemonRestarted, None, None)
            .unwrap();
        let r = db.relationship(vm).unwrap().unwrap();
        assert_eq!(r.state, S::WaitingForInitialReplication);
        assert_eq!(r.last_error.as_deref(), Some("earlier"));
    }

    #[test]
    fn an_unknown_stored_state_reads_as_error_and_can_still_be_removed() {
        let (_d, db) = open();
        let vm = enabled(&db, InitialMethod::Network);
        db.conn
            .execute(
                "UPDATE relationships SET state = 'from-the-future' WHERE vm_uuid = ?1",
                params![vm.to_string()],
            )
            .unwrap();
        assert_eq!(db.relationship(vm).unwrap().unwrap().state, S::Error);
        db.change_primary(vm, &PrimaryEvent::Removed, None, None)
            .unwrap();
        assert!(db.relationships().unwrap().is_empty());
    }

    #[test]
    fn unreadable_settings_are_reported_as_a_damaged_database_not_as_no_relationship() {
        let (_d, db) = open();
        let vm = enabled(&db, InitialMethod::Network);
        db.conn
            .execute(
                "UPDATE relationships SET settings = '{' WHERE vm_uuid = ?1",
                params![vm.to_string()],
            )
            .unwrap();
        let e = db.relationship(vm).unwrap_err();
        assert!(matches!(e, DbError::Corrupt(_)), "{e}");
        assert!(e.to_string().contains(&vm.to_string()), "{e}");
    }
}
