//! The host's errors, typed, and their one mapping to the management API's error codes.
//!
//! Every flow (primary, replica, failover, VM manager, host settings) returns [`HostError`];
//! the VM manager's own methods return a [`VmError`], which `?` makes a [`HostError::Vm`].
//! A variant keeps the error it came from as its `source`, so a database failure stays a
//! database failure on its way up instead of reading as "replication not enabled". The
//! management dispatcher turns a `HostError` into an [`ApiError`] once, in
//! [`HostError::to_api`]: the code comes from the variant, the sentence is the message followed
//! by its chain of causes.
//!
//! Messages are sentences that name the values; they never repeat their source (the chain is
//! appended once, at the edge).

use crate::db::{ChangeError, DbError};
use crate::failover::FailoverError;
use crate::host::SettingsError;
use crate::lifecycle::Refusal;
use crate::peer::client::PeerError;
use crate::primary::EnableError;
use crate::replica::ReplicaError;
use crate::vmm::VmError;
use vmrepl_types::api::{ApiError, ErrorCode};

/// What can go wrong in a flow of this host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The VM has no replication relationship on this host.
    #[error(
        "Replication is not enabled for VM {vm} on this host; enable it with `vmrepl replication \
         enable {vm} --replica-server HOST:PORT`."
    )]
    NotEnabled { vm: String },
    /// `replication now` asked of a relationship that is not replicating (not a state change,
    /// so not the state machine's refusal).
    #[error("Replication of {vm} is {state}; replicating now needs it replicating (initial replication done, not paused, no resynchronization pending).")]
    NotReplicating {
        vm: String,
        state: vmrepl_types::replication::ReplicationState,
    },
    /// `replication set --replica-server`: the old replica was removed but the new one could
    /// not be enabled.
    #[error("Replication of {vm} to {old} was removed, but enabling it to {new} failed: {why} Enable it again with `vmrepl replication enable {vm} --replica-server HOST:PORT`.")]
    RepointFailed {
        vm: String,
        old: String,
        new: String,
        why: String,
    },
    /// `replication now` ran a cycle and it failed (the cycle's own sentence).
    #[error("Replicating {vm} now failed: {why}")]
    ReplicateNowFailed { vm: String, why: String },
    /// The relationship's state does not allow what was asked (its state machine refused).
    #[error(transparent)]
    WrongState(#[from] Refusal),
    /// The state database failed.
    #[error("The state database failed while {doing}")]
    Db {
        doing: String,
        #[source]
        source: DbError,
    },
    /// The replica server could not be reached or refused.
    #[error("Cannot reach the replica server {server} to {doing}. Nothing was changed.")]
    Peer {
        server: String,
        doing: String,
        #[source]
        source: PeerError,
    },
    /// The VM manager refused or failed (its own error carries the code).
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A change to the host's own settings was refused or failed.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// A failover flow (prepare, start, complete, cancel, test, reverse) failed.
    #[error(transparent)]
    Failover(#[from] FailoverError),
    /// Enabling replication of a VM failed (settings, disks, export folder, the replica's answer).
    #[error(transparent)]
    Enable(#[from] EnableError),
    /// A replica-side command (import, accept-copy, networks) was refused or failed.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

impl HostError {
    /// A database failure while `doing` something.
    pub fn db(doing: impl Into<String>) -> impl FnOnce(DbError) -> HostError {
        let doing = doing.into();
        move |source| HostError::Db { doing, source }
    }
}

impl ApiAnswer for HostError {
    /// The stable API code of this error: the one place a host error meets the API.
    fn code(&self) -> ErrorCode {
        match self {
            HostError::NotEnabled { .. } => ErrorCode::NotFound,
            HostError::WrongState(_) | HostError::NotReplicating { .. } => ErrorCode::WrongState,
            HostError::ReplicateNowFailed { .. } | HostError::RepointFailed { .. } => {
                ErrorCode::Peer
            }
            HostError::Db { .. } => ErrorCode::Internal,
            HostError::Peer { source, .. } => match source {
                PeerError::Io { .. } => ErrorCode::Io,
                _ => ErrorCode::Peer,
            },
            HostError::Vm(e) => e.code(),
            HostError::Settings(e) => e.code(),
            HostError::Failover(e) => e.code(),
            HostError::Enable(e) => e.code(),
            HostError::Replica(e) => e.code(),
        }
    }
}

/// An error that answers the management API: its stable code, and (the same for every one)
/// the answer itself, the code with [`sentence`].
pub trait ApiAnswer: std::error::Error + 'static {
    /// The stable API code of this error.
    fn code(&self) -> ErrorCode;

    /// The error as the management API answers it: its code, and its message followed by
    /// each cause in turn.
    fn to_api(&self) -> ApiError
    where
        Self: Sized,
    {
        ApiError::new(self.code(), sentence(self))
    }
}

/// The API sentence of an error: its message followed by each cause in turn (a cause whose
/// text the sentence already holds is not repeated).
pub(crate) fn sentence(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message = if message.ends_with('.') {
                format!("{message} Cause: {text}")
            } else {
                format!("{message}: {text}")
            };
        }
        cause = c.source();
    }
    message
}

