//! The fault matrix (issue 13): one end-to-end test per fault, each with a real guest writing
//! ordered, durable blocks on two disks (`writeloop:vda+vdb`), two hosts on loopback and real
//! TLS. After each fault the same three things are checked, by the guest's own write order and
//! never by timing:
//! * every recovery point the replica exposes is one instant of the primary's two disks (each
//!   disk holds at most two adjacent generations, and `gen(vda) >= gen(vdb) >= gen(vda) - 1`);
//! * replication is back to "replicating" with health "normal" by itself, within two
//!   frequencies plus the resynchronization's time (no operator command);
//! * nothing acknowledged is lost: the acknowledged sequence never goes back, the replica holds
//!   at least what was acknowledged before the fault, every point taken after the fault holds
//!   what the guest reported durable before it, and at the end the replica equals the primary.
//!
//! Moments a real kill cannot hit on demand are reached with the daemon's test-only crash
//! points (`VMREPL_CRASH_AT`, `crates/vmrepl-host/src/faults.rs`). Quick cases are plain tests
//! (the README's `scripts/test.sh` runs them); slow ones are ignored here and run by
//! `scripts/faults.sh`, with the fault tests of `replication.rs`.
//!
//! Addresses: 127.0.0.101-127.0.0.130, and network namespaces named `vmrt-*`.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const VM: &str = "app";
/// Replication frequency of every case, in seconds.
const FREQ: u64 = 5;
/// What a case may take to heal beyond two frequencies: a daemon restart, reattaching QEMU, and
/// a resynchronization by compare of two 16 MiB disks under TCG on a loaded two-core machine.
const RESYNC_ALLOWANCE: Duration = Duration::from_secs(120);
const T: Duration = Duration::from_secs(180);

// ------------------------------------------------------------------ the scene

/// A primary `a` replicating VM "app" (two disks, a guest writing generation after
/// generation) to the replica server `b`, whose storage is `store`.
struct Scene {
    a: Host,
    b: Host,
    store: PathBuf,
    /// Blocks of 4 KiB the guest writes per disk and generation.
    blocks: u32,
    /// The highest acknowledged sequence seen so far: it must never go back.
    acked_max: u64,
    /// Health may stay "warning" for one reason only: cycles missed while the fault lasted,
    /// which Hyper-V's rule counts over its 12 h window (in a test of a minute or two, an
    /// outage of a few intervals is more than 20 % of the cycles).
    missed_ok: bool,
}

/// The guest's workload: `blocks` blocks per disk, `ms` ms between generations.
fn workload(blocks: u32, ms: u32) -> String {
    format!("writeloop:vda+vdb:{blocks}:{ms}")
}

impl Scene {
    /// Two hosts on `a_ip` and `b_ip`; the guest runs and has written one generation.
    fn new(a_ip: &str, b_ip: &str, blocks: u32, ms: u32) -> Scene {
        let (a, b, store) = pair(a_ip, b_ip, "lab");
        Scene::with(a, b, store, blocks, ms)
    }

    fn with(a: Host, b: Host, store: PathBuf, blocks: u32, ms: u32) -> Scene {
        create_guest_vm(&a, VM, "1", &["16M", "16M"], &workload(blocks, ms));
        a.ok(&["vm", "start", VM]);
        // Generation 1 on both disks: every block of every point is valid from here on.
        a.wait_console(VM, "VMREPL WROTE dev=vdb", T);
        Scene {
            a,
            b,
            store,
            blocks,
            acked_max: 0,
            missed_ok: false,
        }
    }

