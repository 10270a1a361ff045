//! The cycle record (table `cycles`, migrations 2 and 5): one row per replication cycle of a
//! relationship, missed cycles included, which statistics and health are computed from.

use super::{now_ms, Db, DbError};
use rusqlite::params;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What a recorded cycle did (its `kind` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordedKind {
    Initial,
    Delta,
    Resync,
    /// The initial copy written to external media.
    Export,
    /// The replica imported the exported initial copy.
    Import,
}

/// How a recorded cycle ended (its `outcome` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CycleOutcome {
    Ok,
    /// Its time passed while an earlier cycle was still running.
    Missed,
    Failure,
    /// The replica server could not be reached.
    NetworkFailure,
}

/// One cycle to record; its duration runs from `start_ms` to now.
#[derive(Debug, Clone, Copy)]
pub struct CycleRecord<'a> {
    pub vm: Uuid,
    pub seq: u64,
    pub kind: RecordedKind,
    pub start_ms: u64,
    pub bytes: u64,
    pub outcome: CycleOutcome,
    pub error: Option<&'a str>,
}

/// One recorded replication cycle, as statistics read it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CycleSample {
    pub outcome: CycleOutcome,
    pub bytes: u64,
    pub duration_ms: u64,
    pub start_ms: u64,
    /// For an app-consistent attempt: whether the guest was frozen.
    pub app_freeze_ok: Option<bool>,
}

/// Cycles worth finding again in a relationship's record.
#[derive(Clone, Copy)]
pub enum Marked {
    /// The initial copy was exported to external media.
    Exported,
    /// An app-consistent point was tried (the guest frozen or not).
    AppFreezeTried,
}

fn outcome_of(s: &str) -> Result<CycleOutcome, DbError> {
    vmrepl_types::from_wire_name(s)
        .ok_or_else(|| DbError::Corrupt(format!("unknown cycle outcome {s:?}")))
}

