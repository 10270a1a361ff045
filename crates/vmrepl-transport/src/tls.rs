//! Mutual TLS between vmrepl hosts.
//!
//! The replica server ([`Listener`]) requires a client certificate that
//! chains to one of its trusted CAs and carries clientAuth; the primary
//! ([`connect`]) verifies the server's certificate against its trusted CAs and
//! the host name it meant to reach. Both sides wrap the standard WebPKI
//! verifiers so that a refusal names the exact cause: expired (with the
//! date), not yet valid, unknown CA (with the issuer), name mismatch (both
//! names), missing client certificate, missing EKU.
//!
//! After the handshake the server sends one admission byte. With TLS 1.3 the
//! client finishes its handshake before the server has judged the client's
//! certificate; waiting for that byte makes [`connect`] return the server's
//! verdict ("the replica server refused our certificate: ...") instead of
//! leaving it to the first read.

use std::collections::HashMap;
use std::fmt::Display;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig,
    SignatureScheme,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::authz::normalize_host_name;
use crate::cert::{
    describe_subject, diagnose, fingerprint_sha256, fmt_time, present_ekus, summarize_der,
    CertProblem, CertSummary, DiagnoseCtx, Role,
};
use crate::pki::HostIdentity;

/// A TLS connection between two hosts, either side.
pub type TlsStream = tokio_rustls::TlsStream<Buffered>;

/// The TCP stream under TLS, with its reads buffered: rustls reads one TLS record (16 KiB) at a
/// time, which was a quarter of a million `recvfrom` calls for a 4 GiB log; through a buffer the
/// kernel hands over what has arrived in one call. Writes go straight through (rustls already
/// writes its records in batches, and an alert written just before a connection is dropped
/// must not wait in a buffer).
pub type Buffered = tokio::io::BufReader<TcpStream>;

/// Bytes of [`Buffered`]'s read buffer.
const READ_BUFFER: usize = 256 << 10;

fn buffered(tcp: TcpStream) -> Buffered {
    tokio::io::BufReader::with_capacity(READ_BUFFER, tcp)
}

/// Time allowed for the TCP connection by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the TLS handshake (and admission) by default. Short, because
/// until it ends the peer is unauthenticated and holds one of the
/// [`Limits::max_handshakes`] slots.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP keepalive on every peer socket (accepted and outgoing): the first probe
/// after this much silence, so a peer that vanished (power loss, a cut link)
/// is noticed in about `idle + interval * retries` = 60 s instead of never.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the kernel drops the connection.
pub const KEEPALIVE_RETRIES: u32 = 3;

/// How long data sent on a peer socket may stay unacknowledged by the other
/// side's kernel before the connection is dropped (`TCP_USER_TIMEOUT`). A link
/// that dies in the middle of a transfer (a cable pulled, a route gone, no reset
/// ever arrives) then fails the transfer after this long, not after the 120 s
/// frame deadline: keepalive probes are not sent while data is in flight. A
/// working link acknowledges within round trips, however slow the replica is
/// to answer (its kernel acknowledges).
pub const UNACKED_TIMEOUT: Duration = Duration::from_secs(20);

/// Turns on TCP keepalive ([`KEEPALIVE_IDLE`], [`KEEPALIVE_INTERVAL`],
/// [`KEEPALIVE_RETRIES`]) and [`UNACKED_TIMEOUT`] on a peer socket. Best
/// effort: a failure is logged.
pub fn set_keepalive(tcp: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let sock = socket2::SockRef::from(tcp);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!("cannot turn on TCP keepalive: {e}");
    }
    if let Err(e) = sock.set_tcp_user_timeout(Some(UNACKED_TIMEOUT)) {
        tracing::debug!("cannot set TCP_USER_TIMEOUT: {e}");
    }
}

/// Limits on the peer listener, so that unauthenticated clients cannot use up
/// the daemon's file descriptors or handshake capacity (review M1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// TLS handshakes in progress at once, from all addresses. A connection
    /// over this limit is closed at once, before any TLS byte.
    pub max_handshakes: usize,
    /// TLS handshakes in progress at once from one IP address, so that one
    /// address cannot take all [`Limits::max_handshakes`] slots.
    pub max_handshakes_per_ip: usize,
    /// Peer connections open at once (handshaking or established). A
    /// connection over this limit is closed at once.
    pub max_connections: usize,
    /// Time a client gets for the TCP-to-admitted handshake.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_handshakes: 32,
            max_handshakes_per_ip: 8,
            max_connections: 256,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

