"""The C wire code (pwcache/_csrc/pw_wire.c) and the Python one
(pwcache/protocol.py) against the shared vectors in tests/vectors/wire.json.

The C code is compiled here into a small shared library and called through
cffi in ABI mode, exactly as the NSS module and the server use it.
"""

import json
import pathlib
import subprocess

import msgpack
import pytest
from cffi import FFI

from pwcache import protocol
from pwcache.protocol import Op, Status

ROOT = pathlib.Path(__file__).resolve().parents[2]
VECTORS = json.loads((ROOT / "tests/vectors/wire.json").read_text())

CDEF = """
typedef struct { uint8_t *data; size_t len; size_t cap; int overflow; } pwp_buf;
typedef struct { const uint8_t *p; const uint8_t *end; } pwp_reader;
typedef struct { uint64_t id; int op; int arg_kind; const char *name; uint32_t name_len; uint64_t num; } pw_request;
typedef struct { const char *p; uint32_t n; } pw_str;
typedef struct { pw_str name, passwd, gecos, dir, shell, mailhost; uint64_t uid, gid; } pw_passwd_view;
typedef struct { pw_str name, passwd; uint64_t gid; uint32_t nmembers; pwp_reader members; } pw_group_view;
typedef struct { pw_str name, hash; int64_t lastchg, min, max, warn, inact, expire, flag; } pw_shadow_view;
int pw_encode_request(void *out, size_t cap, const pw_request *req, size_t pad_to);
int pw_decode_request(const void *data, size_t len, pw_request *req, int *id_known);
void pwp_init(pwp_buf *b, void *data, size_t cap);
void pwp_reader_init(pwp_reader *r, const void *data, size_t len);
int pw_get_answer_header(pwp_reader *r, uint64_t *id, int *status);
int pw_get_passwd(pwp_reader *r, pw_passwd_view *v);
int pw_get_group(pwp_reader *r, pw_group_view *v);
int pw_group_next_member(pw_group_view *v, pw_str *member);
int pw_get_shadow(pwp_reader *r, pw_shadow_view *v);
typedef struct { pw_str host; int frozen; } pw_mailhost_view;
typedef struct { uint32_t count; pwp_reader gids; } pw_gids_view;
typedef struct { int has_next; uint64_t next; uint32_t count; pwp_reader records; } pw_page_view;
int pw_get_mailhost(pwp_reader *r, pw_mailhost_view *v);
int pw_get_gids(pwp_reader *r, pw_gids_view *v);
int pw_gids_next(pw_gids_view *v, uint64_t *gid);
int pw_get_page(pwp_reader *r, pw_page_view *v);
void pw_put_passwd(pwp_buf *b, const pw_passwd_view *v);
void pw_put_shadow(pwp_buf *b, const pw_shadow_view *v);
void pw_put_answer_header(pwp_buf *b, uint64_t id, int status);
"""


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    out = tmp_path_factory.mktemp("wire") / "libpwwire.so"
    subprocess.run(
        [
            "cc",
            "-std=gnu11",
            "-O1",
            "-g",
            "-shared",
            "-fPIC",
            "-Wall",
            "-Werror",
            "-o",
            str(out),
            str(ROOT / "pwcache/_csrc/pw_wire.c"),
        ],
        check=True,
    )
    ffi = FFI()
    ffi.cdef(CDEF)
    return ffi, ffi.dlopen(str(out))


def c_str(ffi, s):
    return ffi.buffer(s.p, s.n)[:].decode()


def c_encode(c, op, arg, rid, pad_to):
    ffi, lib = c
    req = ffi.new("pw_request *")
    req.id, req.op = rid, op
    keep = None
    if isinstance(arg, str):
        keep = ffi.new("char[]", arg.encode())
        req.arg_kind, req.name, req.name_len = 1, keep, len(arg.encode())
    elif isinstance(arg, int):
        req.arg_kind, req.num = 2, arg
    out = ffi.new("uint8_t[1024]")
    n = lib.pw_encode_request(out, 1024, req, pad_to)
    assert n > 0
    return ffi.buffer(out, n)[:]


