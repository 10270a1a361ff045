//! End to end: a disk of a VM that is off, changed outside vmrepl in a way its change-tracking
//! bitmaps cannot see, is caught before the next cycle (or VM start) and resynchronized by
//! itself, and the replica's latest state equals the primary's disk again.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

/// Starts `web` (one 16 MiB disk, a guest writing), replicates it every 5 s from a to b until
/// healthy, and shuts the VM down through vmrepl; returns after a cycle ran with the VM off.
fn replicating_then_off(a: &Host, b: &Host) {
    create_guest_vm(a, "web", "1", &["16M"], "writeloop:vda:64:200");
    a.ok(&["vm", "start", "web"]);
    a.wait_console("web", "VMREPL WROTE", Duration::from_secs(120));
    enable_ok(a, b, "web", "hostb.test", &["--frequency", "5"]);
    a.ok(&["replication", "status", "web", "--watch", "--for", "180"]);
    assert_eq!(status(a, "web")["resync"]["mode"], "automatic");
    a.ok(&["vm", "shutdown", "web", "--timeout", "90"]);
    just_after_a_cycle(a);
}

/// Waits until a cycle was acknowledged; returns the new sequence. The storage daemon of a
/// VM that is off has quit by then (it closes before the acknowledgement is recorded), and the
/// next cycle is an interval away: an edit now cannot meet vmrepl holding the file.
fn just_after_a_cycle(a: &Host) -> u64 {
    let before = acked(a, "web");
    wait_until("a cycle", Duration::from_secs(120), || {
        acked(a, "web") > before
    });
    acked(a, "web")
}

/// Waits, without any operator command, until the relationship resynchronized past `seq`
/// and is replicating again.
fn resynchronized_by_itself(a: &Host, seq: u64) {
    wait_until(
        "replicating again after a resynchronization",
        Duration::from_secs(180),
        || {
            let s = status(a, "web");
            s["state"] == "replicating" && s["last_sequence"].as_u64().unwrap() > seq
        },
    );
    let log = std::fs::read_to_string(a.data().join("daemon.log")).unwrap_or_default();
    assert!(
        log.contains("resynchronization started by itself"),
        "{}",
        a.log_tail()
    );
}

/// The cause the daemon recorded for disk `disk` (its sentence), or the log's tail.
fn recorded_cause(a: &Host, disk: &Path) -> String {
    let needle = format!(
        "the disk {} of VM web was modified while the VM was off",
        disk.display()
    );
    let found = || {
        std::fs::read_to_string(a.data().join("daemon.log"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains(&needle))
            .map(str::to_string)
    };
    wait_until(
        &format!("an event naming {needle:?}"),
        Duration::from_secs(30),
        || found().is_some(),
    );
    found().unwrap()
}

/// Where guest range `[start, start+len)` lies in the qcow2 file `img`: the host offset of the
/// first data extent of at least `len` bytes, as `qemu-img map` reports it.
fn first_data_extent(img: &Path, len: u64) -> (u64, u64) {
    let o = std::process::Command::new("qemu-img")
        .args(["map", "-U", "--output=json", "-f", "qcow2"])
        .arg(img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let map: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["data"] == true
                && e["offset"].is_u64()
                && e["length"].as_u64().unwrap() >= len
                && e["offset"].as_u64().unwrap() % len == 0
        })
        .map(|e| (e["start"].as_u64().unwrap(), e["offset"].as_u64().unwrap()))
        .unwrap_or_else(|| panic!("no data extent of {len} bytes in {map}"))
}

