//! What this host can run: QEMU version, machine types, firmware, KVM, storage space.

use crate::exec::{self, ExecError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use vmrepl_types::vm::FirmwareVariantId;
use vmrepl_types::{
    Accel, ConfigVersion, FirmwareVariant, HostInfo, StorageFolderInfo, PROTOCOL_VERSIONS, RELEASE,
};

/// The accelerator a VM is actually started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedAccel {
    Kvm,
    Tcg,
}

impl ResolvedAccel {
    /// QEMU's name for it (`accel=`).
    pub fn as_str(self) -> &'static str {
        match self {
            ResolvedAccel::Kvm => "kvm",
            ResolvedAccel::Tcg => "tcg",
        }
    }
}

/// Probe failures.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("{binary} {what} failed (exit {code:?}): {stderr}; check the QEMU installation")]
    Failed {
        binary: PathBuf,
        what: &'static str,
        code: Option<i32>,
        stderr: String,
    },
    #[error(
        "could not read {what} from the output of {binary}: {output:?}; this QEMU is not supported"
    )]
    Parse {
        binary: PathBuf,
        what: &'static str,
        output: String,
    },
    #[error(
        "could not measure storage folder {path}: {source}; check that it exists and is readable"
    )]
    Storage {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("KVM was requested (accel=kvm) but is unusable on this host: {reason}; use --accel tcg (or auto)")]
    KvmUnusable { reason: String },
}

/// Where to look and what to run. [`ProbeOptions::new`] gives Debian's defaults.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub qemu_binary: PathBuf,
    /// Folders of QEMU firmware descriptors, the most general first ([`crate::firmware`]);
    /// UEFI firmware is looked up there first. Empty: the fixed paths only.
    pub firmware_descriptor_dirs: Vec<PathBuf>,
    /// Folder holding `OVMF_CODE_4M.fd` and friends: the fixed paths, used for the machine
    /// types no firmware descriptor covers.
    pub ovmf_dir: PathBuf,
    /// Folder holding `bios-256k.bin`.
    pub seabios_dir: PathBuf,
    pub storage_folders: Vec<PathBuf>,
    pub accel_pref: Accel,
    pub kvm_device: PathBuf,
    /// How long the KVM boot probe may take before KVM counts as hanging.
    pub kvm_probe_timeout: Duration,
    /// Host name to report; the system host name when None.
    pub host_name: Option<String>,
}

impl ProbeOptions {
    /// QEMU's descriptor folders, then Debian's and Ubuntu's fixed paths.
    pub fn new(
        qemu_binary: impl Into<PathBuf>,
        storage_folders: Vec<PathBuf>,
        accel_pref: Accel,
    ) -> ProbeOptions {
        ProbeOptions {
            qemu_binary: qemu_binary.into(),
            firmware_descriptor_dirs: crate::firmware::default_descriptor_dirs(),
            ovmf_dir: "/usr/share/OVMF".into(),
            seabios_dir: "/usr/share/seabios".into(),
            storage_folders,
            accel_pref,
            kvm_device: "/dev/kvm".into(),
            kvm_probe_timeout: Duration::from_secs(5),
            host_name: None,
        }
    }
}

/// Machine types reported by `-machine help`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineTypes {
    /// Real (non-alias) machine type names, in QEMU's order.
    pub versioned: Vec<String>,
    /// Alias → versioned name, e.g. `q35` → `pc-q35-7.2`.
    pub aliases: BTreeMap<String, String>,
}

/// The probe result: the shared report plus what only this host needs.
#[derive(Debug, Clone)]
pub struct HostProbe {
    pub info: HostInfo,
    pub machines: MachineTypes,
}

/// Parses `qemu-system-x86_64 -machine help`.
pub fn parse_machine_help(out: &str) -> MachineTypes {
    let mut m = MachineTypes::default();
    for line in out
        .lines()
        .skip_while(|l| !l.starts_with("Supported machines"))
        .skip(1)
    {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if let Some(i) = line.find("(alias of ") {
            let target = line[i + "(alias of ".len()..]
                .split(')')
                .next()
                .unwrap_or("")
                .trim();
            if !target.is_empty() {
                m.aliases.insert(name.to_string(), target.to_string());
                continue;
            }
        }
        m.versioned.push(name.to_string());
    }
    m
}

