//! The host's own settings: the ones commands change at run time, kept in the state database
//! (`host_settings`, see [`crate::db`]), never in the configuration file.
//!
//! The configuration file (`--config FILE`, by default `DATA/config.toml`) is the admin's: the
//! daemon reads it and never writes it, so its comments and layout survive. What commands
//! change lives in the database:
//!
//! - the replica server settings (`vmrepl replication server set/authorize/revoke`): enabled,
//!   allow-any and its default storage, authorization entries with their trust groups, remote
//!   delete;
//! - the revoked peer certificates (`vmrepl host revoke-cert/unrevoke-cert`).
//!
//! **Precedence.** Hosts made before this split kept those settings in the file
//! (`[replica_server]`, `[[revoked_certs]]`), and a script may still prepare a host that way
//! before its first start. The first time the host's settings are needed (the daemon's start,
//! or `host revoke-cert` without a daemon) and the database holds none, they are taken from
//! the file's sections when it has them, else the defaults; that import is journaled once.
//! From then on the database alone is in force: the file's sections are ignored, and the
//! daemon warns at its start (and `host reload-trust` says) when they differ from what is in
//! force, naming the command to use instead.

use crate::config::{ConfigError, FileSettings, HostConfig};
use crate::datadir::DataDir;
pub use crate::db::HostSettings;
use crate::db::{Db, DbError};
use std::path::{Path, PathBuf};
use vmrepl_types::replication::{ReplicaServerSettings, RevokedCert};

impl HostSettings {
    /// A new host's: the replica server off, replicas of any primary (once allowed) in
    /// `DATA/replica`, no certificate revoked.
    pub fn defaults(dd: &DataDir) -> Self {
        HostSettings {
            replica_server: ReplicaServerSettings {
                default_storage: Some(dd.default_replica_storage()),
                ..Default::default()
            },
            revoked_certs: Vec::new(),
        }
    }

    /// Puts these settings in force in `cfg` (the configuration the daemon runs with).
    pub fn apply(&self, cfg: &mut HostConfig) {
        cfg.replica_server = self.replica_server.clone();
        cfg.revoked_certs = self.revoked_certs.clone();
    }
}

/// What [`load`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The settings in force.
    pub settings: HostSettings,
    /// When the settings were stored just now for the first time: what was journaled.
    pub first: Option<String>,
    /// One sentence per section of the file that differs from the settings in force and is
    /// ignored.
    pub ignored: Vec<String>,
}

/// The host's settings from the database; the first time (none stored yet), taken from the
/// configuration file `config` (its sections `file`) or the defaults, stored and journaled.
pub fn load(db: &Db, dd: &DataDir, config: &Path, file: &FileSettings) -> Result<Loaded, DbError> {
    if let Some(settings) = db.host_settings()? {
        let ignored = ignored(config, file, &settings);
        return Ok(Loaded {
            settings,
            first: None,
            ignored,
        });
    }
    let mut settings = HostSettings::defaults(dd);
    let mut taken = Vec::new();
    if let Some(rs) = &file.replica_server {
        settings.replica_server = rs.clone();
        taken.push("[replica_server]".to_string());
    }
    if let Some(r) = &file.revoked_certs {
        settings.revoked_certs = r.clone();
        taken.push(format!("{} [[revoked_certs]]", r.len()));
    }
    let first = if taken.is_empty() {
        format!(
            "host settings stored in the state database with their defaults (replica server \
             off); change them with `vmrepl replication server ...` and `vmrepl host \
             revoke-cert`, the configuration file {} is never written",
            config.display()
        )
    } else {
        format!(
            "imported {} from {} into the state database: from now on the database holds \
             these settings and the file's sections are ignored (change them with `vmrepl \
             replication server set/authorize/revoke` and `vmrepl host \
             revoke-cert/unrevoke-cert`; the sections may be deleted from the file, which \
             vmrepl never writes)",
            taken.join(" and "),
            config.display()
        )
    };
    db.store_host_settings(&settings, (!taken.is_empty()).then_some(first.as_str()))?;
    Ok(Loaded {
        settings,
        first: Some(first),
        ignored: Vec::new(),
    })
}

