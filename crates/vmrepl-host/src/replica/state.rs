//! The replica's state changes, as the flows raise them: every one goes through
//! [`crate::db::Db::change_replica`], which asks the state machine
//! ([`crate::lifecycle::on_replica`]) and records the transition with its cause.

use crate::db::Db;
use crate::db::{ChangeError, ReplicaUpdate, Transition};
use crate::lifecycle::ReplicaEvent;
use uuid::Uuid;

/// Applies `event` to the replica of `vm` (the one way its state changes), logging the change.
pub(crate) fn change(
    db: &Db,
    vm: Uuid,
    event: ReplicaEvent,
    cause: Option<&str>,
    update: ReplicaUpdate<'_>,
) -> Result<Transition, ChangeError> {
    let t = db.change_replica(vm, &event, cause, update);
    match &t {
        Ok(t) if t.from != t.to => {
            // The journal has it already (`Db::record_transition`).
            tracing::info!(target: "vmrepl::replica", %vm, event = event.name(), from = %t.from, to = %t.to, "state changed");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(target: "vmrepl::replica", %vm, event = event.name(), "{e}"),
    }
    t
}