#[test]
fn a_raw_edit_of_a_disk_of_a_vm_that_is_off_is_caught_before_the_next_cycle_and_resynchronized_by_itself(
) {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.91", "127.0.0.92", "lab");
    replicating_then_off(&a, &b);
    let disk = disk_path(&a, "web", 0);
    let replica = replica_image(&store, &a, "web", 0, "top.qcow2");
    same_content(&disk, &replica).unwrap();
    // Right after a cycle, 64 KiB of guest data are overwritten in the qcow2 file itself, as
    // `dd conv=notrunc` would: no QEMU sees the write, so no bitmap records it.
    let seq = just_after_a_cycle(&a);
    let (guest_off, host_off) = first_data_extent(&disk, 65536);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&[0x5a; 65536], host_off).unwrap();
        f.sync_all().unwrap();
    }
    // Caught before the next cycle read the disk, named in the event, resynchronized with no
    // operator command.
    resynchronized_by_itself(&a, seq);
    let cause = recorded_cause(&a, &disk);
    assert!(
        cause.contains("its modification time changed from"),
        "{cause}"
    );
    assert!(cause.contains("resynchronization"), "{cause}");
    // The replica's latest state is the primary's disk, the edited range included.
    same_content(&disk, &replica).unwrap();
    let o = std::process::Command::new("qemu-io")
        .args(["-r", "-U", "-f", "qcow2", "-c"])
        .arg(format!("read -P 0x5a {guest_off} 64k"))
        .arg(&replica)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && !out.contains("Pattern verification failed"),
        "the replica lacks the edit: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s = status(&a, "web");
    assert_eq!(s["health"], "normal", "{s}");
    // Tracking is trusted again: later cycles are deltas that change nothing.
    let after = just_after_a_cycle(&a);
    just_after_a_cycle(&a);
    assert_eq!(status(&a, "web")["state"], "replicating");
    assert!(acked(&a, "web") > after);
    same_content(&disk, &replica).unwrap();
}

#[test]
fn an_older_copy_restored_over_a_disk_of_a_vm_that_is_off_is_caught_at_vm_start_and_resynchronized_by_itself(
) {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.93", "127.0.0.94", "lab");
    replicating_then_off(&a, &b);
    let disk = disk_path(&a, "web", 0);
    let replica = replica_image(&store, &a, "web", 0, "top.qcow2");
    // A backup of the disk, taken while the VM is off (bitmaps and all).
    let backup = a.data().join("web-0.backup.qcow2");
    let st = std::process::Command::new("cp")
        .args(["-p", "--sparse=always"])
        .arg(&disk)
        .arg(&backup)
        .status()
        .unwrap();
    assert!(st.success());
    // The VM runs on; its guest writes, and the deltas carry it to the replica.
    a.ok(&["vm", "start", "web"]);
    a.wait_console("web", "VMREPL WROTE", Duration::from_secs(120));
    just_after_a_cycle(&a);
    just_after_a_cycle(&a);
    a.ok(&["vm", "shutdown", "web", "--timeout", "90"]);
    just_after_a_cycle(&a);
    same_content(&disk, &replica).unwrap();
    assert!(
        same_content(&backup, &replica).is_err(),
        "the guest wrote after the backup"
    );
    // The backup is restored over the disk, its times preserved (`cp -p`), and the VM is
    // started at once: before any cycle could see it.
    let seq = just_after_a_cycle(&a);
    let st = std::process::Command::new("cp")
        .args(["-p", "--sparse=always"])
        .arg(&backup)
        .arg(&disk)
        .status()
        .unwrap();
    assert!(st.success());
    a.ok(&["vm", "start", "web"]);
    // The start caught it: the cause names the disk, and says what only a restore changes.
    let cause = recorded_cause(&a, &disk);
    assert!(
        cause.contains("its status-change time changed from"),
        "{cause}"
    );
    resynchronized_by_itself(&a, seq);
    // The restored guest runs on; once it is shut down, the replica's latest state is the
    // primary's disk.
    a.wait_console("web", "VMREPL WROTE", Duration::from_secs(120));
    a.ok(&["vm", "shutdown", "web", "--timeout", "90"]);
    just_after_a_cycle(&a);
    same_content(&disk, &replica).unwrap();
    let s = status(&a, "web");
    assert_eq!(s["state"], "replicating", "{s}");
    assert_eq!(s["health"], "normal", "{s}");
}

#[test]
fn a_disk_replaced_by_qemu_img_convert_while_the_primary_daemon_was_stopped_is_caught_when_it_starts_again(
) {
    let _s = serial();
    let (mut a, b, store) = pair("127.0.0.95", "127.0.0.96", "lab");
    replicating_then_off(&a, &b);
    let disk = disk_path(&a, "web", 0);
    let replica = replica_image(&store, &a, "web", 0, "top.qcow2");
    let seq = just_after_a_cycle(&a);
    a.stop_daemon();
    // A new image put in the disk's place: converted (which drops the bitmaps), edited, and
    // moved over the old file.
    let new = disk.with_extension("new.qcow2");
    let run = |cmd: &mut std::process::Command| {
        let o = cmd.output().unwrap();
        assert!(
            o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("error"),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "qcow2"])
        .arg(&disk)
        .arg(&new));
    run(std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x6b 8M 64k"])
        .arg(&new));
    std::fs::rename(&new, &disk).unwrap();
    // The fingerprint outlived the daemon: the first cycle after it starts catches the change.
    a.start();
    resynchronized_by_itself(&a, seq);
    let cause = recorded_cause(&a, &disk);
    assert!(cause.contains("it is another file now"), "{cause}");
    same_content(&disk, &replica).unwrap();
    let s = status(&a, "web");
    assert_eq!(s["health"], "normal", "{s}");
}

