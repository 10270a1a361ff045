//! Firmware found through QEMU's firmware descriptors (`docs/interop/firmware.json` in QEMU), the
//! way libvirt finds it, instead of fixed paths.
//!
//! The descriptor files (`*.json`) of three folders, from the most general to the most specific:
//! `/usr/share/qemu/firmware` (the distribution's packages), `/etc/qemu/firmware` (the
//! administrator's) and `$XDG_CONFIG_HOME/qemu/firmware` (the user's). A file in a more specific
//! folder replaces the file of the same name in a more general one, and an empty file hides it.
//! The files that remain are sorted by file name, which is their priority: the first that fits
//! wins (`40-edk2-x86_64-secure-enrolled.json` before `60-edk2-x86_64.json`).
//!
//! What fits a vmrepl UEFI variant ([`uefi_variants`]): interface `uefi`, mapped as a `flash` pair
//! (split mode) of raw files that exist and together make 4 MiB (the layout of every "ovmf-4m"
//! NVRAM file, which travels between hosts), a target `x86_64`, and features that match the
//! variant: `secure-boot` and `enrolled-keys` for Secure Boot (the VM runs with SMM and a secure
//! pflash); neither, nor `requires-smm`, without it. A descriptor that asks for anything else
//! vmrepl does not set up (a confidential-computing platform, say) is passed over. Each fitting
//! descriptor gives an entry with its machine-type globs; [`crate::caps::discover_firmware`] adds
//! the fixed paths after them, for the machine types no descriptor covers.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use vmrepl_types::vm::FirmwareVariantId;
use vmrepl_types::FirmwareVariant;

/// Size of the flash of an "ovmf-4m" variant: its code and its variable store together.
pub const OVMF_4M_BYTES: u64 = 4 << 20;

/// Features a UEFI descriptor may carry that vmrepl's command line satisfies (or that ask for
/// nothing): others (`intel-tdx`, `host-uefi-vars`, ...) need a platform vmrepl does not set up.
const HARMLESS_FEATURES: &[&str] = &[
    "acpi-s3",
    "acpi-s4",
    "amd-sev",
    "amd-sev-es",
    "verbose-dynamic",
    "verbose-static",
    "secure-boot",
    "enrolled-keys",
    "requires-smm",
];

/// The descriptor folders of QEMU's specification, the most general first.
pub fn default_descriptor_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![
        PathBuf::from("/usr/share/qemu/firmware"),
        PathBuf::from("/etc/qemu/firmware"),
    ];
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        });
    if let Some(c) = config {
        dirs.push(c.join("qemu/firmware"));
    }
    dirs
}

/// The descriptor files that take effect, in priority order: every `*.json` of `dirs` (the most
/// general first) by file name, a later folder's file replacing an earlier one's of the same
/// name, and empty files left out (they hide the file they replace).
pub fn descriptor_files(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut by_name: BTreeMap<OsString, PathBuf> = BTreeMap::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "json") {
                by_name.insert(e.file_name(), path);
            }
        }
    }
    by_name
        .into_values()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() > 0))
        .collect()
}

/// One firmware descriptor: the members vmrepl reads (others are ignored).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Descriptor {
    #[serde(default)]
    pub description: String,
    pub interface_types: Vec<String>,
    pub mapping: Mapping,
    pub targets: Vec<Target>,
    #[serde(default)]
    pub features: Vec<String>,
}

/// How the firmware is loaded: for `flash`, the executable and its NVRAM template.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Mapping {
    pub device: String,
    /// `split` (the default), `combined` or `stateless` (flash only, QEMU 8.1 and newer).
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub executable: Option<FlashFile>,
    #[serde(default)]
    pub nvram_template: Option<FlashFile>,
}

/// One file of a flash mapping.
#[derive(Debug, Clone, Deserialize)]
pub struct FlashFile {
    pub filename: PathBuf,
    pub format: String,
}

/// An emulator and its machine types (glob patterns).
#[derive(Debug, Clone, Deserialize)]
pub struct Target {
    pub architecture: String,
    #[serde(default)]
    pub machines: Vec<String>,
}

/// A descriptor file that could not be used at all, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub path: PathBuf,
    pub reason: String,
}

