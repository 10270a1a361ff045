//! The replica server's trust boundary end to end: a real replica daemon (`daemon::run`, QEMU
//! capability probe with TCG) that trusts two CAs made with the built-in CA, spoken to over
//! real TLS on loopback with `PeerClient`, and managed through its real management socket.
//! Covers entries scoped to an issuer or pinned to a certificate, revocation at the
//! handshake, and the connection limits (many idle TCP connections do not lock out a
//! legitimate primary or the management API).

mod common;

use common::{my_info, ReplicaHost};
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;
use vmrepl_host::config::HostConfig;
use vmrepl_host::datadir::DataDir;
use vmrepl_host::mgmt::Client;
use vmrepl_host::peer::client::{PeerClient, PeerError};
use vmrepl_host::peer::proto::{PeerRequest, PeerResponse, RefusalCode};
use vmrepl_transport::pki::{Ca, HostIdentity};
use vmrepl_types::api::{Request, Response};
use vmrepl_types::replication::AuthorizationEntry;

const REPLICA: &str = "replica.test";
const PRIMARY: &str = "primary.test";
const OTHER: &str = "other.test";

struct Env {
    tmp: tempfile::TempDir,
    ca1: Ca,
    ca2: Ca,
    dd: DataDir,
    addr: String,
    daemon: tokio::task::JoinHandle<()>,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.daemon.abort();
    }
}

const MONTH: Duration = Duration::from_secs(30 * 86400);

/// Writes a certificate for `host` from `ca` as `<file>.pem` and `<file>-key.pem`.
fn issue(tmp: &Path, ca: &Ca, host: &str, file: &str) -> PathBuf {
    let c = ca.issue_host(host, MONTH).unwrap();
    let cert = tmp.join(format!("{file}.pem"));
    c.write(&cert, &tmp.join(format!("{file}-key.pem")))
        .unwrap();
    cert
}

/// A replica daemon with a CA1 certificate that trusts CA1 and CA2; `entries` authorize.
async fn replica(entries: impl FnOnce(&Env) -> Vec<AuthorizationEntry>) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let ca1 = Ca::create(&tmp.path().join("ca1"), "vmrepl test CA one").unwrap();
    let ca2 = Ca::create(&tmp.path().join("ca2"), "vmrepl test CA two").unwrap();
    issue(tmp.path(), &ca1, REPLICA, REPLICA);
    let dd = DataDir::new(&tmp.path().join("b"));
    let mut env = Env {
        tmp,
        ca1,
        ca2,
        dd: dd.clone(),
        addr: String::new(),
        daemon: tokio::spawn(async {}),
    };
    let listed = entries(&env);
    let (addr, daemon) = ReplicaHost {
        dd,
        name: REPLICA.into(),
        cert: (
            env.tmp.path().join(format!("{REPLICA}.pem")),
            env.tmp.path().join(format!("{REPLICA}-key.pem")),
        ),
        trust: vec![env.ca1.cert_path(), env.ca2.cert_path()],
    }
    .start(|cfg| cfg.replica_server.entries = listed)
    .await;
    env.addr = addr;
    env.daemon = daemon;
    env
}

fn entry(env: &Env, issuer: Option<String>, pin: Option<String>) -> AuthorizationEntry {
    AuthorizationEntry {
        primary: PRIMARY.into(),
        storage: env.tmp.path().join("replica-store"),
        trust_group: "G1".into(),
        issuer,
        pin,
    }
}

/// The identity in `<file>.pem`, trusting both CAs.
fn identity(env: &Env, file: &str) -> HostIdentity {
    HostIdentity::load(
        &env.tmp.path().join(format!("{file}.pem")),
        &env.tmp.path().join(format!("{file}-key.pem")),
        &[env.ca1.cert_path(), env.ca2.cert_path()],
    )
    .unwrap()
}

async fn connect(env: &Env, id: &HostIdentity) -> Result<PeerClient, PeerError> {
    let host = id.host_name().to_string();
    PeerClient::connect(id, &my_info(&host), &env.addr, REPLICA)
        .await
        .map(|(c, _)| c)
}

