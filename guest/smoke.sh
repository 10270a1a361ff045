#!/bin/bash
# Smoke test of the vmrepl test guest with plain QEMU (no vmrepl): boot, write, verify,
# ACPI power-button shutdown through QMP, then verify the converted raw image on the host;
# the guest agent: off without virtio-serial and with vmrepl.qga=0, ping on q35/OVMF, and
# fsfreeze-freeze/thaw quiescing a two-disk writer (checked on the host while frozen).
# Usage: guest/smoke.sh [--keep]      (needs: qemu-system-x86_64, qemu-img, ovmf, python3;
#                                      see scripts/setup.sh)
# Env: VMREPL_CACHE (guest build dir), SMOKE_ACCEL (default tcg), SMOKE_SKIP_OVMF=1.
# QMP is spoken over a pipe chardev from bash; the guest agent socket with a small python3 client.
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

command -v python3 >/dev/null || { echo "smoke: python3 needed (guest agent client)" >&2; exit 1; }

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
fail() {
    echo "smoke: FAIL: $*" >&2
    [ -f "$T/serial.log" ] && { echo "--- serial log ---" >&2; tail -n 40 "$T/serial.log" >&2; }
    exit 1
}

# extra QEMU arguments of the next start_vm: the guest agent channel as vmrepl adds it
EXTRA=()
QGA_DEVS=(-chardev "socket,path=$T/qga.sock,server=on,wait=off,id=qga0"
    -device virtio-serial-pci,id=vserial0
    -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0)

# start_vm NAME MACHINE APPEND DISK... ; firmware from $FW (bios|ovmf), extra args from EXTRA
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
    args+=("${EXTRA[@]}")
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

# count ERE: matching lines in the serial log
count() { serial | grep -acE "$1" || true; }

# wait_count REGEX N TIMEOUT_S: until at least N lines match
wait_count() {
    local re=$1 n=$2 limit=$3 start
    start=$(now)
    while [ "$(count "$re")" -lt "$n" ]; do
        kill -0 "$QPID" 2>/dev/null || fail "qemu exited while waiting for /$re/ x$n"
        awk -v a="$start" -v b="$(now)" -v l="$limit" 'BEGIN{exit !(b-a>l)}' && fail "timeout waiting for /$re/ x$n"
        sleep 0.1
    done
}

# Guest agent client: qga_client SOCKET TIMEOUT_S COMMAND -> the reply's "return" as JSON on
# stdout; exit 3 on timeout, 1 on other failures. Like vmrepl: 0xFF + guest-sync-delimited,
# drop everything up to the 0xFF of the matching reply, then one command.
cat >"$T/qga.py" <<'PY'
import json, os, socket, sys, time
path, timeout, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + timeout
s = socket.socket(socket.AF_UNIX)
def recv1():
    s.settimeout(max(0.01, deadline - time.monotonic()))
    c = s.recv(1)
    if not c:
        sys.exit("qga: channel closed")
    return c
def line():
    b = b""
    while not b.endswith(b"\n"):
        b += recv1()
    return b
try:
    s.settimeout(timeout)
    s.connect(path)
    sid = os.getpid()
    s.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": sid}}).encode() + b"\n")
    while True:
        while recv1() != b"\xff":
            pass
        try:
            if json.loads(line()).get("return") == sid:
                break
        except ValueError:
            pass
    s.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
    while True:
        t = line().strip(b" \t\r\n\xff")
        if t:
            break
    r = json.loads(t)
    if "return" not in r:
        sys.exit("qga: %s: %s" % (cmd, t.decode(errors="replace")))
    print(json.dumps(r["return"]))
except socket.timeout:
    print("qga: %s: no reply within %g s" % (cmd, timeout), file=sys.stderr)
    sys.exit(3)
PY
# qga COMMAND [TIMEOUT_S]: run an agent command, print its return value, fail the test if none
qga() {
    local out
    out=$(python3 "$T/qga.py" "$T/qga.sock" "${2:-30}" "$1") || fail "guest agent: $1 failed"
    echo "$out"
}

host_verify() { # qcow2 blocks args...
    local img=$1
    shift
    qemu-img convert -O raw "$img" "$img.raw"
    "$CACHE/blockio" verify "$img.raw" "$@" || fail "host verify of $img failed"
}

# live_verify qcow2 gen: the image as the running QEMU has it (qemu-img -U), exactly gen
live_verify() {
    qemu-img convert -U -f qcow2 -O raw "$1" "$1.live.raw"
    "$CACHE/blockio" verify "$1.live.raw" --blocks 64 --gen "$2" >"$T/live.out" ||
        fail "frozen image $1 does not hold exactly gen $2: $(cat "$T/live.out")"
    rm -f "$1.live.raw"
}

# 1. SeaBIOS, i440fx: write gens 1..3, verify inside, power button, verify on the host
#    (no virtio-serial: the guest agent is not started)
FW=bios
qemu-img create -q -f qcow2 "$T/d.qcow2" 64M
start_vm bios pc-i440fx-7.2 'console=ttyS0 quiet vmrepl.work=write:vda:64:1:3,verify:vda:64:3' "$T/d.qcow2"
wait_line '^VMREPL READY' 60
echo "smoke: [bios] READY after $(elapsed "$T0") s"
has '^VMREPL QGA failed reason=no-virtio-serial$' || fail "expected QGA failed reason=no-virtio-serial"
wait_line '^VMREPL IDLE' 60
echo "smoke: [bios] IDLE after $(elapsed "$T0") s"
has '^VMREPL VERIFY dev=vda blocks=64 ok=64 bad=0 zero=0 min_gen=3 max_gen=3 result=pass$' ||
    fail "in-guest verify did not pass"
