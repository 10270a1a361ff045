//! The trust boundary between hosts (docs/security.md), attacked end to end: real daemons,
//! and a real peer client that holds the certificate of a primary the replica server
//! authorizes. Whatever such a primary asks, the replica host's own VMs, their disks and the
//! host's settings stay byte for byte as they were, every refusal names the rule, and the
//! daemon keeps serving.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use uuid::Uuid;
use vmrepl_host::peer::client::PeerClient;
use vmrepl_host::peer::proto::{PeerRequest, PeerResponse, PointPolicy, RefusalCode};
use vmrepl_transport::pki::HostIdentity;
use vmrepl_types::{HostInfo, VmDefinition};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A peer client to `b` with `a`'s own certificate and key: what a compromised primary holds.
fn as_host(a: &Host, b: &Host, rt: &tokio::runtime::Runtime) -> (PeerClient, HostInfo) {
    let tls = a.data().join("tls");
    let id = HostIdentity::load(
        &tls.join("host.pem"),
        &tls.join("host-key.pem"),
        &[tls.join("ca.pem"), b.data().join("tls/ca.pem")],
    )
    .unwrap();
    let info: HostInfo = serde_json::from_value(a.json(&["host", "info"])).unwrap();
    rt.block_on(PeerClient::connect(
        &id,
        &info,
        &format!("{}:{}", b.ip, b.port),
        &b.name,
    ))
    .unwrap()
}

fn ask(c: &mut PeerClient, rt: &tokio::runtime::Runtime, req: PeerRequest) -> PeerResponse {
    rt.block_on(c.request(&req)).unwrap()
}

