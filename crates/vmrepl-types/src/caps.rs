//! A host's capabilities as data (`vmrepl host info`). Two hosts compare these reports before
//! replicating or failing over, so that a VM never lands on a host that cannot run it (I7).

use crate::vm::{ConfigVersion, FirmwareVariantId, Generation, VmDefinition};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One firmware variant and where its files are on this host. A host may list a variant more
/// than once, for different machine types; [`HostInfo::firmware_for`] picks the one for a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareVariant {
    pub id: FirmwareVariantId,
    /// Read-only code image (for SeaBIOS: the BIOS image).
    pub code: PathBuf,
    /// Template of the per-VM variable store (UEFI only).
    pub vars_template: Option<PathBuf>,
    /// The QEMU firmware descriptor (`/usr/share/qemu/firmware/*.json`, ...) it was found
    /// through; none when it is the fixed path of its folder (no descriptor matched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptor: Option<PathBuf>,
    /// The machine types it runs, as the descriptor's glob patterns (`pc-q35-*`); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<String>,
}

impl FirmwareVariant {
    /// A variant at fixed paths, for any machine type.
    pub fn fixed(id: FirmwareVariantId, code: PathBuf, vars_template: Option<PathBuf>) -> Self {
        FirmwareVariant {
            id,
            code,
            vars_template,
            descriptor: None,
            machines: Vec::new(),
        }
    }

    /// Whether it runs on `machine_type` (an exact versioned name such as `pc-q35-7.2`).
    pub fn runs_on(&self, machine_type: &str) -> bool {
        self.machines.is_empty() || self.machines.iter().any(|g| glob_matches(g, machine_type))
    }
}

/// Shell-style matching of `text` against `pattern`, as QEMU's firmware descriptors use it for
/// machine types: `*` is any run of characters, `?` one character, `[...]` one of a set (with
/// ranges and a leading `!` or `^` for "not"); everything else is itself.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // The classic backtracking matcher: remember the last `*` and retry one character later.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ti));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = class_matches(&p, pi, t[ti]) {
                        if matched {
                            pi = next;
                            ti += 1;
                            continue;
                        }
                    } else if t[ti] == '[' {
                        // an unclosed `[` is itself
                        pi += 1;
                        ti += 1;
                        continue;
                    }
                }
                c if c == t[ti] => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The bracket expression starting at `p[start]` (`[`): whether `c` is in it, and the index after
/// its `]`; None when it has no closing `]`.
fn class_matches(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut found = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((found != negate, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                found = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                found = true;
            }
            i += 1;
        }
    }
    None
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
    /// What this release can do beyond its protocol version, by name (see [`FEATURES`]). A
    /// release before the list knows none of them (the field is missing: empty).
    #[serde(default)]
    pub features: Vec<String>,
}

/// A replica takes a changed set of disks for a replicated VM: a disk included after
/// replication was enabled (added to its store with its own initial copy) or excluded (removed
/// from it), through `UpdateDefinition`.
pub const FEATURE_DISK_SET: &str = "disk-set-changes";

/// Every feature this release has (sent in [`HostInfo::features`]).
pub const FEATURES: &[&str] = &[FEATURE_DISK_SET];

impl HostInfo {
    /// Whether the host said it has `feature`.
    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
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

    /// The firmware variant with this id, if installed (the first of its entries).
    pub fn firmware(&self, id: FirmwareVariantId) -> Option<&FirmwareVariant> {
        self.firmware.iter().find(|f| f.id == id)
    }

