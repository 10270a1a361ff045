//! Durable host state in SQLite. Schema versions are tracked with `PRAGMA user_version` and
//! migrated forward at open; a database newer than this build is refused.

use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use uuid::Uuid;
use vmrepl_types::api::Severity;
use vmrepl_types::{VmDefinition, VmRunState};

mod cycles;
mod fingerprints;
mod host_settings;
mod relationships;
mod replicas;
mod transitions;

pub use cycles::*;
pub use fingerprints::*;
pub use host_settings::*;
pub use relationships::*;
pub use replicas::*;
pub use transitions::*;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const MIGRATIONS: &[&str] = &[
    // 1: VMs and the event journal.
    "CREATE TABLE vms (
        uuid TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        definition TEXT NOT NULL,
        state TEXT NOT NULL,
        pid INTEGER,
        note TEXT
     );
     CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        unix_ms INTEGER NOT NULL,
        vm TEXT,
        message TEXT NOT NULL
     );",
    // 2: primary-side replication relationships and their cycle history.
    "CREATE TABLE relationships (
        vm_uuid TEXT PRIMARY KEY,
        rel_id TEXT NOT NULL,
        settings TEXT NOT NULL,
        replica_name TEXT NOT NULL,
        state TEXT NOT NULL,
        acked_seq INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        created_ms INTEGER NOT NULL,
        last_success_ms INTEGER
     );
     CREATE TABLE cycles (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_uuid TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        start_ms INTEGER NOT NULL,
        duration_ms INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        error TEXT
     );
     CREATE INDEX cycles_vm ON cycles (vm_uuid, start_ms);",
    // 3: replica-side replica VMs (see `crate::replica`).
    "CREATE TABLE replicas (
        vm_uuid TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        primary_host TEXT NOT NULL,
        trust_group TEXT NOT NULL,
        storage_root TEXT NOT NULL,
        relationship TEXT NOT NULL,
        definition TEXT NOT NULL,
        policy TEXT NOT NULL,
        state TEXT NOT NULL,
        last_applied INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL,
        last_receive_ms INTEGER,
        last_apply_ms INTEGER,
        last_point_ms INTEGER,
        bytes_received INTEGER NOT NULL DEFAULT 0,
        logs_received INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
     );",
    // 4: failover (see `crate::failover`): where the primary answers, the failover and test
    // failover of a replica, and why a relationship needed a full copy.
    "ALTER TABLE replicas ADD COLUMN primary_server TEXT;
     ALTER TABLE replicas ADD COLUMN failover TEXT;
     ALTER TABLE replicas ADD COLUMN test_failover TEXT;
     ALTER TABLE relationships ADD COLUMN note TEXT;",
    // 5: app-consistent points (see `crate::primary`): per cycle whether the guest was
    // frozen through its agent (1), could not be (0, reason in app_freeze_error) or was not
    // asked (NULL).
    "ALTER TABLE cycles ADD COLUMN app_freeze_ok INTEGER;
     ALTER TABLE cycles ADD COLUMN app_freeze_error TEXT;",
    // 6: the trust boundary (see docs/security.md): local VMs this host's admin designated as
    // the existing copy a given primary may adopt (`replication server accept-copy`).
    "CREATE TABLE accepted_copies (
        vm_uuid TEXT PRIMARY KEY,
        primary_host TEXT NOT NULL,
        created_ms INTEGER NOT NULL
     );",
    // 7: per-adapter networks of a replica VM on failover and test failover, chosen on the
    // replica host (Hyper-V's per-adapter failover and test failover networks).
    "CREATE TABLE replica_networks (
        vm_uuid TEXT PRIMARY KEY,
        networks TEXT NOT NULL
     );",
    // 8: every replication state transition (see `crate::lifecycle`), per VM and role: the
    // states as their wire names, the event's stable name and, when known, its cause.
    "CREATE TABLE transitions (
        id INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL,
        vm_uuid TEXT NOT NULL,
        role TEXT NOT NULL,
        from_state TEXT NOT NULL,
        to_state TEXT NOT NULL,
        event TEXT NOT NULL,
        cause TEXT
     );
     CREATE INDEX transitions_vm ON transitions (vm_uuid, id);",
    // 9: what each disk file of a VM looked like when vmrepl last closed it, or opened it
    // (see `crate::fingerprint`): a change made while the VM was off is caught before the next
    // open, a file put in place of an open one at the close.
    "CREATE TABLE disk_fingerprints (
        vm_uuid TEXT NOT NULL,
        disk_id TEXT NOT NULL,
        path TEXT NOT NULL,
        dev INTEGER NOT NULL,
        ino INTEGER NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        ctime_ns INTEGER NOT NULL,
        recorded_ms INTEGER NOT NULL,
        opened INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (vm_uuid, disk_id)
     );",
    // 10: a resynchronization in parts under way (JSON `ResyncSweep`), so that it continues
    // where it stopped.
    "ALTER TABLE relationships ADD COLUMN resync_sweep TEXT;",
    // 11: the event journal gets stable codes and severities (`crate::lifecycle::codes`);
    // older entries are notes.
    "ALTER TABLE events ADD COLUMN code INTEGER NOT NULL DEFAULT 9000;
     ALTER TABLE events ADD COLUMN severity TEXT NOT NULL DEFAULT 'info';
     CREATE INDEX events_vm ON events (vm, id);",
    // 12: when `replication measure --reset` last started a relationship's statistics anew.
    "CREATE TABLE stats_resets (
        vm_uuid TEXT PRIMARY KEY,
        reset_ms INTEGER NOT NULL
     );",
    // 13: the host's own settings that commands change (see `crate::host_settings`): one row
    // per setting (`replica_server`, `revoked_certs`), its value as JSON in the shape `format`
    // names. The configuration file is the admin's and the daemon never writes it.
    "CREATE TABLE host_settings (
        name TEXT PRIMARY KEY,
        format INTEGER NOT NULL,
        value TEXT NOT NULL,
        changed_ms INTEGER NOT NULL
     );",
];

