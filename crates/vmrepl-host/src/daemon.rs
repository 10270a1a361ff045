//! The daemon: boots the host and maps each management request to its flow.
//!
//! Nothing in the crate imports this module: the flows receive the [`Host`] context.

use crate::config::HostConfig;
use crate::datadir::DataDir;
use crate::db::Db;
use crate::error::ApiAnswer;
use crate::host::Host;
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

/// Runs the daemon in the foreground until asked to stop (request or SIGTERM/SIGINT). The
/// folder's lock is held until the runtime is gone, and with it every socket the daemon
/// listened on: whoever waits for the lock (a service manager, a script) then finds the ports
/// closed, not a listener that accepts and resets while the process winds down.
pub fn run_foreground(dd: &DataDir) -> Result<(), DaemonError> {
    dd.require_host()?;
    let lock = dd.lock()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let r = rt.block_on(run_locked(dd.clone()));
    // Drops the tasks the stop aborted, and the listeners they held.
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    drop(lock);
    r
}

/// Runs the daemon on the current runtime (it takes the folder's lock itself).
pub async fn run(dd: DataDir) -> Result<(), DaemonError> {
    dd.require_host()?;
    let _lock = dd.lock()?;
    run_locked(dd).await
}

/// The daemon, its folder's lock held by the caller.
async fn run_locked(dd: DataDir) -> Result<(), DaemonError> {
    // Under systemd (Type=notify): READY=1 once serving, the watchdog, STOPPING=1 at the end.
    let notifier = match crate::sd_notify::Notifier::from_env() {
        Ok(n) => n.map(Arc::new),
        Err(e) => {
            tracing::warn!(target: "vmrepl::daemon", "{e}");
            None
        }
    };
    let config = dd.config();
    let (mut cfg, file) = HostConfig::load_with_file_settings(&config)?;
    let db = Db::open(&dd.db())?;
    // The settings commands change are the database's (imported from the file the first
    // time); the file is only read.
    let settings = crate::host_settings::load(&db, &dd, &config, &file)?;
    if let Some(first) = &settings.first {
        tracing::info!(target: "vmrepl::daemon", "{first}");
    }
    for w in &settings.ignored {
        tracing::warn!(target: "vmrepl::daemon", "{w}");
    }
    settings.settings.apply(&mut cfg);
    cfg.validate()?;
    let db = Arc::new(Mutex::new(db));
    let mut opts =
        vmrepl_qemu::caps::ProbeOptions::new(&cfg.qemu_binary, cfg.storage.clone(), cfg.accel);
    if let Some(dirs) = &cfg.firmware_descriptor_dirs {
        opts.firmware_descriptor_dirs = dirs.clone();
    }
    opts.ovmf_dir = cfg.ovmf_dir.clone();
    opts.seabios_dir = cfg.seabios_dir.clone();
    opts.host_name = Some(cfg.host_name.clone());
    let probe = vmrepl_qemu::caps::probe(&opts)
        .await
        .map_err(|e| DaemonError::Caps(e.to_string()))?;
    let caps = probe.info.clone();
    let accel = vmrepl_qemu::caps::resolve_accel(cfg.accel, &caps)
        .map_err(|e| DaemonError::Caps(e.to_string()))?;
    tracing::info!(target: "vmrepl::daemon", host = %cfg.host_name, config = %config.display(), qemu = %caps.qemu_version, ?accel, "starting");
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
    let d = Arc::new(Host::new(
        dd.clone(),
        cfg,
        identity,
        db,
        vmm,
        peer_listener.clone(),
    ));
    let metrics_addr = d.cfg().metrics.clone();
    let metrics = match crate::metrics::bind(&metrics_addr).await {
        Some((l, url)) => {
            let _ = d.metrics_url.set(url);
            Some(tokio::spawn(crate::metrics::serve(l, d.clone())))
        }
        None => None,
    };
    let dashboard = crate::dashboard::start(&d).await;
    let server = tokio::spawn(mgmt::serve(listener, d.clone()));
    let peer = tokio::spawn(crate::peer_server::serve(peer_listener, d.clone()));
    crate::replica::recover(&d).await;
    crate::primary::start_all(&d);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DaemonError::Runtime)?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(DaemonError::Runtime)?;
    tracing::info!(target: "vmrepl::daemon", socket = %dd.socket().display(), "ready");
    let watchdog = notifier.as_ref().and_then(|n| {
        let cfg = d.cfg();
        n.ready(&format!(
            "serving host {}: peers on {}, management socket {}",
            cfg.host_name,
            cfg.listen,
            dd.socket().display()
        ));
        n.spawn_watchdog()
    });
    loop {
        tokio::select! {
            _ = d.stop.notified() => break,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hup.recv() => {
                // SIGHUP: reread the trusted CAs and the revocation list (the database's).
                match d.reload_trust() {
                    Ok(m) => tracing::info!(target: "vmrepl::daemon", "SIGHUP: {m}"),
                    Err(e) => tracing::warn!(target: "vmrepl::daemon", "SIGHUP: {}", e.to_api().message),
                }
            }
        }
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    if let Some(n) = &notifier {
        n.stopping("stopping; running VMs keep running");
    }
    server.abort();
    peer.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    if let Some(t) = dashboard {
        t.abort();
    }
    let _ = std::fs::remove_file(dd.socket());
    tracing::info!(target: "vmrepl::daemon", "stopped; running VMs keep running");
    Ok(())
}

