//! A host's capabilities as data (`vmrepl host info`). Two hosts compare these reports before
//! replicating or failing over, so that a VM never lands on a host that cannot run it (I7).

use crate::vm::{ConfigVersion, FirmwareVariantId, Generation, VmDefinition};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One firmware variant and where its files are on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareVariant {
    pub id: FirmwareVariantId,
    /// Read-only code image (for SeaBIOS: the BIOS image).
    pub code: PathBuf,
    /// Template of the per-VM variable store (UEFI only).
    pub vars_template: Option<PathBuf>,
}

/// Free space in one storage folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageFolderInfo {
    pub path: PathBuf,
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// What a host is and can run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub host_name: String,
    pub release: String,
    /// Peer protocol versions spoken (oldest, newest).
    pub protocol_versions: (u32, u32),
    pub qemu_version: String,
    /// Versioned machine types this host's QEMU can run (from `-machine help`), aliases resolved.
    pub machine_types: Vec<String>,
    pub firmware: Vec<FirmwareVariant>,
    pub kvm_usable: bool,
    /// Why KVM is unusable, when it is.
    pub kvm_reason: Option<String>,
    /// VM configuration versions this host can run (oldest, newest).
    pub config_versions: (ConfigVersion, ConfigVersion),
    pub storage: Vec<StorageFolderInfo>,
    /// Where this host serves its Prometheus metrics (`vmrepl host info` only; not sent to
    /// peers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_url: Option<String>,
    /// The host's clock when it answered (Unix milliseconds), in the peer Hello only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub now_unix_ms: Option<u64>,
    /// Where this host serves its web dashboard (`vmrepl host info` only; not sent to peers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dashboard_url: Option<String>,
}

/// Why a host cannot run a VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Incompatibility {
    #[error("host {host} runs QEMU {qemu}, which cannot run machine type {machine_type}; install a QEMU that provides it (the VM's machine type never changes)")]
    MachineType {
        host: String,
        qemu: String,
        machine_type: String,
    },
    #[error("host {host} has no {firmware} firmware, which this generation {generation} VM boots with; install the package that provides it (ovmf or seabios)")]
    Firmware {
        host: String,
        firmware: FirmwareVariantId,
        generation: Generation,
    },
    #[error("host {host} runs VM configuration versions {oldest} to {newest}; this VM is version {version}")]
    ConfigVersion {
        host: String,
        version: ConfigVersion,
        oldest: ConfigVersion,
        newest: ConfigVersion,
    },
}

impl HostInfo {
    /// Whether this host supports the machine type (exact versioned name).
    pub fn has_machine_type(&self, mt: &str) -> bool {
        self.machine_types.iter().any(|m| m == mt)
    }

    /// The firmware variant with this id, if installed.
    pub fn firmware(&self, id: FirmwareVariantId) -> Option<&FirmwareVariant> {
        self.firmware.iter().find(|f| f.id == id)
    }

    /// Whether this host can run `vm`; the error lists every reason, separated by "; ".
    pub fn check_runs(&self, vm: &VmDefinition) -> Result<(), String> {
        let problems = self.can_run(vm);
        if problems.is_empty() {
            return Ok(());
        }
        Err(problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("; "))
    }

    /// Every reason this host cannot run `vm`; empty if it can.
    pub fn can_run(&self, vm: &VmDefinition) -> Vec<Incompatibility> {
        let mut out = Vec::new();
        if !self.has_machine_type(&vm.machine_type) {
            out.push(Incompatibility::MachineType {
                host: self.host_name.clone(),
                qemu: self.qemu_version.clone(),
                machine_type: vm.machine_type.clone(),
            });
        }
        if self.firmware(vm.firmware).is_none() {
            out.push(Incompatibility::Firmware {
                host: self.host_name.clone(),
                firmware: vm.firmware,
                generation: vm.generation,
            });
        }
        let (oldest, newest) = self.config_versions;
        if vm.config_version < oldest || vm.config_version > newest {
            out.push(Incompatibility::ConfigVersion {
                host: self.host_name.clone(),
                version: vm.config_version,
                oldest,
                newest,
            });
        }
        out
    }
}
