//! A host's data folder and everything in it. One folder per host, so several hosts can run
//! side by side on one machine.
//!
//! ```text
//! DATA/
//!   config.toml      host configuration (TOML), unless --config names another file
//!   state.db         durable state (SQLite), with the settings commands change
//!                    (replica server, revoked certificates)
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
//!
//! The configuration file is the admin's and the daemon never writes it: `--config FILE` when
//! given, else `DATA/config.toml` ([`DataDir::locate`] has the rule; a packaged host uses
//! `/etc/vmrepl/vmrepl.toml`).

use std::fs::File;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Errors about the data folder itself.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("Another vmrepl daemon already runs on the data folder {path} (it holds {lock}). Stop it first, or give this daemon its own folder with --data.")]
    AlreadyRunning { path: PathBuf, lock: PathBuf },
    #[error("The data folder {path} is not a vmrepl host (it has no state.db, and there is no configuration file {config}). Create one with `vmrepl --data {path} host init --name HOST --listen IP:PORT`, or name the host's configuration with --config.")]
    NotAHost { path: PathBuf, config: PathBuf },
    #[error("The data folder {path} already holds a host; refusing to overwrite it. Pick another folder or delete this one.")]
    AlreadyAHost { path: PathBuf },
    #[error("The configuration file {path} exists already; refusing to overwrite it (it is the admin's). Name another file with --config, or move this one away first.")]
    ConfigExists { path: PathBuf },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The data folder when none is given.
pub const DEFAULT_DATA: &str = "/var/lib/vmrepl";

/// The configuration file of a packaged host, used when neither `--config` nor `--data` is
/// given and the default data folder holds no `config.toml`.
pub const SYSTEM_CONFIG: &str = "/etc/vmrepl/vmrepl.toml";

/// Paths inside a host's data folder, and where its configuration file is.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    /// The configuration file when it is not `root/config.toml` (`--config`).
    config: Option<PathBuf>,
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
            config: None,
        }
    }

    /// The same folder with its configuration in `file` instead of `config.toml` inside it.
    pub fn with_config(mut self, file: &Path) -> Self {
        self.config = Some(std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf()));
        self
    }

    /// The data folder and configuration file a command names: `data` (`--data` or
    /// `VMREPL_DATA`), by default [`DEFAULT_DATA`]; the configuration file `config` (`--config`
    /// or `VMREPL_CONFIG`) when given, else `DATA/config.toml` when the data folder was given or
    /// holds one, else [`SYSTEM_CONFIG`] (a packaged host).
    pub fn locate(data: Option<&Path>, config: Option<&Path>) -> Self {
        Self::locate_with(data, config, Path::new(SYSTEM_CONFIG))
    }

    fn locate_with(data: Option<&Path>, config: Option<&Path>, system: &Path) -> Self {
        let dd = DataDir::new(data.unwrap_or(Path::new(DEFAULT_DATA)));
        match config {
            Some(c) => dd.with_config(c),
            None if data.is_some() || dd.config().exists() => dd,
            None => dd.with_config(system),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The configuration file (the admin's; read, never written, by the daemon).
    pub fn config(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(|| self.root.join("config.toml"))
    }

    /// Whether the configuration file was named apart from the data folder (`--config`).
    pub fn config_given(&self) -> bool {
        self.config.is_some()
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

    /// Whether a host exists here: its configuration file, or its state database (a command
    /// that only talks to the daemon does not need to be told where the configuration is).
    pub fn is_host(&self) -> bool {
        self.config().exists() || self.db().exists()
    }

    /// Errors unless a host exists here.
    pub fn require_host(&self) -> Result<(), DataDirError> {
        if self.is_host() {
            Ok(())
        } else {
            Err(DataDirError::NotAHost {
                path: self.root.clone(),
                config: self.config(),
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
    fn the_config_is_the_named_file_else_in_the_data_folder_else_the_system_one() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        let system = d.path().join("etc/vmrepl.toml");
        let named = d.path().join("mine.toml");
        // --config wins, with or without --data.
        let dd = DataDir::locate_with(Some(&data), Some(&named), &system);
        assert_eq!((dd.root(), dd.config()), (data.as_path(), named.clone()));
        assert!(dd.config_given());
        // --data alone: DATA/config.toml, as always, whether or not it exists yet.
        let dd = DataDir::locate_with(Some(&data), None, &system);
        assert_eq!(dd.config(), data.join("config.toml"));
        assert!(!dd.config_given());
        // Neither: the default data folder's config.toml when it has one, else the system
        // file (this machine's /var/lib/vmrepl decides which; both are named).
        let dd = DataDir::locate_with(None, None, &system);
        assert_eq!(dd.root(), Path::new(DEFAULT_DATA));
        let own = Path::new(DEFAULT_DATA).join("config.toml");
        let expected = if own.exists() { own } else { system };
        assert_eq!(dd.config(), expected);
    }

    #[test]
    fn a_folder_is_a_host_by_its_config_or_its_database_and_the_refusal_names_both() {
        let d = tempfile::tempdir().unwrap();
        let elsewhere = d.path().join("vmrepl.toml");
        let dd = DataDir::new(d.path()).with_config(&elsewhere);
        let e = dd.require_host().unwrap_err().to_string();
        assert!(e.contains("vmrepl.toml") && e.contains("--config"), "{e}");
        std::fs::write(dd.db(), b"").unwrap();
        dd.require_host().unwrap();
        std::fs::remove_file(dd.db()).unwrap();
        std::fs::write(&elsewhere, b"").unwrap();
        dd.require_host().unwrap();
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
