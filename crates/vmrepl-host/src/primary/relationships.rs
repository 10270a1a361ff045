//! The primary role's relationships, as the flows use them: reading them, and every state
//! change, through the persistence layer ([`crate::db`]) and the state machine
//! ([`crate::lifecycle::on_primary`]). Nothing else writes a relationship's state.

use crate::db::{ChangeError, CycleRecord, NewRelationship, Transition};
pub use crate::db::{CycleOutcome, Marked, RecordedKind, Relationship};
use crate::error::HostError;
use crate::host::Host;
use crate::lifecycle::PrimaryEvent;
use crate::primary::stop_scheduler;
use uuid::Uuid;

/// The relationship of `vm`, if this host replicates it.
pub(crate) fn load(d: &Host, vm: Uuid) -> Result<Option<Relationship>, HostError> {
    d.db().relationship(vm).map_err(HostError::db(format!(
        "reading the relationship of VM {vm}"
    )))
}

/// Every relationship this host is the primary of.
pub(crate) fn all(d: &Host) -> Result<Vec<Relationship>, HostError> {
    d.db()
        .relationships()
        .map_err(HostError::db("listing the relationships"))
}

fn logged(
    vm: Uuid,
    event: &PrimaryEvent,
    t: Result<Transition, ChangeError>,
) -> Result<Transition, ChangeError> {
    match &t {
        Ok(t) if t.from != t.to => {
            tracing::info!(target: "vmrepl::replication", %vm, event = event.name(), from = %t.from, to = %t.to, "state changed")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(target: "vmrepl::replication", %vm, event = event.name(), "{e}"),
    }
    t
}

/// Applies `event` to the relationship of `vm` (the one way its state changes): the state
/// machine decides, and the change is recorded durably with its `cause`.
pub(crate) fn change(
    d: &Host,
    vm: Uuid,
    event: PrimaryEvent,
    cause: Option<&str>,
) -> Result<Transition, HostError> {
    let t = d.db().change_primary(vm, &event, cause, None);
    Ok(logged(vm, &event, t)?)
}

/// The replica acknowledged log `seq` of a cycle of `kind`: it is durable there.
pub(crate) fn acknowledged(
    d: &Host,
    vm: Uuid,
    event: PrimaryEvent,
    seq: u64,
) -> Result<Transition, HostError> {
    let t = d.db().change_primary(vm, &event, None, Some(seq));
    Ok(logged(vm, &event, t)?)
}

/// Records an event that already happened (a cycle ended). A refusal here means the state
/// moved meanwhile in a way the table does not foresee: it is logged, the state stays.
pub(crate) fn happened(d: &Host, vm: Uuid, event: PrimaryEvent, cause: Option<&str>) {
    let _ = logged(vm, &event, d.db().change_primary(vm, &event, cause, None));
}

/// Records a new relationship, in the state `event` (enable, reverse) gives it.
pub(crate) fn insert(
    d: &Host,
    new: NewRelationship<'_>,
    event: PrimaryEvent,
) -> Result<Transition, HostError> {
    let t = d.db().insert_relationship(new, &event, None);
    Ok(logged(new.vm, &event, t)?)
}

/// Ends a relationship on this host (`event`: removed, or handed over to reverse
/// replication): its scheduler stops and its row goes, with the transition recorded.
pub(crate) fn end(d: &Host, vm: Uuid, event: PrimaryEvent) -> Result<Transition, HostError> {
    stop_scheduler(d, vm);
    change(d, vm, event, None)
}

/// Records one cycle; a failure to record is logged (the cycle's outcome stands).
pub(crate) fn record_cycle(d: &Host, c: CycleRecord<'_>) {
    if let Err(e) = d.db().record_cycle(&c) {
        tracing::error!(target: "vmrepl::replication", vm = %c.vm, "cannot record a cycle: {e}");
    }
}

/// After a cycle (its record and its state change): journals the relationship's health when
/// it changed (codes 1101-1103, with the reasons), so that `vmrepl events` shows when
/// replication became Critical and when it came back. The first look after the daemon starts
/// says something only when it is not Normal.
pub(crate) fn note_health(d: &Host, vm: Uuid) {
    use vmrepl_types::replication::Health;
    let Some(rt) = crate::locks::unpoisoned(&d.repl.rels).get(&vm).cloned() else {
        return;
    };
    let Some(st) = load(d, vm)
        .ok()
        .flatten()
        .and_then(|rel| crate::primary::status_of(d, &rel).ok().flatten())
    else {
        return;
    };
    let before = {
        let mut last = crate::locks::unpoisoned(&rt.last_health);
        let before = *last;
        *last = Some(st.health);
        before
    };
    if before == Some(st.health) || (before.is_none() && st.health == Health::Normal) {
        return;
    }
    let (code, severity) = crate::lifecycle::codes::health_code(st.health);
    let reasons = if st.health_details.is_empty() {
        String::new()
    } else {
        format!(": {}", st.health_details.join(" "))
    };
    let msg = format!(
        "health {} -> {:?}{reasons}",
        before.map_or("unknown".to_string(), |h| format!("{h:?}")),
        st.health
    );
    tracing::info!(target: "vmrepl::replication", %vm, "{msg}");
    let _ = d.db().event_coded(Some(vm), code, severity, &msg);
}

/// When the last cycle of `vm` since `since_ms` (the relationship's creation) that is
/// `marked` started, if there was one.
pub(crate) fn last_marked_ms(
    d: &Host,
    vm: Uuid,
    since_ms: u64,
    marked: Marked,
) -> Result<Option<u64>, HostError> {
    d.db()
        .last_marked_ms(vm, since_ms, marked)
        .map_err(HostError::db("reading the cycle record"))
}

/// Sets or clears a relationship's remark.
pub(crate) fn set_note(d: &Host, vm: Uuid, note: Option<&str>) {
    if let Err(e) = d.db().set_relationship_note(vm, note) {
        tracing::error!(target: "vmrepl::replication", %vm, "cannot record a note: {e}");
    }
}

/// Notes on the cycle started at `start_ms` whether the guest was frozen for it.
pub(crate) fn record_freeze(d: &Host, vm: Uuid, start_ms: u64, freeze: &Result<u64, String>) {
    let db = d.db();
    if let Err(e) = db.record_freeze(vm, start_ms, freeze) {
        tracing::error!(target: "vmrepl::replication", %vm, "cannot record a freeze: {e}");
    }
    if let Err(e) = freeze {
        let _ = db.event(Some(vm), e);
    }
}
