#!/usr/bin/env bash
# The package test (docs/install.md): builds the .deb with scripts/package.sh, installs it with
# dpkg, checks what it installed (binary, stripped with its debug info split off, manual pages,
# completions, the unit), runs a host from the installed binary with a temporary data folder on
# a loopback address (host init, daemon --background, host info, stop), and purges the package,
# leaving the machine as it was. Run as root; part of scripts/test.sh.
#
# systemd is not PID 1 on the test machines, so `systemctl start vmrepl` cannot be tested here:
# the unit is checked with `systemd-analyze verify` (when installed), and the daemon's side of
# the service (readiness, watchdog, VMs surviving a stop) by crates/vmrepl/tests/service.rs.
#
# Env: VMREPL_SKIP_PACKAGE_TEST=1 skips it (says so, and exits 0).
set -euo pipefail
cd "$(dirname "$0")/.."

IP=127.0.0.174 # this test's loopback address
step() { echo "test-package: $*"; }
fail() { echo "test-package: FAILED: $*" >&2; exit 1; }

if [ "${VMREPL_SKIP_PACKAGE_TEST:-0}" = 1 ]; then
    step "skipped (VMREPL_SKIP_PACKAGE_TEST=1)"
    exit 0
fi
[ "$(id -u)" = 0 ] || fail "run as root (it installs and removes the package)"
case "$(dpkg-query -W -f='${db:Status-Status}' vmrepl 2>/dev/null || true)" in
"" | not-installed | config-files) ;;
*)
    fail "the vmrepl package is already installed on this machine; this test installs and purges it, so remove it first (apt purge vmrepl) or set VMREPL_SKIP_PACKAGE_TEST=1"
    ;;
esac

start=$SECONDS
DEB=$(./scripts/package.sh | tail -n1)
[ -f "$DEB" ] || fail "scripts/package.sh printed no .deb ($DEB)"
step "built $DEB in $((SECONDS - start)) s"