/// The byte the server sends once it has accepted the client's certificate.
const ADMITTED: u8 = 0x06;

/// Who is at the other end, from its verified certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerIdentity {
    /// The certificate's first DNS name that is not a wildcard, in the one
    /// canonical form ([`crate::authz::normalize_host_name`]: lower case, no
    /// trailing dot, a valid host name). A certificate whose name cannot be
    /// brought to that form is refused at the handshake.
    pub host_name: String,
    /// SHA-256 of the peer's certificate, upper-case hex.
    pub fingerprint: String,
    /// SHA-256 (upper-case hex) of every CA certificate on the verified path
    /// from the peer's certificate to our trust anchor: its direct issuer
    /// first, the trusted root (one of our trusted CAs) last. Authorization
    /// entries with an `issuer` are checked against this list.
    #[serde(default)]
    pub ca_fingerprints: Vec<String>,
}

/// Errors of connecting, listening and the TLS handshake.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("could not resolve {addr}: {source}; check the host name and port")]
    Resolve { addr: String, source: io::Error },
    #[error(
        "could not connect to {host} at {addr}: {source}; check that the vmrepl daemon runs \
         there and listens on that port, and that no firewall blocks it"
    )]
    Connect {
        host: String,
        addr: String,
        source: io::Error,
    },
    #[error(
        "timed out after {secs} s connecting to {host} at {addr}; check the address, the \
         network path and the firewall"
    )]
    ConnectTimeout {
        host: String,
        addr: String,
        secs: u64,
    },
    #[error(
        "the TLS handshake with {peer} did not finish within {secs} s; the peer is stalled, or \
         is not a vmrepl host, or something in between (a proxy, TLS inspection) holds it up"
    )]
    HandshakeTimeout { peer: String, secs: u64 },
    #[error("the replica server {host}'s certificate is not acceptable: {problem}")]
    ServerCertificate { host: String, problem: CertProblem },
    #[error("the replica server {host} refused our certificate {ours}: {reason}")]
    RefusedByServer {
        host: String,
        ours: String,
        reason: String,
    },
    #[error("refused the client at {peer_addr}: its certificate is not acceptable: {problem}")]
    ClientCertificate {
        peer_addr: SocketAddr,
        problem: CertProblem,
    },
    #[error(
        "refused the client at {peer_addr}: it presented no client certificate; every vmrepl \
         peer must authenticate with a host certificate (serverAuth + clientAuth) issued by a \
         CA this host trusts"
    )]
    ClientNoCertificate { peer_addr: SocketAddr },
    #[error("the client at {peer_addr} refused our certificate {ours}: {reason}")]
    RefusedByClient {
        peer_addr: SocketAddr,
        ours: String,
        reason: String,
    },
    #[error("the TLS handshake with {peer} failed: {source}")]
    Handshake { peer: String, source: io::Error },
    #[error(
        "{host} closed the connection right after the TLS handshake without admitting us; it \
         may not be a vmrepl host, or it dropped the connection (see its log)"
    )]
    NotAdmitted { host: String },
    #[error(
        "the peer {peer}'s certificate was verified but names no usable host (subject \
         {subject}, names {names}); its certificate needs the host's FQDN as a DNS name"
    )]
    NoPeerHostName {
        peer: String,
        subject: String,
        names: String,
    },
    #[error(
        "the peer {peer}'s certificate {subject} names a host that is not a valid host name: \
         {detail}; its certificate's first DNS name must be the host's FQDN"
    )]
    BadPeerHostName {
        peer: String,
        subject: String,
        detail: String,
    },
    #[error(
        "could not listen on {addr}: {source}; check that no other process uses the port and \
         that this user may bind it"
    )]
    Bind { addr: String, source: io::Error },
    #[error("accepting a TCP connection failed: {source}")]
    Accept { source: io::Error },
    #[error("the TLS configuration could not be built: {detail}")]
    Config { detail: String },
    #[error("the host name {name:?} to connect to is not valid: {detail}")]
    BadServerName { name: String, detail: String },
}

