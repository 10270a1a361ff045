//! Defining VMs: machine types this QEMU runs, storage folders, and creating a VM with its
//! disks and firmware files.

use crate::error::HostError;
use crate::vmm::db_err;
use crate::vmm::Vmm;
use crate::vmm::MAX_DISKS;
use std::path::PathBuf;
use uuid::Uuid;
use vmrepl_types::api::{ApiError, CreateVm, DiskSpec, ErrorCode, VmSummary};
use vmrepl_types::vm::FirmwareVariantId;
use vmrepl_types::{
    ConfigVersion, DirectKernel, DiskDef, Generation, NicDef, VmDefinition, VmName,
};

impl Vmm {
    /// Resolves a machine type request to a versioned name this host's QEMU runs.
    pub fn resolve_machine(&self, gen: Generation, req: Option<&str>) -> Result<String, HostError> {
        let wanted = req.unwrap_or(match gen {
            Generation::Bios => "pc",
            Generation::Uefi => "q35",
        });
        let resolved = vmrepl_qemu::caps::resolve_machine_alias(&self.machines, wanted)
            .unwrap_or_else(|| wanted.to_string());
        if !self.caps.has_machine_type(&resolved) {
            let family: Vec<&String> = self
                .caps
                .machine_types
                .iter()
                .filter(|m| m.starts_with(gen.machine_family()))
                .collect();
            return Err(HostError::Api(ApiError::new(
                ErrorCode::Unsupported,
                format!(
                    "Machine type {wanted:?} is unknown to this host's QEMU {}; use one of: {}",
                    self.caps.qemu_version,
                    family
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )));
        }
        // Either PC chipset runs either firmware; other boards (microvm, isapc) run neither.
        if !(resolved.starts_with("pc-i440fx") || resolved.starts_with("pc-q35")) {
            return Err(HostError::Api(ApiError::new(
                ErrorCode::Unsupported,
                format!(
                    "Machine type {resolved} is not a PC machine type; use pc-i440fx-* or pc-q35-*"
                ),
            )));
        }
        Ok(resolved)
    }

    fn storage_folder(&self, folder: Option<&PathBuf>) -> Result<PathBuf, HostError> {
        match folder {
            None => Ok(self.cfg.storage[0].clone()),
            Some(f) => {
                let n = crate::fsutil::normalize(f);
                let ok = n.as_ref().is_some_and(|n| {
                    self.cfg
                        .storage
                        .iter()
                        .any(|s| crate::fsutil::normalize(s).as_ref() == Some(n))
                });
                if ok {
                    Ok(n.expect("checked"))
                } else {
                    Err(HostError::Api(ApiError::new(
                        ErrorCode::InvalidInput,
                        format!(
                            "Folder {} is not one of this host's storage folders ({}); add it to `storage` in config.toml or pick one of those.",
                            f.display(),
                            self.cfg.storage.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                        ),
                    )))
                }
            }
        }
    }

    /// Defines a VM: validates everything first, then creates disks and NVRAM, then records it.
    /// On any failure, what was created is removed again.
    pub async fn create(&self, c: CreateVm) -> Result<VmSummary, HostError> {
        let name = VmName::new(&c.name)
            .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))?;
        if self
            .db()
            .vm_by_name(name.as_str())
            .map_err(db_err)?
            .is_some()
        {
            return Err(HostError::Api(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("A VM named {name:?} already exists on this host; pick another name or delete it first."),
            )));
        }
        if c.vcpus == 0 || c.vcpus > 64 {
            return Err(HostError::Api(ApiError::new(
                ErrorCode::InvalidInput,
                format!("{} vCPUs asked; use 1 to 64.", c.vcpus),
            )));
        }
        if c.memory_mib < 32 || c.memory_mib > 1 << 20 {
            return Err(HostError::Api(ApiError::new(
                ErrorCode::InvalidInput,
                format!("{} MiB of memory asked; use 32 MiB to 1 TiB.", c.memory_mib),
            )));
        }
        if c.disks.len() > MAX_DISKS {
            return Err(HostError::Api(ApiError::new(
                ErrorCode::InvalidInput,
                format!(
                    "{} disks asked; a VM has at most {MAX_DISKS}.",
                    c.disks.len()
                ),
            )));
        }
        if c.secure_boot && c.generation == Generation::Bios {
            return Err(HostError::Api(ApiError::new(ErrorCode::InvalidInput, "Secure Boot needs a generation 2 (UEFI) VM; drop --secure-boot or use --generation 2.")));
        }
        let firmware = vmrepl_types::api::firmware_for(c.generation, c.secure_boot);
        let fw = self.caps.firmware(firmware).cloned().ok_or_else(|| {
            let pkg = if firmware == FirmwareVariantId::Seabios { "seabios" } else { "ovmf" };
            ApiError::new(
                ErrorCode::Unsupported,
                format!("This host has no {firmware} firmware, which a generation {} VM needs; install it (apt-get install {pkg}) and restart the daemon.", c.generation),
            )
        })?;
        let machine_type = self.resolve_machine(c.generation, c.machine_type.as_deref())?;
        if firmware == FirmwareVariantId::Ovmf4mSecureBoot && !machine_type.starts_with("pc-q35") {
            return Err(HostError::Api(ApiError::new(
                ErrorCode::InvalidInput,
                "Secure Boot needs the q35 machine type.",
            )));
        }
        let kernel = match (&c.kernel, &c.initrd, &c.cmdline) {
            (None, None, None) => None,
            (Some(k), initrd, cmdline) => {
                for p in std::iter::once(k).chain(initrd.iter()) {
                    if !p.is_file() {
                        return Err(HostError::Api(ApiError::new(
                            ErrorCode::InvalidInput,
                            format!("Kernel boot file {} does not exist.", p.display()),
                        )));
                    }
                }
                Some(DirectKernel {
                    kernel: k.clone(),
                    initrd: initrd.clone(),
                    cmdline: cmdline.clone().unwrap_or_default(),
                })
            }
            _ => {
                return Err(HostError::Api(ApiError::new(
                    ErrorCode::InvalidInput,
                    "--initrd and --cmdline need --kernel.",
                )))
            }
        };
        for spec in &c.disks {
            match spec {
                DiskSpec::New { size_bytes, folder } => {
                    self.storage_folder(folder.as_ref())?;
                    if *size_bytes < 1 << 20 || *size_bytes % 512 != 0 {
                        return Err(HostError::Api(ApiError::new(ErrorCode::InvalidInput, format!("Disk size {size_bytes} bytes is not a multiple of 512 of at least 1 MiB."))));
                    }
                }
                DiskSpec::Import { source, folder } => {
                    self.storage_folder(folder.as_ref())?;
                    if !source.is_file() {
                        return Err(HostError::Api(ApiError::new(
                            ErrorCode::InvalidInput,
                            format!("Image to import {} does not exist.", source.display()),
                        )));
                    }
                }
            }
        }
        // Everything checked; now create.
        let uuid = Uuid::new_v4();
        let mut created: Vec<PathBuf> = Vec::new();
        let result = self.create_files(uuid, &c, &fw, &mut created).await;
        let (disks, nvram) = match result {
            Ok(x) => x,
            Err(e) => {
                for p in created.iter().rev() {
                    let _ = if p.is_dir() {
                        std::fs::remove_dir(p)
                    } else {
                        std::fs::remove_file(p)
                    };
                }
                return Err(e);
            }
        };
        let nics = c
            .nics
            .iter()
            .enumerate()
            .map(|(i, m)| NicDef {
                mac: mac_for(uuid, i),
                mode: m.clone(),
            })
            .collect();
        let def = VmDefinition {
            name,
            uuid,
            generation: c.generation,
            firmware,
            machine_type,
            config_version: ConfigVersion::CURRENT,
            vcpus: c.vcpus,
            memory_mib: c.memory_mib,
            disks,
            nics,
            kernel,
            nvram,
        };
        let db = self.db();
        db.insert_vm(&def).map_err(db_err)?;
        let _ = db.event(Some(uuid), &format!("VM {} created", def.name));
        let row = db.vm_by_uuid(uuid).map_err(db_err)?.expect("just inserted");
        Ok(self.summary(row))
    }

    async fn create_files(
        &self,
        uuid: Uuid,
        c: &CreateVm,
        fw: &vmrepl_types::FirmwareVariant,
        created: &mut Vec<PathBuf>,
    ) -> Result<(Vec<DiskDef>, Option<PathBuf>), HostError> {
        let mut disks = Vec::new();
        for (i, spec) in c.disks.iter().enumerate() {
            let id = format!("disk{i}");
            let folder = match spec {
                DiskSpec::New { folder, .. } | DiskSpec::Import { folder, .. } => {
                    self.storage_folder(folder.as_ref())?
                }
            };
            let dir = folder.join(uuid.to_string());
            vm_folder(&dir, created)?;
            let path = dir.join(format!("{id}.qcow2"));
            let size = match spec {
                DiskSpec::New { size_bytes, .. } => {
                    vmrepl_qemu::img::QemuImg::default()
                        .create(&path, *size_bytes, &Default::default())
                        .await
                        .map_err(|e| ApiError::new(ErrorCode::Qemu, e.to_string()))?;
                    created.push(path.clone());
                    owner_only(&path)?;
                    *size_bytes
                }
                DiskSpec::Import { source, .. } => {
                    vmrepl_qemu::img::QemuImg::default()
                        .convert(source, None, &path)
                        .await
                        .map_err(|e| ApiError::new(ErrorCode::Qemu, e.to_string()))?;
                    created.push(path.clone());
                    owner_only(&path)?;
                    vmrepl_qemu::img::QemuImg::default()
                        .info(&path)
                        .await
                        .map_err(|e| ApiError::new(ErrorCode::Qemu, e.to_string()))?
                        .virtual_size
                }
            };
            disks.push(DiskDef {
                id,
                path,
                size_bytes: size,
            });
        }
        let nvram = match &fw.vars_template {
            Some(tpl) => {
                let dir = self.cfg.storage[0].join(uuid.to_string());
                vm_folder(&dir, created)?;
                let p = dir.join("nvram.fd");
                crate::fsutil::copy_private(tpl, &p).map_err(|e| {
                    ApiError::new(
                        ErrorCode::Io,
                        format!("Cannot copy the NVRAM template {}: {e}", tpl.display()),
                    )
                })?;
                created.push(p.clone());
                Some(p)
            }
            None => None,
        };
        Ok((disks, nvram))
    }
}

