//! QEMU processes: spawn, reattach after a daemon restart, detect exit.
//!
//! QEMU is started as a child in its own process group (`process_group(0)`), so a signal to
//! the daemon's group (Ctrl-C, a restart) does not reach it and it outlives the daemon. Its
//! stdout and stderr go to a log file in the VM's run folder; when it fails to start, the
//! error carries that text (QEMU's own message). A spawned child is reaped by a background
//! task so that it never lingers as a zombie; after a daemon restart QEMU has been reparented
//! and `init` reaps it.

use crate::qmp::{QmpClient, QmpError};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Process-layer failures.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(
        "could not create QEMU's log file {path}: {source}; check the run folder's permissions"
    )]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not start {binary}: {source}; check that QEMU is installed")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU exited during start-up ({status}): {stderr}")]
    StartFailed { status: String, stderr: String },
    #[error("QEMU (pid {pid}) started but its QMP socket did not answer: {source}; QEMU's log says: {stderr}")]
    NoQmp {
        pid: i32,
        #[source]
        source: QmpError,
        stderr: String,
    },
    #[error("process {pid} is not running; the VM is off or crashed")]
    NotRunning { pid: i32 },
    #[error("process {pid} is not the QEMU serving {qmp_sock} (its command line does not name that socket); the pid was probably reused, treat the VM as crashed")]
    NotOurQemu { pid: i32, qmp_sock: PathBuf },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("QEMU (pid {pid}) did not exit within {secs} s")]
    ExitTimeout { pid: i32, secs: u64 },
    #[error("QEMU (pid {pid}) did not become ready within {secs} s (no {what}); it may be stuck")]
    NotReady { pid: i32, what: String, secs: u64 },
}

/// How to spawn QEMU.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// QEMU's stdout+stderr go here (truncated at start).
    pub stderr_log: PathBuf,
    /// The `-qmp unix:` path in argv.
    pub qmp_sock: PathBuf,
    /// How long QEMU may take to open its QMP socket.
    pub start_timeout: Duration,
    /// Put QEMU in its own process group (true for VMs; it then survives the daemon).
    pub own_process_group: bool,
}

impl SpawnOptions {
    pub fn new(stderr_log: impl Into<PathBuf>, qmp_sock: impl Into<PathBuf>) -> SpawnOptions {
        SpawnOptions {
            stderr_log: stderr_log.into(),
            qmp_sock: qmp_sock.into(),
            start_timeout: Duration::from_secs(30),
            own_process_group: true,
        }
    }
}

/// How the process ended, when we saw it end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitInfo {
    /// Our child; its exit status as text (`exit status: 0`, `signal: 9 (SIGKILL)`).
    Status(String),
    /// A reattached process: it is gone but its status went to its real parent.
    Gone,
}

/// Whether process `pid` exists and is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match kill(Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => {}
        Err(_) => return false,
    }
    // A zombie still answers kill(0): look at its state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

/// The last `max` bytes of a log file, trimmed, for error messages.
pub fn log_tail(path: &Path, max: usize) -> String {
    let s = std::fs::read(path).unwrap_or_default();
    let start = s.len().saturating_sub(max);
    String::from_utf8_lossy(&s[start..]).trim().to_string()
}

/// A running QEMU (or qemu-storage-daemon) with its QMP connection.
#[derive(Debug)]
pub struct QemuProcess {
    pid: i32,
    qmp: QmpClient,
    stderr_log: Option<PathBuf>,
    /// Set when we are the parent: the reaper publishes the exit status here.
    exit: Option<watch::Receiver<Option<String>>>,
}

/// Spawns `binary argv`, returning the child and a watch of its exit status.
pub(crate) fn spawn_child(
    binary: &Path,
    argv: &[String],
    stderr_log: &Path,
    own_group: bool,
) -> Result<(i32, watch::Receiver<Option<String>>), ProcessError> {
    let log = std::fs::File::create(stderr_log).map_err(|source| ProcessError::Log {
        path: stderr_log.to_path_buf(),
        source,
    })?;
    let log2 = log.try_clone().map_err(|source| ProcessError::Log {
        path: stderr_log.to_path_buf(),
        source,
    })?;
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(argv).stdin(Stdio::null()).stdout(log).stderr(log2);
    // QEMU allocates a bounce buffer per block request; above glibc's mmap threshold each one is
    // a fresh mapping, faulted in page by page and unmapped again. Serving a whole-disk read
    // over NBD that way cost a quarter of the machine's CPU (`docs/benchmarks.md`); from the
    // heap the buffers are reused. The variable changes nothing else.
    cmd.env("MALLOC_MMAP_THRESHOLD_", (32u32 << 20).to_string());
    if own_group {
        cmd.process_group(0);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        binary: binary.to_path_buf(),
        source,
    })?;
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    tracing::info!(target: "vmrepl::qemu", cmd = %crate::exec::render(binary, argv), pid, ms = start.elapsed().as_millis() as u64, "spawned");
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let st = child.wait().await;
        let text = match st {
            Ok(s) => s.to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        tracing::info!(target: "vmrepl::qemu", pid, status = %text, "child exited");
        let _ = tx.send(Some(text));
    });
    Ok((pid, rx))
}

