//! The local management API: one typed request enum, one response enum. The CLI (and any other
//! front-end) sends a [`Request`] as one JSON line over the daemon's Unix socket and reads one
//! [`Response`] line back. No front-end has logic of its own.

use crate::caps::HostInfo;
use crate::name::VmName;
use crate::replication::{ReplicationSettings, ReplicationStatus};
use crate::vm::{FirmwareVariantId, Generation, NicMode, VmDefinition, VmRunState};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// How a new VM's disk comes to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DiskSpec {
    /// A new empty qcow2 v3 image of this size, created in the host's first storage folder
    /// (or `folder`, which must be one of the storage folders).
    New {
        size_bytes: u64,
        folder: Option<PathBuf>,
    },
    /// Import an existing image (any format qemu-img reads); it is converted to qcow2 v3 into
    /// the storage folder, the source is left untouched.
    Import {
        source: PathBuf,
        folder: Option<PathBuf>,
    },
}

/// A request to define a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateVm {
    pub name: String,
    pub generation: Generation,
    #[serde(default)]
    pub secure_boot: bool,
    /// Machine type; a family alias (`pc`, `q35`) or a versioned name. Aliases are pinned to
    /// the versioned name they resolve to on this host.
    pub machine_type: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<DiskSpec>,
    pub nics: Vec<NicMode>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
}

/// One VM as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSummary {
    pub definition: VmDefinition,
    pub state: VmRunState,
    pub pid: Option<u32>,
    /// Why the VM is in its state when that is noteworthy (crash cause, lock reason).
    pub note: Option<String>,
    /// Replication role of this VM on this host, if any.
    pub replication: Option<String>,
    /// A replica this host keeps for its primary, not a VM of this host (until it fails over).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept_replica: bool,
}

