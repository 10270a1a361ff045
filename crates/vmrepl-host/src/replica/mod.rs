//! The replica side: replica VMs this host keeps for primaries, their durable rows (table
//! `replicas`, migration 3), applying received logs to the store, recovery points, status.
//!
//! The peer server ([`crate::peer_server`]) receives and verifies logs; this module applies
//! them. A replica VM's storage is `<grant storage>/<vm uuid>` (never its name, I5), managed by
//! `vmrepl_store`.
//!
//! At daemon start call [`recover`]: it re-applies every durable, verified log that was received
//! but not applied (a crash during apply is repaired by applying the same log again, I3).

use crate::db::{now_ms, Db};
pub use crate::db::{FailoverRecord, ReplicaRow, TestFailover};
use crate::host::Host;
use crate::peer::proto::{PointPolicy, RefusalCode, MAX_NVRAM_BYTES, NVRAM_DISK_ID};
use rusqlite::params;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;
use vmrepl_store::{ReplicaStore, ReplicaVm, StoreError};
use vmrepl_types::api::{ApiError, ErrorCode};
use vmrepl_types::replication::{
    Consistency, Health, ReplicationState, ReplicationStats, ReplicationStatus, Role,
};
use vmrepl_types::VmDefinition;

mod adopt;
mod apply;
mod lookup;
mod networks;
mod receive;
mod state;
mod status;

pub use adopt::*;
pub use apply::*;
pub(crate) use lookup::*;
pub use networks::*;
pub use receive::*;
pub(crate) use state::*;
pub use status::*;
