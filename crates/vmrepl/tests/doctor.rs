//! End to end: `vmrepl doctor` names the fault, with real daemons: a replica server inside a
//! network namespace (its port then dropped by an nft rule there, and its daemon stopped), an
//! unauthorized primary, a replica server whose CA is not trusted, a healthy relationship seen
//! from both sides, and this host's own checks.

mod common;
use common::*;
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

/// `vmrepl --json doctor ARGS`: the findings and whether it exited 0.
fn doctor(h: &Host, args: &[&str]) -> (Vec<Value>, bool) {
    let mut a = vec!["--json", "doctor"];
    a.extend_from_slice(args);
    let o = h.run(&a);
    let out = String::from_utf8_lossy(&o.stdout);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {out}{}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    let findings = v["findings"].as_array().cloned().unwrap_or_default();
    assert!(!findings.is_empty(), "no findings: {v}");
    (findings, o.status.success())
}

/// The finding of `check`; panics with all of them when there is none.
fn finding<'a>(fs: &'a [Value], check: &str) -> &'a Value {
    fs.iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check} finding in {fs:#?}"))
}

fn status_of(fs: &[Value], check: &str) -> String {
    finding(fs, check)["status"].as_str().unwrap().to_string()
}

#[test]
fn doctor_names_a_dropped_port_a_stopped_daemon_an_unauthorized_host_and_a_foreign_ca() {
    let _s = serial();
    let tag = format!("d{}", std::process::id() % 100_000);
    let ns = Netns::create(&tag, "10.213.14.1", "10.213.14.2");
    let mut a = Host::init("hosta.test", "127.0.0.153");
    let port = free_port("127.0.0.153");
    let mut b = Host::init_at("hostb.test", "10.213.14.2", port, &[]);
    a.ok(&[
        "host",
        "trust",
        b.data().join("tls/ca.pem").to_str().unwrap(),
    ]);
    b.ok(&[
        "host",
        "trust",
        a.data().join("tls/ca.pem").to_str().unwrap(),
    ]);
    a.start();
    b.start_with(&["ip", "netns", "exec", &ns.name], &[]);
    let store = b.data().join("replicas-from-a");
    serve_replicas_for(&b, "hosta.test", &store);
    create_small_vm(&a, "app");
    let server = format!("10.213.14.2:{port}");
    let check = [
        "--replica-server",
        server.as_str(),
        "--replica-name",
        "hostb.test",
    ];

    // Before enabling: every step passes.
    let (fs, passed) = doctor(&a, &check);
    for c in [
        "certificate",
        "resolve",
        "tcp",
        "tls",
        "clock",
        "authorization",
        "vm:app",
    ] {
        assert_eq!(status_of(&fs, c), "ok", "{fs:#?}");
    }
    // Which folder the replicas would go to, and the room there.
    let auth = finding(&fs, "authorization")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        auth.contains("replicas-from-a")
            && auth.contains("free")
            && auth.contains("\"hosta.test\""),
        "{auth}"
    );
    assert!(passed, "{fs:#?}");

    // A firewall rule on the replica server drops its port: told apart from a refusal.
    ns.drop_tcp(Some(port));
    let (fs, passed) = doctor(&a, &check);
    ns.drop_tcp(None);
    assert!(!passed);
    let tcp = finding(&fs, "tcp");
    assert_eq!(tcp["status"], "fail");
    let msg = tcp["message"].as_str().unwrap();
    assert!(
        msg.contains("no answer") && msg.contains("firewall"),
        "{msg}"
    );
    assert!(
        tcp["fix"]
            .as_str()
            .unwrap()
            .contains(&format!("dport {port}")),
        "{tcp}"
    );
    assert!(
        fs.iter().all(|f| f["check"] != "tls"),
        "went on past the port: {fs:#?}"
    );

    // The replica server does not authorize this host.
    b.ok(&["replication", "server", "revoke", "--primary", "hosta.test"]);
    let (fs, passed) = doctor(&a, &check);
    assert!(!passed);
    let auth = finding(&fs, "authorization");
    assert_eq!(auth["status"], "fail", "{fs:#?}");
    assert!(
        auth["fix"]
            .as_str()
            .unwrap()
            .contains("authorize --primary hosta.test"),
        "{auth}"
    );
    serve_replicas_for(&b, "hosta.test", &store);

    // A healthy relationship, from both sides.
    enable_ok(&a, &b, "app", "hostb.test", &["--frequency", "30"]);
    wait_until("the initial copy applied", T, || acked(&b, "app") >= 1);
    wait_until("the primary's health Normal", T, || {
        status(&a, "app")["health"] == "normal"
    });
    let (fs, passed) = doctor(&a, &["app"]);
    assert!(passed, "{fs:#?}");
    assert_eq!(status_of(&fs, "health"), "ok");
    assert!(
        finding(&fs, "vm:app")["message"]
            .as_str()
            .unwrap()
            .contains("keeps the replica"),
        "{fs:#?}"
    );
    // On the replica server: the replica's health, and whether it can reach the primary back
    // (it cannot here: the primary's loopback address is not the namespace's).
    let (fs, _) = doctor(&b, &["app"]);
    assert_eq!(status_of(&fs, "health"), "ok", "{fs:#?}");
    assert!(
        finding(&fs, "tcp")["message"]
            .as_str()
            .unwrap()
            .contains("127.0.0.153"),
        "{fs:#?}"
    );

    // This host alone: its own settings, then the replica server its VM uses.
    let (fs, passed) = doctor(&a, &[]);
    assert!(passed, "{fs:#?}");
    assert_eq!(status_of(&fs, "certificate"), "ok");
    assert!(fs.iter().any(|f| f["check"] == "storage"));
    assert_eq!(status_of(&fs, "metrics"), "ok");

    // A replica server whose CA this host does not trust.
    let mut c = Host::init("hostc.test", "127.0.0.155");
    c.start();
    let cserver = format!("127.0.0.155:{}", c.port);
    let (fs, passed) = doctor(
        &a,
        &["--replica-server", &cserver, "--replica-name", "hostc.test"],
    );
    assert!(!passed);
    let tls = finding(&fs, "tls");
    assert_eq!(tls["status"], "fail", "{fs:#?}");
    assert!(tls["fix"].as_str().unwrap().contains("host trust"), "{tls}");

    // The replica server's daemon stopped (and gone): the port refuses at once.
    b.stop_daemon();
    let (fs, passed) = doctor(&a, &check);
    assert!(!passed);
    let tcp = finding(&fs, "tcp");
    assert_eq!(tcp["status"], "fail", "{fs:#?}");
    assert!(
        tcp["message"].as_str().unwrap().contains("refused"),
        "{tcp}"
    );
    // People read one line per finding, the fix under it, and a verdict.
    let o = a.run(&[
        "doctor",
        "--replica-server",
        &server,
        "--replica-name",
        "hostb.test",
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success());
    assert!(
        text.contains("FAIL") && text.contains("fix: start the vmrepl daemon"),
        "{text}"
    );
    assert!(text.contains("block replication"), "{text}");
    drop(ns);
}

