#!/usr/bin/env python3
"""What one account's connections that never read can make kmsd hold (docs/RELIABILITY.md
item 53): N connections of this account each pipeline ~1 MiB encryption batches (30
items of 32 KiB) until their writes block for 5 s, then kmsd's resident and peak memory
is printed. Run it against a kmsd with the default budget and one started with
`--config` holding `max_buffered_bytes_per_account = 17179869184` (no budget, as before
session 31), each on a data directory of its own:

    tests/bench/account_budget.py SOCKET KMSD_PID [N=250]

Raise the open-files limit first (`ulimit -n 4096`) for N in the hundreds. Needs the
Python msgpack module (.ci/install-deps installs it).
"""
import os
import socket
import struct
import sys
import threading
import time

import msgpack

path, pid = sys.argv[1], int(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 250


def frame(i, request):
    body = msgpack.packb({"id": i, "request": request}, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def recv_exact(s, size):
    got = b""
    while len(got) < size:
        chunk = s.recv(size - len(got))
        if not chunk:
            raise EOFError("kmsd closed the connection")
        got += chunk
    return got


def call(s, i, request):
    s.sendall(frame(i, request))
    (length,) = struct.unpack(">I", recv_exact(s, 4))
    return msgpack.unpackb(recv_exact(s, length), raw=False)


def memory_mib():
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            parts = line.split()
            if len(parts) > 1:
                fields[parts[0].rstrip(":")] = int(parts[1]) if parts[1].isdigit() else parts[1]
    return fields["VmRSS"] // 1024, fields["VmHWM"] // 1024


def hello(s):
    call(s, 0, {"hello": {"protocol": 1, "client": "account-budget"}})


first = socket.socket(socket.AF_UNIX)
first.connect(path)
hello(first)
call(first, 1, {"create_key": {"name": "hoard", "type": "aes256"}})
batch = frame(2, {"encrypt_batch": {"key": "hoard",
                                    "items": [{"plaintext": os.urandom(32 * 1024)} for _ in range(30)]}})
print(f"batch frame {len(batch)} bytes; kmsd before: RSS, peak {memory_mib()} MiB", flush=True)
sent = [0] * n
held = []


def hoard(k):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    # A new connection's hello is a small call: answered even while the budget is full.
    s.settimeout(30)
    try:
        hello(s)
    except (socket.timeout, OSError, EOFError):
        return
    held.append(s)
    s.settimeout(5)
    try:
        while True:
            s.sendall(batch)
            sent[k] += 1
    except (socket.timeout, OSError):
        pass


threads = [threading.Thread(target=hoard, args=(k,)) for k in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
time.sleep(2)
print(f"{n} connections sent {sum(sent)} batches that kmsd took or the kernel holds; "
      f"kmsd RSS, peak {memory_mib()} MiB", flush=True)