/// Everything the management API can be asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    HostInfo,
    /// This host's certificate, trusted CAs and revoked peer certificates.
    HostCertificates,
    /// Reread the trusted CAs and the revocation list (as SIGHUP does).
    HostReloadTrust,
    /// Refuse the peer certificate with this SHA-256 fingerprint at every handshake, in and out.
    HostRevokeCert {
        fingerprint: String,
        #[serde(default)]
        reason: Option<String>,
        /// The certificate's subject, when revoked from a file (for display).
        #[serde(default)]
        subject: Option<String>,
    },
    /// Take the peer certificate with this SHA-256 fingerprint off the revocation list.
    HostUnrevokeCert {
        fingerprint: String,
    },
    Ping,
    VmCreate(CreateVm),
    VmList,
    VmShow {
        name: VmName,
    },
    VmStart {
        name: VmName,
    },
    /// ACPI shutdown; hard stop after `timeout_secs` only if `force_after` is set.
    VmShutdown {
        name: VmName,
        timeout_secs: u64,
        force_after: bool,
    },
    VmStop {
        name: VmName,
    },
    VmDelete {
        name: VmName,
        keep_disks: bool,
    },
    /// The disks of a VM that is off were changed only by tools that kept its persistent
    /// dirty bitmaps (`qemu-io`, `qemu-nbd` with the bitmaps loaded): vmrepl takes them as they
    /// are now, and a change made while the VM was off does not require a resynchronization.
    VmTrustDisks {
        name: VmName,
    },
    /// Set-VM: the vCPUs and memory of a VM, from its next start (its replica learns them
    /// with the next cycle).
    VmSet {
        name: VmName,
        #[serde(default)]
        vcpus: Option<u32>,
        #[serde(default)]
        memory_mib: Option<u64>,
    },
    /// Add a new empty disk to a VM that is off; a replicated VM's new disk is not replicated
    /// until `replication set --include-disk` names it.
    VmDiskAdd {
        name: VmName,
        size_bytes: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        storage: Option<std::path::PathBuf>,
    },
    /// Grow a disk of a VM, off or running (its replica grows with the next cycle).
    VmDiskResize {
        name: VmName,
        disk: String,
        size_bytes: u64,
    },
    VmConsole {
        name: VmName,
        tail_bytes: Option<u64>,
    },
    /// Replica server settings (issue: replication engine).
    ReplicaServerShow,
    ReplicaServerSet(ReplicaServerChange),
    ReplicationEnable {
        name: VmName,
        settings: ReplicationSettings,
    },
    ReplicationStatus {
        name: Option<VmName>,
    },
    ReplicationPause {
        name: VmName,
    },
    /// Changes a relationship's settings in place (Set-VMReplication); a field left out stays.
    ReplicationSet {
        name: VmName,
        #[serde(flatten)]
        change: crate::replication::SettingsChange,
    },
    ReplicationResume {
        name: VmName,
        /// Resynchronize (Resume-VMReplication -Resynchronize): recopy what the replica may
        /// have wrong, after which deltas flow again.
        #[serde(default)]
        resynchronize: bool,
    },
    ReplicationRemove {
        name: VmName,
        delete_replica: bool,
    },
    /// On the replica server: import the initial copy a primary exported to external media
    /// (`from` is the exported file or its folder).
    ReplicationImport {
        name: VmName,
        from: std::path::PathBuf,
    },
    /// Replicate now, outside the schedule; app-consistent freezes the guest through its
    /// agent for the point (Proxmox's "schedule now").
    ReplicationNow {
        name: VmName,
        #[serde(default)]
        app_consistent: bool,
    },
    /// Recovery points of a replica VM (on the replica server).
    RecoveryPoints {
        name: VmName,
    },
    /// Measure-VMReplication: a relationship's statistics over the monitoring window, on
    /// either side; `reset` starts the window anew (the primary's figures).
    ReplicationMeasure {
        name: VmName,
        #[serde(default)]
        reset: bool,
    },
    /// `vmrepl doctor`: checks that each name a cause and a fix. With `replica_server`
    /// (`HOST:PORT`, its certificate naming `replica_name` or HOST): whether this host can
    /// replicate there (before enabling, like Test-VMReplicationConnection), for `vm` or every
    /// VM of this host. With `vm` alone: that VM's relationship, from either side. With
    /// neither: this host, and every replica server its VMs replicate to.
    Doctor {
        #[serde(default)]
        replica_server: Option<String>,
        #[serde(default)]
        replica_name: Option<String>,
        #[serde(default)]
        vm: Option<VmName>,
    },
    /// The host's event journal, oldest first: of one VM (`vm`), from a time on (`since_ms`,
    /// Unix milliseconds) or after an event already seen (`after_id`, for following), at most
    /// `limit` (the newest ones; default 200).
    Events {
        #[serde(default)]
        vm: Option<VmName>,
        #[serde(default)]
        since_ms: Option<u64>,
        #[serde(default)]
        after_id: Option<i64>,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// Replica server: the networks a replica VM's adapters join when it fails over and when
    /// it is test-failed-over (all adapters, or only `adapter`); unset fields stay. With no
    /// change, shows them.
    ReplicaNetwork {
        name: VmName,
        #[serde(default)]
        adapter: Option<usize>,
        #[serde(default)]
        failover: Option<crate::vm::NicMode>,
        #[serde(default)]
        test: Option<crate::vm::NicMode>,
        /// The adapter's failover TCP/IP (needs `adapter`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failover_ip: Option<FailoverIp>,
        /// Remove the adapter's failover TCP/IP (the guest keeps its own settings).
        #[serde(default)]
        clear_failover_ip: bool,
    },
    /// Primary: ship the last changes of a shut-down VM and lock it (Start-VMFailover -Prepare).
    FailoverPrepare {
        name: VmName,
    },
    /// Replica: fail over to a point (Start-VMFailover). Planned when the primary prepared.
    FailoverStart {
        name: VmName,
        /// Sequence of the recovery point; None = the latest.
        point: Option<u64>,
        /// Start the VM afterwards.
        start: bool,
        /// Fail over although the primary reports the VM running or cannot be asked (I6).
        risk_split_brain: bool,
        /// How the failed-over VM's adapters connect on this host; None = not connected.
        /// (The primary's tap and bridge names are never used on the replica host.)
        #[serde(default)]
        network: Option<crate::vm::NicMode>,
    },
    /// Replica: a test VM "NAME - Test" on a throwaway overlay (Start-VMFailover -AsTest).
    FailoverTest {
        name: VmName,
        point: Option<u64>,
        /// How the test VM's adapters connect; None = not connected.
        test_network: Option<crate::vm::NicMode>,
    },
    /// Replica: stop and delete the test VM (Stop-VMFailover of a test failover).
    FailoverStopTest {
        name: VmName,
    },
    /// Primary: cancel a prepare. Replica: cancel a failover that waits for completion.
    FailoverCancel {
        name: VmName,
    },
    /// Replica: keep the failed-over VM and drop the other points (Complete-VMFailover).
    FailoverComplete {
        name: VmName,
    },
    /// After a failover: replicate back to the old primary (Set-VMReplication -Reverse).
    ReplicationReverse {
        name: VmName,
        settings: ReplicationSettings,
    },
    /// Replica server: designate the stopped local VM `name` as the existing copy that the
    /// primary `primary` may adopt as its replica (`--initial-existing-copy` on the primary);
    /// `withdraw` takes the designation back. A primary can adopt nothing else.
    ReplicationAcceptCopy {
        name: VmName,
        primary: String,
        #[serde(default)]
        withdraw: bool,
    },
    Shutdown,
}