    /// Enables replication towards `server` (HOST:PORT; the replica server itself when None)
    /// and waits until two deltas are acknowledged.
    fn replicate(&mut self, server: Option<&str>) {
        let server = server
            .map(str::to_string)
            .unwrap_or_else(|| format!("{}:{}", self.b.ip, self.b.port));
        let o = enable_via(
            &self.a,
            &server,
            VM,
            "hostb.test",
            &[
                "--frequency",
                &FREQ.to_string(),
                "--recovery-points",
                "24",
                "--point-interval",
                "5",
            ],
        );
        assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stderr),
            self.a.log_tail()
        );
        wait_until("initial replication and two deltas", T, || {
            let s = status(&self.a, VM);
            s["state"] == "replicating" && s["last_sequence"].as_u64().unwrap_or(0) >= 3
        });
        self.acked();
    }

    /// Health "normal", or (with `missed_ok`) "warning" for missed cycles alone.
    fn healthy(&self, s: &serde_json::Value) -> bool {
        let only_missed = s["health"] == "warning"
            && s["health_details"].as_array().is_some_and(|d| {
                d.len() == 1
                    && d[0]
                        .as_str()
                        .is_some_and(|m| m.contains("cycles have been missed"))
            });
        s["health"] == "normal" || (self.missed_ok && only_missed)
    }

    /// The primary's acknowledged sequence, checked never to go back (I1).
    fn acked(&mut self) -> u64 {
        let s = acked(&self.a, VM);
        assert!(
            s >= self.acked_max,
            "the acknowledged sequence went back from {} to {s}",
            self.acked_max
        );
        self.acked_max = s;
        s
    }

    /// The replica's last applied sequence.
    fn replica_applied(&self) -> u64 {
        status(&self.b, VM)["last_sequence"].as_u64().unwrap()
    }

    /// The generation the guest last reported durable on `dev`.
    fn durable_gen(&self, dev: &str) -> u64 {
        let c = self.a.console(VM);
        c.lines()
            .filter_map(|l| {
                l.trim_end_matches('\r')
                    .strip_prefix(&format!("VMREPL WROTE dev={dev} gen="))
            })
            .filter_map(|g| g.trim().parse().ok())
            .next_back()
            .unwrap_or_else(|| panic!("no WROTE line for {dev}"))
    }

    /// What the guest holds durable before a fault: (acknowledged sequence, generation of vdb,
    /// the disk written last, so both disks hold at least it).
    fn before_fault(&mut self) -> Before {
        Before {
            acked: self.acked(),
            gen: self.durable_gen("vdb"),
            at: Instant::now(),
        }
    }

    /// Waits, with no operator command, until the relationship replicates again with health
    /// normal and two cycles that started after the fault were acknowledged; checks that the
    /// replica kept everything acknowledged before the fault. Returns the time it took.
    fn healed(&mut self, before: &Before, what: &str) -> Duration {
        let deadline = Duration::from_secs(2 * FREQ) + RESYNC_ALLOWANCE;
        let t0 = Instant::now();
        let target = before.acked + 2;
        let start = Instant::now();
        loop {
            let s = status(&self.a, VM);
            let seq = s["last_sequence"].as_u64().unwrap_or(0);
            assert!(
                seq >= self.acked_max,
                "the acknowledged sequence went back from {} to {seq}: {s}",
                self.acked_max
            );
            self.acked_max = seq;
            if s["state"] == "replicating" && self.healthy(&s) && seq >= target {
                break;
            }
            assert!(
                start.elapsed() < deadline,
                "{what}: not healed within {deadline:?} (two frequencies plus {RESYNC_ALLOWANCE:?}): {s}\n{}\n{}",
                self.a.log_tail(),
                self.b.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let applied = self.replica_applied();
        assert!(
            applied >= before.acked,
            "{what}: the replica applied {applied}, less than the {} acknowledged before the fault",
            before.acked
        );
        let took = t0.elapsed();
        eprintln!(
            "{what}: healed {:.1} s after the fault was injected, {:.1} s after recovery began{}",
            before.at.elapsed().as_secs_f64(),
            took.as_secs_f64(),
            if self.resynchronized() {
                " (with a resynchronization)"
            } else {
                ""
            }
        );
        took
    }

    /// Whether the primary resynchronized by itself at some point.
    fn resynchronized(&self) -> bool {
        std::fs::read_to_string(self.a.data().join("daemon.log"))
            .unwrap_or_default()
            .contains("resynchronization started by itself")
    }

    /// Every recovery point the replica exposes is one instant of both disks; points taken
    /// after the fault (sequence `> before.acked + 1`: the log in flight at the fault may
    /// predate it) hold at least the generation the guest reported durable before it.
    fn points_are_instants(&self, before: &Before) -> usize {
        let points = || {
            self.b.json(&["replication", "points", VM])["points"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["latest"] == false)
                .map(|p| p["seq"].as_u64().unwrap())
                .collect::<Vec<_>>()
        };
        // Points are frozen every 5 s of the primary's time as logs arrive.
        wait_until("a recovery point taken after the fault", T, || {
            points().iter().any(|s| *s > before.acked + 1)
        });
        let pts = points();
        let mut after = 0;
        for seq in &pts {
            let layer =
                |d: usize| replica_image(&self.store, &self.a, VM, d, &format!("rp-{seq}.qcow2"));
            let (a, b) = (gens(&layer(0), self.blocks), gens(&layer(1), self.blocks));
            one_instant(a, b).unwrap_or_else(|e| panic!("recovery point {seq}: {e}"));
            if *seq > before.acked + 1 {
                after += 1;
                assert!(
                    b.0 >= before.gen,
                    "recovery point {seq}, taken after the fault, holds generation {} on vdb, \
                     older than the {} the guest reported durable before it",
                    b.0,
                    before.gen
                );
            }
        }
        eprintln!(
            "{} recovery points checked, {after} of them taken after the fault",
            pts.len()
        );
        after
    }

    /// Shuts the guest down, waits for a cycle with the VM off and checks that the replica's
    /// latest state equals the primary's disks, each holding the generation the guest stopped at.
    fn ends_equal(&mut self) {
        self.a.ok(&["vm", "shutdown", VM, "--timeout", "90"]);
        let console = self.a.console(VM);
        let off = self.acked();
        wait_until("a cycle with the VM off", T, || acked(&self.a, VM) > off);
        self.acked();
        for (i, dev) in ["vda", "vdb"].iter().enumerate() {
            let gen = last_stopped_gen(&console, dev);
            let top = replica_image(&self.store, &self.a, VM, i, "top.qcow2");
            same_content(&disk_path(&self.a, VM, i), &top)
                .unwrap_or_else(|e| panic!("the replica's {dev} differs from the primary: {e}"));
            verify_image(&top, self.blocks, "--gen", gen);
        }
        let s = status(&self.a, VM);
        assert_eq!(s["state"], "replicating", "{s}");
        assert!(self.healthy(&s), "{s}");
    }
}

/// What held just before a fault.
struct Before {
    acked: u64,
    gen: u64,
    at: Instant,
}

/// The lowest and highest generation on an image of `blocks` blocks, every block valid.
fn gens(img: &Path, blocks: u32) -> (u64, u64) {
    let out = verify_image(img, blocks, "--min-gen", 1);
    let field = |k: &str| -> u64 {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {out}"))
    };
    (field("min_gen"), field("max_gen"))
}

/// Whether per-disk (min, max) generations of vda and vdb can be one instant of the guest:
/// within a disk two adjacent generations at most, and vda (written first) at or one ahead
/// of vdb.
fn one_instant(a: (u64, u64), b: (u64, u64)) -> Result<(), String> {
    if a.1 > a.0 + 1 || b.1 > b.0 + 1 {
        return Err(format!("a disk mixes generations: vda {a:?}, vdb {b:?}"));
    }
    if a.0 < b.1 || a.1 > b.0 + 1 {
        return Err(format!(
            "the disks are not of one instant: vda {a:?}, vdb {b:?}"
        ));
    }
    Ok(())
}

#[test]
fn the_check_of_one_instant_rejects_disks_of_different_instants() {
    assert!(one_instant((5, 5), (5, 5)).is_ok());
    assert!(one_instant((6, 6), (5, 5)).is_ok());
    assert!(one_instant((5, 6), (5, 5)).is_ok());
    assert!(one_instant((6, 6), (5, 6)).is_ok());
    assert!(one_instant((4, 6), (4, 4)).is_err(), "three generations");
    assert!(one_instant((5, 5), (6, 6)).is_err(), "vdb ahead of vda");
    assert!(one_instant((7, 7), (5, 5)).is_err(), "vda two ahead");
}

/// Restarts `h`'s daemon with `VMREPL_CRASH_AT=point` and waits until it aborts there.
fn crash_at(h: &mut Host, point: &str) {
    h.stop_daemon();
    // The point may come before the daemon answered its start: then the start says it ended.
    let _ = h.try_start_with(&[], &[("VMREPL_CRASH_AT", point)]);
    h.wait_daemon_gone(T);
    let log = std::fs::read_to_string(h.data().join("daemon.log")).unwrap_or_default();
    assert!(
        log.contains("crash point reached") && log.contains(point),
        "the daemon of {} ended without reaching {point}: {}",
        h.name,
        h.log_tail()
    );
}

// ------------------------------------------------------------------ the primary's daemon

#[test]
fn the_primary_daemon_killed_right_after_the_cycles_transaction_heals_by_itself_and_loses_nothing()
{
    let _s = serial();
    let mut s = Scene::new("127.0.0.101", "127.0.0.102", 64, 100);
    s.replicate(None);
    let before = s.before_fault();
    // Bitmap N frozen, N+1 recording, the fleecing jobs running: then the daemon dies.
    crash_at(&mut s.a, "primary-after-transaction");
    s.a.start();
    s.healed(&before, "primary killed after the transaction");
    s.points_are_instants(&before);
    s.ends_equal();
}

#[test]
fn the_primary_daemon_killed_after_the_replicas_acknowledgement_before_the_bitmap_is_released_heals_by_itself(
) {
    let _s = serial();
    let mut s = Scene::new("127.0.0.103", "127.0.0.104", 64, 100);
    s.replicate(None);
    let before = s.before_fault();
    // The replica holds log N+1 durably; the primary still has bitmap N frozen and records
    // N+1 as not acknowledged.
    crash_at(&mut s.a, "primary-after-ack");
    s.a.start();
    s.healed(&before, "primary killed after the acknowledgement");
    // QEMU kept its bitmaps and the replica has the log: the lost acknowledgement is settled
    // from the replica's state, no disk is compared.
    assert!(!s.resynchronized(), "{}", s.a.log_tail());
    s.points_are_instants(&before);
    s.ends_equal();
}

#[test]
#[ignore = "slow fault case: scripts/faults.sh runs it"]
fn the_primary_daemon_killed_during_the_transfer_heals_by_itself_and_loses_nothing() {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.105", "127.0.0.106", "lab");
    let proxy = FaultProxy::start(
        "127.0.0.107",
        format!("{}:{}", b.ip, b.port).parse().unwrap(),
    );
    // 8 MiB per disk and generation: every delta carries megabytes of incompressible blocks.
    let mut s = Scene::with(a, b, store, 2048, 200);
    s.replicate(Some(&proxy.addr.to_string()));
    // Slow the link so that a transfer lasts seconds, then kill the primary mid-log.
    proxy.throttle(2 << 20);
    let before = s.before_fault();
    proxy.wait_forwarded(3 << 20, T);
    s.a.kill_daemon();
    proxy.throttle(0);
    s.a.start();
    s.healed(&before, "primary killed during the transfer");
    s.points_are_instants(&before);
    s.ends_equal();
}

// ------------------------------------------------------------------ the replica's daemon

#[test]
#[ignore = "slow fault case: scripts/faults.sh runs it"]
fn the_replica_daemon_killed_while_it_receives_a_log_heals_by_itself_and_loses_nothing() {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.108", "127.0.0.109", "lab");
    let proxy = FaultProxy::start(
        "127.0.0.110",
        format!("{}:{}", b.ip, b.port).parse().unwrap(),
    );
    let mut s = Scene::with(a, b, store, 2048, 200);
    s.replicate(Some(&proxy.addr.to_string()));
    proxy.throttle(2 << 20);
    let before = s.before_fault();
    proxy.wait_forwarded(3 << 20, T);
    s.b.kill_daemon();
    proxy.throttle(0);
    s.b.start();
    s.healed(&before, "replica killed while receiving");
    s.points_are_instants(&before);
    s.ends_equal();
}

#[test]
fn the_replica_daemon_killed_in_the_middle_of_applying_a_log_reapplies_it_and_loses_nothing() {
    let _s = serial();
    let mut s = Scene::new("127.0.0.111", "127.0.0.112", 64, 100);
    s.replicate(None);
    let before = s.before_fault();
    // The log was acknowledged; its records are written into the top layer, not committed.
    crash_at(&mut s.b, "replica-applying");
    s.b.start();
    s.healed(&before, "replica killed while applying");
    s.points_are_instants(&before);
    s.ends_equal();
}

#[test]
#[ignore = "slow fault case: scripts/faults.sh runs it"]
fn the_replica_daemon_killed_after_the_log_is_durable_before_it_acknowledges_heals_by_itself() {
    let _s = serial();
    let mut s = Scene::new("127.0.0.113", "127.0.0.114", 64, 100);
    s.replicate(None);
    let before = s.before_fault();
    crash_at(&mut s.b, "replica-before-ack");
    s.b.start();
    s.healed(&before, "replica killed before its acknowledgement");
    s.points_are_instants(&before);
    s.ends_equal();
}

#[test]
#[ignore = "slow fault case: scripts/faults.sh runs it"]
fn the_replica_daemon_killed_with_a_crash_point_while_receiving_heals_by_itself() {
    let _s = serial();
    let mut s = Scene::new("127.0.0.115", "127.0.0.116", 64, 100);
    s.replicate(None);
    let before = s.before_fault();
    crash_at(&mut s.b, "replica-receiving");
    s.b.start();
    s.healed(&before, "replica crashed while receiving");
    s.points_are_instants(&before);
    s.ends_equal();
}

// ------------------------------------------------------------------ both hosts

#[test]
fn both_hosts_daemons_killed_at_once_heal_by_themselves_and_lose_nothing() {
    let _s = serial();
    let mut s = Scene::new("127.0.0.117", "127.0.0.118", 64, 100);
    s.replicate(None);
    let before = s.before_fault();
    // Whatever the cycle is doing at that moment, both die together.
    s.a.kill_daemon_now();
    s.b.kill_daemon_now();
    s.a.wait_daemon_gone(T);
    s.b.wait_daemon_gone(T);
    s.b.start();
    s.a.start();
    s.healed(&before, "both daemons killed");
    s.points_are_instants(&before);
    s.ends_equal();
}

// ------------------------------------------------------------------ the network

#[test]
fn a_byte_flipped_in_transit_is_rejected_by_tls_and_the_cycle_is_retried() {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.119", "127.0.0.120", "lab");
    let proxy = FaultProxy::start(
        "127.0.0.121",
        format!("{}:{}", b.ip, b.port).parse().unwrap(),
    );
    let mut s = Scene::with(a, b, store, 256, 100);
    s.replicate(Some(&proxy.addr.to_string()));
    let before = s.before_fault();
    // One byte of the stream towards the replica, well inside a log's records.
    proxy.flip_after(64 << 10);
    wait_until("the flipped byte", T, || proxy.flips() == 1);
    s.healed(&before, "a byte flipped in transit");
    let st = status(&s.a, VM);
    let failures = st["stats"]["failure_count"].as_u64().unwrap_or(0)
        + st["stats"]["network_failure_count"].as_u64().unwrap_or(0);
    assert!(
        failures >= 1,
        "the damaged cycle was not counted as failed: {st}"
    );
    let blog = std::fs::read_to_string(s.b.data().join("daemon.log")).unwrap_or_default();
    assert!(
        !blog.contains("failed verification"),
        "the damage reached the log's own checks instead of being refused by TLS: {}",
        s.b.log_tail()
    );
    s.points_are_instants(&before);
    s.ends_equal();
}

#[test]
#[ignore = "slow fault case: scripts/faults.sh runs it"]
fn the_link_cut_mid_transfer_in_a_network_namespace_and_restored_heals_by_itself() {
    let _s = serial();
    let tag = format!("{}", std::process::id() % 100_000);
    let ns = Netns::create(&tag, "10.213.13.1", "10.213.13.2");
    // The replica server runs inside the namespace; the CLI reaches it through its socket.
    let mut a = Host::init("hosta.test", "127.0.0.122");
    let mut b = Host::init_at("hostb.test", "10.213.13.2", free_port("127.0.0.122"), &[]);
    a.ok(&[
        "host",
        "trust",
        b.data().join("tls/ca.pem").to_str().unwrap(),
    ]);
    b.ok(&[
        "host",
        "trust",
        a.data().join("tls/ca.pem").to_str().unwrap(),
    ]);
    a.start();
    b.start_with(&["ip", "netns", "exec", &ns.name], &[]);
    let store = b.data().join("replicas-from-a");
    serve_replicas_for(&b, "hosta.test", &store);
    let mut s = Scene::with(a, b, store, 2048, 200);
    s.replicate(None);
    // A 16 MiB log then takes seconds on the link, so that the cut lands inside one.
    ns.throttle("24mbit");
    let before = s.before_fault();
    // Cut the link while a log is on its way.
    wait_until("a transfer in flight", T, || {
        let p = &status(&s.a, VM)["progress"];
        let done = p["bytes_done"].as_u64().unwrap_or(0);
        done > 0 && done < p["bytes_total"].as_u64().unwrap_or(0)
    });
    ns.link(false);
    let cut_at = s.acked();
    // Long enough for the cycle to fail: no new acknowledgement, and the error shows.
    wait_until("the primary to notice the cut", T, || {
        status(&s.a, VM)["last_error"].as_str().is_some()
    });
    assert_eq!(s.acked(), cut_at, "a log was acknowledged over a cut link");
    ns.link(true);
    s.missed_ok = true;
    s.healed(&before, "link cut and restored");
    s.points_are_instants(&before);
    s.ends_equal();
    drop(s);
    drop(ns);
}

// ------------------------------------------------------------------ the clock

#[test]
#[ignore = "slow fault case: scripts/faults.sh runs it"]
fn a_clock_jump_on_the_primary_forward_then_back_neither_stalls_replication_nor_counts_missed_cycles(
) {
    let _s = serial();
    let (mut a, b, store) = pair("127.0.0.123", "127.0.0.124", "lab");
    let clock = a.data().join("faketime");
    std::fs::write(&clock, "+0\n").unwrap();
    a.stop_daemon();
    let env = faketime_env(&clock);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    a.start_with(&[], &env);
    let mut s = Scene::with(a, b, store, 64, 100);
    s.replicate(None);
    // Three hours ahead: the hour-long gap is the clock's, not missed cycles.
    let before = s.before_fault();
    std::fs::write(&clock, "+3h\n").unwrap();
    wait_until("a cycle stamped by the clock ahead", T, || {
        status(&s.a, VM)["stats"]["last_replication_unix"]
            .as_u64()
            .is_some_and(|t| t > now_secs() + 3 * 3600 - 600)
    });
    s.healed(&before, "the clock jumped three hours ahead");
    let st = status(&s.a, VM);
    assert_eq!(
        st["stats"]["miss_count"].as_u64().unwrap_or(0),
        0,
        "a clock jump counted as missed cycles: {st}"
    );
    // And back: the clock falls three hours behind what the daemon last saw.
    let before = s.before_fault();
    std::fs::write(&clock, "+0\n").unwrap();
    s.healed(&before, "the clock jumped three hours back");
    s.points_are_instants(&before);
    s.ends_equal();
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
