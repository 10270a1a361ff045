#!/usr/bin/env bash
# Benchmark (not a test): vmrepl against a peer tool doing the same job in the same run, for
# every case of issue 13's table, on two hosts on loopback addresses (real TLS, real qemu-img /
# qemu-storage-daemon / QEMU, the release build). Prints a table per case and a summary table
# with each case's target at the end. docs/benchmarks.md says what each case does.
#
#   ./scripts/bench.sh                          # 4 GiB disks, 3 rounds per cache condition and change size
#   VMREPL_BENCH_GIB=1 VMREPL_BENCH_ROUNDS=1 ./scripts/bench.sh   # a quick check
#   VMREPL_BENCH_GUEST_SECS=30 ./scripts/bench.sh   # shorter guest throughput windows (default 90 s,
#                                                   # three replication cycles; keep it a multiple of 30)
#   VMREPL_BENCH_HUGE_GIB=64 ./scripts/bench.sh     # size of the sparse disk for memory (default 64)
#   VMREPL_KEEP=1 ./scripts/bench.sh            # keep the hosts' folders (daemon logs) afterwards
#   VMREPL_BENCH_CASES=initial,resync ./scripts/bench.sh  # only some cases (of: initial cycles
#                                               # resync sparse half memory guest; default all;
#                                               # every case needs the initial replication first)
#
# Needs about 7 x the disk size of free space under $VMREPL_BENCH_DIR (default /var/tmp).
# Caches are dropped before each timed run when run as root (cold numbers), so the tools read
# from disk.
set -euo pipefail
cd "$(dirname "$0")/.."
# The pinned Rust toolchain (rust-toolchain.toml) before any cargo command: scripts/toolchain.sh.
. scripts/toolchain.sh
./scripts/setup.sh >/dev/null
cargo build --release --quiet -p vmrepl
B="$(realpath "${CARGO_TARGET_DIR:-target}")/release/vmrepl"
GIB="${VMREPL_BENCH_GIB:-4}"
HUGE_GIB="${VMREPL_BENCH_HUGE_GIB:-64}"
GUEST_SECS="${VMREPL_BENCH_GUEST_SECS:-90}"
ROUNDS="${VMREPL_BENCH_ROUNDS:-3}"
CASES=",${VMREPL_BENCH_CASES:-initial,cycles,resync,sparse,half,memory,guest},"
want() { [[ $CASES == *",$1,"* ]]; }
GUEST="${VMREPL_CACHE:-$PWD/.cache/guest}"
W=$(mktemp -d "${VMREPL_BENCH_DIR:-/var/tmp}/vmrepl-bench.XXXXXX")
A_IP=127.0.0.31
B_IP=127.0.0.32
. scripts/two-hosts.sh
HUGE_MOUNT=
bench_cleanup() {
  if [ -n "$HUGE_MOUNT" ]; then # the daemons first (they hold files there), then the tmpfs
    for h in a b; do
      for p in "$W"/$h/run/*/qemu.pid; do [ -f "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null || true; done
      "$B" --data "$W/$h" stop >/dev/null 2>&1 || true
    done
    umount "$HUGE_MOUNT" || umount -l "$HUGE_MOUNT" || true
  fi
  cleanup
}
trap bench_cleanup EXIT
now() { date +%s.%N; }
# Two cache conditions, each used for one vmrepl run and one peer run:
#  data  - the image files (primary disk, replica layers, rsync's destination) are flushed and
#          evicted from the page cache (posix_fadvise DONTNEED); programs stay cached, as they
#          are on a host whose daemon runs a cycle every few minutes;
#  all   - the whole page cache is dropped (echo 3 > drop_caches): programs load from disk too.
# Without root the eviction cannot be forced and the table says "warm".
evict() { # files or folders...
  python3 - "$@" <<'PY'
import os, sys
for top in sys.argv[1:]:
    paths = [top] if os.path.isfile(top) else [os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
PY
}
cold() { # mode files...
  local mode=$1; shift
  if [ "$(id -u)" != 0 ]; then COLD=warm; return; fi
  sync
  case $mode in
    data) evict "$@"; COLD="data not cached" ;;
    all) echo 3 >/proc/sys/vm/drop_caches; COLD="nothing cached" ;;
  esac
}
rel_of() { "$B" --data "$W/$1" --json replication status "$2" | json "d['relationships'][0]$3"; }
seq_of() { # without python: the polls below would take CPU from the cycle they wait for
  local out; out=$("$B" --data "$W/$1" --json replication status "$2")
  [[ $out =~ \"last_sequence\":\ *([0-9]+) ]] && echo "${BASH_REMATCH[1]}"
}
sent_of() { rel_of a "$1" "['stats']['total_bytes']"; }
wait_seq() { # host vm seq: poll every 0.2 s until the host reports sequence >= seq (the times
  # measured come from both hosts' records, not from these polls)
  local t0=$SECONDS
  until [ "$(seq_of "$1" "$2")" -ge "$3" ]; do
    sleep 0.2
    if ((SECONDS - t0 > 1800)); then
      echo "!! $1 never reached log $3 of $2:" >&2
      "$B" --data "$W/$1" replication status "$2" >&2
      exit 1
    fi
  done
}
# Milliseconds from the start of cycle SEQ of VM UUID on the primary (its own record) to the
# replica having applied it (the replica's record): both hosts share this machine's clock.
cycle_ms() {
  python3 - "$W" "$1" "$2" <<'PY'
import sqlite3, sys
w, uuid, seq = sys.argv[1], sys.argv[2], int(sys.argv[3])
a = sqlite3.connect(f"file:{w}/a/state.db?mode=ro", uri=True)
b = sqlite3.connect(f"file:{w}/b/state.db?mode=ro", uri=True)
start, acked = a.execute("SELECT start_ms, start_ms + duration_ms FROM cycles WHERE vm_uuid=? AND seq=? AND outcome='ok'", (uuid, seq)).fetchone()
applied, = b.execute("SELECT last_apply_ms FROM replicas WHERE vm_uuid=?", (uuid,)).fetchone()
print(applied - start, acked - start)
PY
}
hwm() { awk '/VmHWM/ {print $2}' "/proc/$(cat "$W/$1.daemon.pid")/status"; } # KiB
hwm_reset() { for h in a b; do echo 5 >"/proc/$(cat "$W/$h.daemon.pid")/clear_refs"; done; }
vm_field() { a --json vm show "$1" | json "d['definition']$2"; }
# Bytes of a qcow2 image that hold data (allocated, not zero clusters).
allocated() { qemu-img map -U --output=json "$1" | json 'sum(e["length"] for e in d if e["data"])'; }
# The peer of an initial replication: a full copy into a new qcow2 image, made durable. Sets P_SECS.
convert_peer() { # source image
  local out="$W/convert-peer.qcow2" t0
  cold all
  t0=$(now)
  qemu-img convert -U -O qcow2 "$1" "$out"
  sync "$out"
  P_SECS=$(python3 -c "print($(now) - $t0)")
  rm -f "$out"
}
sec() { python3 -c "print($1 / 1000)"; }
mib() { python3 -c "print(f'{$1/1048576:.1f}')"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
# ratio A B: A / B with one decimal
ratio() { python3 -c "print(f'{$1 / $2:.1f}')"; }
# met EXPR: "yes" or "**no**" as the python expression holds
met() { python3 -c "print('yes' if ($1) else '**no**')"; }
SUMMARY=() # the final table's rows

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== setting up two hosts and a ${GIB} GiB disk of random data in $W"
two_hosts hosta.bench hostb.bench bench >/dev/null
head -c "${GIB}G" /dev/urandom >"$W/random.raw"
a vm create big --generation 1 --memory 128 --import "$W/random.raw" >/dev/null
rm "$W/random.raw"
DISK=$(vm_field big "['disks'][0]['path']")
UUID=$(vm_field big "['uuid']")
REPLICA="$W/b/replicas/$UUID/disks/disk0/top.qcow2"

echo "== initial replication of the full disk, then qemu-img convert + sync of it"
cold all
a replication enable big --replica-server "$B_IP:$B_PORT" --replica-name hostb.bench \
  --frequency 3600 --recovery-points 0 >/dev/null
wait_seq a big 1 # recorded on the primary (it has closed the disk again) ...
wait_seq b big 1 # ... and applied on the replica
read -r full_ms _ < <(cycle_ms "$UUID" 1)
full_bytes=$(sent_of big)
convert_peer "$DISK"
full_peer=$P_SECS
SUMMARY+=("$(printf '| initial replication, %s GiB of random data (nothing cached) | %.2f s | qemu-img convert -O qcow2 + sync: %.2f s | %sx (vmrepl / peer) | <= 1.5x | %s |' \
  "$GIB" "$(sec "$full_ms")" "$full_peer" "$(ratio "$(sec "$full_ms")" "$full_peer")" "$(met "$full_ms / 1000 <= 1.5 * $full_peer")")")
cp --sparse=always "$DISK" "$W/rsync-dest.qcow2"

# Rewrites PCT % of the disk's 64 KiB blocks at random (seed SEED) with new random data,
# through qemu-io (tracked by the dirty bitmap; `vm trust-disks` tells vmrepl so). Sets CHANGED
# (blocks).
rewrite() { # pct seed
  echo "== rewriting $1 % of the 64 KiB blocks at random, seed $2"
  head -c 65536 /dev/urandom >"$W/block.bin" # new data: every picked block differs afterwards
  python3 - "$GIB" "$W/block.bin" "$2" "$1" >"$W/writes.args" <<'EOF2'
import random, sys
blocks = int(sys.argv[1]) * (1 << 30) // 65536
pick = random.Random(int(sys.argv[3])).sample(range(blocks), blocks * int(sys.argv[4]) // 100)
for b in sorted(pick):
    print("-c")
    print(f"write -q -s {sys.argv[2]} {b * 65536} 64k")
EOF2
  CHANGED=$(($(wc -l <"$W/writes.args") / 2))
  mapfile -t ARGS <"$W/writes.args"
  qemu-io -f qcow2 "${ARGS[@]}" "$DISK"
  # qemu-io kept the bitmaps: say so, or vmrepl takes the file's new modification time for a
  # change made outside it and resynchronizes (docs/design/replication.md).
  a vm trust-disks big >/dev/null
}
# rsync of the same image pair under cache condition $1. Sets R_RSYNC (s) and R_LITERAL (bytes).
rsync_peer() {
  echo "== rsync --inplace --no-whole-file of the same image pair, $1"
  cold "$1" "$DISK" "$W/rsync-dest.qcow2"
  local t0; t0=$(now)
  rsync --inplace --no-whole-file --stats "$DISK" "$W/rsync-dest.qcow2" >"$W/rsync.out"
  R_RSYNC=$(python3 -c "print($(now) - $t0)")
  R_LITERAL=$(sed -n 's/^Literal data: \([0-9,]*\).*/\1/p' "$W/rsync.out" | tr -d ,)
}

