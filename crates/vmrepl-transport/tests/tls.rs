//! Real certificates, real mutual TLS on loopback (OS-assigned ports).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use vmrepl_transport::frame::{Framed, VersionRange};
use vmrepl_transport::tls::{self, Listener, PeerIdentity, TlsError, TlsStream};
use vmrepl_transport::{Ca, CertProblem, HostCertSpec, HostIdentity, IssuedCert};

const DAY: time::Duration = time::Duration::days(1);
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

struct Pki {
    _dir: tempfile::TempDir,
    ca: Ca,
    other: Ca,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::create(&dir.path().join("ca"), "Lab CA").unwrap();
    let other = Ca::create(&dir.path().join("other"), "Other CA").unwrap();
    Pki {
        _dir: dir,
        ca,
        other,
    }
}

fn identity(ca: &Ca, host: &str) -> HostIdentity {
    let c = ca.issue_host(host, YEAR).unwrap();
    HostIdentity::from_pem(Some(host), &c.cert_pem, &c.key_pem, &[ca.cert_pem()]).unwrap()
}

/// An identity presenting `cert` (possibly bad) while trusting `trust`.
fn unchecked(cert: &IssuedCert, trust: &Ca) -> HostIdentity {
    HostIdentity::from_pem_unvalidated(&cert.cert_pem, &cert.key_pem, &[trust.cert_pem()]).unwrap()
}

type ServerResult = Result<(TlsStream, PeerIdentity), TlsError>;
type ClientResult = Result<(TlsStream, PeerIdentity), TlsError>;

