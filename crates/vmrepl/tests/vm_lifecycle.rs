//! End to end: VMs defined and run by a host through real QEMU (TCG) with the test guest.

mod common;
use common::*;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(120);

fn disk_path(h: &Host, vm: &str, i: usize) -> std::path::PathBuf {
    let v = h.json(&["vm", "show", vm]);
    v["definition"]["disks"][i]["path"].as_str().unwrap().into()
}

#[test]
fn a_generation_1_vm_writes_data_shuts_down_cleanly_and_the_data_is_on_disk() {
    let _s = serial();
    let mut h = Host::init("hosta.test", "127.0.0.1");
    h.start();
    create_guest_vm(
        &h,
        "gen1",
        "1",
        &["16M", "8M"],
        "write:vda:64:1:3,write:vdb:32:7:7,verify:vda:64:3",
    );
    let show = h.json(&["vm", "show", "gen1"]);
    assert_eq!(show["definition"]["machine_type"], "pc-i440fx-7.2");
    assert_eq!(show["definition"]["firmware"], "seabios");
    h.ok(&["vm", "start", "gen1"]);
    assert_eq!(h.vm_state("gen1"), "running");
    h.wait_console("gen1", "VMREPL IDLE", BOOT);
    let c = h.console("gen1");
    assert!(c.contains("VMREPL VERIFY dev=vda blocks=64 ok=64"), "{c}");
    h.ok(&["vm", "shutdown", "gen1", "--timeout", "60"]);
    assert_eq!(h.vm_state("gen1"), "off");
    verify_image(&disk_path(&h, "gen1", 0), 64, "--gen", 3);
    verify_image(&disk_path(&h, "gen1", 1), 32, "--gen", 7);
}

#[test]
fn a_generation_2_vm_boots_uefi_with_its_own_nvram_and_keeps_its_data() {
    let _s = serial();
    let mut h = Host::init("hostb.test", "127.0.0.2");
    h.start();
    create_guest_vm(&h, "gen2", "2", &["16M"], "write:vda:48:1:2");
    let show = h.json(&["vm", "show", "gen2"]);
    assert_eq!(show["definition"]["machine_type"], "pc-q35-7.2");
    assert_eq!(show["definition"]["firmware"], "ovmf-4m");
    let nvram = show["definition"]["nvram"].as_str().unwrap().to_string();
    assert!(
        std::path::Path::new(&nvram).starts_with(h.data()),
        "{nvram}"
    );
    h.ok(&["vm", "start", "gen2"]);
    h.wait_console("gen2", "VMREPL IDLE", Duration::from_secs(240));
    h.ok(&["vm", "shutdown", "gen2", "--timeout", "90"]);
    assert_eq!(h.vm_state("gen2"), "off");
    verify_image(&disk_path(&h, "gen2", 0), 48, "--gen", 2);
    h.ok(&["vm", "delete", "gen2"]);
    assert!(!std::path::Path::new(&nvram).exists());
}

#[test]
fn the_daemon_restarts_while_a_vm_runs_and_keeps_controlling_it_and_a_killed_qemu_is_reported_crashed(
) {
    let _s = serial();
    let mut h = Host::init("hostc.test", "127.0.0.3");
    h.start();
    create_guest_vm(&h, "survivor", "1", &["8M"], "writeloop:vda:16:200");
    h.ok(&["vm", "start", "survivor"]);
    h.wait_console("survivor", "VMREPL WROTE", BOOT);
    let pid = h.vm_pid("survivor").unwrap();
    h.stop_daemon();
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU died with the daemon"
    );
    h.start();
    assert_eq!(h.vm_state("survivor"), "running");
    assert_eq!(h.vm_pid("survivor"), Some(pid));
    // Still controllable after the restart: kill QEMU behind the daemon's back.
    std::process::Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .status()
        .unwrap();
    h.wait_state("survivor", "crashed", Duration::from_secs(20));
    let show = h.json(&["vm", "show", "survivor"]);
    assert!(
        show["note"]
            .as_str()
            .unwrap()
            .contains("without being asked"),
        "{show}"
    );
    // A crashed VM can be started again and stopped hard.
    h.ok(&["vm", "start", "survivor"]);
    h.wait_console("survivor", "VMREPL WROTE", BOOT);
    h.ok(&["vm", "stop", "survivor"]);
    assert_eq!(h.vm_state("survivor"), "off");
}

