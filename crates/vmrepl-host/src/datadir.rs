//! A host's data folder and everything in it. One folder per host, so several hosts can run
//! side by side on one machine.
//!
//! ```text
//! DATA/
//!   config.toml      host configuration (TOML)
//!   state.db         durable state (SQLite)
//!   mgmt.sock        local management API (mode 0600)
//!   daemon.lock      held by the running daemon (one daemon per folder)
//!   daemon.log       the daemon's log when started in the background
//!   tls/             ca.pem, ca-key.pem (built-in CA), host.pem, host-key.pem, trusted/*.pem
//!   run/<vm-uuid>/   per-VM runtime files: qmp.sock, qga.sock, serial.log (+ serial.log.1),
//!                    qemu.pid, qemu.stderr
//!   staging/         sparse delta images of cycles in flight
//!   storage/         default storage folder for VM disks
//!   replica/         default storage folder for replica VMs
//! ```
//!
//! Folders are 0700 and files 0600 (docs/security.md, "File modes and local access", lists each kind).

use std::fs::File;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Errors about the data folder itself.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("Another vmrepl daemon already runs on the data folder {path} (it holds {lock}). Stop it first, or give this daemon its own folder with --data.")]
    AlreadyRunning { path: PathBuf, lock: PathBuf },
    #[error("The data folder {path} is not a vmrepl host (no config.toml). Create one with `vmrepl --data {path} host init --name HOST --listen IP:PORT`.")]
    NotAHost { path: PathBuf },
    #[error("The data folder {path} already holds a host; refusing to overwrite it. Pick another folder or delete this one.")]
    AlreadyAHost { path: PathBuf },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Paths inside a host's data folder.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Wraps `root` (made absolute).
    pub fn new(root: &Path) -> Self {
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|c| c.join(root))
                .unwrap_or_else(|_| root.to_path_buf())
        };
        DataDir {
            root: crate::fsutil::normalize(&root).unwrap_or(root),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("state.db")
    }
    pub fn socket(&self) -> PathBuf {
        self.root.join("mgmt.sock")
    }
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("daemon.lock")
    }
    pub fn log_file(&self) -> PathBuf {
        self.root.join("daemon.log")
    }
    pub fn tls(&self) -> PathBuf {
        self.root.join("tls")
    }
    pub fn run_dir(&self, vm: Uuid) -> PathBuf {
        self.root.join("run").join(vm.to_string())
    }
    pub fn staging(&self) -> PathBuf {
        self.root.join("staging")
    }
    pub fn default_storage(&self) -> PathBuf {
        self.root.join("storage")
    }
    pub fn default_replica_storage(&self) -> PathBuf {
        self.root.join("replica")
    }

    /// Whether a host exists here.
    pub fn is_host(&self) -> bool {
        self.config().exists()
    }

    /// Errors unless a host exists here.
    pub fn require_host(&self) -> Result<(), DataDirError> {
        if self.is_host() {
            Ok(())
        } else {
            Err(DataDirError::NotAHost {
                path: self.root.clone(),
            })
        }
    }

    /// Creates the folder skeleton (owner-only permissions on the root).
    pub fn create_skeleton(&self) -> Result<(), DataDirError> {
        use std::os::unix::fs::PermissionsExt;
        for d in [
            self.root.clone(),
            self.tls(),
            self.root.join("run"),
            self.staging(),
            self.default_storage(),
            self.default_replica_storage(),
        ] {
            crate::fsutil::create_private_dir_all(&d).map_err(|source| DataDirError::Io {
                path: d.clone(),
                source,
            })?;
        }
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| DataDirError::Io {
                path: self.root.clone(),
                source,
            },
        )?;
        Ok(())
    }

    /// Takes the daemon lock; refuses if another daemon holds it. The lock lasts as long as
    /// the returned file is open.
    pub fn lock(&self) -> Result<File, DataDirError> {
        let path = self.lock_file();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| DataDirError::Io {
                path: path.clone(),
                source,
            })?;
        match f.try_lock() {
            Ok(()) => Ok(f),
            Err(std::fs::TryLockError::WouldBlock) => Err(DataDirError::AlreadyRunning {
                path: self.root.clone(),
                lock: path,
            }),
            Err(std::fs::TryLockError::Error(source)) => Err(DataDirError::Io { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_folder_is_refused_and_names_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let dd = DataDir::new(d.path());
        dd.create_skeleton().unwrap();
        let _held = dd.lock().unwrap();
        let e = dd.lock().unwrap_err();
        assert!(matches!(e, DataDirError::AlreadyRunning { .. }));
        assert!(e.to_string().contains("--data"));
    }

    #[test]
    fn the_lock_is_released_when_the_holder_goes() {
        let d = tempfile::tempdir().unwrap();
        let dd = DataDir::new(d.path());
        dd.create_skeleton().unwrap();
        drop(dd.lock().unwrap());
        dd.lock().unwrap();
    }
}
