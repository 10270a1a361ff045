//! VM definition and supervision: create, start, shut down, stop, delete, reattach.
//!
//! Every VM the host runs is a QEMU child in its own process group, so it outlives a daemon
//! restart; at start the daemon reattaches through the VM's QMP socket. A watcher task per
//! running VM notices when QEMU goes away and records whether that was asked for (off) or
//! not (crashed).

use crate::config::HostConfig;
use crate::datadir::DataDir;
use crate::db::{Db, VmRow};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;
use vmrepl_qemu::process::QemuProcess;
use vmrepl_types::api::{ApiError, CreateVm, DiskSpec, ErrorCode, VmSummary};
use vmrepl_types::vm::FirmwareVariantId;
use vmrepl_types::{
    ConfigVersion, DirectKernel, DiskDef, Generation, HostInfo, NicDef, VmDefinition, VmName,
    VmRunState,
};

/// Most disks a VM may have.
pub const MAX_DISKS: usize = 16;

/// What `vm console` returns without `--tail`: the last 64 KiB of the serial log.
pub const CONSOLE_TAIL_DEFAULT: u64 = 64 << 10;
/// The most `vm console --tail` returns (16 MiB).
pub const CONSOLE_TAIL_MAX: u64 = 16 << 20;
/// A VM's `serial.log` is cut when it grows past this (8 MiB): its last 8 MiB move to
/// `serial.log.1` and `serial.log` starts again empty.
pub const SERIAL_LOG_MAX: u64 = 8 << 20;
/// How often a running VM's serial log size is checked.
const SERIAL_LOG_CHECK: Duration = Duration::from_secs(10);

/// The last `tail` bytes of the file `path` (empty if it does not exist), reading only those
/// bytes: the file may be large.
pub fn read_tail(path: &std::path::Path, tail: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = len.saturating_sub(tail);
    f.seek(SeekFrom::Start(start))?;
    let mut out = Vec::with_capacity((len - start) as usize);
    f.take(tail).read_to_end(&mut out)?;
    Ok(out)
}

/// `serial.log.1` beside `log`.
pub fn rotated_serial_log(log: &std::path::Path) -> PathBuf {
    let mut name = log.file_name().unwrap_or_default().to_os_string();
    name.push(".1");
    log.with_file_name(name)
}

/// Moves the last `keep` bytes of the serial log `log` to `serial.log.1` (replacing it) and
/// empties `log`, when `log` is longer than `over` bytes. QEMU opens the log with `append=on`,
/// so it goes on writing at the new end. Returns whether it rotated. Output the guest writes
/// between the copy and the truncation is lost.
pub fn rotate_serial_log(log: &std::path::Path, over: u64, keep: u64) -> std::io::Result<bool> {
    let len = match std::fs::metadata(log) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= over {
        return Ok(false);
    }
    let tail = read_tail(log, keep)?;
    crate::fsutil::write_atomic(&rotated_serial_log(log), &tail)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)?;
    Ok(true)
}

/// A running VM's live handles.
struct Live {
    pid: u32,
    proc: Arc<QemuProcess>,
    /// Set when the host asked QEMU to go away (shutdown/stop), so its exit is not a crash.
    expected_exit: Arc<std::sync::atomic::AtomicBool>,
}

/// The VM manager.
pub struct Vmm {
    dd: DataDir,
    cfg: HostConfig,
    caps: HostInfo,
    machines: vmrepl_qemu::caps::MachineTypes,
    accel: vmrepl_qemu::caps::ResolvedAccel,
    db: Arc<Mutex<Db>>,
    live: tokio::sync::Mutex<HashMap<Uuid, Live>>,
    /// Per-VM operation locks: start/stop/delete and replication cycles never overlap.
    ops: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

fn db_err(e: crate::db::DbError) -> ApiError {
    ApiError::new(ErrorCode::Internal, e.to_string())
}

impl Vmm {
    pub fn new(
        dd: DataDir,
        cfg: HostConfig,
        caps: HostInfo,
        machines: vmrepl_qemu::caps::MachineTypes,
        accel: vmrepl_qemu::caps::ResolvedAccel,
        db: Arc<Mutex<Db>>,
    ) -> Arc<Self> {
        Arc::new(Vmm {
            dd,
            cfg,
            caps,
            machines,
            accel,
            db,
            live: tokio::sync::Mutex::new(HashMap::new()),
            ops: Mutex::new(HashMap::new()),
        })
    }

