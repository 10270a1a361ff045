//! The host context: what every flow of this host receives.
//!
//! [`Host`] holds the data folder, the configuration, this host's TLS identity, the database,
//! the VM manager and the live maps of the running relationships and replica VMs. It imports
//! no flow: the primary, replica and failover modules and both front doors (the management
//! dispatcher in [`crate::daemon`] and the peer server) depend on it, never the other way.
//! Besides the context it carries the host's own settings (replica server, trust,
//! revocations): a change is stored in the state database (never in the configuration file,
//! which is the admin's; see [`crate::host_settings`]) and then put in force; it fails with a
//! [`SettingsError`].

use crate::config::{ConfigError, HostConfig};
use crate::datadir::DataDir;
use crate::db::{Db, DbError};
use crate::error::ApiAnswer;
use crate::locks::{unpoisoned, ReplicaLocks};
use crate::vmm::Vmm;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLockReadGuard, RwLockWriteGuard};
use uuid::Uuid;
use vmrepl_transport::{AuthzError, PkiError, TlsError};
use vmrepl_types::api::ErrorCode;
use vmrepl_types::replication::{Progress, RevokedCert};

/// The running host.
pub struct Host {
    pub dd: DataDir,
    pub cfg: std::sync::RwLock<HostConfig>,
    pub identity: Arc<vmrepl_transport::pki::HostIdentity>,
    pub db: Arc<Mutex<Db>>,
    pub vmm: Arc<Vmm>,
    /// The host's bandwidth limit shared by every relationship (`bandwidth_limit`), if any.
    pub(crate) host_pacer: Option<Arc<crate::peer::client::HostPacer>>,
    /// The primary role's running relationships (scheduler handles, progress).
    pub repl: Runtime,
    /// Per-replica-VM locks and receive slots.
    pub(crate) replica_locks: ReplicaLocks,
    /// The peer listener, kept to rebuild its TLS configuration when the trust changes.
    pub(crate) peer_listener: Arc<vmrepl_transport::tls::Listener>,
    /// Notified to stop the daemon.
    pub(crate) stop: tokio::sync::Notify,
    /// Where the metrics page is served, once bound (`host info` reports it).
    pub(crate) metrics_url: std::sync::OnceLock<String>,
    /// Where the dashboard is served, once bound (`host info` reports it).
    pub(crate) dashboard_url: std::sync::OnceLock<String>,
    /// Held while a change of the host's settings is stored and put in force, so that two
    /// changes do not both start from the same settings.
    settings_change: Mutex<()>,
}

/// In-memory state of the running relationships.
#[derive(Default)]
pub struct Runtime {
    pub(crate) rels: Mutex<HashMap<Uuid, Arc<RelRuntime>>>,
}

/// One relationship's live handles.
#[derive(Default)]
pub struct RelRuntime {
    pub(crate) wake: tokio::sync::Notify,
    pub(crate) progress: Mutex<Option<Progress>>,
    pub(crate) stop: std::sync::atomic::AtomicBool,
    /// The health last journaled (None: not looked at yet since the daemon started).
    pub(crate) last_health: Mutex<Option<vmrepl_types::replication::Health>>,
    /// Whether the replica was told the relationship's recovery-point policy since the daemon
    /// started (or since `replication set` changed it and could not tell it at once): the
    /// next cycle tells it when not.
    pub(crate) policy_sent: std::sync::atomic::AtomicBool,
    /// The digest of the VM definition the replica was last given (None: not since the
    /// daemon started): a cycle gives it the current one when they differ.
    pub(crate) definition_sent: Mutex<Option<[u8; 32]>>,
}

impl Host {
    /// Builds the context from its parts (the daemon's boot sequence does this once).
    pub(crate) fn new(
        dd: DataDir,
        cfg: HostConfig,
        identity: Arc<vmrepl_transport::pki::HostIdentity>,
        db: Arc<Mutex<Db>>,
        vmm: Arc<Vmm>,
        peer_listener: Arc<vmrepl_transport::tls::Listener>,
    ) -> Self {
        let host_pacer = cfg
            .host_bandwidth()
            .ok()
            .flatten()
            .map(|(rate, window)| Arc::new(crate::peer::client::HostPacer::new(rate, window)));
        Host {
            host_pacer,
            dd,
            cfg: std::sync::RwLock::new(cfg),
            identity,
            db,
            vmm,
            repl: Default::default(),
            replica_locks: Default::default(),
            peer_listener,
            stop: tokio::sync::Notify::new(),
            metrics_url: std::sync::OnceLock::new(),
            dashboard_url: std::sync::OnceLock::new(),
            settings_change: Mutex::new(()),
        }
    }

