//! `qemu-storage-daemon` over a stopped VM's disks.
//!
//! Node names are the ones a running VM uses (`<id>-file` / `<id>`), so the replication
//! cycle's QMP transaction is the same online and offline. Quit with [`StorageDaemon::quit`]:
//! only a clean exit persists new dirty bitmaps. Dropping the handle without quitting sends
//! SIGTERM, which qemu-storage-daemon also treats as a clean exit.

use crate::process::{self, ProcessError};
use crate::qmp::{QmpClient, QmpError};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;

/// Failures of the storage daemon.
#[derive(Debug, thiserror::Error)]
pub enum StorageDaemonError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("disk id {0:?} is not a usable QEMU node name; use a letter followed by letters, digits, '-' or '_'")]
    BadId(String),
    #[error("qemu-storage-daemon (pid {pid}) did not exit within {secs} s of quit; it was killed and bitmaps created in this run are lost")]
    QuitTimeout { pid: i32, secs: u64 },
}

/// Image format of an [`SdDisk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SdFormat {
    /// A VM disk.
    #[default]
    Qcow2,
    /// A raw image, such as a UEFI variable store (node `fw-vars`).
    Raw,
}

impl SdFormat {
    fn driver(self) -> &'static str {
        match self {
            SdFormat::Qcow2 => "qcow2",
            SdFormat::Raw => "raw",
        }
    }
}

/// One image to open: file node `<id>-file` under format node `<id>`, as a running VM names
/// them.
#[derive(Debug, Clone)]
pub struct SdDisk {
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
    pub format: SdFormat,
}

/// A running qemu-storage-daemon.
#[derive(Debug)]
pub struct StorageDaemon {
    pid: i32,
    qmp: QmpClient,
    exit: watch::Receiver<Option<String>>,
    quit_done: bool,
}

/// Argv for qemu-storage-daemon (pure), every image read through the page cache.
pub fn build_argv(
    disks: &[SdDisk],
    qmp_sock: &Path,
    pidfile: Option<&Path>,
) -> Result<Vec<String>, StorageDaemonError> {
    argv_with(disks, &vec![false; disks.len()], qmp_sock, pidfile)
}

/// Whether the file system of `path` takes O_DIRECT (tmpfs, for one, does not).
fn supports_direct(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .is_ok()
}

/// [`build_argv`], with the file nodes of the disks `direct` marks opened with O_DIRECT
/// (`cache.direct`). The daemon reads a stopped VM's disks once per cycle, and a full copy
/// reads every block: through the page cache that costs a copy per byte and evicts the
/// host's useful cache (measured: half the CPU time of an initial copy, docs/benchmarks.md).
pub fn argv_with(
    disks: &[SdDisk],
    direct: &[bool],
    qmp_sock: &Path,
    pidfile: Option<&Path>,
) -> Result<Vec<String>, StorageDaemonError> {
    let mut a = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let vars = d.format == SdFormat::Raw && d.id == crate::cmdline::VARS_NODE;
        if !vars && !crate::cmdline::valid_node_id(&d.id) {
            return Err(StorageDaemonError::BadId(d.id.clone()));
        }
        let mut file = json!({"driver":"file","filename":d.path.to_string_lossy(),"node-name":format!("{}-file", d.id)});
        let mut fmt =
            json!({"driver":d.format.driver(),"file":format!("{}-file", d.id),"node-name":d.id});
        if d.read_only {
            file["read-only"] = Value::Bool(true);
            fmt["read-only"] = Value::Bool(true);
        }
        if direct.get(i).copied().unwrap_or(false) {
            file["cache"] = json!({"direct": true});
        }
        a.extend([
            "--blockdev".to_string(),
            file.to_string(),
            "--blockdev".to_string(),
            fmt.to_string(),
        ]);
    }
    a.extend([
        "--chardev".to_string(),
        format!(
            "socket,path={},server=on,wait=off,id=m",
            crate::cmdline::escape_opt(&qmp_sock.to_string_lossy())
        ),
        "--monitor".to_string(),
        "chardev=m".to_string(),
    ]);
    if let Some(p) = pidfile {
        a.extend(["--pidfile".to_string(), p.to_string_lossy().into_owned()]);
    }
    Ok(a)
}

