//! The VM manager's errors, typed: one variant per kind of failure, each with the values it
//! names and, where there is one, the error it came from as its `source`.
//!
//! A message never repeats its source: [`crate::error::HostError::to_api`] appends the chain
//! of causes once, so "Cannot create the run folder /x" with an `io::Error` as its source
//! reads "Cannot create the run folder /x: Permission denied (os error 13)" at the API.
//! Errors that are already a whole sentence of their own (a refused name, a command line
//! that cannot be built, a failed qemu-img run, a database failure) are kept as they are,
//! transparently.

use crate::db::DbError;
use crate::error::ApiAnswer;
use std::path::PathBuf;
use uuid::Uuid;
use vmrepl_qemu::cmdline::CmdlineError;
use vmrepl_qemu::img::ImgError;
use vmrepl_qemu::process::ProcessError;
use vmrepl_qemu::qmp::QmpError;
use vmrepl_types::api::ErrorCode;
use vmrepl_types::caps::Incompatibility;
use vmrepl_types::vm::FirmwareVariantId;
use vmrepl_types::{Generation, NameError, VmName, VmRunState};

/// What can go wrong when the VM manager defines, runs, stops or deletes a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    // --- Which VM ---
    /// No VM has this name here.
    #[error("There is no VM named \"{name}\" on this host; `vmrepl vm list` shows the VMs here.")]
    NoSuchVm { name: VmName },
    /// The VM with this UUID went away (deleted meanwhile).
    #[error("VM {uuid} is gone.")]
    Gone { uuid: Uuid },
    /// `vm create` with a name that is taken.
    #[error(
        "A VM named \"{name}\" already exists on this host; pick another name or delete it first."
    )]
    AlreadyExists { name: VmName },
    /// Registering a built VM (failover, test failover) whose name is taken.
    #[error("A VM named {name:?} already exists on this host; rename or delete it first (nothing was changed).")]
    NameTaken { name: String },
    /// Registering a built VM whose UUID is taken.
    #[error("VM {uuid} already exists on this host (nothing was changed).")]
    UuidTaken { uuid: Uuid },

    // --- The VM's run state does not allow it ---
    /// Start refused: the VM was prepared for a planned failover.
    #[error("VM {name} is locked: it was prepared for a planned failover and now runs on the replica. Cancel the failover, or fail back, to run it here.")]
    LockedForFailover { name: VmName },
    /// Start refused: the VM is not off.
    #[error("VM {name} is {state}; it can only be started when it is off.")]
    NotOff { name: VmName, state: VmRunState },
    /// Shutdown refused: the VM is not running.
    #[error("VM {name} is {state}; only a running VM can be shut down.")]
    NotRunningToShutDown { name: VmName, state: VmRunState },
    /// Stop refused: the VM is not running.
    #[error("VM {name} is {state}; it is not running.")]
    NotRunning { name: VmName, state: VmRunState },
    /// The guest did not power off within the time given.
    #[error("VM {name} did not shut down within {secs} s (the guest may not handle the ACPI power button). Retry with a longer --timeout, or add --force to stop it hard.")]
    ShutdownTimedOut { name: VmName, secs: u64 },
    /// A disk resize while the VM is neither off nor running (starting, shutting down).
    #[error("VM {name} is {state}; grow its disk once it runs or is off.")]
    ResizeWhile { name: VmName, state: VmRunState },
    /// Delete refused: the VM is not stopped.
    #[error("VM {name} is {state}; shut it down or stop it first.")]
    Running { name: VmName, state: VmRunState },
    /// A planned failover's lock refused: the VM is not shut down.
    #[error("VM {name} is {state}; a planned failover needs it shut down (`vmrepl vm shutdown {name}`), so that no write is lost.")]
    NotShutDownForFailover { name: VmName, state: VmRunState },

    // --- An invalid definition ---
    /// The VM name is refused.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A disk the VM does not have.
    #[error("VM {vm} has no disk {disk:?}; its disks are {disks}.")]
    NoSuchDisk {
        vm: String,
        disk: String,
        disks: String,
    },
    /// A disk asked to shrink, or to a size that is not whole sectors.
    #[error(
        "Disk {disk} is {now} bytes; it can only grow, to a multiple of 512 bytes ({size} asked): ask for more than {now} bytes (shrinking would cut off the guest's data; to make it smaller, copy the data to a new, smaller disk inside the guest)."
    )]
    Shrink { disk: String, size: u64, now: u64 },
    /// vCPU count out of range.
    #[error("{vcpus} vCPUs asked; use 1 to 64.")]
    Vcpus { vcpus: u32 },
    /// Memory size out of range.
    #[error("{mib} MiB of memory asked; use 32 MiB to 1 TiB.")]
    Memory { mib: u64 },
    /// More disks than a VM may have.
    #[error("{count} disks asked; a VM has at most {max}.")]
    TooManyDisks { count: usize, max: usize },
    /// Secure Boot on a generation 1 VM.
    #[error(
        "Secure Boot needs a generation 2 (UEFI) VM; drop --secure-boot or use --generation 2."
    )]
    SecureBootNeedsUefi,
    /// Secure Boot on a machine type other than q35.
    #[error("Secure Boot needs the q35 machine type.")]
    SecureBootNeedsQ35,
    /// A kernel or initrd to boot directly does not exist.
    #[error("Kernel boot file {} does not exist.", path.display())]
    NoBootFile { path: PathBuf },
    /// `--initrd` or `--cmdline` without `--kernel`.
    #[error("--initrd and --cmdline need --kernel.")]
    BootOptionsWithoutKernel,
    /// A new disk's file is in the way.
    #[error("A file {} is in the way of the new disk; move it away or give another --storage folder.", path.display())]
    DiskFileExists { path: PathBuf },
    /// A new disk's size is not usable.
    #[error("Disk size {bytes} bytes is not a multiple of 512 of at least 1 MiB.")]
    DiskSize { bytes: u64 },
    /// An image to import does not exist.
    #[error("Image to import {} does not exist.", path.display())]
    NoImage { path: PathBuf },
    /// A folder asked for that is not one of the configured storage folders.
    #[error(
        "Folder {} is not one of this host's storage folders ({}); add it to `storage` in the configuration file or pick one of those.",
        folder.display(),
        join_paths(storage)
    )]
    NotAStorageFolder {
        folder: PathBuf,
        storage: Vec<PathBuf>,
    },
    /// The definition cannot be turned into a QEMU command line.
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),

    // --- What this host cannot run ---
    /// A machine type this host's QEMU does not know.
    #[error(
        "Machine type {wanted:?} is unknown to this host's QEMU {qemu}; use one of: {}",
        family.join(", ")
    )]
    UnknownMachineType {
        wanted: String,
        qemu: String,
        family: Vec<String>,
    },
    /// A machine type that is not a PC board.
    #[error("Machine type {machine} is not a PC machine type; use pc-i440fx-* or pc-q35-*")]
    NotAPcMachineType { machine: String },
    /// The firmware a generation needs is not installed.
    #[error("This host has no {firmware} firmware for machine type {machine_type}, which a generation {generation} VM needs; install it (apt-get install {package}) and restart the daemon.")]
    NoFirmware {
        firmware: FirmwareVariantId,
        machine_type: String,
        generation: Generation,
        package: &'static str,
    },
    /// This host cannot run the VM (its machine type, firmware or configuration version).
    #[error(transparent)]
    Incompatible(#[from] Incompatibility),

    // --- QEMU failed ---
    /// QEMU did not come up.
    #[error("QEMU did not start VM {name}")]
    Start {
        name: VmName,
        #[source]
        source: Box<ProcessError>,
    },
    /// QEMU came up but refused a start-up command.
    #[error("QEMU for VM {name} refused start-up step {step}")]
    StartupStep {
        name: VmName,
        step: String,
        #[source]
        source: Box<QmpError>,
    },
    /// QEMU did not grow a running VM's disk (nothing changed: the VM runs on with the disk
    /// at its old size).
    #[error("QEMU did not grow disk {disk} of the running VM {name} to {size} bytes; the disk keeps its size")]
    GrowOnline {
        name: VmName,
        disk: String,
        size: u64,
        #[source]
        source: Box<vmrepl_tracking::TrackingError>,
    },
    /// QEMU grew a running VM's disk, but its new size could not be recorded.
    #[error("Disk {disk} of the running VM {name} was grown to {size} bytes, but its new size could not be recorded; run the same `vmrepl vm disk resize` again (the disk is that size already, only the record is written), or replication cycles fail until it is")]
    GrownNotRecorded {
        name: VmName,
        disk: String,
        size: u64,
        #[source]
        source: Box<DbError>,
    },
    /// qemu-img failed creating, importing or reading a disk.
    #[error(transparent)]
    Image(#[from] ImgError),

    // --- Files ---
    /// The VM's run folder cannot be created.
    #[error("Cannot create the run folder {}", path.display())]
    RunFolder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The VM's folder in a storage folder cannot be created.
    #[error("Cannot create {}", path.display())]
    StorageFolder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A VM file cannot be made owner-only.
    #[error("Cannot make {} owner-only (mode 0600)", path.display())]
    OwnerOnly {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The NVRAM template cannot be copied.
    #[error("Cannot copy the NVRAM template {}", path.display())]
    NvramTemplate {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A disk cannot be deleted.
    #[error("Cannot delete disk {}", path.display())]
    DeleteDisk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `vm console --tail` over the limit.
    #[error("--tail {tail} is more than the limit of {max} bytes (16 MiB); ask for less (older output is in serial.log.1 in the VM's run folder).")]
    TailTooLong { tail: u64, max: u64 },
    /// The serial log cannot be read.
    #[error("Cannot read the serial log {}", path.display())]
    SerialLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    // --- The state database ---
    /// The state database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl ApiAnswer for VmError {
    /// The stable API code of this error.
    fn code(&self) -> ErrorCode {
        use VmError::*;
        match self {
            NoSuchVm { .. } | Gone { .. } | NoSuchDisk { .. } => ErrorCode::NotFound,
            Shrink { .. } => ErrorCode::InvalidInput,
            AlreadyExists { .. } | NameTaken { .. } | UuidTaken { .. } => ErrorCode::AlreadyExists,
            LockedForFailover { .. }
            | NotOff { .. }
            | NotRunningToShutDown { .. }
            | NotRunning { .. }
            | ShutdownTimedOut { .. }
            | Running { .. }
            | ResizeWhile { .. }
            | NotShutDownForFailover { .. } => ErrorCode::WrongState,
            Name(_)
            | Vcpus { .. }
            | Memory { .. }
            | TooManyDisks { .. }
            | DiskFileExists { .. }
            | SecureBootNeedsUefi
            | SecureBootNeedsQ35
            | NoBootFile { .. }
            | BootOptionsWithoutKernel
            | DiskSize { .. }
            | NoImage { .. }
            | NotAStorageFolder { .. }
            | Cmdline(_)
            | TailTooLong { .. } => ErrorCode::InvalidInput,
            UnknownMachineType { .. }
            | NotAPcMachineType { .. }
            | NoFirmware { .. }
            | Incompatible(_) => ErrorCode::Unsupported,
            Start { .. } | StartupStep { .. } | GrowOnline { .. } | Image(_) => ErrorCode::Qemu,
            RunFolder { .. }
            | StorageFolder { .. }
            | OwnerOnly { .. }
            | NvramTemplate { .. }
            | DeleteDisk { .. }
            | SerialLog { .. } => ErrorCode::Io,
            Db(_) | GrownNotRecorded { .. } => ErrorCode::Internal,
        }
    }
}

fn join_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::HostError;

    fn web() -> VmName {
        VmName::new("web").unwrap()
    }

    #[test]
    fn each_kind_of_vm_failure_maps_to_its_api_code_through_host_error() {
        let cases = [
            (VmError::NoSuchVm { name: web() }, ErrorCode::NotFound),
            (
                VmError::AlreadyExists { name: web() },
                ErrorCode::AlreadyExists,
            ),
            (
                VmError::NotOff {
                    name: web(),
                    state: VmRunState::Running,
                },
                ErrorCode::WrongState,
            ),
            (VmError::Vcpus { vcpus: 0 }, ErrorCode::InvalidInput),
            (
                VmError::NotAPcMachineType {
                    machine: "microvm".into(),
                },
                ErrorCode::Unsupported,
            ),
            (
                VmError::SerialLog {
                    path: "/run/serial.log".into(),
                    source: std::io::ErrorKind::PermissionDenied.into(),
                },
                ErrorCode::Io,
            ),
            (
                VmError::Db(DbError::Corrupt("bad row".into())),
                ErrorCode::Internal,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code, "{e}");
            let api = e.to_api();
            let host = HostError::from(e);
            assert_eq!(host.code(), code);
            assert_eq!(host.to_api(), api, "the two ways to the API agree");
        }
    }

    #[test]
    fn a_vm_failure_with_a_cause_keeps_it_as_its_source_and_the_api_sentence_names_it_once() {
        let source = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let cause = source.to_string();
        let e = VmError::StorageFolder {
            path: "/srv/vms/1234".into(),
            source,
        };
        assert_eq!(e.to_string(), "Cannot create /srv/vms/1234");
        assert!(std::error::Error::source(&e).is_some());
        let api = HostError::from(e).to_api();
        assert_eq!(api.code, ErrorCode::Io);
        assert_eq!(api.message, format!("Cannot create /srv/vms/1234: {cause}"));
        assert_eq!(api.message.matches(&cause).count(), 1, "{}", api.message);
    }

    #[test]
    fn a_qemu_that_does_not_start_reads_as_it_did_before_the_typed_error() {
        let source = ProcessError::Spawn {
            binary: "/usr/bin/qemu-system-x86_64".into(),
            source: std::io::ErrorKind::NotFound.into(),
        };
        let before = format!("QEMU did not start VM web: {source}");
        let api = VmError::Start {
            name: web(),
            source: Box::new(source),
        }
        .to_api();
        assert_eq!(api.code, ErrorCode::Qemu);
        assert_eq!(api.message, before);
    }

    #[test]
    fn a_refused_name_keeps_its_own_sentence_as_invalid_input() {
        let name = VmName::new("../escape").unwrap_err();
        let text = name.to_string();
        let api = VmError::from(name).to_api();
        assert_eq!(api.code, ErrorCode::InvalidInput);
        assert_eq!(api.message, text);
    }

    #[test]
    fn a_folder_outside_the_storage_folders_names_them_all() {
        let e = VmError::NotAStorageFolder {
            folder: "/tmp/x".into(),
            storage: vec!["/srv/a".into(), "/srv/b".into()],
        };
        assert_eq!(e.code(), ErrorCode::InvalidInput);
        assert_eq!(
            e.to_string(),
            "Folder /tmp/x is not one of this host's storage folders (/srv/a, /srv/b); add it to \
             `storage` in the configuration file or pick one of those."
        );
    }
}
