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

use std::fmt::Display;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::cert::{
    describe_subject, diagnose, fmt_time, present_ekus, summarize_der, CertProblem, CertSummary,
    DiagnoseCtx, Role,
};
use crate::pki::HostIdentity;

/// A TLS connection between two hosts, either side.
pub type TlsStream = tokio_rustls::TlsStream<TcpStream>;

/// Time allowed for the TCP connection by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the TLS handshake (and admission) by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// The byte the server sends once it has accepted the client's certificate.
const ADMITTED: u8 = 0x06;

/// Who is at the other end, from its verified certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerIdentity {
    /// The certificate's first DNS name that is not a wildcard (lower case).
    pub host_name: String,
    /// SHA-256 of the peer's certificate, upper-case hex.
    pub fingerprint: String,
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

/// The WebPKI client verifier, with a diagnosis of every refusal put into `slot`.
#[derive(Debug)]
struct DiagnosingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trusted: Vec<String>,
    slot: Slot,
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
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| {
                let ctx = DiagnoseCtx {
                    trusted: &self.trusted,
                    expected_name: None,
                    role: Role::Client,
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

/// The WebPKI server verifier, with a diagnosis of every refusal put into `slot`.
#[derive(Debug)]
struct DiagnosingServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    trusted: Vec<String>,
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
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| {
                let expected = server_name.to_str();
                let ctx = DiagnoseCtx {
                    trusted: &self.trusted,
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
/// reason for refusing a client certificate into `slot`.
fn server_config(identity: &HostIdentity, slot: Slot) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(
        Arc::new(identity.root_store()),
        provider.clone(),
    )
    .build()
    .map_err(config_err)?;
    let verifier = DiagnosingClientVerifier {
        inner,
        trusted: identity.trusted_ca_names().to_vec(),
        slot,
    };
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(identity.cert_chain().to_vec(), identity.key())
        .map_err(config_err)
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
        trusted: identity.trusted_ca_names().to_vec(),
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

fn peer_identity(
    peer: &str,
    certs: Option<&[CertificateDer<'static>]>,
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
    match summary.host_name() {
        Some(h) if !h.starts_with('*') => Ok(PeerIdentity {
            host_name: h.to_ascii_lowercase(),
            fingerprint: summary.fingerprint_sha256.clone(),
        }),
        _ => Err(no_name(summary.subject.clone(), summary.sans.join(", "))),
    }
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
    let slot: Slot = Arc::default();
    let connector = TlsConnector::from(Arc::new(client_config(identity, slot.clone())?));
    let handshake = async {
        let mut tls = connector
            .connect(server_name, tcp)
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
        let peer = peer_identity(&host, tls.get_ref().1.peer_certificates())?;
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
#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    identity: Arc<HostIdentity>,
    handshake_timeout: Duration,
}

impl Listener {
    /// Listens on `addr` (e.g. `0.0.0.0:8443`, or `127.0.0.1:0` for an
    /// OS-assigned port) as `identity`.
    pub async fn bind<A>(addr: A, identity: Arc<HostIdentity>) -> Result<Listener, TlsError>
    where
        A: ToSocketAddrs + Display,
    {
        let addr_str = addr.to_string();
        // Build once so a configuration problem shows at bind time.
        server_config(&identity, Arc::default())?;
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|source| TlsError::Bind {
                addr: addr_str,
                source,
            })?;
        Ok(Listener {
            tcp,
            identity,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        })
    }

    /// The address actually bound (with the OS-assigned port).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Changes the time a client gets to complete the handshake.
    pub fn set_handshake_timeout(&mut self, timeout: Duration) {
        self.handshake_timeout = timeout;
    }

    /// Accepts one TCP connection and runs the handshake on it. A refused
    /// client gives an error (and a warning in the log) but the listener stays
    /// usable: call `accept` again. A server that must not be held up by one
    /// slow client should use [`Listener::accept_tcp`] and run
    /// [`Incoming::handshake`] in its own task.
    pub async fn accept(&self) -> Result<(TlsStream, PeerIdentity), TlsError> {
        self.accept_tcp().await?.handshake().await
    }

    /// Accepts one TCP connection without the handshake.
    pub async fn accept_tcp(&self) -> Result<Incoming, TlsError> {
        let (tcp, peer_addr) = self
            .tcp
            .accept()
            .await
            .map_err(|source| TlsError::Accept { source })?;
        let _ = tcp.set_nodelay(true);
        Ok(Incoming {
            tcp,
            peer_addr,
            identity: self.identity.clone(),
            timeout: self.handshake_timeout,
        })
    }
}

/// A TCP connection accepted by a [`Listener`], before the TLS handshake.
#[derive(Debug)]
pub struct Incoming {
    tcp: TcpStream,
    peer_addr: SocketAddr,
    identity: Arc<HostIdentity>,
    timeout: Duration,
}

impl Incoming {
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Runs the server side of the handshake: the client must present a
    /// certificate that chains to a trusted CA and carries clientAuth. Logs
    /// every refusal with the client's address and the reason.
    pub async fn handshake(self) -> Result<(TlsStream, PeerIdentity), TlsError> {
        let peer_addr = self.peer_addr;
        let result = tokio::time::timeout(self.timeout, async {
            let slot: Slot = Arc::default();
            let acceptor =
                TlsAcceptor::from(Arc::new(server_config(&self.identity, slot.clone())?));
            let mut tls = acceptor
                .accept(self.tcp)
                .await
                .map_err(|e| server_failure(peer_addr, &self.identity, &slot, e))?;
            let peer = peer_identity(&peer_addr.to_string(), tls.get_ref().1.peer_certificates())?;
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
