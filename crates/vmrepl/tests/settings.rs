//! End to end: `replication set` (Set-VMReplication) changes a relationship in place: the
//! frequency, the recovery points the replica keeps, compression and a bandwidth limit take
//! effect from the next cycle without a new initial copy; a new replica server moves the
//! replica there with a new initial copy. Real daemons, TLS and qemu-storage-daemon.

mod common;
use common::*;
use std::time::Duration;

/// Writes `mib` MiB of incompressible data at 8 MiB into disk 0 of the stopped VM `vm` with
/// qemu-io, while replication is paused, and tells vmrepl the bitmaps were kept.
fn write_random(a: &Host, vm: &str, mib: usize) {
    let disk = disk_path(a, vm, 0);
    qemu_io_random(a.data(), &disk, "8M", mib, 0x2545_f491_4f6c_dd1d);
    a.ok(&["vm", "trust-disks", vm]);
}

/// Pauses `vm`, writes 3 MiB of incompressible data, resumes, and returns how long the cycle
/// that carried it took (the slowest since a statistics reset), once the replica (in `store`)
/// equals the primary.
fn paced_cycle_secs(a: &Host, store: &std::path::Path, vm: &str) -> f64 {
    a.ok(&["replication", "pause", vm]);
    write_random(a, vm, 3);
    let seq = acked(a, vm);
    a.ok(&["replication", "measure", vm, "--reset"]);
    a.ok(&["replication", "resume", vm]);
    wait_until("the paced cycle", Duration::from_secs(60), || {
        acked(a, vm) > seq
    });
    let m = a.json(&["replication", "measure", vm])["relationships"][0]["stats"].clone();
    let top = replica_image(store, a, vm, 0, "top.qcow2");
    same_content(&disk_path(a, vm, 0), &top).unwrap();
    m["max_latency_secs"].as_f64().unwrap()
}

fn frozen_points(b: &Host, vm: &str) -> usize {
    b.json(&["replication", "points", vm])["points"]
        .as_array()
        .map(|p| p.iter().filter(|p| p["latest"] == false).count())
        .unwrap_or(0)
}

#[test]
fn replication_set_changes_frequency_points_compression_and_bandwidth_in_place() {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.191", "127.0.0.192", "set");
    create_small_vm(&a, "db");
    enable_ok(&a, &b, "db", "hostb.test", &["--frequency", "300"]);
    wait_until("the initial copy", Duration::from_secs(60), || {
        acked(&a, "db") >= 1
    });
    let initial_bytes = status(&a, "db")["stats"]["total_bytes"].as_u64().unwrap();

    let out = a.ok(&[
        "replication",
        "set",
        "db",
        "--frequency",
        "5",
        "--recovery-points",
        "2",
        "--point-interval",
        "5",
        "--compression",
        "off",
        "--bandwidth",
        "1M",
    ]);
    for said in [
        "frequency 5 s",
        "2 additional recovery points",
        "compression off",
        "bandwidth 1024 KiB/s",
        "without a new initial copy",
    ] {
        assert!(out.contains(said), "{said:?} not in {out}");
    }
    let s = status(&a, "db");
    assert_eq!(s["frequency_secs"], 5, "{s}");
    assert_eq!(s["compression"], false, "{s}");
    assert_eq!(s["bandwidth_limit"], 1 << 20, "{s}");
    // The replica was told its new policy at once.
    let r = status(&b, "db");
    assert_eq!(r["recovery_points"], 2, "{r}");
    assert_eq!(r["recovery_point_interval_secs"], 5, "{r}");

    // Cycles now come every 5 s (at 300 s none would in this time), and the replica keeps
    // points.
    let seq = acked(&a, "db");
    wait_until(
        "two cycles at the new frequency",
        Duration::from_secs(60),
        || acked(&a, "db") >= seq + 2,
    );
    wait_until(
        "recovery points on the replica",
        Duration::from_secs(60),
        || frozen_points(&b, "db") >= 2,
    );

    // 3 MiB of incompressible data under a limit of 1 MiB/s: its cycle takes 3 s at least.
    let slowest = paced_cycle_secs(&a, &store, "db");
    assert!(slowest >= 2.8, "3 MiB at 1 MiB/s went out in {slowest} s");

    let out = a.ok(&[
        "replication",
        "set",
        "db",
        "--bandwidth",
        "0",
        "--compression",
        "on",
    ]);
    assert!(out.contains("bandwidth no limit"), "{out}");
    assert!(status(&a, "db")["bandwidth_limit"].is_null());
    let out = a.ok(&["replication", "set", "db", "--frequency", "5"]);
    assert!(out.contains("Nothing to change"), "{out}");
    // Refusals name the setting and what to give; nothing changes.
    let e = a.fails(&["replication", "set", "db", "--frequency", "2"]);
    assert!(e.contains("out of range") && e.contains("300"), "{e}");
    let e = a.fails(&[
        "replication",
        "set",
        "db",
        "--recovery-points",
        "0",
        "--app-consistent-hours",
        "3",
    ]);
    assert!(e.contains("recovery point"), "{e}");
    let e = a.fails(&["replication", "set", "db", "--bandwidth", "fast"]);
    assert!(e.contains("50M"), "{e}");
    assert_eq!(status(&a, "db")["frequency_secs"], 5);
    // No initial copy again: one initial replication in the journal, every cycle since a
    // delta.
    let s = status(&a, "db");
    assert_eq!(s["state"], "replicating", "{s}");
    let events = a.ok(&["events", "--vm", "db"]);
    assert_eq!(
        events.matches("initial-replication-started").count(),
        1,
        "{events}"
    );
    assert!(
        s["stats"]["total_bytes"].as_u64().unwrap() < initial_bytes + (8 << 20),
        "{s}"
    );
}

