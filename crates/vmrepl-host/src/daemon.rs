//! The daemon: wires the parts together and answers management requests.

use crate::config::HostConfig;
use crate::datadir::DataDir;
use crate::db::Db;
use crate::mgmt::{self, Handler};
use crate::vmm::Vmm;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmrepl_types::api::{ApiError, ErrorCode, Request, Response};

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    DataDir(#[from] crate::datadir::DataDirError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error(transparent)]
    Mgmt(#[from] crate::mgmt::MgmtError),
    #[error("Cannot read this host's capabilities: {0}")]
    Caps(String),
    #[error("Cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("The peer listener could not start: {0}")]
    Peer(String),
}

/// The running host.
pub struct Daemon {
    pub dd: DataDir,
    pub cfg: std::sync::RwLock<HostConfig>,
    pub identity: Arc<vmrepl_transport::pki::HostIdentity>,
    pub db: Arc<Mutex<Db>>,
    pub vmm: Arc<Vmm>,
    pub repl: crate::replication::Runtime,
    /// The peer listener, kept to rebuild its TLS configuration when the trust changes.
    peer_listener: Arc<vmrepl_transport::tls::Listener>,
    stop: tokio::sync::Notify,
}

/// Runs the daemon in the foreground until asked to stop (request or SIGTERM/SIGINT).
pub fn run_foreground(dd: &DataDir) -> Result<(), DaemonError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    rt.block_on(run(dd.clone()))
}

/// Runs the daemon on the current runtime.
pub async fn run(dd: DataDir) -> Result<(), DaemonError> {
    dd.require_host()?;
    let _lock = dd.lock()?;
    let cfg = HostConfig::load(&dd.config())?;
    let db = Arc::new(Mutex::new(Db::open(&dd.db())?));
    let mut opts =
        vmrepl_qemu::caps::ProbeOptions::new(&cfg.qemu_binary, cfg.storage.clone(), cfg.accel);
    opts.ovmf_dir = cfg.ovmf_dir.clone();
    opts.seabios_dir = cfg.seabios_dir.clone();
    opts.host_name = Some(cfg.host_name.clone());
    let probe = vmrepl_qemu::caps::probe(&opts)
        .await
        .map_err(|e| DaemonError::Caps(e.to_string()))?;
    let caps = probe.info.clone();
    let accel = vmrepl_qemu::caps::resolve_accel(cfg.accel, &caps)
        .map_err(|e| DaemonError::Caps(e.to_string()))?;
    tracing::info!(target: "vmrepl::daemon", host = %cfg.host_name, qemu = %caps.qemu_version, ?accel, "starting");
    let vmm = Vmm::new(
        dd.clone(),
        cfg.clone(),
        caps,
        probe.machines,
        accel,
        db.clone(),
    );
    vmm.reattach_all().await;
    let tp = crate::init::tls_paths(&dd);
    let identity = Arc::new(
        vmrepl_transport::pki::HostIdentity::load(
            &tp.host_cert,
            &tp.host_key,
            &crate::init::trusted_cas(&dd),
        )
        .map_err(|e| DaemonError::Peer(e.to_string()))?,
    );
    // Revocations apply to every handshake, in and out, through this shared identity.
    identity.set_revoked(cfg.revoked_certs.iter().map(|r| &r.fingerprint));
    let mut peer_listener =
        vmrepl_transport::tls::Listener::bind(cfg.listen.as_str(), identity.clone())
            .await
            .map_err(|e| DaemonError::Peer(format!("cannot listen on {}: {e}", cfg.listen)))?;
    peer_listener.set_limits(cfg.peer_limits.listener());
    let peer_listener = Arc::new(peer_listener);
    let listener = mgmt::bind(&dd.socket())?;
    let d = Arc::new(Daemon {
        dd: dd.clone(),
        cfg: std::sync::RwLock::new(cfg),
        identity,
        db,
        vmm,
        repl: Default::default(),
        peer_listener: peer_listener.clone(),
        stop: tokio::sync::Notify::new(),
    });
    let server = tokio::spawn(mgmt::serve(listener, d.clone()));
    let peer = tokio::spawn(crate::peer::server::serve(peer_listener, d.clone()));
    crate::replica::recover(&d).await;
    crate::replication::start_all(&d);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DaemonError::Runtime)?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(DaemonError::Runtime)?;
    tracing::info!(target: "vmrepl::daemon", socket = %dd.socket().display(), "ready");
    loop {
        tokio::select! {
            _ = d.stop.notified() => break,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hup.recv() => {
                // SIGHUP: reread the trusted CAs and the revocation list.
                match d.reload_trust() {
                    Ok(m) => tracing::info!(target: "vmrepl::daemon", "SIGHUP: {m}"),
                    Err(e) => tracing::warn!(target: "vmrepl::daemon", "SIGHUP: {}", e.message),
                }
            }
        }
    }
    server.abort();
    peer.abort();
    let _ = std::fs::remove_file(dd.socket());
    tracing::info!(target: "vmrepl::daemon", "stopped; running VMs keep running");
    Ok(())
}