    /// The database, locked.
    ///
    /// The host's one lock policy: a panic while a lock was held does not poison it for the
    /// others (see [`unpoisoned`]). Every database write is one SQL statement or transaction,
    /// so what the database holds stays consistent; SQLite is called under a std mutex from
    /// async code on purpose (each call is short and local).
    pub(crate) fn db(&self) -> MutexGuard<'_, Db> {
        unpoisoned(&self.db)
    }

    /// The configuration in force, for reading.
    pub(crate) fn cfg(&self) -> RwLockReadGuard<'_, HostConfig> {
        self.cfg.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The configuration in force, for a change that is stored before it is put in force.
    pub(crate) fn cfg_mut(&self) -> RwLockWriteGuard<'_, HostConfig> {
        self.cfg.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a change to the replica server settings: stored in the database, then in force.
    pub(crate) fn change_replica_server(
        &self,
        c: vmrepl_types::api::ReplicaServerChange,
    ) -> Result<vmrepl_types::replication::ReplicaServerSettings, SettingsError> {
        let _one = unpoisoned(&self.settings_change);
        let mut next = self.cfg().clone();
        let rs = &mut next.replica_server;
        if let Some(e) = c.enabled {
            rs.enabled = e;
        }
        if let Some(a) = c.allow_any {
            rs.allow_any = a;
        }
        if let Some(a) = c.allow_remote_delete {
            rs.allow_remote_delete = a;
        }
        if let Some(p) = c.default_storage {
            if !p.is_absolute() {
                return Err(SettingsError::RelativeStorage { path: p });
            }
            rs.default_storage = Some(p);
        }
        if let Some(mut entry) = c.add_entry {
            let checked = vmrepl_transport::authz::AuthzEntry::try_from(&entry)?;
            // Stored in the canonical form (upper-case hex, no colons), as shown and logged.
            entry.issuer = checked.issuer;
            entry.pin = checked.pin;
            if !entry.storage.is_absolute() {
                return Err(SettingsError::RelativeStorage {
                    path: entry.storage,
                });
            }
            if entry.trust_group.trim().is_empty() {
                return Err(SettingsError::EmptyTrustGroup);
            }
            rs.entries
                .retain(|e| !e.primary.eq_ignore_ascii_case(&entry.primary));
            rs.entries.push(entry);
        }
        if let Some(p) = c.remove_entry {
            let before = rs.entries.len();
            rs.entries.retain(|e| !e.primary.eq_ignore_ascii_case(&p));
            if rs.entries.len() == before {
                return Err(SettingsError::NoEntry { primary: p });
            }
        }
        for s in rs
            .default_storage
            .iter()
            .chain(rs.entries.iter().map(|e| &e.storage))
        {
            crate::fsutil::create_private_dir_all(s).map_err(|source| {
                SettingsError::StorageFolder {
                    path: s.clone(),
                    source,
                }
            })?;
        }
        next.validate().map_err(SettingsError::Invalid)?;
        self.db()
            .store_replica_server(&next.replica_server)
            .map_err(SettingsError::Store)?;
        let out = next.replica_server.clone();
        self.cfg_mut().replica_server = next.replica_server;
        Ok(out)
    }

    /// Rereads the trusted CAs (`tls/`) and the revocation list (the state database) and puts
    /// them in force for new connections, in and out, without a restart. The answer also says
    /// when the configuration file holds revocations that are not in force (ignored there).
    pub(crate) fn reload_trust(&self) -> Result<String, SettingsError> {
        let _one = unpoisoned(&self.settings_change);
        self.identity
            .reload_trust(&crate::init::trusted_cas(&self.dd))
            .map_err(SettingsError::Trust)?;
        self.peer_listener.reload()?;
        let stored = self.db().host_settings();
        let revoked = match stored {
            Ok(Some(s)) => {
                self.cfg_mut().revoked_certs = s.revoked_certs;
                self.cfg().revoked_certs.clone()
            }
            Ok(None) => self.cfg().revoked_certs.clone(),
            Err(e) => {
                tracing::warn!(target: "vmrepl::daemon", "cannot reread the revocation list: {e}");
                self.cfg().revoked_certs.clone()
            }
        };
        self.identity
            .set_revoked(revoked.iter().map(|r| &r.fingerprint));
        let mut msg = format!(
            "trusting {} CA(s) ({}); {} revoked certificate(s); new connections use them",
            self.identity.trusted_ca_names().len(),
            self.identity.trusted_ca_names().join("; "),
            revoked.len()
        );
        let config = self.dd.config();
        if let Ok((_, file)) = HostConfig::load_with_file_settings(&config) {
            let in_force = crate::host_settings::HostSettings {
                replica_server: self.cfg().replica_server.clone(),
                revoked_certs: revoked,
            };
            let file = crate::config::FileSettings {
                replica_server: None,
                ..file
            };
            for w in crate::host_settings::ignored(&config, &file, &in_force) {
                tracing::warn!(target: "vmrepl::daemon", "{w}");
                msg.push_str(". Note: ");
                msg.push_str(w.trim_end_matches('.'));
            }
        }
        Ok(msg)
    }

    /// This host's certificate, trusted CAs and revocations.
    pub(crate) fn certificates(&self) -> vmrepl_types::api::CertificatesInfo {
        let id = &self.identity;
        vmrepl_types::api::CertificatesInfo {
            host_name: id.host_name().to_string(),
            fingerprint: id.fingerprint().to_string(),
            trusted_cas: id
                .trusted_ca_names()
                .iter()
                .zip(id.trusted_ca_fingerprints())
                .map(|(subject, fingerprint)| vmrepl_types::api::TrustedCa {
                    subject: subject.clone(),
                    fingerprint: fingerprint.clone(),
                })
                .collect(),
            revoked: self.cfg().revoked_certs.clone(),
        }
    }

    /// Adds a certificate to the revocation list: stored in the database and in force for the
    /// next handshake. Returns the canonical fingerprint.
    pub(crate) fn revoke_cert(
        &self,
        fingerprint: &str,
        reason: Option<String>,
        subject: Option<String>,
    ) -> Result<String, SettingsError> {
        let fp = vmrepl_transport::cert::normalize_fingerprint(fingerprint)
            .map_err(|reason| SettingsError::Fingerprint { reason })?;
        if fp == self.identity.fingerprint() {
            return Err(SettingsError::OwnCertificate { fingerprint: fp });
        }
        let _one = unpoisoned(&self.settings_change);
        let mut next = self.cfg().revoked_certs.clone();
        crate::host_settings::add_revocation(&mut next, &fp, reason, subject);
        self.put_revocations(next)?;
        tracing::warn!(target: "vmrepl::daemon", fingerprint = %fp, "revoked a peer certificate");
        Ok(fp)
    }

    /// Takes a certificate off the revocation list (revoked by mistake): stored in the
    /// database and in force for the next handshake. Returns the canonical fingerprint.
    pub(crate) fn unrevoke_cert(&self, fingerprint: &str) -> Result<String, SettingsError> {
        let fp = vmrepl_transport::cert::normalize_fingerprint(fingerprint)
            .map_err(|reason| SettingsError::Fingerprint { reason })?;
        let _one = unpoisoned(&self.settings_change);
        let mut next = self.cfg().revoked_certs.clone();
        if !crate::host_settings::remove_revocation(&mut next, &fp) {
            return Err(SettingsError::NotRevoked { fingerprint: fp });
        }
        self.put_revocations(next)?;
        tracing::warn!(target: "vmrepl::daemon", fingerprint = %fp, "took a peer certificate off the revocation list");
        Ok(fp)
    }

    /// Stores the revocation list and puts it in force (the caller holds `settings_change`).
    fn put_revocations(&self, next: Vec<RevokedCert>) -> Result<(), SettingsError> {
        let mut check = self.cfg().clone();
        check.revoked_certs = next;
        check.validate().map_err(SettingsError::Invalid)?;
        self.db()
            .store_revoked_certs(&check.revoked_certs)
            .map_err(SettingsError::Store)?;
        self.identity
            .set_revoked(check.revoked_certs.iter().map(|r| &r.fingerprint));
        self.cfg_mut().revoked_certs = check.revoked_certs;
        Ok(())
    }
}

