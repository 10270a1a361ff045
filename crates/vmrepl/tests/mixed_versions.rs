//! End to end, mixed versions (I7): an "older" host whose QEMU lacks the newest machine types
//! replicates a VM to a newer host, fails over and fails back; the VM's pinned machine type never
//! changes, and a host that cannot run a VM is named with what it lacks, before anything changes.
//!
//! The older QEMU is the real one behind a thin wrapper that leaves the given machine types out
//! of `-machine help` (what an older QEMU reports), and runs everything else unchanged.

mod common;
use common::*;
use std::time::Duration;

const WORK: &str = "check:vda:64,writeloop:vda:64:300";
const T: Duration = Duration::from_secs(180);

fn machine(h: &Host, vm: &str) -> String {
    h.json(&["vm", "show", vm])["definition"]["machine_type"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_vm_from_an_older_host_fails_over_to_a_newer_one_and_back_and_incapable_hosts_are_named() {
    let _s = serial();
    let tools = tempfile::tempdir().unwrap();
    let q71 = older_qemu(
        tools.path(),
        "qemu-7.1-like",
        &["pc-i440fx-7.2", "pc-q35-7.2"],
        "pc-i440fx-7.1",
    );
    let (mut a, mut b, _) = pair("127.0.0.27", "127.0.0.28", "DEFAULT");
    switch_qemu(&mut a, &q71);
    serve_replicas_for(&a, "hostb.test", &a.data().join("replicas-from-b"));
    let caps = a.json(&["host", "info"]);
    assert!(
        !caps["machine_types"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "pc-i440fx-7.2"),
        "{caps}"
    );

    // A VM of the newer host cannot go to the older one: refused before anything exists.
    b.ok(&["vm", "create", "new", "--generation", "1", "--disk", "8M"]);
    assert_eq!(machine(&b, "new"), "pc-i440fx-7.2");
    let e = refused(enable(&b, &a, "new", "hosta.test", &[]));
    assert!(
        e.contains("pc-i440fx-7.2") && e.contains("Nothing was changed"),
        "{e}"
    );
    assert!(b.json(&["replication", "status"])["relationships"]
        .as_array()
        .unwrap()
        .is_empty());

    // The older host's VM replicates to the newer host, fails over there and comes back.
    create_guest_vm(&a, "old", "1", &["8M"], WORK);
    assert_eq!(machine(&a, "old"), "pc-i440fx-7.1");
    a.ok(&["vm", "start", "old"]);
    a.wait_console("old", "VMREPL WROTE", T);
    enable_ok(&a, &b, "old", "hostb.test", &["--frequency", "5"]);
    a.ok(&["replication", "status", "old", "--watch", "--for", "180"]);
    a.ok(&["vm", "shutdown", "old", "--timeout", "90"]);
    a.ok(&["failover", "prepare", "old"]);
    b.ok(&["failover", "start", "old", "--start"]);
    assert_eq!(machine(&b, "old"), "pc-i440fx-7.1");
    let c = guest_check(&b, "old", "vda");
    assert!(c.pass && c.zero == 0, "{c:?}");
    b.ok(&["replication", "reverse", "old", "--frequency", "5"]);
    b.ok(&["vm", "shutdown", "old", "--timeout", "90"]);
    b.ok(&["failover", "prepare", "old"]);
    a.ok(&["failover", "start", "old", "--start"]);
    assert_eq!(machine(&a, "old"), "pc-i440fx-7.1");
    let c = guest_check(&a, "old", "vda");
    assert!(c.pass && c.zero == 0, "{c:?}");
    a.ok(&["replication", "reverse", "old", "--frequency", "5"]);

    // The replica host's QEMU changes under it: a failover there is refused, naming that
    // host and the machine type, and nothing changes.
    a.ok(&["vm", "shutdown", "old", "--timeout", "90"]);
    a.ok(&["failover", "prepare", "old"]);
    let q70 = older_qemu(
        tools.path(),
        "qemu-7.0-like",
        &["pc-i440fx-7.2", "pc-q35-7.2", "pc-i440fx-7.1", "pc-q35-7.1"],
        "pc-i440fx-7.0",
    );
    switch_qemu(&mut b, &q70);
    let e = b.fails(&["failover", "start", "old"]);
    assert!(
        e.contains("hostb.test")
            && e.contains("pc-i440fx-7.1")
            && e.contains("Nothing was changed"),
        "{e}"
    );
    assert_eq!(status(&b, "old")["role"], "replica");
    assert!(local_vms(&b)
        .iter()
        .all(|v| v["definition"]["name"] != "old"));
    a.ok(&["failover", "cancel", "old"]);
    a.ok(&["vm", "start", "old"]);
}
