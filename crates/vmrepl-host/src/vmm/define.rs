//! Defining VMs: machine types this QEMU runs, storage folders, and creating a VM with its
//! disks and firmware files.

use crate::vmm::VmError;
use crate::vmm::Vmm;
use crate::vmm::MAX_DISKS;
use std::path::PathBuf;
use uuid::Uuid;
use vmrepl_types::api::{CreateVm, DiskSpec, VmSummary};
use vmrepl_types::vm::FirmwareVariantId;
use vmrepl_types::{
    ConfigVersion, DirectKernel, DiskDef, Generation, NicDef, VmDefinition, VmName,
};

impl Vmm {
    /// Resolves a machine type request to a versioned name this host's QEMU runs.
    pub fn resolve_machine(&self, gen: Generation, req: Option<&str>) -> Result<String, VmError> {
        let wanted = req.unwrap_or(match gen {
            Generation::Bios => "pc",
            Generation::Uefi => "q35",
        });
        let resolved = vmrepl_qemu::caps::resolve_machine_alias(&self.machines, wanted)
            .unwrap_or_else(|| wanted.to_string());
        if !self.caps.has_machine_type(&resolved) {
            return Err(VmError::UnknownMachineType {
                wanted: wanted.to_string(),
                qemu: self.caps.qemu_version.clone(),
                family: self
                    .caps
                    .machine_types
                    .iter()
                    .filter(|m| m.starts_with(gen.machine_family()))
                    .cloned()
                    .collect(),
            });
        }
        // Either PC chipset runs either firmware; other boards (microvm, isapc) run neither.
        if !(resolved.starts_with("pc-i440fx") || resolved.starts_with("pc-q35")) {
            return Err(VmError::NotAPcMachineType { machine: resolved });
        }
        Ok(resolved)
    }

