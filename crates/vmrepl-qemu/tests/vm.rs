//! A real QEMU (TCG, SeaBIOS, no bootable disk) driven through cmdline + process + QMP.
mod common;

use common::{init_logs, small_vm, wait_until, KillGuard, QEMU};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use vmrepl_qemu::img::QemuImg;
use vmrepl_qemu::process::{ExitInfo, ProcessError, QemuProcess, SpawnOptions};
use vmrepl_qemu::{is_alive, QmpError};

const T: Duration = Duration::from_secs(30);

async fn start(dir: &Path) -> (QemuProcess, KillGuard, vmrepl_qemu::RunPaths) {
    let (vm, argv, paths) = small_vm(dir).await;
    let cmd = vmrepl_qemu::cmdline::build_command(
        &vm,
        &vmrepl_types::FirmwareVariant::fixed(
            vm.firmware,
            "/usr/share/seabios/bios-256k.bin".into(),
            None,
        ),
        &paths,
        vmrepl_qemu::ResolvedAccel::Tcg,
    )
    .unwrap();
    assert_eq!(cmd.argv, argv);
    let p = QemuProcess::spawn(
        Path::new(QEMU),
        &argv,
        &SpawnOptions::new(dir.join("qemu.log"), &paths.qmp_sock),
    )
    .await
    .unwrap();
    let guard = KillGuard(p.pid());
    assert_eq!(
        p.status().await.unwrap(),
        "prelaunch",
        "started paused (-S)"
    );
    for c in &cmd.startup {
        p.qmp()
            .execute(&c.execute, c.arguments.clone())
            .await
            .unwrap();
    }
    assert_eq!(p.status().await.unwrap(), "running");
    (p, guard, paths)
}

#[tokio::test]
async fn vm_runs_takes_a_persistent_bitmap_and_persists_it_on_quit() {
    init_logs();
    let d = tempfile::tempdir().unwrap();
    let (p, _g, paths) = start(d.path()).await;
    let pid_in_file: i32 = std::fs::read_to_string(&paths.pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid_in_file, p.pid());
    assert_eq!(
        p.qmp().execute("query-name", Value::Null).await.unwrap()["name"],
        "t1"
    );

    // The not-connected NIC sits alone on its hub; its link was set down by the startup
    // steps (set_link on a name that does not exist fails, so that step found the device).
    let net = p
        .qmp()
        .execute(
            "human-monitor-command",
            json!({"command-line": "info network"}),
        )
        .await
        .unwrap();
    assert!(
        net.as_str().unwrap().contains("hub 1000") && net.as_str().unwrap().contains("net0-dev"),
        "{net}"
    );
    let e = p
        .qmp()
        .execute("set_link", json!({"name": "nope", "up": false}))
        .await
        .unwrap_err();
    assert_eq!(e.class(), Some("DeviceNotFound"), "{e}");

    // Concurrent callers on one connection.
    let (a, b) = tokio::join!(
        p.qmp().execute("query-status", Value::Null),
        p.qmp().execute("query-name", Value::Null)
    );
    assert_eq!(a.unwrap()["status"], "running");
    assert_eq!(b.unwrap()["name"], "t1");

    p.qmp()
        .execute(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "repl-0", "persistent": true}),
        )
        .await
        .unwrap();
    let e = p
        .qmp()
        .execute(
            "block-dirty-bitmap-add",
            json!({"node": "nonode", "name": "x"}),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, QmpError::Command { class, desc, .. } if class == "GenericError" && desc.contains("nonode")),
        "{e}"
    );

    let mut events = p.qmp().subscribe();
    let exit = p.quit(T).await.unwrap();
    assert!(
        matches!(exit, ExitInfo::Status(ref s) if s.contains("0")),
        "{exit:?}"
    );
    let ev = p
        .qmp()
        .wait_event(&mut events, |e| e.event == "SHUTDOWN", Instant::now() + T)
        .await
        .unwrap();
    assert_eq!(ev.data["reason"], "host-qmp-quit");
    assert!(p.qmp().is_closed());
    assert!(!p.is_running());

    let info = QemuImg::default()
        .info(&d.path().join("disk0.qcow2"))
        .await
        .unwrap();
    assert_eq!(info.bitmaps.len(), 1);
    assert_eq!(info.bitmaps[0].name, "repl-0");
    assert!(info.bitmaps[0].enabled() && !info.bitmaps[0].inconsistent());
}

