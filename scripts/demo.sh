#!/usr/bin/env bash
# The demo: two vmrepl hosts on loopback addresses of this machine, a small VM running the
# test guest (it writes numbered, checksummed blocks to two disks all the time), and the
# article's validation procedure as far as this release goes: enable replication, monitor it
# until it is replicating and healthy, then shut the VM down and show that the replica holds
# exactly what the primary holds. Everything is cleaned up at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
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

step "1. Two hosts: hosta.demo on $A_IP:$A_PORT (primary) and hostb.demo on $B_IP:$B_PORT (replica)"
echo "-- certificate authentication: each host trusts the other's built-in CA"
echo "-- on hostb: the replica server is enabled and authorizes hosta.demo (storage, trust group)"
two_hosts hosta.demo hostb.demo demo

step "2. The replica server settings on hostb"
b replication server show

step "3. On hosta: a generation 1 VM with two disks; the guest writes generation after generation"
a vm create demo-vm --generation 1 --memory 256 --disk 32M --disk 16M --nic none \
  --kernel "$G/vmlinuz" --initrd "$G/initrd.img" \
  --cmdline "console=ttyS0 quiet vmrepl.work=writeloop:vda+vdb:64:500"
a vm start demo-vm >/dev/null
until a vm console demo-vm | grep -q "VMREPL WROTE"; do sleep 0.5; done
a vm console demo-vm | grep "VMREPL WROTE" | tail -2

step "4. Enable replication of demo-vm to hostb (every 10 s, 2 recovery points)"
a replication enable demo-vm --replica-server "$B_IP:$B_PORT" --replica-name hostb.demo \
  --frequency 10 --recovery-points 2 --point-interval 20

step "5. Monitor replication until it is Replicating with Normal health"
a replication status demo-vm --watch --for 300 | tail -14

step "6. Let a few delta cycles run while the guest keeps writing"
start=$(a --json replication status demo-vm | python3 -c 'import json,sys;print(json.load(sys.stdin)["relationships"][0]["last_sequence"])')
while :; do
  cur=$(a --json replication status demo-vm | python3 -c 'import json,sys;print(json.load(sys.stdin)["relationships"][0]["last_sequence"])')
  [ "$cur" -ge $((start + 2)) ] && break
  sleep 1
done
a replication status demo-vm
echo "-- on the replica server:"
b replication status

step "7. Shut the VM down (the guest finishes its generation), let one more cycle carry the rest"
a vm shutdown demo-vm --timeout 120 >/dev/null
gen=$(a vm console demo-vm | tr -d '\r' | sed -n 's/^VMREPL STOPPED dev=vda gen=//p' | tail -1)
echo "the guest stopped at generation $gen"
off=$(a --json replication status demo-vm | python3 -c 'import json,sys;print(json.load(sys.stdin)["relationships"][0]["last_sequence"])')
while :; do
  cur=$(a --json replication status demo-vm | python3 -c 'import json,sys;print(json.load(sys.stdin)["relationships"][0]["last_sequence"])')
  [ "$cur" -gt "$off" ] && break
  sleep 1
done

step "8. The replica equals the primary, block for block"
uuid=$(a --json vm show demo-vm | python3 -c 'import json,sys;print(json.load(sys.stdin)["definition"]["uuid"])')
ok=0
for i in 0 1; do
  prim=$(a --json vm show demo-vm | python3 -c "import json,sys;print(json.load(sys.stdin)['definition']['disks'][$i]['path'])")
  repl="$W/b/replicas/$uuid/disks/disk$i/top.qcow2"
  qemu-img compare -U "$prim" "$repl" && echo "disk$i: primary and replica are identical"
  qemu-img convert -U -O raw "$repl" "$W/disk$i.raw"
  "$G/blockio" verify "$W/disk$i.raw" --blocks 64 --gen "$gen" && ok=$((ok + 1))
done

step "Summary"
a replication status demo-vm | sed -n '1,12p'
echo "replica verified on $ok of 2 disks at generation $gen"
echo "Failover and failback are the next milestone (see README, Status)."
[ "$ok" -eq 2 ]