    fn storage_folder(&self, folder: Option<&PathBuf>) -> Result<PathBuf, VmError> {
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
                    Err(VmError::NotAStorageFolder {
                        folder: f.clone(),
                        storage: self.cfg.storage.clone(),
                    })
                }
            }
        }
    }

    /// Defines a VM: validates everything first, then creates disks and NVRAM, then records it.
    /// On any failure, what was created is removed again.
    pub async fn create(&self, c: CreateVm) -> Result<VmSummary, VmError> {
        let name = VmName::new(&c.name)?;
        if self.db().vm_by_name(name.as_str())?.is_some() {
            return Err(VmError::AlreadyExists { name });
        }
        if c.vcpus == 0 || c.vcpus > 64 {
            return Err(VmError::Vcpus { vcpus: c.vcpus });
        }
        if c.memory_mib < 32 || c.memory_mib > 1 << 20 {
            return Err(VmError::Memory { mib: c.memory_mib });
        }
        if c.disks.len() > MAX_DISKS {
            return Err(VmError::TooManyDisks {
                count: c.disks.len(),
                max: MAX_DISKS,
            });
        }
        if c.secure_boot && c.generation == Generation::Bios {
            return Err(VmError::SecureBootNeedsUefi);
        }
        let firmware = vmrepl_types::api::firmware_for(c.generation, c.secure_boot);
        let machine_type = self.resolve_machine(c.generation, c.machine_type.as_deref())?;
        // The firmware entry for this machine type: a descriptor's, or the fixed path.
        let fw = self
            .caps
            .firmware_for(firmware, &machine_type)
            .cloned()
            .ok_or_else(|| VmError::NoFirmware {
                firmware,
                machine_type: machine_type.clone(),
                generation: c.generation,
                package: if firmware == FirmwareVariantId::Seabios {
                    "seabios"
                } else {
                    "ovmf"
                },
            })?;
        if firmware == FirmwareVariantId::Ovmf4mSecureBoot && !machine_type.starts_with("pc-q35") {
            return Err(VmError::SecureBootNeedsQ35);
        }
        let kernel = match (&c.kernel, &c.initrd, &c.cmdline) {
            (None, None, None) => None,
            (Some(k), initrd, cmdline) => {
                for p in std::iter::once(k).chain(initrd.iter()) {
                    if !p.is_file() {
                        return Err(VmError::NoBootFile { path: p.clone() });
                    }
                }
                Some(DirectKernel {
                    kernel: k.clone(),
                    initrd: initrd.clone(),
                    cmdline: cmdline.clone().unwrap_or_default(),
                })
            }
            _ => return Err(VmError::BootOptionsWithoutKernel),
        };
        for spec in &c.disks {
            match spec {
                DiskSpec::New { size_bytes, folder } => {
                    self.storage_folder(folder.as_ref())?;
                    if *size_bytes < 1 << 20 || *size_bytes % 512 != 0 {
                        return Err(VmError::DiskSize { bytes: *size_bytes });
                    }
                }
                DiskSpec::Import { source, folder } => {
                    self.storage_folder(folder.as_ref())?;
                    if !source.is_file() {
                        return Err(VmError::NoImage {
                            path: source.clone(),
                        });
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
                remove_created(&created);
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
        db.insert_vm(&def)?;
        let _ = db.event(Some(uuid), &format!("VM {} created", def.name));
        let row = db.vm_by_uuid(uuid)?.expect("just inserted");
        Ok(self.summary(row))
    }

    /// Adds a new, empty qcow2 disk of `size_bytes` to a VM that is off (Add-VMHardDiskDrive
    /// with New-VHD): the next free id (`diskN`), in the VM's folder of `folder` (default: the
    /// first storage folder), made as `vm create` makes its disks (qcow2 v3, owner-only; change
    /// tracking starts when replication includes it). The file is recorded as vmrepl's own,
    /// so its next open finds no change behind vmrepl's back. Returns the new disk's id.
    pub async fn add_disk(
        &self,
        name: &VmName,
        size_bytes: u64,
        folder: Option<&PathBuf>,
    ) -> Result<(String, PathBuf), VmError> {
        let (_op, row) = self.stopped(name).await?;
        let mut def = row.definition.clone();
        if def.disks.len() >= MAX_DISKS {
            return Err(VmError::TooManyDisks {
                count: def.disks.len() + 1,
                max: MAX_DISKS,
            });
        }
        if size_bytes < 1 << 20 || !size_bytes.is_multiple_of(512) {
            return Err(VmError::DiskSize { bytes: size_bytes });
        }
        let folder = self.storage_folder(folder)?;
        let next = def
            .disks
            .iter()
            .filter_map(|d| d.id.strip_prefix("disk")?.parse::<usize>().ok())
            .map(|n| n + 1)
            .max()
            .unwrap_or(0);
        let id = (next..)
            .map(|n| format!("disk{n}"))
            .find(|id| def.disk(id).is_none())
            .unwrap_or_default();
        let dir = folder.join(def.uuid.to_string());
        let mut created = Vec::new();
        vm_folder(&dir, &mut created)?;
        let path = dir.join(format!("{id}.qcow2"));
        if path.exists() {
            return Err(VmError::DiskFileExists { path });
        }
        let made = async {
            vmrepl_qemu::img::QemuImg::default()
                .create(&path, size_bytes, &Default::default())
                .await?;
            created.push(path.clone());
            owner_only(&path)
        }
        .await;
        if let Err(e) = made {
            remove_created(&created);
            return Err(e);
        }
        def.disks.push(DiskDef {
            id: id.clone(),
            path: path.clone(),
            size_bytes,
        });
        let db = self.db();
        db.set_vm_definition(&def)?;
        // vmrepl's own change: the new file is what the next open expects.
        crate::fingerprint::after_close(&db, &def);
        let _ = db.event(
            Some(def.uuid),
            &format!("disk {id} added ({size_bytes} bytes, {})", path.display()),
        );
        Ok((id, path))
    }

    async fn create_files(
        &self,
        uuid: Uuid,
        c: &CreateVm,
        fw: &vmrepl_types::FirmwareVariant,
        created: &mut Vec<PathBuf>,
    ) -> Result<(Vec<DiskDef>, Option<PathBuf>), VmError> {
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
                        .await?;
                    created.push(path.clone());
                    owner_only(&path)?;
                    *size_bytes
                }
                DiskSpec::Import { source, .. } => {
                    vmrepl_qemu::img::QemuImg::default()
                        .convert(source, None, &path)
                        .await?;
                    created.push(path.clone());
                    owner_only(&path)?;
                    vmrepl_qemu::img::QemuImg::default()
                        .info(&path)
                        .await?
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
                crate::fsutil::copy_private(tpl, &p).map_err(|source| VmError::NvramTemplate {
                    path: tpl.clone(),
                    source,
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
pub(super) fn vm_folder(dir: &std::path::Path, created: &mut Vec<PathBuf>) -> Result<(), VmError> {
    if !dir.exists() {
        crate::fsutil::create_private_dir_all(dir).map_err(|source| VmError::StorageFolder {
            path: dir.to_path_buf(),
            source,
        })?;
        created.push(dir.to_path_buf());
    }
    Ok(())
}

/// Makes a VM file readable by its owner only (disk images hold the guest's data).
pub(super) fn owner_only(p: &std::path::Path) -> Result<(), VmError> {
    crate::fsutil::make_owner_only(p).map_err(|source| VmError::OwnerOnly {
        path: p.to_path_buf(),
        source,
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

/// Removes what a failed definition step created, newest first (a folder only once empty).
fn remove_created(created: &[PathBuf]) {
    for p in created.iter().rev() {
        let _ = if p.is_dir() {
            std::fs::remove_dir(p)
        } else {
            std::fs::remove_file(p)
        };
    }
}
