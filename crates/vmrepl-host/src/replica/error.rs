//! What the replica side's operator commands refuse or fail with (`replication import`,
//! `replication server accept-copy`, `replication network`, and finding a replica by name).

use super::ApplyError;
use crate::error::ApiAnswer;
use std::path::PathBuf;
use vmrepl_types::api::ErrorCode;

/// A replica-side command's error; the API code comes from [`ReplicaError::code`].
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("This host keeps no replica of a VM named {name}; failover and import run on the replica server. `vmrepl replication status` lists what this host replicates.")]
    NoSuchReplica { name: String },
    #[error("{primary:?} is not a host name: {reason}.")]
    NotAHostName { primary: String, reason: String },
    #[error("VM {vm} is itself replicated; remove its replication first (`vmrepl replication remove {vm}`).")]
    ItselfReplicated { vm: String },
    #[error("VM {vm} has {count} network adapters (0 to {}); there is no adapter {adapter}.", count.saturating_sub(1))]
    NoSuchAdapter {
        vm: String,
        count: usize,
        adapter: usize,
    },
    #[error("The replica of {vm} was removed, but its data in {} could not be deleted: {why}. Delete that folder by hand.", dir.display())]
    CannotDelete {
        vm: String,
        dir: PathBuf,
        why: String,
    },
    #[error("Invalid failover TCP/IP: {why}.")]
    BadFailoverIp { why: String },
    #[error("The replica of {vm} has failed over; it takes no initial copy.")]
    FailedOver { vm: String },
    #[error("Cannot read the exported initial copy {}", file.display())]
    UnreadableExport {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The replica of {vm} cannot apply its logs")]
    CannotApply {
        vm: String,
        #[source]
        source: ApplyError,
    },
    #[error("The replica of {vm} already holds its initial copy (log {last} applied); nothing was imported.")]
    AlreadyHoldsCopy { vm: String, last: u64 },
    #[error("The replica storage {} has {free} bytes free; importing {} needs {size} bytes and more to apply it. Free some space and import again.", dir.display(), file.display())]
    NoSpace {
        dir: PathBuf,
        file: PathBuf,
        free: u64,
        size: u64,
    },
    #[error("The primary {primary} of {vm} is not authorized on this host any more ({why}); nothing was imported. Authorize it again (`vmrepl replication server authorize`) or remove the replica.")]
    PrimaryNotAuthorized {
        primary: String,
        vm: String,
        why: String,
    },
    #[error("The primary {primary} has not announced an exported initial copy of {vm}; it does when it writes the export (with `--initial-export`). Nothing was imported.")]
    NotAnnounced { primary: String, vm: String },
    #[error("{} is not a usable initial copy of {vm}: {why}. Nothing was changed; export it again on the primary if it is damaged.", file.display())]
    Unusable {
        file: PathBuf,
        vm: String,
        why: String,
    },
    #[error("The initial copy of {vm} could not be made durable: {why}.")]
    NotDurable { vm: String, why: String },
    #[error("The import of the initial copy of {vm} stopped")]
    ImportTask {
        vm: String,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("The initial copy of {vm} was imported but could not be applied yet: {source}. It is kept and applied again at the next log or daemon start.")]
    AppliedLater {
        vm: String,
        #[source]
        source: ApplyError,
    },
}

impl ApiAnswer for ReplicaError {
    /// The stable API code of this error.
    fn code(&self) -> ErrorCode {
        use ReplicaError::*;
        match self {
            NoSuchReplica { .. } | UnreadableExport { .. } => ErrorCode::NotFound,
            NotAHostName { .. } | NoSuchAdapter { .. } | Unusable { .. } | BadFailoverIp { .. } => {
                ErrorCode::InvalidInput
            }
            ItselfReplicated { .. }
            | FailedOver { .. }
            | AlreadyHoldsCopy { .. }
            | PrimaryNotAuthorized { .. }
            | NotAnnounced { .. } => ErrorCode::WrongState,
            CannotApply { .. }
            | NoSpace { .. }
            | NotDurable { .. }
            | ImportTask { .. }
            | AppliedLater { .. } => ErrorCode::Internal,
            CannotDelete { .. } => ErrorCode::Io,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_adapter_names_the_adapters_there_are() {
        let e = ReplicaError::NoSuchAdapter {
            vm: "web".into(),
            count: 2,
            adapter: 5,
        };
        assert_eq!(e.code(), ErrorCode::InvalidInput);
        assert_eq!(
            e.to_api().message,
            "VM web has 2 network adapters (0 to 1); there is no adapter 5."
        );
    }

    #[test]
    fn an_unreadable_export_keeps_its_io_cause_and_prints_it_once() {
        let e = ReplicaError::UnreadableExport {
            file: "/media/web.vmrlog".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "No such file"),
        };
        let m = e.to_api().message;
        assert_eq!(e.code(), ErrorCode::NotFound);
        assert_eq!(
            m,
            "Cannot read the exported initial copy /media/web.vmrlog: No such file"
        );
    }
}
