//! `vmrepl host init` and certificate chores that run without a daemon.

use crate::config::HostConfig;
use crate::datadir::{DataDir, DataDirError};
use crate::db::Db;
use serde::Serialize;
use std::path::{Path, PathBuf};
use vmrepl_transport::pki;
use vmrepl_types::Accel;

/// What `host init` is asked to do.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub host_name: String,
    pub listen: String,
    pub storage: Vec<PathBuf>,
    pub accel: Accel,
    /// Existing certificate and key (PEM) instead of the built-in CA.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// Extra CA certificates to trust.
    pub trust: Vec<PathBuf>,
    pub qemu_binary: Option<PathBuf>,
}

/// What `host init` made.
#[derive(Debug, Clone, Serialize)]
pub struct InitReport {
    pub host_name: String,
    pub data: PathBuf,
    pub listen: String,
    pub cert: PathBuf,
    pub cert_source: String,
    pub storage: Vec<PathBuf>,
}

/// Errors of host creation.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("{0}")]
    Invalid(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InitError + '_ {
    move |source| InitError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Paths of the TLS identity inside the data folder.
pub struct TlsPaths {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub host_cert: PathBuf,
    pub host_key: PathBuf,
    pub trusted: PathBuf,
}

/// The TLS file layout of a data folder.
pub fn tls_paths(dd: &DataDir) -> TlsPaths {
    let t = dd.tls();
    TlsPaths {
        ca_cert: t.join("ca.pem"),
        ca_key: t.join("ca-key.pem"),
        host_cert: t.join("host.pem"),
        host_key: t.join("host-key.pem"),
        trusted: t.join("trusted"),
    }
}

/// All CA certificates this host trusts for peers: its own CA (if any) and imported ones.
pub fn trusted_cas(dd: &DataDir) -> Vec<PathBuf> {
    let p = tls_paths(dd);
    let mut out = Vec::new();
    if p.ca_cert.exists() {
        out.push(p.ca_cert.clone());
    }
    if let Ok(rd) = std::fs::read_dir(&p.trusted) {
        let mut extra: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "pem"))
            .collect();
        extra.sort();
        out.extend(extra);
    }
    out
}

/// Creates a host in `dd`.
pub fn init_host(dd: &DataDir, o: InitOptions) -> Result<InitReport, InitError> {
    if dd.is_host() {
        return Err(DataDirError::AlreadyAHost {
            path: dd.root().to_path_buf(),
        }
        .into());
    }
    let storage = if o.storage.is_empty() {
        vec![dd.default_storage()]
    } else {
        o.storage
            .iter()
            .map(|p| std::path::absolute(p).map_err(io(p)))
            .collect::<Result<Vec<_>, _>>()?
    };
    let mut cfg = HostConfig::new(&o.host_name, &o.listen, storage.clone());
    cfg.accel = o.accel;
    cfg.replica_server.default_storage = Some(dd.default_replica_storage());
    if let Some(q) = o.qemu_binary {
        cfg.qemu_binary = q;
    }
    cfg.validate()?;
    dd.create_skeleton()?;
    for s in &storage {
        crate::fsutil::create_private_dir_all(s).map_err(io(s))?;
    }
    let tp = tls_paths(dd);
    crate::fsutil::create_private_dir_all(&tp.trusted).map_err(io(&tp.trusted))?;
    for t in &o.trust {
        trust_ca(dd, t)?;
    }
    let cert_source = match &o.cert {
        Some((cert, key)) => {
            let extra: Vec<PathBuf> = trusted_cas(dd);
            pki::HostIdentity::import(&o.host_name, cert, key, &extra)?;
            std::fs::copy(cert, &tp.host_cert).map_err(io(cert))?;
            std::fs::copy(key, &tp.host_key).map_err(io(key))?;
            set_private(&tp.host_key)?;
            format!("imported from {}", cert.display())
        }
        None => {
            let ca = pki::Ca::create(&dd.tls(), &format!("vmrepl CA of {}", o.host_name))?;
            let issued = ca.issue_host(&o.host_name, days(825))?;
            std::fs::write(&tp.host_cert, issued.cert_pem).map_err(io(&tp.host_cert))?;
            std::fs::write(&tp.host_key, issued.key_pem).map_err(io(&tp.host_key))?;
            set_private(&tp.host_key)?;
            "issued by this host's built-in CA".to_string()
        }
    };
    Db::open(&dd.db())?;
    // The config is written last: its presence marks a complete host.
    cfg.save(&dd.config())?;
    Ok(InitReport {
        host_name: o.host_name,
        data: dd.root().to_path_buf(),
        listen: o.listen,
        cert: tp.host_cert,
        cert_source,
        storage,
    })
}

fn days(n: u32) -> std::time::Duration {
    std::time::Duration::from_secs(u64::from(n) * 86_400)
}

fn set_private(p: &Path) -> Result<(), InitError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).map_err(io(p))
}

/// The built-in CA issues a certificate for another host into `out`
/// (host.pem, host-key.pem and this CA's ca.pem, for `host init --cert/--key/--trust`).
pub fn issue_cert(
    dd: &DataDir,
    host_name: &str,
    out: &Path,
    days: u32,
) -> Result<Vec<PathBuf>, InitError> {
    dd.require_host()?;
    let ca = pki::Ca::load(&dd.tls())?;
    vmrepl_types::name::validate_host_name(host_name)
        .map_err(|e| InitError::Invalid(e.to_string()))?;
    let issued = ca.issue_host(host_name, self::days(days))?;
    let (cert, key) = (issued.cert_pem, issued.key_pem);
    std::fs::create_dir_all(out).map_err(io(out))?;
    let c = out.join("host.pem");
    let k = out.join("host-key.pem");
    let a = out.join("ca.pem");
    std::fs::write(&c, cert).map_err(io(&c))?;
    std::fs::write(&k, key).map_err(io(&k))?;
    set_private(&k)?;
    std::fs::copy(tls_paths(dd).ca_cert, &a).map_err(io(&a))?;
    Ok(vec![c, k, a])
}

/// Trusts another CA: copies its certificate into `tls/trusted/`.
pub fn trust_ca(dd: &DataDir, ca_pem: &Path) -> Result<PathBuf, InitError> {
    let summary = pki::describe(&std::fs::read_to_string(ca_pem).map_err(io(ca_pem))?)?;
    let dir = tls_paths(dd).trusted;
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let dest = dir.join(format!("{}.pem", &summary.fingerprint_sha256[..16]));
    std::fs::copy(ca_pem, &dest).map_err(io(ca_pem))?;
    Ok(dest)
}