impl Db {
    /// Records one cycle.
    pub fn record_cycle(&self, c: &CycleRecord<'_>) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO cycles (vm_uuid, seq, kind, start_ms, duration_ms, bytes, outcome, error) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                c.vm.to_string(),
                c.seq as i64,
                vmrepl_types::wire_name(&c.kind),
                c.start_ms as i64,
                (now_ms().saturating_sub(c.start_ms)) as i64,
                c.bytes as i64,
                vmrepl_types::wire_name(&c.outcome),
                c.error
            ],
        )?;
        Ok(())
    }

    /// Notes on the cycle of `vm` started at `start_ms` whether the guest was frozen for it.
    pub fn record_freeze(
        &self,
        vm: Uuid,
        start_ms: u64,
        freeze: &Result<u64, String>,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE cycles SET app_freeze_ok = ?3, app_freeze_error = ?4 \
             WHERE vm_uuid = ?1 AND start_ms = ?2",
            params![
                vm.to_string(),
                start_ms as i64,
                freeze.is_ok(),
                freeze.as_ref().err()
            ],
        )?;
        Ok(())
    }

    /// When the last cycle of `vm` since `since_ms` that is `marked` started, if there was one.
    pub fn last_marked_ms(
        &self,
        vm: Uuid,
        since_ms: u64,
        marked: Marked,
    ) -> Result<Option<u64>, DbError> {
        let condition = match marked {
            Marked::Exported => "kind = 'export' AND outcome = 'ok'",
            Marked::AppFreezeTried => "app_freeze_ok IS NOT NULL",
        };
        let v: Option<i64> = self.conn.query_row(
            &format!(
                "SELECT MAX(start_ms) FROM cycles WHERE vm_uuid = ?1 AND start_ms >= ?2 AND {condition}"
            ),
            params![vm.to_string(), since_ms as i64],
            |r| r.get(0),
        )?;
        Ok(v.map(|v| v as u64))
    }

    /// The replication cycles of `vm` (not the export and import of an initial copy) started
    /// at or after `since_ms`, oldest first.
    pub fn cycles_since(&self, vm: Uuid, since_ms: u64) -> Result<Vec<CycleSample>, DbError> {
        let mut st = self.conn.prepare(
            "SELECT outcome, bytes, duration_ms, start_ms, app_freeze_ok FROM cycles \
             WHERE vm_uuid = ?1 AND start_ms >= ?2 AND kind NOT IN ('export', 'import') ORDER BY id",
        )?;
        let rows = st.query_map(params![vm.to_string(), since_ms as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<bool>>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for r in rows {
            let (outcome, bytes, dur, start, frozen) = r?;
            out.push(CycleSample {
                outcome: outcome_of(&outcome)?,
                bytes: bytes as u64,
                duration_ms: dur as u64,
                start_ms: start as u64,
                app_freeze_ok: frozen,
            });
        }
        Ok(out)
    }

    /// How many of the last cycles of `vm` (missed ones aside) failed in a row, up to `max`.
    pub fn failed_in_a_row(&self, vm: Uuid, max: u32) -> Result<u32, DbError> {
        let mut st = self.conn.prepare(
            "SELECT outcome FROM cycles WHERE vm_uuid = ?1 AND outcome != 'missed' \
             ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![vm.to_string(), i64::from(max)], |r| {
            r.get::<_, String>(0)
        })?;
        let mut n = 0;
        for r in rows {
            if outcome_of(&r?)? == CycleOutcome::Ok {
                break;
            }
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Db) {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("s.db")).unwrap();
        (d, db)
    }

    fn record(db: &Db, vm: Uuid, kind: RecordedKind, start_ms: u64, outcome: CycleOutcome) {
        db.record_cycle(&CycleRecord {
            vm,
            seq: 2,
            kind,
            start_ms,
            bytes: 4096,
            outcome,
            error: None,
        })
        .unwrap();
    }

    #[test]
    fn kinds_and_outcomes_keep_the_wire_names_older_databases_hold() {
        use vmrepl_types::wire_name;
        assert_eq!(wire_name(&RecordedKind::Export), "export");
        assert_eq!(wire_name(&RecordedKind::Delta), "delta");
        assert_eq!(wire_name(&CycleOutcome::NetworkFailure), "network-failure");
        assert_eq!(wire_name(&CycleOutcome::Ok), "ok");
        assert_eq!(wire_name(&CycleOutcome::Missed), "missed");
    }

    #[test]
    fn statistics_read_replication_cycles_only_not_the_export_and_import_of_a_copy() {
        let (_d, db) = open();
        let vm = Uuid::new_v4();
        record(&db, vm, RecordedKind::Export, 1_000, CycleOutcome::Ok);
        record(&db, vm, RecordedKind::Import, 2_000, CycleOutcome::Ok);
        record(&db, vm, RecordedKind::Delta, 3_000, CycleOutcome::Missed);
        record(
            &db,
            vm,
            RecordedKind::Delta,
            4_000,
            CycleOutcome::NetworkFailure,
        );
        let c = db.cycles_since(vm, 0).unwrap();
        let outcomes: Vec<_> = c.iter().map(|c| c.outcome).collect();
        assert_eq!(
            outcomes,
            [CycleOutcome::Missed, CycleOutcome::NetworkFailure]
        );
        assert!(db.cycles_since(vm, 3_500).unwrap().len() == 1);
        assert!(db.cycles_since(Uuid::new_v4(), 0).unwrap().is_empty());
    }

    #[test]
    fn failures_in_a_row_skip_missed_cycles_and_end_at_a_success() {
        let (_d, db) = open();
        let vm = Uuid::new_v4();
        assert_eq!(db.failed_in_a_row(vm, 2).unwrap(), 0);
        record(&db, vm, RecordedKind::Delta, 1_000, CycleOutcome::Failure);
        record(&db, vm, RecordedKind::Delta, 2_000, CycleOutcome::Missed);
        assert_eq!(db.failed_in_a_row(vm, 2).unwrap(), 1);
        record(
            &db,
            vm,
            RecordedKind::Delta,
            2_500,
            CycleOutcome::NetworkFailure,
        );
        record(&db, vm, RecordedKind::Delta, 2_600, CycleOutcome::Failure);
        assert_eq!(
            db.failed_in_a_row(vm, 2).unwrap(),
            2,
            "counted up to the limit"
        );
        assert_eq!(db.failed_in_a_row(vm, 5).unwrap(), 3);
        record(&db, vm, RecordedKind::Delta, 3_000, CycleOutcome::Ok);
        assert_eq!(db.failed_in_a_row(vm, 2).unwrap(), 0);
    }

    #[test]
    fn an_export_and_an_app_consistent_attempt_are_found_again() {
        let (_d, db) = open();
        let vm = Uuid::new_v4();
        assert_eq!(db.last_marked_ms(vm, 0, Marked::Exported).unwrap(), None);
        record(&db, vm, RecordedKind::Export, 5_000, CycleOutcome::Ok);
        record(&db, vm, RecordedKind::Delta, 6_000, CycleOutcome::Ok);
        db.record_freeze(vm, 6_000, &Err("no guest agent".into()))
            .unwrap();
        assert_eq!(
            db.last_marked_ms(vm, 0, Marked::Exported).unwrap(),
            Some(5_000)
        );
        assert_eq!(
            db.last_marked_ms(vm, 5_500, Marked::Exported).unwrap(),
            None
        );
        assert_eq!(
            db.last_marked_ms(vm, 0, Marked::AppFreezeTried).unwrap(),
            Some(6_000)
        );
        let c = db.cycles_since(vm, 0).unwrap();
        assert_eq!(c[0].app_freeze_ok, Some(false));
    }

    #[test]
    fn an_unknown_outcome_is_a_damaged_record_not_a_success() {
        let (_d, db) = open();
        let vm = Uuid::new_v4();
        record(&db, vm, RecordedKind::Delta, 1_000, CycleOutcome::Ok);
        db.conn
            .execute("UPDATE cycles SET outcome = 'maybe'", [])
            .unwrap();
        assert!(matches!(db.cycles_since(vm, 0), Err(DbError::Corrupt(_))));
        assert!(matches!(
            db.failed_in_a_row(vm, 2),
            Err(DbError::Corrupt(_))
        ));
    }
}
