//! Where a cycle reaches the VM's block nodes: the running QEMU, or qemu-storage-daemon
//! when the VM is off.
//!
//! Opening the disks of a VM that is off first compares them with the fingerprints recorded
//! when vmrepl last closed them ([`crate::fingerprint`]); closing them records new ones.

use crate::db::Db;
use crate::host::Host;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use vmrepl_types::VmDefinition;

/// Where a cycle reaches the VM's block nodes.
pub(crate) enum Endpoint {
    Live(Arc<vmrepl_qemu::process::QemuProcess>),
    /// qemu-storage-daemon over the disks of `vm`, which is off; closing it records the disk
    /// files' fingerprints in `db`.
    Offline {
        disks: vmrepl_tracking::OfflineDisks,
        db: Arc<Mutex<Db>>,
        vm: Box<VmDefinition>,
    },
}

/// Why the disks of a VM could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EndpointError {
    /// A disk was changed while the VM was off, outside vmrepl; the relationship already
    /// requires a resynchronization (the event was raised with this cause).
    #[error("{cause}")]
    ChangedWhileOff { cause: String },
    #[error("cannot open the VM's disks while it is off: {0}")]
    Open(#[from] vmrepl_tracking::TrackingError),
}

impl From<EndpointError> for String {
    fn from(e: EndpointError) -> String {
        e.to_string()
    }
}

impl Endpoint {
    /// The running VM's QEMU, or qemu-storage-daemon over the replicated disks (and the vars
    /// image) when the VM is off. The caller holds the VM's operation lock.
    pub(crate) async fn open(
        d: &Host,
        vm: &VmDefinition,
        nodes: &[String],
        vars: Option<&str>,
    ) -> Result<Endpoint, EndpointError> {
        if let Some(p) = d.vmm.live_process(vm.uuid).await {
            return Ok(Endpoint::Live(p));
        }
        match crate::fingerprint::before_open(&d.db(), vm) {
            Ok(Some(cause)) => return Err(EndpointError::ChangedWhileOff { cause }),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(target: "vmrepl::replication", vm = %vm.uuid, "cannot compare the disk files with their fingerprints: {e}")
            }
        }
        let disk_paths: Vec<(String, PathBuf)> = vm
            .disks
            .iter()
            .filter(|x| nodes.contains(&x.id))
            .map(|x| (x.id.clone(), x.path.clone()))
            .collect();
        let run = d.dd.run_dir(vm.uuid).join("offline");
        let disks = vmrepl_tracking::OfflineDisks::open(
            &disk_paths,
            vm.nvram.as_deref().filter(|_| vars.is_some()),
            &run,
        )
        .await?;
        Ok(Endpoint::Offline {
            disks,
            db: d.db.clone(),
            vm: Box::new(vm.clone()),
        })
    }

    /// [`Endpoint::open`] for work that is not a cycle (removing the bitmaps, failover): a
    /// disk changed while the VM was off is recorded the same way (the relationship requires a
    /// resynchronization), and the disks are opened all the same.
    pub(crate) async fn open_anyway(
        d: &Host,
        vm: &VmDefinition,
        nodes: &[String],
        vars: Option<&str>,
    ) -> Result<Endpoint, EndpointError> {
        match Endpoint::open(d, vm, nodes, vars).await {
            Err(EndpointError::ChangedWhileOff { .. }) => Endpoint::open(d, vm, nodes, vars).await,
            r => r,
        }
    }

    pub(crate) fn qmp(&self) -> &vmrepl_qemu::qmp::QmpClient {
        match self {
            Endpoint::Live(p) => p.qmp(),
            Endpoint::Offline { disks, .. } => disks.qmp(),
        }
    }

    /// Closes qemu-storage-daemon of a VM that is off; once it quit cleanly, the disk files'
    /// fingerprints are recorded. (After an unclean end the bitmaps' in-use flag tells.)
    pub(crate) async fn close(self) {
        if let Endpoint::Offline { disks, db, vm } = self {
            match disks.close().await {
                Ok(()) => crate::fingerprint::after_close(&crate::locks::unpoisoned(&db), &vm),
                Err(e) => {
                    tracing::warn!(target: "vmrepl::replication", "closing offline disks: {e}")
                }
            }
        }
    }
}
