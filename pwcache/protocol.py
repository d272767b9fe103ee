"""The pwserver wire format in Python (docs/protocol.md), sans-I/O.

The C twin is pwcache/_csrc/pw_wire.c; both are checked against
tests/vectors/wire.json. Packets in, values out; no sockets here.
"""

from __future__ import annotations

import enum
import os
import struct
from typing import Any, NamedTuple

import msgpack

VERSION = 1
DEFAULT_PORT = 7773

# Limits (docs/protocol.md, "Limits")
MAX_REQUEST = 1024
MAX_NAME = 255
MAX_UDP_ANSWER = 8192
AMPLIFICATION = 3
MAX_TCP_ANSWER = 16 * 1024 * 1024
ENUM_PAGE = 1000
REQUEST_PAD = 256
MAX_ID = 2**32 - 2

SEAL_MARK = 0xC1
KEY_NETWORK = 1
KEY_SHADOW = 2
SEAL_NONCE = 24
SEAL_TAG = 16
KEY_BYTES = 32


class Op(enum.IntEnum):
    PASSWD_BY_NAME = 1
    PASSWD_BY_UID = 2
    GROUP_BY_NAME = 3
    GROUP_BY_GID = 4
    INITGROUPS = 5
    SHADOW_BY_NAME = 6
    MAILHOST = 7
    STATS = 8
    PING = 9
    PASSWD_ENUM = 10
    GROUP_ENUM = 11
    SHADOW_ENUM = 12


class Status(enum.IntEnum):
    OK = 0
    NOTFOUND = 1
    TRUNCATED = 2
    DENIED = 3
    BADREQUEST = 4
    BADVERSION = 5
    UNAVAILABLE = 6


NAME_OPS = {Op.PASSWD_BY_NAME, Op.GROUP_BY_NAME, Op.INITGROUPS, Op.SHADOW_BY_NAME, Op.MAILHOST}
INT_OPS = {Op.PASSWD_BY_UID, Op.GROUP_BY_GID, Op.PASSWD_ENUM, Op.GROUP_ENUM, Op.SHADOW_ENUM}
SHADOW_OPS = {Op.SHADOW_BY_NAME, Op.SHADOW_ENUM}


class ProtocolError(ValueError):
    """A packet that does not follow the spec (the peer's fault)."""


class PasswdEntry(NamedTuple):
    name: str
    passwd: str
    uid: int
    gid: int
    gecos: str
    dir: str
    shell: str
    mailhost: str

    def getent_line(self) -> str:
        return ":".join([self.name, self.passwd, str(self.uid), str(self.gid), self.gecos, self.dir, self.shell])


class GroupEntry(NamedTuple):
    name: str
    passwd: str
    gid: int
    members: tuple[str, ...]

    def getent_line(self) -> str:
        return f"{self.name}:{self.passwd}:{self.gid}:{','.join(self.members)}"


class ShadowEntry(NamedTuple):
    name: str
    hash: str
    lastchg: int
    min: int
    max: int
    warn: int
    inact: int
    expire: int
    flag: int

    def getent_line(self) -> str:
        nums = [self.lastchg, self.min, self.max, self.warn, self.inact, self.expire, self.flag]
        return ":".join([self.name, self.hash] + ["" if n < 0 else str(n) for n in nums])


class MailhostEntry(NamedTuple):
    host: str
    frozen: bool


class Answer(NamedTuple):
    request_id: int
    status: Status
    payload: Any


def valid_name(name: str) -> bool:
    """Names a peer may ask for: 1..255 UTF-8 bytes, no NUL, ':' or newline."""
    if not isinstance(name, str):
        return False
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return 0 < len(raw) <= MAX_NAME and not any(c in name for c in "\0:\n")


def new_request_id() -> int:
    return int.from_bytes(os.urandom(8), "little")


def encode_request(op: Op, arg: str | int | None, request_id: int, pad_to: int = REQUEST_PAD) -> bytes:
    """A plain request, padded with a bin so it is at least pad_to bytes."""
    op = Op(op)
    if op in NAME_OPS:
        if not valid_name(arg):  # type: ignore[arg-type]
            raise ValueError(f"invalid name for {op.name}: {arg!r}")
    elif op in INT_OPS:
        if not isinstance(arg, int) or isinstance(arg, bool) or not 0 <= arg <= MAX_ID:
            raise ValueError(f"invalid id for {op.name}: {arg!r}")
    elif arg is not None:
        raise ValueError(f"{op.name} takes no argument")
    body = [VERSION, request_id, int(op), arg]
    packed = msgpack.packb(body, use_bin_type=True)
    if pad_to and len(packed) + 2 < pad_to:
        # the array grows from 4 to 5 elements (same 1-byte header); a bin8
        # header is 2 bytes, a bin16 header 3 (the C encoder does the same)
        pad = pad_to - len(packed) - 2
        if pad > 0xFF:
            pad -= 1
        packed = msgpack.packb(body + [bytes(pad)], use_bin_type=True)
    elif pad_to:
        packed = msgpack.packb(body + [b""], use_bin_type=True)
    return packed


def _check_str(v: Any) -> str:
    if not isinstance(v, str):
        raise ProtocolError(f"expected a string, got {type(v).__name__}")
    return v


def _check_int(v: Any, lo: int = 0, hi: int = MAX_ID) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"expected an int in [{lo}, {hi}], got {v!r}")
    return v


