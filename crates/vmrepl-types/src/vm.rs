//! What a VM is: the definition a host stores, runs, and (later) replicates unchanged (I7).

use crate::name::VmName;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use uuid::Uuid;

/// Hyper-V's VM generation. It decides firmware and chipset and never changes (I7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Generation {
    /// Generation 1: BIOS (SeaBIOS) on the i440fx chipset.
    Bios,
    /// Generation 2: UEFI (OVMF) on the q35 chipset, its own NVRAM, optional Secure Boot.
    Uefi,
}

impl Generation {
    /// The generation number as Hyper-V shows it.
    pub fn number(self) -> u8 {
        match self {
            Generation::Bios => 1,
            Generation::Uefi => 2,
        }
    }

    /// The machine-type family a new VM of this generation gets (resolved to a versioned name).
    pub fn machine_family(self) -> &'static str {
        match self {
            Generation::Bios => "pc-i440fx",
            Generation::Uefi => "pc-q35",
        }
    }
}

impl From<Generation> for u8 {
    fn from(g: Generation) -> u8 {
        g.number()
    }
}

impl TryFrom<u8> for Generation {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            1 => Ok(Generation::Bios),
            2 => Ok(Generation::Uefi),
            other => Err(format!(
                "generation {other} does not exist; use 1 (BIOS) or 2 (UEFI)"
            )),
        }
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Generation::Bios => write!(f, "1 (BIOS)"),
            Generation::Uefi => write!(f, "2 (UEFI)"),
        }
    }
}

/// The firmware a VM boots with. The CODE image is installed on each host; only the per-VM
/// NVRAM travels with the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FirmwareVariantId {
    /// SeaBIOS (generation 1).
    Seabios,
    /// OVMF 4M without Secure Boot.
    #[serde(rename = "ovmf-4m")]
    Ovmf4m,
    /// OVMF 4M with Secure Boot and Microsoft keys enrolled.
    #[serde(rename = "ovmf-4m-secure-boot")]
    Ovmf4mSecureBoot,
}

impl FirmwareVariantId {
    /// Stable text name used in config and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            FirmwareVariantId::Seabios => "seabios",
            FirmwareVariantId::Ovmf4m => "ovmf-4m",
            FirmwareVariantId::Ovmf4mSecureBoot => "ovmf-4m-secure-boot",
        }
    }
}

impl fmt::Display for FirmwareVariantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// VM configuration version, like Hyper-V's "8.0". A host supports a range; a VM whose
/// version is outside it is refused there (I7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConfigVersion {
    pub major: u16,
    pub minor: u16,
}

impl ConfigVersion {
    /// The version this build writes for new VMs.
    pub const CURRENT: ConfigVersion = ConfigVersion { major: 1, minor: 0 };
    /// The oldest version this build can still run.
    pub const OLDEST: ConfigVersion = ConfigVersion { major: 1, minor: 0 };
}

impl fmt::Display for ConfigVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl std::str::FromStr for ConfigVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once('.')
            .ok_or_else(|| format!("configuration version {s:?} is not MAJOR.MINOR"))?;
        Ok(ConfigVersion {
            major: a.parse().map_err(|_| format!("bad major in {s:?}"))?,
            minor: b.parse().map_err(|_| format!("bad minor in {s:?}"))?,
        })
    }
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when `/dev/kvm` works, TCG otherwise.
    #[default]
    Auto,
    /// Hardware virtualisation; fails if KVM is unusable.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            o => Err(format!(
                "accelerator {o:?} is unknown; use auto, kvm or tcg"
            )),
        }
    }
}

/// One virtual disk: a qcow2 v3 image attached as virtio-blk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDef {
    /// Stable id within the VM ("disk0", "disk1", ...); also the QEMU node name stem.
    pub id: String,
    /// Absolute path of the qcow2 image, inside one of the host's storage folders.
    pub path: PathBuf,
    /// Virtual size in bytes.
    pub size_bytes: u64,
}

/// How a network adapter is connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum NicMode {
    /// QEMU user-mode networking (NAT, no host setup).
    User,
    /// An existing tap interface.
    Tap { ifname: String },
    /// A tap on a Linux bridge, through qemu-bridge-helper.
    Bridge { bridge: String },
    /// The adapter exists but has no link (Hyper-V's "Not connected").
    NotConnected,
}

/// One network adapter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicDef {
    pub mac: String,
    #[serde(flatten)]
    pub mode: NicMode,
}

/// Direct kernel boot for small appliance VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectKernel {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// Everything a host needs to run a VM, and everything that travels with it to a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDefinition {
    pub name: VmName,
    pub uuid: Uuid,
    pub generation: Generation,
    pub firmware: FirmwareVariantId,
    /// Versioned machine type pinned at creation, e.g. `pc-q35-7.2`; never an alias.
    pub machine_type: String,
    pub config_version: ConfigVersion,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<DiskDef>,
    pub nics: Vec<NicDef>,
    pub kernel: Option<DirectKernel>,
    /// The VM's own UEFI variable store (generation 2 only).
    pub nvram: Option<PathBuf>,
}

impl VmDefinition {
    /// The disk with this id.
    pub fn disk(&self, id: &str) -> Option<&DiskDef> {
        self.disks.iter().find(|d| d.id == id)
    }
}

/// What a VM is doing, as the host sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmRunState {
    /// Defined, no QEMU process.
    Off,
    /// QEMU is starting.
    Starting,
    /// QEMU runs and the guest is executing.
    Running,
    /// QEMU runs, the guest is paused.
    Paused,
    /// An ACPI shutdown was requested and the guest has not finished yet.
    ShuttingDown,
    /// QEMU exited without being asked to (killed, crashed).
    Crashed,
    /// Locked after a planned-failover prepare: it must not be started here.
    LockedForFailover,
}

impl VmRunState {
    /// No QEMU runs the VM (off, crashed, or locked for a failover): it may be deleted,
    /// locked, or become a replica, and for the one-host-at-a-time rule (I6) it is not running.
    pub fn is_stopped(self) -> bool {
        matches!(
            self,
            VmRunState::Off | VmRunState::Crashed | VmRunState::LockedForFailover
        )
    }
}

impl fmt::Display for VmRunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::wire_name(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_numbers_round_trip_and_unknown_ones_are_refused() {
        assert_eq!(Generation::try_from(1).unwrap(), Generation::Bios);
        assert_eq!(Generation::try_from(2).unwrap(), Generation::Uefi);
        let e = Generation::try_from(3).unwrap_err();
        assert!(e.contains("use 1 (BIOS) or 2 (UEFI)"));
    }

    #[test]
    fn config_versions_parse_and_order() {
        let a: ConfigVersion = "1.0".parse().unwrap();
        let b: ConfigVersion = "1.2".parse().unwrap();
        assert!(a < b);
        assert_eq!(b.to_string(), "1.2");
        assert!("x".parse::<ConfigVersion>().is_err());
    }

    #[test]
    fn stopped_states_are_off_crashed_and_locked_only() {
        use VmRunState::*;
        let stopped: Vec<_> = [
            Off,
            Starting,
            Running,
            Paused,
            ShuttingDown,
            Crashed,
            LockedForFailover,
        ]
        .into_iter()
        .filter(|s| s.is_stopped())
        .collect();
        assert_eq!(stopped, vec![Off, Crashed, LockedForFailover]);
    }

    #[test]
    fn accelerators_parse() {
        assert_eq!("kvm".parse::<Accel>().unwrap(), Accel::Kvm);
        assert!("xen".parse::<Accel>().is_err());
    }
}