/// Waits until qemu-storage-daemon `pid` has written `pidfile` (it is ready for clients), or it
/// exits, or `timeout` passes.
async fn wait_for_pidfile(
    pidfile: &Path,
    pid: i32,
    exit: &mut watch::Receiver<Option<String>>,
    timeout: Duration,
) -> Result<(), ProcessError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // The file is created, then its pid written: a whole line is the signal.
        if std::fs::read_to_string(pidfile).is_ok_and(|t| t.trim() == pid.to_string()) {
            return Ok(());
        }
        if exit.borrow().is_some() {
            // Let the caller report the exit with the daemon's own message.
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ProcessError::NotReady {
                pid,
                what: format!("its pid file {}", pidfile.display()),
                secs: timeout.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Stops a qemu-storage-daemon that an earlier run left behind on the same pid file (its
/// owner was killed, so nobody told it to quit): it still holds the images' write locks, and
/// a new one could not open them. Only a process that is qemu-storage-daemon and names this
/// very pid file on its command line is touched (pids are reused). It gets SIGTERM, on which
/// it closes the images cleanly and saves their persistent bitmaps, and SIGKILL only if it
/// has not gone within `timeout`.
async fn stop_leftover(pidfile: &Path, timeout: Duration) {
    let Some(pid) = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
    else {
        return;
    };
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let Ok(cmd) = std::fs::read(proc_dir.join("cmdline")) else {
        return;
    };
    let args: Vec<String> = cmd
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let ours = args
        .first()
        .is_some_and(|a| a.ends_with("qemu-storage-daemon"))
        && args.iter().any(|a| Path::new(a) == pidfile);
    if !ours {
        return;
    }
    tracing::warn!(target: "vmrepl::qemu", pid, pidfile = %pidfile.display(), "a storage daemon an earlier run left behind still holds the disks; stopping it");
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let gone = || {
        std::fs::read_to_string(proc_dir.join("stat"))
            .map(|st| {
                st.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    };
    let started = std::time::Instant::now();
    while !gone() {
        if started.elapsed() > timeout {
            tracing::warn!(target: "vmrepl::qemu", pid, "the leftover storage daemon did not stop; killing it");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let killed = std::time::Instant::now();
            while !gone() && killed.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl StorageDaemon {
    /// Starts qemu-storage-daemon on `disks` with its QMP monitor at `qmp_sock`; its stderr
    /// goes to `stderr_log`.
    pub async fn start(
        binary: &Path,
        disks: &[SdDisk],
        qmp_sock: &Path,
        stderr_log: &Path,
        timeout: Duration,
    ) -> Result<StorageDaemon, StorageDaemonError> {
        // qemu-storage-daemon writes its pid file once its chardevs and block nodes exist and
        // before it serves connections (documented in its manual, "do not change this
        // ordering"). A QMP client that connects earlier can get the greeting and then no
        // answer at all (seen with QEMU 7.2, about one start in a few hundred), and killing
        // that daemon leaves the images' bitmaps marked in use. So: wait for the pid file.
        let pidfile = qmp_sock.with_extension("pid");
        // VM disks are read with O_DIRECT where their file system allows it.
        let direct: Vec<bool> = disks
            .iter()
            .map(|d| d.format == SdFormat::Qcow2 && supports_direct(&d.path))
            .collect();
        let argv = argv_with(disks, &direct, qmp_sock, Some(&pidfile))?;
        stop_leftover(&pidfile, timeout).await;
        let _ = std::fs::remove_file(qmp_sock);
        let _ = std::fs::remove_file(&pidfile);
        let (pid, mut exit) = process::spawn_child(binary, &argv, stderr_log, false)?;
        let started = std::time::Instant::now();
        let ready = wait_for_pidfile(&pidfile, pid, &mut exit, timeout).await;
        let remaining = timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        let connected = match ready {
            Ok(()) => {
                process::connect_spawned(pid, &mut exit, qmp_sock, stderr_log, remaining).await
            }
            Err(e) => Err(e),
        };
        match connected {
            Ok(qmp) => Ok(StorageDaemon {
                pid,
                qmp,
                exit,
                quit_done: false,
            }),
            Err(e) => {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                Err(e.into())
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// `quit` and wait for the exit; bitmaps are persisted on the way out.
    pub async fn quit(mut self, timeout: Duration) -> Result<(), StorageDaemonError> {
        match self.qmp.execute("quit", Value::Null).await {
            Ok(_) | Err(QmpError::Closed { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let mut exit = self.exit.clone();
        let r = tokio::time::timeout(timeout, exit.wait_for(|s| s.is_some())).await;
        self.quit_done = true;
        if r.is_err() {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
            return Err(StorageDaemonError::QuitTimeout {
                pid: self.pid,
                secs: timeout.as_secs(),
            });
        }
        Ok(())
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        if !self.quit_done && self.exit.borrow().is_none() {
            tracing::warn!(target: "vmrepl::qemu", pid = self.pid, "storage daemon dropped without quit; sending SIGTERM");
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(id: &str, format: SdFormat) -> SdDisk {
        SdDisk {
            id: id.into(),
            path: format!("/x/{id}").into(),
            read_only: false,
            format,
        }
    }

    #[test]
    fn images_open_with_their_format_under_the_vms_node_names() {
        let argv = build_argv(
            &[
                disk("disk0", SdFormat::Qcow2),
                disk(crate::cmdline::VARS_NODE, SdFormat::Raw),
            ],
            Path::new("/run/q.sock"),
            None,
        )
        .unwrap();
        let nodes: Vec<Value> = argv
            .windows(2)
            .filter(|w| w[0] == "--blockdev")
            .map(|w| serde_json::from_str(&w[1]).unwrap())
            .collect();
        assert_eq!(nodes[1]["driver"], "qcow2");
        assert_eq!(nodes[1]["node-name"], "disk0");
        assert_eq!(nodes[3]["driver"], "raw");
        assert_eq!(nodes[3]["node-name"], "fw-vars");
        assert_eq!(nodes[3]["file"], "fw-vars-file");
    }

    #[test]
    fn disks_marked_direct_read_their_file_with_o_direct_and_the_others_do_not() {
        let argv = argv_with(
            &[
                disk("disk0", SdFormat::Qcow2),
                disk("disk1", SdFormat::Qcow2),
            ],
            &[true, false],
            Path::new("/run/q.sock"),
            None,
        )
        .unwrap();
        let nodes: Vec<Value> = argv
            .windows(2)
            .filter(|w| w[0] == "--blockdev")
            .map(|w| serde_json::from_str(&w[1]).unwrap())
            .collect();
        assert_eq!(nodes[0]["cache"]["direct"], true, "{:?}", nodes[0]);
        assert!(
            nodes[1].get("cache").is_none(),
            "the format node keeps its defaults"
        );
        assert!(nodes[2].get("cache").is_none(), "{:?}", nodes[2]);
    }

    #[test]
    fn o_direct_is_used_where_the_file_system_takes_it() {
        // (tmpfs refuses it before Linux 6.6; this machine's kernel may take it.)
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let f = d.path().join("x");
        std::fs::write(&f, [0u8; 4096]).unwrap();
        assert!(supports_direct(&f), "ext4 takes O_DIRECT");
        assert!(!supports_direct(&d.path().join("missing")));
    }

    #[test]
    fn the_vars_node_name_is_only_for_the_raw_vars_image() {
        let e = build_argv(
            &[disk(crate::cmdline::VARS_NODE, SdFormat::Qcow2)],
            Path::new("/run/q.sock"),
            None,
        )
        .unwrap_err();
        assert!(matches!(e, StorageDaemonError::BadId(_)), "{e}");
    }
}
