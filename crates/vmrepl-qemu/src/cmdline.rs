//! QEMU's command line from a VM definition. Pure: no I/O, unit-tested.
//!
//! Layout decisions (the rest of vmrepl relies on these names):
//! - Disk `<id>`: file node `<id>-file`, qcow2 format node `<id>` (dirty bitmaps live here),
//!   device `virtio-blk-pci` with id `<id>-dev`; the guest sees them as vda, vdb... in order.
//! - UEFI: pflash nodes `fw-code` (read-only CODE) and `fw-vars` (raw over `fw-vars-file`,
//!   the VM's NVRAM file); `fw-vars` is what a replication cycle copies with `sync=full`.
//! - NIC `N`: netdev `netN`, device `netN-dev`. "Not connected" is an isolated hub port
//!   (traffic goes nowhere) whose link is set down by QMP before the guest starts.
//! - QEMU starts paused (`-S`). The caller connects QMP, does what must happen before the
//!   guest's first instruction (e.g. add a dirty bitmap before the first boot after a
//!   failover), then runs [`QemuCommand::startup`], which ends with `cont`.
//! - Guest agent: virtio-serial port `org.qemu.guest_agent.0` on chardev `qga0`.
//! - No `-daemonize`: the process layer starts QEMU in its own process group and QEMU
//!   writes `-pidfile`.

use crate::caps::ResolvedAccel;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use vmrepl_types::vm::FirmwareVariantId;
use vmrepl_types::{FirmwareVariant, Generation, NicMode, VmDefinition};

/// Where a running VM's sockets and files go (normally the VM's run folder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPaths {
    pub qmp_sock: PathBuf,
    pub qga_sock: PathBuf,
    pub serial_log: PathBuf,
    pub pidfile: PathBuf,
}

impl RunPaths {
    /// The conventional names inside one run folder.
    pub fn in_dir(dir: &Path) -> RunPaths {
        RunPaths {
            qmp_sock: dir.join("qmp.sock"),
            qga_sock: dir.join("qga.sock"),
            serial_log: dir.join("serial.log"),
            pidfile: dir.join("qemu.pid"),
        }
    }
}

/// One QMP command to run.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpCommand {
    pub execute: String,
    pub arguments: Value,
}

/// The full plan for starting a VM.
#[derive(Debug, Clone, PartialEq)]
pub struct QemuCommand {
    /// Arguments after the binary name.
    pub argv: Vec<String>,
    /// QMP commands to run, in order, once QMP is connected; the last one is `cont`.
    pub startup: Vec<QmpCommand>,
}

/// Why a VM definition cannot be turned into a command line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    #[error("VM {vm} uses firmware {wanted} but firmware {given} was supplied; pass the host's {wanted} variant")]
    FirmwareMismatch {
        vm: String,
        wanted: FirmwareVariantId,
        given: FirmwareVariantId,
    },
    #[error("VM {vm} is generation {generation} but its firmware is {firmware}; generation 1 uses seabios, generation 2 an ovmf variant")]
    GenerationFirmware {
        vm: String,
        generation: Generation,
        firmware: FirmwareVariantId,
    },
    #[error("VM {vm} is generation 2 but has no NVRAM file; create one from the firmware's vars template")]
    NoNvram { vm: String },
    #[error("VM {vm}: disk id {id:?} is not a usable QEMU node name; use a letter followed by up to 25 letters, digits, '-' or '_' (e.g. disk0)")]
    BadDiskId { vm: String, id: String },
    #[error("VM {vm}: disk id {id} appears twice; disk ids must be unique")]
    DuplicateDisk { vm: String, id: String },
    #[error("VM {vm}: MAC address {mac:?} is not of the form 52:54:00:xx:xx:xx")]
    BadMac { vm: String, mac: String },
    #[error("VM {vm}: {what} {value:?} is not a usable interface name")]
    BadIfname {
        vm: String,
        what: &'static str,
        value: String,
    },
    #[error("VM {vm}: machine type {machine:?} is not a pinned, versioned type (e.g. pc-q35-7.2); resolve the alias when the VM is created")]
    UnpinnedMachine { vm: String, machine: String },
    #[error("VM {vm}: {what} must be at least 1")]
    Zero { vm: String, what: &'static str },
}

