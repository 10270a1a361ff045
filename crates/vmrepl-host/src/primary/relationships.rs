//! The primary role's relationship rows: load, insert, delete and the bookkeeping of
//! cycles, successes, notes and app-consistent freezes.

use super::*;
use crate::error::HostError;

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

pub(crate) fn load(d: &Host, vm: Uuid) -> Option<Relationship> {
    let db = d.db();
    db.conn()
        .query_row(
            "SELECT rel_id, settings, replica_name, state, acked_seq, last_error, created_ms, last_success_ms, note FROM relationships WHERE vm_uuid = ?1",
            params![vm.to_string()],
            |r| {
                Ok(Relationship {
                    vm_uuid: vm,
                    rel_id: r.get::<_, String>(0)?.parse().unwrap_or_default(),
                    settings: serde_json::from_str(&r.get::<_, String>(1)?).map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e))
                    })?,
                    replica_name: r.get(2)?,
                    state: vmrepl_types::from_wire_name(&r.get::<_, String>(3)?).unwrap_or(ReplicationState::Error),
                    acked_seq: r.get::<_, i64>(4)? as u64,
                    last_error: r.get(5)?,
                    created_ms: r.get::<_, i64>(6)? as u64,
                    last_success_ms: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
                    note: r.get(8)?,
                })
            },
        )
        .optional()
        .ok()
        .flatten()
}

pub(crate) fn all_vm_uuids(d: &Host) -> Vec<Uuid> {
    let db = d.db();
    let mut st = match db.conn().prepare("SELECT vm_uuid FROM relationships") {
        Ok(s) => s,
        Err(_) => return vec![],
    };
    st.query_map([], |r| r.get::<_, String>(0))
        .map(|rows| rows.flatten().filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_default()
}

pub(crate) fn set_state(d: &Host, vm: Uuid, state: ReplicationState, error: Option<&str>) {
    let db = d.db();
    let _ = db.conn().execute(
        "UPDATE relationships SET state = ?2, last_error = ?3 WHERE vm_uuid = ?1",
        params![vm.to_string(), vmrepl_types::wire_name(&state), error],
    );
    let _ = db.event(
        Some(vm),
        &format!(
            "replication {state}{}",
            error.map(|e| format!(": {e}")).unwrap_or_default()
        ),
    );
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn record_cycle(
    d: &Host,
    vm: Uuid,
    seq: u64,
    kind: &str,
    start_ms: u64,
    bytes: u64,
    outcome: &str,
    error: Option<&str>,
) {
    let db = d.db();
    let _ = db.conn().execute(
        "INSERT INTO cycles (vm_uuid, seq, kind, start_ms, duration_ms, bytes, outcome, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            vm.to_string(),
            seq as i64,
            kind,
            start_ms as i64,
            (now_ms().saturating_sub(start_ms)) as i64,
            bytes as i64,
            outcome,
            error
        ],
    );
}

pub(crate) fn record_success(d: &Host, vm: Uuid, acked: u64, state: ReplicationState) {
    let db = d.db();
    let _ = db.conn().execute(
        "UPDATE relationships SET acked_seq = ?2, state = ?3, last_error = NULL, last_success_ms = ?4 WHERE vm_uuid = ?1",
        params![vm.to_string(), acked as i64, vmrepl_types::wire_name(&state), now_ms() as i64],
    );
}

/// Records a new relationship (enable, or reverse replication after a failover, which starts
/// at the common point `acked_seq`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn insert(
    d: &Host,
    vm: Uuid,
    rel_id: Uuid,
    settings: &ReplicationSettings,
    replica_name: &str,
    state: ReplicationState,
    acked_seq: u64,
    note: Option<&str>,
) -> Result<(), HostError> {
    let db = d.db();
    db.conn()
        .execute(
            "INSERT INTO relationships (vm_uuid, rel_id, settings, replica_name, state, created_ms, acked_seq, note) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                vm.to_string(),
                rel_id.to_string(),
                serde_json::to_string(settings).unwrap_or_default(),
                replica_name,
                vmrepl_types::wire_name(&state),
                now_ms() as i64,
                acked_seq as i64,
                note
            ],
        )
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let _ = db.event(
        Some(vm),
        &format!(
            "replication to {replica_name} set up{}",
            note.map(|n| format!(": {n}")).unwrap_or_default()
        ),
    );
    Ok(())
}

/// Drops a relationship's row and ends its scheduler.
pub(crate) fn delete_row(d: &Host, vm: Uuid) {
    stop_scheduler(d, vm);
    let db = d.db();
    let _ = db.conn().execute(
        "DELETE FROM relationships WHERE vm_uuid = ?1",
        params![vm.to_string()],
    );
}

/// Cycles worth finding again in a relationship's record.
#[derive(Clone, Copy)]
pub(crate) enum Marked {
    /// The initial copy was exported to external media.
    Exported,
    /// An app-consistent point was tried (the guest frozen or not).
    AppFreezeTried,
}

/// When the last cycle of `vm` since `since_ms` (the relationship's creation) that is
/// `marked` started, if there was one.
pub(crate) fn last_marked_ms(d: &Host, vm: Uuid, since_ms: u64, marked: Marked) -> Option<u64> {
    let condition = match marked {
        Marked::Exported => "kind = 'export' AND outcome = 'ok'",
        Marked::AppFreezeTried => "app_freeze_ok IS NOT NULL",
    };
    let db = d.db();
    db.conn()
        .query_row(
            &format!(
                "SELECT MAX(start_ms) FROM cycles WHERE vm_uuid = ?1 AND start_ms >= ?2 AND {condition}"
            ),
            params![vm.to_string(), since_ms as i64],
            |r| r.get::<_, Option<i64>>(0),
        )
        .ok()
        .flatten()
        .map(|v| v as u64)
}

/// Sets or clears a relationship's remark.
pub(crate) fn set_note(d: &Host, vm: Uuid, note: Option<&str>) {
    let db = d.db();
    let _ = db.conn().execute(
        "UPDATE relationships SET note = ?2 WHERE vm_uuid = ?1",
        params![vm.to_string(), note],
    );
}

/// Notes on the cycle started at `start_ms` whether the guest was frozen for it.
pub(crate) fn record_freeze(d: &Host, vm: Uuid, start_ms: u64, freeze: &Result<u64, String>) {
    let db = d.db();
    let _ = db.conn().execute(
        "UPDATE cycles SET app_freeze_ok = ?3, app_freeze_error = ?4 WHERE vm_uuid = ?1 AND start_ms = ?2",
        params![
            vm.to_string(),
            start_ms as i64,
            freeze.is_ok(),
            freeze.as_ref().err()
        ],
    );
    if let Err(e) = freeze {
        let _ = db.event(Some(vm), e);
    }
}
