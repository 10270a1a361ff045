//! End to end: the set of disks of a replicated VM changes in place (issue 15). A disk added
//! with `vm disk add` is not replicated until `replication set --include-disk` names it (as in
//! Hyper-V); then it gets its own initial copy, only its data, in the next cycle's log beside
//! the other disks' changes, and a failover starts the VM with it. `--exclude-disk` stops a
//! disk: later logs leave it out, the replica drops it and its bitmaps are released. Real
//! daemons, TLS and qemu-storage-daemon (the VM is off).

mod common;
use common::*;
use std::time::Duration;

/// The bytes of the event that says a log carried a disk's own initial copy, if there is one.
fn disk_copy_bytes(a: &Host, vm: &str) -> Option<u64> {
    let events = a.ok(&["events", "--vm", vm]);
    let line = events.lines().find(|l| l.contains("disk-initial-copy"))?;
    let (_, rest) = line.split_once(" (")?;
    rest.split_whitespace().next()?.parse().ok()
}

fn bitmaps(image: &std::path::Path) -> String {
    let o = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(image)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["format-specific"]["data"]["bitmaps"].to_string()
}

#[test]
fn a_disk_added_and_included_gets_its_own_initial_copy_and_fails_over_with_the_vm() {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.211", "127.0.0.212", "disks");
    create_small_vm(&a, "dk");
    enable_ok(&a, &b, "dk", "hostb.test", &["--frequency", "5"]);
    wait_until("the initial copy", Duration::from_secs(60), || {
        acked(&a, "dk") >= 1
    });
    let uuid = a.json(&["vm", "show", "dk"])["definition"]["uuid"]
        .as_str()
        .unwrap()
        .to_string();

    // A running VM is refused, with the fix.
    a.ok(&["vm", "start", "dk"]);
    let e = a.fails(&["vm", "disk", "add", "dk", "16M"]);
    assert!(e.contains("shut it down or stop it first"), "{e}");
    a.ok(&["vm", "stop", "dk"]);

    // Added: the next free id, not replicated until included; status says so and how.
    let out = a.ok(&["vm", "disk", "add", "dk", "16M"]);
    assert!(
        out.contains("Disk disk1") && out.contains("--include-disk disk1"),
        "{out}"
    );
    let disk1 = disk_path(&a, "dk", 1);
    assert!(disk1.ends_with("disk1.qcow2"), "{}", disk1.display());
    let s = status(&a, "dk");
    let w = s["warnings"].to_string();
    assert!(
        w.contains("disk1") && w.contains("--include-disk disk1"),
        "{s}"
    );
    qemu_io_random(a.data(), &disk1, "1M", 4, 0x2545_f491_4f6c_dd1d);
    a.ok(&["vm", "trust-disks", "dk"]);
    let seq = acked(&a, "dk");
    wait_until(
        "a cycle without the new disk",
        Duration::from_secs(30),
        || acked(&a, "dk") > seq,
    );
    assert!(!store.join(&uuid).join("disks/disk1").exists());

    // Included: the next log carries its initial copy (4 MiB of data, zeros not sent) with
    // disk0's changes; no other disk is copied again.
    let out = a.ok(&["replication", "set", "dk", "--include-disk", "disk1"]);
    assert!(
        out.contains("disk disk1 replicated from the next cycle"),
        "{out}"
    );
    wait_until(
        "the new disk's initial copy",
        Duration::from_secs(60),
        || disk_copy_bytes(&a, "dk").is_some(),
    );
    let bytes = disk_copy_bytes(&a, "dk").unwrap();
    assert!(
        (4 << 20..(4 << 20) + (1 << 20)).contains(&bytes),
        "the log carrying disk1's copy sent {bytes} bytes, for 4 MiB of data in it"
    );
    let events = a.ok(&["events", "--vm", "dk"]);
    assert_eq!(
        events.matches("initial-replication-started").count(),
        1,
        "{events}"
    );
    let s = status(&a, "dk");
    assert_eq!(s["state"], "replicating", "{s}");
    assert!(s["warnings"].is_null(), "{s}");
    let seq = acked(&a, "dk");
    wait_until("one more cycle", Duration::from_secs(30), || {
        acked(&a, "dk") > seq
    });
    let top = replica_image(&store, &a, "dk", 1, "top.qcow2");
    same_content(&disk1, &top).unwrap();
    same_content(
        &disk_path(&a, "dk", 0),
        &replica_image(&store, &a, "dk", 0, "top.qcow2"),
    )
    .unwrap();

    // A test failover starts the VM with both disks.
    b.ok(&["failover", "test", "dk"]);
    let t = b.json(&["vm", "show", "dk - Test"])["definition"]["disks"].clone();
    assert_eq!(t.as_array().map(Vec::len), Some(2), "{t}");
    b.ok(&["vm", "start", "dk - Test"]);
    b.wait_state("dk - Test", "running", Duration::from_secs(30));
    let pid = b.vm_pid("dk - Test").unwrap();
    let cmd = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
        .replace('\0', " ");
    assert!(
        cmd.contains("disk0.qcow2") && cmd.contains("disk1.qcow2"),
        "{cmd}"
    );
    same_content(
        &disk1,
        &std::path::PathBuf::from(t[1]["path"].as_str().unwrap()),
    )
    .unwrap();
    b.ok(&["failover", "stop-test", "dk"]);

    // Excluded: the replica drops it, later logs leave it out, its bitmaps are released.
    let out = a.ok(&["replication", "set", "dk", "--exclude-disk", "disk1"]);
    assert!(out.contains("disk disk1 no longer replicated"), "{out}");
    assert_eq!(bitmaps(&disk1), "null", "the bitmaps of disk1 are released");
    assert!(bitmaps(&disk_path(&a, "dk", 0)).contains("vmrepl"));
    let seq = acked(&a, "dk");
    wait_until("a cycle without disk1", Duration::from_secs(30), || {
        acked(&a, "dk") > seq && !store.join(&uuid).join("disks/disk1").exists()
    });
    qemu_io_random(a.data(), &disk1, "1M", 1, 7);
    a.ok(&["vm", "trust-disks", "dk"]);
    let seq = acked(&a, "dk");
    wait_until("another cycle", Duration::from_secs(30), || {
        acked(&a, "dk") > seq
    });
    assert!(!store.join(&uuid).join("disks/disk1").exists());
    let s = status(&a, "dk");
    assert_eq!(s["state"], "replicating", "{s}");
    let e = a.fails(&["replication", "set", "dk", "--exclude-disk", "disk0"]);
    assert!(e.contains("no disk"), "{e}");
}