# One round: rewrite PCT % of the blocks (seed $2), one vmrepl cycle (sequence $3) and one
# rsync run of the same change, both under cache condition $1. Sets the R_* variables.
round() {
  local mode=$1 seed=$2 seq=$3 pct=$4
  # No cycle runs for an hour; resuming after the writes starts one at once.
  a replication pause big >/dev/null
  rewrite "$pct" "$seed"
  local before; before=$(sent_of big)

  echo "== one replication cycle (track, extract, send over TLS, durable, applied), $mode"
  cold "$mode" "$DISK" "$W/b/replicas/$UUID"
  R_MODE=$COLD
  a replication resume big >/dev/null
  wait_seq a big "$seq"
  wait_seq b big "$seq"
  read -r R_CYCLE R_ACK < <(cycle_ms "$UUID" "$seq")
  R_BYTES=$(($(sent_of big) - before))
  qemu-img compare -q -U "$DISK" "$REPLICA" && R_SAME=identical || R_SAME=DIFFERENT
  rsync_peer "$mode"
}
ROWS=()
MEDIANS=()
seq_no=2
seed=42
if want cycles; then
for pct in 1 10; do
  target=$([ "$pct" = 1 ] && echo 30 || echo 10)
  for mode in data all; do
    cycles=() rsyncs=()
    for ((i = 1; i <= ROUNDS; i++)); do
      round "$mode" "$seed" "$seq_no" "$pct"
      seq_no=$((seq_no + 1))
      seed=$((seed + 1))
      cycles+=("$(sec "$R_CYCLE")")
      rsyncs+=("$R_RSYNC")
      ROWS+=("$(printf '| %s %%, %s, round %d | %.3f s (%.3f s until the primary finished) | %.2f s | %.1fx | %s MiB / %s MiB | %s |' "$pct" "$R_MODE" "$i" "$(sec "$R_CYCLE")" "$(sec "$R_ACK")" "$R_RSYNC" "$(python3 -c "print($R_RSYNC / $(sec "$R_CYCLE"))")" "$(mib "$R_BYTES")" "$(mib "$R_LITERAL")" "$R_SAME")")
    done
    mc=$(median "${cycles[@]}")
    mr=$(median "${rsyncs[@]}")
    MEDIANS+=("$(printf '| **%s %%, %s: median of %d rounds** | **%.3f s** | **%.2f s** | **%.1fx** |' "$pct" "$R_MODE" "$ROUNDS" "$mc" "$mr" "$(python3 -c "print($mr / $mc)")")")
    SUMMARY+=("$(printf '| cycle, %s GiB disk, %s %% of 64 KiB blocks changed (%s blocks), %s, median of %d | %.3f s | rsync --inplace --no-whole-file: %.2f s | %sx (rsync / vmrepl) | >= %sx | %s |' \
      "$GIB" "$pct" "$CHANGED" "$R_MODE" "$ROUNDS" "$mc" "$mr" "$(ratio "$mr" "$mc")" "$target" "$(met "$mr / $mc >= $target")")")
  done