/// What can go wrong changing this host's own settings (replica server, trust, revocations).
/// Nothing is changed when one of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A storage folder given as a relative path.
    #[error("Storage folder {} is not an absolute path.", path.display())]
    RelativeStorage { path: PathBuf },
    /// An authorization entry whose primary pattern, issuer or pin is refused.
    #[error(transparent)]
    Entry(#[from] AuthzError),
    /// An authorization entry with an empty trust group.
    #[error("The trust group is empty; name one (for example DEFAULT).")]
    EmptyTrustGroup,
    /// Removing an authorization entry that does not exist.
    #[error("There is no authorization entry for {primary:?}.")]
    NoEntry { primary: String },
    /// Taking a certificate off the revocation list that is not on it.
    #[error(
        "The certificate {fingerprint} is not revoked on this host; `vmrepl host info` lists \
         the revoked ones."
    )]
    NotRevoked { fingerprint: String },
    /// A storage folder cannot be created.
    #[error("Cannot create storage folder {}", path.display())]
    StorageFolder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The changed configuration does not validate.
    #[error(transparent)]
    Invalid(ConfigError),
    /// The changed settings cannot be stored in the state database.
    #[error("The changed settings could not be stored in the state database, so nothing was changed: {0}")]
    Store(#[source] DbError),
    /// The trusted CAs cannot be reread. The sentence starts with the cause and says what
    /// stays in force after it, so the cause is in the message (the API sentence does not
    /// repeat it) as well as the source.
    #[error("{0}; the trusted CAs in force are unchanged")]
    Trust(#[source] PkiError),
    /// The peer listener cannot be rebuilt with the reread trust.
    #[error(transparent)]
    Listener(#[from] TlsError),
    /// A fingerprint that cannot be read.
    #[error("{reason}")]
    Fingerprint { reason: String },
    /// Revoking this host's own certificate.
    #[error(
        "{fingerprint} is this host's own certificate; to retire it, issue this host a new \
         certificate and revoke the old one on its peers"
    )]
    OwnCertificate { fingerprint: String },
}

