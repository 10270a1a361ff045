//! Where a cycle reaches the VM's block nodes: the running QEMU, or qemu-storage-daemon
//! when the VM is off.

use crate::host::Host;
use std::path::PathBuf;
use std::sync::Arc;
use vmrepl_types::VmDefinition;

/// Where a cycle reaches the VM's block nodes.
pub(crate) enum Endpoint {
    Live(Arc<vmrepl_qemu::process::QemuProcess>),
    Offline(vmrepl_tracking::OfflineDisks),
}

impl Endpoint {
    /// The running VM's QEMU, or qemu-storage-daemon over the replicated disks (and the vars
    /// image) when the VM is off. The caller holds the VM's operation lock.
    pub(crate) async fn open(
        d: &Host,
        vm: &VmDefinition,
        nodes: &[String],
        vars: Option<&str>,
    ) -> Result<Endpoint, String> {
        if let Some(p) = d.vmm.live_process(vm.uuid).await {
            return Ok(Endpoint::Live(p));
        }
        let disk_paths: Vec<(String, PathBuf)> = vm
            .disks
            .iter()
            .filter(|x| nodes.contains(&x.id))
            .map(|x| (x.id.clone(), x.path.clone()))
            .collect();
        let run = d.dd.run_dir(vm.uuid).join("offline");
        vmrepl_tracking::OfflineDisks::open(
            &disk_paths,
            vm.nvram.as_deref().filter(|_| vars.is_some()),
            &run,
        )
        .await
        .map(Endpoint::Offline)
        .map_err(|e| format!("cannot open the VM's disks while it is off: {e}"))
    }

    pub(crate) fn qmp(&self) -> &vmrepl_qemu::qmp::QmpClient {
        match self {
            Endpoint::Live(p) => p.qmp(),
            Endpoint::Offline(o) => o.qmp(),
        }
    }
    pub(crate) async fn close(self) {
        if let Endpoint::Offline(o) = self {
            if let Err(e) = o.close().await {
                tracing::warn!(target: "vmrepl::replication", "closing offline disks: {e}");
            }
        }
    }
}