impl From<ChangeError> for HostError {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::Refused(r) => HostError::WrongState(r),
            ChangeError::Missing { vm } => HostError::NotEnabled { vm: vm.to_string() },
            ChangeError::Db(source) => HostError::Db {
                doing: "recording a state change".into(),
                source,
            },
        }
    }
}

impl From<VmError> for ApiError {
    fn from(e: VmError) -> Self {
        HostError::from(e).to_api()
    }
}

impl From<SettingsError> for ApiError {
    fn from(e: SettingsError) -> Self {
        HostError::from(e).to_api()
    }
}

impl From<HostError> for ApiError {
    fn from(e: HostError) -> Self {
        e.to_api()
    }
}

impl From<&HostError> for ApiError {
    fn from(e: &HostError) -> Self {
        e.to_api()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmrepl_types::replication::ReplicationState;

    #[test]
    fn each_variant_maps_to_its_api_code_once() {
        let not = HostError::NotEnabled { vm: "web".into() };
        assert_eq!(not.to_api().code, ErrorCode::NotFound);
        assert!(not.to_api().message.contains("replication enable web"));
        let refused = crate::lifecycle::on_primary(
            ReplicationState::Replicating,
            &crate::lifecycle::PrimaryEvent::Resumed { initial_done: true },
        )
        .unwrap_err();
        let e = HostError::from(refused);
        assert_eq!(e.to_api().code, ErrorCode::WrongState);
        assert!(
            e.to_api().message.contains("not paused"),
            "{}",
            e.to_api().message
        );
        let vm = HostError::from(crate::vmm::VmError::NoSuchVm {
            name: vmrepl_types::VmName::new("web").unwrap(),
        });
        assert_eq!(ApiError::from(&vm).code, ErrorCode::NotFound);
        assert!(ApiError::from(vm).message.contains("no VM named \"web\""));
    }

    #[test]
    fn a_database_failure_keeps_its_cause_and_prints_it_once() {
        let e = HostError::db("reading the relationships")(DbError::Corrupt("bad row".into()));
        assert!(std::error::Error::source(&e).is_some());
        let api = e.to_api();
        assert_eq!(api.code, ErrorCode::Internal);
        assert_eq!(api.message.matches("bad row").count(), 1, "{}", api.message);
        assert!(
            api.message
                .starts_with("The state database failed while reading"),
            "{}",
            api.message
        );
    }

    #[test]
    fn a_missing_relationship_in_a_change_reads_as_not_enabled() {
        let vm = uuid::Uuid::new_v4();
        let e = HostError::from(ChangeError::Missing { vm });
        assert_eq!(e.code(), ErrorCode::NotFound);
        assert!(e.to_string().contains(&vm.to_string()));
    }

    #[test]
    fn an_unreachable_replica_server_is_a_peer_error_that_names_the_server_and_the_cause() {
        let source = PeerError::Connect {
            host: "hostb".into(),
            addr: "127.0.0.2:7443".into(),
            detail: "connection refused".into(),
        };
        let e = HostError::Peer {
            server: "hostb:7443".into(),
            doing: "replicate VM web".into(),
            source,
        };
        let api = e.to_api();
        assert_eq!(api.code, ErrorCode::Peer);
        assert!(api.message.starts_with("Cannot reach the replica server hostb:7443 to replicate VM web. Nothing was changed."), "{}", api.message);
        assert!(
            api.message.contains("connection refused"),
            "{}",
            api.message
        );
    }
}