#[tokio::test]
async fn reattach_after_the_client_is_dropped() {
    init_logs();
    let d = tempfile::tempdir().unwrap();
    let (p, _g, paths) = start(d.path()).await;
    let pid = p.pid();
    drop(p); // the daemon "restarts": QEMU keeps running
    assert!(is_alive(pid));
    let p2 = QemuProcess::attach(pid, &paths.qmp_sock, T).await.unwrap();
    assert_eq!(p2.status().await.unwrap(), "running");
    assert_eq!(
        p2.qmp().execute("query-name", Value::Null).await.unwrap()["name"],
        "t1"
    );
    // A pid that is not this QEMU is refused.
    let e = QemuProcess::attach(std::process::id() as i32, &paths.qmp_sock, T)
        .await
        .unwrap_err();
    assert!(matches!(e, ProcessError::NotOurQemu { .. }), "{e}");
    p2.quit(T).await.unwrap();
    assert!(!is_alive(pid));
    let e = QemuProcess::attach(pid, &paths.qmp_sock, T)
        .await
        .unwrap_err();
    assert!(matches!(e, ProcessError::NotRunning { .. }), "{e}");
}

#[tokio::test]
async fn sigkill_is_seen_as_exit_by_the_process_layer_and_qmp() {
    init_logs();
    let d = tempfile::tempdir().unwrap();
    let (p, _g, _paths) = start(d.path()).await;
    p.qmp()
        .execute(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "repl-0", "persistent": true}),
        )
        .await
        .unwrap();
    p.kill();
    let exit = p.wait_exit(T).await.unwrap();
    assert!(
        matches!(exit, ExitInfo::Status(ref s) if s.contains("9")),
        "{exit:?}"
    );
    tokio::time::timeout(T, p.qmp().closed()).await.unwrap();
    wait_until("pid gone", T, || !is_alive(p.pid())).await;
    let e = p
        .qmp()
        .execute("query-status", Value::Null)
        .await
        .unwrap_err();
    assert!(matches!(e, QmpError::Closed { .. }), "{e}");
    // A bitmap created during a run that did not end cleanly is simply absent.
    let info = QemuImg::default()
        .info(&d.path().join("disk0.qcow2"))
        .await
        .unwrap();
    assert!(info.bitmaps.is_empty(), "{:?}", info.bitmaps);
}

#[tokio::test]
async fn a_failed_start_reports_qemus_own_message() {
    init_logs();
    let d = tempfile::tempdir().unwrap();
    let (_vm, mut argv, paths) = small_vm(d.path()).await;
    let i = argv.iter().position(|a| a == "-machine").unwrap();
    argv[i + 1] = "pc-i440fx-1.0-nope,accel=tcg".into();
    let e = QemuProcess::spawn(
        Path::new(QEMU),
        &argv,
        &SpawnOptions::new(d.path().join("qemu.log"), &paths.qmp_sock),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ProcessError::StartFailed { stderr, .. } if stderr.contains("unsupported machine type")),
        "{e}"
    );
}

#[tokio::test]
async fn uefi_secure_boot_vm_starts_with_pflash_nodes() {
    init_logs();
    let d = tempfile::tempdir().unwrap();
    let (mut vm, _, paths) = small_vm(d.path()).await;
    let vars = d.path().join("vars.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.ms.fd", &vars).unwrap();
    vm.generation = vmrepl_types::Generation::Uefi;
    vm.firmware = vmrepl_types::vm::FirmwareVariantId::Ovmf4mSecureBoot;
    vm.machine_type = "pc-q35-7.2".into();
    vm.nvram = Some(vars);
    let fw = vmrepl_types::FirmwareVariant::fixed(
        vm.firmware,
        "/usr/share/OVMF/OVMF_CODE_4M.ms.fd".into(),
        Some("/usr/share/OVMF/OVMF_VARS_4M.ms.fd".into()),
    );
    let cmd =
        vmrepl_qemu::cmdline::build_command(&vm, &fw, &paths, vmrepl_qemu::ResolvedAccel::Tcg)
            .unwrap();
    let p = QemuProcess::spawn(
        Path::new(QEMU),
        &cmd.argv,
        &SpawnOptions::new(d.path().join("qemu.log"), &paths.qmp_sock),
    )
    .await
    .unwrap();
    let _g = KillGuard(p.pid());
    for c in &cmd.startup {
        p.qmp()
            .execute(&c.execute, c.arguments.clone())
            .await
            .unwrap();
    }
    assert_eq!(p.status().await.unwrap(), "running");
    let nodes = p
        .qmp()
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .collect();
    for n in ["fw-code", "fw-vars", "fw-vars-file", "disk0", "disk0-file"] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    p.quit(T).await.unwrap();
}