impl Handler for Host {
    async fn handle(self: Arc<Self>, req: Request) -> Response {
        match dispatch(&self, req).await {
            Ok(r) => r,
            Err(e) => Response::Error(e),
        }
    }
}

async fn dispatch(host: &Arc<Host>, req: Request) -> Result<Response, ApiError> {
    let vmm = &host.vmm;
    Ok(match req {
        Request::Ping => Response::Ok {
            message: "pong".into(),
        },
        Request::HostInfo => {
            let mut info = vmm.caps().clone();
            let storage = host.cfg().storage.clone();
            info.storage = storage
                .iter()
                .filter_map(|p| vmrepl_qemu::caps::storage_info(p).ok())
                .collect();
            info.metrics_url = host.metrics_url.get().cloned();
            info.dashboard_url = host.dashboard_url.get().cloned();
            Response::HostInfo(Box::new(info))
        }
        Request::VmCreate(c) => Response::Vm(Box::new(vmm.create(c).await?)),
        Request::VmList => Response::VmList {
            vms: crate::inventory::list(host)?,
        },
        Request::VmShow { name } => Response::Vm(Box::new(crate::inventory::show(host, &name)?)),
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
        Request::VmSet {
            name,
            vcpus,
            memory_mib,
        } => {
            let message = vmm.set(&name, vcpus, memory_mib)?;
            if let Ok(def) = vmm.show(&name).map(|v| v.definition) {
                // A replicated VM: its next cycle carries the change to the replica.
                crate::primary::wake(host, def.uuid);
            }
            Response::Ok { message }
        }
        Request::VmDiskAdd {
            name,
            size_bytes,
            storage,
        } => {
            let (id, path) = vmm.add_disk(&name, size_bytes, storage.as_ref()).await?;
            let def = vmm.show(&name)?.definition;
            let replicated = crate::primary::new_disk_added(host, &def, &id)?;
            let mut message = format!(
                "Disk {id} ({} MiB) added to {name} at {}; the guest sees it at its next start.",
                size_bytes >> 20,
                path.display()
            );
            if replicated {
                message.push_str(&format!(
                    " {name} is replicated: like Hyper-V, a new disk is not replicated until you include it with `vmrepl replication set {name} --include-disk {id}` (its own initial copy then goes with the next cycle)."
                ));
            }
            Response::Ok { message }
        }
        Request::VmDiskResize {
            name,
            disk,
            size_bytes,
        } => {
            let message = vmm.resize_disk(&name, &disk, size_bytes).await?;
            if let Ok(def) = vmm.show(&name).map(|v| v.definition) {
                crate::primary::wake(host, def.uuid);
            }
            Response::Ok { message }
        }
        Request::VmTrustDisks { name } => Response::Ok {
            message: vmm.trust_disks(&name).await?,
        },
        Request::VmConsole { name, tail_bytes } => Response::Console {
            text: vmm.console(&name, tail_bytes)?,
        },
        Request::Shutdown => {
            host.stop.notify_one();
            Response::Ok {
                message: "daemon stopping; running VMs keep running".into(),
            }
        }
        Request::ReplicaServerShow => {
            let cfg = host.cfg();
            Response::ReplicaServer {
                listen: cfg.listen.clone(),
                settings: cfg.replica_server.clone(),
                revoked: cfg.revoked_certs.clone(),
            }
        }
        Request::ReplicaServerSet(change) => Response::ReplicaServer {
            settings: host.change_replica_server(change)?,
            listen: host.cfg().listen.clone(),
            revoked: host.cfg().revoked_certs.clone(),
        },
        Request::HostCertificates => Response::Certificates(Box::new(host.certificates())),
        Request::HostReloadTrust => Response::Ok {
            message: host.reload_trust()?,
        },
        Request::HostRevokeCert {
            fingerprint,
            reason,
            subject,
        } => {
            let fp = host.revoke_cert(&fingerprint, reason, subject)?;
            Response::Ok {
                message: format!(
                    "revoked the certificate {fp}: refused at every handshake from now on, \
                     in and out (connections already open are not cut; restart the daemon \
                     to end them)"
                ),
            }
        }
        Request::HostUnrevokeCert { fingerprint } => {
            let fp = host.unrevoke_cert(&fingerprint)?;
            Response::Ok {
                message: format!(
                    "the certificate {fp} is no longer revoked: accepted again from the next \
                     handshake (when its CA is trusted and, on a replica server, its host is \
                     authorized)"
                ),
            }
        }
        Request::ReplicationEnable { name, settings } => Response::Ok {
            message: crate::primary::enable(host, &name, settings).await?,
        },
        Request::ReplicationStatus { name } => {
            // Primary-side relationships and replica VMs alike, by VM name.
            let mut relationships = crate::primary::statuses_with_pending(host).await?;
            relationships.extend(crate::replica::statuses(host));
            if let Some(n) = &name {
                relationships.retain(|r| r.vm == *n || r.vm_uuid.to_string() == n.as_str());
                if relationships.is_empty() {
                    return Err(ApiError::new(
                        ErrorCode::NotFound,
                        format!("Replication is not enabled for VM {n} on this host."),
                    ));
                }
            }
            Response::Replication { relationships }
        }
        Request::Doctor {
            replica_server,
            replica_name,
            vm,
        } => Response::Doctor {
            findings: crate::doctor::run(host, replica_server, replica_name, vm.as_ref()).await?,
        },
        Request::Events {
            vm,
            since_ms,
            after_id,
            limit,
        } => Response::Events {
            events: events(host, vm.as_ref(), since_ms, after_id, limit)?,
        },
        Request::ReplicationMeasure { name, reset } => {
            let mut relationships = crate::primary::statuses_with_pending(host).await?;
            relationships.extend(crate::replica::statuses(host));
            relationships.retain(|r| r.vm == name);
            let Some(found) = relationships.first() else {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!("Replication is not enabled for VM {name} on this host."),
                ));
            };
            if reset {
                let vm = found.vm_uuid;
                {
                    let db = host.db();
                    db.reset_stats(vm)
                        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
                    let _ = db.event(Some(vm), "replication statistics reset");
                }
                relationships = crate::primary::statuses_with_pending(host).await?;
                relationships.extend(crate::replica::statuses(host));
                relationships.retain(|r| r.vm == name || r.vm_uuid.to_string() == name.as_str());
            }
            Response::Measure { relationships }
        }
        Request::ReplicationPause { name } => Response::Ok {
            message: crate::primary::pause(host, &name)?,
        },
        Request::ReplicationSet { name, change } => Response::Ok {
            message: crate::primary::set(host, &name, change).await?,
        },
        Request::ReplicationResume {
            name,
            resynchronize,
        } => Response::Ok {
            message: crate::primary::resume(host, &name, resynchronize)?,
        },
        Request::ReplicationImport { name, from } => Response::Ok {
            message: crate::replica::import_initial(host, &name, &from).await?,
        },
        Request::ReplicationNow {
            name,
            app_consistent,
        } => Response::Ok {
            message: crate::primary::now(host, &name, app_consistent).await?,
        },
        Request::ReplicationRemove {
            name,
            delete_replica,
        } => Response::Ok {
            message: match crate::primary::remove(host, &name, delete_replica).await {
                // Not a primary of this host: a replica kept here, removed on this side.
                Err(
                    crate::error::HostError::NotEnabled { .. }
                    | crate::error::HostError::Vm(crate::vmm::VmError::NoSuchVm { .. }),
                ) if crate::replica::named(host, &name).is_ok() => {
                    crate::replica::remove_here(host, &name, delete_replica).await?
                }
                r => r?,
            },
        },
        Request::RecoveryPoints { name } => Response::RecoveryPoints {
            points: crate::failover::points(host, &name).await?,
            vm: name,
        },
        Request::ReplicaNetwork {
            name,
            adapter,
            failover,
            test,
            failover_ip,
            clear_failover_ip,
        } => Response::ReplicaNetworks {
            adapters: crate::replica::set_networks(
                host,
                &name,
                adapter,
                crate::replica::NetworkChange {
                    failover,
                    test,
                    failover_ip,
                    clear_failover_ip,
                },
            )?,
            vm: name,
        },
        Request::FailoverPrepare { name } => Response::Ok {
            message: crate::failover::prepare(host, &name).await?,
        },
        Request::FailoverStart {
            name,
            point,
            start,
            risk_split_brain,
            network,
        } => Response::Ok {
            message: crate::failover::start(host, &name, point, (start, risk_split_brain), network)
                .await?,
        },
        Request::FailoverTest {
            name,
            point,
            test_network,
        } => Response::Ok {
            message: crate::failover::test(host, &name, point, test_network).await?,
        },
        Request::FailoverStopTest { name } => Response::Ok {
            message: crate::failover::stop_test(host, &name).await?,
        },
        Request::FailoverCancel { name } => Response::Ok {
            message: crate::failover::cancel(host, &name).await?,
        },
        Request::FailoverComplete { name } => Response::Ok {
            message: crate::failover::complete(host, &name).await?,
        },
        Request::ReplicationReverse { name, settings } => Response::Ok {
            message: crate::failover::reverse(host, &name, settings).await?,
        },
        Request::ReplicationAcceptCopy {
            name,
            primary,
            withdraw,
        } => Response::Ok {
            message: crate::replica::accept_copy(host, &name, &primary, withdraw)?,
        },
    })
}

