//! Replica-server side of the peer API.
//!
//! Every connection: mutual-TLS handshake (in its own task, so a slow client blocks nobody),
//! protocol version negotiation, `Hello` both ways, then requests one at a time. Every request
//! but `Hello` and `VmRunning` needs the replica server enabled and the primary authorized
//! (its verified certificate host name matched against the authorization entries), and requests
//! about an existing replica VM need the primary to be in its trust group. Every refusal is
//! logged with the peer host and the reason. Nothing received touches a replica image before it
//! is durable and verified (I4); see [`crate::replica`] for applying.

use super::proto::{PeerRequest, PeerResponse, PointPolicy, RefusalCode, Resume, NVRAM_DISK_ID};
use crate::db::now_ms;
use crate::host::Host;
use crate::replica::{self, ReplicaRow};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;
use vmrepl_transport::authz::{Authorization, Grant};
use vmrepl_transport::frame::{self, Frame, FrameError, Framed};
use vmrepl_transport::tls::{PeerIdentity, TlsStream};
use vmrepl_types::replication::ReplicationState;
use vmrepl_types::VmDefinition;

const T: &str = "vmrepl::peer";

/// Longest recovery-point interval a primary may ask for (a week).
const MAX_POINT_INTERVAL_SECS: u32 = 7 * 86400;
/// Most vCPUs a peer's VM definition may ask for.
const MAX_VCPUS: u32 = 288;
/// Most memory a peer's VM definition may ask for (4 TiB).
const MAX_MEMORY_MIB: u64 = 4 << 20;

