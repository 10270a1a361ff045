#!/bin/bash
# Prepare a machine for vmrepl and its tests: Debian 12 (bookworm), Debian 13 (trixie) or
# Ubuntu 24.04 (noble). Run as root. Idempotent: a rerun on a prepared machine skips apt entirely
# and only checks the Rust toolchain and the test guest cache.
#
# Package names follow the distribution (/etc/os-release): Debian 13 and Ubuntu 24.04 renamed
# libraries for 64-bit time_t (libglib2.0-0 -> libglib2.0-0t64); Ubuntu ships chromium only as a
# snap, which apt cannot install: setup says so and goes on (only the dashboard's browser test
# needs it). docs/install.md, "Supported platforms", has the table.
#
# QEMU: vmrepl supports QEMU 7.2 and newer. An installed qemu-system-x86 of 7.2 or newer is kept
# (never replaced nor downgraded); otherwise the distribution's candidate is installed (Debian 12:
# 7.2, Debian 13: 10.0, Ubuntu 24.04: 8.2). qemu-utils, qemu-block-extra and qemu-system-common
# are pinned to the version of qemu-system-x86: some machines carry a newer qemu-utils (10.x from
# bookworm-backports) that does not go with qemu-system-x86 7.2, and those are brought to the
# matching version. The mixed-version tests (crates/vmrepl/tests/mixed_versions.rs) take the host's
# QEMU as the newer host and a wrapper of it that hides its newest machine types as the older one:
# on Debian 12 that is QEMU 7.2 itself.
#
#   scripts/setup.sh [--dry-run]
#
# --dry-run: no root needed and nothing changes: prints the distribution, the packages it wants,
# what it skips, the QEMU decision and the apt-get command it would run. For tests only, in a dry
# run: VMREPL_OS_RELEASE=FILE reads FILE instead of /etc/os-release, VMREPL_FAKE_INSTALLED="PKG=VER
# ..." stands for the installed packages (dpkg), VMREPL_FAKE_CANDIDATE=VER for the apt candidate
# of qemu-system-x86 (crates/vmrepl/tests/setup_script.rs).
#
# Env: VMREPL_SKIP_GUEST=1 to skip building the test guest (guest/build.sh);
#      VMREPL_SETUP_FORCE=1 to run the apt steps even when everything looks installed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

log() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$arg' (usage: scripts/setup.sh [--dry-run])" ;;
    esac
done
OS_RELEASE=/etc/os-release
FAKE=0
if [ "$DRY_RUN" = 1 ]; then
    OS_RELEASE=${VMREPL_OS_RELEASE:-$OS_RELEASE}
    [ -z "${VMREPL_FAKE_INSTALLED+x}" ] || FAKE=1
else
    [ "$(id -u)" = 0 ] || die "run as root (or try --dry-run to see what it would do)"
fi
export DEBIAN_FRONTEND=noninteractive

# --- the distribution ---
[ -r "$OS_RELEASE" ] || die "cannot read $OS_RELEASE: vmrepl's setup supports Debian 12, Debian 13 and Ubuntu 24.04"
# shellcheck disable=SC1090
OS_ID=$(. "$OS_RELEASE" && echo "${ID:-}")
# shellcheck disable=SC1090
OS_VERSION=$(. "$OS_RELEASE" && echo "${VERSION_ID:-}")
# shellcheck disable=SC1090
OS_LIKE=$(. "$OS_RELEASE" && echo "${ID_LIKE:-}")
# shellcheck disable=SC1090
OS_NAME=$(. "$OS_RELEASE" && echo "${PRETTY_NAME:-${NAME:-unknown}}")

# DISTRO: the package-name rules to use. Other versions of these families get the nearest rules
# with a warning; a distribution without apt is refused.
case "$OS_ID:$OS_VERSION" in
    debian:12) DISTRO=debian12 ;;
    debian:13) DISTRO=debian13 ;;
    ubuntu:24.04) DISTRO=ubuntu2404 ;;
    debian:*)
        DISTRO=debian13
        log "warning: $OS_NAME is not a tested distribution; using Debian 13's package names"
        ;;
    ubuntu:*)
        DISTRO=ubuntu2404
        log "warning: $OS_NAME is not a tested distribution; using Ubuntu 24.04's package names"
        ;;
    *)
        case " $OS_LIKE " in
            *" ubuntu "*) DISTRO=ubuntu2404 ;;
            *" debian "*) DISTRO=debian13 ;;
            *) die "$OS_NAME is not supported: vmrepl's setup knows Debian 12, Debian 13 and Ubuntu 24.04 (apt); install the packages of docs/install.md by hand" ;;
        esac
        log "warning: $OS_NAME is not a tested distribution; using $DISTRO's package names"
        ;;
