//! Tracking while the VM is off: `qemu-storage-daemon` over its disks, same node names.

use crate::names::check_node_name;
use crate::{TrackingError, LOG_TARGET, VARS_NODE};
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmrepl_qemu::storage_daemon::{SdDisk, SdFormat};
use vmrepl_qemu::{QmpClient, StorageDaemon};

/// How long qemu-storage-daemon may take to start and to quit.
const SD_TIMEOUT: Duration = Duration::from_secs(30);

/// A stopped VM's disks opened in `qemu-storage-daemon`, with the VM's node names (disk id
/// = qcow2 format node, `<id>-file` its file node; the vars file as raw node `fw-vars`). The
/// same cycle functions work on [`OfflineDisks::qmp`] as on a running VM.
///
/// Close with [`OfflineDisks::close`]: only a clean `quit` persists new bitmaps. Dropping it
/// sends SIGTERM (also a clean exit for qemu-storage-daemon).
#[derive(Debug)]
pub struct OfflineDisks {
    sd: StorageDaemon,
}

impl OfflineDisks {
    /// Starts qemu-storage-daemon on `disks` (node id, qcow2 path) and, if given, the raw
    /// UEFI vars file, with its QMP socket and log in `run_dir`.
    pub async fn open<N: AsRef<str>, P: AsRef<Path>>(
        disks: &[(N, P)],
        vars: Option<&Path>,
        run_dir: &Path,
    ) -> Result<OfflineDisks, TrackingError> {
        OfflineDisks::open_with(Path::new("qemu-storage-daemon"), disks, vars, run_dir).await
    }

    /// [`OfflineDisks::open`] with an explicit binary.
    pub async fn open_with<N: AsRef<str>, P: AsRef<Path>>(
        binary: &Path,
        disks: &[(N, P)],
        vars: Option<&Path>,
        run_dir: &Path,
    ) -> Result<OfflineDisks, TrackingError> {
        let mut sd_disks: Vec<SdDisk> = disks
            .iter()
            .map(|(n, p)| {
                check_node_name(n.as_ref())?;
                Ok(SdDisk {
                    id: n.as_ref().to_string(),
                    path: p.as_ref().to_path_buf(),
                    read_only: false,
                    format: SdFormat::Qcow2,
                })
            })
            .collect::<Result<_, TrackingError>>()?;
        if let Some(v) = vars {
            sd_disks.push(SdDisk {
                id: VARS_NODE.to_string(),
                path: v.to_path_buf(),
                read_only: false,
                format: SdFormat::Raw,
            });
        }
        std::fs::create_dir_all(run_dir).map_err(|source| TrackingError::Io {
            action: "create the run folder",
            path: run_dir.to_path_buf(),
            source,
        })?;
        let sock = run_dir.join("qsd.sock");
        let log = run_dir.join("qsd.log");
        let sd = StorageDaemon::start(binary, &sd_disks, &sock, &log, SD_TIMEOUT).await?;
        tracing::info!(target: LOG_TARGET, disks = disks.len(), vars = vars.is_some(), pid = sd.pid(), "offline disks opened");
        Ok(OfflineDisks { sd })
    }

    /// The QMP client of the storage daemon.
    pub fn qmp(&self) -> &QmpClient {
        self.sd.qmp()
    }

    pub fn pid(&self) -> i32 {
        self.sd.pid()
    }

    /// The run folder's QMP socket path.
    pub fn socket(&self) -> PathBuf {
        self.sd.qmp().path().to_path_buf()
    }

    /// `quit` and wait: bitmaps are written to the images (flag `auto` when enabled).
    pub async fn close(self) -> Result<(), TrackingError> {
        self.sd.quit(SD_TIMEOUT).await?;
        tracing::info!(target: LOG_TARGET, "offline disks closed");
        Ok(())
    }
}
