//! The CLI side of trust and revocation, end to end with the real binary and daemon (no VMs):
//! `host revoke-cert` with and without a running daemon, `authorize --issuer/--pin`, and what
//! `host trust`, `host info` and `replication server show` print.

mod common;
use common::*;

fn fingerprint(pem: &std::path::Path) -> String {
    vmrepl_transport::pki::describe(&std::fs::read_to_string(pem).unwrap())
        .unwrap()
        .fingerprint_sha256
}

/// `AB12...` as people paste it: `ab:12:...`.
fn with_colons(fp: &str) -> String {
    fp.as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(":")
}

#[test]
fn revocations_and_scoped_entries_are_kept_in_canonical_form_and_shown() {
    let mut a = Host::init("hosta.test", "127.0.0.61");
    let other = Host::init("other.test", "127.0.0.62");
    let issued = a.data().join("issued");
    a.ok(&[
        "host",
        "issue-cert",
        "--name",
        "gone.test",
        "--out",
        issued.to_str().unwrap(),
    ]);
    let gone = issued.join("host.pem");
    let gone_fp = fingerprint(&gone);

    // Without a daemon: written into the state database (the configuration file is the
    // admin's and stays as it is).
    let config_before = std::fs::read(a.data().join("config.toml")).unwrap();
    let out = a.ok(&[
        "host",
        "revoke-cert",
        "--cert",
        gone.to_str().unwrap(),
        "--reason",
        "decommissioned",
    ]);
    assert!(
        out.contains("not running") && out.contains(&gone_fp),
        "{out}"
    );
    let msg = a.fails(&["host", "revoke-cert", "12:34"]);
    assert!(msg.contains("64 hex digits"), "{msg}");

    a.start();
    let other_fp = fingerprint(&other.data().join("tls/host.pem"));
    a.ok(&["host", "revoke-cert", &with_colons(&other_fp)]);

    // `host trust` prints the CA's fingerprint, and a running daemon trusts it at once.
    let other_ca = other.data().join("tls/ca.pem");
    let other_ca_fp = fingerprint(&other_ca);
    let out = a.ok(&["host", "trust", other_ca.to_str().unwrap()]);
    assert!(out.contains(&other_ca_fp), "{out}");
    assert!(out.contains("CA of other.test"), "{out}");

    let own_ca_fp = fingerprint(&a.data().join("tls/ca.pem"));
    let store = a.data().join("replicas");
    a.ok(&["replication", "server", "set", "--enable"]);
    a.ok(&[
        "replication",
        "server",
        "authorize",
        "--primary",
        "p.test",
        "--storage",
        store.to_str().unwrap(),
        "--issuer",
        &with_colons(&own_ca_fp),
        "--pin",
        &gone_fp.to_ascii_lowercase(),
    ]);
    let msg = a.fails(&[
        "replication",
        "server",
        "authorize",
        "--primary",
        "q.test",
        "--storage",
        store.to_str().unwrap(),
        "--pin",
        "nope",
    ]);
    assert!(
        msg.contains("pin") && msg.contains("64 hex digits"),
        "{msg}"
    );

    let show = a.json(&["replication", "server", "show"]);
    let entry = &show["settings"]["entries"][0];
    assert_eq!(entry["issuer"], own_ca_fp.as_str());
    assert_eq!(entry["pin"], gone_fp.as_str());
    let revoked: Vec<&str> = show["revoked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["fingerprint"].as_str().unwrap())
        .collect();
    assert_eq!(revoked, [gone_fp.as_str(), other_fp.as_str()]);
    assert_eq!(show["revoked"][0]["reason"], "decommissioned");

    let info = a.ok(&["host", "info"]);
    for needle in [&own_ca_fp, &other_ca_fp, &gone_fp, &other_fp] {
        assert!(info.contains(needle.as_str()), "{needle} missing:\n{info}");
    }
    let human = a.ok(&["replication", "server", "show"]);
    assert!(
        human.contains(&format!("issuer CA SHA-256 {own_ca_fp}")),
        "{human}"
    );
    assert!(human.contains("decommissioned"), "{human}");
    assert_eq!(
        std::fs::read(a.data().join("config.toml")).unwrap(),
        config_before
    );
}
