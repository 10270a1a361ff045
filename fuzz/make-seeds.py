#!/usr/bin/env python3
"""Writes the seed corpora of the peer_frame, qmp_reply and nbd_reply fuzz targets: small,
valid inputs as the real peers send them. (The log_reader seeds come from
`cargo run -p vmrepl-log --example fuzz_seeds -- fuzz/corpus/log_reader`.)"""

import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def save(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- peer_frame: preamble, then frames (kind u8, length u32 BE, payload) -------------------
PREAMBLE = b"VMREPL\0" + struct.pack(">II", 1, 1)


def frame(kind, payload):
    return struct.pack(">BI", kind, len(payload)) + payload


def control(obj):
    return frame(1, json.dumps(obj, separators=(",", ":")).encode())


HOST_INFO = {
    "host_name": "hv2.example.org",
    "release": "0.1.0",
    "protocol_versions": [1, 1],
    "qemu_version": "7.2.0",
    "machine_types": ["pc-i440fx-7.2", "pc-q35-7.2"],
    "firmware": [],
    "kvm_usable": True,
    "kvm_reason": None,
    "config_versions": [{"major": 1, "minor": 0}, {"major": 1, "minor": 0}],
    "storage": [],
}
VM = "5b0e7c1e-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
REL = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
VM_DEF = {
    "name": "web01", "uuid": VM, "generation": 2, "firmware": "ovmf-4m",
    "machine_type": "pc-q35-7.2", "config_version": {"major": 1, "minor": 0},
    "vcpus": 2, "memory_mib": 2048,
    "disks": [{"id": "disk0", "path": "/var/lib/vmrepl/web01/disk0.qcow2",
               "size_bytes": 10737418240}],
    "nics": [{"mac": "52:54:00:12:34:56", "mode": "bridge", "bridge": "br0"},
             {"mac": "52:54:00:12:34:57", "mode": "user"}],
    "kernel": None, "nvram": "/var/lib/vmrepl/web01/nvram.fd",
}
POLICY = {"keep": 4, "interval_secs": 3600}
requests = [
    {"type": "hello", "host_info": HOST_INFO},
    {"type": "check-replica", "vm": VM_DEF},
    {"type": "create-replica", "vm": VM_DEF, "relationship": REL, "policy": POLICY,
     "primary_server": "hv1.example.org:7440", "existing_copy": False},
    {"type": "reverse-replica", "vm": VM_DEF, "relationship": REL, "policy": POLICY,
     "base_sequence": 9, "primary_server": None},
    {"type": "replica-state", "vm_uuid": VM},
    {"type": "send-log", "vm_uuid": VM, "sequence": 8, "base_sequence": 7,
     "resume": {"records": 3, "bytes": 4242}},
    {"type": "set-policy", "vm_uuid": VM, "policy": POLICY},
    {"type": "remove-replica", "vm_uuid": VM, "delete": False},
    {"type": "block-digests", "vm_uuid": VM},
    {"type": "primary-state", "vm_uuid": VM},
]
responses = [
    {"type": "hello", "host_info": HOST_INFO},
    {"type": "ok"},
    {"type": "replica-state", "last_applied": 7, "partial": [8, {"records": 3, "bytes": 4242}],
     "points": [[5, 1700000000000], [6, 1700000300000]], "failed_over": False},
    {"type": "log-ack", "sequence": 8, "bytes": 1048576},
    {"type": "primary-state", "running": False, "prepared_seq": 9},
    {"type": "block-digests", "disks": [{"id": "disk0", "block_size": 1048576,
                                          "digests": "ab" * 32 + "CD" * 32}]},
    {"type": "reversed", "delta": True, "resync": False, "full_copy_reason": None},
    {"type": "refused", "code": "out-of-order", "message": "resynchronization required"},
]
for i, r in enumerate(requests):
    save("peer_frame", f"request-{r['type']}", PREAMBLE + control(r))
for r in responses:
    save("peer_frame", f"response-{r['type']}", PREAMBLE + control(r))
save("peer_frame", "send-log-with-data",
     PREAMBLE + control(requests[5]) + frame(2, bytes(range(256)) * 4) + frame(2, b""))

# --- qmp_reply: what QEMU 7.2's monitor and the guest agent send ----------------------------
GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                "package": "Debian 1:7.2+dfsg-7+deb12u6"},
                    "capabilities": ["oob"]}}


def lines(*objs):
    return b"".join(json.dumps(o).encode() + b"\r\n" for o in objs)


def ts(s, us):
    return {"seconds": s, "microseconds": us}


