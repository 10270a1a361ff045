//! The platform scripts, without root and without changing the machine:
//! - `scripts/setup.sh --dry-run` with a fake `/etc/os-release` (`VMREPL_OS_RELEASE`), a fake
//!   list of installed packages (`VMREPL_FAKE_INSTALLED`) and a fake apt candidate for QEMU
//!   (`VMREPL_FAKE_CANDIDATE`): the package names of Debian 12, Debian 13 and Ubuntu 24.04, and
//!   the QEMU decision (an installed QEMU of 7.2 or newer is kept, never downgraded);
//! - `scripts/toolchain.sh` with a fake rustup and a fake `RUSTUP_HOME`: the pinned toolchain of
//!   `rust-toolchain.toml` is linked from an installed stable of that version, a stale link is
//!   removed, and a newer installed toolchain is named instead when the pinned one cannot be had.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const BOOKWORM: &str =
    "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\n\
VERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\nVERSION_CODENAME=bookworm\nID=debian\n";
const TRIXIE: &str = "PRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\nNAME=\"Debian GNU/Linux\"\n\
VERSION_ID=\"13\"\nVERSION=\"13 (trixie)\"\nVERSION_CODENAME=trixie\nID=debian\n";
const NOBLE: &str = "PRETTY_NAME=\"Ubuntu 24.04.2 LTS\"\nNAME=\"Ubuntu\"\nVERSION_ID=\"24.04\"\n\
VERSION=\"24.04.2 LTS (Noble Numbat)\"\nVERSION_CODENAME=noble\nID=ubuntu\nID_LIKE=debian\n";
const FEDORA: &str =
    "NAME=\"Fedora Linux\"\nVERSION_ID=41\nID=fedora\nPRETTY_NAME=\"Fedora Linux 41\"\n";

/// What `setup.sh --dry-run` printed for one machine.
struct Plan {
    ok: bool,
    out: String,
}

impl Plan {
    /// The words after `setup: KEY: ` on the first such line.
    fn words(&self, key: &str) -> Vec<String> {
        self.line(key)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }
    /// What follows `setup: KEY: ` on the first such line (empty when there is none).
    fn line(&self, key: &str) -> String {
        let prefix = format!("setup: {key}: ");
        self.out
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or("")
            .to_string()
    }
    /// The packages of the apt-get command that `would run` (the first such line), without its
    /// options; empty when apt has nothing to do.
    fn installs(&self) -> Vec<String> {
        self.line("would run")
            .split_whitespace()
            .skip_while(|w| *w != "install")
            .skip(1)
            .filter(|w| !w.starts_with('-'))
            .map(str::to_string)
            .collect()
    }
}

fn dry_run(os_release: &str, installed: &str, candidate: &str) -> Plan {
    let dir = tempfile::tempdir().unwrap();
    let osr = dir.path().join("os-release");
    std::fs::write(&osr, os_release).unwrap();
    let o = Command::new("bash")
        .arg(repo().join("scripts/setup.sh"))
        .arg("--dry-run")
        .env("VMREPL_OS_RELEASE", &osr)
        .env("VMREPL_FAKE_INSTALLED", installed)
        .env("VMREPL_FAKE_CANDIDATE", candidate)
        .env_remove("VMREPL_SETUP_FORCE")
        .env_remove("VMREPL_KERNEL_META")
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Plan {
        ok: o.status.success(),
        out,
    }
}

fn has(v: &[String], w: &str) -> bool {
    v.iter().any(|x| x == w)
}

const Q72: &str = "1:7.2+dfsg-7+deb12u18+b3";
const Q10_BPO: &str = "1:10.0.2+ds-2+deb13u1~bpo12+1";

#[test]
fn debian_12_gets_its_own_package_names_and_the_distribution_qemu_7_2() {
    let p = dry_run(BOOKWORM, "", Q72);
    assert!(p.ok, "{}", p.out);
    assert!(p.line("distribution").contains("debian12"), "{}", p.out);
    let pkgs = p.words("packages");
    for w in [
        "libglib2.0-0",
        "chromium",
        "ovmf",
        "seabios",
        "qemu-system-x86",
        "libfaketime",
        "npm",
    ] {
        assert!(has(&pkgs, w), "{w} missing: {}", p.out);
    }
    assert!(!has(&pkgs, "libglib2.0-0t64"), "{}", p.out);
    let inst = p.installs();
    for q in [
        "qemu-system-x86",
        "qemu-utils",
        "qemu-block-extra",
        "qemu-system-common",
    ] {
        assert!(
            has(&inst, &format!("{q}={Q72}")),
            "{q} not pinned: {}",
            p.out
        );
    }
    assert_eq!(p.line("guest kernel"), "linux-image-cloud-amd64");
}