#[test]
fn replication_set_to_another_replica_server_moves_the_replica_there_with_a_new_initial_copy() {
    let _s = serial();
    let (a, b, b_store) = pair("127.0.0.193", "127.0.0.194", "set");
    let mut c = Host::init("hostc.test", "127.0.0.195");
    a.ok(&[
        "host",
        "trust",
        c.data().join("tls/ca.pem").to_str().unwrap(),
    ]);
    c.ok(&[
        "host",
        "trust",
        a.data().join("tls/ca.pem").to_str().unwrap(),
    ]);
    c.start();
    c.ok(&["replication", "server", "set", "--enable"]);
    let c_store = c.data().join("replicas-from-a");
    authorize(&c, "hosta.test", &c_store, "set");
    create_small_vm(&a, "db");
    enable_ok(&a, &b, "db", "hostb.test", &["--frequency", "5"]);
    wait_until("the initial copy to b", Duration::from_secs(60), || {
        acked(&a, "db") >= 1
    });

    // A server that cannot take it: refused before anything changes.
    let e = a.fails(&[
        "replication",
        "set",
        "db",
        "--replica-server",
        &format!("127.0.0.196:{}", free_port("127.0.0.196")),
        "--replica-name",
        "nobody.test",
    ]);
    assert!(e.contains("Nothing was changed"), "{e}");
    assert!(status(&a, "db")["replica_host"]
        .as_str()
        .unwrap()
        .contains("hostb.test"));

    let out = a.ok(&[
        "replication",
        "set",
        "db",
        "--replica-server",
        &format!("{}:{}", c.ip, c.port),
        "--replica-name",
        "hostc.test",
    ]);
    assert!(out.contains("new initial copy"), "{out}");
    assert!(
        out.contains("kept"),
        "the old replica keeps its data: {out}"
    );
    wait_until("the initial copy to c", Duration::from_secs(60), || {
        let s = status(&a, "db");
        s["replica_host"]
            .as_str()
            .unwrap_or("")
            .contains("hostc.test")
            && s["last_sequence"].as_u64().unwrap_or(0) >= 1
    });
    let s = status(&a, "db");
    assert_eq!(s["frequency_secs"], 5, "the other settings stay: {s}");
    let top = replica_image(&c_store, &a, "db", 0, "top.qcow2");
    wait_until("the replica on c equal", Duration::from_secs(60), || {
        same_content(&disk_path(&a, "db", 0), &top).is_ok()
    });
    // The old replica was told, and its data is still there.
    let uuid = a.json(&["vm", "show", "db"])["definition"]["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(b_store.join(&uuid).exists());
    let r = b.json(&["replication", "status"]);
    let left: Vec<_> = r["relationships"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["vm_uuid"] == uuid.as_str() && x["state"] != "removed")
        .collect();
    assert!(left.is_empty(), "b still replicates it: {r}");
}

#[test]
fn vm_set_reaches_the_replica_with_the_next_cycle_and_a_failover_starts_the_vm_as_it_is_now() {
    let _s = serial();
    let (a, b, _store) = pair("127.0.0.201", "127.0.0.202", "set");
    create_small_vm(&a, "db");
    enable_ok(&a, &b, "db", "hostb.test", &["--frequency", "5"]);
    wait_until("the initial copy", Duration::from_secs(60), || {
        acked(&a, "db") >= 1
    });
    let before = b.json(&["vm", "show", "db"])["definition"].clone();
    assert_eq!(before["memory_mib"], 128, "{before}");
    let out = a.ok(&["vm", "set", "db", "--cpus", "2", "--memory", "256"]);
    assert!(out.contains("2 vCPUs, 256 MiB"), "{out}");
    let e = a.fails(&["vm", "set", "db", "--cpus", "65"]);
    assert!(e.contains("1 to 64"), "{e}");
    // The replica's copy of the definition follows with the next cycle.
    wait_until("the replica's definition", Duration::from_secs(60), || {
        let d = b.json(&["vm", "show", "db"])["definition"].clone();
        d["vcpus"] == 2 && d["memory_mib"] == 256
    });
    // A failover there defines the VM as it is now.
    b.ok(&["failover", "start", "db"]);
    let d = b.json(&["vm", "show", "db"])["definition"].clone();
    assert_eq!(
        (d["vcpus"].clone(), d["memory_mib"].clone()),
        (2.into(), 256.into()),
        "{d}"
    );
}

#[test]
fn a_host_bandwidth_limit_paces_every_relationship_of_the_host() {
    let _s = serial();
    let (mut a, b, store) = pair("127.0.0.205", "127.0.0.206", "set");
    // The admin's QoS policy: 1 MiB/s for everything this host sends, in a window (UTC) of
    // two hours from the start of this hour.
    a.stop_daemon();
    let cfg = a.data().join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let hour = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 3600
        % 24;
    std::fs::write(
        &cfg,
        format!(
            "bandwidth_limit = \"1M\"\nbandwidth_hours = \"{hour:02}:00-{:02}:00\"\n{text}",
            (hour + 2) % 24
        ),
    )
    .unwrap();
    a.start();
    create_small_vm(&a, "db");
    enable_ok(
        &a,
        &b,
        "db",
        "hostb.test",
        &["--frequency", "5", "--no-compression"],
    );
    wait_until("the initial copy", Duration::from_secs(60), || {
        acked(&a, "db") >= 1
    });
    let slowest = paced_cycle_secs(&a, &store, "db");
    assert!(
        slowest >= 2.8,
        "3 MiB under a host limit of 1 MiB/s went out in {slowest} s"
    );
    // A window that is not a window is refused when the daemon reads the file.
    a.stop_daemon();
    std::fs::write(
        &cfg,
        format!("bandwidth_limit = \"1M\"\nbandwidth_hours = \"later\"\n{text}"),
    )
    .unwrap();
    let o = a.run(&["daemon"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("bandwidth_hours"), "{e}");
}

#[test]
fn a_disk_grown_on_a_replicated_vm_grows_on_the_replica_with_the_next_cycle_without_a_resync() {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.207", "127.0.0.208", "set");
    create_small_vm(&a, "db");
    enable_ok(&a, &b, "db", "hostb.test", &["--frequency", "5"]);
    wait_until("the initial copy", Duration::from_secs(60), || {
        acked(&a, "db") >= 1
    });
    let e = a.fails(&["vm", "disk", "resize", "db", "disk0", "32M"]);
    assert!(e.contains("only grow"), "{e}");
    let e = a.fails(&["vm", "disk", "resize", "db", "disk9", "128M"]);
    assert!(e.contains("disk0"), "{e}");
    a.ok(&["replication", "pause", "db"]);
    let out = a.ok(&["vm", "disk", "resize", "db", "disk0", "128M"]);
    assert!(out.contains("128 MiB"), "{out}");
    // Data past the old end, written while the VM is off by a tool that keeps the bitmaps.
    let file = a.data().join("tail.bin");
    std::fs::write(&file, vec![0x5au8; 3 << 20]).unwrap();
    let st = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -q -s {} 100M 3M", file.display()))
        .arg(disk_path(&a, "db", 0))
        .status()
        .unwrap();
    assert!(st.success());
    a.ok(&["vm", "trust-disks", "db"]);
    let seq = acked(&a, "db");
    a.ok(&["replication", "resume", "db"]);
    wait_until("the next cycle", Duration::from_secs(60), || {
        acked(&a, "db") > seq
    });
    let s = status(&a, "db");
    assert_eq!(s["state"], "replicating", "{s}");
    let events = a.ok(&["events", "--vm", "db"]);
    assert!(
        !events.contains("tracking-lost") && !events.to_lowercase().contains("resynchroniz"),
        "a grown disk needs no resynchronization: {events}"
    );
    assert!(
        events.contains("disk disk0 grown to 134217728 bytes"),
        "{events}"
    );
    // The replica's copy is the disk as it is now, and so is its definition.
    let top = replica_image(&store, &a, "db", 0, "top.qcow2");
    same_content(&disk_path(&a, "db", 0), &top).unwrap();
    let d = b.json(&["vm", "show", "db"])["definition"]["disks"][0].clone();
    assert_eq!(d["size_bytes"], 128u64 << 20, "{d}");
}

/// Runs `script` with the guest's busybox sh through the QEMU guest agent of the running VM
/// `vm` (`guest-exec`; the script reports on the serial console, which `wait_console` reads).
fn guest_sh(a: &Host, vm: &str, script: &str) {
    use std::io::{BufRead, Write};
    let uuid = a.json(&["vm", "show", vm])["definition"]["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let sock = a.data().join("run").join(uuid).join("qga.sock");
    let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut call = |cmd: serde_json::Value, answer: &dyn Fn(&serde_json::Value) -> bool| {
        writeln!(w, "{cmd}").unwrap();
        loop {
            let mut line = String::new();
            assert!(
                r.read_line(&mut line).unwrap() > 0,
                "the guest agent hung up"
            );
            // An earlier client's unread answers come first: skipped.
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line.trim()) {
                assert!(v.get("error").is_none(), "{cmd}: {v}");
                if answer(&v) {
                    return;
                }
            }
        }
    };
    call(
        serde_json::json!({"execute": "guest-sync", "arguments": {"id": 4_215_907}}),
        &|v| v["return"] == 4_215_907,
    );
    call(
        serde_json::json!({"execute": "guest-exec",
            "arguments": {"path": "/bin/sh", "arg": ["-c", script]}}),
        &|v| v["return"]["pid"].is_u64(),
    );
}

/// The virtual size of a qcow2 image (read without locks).
fn virtual_size(img: &std::path::Path) -> u64 {
    let o = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["virtual-size"]
        .as_u64()
        .unwrap()
}

#[test]
fn a_running_vms_disk_grows_online_and_the_next_cycle_is_a_plain_delta() {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.221", "127.0.0.222", "online");
    let t = Duration::from_secs(120);
    // The guest goes on writing its first 256 KiB while the disk grows and cycles run.
    create_guest_vm(&a, "web", "1", &["64M"], "writeloop:vda:64:300");
    a.ok(&["vm", "start", "web"]);
    a.wait_console("web", "VMREPL QGA started", t);
    a.wait_console("web", "VMREPL WROTE", t);
    enable_ok(&a, &b, "web", "hostb.test", &["--frequency", "5"]);
    wait_until("the initial copy", t, || acked(&a, "web") >= 1);

    // Shrinking stays refused, with the sizes and the way out.
    let e = a.fails(&["vm", "disk", "resize", "web", "disk0", "32M"]);
    assert!(
        e.contains("only grow") && e.contains("67108864") && e.contains("33554432"),
        "{e}"
    );
    // Grown while it runs and replicates: the resize takes the VM's operation lock, so it
    // falls between two cycles.
    let seq = acked(&a, "web");
    let out = a.ok(&["vm", "disk", "resize", "web", "disk0", "128M"]);
    assert!(
        out.contains("128 MiB") && out.contains("while it runs"),
        "{out}"
    );
    assert_eq!(a.vm_state("web"), "running");
    // The guest sees the capacity change (in 512-byte sectors) and writes past the old end.
    guest_sh(
        &a,
        "web",
        "i=0; while [ \"$(cat /sys/block/vda/size)\" -lt 262144 ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done; \
         echo \"VMREPL SIZE $(cat /sys/block/vda/size)\" > /dev/console; \
         dd if=/dev/urandom of=/dev/vda bs=1M seek=100 count=1 conv=fsync 2>/dev/null && \
         echo 'VMREPL TAILWROTE' > /dev/console",
    );
    a.wait_console("web", "VMREPL SIZE 262144", t);
    a.wait_console("web", "VMREPL TAILWROTE", t);
    wait_until("two cycles after the resize", t, || {
        acked(&a, "web") >= seq + 2
    });
    // The replica took the definition with the next cycle, and its copy is the new size.
    let d = b.json(&["vm", "show", "web"])["definition"]["disks"][0].clone();
    assert_eq!(d["size_bytes"], 128u64 << 20, "{d}");
    let top = replica_image(&store, &a, "web", 0, "top.qcow2");
    assert_eq!(virtual_size(&top), 128 << 20);

    // Stopped, one more cycle carries the last writes: the replica equals the primary.
    a.ok(&["vm", "stop", "web"]);
    let seq = acked(&a, "web");
    wait_until("a cycle after the stop", t, || acked(&a, "web") > seq);
    let disk = disk_path(&a, "web", 0);
    assert_eq!(virtual_size(&disk), 128 << 20);
    same_content(&disk, &top).unwrap();
    let s = status(&a, "web");
    assert_eq!(s["state"], "replicating", "{s}");
    let events = a.ok(&["events", "--vm", "web"]);
    assert!(
        !events.contains("tracking-lost") && !events.to_lowercase().contains("resynchroniz"),
        "a disk grown online needs no resynchronization: {events}"
    );
    assert!(
        events.contains("disk disk0 grown to 134217728 bytes while the VM ran"),
        "{events}"
    );
}