done

fi
if want resync; then
echo "== resynchronization with 1 % of the 64 KiB blocks differing ($ROUNDS rounds)"
rs_times=(); rs_rsyncs=(); rs_reads=(); RS_SAME=identical
for round in $(seq 1 "$ROUNDS"); do
  a replication pause big >/dev/null
  seed=$((seed + 1))
  rewrite 1 "$seed"
  before=$(sent_of big)
  cold data "$DISK" "$W/b/replicas/$UUID"
  RS_MODE=$COLD
  # The writes are tracked, but a resynchronization ignores the bitmaps: it compares the disks.
  a replication resume big --resynchronize >/dev/null
  # It is done when the primary records it: one log per range of the disk (parts), then a
  # final delta, so its last log is some sequences on.
  wait_seq a big "$seq_no"
  rs_seq=$(seq_of a big)
  wait_seq b big "$rs_seq"
  read -r RS_CYCLE RS_ACK < <(cycle_ms "$UUID" "$rs_seq")
  RS_PARTS=$((rs_seq - seq_no))
  RS_KIND=$(python3 -c "import sqlite3,sys; print(sqlite3.connect('file:$W/a/state.db?mode=ro', uri=True).execute('SELECT kind FROM cycles WHERE vm_uuid=? AND seq=? AND outcome=\"ok\"', ('$UUID', $rs_seq)).fetchone()[0])")
  RS_BYTES=$(($(sent_of big) - before))
  RS_DIFF=$((CHANGED * 65536))
  qemu-img compare -q -U "$DISK" "$REPLICA" || RS_SAME=DIFFERENT
  rsync_peer data
  RS_LITERAL=$R_LITERAL
  # The floor: after tracking is lost every block of the primary's disk must be read once.
  # One direct read of it, in the same round, shows how near vmrepl comes to that.
  cold data "$DISK"
  t0=$(now)
  dd if="$DISK" of=/dev/null bs=1M iflag=direct status=none
  RS_READ=$(python3 -c "print($(now) - $t0)")
  rs_times+=("$(sec "$RS_CYCLE")"); rs_rsyncs+=("$R_RSYNC"); rs_reads+=("$RS_READ")
  echo "   round $round: vmrepl $(sec "$RS_CYCLE") s, rsync $R_RSYNC s, one direct read of the disk $RS_READ s, $(mib "$RS_BYTES") MiB sent"
  seq_no=$((rs_seq + 1))
