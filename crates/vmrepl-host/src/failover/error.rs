//! The failover family's errors, typed: one variant per way a prepare, start, complete,
//! cancel, test failover or reverse can fail, each with the values its sentence names and the
//! error it came from as its `source`.
//!
//! [`FailoverError::code`] is the one place these meet the API's codes; the sentence is the
//! `Display` text, with the cause chain appended once by [`crate::error::HostError::to_api`].
//! A cause that ends a sentence is left to that chain; a cause in the middle of a sentence is
//! named there (the chain then skips it, as the sentence already holds it), so the sentences
//! read as they always did.

use crate::error::ApiAnswer;
use crate::peer::client::PeerError;
use crate::peer::proto::RefusalCode;
use crate::replica::ApplyError;
use std::path::PathBuf;
use vmrepl_store::StoreError;
use vmrepl_tracking::TrackingError;
use vmrepl_types::api::ErrorCode;

/// What can go wrong in a failover flow.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    // ------------------------------------------------------------------ prepare, cancel
    /// Prepare on a host that does not replicate the VM.
    #[error("VM {vm} is not replicated from this host, so there is nothing to prepare; on a replica server use `vmrepl failover start`.")]
    NothingToPrepare { vm: String },
    /// Prepare could not ship the VM's last changes to its replica.
    #[error("The last changes of {vm} could not be sent to {replica}: {why}. Nothing changed; the VM can still start here.")]
    LastChangesNotSent {
        vm: String,
        replica: String,
        why: String,
    },
    /// Cancelling a prepare after the replica already failed the VM over.
    #[error("{replica} has already failed VM {vm} over; it runs there now. Fail back instead of cancelling.")]
    AlreadyRunsOnReplica { vm: String, replica: String },
    /// Cancel on a replica that did not fail over.
    #[error("VM {vm} has not failed over; there is nothing to cancel.")]
    NothingToCancel { vm: String },
    /// Cancel of a failover that is already complete.
    #[error("The failover of {vm} is complete and cannot be cancelled any more.")]
    AlreadyComplete { vm: String },

    // ------------------------------------------------------------------ points, start, complete
    /// The recovery points of a failed-over VM are gone.
    #[error("VM {vm} has failed over and its recovery points were dropped.")]
    PointsDropped { vm: String },
    /// A failover is already in place.
    #[error(
        "VM {vm} has already failed over to point {seq}; complete or cancel that failover first."
    )]
    AlreadyFailedOver { vm: String, seq: u64 },
    /// No recovery point exists yet to fail over to.
    #[error(
        "Initial replication of {vm} is not complete; there is no recovery point to fail over to."
    )]
    NoPointYet { vm: String },
    /// I7: this host cannot run the VM as it is (`why`: what it lacks).
    #[error("This host ({host}) cannot run VM {vm}: {why}. Nothing was changed.")]
    CannotRunHere {
        host: String,
        vm: String,
        why: String,
    },
    /// I6: the VM runs on its primary.
    #[error("VM {vm} is running on the primary {primary}. Shut it down there and run `vmrepl failover prepare {vm}` for a planned failover; nothing was changed.")]
    RunningOnPrimary { vm: String, primary: String },
    /// I6: the primary cannot be asked whether the VM runs there.
    #[error("The primary {primary} cannot be asked whether VM {vm} runs there ({why}). If that host is lost, repeat with --risk-split-brain: two running copies of the VM would diverge. Nothing was changed.")]
    PrimaryUnreachable {
        vm: String,
        primary: String,
        why: String,
    },
    /// The newest state cannot be built: the last received log does not apply.
    #[error("The replica of {vm} cannot apply its received logs: {source}. Its newest state is not whole; choose an older recovery point with --point SEQ (`vmrepl replication points {vm}` lists them). Nothing was changed.")]
    Unapplied {
        vm: String,
        #[source]
        source: ApplyError,
    },
    /// The primary prepared the VM at a log this replica does not hold (yet).
    #[error("The primary prepared {vm} at log {prepared} but this replica holds log {held}; wait for the primary to finish sending and retry. Nothing was changed.")]
    PreparedAtOtherPoint {
        vm: String,
        prepared: u64,
        held: u64,
    },
    /// A planned failover was given another point than the prepared one.
    #[error("A planned failover goes to the prepared point {prepared}; drop --point.")]
    PlannedToOtherPoint { prepared: u64 },
    /// The recovery point asked for does not exist.
    #[error("There is no frozen recovery point with sequence {seq}; the points are {known}. Pick one of them..")]
    PointNotFound { seq: u64, known: String },
    /// The replica store failed.
    #[error(transparent)]
    Store(StoreError),
    /// A kernel-booted VM whose boot files the primary has not sent yet.
    #[error("VM {vm} boots a kernel directly, and the primary {primary} has not sent its {file} yet (it does with its next cycle); retry then. Nothing was changed.")]
    BootFileMissing {
        vm: String,
        primary: String,
        file: &'static str,
    },
    /// This host's copy of a boot file could not be put beside the failed-over VM.
    #[error("Cannot copy {} to {}", .from.display(), .to.display())]
    CopyBootFile {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The VM's disks could not be opened through QEMU (`why`: what the endpoint said).
    #[error("{why}")]
    OpenDisks { why: String },
    /// Streaming or change tracking on the VM's disks failed.
    #[error(transparent)]
    Tracking(TrackingError),
    /// Complete, cancel or reverse of a failed-over VM whose VM is gone.
    #[error("The failed-over VM {vm} is gone.")]
    VmGone { vm: String },
    /// Complete on a replica that did not fail over.
    #[error("VM {vm} has not failed over; there is nothing to complete (`vmrepl failover start {vm}` first).")]
    NothingToComplete { vm: String },

    // ------------------------------------------------------------------ test failover
    /// A test failover of the VM is already running.
    #[error("A test failover of {vm} runs already as VM {test_vm:?}; stop it with `vmrepl failover stop-test {vm}` first.")]
    TestRunning { vm: String, test_vm: String },
    /// Test failover of a VM that failed over.
    #[error("VM {vm} has failed over; test failover is for a replica.")]
    TestOfFailedOver { vm: String },
    /// No recovery point exists yet to test.
    #[error("Initial replication of {vm} is not complete; there is no point to test.")]
    NoPointToTest { vm: String },
    /// The test VM's name ("NAME - Test") is not a valid VM name.
    #[error(transparent)]
    TestName(vmrepl_types::name::NameError),
    /// Stop-test with no test failover running.
    #[error("No test failover of {vm} runs.")]
    NoTestRunning { vm: String },
    /// Recording the test failover in the state database failed.
    #[error(transparent)]
    RecordTest(crate::db::DbError),

    // ------------------------------------------------------------------ reverse
    /// Reverse of an unplanned failover that is not complete.
    #[error("Complete the failover of {vm} first (`vmrepl failover complete {vm}`).")]
    CompleteFirst { vm: String },
    /// Reverse of a VM that did not fail over to this host.
    #[error("VM {vm} has not failed over to this host; reverse replication follows a failover.")]
    NotFailedOver { vm: String },
    /// Reverse with no replica server given, and the old primary never said where it listens.
    #[error(
        "The old primary {primary} never said where it listens; give --replica-server HOST:PORT."
    )]
    NoPrimaryAddress { primary: String },
    /// The reverse's replication settings are not valid (`why`: which and how).
    #[error("Invalid replication settings: {why}.")]
    InvalidSettings { why: String },
    /// The old primary could not be asked to become the replica.
    #[error("{source}. Nothing was changed.")]
    ReverseRequest {
        #[source]
        source: PeerError,
    },
    /// The old primary refused to become the replica. `this_host` names this host where the
    /// refusal is about authorization, for the hint.
    #[error("{replica} refused to become the replica of {vm}: {message}.{} Nothing was changed.", authorize_hint(.replica, .code, .this_host))]
    ReverseRefused {
        vm: String,
        replica: String,
        message: String,
        code: RefusalCode,
        this_host: String,
    },
    /// A peer answered what it should not have.
    #[error("Unexpected answer from {from}: {answer}")]
    UnexpectedAnswer { from: String, answer: String },

    // ------------------------------------------------------------------ anywhere
    /// A VM name this host stored is not valid any more.
    #[error(transparent)]
    StoredName(vmrepl_types::name::NameError),
    /// A blocking task of the flow failed (panicked or was cancelled).
    #[error(transparent)]
    Task(tokio::task::JoinError),
}

