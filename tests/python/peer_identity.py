"""Helpers run by tests/tests/access.rs to show that identity is the kernel's.

  peer_identity.py pass-fd SOCKET USER
      Forks; the child becomes USER, connects and shakes hands, then hands the connected
      socket to the parent (root) over SCM_RIGHTS. The parent asks for `create_key` on it
      and prints the reply kind: the daemon still sees USER, whatever process writes.
"""

import os
import pwd
import socket
import struct
import sys

import msgpack


def send(sock, req_id, request):
    body = msgpack.packb({"id": req_id, "request": request}, use_bin_type=True)
    sock.sendall(struct.pack(">I", len(body)) + body)


def recv(sock):
    def exact(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    (n,) = struct.unpack(">I", exact(4))
    return msgpack.unpackb(exact(n), raw=False)


def call(sock, req_id, request):
    send(sock, req_id, request)
    return recv(sock)["reply"]["result"]


def result_kind(result):
    return "ok" if "ok" in result else result["err"]["kind"]


def pass_fd(path, user):
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            pw = pwd.getpwnam(user)
            os.initgroups(user, pw.pw_gid)
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(path)
            call(conn, 1, {"hello": {"protocol": 1, "client": "child"}})
            socket.send_fds(child_end, [b"x"], [conn.fileno()])
            os._exit(0)
        finally:
            os._exit(1)
    child_end.close()
    _, fds, _, _ = socket.recv_fds(parent_end, 1, 1)
    if not fds:
        sys.exit("the child could not connect as " + user)
    os.waitpid(pid, 0)
    assert os.getuid() == 0, "the parent must be root for this test to mean anything"
    conn = socket.socket(fileno=fds[0])
    result = call(conn, 2, {"create_key": {"name": "stolen", "type": "aes256"}})
    print(result_kind(result))
    if "err" in result:
        print(result["err"]["message"])


if __name__ == "__main__":
    {"pass-fd": pass_fd}[sys.argv[1]](*sys.argv[2:])
