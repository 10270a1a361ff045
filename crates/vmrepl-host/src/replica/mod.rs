//! The replica side: replica VMs this host keeps for primaries, their durable rows (table
//! `replicas`, migration 3), applying received logs to the store, recovery points, status.
//!
//! The peer server ([`crate::peer_server`]) receives and verifies logs; this module applies
//! them. A replica VM's storage is `<grant storage>/<vm uuid>` (never its name, I5), managed by
//! `vmrepl_store`.
//!
//! At daemon start call [`recover`]: it re-applies every durable, verified log that was received
//! but not applied (a crash during apply is repaired by applying the same log again, I3).

pub use crate::db::{FailoverRecord, ReplicaRow, TestFailover};

mod adopt;
mod apply;
mod error;
mod lookup;
mod networks;
mod receive;
mod remove;
mod state;
mod status;

pub use adopt::*;
pub use apply::*;
pub use error::ReplicaError;
pub(crate) use lookup::*;
pub use networks::*;
pub use receive::*;
pub use remove::*;
pub(crate) use state::*;
pub use status::*;