done
RS_TIME=$(median "${rs_times[@]}")
RS_RSYNC=$(median "${rs_rsyncs[@]}")
RS_FLOOR=$(median "${rs_reads[@]}")
SUMMARY+=("$(printf '| resync, %s GiB disk, 1 %% of 64 KiB blocks differing (%s blocks), %s, median of %d: time | %.3f s | rsync --inplace --no-whole-file: %.2f s | %sx (rsync / vmrepl) | >= 3x | %s |' \
  "$GIB" "$CHANGED" "$RS_MODE" "$ROUNDS" "$RS_TIME" "$RS_RSYNC" "$(ratio "$RS_RSYNC" "$RS_TIME")" "$(met "$RS_RSYNC / $RS_TIME >= 3")")")
SUMMARY+=("$(printf '| resync, same: time against one direct read of the primary disk (the least any resync after lost tracking takes), median of %d | %.3f s | dd iflag=direct bs=1M: %.2f s | %sx (vmrepl / read) | none: 3x rsync is within reach only when rsync takes 3x this read | - |' \
  "$ROUNDS" "$RS_TIME" "$RS_FLOOR" "$(ratio "$RS_TIME" "$RS_FLOOR")")")
SUMMARY+=("$(printf '| resync, same: bytes on the wire (last round) | %s MiB | differing blocks: %s MiB (rsync literal data: %s MiB) | %sx the differing blocks | <= 1.2x | %s |' \
  "$(mib "$RS_BYTES")" "$(mib "$RS_DIFF")" "$(mib "$RS_LITERAL")" "$(ratio "$RS_BYTES" "$RS_DIFF")" "$(met "$RS_BYTES <= 1.2 * $RS_DIFF")")")