def c_decode(c, data):
    ffi, lib = c
    req = ffi.new("pw_request *")
    known = ffi.new("int *")
    buf = ffi.from_buffer(data) if data else ffi.NULL
    st = lib.pw_decode_request(buf, len(data), req, known)
    arg = None
    if st != 0:
        pass  # the fields of a refused request mean nothing
    elif req.arg_kind == 1:
        arg = ffi.buffer(req.name, req.name_len)[:].decode()
    elif req.arg_kind == 2:
        arg = req.num
    return st, bool(known[0]), req.id, req.op, arg


@pytest.mark.parametrize("vec", VECTORS["requests"], ids=lambda v: f"op{v['op']}-{str(v['arg'])[:8]}")
def test_request_encoding_matches_both_ways(c, vec):
    plain, padded = bytes.fromhex(vec["plain"]), bytes.fromhex(vec["padded"])
    assert protocol.encode_request(vec["op"], vec["arg"], vec["id"], pad_to=0) == plain
    assert protocol.encode_request(vec["op"], vec["arg"], vec["id"]) == padded
    assert c_encode(c, vec["op"], vec["arg"], vec["id"], 0) == plain
    assert c_encode(c, vec["op"], vec["arg"], vec["id"], protocol.REQUEST_PAD) == padded
    assert len(padded) == protocol.REQUEST_PAD
    for data in (plain, padded):
        assert c_decode(c, data) == (Status.OK, True, vec["id"], vec["op"], vec["arg"])


@pytest.mark.parametrize("vec", VECTORS["bad_requests"], ids=lambda v: v["why"])
def test_bad_requests_are_refused(c, vec):
    st, known, rid, _, _ = c_decode(c, bytes.fromhex(vec["hex"]))
    assert st == vec["status"]
    assert known == vec["id_known"]
    if known:
        assert rid == VECTORS["id"]


def test_every_truncation_of_a_request_is_refused(c):
    data = bytes.fromhex(VECTORS["requests"][0]["padded"])
    for n in range(len(data)):
        st, *_ = c_decode(c, data[:n])
        assert st == Status.BADREQUEST, n


@pytest.mark.parametrize("vec", VECTORS["answers"], ids=lambda v: f"op{v['op']}-st{v['status']}")
def test_answers_decode_in_python(vec):
    ans = protocol.decode_answer(bytes.fromhex(vec["hex"]))
    assert ans.request_id == VECTORS["id"]
    assert ans.status == vec["status"]
    if vec["status"] == Status.OK:
        parsed = protocol.parse_payload(Op(vec["op"]), ans.payload)
        expect = vec["payload"]
        if vec["op"] == Op.GROUP_BY_NAME:
            expect = expect[:3] + [tuple(expect[3])]
        assert list(parsed) == expect


def test_passwd_answer_in_c_both_ways(c):
    ffi, lib = c
    vec = VECTORS["answers"][0]
    data = bytes.fromhex(vec["hex"])
    r = ffi.new("pwp_reader *")
    lib.pwp_reader_init(r, ffi.from_buffer(data), len(data))
    rid, st = ffi.new("uint64_t *"), ffi.new("int *")
    assert lib.pw_get_answer_header(r, rid, st) == 0
    assert (rid[0], st[0]) == (VECTORS["id"], 0)
    v = ffi.new("pw_passwd_view *")
    assert lib.pw_get_passwd(r, v) == 0
    got = [
        c_str(ffi, v.name),
        c_str(ffi, v.passwd),
        v.uid,
        v.gid,
        c_str(ffi, v.gecos),
        c_str(ffi, v.dir),
        c_str(ffi, v.shell),
        c_str(ffi, v.mailhost),
    ]
    assert got == vec["payload"]
    # and the C writer packs the same bytes as the reference packer
    out = ffi.new("uint8_t[512]")
    b = ffi.new("pwp_buf *")
    lib.pwp_init(b, out, 512)
    lib.pw_put_answer_header(b, VECTORS["id"], 0)
    lib.pw_put_passwd(b, v)
    assert ffi.buffer(out, b.len)[:] == data
    # every truncation is refused, none crashes
    for n in range(len(data)):
        lib.pwp_reader_init(r, ffi.from_buffer(data), n)
        ok = lib.pw_get_answer_header(r, rid, st) == 0 and lib.pw_get_passwd(r, v) == 0
        assert not ok


