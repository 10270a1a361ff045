//! Enabling replication's errors, typed: the settings, the VM's disks, the export folder, and
//! what the replica server answered, each with the values its sentence names.
//!
//! [`EnableError::code`] is the one place these meet the API's codes; the sentence is the
//! `Display` text, with the cause chain appended once by [`crate::error::HostError::to_api`]
//! (a cause inside a sentence is named there, and the chain then skips it). A replica server
//! that cannot be reached at all is [`crate::error::HostError::Peer`], shared with reverse.

use crate::error::ApiAnswer;
use crate::peer::client::PeerError;
use std::path::PathBuf;
use vmrepl_types::api::ErrorCode;

/// What can go wrong while enabling replication of a VM.
#[derive(Debug, thiserror::Error)]
pub enum EnableError {
    /// The replica server is not given as HOST:PORT.
    #[error("Replica server {server:?} is not HOST:PORT (for example hostb.example.org:7443).")]
    NotHostPort { server: String },
    /// The port of the replica server is not a number.
    #[error("Port {port:?} of the replica server is not a number.")]
    BadPort { port: String },
    /// The replication settings are not valid (`why`: which and how).
    #[error("Invalid replication settings: {why}.")]
    InvalidSettings { why: String },
    /// This host has no address the replica server can call back (`why`: what to set).
    #[error(
        "Cannot tell the replica server where to reach this host: {why}. Nothing was changed."
    )]
    NoAdvertisedAddress { why: String },
    /// `replication set` asked to change which disks replicate, and the replica server's
    /// release cannot take a changed set of disks (it lacks the `disk-set-changes` feature).
    #[error("Replica server {server} runs an older vmrepl ({release}) that cannot add a disk to or remove one from a replicated VM; upgrade it, or run `vmrepl replication remove {vm}` and enable replication again with the disks you want. Nothing was changed.")]
    DisksInPlace {
        vm: String,
        server: String,
        release: String,
    },
    /// `replication set` asked to change which disks replicate, and the replica server could
    /// not be asked whether it can.
    #[error("Cannot change which disks of {vm} replicate now: the replica server {server} must confirm it can take the change, and it cannot be reached ({why}). Try again once it is reachable. Nothing was changed.")]
    DisksNeedReplica {
        vm: String,
        server: String,
        why: String,
    },
    /// The VM is replicated already.
    #[error("Replication is already enabled for VM {vm}; `vmrepl replication status {vm}` shows it, `replication remove` removes it.")]
    AlreadyEnabled { vm: String },
    /// A disk to exclude that the VM does not have (`disks`: the ones it has).
    #[error("VM {vm} has no disk {disk:?} to exclude; its disks are {disks}.")]
    NoSuchDisk {
        vm: String,
        disk: String,
        disks: String,
    },
    /// Every disk of the VM is excluded.
    #[error("VM {vm} would replicate no disk; exclude fewer.")]
    NoDiskLeft { vm: String },
    /// A scheduled initial replication too far ahead.
    #[error("Initial replication can be scheduled at most 7 days ahead (as in Hyper-V).")]
    ScheduledTooFar,
    /// The export folder is given by a relative path.
    #[error("The export folder {} is not an absolute path.", .folder.display())]
    ExportNotAbsolute { folder: PathBuf },
    /// The export folder does not exist or is a file.
    #[error("The export folder {} does not exist or is not a folder; create it (for example on the external disk) first.", .folder.display())]
    ExportNotAFolder { folder: PathBuf },
    /// This host cannot write into the export folder.
    #[error("This host cannot write into the export folder {}: {source}.", .folder.display())]
    ExportNotWritable {
        folder: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// I7: the replica server cannot run the VM as it is (`why`: what it lacks).
    #[error("The replica server {replica} cannot run VM {vm}: {why}. Nothing was changed.")]
    ReplicaCannotRun {
        replica: String,
        vm: String,
        why: String,
    },
    /// A request to the reached replica server failed on the way.
    #[error(transparent)]
    Request(PeerError),
    /// The replica server refused a step (`what`: the step, `message`: its reason).
    #[error("The replica server {replica} refused to {what}: {message}")]
    Refused {
        replica: String,
        what: &'static str,
        message: String,
    },
    /// The replica server answered what it should not have.
    #[error("Unexpected answer from the replica server: {answer}")]
    UnexpectedAnswer { answer: String },
}