async fn run(
    server: HostIdentity,
    client: HostIdentity,
    expected: &str,
) -> (ServerResult, ClientResult) {
    let listener = Listener::bind("127.0.0.1:0", Arc::new(server))
        .await
        .unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let srv = tokio::spawn(async move { listener.accept().await });
    let cli = tls::connect(addr, expected, &client).await;
    let srv = tokio::time::timeout(Duration::from_secs(10), srv)
        .await
        .expect("server finished")
        .unwrap();
    (srv, cli)
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Hello {
    host: String,
}

#[tokio::test]
async fn mutual_tls_happy_path_with_peer_identity_and_frames() {
    let p = pki();
    let server = identity(&p.ca, "hv-b.test");
    let client = identity(&p.ca, "hv-a.test");
    let server_fp = server.fingerprint().to_string();
    let client_fp = client.fingerprint().to_string();
    let ca_fp = p.ca.summary().fingerprint_sha256.clone();
    let (srv, cli) = run(server, client, "HV-B.test").await;
    let (s_stream, s_peer) = srv.unwrap();
    let (c_stream, c_peer) = cli.unwrap();
    assert_eq!(
        s_peer,
        PeerIdentity {
            host_name: "hv-a.test".into(),
            fingerprint: client_fp,
            ca_fingerprints: vec![ca_fp.clone()],
        }
    );
    assert_eq!(
        c_peer,
        PeerIdentity {
            host_name: "hv-b.test".into(),
            fingerprint: server_fp,
            ca_fingerprints: vec![ca_fp],
        }
    );
    assert_eq!(c_peer.fingerprint.len(), 64);

    let range = VersionRange { min: 1, max: 1 };
    let (fs, fc) = tokio::join!(
        Framed::negotiate(s_stream, range),
        Framed::negotiate(c_stream, range)
    );
    let (mut fs, mut fc) = (fs.unwrap(), fc.unwrap());
    assert_eq!(fs.version(), 1);
    fc.write_control(&Hello {
        host: "hv-a.test".into(),
    })
    .await
    .unwrap();
    let hello: Hello = fs.read_control().await.unwrap();
    assert_eq!(hello.host, "hv-a.test");
    fs.write_data(&[7u8; 70_000]).await.unwrap();
    let f = fc.read_frame().await.unwrap();
    assert_eq!(f, vmrepl_transport::Frame::Data(vec![7u8; 70_000]));
}

/// `hv-a.test` connects with `bad` to a good `hv-b.test`.
async fn with_bad_client(p: &Pki, bad: &IssuedCert) -> (ServerResult, ClientResult) {
    run(
        identity(&p.ca, "hv-b.test"),
        unchecked(bad, &p.ca),
        "hv-b.test",
    )
    .await
}

/// A good `hv-a.test` connects to `hv-b.test`, which presents `bad`.
async fn with_bad_server(p: &Pki, bad: &IssuedCert) -> (ServerResult, ClientResult) {
    run(
        unchecked(bad, &p.ca),
        identity(&p.ca, "hv-a.test"),
        "hv-b.test",
    )
    .await
}

/// The message of a side's failure (printed, so a failing assertion shows both sides).
fn failure(side: &str, r: Result<(TlsStream, PeerIdentity), TlsError>) -> (TlsError, String) {
    let e = r
        .err()
        .unwrap_or_else(|| panic!("the {side} accepted the handshake"));
    let msg = e.to_string();
    println!("{side}: {msg}");
    (e, msg)
}

/// The problem the server named in the client's certificate, and its message.
fn client_problem(srv: ServerResult) -> (CertProblem, String) {
    match failure("server", srv) {
        (TlsError::ClientCertificate { problem, .. }, msg) => (problem, msg),
        (other, _) => panic!("expected a client certificate problem, got {other:?}"),
    }
}

/// The problem the client named in the server's certificate, and its message.
fn server_problem(cli: ClientResult) -> (CertProblem, String) {
    match failure("client", cli) {
        (TlsError::ServerCertificate { problem, .. }, msg) => (problem, msg),
        (other, _) => panic!("expected a server certificate problem, got {other:?}"),
    }
}

#[tokio::test]
async fn client_from_unknown_ca_is_refused_on_both_sides() {
    let p = pki();
    let bad = p.other.issue_host("hv-a.test", YEAR).unwrap();
    let (srv, cli) = with_bad_client(&p, &bad).await;

    let (problem, msg) = client_problem(srv);
    assert!(
        matches!(problem, CertProblem::UnknownIssuer { .. }),
        "{msg}"
    );
    for needle in [
        "refused the client at 127.0.0.1:",
        "unknown CA",
        "CN=Other CA",
        "CN=Lab CA",
        "hv-a.test",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing in: {msg}");
    }

    let (c, msg) = failure("client", cli);
    assert!(matches!(c, TlsError::RefusedByServer { .. }), "{msg}");
    for needle in [
        "the replica server hv-b.test refused our certificate",
        "unknown CA",
        "CN=Other CA",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing in: {msg}");
    }
}

fn spec(host: &str, not_before: OffsetDateTime, not_after: OffsetDateTime) -> HostCertSpec {
    let mut s = HostCertSpec::new(host, YEAR);
    s.not_before = not_before;
    s.not_after = not_after;
    s
}

#[tokio::test]
async fn expired_client_certificate() {
    let p = pki();
    let now = OffsetDateTime::now_utc();
    let bad =
        p.ca.issue(&spec("hv-a.test", now - 10 * DAY, now - DAY))
            .unwrap();
    let not_after = bad.summary().unwrap().not_after;
    let (srv, cli) = with_bad_client(&p, &bad).await;
    let (problem, msg) = client_problem(srv);
    assert!(matches!(problem, CertProblem::Expired { .. }), "{msg}");
    let date = not_after
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert!(msg.contains(&format!("expired at {date}")), "{msg}");
    let (_, msg) = failure("client", cli);
    assert!(msg.contains("refused our certificate"), "{msg}");
    assert!(msg.contains(&format!("expired at {date}")), "{msg}");
}

#[tokio::test]
async fn not_yet_valid_client_certificate() {
    let p = pki();
    let now = OffsetDateTime::now_utc();
    let bad =
        p.ca.issue(&spec("hv-a.test", now + DAY, now + 10 * DAY))
            .unwrap();
    let (srv, cli) = with_bad_client(&p, &bad).await;
    let (_, msg) = failure("server", srv);
    assert!(msg.contains("is not valid until"), "{msg}");
    let (_, msg) = failure("client", cli);
    assert!(msg.contains("not valid until"), "{msg}");
}

#[tokio::test]
async fn expired_server_certificate() {
    let p = pki();
    let now = OffsetDateTime::now_utc();
    let bad =
        p.ca.issue(&spec("hv-b.test", now - 10 * DAY, now - DAY))
            .unwrap();
    let (_srv, cli) = with_bad_server(&p, &bad).await;
    let (problem, msg) = server_problem(cli);
    assert!(matches!(problem, CertProblem::Expired { .. }), "{msg}");
    assert!(
        msg.starts_with("the replica server hv-b.test's certificate is not acceptable"),
        "{msg}"
    );
}

#[tokio::test]
async fn server_certificate_from_unknown_ca() {
    let p = pki();
    let bad = p.other.issue_host("hv-b.test", YEAR).unwrap();
    let (_srv, cli) = with_bad_server(&p, &bad).await;
    let (_, msg) = failure("client", cli);
    assert!(msg.contains("unknown CA"), "{msg}");
    assert!(msg.contains("its issuer CN=Other CA"), "{msg}");
}

#[tokio::test]
async fn server_certificate_naming_another_host() {
    let p = pki();
    let (srv, cli) = run(
        identity(&p.ca, "other.test"),
        identity(&p.ca, "hv-a.test"),
        "hv-b.test",
    )
    .await;
    let (problem, msg) = server_problem(cli);
    assert!(matches!(problem, CertProblem::NameMismatch { .. }), "{msg}");
    assert!(msg.contains("name mismatch"), "{msg}");
    assert!(msg.contains("expected host name is hv-b.test"), "{msg}");
    assert!(msg.contains("names other.test"), "{msg}");
    // The server sees the client abort the handshake, and says what it likely means.
    let (_, msg) = failure("server", srv);
    assert!(msg.contains("refused our certificate"), "{msg}");
    assert!(msg.contains("ours names other.test"), "{msg}");
}

#[tokio::test]
async fn client_without_certificate() {
    let p = pki();
    let server = identity(&p.ca, "hv-b.test");
    let listener = Listener::bind("127.0.0.1:0", Arc::new(server))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = tokio::spawn(async move { listener.accept().await });

    // A plain TLS client that trusts the CA but presents no certificate.
    let mut roots = rustls::RootCertStore::empty();
    let ca_der =
        rustls::pki_types::pem::PemObject::from_pem_slice(p.ca.cert_pem().as_bytes()).unwrap();
    roots.add(ca_der).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("hv-b.test").unwrap();
    let client = connector.connect(name, tcp).await;
    if let Ok(mut stream) = client {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 1];
        let err = stream.read_exact(&mut b).await.unwrap_err();
        println!("client: {err}");
    }
    let s = srv.await.unwrap().unwrap_err();
    let msg = s.to_string();
    println!("server: {msg}");
    assert!(matches!(s, TlsError::ClientNoCertificate { .. }), "{msg}");
    assert!(msg.contains("presented no client certificate"), "{msg}");
}

