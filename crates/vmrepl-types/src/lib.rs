//! vmrepl's shared vocabulary.
//!
//! Every other crate speaks these types: validated names, VM definitions, host capability
//! reports, the local management API and the status tree. This crate does no I/O so that the
//! CLI, the daemon, the peer protocol and tests can all share it.

pub mod api;
pub mod caps;
pub mod name;
pub mod replication;
pub mod vm;

pub use caps::{FirmwareVariant, HostInfo, StorageFolderInfo};
pub use name::{NameError, VmName};
pub use vm::{
    Accel, ConfigVersion, DirectKernel, DiskDef, Generation, NicDef, NicMode, VmDefinition,
    VmRunState,
};

/// The vmrepl release this build is.
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// The range of peer protocol versions this build speaks (oldest, newest).
pub const PROTOCOL_VERSIONS: (u32, u32) = (1, 1);