/// Resolves a moving alias (`pc`, `q35`) to the versioned type it means on this host, e.g.
/// `pc-q35-7.2`. A versioned name resolves to itself; unknown names to None.
pub fn resolve_machine_alias(list: &MachineTypes, name: &str) -> Option<String> {
    if let Some(t) = list.aliases.get(name) {
        return Some(t.clone());
    }
    list.versioned.iter().find(|m| *m == name).cloned()
}

/// Parses `QEMU emulator version 7.2.22 (Debian ...)` into `7.2.22`.
pub fn parse_version(out: &str) -> Option<String> {
    let first = out.lines().next()?;
    let i = first.find("version ")?;
    first[i + 8..].split_whitespace().next().map(str::to_string)
}

/// This host's firmware: SeaBIOS at its fixed path; each UEFI variant from QEMU's firmware
/// descriptors in `descriptor_dirs` (one entry per fitting descriptor, in priority order, with
/// its machine types), then from the fixed paths of `ovmf_dir` for any other machine type (left
/// out when a descriptor already gives the same file). Descriptor files that cannot be read are
/// logged and skipped.
pub fn discover_firmware(
    descriptor_dirs: &[PathBuf],
    ovmf_dir: &Path,
    seabios_dir: &Path,
) -> Vec<FirmwareVariant> {
    let (descriptors, unreadable) = crate::firmware::load(descriptor_dirs);
    for u in &unreadable {
        tracing::warn!(
            target: crate::LOG_TARGET,
            path = %u.path.display(),
            "firmware descriptor skipped, it is not one QEMU's schema describes: {}; fix or remove the file",
            u.reason
        );
    }
    let fixed = find_firmware(ovmf_dir, seabios_dir);
    let mut out: Vec<FirmwareVariant> = fixed
        .iter()
        .filter(|f| f.id == FirmwareVariantId::Seabios)
        .cloned()
        .collect();
    for id in [
        FirmwareVariantId::Ovmf4m,
        FirmwareVariantId::Ovmf4mSecureBoot,
    ] {
        let found = crate::firmware::uefi_variants(&descriptors, id);
        for f in &found {
            tracing::debug!(
                target: crate::LOG_TARGET,
                firmware = %id,
                descriptor = %f.descriptor.as_deref().unwrap_or(Path::new("")).display(),
                code = %f.code.display(),
                machines = ?f.machines,
                "firmware found through its descriptor"
            );
        }
        let fallback: Vec<FirmwareVariant> = fixed
            .iter()
            .filter(|f| f.id == id && !found.iter().any(|d| d.code == f.code))
            .cloned()
            .collect();
        out.extend(found);
        out.extend(fallback);
    }
    out
}

/// Firmware variants whose files exist under the given folders (the fixed paths).
pub fn find_firmware(ovmf_dir: &Path, seabios_dir: &Path) -> Vec<FirmwareVariant> {
    let mut out = Vec::new();
    let bios = seabios_dir.join("bios-256k.bin");
    if bios.is_file() {
        out.push(FirmwareVariant::fixed(
            FirmwareVariantId::Seabios,
            bios,
            None,
        ));
    }
    for (id, code, vars) in [
        (
            FirmwareVariantId::Ovmf4m,
            "OVMF_CODE_4M.fd",
            "OVMF_VARS_4M.fd",
        ),
        (
            FirmwareVariantId::Ovmf4mSecureBoot,
            "OVMF_CODE_4M.ms.fd",
            "OVMF_VARS_4M.ms.fd",
        ),
    ] {
        let (c, v) = (ovmf_dir.join(code), ovmf_dir.join(vars));
        if c.is_file() && v.is_file() {
            out.push(FirmwareVariant::fixed(id, c, Some(v)));
        }
    }
    out
}

/// Free and total bytes of the filesystem holding `path`.
pub fn storage_info(path: &Path) -> Result<StorageFolderInfo, CapsError> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|source| CapsError::Storage {
        path: path.to_path_buf(),
        source,
    })?;
    let frag = st.fragment_size() as u64;
    Ok(StorageFolderInfo {
        path: path.to_path_buf(),
        free_bytes: st.blocks_available() as u64 * frag,
        total_bytes: st.blocks() as u64 * frag,
    })
}