    /// The firmware variant with this id that runs `machine_type`: the first such entry (the
    /// probe lists the entries of QEMU's firmware descriptors in their priority order, the fixed
    /// paths last).
    pub fn firmware_for(
        &self,
        id: FirmwareVariantId,
        machine_type: &str,
    ) -> Option<&FirmwareVariant> {
        self.firmware
            .iter()
            .find(|f| f.id == id && f.runs_on(machine_type))
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
        if self.firmware_for(vm.firmware, &vm.machine_type).is_none() {
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

#[cfg(test)]
mod tests {

    #[test]
    fn a_host_info_without_features_an_older_release_sends_has_none() {
        let old = serde_json::json!({
            "host_name": "old.test", "release": "0.9", "protocol_versions": [1, 1],
            "qemu_version": "7.2.0", "machine_types": [], "firmware": [],
            "kvm_usable": false, "kvm_reason": null,
            "config_versions": [{"major": 1, "minor": 0}, {"major": 1, "minor": 0}],
            "storage": [],
        });
        let h: HostInfo = serde_json::from_value(old).unwrap();
        assert!(!h.has_feature(FEATURE_DISK_SET));
        let mut new = h.clone();
        new.features = FEATURES.iter().map(|f| f.to_string()).collect();
        let back: HostInfo = serde_json::from_value(serde_json::to_value(&new).unwrap()).unwrap();
        assert!(back.has_feature(FEATURE_DISK_SET));
    }

    use super::*;

    #[test]
    fn machine_globs_match_as_qemu_firmware_descriptors_write_them() {
        assert!(glob_matches("pc-q35-*", "pc-q35-7.2"));
        assert!(glob_matches("pc-q35-*", "pc-q35-"));
        assert!(!glob_matches("pc-q35-*", "pc-i440fx-7.2"));
        assert!(glob_matches("pc-i440fx-*", "pc-i440fx-10.0"));
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches("pc-q35-7.?", "pc-q35-7.2"));
        assert!(!glob_matches("pc-q35-7.?", "pc-q35-7.10"));
        assert!(glob_matches("pc-q35-[0-9]*", "pc-q35-8.2"));
        assert!(!glob_matches("pc-q35-[!0-9]*", "pc-q35-8.2"));
        assert!(glob_matches("pc-*-7.2", "pc-q35-7.2"));
        assert!(glob_matches("*-7.2", "pc-i440fx-7.2"));
        assert!(!glob_matches("*-7.2", "pc-i440fx-7.21"));
        assert!(glob_matches("pc-q35-7.2", "pc-q35-7.2"));
        assert!(!glob_matches("pc-q35-7.2", "pc-q35-7.2x"));
        assert!(glob_matches("a[b", "a[b"), "an unclosed bracket is itself");
        assert!(!glob_matches("", "x"));
        assert!(glob_matches("", ""));
    }

    #[test]
    fn a_vm_gets_the_first_firmware_entry_that_runs_its_machine_type() {
        let q35 = FirmwareVariant {
            id: FirmwareVariantId::Ovmf4m,
            code: "/q35.fd".into(),
            vars_template: Some("/vars.fd".into()),
            descriptor: Some("/usr/share/qemu/firmware/50-q35.json".into()),
            machines: vec!["pc-q35-*".into()],
        };
        let fixed = FirmwareVariant::fixed(
            FirmwareVariantId::Ovmf4m,
            "/fixed.fd".into(),
            Some("/vars.fd".into()),
        );
        let h = HostInfo {
            host_name: "h".into(),
            release: "r".into(),
            protocol_versions: (1, 1),
            qemu_version: "7.2.0".into(),
            machine_types: vec!["pc-q35-7.2".into(), "pc-i440fx-7.2".into()],
            firmware: vec![q35.clone(), fixed.clone()],
            kvm_usable: false,
            kvm_reason: None,
            config_versions: (ConfigVersion::OLDEST, ConfigVersion::CURRENT),
            storage: vec![],
            metrics_url: None,
            now_unix_ms: None,
            dashboard_url: None,
            features: vec![],
        };
        assert_eq!(
            h.firmware_for(FirmwareVariantId::Ovmf4m, "pc-q35-7.2"),
            Some(&q35)
        );
        assert_eq!(
            h.firmware_for(FirmwareVariantId::Ovmf4m, "pc-i440fx-7.2"),
            Some(&fixed),
            "no descriptor for i440fx: the fixed path"
        );
        assert_eq!(
            h.firmware_for(FirmwareVariantId::Ovmf4mSecureBoot, "pc-q35-7.2"),
            None
        );
        // A report without the new fields (an older peer's) reads as fixed paths for any machine.
        let old = r#"{"id":"ovmf-4m","code":"/c.fd","vars_template":"/v.fd"}"#;
        let f: FirmwareVariant = serde_json::from_str(old).unwrap();
        assert!(f.descriptor.is_none() && f.runs_on("pc-q35-7.2"));
        let text = serde_json::to_string(&fixed).unwrap();
        assert!(
            !text.contains("descriptor") && !text.contains("machines"),
            "{text}"
        );
    }
}