#[tokio::test]
async fn client_certificate_missing_client_auth_eku() {
    let p = pki();
    let mut s = HostCertSpec::new("hv-a.test", YEAR);
    s.client_auth = false;
    let bad = p.ca.issue(&s).unwrap();
    let (srv, cli) = with_bad_client(&p, &bad).await;
    let (problem, msg) = client_problem(srv);
    assert!(matches!(problem, CertProblem::MissingEku { .. }), "{msg}");
    assert!(msg.contains("lacks the clientAuth"), "{msg}");
    assert!(msg.contains("it has: serverAuth"), "{msg}");
    let (_, msg) = failure("client", cli);
    assert!(msg.contains("clientAuth"), "{msg}");
}

#[tokio::test]
async fn server_certificate_missing_server_auth_eku() {
    let p = pki();
    let mut s = HostCertSpec::new("hv-b.test", YEAR);
    s.server_auth = false;
    let bad = p.ca.issue(&s).unwrap();
    let (_srv, cli) = with_bad_server(&p, &bad).await;
    let (_, msg) = failure("client", cli);
    assert!(msg.contains("lacks the serverAuth"), "{msg}");
}

#[tokio::test]
async fn listener_survives_a_refused_client() {
    let p = pki();
    let listener = Arc::new(
        Listener::bind("127.0.0.1:0", Arc::new(identity(&p.ca, "hv-b.test")))
            .await
            .unwrap(),
    );
    let addr = listener.local_addr().unwrap();
    let l = listener.clone();
    let srv = tokio::spawn(async move {
        let first = l.accept().await;
        let second = l.accept().await;
        (first.is_err(), second.map(|(_, p)| p.host_name))
    });
    let bad = p.other.issue_host("hv-x.test", YEAR).unwrap();
    assert!(tls::connect(addr, "hv-b.test", &unchecked(&bad, &p.ca))
        .await
        .is_err());
    let good = identity(&p.ca, "hv-a.test");
    let (_s, peer) = tls::connect(addr, "hv-b.test", &good).await.unwrap();
    assert_eq!(peer.host_name, "hv-b.test");
    let (first_err, second) = srv.await.unwrap();
    assert!(first_err);
    assert_eq!(second.unwrap(), "hv-a.test");
}

