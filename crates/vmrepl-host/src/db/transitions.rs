//! The `transitions` table (migration 8): every state change of a replication relationship,
//! with the event that caused it, as the state machines in [`crate::lifecycle`] decided it.

use super::{now_ms, Db, DbError};
use rusqlite::params;
use uuid::Uuid;
use vmrepl_types::replication::{ReplicationState, Role};

/// One recorded state transition of a replication relationship (see `crate::lifecycle`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionRow {
    pub id: i64,
    /// When it was recorded, Unix milliseconds.
    pub at_ms: u64,
    pub vm: Uuid,
    pub role: Role,
    pub from: ReplicationState,
    pub to: ReplicationState,
    /// The event's stable name (`lifecycle::PrimaryEvent::name`, `ReplicaEvent::name`).
    pub event: String,
    /// Why, when the caller knew (an error message, a reason).
    pub cause: Option<String>,
}

impl Db {
    /// Records a state transition of the relationship of `vm` in `role`.
    pub fn record_transition(
        &self,
        vm: Uuid,
        role: Role,
        from: ReplicationState,
        to: ReplicationState,
        event: &str,
        cause: Option<&str>,
    ) -> Result<(), DbError> {
        // The journal gets it too, with the event's stable code and severity.
        let (code, severity) = crate::lifecycle::codes::code_of(role, event);
        let side = match role {
            Role::Primary => "replication",
            Role::Replica | Role::TestReplica => "replica",
        };
        let message = if from == to {
            format!("{side} {to} ({event})")
        } else {
            format!("{side} {from} -> {to} ({event})")
        };
        let message = match cause {
            Some(c) => format!("{message}: {c}"),
            None => message,
        };
        // An apply pass that found nothing and changed nothing is not news.
        if !(from == to && event == "no-log-pending") {
            self.event_coded(Some(vm), code, severity, &message)?;
        }
        self.conn.execute(
            "INSERT INTO transitions (at_ms, vm_uuid, role, from_state, to_state, event, cause) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                now_ms() as i64,
                vm.to_string(),
                vmrepl_types::wire_name(&role),
                vmrepl_types::wire_name(&from),
                vmrepl_types::wire_name(&to),
                event,
                cause
            ],
        )?;
        Ok(())
    }

    /// When event `event` was last recorded for `vm` (Unix milliseconds), if ever.
    pub fn last_event_ms(&self, vm: Uuid, event: &str) -> Result<Option<u64>, DbError> {
        use rusqlite::OptionalExtension;
        Ok(self
            .conn
            .query_row(
                "SELECT at_ms FROM transitions WHERE vm_uuid = ?1 AND event = ?2 \
                 ORDER BY id DESC LIMIT 1",
                params![vm.to_string(), event],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(|v| v.max(0) as u64))
    }

    /// The last `limit` recorded transitions, newest first: of `vm`, or of every VM.
    pub fn transitions(
        &self,
        vm: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<TransitionRow>, DbError> {
        let mut st = self.conn.prepare(
            "SELECT id, at_ms, vm_uuid, role, from_state, to_state, event, cause FROM transitions \
             WHERE ?1 IS NULL OR vm_uuid = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = st.query_map(
            params![
                vm.map(|u| u.to_string()),
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            row_to_transition,
        )?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }
}

fn row_to_transition(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<TransitionRow, DbError>> {
    let id: i64 = r.get(0)?;
    let at_ms: i64 = r.get(1)?;
    let texts: [String; 5] = [r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?];
    let cause: Option<String> = r.get(7)?;
    let [vm, role, from, to, event] = texts;
    Ok((|| {
        let wire = |what: &str, s: &str| {
            DbError::Corrupt(format!("unknown {what} {s:?} in transition {id}"))
        };
        Ok(TransitionRow {
            id,
            at_ms: at_ms as u64,
            vm: vm.parse().map_err(|_| wire("VM id", &vm))?,
            role: vmrepl_types::from_wire_name(&role).ok_or_else(|| wire("role", &role))?,
            from: vmrepl_types::from_wire_name(&from).ok_or_else(|| wire("state", &from))?,
            to: vmrepl_types::from_wire_name(&to).ok_or_else(|| wire("state", &to))?,
            event,
            cause,
        })
    })())
}