#[test]
fn a_killed_qemu_still_loses_tracking_through_its_bitmaps_and_is_not_reported_as_an_offline_edit() {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.97", "127.0.0.98", "lab");
    create_guest_vm(&a, "web", "1", &["16M"], "writeloop:vda:64:200");
    a.ok(&["vm", "start", "web"]);
    a.wait_console("web", "VMREPL WROTE", Duration::from_secs(120));
    enable_ok(&a, &b, "web", "hostb.test", &["--frequency", "5"]);
    a.ok(&["replication", "status", "web", "--watch", "--for", "180"]);
    let seq = acked(&a, "web");
    let pid = a.vm_pid("web").unwrap();
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    a.wait_state("web", "crashed", Duration::from_secs(30));
    // The bitmaps died with QEMU: no delta can be acknowledged any more, so a newer sequence
    // means the resynchronization ran.
    resynchronized_by_itself(&a, seq);
    let log = std::fs::read_to_string(a.data().join("daemon.log")).unwrap_or_default();
    assert!(
        !log.contains("was modified while the VM was off"),
        "a crash is not an offline edit\n{}",
        a.log_tail()
    );
    let disk = disk_path(&a, "web", 0);
    let replica = replica_image(&store, &a, "web", 0, "top.qcow2");
    just_after_a_cycle(&a);
    same_content(&disk, &replica).unwrap();
}

#[test]
fn a_disk_edited_after_its_qemu_exited_while_the_primary_daemon_was_stopped_is_resynchronized_by_itself(
) {
    let _s = serial();
    // .91 again: the tests of this file run one at a time.
    let (mut a, b, store) = pair("127.0.0.99", "127.0.0.91", "lab");
    create_guest_vm(&a, "web", "1", &["16M"], "writeloop:vda:64:200");
    a.ok(&["vm", "start", "web"]);
    a.wait_console("web", "VMREPL WROTE", Duration::from_secs(120));
    enable_ok(&a, &b, "web", "hostb.test", &["--frequency", "5"]);
    a.ok(&["replication", "status", "web", "--watch", "--for", "180"]);
    let seq = just_after_a_cycle(&a);
    // The host goes down with the VM running: the daemon first, then QEMU, cleanly (SIGTERM:
    // its bitmaps are saved and look consistent), and the disk is edited before the daemon
    // is back. Nothing of vmrepl saw QEMU leave the file.
    let pid = a.vm_pid("web").unwrap();
    let disk = disk_path(&a, "web", 0);
    a.stop_daemon();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    wait_until("QEMU gone", Duration::from_secs(30), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    let (_, host_off) = first_data_extent(&disk, 65536);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&[0x3c; 65536], host_off).unwrap();
        f.sync_all().unwrap();
    }
    a.start();
    resynchronized_by_itself(&a, seq);
    let log = std::fs::read_to_string(a.data().join("daemon.log")).unwrap_or_default();
    assert!(
        log.contains("the QEMU of VM web exited while the vmrepl daemon was not running"),
        "{}",
        a.log_tail()
    );
    let replica = replica_image(&store, &a, "web", 0, "top.qcow2");
    just_after_a_cycle(&a);
    same_content(&disk, &replica).unwrap();
}