/// The sections of the file that differ from the settings in force, each as the warning to
/// give: they are ignored.
pub fn ignored(config: &Path, file: &FileSettings, s: &HostSettings) -> Vec<String> {
    let mut out = Vec::new();
    if file
        .replica_server
        .as_ref()
        .is_some_and(|rs| *rs != s.replica_server)
    {
        out.push(format!(
            "{} has a [replica_server] section that differs from the replica server settings \
             in force; it is ignored, the state database holds these settings since they were \
             imported. Show them with `vmrepl replication server show`, change them with \
             `vmrepl replication server set/authorize/revoke`, and delete the section from \
             the file.",
            config.display()
        ));
    }
    if let Some(r) = &file.revoked_certs {
        let mut in_file: Vec<&str> = r.iter().map(|r| r.fingerprint.as_str()).collect();
        let mut in_force: Vec<&str> = s
            .revoked_certs
            .iter()
            .map(|r| r.fingerprint.as_str())
            .collect();
        in_file.sort_unstable();
        in_force.sort_unstable();
        if in_file != in_force {
            out.push(format!(
                "{} has [[revoked_certs]] that differ from the certificates revoked in force \
                 ({} in the file, {} in force); they are ignored, the state database holds the \
                 revocations since they were imported. Show them with `vmrepl host info`, \
                 change them with `vmrepl host revoke-cert` and `vmrepl host unrevoke-cert`, \
                 and delete the sections from the file.",
                config.display(),
                in_file.len(),
                in_force.len()
            ));
        }
    }
    out
}

/// Adds `fingerprint` (canonical form) to the revocation list, or updates its reason and
/// subject when it is there already.
pub fn add_revocation(
    list: &mut Vec<RevokedCert>,
    fingerprint: &str,
    reason: Option<String>,
    subject: Option<String>,
) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match list.iter_mut().find(|r| r.fingerprint == fingerprint) {
        Some(r) => {
            r.reason = reason.or(r.reason.take());
            r.subject = subject.or(r.subject.take());
        }
        None => list.push(RevokedCert {
            fingerprint: fingerprint.to_string(),
            reason,
            subject,
            revoked_at_unix: now,
        }),
    }
}

/// Removes `fingerprint` (canonical form) from the revocation list; false when it is not there.
pub fn remove_revocation(list: &mut Vec<RevokedCert>, fingerprint: &str) -> bool {
    let before = list.len();
    list.retain(|r| r.fingerprint != fingerprint);
    list.len() != before
}

/// Errors changing the settings without a daemon (`host revoke-cert` and `unrevoke-cert` while
/// it is stopped).
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(
        "The certificate {fingerprint} is not revoked on this host; `vmrepl host info` lists \
         the revoked ones."
    )]
    NotRevoked { fingerprint: String },
}

/// Opens the host's database and its settings, for a change made while the daemon is stopped.
/// The configuration file is read only when the database holds no settings yet (they are
/// imported from it then, as the daemon does), so a command that does not name the file still
/// works once the daemon has started once.
fn offline(dd: &DataDir) -> Result<(Db, HostSettings), OfflineError> {
    let db = Db::open(&dd.db())?;
    if let Some(s) = db.host_settings()? {
        return Ok((db, s));
    }
    let config = dd.config();
    let (_, file) = HostConfig::load_with_file_settings(&config)?;
    let loaded = load(&db, dd, &config, &file)?;
    if let Some(first) = &loaded.first {
        tracing::info!(target: "vmrepl::daemon", "{first}");
    }
    Ok((db, loaded.settings))
}