/// Whether KVM really runs a guest: `/dev/kvm` opens read-write, and a tiny SeaBIOS guest
/// under `accel=kvm` reaches the end of its boot (seen on the debug console) within
/// `timeout`. On some nested setups KVM initialises and then hangs; that counts as unusable.
pub async fn probe_kvm(
    qemu: &Path,
    kvm_device: &Path,
    seabios: Option<&Path>,
    timeout: Duration,
) -> Result<(), String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm_device)
    {
        return Err(format!(
            "{} cannot be opened read-write ({e})",
            kvm_device.display()
        ));
    }
    let dir = tempfile::tempdir()
        .map_err(|e| format!("cannot create a temporary folder for the KVM probe ({e})"))?;
    let log = dir.path().join("debugcon.log");
    let mut args: Vec<String> = [
        "-machine",
        "pc,accel=kvm",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-m",
        "16",
        "-no-reboot",
    ]
    .map(String::from)
    .to_vec();
    if let Some(b) = seabios {
        args.extend(["-bios".into(), b.display().to_string()]);
    }
    args.extend([
        "-chardev".into(),
        format!(
            "file,id=dbg,path={}",
            crate::cmdline::escape_opt(&log.display().to_string())
        ),
        "-device".into(),
        "isa-debugcon,iobase=0x402,chardev=dbg".into(),
    ]);
    let start = Instant::now();
    let mut child = tokio::process::Command::new(qemu)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!(
                "{} could not be started for the KVM probe ({e})",
                qemu.display()
            )
        })?;
    let cmd = exec::render(qemu, &args);
    let res = loop {
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        if out.contains("No bootable device") || out.contains("Booting from") {
            break Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            break Err(format!(
                "QEMU exited ({status}) under accel=kvm: {}",
                err.trim()
            ));
        }
        if start.elapsed() >= timeout {
            break Err(format!(
                "a test guest under accel=kvm did not finish its BIOS within {} s (KVM hangs, as nested KVM often does)",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    tracing::info!(target: "vmrepl::qemu", cmd = %cmd, ms = start.elapsed().as_millis() as u64, ok = res.is_ok(), "KVM probe");
    res
}

async fn qemu_output(
    binary: &Path,
    args: &[&str],
    what: &'static str,
) -> Result<String, CapsError> {
    let out = exec::run(binary, args, Duration::from_secs(30)).await?;
    if !out.status.success() {
        return Err(CapsError::Failed {
            binary: binary.to_path_buf(),
            what,
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `-machine help` and parses it.
pub async fn machine_types(binary: &Path) -> Result<MachineTypes, CapsError> {
    let out = qemu_output(binary, &["-machine", "help"], "-machine help").await?;
    let m = parse_machine_help(&out);
    if m.versioned.is_empty() {
        return Err(CapsError::Parse {
            binary: binary.to_path_buf(),
            what: "machine types",
            output: out,
        });
    }
    Ok(m)
}

/// Probes this host.
pub async fn probe(opts: &ProbeOptions) -> Result<HostProbe, CapsError> {
    let bin = &opts.qemu_binary;
    let vout = qemu_output(bin, &["--version"], "--version").await?;
    let qemu_version = parse_version(&vout).ok_or_else(|| CapsError::Parse {
        binary: bin.clone(),
        what: "the version",
        output: vout.clone(),
    })?;
    let machines = machine_types(bin).await?;
    let firmware = discover_firmware(
        &opts.firmware_descriptor_dirs,
        &opts.ovmf_dir,
        &opts.seabios_dir,
    );
    let (kvm_usable, kvm_reason) = if opts.accel_pref == Accel::Tcg {
        (
            false,
            Some("not probed: the accelerator is set to tcg".to_string()),
        )
    } else {
        let seabios = firmware
            .iter()
            .find(|f| f.id == FirmwareVariantId::Seabios)
            .map(|f| f.code.clone());
        match probe_kvm(
            bin,
            &opts.kvm_device,
            seabios.as_deref(),
            opts.kvm_probe_timeout,
        )
        .await
        {
            Ok(()) => (true, None),
            Err(r) => (false, Some(r)),
        }
    };
    let storage = opts
        .storage_folders
        .iter()
        .map(|p| storage_info(p))
        .collect::<Result<Vec<_>, _>>()?;
    let host_name = match &opts.host_name {
        Some(h) => h.clone(),
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into()),
    };
    let info = HostInfo {
        host_name,
        release: RELEASE.to_string(),
        protocol_versions: PROTOCOL_VERSIONS,
        qemu_version,
        machine_types: machines.versioned.clone(),
        firmware,
        kvm_usable,
        kvm_reason,
        config_versions: (ConfigVersion::OLDEST, ConfigVersion::CURRENT),
        storage,
        metrics_url: None,
        now_unix_ms: None,
        dashboard_url: None,
        features: vmrepl_types::caps::FEATURES
            .iter()
            .map(|f| f.to_string())
            .collect(),
    };
    Ok(HostProbe { info, machines })
}

/// The accelerator to start VMs with, given the preference and the probe.
pub fn resolve_accel(pref: Accel, host: &HostInfo) -> Result<ResolvedAccel, CapsError> {
    match pref {
        Accel::Tcg => Ok(ResolvedAccel::Tcg),
        Accel::Auto if host.kvm_usable => Ok(ResolvedAccel::Kvm),
        Accel::Auto => Ok(ResolvedAccel::Tcg),
        Accel::Kvm if host.kvm_usable => Ok(ResolvedAccel::Kvm),
        Accel::Kvm => Err(CapsError::KvmUnusable {
            reason: host
                .kvm_reason
                .clone()
                .unwrap_or_else(|| "the probe found it unusable".into()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELP: &str = "Supported machines are:\nmicrovm              microvm (i386)\npc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\npc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\npc-i440fx-7.1        Standard PC (i440FX + PIIX, 1996)\nq35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\npc-q35-7.2           Standard PC (Q35 + ICH9, 2009)\nnone                 empty machine\n";

    #[test]
    fn machine_help_parses_aliases_and_versioned_names() {
        let m = parse_machine_help(HELP);
        assert_eq!(
            m.versioned,
            [
                "microvm",
                "pc-i440fx-7.2",
                "pc-i440fx-7.1",
                "pc-q35-7.2",
                "none"
            ]
        );
        assert_eq!(
            resolve_machine_alias(&m, "q35").as_deref(),
            Some("pc-q35-7.2")
        );
        assert_eq!(
            resolve_machine_alias(&m, "pc").as_deref(),
            Some("pc-i440fx-7.2")
        );
        assert_eq!(
            resolve_machine_alias(&m, "pc-i440fx-7.1").as_deref(),
            Some("pc-i440fx-7.1")
        );
        assert_eq!(resolve_machine_alias(&m, "pc-q35-9.0"), None);
    }

    #[test]
    fn version_parses() {
        assert_eq!(
            parse_version(
                "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright"
            )
            .as_deref(),
            Some("7.2.22")
        );
    }

    #[test]
    fn accel_resolution_explains_forced_kvm() {
        let mut h = HostInfo {
            host_name: "h".into(),
            release: "0".into(),
            protocol_versions: (1, 1),
            qemu_version: "7.2.22".into(),
            machine_types: vec![],
            firmware: vec![],
            kvm_usable: false,
            kvm_reason: Some("it hangs".into()),
            config_versions: (ConfigVersion::OLDEST, ConfigVersion::CURRENT),
            storage: vec![],
            metrics_url: None,
            now_unix_ms: None,
            dashboard_url: None,
            features: vec![],
        };
        assert_eq!(resolve_accel(Accel::Auto, &h).unwrap(), ResolvedAccel::Tcg);
        let e = resolve_accel(Accel::Kvm, &h).unwrap_err().to_string();
        assert!(
            e.contains("it hangs") && e.contains("use --accel tcg"),
            "{e}"
        );
        h.kvm_usable = true;
        assert_eq!(resolve_accel(Accel::Auto, &h).unwrap(), ResolvedAccel::Kvm);
    }

    #[test]
    fn firmware_found_in_a_fake_folder() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "OVMF_CODE_4M.fd",
            "OVMF_VARS_4M.fd",
            "OVMF_CODE_4M.ms.fd",
            "bios-256k.bin",
        ] {
            std::fs::write(d.path().join(f), b"x").unwrap();
        }
        let fw = find_firmware(d.path(), d.path());
        let ids: Vec<_> = fw.iter().map(|f| f.id).collect();
        assert_eq!(
            ids,
            [FirmwareVariantId::Seabios, FirmwareVariantId::Ovmf4m],
            "secure boot lacks its vars template"
        );
    }
}