fn refusal(r: PeerResponse) -> (RefusalCode, String) {
    match r {
        PeerResponse::Refused { code, message } => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Everything under `dir`, as (relative path, BLAKE3 of the content).
fn snapshot(dir: &Path) -> Vec<(PathBuf, String)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.is_file() {
                let h = blake3::hash(&std::fs::read(&p).unwrap())
                    .to_hex()
                    .to_string();
                out.push((p.strip_prefix(root).unwrap().to_path_buf(), h));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn policy() -> PointPolicy {
    PointPolicy {
        keep: 2,
        interval_secs: 3600,
    }
}

#[test]
fn an_authorized_primary_cannot_delete_adopt_or_read_the_replica_hosts_own_vms() {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.81", "127.0.0.82", "lab");
    // hostb's own VM, never replicated anywhere, and a definition of it as a primary could
    // guess it (same name, UUID, disk ids and sizes).
    b.ok(&["vm", "create", "dc01", "--disk", "16M", "--nic", "none"]);
    let own: VmDefinition =
        serde_json::from_value(b.json(&["vm", "show", "dc01"])["definition"].clone()).unwrap();
    let storage = b.data().join("storage");
    let before = snapshot(&storage);
    assert!(!before.is_empty());
    let config_before = std::fs::read(b.data().join("config.toml")).unwrap();

    let rt = runtime();
    let (mut c, _) = as_host(&a, &b, &rt);
    let mut guessed = own.clone();
    guessed.disks[0].path = "/anything/disk0.qcow2".into();

    // Reverse replication of a VM hostb never replicated to hosta: refused before anything
    // is touched, whatever the relationship or disks claimed.
    for (rel, base) in [(Some(Uuid::new_v4()), 0), (None, 7)] {
        let (code, msg) = refusal(ask(
            &mut c,
            &rt,
            PeerRequest::ReverseReplica {
                vm: Box::new(guessed.clone()),
                relationship: Uuid::new_v4(),
                policy: policy(),
                base_sequence: base,
                primary_server: None,
                old_relationship: rel,
            },
        ));
        assert_eq!(code, RefusalCode::NotAuthorized, "{msg}");
        assert!(msg.contains("not replicated to hosta.test"), "{msg}");
        assert!(
            !msg.contains("dc01"),
            "the refusal names the local VM: {msg}"
        );
    }

    // Adopting it as an "existing copy": refused without designation, and the refusal is the
    // same whatever the disks claimed (it reveals nothing of the layout).
    let mut wrong = guessed.clone();
    wrong.uuid = Uuid::new_v4();
    wrong.disks[0].size_bytes = 512 * 1024;
    let mut right = guessed.clone();
    right.uuid = Uuid::new_v4();
    let mut answers = Vec::new();
    for vm in [wrong, right] {
        let (code, msg) = refusal(ask(
            &mut c,
            &rt,
            PeerRequest::CreateReplica {
                vm: Box::new(vm),
                relationship: Uuid::new_v4(),
                policy: policy(),
                primary_server: None,
                existing_copy: true,
            },
        ));
        assert_eq!(code, RefusalCode::NotAuthorized, "{msg}");
        assert!(
            msg.contains("accept-copy dc01 --primary hosta.test"),
            "{msg}"
        );
        assert!(
            !msg.contains("16777216"),
            "the refusal reveals the disks: {msg}"
        );
        answers.push(msg);
    }
    assert_eq!(answers[0], answers[1]);

    // A replica under the local VM's UUID, reading it, changing or removing it: refused.
    let (code, msg) = refusal(ask(
        &mut c,
        &rt,
        PeerRequest::CreateReplica {
            vm: Box::new(guessed.clone()),
            relationship: Uuid::new_v4(),
            policy: policy(),
            primary_server: None,
            existing_copy: false,
        },
    ));
    assert_eq!(code, RefusalCode::Conflict, "{msg}");
    assert!(!msg.contains("dc01"), "{msg}");
    for req in [
        PeerRequest::BlockDigests { vm_uuid: own.uuid },
        PeerRequest::RemoveReplica {
            vm_uuid: own.uuid,
            delete: true,
        },
        PeerRequest::SetPolicy {
            vm_uuid: own.uuid,
            policy: policy(),
        },
        PeerRequest::ReplicaState { vm_uuid: own.uuid },
        PeerRequest::PrimaryState { vm_uuid: own.uuid },
    ] {
        let (code, msg) = refusal(ask(&mut c, &rt, req.clone()));
        assert_eq!(code, RefusalCode::UnknownVm, "{req:?}: {msg}");
    }
    // A policy no enable would allow is refused as such.
    let (code, msg) = refusal(ask(
        &mut c,
        &rt,
        PeerRequest::SetPolicy {
            vm_uuid: own.uuid,
            policy: PointPolicy {
                keep: 4_000_000_000,
                interval_secs: 0,
            },
        },
    ));
    assert_eq!(code, RefusalCode::BadRequest, "{msg}");
    assert!(msg.contains("0 to 24"), "{msg}");

    // Nothing of hostb changed, and it keeps serving its CLI and peers.
    assert_eq!(snapshot(&storage), before);
    assert_eq!(
        std::fs::read(b.data().join("config.toml")).unwrap(),
        config_before
    );
    let after: VmDefinition =
        serde_json::from_value(b.json(&["vm", "show", "dc01"])["definition"].clone()).unwrap();
    assert_eq!(after, own);
    assert_eq!(b.vm_state("dc01"), "off");
    let (mut again, _) = as_host(&a, &b, &rt);
    let (code, _) = refusal(ask(
        &mut again,
        &rt,
        PeerRequest::ReplicaState {
            vm_uuid: Uuid::new_v4(),
        },
    ));
    assert_eq!(code, RefusalCode::UnknownVm);
    drop(again);
    drop(c);

    // A primary's VM named like one of hostb's own gets a name of its own on hostb, and every
    // replica-side command also takes its UUID.
    a.ok(&["vm", "create", "dc01", "--disk", "16M", "--nic", "none"]);
    enable_ok(&a, &b, "dc01", "hostb.test", &["--frequency", "5"]);
    wait_until("replicating", std::time::Duration::from_secs(120), || {
        status(&a, "dc01")["state"] == "replicating"
    });
    let replica = status(&b, "dc01-2");
    assert_eq!(replica["state"], "replicating", "{replica}");
    let theirs = a.json(&["vm", "show", "dc01"])["definition"]["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    b.ok(&["replication", "points", &theirs]);
    b.ok(&["replication", "points", "dc01-2"]);
    assert_eq!(b.vm_state("dc01"), "off");
    assert_eq!(snapshot(&storage), before);

    // A primary that removes its replication cannot wipe the copy on hostb unless hostb's
    // admin allows it.
    let out = a.ok(&["replication", "remove", "dc01", "--delete-replica"]);
    assert!(out.contains("if that host allows it"), "{out}");
    assert!(store.join(&theirs).join("state.json").exists());
    assert!(b
        .ok(&["replication", "server", "show"])
        .contains("their data is kept here"));
}

/// Runs the CLI on `h` and requires it to finish, successfully, within `secs` seconds.
fn ok_within(h: &Host, args: &[&str], secs: u64) -> String {
    let mut child = std::process::Command::new(bin())
        .arg("--data")
        .arg(h.data())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let o = child.wait_with_output().unwrap();
            assert!(
                st.success(),
                "vmrepl {args:?} failed: {}{}",
                String::from_utf8_lossy(&o.stderr),
                h.log_tail()
            );
            return String::from_utf8_lossy(&o.stdout).into_owned();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmrepl {args:?} was still blocked after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_primary_that_stalls_mid_log_blocks_neither_test_failover_nor_failover_on_the_replica() {
    let _s = serial();
    let (a, b, _store) = pair("127.0.0.83", "127.0.0.84", "lab");
    create_guest_vm(&a, "app", "1", &["16M"], "idle");
    enable_ok(&a, &b, "app", "hostb.test", &["--frequency", "5"]);
    wait_until("replicating", std::time::Duration::from_secs(120), || {
        status(&a, "app")["state"] == "replicating"
    });
    a.ok(&["replication", "pause", "app"]);
    let uuid: Uuid =
        serde_json::from_value(a.json(&["vm", "show", "app"])["definition"]["uuid"].clone())
            .unwrap();
    let last = acked(&a, "app");

    // hosta's certificate starts the next log, sends a few bytes of it and goes silent
    // without closing: a primary that lost power mid-transfer.
    let rt = runtime();
    let (mut stalled, _) = as_host(&a, &b, &rt);
    rt.block_on(stalled.send_partial(
        &PeerRequest::SendLog {
            vm_uuid: uuid,
            sequence: last + 1,
            base_sequence: last,
            resume: None,
        },
        b"VMRLOG",
    ))
    .unwrap();

    // The replica host's admin is not held up by it.
    ok_within(&b, &["replication", "points", "app"], 20);
    let out = ok_within(&b, &["failover", "test", "app"], 20);
    assert!(out.contains("Test VM"), "{out}");
    ok_within(&b, &["failover", "stop-test", "app"], 20);
    ok_within(&b, &["failover", "start", "app", "--risk-split-brain"], 30);
    let state = status(&b, "app")["state"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(state.starts_with("failed-over"), "{state}");

    // When the stalled transfer finally ends, it is refused: the replica failed over.
    drop(stalled);
}

#[test]
fn a_failed_over_vm_boots_the_replicas_own_copy_of_its_kernel_and_joins_no_network_of_the_primarys_choosing(
) {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.85", "127.0.0.86", "lab");
    // hosta's VM boots a kernel from a folder of hosta's; on hostb that same path is a private
    // file (here: the same machine, so the file is rewritten once replication is paused).
    let g = guest();
    let boot = tempfile::tempdir().unwrap();
    let (kernel, initrd) = (boot.path().join("vmlinuz"), boot.path().join("initrd.img"));
    std::fs::copy(&g.kernel, &kernel).unwrap();
    std::fs::copy(&g.initrd, &initrd).unwrap();
    a.ok(&[
        "vm",
        "create",
        "app",
        "--memory",
        "256",
        "--disk",
        "16M",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 quiet vmrepl.work=idle",
        "--nic",
        "bridge:br-mgmt",
    ]);
    enable_ok(&a, &b, "app", "hostb.test", &["--frequency", "5"]);
    let uuid = a.json(&["vm", "show", "app"])["definition"]["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let held = store.join(&uuid).join("boot");
    wait_until(
        "hostb holds the boot files",
        std::time::Duration::from_secs(120),
        || {
            status(&a, "app")["state"] == "replicating"
                && held.join("vmlinuz").is_file()
                && held.join("initrd.img").is_file()
        },
    );
    assert_eq!(
        std::fs::read(held.join("vmlinuz")).unwrap(),
        std::fs::read(&g.kernel).unwrap()
    );
    a.ok(&["replication", "pause", "app"]);
    std::fs::write(&kernel, b"SECRET OF HOSTB").unwrap();
    std::fs::write(&initrd, b"SECRET OF HOSTB").unwrap();

    // The test VM boots hostb's own copies, with its adapter not connected.
    b.ok(&["failover", "test", "app"]);
    let test: VmDefinition =
        serde_json::from_value(b.json(&["vm", "show", "app - Test"])["definition"].clone())
            .unwrap();
    let k = test.kernel.clone().unwrap();
    assert!(k.kernel.starts_with(b.data()), "{}", k.kernel.display());
    assert_ne!(k.kernel, kernel);
    assert_ne!(k.initrd.as_deref(), Some(initrd.as_path()));
    assert!(test
        .nics
        .iter()
        .all(|n| n.mode == vmrepl_types::NicMode::NotConnected));
    b.ok(&["vm", "start", "app - Test"]);
    b.wait_console(
        "app - Test",
        "VMREPL READY",
        std::time::Duration::from_secs(120),
    );
    b.ok(&["vm", "stop", "app - Test"]);
    b.ok(&["failover", "stop-test", "app"]);
    assert!(
        !k.kernel.exists(),
        "the test VM's kernel copy stayed behind"
    );

    // A real failover: the same, and the adapter joins only the network hostb's admin names
    // for it on this host (Hyper-V's per-adapter failover network).
    let shown = b.ok(&["replication", "network", "app"]);
    assert!(shown.contains("not connected"), "{shown}");
    assert!(!shown.contains("br-mgmt"), "{shown}");
    let e = b.fails(&[
        "replication",
        "network",
        "app",
        "--adapter",
        "1",
        "--failover",
        "user",
    ]);
    assert!(e.contains("no adapter 1"), "{e}");
    b.ok(&[
        "replication",
        "network",
        "app",
        "--adapter",
        "0",
        "--failover",
        "user",
    ]);
    b.ok(&["failover", "start", "app", "--risk-split-brain"]);
    let def: VmDefinition =
        serde_json::from_value(b.json(&["vm", "show", "app"])["definition"].clone()).unwrap();
    let k = def.kernel.unwrap();
    assert!(k.kernel.starts_with(b.data()), "{}", k.kernel.display());
    assert_eq!(
        std::fs::read(&k.kernel).unwrap(),
        std::fs::read(&g.kernel).unwrap()
    );
    assert!(def
        .nics
        .iter()
        .all(|n| n.mode == vmrepl_types::NicMode::User));
}

/// One request an authorized (possibly malicious) primary may send, over pools of UUIDs and
/// names that include the replica host's own VM and another primary's replica.
#[derive(Debug, Clone)]
enum Op {
    Check(usize),
    Create(usize, usize, bool),
    Reverse(usize, usize, Option<usize>, u64),
    State(usize),
    Log(usize, u64, u64),
    Policy(usize, u32, u32),
    Remove(usize, bool),
    Digests(usize),
    Primary(usize),
    Boot(usize),
    Import(usize),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    let u = 0..5usize;
    prop_oneof![
        u.clone().prop_map(Op::Check),
        (u.clone(), 0..4usize, any::<bool>()).prop_map(|(a, b, c)| Op::Create(a, b, c)),
        (
            u.clone(),
            0..4usize,
            proptest::option::of(0..3usize),
            0..3u64
        )
            .prop_map(|(a, b, c, d)| Op::Reverse(a, b, c, d)),
        u.clone().prop_map(Op::State),
        (u.clone(), 1..4u64, 0..3u64).prop_map(|(a, b, c)| Op::Log(a, b, c)),
        (
            u.clone(),
            prop_oneof![Just(0u32), Just(2), Just(24), Just(25), Just(u32::MAX)],
            prop_oneof![Just(0u32), Just(5), Just(3600), Just(u32::MAX)]
        )
            .prop_map(|(a, b, c)| Op::Policy(a, b, c)),
        (u.clone(), any::<bool>()).prop_map(|(a, b)| Op::Remove(a, b)),
        u.clone().prop_map(Op::Digests),
        u.clone().prop_map(Op::Primary),
        u.clone().prop_map(Op::Boot),
        u.prop_map(Op::Import),
    ]
}

/// A valid log for `uuid` (one 4 KiB write), as a primary would send it.
fn small_log(dir: &Path, uuid: Uuid, seq: u64, base: u64, disks: &[(String, u64)]) -> PathBuf {
    use vmrepl_log::{Compression, Consistency, DiskInfo, LogHeader, LogKind, LogWriter};
    let header = LogHeader {
        vm_id: uuid,
        sequence: seq,
        base_sequence: base,
        timestamp_unix_ms: 1_700_000_000_000 + seq,
        kind: if base == 0 {
            LogKind::Initial
        } else {
            LogKind::Delta
        },
        consistency: Consistency::Crash,
        compression: Compression::None,
        disks: disks
            .iter()
            .map(|(id, size)| DiskInfo {
                id: id.clone(),
                virtual_size: *size,
            })
            .collect(),
    };
    let path = dir.join(format!("{uuid}-{seq}-{base}.vlog"));
    let mut w = LogWriter::new(std::fs::File::create(&path).unwrap(), header).unwrap();
    w.write_data(0, 0, &[seq as u8; 4096]).unwrap();
    w.finish().unwrap();
    path
}

/// Everything of `h` that no request of hosta may change: the host's data folder but for
/// hosta's own storage folder, the database and the daemon's log and runtime files.
fn outside_hosta(h: &Host, hosta_storage: &Path) -> Vec<(PathBuf, String)> {
    snapshot(h.data())
        .into_iter()
        .filter(|(p, _)| {
            let s = p.to_string_lossy();
            !h.data().join(p).starts_with(hosta_storage)
                && !s.starts_with("state.db")
                && !s.starts_with("daemon.log")
                && !s.starts_with("run/")
        })
        .collect()
}

#[test]
fn whatever_an_authorized_primary_sends_nothing_outside_its_own_replicas_and_storage_folder_changes(
) {
    use proptest::prelude::{prop_assert, prop_assert_eq};
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    let _s = serial();
    let (a, b, store_a) = pair("127.0.0.87", "127.0.0.88", "lab");
    // hostb's own VM, and a replica hostb keeps for another primary, hostc.
    b.ok(&["vm", "create", "own1", "--disk", "16M", "--nic", "none"]);
    let mut c = Host::init("hostc.test", "127.0.0.89");
    c.ok(&[
        "host",
        "trust",
        b.data().join("tls/ca.pem").to_str().unwrap(),
    ]);
    b.ok(&[
        "host",
        "trust",
        c.data().join("tls/ca.pem").to_str().unwrap(),
    ]);
    c.start();
    let store_c = b.data().join("replicas-from-c");
    authorize(&b, "hostc.test", &store_c, "other");
    c.ok(&["vm", "create", "cvm", "--disk", "16M", "--nic", "none"]);
    enable_ok(&c, &b, "cvm", "hostb.test", &["--frequency", "5"]);
    wait_until(
        "hostc replicating",
        std::time::Duration::from_secs(120),
        || status(&c, "cvm")["state"] == "replicating",
    );
    c.ok(&["replication", "pause", "cvm"]);
    let own: VmDefinition =
        serde_json::from_value(b.json(&["vm", "show", "own1"])["definition"].clone()).unwrap();
    let cvm: VmDefinition =
        serde_json::from_value(c.json(&["vm", "show", "cvm"])["definition"].clone()).unwrap();
    // Wait for a cycle in flight (if any) to settle before the reference snapshot.
    let c_seq = acked(&c, "cvm");
    wait_until(
        "hostc's replica settled",
        std::time::Duration::from_secs(30),
        || status(&b, "cvm")["last_sequence"].as_u64() == Some(c_seq),
    );
    let reference = outside_hosta(&b, &store_a);
    let b_vms = local_vms(&b);

    let rt = runtime();
    let work = tempfile::tempdir().unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        // The hosts carry their state from case to case: a shrunk sequence would be blamed
        // for what an earlier one did, so the first failing sequence is reported as it is.
        max_shrink_iters: 0,
        ..Config::default()
    });
    let strategy = proptest::collection::vec(op(), 1..10);
    let result = runner.run(&strategy, |ops| {
        // The pools: hostb's own VM, hostc's replica, two of hosta's, one nobody has.
        let fresh = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
        let uuids = [own.uuid, cvm.uuid, fresh[0], fresh[1], fresh[2]];
        let names = ["own1", "cvm", "a1", "a2"];
        let rels = [Uuid::new_v4(), Uuid::new_v4(), Uuid::from_u128(7)];
        let (mut client, theirs) = as_host(&a, &b, &rt);
        let def = |u: usize, n: usize| {
            let mut d = own.clone();
            d.uuid = uuids[u];
            d.name = vmrepl_types::VmName::new(names[n]).unwrap();
            d.machine_type = theirs
                .machine_types
                .iter()
                .find(|m| m.starts_with("pc-i440fx"))
                .cloned()
                .unwrap_or(d.machine_type);
            d.nics = vec![];
            d.kernel = Some(vmrepl_types::vm::DirectKernel {
                kernel: b.data().join("tls/host-key.pem"),
                initrd: Some(b.data().join("tls/ca-key.pem")),
                cmdline: "console=ttyS0".into(),
            });
            d
        };
        let disks: Vec<(String, u64)> = own
            .disks
            .iter()
            .map(|d| (d.id.clone(), d.size_bytes))
            .collect();
        for op in &ops {
            let req = match op.clone() {
                Op::Check(u) => PeerRequest::CheckReplica {
                    vm: Box::new(def(u, u % 4)),
                },
                Op::Create(u, n, existing_copy) => PeerRequest::CreateReplica {
                    vm: Box::new(def(u, n)),
                    relationship: rels[u % 3],
                    policy: policy(),
                    primary_server: None,
                    existing_copy,
                },
                Op::Reverse(u, n, old, base) => PeerRequest::ReverseReplica {
                    vm: Box::new(def(u, n)),
                    relationship: Uuid::new_v4(),
                    policy: policy(),
                    base_sequence: base,
                    primary_server: None,
                    old_relationship: old.map(|i| rels[i]),
                },
                Op::State(u) => PeerRequest::ReplicaState { vm_uuid: uuids[u] },
                Op::Log(u, seq, base) => {
                    let log = small_log(work.path(), uuids[u], seq, base.min(seq - 1), &disks);
                    let r = rt.block_on(client.send_log(
                        uuids[u],
                        (seq, base.min(seq - 1)),
                        None,
                        &log,
                        |_| {},
                    ));
                    prop_assert!(r.is_ok(), "{op:?}: {r:?}");
                    continue;
                }
                Op::Policy(u, keep, interval_secs) => PeerRequest::SetPolicy {
                    vm_uuid: uuids[u],
                    policy: PointPolicy {
                        keep,
                        interval_secs,
                    },
                },
                Op::Remove(u, delete) => PeerRequest::RemoveReplica {
                    vm_uuid: uuids[u],
                    delete,
                },
                Op::Digests(u) => PeerRequest::BlockDigests { vm_uuid: uuids[u] },
                Op::Primary(u) => PeerRequest::PrimaryState { vm_uuid: uuids[u] },
                Op::Boot(u) => {
                    let f = work.path().join("boot");
                    std::fs::write(&f, b"not a kernel").unwrap();
                    let sum = (12, blake3::hash(b"not a kernel").to_hex().to_string());
                    let r = rt.block_on(client.put_boot_file(
                        uuids[u],
                        vmrepl_host::peer::proto::BootFile::Kernel,
                        &f,
                        sum,
                    ));
                    prop_assert!(r.is_ok(), "{op:?}: {r:?}");
                    continue;
                }
                Op::Import(u) => PeerRequest::ExpectImport {
                    vm_uuid: uuids[u],
                    bytes: 1,
                    blake3: "0".repeat(64),
                },
            };
            let r = rt.block_on(client.request(&req));
            prop_assert!(r.is_ok(), "{op:?}: the connection broke: {r:?}");
        }
        drop(client);
        let now = outside_hosta(&b, &store_a);
        if now != reference {
            let changed: Vec<_> = now
                .iter()
                .filter(|x| !reference.contains(x))
                .chain(reference.iter().filter(|x| !now.contains(x)))
                .collect();
            return Err(TestCaseError::fail(format!(
                "{ops:?} changed files outside hosta's storage folder: {changed:?}"
            )));
        }
        prop_assert_eq!(&local_vms(&b), &b_vms, "{:?} changed hostb's VMs", ops);
        prop_assert_eq!(
            status(&b, "cvm")["last_sequence"].as_u64(),
            Some(c_seq),
            "{:?} changed hostc's replica",
            ops
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\n{}", b.log_tail());
    }
    // hostb kept serving: hostc's replication goes on.
    c.ok(&["replication", "resume", "cvm"]);
    wait_until(
        "hostc replicating again",
        std::time::Duration::from_secs(60),
        || acked(&c, "cvm") > c_seq,
    );
}