echo "resynchronization: $RS_PARTS logs ($((RS_PARTS - 1)) parts and the final delta), kind of the last: $RS_KIND"

fi
if want sparse; then
echo "== initial replication of a sparse ${GIB} GiB disk holding 64 MiB"
a vm create sparse --generation 1 --memory 128 --disk "${GIB}G" >/dev/null
SDISK=$(vm_field sparse "['disks'][0]['path']")
SUUID=$(vm_field sparse "['uuid']")
head -c 64M /dev/urandom >"$W/64m.bin"
qemu-io -f qcow2 -c "write -q -s $W/64m.bin 256M 64M" "$SDISK"
a replication enable sparse --replica-server "$B_IP:$B_PORT" --replica-name hostb.bench \
  --frequency 3600 --recovery-points 0 >/dev/null
wait_seq a sparse 1
wait_seq b sparse 1
read -r sparse_ms _ < <(cycle_ms "$SUUID" 1)
sparse_bytes=$(sent_of sparse)

fi
if want half; then
echo "== initial replication of a half-allocated ${GIB} GiB disk (every other MiB random), then qemu-img convert + sync of it"
python3 - "$W/half.raw" "$GIB" <<'PY'
import os, sys
with open(sys.argv[1], "wb") as f:
    mib = int(sys.argv[2]) * 1024
    f.truncate(mib << 20)
    for i in range(0, mib, 2):
        f.seek(i << 20)
        f.write(os.urandom(1 << 20))
PY
a vm create half --generation 1 --memory 128 --import "$W/half.raw" >/dev/null
rm "$W/half.raw"
HDISK=$(vm_field half "['disks'][0]['path']")
HUUID=$(vm_field half "['uuid']")
half_alloc=$(allocated "$HDISK")
cold all
a replication enable half --replica-server "$B_IP:$B_PORT" --replica-name hostb.bench \
  --frequency 3600 --recovery-points 0 >/dev/null
wait_seq a half 1
wait_seq b half 1
read -r half_ms _ < <(cycle_ms "$HUUID" 1)
half_bytes=$(sent_of half)
qemu-img compare -q -U "$HDISK" "$W/b/replicas/$HUUID/disks/disk0/top.qcow2" && HALF_SAME=identical || HALF_SAME=DIFFERENT
convert_peer "$HDISK"
half_peer=$P_SECS
SUMMARY+=("$(printf '| initial replication, half-allocated %s GiB disk (nothing cached): time | %.2f s | qemu-img convert -O qcow2 + sync: %.2f s | %sx (vmrepl / peer) | (<= 1.5x, as the full disk) | %s |' \
  "$GIB" "$(sec "$half_ms")" "$half_peer" "$(ratio "$(sec "$half_ms")" "$half_peer")" "$(met "$half_ms / 1000 <= 1.5 * $half_peer")")")
SUMMARY+=("$(printf '| initial replication, half-allocated: bytes on the wire | %s MiB | allocated in the image: %s MiB of %s MiB | %sx the allocated bytes | zeros never sent (<= 1.01x allocated) | %s |' \
  "$(mib "$half_bytes")" "$(mib "$half_alloc")" "$((GIB * 1024))" "$(python3 -c "print(f'{$half_bytes / $half_alloc:.3f}')")" "$(met "$half_bytes <= 1.01 * $half_alloc")")")

