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
    /// Where other hosts reach this one (HOST:PORT), when not the listen address.
    pub advertise: Option<String>,
    pub storage: Vec<PathBuf>,
    pub accel: Accel,
    /// Existing certificate and key (PEM) instead of the built-in CA.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// Extra CA certificates to trust.
    pub trust: Vec<PathBuf>,
    pub qemu_binary: Option<PathBuf>,
    /// The metrics page's address (the configuration's `metrics`; empty: none).
    pub metrics: String,
    /// The web dashboard's address (the configuration's `dashboard`; empty: none).
    pub dashboard: String,
}

/// What `host init` made.
#[derive(Debug, Clone, Serialize)]
pub struct InitReport {
    pub host_name: String,
    pub data: PathBuf,
    /// The configuration file written (the admin's from now on; vmrepl never rewrites it).
    pub config: PathBuf,
    /// Whether it is outside the data folder (commands name it with `--config`).
    pub config_given: bool,
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
    #[error(
        "refusing to write a private key into {path}: {why}. Use a folder that only you can \
         write to, for example one made with `mkdir -m 700 DIR`."
    )]
    UnsafeFolder { path: PathBuf, why: String },
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

/// Creates a host in `dd`, its configuration file written once at `dd.config()`. The replica
/// server settings and revocations are not in the file: the daemon keeps them in the state
/// database from its first start (`crate::host_settings`).
pub fn init_host(dd: &DataDir, o: InitOptions) -> Result<InitReport, InitError> {
    let config = dd.config();
    if dd.db().exists() || (!dd.config_given() && config.exists()) {
        return Err(DataDirError::AlreadyAHost {
            path: dd.root().to_path_buf(),
        }
        .into());
    }
    if config.exists() {
        return Err(DataDirError::ConfigExists { path: config }.into());
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
    if let Some(q) = o.qemu_binary {
        cfg.qemu_binary = q;
    }
    cfg.metrics = o.metrics;
    cfg.dashboard = o.dashboard;
    cfg.advertise = o.advertise;
    cfg.validate()?;
    if let Some(parent) = config.parent() {
        // A packaged host's /etc/vmrepl; made first, so a folder that cannot be made stops
        // the creation before anything is written.
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
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
            let key_pem = std::fs::read_to_string(key).map_err(io(key))?;
            let cert_pem = std::fs::read_to_string(cert).map_err(io(cert))?;
            pki::write_private_key(&tp.host_key, &key_pem)?;
            pki::write_public_replace(&tp.host_cert, &cert_pem)?;
            format!("imported from {}", cert.display())
        }
        None => {
            let ca = pki::Ca::create(&dd.tls(), &format!("vmrepl CA of {}", o.host_name))?;
            let issued = ca.issue_host(&o.host_name, days(825))?;
            pki::write_private_key(&tp.host_key, &issued.key_pem)?;
            pki::write_public_replace(&tp.host_cert, &issued.cert_pem)?;
            "issued by this host's built-in CA".to_string()
        }
    };
    Db::open(&dd.db())?;
    // The config is written last: its presence marks a complete host.
    cfg.save(&config)?;
    Ok(InitReport {
        host_name: o.host_name,
        data: dd.root().to_path_buf(),
        config,
        config_given: dd.config_given(),
        listen: o.listen,
        cert: tp.host_cert,
        cert_source,
        storage,
    })
}

fn days(n: u32) -> std::time::Duration {
    std::time::Duration::from_secs(u64::from(n) * 86_400)
}