/// Reads the descriptors of `dirs` in priority order; the files that cannot be read or parsed are
/// returned apart (the rest still count).
pub fn load(dirs: &[PathBuf]) -> (Vec<(PathBuf, Descriptor)>, Vec<Unreadable>) {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for path in descriptor_files(dirs) {
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Descriptor>(&b).map_err(|e| e.to_string()))
        {
            Ok(d) => ok.push((path, d)),
            Err(reason) => bad.push(Unreadable { path, reason }),
        }
    }
    (ok, bad)
}

impl Descriptor {
    /// The machine-type globs of its `x86_64` target (None when it has no such target).
    pub fn x86_64_machines(&self) -> Option<Vec<String>> {
        let t: Vec<&Target> = self
            .targets
            .iter()
            .filter(|t| t.architecture == "x86_64")
            .collect();
        if t.is_empty() {
            return None;
        }
        Some(t.iter().flat_map(|t| t.machines.iter().cloned()).collect())
    }

    fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }

    /// Whether it is a UEFI firmware for the vmrepl variant `id` ("ovmf-4m" or
    /// "ovmf-4m-secure-boot"): its code and NVRAM template when it is, the reason when not.
    pub fn fits(&self, id: FirmwareVariantId) -> Result<(PathBuf, PathBuf), String> {
        let secure = match id {
            FirmwareVariantId::Ovmf4m => false,
            FirmwareVariantId::Ovmf4mSecureBoot => true,
            FirmwareVariantId::Seabios => return Err("SeaBIOS is found at a fixed path".into()),
        };
        if !self.interface_types.iter().any(|i| i == "uefi") {
            return Err(format!("interface {:?}, not uefi", self.interface_types));
        }
        if self.mapping.device != "flash" {
            return Err(format!("mapped as {}, not flash", self.mapping.device));
        }
        if let Some(m) = self.mapping.mode.as_deref().filter(|m| *m != "split") {
            return Err(format!("flash mode {m}, not split"));
        }
        let (Some(code), Some(vars)) = (&self.mapping.executable, &self.mapping.nvram_template)
        else {
            return Err("no executable and nvram-template pair".into());
        };
        for f in [code, vars] {
            if f.format != "raw" {
                return Err(format!("{} is {}, not raw", f.filename.display(), f.format));
            }
        }
        if self.x86_64_machines().is_none() {
            return Err("no x86_64 target".into());
        }
        if let Some(f) = self
            .features
            .iter()
            .find(|f| !HARMLESS_FEATURES.contains(&f.as_str()))
        {
            return Err(format!("needs feature {f}, which vmrepl does not set up"));
        }
        let sb = self.has("secure-boot") && self.has("enrolled-keys");
        if secure && !sb {
            return Err("not secure-boot with enrolled-keys".into());
        }
        if !secure && (self.has("secure-boot") || self.has("enrolled-keys")) {
            return Err("it is a Secure Boot firmware".into());
        }
        if !secure && self.has("requires-smm") {
            return Err("it requires SMM, which a VM without Secure Boot runs without".into());
        }
        let size = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len())
        };
        let (Some(c), Some(v)) = (size(&code.filename), size(&vars.filename)) else {
            return Err(format!(
                "{} or {} is missing",
                code.filename.display(),
                vars.filename.display()
            ));
        };
        if c + v != OVMF_4M_BYTES {
            return Err(format!(
                "its code and variable store make {} bytes, not the 4 MiB of an ovmf-4m firmware",
                c + v
            ));
        }
        Ok((code.filename.clone(), vars.filename.clone()))
    }
}

/// The entries of the UEFI variant `id` from `descriptors` (in their priority order): one per
/// fitting descriptor, with its machine-type globs, leaving out a descriptor whose globs earlier
/// ones already cover.
pub fn uefi_variants(
    descriptors: &[(PathBuf, Descriptor)],
    id: FirmwareVariantId,
) -> Vec<FirmwareVariant> {
    let mut out: Vec<FirmwareVariant> = Vec::new();
    for (path, d) in descriptors {
        let Ok((code, vars)) = d.fits(id) else {
            continue;
        };
        let machines = d.x86_64_machines().unwrap_or_default();
        let covered = |g: &String| out.iter().any(|f| f.machines.contains(g));
        if !machines.is_empty() && machines.iter().all(covered) {
            continue;
        }
        out.push(FirmwareVariant {
            id,
            code,
            vars_template: Some(vars),
            descriptor: Some(path.clone()),
            machines,
        });
    }
    out
}