has '^VMREPL RESULT pass$' || fail "workload failed"
powerdown bios
host_verify "$T/d.qcow2" --blocks 64 --gen 3

# 2. same disk again: verify gen 3 survived, writeloop continues at gen 4, power button
#    stops the writer at a generation boundary. The agent channel is there, but vmrepl.qga=0.
EXTRA=("${QGA_DEVS[@]}")
start_vm loop pc-i440fx-7.2 'console=ttyS0 quiet vmrepl.qga=0 vmrepl.work=verify:vda:64:3,writeloop:vda:64:100' "$T/d.qcow2"
wait_line '^VMREPL WROTE dev=vda gen=6$' 90
has '^VMREPL WROTE dev=vda gen=4$' || fail "writeloop did not continue at gen 4"
has '^VMREPL QGA off$' || fail "vmrepl.qga=0: no 'VMREPL QGA off'"
rc=0
python3 "$T/qga.py" "$T/qga.sock" 3 guest-ping >/dev/null 2>&1 || rc=$?
[ $rc = 3 ] || fail "vmrepl.qga=0: guest agent answered or failed oddly (rc $rc)"
echo "smoke: [loop] vmrepl.qga=0: agent off (no reply in 3 s)"
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
    has '^VMREPL QGA started dev=vport[0-9]+p[0-9]+$' || fail "guest agent not started"
    [ "$(qga guest-ping)" = '{}' ] || fail "guest-ping: unexpected reply"
    echo "smoke: [ovmf] guest agent answers guest-ping"
    wait_line '^VMREPL IDLE' 60
    has '^VMREPL RESULT pass$' || fail "workload failed"
    powerdown ovmf
    host_verify "$T/a.qcow2" --blocks 64 --gen 2 --tag 9
    host_verify "$T/b.qcow2" --blocks 64 --gen 2 --tag 9
fi

# 4. guest agent: a writer on two disks without pause; guest-fsfreeze-freeze must quiesce it
#    at a generation boundary (both disks hold exactly that generation, checked on the host
#    while frozen, no writes for 1 s), guest-fsfreeze-thaw resumes it. Two rounds, then a
#    third freeze ended by the power button instead of a thaw.
FW=bios
EXTRA=("${QGA_DEVS[@]}")
qemu-img create -q -f qcow2 "$T/c.qcow2" 64M
qemu-img create -q -f qcow2 "$T/e.qcow2" 64M
start_vm qga pc-i440fx-7.2 'console=ttyS0 quiet vmrepl.work=writeloop:vda+vdb:64:0' "$T/c.qcow2" "$T/e.qcow2"
wait_line '^VMREPL READY' 60
echo "smoke: [qga] READY after $(elapsed "$T0") s"
has '^VMREPL QGA started dev=vport[0-9]+p[0-9]+$' || fail "guest agent not started"
wait_line '^VMREPL WROTE dev=vdb gen=3$' 60
[ "$(qga guest-ping)" = '{}' ] || fail "guest-ping: unexpected reply"
for round in 1 2; do
    t=$(now)
    r=$(qga guest-fsfreeze-freeze 60)
    [ "$r" = 0 ] || fail "guest-fsfreeze-freeze returned $r, want 0 (no filesystems to freeze)"
    took=$(elapsed "$t")
    wait_count '^VMREPL FROZEN gen=[0-9]+$' $round 10
    g=$(serial | grep -a '^VMREPL FROZEN gen=' | tail -n1 | sed 's/.*gen=//')
    has "^VMREPL QUIESCED dev=vda gen=$g\$" && has "^VMREPL QUIESCED dev=vdb gen=$g\$" ||
        fail "no QUIESCED lines for gen $g"
    [ "$(serial | grep -a '^VMREPL WROTE' | tail -n1)" = "VMREPL WROTE dev=vdb gen=$g" ] ||
        fail "last write before FROZEN is not vdb gen $g"
    n1=$(count '^VMREPL WROTE')
    live_verify "$T/c.qcow2" "$g"
    live_verify "$T/e.qcow2" "$g"
    status=$(qga guest-fsfreeze-status)
    sleep 1
    n2=$(count '^VMREPL WROTE')
    [ "$n1" = "$n2" ] || fail "$((n2 - n1)) WROTE lines while frozen"
    r=$(qga guest-fsfreeze-thaw 60)
    [ "$r" = 0 ] || fail "guest-fsfreeze-thaw returned $r, want 0"
    wait_count '^VMREPL THAWED$' $round 10
    wait_line "^VMREPL WROTE dev=vdb gen=$((g + 2))\$" 30
    has "^VMREPL WROTE dev=vda gen=$((g + 1))\$" || fail "writer did not resume with gen $((g + 1))"
    echo "smoke: [qga] round $round: freeze took $took s, quiesced at gen $g on vda+vdb" \
        "(host-checked while frozen; no writes for 1 s; fsfreeze-status $status), thaw resumed"
done
# power button while frozen: the quiesced writer stops right there, at the frozen generation
[ "$(qga guest-fsfreeze-freeze 60)" = 0 ] || fail "third guest-fsfreeze-freeze failed"
wait_count '^VMREPL FROZEN gen=[0-9]+$' 3 10
g=$(serial | grep -a '^VMREPL FROZEN gen=' | tail -n1 | sed 's/.*gen=//')
powerdown qga
last=$(serial | grep -a '^VMREPL STOPPED dev=vda gen=' | sed 's/.*gen=//')
[ "$last" = "$g" ] || fail "powered off while frozen at gen $g, but STOPPED says gen '$last'"
host_verify "$T/c.qcow2" --blocks 64 --gen "$last"
host_verify "$T/e.qcow2" --blocks 64 --gen "$last"
echo "smoke: PASS"