#[test]
fn a_newer_qemu_utils_alone_on_debian_12_is_brought_to_the_version_of_the_qemu_7_2_installed() {
    // The fresh machine image: qemu-utils 10.0 from bookworm-backports, no qemu-system-x86.
    let p = dry_run(BOOKWORM, &format!("qemu-utils={Q10_BPO}"), Q72);
    assert!(p.ok, "{}", p.out);
    let inst = p.installs();
    assert!(has(&inst, &format!("qemu-system-x86={Q72}")), "{}", p.out);
    assert!(has(&inst, &format!("qemu-utils={Q72}")), "{}", p.out);
}

#[test]
fn debian_13_gets_the_t64_library_names_chromium_and_its_qemu_10() {
    let cand = "1:10.0.2+ds-2+deb13u1";
    let p = dry_run(TRIXIE, "", cand);
    assert!(p.ok, "{}", p.out);
    assert!(p.line("distribution").contains("debian13"), "{}", p.out);
    let pkgs = p.words("packages");
    assert!(has(&pkgs, "libglib2.0-0t64"), "{}", p.out);
    assert!(!has(&pkgs, "libglib2.0-0"), "{}", p.out);
    assert!(has(&pkgs, "chromium"), "{}", p.out);
    assert!(
        has(&p.installs(), &format!("qemu-system-x86={cand}")),
        "{}",
        p.out
    );
    assert_eq!(p.line("guest kernel"), "linux-image-cloud-amd64");
}

#[test]
fn ubuntu_24_04_gets_the_t64_names_and_announces_chromium_as_a_snap_it_cannot_install() {
    let q = "1:8.2.2+ds-0ubuntu1.4";
    let installed = format!(
        "qemu-system-x86={q} qemu-utils={q} qemu-block-extra={q} qemu-system-common={q} npm=9.2.0"
    );
    let p = dry_run(NOBLE, &installed, q);
    assert!(p.ok, "{}", p.out);
    assert!(p.line("distribution").contains("ubuntu2404"), "{}", p.out);
    let pkgs = p.words("packages");
    assert!(has(&pkgs, "libglib2.0-0t64"), "{}", p.out);
    assert!(!has(&pkgs, "chromium"), "{}", p.out);
    assert!(!has(&pkgs, "npm"), "npm is installed: {}", p.out);
    assert!(p.line("skipped").contains("snap"), "{}", p.out);
    assert_eq!(p.line("guest kernel"), "linux-image-virtual");
    // QEMU 8.2 is complete: apt installs only what is missing, no QEMU package
    let inst = p.installs();
    assert!(
        !inst.iter().any(|w| w.starts_with("qemu")),
        "QEMU is complete: {}",
        p.out
    );
    assert!(
        has(&inst, "ovmf") && has(&inst, "libglib2.0-0t64"),
        "{}",
        p.out
    );
}

#[test]
fn an_installed_qemu_newer_than_the_distribution_candidate_is_kept_not_downgraded() {
    // QEMU 10.0 from bookworm-backports, complete, while bookworm's candidate is 7.2.
    let installed = format!(
        "qemu-system-x86={Q10_BPO} qemu-utils={Q10_BPO} qemu-block-extra={Q10_BPO} qemu-system-common={Q10_BPO}"
    );
    let p = dry_run(BOOKWORM, &installed, Q72);
    assert!(p.ok, "{}", p.out);
    assert!(p.line("qemu").contains("keeping"), "{}", p.out);
    assert!(
        !p.installs().iter().any(|w| w.starts_with("qemu")),
        "nothing of QEMU is reinstalled: {}",
        p.out
    );
    // a missing companion is added at the kept version, not at the candidate's
    let partial = format!("qemu-system-x86={Q10_BPO} qemu-utils={Q10_BPO}");
    let p = dry_run(BOOKWORM, &partial, Q72);
    assert!(p.ok, "{}", p.out);
    let inst = p.installs();
    assert!(
        has(&inst, &format!("qemu-block-extra={Q10_BPO}")),
        "{}",
        p.out
    );
    assert!(!inst.iter().any(|w| w.contains(Q72)), "{}", p.out);
}