/// The descriptor that gives the UEFI variant `id` for `machine_type` (the first that fits and
/// names it), with its code and NVRAM template.
pub fn select_uefi<'a>(
    descriptors: &'a [(PathBuf, Descriptor)],
    id: FirmwareVariantId,
    machine_type: &str,
) -> Option<(&'a Path, PathBuf, PathBuf)> {
    descriptors.iter().find_map(|(path, d)| {
        let (code, vars) = d.fits(id).ok()?;
        let globs = d.x86_64_machines()?;
        globs
            .iter()
            .any(|g| vmrepl_types::caps::glob_matches(g, machine_type))
            .then_some((path.as_path(), code, vars))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A folder tree standing for /usr/share, /etc and the user's folder, with firmware files.
    struct Tree {
        dir: tempfile::TempDir,
    }

    impl Tree {
        fn new() -> Tree {
            let t = Tree {
                dir: tempfile::tempdir().unwrap(),
            };
            for d in ["usr", "etc", "user", "fw"] {
                std::fs::create_dir_all(t.dir.path().join(d)).unwrap();
            }
            // 4 MiB pairs (code 3.5 MiB + vars 0.5 MiB) and a 2 MiB pair
            t.file("fw/CODE.fd", 3584 << 10);
            t.file("fw/VARS.fd", 512 << 10);
            t.file("fw/CODE.secboot.fd", 3584 << 10);
            t.file("fw/VARS.ms.fd", 512 << 10);
            t.file("fw/CODE_2M.fd", 1920 << 10);
            t.file("fw/VARS_2M.fd", 128 << 10);
            t
        }
        fn file(&self, rel: &str, len: u64) {
            let f = std::fs::File::create(self.dir.path().join(rel)).unwrap();
            f.set_len(len).unwrap();
        }
        fn fw(&self, name: &str) -> String {
            self.dir.path().join("fw").join(name).display().to_string()
        }
        fn dirs(&self) -> Vec<PathBuf> {
            ["usr", "etc", "user"]
                .iter()
                .map(|d| self.dir.path().join(d))
                .collect()
        }
        fn put(&self, rel: &str, v: &serde_json::Value) {
            std::fs::write(self.dir.path().join(rel), v.to_string()).unwrap();
        }
        /// A UEFI flash descriptor.
        fn uefi(
            &self,
            code: &str,
            vars: &str,
            machines: &[&str],
            features: &[&str],
        ) -> serde_json::Value {
            json!({
                "description": "test",
                "interface-types": ["uefi"],
                "mapping": {
                    "device": "flash",
                    "executable": {"filename": self.fw(code), "format": "raw"},
                    "nvram-template": {"filename": self.fw(vars), "format": "raw"}
                },
                "targets": [{"architecture": "x86_64", "machines": machines}],
                "features": features,
                "tags": []
            })
        }
        fn variants(&self, id: FirmwareVariantId) -> Vec<FirmwareVariant> {
            let (descs, bad) = load(&self.dirs());
            assert!(bad.is_empty(), "{bad:?}");
            uefi_variants(&descs, id)
        }
        fn name_of(&self, p: &Option<PathBuf>) -> String {
            p.as_ref()
                .unwrap()
                .strip_prefix(self.dir.path())
                .unwrap()
                .display()
                .to_string()
        }
    }

    const SB: &[&str] = &["acpi-s3", "enrolled-keys", "requires-smm", "secure-boot"];

    #[test]
    fn secure_boot_picks_the_enrolled_descriptor_and_plain_uefi_the_one_without_secure_boot() {
        let t = Tree::new();
        // Debian's three: enrolled keys, secure boot with an empty store, plain.
        t.put(
            "usr/40-secure-enrolled.json",
            &t.uefi("CODE.secboot.fd", "VARS.ms.fd", &["pc-q35-*"], SB),
        );
        t.put(
            "usr/50-secure.json",
            &t.uefi(
                "CODE.secboot.fd",
                "VARS.fd",
                &["pc-q35-*"],
                &["requires-smm", "secure-boot"],
            ),
        );
        t.put(
            "usr/60-plain.json",
            &t.uefi(
                "CODE.fd",
                "VARS.fd",
                &["pc-i440fx-*", "pc-q35-*"],
                &["acpi-s3", "verbose-dynamic"],
            ),
        );
        let sb = t.variants(FirmwareVariantId::Ovmf4mSecureBoot);
        assert_eq!(sb.len(), 1, "{sb:?}");
        assert_eq!(t.name_of(&sb[0].descriptor), "usr/40-secure-enrolled.json");
        assert_eq!(sb[0].code.display().to_string(), t.fw("CODE.secboot.fd"));
        assert_eq!(
            sb[0].vars_template.as_ref().unwrap().display().to_string(),
            t.fw("VARS.ms.fd")
        );
        assert_eq!(sb[0].machines, ["pc-q35-*"]);
        let plain = t.variants(FirmwareVariantId::Ovmf4m);
        assert_eq!(plain.len(), 1, "{plain:?}");
        assert_eq!(t.name_of(&plain[0].descriptor), "usr/60-plain.json");
        assert_eq!(plain[0].code.display().to_string(), t.fw("CODE.fd"));
        assert!(plain[0].runs_on("pc-i440fx-7.2") && plain[0].runs_on("pc-q35-7.2"));

        let (descs, _) = load(&t.dirs());
        let (path, code, _) =
            select_uefi(&descs, FirmwareVariantId::Ovmf4mSecureBoot, "pc-q35-8.2").unwrap();
        assert!(path.ends_with("40-secure-enrolled.json"));
        assert_eq!(code.display().to_string(), t.fw("CODE.secboot.fd"));
    }

    #[test]
    fn a_descriptor_for_other_machine_types_is_not_picked_for_a_vm_and_the_file_name_orders_them() {
        let t = Tree::new();
        t.put(
            "usr/30-i440fx-only.json",
            &t.uefi("CODE.fd", "VARS.fd", &["pc-i440fx-*"], &[]),
        );
        t.put(
            "usr/70-q35.json",
            &t.uefi("CODE.fd", "VARS.fd", &["pc-q35-*"], &[]),
        );
        let (descs, _) = load(&t.dirs());
        let pick = |m: &str| {
            select_uefi(&descs, FirmwareVariantId::Ovmf4m, m)
                .map(|(p, _, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        };
        assert_eq!(pick("pc-q35-7.2").as_deref(), Some("70-q35.json"));
        assert_eq!(
            pick("pc-i440fx-7.2").as_deref(),
            Some("30-i440fx-only.json")
        );
        assert_eq!(pick("microvm"), None, "no descriptor names it");
        // both are entries, each for its machine types, in file-name order
        let v = t.variants(FirmwareVariantId::Ovmf4m);
        let m: Vec<_> = v.iter().map(|f| f.machines.clone()).collect();
        assert_eq!(m, [vec!["pc-i440fx-*"], vec!["pc-q35-*"]]);
        // a third one for machine types already covered adds no entry
        t.put(
            "usr/80-both.json",
            &t.uefi("CODE.fd", "VARS.fd", &["pc-q35-*", "pc-i440fx-*"], &[]),
        );
        assert_eq!(t.variants(FirmwareVariantId::Ovmf4m).len(), 2);
    }

    #[test]
    fn a_file_in_etc_overrides_the_one_of_the_same_name_in_usr_share_and_an_empty_one_hides_it() {
        let t = Tree::new();
        t.put(
            "usr/60-plain.json",
            &t.uefi("CODE.fd", "VARS.fd", &["pc-q35-*"], &[]),
        );
        t.put(
            "usr/61-other.json",
            &t.uefi("CODE.fd", "VARS.fd", &["pc-i440fx-*"], &[]),
        );
        // the administrator's version of 60: another code file
        t.file("fw/CODE.local.fd", 3584 << 10);
        t.put(
            "etc/60-plain.json",
            &t.uefi("CODE.local.fd", "VARS.fd", &["pc-q35-*"], &[]),
        );
        let v = t.variants(FirmwareVariantId::Ovmf4m);
        assert_eq!(t.name_of(&v[0].descriptor), "etc/60-plain.json");
        assert_eq!(v[0].code.display().to_string(), t.fw("CODE.local.fd"));
        assert_eq!(v.len(), 2);
        // the user's empty 61 hides the distribution's
        t.file("user/61-other.json", 0);
        let files = descriptor_files(&t.dirs());
        let names: Vec<_> = files
            .iter()
            .map(|p| p.strip_prefix(t.dir.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["etc/60-plain.json"]);
        assert_eq!(t.variants(FirmwareVariantId::Ovmf4m).len(), 1);
        // a file of a lower number in /etc comes first, whatever its folder
        t.put(
            "etc/10-first.json",
            &t.uefi("CODE.fd", "VARS.fd", &["pc-q35-*"], &[]),
        );
        let v = t.variants(FirmwareVariantId::Ovmf4m);
        assert_eq!(t.name_of(&v[0].descriptor), "etc/10-first.json");
    }

    #[test]
    fn descriptors_vmrepl_cannot_use_are_passed_over_with_the_reason() {
        let t = Tree::new();
        let (descs, _) = load(&t.dirs());
        assert!(descs.is_empty());
        let d = |v: serde_json::Value| serde_json::from_value::<Descriptor>(v).unwrap();
        let plain = t.uefi("CODE.fd", "VARS.fd", &["pc-q35-*"], &[]);
        assert!(d(plain.clone()).fits(FirmwareVariantId::Ovmf4m).is_ok());
        let reason = |v: serde_json::Value, id| d(v).fits(id).unwrap_err();

        let mut v = plain.clone();
        v["mapping"]["executable"]["format"] = json!("qcow2");
        assert!(reason(v, FirmwareVariantId::Ovmf4m).contains("not raw"));
        let mut v = plain.clone();
        v["targets"][0]["architecture"] = json!("aarch64");
        assert!(reason(v, FirmwareVariantId::Ovmf4m).contains("no x86_64 target"));
        let mut v = plain.clone();
        v["interface-types"] = json!(["bios"]);
        assert!(reason(v, FirmwareVariantId::Ovmf4m).contains("not uefi"));
        let mut v = plain.clone();
        v["mapping"]["mode"] = json!("stateless");
        assert!(reason(v, FirmwareVariantId::Ovmf4m).contains("not split"));
        let mut v = plain.clone();
        v["features"] = json!(["intel-tdx"]);
        assert!(reason(v, FirmwareVariantId::Ovmf4m).contains("intel-tdx"));
        let v = t.uefi("CODE_2M.fd", "VARS_2M.fd", &["pc-q35-*"], &[]);
        assert!(reason(v, FirmwareVariantId::Ovmf4m).contains("not the 4 MiB"));
        let v = t.uefi("MISSING.fd", "VARS.fd", &["pc-q35-*"], &[]);
        assert!(reason(v, FirmwareVariantId::Ovmf4m).contains("missing"));
        // secure boot without enrolled keys is not the secure-boot variant, and no plain one
        let v = t.uefi(
            "CODE.secboot.fd",
            "VARS.fd",
            &["pc-q35-*"],
            &["requires-smm", "secure-boot"],
        );
        assert!(reason(v.clone(), FirmwareVariantId::Ovmf4mSecureBoot).contains("enrolled-keys"));
        assert!(reason(v, FirmwareVariantId::Ovmf4m).contains("Secure Boot"));
        let v = t.uefi("CODE.fd", "VARS.fd", &["pc-q35-*"], &["requires-smm"]);
        assert!(reason(v, FirmwareVariantId::Ovmf4m).contains("SMM"));

        // a file that is not a descriptor is reported apart, the others still count
        std::fs::write(t.dir.path().join("usr/20-broken.json"), "{ not json").unwrap();
        t.put("usr/60-plain.json", &plain);
        let (descs, bad) = load(&t.dirs());
        assert_eq!(descs.len(), 1);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].path.ends_with("20-broken.json"), "{bad:?}");
    }
}