fi
if want memory; then
# Peak memory so far: every case above ran on disks of GIB GiB.
HWM_A=$(($(hwm a) / 1024))
HWM_B=$(($(hwm b) / 1024))
SUMMARY+=("$(printf '| daemon peak memory (VmHWM), %s GiB disks (every case above) | primary %s MiB / replica %s MiB | - | - | < 100 MiB | %s |' \
  "$GIB" "$HWM_A" "$HWM_B" "$(met "max($HWM_A, $HWM_B) < 100")")")

echo "== initial replication of a sparse ${HUGE_GIB} GiB disk holding 64 MiB (peak memory reset before)"
# The replica server refuses a VM whose disks' full size does not fit in its storage. So that
# the sparse disk is cheap on any machine, its replica goes to a tmpfs as large as the disk:
# only what is allocated (64 MiB) takes memory. Memory is measured, not storage speed.
mkdir -p "$W/huge-replicas"
mount -t tmpfs -o "size=$((HUGE_GIB * 2))G,mode=0700" vmrepl-bench "$W/huge-replicas"
HUGE_MOUNT="$W/huge-replicas"
b replication server authorize --primary hosta.bench --storage "$W/huge-replicas" --trust-group bench >/dev/null
a vm create huge --generation 1 --memory 128 --disk "${HUGE_GIB}G" >/dev/null
UDISK=$(vm_field huge "['disks'][0]['path']")
UUUID=$(vm_field huge "['uuid']")
qemu-io -f qcow2 -c "write -q -s $W/64m.bin $((HUGE_GIB / 2))G 64M" "$UDISK"
hwm_reset
a replication enable huge --replica-server "$B_IP:$B_PORT" --replica-name hostb.bench \
  --frequency 3600 --recovery-points 0 >/dev/null
wait_seq a huge 1
wait_seq b huge 1
read -r huge_ms _ < <(cycle_ms "$UUUID" 1)
huge_bytes=$(sent_of huge)
HWM64_A=$(($(hwm a) / 1024))
HWM64_B=$(($(hwm b) / 1024))
# Later replicas go to the disk again.
b replication server authorize --primary hosta.bench --storage "$W/b/replicas" --trust-group bench >/dev/null
SUMMARY+=("$(printf '| daemon peak memory (VmHWM), initial replication of a sparse %s GiB disk (%.2f s, %s MiB sent) | primary %s MiB / replica %s MiB | - | - | < 100 MiB | %s |' \
  "$HUGE_GIB" "$(sec "$huge_ms")" "$(mib "$huge_bytes")" "$HWM64_A" "$HWM64_B" "$(met "max($HWM64_A, $HWM64_B) < 100")")")

fi
if want guest; then
# Guest write throughput: the test guest (guest/, docs/test-guest.md) under TCG runs
# `writeloop`, rewriting GBLOCKS 4 KiB blocks of its disk generation after generation, each
# generation made durable (fdatasync) before it prints "VMREPL WROTE dev=vda gen=G" on the
# serial console. Throughput over a window = generations completed x GBLOCKS x 4 KiB / time,
# timed on the host between two such lines. Three windows: replication off, on (every 30 s,
# after the initial copy), off again (replication removed); "off" is the mean of the two.
GBLOCKS=4096 # 16 MiB per generation
throughput() { # serial log, seconds -> MiB/s
  python3 - "$1" "$2" "$GBLOCKS" <<'PY'
import os, re, sys, time
path, secs, blocks = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
pat = re.compile(rb"VMREPL WROTE dev=vda gen=(\d+)")
off = os.path.getsize(path)
def next_gen():
    # waits for the next WROTE line appended after `off`; returns (host time, generation)
    global off
    buf = b""
    while True:
        size = os.path.getsize(path)
        if size < off:  # the log was rotated
            off, buf = 0, b""
        if size > off:
            with open(path, "rb") as f:
                f.seek(off)
                data = f.read()
            t = time.time()
            off += len(data)
            buf += data
            found = pat.findall(buf)
            if found:
                return t, int(found[-1])
            buf = buf[-200:]
        time.sleep(0.005)
t0, g0 = next_gen()
time.sleep(secs)
t1, g1 = next_gen()
print(f"{(g1 - g0) * blocks * 4096 / (t1 - t0) / 1048576:.2f}")
PY
}
echo "== guest write throughput: the test guest under TCG rewriting $((GBLOCKS * 4 / 1024)) MiB per generation"
a vm create guest --generation 1 --memory 256 --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initrd.img" \
  --cmdline "console=ttyS0 quiet vmrepl.work=writeloop:vda:$GBLOCKS:0" --nic none --disk 1G >/dev/null