#[test]
fn an_old_primary_disk_edited_after_a_planned_failover_is_resynchronized_by_compare_when_replication_is_reversed(
) {
    let _s = serial();
    // .92 and .93 again: the tests of this file run one at a time.
    let (a, b, _) = pair("127.0.0.92", "127.0.0.93", "DEFAULT");
    let store_a = a.data().join("replicas-from-b");
    serve_replicas_for(&a, "hostb.test", &store_a);
    create_guest_vm(&a, "web", "1", &["16M"], "writeloop:vda:64:200");
    a.ok(&["vm", "start", "web"]);
    a.wait_console("web", "VMREPL WROTE", Duration::from_secs(120));
    enable_ok(&a, &b, "web", "hostb.test", &["--frequency", "5"]);
    a.ok(&["replication", "status", "web", "--watch", "--for", "180"]);
    a.ok(&["vm", "shutdown", "web", "--timeout", "90"]);
    a.ok(&["failover", "prepare", "web"]);
    // Prepared: every write is on the replica. Then the old primary's disk is edited behind
    // vmrepl's back, so it is no longer the failover point.
    let disk_a = disk_path(&a, "web", 0);
    let (_, host_off) = first_data_extent(&disk_a, 65536);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk_a)
            .unwrap();
        f.write_all_at(&[0xa5; 65536], host_off).unwrap();
        f.sync_all().unwrap();
    }
    b.ok(&["failover", "start", "web"]);
    let out = b.ok(&["replication", "reverse", "web", "--frequency", "5"]);
    assert!(
        out.contains("resynchronized by block compare")
            && out.contains(&format!(
                "the disk {} of VM web was modified while the VM was off",
                disk_a.display()
            )),
        "{out}"
    );
    wait_until(
        "the reverse resynchronized",
        Duration::from_secs(180),
        || {
            let s = status(&b, "web");
            s["state"] == "replicating" && s["last_sequence"].as_u64().unwrap() > 0
        },
    );
    // A's copy, now the replica, is B's disk again: the edit did not survive.
    let replica_a = replica_image(&store_a, &b, "web", 0, "top.qcow2");
    same_content(&disk_path(&b, "web", 0), &replica_a).unwrap();
}

#[test]
fn a_backup_moved_over_the_disk_of_a_running_vm_is_caught_when_the_vm_shuts_down_and_resynchronized_by_itself(
) {
    let _s = serial();
    // .94 and .95 again: the tests of this file run one at a time.
    let (a, b, store) = pair("127.0.0.94", "127.0.0.95", "lab");
    replicating_then_off(&a, &b);
    let disk = disk_path(&a, "web", 0);
    let replica = replica_image(&store, &a, "web", 0, "top.qcow2");
    // A backup taken while the VM is off: its bitmaps are consistent, only older.
    let backup = a.data().join("web-0.backup.qcow2");
    let st = std::process::Command::new("cp")
        .args(["--sparse=always"])
        .arg(&disk)
        .arg(&backup)
        .status()
        .unwrap();
    assert!(st.success());
    a.ok(&["vm", "start", "web"]);
    a.wait_console("web", "VMREPL WROTE", Duration::from_secs(120));
    just_after_a_cycle(&a);
    let seq = just_after_a_cycle(&a);
    // Restored into the running VM: moved over the disk path while QEMU holds the old file.
    std::fs::rename(&backup, &disk).unwrap();
    a.ok(&["vm", "shutdown", "web", "--timeout", "90"]);
    let needle = format!(
        "the disk {} of VM web was replaced while QEMU had it open",
        disk.display()
    );
    wait_until("the replacement named", Duration::from_secs(30), || {
        std::fs::read_to_string(a.data().join("daemon.log"))
            .unwrap_or_default()
            .contains(&needle)
    });
    resynchronized_by_itself(&a, seq);
    just_after_a_cycle(&a);
    same_content(&disk, &replica).unwrap();
    assert_eq!(status(&a, "web")["health"], "normal");
}

#[test]
fn an_edit_by_a_tool_that_kept_the_bitmaps_declared_with_trust_disks_goes_out_as_a_delta() {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.131", "127.0.0.132", "lab");
    a.ok(&["vm", "create", "db", "--generation", "1", "--disk", "32M"]);
    enable_ok(&a, &b, "db", "hostb.test", &["--frequency", "5"]);
    wait_until("the initial copy", Duration::from_secs(60), || {
        acked(&a, "db") >= 1
    });
    let disk = disk_path(&a, "db", 0);
    a.ok(&["replication", "pause", "db"]);
    let st = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -q -P 0x3c 4M 64k"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(st.success());
    let said = a.ok(&["vm", "trust-disks", "db"]);
    assert!(said.contains("taken as they are now"), "{said}");
    let seq = acked(&a, "db");
    a.ok(&["replication", "resume", "db"]);
    wait_until("the next delta", Duration::from_secs(60), || {
        acked(&a, "db") > seq
    });
    let log = std::fs::read_to_string(a.data().join("daemon.log")).unwrap_or_default();
    assert!(
        !log.contains("was modified while the VM was off")
            && !log.contains("resynchronization started"),
        "{}",
        a.log_tail()
    );
    assert_eq!(status(&a, "db")["state"], "replicating");
    let replica = replica_image(&store, &a, "db", 0, "top.qcow2");
    same_content(&disk, &replica).unwrap();
}