/// One CA certificate this host trusts for its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedCa {
    pub subject: String,
    /// SHA-256 of the CA certificate, upper-case hex (what `--issuer` takes).
    pub fingerprint: String,
}

/// What this host presents and accepts at the TLS layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificatesInfo {
    /// The host name in this host's certificate.
    pub host_name: String,
    /// SHA-256 of this host's certificate (what a replica server's `--pin` takes).
    pub fingerprint: String,
    pub trusted_cas: Vec<TrustedCa>,
    pub revoked: Vec<crate::replication::RevokedCert>,
}

/// Where one adapter of a replica VM connects when the VM fails over or is test-failed-over
/// on the replica host (set there; not connected unless its admin says otherwise).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterNetwork {
    pub adapter: usize,
    pub mac: String,
    pub failover: crate::vm::NicMode,
    pub test: crate::vm::NicMode,
    /// The static address the guest gets on this adapter when the VM fails over (Hyper-V's
    /// failover TCP/IP), set through the QEMU guest agent once it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_ip: Option<FailoverIp>,
}

/// A failed-over guest adapter's static IP settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverIp {
    /// Address and prefix length, e.g. `10.0.2.15/24` or `fd00::15/64`.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
}

impl std::fmt::Display for FailoverIp {
    /// `10.0.2.15/24 via 10.0.2.2, DNS 10.0.2.3 10.0.2.4`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.address)?;
        if let Some(g) = &self.gateway {
            write!(f, " via {g}")?;
        }
        if !self.dns.is_empty() {
            write!(f, ", DNS {}", self.dns.join(" "))?;
        }
        Ok(())
    }
}

impl FailoverIp {
    /// Checks every field is an IP address (the address with a prefix length that fits it);
    /// the error names the field and what to give.
    pub fn validate(&self) -> Result<(), String> {
        use std::net::IpAddr;
        let (ip, prefix) = self.address.split_once('/').ok_or_else(|| {
            format!(
                "failover address {:?} has no prefix length; give ADDRESS/PREFIX such as 10.0.0.15/24",
                self.address
            )
        })?;
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("failover address {:?} is not an IP address", self.address))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match prefix.parse::<u8>() {
            Ok(p) if p <= max => {}
            _ => {
                return Err(format!(
                    "prefix length {prefix:?} of {} is not 0 to {max}",
                    self.address
                ))
            }
        }
        for (what, v) in self
            .gateway
            .iter()
            .map(|g| ("gateway", g))
            .chain(self.dns.iter().map(|d| ("DNS server", d)))
        {
            let a: IpAddr = v
                .parse()
                .map_err(|_| format!("{what} {v:?} is not an IP address"))?;
            if a.is_ipv4() != ip.is_ipv4() {
                return Err(format!(
                    "{what} {v} is not of the address family of {}",
                    self.address
                ));
            }
        }
        Ok(())
    }
}

/// A change to the replica server settings; unset fields stay as they are.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReplicaServerChange {
    pub enabled: Option<bool>,
    pub allow_any: Option<bool>,
    #[serde(default)]
    pub allow_remote_delete: Option<bool>,
    pub default_storage: Option<PathBuf>,
    pub add_entry: Option<crate::replication::AuthorizationEntry>,
    pub remove_entry: Option<String>,
}

