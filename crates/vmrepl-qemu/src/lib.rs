//! `vmrepl-qemu`: the one wrapper around QEMU.
//!
//! Every other vmrepl crate reaches QEMU only through this crate, so that command lines,
//! process handling and QMP framing live in one place and every external command and QMP
//! command is logged (target `vmrepl::qemu`) with its duration.
//!
//! Modules:
//! - [`qmp`]: async QMP client over a Unix socket (VMs and `qemu-storage-daemon` alike):
//!   concurrent commands matched by id, an event stream, close detection. Also [`qmp::Qga`],
//!   a small guest-agent client (sync-delimited, ping, fsfreeze).
//! - [`cmdline`]: a pure function from a [`vmrepl_types::VmDefinition`] plus runtime paths to
//!   QEMU's argv, and the QMP commands to run once QEMU is up (QEMU is started paused, `-S`).
//! - [`process`]: spawn QEMU in its own process group (it survives a daemon restart),
//!   reattach by pid + QMP socket, detect exit, keep QEMU's stderr for error messages.
//! - [`img`]: `qemu-img` wrapper (create/info/map/compare/check/bitmap/rebase/commit/resize),
//!   with variants that never follow backing files of images received from a peer (I5).
//! - [`storage_daemon`]: `qemu-storage-daemon` over a VM's disks when the VM is off, using the
//!   same node names as a running VM, so the same QMP sequences work offline.
//! - [`caps`]: probe what this host can run ([`vmrepl_types::HostInfo`]) and resolve the
//!   accelerator and machine-type aliases.
//! - [`firmware`]: UEFI firmware found through QEMU's firmware descriptors
//!   (`/usr/share/qemu/firmware/*.json` and the administrator's and user's overrides).

pub mod caps;
pub mod cmdline;
mod exec;
pub mod firmware;
#[doc(hidden)]
pub mod fuzzing;
pub mod img;
pub mod process;
pub mod qmp;
pub mod storage_daemon;

pub use caps::{
    probe, resolve_accel, resolve_machine_alias, HostProbe, ProbeOptions, ResolvedAccel,
};
pub use cmdline::{build_command, QemuCommand, RunPaths};
pub use exec::ExecError;
pub use img::ImgError;
pub use process::{is_alive, ProcessError, QemuProcess, SpawnOptions};
pub use qmp::{GuestInterface, Qga, QmpClient, QmpError, QmpEvent};
pub use storage_daemon::{SdDisk, SdFormat, StorageDaemon, StorageDaemonError};

/// The log target every record of this crate uses.
pub const LOG_TARGET: &str = "vmrepl::qemu";
