//! End to end: many VMs between the same two hosts, replicating at once and in both
//! directions. Verbs take several VMs; `vm list` shows the replica VMs with their role; a
//! replica VM whose name is taken on its host gets a suffix; commands take a VM's UUID; a
//! replica can be removed on the replica server. Real daemons, TLS and qemu-storage-daemon.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

/// `vm list` of `h` as (name, role) pairs.
fn roles(h: &Host) -> Vec<(String, String)> {
    h.json(&["vm", "list"])["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["definition"]["name"].as_str().unwrap().to_string(),
                v["replication"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect()
}

fn role_of(h: &Host, name: &str) -> String {
    roles(h)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, r)| r)
        .unwrap_or_else(|| panic!("{name} not in the VM list of {}: {:?}", h.name, roles(h)))
}

fn uuid_of(h: &Host, vm: &str) -> String {
    h.json(&["vm", "show", vm])["definition"]["uuid"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn three_vms_replicate_at_once_two_of_them_in_opposite_directions_between_the_same_hosts() {
    let _s = serial();
    let (a, b, _b_store) = pair("127.0.0.197", "127.0.0.198", "many");
    // a is also the replica server of b.
    a.ok(&["replication", "server", "set", "--enable"]);
    authorize(&a, "hostb.test", &a.data().join("replicas-from-b"), "many");
    create_small_vm(&a, "web");
    create_small_vm(&a, "db");
    create_small_vm(&b, "web");

    // One command enables two VMs.
    let out = a.ok(&[
        "replication",
        "enable",
        "web",
        "db",
        "--replica-server",
        &format!("{}:{}", b.ip, b.port),
        "--replica-name",
        "hostb.test",
        "--frequency",
        "5",
    ]);
    assert_eq!(out.matches("enabled").count(), 2, "{out}");
    let out = b.ok(&[
        "replication",
        "enable",
        "web",
        "--replica-server",
        &format!("{}:{}", a.ip, a.port),
        "--replica-name",
        "hosta.test",
        "--frequency",
        "5",
    ]);
    assert!(out.contains("enabled"), "{out}");
    for (h, vm) in [(&a, "web"), (&a, "db"), (&b, "web")] {
        wait_until(&format!("{vm} of {} replicating", h.name), T, || {
            status(h, vm)["last_sequence"].as_u64().unwrap_or(0) >= 2
        });
    }

    // Each host lists its own VMs and the replicas it keeps, with their roles; the replica of
    // b's "web" on a, where "web" is taken, is "web-2" (and so is a's "web" on b).
    assert!(role_of(&a, "web").starts_with("primary"), "{:?}", roles(&a));
    assert!(role_of(&a, "db").starts_with("primary"));
    let r = role_of(&a, "web-2");
    assert!(r.starts_with("replica of web on hostb.test"), "{r}");
    assert!(role_of(&b, "web").starts_with("primary"));
    assert!(role_of(&b, "db").starts_with("replica of db on hosta.test"));
    assert!(role_of(&b, "web-2").starts_with("replica of web on hosta.test"));
    // `replication status` of all: two primaries and one replica on a.
    let all = a.json(&["replication", "status"])["relationships"].clone();
    let mut kinds: Vec<String> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["vm"].as_str().unwrap(),
                r["role"].as_str().unwrap()
            )
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["db primary", "web primary", "web-2 replica"],
        "{all}"
    );

    // Commands take a VM's UUID; verbs take several VMs.
    let db = uuid_of(&a, "db");
    assert_eq!(status(&a, &db)["vm"], "db");
    let out = a.ok(&["replication", "pause", &db, "web"]);
    assert_eq!(out.matches("paused").count(), 2, "{out}");
    assert_eq!(status(&a, "web")["state"], "suspended");
    let out = a.ok(&["replication", "resume", "web", &db]);
    assert_eq!(out.matches("resumed").count(), 2, "{out}");
    // A name that is not there fails that one, not the others, and the exit code says so.
    let o = a.run(&["replication", "pause", "nosuch", "web"]);
    assert!(!o.status.success());
    assert_eq!(status(&a, "web")["state"], "suspended");
    a.ok(&["replication", "resume", "web"]);

    // The replica server removes the replica of db on its side; its data stays, and the VM
    // list no longer shows it.
    let out = b.ok(&["replication", "remove", "db"]);
    assert!(
        out.contains("removed on this host") && out.contains("kept"),
        "{out}"
    );
    assert!(!roles(&b).iter().any(|(n, _)| n == "db"), "{:?}", roles(&b));
    // The other two still replicate.
    for (h, vm) in [(&a, "web"), (&b, "web")] {
        let seq = status(h, vm)["last_sequence"].as_u64().unwrap();
        wait_until(&format!("{vm} of {} still replicating", h.name), T, || {
            status(h, vm)["last_sequence"].as_u64().unwrap_or(0) > seq
        });
    }
    // The primary of db removes it on its side too.
    let out = a.ok(&["replication", "remove", "db"]);
    assert!(out.contains("removed"), "{out}");
    assert_eq!(role_of(&a, "db"), "-");
}

#[test]
fn a_primary_listening_on_a_wildcard_address_must_advertise_where_it_is_reached() {
    let _s = serial();
    let (mut a, b, _store) = pair("127.0.0.199", "127.0.0.200", "many");
    // a listens on every address of the machine: the replica server cannot dial 0.0.0.0.
    a.stop_daemon();
    let cfg = a.data().join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let port = free_port("0.0.0.0");
    let text = text.replace(
        &format!("listen = \"127.0.0.199:{}\"", a.port),
        &format!("listen = \"0.0.0.0:{port}\""),
    );
    assert!(text.contains("0.0.0.0"), "{text}");
    std::fs::write(&cfg, &text).unwrap();
    a.port = port;
    a.start();
    create_small_vm(&a, "app");
    let e = refused(enable(&a, &b, "app", "hostb.test", &[]));
    assert!(
        e.contains("0.0.0.0") && e.contains("advertise") && e.contains("Nothing was changed"),
        "{e}"
    );
    assert!(a.run(&["replication", "status", "app"]).status.code() != Some(0));
    // The admin says where a is reached (a name resolved by DNS would do as well).
    a.stop_daemon();
    std::fs::write(&cfg, format!("advertise = \"127.0.0.199:{port}\"\n{text}")).unwrap();
    a.start();
    enable_ok(&a, &b, "app", "hostb.test", &["--frequency", "5"]);
    wait_until("the initial copy", T, || acked(&a, "app") >= 1);
    // The replica server reaches the primary back where it said.
    let findings = b.json(&["doctor", "app"]);
    let text = findings.to_string();
    assert!(
        text.contains(&format!("TCP port {port} of 127.0.0.199 answers")),
        "the replica server does not dial the advertised address: {findings}"
    );
}
