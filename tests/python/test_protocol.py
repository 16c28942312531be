"""A kms client written from shared/PROTOCOL.md alone: no Rust code involved.

Starts the real kmsd binary on a temporary socket and data directory, then speaks the
wire protocol with the `msgpack` package: handshake, create a key, encrypt, decrypt,
a typed error, pipelining, and a malformed frame.
"""

import os
import socket
import struct
import subprocess
import tempfile
import time
import unittest

import msgpack

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KMSD = os.environ.get("KMSD_BIN", os.path.join(ROOT, "target", "debug", "kmsd"))


class Conn:
    """One connection: frames are a u32 big-endian length and a MessagePack map."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.next_id = 1

    def send(self, request, req_id=None):
        if req_id is None:
            req_id = self.next_id
            self.next_id += 1
        body = msgpack.packb({"id": req_id, "request": request}, use_bin_type=True)
        self.sock.sendall(struct.pack(">I", len(body)) + body)
        return req_id

    def send_raw(self, data):
        self.sock.sendall(data)

    def recv_exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("connection closed")
            buf += chunk
        return buf

    def recv(self):
        (length,) = struct.unpack(">I", self.recv_exact(4))
        return msgpack.unpackb(self.recv_exact(length), raw=False)

    def call(self, request):
        req_id = self.send(request)
        frame = self.recv()
        reply = frame["reply"]
        assert reply["id"] == req_id, frame
        return reply["result"]


class ProtocolTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.sock_path = os.path.join(cls.tmp.name, "run", "kmsd.sock")
        cls.daemon = subprocess.Popen(
            [KMSD, "--socket", cls.sock_path, "--data-dir", os.path.join(cls.tmp.name, "data")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 20
        while not os.path.exists(cls.sock_path):
            if time.time() > deadline or cls.daemon.poll() is not None:
                raise RuntimeError("kmsd did not start")
            time.sleep(0.05)

    @classmethod
    def tearDownClass(cls):
        cls.daemon.terminate()
        cls.daemon.wait(timeout=20)
        cls.tmp.cleanup()

    def connect(self):
        c = Conn(self.sock_path)
        hello = c.call({"hello": {"protocol": 1, "client": "python-test"}})
        self.assertEqual(hello["ok"]["hello"]["protocol"], 1)
        return c

    def test_handshake_version_mismatch(self):
        """A different protocol version is refused with unsupported-version."""
        c = Conn(self.sock_path)
        result = c.call({"hello": {"protocol": 999, "client": "py"}})
        self.assertEqual(result["err"]["kind"], "unsupported-version")

    def test_create_encrypt_decrypt(self):
        """Create an AES key, encrypt binary data, decrypt it back."""
        c = self.connect()
        created = c.call({"create_key": {"name": "pykey", "type": "aes256"}})["ok"]["key"]
        self.assertEqual(created["state"], "enabled")
        self.assertEqual(len(created["tag"]), 32)
        plaintext = bytes(range(256))
        ct = c.call({"encrypt": {"key": "pykey", "plaintext": plaintext}})["ok"]["ciphertext"]["ciphertext"]
        self.assertTrue(ct.startswith("ncpkms:v1:"))
        pt = c.call({"decrypt": {"key": created["tag"], "ciphertext": ct}})["ok"]["plaintext"]["plaintext"]
        self.assertEqual(pt, plaintext)
        self.assertIsInstance(pt, bytes)

    def test_typed_error(self):
        """An unknown key gives the not-found kind and a message."""
        c = self.connect()
        err = c.call({"encrypt": {"key": "nosuchkey", "plaintext": b"x"}})["err"]
        self.assertEqual(err["kind"], "not-found")
        self.assertIn("nosuchkey", err["message"])

    def test_pipelining(self):
        """Many requests written before any reply is read are all answered, by id."""
        c = self.connect()
        c.call({"create_key": {"name": "pipekey", "type": "aes256"}})
        ids = {c.send({"encrypt": {"key": "pipekey", "plaintext": b"m%d" % i}}): i for i in range(50)}
        seen = set()
        for _ in ids:
            reply = c.recv()["reply"]
            self.assertIn("ok", reply["result"])
            seen.add(reply["id"])
        self.assertEqual(seen, set(ids))

    def test_malformed_frame(self):
        """Garbage inside a well-framed body is answered malformed-frame; the connection lives."""
        c = self.connect()
        c.send_raw(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
        err = c.recv()["reply"]["result"]["err"]
        self.assertEqual(err["kind"], "malformed-frame")
        status = c.call("status")
        self.assertIn("status", status["ok"])


if __name__ == "__main__":
    unittest.main()