/// Checks that a private key may be written into `dir`: a folder owned by this user (or
/// root) that no one else can write to, so no one else can plant a file or a link there.
fn check_key_folder(dir: &Path) -> Result<(), InitError> {
    use std::os::unix::fs::MetadataExt;
    let unsafe_folder = |why: String| InitError::UnsafeFolder {
        path: dir.to_path_buf(),
        why,
    };
    let md = std::fs::metadata(dir).map_err(io(dir))?;
    if !md.is_dir() {
        return Err(unsafe_folder("it is not a folder".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me {
        return Err(unsafe_folder(format!(
            "it belongs to user id {}, not to you (user id {me})",
            md.uid()
        )));
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(unsafe_folder(format!(
            "it is writable by {} (mode {mode:o})",
            if mode & 0o002 != 0 {
                "every user"
            } else {
                "its group"
            }
        )));
    }
    Ok(())
}

/// The built-in CA issues a certificate for another host into `out`
/// (host.pem, host-key.pem and this CA's ca.pem, for `host init --cert/--key/--trust`).
///
/// `out` is created 0700 if missing; an existing one must belong to the caller and be
/// writable by no one else, and must not hold a `host-key.pem` yet. The key is created
/// 0600 with `O_EXCL|O_NOFOLLOW`; the certificates replace existing files by rename.
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
    crate::fsutil::create_private_dir_all(out).map_err(io(out))?;
    check_key_folder(out)?;
    let c = out.join("host.pem");
    let k = out.join("host-key.pem");
    let a = out.join("ca.pem");
    pki::write_private_key(&k, &key)?;
    pki::write_public_replace(&c, &cert)?;
    pki::write_public_replace(&a, ca.cert_pem())?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn host(dir: &Path) -> DataDir {
        let dd = DataDir::new(&dir.join("data"));
        init_host(
            &dd,
            InitOptions {
                host_name: "hv1.example.org".into(),
                listen: "127.0.0.1:7443".into(),
                advertise: None,
                storage: vec![],
                accel: Accel::Tcg,
                cert: None,
                trust: vec![],
                qemu_binary: None,
                metrics: String::new(),
                dashboard: String::new(),
            },
        )
        .unwrap();
        dd
    }

    fn options(name: &str) -> InitOptions {
        InitOptions {
            host_name: name.into(),
            listen: "127.0.0.1:7443".into(),
            advertise: None,
            storage: vec![],
            accel: Accel::Tcg,
            cert: None,
            trust: vec![],
            qemu_binary: None,
            metrics: String::new(),
            dashboard: String::new(),
        }
    }

    #[test]
    fn a_config_named_apart_is_written_once_without_the_settings_commands_change() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("etc/vmrepl/vmrepl.toml");
        let dd = DataDir::new(&t.path().join("data")).with_config(&file);
        let r = init_host(&dd, options("hv1.example.org")).unwrap();
        assert_eq!(r.config, file);
        assert!(r.config_given);
        assert!(!dd.root().join("config.toml").exists());
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains("host_name = \"hv1.example.org\""), "{text}");
        assert!(
            !text.contains("replica_server") && !text.contains("revoked_certs"),
            "kept in the database, not the file:\n{text}"
        );
        // Another host may not take the file over, nor this data folder.
        let other = DataDir::new(&t.path().join("other")).with_config(&file);
        let e = init_host(&other, options("hv2.example.org")).unwrap_err();
        assert!(
            e.to_string().contains("vmrepl.toml") && e.to_string().contains("exists already"),
            "{e}"
        );
        assert!(!other.root().exists(), "refused before anything was made");
        let again = DataDir::new(dd.root()).with_config(&t.path().join("new.toml"));
        let e = init_host(&again, options("hv1.example.org")).unwrap_err();
        assert!(e.to_string().contains("already holds a host"), "{e}");
    }

    #[test]
    fn host_init_creates_the_host_key_0600_and_the_folders_0700() {
        let t = tempfile::tempdir().unwrap();
        let dd = host(t.path());
        let tp = tls_paths(&dd);
        assert_eq!(mode(&tp.host_key), 0o600);
        assert_eq!(mode(&tp.ca_key), 0o600);
        assert_eq!(mode(dd.root()), 0o700);
        assert_eq!(mode(&dd.tls()), 0o700);
        assert_eq!(mode(&dd.default_storage()), 0o700);
    }

    #[test]
    fn an_imported_key_is_0600_whatever_the_mode_of_its_source() {
        let t = tempfile::tempdir().unwrap();
        let dd = host(t.path());
        // Issue for another host into a fresh folder, then loosen the source key on purpose.
        let out = t.path().join("for-hv2");
        issue_cert(&dd, "hv2.example.org", &out, 30).unwrap();
        assert_eq!(mode(&out), 0o700);
        assert_eq!(mode(&out.join("host-key.pem")), 0o600);
        std::fs::set_permissions(
            out.join("host-key.pem"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let dd2 = DataDir::new(&t.path().join("data2"));
        init_host(
            &dd2,
            InitOptions {
                host_name: "hv2.example.org".into(),
                listen: "127.0.0.1:7444".into(),
                advertise: None,
                storage: vec![],
                accel: Accel::Tcg,
                cert: Some((out.join("host.pem"), out.join("host-key.pem"))),
                trust: vec![out.join("ca.pem")],
                qemu_binary: None,
                metrics: String::new(),
                dashboard: String::new(),
            },
        )
        .unwrap();
        assert_eq!(mode(&tls_paths(&dd2).host_key), 0o600);
    }

    #[test]
    fn issue_cert_refuses_a_symlink_planted_at_the_key_path_and_leaves_its_target_alone() {
        let t = tempfile::tempdir().unwrap();
        let dd = host(t.path());
        let out = t.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o700)).unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&victim, out.join("host-key.pem")).unwrap();
        let e = issue_cert(&dd, "hv2.example.org", &out, 30).unwrap_err();
        assert!(
            matches!(e, InitError::Pki(pki::PkiError::KeyExists { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("remove it"), "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(mode(&victim), 0o644);
        // An existing key file is refused the same way.
        std::fs::remove_file(out.join("host-key.pem")).unwrap();
        std::fs::write(out.join("host-key.pem"), "old").unwrap();
        let e = issue_cert(&dd, "hv2.example.org", &out, 30).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        assert_eq!(
            std::fs::read_to_string(out.join("host-key.pem")).unwrap(),
            "old"
        );
    }

    #[test]
    fn issue_cert_refuses_a_folder_others_can_write_to_or_that_belongs_to_someone_else() {
        let t = tempfile::tempdir().unwrap();
        let dd = host(t.path());
        let out = t.path().join("shared");
        std::fs::create_dir(&out).unwrap();
        for (m, who) in [(0o1777, "every user"), (0o770, "its group")] {
            std::fs::set_permissions(&out, std::fs::Permissions::from_mode(m)).unwrap();
            let e = issue_cert(&dd, "hv2.example.org", &out, 30).unwrap_err();
            assert!(matches!(e, InitError::UnsafeFolder { .. }), "{e}");
            assert!(e.to_string().contains(who), "{e}");
            assert!(e.to_string().contains("mkdir -m 700"), "{e}");
            assert!(std::fs::read_dir(&out).unwrap().next().is_none());
        }
        if nix::unistd::geteuid().is_root() {
            std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o700)).unwrap();
            nix::unistd::chown(&out, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            let e = issue_cert(&dd, "hv2.example.org", &out, 30).unwrap_err();
            assert!(e.to_string().contains("belongs to user id 65534"), "{e}");
            assert!(std::fs::read_dir(&out).unwrap().next().is_none());
        }
    }
}