/// One entry of the event journal (see [`Db::events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub id: i64,
    pub unix_ms: u64,
    pub vm: Option<Uuid>,
    pub code: u32,
    pub severity: Severity,
    pub message: String,
}

/// Database errors.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("Cannot open the state database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("The state database {path} has schema version {found}, newer than this vmrepl ({supported}); run a newer vmrepl release on this host.")]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("State database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("A stored VM definition could not be read ({0}); the database may be damaged.")]
    Corrupt(String),
    #[error("The host setting {name} in the state database cannot be read: {reason}.")]
    Setting { name: String, reason: String },
}

/// A VM row.
#[derive(Debug, Clone)]
pub struct VmRow {
    pub definition: VmDefinition,
    pub state: VmRunState,
    pub pid: Option<u32>,
    pub note: Option<String>,
}

/// The host's database.
pub struct Db {
    pub(super) conn: Connection,
}

impl Db {
    /// Opens (creating if needed) and migrates.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let conn = Connection::open(path).map_err(|source| DbError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if v > SCHEMA_VERSION {
            return Err(DbError::TooNew {
                path: path.to_path_buf(),
                found: v,
                supported: SCHEMA_VERSION,
            });
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(v as usize) {
            conn.execute_batch(&format!(
                "BEGIN; {m}; PRAGMA user_version = {}; COMMIT;",
                i + 1
            ))?;
        }
        Ok(Db { conn })
    }

    /// Replaces a VM's definition (same UUID and name).
    pub fn set_vm_definition(&self, def: &VmDefinition) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE vms SET definition = ?2 WHERE uuid = ?1",
            params![
                def.uuid.to_string(),
                serde_json::to_string(def).map_err(|e| DbError::Corrupt(e.to_string()))?
            ],
        )?;
        Ok(())
    }

    pub fn insert_vm(&self, def: &VmDefinition) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO vms (uuid, name, definition, state) VALUES (?1, ?2, ?3, ?4)",
            params![
                def.uuid.to_string(),
                def.name.as_str(),
                serde_json::to_string(def).map_err(|e| DbError::Corrupt(e.to_string()))?,
                vmrepl_types::wire_name(&VmRunState::Off)
            ],
        )?;
        Ok(())
    }

    pub fn set_state(
        &self,
        uuid: Uuid,
        state: VmRunState,
        pid: Option<u32>,
        note: Option<&str>,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE vms SET state = ?2, pid = ?3, note = ?4 WHERE uuid = ?1",
            params![uuid.to_string(), vmrepl_types::wire_name(&state), pid, note],
        )?;
        Ok(())
    }

    pub fn delete_vm(&self, uuid: Uuid) -> Result<(), DbError> {
        self.conn
            .execute("DELETE FROM vms WHERE uuid = ?1", params![uuid.to_string()])?;
        self.forget_disk_fingerprints(uuid)
    }

    pub fn vm_by_name(&self, name: &str) -> Result<Option<VmRow>, DbError> {
        self.conn
            .query_row(
                "SELECT definition, state, pid, note FROM vms WHERE name = ?1",
                params![name],
                row_to_vm,
            )
            .optional()?
            .transpose()
    }

    pub fn vm_by_uuid(&self, uuid: Uuid) -> Result<Option<VmRow>, DbError> {
        self.conn
            .query_row(
                "SELECT definition, state, pid, note FROM vms WHERE uuid = ?1",
                params![uuid.to_string()],
                row_to_vm,
            )
            .optional()?
            .transpose()
    }

    pub fn list_vms(&self) -> Result<Vec<VmRow>, DbError> {
        let mut st = self
            .conn
            .prepare("SELECT definition, state, pid, note FROM vms ORDER BY name")?;
        let rows = st.query_map([], row_to_vm)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }

    /// `replication measure --reset`: the statistics of `vm` start anew now.
    pub fn reset_stats(&self, vm: Uuid) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO stats_resets (vm_uuid, reset_ms) VALUES (?1, ?2) \
             ON CONFLICT (vm_uuid) DO UPDATE SET reset_ms = excluded.reset_ms",
            params![vm.to_string(), now_ms() as i64],
        )?;
        Ok(())
    }

    /// When the statistics of `vm` were last reset, if ever.
    pub fn stats_reset(&self, vm: Uuid) -> Result<Option<u64>, DbError> {
        Ok(self
            .conn
            .query_row(
                "SELECT reset_ms FROM stats_resets WHERE vm_uuid = ?1",
                params![vm.to_string()],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(|v| v.max(0) as u64))
    }

    /// Appends a note to the event journal (code [`crate::lifecycle::codes::NOTE`], info).
    pub fn event(&self, vm: Option<Uuid>, message: &str) -> Result<(), DbError> {
        self.event_coded(vm, crate::lifecycle::codes::NOTE, Severity::Info, message)
    }

    /// Appends an event with its code and severity to the journal.
    pub fn event_coded(
        &self,
        vm: Option<Uuid>,
        code: u32,
        severity: Severity,
        message: &str,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO events (unix_ms, vm, message, code, severity) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                now_ms() as i64,
                vm.map(|u| u.to_string()),
                message,
                code,
                severity.as_str()
            ],
        )?;
        Ok(())
    }

    /// Journal entries, oldest first: of `vm` (or all), from `since_ms` on, after event id
    /// `after_id`; the newest `limit` of those.
    pub fn events(
        &self,
        vm: Option<Uuid>,
        since_ms: Option<u64>,
        after_id: Option<i64>,
        limit: usize,
    ) -> Result<Vec<EventRow>, DbError> {
        let mut st = self.conn.prepare(
            "SELECT id, unix_ms, vm, message, code, severity FROM events \
             WHERE (?1 IS NULL OR vm = ?1) AND unix_ms >= ?2 AND id > ?3 \
             ORDER BY id DESC LIMIT ?4",
        )?;
        let rows = st.query_map(
            params![
                vm.map(|u| u.to_string()),
                since_ms.map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX)),
                after_id.unwrap_or(0),
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            |r| {
                let vm: Option<String> = r.get(2)?;
                let severity: String = r.get(5)?;
                Ok(EventRow {
                    id: r.get(0)?,
                    unix_ms: r.get::<_, i64>(1)?.max(0) as u64,
                    vm: vm.and_then(|v| Uuid::parse_str(&v).ok()),
                    message: r.get(3)?,
                    code: r.get(4)?,
                    severity: Severity::parse(&severity).unwrap_or(Severity::Info),
                })
            },
        )?;
        let mut out = rows.collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
    }
}