save("qmp_reply", "greeting-and-capabilities", lines(GREETING, {"return": {}, "id": 1}))
save("qmp_reply", "block-job-events", lines(
    GREETING, {"return": {}, "id": 1}, {"return": {}, "id": 2},
    {"timestamp": ts(1700000000, 10), "event": "JOB_STATUS_CHANGE",
     "data": {"status": "created", "id": "backup-disk0"}},
    {"timestamp": ts(1700000001, 20), "event": "BLOCK_JOB_COMPLETED",
     "data": {"device": "backup-disk0", "len": 1073741824, "offset": 1073741824,
              "speed": 0, "type": "backup"}}))
save("qmp_reply", "errors-and-queries", lines(
    GREETING,
    {"id": 3, "error": {"class": "GenericError", "desc": "Dirty bitmap 'vmrepl-1' not found"}},
    {"id": 4, "error": {"class": "DeviceNotFound", "desc": "Device 'disk9' not found"}},
    {"return": {"status": "running", "singlestep": False, "running": True}, "id": 5},
    {"return": [{"device": "drive-disk0", "dirty-bitmaps": [
        {"name": "vmrepl-1", "recording": True, "persistent": True, "busy": False,
         "granularity": 65536, "count": 131072}]}], "id": 6}))
save("qmp_reply", "shutdown", lines(
    GREETING, {"timestamp": ts(1700000100, 5), "event": "STOP"},
    {"timestamp": ts(1700000100, 9), "event": "SHUTDOWN",
     "data": {"guest": True, "reason": "guest-shutdown"}}))
save("qmp_reply", "guest-agent-sync-and-freeze",
     b'{"return": 42}\n\xff' + lines({"return": 4242}, {"return": {}}, {"return": 2},
                                     {"error": {"class": "GenericError",
                                                "desc": "Command guest-fsfreeze-thaw has been disabled"}}))
save("qmp_reply", "guest-agent-status", b"\xff" + lines({"return": 1001}, {"return": "frozen"}))

# --- nbd_reply: first byte = mode, then the server's bytes ---------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY = 0x0003E889045565A9
STRUCTURED = 0x668E33EF
SIMPLE = 0x67446698


def optrep(opt, kind, data=b""):
    return struct.pack(">QIII", OPT_REPLY, opt, kind, len(data)) + data


def chunk(cookie, done, kind, data):
    return struct.pack(">IHHQI", STRUCTURED, 1 if done else 0, kind, cookie, len(data)) + data


def status(cookie, ctx, descs, done=True):
    return chunk(cookie, done, 5, struct.pack(">I", ctx) +
                 b"".join(struct.pack(">II", n, f) for n, f in descs))


SIZE = 1 << 20
handshake = (struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
             + optrep(8, 1)
             + optrep(10, 4, struct.pack(">I", 7) + b"qemu:dirty-bitmap:b")
             + optrep(10, 1)
             + optrep(7, 3, struct.pack(">HQH", 0, SIZE, 1))
             + optrep(7, 1))
save("nbd_reply", "handshake-and-dirty-ranges",
     b"\x00" + handshake + status(1, 7, [(65536, 1), (SIZE - 65536, 0)]))
save("nbd_reply", "dirty-ranges-then-done", b"\x01" + struct.pack(">H", SIZE // 512)
     + status(1, 7, [(4096, 0), (8192, 1), (SIZE - 12288, 0)], done=False)
     + chunk(1, True, 0, b""))
save("nbd_reply", "data-ranges", b"\x02" + struct.pack(">H", SIZE // 512)
     + status(1, 7, [(65536, 0), (65536, 2), (SIZE - 131072, 0)]))
# Reads: window 2, 4 KiB chunks, ranges 0+4096 and 8192+4096.
shape = bytes([1, 0, 0, 8, 8, 8, 0, 0])
save("nbd_reply", "reads-out-of-order-with-a-hole", b"\x03" + shape
     + chunk(2, True, 1, struct.pack(">Q", 8192) + b"\x02" * 4096)
     + chunk(1, False, 2, struct.pack(">QI", 2048, 2048))
     + chunk(1, True, 1, struct.pack(">Q", 0) + b"\x01" * 2048))
save("nbd_reply", "read-error-chunk", b"\x03" + shape
     + chunk(1, True, 0x8001, struct.pack(">IH", 5, 3) + b"EIO"))
save("nbd_reply", "read-simple-reply", b"\x03" + shape + struct.pack(">IIQ", SIMPLE, 0, 1))
save("nbd_reply", "read-done-with-none", b"\x03" + bytes([0, 0, 0, 8, 0, 0, 0, 0])
     + chunk(1, False, 1, struct.pack(">Q", 0) + b"\x07" * 4096) + chunk(1, True, 0, b""))
