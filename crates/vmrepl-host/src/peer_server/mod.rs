//! Replica-server side of the peer API.
//!
//! Every connection: mutual-TLS handshake (in its own task, so a slow client blocks nobody),
//! protocol version negotiation, `Hello` both ways, then requests one at a time. Every request
//! but `Hello` and `VmRunning` needs the replica server enabled and the primary authorized
//! (its verified certificate host name matched against the authorization entries), and requests
//! about an existing replica VM need the primary to be in its trust group. Every refusal is
//! logged with the peer host and the reason. Nothing received touches a replica image before it
//! is durable and verified (I4); see [`crate::replica`] for applying.

use crate::host::Host;
use crate::peer::proto::{PeerRequest, PeerResponse, RefusalCode};
use crate::replica::{self};
use std::sync::Arc;
use vmrepl_transport::frame::{self, FrameError, Framed};
use vmrepl_transport::tls::{PeerIdentity, TlsStream};
const T: &str = "vmrepl::peer";

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

pub(crate) use crate::peer::proto::Refusal;

fn refuse(code: RefusalCode, message: impl Into<String>) -> Refusal {
    Refusal::new(code, message)
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
        let idle = daemon.cfg().peer_limits.idle_timeout();
        // Between requests the idle deadline applies; within one, the frame deadline.
        let usual = framed.timeout();
        framed.set_timeout(idle);
        let next = framed.read_frame().await;
        framed.set_timeout(usual);
        let frame = match next {
            Ok(f) => f,
            Err(e) if e.is_closed() => return,
            Err(e) if e.is_closed_abruptly() => {
                tracing::debug!(target: T, peer = %host, "connection closed without close_notify");
                return;
            }
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
                let mut info = daemon.vmm.caps().clone();
                // The peer compares clocks with it (`vmrepl doctor`).
                info.now_unix_ms = Some(crate::db::now_ms());
                Some(PeerResponse::Hello {
                    host_info: Box::new(info),
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
        PeerRequest::RangeDigests { vm_uuid, range } => {
            range_digests(daemon, peer, vm_uuid, range).await
        }
        PeerRequest::PrimaryState { vm_uuid } => {
            crate::failover::primary_state(daemon, peer, vm_uuid)
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
        PeerRequest::MyGrant => authorize(daemon).map(|g| PeerResponse::Granted {
            free_bytes: free_bytes(&g.storage),
            storage: g.storage,
            trust_group: g.trust_group,
            entry: g.entry,
        }),
        PeerRequest::CheckExistingCopy { vm } => authorize(daemon).and_then(|_| {
            check_definition(daemon, &vm)?;
            replica::check_existing_copy(daemon, peer, &vm).map(|_| PeerResponse::Ok)
        }),
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
        PeerRequest::UpdateDefinition { vm } => update_definition(daemon, peer, *vm).await,
        PeerRequest::SetPolicy { vm_uuid, policy } => authorize(daemon)
            .and_then(|g| check_policy(&policy).map(|()| g))
            .and_then(|g| own_replica(daemon, peer, &g, vm_uuid))
            .and_then(|_| {
                let db = daemon.db();
                db.set_replica_policy(vm_uuid, &policy)
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

mod admission;
mod replicas;
mod spool_file;
mod transfer;

use admission::*;
use replicas::*;
use transfer::*;