impl Handler for Daemon {
    async fn handle(self: Arc<Self>, req: Request) -> Response {
        match self.dispatch(req).await {
            Ok(r) => r,
            Err(e) => Response::Error(e),
        }
    }
}

impl Daemon {
    /// Applies a change to the replica server settings and saves the configuration.
    fn change_replica_server(
        &self,
        c: vmrepl_types::api::ReplicaServerChange,
    ) -> Result<vmrepl_types::replication::ReplicaServerSettings, ApiError> {
        let mut cfg = self.cfg.write().expect("cfg");
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
                return Err(ApiError::new(
                    ErrorCode::InvalidInput,
                    format!("Storage folder {} is not an absolute path.", p.display()),
                ));
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
                return Err(ApiError::new(
                    ErrorCode::InvalidInput,
                    format!(
                        "Storage folder {} is not an absolute path.",
                        entry.storage.display()
                    ),
                ));
            }
            if entry.trust_group.trim().is_empty() {
                return Err(ApiError::new(
                    ErrorCode::InvalidInput,
                    "The trust group is empty; name one (for example DEFAULT).",
                ));
            }
            rs.entries
                .retain(|e| !e.primary.eq_ignore_ascii_case(&entry.primary));
            rs.entries.push(entry);
        }
        if let Some(p) = c.remove_entry {
            let before = rs.entries.len();
            rs.entries.retain(|e| !e.primary.eq_ignore_ascii_case(&p));
            if rs.entries.len() == before {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!("There is no authorization entry for {p:?}."),
                ));
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
    fn reload_trust(&self) -> Result<String, ApiError> {
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
                let mut current = self.cfg.write().expect("cfg");
                current.revoked_certs = cfg.revoked_certs;
                current.revoked_certs.clone()
            }
            Err(e) => {
                tracing::warn!(target: "vmrepl::daemon", "cannot reread the revocation list: {e}");
                self.cfg.read().expect("cfg").revoked_certs.clone()
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
    fn certificates(&self) -> vmrepl_types::api::CertificatesInfo {
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
            revoked: self.cfg.read().expect("cfg").revoked_certs.clone(),
        }
    }

    /// Adds a certificate to the revocation list: saved in the configuration and in force
    /// for the next handshake. Returns the canonical fingerprint.
    fn revoke_cert(
        &self,
        fingerprint: &str,
        reason: Option<String>,
        subject: Option<String>,
    ) -> Result<String, ApiError> {
        let fp = vmrepl_transport::cert::normalize_fingerprint(fingerprint)
            .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e))?;
        if fp == self.identity.fingerprint() {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!(
                    "{fp} is this host's own certificate; to retire it, issue this host a new \
                     certificate and revoke the old one on its peers"
                ),
            ));
        }
        let mut cfg = self.cfg.write().expect("cfg");
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

    async fn dispatch(self: &Arc<Self>, req: Request) -> Result<Response, ApiError> {
        let vmm = &self.vmm;
        Ok(match req {
            Request::Ping => Response::Ok {
                message: "pong".into(),
            },
            Request::HostInfo => {
                let mut info = vmm.caps().clone();
                let storage = self.cfg.read().expect("cfg").storage.clone();
                info.storage = storage
                    .iter()
                    .filter_map(|p| vmrepl_qemu::caps::storage_info(p).ok())
                    .collect();
                Response::HostInfo(Box::new(info))
            }
            Request::VmCreate(c) => Response::Vm(Box::new(vmm.create(c).await?)),
            Request::VmList => Response::VmList { vms: vmm.list()? },
            Request::VmShow { name } => Response::Vm(Box::new(vmm.show(&name)?)),
            Request::VmStart { name } => Response::Vm(Box::new(vmm.start(&name).await?)),
            Request::VmShutdown {
                name,
                timeout_secs,
                force_after,
            } => Response::Vm(Box::new(
                vmm.shutdown(&name, Duration::from_secs(timeout_secs), force_after)
                    .await?,
            )),
            Request::VmStop { name } => Response::Vm(Box::new(vmm.stop(&name).await?)),
            Request::VmDelete { name, keep_disks } => Response::Ok {
                message: vmm.delete(&name, keep_disks).await?,
            },
            Request::VmConsole { name, tail_bytes } => Response::Console {
                text: vmm.console(&name, tail_bytes)?,
            },
            Request::Shutdown => {
                self.stop.notify_one();
                Response::Ok {
                    message: "daemon stopping; running VMs keep running".into(),
                }
            }
            Request::ReplicaServerShow => {
                let cfg = self.cfg.read().expect("cfg");
                Response::ReplicaServer {
                    listen: cfg.listen.clone(),
                    settings: cfg.replica_server.clone(),
                    revoked: cfg.revoked_certs.clone(),
                }
            }
            Request::ReplicaServerSet(change) => Response::ReplicaServer {
                settings: self.change_replica_server(change)?,
                listen: self.cfg.read().expect("cfg").listen.clone(),
                revoked: self.cfg.read().expect("cfg").revoked_certs.clone(),
            },
            Request::HostCertificates => Response::Certificates(Box::new(self.certificates())),
            Request::HostReloadTrust => Response::Ok {
                message: self.reload_trust()?,
            },
            Request::HostRevokeCert {
                fingerprint,
                reason,
                subject,
            } => {
                let fp = self.revoke_cert(&fingerprint, reason, subject)?;
                Response::Ok {
                    message: format!(
                        "revoked the certificate {fp}: refused at every handshake from now on, \
                         in and out (connections already open are not cut; restart the daemon \
                         to end them)"
                    ),
                }
            }
            Request::ReplicationEnable { name, settings } => Response::Ok {
                message: crate::replication::enable(self, &name, settings).await?,
            },
            Request::ReplicationStatus { name } => {
                // Primary-side relationships and replica VMs alike, by VM name.
                let mut relationships = crate::replication::statuses(self);
                relationships.extend(crate::replica::statuses(self));
                if let Some(n) = &name {
                    relationships.retain(|r| r.vm == *n);
                    if relationships.is_empty() {
                        return Err(ApiError::new(
                            ErrorCode::NotFound,
                            format!("Replication is not enabled for VM {n} on this host."),
                        ));
                    }
                }
                Response::Replication { relationships }
            }
            Request::ReplicationPause { name } => Response::Ok {
                message: crate::replication::pause(self, &name)?,
            },
            Request::ReplicationResume {
                name,
                resynchronize,
            } => Response::Ok {
                message: crate::replication::resume(self, &name, resynchronize)?,
            },
            Request::ReplicationImport { name, from } => Response::Ok {
                message: crate::replica::import_initial(self, &name, &from).await?,
            },
            Request::ReplicationNow {
                name,
                app_consistent,
            } => Response::Ok {
                message: crate::replication::now(self, &name, app_consistent).await?,
            },
            Request::ReplicationRemove {
                name,
                delete_replica,
            } => Response::Ok {
                message: crate::replication::remove(self, &name, delete_replica).await?,
            },
            Request::RecoveryPoints { name } => Response::RecoveryPoints {
                points: crate::failover::points(self, &name).await?,
                vm: name,
            },
            Request::ReplicaNetwork {
                name,
                adapter,
                failover,
                test,
            } => Response::ReplicaNetworks {
                adapters: crate::replica::set_networks(self, &name, adapter, failover, test)?,
                vm: name,
            },
            Request::FailoverPrepare { name } => Response::Ok {
                message: crate::failover::prepare(self, &name).await?,
            },
            Request::FailoverStart {
                name,
                point,
                start,
                risk_split_brain,
                network,
            } => Response::Ok {
                message: crate::failover::start(
                    self,
                    &name,
                    point,
                    (start, risk_split_brain),
                    network,
                )
                .await?,
            },
            Request::FailoverTest {
                name,
                point,
                test_network,
            } => Response::Ok {
                message: crate::failover::test(self, &name, point, test_network).await?,
            },
            Request::FailoverStopTest { name } => Response::Ok {
                message: crate::failover::stop_test(self, &name).await?,
            },
            Request::FailoverCancel { name } => Response::Ok {
                message: crate::failover::cancel(self, &name).await?,
            },
            Request::FailoverComplete { name } => Response::Ok {
                message: crate::failover::complete(self, &name).await?,
            },
            Request::ReplicationReverse { name, settings } => Response::Ok {
                message: crate::failover::reverse(self, &name, settings).await?,
            },
            Request::ReplicationAcceptCopy {
                name,
                primary,
                withdraw,
            } => Response::Ok {
                message: crate::replica::accept_copy(self, &name, &primary, withdraw)?,
            },
        })
    }
}
