#!/usr/bin/env bash
# Benchmark (not a test): one replication cycle against rsync on the same image pair, and the
# initial replication of a sparse disk. Two hosts on loopback addresses, real TLS, real
# qemu-img / qemu-storage-daemon, the release build. Prints a table.
#
#   ./scripts/bench.sh                # 4 GiB disk, 1 % of its 64 KiB blocks rewritten
#   VMREPL_BENCH_GIB=1 ./scripts/bench.sh
#   VMREPL_KEEP=1 ./scripts/bench.sh   # keep the hosts' folders (daemon logs) afterwards
#
# Needs about 8 x the disk size of free space under $VMREPL_BENCH_DIR (default /var/tmp).
# Caches are dropped before each timed run when run as root (cold numbers), so both tools
# read from disk.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
cargo build --release --quiet -p vmrepl
B="$PWD/target/release/vmrepl"
GIB="${VMREPL_BENCH_GIB:-4}"
W=$(mktemp -d "${VMREPL_BENCH_DIR:-/var/tmp}/vmrepl-bench.XXXXXX")
A_IP=127.0.0.31
B_IP=127.0.0.32
. scripts/two-hosts.sh
now() { date +%s.%N; }
# Two cache conditions, each used for one vmrepl cycle and one rsync run:
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
seq_of() { "$B" --data "$W/$1" --json replication status "$2" | json 'd["relationships"][0]["last_sequence"]'; }
sent_of() { a --json replication status "$1" | json 'd["relationships"][0]["stats"]["total_bytes"]'; }
wait_seq() { # host vm seq: poll every 20 ms until the host reports sequence >= seq
  until [ "$(seq_of "$1" "$2")" -ge "$3" ]; do sleep 0.02; done
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

echo "== setting up two hosts and a ${GIB} GiB disk of random data in $W"
two_hosts hosta.bench hostb.bench bench >/dev/null
head -c "${GIB}G" /dev/urandom >"$W/random.raw"
a vm create big --generation 1 --memory 128 --import "$W/random.raw" >/dev/null
rm "$W/random.raw"
DISK=$(a --json vm show big | json 'd["definition"]["disks"][0]["path"]')
UUID=$(a --json vm show big | json 'd["definition"]["uuid"]')
REPLICA="$W/b/replicas/$UUID/disks/disk0/top.qcow2"

echo "== initial replication of the full disk"
cold all
a replication enable big --replica-server "$B_IP:$B_PORT" --replica-name hostb.bench \
  --frequency 3600 --recovery-points 0 >/dev/null
wait_seq a big 1 # recorded on the primary (it has closed the disk again) ...
wait_seq b big 1 # ... and applied on the replica
read -r full_ms _ < <(cycle_ms "$UUID" 1)
full_bytes=$(sent_of big)
cp --sparse=always "$DISK" "$W/rsync-dest.qcow2"
head -c 65536 /dev/urandom >"$W/block.bin"

# One round: rewrite 1 % of the blocks (seed $2), one vmrepl cycle (sequence $3) and one rsync
# run of the same change, both under cache condition $1. Sets the R_* variables.
round() {
  local mode=$1 seed=$2 seq=$3
  # No cycle runs for an hour; resuming after the writes starts one at once.
  a replication pause big >/dev/null
  echo "== rewriting 1 % of the 64 KiB blocks at random, seed $seed (tracked by the dirty bitmap)"
  python3 - "$GIB" "$W/block.bin" "$seed" >"$W/writes.args" <<'EOF2'
import random, sys
blocks = int(sys.argv[1]) * (1 << 30) // 65536
pick = random.Random(int(sys.argv[3])).sample(range(blocks), blocks // 100)
for b in sorted(pick):
    print("-c")
    print(f"write -q -s {sys.argv[2]} {b * 65536} 64k")
EOF2
  CHANGED=$(( $(wc -l <"$W/writes.args") / 2 ))
  mapfile -t ARGS <"$W/writes.args"
  qemu-io -f qcow2 "${ARGS[@]}" "$DISK"
  local before; before=$(sent_of big)

  echo "== one replication cycle (track, extract, send over TLS, durable, applied), $mode"
  cold "$mode" "$DISK" "$W/b/replicas/$UUID"
  R_MODE=$COLD
  a replication resume big >/dev/null
  wait_seq a big "$seq"
  wait_seq b big "$seq"
  read -r R_CYCLE R_ACK < <(cycle_ms "$UUID" "$seq")
  R_BYTES=$(( $(sent_of big) - before ))
  qemu-img compare -q -U "$DISK" "$REPLICA" && R_SAME=identical || R_SAME=DIFFERENT

  echo "== rsync --inplace --no-whole-file of the same image pair, $mode"
  cold "$mode" "$DISK" "$W/rsync-dest.qcow2"
  local t0; t0=$(now)
  rsync --inplace --no-whole-file --stats "$DISK" "$W/rsync-dest.qcow2" >"$W/rsync.out"
  R_RSYNC=$(python3 -c "print($(now) - $t0)")
  R_LITERAL=$(sed -n 's/^Literal data: \([0-9,]*\).*/\1/p' "$W/rsync.out" | tr -d ,)
}
ROWS=()
SUMMARY=()
sec() { python3 -c "print($1 / 1000)"; }
mib() { python3 -c "print(f'{$1/1048576:.1f}')"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
ROUNDS="${VMREPL_BENCH_ROUNDS:-3}"
seq_no=2
seed=42
for mode in data all; do
  cycles=() rsyncs=()
  for ((i = 1; i <= ROUNDS; i++)); do
    round "$mode" "$seed" "$seq_no"
    seq_no=$((seq_no + 1))
    seed=$((seed + 1))
    cycles+=("$(sec "$R_CYCLE")")
    rsyncs+=("$R_RSYNC")
    ROWS+=("$(printf '| %s, round %d | %.3f s (%.3f s until the primary finished) | %.2f s | %.1fx | %s MiB / %s MiB | %s |' "$R_MODE" "$i" "$(sec "$R_CYCLE")" "$(sec "$R_ACK")" "$R_RSYNC" "$(python3 -c "print($R_RSYNC / $(sec "$R_CYCLE"))")" "$(mib "$R_BYTES")" "$(mib "$R_LITERAL")" "$R_SAME")")
  done
  mc=$(median "${cycles[@]}")
  mr=$(median "${rsyncs[@]}")
  SUMMARY+=("$(printf '| **%s: median of %d rounds** | **%.3f s** | **%.2f s** | **%.1fx** |' "$R_MODE" "$ROUNDS" "$mc" "$mr" "$(python3 -c "print($mr / $mc)")")")
done

echo "== initial replication of a sparse ${GIB} GiB disk holding 64 MiB"
a vm create sparse --generation 1 --memory 128 --disk "${GIB}G" >/dev/null
SDISK=$(a --json vm show sparse | json 'd["definition"]["disks"][0]["path"]')
SUUID=$(a --json vm show sparse | json 'd["definition"]["uuid"]')
head -c 64M /dev/urandom >"$W/64m.bin"
qemu-io -f qcow2 -c "write -q -s $W/64m.bin 256M 64M" "$SDISK"
a replication enable sparse --replica-server "$B_IP:$B_PORT" --replica-name hostb.bench \
  --frequency 300 --recovery-points 0 >/dev/null
wait_seq a sparse 1
wait_seq b sparse 1
read -r sparse_ms _ < <(cycle_ms "$SUUID" 1)
sparse_bytes=$(sent_of sparse)

echo
echo "One delta cycle of a ${GIB} GiB disk with ${CHANGED} of its 64 KiB blocks rewritten at random (new blocks each round):"
echo "vmrepl's time runs from the cycle's start on the primary until the replica has applied the log."
echo
echo "| cache condition | vmrepl cycle | rsync --inplace --no-whole-file | rsync / vmrepl | vmrepl on the wire / rsync literal data | replica afterwards |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "| summary | vmrepl cycle | rsync | rsync / vmrepl |"
echo "|---|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
echo
echo "| other measurement | time | bytes |"
echo "|---|---|---|"
printf '| vmrepl: initial replication, full random disk | %.2f s | %s MiB |\n' "$(sec "$full_ms")" "$(mib "$full_bytes")"
printf '| vmrepl: initial replication, sparse disk with 64 MiB allocated | %.2f s | %s MiB |\n' "$(sec "$sparse_ms")" "$(mib "$sparse_bytes")"
printf '| peak memory (VmHWM) of the primary / replica daemon | | %s / %s MiB |\n' "$(( $(hwm a) / 1024 ))" "$(( $(hwm b) / 1024 ))"