fn row_to_vm(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<VmRow, DbError>> {
    let def: String = r.get(0)?;
    let state: String = r.get(1)?;
    let pid: Option<u32> = r.get(2)?;
    let note: Option<String> = r.get(3)?;
    Ok((|| {
        let definition: VmDefinition =
            serde_json::from_str(&def).map_err(|e| DbError::Corrupt(e.to_string()))?;
        let state: VmRunState = vmrepl_types::from_wire_name(&state)
            .ok_or_else(|| DbError::Corrupt(format!("unknown VM state {state:?}")))?;
        Ok(VmRow {
            definition,
            state,
            pid,
            note,
        })
    })())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmrepl_types::*;

    fn def(name: &str) -> VmDefinition {
        VmDefinition {
            name: VmName::new(name).unwrap(),
            uuid: Uuid::new_v4(),
            generation: Generation::Bios,
            firmware: vm::FirmwareVariantId::Seabios,
            machine_type: "pc-i440fx-7.2".into(),
            config_version: ConfigVersion::CURRENT,
            vcpus: 1,
            memory_mib: 128,
            disks: vec![],
            nics: vec![],
            kernel: None,
            nvram: None,
        }
    }

    #[test]
    fn vms_round_trip_and_names_are_unique() {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("s.db")).unwrap();
        let a = def("a");
        db.insert_vm(&a).unwrap();
        assert!(db.insert_vm(&def("a")).is_err());
        db.set_state(a.uuid, VmRunState::Running, Some(42), None)
            .unwrap();
        let row = db.vm_by_name("a").unwrap().unwrap();
        assert_eq!(row.definition, a);
        assert_eq!(row.state, VmRunState::Running);
        assert_eq!(row.pid, Some(42));
        assert_eq!(db.list_vms().unwrap().len(), 1);
    }

    #[test]
    fn transitions_are_recorded_and_read_back_newest_first_per_vm() {
        use vmrepl_types::replication::{ReplicationState as S, Role};
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("s.db")).unwrap();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(db.transitions(None, 10).unwrap().is_empty());
        db.record_transition(
            a,
            Role::Primary,
            S::NotEnabled,
            S::WaitingForInitialReplication,
            "enabled",
            None,
        )
        .unwrap();
        db.record_transition(
            b,
            Role::Replica,
            S::NotEnabled,
            S::Replicating,
            "replica-created",
            None,
        )
        .unwrap();
        db.record_transition(
            a,
            Role::Primary,
            S::Replicating,
            S::ResynchronizationRequired,
            "tracking-lost",
            Some("bitmap 4 on node disk0 is inconsistent"),
        )
        .unwrap();
        let all = db.transitions(None, 10).unwrap();
        assert_eq!(
            all.iter().map(|t| t.event.as_str()).collect::<Vec<_>>(),
            ["tracking-lost", "replica-created", "enabled"]
        );
        let of_a = db.transitions(Some(a), 10).unwrap();
        assert_eq!(of_a.len(), 2);
        let last = &of_a[0];
        assert_eq!(
            (last.vm, last.role, last.from, last.to),
            (
                a,
                Role::Primary,
                S::Replicating,
                S::ResynchronizationRequired
            )
        );
        assert_eq!(
            last.cause.as_deref(),
            Some("bitmap 4 on node disk0 is inconsistent")
        );
        assert!(last.at_ms > 0 && last.id > of_a[1].id);
        assert_eq!(db.transitions(Some(a), 1).unwrap(), vec![last.clone()]);
        assert_eq!(db.last_event_ms(a, &last.event).unwrap(), Some(last.at_ms));
        assert_eq!(db.last_event_ms(a, "never-raised").unwrap(), None);
        assert_eq!(db.last_event_ms(Uuid::new_v4(), &last.event).unwrap(), None);
        assert_eq!(db.transitions(Some(b), 10).unwrap()[0].role, Role::Replica);
        // The states are stored as their wire names, readable without vmrepl.
        let stored: String = db
            .conn
            .query_row(
                "SELECT to_state FROM transitions WHERE id = ?1",
                [last.id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stored, "resynchronization-required");
        // A state this build does not know is reported, not guessed.
        db.conn
            .execute(
                "UPDATE transitions SET from_state = 'sideways' WHERE id = ?1",
                [last.id],
            )
            .unwrap();
        assert!(
            matches!(db.transitions(Some(a), 10), Err(DbError::Corrupt(m)) if m.contains("sideways"))
        );
    }

    #[test]
    fn a_version_7_database_gains_the_later_tables_and_keeps_its_data() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.db");
        {
            let db = Db::open(&p).unwrap();
            db.insert_vm(&def("old")).unwrap();
            db.conn
                .execute_batch(
                    "DROP TABLE transitions; DROP TABLE disk_fingerprints; \
                     ALTER TABLE relationships DROP COLUMN resync_sweep; \
                     DROP INDEX events_vm; ALTER TABLE events DROP COLUMN code; \
                     ALTER TABLE events DROP COLUMN severity; DROP TABLE stats_resets; \
                     DROP TABLE host_settings; PRAGMA user_version = 7;",
                )
                .unwrap();
        }
        let db = Db::open(&p).unwrap();
        let v: i64 = db
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        assert!(db.vm_by_name("old").unwrap().is_some());
        assert!(db.transitions(None, 5).unwrap().is_empty());
    }

    #[test]
    fn a_resynchronization_in_parts_is_remembered_until_tracking_is_lost() {
        use crate::lifecycle::{InitialMethod, PrimaryEvent};
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("s.db")).unwrap();
        let vm = Uuid::new_v4();
        let settings = vmrepl_types::replication::ReplicationSettings::new("127.0.0.2:7443");
        let new = NewRelationship {
            vm,
            rel_id: Uuid::new_v4(),
            settings: &settings,
            replica_name: "b",
            acked_seq: 0,
            note: None,
        };
        db.insert_relationship(
            new,
            &PrimaryEvent::Enabled {
                initial: InitialMethod::Network,
            },
            None,
        )
        .unwrap();
        assert_eq!(db.relationship(vm).unwrap().unwrap().resync_sweep, None);
        let sweep = ResyncSweep {
            base: 7,
            parts: 16,
            range_bytes: 256 << 20,
            started_ms: 1,
        };
        db.set_resync_sweep(vm, Some(&sweep)).unwrap();
        assert_eq!(
            db.relationship(vm).unwrap().unwrap().resync_sweep,
            Some(sweep)
        );
        db.change_primary(vm, &PrimaryEvent::TrackingLost, Some("killed"), None)
            .unwrap();
        assert_eq!(
            db.relationship(vm).unwrap().unwrap().resync_sweep,
            None,
            "what the parts were compared with can no longer be vouched for"
        );
    }

    #[test]
    fn a_version_8_database_gains_the_disk_fingerprints_and_has_none_recorded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.db");
        let old = def("old");
        {
            let db = Db::open(&p).unwrap();
            db.insert_vm(&old).unwrap();
            db.conn
                .execute_batch(
                    "DROP TABLE disk_fingerprints; \
                     ALTER TABLE relationships DROP COLUMN resync_sweep; \
                     DROP INDEX events_vm; ALTER TABLE events DROP COLUMN code; \
                     ALTER TABLE events DROP COLUMN severity; DROP TABLE stats_resets; \
                     DROP TABLE host_settings; \
                     INSERT INTO events (unix_ms, vm, message) VALUES (5, NULL, 'from before'); \
                     PRAGMA user_version = 8;",
                )
                .unwrap();
        }
        let db = Db::open(&p).unwrap();
        let v: i64 = db
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        // After an upgrade no disk has a fingerprint: that is "unknown", never a mismatch.
        assert!(db.disk_fingerprints(old.uuid).unwrap().is_empty());
        // Nor host settings: the daemon imports them from the configuration file at its start.
        assert_eq!(db.host_settings().unwrap(), None);
        // Journal entries from before codes existed read back as notes.
        let ev = db.events(None, None, None, 100).unwrap();
        let before = ev.iter().find(|e| e.message == "from before").unwrap();
        assert_eq!(
            (before.code, before.severity),
            (crate::lifecycle::codes::NOTE, Severity::Info)
        );
    }

    #[test]
    fn a_transition_is_journaled_with_its_code_and_the_journal_filters_by_vm_time_and_id() {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("s.db")).unwrap();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        use vmrepl_types::replication::{ReplicationState as S, Role};
        db.record_transition(
            a,
            Role::Primary,
            S::Replicating,
            S::ResynchronizationRequired,
            "tracking-lost",
            Some("QEMU was killed"),
        )
        .unwrap();
        db.record_transition(
            b,
            Role::Replica,
            S::NotEnabled,
            S::WaitingForInitialReplication,
            "replica-created",
            None,
        )
        .unwrap();
        db.event(Some(a), "a note").unwrap();
        let all = db.events(None, None, None, 100).unwrap();
        assert_eq!(all.len(), 3);
        assert!(all.windows(2).all(|w| w[0].id < w[1].id));
        let lost = &all[0];
        assert_eq!(
            (lost.code, lost.severity, lost.vm),
            (1007, Severity::Error, Some(a))
        );
        assert!(
            lost.message.contains("tracking-lost") && lost.message.contains("QEMU was killed"),
            "{}",
            lost.message
        );
        assert_eq!(all[1].code, 2001);
        let of_a = db.events(Some(a), None, None, 100).unwrap();
        assert_eq!(
            of_a.iter().map(|e| e.code).collect::<Vec<_>>(),
            vec![1007, crate::lifecycle::codes::NOTE]
        );
        assert_eq!(
            db.events(None, None, Some(all[1].id), 100).unwrap().len(),
            1
        );
        assert!(db
            .events(None, Some(u64::MAX / 2), None, 100)
            .unwrap()
            .is_empty());
        // The newest `limit`, still oldest first.
        let last2 = db.events(None, None, None, 2).unwrap();
        assert_eq!(
            last2.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![all[1].id, all[2].id]
        );
    }

    #[test]
    fn reopening_keeps_data_and_a_newer_schema_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.db");
        {
            let db = Db::open(&p).unwrap();
            db.insert_vm(&def("keep")).unwrap();
        }
        let db = Db::open(&p).unwrap();
        assert!(db.vm_by_name("keep").unwrap().is_some());
        db.conn.pragma_update(None, "user_version", 99).unwrap();
        drop(db);
        assert!(matches!(
            Db::open(&p),
            Err(DbError::TooNew { found: 99, .. })
        ));
    }
}