esac
log "distribution: $OS_NAME ($DISTRO rules)"

# --- the packages ---
# Firmware (OVMF for generation 2, SeaBIOS for generation 1), the test guest's build (busybox,
# cpio, zstd, gcc), rsync (the benchmark's peer tool), python3 (guest/smoke.sh, the scripts).
PLAIN_PKGS="ovmf seabios busybox-static cpio zstd rsync gcc libc6-dev python3"
# The test guest's qemu-ga (from the qemu-guest-agent .deb, which is downloaded, not installed)
# runs with this host's copies of its shared libraries: the runtime packages it depends on.
case "$DISTRO" in
    debian12) GLIB=libglib2.0-0 ;;
    *) GLIB=libglib2.0-0t64 ;; # 64-bit time_t rename (Debian 13, Ubuntu 24.04)
esac
PLAIN_PKGS="$PLAIN_PKGS $GLIB libnuma1 libudev1 liburing2"
# The fault matrix (scripts/faults.sh) runs a daemon under libfaketime (a clock jump) and one
# inside a network namespace (ip netns, veth).
PLAIN_PKGS="$PLAIN_PKGS libfaketime iproute2"
# `vmrepl doctor`'s test drops a port with a firewall rule (nft) inside a network namespace.
PLAIN_PKGS="$PLAIN_PKGS nftables"
# The dashboard's browser test (crates/vmrepl/tests/dashboard.rs) drives chromium with
# playwright-core (pinned in tests/browser/package-lock.json, installed by `npm ci` below) on node.
SKIPPED=""
case "$DISTRO" in
    ubuntu*)
        SKIPPED="chromium (Ubuntu has it only as a snap, which apt cannot install: 'snap install chromium', or set CHROMIUM to a browser for the dashboard's browser test)"
        ;;
    *) PLAIN_PKGS="$PLAIN_PKGS chromium" ;;
esac
PLAIN_PKGS="$PLAIN_PKGS nodejs"
# The test guest's kernel (guest/build.sh downloads it; it is not installed).
case "$DISTRO" in
    ubuntu*) KERNEL_META=linux-image-virtual ;;
    *) KERNEL_META=linux-image-cloud-amd64 ;;
esac
export VMREPL_KERNEL_META="${VMREPL_KERNEL_META:-$KERNEL_META}"
# The package test (scripts/test-package.sh): cargo-deb finds the binary's library
# dependencies with dpkg-shlibdeps and strips it with objcopy; the test reads its build id.
PLAIN_PKGS="$PLAIN_PKGS dpkg-dev binutils"
QEMU_PKG=qemu-system-x86
QEMU_PINNED="qemu-utils qemu-block-extra qemu-system-common" # same version as qemu-system-x86
QEMU_MIN=7.2