/// Every answer the management API gives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Response {
    Ok {
        message: String,
    },
    HostInfo(Box<HostInfo>),
    Vm(Box<VmSummary>),
    VmList {
        vms: Vec<VmSummary>,
    },
    Console {
        text: String,
    },
    ReplicaServer {
        /// The peer listener the replica server answers on (the host's `listen`).
        listen: String,
        settings: crate::replication::ReplicaServerSettings,
        /// Peer certificates this host refuses (`host revoke-cert`).
        #[serde(default)]
        revoked: Vec<crate::replication::RevokedCert>,
    },
    Certificates(Box<CertificatesInfo>),
    Replication {
        relationships: Vec<ReplicationStatus>,
    },
    RecoveryPoints {
        vm: VmName,
        points: Vec<crate::replication::RecoveryPointInfo>,
    },
    ReplicaNetworks {
        vm: VmName,
        adapters: Vec<AdapterNetwork>,
    },
    Events {
        events: Vec<EventRecord>,
    },
    Doctor {
        findings: Vec<Finding>,
    },
    /// `replication measure`: the same status, shown as Measure-VMReplication does.
    Measure {
        relationships: Vec<ReplicationStatus>,
    },
    Error(ApiError),
}

/// How serious an event is: `error` for what makes a relationship Critical or stops it,
/// `warning` for what needs a look, `info` for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "info" => Some(Severity::Info),
            "warning" => Some(Severity::Warning),
            "error" => Some(Severity::Error),
            _ => None,
        }
    }
}

/// One entry of a host's event journal: every replication state change, and notes such as a
/// VM created or a replica's networks set. `code` is stable across releases
/// (`docs/events.md` lists them), for alerting and scripts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Increasing on this host; `events --follow` asks for those after the last it saw.
    pub id: i64,
    pub unix_ms: u64,
    pub code: u32,
    pub severity: Severity,
    #[serde(default)]
    pub vm_uuid: Option<uuid::Uuid>,
    /// The VM's name on this host, when it still has one.
    #[serde(default)]
    pub vm: Option<String>,
    /// The host that recorded it (this host's name).
    pub host: String,
    pub message: String,
}

/// A refusal, with a stable code for scripts and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

/// Stable classes of refusal; the CLI maps them to exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    InvalidInput,
    NotFound,
    AlreadyExists,
    WrongState,
    Unsupported,
    Io,
    Qemu,
    Peer,
    Internal,
    /// The local user may not use this daemon (only root and the daemon's own user may).
    PermissionDenied,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Firmware variant for a new VM, derived from generation and secure boot.
pub fn firmware_for(generation: Generation, secure_boot: bool) -> FirmwareVariantId {
    match (generation, secure_boot) {
        (Generation::Bios, _) => FirmwareVariantId::Seabios,
        (Generation::Uefi, false) => FirmwareVariantId::Ovmf4m,
        (Generation::Uefi, true) => FirmwareVariantId::Ovmf4mSecureBoot,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn failover_ip_settings_must_be_addresses_of_one_family_with_a_prefix() {
        let ok = FailoverIp {
            address: "10.0.2.15/24".into(),
            gateway: Some("10.0.2.2".into()),
            dns: vec!["10.0.2.3".into()],
        };
        assert_eq!(ok.validate(), Ok(()));
        let with = |address: &str, gateway: Option<&str>| FailoverIp {
            address: address.into(),
            gateway: gateway.map(Into::into),
            dns: vec![],
        };
        assert!(with("10.0.2.15", None)
            .validate()
            .unwrap_err()
            .contains("prefix"));
        assert!(with("10.0.2.15/33", None)
            .validate()
            .unwrap_err()
            .contains("0 to 32"));
        assert!(with("fd00::1/64", None).validate().is_ok());
        assert!(with("host/24", None)
            .validate()
            .unwrap_err()
            .contains("not an IP"));
        assert!(with("10.0.0.1/8", Some("fd00::1"))
            .validate()
            .unwrap_err()
            .contains("family"));
        assert!(with("10.0.0.1/8", Some("; reboot"))
            .validate()
            .unwrap_err()
            .contains("gateway"));
    }

    use super::*;

    #[test]
    fn requests_are_one_json_object_tagged_by_op() {
        let r = Request::VmStart {
            name: VmName::new("vm1").unwrap(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"op":"vm-start","name":"vm1"}"#);
        let back: Request = serde_json::from_str(&s).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn a_request_with_a_path_like_name_does_not_deserialize() {
        let e = serde_json::from_str::<Request>(r#"{"op":"vm-start","name":"../../etc"}"#);
        assert!(e.is_err());
    }
}

/// The outcome of one `vmrepl doctor` check: `fail` blocks replication, `warning` deserves a
/// look, `ok` is fine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FindingStatus {
    Ok,
    Warning,
    Fail,
}

/// One `vmrepl doctor` check: what was checked, how it went, why, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// A short stable name: `resolve`, `tcp`, `tls`, `authorization`, `can-run:VM`, ...
    pub check: String,
    pub status: FindingStatus,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}