type Slot = Arc<Mutex<Option<CertProblem>>>;

tokio::task_local! {
    /// Where the shared server verifier puts the diagnosis of a refused client
    /// certificate: one slot per handshake, set around `accept` (the verifier
    /// runs while that future is polled, in the same task).
    static SERVER_SLOT: Slot;
}

fn store(slot: &Slot, problem: CertProblem) {
    if let Ok(mut g) = slot.lock() {
        *g = Some(problem);
    }
}

fn take(slot: &Slot) -> Option<CertProblem> {
    slot.lock().ok().and_then(|mut g| g.take())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_err(e: impl Display) -> TlsError {
    TlsError::Config {
        detail: e.to_string(),
    }
}

/// A revoked certificate among `ee` and `intermediates`, if any.
fn revoked(
    identity: &HostIdentity,
    ee: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Option<CertProblem> {
    std::iter::once(ee).chain(intermediates).find_map(|c| {
        let fingerprint = fingerprint_sha256(c);
        identity
            .is_revoked(&fingerprint)
            .then(|| CertProblem::Revoked {
                subject: summarize_der(c)
                    .map(|s| s.subject)
                    .unwrap_or_else(|_| "(unparsable)".into()),
                fingerprint,
            })
    })
}

fn revoked_error() -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
}

/// The WebPKI client verifier, with a diagnosis of every refusal put into the
/// handshake's [`SERVER_SLOT`], and the revocation list checked first.
#[derive(Debug)]
struct DiagnosingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    identity: Arc<HostIdentity>,
}

fn store_server(problem: CertProblem) {
    let _ = SERVER_SLOT.try_with(|slot| store(slot, problem));
}

impl ClientCertVerifier for DiagnosingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Some(problem) = revoked(&self.identity, end_entity, intermediates) {
            store_server(problem);
            return Err(revoked_error());
        }
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| {
                let trusted = self.identity.trusted_ca_names();
                let ctx = DiagnoseCtx {
                    trusted: &trusted,
                    expected_name: None,
                    role: Role::Client,
                };
                store_server(diagnose(end_entity, e, &ctx));
            })
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The WebPKI server verifier, with a diagnosis of every refusal put into `slot`.
#[derive(Debug)]
struct DiagnosingServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    identity: HostIdentity,
    slot: Slot,
}

