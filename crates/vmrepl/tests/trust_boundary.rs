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

    // A real failover: the same, and the adapter joins only the network hostb's admin names.
    b.ok(&[
        "failover",
        "start",
        "app",
        "--risk-split-brain",
        "--network",
        "user",
    ]);
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
