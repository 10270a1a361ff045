//! End to end: UEFI firmware found through QEMU's firmware descriptors. An administrator's
//! descriptor in another folder hides the distribution's plain OVMF (an empty file of the same
//! name) and names a copy of it for q35 only: a generation 2 VM on q35 boots that copy, one on
//! i440fx falls back to the fixed path, Secure Boot still comes from the distribution's
//! descriptor, and `host info` and `doctor` say which file gave what.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const DIST: &str = "/usr/share/qemu/firmware";

/// The QEMU command line of a running VM.
fn qemu_cmdline(h: &Host, vm: &str) -> String {
    let pid = h.vm_pid(vm).expect("the VM runs");
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn entries<'a>(info: &'a Value, id: &str) -> Vec<&'a Value> {
    info["firmware"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["id"] == id)
        .collect()
}

#[test]
fn a_generation_2_vm_boots_the_firmware_an_administrators_descriptor_names_and_other_machines_fall_back(
) {
    let _s = serial();
    let mut h = Host::init("hostfw.test", "127.0.0.175");
    // The administrator's folder and a copy of the distribution's plain OVMF.
    let etc = h.data().join("etc-qemu-firmware");
    let local = h.data().join("local-ovmf");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&local).unwrap();
    let code = local.join("OVMF_CODE_4M.local.fd");
    let vars = local.join("OVMF_VARS_4M.local.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_CODE_4M.fd", &code).unwrap();
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).unwrap();
    // hide the distribution's plain descriptor, and add one for q35 only
    std::fs::write(etc.join("60-edk2-x86_64.json"), "").unwrap();
    let desc = serde_json::json!({
        "description": "a local OVMF build, q35 only",
        "interface-types": ["uefi"],
        "mapping": {
            "device": "flash",
            "executable": {"filename": code, "format": "raw"},
            "nvram-template": {"filename": vars, "format": "raw"}
        },
        "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}],
        "features": ["acpi-s3", "verbose-dynamic"],
        "tags": []
    });
    std::fs::write(etc.join("70-local.json"), desc.to_string()).unwrap();
    let cfg_path = h.data().join("config.toml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let dirs = format!(
        "firmware_descriptor_dirs = [{DIST:?}, {:?}]\n",
        etc.display().to_string()
    );
    std::fs::write(&cfg_path, format!("{dirs}{cfg}")).unwrap();
    h.start();

    // host info: ovmf-4m from the local descriptor for q35, then the fixed path for the rest;
    // Secure Boot from the distribution's descriptor.
    let info = h.json(&["host", "info"]);
    let plain = entries(&info, "ovmf-4m");
    assert_eq!(plain.len(), 2, "{info:#}");
    assert_eq!(
        plain[0]["descriptor"],
        etc.join("70-local.json").display().to_string()
    );
    assert_eq!(plain[0]["code"], code.display().to_string());
    assert_eq!(plain[0]["machines"], serde_json::json!(["pc-q35-*"]));
    assert!(plain[1].get("descriptor").is_none(), "{info:#}");
    assert_eq!(plain[1]["code"], "/usr/share/OVMF/OVMF_CODE_4M.fd");
    let sb = entries(&info, "ovmf-4m-secure-boot");
    assert_eq!(sb.len(), 1, "{info:#}");
    assert!(
        sb[0]["descriptor"].as_str().unwrap().starts_with(DIST),
        "{info:#}"
    );
    let text = h.ok(&["host", "info"]);
    assert!(
        text.contains("from descriptor") && text.contains("70-local.json"),
        "{text}"
    );
    assert!(text.contains("fixed path (ovmf_dir)"), "{text}");
    let doctor: Value = serde_json::from_slice(&h.run(&["--json", "doctor"]).stdout).unwrap();
    let fw = doctor["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "firmware")
        .cloned()
        .unwrap_or_else(|| panic!("no firmware finding: {doctor:#}"));
    assert_eq!(fw["status"], "ok", "{fw}");
    let msg = fw["message"].as_str().unwrap();
    assert!(
        msg.contains("70-local.json")
            && msg.contains("40-edk2-x86_64-secure-enrolled.json")
            && msg.contains("fixed paths"),
        "{msg}"
    );

    // A q35 VM gets the local copy's NVRAM template and boots its code.
    create_guest_vm(&h, "local", "2", &["8M"], "write:vda:16:1:2");
    let show = h.json(&["vm", "show", "local"]);
    assert!(
        show["definition"]["machine_type"]
            .as_str()
            .unwrap()
            .starts_with("pc-q35-"),
        "{show}"
    );
    h.ok(&["vm", "start", "local"]);
    let cmd = qemu_cmdline(&h, "local");
    assert!(cmd.contains(code.to_str().unwrap()), "{cmd}");
    h.wait_console("local", "VMREPL IDLE", Duration::from_secs(240));
    h.ok(&["vm", "shutdown", "local", "--timeout", "90"]);
    verify_image(&disk_path(&h, "local", 0), 16, "--gen", 2);

    // An i440fx VM: no descriptor names its machine type, so the fixed path.
    h.ok(&[
        "vm",
        "create",
        "pcvm",
        "--generation",
        "2",
        "--machine",
        "pc",
        "--memory",
        "128",
        "--disk",
        "8M",
        "--nic",
        "none",
    ]);
    h.ok(&["vm", "start", "pcvm"]);
    let cmd = qemu_cmdline(&h, "pcvm");
    assert!(
        cmd.contains("/usr/share/OVMF/OVMF_CODE_4M.fd") && !cmd.contains(code.to_str().unwrap()),
        "{cmd}"
    );
    h.ok(&["vm", "stop", "pcvm"]);
    assert!(Path::new(&code).exists());
}
