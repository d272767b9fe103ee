"""Helpers for the pwserver tests: source files and raw protocol packets
(msgpack + PyNaCl, written from docs/protocol.md independently of the C
code). The pwserver process itself is pwtest.PwServer."""

from __future__ import annotations

import pathlib
import secrets
import socket
import struct

import msgpack
from nacl import bindings as sodium

from tests.support.pwtest import PwServer

OP = {
    "passwd": 1,
    "uid": 2,
    "group": 3,
    "gid": 4,
    "initgroups": 5,
    "shadow": 6,
    "mailhost": 7,
    "stats": 8,
    "ping": 9,
    "passwd_enum": 10,
    "group_enum": 11,
    "shadow_enum": 12,
}
OK, NOTFOUND, TRUNCATED, DENIED, BADREQUEST, BADVERSION, UNAVAILABLE = range(7)
KEY_NETWORK, KEY_SHADOW = 1, 2


def passwd_line(name: str, uid: int, gid: int = 100, gecos: str = "") -> str:
    return f"{name}:x:{uid}:{gid}:{gecos}:/home/{name}:/bin/sh\n"


def write_sources(
    d: pathlib.Path,
    users: list[tuple[str, int]],
    groups: list[tuple[str, int, list[str]]] = (),
    mailhosts: dict[str, str] | None = None,
    shadow: bool = True,
) -> dict[str, pathlib.Path]:
    """Writes passwd (and shadow, group, mailhosts) into d; returns paths."""
    paths = {"passwd": d / "passwd"}
    paths["passwd"].write_text("".join(passwd_line(n, u) for n, u in users))
    if shadow:
        paths["shadow"] = d / "shadow"
        paths["shadow"].write_text("".join(f"{n}:$6$salt${n}hash:19000:0:99999:7:::\n" for n, _ in users))
    paths["group"] = d / "group"
    paths["group"].write_text("".join(f"{g}:x:{gid}:{','.join(m)}\n" for g, gid, m in groups))
    if mailhosts is not None:
        paths["mailhosts"] = d / "mailhosts"
        paths["mailhosts"].write_text("".join(f"{n} {h}\n" for n, h in mailhosts.items()))
    return paths


def request(op: int | str, arg=None, *, rid: int | None = None, pad: int = 256, version: int = 1) -> bytes:
    op = OP.get(op, op)
    rid = secrets.randbits(64) if rid is None else rid
    msg = msgpack.packb([version, rid, op, arg])
    if pad and len(msg) + 3 < pad:
        msg = msgpack.packb([version, rid, op, arg, bytes(pad - len(msg) - 3)])
    return msg


def seal(key: bytes, key_id: int, plain: bytes) -> bytes:
    head = bytes([0xC1, key_id])
    nonce = secrets.token_bytes(24)
    return head + nonce + sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plain, head, nonce, key)


def unseal(key: bytes, packet: bytes) -> bytes:
    assert packet[0] == 0xC1
    return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(packet[26:], packet[:2], packet[2:26], key)


def udp_exchange(addr, packet: bytes, timeout: float = 2.0, source: str = "127.0.0.1") -> bytes | None:
    """Sends one datagram; the answer, or None after `timeout`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(timeout)
        s.sendto(packet, addr)
        try:
            return s.recv(65536)
        except TimeoutError:
            return None


def udp_query(addr, op, arg=None, **kw) -> list:
    rid = secrets.randbits(64)
    raw = udp_exchange(addr, request(op, arg, rid=rid, **kw))
    assert raw is not None, "no answer"
    answer = msgpack.unpackb(raw)
    assert answer[:2] == [1, rid]
    return answer


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """n bytes from a stream socket; None if the peer closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class TcpConn:
    def __init__(self, addr, timeout: float = 10.0, source: str | None = None):
        self.s = socket.create_connection(addr, timeout=timeout, source_address=(source, 0) if source else None)

    def exchange(self, packet: bytes) -> bytes | None:
        self.s.sendall(struct.pack(">I", len(packet)) + packet)
        head = self.recv_exact(4)
        if head is None:
            return None
        return self.recv_exact(struct.unpack(">I", head)[0])

    def query(self, op, arg=None) -> list:
        rid = secrets.randbits(64)
        answer = msgpack.unpackb(self.exchange(request(op, arg, rid=rid, pad=0)))
        assert answer[:2] == [1, rid]
        return answer

    def recv_exact(self, n: int) -> bytes | None:
        return recv_exact(self.s, n)

    def close(self) -> None:
        self.s.close()

    def __enter__(self) -> TcpConn:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stats(addr) -> dict[str, int]:
    """STATS over TCP (the map is bigger than a padded UDP request may get)."""
    with TcpConn(addr) as c:
        status, payload = c.query("stats")[2:]
    assert status == OK
    return payload


def write_many_users(d: pathlib.Path, n: int, tag: str = "a", groups: int = 300) -> dict[str, pathlib.Path]:
    """n realistic users (names 8-12 bytes, sha512-crypt-sized hashes, a
    mailhost each, a few hundred groups of ~1.5 memberships per user), fast.
    Files are written beside and renamed into place (atomic for a reload).
    `tag` goes into every gecos so two generations tell apart."""
    hashes = "$6$rounds=5000$abcdefghijklmnop$" + "x" * 86
    names = [f"{chr(97 + i % 26)}user{i:07d}" for i in range(n)]
    files = {
        "passwd": "".join(
            [f"{nm}:x:{10000 + i}:100:User {i} {tag}:/home/{nm}:/bin/bash\n" for i, nm in enumerate(names)]
        ),
        "shadow": "".join([f"{nm}:{hashes}:19700:0:99999:7:::\n" for nm in names]),
        "mailhosts": "".join([f"{nm} store{i % 8}\n" for i, nm in enumerate(names)]),
        "group": "".join(
            [f"grp{g}:x:{1000 + g}:{','.join(names[g::groups][: (n * 3 // 2) // groups])}\n" for g in range(groups)]
        ),
    }
    paths = {}
    for name, text in files.items():
        tmp = d / f".{name}.tmp"
        tmp.write_text(text)
        tmp.rename(d / name)
        paths[name] = d / name
    return paths


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Server(PwServer):
    """Only for benchmarks/bench_pwserver.py (being edited elsewhere) until
    it uses pwtest.PwServer, whose output() is this log()."""

    def log(self) -> str:
        return self.output()
