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
cold() {
  if [ "$(id -u)" = 0 ]; then sync; echo 3 >/proc/sys/vm/drop_caches; COLD=cold; else COLD=warm; fi
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
cold
a replication enable big --replica-server "$B_IP:$B_PORT" --replica-name hostb.bench \
  --frequency 3600 --recovery-points 0 >/dev/null
wait_seq a big 1 # recorded on the primary (it has closed the disk again) ...
wait_seq b big 1 # ... and applied on the replica
read -r full_ms _ < <(cycle_ms "$UUID" 1)
full_bytes=$(sent_of big)
# No cycle runs for an hour now; resuming after the writes starts one at once.
a replication pause big >/dev/null

echo "== rewriting 1 % of the 64 KiB blocks at random (tracked by the dirty bitmap)"
cp --sparse=always "$DISK" "$W/rsync-dest.qcow2"
head -c 65536 /dev/urandom >"$W/block.bin"
python3 - "$GIB" "$W/block.bin" >"$W/writes.args" <<'EOF'
import random, sys
blocks = int(sys.argv[1]) * (1 << 30) // 65536
pick = random.Random(42).sample(range(blocks), blocks // 100)
for b in sorted(pick):
    print("-c")
    print(f"write -q -s {sys.argv[2]} {b * 65536} 64k")
EOF
CHANGED=$(( $(wc -l <"$W/writes.args") / 2 ))
mapfile -t ARGS <"$W/writes.args"
qemu-io -f qcow2 "${ARGS[@]}" "$DISK"
before=$(sent_of big)

echo "== one replication cycle (track, extract, send over TLS, durable, applied)"
cold
c_mode=$COLD
a replication resume big >/dev/null
wait_seq a big 2
wait_seq b big 2
read -r cycle_ms ack_ms < <(cycle_ms "$UUID" 2)
cycle_bytes=$(( $(sent_of big) - before ))
qemu-img compare -q -U "$DISK" "$REPLICA" && same=identical || same=DIFFERENT

echo "== rsync --inplace --no-whole-file of the same image pair"
cold
r_mode=$COLD
t0=$(now)
rsync --inplace --no-whole-file --stats "$DISK" "$W/rsync-dest.qcow2" >"$W/rsync.out"
t_rsync=$(python3 -c "print($(now) - $t0)")
rsync_literal=$(sed -n 's/^Literal data: \([0-9,]*\).*/\1/p' "$W/rsync.out" | tr -d ,)

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

sec() { python3 -c "print($1 / 1000)"; }
mib() { python3 -c "print(f'{$1/1048576:.1f}')"; }
echo
echo "| measurement (${GIB} GiB disk, ${CHANGED} of its 64 KiB blocks changed) | time | bytes |"
echo "|---|---|---|"
printf '| vmrepl: one cycle until applied on the replica, %s cache (replica %s afterwards) | %.3f s | %s MiB on the wire |\n' "$c_mode" "$same" "$(sec "$cycle_ms")" "$(mib "$cycle_bytes")"
printf '| vmrepl: the same cycle until the primary finished it (bitmap dropped, disks closed) | %.3f s | |\n' "$(sec "$ack_ms")"
printf '| rsync --inplace --no-whole-file, %s cache | %.2f s | %s MiB literal data |\n' "$r_mode" "$t_rsync" "$(mib "$rsync_literal")"
printf '| ratio rsync / vmrepl (until applied) | %.1fx | |\n' "$(python3 -c "print($t_rsync / $(sec "$cycle_ms"))")"
printf '| vmrepl: initial replication, full random disk | %.2f s | %s MiB |\n' "$(sec "$full_ms")" "$(mib "$full_bytes")"
printf '| vmrepl: initial replication, sparse disk with 64 MiB allocated | %.2f s | %s MiB |\n' "$(sec "$sparse_ms")" "$(mib "$sparse_bytes")"
printf '| peak memory (VmHWM) of the primary / replica daemon | | %s / %s MiB |\n' "$(( $(hwm a) / 1024 ))" "$(( $(hwm b) / 1024 ))"