#[test]
fn a_distribution_whose_qemu_is_older_than_7_2_or_without_apt_is_refused_with_the_reason() {
    let old = "1:6.2+dfsg-2ubuntu6.2";
    let p = dry_run(NOBLE, &format!("qemu-system-x86={old}"), old);
    assert!(!p.ok, "{}", p.out);
    assert!(p.out.contains("older than QEMU 7.2"), "{}", p.out);
    let p = dry_run(FEDORA, "", Q72);
    assert!(!p.ok, "{}", p.out);
    assert!(
        p.out.contains("Fedora Linux 41 is not supported")
            && p.out.contains("Debian 12, Debian 13 and Ubuntu 24.04"),
        "{}",
        p.out
    );
}

// --- scripts/toolchain.sh ---

/// A fake RUSTUP_HOME with toolchains whose `rustc --version` says what is given, and a fake
/// rustup on PATH that answers `show home` and `show` (and fails `toolchain install`).
struct Rustup {
    dir: tempfile::TempDir,
}

impl Rustup {
    fn new() -> Rustup {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(bin.join("..").join("home/toolchains")).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        write_exe(
            &bin.join("rustup"),
            "#!/bin/sh\ncase \"$1 $2\" in\n  'show home') echo \"$RUSTUP_HOME\" ;;\n  'show ') echo 'Default host: x86_64-unknown-linux-gnu' ;;\n  *) echo \"fake rustup: no network for $*\" >&2; exit 1 ;;\nesac\n",
        );
        Rustup { dir }
    }
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }
    fn toolchain(&self, name: &str, version: &str) {
        let bin = self
            .home()
            .join("toolchains")
            .join(format!("{name}-x86_64-unknown-linux-gnu"))
            .join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        write_exe(
            &bin.join("rustc"),
            &format!("#!/bin/sh\necho 'rustc {version} (0000000 2026-01-01)'\n"),
        );
    }
    fn pinned(&self) -> PathBuf {
        self.home()
            .join("toolchains")
            .join(format!("{}-x86_64-unknown-linux-gnu", channel()))
    }
    /// Sources toolchain.sh in a bash that then prints RUSTUP_TOOLCHAIN.
    fn run(&self) -> Output {
        let path = format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new("bash")
            .arg("-c")
            .arg("set -euo pipefail; . \"$1\"; echo \"RUSTUP_TOOLCHAIN=${RUSTUP_TOOLCHAIN:-}\"")
            .arg("bash")
            .arg(repo().join("scripts/toolchain.sh"))
            .env("PATH", path)
            .env("RUSTUP_HOME", self.home())
            .env("VMREPL_TOOLCHAIN_NO_INSTALL", "1")
            .env_remove("RUSTUP_TOOLCHAIN")
            .output()
            .unwrap()
    }
}

fn write_exe(p: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(p, text).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The channel rust-toolchain.toml pins.
fn channel() -> String {
    let t = std::fs::read_to_string(repo().join("rust-toolchain.toml")).unwrap();
    t.lines()
        .find_map(|l| l.strip_prefix("channel = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("rust-toolchain.toml names a channel")
        .to_string()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_pinned_toolchain_is_linked_from_an_installed_stable_of_that_version_without_a_download() {
    let r = Rustup::new();
    r.toolchain("stable", &channel());
    let o = r.run();
    assert!(o.status.success(), "{}", text(&o));
    let link = std::fs::read_link(r.pinned()).expect("the pinned name is a link");
    assert_eq!(link, Path::new("stable-x86_64-unknown-linux-gnu"));
    assert!(text(&o).contains("RUSTUP_TOOLCHAIN=\n"), "{}", text(&o));
    // a second run finds it and says nothing
    let o = r.run();
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stderr), "");
}

#[test]
fn a_link_whose_target_became_another_version_is_removed_and_a_newer_toolchain_is_named_instead() {
    let r = Rustup::new();
    r.toolchain("stable", "1.999.0");
    r.toolchain("nightly", "1.999.9-nightly");
    std::os::unix::fs::symlink("stable-x86_64-unknown-linux-gnu", r.pinned()).unwrap();
    let o = r.run();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(!r.pinned().exists(), "the stale link is gone: {t}");
    assert!(t.contains("link removed"), "{t}");
    assert!(
        t.contains("RUSTUP_TOOLCHAIN=stable-x86_64-unknown-linux-gnu\n"),
        "the newest release (not nightly) is named: {t}"
    );
    assert!(t.contains("warning"), "{t}");
}

#[test]
fn without_the_pinned_toolchain_nor_one_new_enough_the_script_fails_and_says_what_to_install() {
    let r = Rustup::new();
    r.toolchain("stable", "1.80.0");
    let o = r.run();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains(&format!("rustup toolchain install {}", channel())),
        "{t}"
    );
}