/// The journal for `vmrepl events`, with VM names (this host's VMs and replica VMs) and this
/// host's name filled in. A VM filter names a VM this host knows, by name or UUID.
pub(crate) fn events(
    host: &Arc<Host>,
    vm: Option<&vmrepl_types::name::VmName>,
    since_ms: Option<u64>,
    after_id: Option<i64>,
    limit: Option<u32>,
) -> Result<Vec<vmrepl_types::api::EventRecord>, ApiError> {
    let db = host.db();
    let internal = |e: crate::db::DbError| ApiError::new(ErrorCode::Internal, e.to_string());
    let mut names: std::collections::HashMap<uuid::Uuid, String> = db
        .list_vms()
        .map_err(internal)?
        .into_iter()
        .map(|v| (v.definition.uuid, v.definition.name.to_string()))
        .collect();
    for r in db.replicas().map_err(internal)? {
        names.entry(r.vm_uuid).or_insert(r.name.to_string());
    }
    let filter = match vm {
        None => None,
        Some(n) => {
            let wanted = n.as_str();
            let found = names
                .iter()
                .find(|(u, name)| name.as_str() == wanted || u.to_string() == wanted)
                .map(|(u, _)| *u)
                .or_else(|| uuid::Uuid::parse_str(wanted).ok());
            match found {
                Some(u) => Some(u),
                None => {
                    return Err(ApiError::new(
                        ErrorCode::NotFound,
                        format!(
                            "No VM {wanted} on this host (neither one of its VMs nor a replica); \
                             `vmrepl vm list` and `vmrepl replication status` show the names."
                        ),
                    ))
                }
            }
        }
    };
    let limit = limit.unwrap_or(200).clamp(1, 10_000) as usize;
    let rows = db
        .events(filter, since_ms, after_id, limit)
        .map_err(internal)?;
    let host_name = host.cfg().host_name.clone();
    Ok(rows
        .into_iter()
        .map(|r| vmrepl_types::api::EventRecord {
            id: r.id,
            unix_ms: r.unix_ms,
            code: r.code,
            severity: r.severity,
            vm: r.vm.and_then(|u| names.get(&u).cloned()),
            vm_uuid: r.vm,
            host: host_name.clone(),
            message: r.message,
        })
        .collect())
}