WORK=$(mktemp -d /tmp/vmrepl-test-package.XXXXXX)
DATA="$WORK/data"
cleanup() {
    local rc=$?
    if [ -S "$DATA/mgmt.sock" ]; then
        /usr/bin/vmrepl --data "$DATA" stop >/dev/null 2>&1 || true
    fi
    if [ -n "${DAEMON_PID:-}" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -9 "$DAEMON_PID" 2>/dev/null || true
    fi
    if dpkg-query -W vmrepl >/dev/null 2>&1; then
        dpkg --purge vmrepl >/dev/null || echo "test-package: could not purge vmrepl" >&2
    fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT

step "dpkg -i"
if ! dpkg -i "$DEB" >"$WORK/dpkg.log" 2>&1; then
    # Missing dependencies: apt completes them (they are there once scripts/setup.sh ran).
    apt-get -o DPkg::Lock::Timeout=300 install -f -y -q >>"$WORK/dpkg.log" 2>&1 || {
        cat "$WORK/dpkg.log" >&2
        fail "dpkg -i $DEB failed and apt-get install -f could not complete it"
    }
fi
dpkg-query -W -f='${db:Status-Abbrev}' vmrepl | grep -q '^ii' || fail "vmrepl is not installed after dpkg -i"

step "the binary"
version=$(/usr/bin/vmrepl --version)
[ "$version" = "vmrepl $(dpkg-query -W -f='${Version}' vmrepl | sed 's/-[^-]*$//')" ] ||
    fail "/usr/bin/vmrepl --version says '$version'"
if command -v readelf >/dev/null; then
    readelf -S /usr/bin/vmrepl | grep -q '\.debug_info' && fail "/usr/bin/vmrepl is not stripped"
    build_id=$(readelf -n /usr/bin/vmrepl | awk '/Build ID/ { print $3 }')
    dbgsym=$(dirname "$DEB")/vmrepl-dbgsym_$(dpkg-query -W -f='${Version}_${Architecture}' vmrepl).ddeb
    dpkg-deb --contents "$dbgsym" | grep -q "usr/lib/debug/.build-id/${build_id:0:2}/${build_id:2}.debug" ||
        fail "$dbgsym has no debug file for build id $build_id"
    step "stripped; debug info for build id $build_id in $(basename "$dbgsym")"
fi

step "manual pages"
for page in vmrepl vmrepl-daemon vmrepl-replication-enable vmrepl-failover-start; do
    [ -f "/usr/share/man/man1/$page.1.gz" ] || fail "/usr/share/man/man1/$page.1.gz missing"
done
if command -v man >/dev/null; then
    [ "$(man -w vmrepl)" = /usr/share/man/man1/vmrepl.1.gz ] || fail "man -w vmrepl says '$(man -w vmrepl 2>&1)'"
    MANWIDTH=80 man -P cat vmrepl-replication-enable 2>/dev/null | grep -q -- '--replica-server' ||
        fail "man vmrepl-replication-enable does not show --replica-server"
fi

step "completions"
grep -q 'complete -F _vmrepl' /usr/share/bash-completion/completions/vmrepl || fail "bash completion"
grep -q '^#compdef vmrepl' /usr/share/zsh/vendor-completions/_vmrepl || fail "zsh completion"
grep -q 'complete -c vmrepl' /usr/share/fish/vendor_completions.d/vmrepl.fish || fail "fish completion"
[ -f /usr/share/doc/vmrepl/examples/vmrepl.toml ] || fail "the example configuration is missing"

step "the unit"
UNIT=/lib/systemd/system/vmrepl.service
[ -f "$UNIT" ] || fail "$UNIT missing"
grep -qx 'Type=notify' "$UNIT" && grep -qx 'KillMode=process' "$UNIT" || fail "$UNIT is not the notify unit with KillMode=process"
if [ -L /etc/systemd/system/multi-user.target.wants/vmrepl.service ]; then
    step "enabled by the package (multi-user.target.wants)"
else
    fail "the package did not enable vmrepl.service"
fi
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify "$UNIT" >"$WORK/verify.log" 2>&1 || {
        cat "$WORK/verify.log" >&2
        fail "systemd-analyze verify $UNIT"
    }
    [ ! -s "$WORK/verify.log" ] || { cat "$WORK/verify.log" >&2; fail "systemd-analyze verify warns"; }
    step "systemd-analyze verify: clean"
else
    step "no systemd-analyze here: the unit's presence is all that is checked"
fi

step "a host from the installed binary on $IP"
/usr/bin/vmrepl --data "$DATA" host init --name package.test --listen "$IP:0" --accel tcg \
    --metrics "$IP:0" --dashboard "$IP:0" >"$WORK/init.log" 2>&1 || {
    cat "$WORK/init.log" >&2
    fail "host init"
}
out=$(/usr/bin/vmrepl --data "$DATA" daemon --background) || fail "daemon --background: $out"
DAEMON_PID=$(sed -n 's/.*(pid \([0-9]*\)).*/\1/p' <<<"$out")
[ "$(readlink "/proc/$DAEMON_PID/exe")" = /usr/bin/vmrepl ] || fail "the daemon (pid $DAEMON_PID) is not /usr/bin/vmrepl"
info=$(/usr/bin/vmrepl --data "$DATA" --json host info) || fail "host info: $info"
grep -q '"qemu_version"' <<<"$info" || fail "host info has no QEMU version: $info"
/usr/bin/vmrepl --data "$DATA" stop >/dev/null || fail "vmrepl stop"
for _ in $(seq 150); do
    kill -0 "$DAEMON_PID" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$DAEMON_PID" 2>/dev/null && fail "the daemon did not exit within 15 s of vmrepl stop"
grep -q 'running VMs keep running' "$DATA/daemon.log" || fail "the daemon's log does not tell it stopped"

step "dpkg --purge"
dpkg --purge vmrepl >"$WORK/purge.log" 2>&1 || { cat "$WORK/purge.log" >&2; fail "dpkg --purge vmrepl"; }
for f in /usr/bin/vmrepl "$UNIT" /etc/systemd/system/multi-user.target.wants/vmrepl.service \
    /usr/share/man/man1/vmrepl.1.gz /usr/share/bash-completion/completions/vmrepl; do
    [ ! -e "$f" ] && [ ! -L "$f" ] || fail "$f is left after the purge"
done
step "passed in $((SECONDS - start)) s"
