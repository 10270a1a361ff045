//! The replica server end to end: a real replica daemon (`daemon::run`, QEMU capability probe
//! with TCG) with real certificates from a test CA, spoken to over real TLS on 127.0.0.1 with
//! `PeerClient`, logs written by hand with `vmrepl_log::LogWriter`, images checked with
//! `qemu-img convert -O raw`.

mod common;

use common::{free_port, my_info, ReplicaHost};
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;
use vmrepl_host::config::HostConfig;
use vmrepl_host::datadir::DataDir;
use vmrepl_host::peer::client::{PeerClient, PeerError};
use vmrepl_host::peer::proto::{PeerRequest, PeerResponse, PointPolicy, RefusalCode, Resume};
use vmrepl_log::{Compression, Consistency, DiskInfo, LogHeader, LogKind, LogWriter};
use vmrepl_transport::pki::{Ca, HostIdentity};
use vmrepl_types::replication::AuthorizationEntry;
use vmrepl_types::vm::{DiskDef, Generation};
use vmrepl_types::{HostInfo, VmDefinition};

const DISK: u64 = 4 << 20;
const REPLICA: &str = "replica.test";
const PRIMARY: &str = "primary.test";
const OTHER: &str = "other.test";

struct Env {
    tmp: tempfile::TempDir,
    ca: PathBuf,
    addr: String,
    store_root: PathBuf,
    _daemon: tokio::task::JoinHandle<()>,
}

/// Starts a replica daemon; `setup` adjusts its replica-server settings.
async fn replica(setup: impl FnOnce(&mut HostConfig, &Path)) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let ca = Ca::create(&ca_dir, "vmrepl test CA").unwrap();
    for h in [REPLICA, PRIMARY, OTHER] {
        let c = ca.issue_host(h, Duration::from_secs(30 * 86400)).unwrap();
        c.write(
            &tmp.path().join(format!("{h}.pem")),
            &tmp.path().join(format!("{h}-key.pem")),
        )
        .unwrap();
    }
    let store_root = tmp.path().join("replica-store");
    let (addr, daemon) = ReplicaHost {
        dd: DataDir::new(&tmp.path().join("b")),
        name: REPLICA.into(),
        cert: (
            tmp.path().join(format!("{REPLICA}.pem")),
            tmp.path().join(format!("{REPLICA}-key.pem")),
        ),
        trust: vec![ca.cert_path()],
    }
    .start(|cfg| {
        cfg.replica_server.entries = vec![AuthorizationEntry {
            primary: PRIMARY.into(),
            storage: store_root.clone(),
            trust_group: "G1".into(),
            issuer: None,
            pin: None,
        }];
        setup(cfg, &store_root);
    })
    .await;
    Env {
        ca: ca.cert_path(),
        tmp,
        addr,
        store_root,
        _daemon: daemon,
    }
}

async fn client(env: &Env, host: &str) -> (PeerClient, HostInfo) {
    let id = HostIdentity::load(
        &env.tmp.path().join(format!("{host}.pem")),
        &env.tmp.path().join(format!("{host}-key.pem")),
        std::slice::from_ref(&env.ca),
    )
    .unwrap();
    PeerClient::connect(&id, &my_info(host), &env.addr, REPLICA)
        .await
        .unwrap()
}

fn vm_def(theirs: &HostInfo, uuid: Uuid) -> VmDefinition {
    let fw = theirs
        .firmware
        .iter()
        .find(|f| f.id == vmrepl_types::vm::FirmwareVariantId::Seabios)
        .or(theirs.firmware.first())
        .expect("the replica host has firmware")
        .id;
    let mt = theirs
        .machine_types
        .iter()
        .find(|m| m.starts_with("pc-i440fx"))
        .or(theirs.machine_types.first())
        .unwrap()
        .clone();
    VmDefinition {
        name: vmrepl_types::name::VmName::new("web01").unwrap(),
        uuid,
        generation: Generation::Bios,
        firmware: fw,
        machine_type: mt,
        config_version: theirs.config_versions.1,
        vcpus: 1,
        memory_mib: 128,
        disks: vec![DiskDef {
            id: "disk0".into(),
            path: "/primary/storage/web01/disk0.qcow2".into(),
            size_bytes: DISK,
        }],
        nics: vec![],
        kernel: None,
        nvram: None,
    }
}