#[tokio::test]
async fn connect_errors_name_the_target() {
    let p = pki();
    let id = identity(&p.ca, "hv-a.test");
    // A port nobody listens on.
    let sock = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    drop(sock);
    let msg = tls::connect(addr, "hv-b.test", &id)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(&format!("could not connect to hv-b.test at {addr}")),
        "{msg}"
    );

    // A server that accepts TCP but never speaks TLS: handshake timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    // It holds the accepted connection, silent, until the client has given up.
    let (done, gave_up) = tokio::sync::oneshot::channel::<()>();
    let _hold = tokio::spawn(async move {
        let (s, _) = silent.accept().await.unwrap();
        let _ = gave_up.await;
        drop(s);
    });
    let err = tls::connect_with_timeout(addr, "hv-b.test", &id, Duration::from_millis(300))
        .await
        .unwrap_err();
    let _ = done.send(());
    assert!(matches!(err, TlsError::HandshakeTimeout { .. }), "{err}");
}

#[tokio::test]
async fn a_revoked_client_certificate_is_refused_at_the_handshake_while_another_host_works() {
    let p = pki();
    let server = identity(&p.ca, "hv-b.test");
    let revoked = identity(&p.ca, "hv-a.test");
    let fp = revoked.fingerprint().to_string();
    // Revoked as people paste it: lower case with colons.
    let pasted = fp
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(":");
    server.set_revoked([pasted]);
    let (srv, cli) = run(server.clone(), revoked, "hv-b.test").await;
    let (problem, msg) = client_problem(srv);
    assert!(matches!(problem, CertProblem::Revoked { .. }), "{msg}");
    assert!(
        msg.contains(&fp),
        "the log line names the fingerprint: {msg}"
    );
    let (_, msg) = failure("client", cli);
    assert!(msg.contains("revoked"), "{msg}");

    let (srv, cli) = run(server, identity(&p.ca, "hv-c.test"), "hv-b.test").await;
    assert_eq!(srv.unwrap().1.host_name, "hv-c.test");
    assert!(cli.is_ok());
}

#[tokio::test]
async fn a_revoked_server_certificate_is_refused_by_the_connecting_host() {
    let p = pki();
    let server = identity(&p.ca, "hv-b.test");
    let client = identity(&p.ca, "hv-a.test");
    client.set_revoked([server.fingerprint()]);
    let fp = server.fingerprint().to_string();
    let (_srv, cli) = run(server, client, "hv-b.test").await;
    let (problem, msg) = server_problem(cli);
    assert!(matches!(problem, CertProblem::Revoked { .. }), "{msg}");
    assert!(msg.contains(&fp), "{msg}");
}

#[tokio::test]
async fn the_peer_identity_names_the_ca_its_certificate_chains_to() {
    let p = pki();
    let server_cert = p.ca.issue_host("hv-b.test", YEAR).unwrap();
    let server = HostIdentity::from_pem(
        Some("hv-b.test"),
        &server_cert.cert_pem,
        &server_cert.key_pem,
        &[p.ca.cert_pem(), p.other.cert_pem()],
    )
    .unwrap();
    let client_cert = p.other.issue_host("hv-a.test", YEAR).unwrap();
    let client = HostIdentity::from_pem(
        Some("hv-a.test"),
        &client_cert.cert_pem,
        &client_cert.key_pem,
        &[p.ca.cert_pem(), p.other.cert_pem()],
    )
    .unwrap();
    let (srv, cli) = run(server, client, "hv-b.test").await;
    assert_eq!(
        srv.unwrap().1.ca_fingerprints,
        vec![p.other.summary().fingerprint_sha256.clone()]
    );
    assert_eq!(
        cli.unwrap().1.ca_fingerprints,
        vec![p.ca.summary().fingerprint_sha256.clone()]
    );
}