/// Doubles commas, the escape for values inside QEMU's `key=value,...` option syntax.
pub fn escape_opt(s: &str) -> String {
    s.replace(',', ",,")
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Whether `id` can be a QEMU node/device id stem (QEMU: letter first, then alnum - _ .;
/// node names are at most 31 bytes and we append `-file`).
/// The node name of a UEFI VM's variable store (raw, over file node `fw-vars-file`). Disk ids
/// can never take it ([`valid_node_id`] reserves the `fw-` prefix).
pub const VARS_NODE: &str = "fw-vars";

pub fn valid_node_id(id: &str) -> bool {
    let mut c = id.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic())
        && id.len() <= 26
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        && !id.starts_with("fw-")
        && !id.starts_with("net")
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Machine type must be a versioned name like `pc-q35-7.2` / `pc-i440fx-7.2`, never an alias.
fn pinned_machine(m: &str) -> bool {
    let versioned = m
        .rsplit_once('-')
        .map(|(_, v)| v.contains('.') && v.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .unwrap_or(false);
    versioned
        && m.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
}

fn blockdev(v: Value) -> [String; 2] {
    ["-blockdev".to_string(), v.to_string()]
}

/// Builds the command line and startup steps for `vm`.
///
/// `firmware` is this host's installed variant with the VM's id (from `HostInfo`).
pub fn build_command(
    vm: &VmDefinition,
    firmware: &FirmwareVariant,
    paths: &RunPaths,
    accel: ResolvedAccel,
) -> Result<QemuCommand, CmdlineError> {
    let name = vm.name.as_str().to_string();
    if firmware.id != vm.firmware {
        return Err(CmdlineError::FirmwareMismatch {
            vm: name,
            wanted: vm.firmware,
            given: firmware.id,
        });
    }
    let uefi = match (vm.generation, vm.firmware) {
        (Generation::Bios, FirmwareVariantId::Seabios) => false,
        (Generation::Uefi, FirmwareVariantId::Ovmf4m | FirmwareVariantId::Ovmf4mSecureBoot) => true,
        (generation, firmware) => {
            return Err(CmdlineError::GenerationFirmware {
                vm: name,
                generation,
                firmware,
            })
        }
    };
    if !pinned_machine(&vm.machine_type) {
        return Err(CmdlineError::UnpinnedMachine {
            vm: name,
            machine: vm.machine_type.clone(),
        });
    }
    if vm.vcpus == 0 {
        return Err(CmdlineError::Zero {
            vm: name,
            what: "vcpus",
        });
    }
    if vm.memory_mib == 0 {
        return Err(CmdlineError::Zero {
            vm: name,
            what: "memory_mib",
        });
    }
    let secure = vm.firmware == FirmwareVariantId::Ovmf4mSecureBoot;

    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));

    let mut machine = format!("{},accel={}", vm.machine_type, accel.as_str());
    if uefi {
        machine.push_str(",pflash0=fw-code,pflash1=fw-vars");
    }
    if secure {
        machine.push_str(",smm=on");
    }
    push(&["-machine", &machine]);
    if accel == ResolvedAccel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-S"]);
    // QEMU's seccomp filter: no obsolete system calls, no privilege changes, no scheduler or
    // CPU-affinity changes, and no new programs, except qemu-bridge-helper for a bridge NIC.
    let bridged = vm
        .nics
        .iter()
        .any(|n| matches!(n.mode, NicMode::Bridge { .. }));
    push(&[
        "-sandbox",
        &format!(
            "on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny,spawn={}",
            if bridged { "allow" } else { "deny" }
        ),
    ]);
    push(&["-msg", "timestamp=on"]);
    push(&[
        "-name",
        &format!("guest={},debug-threads=on", escape_opt(&name)),
    ]);
    push(&["-uuid", &vm.uuid.to_string()]);
    push(&["-smp", &vm.vcpus.to_string()]);
    push(&["-m", &format!("{}M", vm.memory_mib)]);
    push(&["-pidfile", &path_str(&paths.pidfile)]);
    push(&[
        "-qmp",
        &format!(
            "unix:{},server=on,wait=off",
            escape_opt(&path_str(&paths.qmp_sock))
        ),
    ]);
    push(&[
        "-chardev",
        &format!(
            // Appending, so that the daemon can cut the log while QEMU writes it.
            "file,id=serial0,path={},append=on",
            escape_opt(&path_str(&paths.serial_log))
        ),
        "-serial",
        "chardev:serial0",
    ]);

    // Firmware.
    if uefi {
        let nvram = vm
            .nvram
            .as_ref()
            .ok_or_else(|| CmdlineError::NoNvram { vm: name.clone() })?;
        a.extend(blockdev(json!({
            "driver": "file", "filename": path_str(&firmware.code),
            "node-name": "fw-code", "read-only": true
        })));
        a.extend(blockdev(json!({
            "driver": "file", "filename": path_str(nvram), "node-name": format!("{VARS_NODE}-file")
        })));
        a.extend(blockdev(json!({
            "driver": "raw", "file": format!("{VARS_NODE}-file"), "node-name": VARS_NODE
        })));
        if secure {
            a.extend(["-global", "driver=cfi.pflash01,property=secure,value=on"].map(String::from));
        }
    } else {
        a.extend(["-bios".to_string(), path_str(&firmware.code)]);
    }

    // Disks.
    let mut seen = std::collections::HashSet::new();
    for (i, d) in vm.disks.iter().enumerate() {
        if !valid_node_id(&d.id) {
            return Err(CmdlineError::BadDiskId {
                vm: name,
                id: d.id.clone(),
            });
        }
        if !seen.insert(d.id.as_str()) {
            return Err(CmdlineError::DuplicateDisk {
                vm: name,
                id: d.id.clone(),
            });
        }
        a.extend(blockdev(json!({
            "driver": "file", "filename": path_str(&d.path),
            "node-name": format!("{}-file", d.id), "discard": "unmap"
        })));
        a.extend(blockdev(json!({
            "driver": "qcow2", "file": format!("{}-file", d.id),
            "node-name": d.id, "discard": "unmap"
        })));
        a.extend([
            "-device".to_string(),
            format!(
                "virtio-blk-pci,drive={id},id={id}-dev,bootindex={}",
                i + 1,
                id = d.id
            ),
        ]);
    }

    // Network.
    let mut startup = Vec::new();
    for (i, n) in vm.nics.iter().enumerate() {
        if !valid_mac(&n.mac) {
            return Err(CmdlineError::BadMac {
                vm: name,
                mac: n.mac.clone(),
            });
        }
        let netdev = match &n.mode {
            NicMode::User => format!("user,id=net{i}"),
            NicMode::Tap { ifname } => {
                if !valid_ifname(ifname) {
                    return Err(CmdlineError::BadIfname {
                        vm: name,
                        what: "tap interface",
                        value: ifname.clone(),
                    });
                }
                format!("tap,id=net{i},ifname={ifname},script=no,downscript=no")
            }
            NicMode::Bridge { bridge } => {
                if !valid_ifname(bridge) {
                    return Err(CmdlineError::BadIfname {
                        vm: name,
                        what: "bridge",
                        value: bridge.clone(),
                    });
                }
                format!("bridge,id=net{i},br={bridge}")
            }
            NicMode::NotConnected => {
                startup.push(QmpCommand {
                    execute: "set_link".into(),
                    arguments: json!({"name": format!("net{i}-dev"), "up": false}),
                });
                // A hub with only this port: frames go nowhere.
                format!("hubport,id=net{i},hubid={}", 1000 + i)
            }
        };
        a.extend([
            "-netdev".to_string(),
            netdev,
            "-device".to_string(),
            format!("virtio-net-pci,netdev=net{i},id=net{i}-dev,mac={}", n.mac),
        ]);
    }

    // Direct kernel boot.
    if let Some(k) = &vm.kernel {
        a.extend(["-kernel".to_string(), path_str(&k.kernel)]);
        if let Some(initrd) = &k.initrd {
            a.extend(["-initrd".to_string(), path_str(initrd)]);
        }
        a.extend(["-append".to_string(), k.cmdline.clone()]);
    }

    // Guest agent.
    a.extend([
        "-chardev".to_string(),
        format!(
            "socket,path={},server=on,wait=off,id=qga0",
            escape_opt(&path_str(&paths.qga_sock))
        ),
        "-device".to_string(),
        "virtio-serial-pci,id=vserial0".to_string(),
        "-device".to_string(),
        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".to_string(),
    ]);

    startup.push(QmpCommand {
        execute: "cont".into(),
        arguments: Value::Null,
    });
    Ok(QemuCommand { argv: a, startup })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmrepl_types::vm::ConfigVersion;
    use vmrepl_types::{DirectKernel, DiskDef, NicDef, VmName};

    fn vm(generation: Generation, firmware: FirmwareVariantId) -> VmDefinition {
        VmDefinition {
            name: VmName::new("web1").unwrap(),
            uuid: uuid::Uuid::nil(),
            generation,
            firmware,
            machine_type: if generation == Generation::Bios {
                "pc-i440fx-7.2"
            } else {
                "pc-q35-7.2"
            }
            .into(),
            config_version: ConfigVersion::CURRENT,
            vcpus: 2,
            memory_mib: 512,
            disks: vec![
                DiskDef {
                    id: "disk0".into(),
                    path: "/vms/web1/disk0.qcow2".into(),
                    size_bytes: 1 << 30,
                },
                DiskDef {
                    id: "disk1".into(),
                    path: "/vms/a,b/disk1.qcow2".into(),
                    size_bytes: 1 << 30,
                },
            ],
            nics: vec![
                NicDef {
                    mac: "52:54:00:12:34:56".into(),
                    mode: NicMode::User,
                },
                NicDef {
                    mac: "52:54:00:12:34:57".into(),
                    mode: NicMode::NotConnected,
                },
            ],
            kernel: None,
            nvram: (generation == Generation::Uefi).then(|| "/vms/web1/vars.fd".into()),
        }
    }

    fn fw(id: FirmwareVariantId) -> FirmwareVariant {
        match id {
            FirmwareVariantId::Seabios => {
                FirmwareVariant::fixed(id, "/usr/share/seabios/bios-256k.bin".into(), None)
            }
            FirmwareVariantId::Ovmf4m => FirmwareVariant::fixed(
                id,
                "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
                Some("/usr/share/OVMF/OVMF_VARS_4M.fd".into()),
            ),
            FirmwareVariantId::Ovmf4mSecureBoot => FirmwareVariant::fixed(
                id,
                "/usr/share/OVMF/OVMF_CODE_4M.ms.fd".into(),
                Some("/usr/share/OVMF/OVMF_VARS_4M.ms.fd".into()),
            ),
        }
    }

    fn after<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn bios_vm_gets_pinned_machine_disks_nics_and_agent() {
        let v = vm(Generation::Bios, FirmwareVariantId::Seabios);
        let c = build_command(
            &v,
            &fw(v.firmware),
            &RunPaths::in_dir(Path::new("/run/vmrepl/web1")),
            ResolvedAccel::Tcg,
        )
        .unwrap();
        let a = &c.argv;
        assert_eq!(after(a, "-machine"), ["pc-i440fx-7.2,accel=tcg"]);
        assert!(a.contains(&"-S".to_string()) && a.contains(&"-nodefaults".to_string()));
        // QEMU's seccomp filter is on; spawning is denied without a bridge NIC.
        let sb = a.iter().position(|x| x == "-sandbox").expect("-sandbox");
        assert!(
            a[sb + 1].starts_with("on,") && a[sb + 1].contains("spawn=deny"),
            "{}",
            a[sb + 1]
        );
        assert!(!a.iter().any(|x| x == "-daemonize"));
        assert_eq!(after(a, "-bios"), ["/usr/share/seabios/bios-256k.bin"]);
        assert_eq!(
            after(a, "-qmp"),
            ["unix:/run/vmrepl/web1/qmp.sock,server=on,wait=off"]
        );
        assert_eq!(after(a, "-pidfile"), ["/run/vmrepl/web1/qemu.pid"]);
        assert_eq!(after(a, "-name"), ["guest=web1,debug-threads=on"]);
        let bd: Vec<Value> = after(a, "-blockdev")
            .iter()
            .map(|s| serde_json::from_str(s).unwrap())
            .collect();
        assert_eq!(bd.len(), 4);
        assert_eq!(bd[0]["node-name"], "disk0-file");
        assert_eq!(
            bd[1],
            json!({"driver":"qcow2","file":"disk0-file","node-name":"disk0","discard":"unmap"})
        );
        assert_eq!(
            bd[2]["filename"], "/vms/a,b/disk1.qcow2",
            "JSON needs no comma escaping"
        );
        let dev = after(a, "-device");
        assert_eq!(
            dev[0],
            "virtio-blk-pci,drive=disk0,id=disk0-dev,bootindex=1"
        );
        assert_eq!(
            dev[1],
            "virtio-blk-pci,drive=disk1,id=disk1-dev,bootindex=2"
        );
        assert!(dev.contains(&"virtio-net-pci,netdev=net0,id=net0-dev,mac=52:54:00:12:34:56"));
        assert!(dev.contains(&"virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"));
        assert_eq!(
            after(a, "-netdev"),
            ["user,id=net0", "hubport,id=net1,hubid=1001"]
        );
        assert_eq!(
            c.startup[0],
            QmpCommand {
                execute: "set_link".into(),
                arguments: json!({"name":"net1-dev","up":false})
            }
        );
        assert_eq!(c.startup.last().unwrap().execute, "cont");
    }

    #[test]
    fn uefi_secure_boot_uses_pflash_nodes_smm_and_secure_flash() {
        let v = vm(Generation::Uefi, FirmwareVariantId::Ovmf4mSecureBoot);
        let c = build_command(
            &v,
            &fw(v.firmware),
            &RunPaths::in_dir(Path::new("/r")),
            ResolvedAccel::Kvm,
        )
        .unwrap();
        let a = &c.argv;
        assert_eq!(
            after(a, "-machine"),
            ["pc-q35-7.2,accel=kvm,pflash0=fw-code,pflash1=fw-vars,smm=on"]
        );
        assert_eq!(after(a, "-cpu"), ["host"]);
        assert_eq!(
            after(a, "-global"),
            ["driver=cfi.pflash01,property=secure,value=on"]
        );
        let bd: Vec<Value> = after(a, "-blockdev")
            .iter()
            .map(|s| serde_json::from_str(s).unwrap())
            .collect();
        assert_eq!(
            bd[0],
            json!({"driver":"file","filename":"/usr/share/OVMF/OVMF_CODE_4M.ms.fd","node-name":"fw-code","read-only":true})
        );
        assert_eq!(bd[1]["filename"], "/vms/web1/vars.fd");
        assert_eq!(
            bd[2],
            json!({"driver":"raw","file":"fw-vars-file","node-name":"fw-vars"})
        );
        assert!(after(a, "-bios").is_empty());
    }

    #[test]
    fn plain_uefi_has_no_smm_and_kernel_boot_is_passed() {
        let mut v = vm(Generation::Uefi, FirmwareVariantId::Ovmf4m);
        v.kernel = Some(DirectKernel {
            kernel: "/k/vmlinuz".into(),
            initrd: Some("/k/initrd".into()),
            cmdline: "console=ttyS0 root=/dev/vda".into(),
        });
        let c = build_command(
            &v,
            &fw(v.firmware),
            &RunPaths::in_dir(Path::new("/r")),
            ResolvedAccel::Tcg,
        )
        .unwrap();
        assert_eq!(
            after(&c.argv, "-machine"),
            ["pc-q35-7.2,accel=tcg,pflash0=fw-code,pflash1=fw-vars"]
        );
        assert!(after(&c.argv, "-global").is_empty());
        assert_eq!(after(&c.argv, "-kernel"), ["/k/vmlinuz"]);
        assert_eq!(after(&c.argv, "-initrd"), ["/k/initrd"]);
        assert_eq!(after(&c.argv, "-append"), ["console=ttyS0 root=/dev/vda"]);
    }

    #[test]
    fn bad_definitions_are_refused_with_the_cause() {
        let base = vm(Generation::Bios, FirmwareVariantId::Seabios);
        let p = RunPaths::in_dir(Path::new("/r"));
        let mut v = base.clone();
        v.machine_type = "pc".into();
        assert!(matches!(
            build_command(&v, &fw(v.firmware), &p, ResolvedAccel::Tcg),
            Err(CmdlineError::UnpinnedMachine { .. })
        ));
        let e = build_command(
            &base,
            &fw(FirmwareVariantId::Ovmf4m),
            &p,
            ResolvedAccel::Tcg,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("firmware seabios but firmware ovmf-4m"),
            "{e}"
        );
        let mut v = base.clone();
        v.disks[1].id = "disk0".into();
        assert!(matches!(
            build_command(&v, &fw(v.firmware), &p, ResolvedAccel::Tcg),
            Err(CmdlineError::DuplicateDisk { .. })
        ));
        let mut v = base.clone();
        v.disks[0].id = "x,y".into();
        assert!(matches!(
            build_command(&v, &fw(v.firmware), &p, ResolvedAccel::Tcg),
            Err(CmdlineError::BadDiskId { .. })
        ));
        let mut v = base.clone();
        v.nics[0].mode = NicMode::Tap {
            ifname: "tap0,script=/x".into(),
        };
        assert!(matches!(
            build_command(&v, &fw(v.firmware), &p, ResolvedAccel::Tcg),
            Err(CmdlineError::BadIfname { .. })
        ));
        let mut v = vm(Generation::Uefi, FirmwareVariantId::Ovmf4m);
        v.nvram = None;
        assert!(matches!(
            build_command(&v, &fw(v.firmware), &p, ResolvedAccel::Tcg),
            Err(CmdlineError::NoNvram { .. })
        ));
        assert_eq!(escape_opt("/a,b"), "/a,,b");
    }
}
