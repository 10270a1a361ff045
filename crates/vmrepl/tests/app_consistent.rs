//! End to end: app-consistent recovery points through the QEMU guest agent. The test guest's
//! freeze hook quiesces its writer, so a point taken while the guest is frozen holds exactly
//! one generation on every block of both disks; a guest without an agent gets a
//! crash-consistent point instead, and the failure is counted.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(180);

/// The app-consistent recovery points the replica keeps, oldest first.
fn app_points(b: &Host, vm: &str) -> Vec<u64> {
    b.json(&["replication", "points", vm])["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["latest"] == false && p["consistency"] == "app-consistent")
        .map(|p| p["seq"].as_u64().unwrap())
        .collect()
}

/// The generations the guest's freeze hook reported, in order.
fn frozen_gens(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("VMREPL FROZEN gen="))
        .map(|g| g.trim().parse().expect("one writer, one generation"))
        .collect()
}

#[test]
fn an_app_consistent_point_is_taken_with_the_guest_frozen_and_holds_one_generation_on_every_disk() {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.45", "127.0.0.46", "lab");
    // The writer goes without pause: a crash-consistent point almost always catches it between
    // disks or in the middle of one.
    create_guest_vm(&a, "erp", "1", &["16M", "16M"], "writeloop:vda+vdb:64:0");
    a.ok(&["vm", "start", "erp"]);
    a.wait_console("erp", "VMREPL QGA started", T);
    a.wait_console("erp", "VMREPL WROTE", T);
    enable_ok(
        &a,
        &b,
        "erp",
        "hostb.test",
        &[
            "--frequency",
            "5",
            "--recovery-points",
            "2",
            "--point-interval",
            "3600",
            "--app-consistent-hours",
            "12",
        ],
    );
    // The schedule takes the first app-consistent point right after initial replication.
    wait_until("a scheduled app-consistent point", T, || {
        !app_points(&b, "erp").is_empty()
    });
    // And one more on demand.
    let msg = a.ok(&["replication", "now", "erp", "--app-consistent"]);
    assert!(msg.contains("app-consistent point"), "{msg}");
    wait_until("two app-consistent points", T, || {
        app_points(&b, "erp").len() >= 2
    });
    let points = app_points(&b, "erp");
    let gens = frozen_gens(&a.console("erp"));
    assert_eq!(gens.len(), 2, "two freezes, two points: {gens:?}");
    assert!(a.console("erp").matches("VMREPL THAWED").count() >= 2);
    for (seq, gen) in points.iter().zip(&gens) {
        for disk in 0..2 {
            let layer = replica_image(&store, &a, "erp", disk, &format!("rp-{seq}.qcow2"));
            let out = verify_image(&layer, 64, "--gen", *gen);
            assert!(out.contains("result=pass"), "{out}");
        }
    }
    let s = status(&a, "erp");
    assert_eq!(s["stats"]["app_consistent_failure_count"], 0, "{s}");
    assert_eq!(s["app_consistent_hours"], 12, "{s}");
    // The guest was thawed each time: it goes on writing.
    let before = a.console("erp").matches("VMREPL WROTE").count();
    wait_until("writes after the thaw", T, || {
        a.console("erp").matches("VMREPL WROTE").count() > before + 4
    });
    a.ok(&["vm", "stop", "erp"]);
}

#[test]
fn a_guest_without_an_agent_gets_a_crash_consistent_point_and_the_failure_is_counted() {
    let _s = serial();
    let (a, b, _store) = pair("127.0.0.47", "127.0.0.48", "lab");
    create_guest_vm(
        &a,
        "legacy",
        "1",
        &["8M"],
        "writeloop:vda:16:200 vmrepl.qga=0",
    );
    a.ok(&["vm", "start", "legacy"]);
    a.wait_console("legacy", "VMREPL QGA off", T);
    enable_ok(
        &a,
        &b,
        "legacy",
        "hostb.test",
        &["--frequency", "30", "--recovery-points", "1"],
    );
    wait_until("replicating", T, || {
        status(&a, "legacy")["state"] == "replicating"
    });
    // Between cycles the guest's writes are pending, as QEMU's recording bitmap counts them.
    wait_until("pending bytes counted", T, || {
        a.json(&["replication", "measure", "legacy"])["relationships"][0]["stats"]["pending_bytes"]
            .as_u64()
            .unwrap_or(0)
            > 0
    });
    let msg = a.ok(&["replication", "now", "legacy", "--app-consistent"]);
    assert!(msg.contains("could not be frozen"), "{msg}");
    assert!(msg.contains("crash-consistent"), "{msg}");
    assert!(msg.contains("guest agent"), "{msg}");
    let s = status(&a, "legacy");
    assert_eq!(s["stats"]["app_consistent_failure_count"], 1, "{s}");
    assert_eq!(
        s["stats"]["failure_count"], 0,
        "the cycle itself succeeded: {s}"
    );
    assert!(app_points(&b, "legacy").is_empty());
    // A VM that is off has nothing to freeze: its point is crash-consistent, and not a failure.
    a.ok(&["vm", "stop", "legacy"]);
    a.wait_state("legacy", "off", T);
    let msg = a.ok(&["replication", "now", "legacy", "--app-consistent"]);
    assert!(msg.contains("the VM is off"), "{msg}");
    assert_eq!(
        status(&a, "legacy")["stats"]["app_consistent_failure_count"],
        1
    );
    // Replicating now is refused while paused, saying why.
    a.ok(&["replication", "pause", "legacy"]);
    let e = a.fails(&["replication", "now", "legacy"]);
    assert!(e.contains("Suspended"), "{e}");
}