/// A certificate from the test CA whose only DNS name is `san`, exactly as written.
fn raw_san_cert(p: &Pki, san: &str) -> (String, String) {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(p._dir.path().join("ca/ca-key.pem")).unwrap())
            .unwrap();
    let issuer = Issuer::from_ca_cert_pem(p.ca.cert_pem(), ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::DnsName(san.try_into().unwrap())];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn an_upper_case_san_with_a_trailing_dot_maps_to_the_canonical_host_name() {
    let p = pki();
    let (cert, key) = raw_san_cert(&p, "HV-A.Test.");
    let client = HostIdentity::from_pem_unvalidated(&cert, &key, &[p.ca.cert_pem()]).unwrap();
    let (srv, _cli) = run(identity(&p.ca, "hv-b.test"), client, "hv-b.test").await;
    assert_eq!(srv.unwrap().1.host_name, "hv-a.test");
}

#[tokio::test]
async fn a_san_that_is_not_a_host_name_is_refused() {
    let p = pki();
    let (cert, key) = raw_san_cert(&p, "hv_a.test");
    let client = HostIdentity::from_pem_unvalidated(&cert, &key, &[p.ca.cert_pem()]).unwrap();
    let (srv, _cli) = run(identity(&p.ca, "hv-b.test"), client, "hv-b.test").await;
    let (err, msg) = failure("server", srv);
    assert!(matches!(err, TlsError::BadPeerHostName { .. }), "{msg}");
    assert!(msg.contains("hv_a.test"), "{msg}");
}

#[tokio::test]
async fn idle_connections_from_one_address_do_not_lock_out_another() {
    let p = pki();
    let mut listener = Listener::bind("127.0.0.1:0", Arc::new(identity(&p.ca, "hv-b.test")))
        .await
        .unwrap();
    listener.set_limits(tls::Limits {
        max_handshakes: 8,
        max_handshakes_per_ip: 2,
        max_connections: 16,
        handshake_timeout: Duration::from_secs(30),
    });
    let addr = listener.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        loop {
            let incoming = listener.accept_tcp().await.unwrap();
            tokio::spawn(async move {
                let _ = incoming.handshake().await;
            });
        }
    });
    // 20 idle TCP connections from 127.0.0.2 that never start TLS.
    let mut idle = Vec::new();
    for _ in 0..20 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        idle.push(s.connect(addr).await.unwrap());
    }
    // All but the two allowed per address are closed at once (end of file
    // right away); the two handshaking ones stay open, silent.
    let mut closed = 0;
    for s in &mut idle {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 18);
    let good = identity(&p.ca, "hv-a.test");
    let (_s, peer) = tokio::time::timeout(
        Duration::from_secs(10),
        tls::connect(addr, "hv-b.test", &good),
    )
    .await
    .expect("the legitimate client is served in time")
    .unwrap();
    assert_eq!(peer.host_name, "hv-b.test");
    srv.abort();
}

#[tokio::test]
async fn a_listener_trusts_a_new_ca_after_reload_without_a_restart() {
    let p = pki();
    let c = p.ca.issue_host("hv-b.test", YEAR).unwrap();
    let server = Arc::new(
        HostIdentity::from_pem(
            Some("hv-b.test"),
            &c.cert_pem,
            &c.key_pem,
            &[p.ca.cert_pem()],
        )
        .unwrap(),
    );
    let listener = Arc::new(Listener::bind("127.0.0.1:0", server.clone()).await.unwrap());
    let addr = listener.local_addr().unwrap();
    let l = listener.clone();
    let srv = tokio::spawn(async move {
        loop {
            let incoming = l.accept_tcp().await.unwrap();
            tokio::spawn(async move {
                let _ = incoming.handshake().await;
            });
        }
    });
    let cc = p.other.issue_host("hv-a.test", YEAR).unwrap();
    let client = HostIdentity::from_pem(
        Some("hv-a.test"),
        &cc.cert_pem,
        &cc.key_pem,
        &[p.ca.cert_pem(), p.other.cert_pem()],
    )
    .unwrap();
    assert!(tls::connect(addr, "hv-b.test", &client).await.is_err());

    // A file that is not a CA is refused and the old trust stays.
    let not_ca = p._dir.path().join("leaf.pem");
    std::fs::write(&not_ca, &cc.cert_pem).unwrap();
    assert!(server.reload_trust(&[not_ca]).is_err());
    assert_eq!(server.trusted_ca_names().len(), 1);

    server
        .reload_trust(&[p.ca.cert_path(), p.other.cert_path()])
        .unwrap();
    listener.reload().unwrap();
    let (_s, peer) = tls::connect(addr, "hv-b.test", &client).await.unwrap();
    assert_eq!(peer.host_name, "hv-b.test");
    srv.abort();
}