/// `host revoke-cert` while the daemon is stopped: stored in the database, in force from the
/// daemon's next start. Returns the database's path.
pub fn revoke_offline(
    dd: &DataDir,
    fingerprint: &str,
    reason: Option<String>,
    subject: Option<String>,
) -> Result<PathBuf, OfflineError> {
    let (db, settings) = offline(dd)?;
    let mut list = settings.revoked_certs;
    add_revocation(&mut list, fingerprint, reason, subject);
    db.store_revoked_certs(&list)?;
    Ok(dd.db())
}

/// `host unrevoke-cert` while the daemon is stopped. Returns the database's path.
pub fn unrevoke_offline(dd: &DataDir, fingerprint: &str) -> Result<PathBuf, OfflineError> {
    let (db, settings) = offline(dd)?;
    let mut list = settings.revoked_certs;
    if !remove_revocation(&mut list, fingerprint) {
        return Err(OfflineError::NotRevoked {
            fingerprint: fingerprint.to_string(),
        });
    }
    db.store_revoked_certs(&list)?;
    Ok(dd.db())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmrepl_types::replication::AuthorizationEntry;

    fn revoked(fp: char) -> RevokedCert {
        RevokedCert {
            fingerprint: fp.to_string().repeat(64),
            reason: None,
            subject: None,
            revoked_at_unix: 1,
        }
    }

    fn server() -> ReplicaServerSettings {
        ReplicaServerSettings {
            enabled: true,
            allow_any: false,
            default_storage: None,
            entries: vec![AuthorizationEntry {
                primary: "hosta.example".into(),
                storage: "/srv/replicas".into(),
                trust_group: "lab".into(),
                issuer: None,
                pin: None,
            }],
            allow_remote_delete: true,
        }
    }

    fn host() -> (tempfile::TempDir, DataDir, Db) {
        let d = tempfile::tempdir().unwrap();
        let dd = DataDir::new(d.path());
        let db = Db::open(&dd.db()).unwrap();
        (d, dd, db)
    }

    #[test]
    fn a_new_host_gets_the_defaults_once_without_an_import_in_the_journal() {
        let (_d, dd, db) = host();
        let cfg = dd.config();
        let l = load(&db, &dd, &cfg, &FileSettings::default()).unwrap();
        assert_eq!(l.settings, HostSettings::defaults(&dd));
        assert_eq!(
            l.settings.replica_server.default_storage,
            Some(dd.default_replica_storage())
        );
        assert!(l.first.as_deref().unwrap().contains("defaults"), "{l:?}");
        assert!(db.events(None, None, None, 10).unwrap().is_empty());
        let again = load(&db, &dd, &cfg, &FileSettings::default()).unwrap();
        assert_eq!(again.first, None);
        assert_eq!(again.settings, l.settings);
    }

    #[test]
    fn an_old_style_file_is_imported_once_and_journaled_then_the_database_is_in_force() {
        let (_d, dd, db) = host();
        let cfg = Path::new("/etc/vmrepl/vmrepl.toml");
        let file = FileSettings {
            replica_server: Some(server()),
            revoked_certs: Some(vec![revoked('A')]),
        };
        let l = load(&db, &dd, cfg, &file).unwrap();
        assert_eq!(l.settings.replica_server, server());
        assert_eq!(l.settings.revoked_certs, vec![revoked('A')]);
        let first = l.first.unwrap();
        assert!(
            first.contains("[replica_server] and 1 [[revoked_certs]]")
                && first.contains("/etc/vmrepl/vmrepl.toml"),
            "{first}"
        );
        assert!(l.ignored.is_empty(), "the file agrees with what it gave");
        let ev = db.events(None, None, None, 10).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].message, first);

        // A later start with the same file: nothing imported again, nothing to warn about.
        let l = load(&db, &dd, cfg, &file).unwrap();
        assert_eq!((l.first, l.ignored.len()), (None, 0));
        assert_eq!(db.events(None, None, None, 10).unwrap().len(), 1);
    }

    #[test]
    fn after_the_import_edits_of_the_file_are_ignored_with_a_warning_naming_the_command() {
        let (_d, dd, db) = host();
        let cfg = Path::new("/etc/vmrepl/vmrepl.toml");
        let file = FileSettings {
            replica_server: Some(server()),
            revoked_certs: None,
        };
        load(&db, &dd, cfg, &file).unwrap();
        // Changed by commands since (stored in the database).
        let mut rs = server();
        rs.enabled = false;
        db.store_replica_server(&rs).unwrap();
        // And the admin edits the file, adding revocations.
        let edited = FileSettings {
            replica_server: Some(server()),
            revoked_certs: Some(vec![revoked('B')]),
        };
        let l = load(&db, &dd, cfg, &edited).unwrap();
        assert_eq!(l.settings.replica_server, rs, "the database wins");
        assert!(l.settings.revoked_certs.is_empty(), "the database wins");
        assert_eq!(l.ignored.len(), 2, "{:?}", l.ignored);
        assert!(
            l.ignored[0].contains("[replica_server]")
                && l.ignored[0].contains("vmrepl replication server set"),
            "{}",
            l.ignored[0]
        );
        assert!(
            l.ignored[1].contains("[[revoked_certs]]")
                && l.ignored[1].contains("vmrepl host revoke-cert"),
            "{}",
            l.ignored[1]
        );
        // A file without those sections is not reported.
        let l = load(&db, &dd, cfg, &FileSettings::default()).unwrap();
        assert!(l.ignored.is_empty());
    }

    #[test]
    fn without_a_daemon_a_revocation_imports_the_file_first_and_then_needs_it_no_more() {
        let (_d, dd, db) = host();
        let mut cfg = HostConfig::new("h.example", "127.0.0.1:7443", vec!["/srv".into()]);
        cfg.revoked_certs.push(revoked('A'));
        cfg.save(&dd.config()).unwrap();
        let text = std::fs::read(dd.config()).unwrap();
        let b = "B".repeat(64);
        revoke_offline(&dd, &b, Some("stolen".into()), None).unwrap();
        let s = db.host_settings().unwrap().unwrap();
        let fps: Vec<&str> = s
            .revoked_certs
            .iter()
            .map(|r| r.fingerprint.as_str())
            .collect();
        assert_eq!(fps, ["A".repeat(64), b.clone()]);
        assert_eq!(
            std::fs::read(dd.config()).unwrap(),
            text,
            "the file is not written"
        );
        assert_eq!(db.events(None, None, None, 10).unwrap().len(), 1);

        // The file is needed no more (a command that does not name it, e.g. --config unset).
        let elsewhere = DataDir::new(dd.root()).with_config(Path::new("/nonexistent/x.toml"));
        unrevoke_offline(&elsewhere, &"A".repeat(64)).unwrap();
        let e = unrevoke_offline(&elsewhere, &"A".repeat(64)).unwrap_err();
        assert!(matches!(e, OfflineError::NotRevoked { .. }), "{e}");
        let s = db.host_settings().unwrap().unwrap();
        assert_eq!(s.revoked_certs.len(), 1);
        assert_eq!(s.revoked_certs[0].reason.as_deref(), Some("stolen"));
    }

    #[test]
    fn revocations_are_added_once_updated_in_place_and_removed() {
        let mut list = Vec::new();
        let fp = "A".repeat(64);
        add_revocation(&mut list, &fp, Some("lost".into()), None);
        add_revocation(&mut list, &fp, None, Some("CN=x".into()));
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].reason.as_deref(), Some("lost"));
        assert_eq!(list[0].subject.as_deref(), Some("CN=x"));
        assert!(remove_revocation(&mut list, &fp));
        assert!(!remove_revocation(&mut list, &fp));
        assert!(list.is_empty());
    }
}
