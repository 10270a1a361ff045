#!/usr/bin/env bash
# The demo: two vmrepl hosts on loopback addresses of this machine, a small VM running the
# test guest (at every boot it verifies every block it ever wrote, then writes numbered,
# checksummed generations to its two disks all the time), and the article's validation
# procedure: enable replication and monitor it until it is replicating and healthy; planned
# failover to the second host, where the guest verifies its data; reverse replication;
# failback to the first host, verified again. Everything is cleaned up at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
# The pinned Rust toolchain (rust-toolchain.toml) before any cargo command: scripts/toolchain.sh.
. scripts/toolchain.sh
./scripts/setup.sh
echo "== building vmrepl (release)"
cargo build --release --quiet -p vmrepl
B="$PWD/target/release/vmrepl"
G="${VMREPL_CACHE:-$PWD/.cache/guest}"
W=$(mktemp -d /tmp/vmrepl-demo.XXXXXX)
A_IP=127.0.0.21
B_IP=127.0.0.22
. scripts/two-hosts.sh
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
seq_of() { "$1" --json replication status demo-vm | json 'd["relationships"][0]["last_sequence"]'; }
# wait_seq HOST N: until HOST's relationship has acknowledged log N.
wait_seq() { until [ "$(seq_of "$1")" -ge "$2" ]; do sleep 0.5; done; }
# guest_check HOST: waits for the guest's boot-time check of both disks and shows it.
guest_check() {
  until [ "$("$1" vm console demo-vm | grep -c 'VMREPL VERIFY')" -ge 2 ]; do sleep 0.5; done
  "$1" vm console demo-vm | tr -d '\r' | grep 'VMREPL VERIFY'
}
# min_gen_ok HOST GEN: both disks' checks passed with no blank block and min_gen >= GEN.
min_gen_ok() {
  "$1" vm console demo-vm | tr -d '\r' | grep 'VMREPL VERIFY' | python3 -c '
import sys
want = int(sys.argv[1]); ok = 0
for line in sys.stdin:
    f = dict(w.split("=", 1) for w in line.split() if "=" in w)
    if f["result"] == "pass" and f["bad"] == "0" and f["zero"] == "0" and int(f["min_gen"]) >= want:
        ok += 1
sys.exit(0 if ok == 2 else 1)' "$2"
}
stopped_gen() { "$1" vm console demo-vm | tr -d '\r' | sed -n 's/^VMREPL STOPPED dev=vdb gen=//p' | tail -1; }

step "1. Two hosts: hosta.demo on $A_IP:$A_PORT (primary) and hostb.demo on $B_IP:$B_PORT (replica)"
echo "-- certificate authentication: each host trusts the other's built-in CA"
echo "-- on hostb: the replica server is enabled and authorizes hosta.demo (storage, trust group)"
echo "-- on hosta: the same for hostb.demo, so that replication can be reversed after a failover"
two_hosts hosta.demo hostb.demo demo
a replication server set --enable >/dev/null
a replication server authorize --primary hostb.demo --storage "$W/a/replicas" --trust-group demo >/dev/null

step "2. The replica server settings on hostb"
b replication server show

step "3. On hosta: a generation 1 VM with two disks; the guest checks its disks, then writes"
a vm create demo-vm --generation 1 --memory 256 --disk 32M --disk 16M --nic none \
  --kernel "$G/vmlinuz" --initrd "$G/initrd.img" \
  --cmdline "console=ttyS0 quiet vmrepl.work=check:vda:64,check:vdb:64,writeloop:vda+vdb:64:500"
a vm start demo-vm >/dev/null
until a vm console demo-vm | grep -q "VMREPL WROTE"; do sleep 0.5; done
a vm console demo-vm | grep "VMREPL WROTE" | tail -2

step "4. Enable replication of demo-vm to hostb (every 10 s, 2 recovery points, app-consistent hourly)"
a replication enable demo-vm --replica-server "$B_IP:$B_PORT" --replica-name hostb.demo \
  --frequency 10 --recovery-points 2 --point-interval 20 --app-consistent-hours 1

step "5. Monitor replication until it is Replicating with Normal health"
a replication status demo-vm --watch --for 300 | tail -14

step "6. Let a few delta cycles run while the guest keeps writing"
wait_seq a $(($(seq_of a) + 2))
echo "-- an app-consistent point now: the guest agent freezes the guest for the instant of the point"
a replication now demo-vm --app-consistent
a vm console demo-vm | grep -E "VMREPL (FROZEN|THAWED)" | tail -2
a replication status demo-vm
echo "-- on the replica server: the replica VM and its recovery points"
b replication status
b replication points demo-vm

step "7. Planned failover, on hosta: shut the VM down and prepare (the last changes go to hostb)"
a vm shutdown demo-vm --timeout 120 >/dev/null
gen_a=$(stopped_gen a)
echo "the guest stopped at generation $gen_a"
a failover prepare demo-vm
a vm list
echo "-- starting it again on hosta is refused now:"
a vm start demo-vm 2>&1 | sed 's/^/   /' || true

step "8. Planned failover, on hostb: fail over, reverse replication, start the VM"
b failover start demo-vm
b replication reverse demo-vm --frequency 10 --recovery-points 2 --point-interval 20
b vm start demo-vm >/dev/null
b vm list
echo "-- the guest on hostb checks every block it wrote on hosta:"
guest_check b
min_gen_ok b "$gen_a" && fo_ok=1 || fo_ok=0
wait_seq b $(($(seq_of b) + 2))
echo "-- hostb now replicates to hosta, sending only what changed since the failover:"
b replication status demo-vm
rev_bytes=$(b --json replication status demo-vm | json 'd["relationships"][0]["stats"]["total_bytes"]')

step "9. Failback: the same planned failover from hostb back to hosta"
b vm shutdown demo-vm --timeout 120 >/dev/null
gen_b=$(stopped_gen b)
echo "the guest stopped at generation $gen_b on hostb"
b failover prepare demo-vm
a failover start demo-vm --start
a replication reverse demo-vm --frequency 10 --recovery-points 2 --point-interval 20
echo "-- the guest, back on hosta, checks every block again:"
guest_check a
min_gen_ok a "$gen_b" && fb_ok=1 || fb_ok=0
wait_seq a $(($(seq_of a) + 1))

step "Summary"
a vm list
a replication status demo-vm | sed -n '1,14p'
echo "planned failover to hostb: data verified by the guest up to generation $gen_a: $([ $fo_ok = 1 ] && echo yes || echo NO)"
echo "failback to hosta:         data verified by the guest up to generation $gen_b: $([ $fb_ok = 1 ] && echo yes || echo NO)"
echo "reverse replication hostb -> hosta sent $rev_bytes bytes in its first cycles: changes only, no full copy"
[ $fo_ok = 1 ] && [ $fb_ok = 1 ]
