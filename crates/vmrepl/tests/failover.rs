//! End to end: planned failover and failback, unplanned failover to a chosen point, test
//! failover, and the refusals around them, with real QEMU guests on two loopback hosts.
//!
//! The guests boot with `check:vda:N,writeloop:vda:N:MS`: at every boot, on whichever host,
//! the guest itself verifies every block it ever wrote, then goes on writing.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const BLOCKS: u32 = 256;
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
    let o = enable(&a, &b, "app", "hostb.test", &opts);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
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
    let (a, b, _) = replicating_pair("127.0.0.21", "127.0.0.22", &[]);
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
    assert!(a.json(&["vm", "list"])["vms"]
        .as_array()
        .unwrap()
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
