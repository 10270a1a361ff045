#!/bin/bash
# Prepare a Debian 12 (bookworm) machine for vmrepl and its tests. Run as root. Idempotent:
# a rerun on a prepared machine skips apt entirely and only checks the test guest cache.
#
# QEMU packages are pinned to one version: the bookworm candidate of qemu-system-x86. Some
# machines carry a newer qemu-utils / qemu-block-extra (10.x from backports) that does not go
# with qemu-system-x86 7.2; those are downgraded to the matching version.
#
# Env: VMREPL_SKIP_GUEST=1 to skip building the test guest (guest/build.sh);
#      VMREPL_SETUP_FORCE=1 to run the apt steps even when everything looks installed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

log() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root"
if [ -r /etc/os-release ]; then
    . /etc/os-release
    [ "${VERSION_CODENAME:-}" = bookworm ] || log "warning: tested on Debian 12 (bookworm), this is ${PRETTY_NAME:-unknown}"
fi
export DEBIAN_FRONTEND=noninteractive

PLAIN_PKGS="ovmf seabios busybox-static cpio zstd rsync gcc libc6-dev python3"
# The test guest's qemu-ga (from the qemu-guest-agent .deb, which is downloaded, not installed)
# runs with this host's copies of its shared libraries: the runtime packages it depends on.
# guest/smoke.sh talks to the agent with python3.
QGA_LIB_PKGS="libglib2.0-0 libnuma1 libudev1 liburing2"
PLAIN_PKGS="$PLAIN_PKGS $QGA_LIB_PKGS"
# The fault matrix (scripts/faults.sh) runs a daemon under libfaketime (a clock jump) and one
# inside a network namespace (ip netns, veth).
PLAIN_PKGS="$PLAIN_PKGS libfaketime iproute2"
# `vmrepl doctor`'s test drops a port with a firewall rule (nft) inside a network namespace.
PLAIN_PKGS="$PLAIN_PKGS nftables"
# The dashboard's browser test (crates/vmrepl/tests/dashboard.rs) drives Debian's chromium with
# playwright-core (pinned in tests/browser/package-lock.json, installed by `npm ci` below) on node.
PLAIN_PKGS="$PLAIN_PKGS chromium nodejs"
# npm: Debian's package, unless node came with its own (NodeSource's nodejs bundles it).
command -v npm >/dev/null 2>&1 || PLAIN_PKGS="$PLAIN_PKGS npm"
# The package test (scripts/test-package.sh): cargo-deb finds the binary's library
# dependencies with dpkg-shlibdeps and strips it with objcopy; the test reads its build id.
PLAIN_PKGS="$PLAIN_PKGS dpkg-dev binutils"
QEMU_PINNED="qemu-utils qemu-block-extra qemu-system-common" # same version as qemu-system-x86

installed_version() { # pkg -> version if fully installed, else empty
    dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null | awk '$1=="ii"{print $2}'
}

# Is everything there already, at matching versions? (no network, no apt lock)
ready() {
    local p v
    for p in $PLAIN_PKGS; do
        [ -n "$(installed_version "$p")" ] || { log "missing $p"; return 1; }
    done
    v=$(installed_version qemu-system-x86)
    [ -n "$v" ] || { log "missing qemu-system-x86"; return 1; }
    for p in $QEMU_PINNED; do
        [ "$(installed_version "$p")" = "$v" ] || {
            log "$p is '$(installed_version "$p")', want $v (qemu-system-x86)"
            return 1
        }
    done
    # the guest build downloads the cloud kernel: the package lists must know it
    apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || { log "apt lists lack linux-image-cloud-amd64"; return 1; }
    apt-cache show qemu-guest-agent >/dev/null 2>&1 || { log "apt lists lack qemu-guest-agent"; return 1; }
    return 0
}

if [ "${VMREPL_SETUP_FORCE:-0}" != 1 ] && ready; then
    log "packages ok (qemu $(installed_version qemu-system-x86))"
else
    log "apt-get update"
    apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null
    V=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
    [ -n "$V" ] && [ "$V" != "(none)" ] || die "no installable qemu-system-x86 in the apt sources"
    pins=""
    for p in $QEMU_PINNED; do pins="$pins $p=$V"; done
    log "installing qemu-system-x86 $V (pinned:$pins) and $PLAIN_PKGS"
    # shellcheck disable=SC2086
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends --allow-downgrades \
        qemu-system-x86="$V" $pins $PLAIN_PKGS >/tmp/vmrepl-setup-apt.log 2>&1 || {
        tail -n 30 /tmp/vmrepl-setup-apt.log >&2
        die "apt-get install failed (full log: /tmp/vmrepl-setup-apt.log)"
    }
    ready || die "packages still not consistent after install"
    log "packages ok (qemu $(installed_version qemu-system-x86))"
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
log "$(chromium --version 2>/dev/null | head -n1), node $(node --version)"

# versions as the tools report them
log "$(qemu-system-x86_64 --version | head -n1)"
log "$(qemu-img --version | head -n1)"
[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || die "OVMF_CODE_4M.fd missing (package ovmf)"
if [ -e /dev/kvm ]; then log "/dev/kvm present (whether KVM actually works is not checked here)"; else log "no /dev/kvm: VMs run under TCG"; fi
command -v cargo >/dev/null || log "note: cargo not found; install a Rust toolchain (>= 1.85) to build vmrepl"

if [ "${VMREPL_SKIP_GUEST:-0}" = 1 ]; then
    log "skipping the test guest build (VMREPL_SKIP_GUEST=1)"
else
    log "test guest"
    "$REPO/guest/build.sh"
fi
log "done"
