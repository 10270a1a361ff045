//! The configuration file is the admin's, end to end with the real binary and daemon (no VMs):
//! the daemon never writes it (comments survive), the settings commands change live in the
//! state database and survive a restart, and a host whose file still holds them (an older
//! release's) has them imported once, after which edits of those sections are ignored with a
//! warning naming the command to use.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;

fn fingerprints(show: &Value) -> Vec<String> {
    show["revoked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["fingerprint"].as_str().unwrap().to_string())
        .collect()
}

fn imports(h: &Host) -> usize {
    h.json(&["events"])["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["message"].as_str().unwrap_or("").starts_with("imported "))
        .count()
}

/// The admin's copy of what `host init` wrote: comments above, beside and below the keys.
fn with_comments(text: &str) -> String {
    let mut out = String::from("# vmrepl on this host: ask the storage team before changing\n\n");
    for line in text.lines() {
        out.push_str(line);
        if line.starts_with("listen") {
            out.push_str("   # the replication network");
        }
        out.push('\n');
    }
    out.push_str("\n# resync_range_mib = 64   (tried, kept the default)\n");
    out
}

#[test]
fn the_admins_config_file_is_never_rewritten_and_settings_changed_by_commands_survive_a_restart() {
    let etc = tempfile::tempdir().unwrap();
    let file = etc.path().join("vmrepl.toml");
    let file_s = file.to_str().unwrap();
    let mut h = Host::init_with("hostc.test", "127.0.0.181", &["--config", file_s]);
    assert!(
        !h.data().join("config.toml").exists(),
        "written where --config says"
    );
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(
        !written.contains("replica_server") && !written.contains("revoked_certs"),
        "{written}"
    );
    let admins = with_comments(&written);
    std::fs::write(&file, &admins).unwrap();

    // The daemon finds the file through VMREPL_CONFIG; the commands below only talk to it, so
    // they need neither.
    let env = [("VMREPL_CONFIG", file_s)];
    h.start_with(&[], &env);
    let store = h.data().join("replicas-from-a");
    h.ok(&["replication", "server", "set", "--enable"]);
    h.ok(&[
        "replication",
        "server",
        "authorize",
        "--primary",
        "hosta.test",
        "--storage",
        store.to_str().unwrap(),
        "--trust-group",
        "lab",
    ]);
    let (gone, kept) = ("AB".repeat(32), "CD".repeat(32));
    h.ok(&["host", "revoke-cert", &gone, "--reason", "decommissioned"]);
    h.ok(&["host", "revoke-cert", &kept]);
    h.ok(&["host", "unrevoke-cert", &gone.to_ascii_lowercase()]);
    let e = h.fails(&["host", "unrevoke-cert", &gone]);
    assert!(e.contains("not revoked"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), admins);

    let check = |h: &Host| {
        let show = h.json(&["replication", "server", "show"]);
        let s = &show["settings"];
        assert_eq!(s["enabled"], true, "{show}");
        assert_eq!(s["entries"][0]["primary"], "hosta.test", "{show}");
        assert_eq!(s["entries"][0]["trust_group"], "lab", "{show}");
        assert_eq!(
            s["default_storage"],
            h.data().join("replica").to_str().unwrap(),
            "a new host's default, as `host init` gave before"
        );
        assert_eq!(fingerprints(&show), [kept.as_str()], "{show}");
    };
    check(&h);

    // In the database: the same after a restart, and the file is still the admin's, byte for
    // byte. A new host's defaults are not an import.
    h.stop_daemon();
    h.start_with(&[], &env);
    check(&h);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), admins);
    assert_eq!(imports(&h), 0);

    // Without the daemon, revoke-cert goes to the database too (it needs the file only to
    // import from it, which is done already).
    h.stop_daemon();
    h.ok(&["host", "revoke-cert", &gone]);
    h.start_with(&[], &env);
    let show = h.json(&["replication", "server", "show"]);
    assert_eq!(
        fingerprints(&show),
        [kept.as_str(), gone.as_str()],
        "{show}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), admins);
    // A host init may not take the admin's file over.
    let other = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(bin())
        .arg("--data")
        .arg(other.path().join("d"))
        .args(["--config", file_s])
        .args(["host", "init", "--name", "hostx.test", "--listen"])
        .arg("127.0.0.181:1")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("exists already"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), admins);
}

/// A `[replica_server]` table and a revocation as releases before the database kept them.
fn old_style(store: &Path, revoked: &str) -> String {
    format!(
        "\n# replica server, as vmrepl used to write it here\n\
         [replica_server]\nenabled = true\nallow_any = false\nallow_remote_delete = true\n\n\
         [[replica_server.entries]]\nprimary = \"hosta.test\"\nstorage = {:?}\n\
         trust_group = \"old\"\n\n\
         [[revoked_certs]]\nfingerprint = \"{revoked}\"\nreason = \"lost laptop\"\n",
        store.to_str().unwrap()
    )
}

#[test]
fn a_host_whose_file_holds_the_old_sections_has_them_imported_once_then_the_database_wins() {
    let mut h = Host::init("hostd.test", "127.0.0.182");
    let cfg = h.data().join("config.toml");
    let store = h.data().join("replicas-from-a");
    let revoked = "EF".repeat(32);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&old_style(&store, &revoked));
    std::fs::write(&cfg, &text).unwrap();

    h.start();
    let show = h.json(&["replication", "server", "show"]);
    let s = &show["settings"];
    assert_eq!(s["enabled"], true, "{show}");
    assert_eq!(s["allow_remote_delete"], true, "{show}");
    assert_eq!(s["entries"][0]["trust_group"], "old", "{show}");
    assert_eq!(s["default_storage"], Value::Null, "as the file had it");
    assert_eq!(fingerprints(&show), [revoked.as_str()]);
    assert_eq!(show["revoked"][0]["reason"], "lost laptop");
    assert_eq!(imports(&h), 1, "the import is journaled");
    assert!(
        std::fs::read_to_string(h.data().join("daemon.log"))
            .unwrap()
            .contains("imported [replica_server] and 1 [[revoked_certs]]"),
        "{}",
        h.log_tail()
    );

    // Changed by commands: the database's from now on; the file keeps its old sections.
    h.ok(&["replication", "server", "revoke", "--primary", "hosta.test"]);
    h.ok(&["replication", "server", "set", "--disable"]);
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), text);
    h.stop_daemon();
    h.start();
    let show = h.json(&["replication", "server", "show"]);
    assert_eq!(show["settings"]["enabled"], false, "{show}");
    assert!(show["settings"]["entries"].as_array().unwrap().is_empty());
    assert_eq!(fingerprints(&show), [revoked.as_str()]);
    assert_eq!(imports(&h), 1, "imported once only");
    // The file's sections now differ from what is in force: ignored, and the log says which
    // command to use instead.
    let log = std::fs::read_to_string(h.data().join("daemon.log")).unwrap();
    assert!(
        log.contains("[replica_server] section that differs")
            && log.contains("vmrepl replication server set"),
        "{}",
        h.log_tail()
    );
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), text);
}