fn policy() -> PointPolicy {
    PointPolicy {
        keep: 2,
        interval_secs: 3600,
    }
}

enum W {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

/// Writes a log file by hand.
fn write_log(dir: &Path, uuid: Uuid, seq: u64, base: u64, disk_size: u64, writes: &[W]) -> PathBuf {
    let header = LogHeader {
        vm_id: uuid,
        sequence: seq,
        base_sequence: base,
        timestamp_unix_ms: 1_700_000_000_000 + seq * 1000,
        kind: if base == 0 {
            LogKind::Initial
        } else {
            LogKind::Delta
        },
        consistency: Consistency::Crash,
        compression: Compression::None,
        disks: vec![DiskInfo {
            id: "disk0".into(),
            virtual_size: disk_size,
        }],
    };
    let path = dir.join(format!("log-{seq}-{}.vlog", Uuid::new_v4()));
    let f = std::fs::File::create(&path).unwrap();
    let mut w = LogWriter::new(std::io::BufWriter::new(f), header).unwrap();
    for x in writes {
        match x {
            W::Data(off, d) => w.write_data(0, *off, d).unwrap(),
            W::Zero(off, n) => w.write_zero(0, *off, *n).unwrap(),
        }
    }
    let (_, mut out) = w.finish_into_inner().unwrap();
    use std::io::Write;
    out.flush().unwrap();
    path
}

async fn send(c: &mut PeerClient, uuid: Uuid, seq: u64, base: u64, path: &Path) -> PeerResponse {
    c.send_log(uuid, (seq, base), None, path, |_| {})
        .await
        .unwrap()
}

fn refused(r: &PeerResponse) -> (RefusalCode, String) {
    match r {
        PeerResponse::Refused { code, message } => (*code, message.clone()),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn state(c: &mut PeerClient, uuid: Uuid) -> (u64, Option<(u64, Resume)>, Vec<(u64, i64)>) {
    match c
        .request(&PeerRequest::ReplicaState { vm_uuid: uuid })
        .await
        .unwrap()
    {
        PeerResponse::ReplicaState {
            last_applied,
            partial,
            points,
            ..
        } => (last_applied, partial, points),
        other => panic!("expected ReplicaState, got {other:?}"),
    }
}

async fn create(c: &mut PeerClient, theirs: &HostInfo, uuid: Uuid) -> PeerResponse {
    c.request(&PeerRequest::CreateReplica {
        vm: Box::new(vm_def(theirs, uuid)),
        relationship: Uuid::from_u128(7),
        policy: policy(),
        primary_server: None,
        existing_copy: false,
    })
    .await
    .unwrap()
}

/// The latest point's disk0 as raw bytes (the store is synchronous: run on the blocking pool).
async fn latest_raw(env: &Env, uuid: Uuid) -> Vec<u8> {
    let root = env.store_root.clone();
    let out = env.tmp.path().join(format!("raw-{}", Uuid::new_v4()));
    tokio::task::spawn_blocking(move || {
        let vm = vmrepl_store::ReplicaStore::open(&root, uuid).unwrap();
        let paths = vm
            .point_image_paths(vmrepl_store::PointRef::Latest)
            .unwrap();
        let (_, top) = paths.iter().find(|(id, _)| id == "disk0").unwrap();
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(top)
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::read(out).unwrap()
    })
    .await
    .unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    // Incompressible-ish, deterministic.
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unauthorized_primary_is_refused_and_nothing_is_created() {
    let env = replica(|_, _| {}).await;
    let (mut c, theirs) = client(&env, OTHER).await;
    let uuid = Uuid::new_v4();
    let r = create(&mut c, &theirs, uuid).await;
    let (code, msg) = refused(&r);
    assert_eq!(code, RefusalCode::NotAuthorized);
    assert!(msg.contains(OTHER) && msg.contains(PRIMARY), "{msg}");
    assert!(!env.store_root.join(uuid.to_string()).exists());
    let r = c
        .request(&PeerRequest::CheckReplica {
            vm: Box::new(vm_def(&theirs, uuid)),
        })
        .await
        .unwrap();
    assert_eq!(refused(&r).0, RefusalCode::NotAuthorized);
    // Whether a VM runs is told only to the host it is replicated to.
    let r = c
        .request(&PeerRequest::PrimaryState { vm_uuid: uuid })
        .await
        .unwrap();
    assert_eq!(refused(&r).0, RefusalCode::UnknownVm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disabled_replica_server_refuses_and_says_how_to_enable_it() {
    let env = replica(|cfg, _| cfg.replica_server.enabled = false).await;
    let (mut c, theirs) = client(&env, PRIMARY).await;
    let uuid = Uuid::new_v4();
    let r = c
        .request(&PeerRequest::CheckReplica {
            vm: Box::new(vm_def(&theirs, uuid)),
        })
        .await
        .unwrap();
    let (code, msg) = refused(&r);
    assert_eq!(code, RefusalCode::Disabled);
    assert!(msg.contains(REPLICA) && msg.contains("--enable"), "{msg}");
    assert_eq!(
        refused(&create(&mut c, &theirs, uuid).await).0,
        RefusalCode::Disabled
    );
    // The call() form turns refusals into errors.
    let e = c
        .call(&PeerRequest::ReplicaState { vm_uuid: uuid })
        .await
        .unwrap_err();
    assert!(matches!(
        e,
        PeerError::Refused {
            code: RefusalCode::Disabled,
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_replica_is_a_connect_error_naming_host_and_port() {
    let env = replica(|_, _| {}).await;
    let id = HostIdentity::load(
        &env.tmp.path().join(format!("{PRIMARY}.pem")),
        &env.tmp.path().join(format!("{PRIMARY}-key.pem")),
        std::slice::from_ref(&env.ca),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let e = PeerClient::connect(&id, &my_info(PRIMARY), &addr, REPLICA)
        .await
        .unwrap_err();
    assert!(e.is_network(), "{e}");
    let s = e.to_string();
    assert!(s.contains(&addr) && s.contains("port"), "{s}");
    assert_eq!(s.matches("check that").count(), 1, "one hint, once: {s}");
    // A wrong expected name is a certificate problem, not a network one.
    let e = PeerClient::connect(&id, &my_info(PRIMARY), &env.addr, "elsewhere.test")
        .await
        .unwrap_err();
    assert!(matches!(e, PeerError::Tls(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_of_another_trust_group_may_not_send_logs() {
    let env = replica(|cfg, root| {
        cfg.replica_server.entries.push(AuthorizationEntry {
            primary: OTHER.into(),
            storage: root.to_path_buf(),
            trust_group: "G2".into(),
            issuer: None,
            pin: None,
        })
    })
    .await;
    let (mut c, theirs) = client(&env, PRIMARY).await;
    let uuid = Uuid::new_v4();
    assert_eq!(create(&mut c, &theirs, uuid).await, PeerResponse::Ok);
    let log = write_log(
        env.tmp.path(),
        uuid,
        1,
        0,
        DISK,
        &[W::Data(0, vec![1; 4096])],
    );
    let (mut o, _) = client(&env, OTHER).await;
    let r = send(&mut o, uuid, 1, 0, &log).await;
    let (code, msg) = refused(&r);
    assert_eq!(code, RefusalCode::WrongTrustGroup);
    assert!(msg.contains("G1") && msg.contains("G2"), "{msg}");
    // The connection stays usable, and the legitimate primary is unaffected.
    assert_eq!(state(&mut c, uuid).await.0, 0);
    // Another primary cannot take the replica over either.
    let r = o
        .request(&PeerRequest::CreateReplica {
            vm: Box::new(vm_def(&theirs, uuid)),
            relationship: Uuid::from_u128(8),
            policy: policy(),
            primary_server: None,
            existing_copy: false,
        })
        .await
        .unwrap();
    assert_eq!(refused(&r).0, RefusalCode::Conflict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn initial_and_delta_logs_are_applied_in_order_and_idempotently() {
    let env = replica(|_, _| {}).await;
    let (mut c, theirs) = client(&env, PRIMARY).await;
    let uuid = Uuid::new_v4();
    let r = c
        .request(&PeerRequest::CheckReplica {
            vm: Box::new(vm_def(&theirs, uuid)),
        })
        .await
        .unwrap();
    assert_eq!(r, PeerResponse::Ok);
    assert_eq!(create(&mut c, &theirs, uuid).await, PeerResponse::Ok);
    // Idempotent for the same primary and relationship.
    assert_eq!(create(&mut c, &theirs, uuid).await, PeerResponse::Ok);
    assert!(env
        .store_root
        .join(uuid.to_string())
        .join("state.json")
        .is_file());
    assert_eq!(state(&mut c, uuid).await, (0, None, vec![]));

    let a = pattern(1, 64 * 1024);
    let b = pattern(2, 64 * 1024);
    let log1 = write_log(
        env.tmp.path(),
        uuid,
        1,
        0,
        DISK,
        &[W::Data(0, a.clone()), W::Data(1 << 20, b.clone())],
    );
    let mut seen = 0;
    let r = c
        .send_log(uuid, (1, 0), None, &log1, |n| seen = n)
        .await
        .unwrap();
    let size1 = std::fs::metadata(&log1).unwrap().len();
    assert_eq!(
        r,
        PeerResponse::LogAck {
            sequence: 1,
            bytes: size1
        }
    );
    assert_eq!(seen, size1);
    let c2 = pattern(3, 4096);
    let log2 = write_log(
        env.tmp.path(),
        uuid,
        2,
        1,
        DISK,
        &[W::Data(4096, c2.clone()), W::Zero(1 << 20, 64 * 1024)],
    );
    assert!(matches!(
        send(&mut c, uuid, 2, 1, &log2).await,
        PeerResponse::LogAck { sequence: 2, .. }
    ));
    let (last, partial, points) = state(&mut c, uuid).await;
    assert_eq!((last, partial), (2, None));
    // The first log made the first recovery point (no frozen point existed yet).
    assert_eq!(points.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1]);

    let raw = latest_raw(&env, uuid).await;
    assert_eq!(raw.len() as u64, DISK);
    let mut want = vec![0u8; DISK as usize];
    want[..a.len()].copy_from_slice(&a);
    want[4096..8192].copy_from_slice(&c2);
    assert!(raw == want, "the latest point differs from the primary");
    // The spool is empty once applied.
    let spool = env.store_root.join(uuid.to_string()).join("logs");
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);

    // Re-sent log: acknowledged again, not re-applied.
    assert_eq!(
        send(&mut c, uuid, 2, 1, &log2).await,
        PeerResponse::LogAck {
            sequence: 2,
            bytes: 0
        }
    );
    assert_eq!(
        send(&mut c, uuid, 1, 0, &log1).await,
        PeerResponse::LogAck {
            sequence: 1,
            bytes: 0
        }
    );
    assert_eq!(latest_raw(&env, uuid).await, want);

    // A gap: log 4 on base 3.
    let log4 = write_log(
        env.tmp.path(),
        uuid,
        4,
        3,
        DISK,
        &[W::Data(0, vec![9; 512])],
    );
    let (code, msg) = refused(&send(&mut c, uuid, 4, 3, &log4).await);
    assert_eq!(code, RefusalCode::OutOfOrder);
    assert!(
        msg.contains("has applied 2")
            && msg.contains("builds on 3")
            && msg.contains("resynchronization required"),
        "{msg}"
    );
    assert_eq!(state(&mut c, uuid).await.0, 2);
    assert_eq!(latest_raw(&env, uuid).await, want);

    let (mut c3, _) = client(&env, PRIMARY).await;
    assert_eq!(
        c3.request(&PeerRequest::RemoveReplica {
            vm_uuid: uuid,
            delete: true
        })
        .await
        .unwrap(),
        PeerResponse::Ok
    );
    // The replica host keeps the data unless its admin allows primaries to delete it.
    assert!(env.store_root.join(uuid.to_string()).exists());
    let r = c3
        .request(&PeerRequest::ReplicaState { vm_uuid: uuid })
        .await
        .unwrap();
    assert_eq!(refused(&r).0, RefusalCode::UnknownVm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_log_is_refused_and_nothing_is_applied() {
    let env = replica(|_, _| {}).await;
    let (mut c, theirs) = client(&env, PRIMARY).await;
    let uuid = Uuid::new_v4();
    assert_eq!(create(&mut c, &theirs, uuid).await, PeerResponse::Ok);
    let log = write_log(
        env.tmp.path(),
        uuid,
        1,
        0,
        DISK,
        &[W::Data(0, pattern(4, 64 * 1024))],
    );
    let mut bytes = std::fs::read(&log).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    let bad = env.tmp.path().join("bad.vlog");
    std::fs::write(&bad, &bytes).unwrap();
    let (code, msg) = refused(&send(&mut c, uuid, 1, 0, &bad).await);
    assert_eq!(code, RefusalCode::BadLog, "{msg}");
    assert_eq!(state(&mut c, uuid).await, (0, None, vec![]));
    assert_eq!(latest_raw(&env, uuid).await, vec![0u8; DISK as usize]);
    let spool = env.store_root.join(uuid.to_string()).join("logs");
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
    // The good log afterwards is fine.
    assert!(matches!(
        send(&mut c, uuid, 1, 0, &log).await,
        PeerResponse::LogAck { sequence: 1, .. }
    ));
    assert_eq!(state(&mut c, uuid).await.0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_initial_copy_refused_half_way_leaves_nothing_the_next_initial_copy_keeps() {
    let env = replica(|_, _| {}).await;
    let (mut c, theirs) = client(&env, PRIMARY).await;
    let uuid = Uuid::new_v4();
    assert_eq!(create(&mut c, &theirs, uuid).await, PeerResponse::Ok);
    // The replica applies an initial copy while it arrives: the first records of this one are
    // written before a flipped byte in its last record is found.
    let first = write_log(
        env.tmp.path(),
        uuid,
        1,
        0,
        DISK,
        &[
            W::Data(0, pattern(1, 64 * 1024)),
            W::Data(128 * 1024, pattern(2, 64 * 1024)),
            W::Data(256 * 1024, pattern(3, 64 * 1024)),
        ],
    );
    let mut bytes = std::fs::read(&first).unwrap();
    let at = bytes.len() - 64 * 1024 / 2;
    bytes[at] ^= 0x01;
    let bad = env.tmp.path().join("bad-initial.vlog");
    std::fs::write(&bad, &bytes).unwrap();
    let (code, msg) = refused(&send(&mut c, uuid, 1, 0, &bad).await);
    assert_eq!(code, RefusalCode::BadLog, "{msg}");
    assert_eq!(state(&mut c, uuid).await.0, 0);
    // A new initial copy (a new point in time) covers other blocks only: what the refused one
    // wrote must not survive under it.
    let second = write_log(
        env.tmp.path(),
        uuid,
        1,
        0,
        DISK,
        &[W::Data(512 * 1024, pattern(4, 64 * 1024))],
    );
    assert!(matches!(
        send(&mut c, uuid, 1, 0, &second).await,
        PeerResponse::LogAck { sequence: 1, .. }
    ));
    assert_eq!(state(&mut c, uuid).await.0, 1);
    let mut want = vec![0u8; DISK as usize];
    want[512 * 1024..576 * 1024].copy_from_slice(&pattern(4, 64 * 1024));
    assert!(
        latest_raw(&env, uuid).await == want,
        "the replica keeps blocks of the refused copy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_that_do_not_fit_the_replica_are_refused() {
    let env = replica(|_, _| {}).await;
    let (mut c, theirs) = client(&env, PRIMARY).await;
    let uuid = Uuid::new_v4();
    assert_eq!(create(&mut c, &theirs, uuid).await, PeerResponse::Ok);
    // An extent beyond the replica's disk end (the log claims a bigger disk).
    let log = write_log(
        env.tmp.path(),
        uuid,
        1,
        0,
        2 * DISK,
        &[W::Data(DISK + 4096, vec![5; 4096])],
    );
    let (code, msg) = refused(&send(&mut c, uuid, 1, 0, &log).await);
    assert_eq!(code, RefusalCode::BadLog);
    assert!(msg.contains("disk0"), "{msg}");
    // A log for another VM.
    let other = write_log(
        env.tmp.path(),
        Uuid::new_v4(),
        1,
        0,
        DISK,
        &[W::Data(0, vec![5; 512])],
    );
    let (code, msg) = refused(&send(&mut c, uuid, 1, 0, &other).await);
    assert_eq!(code, RefusalCode::BadLog);
    assert!(msg.contains("belongs to VM"), "{msg}");
    // Sent under the wrong sequence.
    let l = write_log(
        env.tmp.path(),
        uuid,
        1,
        0,
        DISK,
        &[W::Data(0, vec![5; 512])],
    );
    let (code, _) = refused(&send(&mut c, uuid, 2, 0, &l).await);
    assert_eq!(code, RefusalCode::BadLog);
    assert_eq!(state(&mut c, uuid).await.0, 0);
    assert_eq!(latest_raw(&env, uuid).await, vec![0u8; DISK as usize]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_transfer_is_resumed_from_what_the_replica_holds() {
    let env = replica(|_, _| {}).await;
    let (mut c, theirs) = client(&env, PRIMARY).await;
    let uuid = Uuid::new_v4();
    assert_eq!(create(&mut c, &theirs, uuid).await, PeerResponse::Ok);
    // The initial copy first (it is applied as it arrives, and never resumed: see below).
    let first = write_log(env.tmp.path(), uuid, 1, 0, DISK, &[W::Zero(0, 64 * 1024)]);
    let r = c
        .send_log(uuid, (1, 0), None, &first, |_| {})
        .await
        .unwrap();
    assert!(
        matches!(r, PeerResponse::LogAck { sequence: 1, .. }),
        "{r:?}"
    );
    let writes: Vec<W> = (0..16u64)
        .map(|i| W::Data(i * 128 * 1024, pattern(i as u8 + 10, 64 * 1024)))
        .collect();
    let log = write_log(env.tmp.path(), uuid, 2, 1, DISK, &writes);
    let bytes = std::fs::read(&log).unwrap();
    let half = bytes.len() / 2;
    let (cut, _) = client(&env, PRIMARY).await;
    cut.send_partial_and_drop(
        &PeerRequest::SendLog {
            vm_uuid: uuid,
            sequence: 2,
            base_sequence: 1,
            resume: None,
        },
        &bytes[..half],
    )
    .await
    .unwrap();
    // The replica notices the cut; its state shows the partial log.
    let mut partial = None;
    for _ in 0..50 {
        let (last, p, _) = state(&mut c, uuid).await;
        assert_eq!(last, 1);
        if p.is_some() {
            partial = p;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (seq, resume) = partial.expect("a partial log");
    assert_eq!(seq, 2);
    assert!(
        resume.bytes > 0 && resume.bytes <= half as u64,
        "{resume:?}"
    );
    assert!(resume.records > 0 && resume.records < 16, "{resume:?}");
    // Resuming from a point beyond what the replica holds is refused.
    let r = c
        .send_log(
            uuid,
            (2, 1),
            Some(Resume {
                records: 15,
                bytes: bytes.len() as u64 - 10,
            }),
            &log,
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(refused(&r).0, RefusalCode::BadRequest);
    let r = c
        .send_log(uuid, (2, 1), Some(resume), &log, |_| {})
        .await
        .unwrap();
    assert_eq!(
        r,
        PeerResponse::LogAck {
            sequence: 2,
            bytes: bytes.len() as u64
        }
    );
    assert_eq!(state(&mut c, uuid).await.0, 2);
    let raw = latest_raw(&env, uuid).await;
    for (i, w) in writes.iter().enumerate() {
        let W::Data(off, d) = w else { unreachable!() };
        assert!(
            raw[*off as usize..*off as usize + d.len()] == d[..],
            "extent {i} differs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_initial_copy_leaves_nothing_to_resume_and_the_next_whole_one_is_applied_as_it_arrives(
) {
    let env = replica(|_, _| {}).await;
    let (mut c, theirs) = client(&env, PRIMARY).await;
    let uuid = Uuid::new_v4();
    assert_eq!(create(&mut c, &theirs, uuid).await, PeerResponse::Ok);
    let old: Vec<W> = (0..16u64)
        .map(|i| W::Data(i * 128 * 1024, pattern(i as u8 + 50, 64 * 1024)))
        .collect();
    let cut_log = write_log(env.tmp.path(), uuid, 1, 0, DISK, &old);
    let bytes = std::fs::read(&cut_log).unwrap();
    let (cut, _) = client(&env, PRIMARY).await;
    cut.send_partial_and_drop(
        &PeerRequest::SendLog {
            vm_uuid: uuid,
            sequence: 1,
            base_sequence: 0,
            resume: None,
        },
        &bytes[..bytes.len() / 2],
    )
    .await
    .unwrap();
    // Applied in place as it arrived: no spool file, so no partial log to resume from, and no
    // point either. (The replica notices the cut when the connection closes.)
    let dir = env.store_root.join(uuid.to_string());
    let spooled = || {
        std::fs::read_dir(dir.join("logs"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    for _ in 0..20 {
        let (last, partial, points) = state(&mut c, uuid).await;
        assert_eq!((last, partial, points.len()), (0, None, 0));
        assert_eq!(spooled(), 0, "an initial copy is not spooled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A new initial copy (another point in time, other blocks) replaces what the cut one wrote.
    let new: Vec<W> = (0..8u64)
        .map(|i| W::Data(i * 256 * 1024, pattern(i as u8 + 90, 64 * 1024)))
        .collect();
    let log = write_log(env.tmp.path(), uuid, 1, 0, DISK, &new);
    let size = std::fs::metadata(&log).unwrap().len();
    let r = c.send_log(uuid, (1, 0), None, &log, |_| {}).await.unwrap();
    assert_eq!(
        r,
        PeerResponse::LogAck {
            sequence: 1,
            bytes: size
        }
    );
    assert_eq!(state(&mut c, uuid).await.0, 1);
    assert_eq!(spooled(), 0);
    let raw = latest_raw(&env, uuid).await;
    for (i, w) in new.iter().enumerate() {
        let W::Data(off, d) = w else { unreachable!() };
        assert!(
            raw[*off as usize..*off as usize + d.len()] == d[..],
            "extent {i} differs"
        );
    }
    // What only the cut copy wrote (at 128 KiB) is gone.
    assert!(raw[128 * 1024..192 * 1024].iter().all(|b| *b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_durable_log_left_unapplied_is_applied_before_anything_else() {
    // What a crash between LogAck and apply leaves behind: a verified log in the spool.
    let env = replica(|_, _| {}).await;
    let (mut c, theirs) = client(&env, PRIMARY).await;
    let uuid = Uuid::new_v4();
    assert_eq!(create(&mut c, &theirs, uuid).await, PeerResponse::Ok);
    let data = pattern(42, 8192);
    let log = write_log(
        env.tmp.path(),
        uuid,
        1,
        0,
        DISK,
        &[W::Data(0, data.clone())],
    );
    let spool = vmrepl_store::spool::log_path(&env.store_root.join(uuid.to_string()), 1);
    std::fs::copy(&log, &spool).unwrap();
    let (last, partial, _) = state(&mut c, uuid).await;
    assert_eq!((last, partial), (1, None));
    assert!(!spool.exists());
    let raw = latest_raw(&env, uuid).await;
    assert!(raw[..8192] == data[..]);
    // Sending it again is the idempotent acknowledgement.
    assert_eq!(
        send(&mut c, uuid, 1, 0, &log).await,
        PeerResponse::LogAck {
            sequence: 1,
            bytes: 0
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spooled_log_damaged_on_disk_is_set_aside_and_blocks_nothing_after_it() {
    // A verified log that the disk damaged before it was applied (or a torn apply of it).
    let env = replica(|_, _| {}).await;
    let (mut c, theirs) = client(&env, PRIMARY).await;
    let uuid = Uuid::new_v4();
    assert_eq!(create(&mut c, &theirs, uuid).await, PeerResponse::Ok);
    let first = pattern(1, 8192);
    let log1 = write_log(
        env.tmp.path(),
        uuid,
        1,
        0,
        DISK,
        &[W::Data(0, first.clone())],
    );
    assert!(matches!(
        send(&mut c, uuid, 1, 0, &log1).await,
        PeerResponse::LogAck { sequence: 1, .. }
    ));
    let log2 = write_log(
        env.tmp.path(),
        uuid,
        2,
        1,
        DISK,
        &[W::Data(65536, pattern(2, 8192))],
    );
    let mut bytes = std::fs::read(&log2).unwrap();
    let at = bytes.len() - 200;
    bytes[at] ^= 0xff;
    let dir = env.store_root.join(uuid.to_string());
    let spool = vmrepl_store::spool::log_path(&dir, 2);
    std::fs::write(&spool, &bytes).unwrap();
    // The replica does not apply it, sets it aside, and stays at log 1.
    let (last, partial, _) = state(&mut c, uuid).await;
    assert_eq!((last, partial), (1, None));
    assert!(!spool.exists());
    assert!(spool.with_extension("damaged").exists());
    assert!(latest_raw(&env, uuid).await[..8192] == first[..]);
    // The next log is taken (before, every later log failed on the damaged one).
    let log2 = write_log(
        env.tmp.path(),
        uuid,
        2,
        1,
        DISK,
        &[W::Data(65536, pattern(3, 8192))],
    );
    assert!(matches!(
        send(&mut c, uuid, 2, 1, &log2).await,
        PeerResponse::LogAck { sequence: 2, .. }
    ));
    assert_eq!(state(&mut c, uuid).await.0, 2);
}