#[test]
fn a_vm_with_a_disk_added_and_included_fails_over_planned_and_reverses_without_a_full_copy() {
    let _s = serial();
    let (a, b, _store_b) = pair("127.0.0.213", "127.0.0.214", "disks");
    // A is B's replica server too, for the reverse replication.
    serve_replicas_for(&a, "hostb.test", &a.data().join("replicas-from-b"));
    create_small_vm(&a, "rv");
    qemu_io_random(a.data(), &disk_path(&a, "rv", 0), "1M", 8, 11);
    a.ok(&["vm", "trust-disks", "rv"]);
    enable_ok(&a, &b, "rv", "hostb.test", &["--frequency", "5"]);
    wait_until("the initial copy", Duration::from_secs(60), || {
        acked(&a, "rv") >= 1
    });
    a.ok(&["vm", "disk", "add", "rv", "16M"]);
    let disk1 = disk_path(&a, "rv", 1);
    qemu_io_random(a.data(), &disk1, "1M", 4, 23);
    a.ok(&["vm", "trust-disks", "rv"]);
    a.ok(&["replication", "set", "rv", "--include-disk", "disk1"]);
    wait_until(
        "the new disk's initial copy",
        Duration::from_secs(60),
        || disk_copy_bytes(&a, "rv").is_some(),
    );

    // Planned failover (the VM is off): B runs it with both disks, equal to A's.
    a.ok(&["failover", "prepare", "rv"]);
    let final_seq = status(&a, "rv")["last_sequence"].as_u64().unwrap();
    let out = b.ok(&["failover", "start", "rv"]);
    assert!(out.contains("no data lost"), "{out}");
    let def_b = b.json(&["vm", "show", "rv"])["definition"]["disks"].clone();
    assert_eq!(def_b.as_array().map(Vec::len), Some(2), "{def_b}");
    for i in 0..2 {
        same_content(&disk_path(&a, "rv", i), &disk_path(&b, "rv", i)).unwrap();
    }

    // Reverse: A's disks, both of them, are the common base; only changes go back.
    let out = b.ok(&["replication", "reverse", "rv", "--frequency", "5"]);
    assert!(out.contains("only the changes"), "{out}");
    qemu_io_random(b.data(), &disk_path(&b, "rv", 1), "1M", 1, 31);
    b.ok(&["vm", "trust-disks", "rv"]);
    wait_until(
        "a reverse cycle with the change",
        Duration::from_secs(60),
        || status(&b, "rv")["last_sequence"].as_u64().unwrap_or(0) > final_seq + 1,
    );
    let s = status(&b, "rv");
    assert_eq!(s["state"], "replicating", "{s}");
    let back = s["stats"]["total_bytes"].as_u64().unwrap();
    assert!(
        back < 4 << 20,
        "reverse replication sent {back} bytes: more than the 1 MiB changed, a full copy is 12 MiB"
    );
    let events = b.ok(&["events", "--vm", "rv"]);
    assert!(!events.contains("initial-replication-started"), "{events}");
}