/// Serves peer connections until the task is aborted.
///
/// Limits (review M1; values in `[peer_limits]` of config.toml, see
/// [`crate::config::PeerLimits`]): the listener closes at once a connection over
/// `max_connections` (256) open connections, or over `max_handshakes` (32) handshakes in
/// progress, or over `max_handshakes_per_ip` (8) from one address; a client gets
/// `handshake_timeout_secs` (10 s) for the TLS handshake and again for the version exchange;
/// an established connection silent for `idle_timeout_secs` (300 s) between requests is
/// closed. All peer sockets have TCP keepalive (30 s idle, 10 s interval, 3 probes).
pub async fn serve(listener: Arc<vmrepl_transport::tls::Listener>, daemon: Arc<Host>) {
    loop {
        match listener.accept_tcp().await {
            Ok(mut incoming) => {
                let d = daemon.clone();
                let permit = incoming.connection_permit();
                let handshake_timeout = listener.limits().handshake_timeout;
                tokio::spawn(async move {
                    // Counted against max_connections until this task ends.
                    let _permit = permit;
                    // The handshake logs its own refusals.
                    if let Ok((stream, peer)) = incoming.handshake().await {
                        connection(d, stream, peer, handshake_timeout).await;
                    }
                });
            }
            Err(e) => {
                tracing::warn!(target: T, "{e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

struct Refusal {
    code: RefusalCode,
    message: String,
}

fn refuse(code: RefusalCode, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

impl From<Refusal> for PeerResponse {
    fn from(r: Refusal) -> Self {
        PeerResponse::Refused {
            code: r.code,
            message: r.message,
        }
    }
}

type Conn = Framed<TlsStream>;

tokio::task_local! {
    /// The verified peer of the connection whose request is being handled: [`authorize`]
    /// checks its certificate against the entry's `issuer` and `pin`.
    static PEER: PeerIdentity;
}

async fn connection(
    daemon: Arc<Host>,
    stream: TlsStream,
    peer: PeerIdentity,
    handshake_timeout: std::time::Duration,
) {
    let host = peer.host_name.clone();
    let negotiated = tokio::time::timeout(
        handshake_timeout,
        Framed::negotiate(stream, frame::SUPPORTED),
    );
    let mut framed = match negotiated.await {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            tracing::warn!(target: T, peer = %host, "{e}");
            return;
        }
        Err(_) => {
            tracing::warn!(
                target: T, peer = %host,
                "the peer did not send its protocol versions within {} s; closing",
                handshake_timeout.as_secs()
            );
            return;
        }
    };
    let mut greeted = false;
    loop {
        let idle = daemon
            .cfg
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .peer_limits
            .idle_timeout();
        // Between requests the idle deadline applies; within one, the frame deadline.
        let usual = framed.timeout();
        framed.set_timeout(idle);
        let next = framed.read_frame().await;
        framed.set_timeout(usual);
        let frame = match next {
            Ok(f) => f,
            Err(e) if e.is_closed() => return,
            Err(e) if !matches!(e, FrameError::TimedOut { .. }) => {
                tracing::warn!(target: T, peer = %host, "connection ended: {e}");
                return;
            }
            Err(_) => {
                tracing::info!(
                    target: T, peer = %host,
                    "closing a connection idle for {} s (peer_limits.idle_timeout_secs)",
                    idle.as_secs()
                );
                return;
            }
        };
        let req: PeerRequest = match frame.parse_control() {
            Ok(r) => r,
            Err(e) => {
                let r = refuse(
                    RefusalCode::BadRequest,
                    format!("{e}; closing the connection"),
                );
                tracing::warn!(target: T, peer = %host, "refused: {}", r.message);
                let _ = framed.write_control(&PeerResponse::from(r)).await;
                return;
            }
        };
        let answer = match (greeted, req) {
            (false, PeerRequest::Hello { host_info }) => {
                greeted = true;
                tracing::info!(target: T, peer = %host, qemu = %host_info.qemu_version, "hello");
                Some(PeerResponse::Hello {
                    host_info: Box::new(daemon.vmm.caps().clone()),
                })
            }
            (false, _) => Some(
                refuse(
                    RefusalCode::BadRequest,
                    "the first message on a connection must be Hello",
                )
                .into(),
            ),
            (true, PeerRequest::Hello { .. }) => Some(
                refuse(
                    RefusalCode::BadRequest,
                    "Hello was already exchanged on this connection",
                )
                .into(),
            ),
            (true, req) => {
                // An unauthorized peer gets one answer that names nothing of this host's
                // (L8). PrimaryState is asked by replicas of this host's own VMs and checks
                // its peer itself; SendLog and PutBootFile authorize first themselves and
                // must drain the data that follows them on a refusal.
                let gate = match &req {
                    PeerRequest::PrimaryState { .. }
                    | PeerRequest::SendLog { .. }
                    | PeerRequest::PutBootFile { .. } => Ok(()),
                    _ => PEER.sync_scope(peer.clone(), || authorize(&daemon).map(|_| ())),
                };
                match gate {
                    Err(r) => Some(r.into()),
                    Ok(()) => match PEER
                        .scope(peer.clone(), handle(&daemon, &host, req, &mut framed))
                        .await
                    {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(target: T, peer = %host, "connection ended: {e}");
                            return;
                        }
                    },
                }
            }
        };
        if let Some(a) = answer {
            if let PeerResponse::Refused { code, message } = &a {
                tracing::warn!(target: T, peer = %host, ?code, "refused: {message}");
            }
            if let Err(e) = framed.write_control(&a).await {
                tracing::warn!(target: T, peer = %host, "cannot answer: {e}");
                return;
            }
        }
    }
}

fn server_enabled(daemon: &Host) -> Result<Authorization, Refusal> {
    let cfg = daemon.cfg.read().unwrap_or_else(|p| p.into_inner());
    if !cfg.replica_server.enabled {
        return Err(refuse(
            RefusalCode::Disabled,
            format!(
                "the replica server on {} is disabled; enable it with `vmrepl replication server \
                 set --enable`",
                cfg.host_name
            ),
        ));
    }
    Authorization::try_from(&cfg.replica_server).map_err(|e| {
        refuse(
            RefusalCode::Internal,
            format!(
                "the replica server settings on {} are not valid: {e}",
                cfg.host_name
            ),
        )
    })
}

/// The grant of the primary whose request is being handled: its verified certificate (the
/// connection's [`PEER`]: every request runs in that scope) checked against the matching
/// entry, `issuer` and `pin` included.
fn authorize(daemon: &Host) -> Result<Grant, Refusal> {
    let authz = server_enabled(daemon)?;
    PEER.try_with(|p| authz.authorize_peer(p))
        .map_err(|_| {
            refuse(
                RefusalCode::Internal,
                "a request was handled outside its connection (no verified peer)",
            )
        })?
        .map_err(|e| refuse(RefusalCode::NotAuthorized, e.to_string()))
}

fn lookup(daemon: &Host, vm_uuid: Uuid) -> Result<Option<ReplicaRow>, Refusal> {
    let db = daemon.db();
    replica::get(&db, vm_uuid).map_err(|e| refuse(RefusalCode::Internal, e.to_string()))
}

/// The replica of `vm_uuid`, if the (authorized) primary may act on it.
fn own_replica(
    daemon: &Host,
    peer: &str,
    grant: &Grant,
    vm_uuid: Uuid,
) -> Result<ReplicaRow, Refusal> {
    let row = lookup(daemon, vm_uuid)?.ok_or_else(|| {
        refuse(
            RefusalCode::UnknownVm,
            format!("this host keeps no replica of VM {vm_uuid}; create it first"),
        )
    })?;
    if row.trust_group != grant.trust_group {
        return Err(refuse(
            RefusalCode::WrongTrustGroup,
            format!(
                "the replica of {} ({vm_uuid}) belongs to trust group {:?}; primary {peer} is in \
                 trust group {:?}",
                row.name, row.trust_group, grant.trust_group
            ),
        ));
    }
    if !row.primary_host.eq_ignore_ascii_case(peer) {
        return Err(refuse(
            RefusalCode::Conflict,
            format!(
                "the replica of {} ({vm_uuid}) is replicated from {}, not from {peer}",
                row.name, row.primary_host
            ),
        ));
    }
    Ok(row)
}

fn failed_over(row: &ReplicaRow, f: &crate::replica::FailoverRecord) -> Refusal {
    refuse(
        RefusalCode::FailedOver,
        format!(
            "the replica of {} failed over to point {} on this host; it takes no more logs \
             (reverse replication or a new relationship replaces it)",
            row.name, f.point_seq
        ),
    )
}

/// The replica of `vm_uuid` that the authorized primary `peer` may still feed: its own, and
/// not failed over.
fn live_replica(daemon: &Host, peer: &str, vm_uuid: Uuid) -> Result<ReplicaRow, Refusal> {
    let grant = authorize(daemon)?;
    let row = own_replica(daemon, peer, &grant, vm_uuid)?;
    match &row.failover {
        Some(f) => Err(failed_over(&row, f)),
        None => Ok(row),
    }
}

fn free_bytes(path: &Path) -> Option<u64> {
    vmrepl_store::spool::free_bytes(path).ok()
}

/// This host's QEMU must run the VM exactly as it is (I7).
fn runs_here(daemon: &Host, vm: &VmDefinition) -> Result<(), Refusal> {
    daemon
        .vmm
        .caps()
        .check_runs(vm)
        .map_err(|why| refuse(RefusalCode::Incompatible, why))
}

/// The replica of `vm_uuid` kept here, if any: `Some` when it is the one `peer` asked for under
/// `relationship` (the answer to an earlier request was lost, so the peer asks again), a
/// refusal when the VM is replicated here for anyone or anything else.
fn existing_replica(
    daemon: &Host,
    peer: &str,
    grant: &Grant,
    vm_uuid: Uuid,
    relationship: Uuid,
) -> Result<Option<ReplicaRow>, Refusal> {
    match lookup(daemon, vm_uuid)? {
        None => Ok(None),
        Some(row)
            if row.relationship == relationship
                && row.primary_host.eq_ignore_ascii_case(peer)
                && row.trust_group == grant.trust_group =>
        {
            Ok(Some(row))
        }
        Some(row) => Err(refuse(
            RefusalCode::Conflict,
            format!(
                "this host already keeps a replica of VM {} ({}) for primary {} (relationship {}); \
                 remove it first",
                row.name, vm_uuid, row.primary_host, row.relationship
            ),
        )),
    }
}

fn check_vm(daemon: &Host, vm: &VmDefinition, grant: &Grant) -> Result<(), Refusal> {
    check_definition(daemon, vm)?;
    let needed: u64 = vm
        .disks
        .iter()
        .try_fold(0u64, |a, d| a.checked_add(d.size_bytes))
        .ok_or_else(|| refuse(RefusalCode::BadRequest, "the VM's disk sizes overflow"))?
        .saturating_add(vmrepl_store::SPACE_HEADROOM);
    if let Some(free) = free_bytes(&grant.storage) {
        if free < needed {
            return Err(refuse(
                RefusalCode::DiskFull,
                format!(
                    "the replica storage {} has {free} bytes free; VM {} needs {needed} bytes",
                    grant.storage.display(),
                    vm.name
                ),
            ));
        }
    }
    Ok(())
}

/// What a peer's VM definition must be before anything is done with it: runnable here (I7),
/// with valid, bounded disks.
fn check_definition(daemon: &Host, vm: &VmDefinition) -> Result<(), Refusal> {
    runs_here(daemon, vm)?;
    if vm.disks.is_empty() {
        return Err(refuse(RefusalCode::BadRequest, "the VM has no disks"));
    }
    if vm.disks.len() >= vmrepl_log::MAX_DISKS {
        return Err(refuse(
            RefusalCode::BadRequest,
            format!(
                "the VM has {} disks; a replica takes at most {}",
                vm.disks.len(),
                vmrepl_log::MAX_DISKS - 1
            ),
        ));
    }
    if vm.vcpus == 0 || vm.vcpus > MAX_VCPUS || vm.memory_mib == 0 || vm.memory_mib > MAX_MEMORY_MIB
    {
        return Err(refuse(
            RefusalCode::BadRequest,
            format!(
                "the VM asks for {} vCPUs and {} MiB; a replica takes 1 to {MAX_VCPUS} vCPUs and \
                 1 to {MAX_MEMORY_MIB} MiB",
                vm.vcpus, vm.memory_mib
            ),
        ));
    }
    for d in &vm.disks {
        if d.id == NVRAM_DISK_ID {
            return Err(refuse(
                RefusalCode::BadRequest,
                format!("disk id {NVRAM_DISK_ID:?} is reserved for the NVRAM"),
            ));
        }
        vmrepl_store::validate_disk_id(&d.id)
            .map_err(|e| refuse(RefusalCode::BadRequest, e.to_string()))?;
        if d.size_bytes == 0 || d.size_bytes % 512 != 0 {
            return Err(refuse(
                RefusalCode::BadRequest,
                format!(
                    "disk {} has size {} bytes; sizes are positive multiples of 512",
                    d.id, d.size_bytes
                ),
            ));
        }
    }
    Ok(())
}

/// Handles one request after Hello. `Ok(None)` means the answer was already written;
/// `Err` means the connection is unusable.
async fn handle(
    daemon: &Arc<Host>,
    peer: &str,
    req: PeerRequest,
    framed: &mut Conn,
) -> Result<Option<PeerResponse>, FrameError> {
    let r = match req {
        PeerRequest::Hello { .. } => unreachable!("handled by the caller"),
        PeerRequest::BlockDigests { vm_uuid } => block_digests(daemon, peer, vm_uuid).await,
        PeerRequest::PrimaryState { vm_uuid } => {
            crate::failover::primary_state(daemon, peer, vm_uuid).map_err(|(c, m)| refuse(c, m))
        }
        PeerRequest::ReverseReplica {
            vm,
            relationship,
            policy,
            base_sequence,
            primary_server,
            old_relationship,
        } => {
            reverse_replica(
                daemon,
                peer,
                *vm,
                (relationship, old_relationship),
                policy,
                base_sequence,
                primary_server,
            )
            .await
        }
        PeerRequest::CheckReplica { vm } => {
            authorize(daemon).and_then(|g| check_vm(daemon, &vm, &g).map(|()| PeerResponse::Ok))
        }
        PeerRequest::CreateReplica {
            vm,
            relationship,
            policy,
            primary_server,
            existing_copy: false,
        } => match authorize(daemon) {
            Ok(grant) => {
                create_replica(
                    daemon,
                    peer,
                    &grant,
                    *vm,
                    relationship,
                    policy,
                    primary_server,
                    None,
                )
                .await
            }
            Err(r) => Err(r),
        },
        PeerRequest::CreateReplica {
            vm,
            relationship,
            policy,
            primary_server,
            existing_copy: true,
        } => from_existing_copy(daemon, peer, *vm, relationship, policy, primary_server).await,
        PeerRequest::ReplicaState { vm_uuid } => replica_state(daemon, peer, vm_uuid).await,
        PeerRequest::SetPolicy { vm_uuid, policy } => authorize(daemon)
            .and_then(|g| check_policy(&policy).map(|()| g))
            .and_then(|g| own_replica(daemon, peer, &g, vm_uuid))
            .and_then(|_| {
                let db = daemon.db();
                replica::set_policy(&db, vm_uuid, &policy)
                    .map(|()| PeerResponse::Ok)
                    .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))
            }),
        PeerRequest::PutBootFile {
            vm_uuid,
            file,
            size,
            blake3,
        } => return put_boot_file(daemon, peer, framed, vm_uuid, file, (size, blake3)).await,
        PeerRequest::ExpectImport {
            vm_uuid,
            bytes,
            blake3,
        } => live_replica(daemon, peer, vm_uuid).and_then(|r| {
            replica::expect_import(&r, bytes, &blake3)
                .map(|()| PeerResponse::Ok)
                .map_err(|e| refuse(RefusalCode::Internal, e))
        }),
        PeerRequest::RemoveReplica { vm_uuid, delete } => {
            remove_replica(daemon, peer, vm_uuid, delete).await
        }
        PeerRequest::SendLog {
            vm_uuid,
            sequence,
            base_sequence,
            resume,
        } => {
            return send_log(
                daemon,
                peer,
                framed,
                vm_uuid,
                sequence,
                base_sequence,
                resume,
            )
            .await
        }
    };
    Ok(Some(r.unwrap_or_else(PeerResponse::from)))
}

/// The old primary's side of reverse replication (see `crate::failover`).
async fn reverse_replica(
    daemon: &Arc<Host>,
    peer: &str,
    vm: VmDefinition,
    (relationship, old_relationship): (Uuid, Option<Uuid>),
    policy: PointPolicy,
    base_seq: u64,
    primary_server: Option<String>,
) -> Result<PeerResponse, Refusal> {
    let grant = authorize(daemon)?;
    check_policy(&policy)?;
    if let Some(row) = existing_replica(daemon, peer, &grant, vm.uuid, relationship)? {
        return Ok(PeerResponse::Reversed {
            delta: row.last_applied == base_seq && base_seq > 0,
            resync: false,
            full_copy_reason: None,
        });
    }
    check_definition(daemon, &vm)?;
    let base = crate::failover::take_over_as_replica(
        daemon,
        peer,
        &vm,
        old_relationship,
        &grant.storage,
        base_seq,
    )
    .await
    .map_err(|(c, m)| refuse(c, m))?;
    use crate::failover::TakeOver;
    let adopted = match &base {
        TakeOver::Common => Some(base_seq),
        TakeOver::Diverged(_) => Some(0),
        TakeOver::Nothing(_) => None,
    };
    create_replica(
        daemon,
        peer,
        &grant,
        vm,
        relationship,
        policy,
        primary_server,
        adopted,
    )
    .await?;
    Ok(match base {
        TakeOver::Common => PeerResponse::Reversed {
            delta: true,
            resync: false,
            full_copy_reason: None,
        },
        TakeOver::Diverged(reason) => PeerResponse::Reversed {
            delta: false,
            resync: true,
            full_copy_reason: Some(reason),
        },
        TakeOver::Nothing(reason) => PeerResponse::Reversed {
            delta: false,
            resync: false,
            full_copy_reason: Some(reason),
        },
    })
}

/// Initial replication from an existing copy: the stopped VM of the same name on this host
/// (restored from a backup, say) becomes the replica at sequence 0, once its generation and
/// disks are checked to match; the primary then sends only the blocks that differ.
async fn from_existing_copy(
    daemon: &Arc<Host>,
    peer: &str,
    vm: VmDefinition,
    relationship: Uuid,
    policy: PointPolicy,
    primary_server: Option<String>,
) -> Result<PeerResponse, Refusal> {
    let grant = authorize(daemon)?;
    check_policy(&policy)?;
    if existing_replica(daemon, peer, &grant, vm.uuid, relationship)?.is_some() {
        return Ok(PeerResponse::Ok); // the copy was taken already
    }
    check_definition(daemon, &vm)?;
    replica::adopt_existing_copy(daemon, peer, &vm, &grant.storage)
        .await
        .map_err(|(c, m)| refuse(c, m))?;
    create_replica(
        daemon,
        peer,
        &grant,
        vm,
        relationship,
        policy,
        primary_server,
        Some(0),
    )
    .await
}

/// The recovery-point policy a primary may ask for: what `replication enable` itself allows
/// (0 to 24 points, an interval no shorter than the shortest frequency and at most a week).
fn check_policy(policy: &PointPolicy) -> Result<(), Refusal> {
    use vmrepl_types::replication::ReplicationSettings as S;
    if policy.keep > S::MAX_RECOVERY_POINTS {
        return Err(refuse(
            RefusalCode::BadRequest,
            format!(
                "{} recovery points asked; 0 to {} are kept",
                policy.keep,
                S::MAX_RECOVERY_POINTS
            ),
        ));
    }
    if policy.interval_secs < S::MIN_FREQUENCY || policy.interval_secs > MAX_POINT_INTERVAL_SECS {
        return Err(refuse(
            RefusalCode::BadRequest,
            format!(
                "a recovery point every {} s asked; {} to {MAX_POINT_INTERVAL_SECS} s are allowed",
                policy.interval_secs,
                S::MIN_FREQUENCY
            ),
        ));
    }
    Ok(())
}

/// Creates a replica VM for an authorized peer; with `adopted` the store exists already
/// (this host's disks were adopted at that sequence: reverse replication, or an existing
/// copy) and only the row is recorded.
#[allow(clippy::too_many_arguments)]
async fn create_replica(
    daemon: &Arc<Host>,
    peer: &str,
    grant: &Grant,
    vm: VmDefinition,
    relationship: Uuid,
    policy: PointPolicy,
    primary_server: Option<String>,
    adopted: Option<u64>,
) -> Result<PeerResponse, Refusal> {
    check_policy(&policy)?;
    {
        let db = daemon.db();
        if let Ok(Some(_)) = db.vm_by_uuid(vm.uuid) {
            return Err(refuse(
                RefusalCode::Conflict,
                format!(
                    "VM {} exists on this host as a VM of its own; it cannot also be a replica",
                    vm.uuid
                ),
            ));
        }
    }
    if existing_replica(daemon, peer, grant, vm.uuid, relationship)?.is_some() {
        return Ok(PeerResponse::Ok);
    }
    if adopted.is_none() {
        check_vm(daemon, &vm, grant)?;
    }
    let root = grant.storage.clone();
    let def =
        serde_json::to_value(&vm).map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
    let disks: Vec<(String, u64)> = vm
        .disks
        .iter()
        .map(|d| (d.id.clone(), d.size_bytes))
        .collect();
    let uuid = vm.uuid;
    let dir = vmrepl_store::ReplicaStore::vm_dir(&root, uuid);
    let lock = daemon.replica_locks.vm(&dir);
    let _g = lock.lock().await;
    let created = tokio::task::spawn_blocking(move || -> Result<(), String> {
        if adopted.is_some() {
            return Ok(());
        }
        crate::fsutil::create_private_dir_all(&root)
            .map_err(|e| format!("cannot create the storage folder {}: {e}", root.display()))?;
        let ds: Vec<(&str, u64)> = disks.iter().map(|(i, s)| (i.as_str(), *s)).collect();
        vmrepl_store::ReplicaStore::create(&root, uuid, &def, &ds)
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
    created.map_err(|e| refuse(RefusalCode::Internal, e))?;
    let row = ReplicaRow {
        vm_uuid: uuid,
        name: vm.name.as_str().to_string(),
        primary_host: peer.to_string(),
        trust_group: grant.trust_group.clone(),
        storage_root: grant.storage.clone(),
        relationship,
        definition: vm,
        policy,
        state: if adopted.is_some() {
            ReplicationState::Replicating
        } else {
            ReplicationState::WaitingForInitialReplication
        },
        last_applied: adopted.unwrap_or(0),
        created_ms: now_ms(),
        last_receive_ms: None,
        last_apply_ms: None,
        last_point_ms: None,
        bytes_received: 0,
        logs_received: 0,
        last_error: None,
        primary_server,
        failover: None,
        test_failover: None,
    };
    let db = daemon.db();
    let mut row = row;
    row.name = replica::unique_name(&db, &row.name, uuid)
        .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
    replica::insert(&db, &row).map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
    let _ = db.event(
        Some(uuid),
        &format!("replica of {} created for primary {peer}", row.name),
    );
    tracing::info!(target: T, peer, vm = %uuid, name = %row.name, dir = %dir.display(), "replica created");
    Ok(PeerResponse::Ok)
}

async fn replica_state(
    daemon: &Arc<Host>,
    peer: &str,
    vm_uuid: Uuid,
) -> Result<PeerResponse, Refusal> {
    let grant = authorize(daemon)?;
    let row = own_replica(daemon, peer, &grant, vm_uuid)?;
    if row.failover.is_some() {
        return Ok(PeerResponse::ReplicaState {
            last_applied: row.last_applied,
            partial: None,
            points: Vec::new(),
            failed_over: true,
            boot: Vec::new(),
        });
    }
    let lock = daemon.replica_locks.vm(&replica::vm_dir(&row));
    let _g = lock.lock().await;
    // Apply what is durable first, so that last_applied is accurate (errors are recorded).
    let _ = replica::apply_and_record(daemon, &row).await;
    let root = row.storage_root.clone();
    let boot = replica::boot_files(&replica::vm_dir(&row));
    // A partial log is a resume point only once nobody writes it any more: while a transfer
    // still holds the receive slot (one cut without a close, say, until its frame deadline),
    // its prefix is still growing.
    let slot = daemon.replica_locks.receive_slot(&replica::vm_dir(&row));
    let receiving = slot.try_lock().is_err();
    tokio::task::spawn_blocking(move || -> Result<PeerResponse, Refusal> {
        let vm = vmrepl_store::ReplicaStore::open(&root, vm_uuid)
            .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
        let last = vm.last_applied();
        let next = vm.partial_log_path(last + 1);
        let partial = match std::fs::File::open(&next) {
            Ok(_) if receiving => None,
            Ok(f) => match vmrepl_log::scan_valid_prefix(std::io::BufReader::new(f)) {
                Ok(p) if p.bytes > 0 => Some((
                    last + 1,
                    Resume {
                        records: p.records,
                        bytes: p.bytes,
                    },
                )),
                _ => None,
            },
            Err(_) => None,
        };
        let points = vm
            .points()
            .into_iter()
            .filter(|p| p.kind == vmrepl_store::PointKind::Frozen)
            .map(|p| (p.seq, p.unix_ms))
            .collect();
        Ok(PeerResponse::ReplicaState {
            last_applied: last,
            partial,
            points,
            failed_over: false,
            boot,
        })
    })
    .await
    .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?
}

async fn block_digests(
    daemon: &Arc<Host>,
    peer: &str,
    vm_uuid: Uuid,
) -> Result<PeerResponse, Refusal> {
    let row = live_replica(daemon, peer, vm_uuid)?;
    let lock = daemon.replica_locks.vm(&replica::vm_dir(&row));
    let _g = lock.lock().await;
    let _ = replica::apply_and_record(daemon, &row).await;
    let root = row.storage_root.clone();
    tokio::task::spawn_blocking(move || -> Result<PeerResponse, Refusal> {
        let vm = vmrepl_store::ReplicaStore::open(&root, vm_uuid)
            .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
        let mut disks = Vec::new();
        for (id, _) in vm.disks() {
            let (block_size, ds) = vm
                .block_digests(&id)
                .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
            disks.push(super::proto::DiskDigests::new(id, block_size, &ds));
        }
        Ok(PeerResponse::BlockDigests { disks })
    })
    .await
    .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?
}

async fn remove_replica(
    daemon: &Arc<Host>,
    peer: &str,
    vm_uuid: Uuid,
    delete: bool,
) -> Result<PeerResponse, Refusal> {
    let row = live_replica(daemon, peer, vm_uuid)?;
    // A primary deletes the replica's data only where this host allows it: by default the
    // disaster-recovery copy outlives a primary that is told (or tricked) to drop it.
    let delete = delete
        && daemon
            .cfg
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .replica_server
            .allow_remote_delete;
    let dir = replica::vm_dir(&row);
    let lock = daemon.replica_locks.vm(&dir);
    let _g = lock.lock().await;
    {
        let db = daemon.db();
        replica::delete(&db, vm_uuid).map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
        let _ = db.event(
            Some(vm_uuid),
            &format!(
                "replica of {} removed by {peer}{}",
                row.name,
                if delete {
                    ", data deleted".to_string()
                } else {
                    format!(", data kept in {}", dir.display())
                }
            ),
        );
    }
    if delete {
        let root = row.storage_root.clone();
        let r = tokio::task::spawn_blocking(move || {
            vmrepl_store::ReplicaStore::destroy(&root, vm_uuid)
        })
        .await;
        if let Ok(Err(e)) = r {
            tracing::warn!(target: T, dir = %dir.display(), "cannot delete the replica's data: {e}");
        }
    }
    Ok(PeerResponse::Ok)
}

/// Receives a boot file of a replica VM into its store (`boot/`), verified by size and
/// BLAKE3 before it replaces the one kept there. No lock is held while the bytes arrive.
async fn put_boot_file(
    daemon: &Arc<Host>,
    peer: &str,
    framed: &mut Conn,
    vm_uuid: Uuid,
    file: super::proto::BootFile,
    (size, digest): (u64, String),
) -> Result<Option<PeerResponse>, FrameError> {
    let wanted = live_replica(daemon, peer, vm_uuid).and_then(|r| {
        if size > super::proto::MAX_BOOT_FILE_BYTES {
            Err(refuse(
                RefusalCode::BadRequest,
                format!(
                    "a boot file of {size} bytes is larger than the {} bytes a replica keeps",
                    super::proto::MAX_BOOT_FILE_BYTES
                ),
            ))
        } else if r.definition.kernel.is_none() {
            Err(refuse(
                RefusalCode::BadRequest,
                format!(
                    "VM {} does not boot a kernel directly; it has no boot files",
                    r.name
                ),
            ))
        } else {
            Ok(r)
        }
    });
    let row = match wanted {
        Ok(r) => r,
        Err(r) => {
            drain(framed).await?;
            return Ok(Some(r.into()));
        }
    };
    let boot = replica::vm_dir(&row).join("boot");
    let tmp = boot.join(format!("{}.{}.tmp", file.file_name(), Uuid::new_v4()));
    let created = crate::fsutil::create_private_dir_all(&boot).and(
        tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .await,
    );
    let mut out = match created {
        Ok(f) => f,
        Err(e) => {
            drain(framed).await?;
            return Ok(Some(
                refuse(RefusalCode::Internal, format!("{}: {e}", tmp.display())).into(),
            ));
        }
    };
    let mut hasher = blake3::Hasher::new();
    let mut got = 0u64;
    let mut failure: Option<Refusal> = None;
    loop {
        let data = match framed.read_frame().await {
            Ok(Frame::Data(d)) => d,
            Ok(Frame::Control(_)) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(FrameError::UnexpectedKind {
                    expected: frame::FrameKind::Data,
                    got: frame::FrameKind::Control,
                    len: 0,
                });
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        if data.is_empty() {
            break;
        }
        if failure.is_some() {
            continue;
        }
        got += data.len() as u64;
        if got > size {
            failure = Some(refuse(
                RefusalCode::BadRequest,
                format!("the boot file is longer than the {size} bytes announced"),
            ));
            continue;
        }
        hasher.update(&data);
        if let Err(e) = out.write_all(&data).await {
            failure = Some(refuse(
                RefusalCode::Internal,
                format!("cannot write {}: {e}", tmp.display()),
            ));
        }
    }
    let synced = out.sync_all().await;
    drop(out);
    let hex = hasher.finalize().to_hex().to_string();
    let failure = failure.or_else(|| {
        if got != size || !hex.eq_ignore_ascii_case(&digest) {
            Some(refuse(
                RefusalCode::BadLog,
                format!(
                    "the {} of {} arrived with {got} bytes and digest {hex}, not the {size} bytes \
                     and digest {digest} announced; discarded",
                    file.file_name(),
                    row.name
                ),
            ))
        } else {
            synced
                .err()
                .map(|e| refuse(RefusalCode::Internal, format!("{}: {e}", tmp.display())))
        }
    });
    if let Some(f) = failure {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Ok(Some(f.into()));
    }
    let lock = daemon.replica_locks.vm(&replica::vm_dir(&row));
    let _g = lock.lock().await;
    let placed = replica::place_boot_file(&boot, file, &tmp, &hex);
    if let Err(e) = placed {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Ok(Some(refuse(RefusalCode::Internal, e).into()));
    }
    tracing::info!(target: T, peer, vm = %vm_uuid, file = file.file_name(), bytes = size, "boot file kept");
    Ok(Some(PeerResponse::Ok))
}

/// Reads and discards Data frames up to the empty one.
async fn drain(framed: &mut Conn) -> Result<(), FrameError> {
    loop {
        match framed.read_frame().await? {
            Frame::Data(d) if d.is_empty() => return Ok(()),
            Frame::Data(_) => {}
            Frame::Control(_) => {
                return Err(FrameError::UnexpectedKind {
                    expected: frame::FrameKind::Data,
                    got: frame::FrameKind::Control,
                    len: 0,
                })
            }
        }
    }
}

/// Largest log accepted for a VM: its disks' total size plus 1/8 for record overhead, plus
/// room for the NVRAM and the header.
fn size_cap(row: &ReplicaRow) -> u64 {
    let total: u64 = row.definition.disks.iter().map(|d| d.size_bytes).sum();
    total
        .saturating_add(total / 8)
        .saturating_add(super::proto::MAX_NVRAM_BYTES)
        .saturating_add(1 << 20)
}

#[allow(clippy::too_many_arguments)]
async fn send_log(
    daemon: &Arc<Host>,
    peer: &str,
    framed: &mut Conn,
    vm_uuid: Uuid,
    seq: u64,
    base: u64,
    resume: Option<Resume>,
) -> Result<Option<PeerResponse>, FrameError> {
    let row = match live_replica(daemon, peer, vm_uuid) {
        Ok(r) => r,
        Err(r) => {
            drain(framed).await?;
            return Ok(Some(r.into()));
        }
    };
    let dir = replica::vm_dir(&row);
    let lock = daemon.replica_locks.vm(&dir);
    // Logs received before but not applied (an apply that failed) go first. The VM's lock is
    // held for local work only, never while this host waits on the network (the frames below
    // arrive with no lock held), so a primary that stalls mid-log blocks no failover.
    let applied = {
        let _g = lock.lock().await;
        replica::apply_and_record(daemon, &row).await
    };
    let last = match applied {
        Ok(l) => l,
        Err(e) => {
            drain(framed).await?;
            let code = if e.is_disk_full() {
                RefusalCode::DiskFull
            } else {
                RefusalCode::Internal
            };
            return Ok(Some(
                refuse(
                    code,
                    format!("the replica of {} cannot apply its logs: {e}", row.name),
                )
                .into(),
            ));
        }
    };
    if seq <= last {
        drain(framed).await?;
        tracing::info!(target: T, peer, vm = %vm_uuid, seq, last_applied = last, "log already applied; acknowledged again");
        return Ok(Some(PeerResponse::LogAck {
            sequence: seq,
            bytes: 0,
        }));
    }
    if base != last {
        drain(framed).await?;
        let msg = format!(
            "replica of {} has applied {last}, log {seq} builds on {base}; resynchronization \
             required",
            row.name
        );
        let db = daemon.db();
        let _ = replica::record_error(
            &db,
            vm_uuid,
            ReplicationState::ResynchronizationRequired,
            &msg,
        );
        return Ok(Some(refuse(RefusalCode::OutOfOrder, msg).into()));
    }
    // One transfer per VM at a time. A transfer cut without a close holds its slot only until
    // its next frame is overdue (`Framed`'s deadline); the primary resumes after that.
    let slot = daemon.replica_locks.receive_slot(&dir);
    let Ok(_receiving) = slot.try_lock() else {
        drain(framed).await?;
        return Ok(Some(
            refuse(
                RefusalCode::Internal,
                format!(
                    "another transfer of a log of {} is still in progress here; it ends when it \
                     completes or its connection times out ({} s), then send again",
                    row.name,
                    framed.timeout().as_secs()
                ),
            )
            .into(),
        ));
    };
    let path = vmrepl_store::spool::partial_path(&dir, seq);
    let t0 = std::time::Instant::now();
    let (received, verified) = match receive(framed, &row, &path, resume).await? {
        Ok(x) => x,
        Err(r) => return Ok(Some(r.into())),
    };
    let receive_ms = t0.elapsed().as_millis() as u64;
    let g = lock.lock().await;
    // The replica may have failed over, or been removed, while the log arrived.
    let current = live_replica(daemon, peer, vm_uuid).and_then(|r| {
        if r.relationship != row.relationship {
            Err(refuse(
                RefusalCode::Conflict,
                format!(
                    "the replica of {} was replaced while log {seq} arrived",
                    r.name
                ),
            ))
        } else {
            Ok(r)
        }
    });
    let row = match current {
        Ok(r) => r,
        Err(r) => {
            let _ = tokio::fs::remove_file(&path).await;
            return Ok(Some(r.into()));
        }
    };
    // Verified whole (I4) and durable under its verified name (I1) before the acknowledgement.
    match replica::accept_spooled(&row, seq, base, None, Some(verified)).await {
        Ok(()) => {}
        Err(replica::Unaccepted::Bad(reason)) => {
            return Ok(Some(
                refuse(
                    RefusalCode::BadLog,
                    format!(
                        "log {seq} of {} failed verification and was discarded: {reason}",
                        row.name
                    ),
                )
                .into(),
            ))
        }
        Err(replica::Unaccepted::NotDurable(e)) => {
            return Ok(Some(
                refuse(
                    RefusalCode::Internal,
                    format!("cannot make log {seq} of {} durable: {e}", row.name),
                )
                .into(),
            ))
        }
    }
    {
        let db = daemon.db();
        let _ = replica::record_received(&db, vm_uuid, received);
    }
    drop(g);
    tracing::info!(target: T, peer, vm = %vm_uuid, seq, bytes = received, receive_ms,
        accept_ms = t0.elapsed().as_millis() as u64 - receive_ms, "log durable and verified");
    framed
        .write_control(&PeerResponse::LogAck {
            sequence: seq,
            bytes: received,
        })
        .await?;
    // Apply now; the next log of this VM waits for it at its start (the VM's lock).
    let _g = lock.lock().await;
    let _ = replica::apply_verified(daemon, &row, seq).await;
    Ok(None)
}

/// Feeds received bytes to a verifier on a blocking thread: a [`std::io::Read`] over a channel
/// of frames, so the log is checked whole while it arrives instead of re-read afterwards.
struct Incoming {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl std::io::Read for Incoming {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.blocking_recv() {
                Some(v) => {
                    self.cur = v;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Starts verifying log `path` as it is received: the `held` bytes already in the file (a
/// resumed transfer) first, then whatever is sent on the returned channel until it closes.
fn start_verifier(
    path: &Path,
    held: u64,
) -> (
    tokio::sync::mpsc::Sender<Vec<u8>>,
    tokio::task::JoinHandle<replica::Verified>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let path = path.to_path_buf();
    let task = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let incoming = Incoming {
            rx,
            cur: Vec::new(),
            pos: 0,
        };
        // The received frames are in memory already: only the file prefix needs a buffer.
        let prefix: Box<dyn Read + Send> = if held > 0 {
            Box::new(std::io::BufReader::new(
                std::fs::File::open(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .take(held),
            ))
        } else {
            Box::new(std::io::empty())
        };
        vmrepl_log::verify_reader(prefix.chain(incoming))
            .map(|(h, _)| h)
            .map_err(|e| e.to_string())
    });
    (tx, task)
}

/// Receives the Data frames of a log into its partial spool file `path` (fresh, or appended to
/// a partial file cut to `resume.bytes`), verifying it on the way. Returns the file's size and
/// the verification's outcome. A refusal has drained the frames already. The file is fsynced
/// here; [`vmrepl_store::spool::accept`] gives it its verified name after verification.
async fn receive(
    framed: &mut Conn,
    row: &ReplicaRow,
    path: &PathBuf,
    resume: Option<Resume>,
) -> Result<Result<(u64, replica::Verified), Refusal>, FrameError> {
    let cap = size_cap(row);
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let opened: Result<(tokio::fs::File, u64), Refusal> = async {
        match resume {
            Some(r) => {
                let p = path.clone();
                let held = tokio::task::spawn_blocking(move || {
                    std::fs::File::open(&p)
                        .map_err(|e| e.to_string())
                        .and_then(|f| {
                            vmrepl_log::scan_valid_prefix(std::io::BufReader::new(f))
                                .map_err(|e| e.to_string())
                        })
                        .map(|v| v.bytes)
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                match held {
                    Ok(b) if b >= r.bytes && r.bytes > 0 => {}
                    Ok(b) => {
                        return Err(refuse(
                            RefusalCode::BadRequest,
                            format!(
                            "cannot resume log at byte {}: the replica holds {b} valid bytes of \
                                 it; ask ReplicaState again",
                            r.bytes
                        ),
                        ))
                    }
                    Err(e) => {
                        return Err(refuse(
                            RefusalCode::BadRequest,
                            format!("cannot resume: no partial log here ({e}); send it whole"),
                        ))
                    }
                }
                let f = tokio::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .await
                    .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
                f.set_len(r.bytes)
                    .await
                    .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
                let mut f = f;
                use tokio::io::AsyncSeekExt;
                f.seek(std::io::SeekFrom::Start(r.bytes))
                    .await
                    .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
                Ok((f, r.bytes))
            }
            None => tokio::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .await
                .map(|f| (f, 0))
                .map_err(|e| refuse(RefusalCode::Internal, format!("{}: {e}", path.display()))),
        }
    }
    .await;
    let (mut file, mut size) = match opened {
        Ok(x) => x,
        Err(r) => {
            drain(framed).await?;
            return Ok(Err(r));
        }
    };
    let (verify_tx, verifier) = start_verifier(path, size);
    let mut writeback = vmrepl_store::EarlyWriteback::new(path);
    let mut verify_tx = Some(verify_tx);
    let mut failure: Option<Refusal> = None;
    let mut since_check = u64::MAX;
    loop {
        let frame = match framed.read_frame().await {
            Ok(f) => f,
            Err(e) => {
                // A cut transfer: keep what arrived for a resume.
                let _ = file.sync_all().await;
                return Err(e);
            }
        };
        let data = match frame {
            Frame::Data(d) => d,
            Frame::Control(_) => {
                let _ = file.sync_all().await;
                return Err(FrameError::UnexpectedKind {
                    expected: frame::FrameKind::Data,
                    got: frame::FrameKind::Control,
                    len: 0,
                });
            }
        };
        if data.is_empty() {
            break;
        }
        if failure.is_some() {
            continue;
        }
        let n = data.len() as u64;
        if size + n > cap {
            failure = Some(refuse(
                RefusalCode::BadLog,
                format!(
                    "log is larger than {cap} bytes, more than VM {} can need; refused",
                    row.name
                ),
            ));
            continue;
        }
        if since_check >= 64 << 20 {
            since_check = 0;
            let free = free_bytes(&dir).unwrap_or(u64::MAX);
            let needed = (64u64 << 20).saturating_add(vmrepl_store::SPACE_HEADROOM);
            if free < needed {
                failure = Some(refuse(
                    RefusalCode::DiskFull,
                    format!(
                        "{}: needed {needed} bytes, free {free} bytes on the replica storage",
                        path.display()
                    ),
                ));
                continue;
            }
        }
        if let Err(e) = file.write_all(&data).await {
            failure = Some(if vmrepl_store::spool::is_no_space(&e) {
                refuse(
                    RefusalCode::DiskFull,
                    format!(
                        "{}: needed {n} more bytes, free {} bytes",
                        path.display(),
                        free_bytes(&dir).unwrap_or(0)
                    ),
                )
            } else {
                refuse(
                    RefusalCode::Internal,
                    format!("cannot write {}: {e}", path.display()),
                )
            });
            continue;
        }
        size += n;
        since_check += n;
        writeback.wrote(n);
        if let Some(tx) = &verify_tx {
            if tx.send(data).await.is_err() {
                // The verifier stopped: the log is bad; its error comes out below.
                verify_tx = None;
            }
        }
    }
    drop(verify_tx);
    let verified = verifier
        .await
        .unwrap_or_else(|e| Err(format!("the verifier failed: {e}")));
    // Durable through the descriptor that wrote it, and no early write-back failed: a
    // write-back error is reported once only, so an fsync on another descriptor could succeed
    // for bytes that are not on disk (I1). `spool::accept` relies on this.
    let early = tokio::task::spawn_blocking(move || writeback.finish())
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    let flushed = match (file.flush().await, early) {
        (Ok(()), Ok(())) => file.sync_all().await,
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    if let Some(f) = failure {
        if f.code == RefusalCode::BadLog {
            let _ = tokio::fs::remove_file(path).await;
        }
        return Ok(Err(f));
    }
    if let Err(e) = flushed {
        let code = if vmrepl_store::spool::is_no_space(&e) {
            RefusalCode::DiskFull
        } else {
            RefusalCode::Internal
        };
        return Ok(Err(refuse(
            code,
            format!(
                "cannot make {} durable: {e}; nothing was acknowledged",
                path.display()
            ),
        )));
    }
    Ok(Ok((size, verified)))
}