/// Why the boot files of a kernel-booted VM did not reach its replica (at enable, reverse or
/// a cycle; never fatal there: the next cycle sends them again). The sentences go to the log
/// and to a cycle's error, which print only the top, so each names its cause.
#[derive(Debug, thiserror::Error)]
pub enum BootFileError {
    /// The boot file could not be read (or its digest computed) on this host.
    #[error("cannot read the {file} {}: {source}", .path.display())]
    Read {
        file: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The task reading the file failed.
    #[error(transparent)]
    Task(tokio::task::JoinError),
    /// Sending the file to the replica failed.
    #[error(transparent)]
    Send(PeerError),
    /// The replica answered something other than that it kept the file.
    #[error("the replica did not keep the {file}: {answer}")]
    NotKept { file: &'static str, answer: String },
}

impl ApiAnswer for EnableError {
    /// The stable API code of this error.
    fn code(&self) -> ErrorCode {
        use EnableError::*;
        match self {
            NotHostPort { .. }
            | BadPort { .. }
            | InvalidSettings { .. }
            | NoSuchDisk { .. }
            | NoDiskLeft { .. }
            | ScheduledTooFar
            | ExportNotAbsolute { .. }
            | ExportNotAFolder { .. }
            | ExportNotWritable { .. } => ErrorCode::InvalidInput,
            DisksInPlace { .. } => ErrorCode::Unsupported,
            DisksNeedReplica { .. } => ErrorCode::Peer,
            NoAdvertisedAddress { .. } => ErrorCode::InvalidInput,
            AlreadyEnabled { .. } => ErrorCode::AlreadyExists,
            ReplicaCannotRun { .. } => ErrorCode::Unsupported,
            Request(_) | Refused { .. } | UnexpectedAnswer { .. } => ErrorCode::Peer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::HostError;

    #[test]
    fn each_enable_refusal_maps_to_the_api_code_it_always_had() {
        let cases = [
            (
                EnableError::NotHostPort {
                    server: "nohost".into(),
                },
                ErrorCode::InvalidInput,
            ),
            (
                EnableError::AlreadyEnabled { vm: "web".into() },
                ErrorCode::AlreadyExists,
            ),
            (EnableError::ScheduledTooFar, ErrorCode::InvalidInput),
            (
                EnableError::ReplicaCannotRun {
                    replica: "hostb".into(),
                    vm: "web".into(),
                    why: "no pc-q35-9.0".into(),
                },
                ErrorCode::Unsupported,
            ),
            (
                EnableError::Refused {
                    replica: "hostb".into(),
                    what: "host this VM",
                    message: "not authorized".into(),
                },
                ErrorCode::Peer,
            ),
            (
                // A failed request is a peer error even when it failed on I/O.
                EnableError::Request(PeerError::Io {
                    action: "read",
                    path: "/x".into(),
                    source: std::io::Error::other("gone"),
                }),
                ErrorCode::Peer,
            ),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let api = HostError::from(e).to_api();
            assert_eq!(api.code, code, "{text}");
            assert_eq!(api.message, text, "the sentence holds its cause already");
        }
    }

    #[test]
    fn an_export_folder_that_cannot_be_written_keeps_its_io_error_and_names_it_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let e = EnableError::ExportNotWritable {
            folder: "/mnt/usb".into(),
            source: io(),
        };
        assert!(std::error::Error::source(&e).is_some());
        let api = HostError::from(e).to_api();
        assert_eq!(api.code, ErrorCode::InvalidInput);
        assert_eq!(
            api.message,
            format!(
                "This host cannot write into the export folder /mnt/usb: {}.",
                io()
            )
        );
    }

    #[test]
    fn a_boot_file_that_cannot_be_read_is_named_with_its_cause_for_the_log() {
        let e = BootFileError::Read {
            file: "vmlinuz",
            path: "/boot/vmlinuz".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        };
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(
            e.to_string(),
            "cannot read the vmlinuz /boot/vmlinuz: no such file"
        );
    }
}