def test_group_and_shadow_answers_in_c(c):
    ffi, lib = c
    for vec in VECTORS["answers"][1:3]:
        data = bytes.fromhex(vec["hex"])
        r = ffi.new("pwp_reader *")
        lib.pwp_reader_init(r, ffi.from_buffer(data), len(data))
        rid, st = ffi.new("uint64_t *"), ffi.new("int *")
        assert lib.pw_get_answer_header(r, rid, st) == 0
        if vec["op"] == Op.GROUP_BY_NAME:
            g = ffi.new("pw_group_view *")
            assert lib.pw_get_group(r, g) == 0
            members, m = [], ffi.new("pw_str *")
            while lib.pw_group_next_member(g, m) == 0:
                members.append(c_str(ffi, m))
            assert [c_str(ffi, g.name), c_str(ffi, g.passwd), g.gid, members] == vec["payload"]
        else:
            s = ffi.new("pw_shadow_view *")
            assert lib.pw_get_shadow(r, s) == 0
            got = [c_str(ffi, s.name), c_str(ffi, s.hash), s.lastchg, s.min, s.max, s.warn, s.inact, s.expire, s.flag]
            assert got == vec["payload"]
            out = ffi.new("uint8_t[512]")
            b = ffi.new("pwp_buf *")
            lib.pwp_init(b, out, 512)
            lib.pw_put_shadow(b, s)
            assert ffi.buffer(out, b.len)[:] == msgpack.packb(vec["payload"])


def reader_at_payload(c, data):
    """A reader past the answer header of `data` (kept alive by the caller)."""
    ffi, lib = c
    r = ffi.new("pwp_reader *")
    lib.pwp_reader_init(r, ffi.from_buffer(data), len(data))
    rid, st = ffi.new("uint64_t *"), ffi.new("int *")
    assert lib.pw_get_answer_header(r, rid, st) == 0
    return r


def test_mailhost_and_initgroups_answers_in_c(c):
    """A reader for every record type: MAILHOST's [host, frozen] and
    INITGROUPS' gid list, every truncation refused without advancing."""
    ffi, lib = c
    by_op = {vec["op"]: vec for vec in VECTORS["answers"] if vec["status"] == Status.OK}
    data = bytes.fromhex(by_op[Op.MAILHOST]["hex"])
    r = reader_at_payload(c, data)
    m = ffi.new("pw_mailhost_view *")
    assert lib.pw_get_mailhost(r, m) == 0
    assert [c_str(ffi, m.host), bool(m.frozen)] == by_op[Op.MAILHOST]["payload"]
    assert r.p == r.end
    data = bytes.fromhex(by_op[Op.INITGROUPS]["hex"])
    r = reader_at_payload(c, data)
    g, gid, gids = ffi.new("pw_gids_view *"), ffi.new("uint64_t *"), []
    assert lib.pw_get_gids(r, g) == 0 and r.p == r.end
    while lib.pw_gids_next(g, gid) == 0:
        gids.append(gid[0])
    assert gids == by_op[Op.INITGROUPS]["payload"]
    for op, view, get in ((Op.MAILHOST, m, lib.pw_get_mailhost), (Op.INITGROUPS, g, lib.pw_get_gids)):
        payload = msgpack.packb(by_op[op]["payload"])
        for n in range(len(payload)):
            r = ffi.new("pwp_reader *")
            lib.pwp_reader_init(r, ffi.from_buffer(payload), n)
            start = r.p
            assert get(r, view) == -1 and r.p == start, (op, n)