    pub fn caps(&self) -> &HostInfo {
        &self.caps
    }

    /// The database, locked (see [`crate::locks::unpoisoned`] for the lock policy).
    fn db(&self) -> std::sync::MutexGuard<'_, crate::db::Db> {
        crate::locks::unpoisoned(&self.db)
    }

    /// Takes the VM's operation lock (held by lifecycle verbs and replication cycles).
    pub async fn op_lock(&self, uuid: Uuid) -> tokio::sync::OwnedMutexGuard<()> {
        let m = crate::locks::unpoisoned(&self.ops)
            .entry(uuid)
            .or_default()
            .clone();
        m.lock_owned().await
    }

    /// The definition of the VM with this UUID.
    pub fn definition(&self, uuid: Uuid) -> Option<VmDefinition> {
        self.db()
            .vm_by_uuid(uuid)
            .ok()
            .flatten()
            .map(|r| r.definition)
    }

    fn row(&self, name: &VmName) -> Result<VmRow, ApiError> {
        crate::locks::unpoisoned(&self.db)
            .vm_by_name(name.as_str())
            .map_err(db_err)?
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    format!("There is no VM named {name:?} on this host; `vmrepl vm list` shows the VMs here."),
                )
            })
    }

    fn summary(&self, r: VmRow) -> VmSummary {
        VmSummary {
            definition: r.definition,
            state: r.state,
            pid: r.pid,
            note: r.note,
            replication: None,
        }
    }

    /// Resolves a machine type request to a versioned name this host's QEMU runs.
    pub fn resolve_machine(&self, gen: Generation, req: Option<&str>) -> Result<String, ApiError> {
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
            return Err(ApiError::new(
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
            ));
        }
        // Either PC chipset runs either firmware; other boards (microvm, isapc) run neither.
        if !(resolved.starts_with("pc-i440fx") || resolved.starts_with("pc-q35")) {
            return Err(ApiError::new(
                ErrorCode::Unsupported,
                format!(
                    "Machine type {resolved} is not a PC machine type; use pc-i440fx-* or pc-q35-*"
                ),
            ));
        }
        Ok(resolved)
    }

    fn storage_folder(&self, folder: Option<&PathBuf>) -> Result<PathBuf, ApiError> {
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
                    Err(ApiError::new(
                        ErrorCode::InvalidInput,
                        format!(
                            "Folder {} is not one of this host's storage folders ({}); add it to `storage` in config.toml or pick one of those.",
                            f.display(),
                            self.cfg.storage.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                        ),
                    ))
                }
            }
        }
    }

    /// Defines a VM: validates everything first, then creates disks and NVRAM, then records it.
    /// On any failure, what was created is removed again.
    pub async fn create(&self, c: CreateVm) -> Result<VmSummary, ApiError> {
        let name = VmName::new(&c.name)
            .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))?;
        if self
            .db()
            .vm_by_name(name.as_str())
            .map_err(db_err)?
            .is_some()
        {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("A VM named {name:?} already exists on this host; pick another name or delete it first."),
            ));
        }
        if c.vcpus == 0 || c.vcpus > 64 {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!("{} vCPUs asked; use 1 to 64.", c.vcpus),
            ));
        }
        if c.memory_mib < 32 || c.memory_mib > 1 << 20 {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!("{} MiB of memory asked; use 32 MiB to 1 TiB.", c.memory_mib),
            ));
        }
        if c.disks.len() > MAX_DISKS {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!(
                    "{} disks asked; a VM has at most {MAX_DISKS}.",
                    c.disks.len()
                ),
            ));
        }
        if c.secure_boot && c.generation == Generation::Bios {
            return Err(ApiError::new(ErrorCode::InvalidInput, "Secure Boot needs a generation 2 (UEFI) VM; drop --secure-boot or use --generation 2."));
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
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                "Secure Boot needs the q35 machine type.",
            ));
        }
        let kernel = match (&c.kernel, &c.initrd, &c.cmdline) {
            (None, None, None) => None,
            (Some(k), initrd, cmdline) => {
                for p in std::iter::once(k).chain(initrd.iter()) {
                    if !p.is_file() {
                        return Err(ApiError::new(
                            ErrorCode::InvalidInput,
                            format!("Kernel boot file {} does not exist.", p.display()),
                        ));
                    }
                }
                Some(DirectKernel {
                    kernel: k.clone(),
                    initrd: initrd.clone(),
                    cmdline: cmdline.clone().unwrap_or_default(),
                })
            }
            _ => {
                return Err(ApiError::new(
                    ErrorCode::InvalidInput,
                    "--initrd and --cmdline need --kernel.",
                ))
            }
        };
        for spec in &c.disks {
            match spec {
                DiskSpec::New { size_bytes, folder } => {
                    self.storage_folder(folder.as_ref())?;
                    if *size_bytes < 1 << 20 || *size_bytes % 512 != 0 {
                        return Err(ApiError::new(ErrorCode::InvalidInput, format!("Disk size {size_bytes} bytes is not a multiple of 512 of at least 1 MiB.")));
                    }
                }
                DiskSpec::Import { source, folder } => {
                    self.storage_folder(folder.as_ref())?;
                    if !source.is_file() {
                        return Err(ApiError::new(
                            ErrorCode::InvalidInput,
                            format!("Image to import {} does not exist.", source.display()),
                        ));
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
    ) -> Result<(Vec<DiskDef>, Option<PathBuf>), ApiError> {
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

    pub fn list(&self) -> Result<Vec<VmSummary>, ApiError> {
        let rows = self.db().list_vms().map_err(db_err)?;
        Ok(rows.into_iter().map(|r| self.summary(r)).collect())
    }

    pub fn show(&self, name: &VmName) -> Result<VmSummary, ApiError> {
        Ok(self.summary(self.row(name)?))
    }

    fn set_state(&self, uuid: Uuid, st: VmRunState, pid: Option<u32>, note: Option<&str>) {
        let db = self.db();
        if let Err(e) = db.set_state(uuid, st, pid, note) {
            tracing::error!(target: "vmrepl::vmm", "cannot record state of {uuid}: {e}");
        }
        let _ = db.event(
            Some(uuid),
            &format!(
                "state {st}{}",
                note.map(|n| format!(": {n}")).unwrap_or_default()
            ),
        );
    }

    fn run_paths(&self, uuid: Uuid) -> vmrepl_qemu::cmdline::RunPaths {
        vmrepl_qemu::cmdline::RunPaths::in_dir(&self.dd.run_dir(uuid))
    }

    /// Starts a VM.
    pub async fn start(self: &Arc<Self>, name: &VmName) -> Result<VmSummary, ApiError> {
        let uuid = self.row(name)?.definition.uuid;
        let _op = self.op_lock(uuid).await;
        let row = self.row(name)?;
        let def = row.definition.clone();
        match row.state {
            VmRunState::Off | VmRunState::Crashed => {}
            VmRunState::LockedForFailover => {
                return Err(ApiError::new(
                    ErrorCode::WrongState,
                    format!("VM {name} is locked: it was prepared for a planned failover and now runs on the replica. Cancel the failover, or fail back, to run it here."),
                ))
            }
            s => {
                return Err(ApiError::new(ErrorCode::WrongState, format!("VM {name} is {s}; it can only be started when it is off.")))
            }
        }
        if let Some(i) = self.caps.can_run(&def).first() {
            return Err(ApiError::new(ErrorCode::Unsupported, i.to_string()));
        }
        let fw = self
            .caps
            .firmware(def.firmware)
            .cloned()
            .expect("checked by can_run");
        let run_dir = self.dd.run_dir(def.uuid);
        crate::fsutil::create_private_dir_all(&run_dir).map_err(|e| {
            ApiError::new(
                ErrorCode::Io,
                format!("Cannot create the run folder {}: {e}", run_dir.display()),
            )
        })?;
        let paths = self.run_paths(def.uuid);
        // The previous run's log (at most its last SERIAL_LOG_MAX bytes) becomes serial.log.1.
        if let Err(e) = rotate_serial_log(&paths.serial_log, 0, SERIAL_LOG_MAX) {
            tracing::warn!(target: "vmrepl::vmm", path = %paths.serial_log.display(), "cannot rotate the serial log: {e}");
            let _ = std::fs::remove_file(&paths.serial_log);
        }
        let cmd = vmrepl_qemu::cmdline::build_command(&def, &fw, &paths, self.accel)
            .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))?;
        self.set_state(def.uuid, VmRunState::Starting, None, None);
        let opts =
            vmrepl_qemu::process::SpawnOptions::new(run_dir.join("qemu.stderr"), &paths.qmp_sock);
        let proc = match QemuProcess::spawn(&self.cfg.qemu_binary, &cmd.argv, &opts).await {
            Ok(p) => Arc::new(p),
            Err(e) => {
                self.set_state(def.uuid, VmRunState::Off, None, Some("start failed"));
                return Err(ApiError::new(
                    ErrorCode::Qemu,
                    format!("QEMU did not start VM {name}: {e}"),
                ));
            }
        };
        for step in &cmd.startup {
            if let Err(e) = proc
                .qmp()
                .execute(&step.execute, step.arguments.clone())
                .await
            {
                proc.kill();
                self.set_state(def.uuid, VmRunState::Off, None, Some("start failed"));
                return Err(ApiError::new(
                    ErrorCode::Qemu,
                    format!(
                        "QEMU for VM {name} refused start-up step {}: {e}",
                        step.execute
                    ),
                ));
            }
        }
        let pid = proc.pid() as u32;
        self.set_state(def.uuid, VmRunState::Running, Some(pid), None);
        self.watch(def.uuid, proc).await;
        self.show(name)
    }

    async fn watch(self: &Arc<Self>, uuid: Uuid, proc: Arc<QemuProcess>) {
        let pid = proc.pid() as u32;
        let expected = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.live.lock().await.insert(
            uuid,
            Live {
                pid,
                proc: proc.clone(),
                expected_exit: expected.clone(),
            },
        );
        let me = self.clone();
        let serial_log = self.run_paths(uuid).serial_log;
        tokio::spawn(async move {
            let mut events = proc.qmp().subscribe();
            let mut guest_shutdown = false;
            let mut check_log = tokio::time::interval(SERIAL_LOG_CHECK);
            check_log.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = check_log.tick() => {
                        match rotate_serial_log(&serial_log, SERIAL_LOG_MAX, SERIAL_LOG_MAX) {
                            Ok(true) => tracing::info!(target: "vmrepl::vmm", %uuid, "serial log over {SERIAL_LOG_MAX} bytes: moved its tail to serial.log.1"),
                            Ok(false) => {}
                            Err(e) => tracing::warn!(target: "vmrepl::vmm", %uuid, "cannot rotate the serial log: {e}"),
                        }
                    }
                    ev = events.recv() => match ev {
                        Ok(ev) if ev.event == "SHUTDOWN" => { guest_shutdown = true; }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => break,
                    },
                    _ = proc.qmp().closed() => break,
                }
            }
            // QMP is gone; wait for the process itself to go.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while vmrepl_qemu::process::is_alive(pid as i32) && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let asked = expected.load(std::sync::atomic::Ordering::SeqCst);
            if asked || guest_shutdown {
                me.set_state(uuid, VmRunState::Off, None, None);
            } else {
                tracing::warn!(target: "vmrepl::vmm", %uuid, pid, "QEMU exited unexpectedly");
                me.set_state(
                    uuid,
                    VmRunState::Crashed,
                    None,
                    Some(&format!("QEMU (pid {pid}) exited without being asked to")),
                );
            }
            me.live.lock().await.remove(&uuid);
        });
    }

    /// Reattaches to QEMU processes that outlived a daemon restart.
    pub async fn reattach_all(self: &Arc<Self>) {
        let rows = match self.db().list_vms() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(target: "vmrepl::vmm", "cannot list VMs: {e}");
                return;
            }
        };
        for r in rows {
            let uuid = r.definition.uuid;
            let active = matches!(
                r.state,
                VmRunState::Running
                    | VmRunState::Paused
                    | VmRunState::Starting
                    | VmRunState::ShuttingDown
            );
            if !active {
                continue;
            }
            let paths = self.run_paths(uuid);
            let attached = match r.pid {
                Some(pid) if vmrepl_qemu::process::is_alive(pid as i32) => {
                    match QemuProcess::attach(pid as i32, &paths.qmp_sock, Duration::from_secs(5))
                        .await
                    {
                        Ok(p) => Some(Arc::new(p)),
                        Err(e) => {
                            tracing::warn!(target: "vmrepl::vmm", %uuid, "QEMU pid {pid} is alive but cannot be reattached: {e}");
                            None
                        }
                    }
                }
                _ => None,
            };
            match attached {
                Some(p) => {
                    tracing::info!(target: "vmrepl::vmm", %uuid, pid = p.pid(), "reattached to running VM");
                    self.set_state(uuid, VmRunState::Running, Some(p.pid() as u32), None);
                    self.watch(uuid, p).await;
                }
                None => self.set_state(
                    uuid,
                    VmRunState::Crashed,
                    None,
                    Some("QEMU exited while the daemon was not running"),
                ),
            }
        }
    }

    /// The live QEMU of a running VM.
    pub async fn live_process(&self, uuid: Uuid) -> Option<Arc<QemuProcess>> {
        self.live.lock().await.get(&uuid).map(|l| l.proc.clone())
    }

    async fn live_handle(
        &self,
        uuid: Uuid,
    ) -> Option<(u32, Arc<QemuProcess>, Arc<std::sync::atomic::AtomicBool>)> {
        self.live
            .lock()
            .await
            .get(&uuid)
            .map(|l| (l.pid, l.proc.clone(), l.expected_exit.clone()))
    }

    /// Waits until the VM's QEMU is gone and recorded, up to `timeout`.
    async fn wait_gone(&self, uuid: Uuid, pid: u32, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let gone = !self.live.lock().await.contains_key(&uuid)
                && !vmrepl_qemu::process::is_alive(pid as i32);
            if gone {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// ACPI shutdown, waiting up to `timeout`; hard stop afterwards if `force`.
    pub async fn shutdown(
        &self,
        name: &VmName,
        timeout: Duration,
        force: bool,
    ) -> Result<VmSummary, ApiError> {
        let row = self.row(name)?;
        let uuid = row.definition.uuid;
        let _op = self.op_lock(uuid).await;
        let Some((pid, proc, expected)) = self.live_handle(uuid).await else {
            return Err(ApiError::new(
                ErrorCode::WrongState,
                format!(
                    "VM {name} is {}; only a running VM can be shut down.",
                    row.state
                ),
            ));
        };
        expected.store(true, std::sync::atomic::Ordering::SeqCst);
        self.set_state(uuid, VmRunState::ShuttingDown, Some(pid), None);
        if let Err(e) = proc
            .qmp()
            .execute("system_powerdown", serde_json::json!({}))
            .await
        {
            tracing::warn!(target: "vmrepl::vmm", "system_powerdown failed: {e}");
        }
        if self.wait_gone(uuid, pid, timeout).await {
            return self.show(name);
        }
        if force {
            let _ = proc.quit(Duration::from_secs(10)).await;
            if !self.wait_gone(uuid, pid, Duration::from_secs(10)).await {
                proc.kill();
                self.wait_gone(uuid, pid, Duration::from_secs(10)).await;
            }
            return self.show(name);
        }
        expected.store(false, std::sync::atomic::Ordering::SeqCst);
        self.set_state(
            uuid,
            VmRunState::Running,
            Some(pid),
            Some("guest ignored the shutdown request"),
        );
        Err(ApiError::new(
            ErrorCode::WrongState,
            format!("VM {name} did not shut down within {} s (the guest may not handle the ACPI power button). Retry with a longer --timeout, or add --force to stop it hard.", timeout.as_secs()),
        ))
    }

    /// Hard stop: QEMU quits at once (disk caches and bitmaps are still flushed by QEMU).
    pub async fn stop(&self, name: &VmName) -> Result<VmSummary, ApiError> {
        let row = self.row(name)?;
        let uuid = row.definition.uuid;
        let _op = self.op_lock(uuid).await;
        let Some((pid, proc, expected)) = self.live_handle(uuid).await else {
            return Err(ApiError::new(
                ErrorCode::WrongState,
                format!("VM {name} is {}; it is not running.", row.state),
            ));
        };
        expected.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = proc.quit(Duration::from_secs(15)).await;
        if !self.wait_gone(uuid, pid, Duration::from_secs(15)).await {
            proc.kill();
            self.wait_gone(uuid, pid, Duration::from_secs(10)).await;
        }
        self.show(name)
    }

    /// Deletes a VM that is off.
    pub async fn delete(&self, name: &VmName, keep_disks: bool) -> Result<String, ApiError> {
        let _op = self.op_lock(self.row(name)?.definition.uuid).await;
        let row = self.row(name)?;
        let def = &row.definition;
        if !row.state.is_stopped() {
            return Err(ApiError::new(
                ErrorCode::WrongState,
                format!("VM {name} is {}; shut it down or stop it first.", row.state),
            ));
        }
        if !keep_disks {
            for d in &def.disks {
                if d.path.exists() {
                    std::fs::remove_file(&d.path).map_err(|e| {
                        ApiError::new(
                            ErrorCode::Io,
                            format!("Cannot delete disk {}: {e}", d.path.display()),
                        )
                    })?;
                }
                if let Some(parent) = d.path.parent() {
                    let _ = std::fs::remove_dir(parent);
                }
            }
            if let Some(n) = &def.nvram {
                let _ = std::fs::remove_file(n);
                if let Some(parent) = n.parent() {
                    let _ = std::fs::remove_dir(parent);
                }
            }
            for p in own_boot_files(def) {
                let _ = std::fs::remove_file(&p);
                if let Some(parent) = p.parent() {
                    let _ = std::fs::remove_dir(parent);
                }
            }
        }
        let _ = std::fs::remove_dir_all(self.dd.run_dir(def.uuid));
        let db = self.db();
        db.delete_vm(def.uuid).map_err(db_err)?;
        let _ = db.event(Some(def.uuid), &format!("VM {name} deleted"));
        Ok(if keep_disks {
            format!(
                "VM {name} deleted; its disks were kept: {}",
                def.disks
                    .iter()
                    .map(|d| d.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            format!("VM {name} and its disks deleted")
        })
    }

    /// The first storage folder (where a failed-over or test VM's disks go).
    pub fn default_storage(&self) -> &std::path::Path {
        &self.cfg.storage[0]
    }

    /// Records a VM whose disks already exist (a failover or test failover builds them), off.
    /// Refuses a name or UUID that is taken.
    pub fn register(&self, def: &VmDefinition) -> Result<(), ApiError> {
        let db = self.db();
        if db.vm_by_name(def.name.as_str()).map_err(db_err)?.is_some() {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("A VM named {:?} already exists on this host; rename or delete it first (nothing was changed).", def.name.as_str()),
            ));
        }
        if db.vm_by_uuid(def.uuid).map_err(db_err)?.is_some() {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "VM {} already exists on this host (nothing was changed).",
                    def.uuid
                ),
            ));
        }
        db.insert_vm(def).map_err(db_err)?;
        let _ = db.event(Some(def.uuid), &format!("VM {} registered", def.name));
        Ok(())
    }

    /// Locks a VM that is off against starting (planned failover prepare), or unlocks it.
    /// Takes the operation lock, so no start can slip in between the check and the lock.
    pub async fn set_failover_lock(&self, uuid: Uuid, locked: bool) -> Result<(), ApiError> {
        let _op = self.op_lock(uuid).await;
        let row = self
            .db()
            .vm_by_uuid(uuid)
            .map_err(db_err)?
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("VM {uuid} is gone.")))?;
        let ok = if locked {
            row.state.is_stopped()
        } else {
            matches!(row.state, VmRunState::LockedForFailover | VmRunState::Off)
        };
        if !ok {
            return Err(ApiError::new(
                ErrorCode::WrongState,
                format!(
                    "VM {} is {}; a planned failover needs it shut down (`vmrepl vm shutdown {}`), so that no write is lost.",
                    row.definition.name, row.state, row.definition.name
                ),
            ));
        }
        let st = if locked {
            VmRunState::LockedForFailover
        } else {
            VmRunState::Off
        };
        self.set_state(uuid, st, None, None);
        Ok(())
    }

    /// The last `tail` bytes of the serial console log of the current run (default
    /// [`CONSOLE_TAIL_DEFAULT`], at most [`CONSOLE_TAIL_MAX`]). Only those bytes are read.
    pub fn console(&self, name: &VmName, tail: Option<u64>) -> Result<String, ApiError> {
        let tail = tail.unwrap_or(CONSOLE_TAIL_DEFAULT);
        if tail > CONSOLE_TAIL_MAX {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!("--tail {tail} is more than the limit of {CONSOLE_TAIL_MAX} bytes (16 MiB); ask for less (older output is in serial.log.1 in the VM's run folder)."),
            ));
        }
        let row = self.row(name)?;
        let p = self.run_paths(row.definition.uuid).serial_log;
        let data = read_tail(&p, tail).map_err(|e| {
            ApiError::new(
                ErrorCode::Io,
                format!("Cannot read the serial log {}: {e}", p.display()),
            )
        })?;
        Ok(String::from_utf8_lossy(&data).into_owned())
    }
}

