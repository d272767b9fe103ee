"""Regenerates wire.json, the shared vectors of docs/protocol.md.

The bytes come from the msgpack reference packer, not from either of our
implementations; tests/pwcache/test_wire_vectors.py checks both against them.
Run: .venv/bin/python tests/vectors/make_wire_vectors.py
"""

import json
import pathlib

import msgpack

ID = 0x0123456789ABCDEF


def pack(v):
    return msgpack.packb(v, use_bin_type=True).hex()


def padded(body, pad_to=256):
    n = len(msgpack.packb(body, use_bin_type=True))
    pad = pad_to - n - 2
    if pad > 0xFF:
        pad -= 1
    return pack(body + [bytes(max(pad, 0))])


requests = []
for op, arg in [
    (1, "jgarcia"),
    (2, 10000),
    (3, "proj0001"),
    (4, 20001),
    (5, "jgarcia"),
    (6, "jgarcia"),
    (7, "jgarcia"),
    (8, None),
    (9, None),
    (10, 0),
    (11, 1000),
    (1, "ñandú"),
    (1, "a" * 40),
    (2, 4294967294),
]:
    body = [1, ID, op, arg]
    requests.append({"op": op, "arg": arg, "id": ID, "plain": pack(body), "padded": padded(body)})

bad_requests = [
    {"why": "version 2", "hex": pack([2, ID, 1, "x"]), "status": 5, "id_known": True},
    {"why": "unknown op", "hex": pack([1, ID, 99, "x"]), "status": 4, "id_known": True},
    {"why": "name for uid op", "hex": pack([1, ID, 2, "x"]), "status": 4, "id_known": True},
    {"why": "empty name", "hex": pack([1, ID, 1, ""]), "status": 4, "id_known": True},
    {"why": "name too long", "hex": pack([1, ID, 1, "a" * 256]), "status": 4, "id_known": True},
    {"why": "colon in name", "hex": pack([1, ID, 1, "a:b"]), "status": 4, "id_known": True},
    {"why": "bad utf-8", "hex": "94" + pack(1)[0:] + pack(ID) + pack(1) + "a2c328", "status": 4, "id_known": True},
    {"why": "uid too big", "hex": pack([1, ID, 2, 4294967295]), "status": 4, "id_known": True},
    {"why": "negative uid", "hex": pack([1, ID, 2, -1]), "status": 4, "id_known": True},
    {"why": "three elements", "hex": pack([1, ID, 1]), "status": 4, "id_known": False},
    {"why": "not an array", "hex": pack({"a": 1}), "status": 4, "id_known": False},
    {"why": "truncated", "hex": pack([1, ID, 1, "jgarcia"])[:-4], "status": 4, "id_known": True},
    {"why": "trailing byte", "hex": pack([1, ID, 1, "jgarcia"]) + "00", "status": 4, "id_known": True},
    {"why": "padding not bin", "hex": pack([1, ID, 1, "x", "pad"]), "status": 4, "id_known": True},
    {"why": "float id", "hex": pack([1, 1.5, 1, "x"]), "status": 4, "id_known": False},
    {"why": "empty", "hex": "", "status": 4, "id_known": False},
]

passwd = ["jgarcia", "x", 10000, 10000, "Juan Garcia", "/var/spool/mail/j/g/a/jgarcia", "/usr/sbin/nologin", "store1"]
group = ["proj0001", "x", 20001, ["jgarcia", "amartinez7"]]
shadow = ["jgarcia", "$y$j75$abc$def", 20000, 0, 99999, 7, -1, -1, -1]
answers = [
    {"op": 1, "status": 0, "payload": passwd, "hex": pack([1, ID, 0, passwd])},
    {"op": 3, "status": 0, "payload": group, "hex": pack([1, ID, 0, group])},
    {"op": 6, "status": 0, "payload": shadow, "hex": pack([1, ID, 0, shadow])},
    {"op": 7, "status": 0, "payload": ["store1", False], "hex": pack([1, ID, 0, ["store1", False]])},
    {"op": 5, "status": 0, "payload": [20001, 20007], "hex": pack([1, ID, 0, [20001, 20007]])},
    {"op": 1, "status": 1, "payload": None, "hex": pack([1, ID, 1, None])},
    {"op": 3, "status": 2, "payload": None, "hex": pack([1, ID, 2, None])},
]

out = {"id": ID, "requests": requests, "bad_requests": bad_requests, "answers": answers}
path = pathlib.Path(__file__).with_name("wire.json")
path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
print(f"wrote {path}")
