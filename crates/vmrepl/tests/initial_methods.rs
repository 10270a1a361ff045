//! End to end: the initial copy reaches the replica by external media (export on the primary,
//! import on the replica) or from a copy that already exists on the replica host (reconciled
//! by block compare), with real QEMU guests and two hosts on loopback addresses.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[test]
fn an_initial_copy_exported_to_a_folder_and_imported_on_the_replica_starts_replication_without_the_network(
) {
    let _s = serial();
    let (mut a, b, store) = pair("127.0.0.41", "127.0.0.42", "lab");
    create_guest_vm(&a, "db", "1", &["16M"], "writeloop:vda:32:300");
    a.ok(&["vm", "start", "db"]);
    a.wait_console("db", "VMREPL WROTE", Duration::from_secs(120));
    let media = tempfile::tempdir().unwrap();
    let media_s = media.path().to_str().unwrap();

    // A folder that is not there is refused before anything is created.
    let e = refused(enable(
        &a,
        &b,
        "db",
        "hostb.test",
        &["--initial-export", "/nonexistent/usb"],
    ));
    assert!(e.contains("does not exist"), "{e}");
    assert!(b.json(&["replication", "status"])["relationships"]
        .as_array()
        .unwrap()
        .is_empty());

    let out = enable_ok(
        &a,
        &b,
        "db",
        "hostb.test",
        &["--frequency", "5", "--initial-export", media_s],
    );
    assert!(out.contains("replication import db"), "{out}");
    let file = media.path().join("db.vmrlog");
    wait_until("the export", Duration::from_secs(120), || {
        file.exists()
            && status(&a, "db")["note"]
                .as_str()
                .is_some_and(|n| n.contains("exported"))
    });
    // The export holds the whole disk: readable by its owner only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "export mode {mode:o}");
    let s = status(&a, "db");
    assert_eq!(s["state"], "waiting-for-initial-replication", "{s}");
    assert_eq!(s["health"], "warning", "{s}");
    // Nothing went over the network: the replica holds no log, and after a few more
    // polls still none.
    let replica_seq = || {
        b.json(&["replication", "status", "db"])["relationships"][0]["last_sequence"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(replica_seq(), 0);

    // A daemon restart does not export again: the media may be on its way already.
    let exported_at = std::fs::metadata(&file).unwrap().modified().unwrap();
    a.stop_daemon();
    a.start();
    // Every connection of the primary starts with a hello in the replica's log.
    let polls = |h: &Host| {
        std::fs::read_to_string(h.data().join("daemon.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("hello") && l.contains("hosta.test"))
            .count()
    };
    let seen = polls(&b);
    wait_until(
        "the primary asking the replica again",
        Duration::from_secs(60),
        || polls(&b) > seen,
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        exported_at
    );
    assert_eq!(status(&a, "db")["state"], "waiting-for-initial-replication");
    // An import of db that must be refused, changing nothing: what it said.
    let refused_import = |from: &std::path::Path| {
        let e = b.fails(&[
            "replication",
            "import",
            "db",
            "--from",
            from.to_str().unwrap(),
        ]);
        assert_eq!(replica_seq(), 0);
        e
    };
    // A damaged copy (cut short on the way) is refused and changes nothing.
    let damaged_dir = tempfile::tempdir().unwrap();
    let damaged = damaged_dir.path().join("db.vmrlog");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&damaged, &bytes[..bytes.len() / 2]).unwrap();
    let e = refused_import(&damaged);
    assert!(e.contains("not a usable initial copy"), "{e}");
    // A forged copy, a valid log for this VM with other data, is refused too: only the file
    // the primary announced over TLS is imported.
    let (header, _) = vmrepl_log::verify(&file).unwrap();
    let forged = damaged_dir.path().join("forged.vmrlog");
    let mut w =
        vmrepl_log::LogWriter::new(std::fs::File::create(&forged).unwrap(), header).unwrap();
    w.write_data(0, 0, &[0x66; 4096]).unwrap();
    w.finish().unwrap();
    vmrepl_log::verify(&forged).unwrap();
    let e = refused_import(&forged);
    assert!(e.contains("does not match what hosta.test exported"), "{e}");
    // A name that is not a replica here.
    let e = b.fails(&["replication", "import", "nosuch", "--from", media_s]);
    assert!(e.contains("keeps no replica of a VM named nosuch"), "{e}");
    assert_eq!(status(&a, "db")["state"], "waiting-for-initial-replication");

    // A primary revoked since its export takes its media with it.
    b.ok(&["replication", "server", "revoke", "--primary", "hosta.test"]);
    let e = refused_import(media.path());
    assert!(e.contains("not authorized on this host any more"), "{e}");
    authorize(&b, "hosta.test", &store, "lab");

    // The real import, by folder: the primary notices and sends the changes since the export.
    let msg = b.ok(&["replication", "import", "db", "--from", media_s]);
    assert!(msg.contains("imported"), "{msg}");
    assert!(replica_seq() >= 1);
    wait_until(
        "replicating after the import",
        Duration::from_secs(60),
        || status(&a, "db")["state"] == "replicating",
    );
    wait_until("a delta after the import", Duration::from_secs(120), || {
        acked(&a, "db") >= 2
    });
    // Statistics count the network cycles only: neither the export nor the import.
    let s = status(&a, "db");
    let cycles = s["stats"]["success_count"].as_u64().unwrap();
    assert!(cycles >= 1 && cycles < acked(&a, "db"), "{s}");
    let e = b.fails(&["replication", "import", "db", "--from", media_s]);
    assert!(e.contains("already holds"), "{e}");

    // Stop the workload; after one cycle with the VM off the replica equals the primary.
    a.ok(&["vm", "shutdown", "db", "--timeout", "90"]);
    let gen = last_stopped_gen(&a.console("db"), "vda");
    let after_off = acked(&a, "db");
    wait_until("a cycle with the VM off", Duration::from_secs(120), || {
        acked(&a, "db") > after_off
    });
    let top = replica_image(&store, &a, "db", 0, "top.qcow2");
    same_content(&disk_path(&a, "db", 0), &top).unwrap();
    verify_image(&top, 32, "--gen", gen);
    let s = status(&a, "db");
    assert_eq!(s["health"], "normal", "{s}");
    assert!(s["note"].is_null(), "{s}");
}

/// Writes generation `gen` into blocks 0..blocks of a new raw image and converts it to qcow2:
/// what a restored backup of the VM's disk looks like.
fn image_with_data(dir: &Path, name: &str, size: &str, blocks: u32, gen: u64) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    let qcow = dir.join(format!("{name}.qcow2"));
    assert!(Command::new("truncate")
        .args(["-s", size])
        .arg(&raw)
        .status()
        .unwrap()
        .success());
    let o = Command::new(&guest().blockio)
        .arg("write")
        .arg(&raw)
        .args(["--blocks", &blocks.to_string()])
        .args(["--from-gen", &gen.to_string(), "--to-gen", &gen.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .status()
        .unwrap()
        .success());
    std::fs::remove_file(&raw).unwrap();
    qcow
}

#[test]
fn a_copy_that_already_exists_on_the_replica_host_is_reconciled_by_block_compare_and_only_differences_are_sent(
) {
    let _s = serial();
    let (a, b, store) = pair("127.0.0.43", "127.0.0.44", "lab");
    let work = tempfile::tempdir().unwrap();
    // 8 MiB of data on a 32 MiB disk: the primary's disk and, restored on hostb, its backup.
    let backup = image_with_data(work.path(), "backup", "32M", 2048, 1);
    let backup_s = backup.to_str().unwrap();
    // The primary VM boots once from it and rewrites 64 blocks (256 KiB) with generation 2.
    create_guest_vm(&a, "app", "1", &[backup_s], "write:vda:64:2:2,poweroff");
    a.ok(&["vm", "start", "app"]);
    a.wait_state("app", "off", Duration::from_secs(120));

    let refused_copy = || {
        refused(enable(
            &a,
            &b,
            "app",
            "hostb.test",
            &["--initial-existing-copy"],
        ))
    };
    let designate = || {
        b.ok(&[
            "replication",
            "server",
            "accept-copy",
            "app",
            "--primary",
            "hosta.test",
        ])
    };
    // No copy on hostb yet: refused, naming the host and what its admin does.
    let e = refused_copy();
    assert!(e.contains("no VM on hostb.test is designated"), "{e}");
    assert!(e.contains("accept-copy app --primary hosta.test"), "{e}");
    // A VM of that name that hostb's admin did not designate: the same answer (the primary
    // learns nothing of it), and it stays as it was.
    create_guest_vm(&b, "app", "1", &["16M"], "idle");
    let e2 = refused_copy();
    assert_eq!(e2, e);
    assert_eq!(b.vm_state("app"), "off");
    // Designated, but its disk does not match: refused, and it stays as it was.
    designate();
    let e = refused_copy();
    assert!(e.contains("do not match"), "{e}");
    assert!(e.contains("disk0 16777216 bytes"), "{e}");
    assert_eq!(b.vm_state("app"), "off");
    b.ok(&["vm", "delete", "app"]);
    // A copy of another generation is refused too.
    create_guest_vm(&b, "app", "2", &[backup_s], "idle");
    designate();
    let e = refused_copy();
    assert!(e.contains("generation"), "{e}");
    b.ok(&["vm", "delete", "app"]);

    // The restored backup, registered on hostb under the VM's name and designated for hosta.
    create_guest_vm(&b, "app", "1", &[backup_s], "idle");
    designate();
    enable_ok(
        &a,
        &b,
        "app",
        "hostb.test",
        &["--frequency", "5", "--initial-existing-copy"],
    );
    // hostb's VM became the replica: it is no longer a VM of its own there.
    assert!(local_vms(&b)
        .iter()
        .all(|v| v["definition"]["name"] != "app"));
    // It is listed as the replica it now is.
    assert!(b.ok(&["vm", "list"]).contains("replica of app"));
    wait_until("replicating", Duration::from_secs(120), || {
        status(&a, "app")["state"] == "replicating"
    });
    let s = status(&a, "app");
    let sent = s["stats"]["total_bytes"].as_u64().unwrap();
    // One 1 MiB compare block differs; a full copy would be more than 8 MiB.
    assert!(sent < 2 << 20, "sent {sent} bytes: {s}");
    assert!(sent > 0, "{s}");
    let top = replica_image(&store, &a, "app", 0, "top.qcow2");
    same_content(&disk_path(&a, "app", 0), &top).unwrap();
    // Deltas follow as usual.
    let n = acked(&a, "app");
    wait_until("one more cycle", Duration::from_secs(60), || {
        acked(&a, "app") > n
    });
    assert_eq!(status(&a, "app")["health"], "normal");
}