impl ServerCertVerifier for DiagnosingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(problem) = revoked(&self.identity, end_entity, intermediates) {
            store(&self.slot, problem);
            return Err(revoked_error());
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| {
                let expected = server_name.to_str();
                let trusted = self.identity.trusted_ca_names();
                let ctx = DiagnoseCtx {
                    trusted: &trusted,
                    expected_name: Some(&expected),
                    role: Role::Server,
                };
                store(&self.slot, diagnose(end_entity, e, &ctx));
            })
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The server side's rustls configuration for `identity`, reporting the
/// reason for refusing a client certificate into the handshake's
/// [`SERVER_SLOT`]. Built once per [`Listener`] (and again on
/// [`Listener::reload`]); no session state is kept, so every connection
/// verifies the client's certificate in full.
fn server_config(identity: &Arc<HostIdentity>) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(
        Arc::new(identity.root_store()),
        provider.clone(),
    )
    .build()
    .map_err(config_err)?;
    let verifier = DiagnosingClientVerifier {
        inner,
        identity: identity.clone(),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(identity.cert_chain().to_vec(), identity.key())
        .map_err(config_err)?;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The client side's rustls configuration for `identity`.
fn client_config(identity: &HostIdentity, slot: Slot) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(
        Arc::new(identity.root_store()),
        provider.clone(),
    )
    .build()
    .map_err(config_err)?;
    let verifier = DiagnosingServerVerifier {
        inner,
        identity: identity.clone(),
        slot,
    };
    ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(identity.cert_chain().to_vec(), identity.key())
        .map_err(config_err)
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// The fingerprints of the CA certificates on the path from `ee` (with the
/// peer's `intermediates`) to one of our trust anchors: issuer first, anchor
/// last. The handshake has verified the chain already; this finds the path
/// again to learn which anchor it ends at.
fn ca_path(
    identity: &HostIdentity,
    ee: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    usage: webpki::KeyUsage,
) -> Result<Vec<String>, String> {
    // A root webpki cannot use is skipped (as in `HostIdentity::root_store`).
    let trust = identity.trust();
    let (index, anchors): (Vec<usize>, Vec<_>) = trust
        .roots
        .iter()
        .enumerate()
        .filter_map(|(i, r)| webpki::anchor_from_trusted_cert(r).ok().map(|a| (i, a)))
        .unzip();
    let cert = webpki::EndEntityCert::try_from(ee).map_err(|e| e.to_string())?;
    let path = cert
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .map_err(|e| e.to_string())?;
    let mut out: Vec<String> = path
        .intermediate_certificates()
        .map(|c| fingerprint_sha256(&c.der()))
        .collect();
    let anchor = path.anchor();
    match anchors.iter().position(|a| std::ptr::eq(a, anchor)) {
        Some(i) => out.push(trust.fingerprints[index[i]].clone()),
        None => return Err("the path ends at an unknown trust anchor".into()),
    }
    Ok(out)
}

/// Who the peer is, from its verified certificate chain: its canonical host
/// name (L3: lower case, no trailing dot, valid as a host name, or the
/// connection is refused), its certificate's fingerprint and the fingerprints
/// of the CAs on its verified path.
fn peer_identity(
    peer: &str,
    certs: Option<&[CertificateDer<'static>]>,
    identity: &HostIdentity,
    usage: webpki::KeyUsage,
) -> Result<PeerIdentity, TlsError> {
    let no_name = |subject: String, names: String| TlsError::NoPeerHostName {
        peer: peer.to_string(),
        subject,
        names,
    };
    let Some(ee) = certs.and_then(|c| c.first()) else {
        return Err(no_name("(no certificate)".into(), "(none)".into()));
    };
    let summary =
        summarize_der(ee).map_err(|d| no_name(format!("(unparsable: {d})"), "".into()))?;
    let host_name = match summary.host_name() {
        Some(h) if !h.starts_with('*') => {
            normalize_host_name(h).map_err(|e| TlsError::BadPeerHostName {
                peer: peer.to_string(),
                subject: summary.subject.clone(),
                detail: e.to_string(),
            })?
        }
        _ => return Err(no_name(summary.subject.clone(), summary.sans.join(", "))),
    };
    let intermediates = certs.map(|c| &c[1..]).unwrap_or_default();
    let ca_fingerprints =
        ca_path(identity, ee, intermediates, usage).map_err(|detail| TlsError::Handshake {
            peer: peer.to_string(),
            source: io::Error::other(format!(
                "the verified certificate of {host_name} could not be traced to a trusted CA \
                 again: {detail}"
            )),
        })?;
    Ok(PeerIdentity {
        host_name,
        fingerprint: summary.fingerprint_sha256.clone(),
        ca_fingerprints,
    })
}

/// Explains, from our side, why the server refused our certificate with `alert`.
fn explain_refusal(alert: AlertDescription, ours: &CertSummary) -> String {
    let now = OffsetDateTime::now_utc();
    match alert {
        AlertDescription::CertificateExpired => {
            if now > ours.not_after {
                format!(
                    "certificate expired: our certificate expired at {} (it is now {}); issue \
                     a new host certificate for this host",
                    fmt_time(ours.not_after),
                    fmt_time(now)
                )
            } else if now < ours.not_before {
                format!(
                    "certificate not yet valid: our certificate is not valid until {} (it is \
                     now {}); wait, or check this host's clock",
                    fmt_time(ours.not_before),
                    fmt_time(now)
                )
            } else {
                format!(
                    "it says our certificate is expired or not yet valid, but by our clock it \
                     is valid from {} to {}; check that the clocks of both hosts are right (NTP)",
                    fmt_time(ours.not_before),
                    fmt_time(ours.not_after)
                )
            }
        }
        AlertDescription::UnknownCA => format!(
            "it does not trust the CA that issued our certificate (unknown CA: issuer {}); add \
             that CA's certificate (its ca.pem) to the replica server's trusted CAs, or give \
             this host a certificate from a CA the server trusts",
            ours.issuer
        ),
        AlertDescription::UnsupportedCertificate => format!(
            "our certificate cannot be used for client authentication: it needs the clientAuth \
             (1.3.6.1.5.5.7.3.2) extended key usage (it has: {}); issue a host certificate with \
             both serverAuth and clientAuth",
            present_ekus(Some(ours))
        ),
        AlertDescription::CertificateRequired => "it requires a client certificate and we \
             presented none; configure this host's certificate"
            .to_string(),
        AlertDescription::CertificateRevoked => {
            "it says our certificate is revoked; issue a new host certificate".to_string()
        }
        AlertDescription::BadCertificate => "it says our certificate is bad (malformed or \
             refused by its policy); see the replica server's log for the reason"
            .to_string(),
        AlertDescription::DecryptError => "a signature did not verify: our certificate is not \
             correctly signed by its issuer, or our key does not match it"
            .to_string(),
        AlertDescription::AccessDenied => "it denied access to this host".to_string(),
        other => format!(
            "it ended the handshake with the TLS alert {other:?}; see the replica server's log"
        ),
    }
}

/// Maps a client-side handshake or admission failure to a [`TlsError`].
fn client_failure(host: &str, identity: &HostIdentity, slot: &Slot, e: io::Error) -> TlsError {
    if let Some(problem) = take(slot) {
        return TlsError::ServerCertificate {
            host: host.to_string(),
            problem,
        };
    }
    match rustls_error(&e) {
        Some(rustls::Error::AlertReceived(alert)) => TlsError::RefusedByServer {
            host: host.to_string(),
            ours: describe_subject(identity.summary()),
            reason: explain_refusal(*alert, identity.summary()),
        },
        _ => TlsError::Handshake {
            peer: host.to_string(),
            source: e,
        },
    }
}

/// Explains, from the server's side, why a client refused our certificate.
fn explain_client_refusal(alert: AlertDescription, ours: &CertSummary) -> String {
    let now = OffsetDateTime::now_utc();
    match alert {
        AlertDescription::BadCertificate => format!(
            "it most likely expected another host name (ours names {}); the primary must \
             connect using a name in this host's certificate, see its log",
            crate::cert::NameList(ours.sans.clone())
        ),
        AlertDescription::UnknownCA => format!(
            "it does not trust our CA (unknown CA: issuer {}); add that CA's certificate to the \
             primary's trusted CAs",
            ours.issuer
        ),
        AlertDescription::CertificateExpired => format!(
            "it says our certificate is expired or not yet valid (by our clock it is valid from \
             {} to {}, and it is now {}); renew it, or check the clocks",
            fmt_time(ours.not_before),
            fmt_time(ours.not_after),
            fmt_time(now)
        ),
        AlertDescription::UnsupportedCertificate => format!(
            "our certificate lacks an extended key usage it needs (it has: {}); issue one with \
             both serverAuth and clientAuth",
            present_ekus(Some(ours))
        ),
        other => format!("it ended the handshake with the TLS alert {other:?}; see its log"),
    }
}

/// Maps a server-side handshake failure to a [`TlsError`].
fn server_failure(
    peer_addr: SocketAddr,
    identity: &HostIdentity,
    slot: &Slot,
    e: io::Error,
) -> TlsError {
    if let Some(problem) = take(slot) {
        return TlsError::ClientCertificate { peer_addr, problem };
    }
    match rustls_error(&e) {
        Some(rustls::Error::NoCertificatesPresented) => TlsError::ClientNoCertificate { peer_addr },
        Some(rustls::Error::AlertReceived(alert)) => TlsError::RefusedByClient {
            peer_addr,
            ours: describe_subject(identity.summary()),
            reason: explain_client_refusal(*alert, identity.summary()),
        },
        _ => TlsError::Handshake {
            peer: peer_addr.to_string(),
            source: e,
        },
    }
}

/// Connects to the replica server `expected_host` at `addr` with the default
/// timeouts; see [`connect_with_timeout`].
pub async fn connect<A>(
    addr: A,
    expected_host: &str,
    identity: &HostIdentity,
) -> Result<(TlsStream, PeerIdentity), TlsError>
where
    A: ToSocketAddrs + Display,
{
    connect_with_timeout(addr, expected_host, identity, DEFAULT_CONNECT_TIMEOUT).await
}

/// Connects to `addr`, runs the mutual-TLS handshake presenting `identity`,
/// verifies that the server's certificate chains to a trusted CA and names
/// `expected_host`, and waits until the server has accepted our certificate.
/// `timeout` bounds the TCP connection and, separately, the handshake.
pub async fn connect_with_timeout<A>(
    addr: A,
    expected_host: &str,
    identity: &HostIdentity,
    timeout: Duration,
) -> Result<(TlsStream, PeerIdentity), TlsError>
where
    A: ToSocketAddrs + Display,
{
    let addr_str = addr.to_string();
    let host = expected_host.trim_end_matches('.').to_ascii_lowercase();
    let server_name = ServerName::try_from(host.clone()).map_err(|e| TlsError::BadServerName {
        name: expected_host.to_string(),
        detail: e.to_string(),
    })?;
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(TlsError::ConnectTimeout {
                host,
                addr: addr_str,
                secs: timeout.as_secs(),
            })
        }
        Ok(Err(source)) => {
            return Err(TlsError::Connect {
                host,
                addr: addr_str,
                source,
            })
        }
        Ok(Ok(tcp)) => tcp,
    };
    let _ = tcp.set_nodelay(true);
    set_keepalive(&tcp);
    let slot: Slot = Arc::default();
    let connector = TlsConnector::from(Arc::new(client_config(identity, slot.clone())?));
    let handshake = async {
        let mut tls = connector
            .connect(server_name, buffered(tcp))
            .await
            .map_err(|e| client_failure(&host, identity, &slot, e))?;
        let mut admitted = [0u8; 1];
        match tls.read_exact(&mut admitted).await {
            Ok(_) if admitted[0] == ADMITTED => {}
            Ok(_) => {
                return Err(TlsError::Handshake {
                    peer: host.clone(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "expected the admission byte {ADMITTED:#04x} but got {:#04x}; the \
                             peer does not speak the vmrepl protocol",
                            admitted[0]
                        ),
                    ),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(TlsError::NotAdmitted { host: host.clone() })
            }
            Err(e) => return Err(client_failure(&host, identity, &slot, e)),
        }
        let peer = peer_identity(
            &host,
            tls.get_ref().1.peer_certificates(),
            identity,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok((TlsStream::Client(tls), peer))
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(r) => r,
        Err(_) => Err(TlsError::HandshakeTimeout {
            peer: format!("{host} at {addr_str}"),
            secs: timeout.as_secs(),
        }),
    }
}

/// The replica server's listening socket.
///
/// One rustls [`ServerConfig`] is shared by all connections (built at bind,
/// rebuilt by [`Listener::reload`]). [`Listener::accept_tcp`] enforces the
/// [`Limits`]: a connection over the total limit, over the limit of
/// handshakes in progress or over the per-address handshake limit is closed
/// at once, with one log line at most every [`OVER_LIMIT_LOG_EVERY`].
#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    current: std::sync::RwLock<(Arc<HostIdentity>, Arc<ServerConfig>)>,
    limits: Limits,
    handshakes: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    over_limit: Mutex<OverLimitLog>,
}

/// At most one "closed a connection over the limit" line per this interval.
pub const OVER_LIMIT_LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct OverLimitLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl Listener {
    /// Listens on `addr` (e.g. `0.0.0.0:8443`, or `127.0.0.1:0` for an
    /// OS-assigned port) as `identity`, with the default [`Limits`].
    pub async fn bind<A>(addr: A, identity: Arc<HostIdentity>) -> Result<Listener, TlsError>
    where
        A: ToSocketAddrs + Display,
    {
        let addr_str = addr.to_string();
        // Built once, so a configuration problem shows at bind time.
        let config = Arc::new(server_config(&identity)?);
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|source| TlsError::Bind {
                addr: addr_str,
                source,
            })?;
        let limits = Limits::default();
        Ok(Listener {
            tcp,
            current: std::sync::RwLock::new((identity, config)),
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes)),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            per_ip: Arc::default(),
            over_limit: Mutex::default(),
        })
    }

    /// The address actually bound (with the OS-assigned port).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Changes the time a client gets to complete the handshake.
    pub fn set_handshake_timeout(&mut self, timeout: Duration) {
        self.limits.handshake_timeout = timeout;
    }

    /// Sets the connection and handshake limits (before serving: connections
    /// already accepted keep counting against the old limits).
    pub fn set_limits(&mut self, limits: Limits) {
        self.handshakes = Arc::new(Semaphore::new(limits.max_handshakes.max(1)));
        self.connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        self.limits = limits;
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Rebuilds the shared [`ServerConfig`] from the identity's trusted CAs as
    /// they are now (after [`HostIdentity::reload_trust`]). New handshakes use
    /// it; connections already established are not affected.
    pub fn reload(&self) -> Result<(), TlsError> {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        current.1 = Arc::new(server_config(&current.0)?);
        Ok(())
    }

    /// Accepts one TCP connection and runs the handshake on it. A refused
    /// client gives an error (and a warning in the log) but the listener stays
    /// usable: call `accept` again. A server that must not be held up by one
    /// slow client should use [`Listener::accept_tcp`] and run
    /// [`Incoming::handshake`] in its own task.
    pub async fn accept(&self) -> Result<(TlsStream, PeerIdentity), TlsError> {
        self.accept_tcp().await?.handshake().await
    }

    /// Accepts the next TCP connection that fits the [`Limits`], without the
    /// handshake. Connections over a limit are closed here and never returned.
    pub async fn accept_tcp(&self) -> Result<Incoming, TlsError> {
        loop {
            let (tcp, peer_addr) = self
                .tcp
                .accept()
                .await
                .map_err(|source| TlsError::Accept { source })?;
            let Ok(connection) = self.connections.clone().try_acquire_owned() else {
                self.over_limit(
                    peer_addr,
                    format_args!(
                        "{} peer connections are open (the limit, `peer_limits.max_connections`)",
                        self.limits.max_connections
                    ),
                );
                continue;
            };
            let ip = peer_addr.ip();
            let handshake = {
                let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
                let n = per_ip.entry(ip).or_insert(0);
                if *n >= self.limits.max_handshakes_per_ip {
                    None
                } else if let Ok(p) = self.handshakes.clone().try_acquire_owned() {
                    *n += 1;
                    Some(HandshakeSlot {
                        _permit: p,
                        ip,
                        per_ip: self.per_ip.clone(),
                    })
                } else {
                    None
                }
            };
            let Some(handshake) = handshake else {
                self.over_limit(
                    peer_addr,
                    format_args!(
                        "too many TLS handshakes are in progress (at most {} in all and {} from \
                         one address)",
                        self.limits.max_handshakes, self.limits.max_handshakes_per_ip
                    ),
                );
                continue;
            };
            let _ = tcp.set_nodelay(true);
            set_keepalive(&tcp);
            let (identity, config) = self
                .current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            return Ok(Incoming {
                tcp,
                peer_addr,
                identity,
                config,
                timeout: self.limits.handshake_timeout,
                handshake: Some(handshake),
                connection: Some(ConnectionPermit(connection)),
            });
        }
    }

    /// Logs a connection closed over a limit, at most once per
    /// [`OVER_LIMIT_LOG_EVERY`] (with how many were closed silently since).
    fn over_limit(&self, peer_addr: SocketAddr, why: std::fmt::Arguments<'_>) {
        let mut log = self.over_limit.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if log
            .last
            .is_some_and(|t| now.duration_since(t) < OVER_LIMIT_LOG_EVERY)
        {
            log.suppressed += 1;
            return;
        }
        tracing::warn!(
            %peer_addr,
            "closed a new peer connection at once: {why}; {} more were closed since the last \
             such line",
            log.suppressed
        );
        log.last = Some(now);
        log.suppressed = 0;
    }
}

