# Sourced by demo.sh and bench.sh: two vmrepl hosts, `a` and `b`, on loopback addresses of
# this machine, each with its own data folder under $W and a port the OS hands out.
# Expects: B (the vmrepl binary), W (a work folder), A_IP and B_IP. Defines a(), b(),
# json() and a clean-up trap that stops VMs, storage daemons and both daemons.

port() { python3 -c "import socket;s=socket.socket();s.bind(('$1',0));print(s.getsockname()[1])"; }
A_PORT=$(port "$A_IP")
B_PORT=$(port "$B_IP")
a() { "$B" --data "$W/a" "$@"; }
b() { "$B" --data "$W/b" "$@"; }
# json EXPR: evaluates EXPR on the JSON document on stdin, bound to d.
json() { python3 -c "import json,sys;d=json.load(sys.stdin);print(eval(sys.argv[1]))" "$1"; }

cleanup() {
  for h in a b; do
    for p in "$W"/$h/run/*/qemu.pid; do [ -f "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null || true; done
    "$B" --data "$W/$h" stop >/dev/null 2>&1 || true
  done
  pkill -f "qemu-storage-daemon.*$W" 2>/dev/null || true
  if [ -n "${VMREPL_KEEP:-}" ]; then echo "kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT

# two_hosts NAME_A NAME_B TRUST_GROUP: creates both hosts, lets each trust the other's
# built-in CA, starts both daemons, and makes b a replica server authorizing a.
two_hosts() {
  a host init --name "$1" --listen "$A_IP:$A_PORT" --accel tcg --metrics "$A_IP:0" --dashboard "$A_IP:0"
  b host init --name "$2" --listen "$B_IP:$B_PORT" --accel tcg --metrics "$B_IP:0" --dashboard "$B_IP:0"
  a host trust "$W/b/tls/ca.pem"
  b host trust "$W/a/tls/ca.pem"
  local h out
  for h in a b; do
    out=$("$B" --data "$W/$h" daemon --background)
    echo "$h: $out"
    echo "$out" | sed -n 's/.*(pid \([0-9]*\)).*/\1/p' >"$W/$h.daemon.pid"
  done
  b replication server set --enable >/dev/null
  b replication server authorize --primary "$1" --storage "$W/b/replicas" --trust-group "$3" >/dev/null
}