@pytest.mark.parametrize(
    "payload, ok",
    [
        ([["store1", True]], True),
        ([["store1"]], False),
        ([["store1", 1]], False),
        ([[b"store1", False]], False),
        (["store1"], False),
    ],
    ids=["good", "one-field", "int-frozen", "bin-host", "not-an-array"],
)
def test_mailhost_reader_refuses_other_shapes(c, payload, ok):
    ffi, lib = c
    data = msgpack.packb(payload[0], use_bin_type=True)
    r = ffi.new("pwp_reader *")
    lib.pwp_reader_init(r, ffi.from_buffer(data), len(data))
    assert (lib.pw_get_mailhost(r, ffi.new("pw_mailhost_view *")) == 0) == ok


def test_gids_reader_refuses_ids_out_of_range(c):
    ffi, lib = c
    for gids, ok in (([0, 4294967294], True), ([4294967295], False), ([-1], False), (["1"], False)):
        data = msgpack.packb(gids)
        r = ffi.new("pwp_reader *")
        lib.pwp_reader_init(r, ffi.from_buffer(data), len(data))
        assert (lib.pw_get_gids(r, ffi.new("pw_gids_view *")) == 0) == ok, gids


def test_enumeration_page_reader(c):
    ffi, lib = c
    passwd = VECTORS["answers"][0]["payload"]
    page = ffi.new("pw_page_view *")
    v = ffi.new("pw_passwd_view *")
    for frame, has_next, nxt in (([None, [passwd, passwd]], 0, 0), ([1000, [passwd, passwd]], 1, 1000)):
        data = msgpack.packb(frame)
        r = ffi.new("pwp_reader *")
        lib.pwp_reader_init(r, ffi.from_buffer(data), len(data))
        assert lib.pw_get_page(r, page) == 0 and r.p == r.end
        assert (page.has_next, page.next, page.count) == (has_next, nxt, 2)
        records = page.records
        for _ in range(2):
            assert lib.pw_get_passwd(ffi.addressof(records), v) == 0
            assert c_str(ffi, v.name) == passwd[0]
        assert records.p == r.end
        for n in range(len(data)):
            lib.pwp_reader_init(r, ffi.from_buffer(data), n)
            assert lib.pw_get_page(r, page) == -1, n
    for bad in ([None], ["x", []], [None, {}], [None, [passwd]] + [0], [-1, []]):
        data = msgpack.packb(bad)
        r = ffi.new("pwp_reader *")
        lib.pwp_reader_init(r, ffi.from_buffer(data), len(data))
        assert lib.pw_get_page(r, page) == -1, bad
    data = msgpack.packb([None, [0] * 1001])  # more than PW_ENUM_PAGE records
    lib.pwp_reader_init(r, ffi.from_buffer(data), len(data))
    assert lib.pw_get_page(r, page) == -1


def test_writer_never_overflows(c):
    ffi, lib = c
    v = ffi.new("pw_passwd_view *")
    name = ffi.new("char[]", b"x" * 300)
    for field in ("name", "passwd", "gecos", "dir", "shell", "mailhost"):
        getattr(v, field).p, getattr(v, field).n = name, 300
    for cap in range(0, 1900, 37):
        mem = ffi.new("uint8_t[]", cap + 16)
        b = ffi.new("pwp_buf *")
        lib.pwp_init(b, mem, cap)
        lib.pw_put_passwd(b, v)
        assert b.len <= cap
        assert bool(b.overflow) == (cap < 6 * 303 + 1 + 2)
        assert ffi.buffer(mem + cap, 16)[:] == bytes(16)


def test_sealing_round_trip_and_tamper():
    key = bytes(range(32))
    body = protocol.encode_request(Op.SHADOW_BY_NAME, "jgarcia", 7, pad_to=0)
    sealed = protocol.seal(key, protocol.KEY_SHADOW, body)
    assert protocol.sealed_key_id(sealed) == protocol.KEY_SHADOW
    assert protocol.unseal(key, sealed) == body
    for i in (0, 1, 5, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[i] ^= 1
        with pytest.raises(protocol.ProtocolError):
            protocol.unseal(key, bytes(bad))
    with pytest.raises(protocol.ProtocolError):
        protocol.unseal(bytes(32), sealed)