GUUID=$(vm_field guest "['uuid']")
SERIAL="$W/a/run/$GUUID/serial.log"
a vm start guest >/dev/null
t0=$SECONDS
until grep -q "VMREPL WROTE dev=vda gen=3" "$SERIAL" 2>/dev/null; do
  sleep 0.5
  if ((SECONDS - t0 > 300)); then
    echo "!! the guest wrote nothing within 300 s:" >&2
    tail -20 "$SERIAL" >&2
    exit 1
  fi
done
echo "== replication off, ${GUEST_SECS} s"
g_off1=$(throughput "$SERIAL" "$GUEST_SECS")
a replication enable guest --replica-server "$B_IP:$B_PORT" --replica-name hostb.bench \
  --frequency 30 --recovery-points 0 >/dev/null
wait_seq b guest 1
echo "== replication every 30 s, ${GUEST_SECS} s"
gseq0=$(seq_of a guest)
g_on=$(throughput "$SERIAL" "$GUEST_SECS")
g_cycles=$(($(seq_of a guest) - gseq0))
a replication remove guest >/dev/null
echo "== replication off again, ${GUEST_SECS} s"
g_off2=$(throughput "$SERIAL" "$GUEST_SECS")
g_off=$(python3 -c "print(($g_off1 + $g_off2) / 2)")
SUMMARY+=("$(printf '| guest write throughput (TCG, writeloop), replication every 30 s (%s cycles in %s s) | %.2f MiB/s | replication off: %.2f MiB/s (before %.2f, after %.2f) | %s %% (on / off) | >= 95 %% | %s |' \
  "$g_cycles" "$GUEST_SECS" "$g_on" "$g_off" "$g_off1" "$g_off2" "$(python3 -c "print(f'{100 * $g_on / $g_off:.1f}')")" "$(met "$g_on >= 0.95 * $g_off")")")

fi
echo
echo "One delta cycle of a ${GIB} GiB disk with 1 % or 10 % of its 64 KiB blocks rewritten at random (new blocks each round):"
echo "vmrepl's time runs from the cycle's start on the primary until the replica has applied the log."
echo
echo "| changed, cache condition | vmrepl cycle | rsync --inplace --no-whole-file | rsync / vmrepl | vmrepl on the wire / rsync literal data | replica afterwards |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "| summary | vmrepl cycle | rsync | rsync / vmrepl |"
echo "|---|---|---|---|"
printf '%s\n' "${MEDIANS[@]}"
echo
echo "| other measurement | time | bytes |"
echo "|---|---|---|"
printf '| vmrepl: initial replication, full random disk | %.2f s | %s MiB |\n' "$(sec "$full_ms")" "$(mib "$full_bytes")"
! want sparse || printf '| vmrepl: initial replication, sparse disk with 64 MiB allocated | %.2f s | %s MiB |\n' "$(sec "$sparse_ms")" "$(mib "$sparse_bytes")"
! want half || printf '| vmrepl: initial replication, half-allocated disk (replica %s) | %.2f s | %s MiB |\n' "$HALF_SAME" "$(sec "$half_ms")" "$(mib "$half_bytes")"
! want resync || printf '| vmrepl: resynchronization, median of %d (log kind %s, replica %s after every round) | %.3f s (last round: %.3f s until the primary finished) | %s MiB |\n' "$ROUNDS" "$RS_KIND" "$RS_SAME" "$RS_TIME" "$(sec "$RS_ACK")" "$(mib "$RS_BYTES")"
! want memory || printf '| peak memory (VmHWM) of the primary / replica daemon, %s GiB disks | | %s / %s MiB |\n' "$GIB" "$HWM_A" "$HWM_B"
! want memory || printf '| peak memory (VmHWM) of the primary / replica daemon, sparse %s GiB disk | | %s / %s MiB |\n' "$HUGE_GIB" "$HWM64_A" "$HWM64_B"
echo
echo "Against the peers (issue 13), ${GIB} GiB disks, one run on $(hostname) at $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' with local changes'),"
echo "load average (1, 5, 15 min) $LOAD_START at the start and $(cut -d' ' -f1-3 /proc/loadavg) at the end (a busy machine makes every time longer):"
echo
echo "| case | vmrepl | peer in the same run | ratio | target | met |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