impl ApiAnswer for SettingsError {
    /// The stable API code of this error.
    fn code(&self) -> ErrorCode {
        use SettingsError::*;
        match self {
            RelativeStorage { .. }
            | Entry(_)
            | EmptyTrustGroup
            | Invalid(_)
            | Trust(_)
            | Fingerprint { .. }
            | OwnCertificate { .. } => ErrorCode::InvalidInput,
            NoEntry { .. } | NotRevoked { .. } => ErrorCode::NotFound,
            StorageFolder { .. } | Listener(_) => ErrorCode::Io,
            Store(_) => ErrorCode::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::HostError;

    #[test]
    fn each_kind_of_settings_failure_maps_to_its_api_code_through_host_error() {
        let cases = [
            (
                SettingsError::RelativeStorage { path: "vms".into() },
                ErrorCode::InvalidInput,
            ),
            (
                SettingsError::NoEntry {
                    primary: "hosta".into(),
                },
                ErrorCode::NotFound,
            ),
            (
                SettingsError::Store(DbError::Corrupt("bad row".into())),
                ErrorCode::Internal,
            ),
            (
                SettingsError::NotRevoked {
                    fingerprint: "AB".repeat(32),
                },
                ErrorCode::NotFound,
            ),
            (
                SettingsError::Invalid(ConfigError::Invalid("no storage".into())),
                ErrorCode::InvalidInput,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code, "{e}");
            let api = e.to_api();
            let host = HostError::from(e);
            assert_eq!(host.code(), code);
            assert_eq!(host.to_api(), api, "the two ways to the API agree");
        }
    }

    #[test]
    fn a_storage_folder_that_cannot_be_created_keeps_its_cause_and_names_it_once() {
        let source = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let cause = source.to_string();
        let e = SettingsError::StorageFolder {
            path: "/srv/replicas".into(),
            source,
        };
        assert!(std::error::Error::source(&e).is_some());
        let api = HostError::from(e).to_api();
        assert_eq!(api.code, ErrorCode::Io);
        assert_eq!(
            api.message,
            format!("Cannot create storage folder /srv/replicas: {cause}")
        );
    }

    #[test]
    fn unreadable_trust_says_the_cas_in_force_are_unchanged_after_its_cause_once() {
        let source = PkiError::HostName(AuthzError::InvalidPattern {
            pattern: "*".into(),
            reason: "too wide".into(),
        });
        let before = format!("{source}; the trusted CAs in force are unchanged");
        let e = SettingsError::Trust(source);
        assert!(std::error::Error::source(&e).is_some());
        let api = e.to_api();
        assert_eq!(api.code, ErrorCode::InvalidInput);
        assert_eq!(api.message, before);
    }
}