def parse_passwd(v: Any) -> PasswdEntry:
    if not isinstance(v, list) or len(v) != 8:
        raise ProtocolError("passwd record is not an array of 8")
    name, pw, uid, gid, gecos, home, shell, host = v
    return PasswdEntry(
        _check_str(name),
        _check_str(pw),
        _check_int(uid),
        _check_int(gid),
        _check_str(gecos),
        _check_str(home),
        _check_str(shell),
        _check_str(host),
    )


def parse_group(v: Any) -> GroupEntry:
    if not isinstance(v, list) or len(v) != 4 or not isinstance(v[3], list):
        raise ProtocolError("group record is not an array of 4")
    return GroupEntry(_check_str(v[0]), _check_str(v[1]), _check_int(v[2]), tuple(_check_str(m) for m in v[3]))


def parse_shadow(v: Any) -> ShadowEntry:
    if not isinstance(v, list) or len(v) != 9:
        raise ProtocolError("shadow record is not an array of 9")
    nums = [_check_int(n, -(2**63), 2**63 - 1) for n in v[2:]]
    return ShadowEntry(_check_str(v[0]), _check_str(v[1]), *nums)


def parse_mailhost(v: Any) -> MailhostEntry:
    if not isinstance(v, list) or len(v) != 2 or not isinstance(v[1], bool):
        raise ProtocolError("mailhost record is not [host, frozen]")
    return MailhostEntry(_check_str(v[0]), v[1])


def parse_gids(v: Any) -> list[int]:
    if not isinstance(v, list):
        raise ProtocolError("initgroups answer is not an array")
    return [_check_int(g) for g in v]


def parse_page(v: Any, parse_record) -> tuple[int | None, list]:
    if not isinstance(v, list) or len(v) != 2 or not isinstance(v[1], list):
        raise ProtocolError("enumeration page is not [next, records]")
    nxt = None if v[0] is None else _check_int(v[0], 0, 2**63)
    return nxt, [parse_record(r) for r in v[1]]


def parse_stats(v: Any) -> dict[str, int]:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(n, int) for k, n in v.items()):
        raise ProtocolError("stats answer is not a map of str to int")
    return dict(v)


PAYLOAD_PARSERS = {
    Op.PASSWD_BY_NAME: parse_passwd,
    Op.PASSWD_BY_UID: parse_passwd,
    Op.GROUP_BY_NAME: parse_group,
    Op.GROUP_BY_GID: parse_group,
    Op.INITGROUPS: parse_gids,
    Op.SHADOW_BY_NAME: parse_shadow,
    Op.MAILHOST: parse_mailhost,
    Op.STATS: parse_stats,
    Op.PING: lambda v: v,
    Op.PASSWD_ENUM: lambda v: parse_page(v, parse_passwd),
    Op.GROUP_ENUM: lambda v: parse_page(v, parse_group),
    Op.SHADOW_ENUM: lambda v: parse_page(v, parse_shadow),
}


def decode_answer(packet: bytes) -> Answer:
    """Header of a plain answer; the payload is left as msgpack values."""
    try:
        v = msgpack.unpackb(packet, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolError(f"not msgpack: {e}") from None
    if not isinstance(v, list) or len(v) != 4:
        raise ProtocolError("answer is not an array of 4")
    version, rid, status, payload = v
    if version != VERSION:
        raise ProtocolError(f"answer version {version!r}")
    rid = _check_int(rid, 0, 2**64 - 1)
    try:
        st = Status(_check_int(status, 0, 255))
    except ValueError:
        raise ProtocolError(f"unknown status {status!r}") from None
    return Answer(rid, st, payload)


def parse_payload(op: Op, payload: Any) -> Any:
    return PAYLOAD_PARSERS[Op(op)](payload)


# ---- sealing (XChaCha20-Poly1305, docs/protocol.md "Packets") -----------


def parse_key(text: str | bytes) -> bytes:
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    text = text.strip()
    if len(text) != 2 * KEY_BYTES:
        raise ValueError("a key is 64 hexadecimal characters")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError("a key is 64 hexadecimal characters") from None


def read_keyfile(path: str) -> bytes:
    with open(path, "rb") as f:
        return parse_key(f.read(2 * KEY_BYTES + 8))


def seal(key: bytes, key_id: int, body: bytes) -> bytes:
    from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt

    head = bytes([SEAL_MARK, key_id])
    nonce = os.urandom(SEAL_NONCE)
    return head + nonce + crypto_aead_xchacha20poly1305_ietf_encrypt(body, head, nonce, key)


def sealed_key_id(packet: bytes) -> int:
    """Key id of a sealed packet, 0 for a plain one."""
    if len(packet) >= 2 + SEAL_NONCE + SEAL_TAG and packet[0] == SEAL_MARK:
        return packet[1]
    return 0


def unseal(key: bytes, packet: bytes) -> bytes:
    from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt
    from nacl.exceptions import CryptoError

    if not sealed_key_id(packet):
        raise ProtocolError("packet is not sealed")
    head, nonce, ct = packet[:2], packet[2 : 2 + SEAL_NONCE], packet[2 + SEAL_NONCE :]
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(ct, head, nonce, key)
    except CryptoError:
        raise ProtocolError("sealed packet does not authenticate") from None


# ---- TCP framing -------------------------------------------------------

FRAME = struct.Struct(">I")


def frame(packet: bytes) -> bytes:
    return FRAME.pack(len(packet)) + packet
