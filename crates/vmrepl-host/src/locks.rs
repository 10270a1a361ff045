//! The host's lock policy and the per-folder locks of replica VMs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Locks `m`, recovering it if a holder panicked: the host's one lock policy.
pub(crate) fn unpoisoned<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type LockMap = Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>;

/// The per-folder mutexes of the replica VMs this host keeps.
#[derive(Default)]
pub(crate) struct ReplicaLocks {
    locks: LockMap,
    slots: LockMap,
}

impl ReplicaLocks {
    /// The mutex that serializes everything touching one replica VM's folder (receive, apply,
    /// remove, failover).
    pub(crate) fn vm(&self, vm_dir: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut g = unpoisoned(&self.locks);
        g.entry(vm_dir.to_path_buf()).or_default().clone()
    }

    /// The slot a log transfer of one replica VM holds while it receives: one transfer per VM
    /// at a time, without the VM's lock, so that a primary that stalls mid-log blocks no
    /// failover.
    pub(crate) fn receive_slot(&self, vm_dir: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut g = unpoisoned(&self.slots);
        g.entry(vm_dir.to_path_buf()).or_default().clone()
    }
}