installed_version() { # pkg -> version if fully installed, else empty
    if [ "$FAKE" = 1 ]; then
        local kv
        for kv in ${VMREPL_FAKE_INSTALLED:-}; do
            [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}" && return 0
        done
        return 0
    fi
    dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null | awk '$1=="ii"{print $2}'
}
candidate_version() { # pkg -> apt's candidate, or empty
    if [ "$DRY_RUN" = 1 ] && [ -n "${VMREPL_FAKE_CANDIDATE+x}" ]; then
        echo "$VMREPL_FAKE_CANDIDATE"
        return 0
    fi
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ && $2 != "(none)" {print $2}'
}
apt_has() { # pkg version -> whether the apt sources offer it
    [ "$FAKE" = 1 ] && return 0
    apt-cache show "$1=$2" >/dev/null 2>&1
}
# "1:7.2+dfsg-7+deb12u18+b3" -> 7002 (major*1000 + minor of the upstream version); 0 if none
qemu_num() {
    local v=${1#*:}
    if [[ $v =~ ^([0-9]+)\.([0-9]+) ]]; then
        echo $((BASH_REMATCH[1] * 1000 + BASH_REMATCH[2]))
    else
        echo 0
    fi
}

# npm: the distribution's package, unless node came with its own (NodeSource's nodejs bundles it).
if [ "$FAKE" = 1 ]; then
    [ -n "$(installed_version npm)" ] || PLAIN_PKGS="$PLAIN_PKGS npm"
else
    command -v npm >/dev/null 2>&1 || PLAIN_PKGS="$PLAIN_PKGS npm"
fi

# The QEMU to have: QEMU_V, the version of qemu-system-x86 and of its companions, and QEMU_WHY.
# An installed one of 7.2 or newer stays; otherwise the candidate. Fails with QEMU_ERR.
qemu_plan() {
    local have cand
    have=$(installed_version "$QEMU_PKG")
    if [ -n "$have" ] && [ "$(qemu_num "$have")" -ge "$(qemu_num "$QEMU_MIN")" ]; then
        if qemu_consistent "$have" || apt_has "$QEMU_PKG" "$have"; then
            QEMU_V=$have
            QEMU_WHY="keeping the installed $QEMU_PKG $have"
            return 0
        fi
        # the companions cannot be had at that exact version (superseded): the same line's
        # candidate, when it is not older
        cand=$(candidate_version "$QEMU_PKG")
        if [ -n "$cand" ] && [ "$(qemu_num "$cand")" -ge "$(qemu_num "$have")" ]; then
            QEMU_V=$cand
            QEMU_WHY="$QEMU_PKG $have is no longer offered by apt: taking $cand with its companions"
            return 0
        fi
        QEMU_ERR="$QEMU_PKG $have is installed but apt offers neither it nor a version as new for qemu-utils, qemu-block-extra and qemu-system-common; install them at $have by hand"
        return 1
    fi
    cand=$(candidate_version "$QEMU_PKG")
    if [ -z "$cand" ]; then
        QEMU_ERR="no installable $QEMU_PKG in the apt sources (apt-get update?)"
        return 1
    fi
    if [ "$(qemu_num "$cand")" -lt "$(qemu_num "$QEMU_MIN")" ]; then
        QEMU_ERR="the apt sources offer $QEMU_PKG $cand, older than QEMU $QEMU_MIN that vmrepl needs"
        return 1
    fi
    QEMU_V=$cand
    if [ -n "$have" ]; then
        QEMU_WHY="$QEMU_PKG $have is older than $QEMU_MIN: installing $cand"
    else
        QEMU_WHY="installing the distribution's $QEMU_PKG $cand"
    fi
}
qemu_consistent() { # version -> whether qemu-system-x86 and its companions are all at it
    local p
    [ "$(installed_version "$QEMU_PKG")" = "$1" ] || return 1
    for p in $QEMU_PINNED; do
        [ "$(installed_version "$p")" = "$1" ] || return 1
    done
}

# What apt must install: MISSING (plain packages) and QEMU_ARGS (pkg=version pins).
plan_missing() {
    local p
    MISSING=""
    for p in $PLAIN_PKGS; do
        [ -n "$(installed_version "$p")" ] || MISSING="$MISSING $p"
    done
    QEMU_ARGS=""
    for p in $QEMU_PKG $QEMU_PINNED; do
        [ "$(installed_version "$p")" = "$QEMU_V" ] || QEMU_ARGS="$QEMU_ARGS $p=$QEMU_V"
    done
    MISSING=${MISSING# }
    QEMU_ARGS=${QEMU_ARGS# }
}
apt_lists_ok() { # the guest build downloads the kernel and qemu-guest-agent: apt must know them
    [ "$FAKE" = 1 ] && return 0
    apt-cache show "$VMREPL_KERNEL_META" >/dev/null 2>&1 || { log "apt lists lack $VMREPL_KERNEL_META"; return 1; }
    apt-cache show qemu-guest-agent >/dev/null 2>&1 || { log "apt lists lack qemu-guest-agent"; return 1; }
}
apt_words() { # what apt-get install gets: the QEMU pins, then the missing packages
    echo "$QEMU_ARGS${QEMU_ARGS:+${MISSING:+ }}$MISSING"
}
APT_INSTALL="apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends --allow-downgrades"

if [ "$DRY_RUN" = 1 ]; then
    # shellcheck disable=SC2086 # the lists are words
    log "packages: $(printf '%s\n' $QEMU_PKG $QEMU_PINNED $PLAIN_PKGS | sort | tr '\n' ' ' | sed 's/ $//')"
    [ -z "$SKIPPED" ] || log "skipped: $SKIPPED"
    log "guest kernel: $VMREPL_KERNEL_META"
    qemu_plan || die "$QEMU_ERR"
    log "qemu: $QEMU_WHY"
    plan_missing
    if [ -z "$MISSING$QEMU_ARGS" ] && [ "${VMREPL_SETUP_FORCE:-0}" != 1 ]; then
        log "would run: nothing (every package is installed)"
    else
        log "would run: $APT_INSTALL $(apt_words)"
    fi
    log "would run: scripts/toolchain.sh, npm ci in tests/browser, guest/build.sh"
    log "dry run: nothing changed"
    exit 0
fi

[ -z "$SKIPPED" ] || log "skipped: $SKIPPED"
if [ "${VMREPL_SETUP_FORCE:-0}" != 1 ] && qemu_plan && plan_missing &&
    [ -z "$MISSING$QEMU_ARGS" ] && apt_lists_ok; then
    log "packages ok (qemu $QEMU_V)"
else
    log "apt-get update"
    apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null
    qemu_plan || die "$QEMU_ERR"
    log "qemu: $QEMU_WHY"
    plan_missing
    if [ -n "$MISSING$QEMU_ARGS" ]; then
        log "installing: $(apt_words)"
        # shellcheck disable=SC2086
        $APT_INSTALL $QEMU_ARGS $MISSING >/tmp/vmrepl-setup-apt.log 2>&1 || {
            tail -n 30 /tmp/vmrepl-setup-apt.log >&2
            die "apt-get install failed (full log: /tmp/vmrepl-setup-apt.log)"
        }
    fi
    plan_missing
    [ -z "$MISSING$QEMU_ARGS" ] || die "still missing after apt-get install: $QEMU_ARGS $MISSING"
    apt_lists_ok || die "the apt sources know no $VMREPL_KERNEL_META or qemu-guest-agent (the test guest's kernel and agent)"
    log "packages ok (qemu $QEMU_V)"
fi

# The Rust toolchain of rust-toolchain.toml, for the user who builds (under sudo: the caller).
if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
    sudo -u "$SUDO_USER" -H bash "$HERE/toolchain.sh" || log "warning: the Rust toolchain is not ready for $SUDO_USER (above)"
else
    bash "$HERE/toolchain.sh" || log "warning: the Rust toolchain is not ready (above)"
fi

# The browser test's node modules (playwright-core only; it uses the chromium installed above).
BROWSER_DIR="$REPO/tests/browser"
pw_version() { # package.json -> its version, or empty
    [ -f "$1" ] && node -p "require('$1').version" 2>/dev/null || true
}
want=$(cd "$BROWSER_DIR" && node -p 'require("./package-lock.json").packages["node_modules/playwright-core"].version')
have=$(pw_version "$BROWSER_DIR/node_modules/playwright-core/package.json")
if [ -n "$have" ] && [ "$have" = "$want" ]; then
    log "playwright-core $have ok"
else
    log "npm ci in tests/browser (playwright-core $want)"
    (cd "$BROWSER_DIR" && npm ci --no-audit --no-fund >/tmp/vmrepl-setup-npm.log 2>&1) || {
        tail -n 30 /tmp/vmrepl-setup-npm.log >&2
        die "npm ci failed in $BROWSER_DIR (full log: /tmp/vmrepl-setup-npm.log)"
    }
fi
if command -v chromium >/dev/null 2>&1; then
    log "$(chromium --version 2>/dev/null | head -n1), node $(node --version)"
else
    log "no chromium on PATH (node $(node --version)): the dashboard's browser test will fail until one is installed"
fi

# versions as the tools report them
qv=$(qemu-system-x86_64 --version | head -n1)
log "$qv"
[ "$(qemu_num "$(echo "$qv" | sed -n 's/.*version \([0-9][0-9.]*\).*/\1/p')")" -ge "$(qemu_num "$QEMU_MIN")" ] ||
    die "the qemu-system-x86_64 on PATH ($(command -v qemu-system-x86_64)) is older than QEMU $QEMU_MIN"
log "$(qemu-img --version | head -n1)"
# Firmware: vmrepl reads QEMU's firmware descriptors (docs/install.md); the package ovmf installs
# them, and OVMF_CODE_4M.fd is the fixed fallback.
if ls /usr/share/qemu/firmware/*.json >/dev/null 2>&1; then
    log "firmware descriptors: $(cd /usr/share/qemu/firmware && echo *.json)"
else
    [ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || die "no firmware descriptors in /usr/share/qemu/firmware and no /usr/share/OVMF/OVMF_CODE_4M.fd (package ovmf)"
    log "no firmware descriptors: generation 2 VMs use /usr/share/OVMF/OVMF_CODE_4M.fd"
fi
if [ -e /dev/kvm ]; then log "/dev/kvm present (whether KVM actually works is not checked here)"; else log "no /dev/kvm: VMs run under TCG"; fi

if [ "${VMREPL_SKIP_GUEST:-0}" = 1 ]; then
    log "skipping the test guest build (VMREPL_SKIP_GUEST=1)"
else
    log "test guest"
    "$REPO/guest/build.sh"
fi
log "done"
