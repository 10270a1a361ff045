//! End to end: planned failover and failback, unplanned failover to a chosen point, test
//! failover, and the refusals around them, with real QEMU guests on two loopback hosts.
//!
//! The guests boot with `check:vda:N,writeloop:vda:N:MS`: at every boot, on whichever host,
//! the guest itself verifies every block it ever wrote, then goes on writing.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const WORK: &str = "check:vda:256,writeloop:vda:256:300";
const T: Duration = Duration::from_secs(180);

/// A 32 MiB qcow2 image whose last 24 MiB hold incompressible data the guest never touches
/// (it writes the first MiB): a full copy of it is large, the guest's changes are small.
fn filler_image(dir: &Path) -> PathBuf {
    let raw = dir.join("filler.raw");
    let mut buf = vec![0u8; 32 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in buf[8 << 20..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&raw, &buf).unwrap();
    let img = dir.join("filler.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_file(raw).unwrap();
    img
}

/// Two hosts, each the other's replica server (the article's prerequisite for reverse
/// replication); `app` runs the guest on A and replicates to B every 5 s.
fn replicating_pair(a_ip: &str, b_ip: &str, extra: &[&str]) -> (Host, Host, PathBuf) {
    let (a, b, _store_b) = pair(a_ip, b_ip, "DEFAULT");
    let store_a = a.data().join("replicas-from-b");
    serve_replicas_for(&a, "hostb.test", &store_a);
    let filler = filler_image(a.data());
    let g = guest();
    a.ok(&[
        "vm",
        "create",
        "app",
        "--generation",
        "1",
        "--memory",
        "256",
        "--kernel",
        g.kernel.to_str().unwrap(),
        "--initrd",
        g.initrd.to_str().unwrap(),
        "--cmdline",
        &format!("console=ttyS0 quiet vmrepl.work={WORK}"),
        "--nic",
        "none",
        "--import",
        filler.to_str().unwrap(),
    ]);
    a.ok(&["vm", "start", "app"]);
    a.wait_console("app", "VMREPL WROTE", T);
    let mut opts = vec!["--frequency", "5"];
    opts.extend_from_slice(extra);
    enable_ok(&a, &b, "app", "hostb.test", &opts);
    a.ok(&["replication", "status", "app", "--watch", "--for", "180"]);
    (a, b, store_a)
}

/// Bytes the host's relationship sent, and whether any cycle was an initial copy.
fn sent(h: &Host, vm: &str) -> u64 {
    status(h, vm)["stats"]["total_bytes"].as_u64().unwrap()
}

/// Waits until `primary` has `seq` acknowledged; on timeout shows both sides.
fn wait_for_sequence(primary: &Host, replica: &Host, seq: u64) {
    let start = std::time::Instant::now();
    while status(primary, "app")["last_sequence"].as_u64().unwrap() < seq {
        if start.elapsed() > T {
            panic!(
                "{} did not reach log {seq}:\n{:#}\n{:#}\n{}\n{}",
                primary.name,
                status(primary, "app"),
                status(replica, "app"),
                primary.log_tail(),
                replica.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn planned_failover_and_failback_keep_every_write_and_reverse_without_a_full_copy() {
    let _s = serial();
    let (a, mut b, _) = replicating_pair("127.0.0.21", "127.0.0.22", &[]);
    let machine = a.json(&["vm", "show", "app"])["definition"]["machine_type"].clone();
    let initial_bytes = sent(&a, "app");
    assert!(
        initial_bytes > 20 << 20,
        "the initial copy carries the 24 MiB of data: {initial_bytes}"
    );

    // Planned failover, as the article's validation does it: shut down, prepare, fail over.
    let e = a.fails(&["failover", "prepare", "app"]);
    assert!(e.contains("shut down"), "prepare of a running VM: {e}");
    a.ok(&["vm", "shutdown", "app", "--timeout", "90"]);
    let gen_a = last_stopped_gen(&a.console("app"), "vda");
    let out = a.ok(&["failover", "prepare", "app"]);
    assert!(out.contains("failover start app"), "{out}");
    assert_eq!(a.vm_state("app"), "locked-for-failover");
    let e = a.fails(&["vm", "start", "app"]);
    assert!(e.contains("locked"), "{e}");
    let s = status(&a, "app");
    assert_eq!(s["state"], "synced-replication-complete", "{s}");
    let final_seq = s["last_sequence"].as_u64().unwrap();

    let out = b.ok(&["failover", "start", "app"]);
    assert!(out.contains("no data lost"), "{out}");
    // Zero data loss: the failed-over VM's disk is the primary's disk, block for block.
    same_content(&disk_path(&a, "app", 0), &disk_path(&b, "app", 0)).unwrap();
    let def_b = b.json(&["vm", "show", "app"])["definition"].clone();
    assert_eq!(
        def_b["machine_type"], machine,
        "I7: the machine type travels unchanged"
    );
    let rs = status(&b, "app");
    assert_eq!(rs["state"], "failed-over", "{rs}");
    // A daemon restart keeps the failover as it is.
    b.stop_daemon();
    b.start();
    let rs = status(&b, "app");
    assert_eq!(rs["state"], "failed-over", "{rs}");

    // Reverse: only what changed since the failover goes back to A.
    let out = b.ok(&["replication", "reverse", "app", "--frequency", "5"]);
    assert!(out.contains("only the changes"), "{out}");
    b.ok(&["vm", "start", "app"]);
    let c = guest_check(&b, "app", "vda");
    assert!(c.pass && c.bad == 0 && c.zero == 0, "{c:?}");
    assert!(
        c.min_gen.unwrap() >= gen_a,
        "{c:?} lost writes before gen {gen_a}"
    );
    b.wait_console("app", &format!("VMREPL WROTE dev=vda gen={}", gen_a + 2), T);
    wait_for_sequence(&b, &a, final_seq + 2);
    let s = status(&b, "app");
    assert_eq!(s["role"], "primary", "{s}");
    assert_eq!(s["state"], "replicating", "{s}");
    assert!(s["note"].is_null(), "{s}");
    let reverse_bytes = sent(&b, "app");
    assert!(
        reverse_bytes < initial_bytes / 3,
        "reverse replication sent {reverse_bytes} bytes; the full copy was {initial_bytes}"
    );
    let ra = status(&a, "app");
    assert_eq!(ra["role"], "replica", "{ra}");
    assert!(local_vms(&a)
        .iter()
        .all(|v| v["definition"]["name"] != "app"));

    // Failback: the same planned failover the other way.
    b.ok(&["vm", "shutdown", "app", "--timeout", "90"]);
    let gen_b = last_stopped_gen(&b.console("app"), "vda");
    assert!(gen_b > gen_a);
    b.ok(&["failover", "prepare", "app"]);
    let out = a.ok(&["failover", "start", "app", "--start"]);
    assert!(
        out.contains("no data lost") && out.contains("started"),
        "{out}"
    );
    let c = guest_check(&a, "app", "vda");
    assert!(c.pass && c.bad == 0 && c.zero == 0, "{c:?}");
    assert!(
        c.min_gen.unwrap() >= gen_b,
        "{c:?} lost writes before gen {gen_b}"
    );
    let out = a.ok(&["replication", "reverse", "app", "--frequency", "5"]);
    assert!(out.contains("only the changes"), "{out}");
    let back = status(&a, "app")["last_sequence"].as_u64().unwrap();
    wait_for_sequence(&a, &b, back + 1);
    assert_eq!(status(&b, "app")["role"], "replica");
    assert_eq!(
        a.json(&["vm", "show", "app"])["definition"]["machine_type"],
        machine
    );
}

/// Frozen recovery points on the replica host, oldest first.
fn frozen_points(h: &Host) -> Vec<u64> {
    h.json(&["replication", "points", "app"])["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["latest"] == false)
        .map(|p| p["seq"].as_u64().unwrap())
        .collect()
}

#[test]
fn unplanned_failover_to_an_older_point_cancel_another_point_complete_and_reverse_by_block_compare()
{
    let _s = serial();
    let (mut a, b, store_a) = replicating_pair(
        "127.0.0.23",
        "127.0.0.24",
        &["--recovery-points", "4", "--point-interval", "5"],
    );
    let initial_bytes = sent(&a, "app");
    wait_until("three recovery points", T, || frozen_points(&b).len() >= 3);

    // I6: the primary says the VM runs there.
    let e = b.fails(&["failover", "start", "app"]);
    assert!(e.contains("running on the primary"), "{e}");
    // Bad input on the replica: nothing to complete or cancel, a point that does not exist.
    let e = b.fails(&["failover", "complete", "app", "--yes"]);
    assert!(e.contains("has not failed over"), "{e}");
    let e = b.fails(&["failover", "cancel", "app"]);
    assert!(e.contains("has not failed over"), "{e}");
    let e = a.fails(&["failover", "start", "app"]);
    assert!(e.contains("keeps no replica"), "{e}");

    // The primary host is lost (its VM killed, its daemon gone).
    a.ok(&["vm", "stop", "app"]);
    a.stop_daemon();
    let e = b.fails(&["failover", "start", "app"]);
    assert!(
        e.contains("cannot be asked") && e.contains("--risk-split-brain"),
        "{e}"
    );
    let points = frozen_points(&b);
    let (oldest, newest) = (points[0], *points.last().unwrap());
    let e = b.fails(&[
        "failover",
        "start",
        "app",
        "--point",
        "999999",
        "--risk-split-brain",
    ]);
    assert!(
        e.contains("999999") && e.contains(&oldest.to_string()),
        "{e}"
    );
    assert!(local_vms(&b).is_empty());

    // An older point first: the guest finds every block intact there.
    let out = b.ok(&[
        "failover",
        "start",
        "app",
        "--point",
        &oldest.to_string(),
        "--risk-split-brain",
        "--start",
    ]);
    assert!(out.contains(&format!("point {oldest}")), "{out}");
    let old = guest_check(&b, "app", "vda");
    assert!(old.pass && old.bad == 0 && old.zero == 0, "{old:?}");
    assert_eq!(status(&b, "app")["state"], "failed-over-waiting-completion");
    // Wrong point: cancel, and the points are as before.
    b.ok(&["failover", "cancel", "app"]);
    assert!(local_vms(&b).is_empty());
    assert_eq!(frozen_points(&b), points);
    b.ok(&[
        "failover",
        "start",
        "app",
        "--point",
        &newest.to_string(),
        "--risk-split-brain",
        "--start",
    ]);
    let new = guest_check(&b, "app", "vda");
    assert!(new.pass && new.bad == 0 && new.zero == 0, "{new:?}");
    assert!(
        new.min_gen.unwrap() > old.min_gen.unwrap(),
        "the newer point holds newer data: {old:?} then {new:?}"
    );
    // Complete asks first: anything but "yes" (here: no answer at all) completes nothing.
    let e = b.fails(&["failover", "complete", "app"]);
    assert!(e.contains("not completed"), "{e}");
    assert_eq!(status(&b, "app")["state"], "failed-over-waiting-completion");
    // Complete while the VM runs: its disk leaves the point, the other points go.
    let out = b.ok(&["failover", "complete", "app", "--yes"]);
    assert!(out.contains("completed"), "{out}");
    assert_eq!(b.vm_state("app"), "running");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(disk_path(&b, "app", 0))
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info["backing-filename"].is_null(), "{info}");
    let gen_now = new.max_gen.unwrap_or(0);
    b.wait_console(
        "app",
        &format!("VMREPL WROTE dev=vda gen={}", gen_now + 2),
        T,
    );
    let e = b.fails(&["replication", "points", "app"]);
    assert!(e.contains("dropped"), "{e}");

    // Reverse needs the old primary: unreachable, then not authorizing. Then, as it may hold
    // writes the replica never got (no common base), it keeps its disks and they are
    // resynchronized by block compare: only the blocks that differ travel.
    let e = b.fails(&["replication", "reverse", "app", "--frequency", "5"]);
    assert!(
        e.contains("Cannot reach") && e.contains("Nothing was changed"),
        "{e}"
    );
    a.start();
    a.ok(&["replication", "server", "revoke", "--primary", "hostb.test"]);
    let e = b.fails(&["replication", "reverse", "app", "--frequency", "5"]);
    assert!(
        e.contains("authoriz") && e.contains("Nothing was changed"),
        "{e}"
    );
    assert_eq!(status(&b, "app")["state"], "failed-over");
    assert_eq!(a.vm_state("app"), "off");
    serve_replicas_for(&a, "hostb.test", &a.data().join("replicas-from-b"));
    let out = b.ok(&["replication", "reverse", "app", "--frequency", "5"]);
    assert!(out.contains("block compare"), "{out}");
    let s = status(&b, "app");
    assert!(s["note"].as_str().unwrap().contains("not planned"), "{s}");
    wait_for_sequence(&b, &a, 2);
    assert_eq!(status(&b, "app")["state"], "replicating");
    let resync_bytes = sent(&b, "app");
    assert!(
        resync_bytes < initial_bytes / 3,
        "the resynchronization sent {resync_bytes} bytes; a full copy was {initial_bytes}"
    );
    assert_eq!(status(&a, "app")["role"], "replica");
    assert!(local_vms(&a).is_empty());
    // With the VM off and one more cycle, the old primary holds exactly the new one's disk.
    b.ok(&["vm", "shutdown", "app", "--timeout", "90"]);
    let off = status(&b, "app")["last_sequence"].as_u64().unwrap();
    wait_for_sequence(&b, &a, off + 1);
    let replica = replica_image(&store_a, &b, "app", 0, "top.qcow2");
    same_content(&disk_path(&b, "app", 0), &replica).unwrap();
}

#[test]
fn test_failover_runs_beside_replication_pins_its_point_and_leaves_nothing_behind() {
    let _s = serial();
    let (a, b, _) = replicating_pair(
        "127.0.0.25",
        "127.0.0.26",
        &["--recovery-points", "1", "--point-interval", "5"],
    );
    wait_until("a recovery point", T, || !frozen_points(&b).is_empty());
    let e = b.fails(&["failover", "test", "app", "--point", "999999"]);
    assert!(e.contains("999999"), "{e}");
    let out = b.ok(&["failover", "test", "app"]);
    assert!(out.contains("not connected"), "{out}");
    let e = b.fails(&["failover", "test", "app"]);
    assert!(e.contains("runs already"), "{e}");
    // Measure-VMReplication on the replica shows when the last test failover started.
    let m = b.json(&["replication", "measure", "app"]);
    assert!(
        m["relationships"][0]["stats"]["last_test_failover_unix"]
            .as_u64()
            .is_some(),
        "{m}"
    );
    let test_vm = b.json(&["vm", "show", "app - Test"]);
    assert_eq!(
        test_vm["definition"]["nics"][0]["mode"], "not-connected",
        "{test_vm}"
    );
    let uuid = test_vm["definition"]["uuid"].as_str().unwrap().to_string();
    assert_ne!(
        uuid,
        a.json(&["vm", "show", "app"])["definition"]["uuid"]
            .as_str()
            .unwrap()
    );
    let pinned = status(&b, "app")["note"].as_str().unwrap().to_string();
    let seq: u64 = pinned
        .split("from point ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no point in {pinned:?}"));
    b.ok(&["vm", "start", "app - Test"]);
    let c = guest_check(&b, "app - Test", "vda");
    assert!(c.pass && c.bad == 0 && c.zero == 0, "{c:?}");
    // Replication goes on, and with one point kept the pinned point would long be merged.
    let now = acked(&a, "app");
    wait_until("four more cycles", T, || acked(&a, "app") >= now + 4);
    let pts = frozen_points(&b);
    assert!(
        pts.contains(&seq),
        "point {seq} was pruned under the test VM: {pts:?}"
    );
    assert_eq!(status(&a, "app")["health"], "normal");
    b.ok(&["failover", "stop-test", "app"]);
    assert!(local_vms(&b).is_empty());
    assert!(!b.data().join("storage").join(&uuid).exists());
    let e = b.fails(&["failover", "stop-test", "app"]);
    assert!(e.contains("No test failover"), "{e}");
    // Once released, the point is pruned like any other.
    wait_until("the pinned point merged", T, || {
        !frozen_points(&b).contains(&seq)
    });
}

#[test]
fn a_uefi_vm_fails_over_with_its_nvram_and_reverse_replication_carries_it_back() {
    let _s = serial();
    let (a, b, _) = pair("127.0.0.29", "127.0.0.30", "DEFAULT");
    serve_replicas_for(&a, "hostb.test", &a.data().join("replicas-from-b"));
    create_guest_vm(&a, "efi", "2", &["8M"], WORK);
    a.ok(&["vm", "start", "efi"]);
    a.wait_console("efi", "VMREPL WROTE", T);
    enable_ok(&a, &b, "efi", "hostb.test", &["--frequency", "5"]);
    a.ok(&["replication", "status", "efi", "--watch", "--for", "180"]);
    a.ok(&["vm", "shutdown", "efi", "--timeout", "90"]);
    let gen = last_stopped_gen(&a.console("efi"), "vda");
    a.ok(&["failover", "prepare", "efi"]);
    b.ok(&["failover", "start", "efi"]);
    let nvram = |h: &Host| -> PathBuf {
        h.json(&["vm", "show", "efi"])["definition"]["nvram"]
            .as_str()
            .unwrap()
            .into()
    };
    let nv_a = std::fs::read(nvram(&a)).unwrap();
    assert_eq!(
        std::fs::read(nvram(&b)).unwrap(),
        nv_a,
        "the NVRAM travels with the VM"
    );
    same_content(&disk_path(&a, "efi", 0), &disk_path(&b, "efi", 0)).unwrap();
    let def = b.json(&["vm", "show", "efi"])["definition"].clone();
    assert_eq!(def["generation"], 2);
    assert!(
        def["machine_type"].as_str().unwrap().starts_with("pc-q35-"),
        "{def}"
    );
    let out = b.ok(&["replication", "reverse", "efi", "--frequency", "5"]);
    assert!(out.contains("only the changes"), "{out}");
    b.ok(&["vm", "start", "efi"]);
    let c = guest_check(&b, "efi", "vda");
    assert!(c.pass && c.zero == 0 && c.min_gen.unwrap() >= gen, "{c:?}");
    let now = status(&b, "efi")["last_sequence"].as_u64().unwrap();
    wait_until("a reverse cycle of the running UEFI VM", T, || {
        status(&b, "efi")["last_sequence"].as_u64().unwrap() > now
    });
    assert_eq!(status(&a, "efi")["state"], "replicating");
}

#[test]
fn a_failed_over_vm_gets_its_adapters_failover_tcp_ip_through_the_guest_agent() {
    let _s = serial();
    let (a, b, _store) = pair("127.0.0.203", "127.0.0.204", "ip");
    let g = guest();
    a.ok(&[
        "vm",
        "create",
        "web",
        "--generation",
        "1",
        "--memory",
        "256",
        "--kernel",
        g.kernel.to_str().unwrap(),
        "--initrd",
        g.initrd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 quiet vmrepl.work=idle",
        "--nic",
        "user",
        "--disk",
        "64M",
    ]);
    enable_ok(&a, &b, "web", "hostb.test", &["--frequency", "5"]);
    wait_until("the initial copy", Duration::from_secs(60), || {
        acked(&a, "web") >= 1
    });
    // The replica host's admin gives adapter 0 its address on this site.
    let adapter0 = |more: &[&str]| {
        let mut args = vec!["replication", "network", "web", "--adapter", "0"];
        args.extend_from_slice(more);
        b.run(&args)
    };
    let e = refused(adapter0(&["--failover-ip", "10.0.2.15"]));
    assert!(e.contains("prefix"), "{e}");
    let e = refused(adapter0(&[
        "--failover-ip",
        "10.0.2.15/24",
        "--gateway",
        "fd00::1",
    ]));
    assert!(e.contains("family"), "{e}");
    let o = adapter0(&[
        "--failover",
        "user",
        "--failover-ip",
        "10.0.2.15/24",
        "--gateway",
        "10.0.2.2",
        "--dns",
        "10.0.2.3",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("10.0.2.15/24 via 10.0.2.2, DNS 10.0.2.3"),
        "{out}"
    );
    let out = b.ok(&["failover", "start", "web", "--start"]);
    assert!(out.contains("failover TCP/IP"), "{out}");
    // The guest boots, its agent answers, and the address is set and read back from it.
    let mut last = String::new();
    wait_until(
        "the failover TCP/IP outcome",
        Duration::from_secs(300),
        || {
            last = b.ok(&["events", "--vm", "web"]);
            last.contains("failover TCP/IP")
        },
    );
    assert!(
        last.contains("failover TCP/IP set in the guest of web: adapter 0 (eth0) has 10.0.2.15/24 via 10.0.2.2, DNS 10.0.2.3"),
        "{last}\n{}",
        b.console("web")
    );
    b.ok(&["vm", "stop", "web"]);
}
