//! The host context: what every flow of this host receives.
//!
//! [`Host`] holds the data folder, the configuration, this host's TLS identity, the database,
//! the VM manager and the live maps of the running relationships and replica VMs. It imports
//! no flow: the primary, replica and failover modules and both front doors (the management
//! dispatcher in [`crate::daemon`] and the peer server) depend on it, never the other way.
//! Besides the context it carries the host's own settings (replica server, trust,
//! revocations), which change the configuration and nothing else.

use crate::config::HostConfig;
use crate::datadir::DataDir;
use crate::db::Db;
use crate::error::HostError;
use crate::locks::{unpoisoned, ReplicaLocks};
use crate::vmm::Vmm;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLockReadGuard, RwLockWriteGuard};
use uuid::Uuid;
use vmrepl_types::api::{ApiError, ErrorCode};
use vmrepl_types::replication::Progress;

/// The running host.
pub struct Host {
    pub dd: DataDir,
    pub cfg: std::sync::RwLock<HostConfig>,
    pub identity: Arc<vmrepl_transport::pki::HostIdentity>,
    pub db: Arc<Mutex<Db>>,
    pub vmm: Arc<Vmm>,
    /// The primary role's running relationships (scheduler handles, progress).
    pub repl: Runtime,
    /// Per-replica-VM locks and receive slots.
    pub(crate) replica_locks: ReplicaLocks,
    /// The peer listener, kept to rebuild its TLS configuration when the trust changes.
    pub(crate) peer_listener: Arc<vmrepl_transport::tls::Listener>,
    /// Notified to stop the daemon.
    pub(crate) stop: tokio::sync::Notify,
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
        Host {
            dd,
            cfg: std::sync::RwLock::new(cfg),
            identity,
            db,
            vmm,
            repl: Default::default(),
            replica_locks: Default::default(),
            peer_listener,
            stop: tokio::sync::Notify::new(),
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

    /// The configuration in force, for a change that is saved before it is put in force.
    pub(crate) fn cfg_mut(&self) -> RwLockWriteGuard<'_, HostConfig> {
        self.cfg.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a change to the replica server settings and saves the configuration.
    pub(crate) fn change_replica_server(
        &self,
        c: vmrepl_types::api::ReplicaServerChange,
    ) -> Result<vmrepl_types::replication::ReplicaServerSettings, HostError> {
        let mut cfg = self.cfg_mut();
        let mut next = cfg.clone();
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
                return Err(HostError::Api(ApiError::new(
                    ErrorCode::InvalidInput,
                    format!("Storage folder {} is not an absolute path.", p.display()),
                )));
            }
            rs.default_storage = Some(p);
        }
        if let Some(mut entry) = c.add_entry {
            let checked = vmrepl_transport::authz::AuthzEntry::try_from(&entry)
                .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))?;
            // Stored in the canonical form (upper-case hex, no colons), as shown and logged.
            entry.issuer = checked.issuer;
            entry.pin = checked.pin;
            if !entry.storage.is_absolute() {
                return Err(HostError::Api(ApiError::new(
                    ErrorCode::InvalidInput,
                    format!(
                        "Storage folder {} is not an absolute path.",
                        entry.storage.display()
                    ),
                )));
            }
            if entry.trust_group.trim().is_empty() {
                return Err(HostError::Api(ApiError::new(
                    ErrorCode::InvalidInput,
                    "The trust group is empty; name one (for example DEFAULT).",
                )));
            }
            rs.entries
                .retain(|e| !e.primary.eq_ignore_ascii_case(&entry.primary));
            rs.entries.push(entry);
        }
        if let Some(p) = c.remove_entry {
            let before = rs.entries.len();
            rs.entries.retain(|e| !e.primary.eq_ignore_ascii_case(&p));
            if rs.entries.len() == before {
                return Err(HostError::Api(ApiError::new(
                    ErrorCode::NotFound,
                    format!("There is no authorization entry for {p:?}."),
                )));
            }
        }
        for s in rs
            .default_storage
            .iter()
            .chain(rs.entries.iter().map(|e| &e.storage))
        {
            crate::fsutil::create_private_dir_all(s).map_err(|e| {
                ApiError::new(
                    ErrorCode::Io,
                    format!("Cannot create storage folder {}: {e}", s.display()),
                )
            })?;
        }
        next.validate()
            .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))?;
        next.save(&self.dd.config())
            .map_err(|e| ApiError::new(ErrorCode::Io, e.to_string()))?;
        let out = next.replica_server.clone();
        *cfg = next;
        Ok(out)
    }

    /// Rereads the trusted CAs (`tls/`) and the revocation list (config.toml) and puts them in
    /// force for new connections, in and out, without a restart.
    pub(crate) fn reload_trust(&self) -> Result<String, HostError> {
        self.identity
            .reload_trust(&crate::init::trusted_cas(&self.dd))
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::InvalidInput,
                    format!("{e}; the trusted CAs in force are unchanged"),
                )
            })?;
        self.peer_listener
            .reload()
            .map_err(|e| ApiError::new(ErrorCode::Io, e.to_string()))?;
        let revoked = match HostConfig::load(&self.dd.config()) {
            Ok(cfg) => {
                let mut current = self.cfg_mut();
                current.revoked_certs = cfg.revoked_certs;
                current.revoked_certs.clone()
            }
            Err(e) => {
                tracing::warn!(target: "vmrepl::daemon", "cannot reread the revocation list: {e}");
                self.cfg().revoked_certs.clone()
            }
        };
        self.identity
            .set_revoked(revoked.iter().map(|r| &r.fingerprint));
        Ok(format!(
            "trusting {} CA(s) ({}); {} revoked certificate(s); new connections use them",
            self.identity.trusted_ca_names().len(),
            self.identity.trusted_ca_names().join("; "),
            revoked.len()
        ))
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

    /// Adds a certificate to the revocation list: saved in the configuration and in force
    /// for the next handshake. Returns the canonical fingerprint.
    pub(crate) fn revoke_cert(
        &self,
        fingerprint: &str,
        reason: Option<String>,
        subject: Option<String>,
    ) -> Result<String, HostError> {
        let fp = vmrepl_transport::cert::normalize_fingerprint(fingerprint)
            .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e))?;
        if fp == self.identity.fingerprint() {
            return Err(HostError::Api(ApiError::new(
                ErrorCode::InvalidInput,
                format!(
                    "{fp} is this host's own certificate; to retire it, issue this host a new \
                     certificate and revoke the old one on its peers"
                ),
            )));
        }
        let mut cfg = self.cfg_mut();
        let mut next = cfg.clone();
        crate::config::add_revocation(&mut next, &fp, reason, subject);
        next.validate()
            .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))?;
        next.save(&self.dd.config())
            .map_err(|e| ApiError::new(ErrorCode::Io, e.to_string()))?;
        self.identity
            .set_revoked(next.revoked_certs.iter().map(|r| &r.fingerprint));
        tracing::warn!(target: "vmrepl::daemon", fingerprint = %fp, "revoked a peer certificate");
        *cfg = next;
        Ok(fp)
    }
}
