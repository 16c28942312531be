#!/usr/bin/env python3
"""Writes the small committed seed corpus of each fuzz target (fuzz/corpus/<target>/).

Run from fuzz/: python3 make_seeds.py. The bodies follow shared/PROTOCOL.md: MessagePack,
structs as maps with field names, enums externally tagged, byte strings as bin.
"""
import base64
import os
import struct

import msgpack


def pack(v):
    return msgpack.packb(v, use_bin_type=True)


def frame(body):
    return struct.pack(">I", len(body)) + body


requests = {
    "hello": {"id": 1, "request": {"hello": {"protocol": 1, "client": "seed"}}},
    "status": {"id": 2, "request": "status"},
    "encrypt": {"id": 3, "request": {"encrypt": {"key": "app-aes", "plaintext": b"hi", "context": b"ctx"}}},
    "decrypt": {"id": 4, "request": {"decrypt": {"key": "app-aes", "ciphertext": "ncpkms:v1:aGk=", "context": None}}},
    "create": {"id": 5, "request": {"create_key": {"name": "app-aes", "type": "aes256", "protection": "basic",
                                                     "convergent": False, "auto_rotation": True, "rotation_days": 30,
                                                     "memo": "m"}}},
    "history": {"id": 6, "request": {"history": {"key": "app-aes", "limit": 10, "action": "encrypt", "result": "ok"}}},
    "batch": {"id": 7, "request": {"encrypt_batch": {"key": "k", "items": [{"plaintext": b"a"}, {"plaintext": b"b", "context": b"c"}]}}},
    "grant": {"id": 8, "request": {"grant": {"role": "key-reviewer", "user": "nobody", "key": "app-aes"}}},
}
server = {
    "reply_ok": {"reply": {"id": 3, "result": {"ok": {"ciphertext": {"ciphertext": "ncpkms:v1:aGk="}}}}},
    "reply_err": {"reply": {"id": 4, "result": {"err": {"kind": "decrypt-failed", "message": "no"}}}},
    "event": {"event": {"seq": 1, "time": 1700000000000, "kind": "rotated", "key_tag": "00" * 16,
                        "key_name": "k", "version": 2, "state": "enabled", "account": "root", "message": "m"}},
    "lagged": {"lagged": {"missed": 3}},
}


def write(target, name, data):
    with open(os.path.join("corpus", target, name), "wb") as f:
        f.write(data)


for name, msg in requests.items():
    write("frame_decoder", name, frame(pack(msg)))
    write("request_decoder", name, pack(msg))
write("frame_decoder", "pipelined", b"".join(frame(pack(m)) for m in requests.values()))
write("frame_decoder", "length_4gib", b"\xff\xff\xff\xff")
write("frame_decoder", "truncated", frame(pack(requests["encrypt"]))[:9])
for name, msg in server.items():
    write("request_decoder", name, pack(msg))

body = bytes(range(12 + 16 + 14))
for name, s in {
    "short": "ncpkms:v3:aGk=",
    "newline": "ncpkms:v12:aGk=\n",
    "max_version": "ncpkms:v4294967295:",
    "aes_shape": "ncpkms:v1:" + base64.b64encode(body).decode(),
    "bad_version": "ncpkms:v01:aGk=",
}.items():
    write("ciphertext_parse", name, s.encode())

# engine_decrypt: a selector byte (0-2 decrypt aes/convergent/rsa, 3-5 verify ec/pss/pkcs1,
# 6-7 tamper with a real ciphertext) and then the string or the edits.
aes_like = "ncpkms:v2:" + base64.b64encode(body).decode()
rsa_like = "ncpkms:v1:" + base64.b64encode(bytes(256)).decode()
der_sig = "ncpkms:v1:" + base64.b64encode(bytes([0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01])).decode()
for name, data in {
    "aes": b"\x00" + aes_like.encode(),
    "convergent": b"\x01" + aes_like.replace("v2", "v1").encode(),
    "rsa": b"\x02" + rsa_like.encode(),
    "ecdsa_sig": b"\x03" + der_sig.encode(),
    "rsa_sig": b"\x04" + rsa_like.encode(),
    "tamper_none": b"\x06",
    "tamper_one": b"\x07\x05\x00\x01",
}.items():
    write("engine_decrypt", name, data)