/// One slot of the listener's handshake limits, freed when dropped.
#[derive(Debug)]
struct HandshakeSlot {
    _permit: OwnedSemaphorePermit,
    ip: IpAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// A connection's place under [`Limits::max_connections`]; hold it as long as
/// the connection lives.
#[derive(Debug)]
pub struct ConnectionPermit(#[allow(dead_code)] OwnedSemaphorePermit);

/// A TCP connection accepted by a [`Listener`], before the TLS handshake.
#[derive(Debug)]
pub struct Incoming {
    tcp: TcpStream,
    peer_addr: SocketAddr,
    identity: Arc<HostIdentity>,
    config: Arc<ServerConfig>,
    timeout: Duration,
    handshake: Option<HandshakeSlot>,
    connection: Option<ConnectionPermit>,
}

impl Incoming {
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Takes the connection's permit: the caller holds it for as long as the
    /// connection lives, so that the connection counts against
    /// [`Limits::max_connections`]. Without this the connection stops counting
    /// once [`Incoming::handshake`] returns.
    pub fn connection_permit(&mut self) -> Option<ConnectionPermit> {
        self.connection.take()
    }

    /// Runs the server side of the handshake: the client must present a
    /// certificate that is not revoked, chains to a trusted CA, carries
    /// clientAuth and names a valid host. Logs every refusal with the client's
    /// address and the reason. Frees the handshake slot when it ends.
    pub async fn handshake(mut self) -> Result<(TlsStream, PeerIdentity), TlsError> {
        let peer_addr = self.peer_addr;
        let _slot = self.handshake.take();
        let identity = self.identity.clone();
        let slot: Slot = Arc::default();
        let acceptor = TlsAcceptor::from(self.config.clone());
        let result = tokio::time::timeout(self.timeout, async {
            let mut tls = SERVER_SLOT
                .scope(slot.clone(), acceptor.accept(buffered(self.tcp)))
                .await
                .map_err(|e| server_failure(peer_addr, &identity, &slot, e))?;
            let peer = peer_identity(
                &peer_addr.to_string(),
                tls.get_ref().1.peer_certificates(),
                &identity,
                webpki::KeyUsage::client_auth(),
            )?;
            let admit = async {
                tls.write_all(&[ADMITTED]).await?;
                tls.flush().await
            };
            admit.await.map_err(|source| TlsError::Handshake {
                peer: peer_addr.to_string(),
                source,
            })?;
            Ok((TlsStream::Server(tls), peer))
        })
        .await
        .unwrap_or_else(|_| {
            Err(TlsError::HandshakeTimeout {
                peer: peer_addr.to_string(),
                secs: self.timeout.as_secs(),
            })
        });
        match &result {
            Ok((_, peer)) => tracing::info!(
                %peer_addr, host = %peer.host_name, fingerprint = %peer.fingerprint,
                "accepted a peer"
            ),
            Err(e) => tracing::warn!(%peer_addr, "{e}"),
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_socket_gets_keepalive_and_a_limit_on_unacknowledged_data() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, _) = tokio::join!(TcpStream::connect(addr), l.accept());
        let c = c.unwrap();
        let sock = socket2::SockRef::from(&c);
        assert!(!sock.keepalive().unwrap());
        set_keepalive(&c);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(UNACKED_TIMEOUT));
    }

    fn summary(not_before: OffsetDateTime, not_after: OffsetDateTime) -> CertSummary {
        CertSummary {
            subject: "CN=hv1.example.org".into(),
            sans: vec!["hv1.example.org".into()],
            issuer: "CN=Lab CA".into(),
            not_before,
            not_after,
            fingerprint_sha256: "AB".repeat(32),
            extended_key_usages: vec!["serverAuth".into()],
            is_ca: false,
        }
    }

    #[test]
    fn refusal_explanations_use_our_certificate() {
        let now = OffsetDateTime::now_utc();
        let day = time::Duration::days(1);
        let expired = summary(now - 2 * day, now - day);
        let s = explain_refusal(AlertDescription::CertificateExpired, &expired);
        assert!(s.contains("expired at"), "{s}");
        let future = summary(now + day, now + 2 * day);
        let s = explain_refusal(AlertDescription::CertificateExpired, &future);
        assert!(s.contains("not valid until"), "{s}");
        let fine = summary(now - day, now + day);
        let s = explain_refusal(AlertDescription::CertificateExpired, &fine);
        assert!(s.contains("clocks"), "{s}");
        let s = explain_refusal(AlertDescription::UnknownCA, &fine);
        assert!(s.contains("unknown CA") && s.contains("CN=Lab CA"), "{s}");
        let s = explain_refusal(AlertDescription::UnsupportedCertificate, &fine);
        assert!(
            s.contains("clientAuth") && s.contains("has: serverAuth"),
            "{s}"
        );
        let s = explain_refusal(AlertDescription::CertificateRequired, &fine);
        assert!(s.contains("presented none"), "{s}");
    }
}
