//! End to end: a resynchronization in parts, cut by a lost link or by a crash of the primary's
//! daemon, continues from the last range the replica acknowledged, sends only the blocks that
//! differ, and leaves the replica equal to the primary. Two hosts on loopback addresses, real
//! TLS, real qemu-storage-daemon and qemu-img.

mod common;
use common::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// `bytes` of incompressible data, the same for the same seed.
fn random(bytes: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; bytes];
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    for c in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    out
}

/// Writes `data` at `offset` of a qcow2 image with qemu-io (the VM is off).
fn qemu_io_write(h: &Host, disk: &std::path::Path, offset: u64, data: &[u8]) {
    let file = h.data().join(format!("w-{offset}.bin"));
    std::fs::write(&file, data).unwrap();
    let w = format!("write -q -s {} {offset} {}", file.display(), data.len());
    let st = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &w])
        .arg(disk)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_file(file).unwrap();
}

/// A pair whose primary resynchronizes in ranges of `range_mib` MiB (`resync_range_mib`),
/// with a VM `db` (64 MiB disk, off) replicating every 5 s to the replica through a link on
/// `link_ip` that the test can throttle and cut.
fn replicating_pair(
    a_ip: &str,
    b_ip: &str,
    link_ip: &str,
    range_mib: u64,
) -> (
    Host,
    Host,
    std::path::PathBuf,
    std::path::PathBuf,
    FaultProxy,
) {
    let (mut a, b, store) = pair(a_ip, b_ip, "lab");
    a.stop_daemon();
    let cfg = a.data().join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("resync_range_mib = {range_mib}\n{text}")).unwrap();
    a.start();
    a.ok(&["vm", "create", "db", "--generation", "1", "--disk", "64M"]);
    let disk = disk_path(&a, "db", 0);
    let target: std::net::SocketAddr = format!("{}:{}", b.ip, b.port).parse().unwrap();
    let link = FaultProxy::start(link_ip, target);
    let server = link.addr.to_string();
    let o = enable_via(
        &a,
        &server,
        "db",
        "hostb.test",
        &["--frequency", "5", "--recovery-points", "2"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_until("the initial copy", Duration::from_secs(60), || {
        acked(&a, "db") >= 1
    });
    (a, b, store, disk, link)
}

/// The replica's last applied log.
fn replica_seq(b: &Host) -> u64 {
    b.json(&["replication", "status", "db"])["relationships"][0]["last_sequence"]
        .as_u64()
        .unwrap_or(0)
}

/// How often the primary's log says a resynchronization continued where it stopped.
fn continued(a: &Host) -> usize {
    std::fs::read_to_string(a.data().join("daemon.log"))
        .unwrap_or_default()
        .matches("the resynchronization continues where it stopped")
        .count()
}

#[test]
fn a_resynchronization_cut_by_a_lost_link_continues_from_the_last_acknowledged_range() {
    let _s = serial();
    let (a, b, store, disk, link) = replicating_pair("127.0.0.71", "127.0.0.72", "127.0.0.73", 4);
    // 24 MiB of new data in ranges 2 to 7 of 16, then a resynchronization by compare over a
    // link of 4 MiB/s: about six seconds of parts.
    a.ok(&["replication", "pause", "db"]);
    qemu_io_write(&a, &disk, 8 * MIB, &random(24 << 20, 1));
    let before = replica_seq(&b);
    link.throttle(4 << 20);
    a.ok(&["replication", "resume", "db", "--resynchronize"]);
    wait_until("two parts acknowledged", Duration::from_secs(120), || {
        replica_seq(&b) >= before + 4
    });
    link.cut();
    let cut_at = replica_seq(&b);
    wait_until("the cut noticed", Duration::from_secs(120), || {
        status(&a, "db")["state"] == "resynchronization-required"
    });
    assert!(
        replica_seq(&b) < before + 16,
        "the link went down before the last range"
    );
    // Between parts the replica says so, and offers only whole points: the one it kept from
    // before the resynchronization among them.
    let r = b.json(&["replication", "status", "db"]);
    assert_eq!(r["relationships"][0]["state"], "resynchronizing", "{r}");
    assert_eq!(r["relationships"][0]["health"], "warning", "{r}");
    let points = b.json(&["replication", "points", "db"]);
    let seqs: Vec<u64> = points["points"]
        .as_array()
        .unwrap_or_else(|| panic!("{points}"))
        .iter()
        .filter_map(|p| p["seq"].as_u64())
        .collect();
    assert!(seqs.contains(&before), "{points}");
    assert!(seqs.iter().all(|s| *s <= before), "{points}");
    // The link comes back; the default policy resumes by itself and continues.
    link.throttle(0);
    link.restore();
    wait_until("replicating again", Duration::from_secs(180), || {
        status(&a, "db")["state"] == "replicating"
    });
    assert_eq!(continued(&a), 1, "{}", a.log_tail());
    let r = b.json(&["replication", "status", "db"]);
    let seq = r["relationships"][0]["last_sequence"].as_u64().unwrap();
    assert_eq!(
        seq,
        before + 16 + 1,
        "16 parts, each sent once, and the final delta: {r}"
    );
    assert!(cut_at > before, "parts were applied before the cut");
    let top = replica_image(&store, &a, "db", 0, "top.qcow2");
    same_content(&disk, &top).unwrap();
    let s = status(&a, "db");
    assert_eq!(s["health"], "normal", "{s}");
}

#[test]
fn a_resynchronization_cut_by_a_crash_of_the_primary_daemon_continues_after_it_restarts() {
    let _s = serial();
    let (mut a, b, store, disk, link) =
        replicating_pair("127.0.0.74", "127.0.0.75", "127.0.0.76", 4);
    a.ok(&["replication", "pause", "db"]);
    qemu_io_write(&a, &disk, 4 * MIB, &random(16 << 20, 2));
    qemu_io_write(&a, &disk, 40 * MIB, &random(8 << 20, 3));
    let before = replica_seq(&b);
    let sent_before = status(&a, "db")["stats"]["total_bytes"].as_u64().unwrap();
    link.throttle(4 << 20);
    a.ok(&["replication", "resume", "db", "--resynchronize"]);
    wait_until("three parts acknowledged", Duration::from_secs(120), || {
        replica_seq(&b) >= before + 3
    });
    a.kill_daemon();
    assert!(replica_seq(&b) < before + 16);
    link.throttle(0);
    a.start();
    let t0 = std::time::Instant::now();
    while status(&a, "db")["state"] != "replicating" {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "not replicating again after the restart: {}\n{}",
            status(&a, "db"),
            a.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(continued(&a), 1, "{}", a.log_tail());
    assert_eq!(replica_seq(&b), before + 17);
    // The ranges acknowledged before the crash are not sent again: of the 24 MiB that
    // differ, at least one 4 MiB range went before it.
    let sent = status(&a, "db")["stats"]["total_bytes"].as_u64().unwrap() - sent_before;
    assert!(
        sent > 0 && sent <= 21 * MIB,
        "after the restart only the rest was sent: {sent} bytes"
    );
    let top = replica_image(&store, &a, "db", 0, "top.qcow2");
    same_content(&disk, &top).unwrap();
}

#[test]
fn a_resynchronization_cut_by_a_restart_of_both_hosts_continues_where_it_stopped() {
    // A reboot of both hosts as systemd does it: both daemons are stopped in the middle of the
    // sweep (the VM is off; its storage daemon saves the recording bitmap as it stops), then
    // started again.
    let _s = serial();
    let (mut a, mut b, store, disk, link) =
        replicating_pair("127.0.0.167", "127.0.0.168", "127.0.0.169", 4);
    a.ok(&["replication", "pause", "db"]);
    qemu_io_write(&a, &disk, 8 * MIB, &random(16 << 20, 4));
    let before = replica_seq(&b);
    let sent_before = status(&a, "db")["stats"]["total_bytes"].as_u64().unwrap();
    link.throttle(4 << 20);
    a.ok(&["replication", "resume", "db", "--resynchronize"]);
    wait_until("three parts acknowledged", Duration::from_secs(120), || {
        replica_seq(&b) >= before + 3
    });
    a.stop_daemon();
    b.stop_daemon();
    link.throttle(0);
    b.start();
    let cut_at = replica_seq(&b);
    assert!(
        cut_at >= before + 3 && cut_at < before + 16,
        "stopped in the middle of the sweep: {cut_at}"
    );
    a.start();
    wait_until("replicating again", Duration::from_secs(180), || {
        status(&a, "db")["state"] == "replicating"
    });
    assert_eq!(continued(&a), 1, "{}", a.log_tail());
    assert_eq!(
        replica_seq(&b),
        before + 17,
        "16 parts once each and the delta"
    );
    // Of the 16 MiB that differ (ranges 3 to 6), the ranges acknowledged before the stop
    // went once.
    let sent = status(&a, "db")["stats"]["total_bytes"].as_u64().unwrap() - sent_before;
    assert!(
        sent > 0 && sent <= 17 * MIB,
        "each differing block sent once: {sent} bytes"
    );
    let top = replica_image(&store, &a, "db", 0, "top.qcow2");
    same_content(&disk, &top).unwrap();
    assert_eq!(status(&a, "db")["health"], "normal");
}

#[test]
fn a_range_with_more_differing_data_than_the_compare_keeps_is_read_again_and_the_replica_ends_equal(
) {
    // Two ranges of 32 MiB: the first differs by 16 MiB, more than the 8 MiB a range's
    // compare keeps in memory, so its part reads those blocks again; the second differs by
    // 1 MiB, sent from what the compare read.
    let _s = serial();
    let (a, b, store, disk, _link) =
        replicating_pair("127.0.0.231", "127.0.0.232", "127.0.0.233", 32);
    a.ok(&["replication", "pause", "db"]);
    qemu_io_write(&a, &disk, 2 * MIB, &random(16 << 20, 5));
    qemu_io_write(&a, &disk, 40 * MIB, &random(1 << 20, 6));
    let before = replica_seq(&b);
    let sent_before = status(&a, "db")["stats"]["total_bytes"].as_u64().unwrap();
    a.ok(&["replication", "resume", "db", "--resynchronize"]);
    wait_until("replicating again", Duration::from_secs(180), || {
        status(&a, "db")["state"] == "replicating" && replica_seq(&b) >= before + 3
    });
    assert_eq!(replica_seq(&b), before + 3, "two parts and the final delta");
    let log = std::fs::read_to_string(a.data().join("daemon.log")).unwrap();
    let parts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("resynchronization part acknowledged"))
        .collect();
    assert_eq!(parts.len(), 2, "{}", a.log_tail());
    assert!(
        parts[0].contains("differing=256 read_again=true"),
        "the first range is read again: {}",
        parts[0]
    );
    assert!(
        parts[1].contains("differing=16 read_again=false"),
        "the second range is sent from the compare: {}",
        parts[1]
    );
    // Each differing block went once, whichever way it was read.
    let sent = status(&a, "db")["stats"]["total_bytes"].as_u64().unwrap() - sent_before;
    assert!(
        (17 * MIB..=17 * MIB + MIB / 2).contains(&sent),
        "17 MiB differ: {sent} bytes sent"
    );
    let top = replica_image(&store, &a, "db", 0, "top.qcow2");
    same_content(&disk, &top).unwrap();
    assert_eq!(status(&a, "db")["health"], "normal");
}