/// Creates a VM's folder in a storage folder unless it exists, recording it for the clean-up
/// of a failed create.
fn vm_folder(dir: &std::path::Path, created: &mut Vec<PathBuf>) -> Result<(), ApiError> {
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
fn owner_only(p: &std::path::Path) -> Result<(), ApiError> {
    crate::fsutil::make_owner_only(p).map_err(|e| {
        ApiError::new(
            ErrorCode::Io,
            format!("Cannot make {} owner-only (mode 0600): {e}", p.display()),
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_big_serial_log_gives_only_its_tail() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("serial.log");
        let mut data = vec![b'a'; 3 << 20];
        data.extend_from_slice(b"the end\n");
        std::fs::write(&log, &data).unwrap();
        assert_eq!(read_tail(&log, 8).unwrap(), b"the end\n");
        let tail = read_tail(&log, CONSOLE_TAIL_DEFAULT).unwrap();
        assert_eq!(tail.len() as u64, CONSOLE_TAIL_DEFAULT);
        assert!(tail.ends_with(b"the end\n"));
        // Asking for more than there is gives the whole file; a missing log is empty.
        assert_eq!(read_tail(&log, 1 << 30).unwrap(), data);
        assert!(read_tail(&t.path().join("none"), 10).unwrap().is_empty());
    }

    #[test]
    fn a_serial_log_over_the_limit_moves_its_tail_to_serial_log_1_and_starts_again() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("serial.log");
        std::fs::write(&log, b"0123456789").unwrap();
        assert!(
            !rotate_serial_log(&log, 10, 4).unwrap(),
            "not over the limit"
        );
        assert_eq!(std::fs::read(&log).unwrap(), b"0123456789");
        std::fs::write(&log, b"0123456789ab").unwrap();
        assert!(rotate_serial_log(&log, 10, 4).unwrap());
        let old = rotated_serial_log(&log);
        assert_eq!(old, t.path().join("serial.log.1"));
        assert_eq!(std::fs::read(&old).unwrap(), b"89ab");
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&old).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A writer that appends goes on at the new end, with no hole before it.
        let mut w = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut w, b"more").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"more");
        // No log, nothing to do.
        assert!(!rotate_serial_log(&t.path().join("none"), 0, 4).unwrap());
    }
}