/// Creates a VM's folder in a storage folder unless it exists, recording it for the clean-up
/// of a failed create.
pub(super) fn vm_folder(
    dir: &std::path::Path,
    created: &mut Vec<PathBuf>,
) -> Result<(), HostError> {
    if !dir.exists() {
        crate::fsutil::create_private_dir_all(dir).map_err(|e| {
            ApiError::new(
                ErrorCode::Io,
                format!("Cannot create {}: {e}", dir.display()),
            )
        })?;
        created.push(dir.to_path_buf());
    }
    Ok(())
}

/// Makes a VM file readable by its owner only (disk images hold the guest's data).
pub(super) fn owner_only(p: &std::path::Path) -> Result<(), HostError> {
    crate::fsutil::make_owner_only(p).map_err(|e| {
        ApiError::new(
            ErrorCode::Io,
            format!("Cannot make {} owner-only (mode 0600): {e}", p.display()),
        )
        .into()
    })
}

/// A stable locally administered MAC per VM and adapter index.
pub fn mac_for(uuid: Uuid, i: usize) -> String {
    let b = uuid.as_bytes();
    format!(
        "52:54:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0],
        b[1],
        b[2],
        (b[3] as usize + i) & 0xff
    )
}

/// The boot files that belong to `def` itself: a kernel or initrd kept in the VM's own folder
/// (a failed-over replica's copies), which go with the VM. Files elsewhere are the admin's.
pub fn own_boot_files(def: &VmDefinition) -> Vec<std::path::PathBuf> {
    let own: Vec<&std::path::Path> = def.disks.iter().filter_map(|d| d.path.parent()).collect();
    def.kernel
        .iter()
        .flat_map(|k| std::iter::once(&k.kernel).chain(k.initrd.iter()))
        .filter(|p| p.parent().is_some_and(|parent| own.contains(&parent)))
        .cloned()
        .collect()
}
