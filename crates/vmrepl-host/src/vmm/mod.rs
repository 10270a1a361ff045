//! VM definition and supervision: create, start, shut down, stop, delete, reattach.
//!
//! Every VM the host runs is a QEMU child in its own process group, so it outlives a daemon
//! restart; at start the daemon reattaches through the VM's QMP socket. A watcher task per
//! running VM notices when QEMU goes away and records whether that was asked for (off) or
//! not (crashed).

use crate::config::HostConfig;
use crate::datadir::DataDir;
use crate::db::{Db, VmRow};
use crate::error::HostError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;
use vmrepl_qemu::process::QemuProcess;
use vmrepl_types::api::VmSummary;
use vmrepl_types::{HostInfo, VmDefinition, VmName, VmRunState};

/// Most disks a VM may have.
pub const MAX_DISKS: usize = 16;

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
    /// The VM named `name` under its operation lock, when it is off (Err otherwise): what
    /// changes to its files start from.
    async fn stopped(
        &self,
        name: &VmName,
    ) -> Result<(tokio::sync::OwnedMutexGuard<()>, VmRow), VmError> {
        let op = self.op_lock(self.row(name)?.definition.uuid).await;
        let row = self.row(name)?;
        if !row.state.is_stopped() {
            return Err(VmError::Running {
                name: name.clone(),
                state: row.state,
            });
        }
        Ok((op, row))
    }

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

    /// The VM named `name`, or whose UUID it is (every VM command takes either).
    fn row(&self, name: &VmName) -> Result<VmRow, VmError> {
        let db = self.db();
        let by_uuid = || match name.as_str().parse::<Uuid>() {
            Ok(u) => db.vm_by_uuid(u),
            Err(_) => Ok(None),
        };
        match db.vm_by_name(name.as_str())? {
            Some(r) => Ok(r),
            None => by_uuid()?.ok_or_else(|| VmError::NoSuchVm { name: name.clone() }),
        }
    }

    fn summary(&self, r: VmRow) -> VmSummary {
        VmSummary {
            definition: r.definition,
            state: r.state,
            pid: r.pid,
            note: r.note,
            replication: None,
            kept_replica: false,
        }
    }

    pub fn list(&self) -> Result<Vec<VmSummary>, VmError> {
        let rows = self.db().list_vms()?;
        Ok(rows.into_iter().map(|r| self.summary(r)).collect())
    }

    pub fn show(&self, name: &VmName) -> Result<VmSummary, VmError> {
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
    pub async fn start(self: &Arc<Self>, name: &VmName) -> Result<VmSummary, VmError> {
        let uuid = self.row(name)?.definition.uuid;
        let _op = self.op_lock(uuid).await;
        let row = self.row(name)?;
        let def = row.definition.clone();
        match row.state {
            VmRunState::Off | VmRunState::Crashed => {}
            VmRunState::LockedForFailover => {
                return Err(VmError::LockedForFailover { name: name.clone() })
            }
            state => {
                return Err(VmError::NotOff {
                    name: name.clone(),
                    state,
                })
            }
        }
        if let Some(i) = self.caps.can_run(&def).into_iter().next() {
            return Err(VmError::Incompatible(i));
        }
        let fw = self
            .caps
            .firmware_for(def.firmware, &def.machine_type)
            .cloned()
            .expect("checked by can_run");
        let run_dir = self.dd.run_dir(def.uuid);
        crate::fsutil::create_private_dir_all(&run_dir).map_err(|source| VmError::RunFolder {
            path: run_dir.clone(),
            source,
        })?;
        let paths = self.run_paths(def.uuid);
        // The previous run's log (at most its last SERIAL_LOG_MAX bytes) becomes serial.log.1.
        if let Err(e) = rotate_serial_log(&paths.serial_log, 0, SERIAL_LOG_MAX) {
            tracing::warn!(target: "vmrepl::vmm", path = %paths.serial_log.display(), "cannot rotate the serial log: {e}");
            let _ = std::fs::remove_file(&paths.serial_log);
        }
        let cmd = vmrepl_qemu::cmdline::build_command(&def, &fw, &paths, self.accel)?;
        // A disk changed while the VM was off, outside vmrepl, is caught before QEMU opens it
        // (the relationship then requires a resynchronization); QEMU owns the files from here.
        if let Err(e) = crate::fingerprint::before_open(&self.db(), &def) {
            tracing::error!(target: "vmrepl::vmm", uuid = %def.uuid, "cannot compare the disk files with their fingerprints: {e}");
        }
        self.set_state(def.uuid, VmRunState::Starting, None, None);
        let opts =
            vmrepl_qemu::process::SpawnOptions::new(run_dir.join("qemu.stderr"), &paths.qmp_sock);
        let proc = match QemuProcess::spawn(&self.cfg.qemu_binary, &cmd.argv, &opts).await {
            Ok(p) => Arc::new(p),
            Err(source) => {
                // QEMU never held the files: they are as they were checked.
                crate::fingerprint::after_close(&self.db(), &def);
                self.set_state(def.uuid, VmRunState::Off, None, Some("start failed"));
                return Err(VmError::Start {
                    name: name.clone(),
                    source: Box::new(source),
                });
            }
        };
        for step in &cmd.startup {
            if let Err(source) = proc
                .qmp()
                .execute(&step.execute, step.arguments.clone())
                .await
            {
                proc.kill();
                // It goes unwatched: once it is gone, what it left is what the next open
                // compares with (a bitmap it left in use tells the next cycle by itself).
                let pid = proc.pid();
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while vmrepl_qemu::process::is_alive(pid) && std::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if !vmrepl_qemu::process::is_alive(pid) {
                    crate::fingerprint::after_close(&self.db(), &def);
                }
                self.set_state(def.uuid, VmRunState::Off, None, Some("start failed"));
                return Err(VmError::StartupStep {
                    name: name.clone(),
                    step: step.execute.clone(),
                    source: Box::new(source),
                });
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
            // QEMU closed the disk files: what they look like now is what the next open
            // compares with (a crash is caught by the bitmaps' in-use flag meanwhile).
            if !vmrepl_qemu::process::is_alive(pid as i32) {
                if let Some(def) = me.definition(uuid) {
                    crate::fingerprint::after_close(&me.db(), &def);
                }
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
                None => {
                    // Nobody recorded the disk files as QEMU left them, and they may have
                    // been changed since: a relationship that relies on tracking resyncs.
                    if let Err(e) = crate::fingerprint::exited_unobserved(&self.db(), &r.definition)
                    {
                        tracing::error!(target: "vmrepl::vmm", %uuid, "cannot record that the disks are unknown: {e}");
                    }
                    self.set_state(
                        uuid,
                        VmRunState::Crashed,
                        None,
                        Some("QEMU exited while the daemon was not running"),
                    )
                }
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
    ) -> Result<VmSummary, VmError> {
        let row = self.row(name)?;
        let uuid = row.definition.uuid;
        let _op = self.op_lock(uuid).await;
        let Some((pid, proc, expected)) = self.live_handle(uuid).await else {
            return Err(VmError::NotRunningToShutDown {
                name: name.clone(),
                state: row.state,
            });
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
        Err(VmError::ShutdownTimedOut {
            name: name.clone(),
            secs: timeout.as_secs(),
        })
    }

    /// Hard stop: QEMU quits at once (disk caches and bitmaps are still flushed by QEMU).
    pub async fn stop(&self, name: &VmName) -> Result<VmSummary, VmError> {
        let row = self.row(name)?;
        let uuid = row.definition.uuid;
        let _op = self.op_lock(uuid).await;
        let Some((pid, proc, expected)) = self.live_handle(uuid).await else {
            return Err(VmError::NotRunning {
                name: name.clone(),
                state: row.state,
            });
        };
        expected.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = proc.quit(Duration::from_secs(15)).await;
        if !self.wait_gone(uuid, pid, Duration::from_secs(15)).await {
            proc.kill();
            self.wait_gone(uuid, pid, Duration::from_secs(10)).await;
        }
        self.show(name)
    }

    /// Changes the vCPUs and memory of a VM (Set-VM): in force from its next start; a
    /// replicated VM's replica is told with the next cycle. Says what changed.
    pub fn set(
        &self,
        name: &VmName,
        vcpus: Option<u32>,
        memory_mib: Option<u64>,
    ) -> Result<String, VmError> {
        let row = self.row(name)?;
        let mut def = row.definition.clone();
        if let Some(v) = vcpus {
            if v == 0 || v > 64 {
                return Err(VmError::Vcpus { vcpus: v });
            }
            def.vcpus = v;
        }
        if let Some(m) = memory_mib {
            if !(32..=1 << 20).contains(&m) {
                return Err(VmError::Memory { mib: m });
            }
            def.memory_mib = m;
        }
        if def == row.definition {
            return Ok(format!(
                "Nothing to change for VM {name}: {} vCPUs, {} MiB.",
                def.vcpus, def.memory_mib
            ));
        }
        let db = self.db();
        db.set_vm_definition(&def)?;
        let said = format!("{} vCPUs, {} MiB of memory", def.vcpus, def.memory_mib);
        let _ = db.event(Some(def.uuid), &format!("VM set to {said}"));
        let when = if row.state == VmRunState::Off {
            "from its next start"
        } else {
            "from its next start (it runs now with the old values)"
        };
        Ok(format!("VM {name} now has {said}, {when}."))
    }

    /// Grows disk `disk` of a VM to `size` bytes (Resize-VHD), off or running. A replicated
    /// VM's replica grows its copy with the next cycle; its change-tracking bitmaps grow with
    /// the disk, so no resynchronization follows. Off: `qemu-img resize`, and vmrepl records
    /// the file it resized as its own change. Running: QMP `block_resize` on the disk's format
    /// node ([`vmrepl_tracking::grow_node`]), under the VM's operation lock, so it falls
    /// between two replication cycles: a point frozen before it is of the old size, one
    /// frozen after it of the new size, and each log says the size of its own point.
    pub async fn resize_disk(
        &self,
        name: &VmName,
        disk: &str,
        size: u64,
    ) -> Result<String, VmError> {
        let _op = self.op_lock(self.row(name)?.definition.uuid).await;
        let row = self.row(name)?;
        let mut def = row.definition.clone();
        let Some(d) = def.disks.iter_mut().find(|d| d.id == disk) else {
            return Err(VmError::NoSuchDisk {
                vm: name.to_string(),
                disk: disk.to_string(),
                disks: row
                    .definition
                    .disks
                    .iter()
                    .map(|d| d.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        if size < d.size_bytes || !size.is_multiple_of(512) {
            return Err(VmError::Shrink {
                disk: disk.to_string(),
                size,
                now: d.size_bytes,
            });
        }
        if size == d.size_bytes {
            return Ok(format!("Disk {disk} of {name} is {size} bytes already."));
        }
        if !row.state.is_stopped() {
            let live = match row.state {
                VmRunState::Running | VmRunState::Paused => self.live_process(def.uuid).await,
                _ => None,
            };
            let Some(proc) = live else {
                return Err(VmError::ResizeWhile {
                    name: name.clone(),
                    state: row.state,
                });
            };
            // The disk file stays open in QEMU: the fingerprint vmrepl compares at the next
            // open is taken when QEMU closes it, at the new size.
            let grown = vmrepl_tracking::grow_node(proc.qmp(), disk, size)
                .await
                .map_err(|source| VmError::GrowOnline {
                    name: name.clone(),
                    disk: disk.to_string(),
                    size,
                    source: Box::new(source),
                })?;
            d.size_bytes = size;
            let db = self.db();
            db.set_vm_definition(&def)
                .map_err(|source| VmError::GrownNotRecorded {
                    name: name.clone(),
                    disk: disk.to_string(),
                    size,
                    source: Box::new(source),
                })?;
            let _ = db.event(
                Some(def.uuid),
                &format!(
                    "disk {disk} grown to {size} bytes while the VM ran (from {} bytes; {} dirty bitmap(s) kept)",
                    grown.from,
                    grown.bitmaps.len()
                ),
            );
            return Ok(format!(
                "Disk {disk} of {name} is now {} MiB, grown while it runs; the guest is told at once (a virtio-blk capacity change: Linux sees it in /sys/block/vdX/size, then grow the partition and file system in the guest), and its replica grows with the next cycle.",
                size >> 20
            ));
        }
        // A change made behind vmrepl's back is caught first, as at any open.
        crate::fingerprint::before_open(&self.db(), &row.definition)?;
        let path = d.path.clone();
        let resized = vmrepl_qemu::img::QemuImg::default()
            .resize(&path, size)
            .await;
        let db = self.db();
        if let Err(e) = resized {
            // The file as vmrepl leaves it.
            crate::fingerprint::after_close(&db, &row.definition);
            return Err(e.into());
        }
        d.size_bytes = size;
        db.set_vm_definition(&def)?;
        // vmrepl's own change: the grown file is what the next open expects.
        crate::fingerprint::after_close(&db, &def);
        let _ = db.event(
            Some(def.uuid),
            &format!("disk {disk} grown to {size} bytes"),
        );
        Ok(format!(
            "Disk {disk} of {name} is now {} MiB; the guest sees it at its next start, and its replica grows with the next cycle.",
            size >> 20
        ))
    }

    /// Takes the disk files of a VM that is off as they are now (see
    /// [`crate::fingerprint::trust`]): the admin says that whatever changed them kept the
    /// persistent dirty bitmaps, so no resynchronization is needed for it.
    pub async fn trust_disks(&self, name: &VmName) -> Result<String, VmError> {
        let (_op, row) = self.stopped(name).await?;
        crate::fingerprint::trust(&self.db(), &row.definition);
        Ok(format!(
            "The disks of {name} are taken as they are now: changes made to them while it was off are left to its change-tracking bitmaps, with no resynchronization.\n"
        ))
    }

    /// Deletes a VM that is off.
    pub async fn delete(&self, name: &VmName, keep_disks: bool) -> Result<String, VmError> {
        let (_op, row) = self.stopped(name).await?;
        let def = &row.definition;
        if !keep_disks {
            for d in &def.disks {
                if d.path.exists() {
                    std::fs::remove_file(&d.path).map_err(|source| VmError::DeleteDisk {
                        path: d.path.clone(),
                        source,
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
        db.delete_vm(def.uuid)?;
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
    ///
    /// Returns a [`HostError`] (a [`HostError::Vm`]) because the failover flows chain it with
    /// their own steps; the error inside is a [`VmError`].
    pub fn register(&self, def: &VmDefinition) -> Result<(), HostError> {
        Ok(self.insert_built(def)?)
    }

    fn insert_built(&self, def: &VmDefinition) -> Result<(), VmError> {
        let db = self.db();
        if db.vm_by_name(def.name.as_str())?.is_some() {
            return Err(VmError::NameTaken {
                name: def.name.as_str().to_string(),
            });
        }
        if db.vm_by_uuid(def.uuid)?.is_some() {
            return Err(VmError::UuidTaken { uuid: def.uuid });
        }
        db.insert_vm(def)?;
        let _ = db.event(Some(def.uuid), &format!("VM {} registered", def.name));
        Ok(())
    }

    /// Locks a VM that is off against starting (planned failover prepare), or unlocks it.
    /// Takes the operation lock, so no start can slip in between the check and the lock.
    pub async fn set_failover_lock(&self, uuid: Uuid, locked: bool) -> Result<(), VmError> {
        let _op = self.op_lock(uuid).await;
        let row = self.db().vm_by_uuid(uuid)?.ok_or(VmError::Gone { uuid })?;
        let ok = if locked {
            row.state.is_stopped()
        } else {
            matches!(row.state, VmRunState::LockedForFailover | VmRunState::Off)
        };
        if !ok {
            return Err(VmError::NotShutDownForFailover {
                name: row.definition.name,
                state: row.state,
            });
        }
        let st = if locked {
            VmRunState::LockedForFailover
        } else {
            VmRunState::Off
        };
        self.set_state(uuid, st, None, None);
        Ok(())
    }
}

mod console;
mod define;
mod error;

pub(crate) use console::*;
pub(crate) use define::*;
pub use error::VmError;