#[test]
fn doctor_names_an_expired_certificate() {
    let (mut a, b, _store) = pair("127.0.0.158", "127.0.0.159", "doctor");
    // The primary's clock goes 1000 days ahead while its daemon runs: its own certificate and
    // the replica server's (a little over two years each) are past their end from where it stands.
    let clock = a.data().join("faketime");
    std::fs::write(&clock, "+0\n").unwrap();
    a.stop_daemon();
    let env = faketime_env(&clock);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    a.start_with(&[], &env);
    std::fs::write(&clock, "+86400000\n").unwrap(); // 1000 days
    let server = format!("{}:{}", b.ip, b.port);
    let check = [
        "--replica-server",
        server.as_str(),
        "--replica-name",
        "hostb.test",
    ];
    let mut last = Vec::new();
    wait_until(
        "the daemon's clock 1000 days ahead",
        Duration::from_secs(30),
        || {
            last = doctor(&a, &check).0;
            status_of(&last, "certificate") == "fail"
        },
    );
    let own = finding(&last, "certificate");
    assert!(
        own["message"].as_str().unwrap().contains("expired"),
        "{own}"
    );
    let tls = finding(&last, "tls");
    assert_eq!(tls["status"], "fail", "{last:#?}");
    assert!(
        tls["message"].as_str().unwrap().contains("expired"),
        "{tls}"
    );
}

#[test]
fn doctor_names_a_machine_type_the_replica_cannot_run_and_a_full_storage_folder() {
    let _s = serial();
    let tools = tempfile::tempdir().unwrap();
    let older = older_qemu(
        tools.path(),
        "qemu-7.1-like",
        &["pc-i440fx-7.2", "pc-q35-7.2"],
        "pc-i440fx-7.1",
    );
    let (a, mut b, _store) = pair("127.0.0.165", "127.0.0.166", "doctor");
    create_small_vm(&a, "app");
    let server = format!("{}:{}", b.ip, b.port);
    let check = [
        "--replica-server",
        server.as_str(),
        "--replica-name",
        "hostb.test",
    ];
    // The replica server's admin designated a copy of "app" there (for
    // --initial-existing-copy), but a UEFI one: the generations differ.
    b.ok(&[
        "vm",
        "create",
        "app",
        "--generation",
        "2",
        "--memory",
        "128",
        "--disk",
        "64M",
    ]);
    b.ok(&[
        "replication",
        "server",
        "accept-copy",
        "app",
        "--primary",
        "hosta.test",
    ]);
    let (fs, passed) = doctor(&a, &check);
    assert!(!passed);
    let copy = finding(&fs, "existing-copy:app");
    assert_eq!(copy["status"], "fail", "{fs:#?}");
    assert!(
        copy["message"].as_str().unwrap().contains("generation"),
        "{copy}"
    );
    b.ok(&["vm", "delete", "app"]);
    // A replica storage folder with 16 MiB of room, for a VM of 64 MiB.
    let small = b.data().join("small");
    let _fs = Tmpfs::mount(&small, "16m");
    authorize(&b, "hosta.test", &small, "doctor");
    let (fs, passed) = doctor(&a, &check);
    assert!(!passed);
    let vm = finding(&fs, "vm:app");
    assert_eq!(vm["status"], "fail", "{fs:#?}");
    assert!(vm["message"].as_str().unwrap().contains("free"), "{vm}");
    // Room again, but the replica server's QEMU lacks the VM's machine type.
    authorize(
        &b,
        "hosta.test",
        &b.data().join("replicas-from-a"),
        "doctor",
    );
    switch_qemu(&mut b, &older);
    let (fs, passed) = doctor(&a, &check);
    assert!(!passed);
    let vm = finding(&fs, "vm:app");
    assert_eq!(vm["status"], "fail", "{fs:#?}");
    let msg = vm["message"].as_str().unwrap();
    assert!(
        msg.contains("pc-i440fx-7.2") && msg.contains("cannot run"),
        "{msg}"
    );
}