#[test]
fn bad_input_is_refused_with_the_cause_and_the_fix_and_changes_nothing() {
    let mut h = Host::init("hostd.test", "127.0.0.4");
    h.start();
    let before = h.json(&["vm", "list"]);
    let e = h.fails(&["vm", "create", "../escape", "--disk", "8M"]);
    assert!(e.contains("'..'"), "{e}");
    let e = h.fails(&["vm", "create", "", "--disk", "8M"]);
    assert!(e.contains("empty"), "{e}");
    let long = "x".repeat(65);
    let e = h.fails(&["vm", "create", &long]);
    assert!(e.contains("65 characters"), "{e}");
    let e = h.fails(&["vm", "create", "m", "--machine", "pc-q35-1.0-nonexistent"]);
    assert!(
        e.contains("unknown to this host's QEMU") && e.contains("pc-q35-7.2"),
        "{e}"
    );
    let elsewhere = tempfile::tempdir().unwrap();
    let e = h.fails(&[
        "vm",
        "create",
        "d",
        "--disk",
        "8M",
        "--folder",
        elsewhere.path().to_str().unwrap(),
    ]);
    assert!(e.contains("not one of this host's storage folders"), "{e}");
    let e = h.fails(&["vm", "create", "s", "--generation", "1", "--secure-boot"]);
    assert!(e.contains("generation 2"), "{e}");
    assert_eq!(
        h.json(&["vm", "list"]),
        before,
        "a refused request changed the VM list"
    );
    h.ok(&["vm", "create", "dup", "--disk", "8M"]);
    let e = h.fails(&["vm", "create", "dup", "--disk", "8M"]);
    assert!(e.contains("already exists"), "{e}");
    let e = h.fails(&["vm", "start", "nosuchvm"]);
    assert!(e.contains("no VM named"), "{e}");
    // A second daemon on the same data folder.
    let e = h.fails(&["daemon"]);
    assert!(e.contains("already runs"), "{e}");
    // Nothing left behind by the refusals: only dup's folder exists in storage.
    let dirs: Vec<_> = std::fs::read_dir(h.data().join("storage"))
        .unwrap()
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
}

#[test]
fn a_generation_2_vm_is_refused_on_a_host_without_ovmf() {
    let mut h = Host::init("hoste.test", "127.0.0.5");
    // Point the host's firmware search at an empty folder, and use no firmware descriptor: it
    // has SeaBIOS nowhere and OVMF nowhere.
    let cfg_path = h.data().join("config.toml");
    let empty = h.data().join("no-firmware");
    std::fs::create_dir_all(&empty).unwrap();
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let cfg = cfg
        .lines()
        .filter(|l| !l.starts_with("ovmf_dir") && !l.starts_with("seabios_dir"))
        .collect::<Vec<_>>()
        .join("\n");
    let e = format!("{:?}", empty.display().to_string());
    let cfg = format!("firmware_descriptor_dirs = []\novmf_dir = {e}\nseabios_dir = {e}\n{cfg}\n");
    std::fs::write(&cfg_path, cfg).unwrap();
    h.start();
    let e = h.fails(&["vm", "create", "uefi", "--generation", "2", "--disk", "8M"]);
    assert!(
        e.contains("no ovmf-4m firmware") && e.contains("apt-get install ovmf"),
        "{e}"
    );
    let info = h.json(&["host", "info"]);
    assert!(info["firmware"].as_array().unwrap().is_empty(), "{info}");
}

#[test]
fn storage_folders_disks_nvram_and_keys_are_owner_only_even_outside_the_data_folder() {
    use std::os::unix::fs::PermissionsExt;
    let outer = tempfile::tempdir().unwrap();
    // Folders that do not exist yet: `host init` creates them.
    let storage = outer.path().join("srv").join("vms");
    let storage_s = storage.to_str().unwrap();
    // An image to import, readable by everyone: the imported disk must not be.
    let src = outer.path().join("seed.raw");
    std::fs::write(&src, vec![0u8; 1 << 20]).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut h = Host::init_with("hostg.test", "127.0.0.7", &["--storage", storage_s]);
    h.start();
    create_guest_vm(&h, "modes", "2", &["8M", src.to_str().unwrap()], "idle");
    let show = h.json(&["vm", "show", "modes"]);
    assert!(
        show["definition"]["nvram"]
            .as_str()
            .is_some_and(|p| p.starts_with(storage_s)),
        "{show}"
    );
    for root in [outer.path().join("srv"), h.data().to_path_buf()] {
        let shared = shared_entries(&root);
        let listed: Vec<String> = shared
            .iter()
            .map(|(p, m)| format!("{} {m:o}", p.display()))
            .collect();
        assert!(listed.is_empty(), "not owner-only: {listed:?}");
    }
    let disks = std::fs::read_dir(storage.join(show["definition"]["uuid"].as_str().unwrap()))
        .unwrap()
        .count();
    assert_eq!(disks, 3, "two disks and the NVRAM");
    h.ok(&["vm", "delete", "modes"]);
}

#[test]
fn host_info_reports_capabilities_as_data() {
    let mut h = Host::init("hostf.test", "127.0.0.6");
    h.start();
    let info = h.json(&["host", "info"]);
    assert_eq!(info["host_name"], "hostf.test");
    assert!(
        info["qemu_version"].as_str().unwrap().starts_with("7.2"),
        "{info}"
    );
    let mts: Vec<&str> = info["machine_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        mts.contains(&"pc-q35-7.2") && mts.contains(&"pc-i440fx-7.2"),
        "{mts:?}"
    );
    assert!(
        !mts.contains(&"q35") && !mts.contains(&"pc"),
        "aliases must be resolved: {mts:?}"
    );
    let fw: Vec<&str> = info["firmware"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert!(fw.contains(&"seabios") && fw.contains(&"ovmf-4m"), "{fw:?}");
    assert!(info["storage"][0]["free_bytes"].as_u64().unwrap() > 0);
    assert!(info["kvm_usable"].is_boolean());
}