/// Asks about a VM the replica does not keep: an authorized primary hears `UnknownVm`, any
/// other `NotAuthorized`.
async fn ask(c: &mut PeerClient) -> (RefusalCode, String) {
    let r = c
        .request(&PeerRequest::ReplicaState {
            vm_uuid: Uuid::new_v4(),
        })
        .await
        .unwrap();
    match r {
        PeerResponse::Refused { code, message } => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn mgmt(env: &Env, req: Request) -> Response {
    let mut c = Client::connect(env.dd.root(), &env.dd.socket())
        .await
        .unwrap();
    c.call(&req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_entry_scoped_to_an_issuer_refuses_the_same_name_certified_by_another_trusted_ca() {
    let env = replica(|env| {
        issue(env.tmp.path(), &env.ca1, PRIMARY, "primary-ca1");
        issue(env.tmp.path(), &env.ca2, PRIMARY, "primary-ca2");
        let ca1 = env.ca1.summary().fingerprint_sha256.to_ascii_lowercase();
        vec![entry(env, Some(ca1), None)]
    })
    .await;
    let mut good = connect(&env, &identity(&env, "primary-ca1")).await.unwrap();
    assert_eq!(ask(&mut good).await.0, RefusalCode::UnknownVm);

    // CA2 is trusted (the handshake succeeds) but may not vouch for primary.test.
    let mut impostor = connect(&env, &identity(&env, "primary-ca2")).await.unwrap();
    let (code, msg) = ask(&mut impostor).await;
    assert_eq!(code, RefusalCode::NotAuthorized, "{msg}");
    assert!(
        msg.contains(&env.ca1.summary().fingerprint_sha256)
            && msg.contains(&env.ca2.summary().fingerprint_sha256),
        "the refusal names the expected and the presented CA: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pinned_entry_refuses_another_certificate_for_the_same_name() {
    let env = replica(|env| {
        let pinned = issue(env.tmp.path(), &env.ca1, PRIMARY, "primary-a");
        issue(env.tmp.path(), &env.ca1, PRIMARY, "primary-b");
        let fp = vmrepl_transport::pki::describe(&std::fs::read_to_string(pinned).unwrap())
            .unwrap()
            .fingerprint_sha256;
        vec![entry(env, None, Some(fp))]
    })
    .await;
    let mut pinned = connect(&env, &identity(&env, "primary-a")).await.unwrap();
    assert_eq!(ask(&mut pinned).await.0, RefusalCode::UnknownVm);
    let other = identity(&env, "primary-b");
    let mut other_c = connect(&env, &other).await.unwrap();
    let (code, msg) = ask(&mut other_c).await;
    assert_eq!(code, RefusalCode::NotAuthorized, "{msg}");
    assert!(msg.contains(other.fingerprint()), "{msg}");

    // A refused log is drained, so the connection stays usable.
    let uuid = Uuid::new_v4();
    let log = tiny_log(env.tmp.path(), uuid);
    let r = other_c
        .send_log(uuid, (1, 0), None, &log, |_| {})
        .await
        .unwrap();
    assert!(
        matches!(
            &r,
            PeerResponse::Refused {
                code: RefusalCode::NotAuthorized,
                ..
            }
        ),
        "{r:?}"
    );
    assert_eq!(ask(&mut other_c).await.0, RefusalCode::NotAuthorized);
}

/// An initial log of one 4 KiB write to a 1 MiB disk.
fn tiny_log(dir: &Path, uuid: Uuid) -> PathBuf {
    use vmrepl_log::{Compression, Consistency, DiskInfo, LogHeader, LogKind, LogWriter};
    let header = LogHeader {
        vm_id: uuid,
        sequence: 1,
        base_sequence: 0,
        timestamp_unix_ms: 1_700_000_000_000,
        kind: LogKind::Initial,
        consistency: Consistency::Crash,
        compression: Compression::None,
        disks: vec![DiskInfo {
            id: "disk0".into(),
            virtual_size: 1 << 20,
        }],
    };
    let path = dir.join(format!("log-{uuid}.vlog"));
    let f = std::fs::File::create(&path).unwrap();
    let mut w = LogWriter::new(std::io::BufWriter::new(f), header).unwrap();
    w.write_data(0, 0, &[7u8; 4096]).unwrap();
    let (_, mut out) = w.finish_into_inner().unwrap();
    use std::io::Write;
    out.flush().unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_certificate_is_refused_at_the_handshake_while_another_hosts_works_until_unrevoked(
) {
    let env = replica(|env| {
        issue(env.tmp.path(), &env.ca1, PRIMARY, PRIMARY);
        issue(env.tmp.path(), &env.ca1, OTHER, OTHER);
        let mut other = entry(env, None, None);
        other.primary = OTHER.into();
        vec![entry(env, None, None), other]
    })
    .await;
    let primary = identity(&env, PRIMARY);
    let mut before = connect(&env, &primary).await.unwrap();
    assert_eq!(ask(&mut before).await.0, RefusalCode::UnknownVm);

    let r = mgmt(
        &env,
        Request::HostRevokeCert {
            fingerprint: primary.fingerprint().to_ascii_lowercase(),
            reason: Some("decommissioned".into()),
            subject: None,
        },
    )
    .await;
    assert!(matches!(r, Response::Ok { .. }), "{r:?}");

    // In force at once, without a restart, and kept in the state database (the configuration
    // file is the admin's: not written).
    let Err(err) = connect(&env, &primary).await else {
        panic!("a revoked certificate was admitted")
    };
    assert!(matches!(err, PeerError::Tls(_)), "{err}");
    assert!(err.to_string().contains("revoked"), "{err}");
    let stored = vmrepl_host::db::Db::open(&env.dd.db())
        .unwrap()
        .host_settings()
        .unwrap()
        .unwrap();
    assert_eq!(stored.revoked_certs.len(), 1);
    assert_eq!(stored.revoked_certs[0].fingerprint, primary.fingerprint());
    assert_eq!(
        stored.revoked_certs[0].reason.as_deref(),
        Some("decommissioned")
    );
    assert!(HostConfig::load(&env.dd.config())
        .unwrap()
        .revoked_certs
        .is_empty());

    let mut other = connect(&env, &identity(&env, OTHER)).await.unwrap();
    assert_eq!(ask(&mut other).await.0, RefusalCode::UnknownVm);

    let Response::ReplicaServer { revoked, .. } = mgmt(&env, Request::ReplicaServerShow).await
    else {
        panic!("expected the replica server settings")
    };
    assert_eq!(revoked[0].fingerprint, primary.fingerprint());
    let Response::Certificates(c) = mgmt(&env, Request::HostCertificates).await else {
        panic!("expected the certificates")
    };
    assert_eq!(c.trusted_cas.len(), 2);
    assert!(c
        .trusted_cas
        .iter()
        .any(|t| t.fingerprint == env.ca2.summary().fingerprint_sha256));

    // Revoked by mistake: taken off the list, admitted again at once; a second time is
    // refused as not found.
    let unrevoke = Request::HostUnrevokeCert {
        fingerprint: primary.fingerprint().to_string(),
    };
    let r = mgmt(&env, unrevoke.clone()).await;
    assert!(matches!(r, Response::Ok { .. }), "{r:?}");
    let mut again = connect(&env, &primary).await.unwrap();
    assert_eq!(ask(&mut again).await.0, RefusalCode::UnknownVm);
    let Response::Error(e) = mgmt(&env, unrevoke).await else {
        panic!("expected a refusal")
    };
    assert_eq!(e.code, vmrepl_types::api::ErrorCode::NotFound, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_tcp_connections_do_not_lock_out_a_primary_or_the_management_api() {
    let env = replica(|env| {
        issue(env.tmp.path(), &env.ca1, PRIMARY, PRIMARY);
        vec![entry(env, None, None)]
    })
    .await;
    // 200 plain TCP connections that never start TLS, from another loopback address.
    let mut idle = Vec::new();
    for _ in 0..200 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        idle.push(s.connect(env.addr.parse().unwrap()).await.unwrap());
    }
    let answered = tokio::time::timeout(Duration::from_secs(15), async {
        let mut c = connect(&env, &identity(&env, PRIMARY)).await.unwrap();
        ask(&mut c).await
    })
    .await
    .expect("the primary is served in time despite 200 idle connections");
    assert_eq!(answered.0, RefusalCode::UnknownVm);
    let pong = tokio::time::timeout(Duration::from_secs(15), mgmt(&env, Request::Ping))
        .await
        .expect("the management API answers in time");
    assert!(matches!(pong, Response::Ok { .. }), "{pong:?}");

    // The daemon kept only the 8 handshakes one address may hold and closed the rest at once.
    let mut reads = tokio::task::JoinSet::new();
    for mut s in idle {
        reads.spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut b = [0u8; 1];
            let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await;
            matches!(r, Ok(Ok(0) | Err(_)))
        });
    }
    let mut closed = 0;
    while let Some(r) = reads.join_next().await {
        closed += usize::from(r.unwrap());
    }
    assert!(closed >= 192, "only {closed} of 200 were closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_newly_trusted_ca_is_accepted_after_a_reload_without_a_restart() {
    let env = replica(|env| vec![entry(env, None, None)]).await;
    let ca3 = Ca::create(&env.tmp.path().join("ca3"), "vmrepl test CA three").unwrap();
    issue(env.tmp.path(), &ca3, PRIMARY, "primary-ca3");
    let primary = HostIdentity::load(
        &env.tmp.path().join("primary-ca3.pem"),
        &env.tmp.path().join("primary-ca3-key.pem"),
        &[env.ca1.cert_path(), ca3.cert_path()],
    )
    .unwrap();
    let Err(err) = connect(&env, &primary).await else {
        panic!("a certificate from an untrusted CA was admitted")
    };
    assert!(err.to_string().contains("unknown CA"), "{err}");

    vmrepl_host::init::trust_ca(&env.dd, &ca3.cert_path()).unwrap();
    let r = mgmt(&env, Request::HostReloadTrust).await;
    assert!(
        matches!(&r, Response::Ok { message } if message.contains("CA three")),
        "{r:?}"
    );
    let mut c = connect(&env, &primary).await.unwrap();
    assert_eq!(ask(&mut c).await.0, RefusalCode::UnknownVm);
}