fn authorize_hint(replica: &str, code: &RefusalCode, this_host: &str) -> String {
    if *code == RefusalCode::NotAuthorized || *code == RefusalCode::Disabled {
        format!(" On {replica}, enable its replica server and authorize this host ({this_host}).")
    } else {
        String::new()
    }
}

impl From<StoreError> for FailoverError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NoSuchPoint { seq, known } => FailoverError::PointNotFound { seq, known },
            other => FailoverError::Store(other),
        }
    }
}

impl ApiAnswer for FailoverError {
    /// The stable API code of this error.
    fn code(&self) -> ErrorCode {
        use FailoverError::*;
        match self {
            NothingToPrepare { .. } | VmGone { .. } => ErrorCode::NotFound,
            TestRunning { .. } => ErrorCode::AlreadyExists,
            AlreadyRunsOnReplica { .. }
            | NothingToCancel { .. }
            | AlreadyComplete { .. }
            | PointsDropped { .. }
            | AlreadyFailedOver { .. }
            | NoPointYet { .. }
            | RunningOnPrimary { .. }
            | PreparedAtOtherPoint { .. }
            | BootFileMissing { .. }
            | NothingToComplete { .. }
            | TestOfFailedOver { .. }
            | NoPointToTest { .. }
            | NoTestRunning { .. }
            | CompleteFirst { .. }
            | NotFailedOver { .. } => ErrorCode::WrongState,
            PlannedToOtherPoint { .. }
            | PointNotFound { .. }
            | TestName(_)
            | NoPrimaryAddress { .. }
            | InvalidSettings { .. } => ErrorCode::InvalidInput,
            CannotRunHere { .. } => ErrorCode::Unsupported,
            Unapplied { .. } | Store(_) | CopyBootFile { .. } => ErrorCode::Io,
            OpenDisks { .. } | Tracking(_) => ErrorCode::Qemu,
            LastChangesNotSent { .. }
            | PrimaryUnreachable { .. }
            | ReverseRequest { .. }
            | ReverseRefused { .. }
            | UnexpectedAnswer { .. } => ErrorCode::Peer,
            RecordTest(_) | StoredName(_) | Task(_) => ErrorCode::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::HostError;

    fn api(e: FailoverError) -> vmrepl_types::api::ApiError {
        HostError::from(e).to_api()
    }

    #[test]
    fn each_failover_refusal_maps_to_the_api_code_it_always_had() {
        let vm = || "web".to_string();
        let cases = [
            (
                FailoverError::NothingToPrepare { vm: vm() },
                ErrorCode::NotFound,
            ),
            (
                FailoverError::RunningOnPrimary {
                    vm: vm(),
                    primary: "hosta".into(),
                },
                ErrorCode::WrongState,
            ),
            (
                FailoverError::PrimaryUnreachable {
                    vm: vm(),
                    primary: "hosta".into(),
                    why: "connection refused".into(),
                },
                ErrorCode::Peer,
            ),
            (
                FailoverError::PreparedAtOtherPoint {
                    vm: vm(),
                    prepared: 7,
                    held: 6,
                },
                ErrorCode::WrongState,
            ),
            (
                FailoverError::PlannedToOtherPoint { prepared: 7 },
                ErrorCode::InvalidInput,
            ),
            (
                FailoverError::TestRunning {
                    vm: vm(),
                    test_vm: "web - Test".into(),
                },
                ErrorCode::AlreadyExists,
            ),
            (
                FailoverError::CannotRunHere {
                    host: "hostb".into(),
                    vm: vm(),
                    why: "no pc-q35-9.0".into(),
                },
                ErrorCode::Unsupported,
            ),
            (
                FailoverError::OpenDisks {
                    why: "qemu-storage-daemon failed".into(),
                },
                ErrorCode::Qemu,
            ),
            (
                FailoverError::NotFailedOver { vm: vm() },
                ErrorCode::WrongState,
            ),
            (FailoverError::VmGone { vm: vm() }, ErrorCode::NotFound),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let a = api(e);
            assert_eq!(a.code, code, "{text}");
            assert_eq!(a.message, text, "no cause to append");
        }
    }

    #[test]
    fn a_missing_recovery_point_is_invalid_input_and_reads_as_the_store_said_it() {
        let store = StoreError::NoSuchPoint {
            seq: 999999,
            known: "3, 5".into(),
        };
        let before = format!("{store}.");
        let e = FailoverError::from(store);
        assert!(matches!(
            e,
            FailoverError::PointNotFound { seq: 999999, .. }
        ));
        let a = api(e);
        assert_eq!(a.code, ErrorCode::InvalidInput);
        assert_eq!(a.message, before);
        let other = FailoverError::from(StoreError::NoDisks);
        assert_eq!(other.code(), ErrorCode::Io);
        assert_eq!(api(other).message, StoreError::NoDisks.to_string());
    }

    #[test]
    fn a_boot_file_copy_that_fails_keeps_its_io_error_as_the_cause_and_reads_as_before() {
        let io = || std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let e = FailoverError::CopyBootFile {
            from: "/held/vmlinuz".into(),
            to: "/vms/x/vmlinuz".into(),
            source: io(),
        };
        assert!(std::error::Error::source(&e).is_some());
        assert!(
            !e.to_string().contains("denied"),
            "the cause is not in the sentence"
        );
        let a = api(e);
        assert_eq!(a.code, ErrorCode::Io);
        assert_eq!(
            a.message,
            format!("Cannot copy /held/vmlinuz to /vms/x/vmlinuz: {}", io())
        );
    }

    #[test]
    fn a_log_that_does_not_apply_is_named_once_in_the_failover_sentence() {
        let e = FailoverError::Unapplied {
            vm: "web".into(),
            source: ApplyError::Log {
                path: "/r/7.vmrlog".into(),
                reason: "bad magic".into(),
            },
        };
        assert!(std::error::Error::source(&e).is_some());
        let a = api(e);
        assert_eq!(a.code, ErrorCode::Io);
        assert_eq!(a.message.matches("bad magic").count(), 1, "{}", a.message);
        assert!(
            a.message
                .starts_with("The replica of web cannot apply its received logs: log /r/7.vmrlog")
                && a.message.ends_with("Nothing was changed."),
            "{}",
            a.message
        );
    }

    #[test]
    fn a_reverse_refused_for_authorization_says_which_host_to_authorize() {
        let refused = |code| FailoverError::ReverseRefused {
            vm: "web".into(),
            replica: "hosta".into(),
            message: "not authorized".into(),
            code,
            this_host: "hostb".into(),
        };
        let a = api(refused(RefusalCode::NotAuthorized));
        assert_eq!(a.code, ErrorCode::Peer);
        assert_eq!(
            a.message,
            "hosta refused to become the replica of web: not authorized. On hosta, enable its \
             replica server and authorize this host (hostb). Nothing was changed."
        );
        let a = api(refused(RefusalCode::Internal));
        assert_eq!(
            a.message,
            "hosta refused to become the replica of web: not authorized. Nothing was changed."
        );
    }
}