/// Waits for the QMP socket of a just-spawned process, failing early if it exits.
pub(crate) async fn connect_spawned(
    pid: i32,
    exit: &mut watch::Receiver<Option<String>>,
    qmp_sock: &Path,
    stderr_log: &Path,
    timeout: Duration,
) -> Result<QmpClient, ProcessError> {
    let connect = QmpClient::connect(qmp_sock, timeout);
    tokio::pin!(connect);
    let exited = exit.wait_for(|s| s.is_some());
    tokio::select! {
        r = &mut connect => r.map_err(|source| ProcessError::NoQmp { pid, source, stderr: log_tail(stderr_log, 4000) }),
        st = exited => {
            let status = st.ok().and_then(|s| s.clone()).unwrap_or_else(|| "unknown".into());
            // The child's final writes are in the file once it has exited.
            Err(ProcessError::StartFailed { status, stderr: log_tail(stderr_log, 4000) })
        }
    }
}

impl QemuProcess {
    /// Starts QEMU and connects to its QMP socket. A QEMU that exits during start-up gives
    /// [`ProcessError::StartFailed`] with QEMU's own message.
    pub async fn spawn(
        binary: &Path,
        argv: &[String],
        opts: &SpawnOptions,
    ) -> Result<QemuProcess, ProcessError> {
        // A stale socket from an earlier run would make connect() reach nothing.
        let _ = std::fs::remove_file(&opts.qmp_sock);
        let (pid, mut exit) = spawn_child(binary, argv, &opts.stderr_log, opts.own_process_group)?;
        let qmp = match connect_spawned(
            pid,
            &mut exit,
            &opts.qmp_sock,
            &opts.stderr_log,
            opts.start_timeout,
        )
        .await
        {
            Ok(q) => q,
            Err(e) => {
                if is_alive(pid) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                return Err(e);
            }
        };
        Ok(QemuProcess {
            pid,
            qmp,
            stderr_log: Some(opts.stderr_log.clone()),
            exit: Some(exit),
        })
    }

    /// Reattaches to a QEMU started by an earlier daemon: the pid must be alive, its command
    /// line must name `qmp_sock`, and QMP must answer `query-status`. Drop any earlier client
    /// of that socket first (QMP serves one client at a time).
    pub async fn attach(
        pid: i32,
        qmp_sock: &Path,
        timeout: Duration,
    ) -> Result<QemuProcess, ProcessError> {
        if !is_alive(pid) {
            return Err(ProcessError::NotRunning { pid });
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let needle = qmp_sock.to_string_lossy();
        if !String::from_utf8_lossy(&cmdline).contains(needle.as_ref()) {
            return Err(ProcessError::NotOurQemu {
                pid,
                qmp_sock: qmp_sock.to_path_buf(),
            });
        }
        let qmp = QmpClient::connect(qmp_sock, timeout).await?;
        qmp.execute("query-status", Value::Null).await?;
        Ok(QemuProcess {
            pid,
            qmp,
            stderr_log: None,
            exit: None,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// The log QEMU's stderr goes to, when we spawned it.
    pub fn stderr_log(&self) -> Option<&Path> {
        self.stderr_log.as_deref()
    }

    /// Whether QEMU is still running (pid alive and not reaped).
    pub fn is_running(&self) -> bool {
        if let Some(e) = &self.exit {
            if e.borrow().is_some() {
                return false;
            }
        }
        is_alive(self.pid)
    }

    /// `query-status`'s `status` (e.g. `running`, `prelaunch`, `paused`).
    pub async fn status(&self) -> Result<String, ProcessError> {
        let v = self.qmp.execute("query-status", Value::Null).await?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string())
    }

    /// Waits until the process is gone, up to `timeout`.
    pub async fn wait_exit(&self, timeout: Duration) -> Result<ExitInfo, ProcessError> {
        let deadline = Instant::now() + timeout;
        if let Some(e) = &self.exit {
            let mut e = e.clone();
            return match tokio::time::timeout(timeout, e.wait_for(|s| s.is_some())).await {
                Ok(Ok(s)) => Ok(ExitInfo::Status(s.clone().unwrap_or_default())),
                Ok(Err(_)) => Ok(ExitInfo::Status("unknown".into())),
                Err(_) => Err(ProcessError::ExitTimeout {
                    pid: self.pid,
                    secs: timeout.as_secs(),
                }),
            };
        }
        // Not our child: watch the QMP connection, and poll the pid.
        let _ = tokio::time::timeout(timeout, self.qmp.closed()).await;
        while is_alive(self.pid) {
            if Instant::now() >= deadline {
                return Err(ProcessError::ExitTimeout {
                    pid: self.pid,
                    secs: timeout.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(ExitInfo::Gone)
    }

    /// Asks QEMU to exit (`quit`; bitmaps are flushed) and waits for it.
    pub async fn quit(&self, timeout: Duration) -> Result<ExitInfo, ProcessError> {
        match self.qmp.execute("quit", Value::Null).await {
            Ok(_) | Err(QmpError::Closed { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.wait_exit(timeout).await
    }

    /// SIGKILL (last resort: persistent bitmaps become inconsistent).
    pub fn kill(&self) {
        if self.is_running() {
            tracing::warn!(target: "vmrepl::qemu", pid = self.pid, "sending SIGKILL to QEMU");
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
    }
}
