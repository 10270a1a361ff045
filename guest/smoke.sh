#!/bin/bash
# Smoke test of the vmrepl test guest with plain QEMU (no vmrepl): boot, write, verify,
# ACPI power-button shutdown through QMP, then verify the converted raw image on the host.
# Usage: guest/smoke.sh [--keep]      (needs: qemu-system-x86_64, qemu-img, ovmf; see scripts/setup.sh)
# Env: VMREPL_CACHE (guest build dir), SMOKE_ACCEL (default tcg), SMOKE_SKIP_OVMF=1.
# No helper tools needed: QMP is spoken over a pipe chardev from bash.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE=${VMREPL_CACHE:-$REPO/.cache/guest}
ACCEL=${SMOKE_ACCEL:-tcg}
KEEP=0
[ "${1:-}" = --keep ] && KEEP=1

"$HERE/build.sh"

T=$(mktemp -d /tmp/vmrepl-smoke.XXXXXX)
QPID=""
cleanup() {
    if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then kill "$QPID" 2>/dev/null || true; fi
    if [ $KEEP = 1 ]; then echo "smoke: kept $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
fail() {
    echo "smoke: FAIL: $*" >&2
    [ -f "$T/serial.log" ] && { echo "--- serial log ---" >&2; tail -n 40 "$T/serial.log" >&2; }
    exit 1
}

# start_vm NAME MACHINE APPEND DISK... ; firmware from $FW (bios|ovmf)
start_vm() {
    local name=$1 machine=$2 append=$3
    shift 3
    local args=(-machine "$machine,accel=$ACCEL" -m 256 -nodefaults -display none -monitor none
        -kernel "$CACHE/vmlinuz" -initrd "$CACHE/initrd.img" -append "$append"
        -serial "file:$T/serial.log" -chardev "pipe,id=qmp,path=$T/qmp" -mon chardev=qmp,mode=control)
    if [ "$FW" = ovmf ]; then
        cp /usr/share/OVMF/OVMF_VARS_4M.fd "$T/vars.fd"
        args+=(-drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd
            -drive "if=pflash,format=raw,file=$T/vars.fd")
    fi
    for d in "$@"; do args+=(-drive "file=$d,if=virtio,format=qcow2"); done
    rm -f "$T/serial.log" "$T/qmp.in" "$T/qmp.out"
    mkfifo "$T/qmp.in" "$T/qmp.out"
    exec 3<>"$T/qmp.in" 4<>"$T/qmp.out"
    : >"$T/serial.log"
    T0=$(now)
    qemu-system-x86_64 "${args[@]}" >"$T/qemu.out" 2>&1 &
    QPID=$!
    echo "smoke: [$name] started qemu pid $QPID ($machine, $FW, accel=$ACCEL)"
    qmp '{"execute":"qmp_capabilities"}'
}

# qmp JSON: send a command, wait for its return (events are skipped)
qmp() {
    local line
    echo "$1" >&3
    while IFS= read -r -t 30 -u 4 line; do
        case "$line" in
            *'"return"'*) return 0 ;;
            *'"error"'*) fail "qmp error: $line" ;;
        esac
    done
    fail "no QMP reply to $1"
}

# the serial log with the tty's CR removed (lines arrive as CRLF)
serial() { tr -d '\r' <"$T/serial.log"; }
# has ERE: does the serial log hold a matching line? (no grep -q: SIGPIPE under pipefail)
has() { serial | grep -aE "$1" >/dev/null; }

# wait_line REGEX TIMEOUT_S
wait_line() {
    local re=$1 limit=$2 start
    start=$(now)
    while ! has "$re"; do
        kill -0 "$QPID" 2>/dev/null || fail "qemu exited while waiting for /$re/"
        awk -v a="$start" -v b="$(now)" -v l="$limit" 'BEGIN{exit !(b-a>l)}' && fail "timeout waiting for /$re/"
        sleep 0.2
    done
}

powerdown() {
    local t rc=0
    t=$(now)
    qmp '{"execute":"system_powerdown"}'
    for _ in $(seq 1 150); do kill -0 "$QPID" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$QPID" 2>/dev/null && fail "guest did not power off within 30 s of system_powerdown"
    wait "$QPID" || rc=$?
    QPID=""
    exec 3>&- 4<&-
    [ $rc = 0 ] || fail "qemu exit status $rc"
    echo "smoke: [$1] powered off $(elapsed "$t") s after system_powerdown"
}

host_verify() { # qcow2 blocks args...
    local img=$1
    shift
    qemu-img convert -O raw "$img" "$img.raw"
    "$CACHE/blockio" verify "$img.raw" "$@" || fail "host verify of $img failed"
}

# 1. SeaBIOS, i440fx: write gens 1..3, verify inside, power button, verify on the host
FW=bios
qemu-img create -q -f qcow2 "$T/d.qcow2" 64M
start_vm bios pc-i440fx-7.2 'console=ttyS0 quiet vmrepl.work=write:vda:64:1:3,verify:vda:64:3' "$T/d.qcow2"
wait_line '^VMREPL READY' 60
echo "smoke: [bios] READY after $(elapsed "$T0") s"
wait_line '^VMREPL IDLE' 60
echo "smoke: [bios] IDLE after $(elapsed "$T0") s"
has '^VMREPL VERIFY dev=vda blocks=64 ok=64 bad=0 zero=0 min_gen=3 max_gen=3 result=pass$' ||
    fail "in-guest verify did not pass"
has '^VMREPL RESULT pass$' || fail "workload failed"
powerdown bios
host_verify "$T/d.qcow2" --blocks 64 --gen 3

# 2. same disk again: verify gen 3 survived, writeloop continues at gen 4, power button
#    stops the writer at a generation boundary
start_vm loop pc-i440fx-7.2 'console=ttyS0 quiet vmrepl.work=verify:vda:64:3,writeloop:vda:64:100' "$T/d.qcow2"
wait_line '^VMREPL WROTE dev=vda gen=6$' 90
has '^VMREPL WROTE dev=vda gen=4$' || fail "writeloop did not continue at gen 4"
powerdown loop
last=$(serial | grep -a '^VMREPL STOPPED dev=vda gen=' | sed 's/.*gen=//')
[ -n "$last" ] || fail "no STOPPED line"
host_verify "$T/d.qcow2" --blocks 64 --gen "$last"

# 3. OVMF, q35, two disks written in lockstep
if [ "${SMOKE_SKIP_OVMF:-0}" != 1 ]; then
    FW=ovmf
    qemu-img create -q -f qcow2 "$T/a.qcow2" 64M
    qemu-img create -q -f qcow2 "$T/b.qcow2" 64M
    start_vm ovmf pc-q35-7.2 'console=ttyS0 quiet vmrepl.work=write:vda+vdb:64:1:2:9,verify:vda:64:2:9,verifymin:vdb:64:2:9' \
        "$T/a.qcow2" "$T/b.qcow2"
    wait_line '^VMREPL READY' 120
    echo "smoke: [ovmf] READY after $(elapsed "$T0") s"
    wait_line '^VMREPL IDLE' 60
    has '^VMREPL RESULT pass$' || fail "workload failed"
    powerdown ovmf
    host_verify "$T/a.qcow2" --blocks 64 --gen 2 --tag 9
    host_verify "$T/b.qcow2" --blocks 64 --gen 2 --tag 9
fi
echo "smoke: PASS"
