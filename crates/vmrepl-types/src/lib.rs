//! vmrepl's shared vocabulary.
//!
//! Every other crate speaks these types: validated names, VM definitions, host capability
//! reports, the local management API and the status tree. This crate does no I/O so that the
//! CLI, the daemon, the peer protocol and tests can all share it.

pub mod api;
pub mod caps;
#[doc(hidden)]
pub mod fuzzing;
pub mod name;
pub mod replication;
pub mod vm;

pub use caps::{FirmwareVariant, HostInfo, StorageFolderInfo};
pub use name::{NameError, VmName};
pub use vm::{
    Accel, ConfigVersion, DirectKernel, DiskDef, Generation, NicDef, NicMode, VmDefinition,
    VmRunState,
};

/// The serde name of a unit enum variant (`ReplicationState::Replicating` → `"replicating"`).
/// Database columns and text views store these names, so serde stays their one source.
pub fn wire_name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// The unit enum variant a [`wire_name`] names, if any.
pub fn from_wire_name<T: serde::de::DeserializeOwned>(s: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

/// The vmrepl release this build is.
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// The range of peer protocol versions this build speaks (oldest, newest).
pub const PROTOCOL_VERSIONS: (u32, u32) = (1, 1);

#[cfg(test)]
mod tests {
    use super::*;
    use replication::ReplicationState;

    #[test]
    fn wire_names_are_the_serde_names_and_round_trip() {
        assert_eq!(
            wire_name(&ReplicationState::ResynchronizationRequired),
            "resynchronization-required"
        );
        assert_eq!(
            VmRunState::LockedForFailover.to_string(),
            "locked-for-failover"
        );
        for s in [ReplicationState::Replicating, ReplicationState::Suspended] {
            assert_eq!(from_wire_name::<ReplicationState>(&wire_name(&s)), Some(s));
        }
        assert_eq!(from_wire_name::<ReplicationState>("nonsense"), None);
    }
}
