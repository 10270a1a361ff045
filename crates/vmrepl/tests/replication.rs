//! End to end: two hosts on loopback addresses replicate a running VM with real QEMU guests,
//! real TLS and real storage.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn a_running_vm_replicates_to_a_second_host_and_the_replica_equals_the_primary_after_shutdown() {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.11", "127.0.0.12", "lab");
    create_guest_vm(&a, "web", "1", &["16M", "8M"], "writeloop:vda+vdb:32:300");
    a.ok(&["vm", "start", "web"]);
    a.wait_console("web", "VMREPL WROTE", Duration::from_secs(120));
    enable_ok(
        &a,
        &b,
        "web",
        "hostb.test",
        &[
            "--frequency",
            "5",
            "--recovery-points",
            "2",
            "--point-interval",
            "10",
        ],
    );
    // Monitor until replicating and healthy, as the article's validation asks.
    a.ok(&["replication", "status", "web", "--watch", "--for", "180"]);
    let s = status(&a, "web");
    assert_eq!(s["state"], "replicating", "{s}");
    assert_eq!(s["health"], "normal", "{s}");
    // Deltas flow while the guest writes.
    let first = acked(&a, "web");
    wait_until("two more cycles", Duration::from_secs(120), || {
        acked(&a, "web") >= first + 2
    });
    // The replica side knows the VM too.
    let rs = b.json(&["replication", "status", "web"]);
    assert_eq!(rs["relationships"][0]["role"], "replica", "{rs}");
    // The replica is not told the primary's frequency, and says so rather than "0 s".
    assert!(rs["relationships"][0]["frequency_secs"].is_null(), "{rs}");
    assert_eq!(status(&a, "web")["frequency_secs"], 5);
    assert!(
        rs["relationships"][0]["last_sequence"].as_u64().unwrap() >= first,
        "{rs}"
    );
    // Stop the workload at a known generation; the next cycle runs with the VM off.
    a.ok(&["vm", "shutdown", "web", "--timeout", "90"]);
    let console = a.console("web");
    let gen_a = last_stopped_gen(&console, "vda");
    let gen_b = last_stopped_gen(&console, "vdb");
    let after_off = acked(&a, "web");
    wait_until("a cycle with the VM off", Duration::from_secs(120), || {
        acked(&a, "web") > after_off
    });
    // The replica's latest point equals the primary's disks.
    let vm = a.json(&["vm", "show", "web"]);
    for (i, (blocks, gen)) in [(32u32, gen_a), (32u32, gen_b)].iter().enumerate() {
        let replica = replica_image(&store, &a, "web", i, "top.qcow2");
        same_content(&disk_path(&a, "web", i), &replica)
            .unwrap_or_else(|e| panic!("replica disk{i} differs from the primary: {e}"));
        verify_image(&replica, *blocks, "--gen", *gen);
    }
    let s = status(&a, "web");
    assert!(s["stats"]["success_count"].as_u64().unwrap() >= 3, "{s}");
    assert_eq!(s["health"], "normal", "{s}");
    // Removing replication ends change tracking: no vmrepl bitmap stays on the disks.
    let bitmaps = |i: usize| -> Vec<String> {
        let p = vm["definition"]["disks"][i]["path"].as_str().unwrap();
        let o = std::process::Command::new("qemu-img")
            .args(["info", "-U", "--output=json", "-f", "qcow2", p])
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        info["format-specific"]["data"]["bitmaps"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|b| b["name"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        bitmaps(0).iter().any(|b| b.starts_with("vmrepl-")),
        "{:?}",
        bitmaps(0)
    );
    a.ok(&["replication", "remove", "web"]);
    for i in 0..2 {
        assert!(bitmaps(i).is_empty(), "disk{i} keeps {:?}", bitmaps(i));
    }
    assert!(a.json(&["replication", "status"])["relationships"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn an_unauthorized_primary_a_disabled_server_and_a_wrong_server_name_are_refused_and_nothing_is_created(
) {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.13", "127.0.0.14", "lab");
    // B authorizes only hosta.test; revoke it to make A unauthorized.
    b.ok(&["replication", "server", "revoke", "--primary", "hosta.test"]);
    a.ok(&["vm", "create", "db", "--generation", "1", "--disk", "8M"]);
    let e = refused(enable(&a, &b, "db", "hostb.test", &[]));
    assert!(
        e.contains("hosta.test") && e.to_lowercase().contains("authoriz"),
        "{e}"
    );
    let created = std::fs::read_dir(&store).map(|d| d.count()).unwrap_or(0);
    assert_eq!(created, 0, "a refused enable created replica files");
    let st = a.json(&["replication", "status"]);
    assert!(st["relationships"].as_array().unwrap().is_empty(), "{st}");
    // A disabled replica server says so.
    b.ok(&["replication", "server", "set", "--disable"]);
    let e = refused(enable(&a, &b, "db", "hostb.test", &[]));
    assert!(e.contains("disabled"), "{e}");
    // A wrong replica name is a certificate name mismatch, named as such.
    let e = refused(enable(&a, &b, "db", "other.test", &[]));
    assert!(e.contains("name mismatch"), "{e}");
    // Bad settings never reach the network.
    let e = refused(enable(&a, &b, "db", "hostb.test", &["--frequency", "2"]));
    assert!(e.contains("30, 300 or 900"), "{e}");
}

#[test]
fn after_qemu_is_killed_replication_requires_a_resync_and_resynchronizing_makes_the_replica_equal_again(
) {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.15", "127.0.0.16", "lab");
    create_guest_vm(&a, "db", "1", &["16M"], "writeloop:vda:64:200");
    a.ok(&["vm", "start", "db"]);
    a.wait_console("db", "VMREPL WROTE", Duration::from_secs(120));
    // Manual: the relationship waits in "resynchronization required" for the operator (the
    // default, automatic, is the next test).
    enable_ok(
        &a,
        &b,
        "db",
        "hostb.test",
        &["--frequency", "5", "--resync", "manual"],
    );
    a.ok(&["replication", "status", "db", "--watch", "--for", "180"]);
    // QEMU dies without saving its bitmaps: tracking can no longer be trusted.
    let pid = a.vm_pid("db").unwrap();
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    a.wait_state("db", "crashed", Duration::from_secs(30));
    wait_until(
        "resynchronization required",
        Duration::from_secs(120),
        || status(&a, "db")["state"] == "resynchronization-required",
    );
    let s = status(&a, "db");
    assert_eq!(s["health"], "critical", "{s}");
    let e = a.fails(&["replication", "resume", "db"]);
    assert!(e.contains("not paused"), "{e}");
    // Meanwhile the replica's disk was changed behind vmrepl's back (say, restored from an
    // old backup): where the primary holds data and where it holds nothing.
    let replica = replica_image(&store, &a, "db", 0, "top.qcow2");
    for cmd in ["write -P 0x77 0 64k", "write -P 0x77 8M 64k"] {
        let o = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg(&replica)
            .args(["-c", cmd])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(same_content(&disk_path(&a, "db", 0), &replica).is_err());
    let before = acked(&a, "db");
    let out = a.ok(&["replication", "resume", "db", "--resynchronize"]);
    assert!(out.contains("Resynchronization"), "{out}");
    wait_until("resynchronized", Duration::from_secs(120), || {
        let s = status(&a, "db");
        s["state"] == "replicating" && s["last_sequence"].as_u64().unwrap() > before
    });
    // The replica's latest state is the primary's disk again, block for block.
    same_content(&disk_path(&a, "db", 0), &replica).unwrap();
    // Tracking works again: the restarted guest's writes go out as deltas.
    let after = acked(&a, "db");
    a.ok(&["vm", "start", "db"]);
    a.wait_console("db", "VMREPL WROTE", Duration::from_secs(120));
    wait_until("a delta after the resync", Duration::from_secs(120), || {
        acked(&a, "db") >= after + 2
    });
    let s = status(&a, "db");
    assert_eq!(s["state"], "replicating", "{s}");
    assert!(s["last_error"].is_null(), "{s}");
}

#[test]
fn after_qemu_is_killed_the_default_policy_resynchronizes_by_itself_and_the_replica_is_equal_again()
{
    let _s = serial();
    let (a, b, store) = pair("127.0.0.31", "127.0.0.32", "lab");
    create_guest_vm(&a, "web", "1", &["16M"], "writeloop:vda:64:200");
    a.ok(&["vm", "start", "web"]);
    a.wait_console("web", "VMREPL WROTE", Duration::from_secs(120));
    enable_ok(&a, &b, "web", "hostb.test", &["--frequency", "5"]);
    a.ok(&["replication", "status", "web", "--watch", "--for", "180"]);
    let s = status(&a, "web");
    assert_eq!(s["resync"]["mode"], "automatic", "{s}");
    // The policy can be changed in place (Set-VMReplication), and a bad one is refused.
    let out = a.ok(&["replication", "set", "web", "--resync", "18:30-06:00"]);
    assert!(out.contains("daily 18:30-06:00 UTC"), "{out}");
    assert_eq!(status(&a, "web")["resync"]["mode"], "window");
    let e = a.fails(&["replication", "set", "web", "--resync", "sometimes"]);
    assert!(e.contains("HH:MM-HH:MM"), "{e}");
    a.ok(&["replication", "set", "web", "--resync", "automatic"]);
    let before = acked(&a, "web");
    let pid = a.vm_pid("web").unwrap();
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    a.wait_state("web", "crashed", Duration::from_secs(30));
    // No operator action from here on. The bitmaps died with QEMU; a cycle already under way
    // may still be acknowledged, so what shows the resynchronization ran is the daemon
    // starting it by itself, and the relationship replicating again after it (it leaves
    // Replicating when it starts one).
    wait_until(
        "replicating again by itself after a resynchronization",
        Duration::from_secs(180),
        || {
            let log = std::fs::read_to_string(a.data().join("daemon.log")).unwrap_or_default();
            let s = status(&a, "web");
            log.contains("resynchronization started by itself")
                && s["state"] == "replicating"
                && s["last_sequence"].as_u64().unwrap() > before
        },
    );
    // The replica's latest state is the primary's disk, block for block.
    let replica = replica_image(&store, &a, "web", 0, "top.qcow2");
    same_content(&disk_path(&a, "web", 0), &replica).unwrap();
    let s = status(&a, "web");
    assert_eq!(s["health"], "normal", "{s}");
}

#[test]
fn a_delta_cut_mid_transfer_is_resumed_by_the_next_cycle_and_nothing_is_lost() {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.17", "127.0.0.18", "lab");
    let target = format!("{}:{}", b.ip, b.port).parse().unwrap();
    let proxy = CuttingProxy::start("127.0.0.19", target);
    a.ok(&["vm", "create", "db", "--generation", "1", "--disk", "64M"]);
    let disk = disk_path(&a, "db", 0);
    let o = enable_via(
        &a,
        &proxy.addr.to_string(),
        "db",
        "hostb.test",
        &["--frequency", "5", "--recovery-points", "0"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_until("the initial copy", Duration::from_secs(60), || {
        acked(&a, "db") >= 1
    });
    let before = status(&a, "db")["stats"]["total_bytes"].as_u64().unwrap();

    // 24 MiB of random data (it does not compress) written while replication is paused.
    a.ok(&["replication", "pause", "db"]);
    qemu_io_random(a.data(), &disk, "8M", 24, 0x9e37_79b9_7f4a_7c15);
    // qemu-io kept the bitmaps (else the edit would be taken for one made behind vmrepl's back).
    a.ok(&["vm", "trust-disks", "db"]);

    // The next cycle's transfer is cut after 8 MiB; the one after resumes it.
    let seq = acked(&a, "db");
    proxy.cut_after(8 << 20);
    a.ok(&["replication", "resume", "db"]);
    wait_until("the cut", Duration::from_secs(60), || proxy.cuts() == 1);
    wait_until(
        "the resumed log acknowledged",
        Duration::from_secs(120),
        || acked(&a, "db") > seq,
    );
    let s = status(&a, "db");
    assert!(
        s["stats"]["network_failure_count"].as_u64().unwrap() >= 1,
        "{s}"
    );
    let resent = s["stats"]["total_bytes"].as_u64().unwrap() - before;
    assert!(
        resent > 0 && resent < 22 << 20,
        "a resumed transfer sends only what the replica lacks, not 24 MiB again: {resent} bytes: {s}"
    );
    let top = replica_image(&store, &a, "db", 0, "top.qcow2");
    same_content(&disk, &top).unwrap();
    assert_eq!(s["health"], "normal", "{s}");
}

/// Unmounts the tmpfs at `0` when dropped, even when the test fails.

#[test]
fn a_full_replica_disk_refuses_the_delta_and_replication_recovers_by_itself_once_there_is_room() {
    let _s = serial();
    let (mut a, mut b, store) = pair("127.0.0.23", "127.0.0.24", "lab");
    // The replica's storage folder is a 160 MiB file system.
    let _fs = Tmpfs::mount(&store, "160M");
    a.ok(&["vm", "create", "db", "--generation", "1", "--disk", "64M"]);
    let disk = disk_path(&a, "db", 0);
    enable_ok(
        &a,
        &b,
        "db",
        "hostb.test",
        &["--frequency", "5", "--recovery-points", "0"],
    );
    wait_until("the initial copy", Duration::from_secs(60), || {
        acked(&a, "db") >= 1
    });
    let seq = acked(&a, "db");
    // Something else fills the replica's file system; 24 MiB of changes then do not fit
    // beside the headroom the replica keeps.
    let filler = store.join("filler");
    std::fs::write(&filler, vec![1u8; 120 << 20]).unwrap();
    // Written while replication is paused, so that no cycle opens the disk meanwhile; qemu-io
    // kept the bitmaps (else the edit would be taken for one made behind vmrepl's back).
    a.ok(&["replication", "pause", "db"]);
    let w = "write -q -P 0x5c 8M 24M";
    let st = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", w])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(st.success());
    a.ok(&["vm", "trust-disks", "db"]);
    a.ok(&["replication", "resume", "db"]);
    wait_until(
        "the replica refusing for lack of room",
        Duration::from_secs(60),
        || {
            let s = status(&a, "db");
            s["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("free") && e.contains("bytes"))
        },
    );
    assert_eq!(acked(&a, "db"), seq, "nothing was acknowledged");
    // One failed cycle is a Warning; the next failure makes it Critical.
    wait_until(
        "two failed cycles: Critical",
        Duration::from_secs(60),
        || status(&a, "db")["health"] == "critical",
    );
    let s = status(&a, "db");
    assert_ne!(s["state"], "resynchronization-required", "{s}");
    // Room is made: the next cycles carry every change, no resynchronization needed.
    std::fs::remove_file(&filler).unwrap();
    wait_until("the changes acknowledged", Duration::from_secs(60), || {
        acked(&a, "db") > seq
    });
    let s = status(&a, "db");
    assert_eq!(s["state"], "replicating", "{s}");
    let top = replica_image(&store, &a, "db", 0, "top.qcow2");
    same_content(&disk, &top).unwrap();
    // Stop the daemons before the file system goes.
    a.stop_daemon();
    b.stop_daemon();
}
