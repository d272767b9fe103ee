"""Changes applied to the C table one user or group at a time (pwt_apply,
pwcache/changes.py): the real answer path sees each change, lookups during
changes see the old or the new record whole, and the delta is folded so
memory stays bounded. docs/pwserver.md, "Changes"."""

from __future__ import annotations

import random
import shutil
import sys
import threading

import msgpack
import pytest

from pwcache.changes import TableChanges
from pwcache.placement import PlacementRule
from pwcache.protocol import Op
from pwcache.server import ServerCore
from pwcache.table import Table
from tests.pwcache.test_pwserver_asan import run_under_sanitizers
from tests.support.pwserver_util import KEY_SHADOW, NOTFOUND, OK, request, seal, unseal

SHADOW_KEY = bytes(range(32))
USERS = [(f"u{i}", 1000 + i) for i in range(20)]


def passwd(name, uid, gid=100, gecos="", home=None, shell="/bin/sh"):
    return f"{name}:x:{uid}:{gid}:{gecos}:{home or '/home/' + name}:{shell}"


def shadow(name, hash_="$6$h", lastchg=19000):
    return f"{name}:{hash_}:{lastchg}:0:99999:7:::"


def base_sources():
    return dict(
        passwd="".join(passwd(n, u) + "\n" for n, u in USERS).encode(),
        shadow="".join(shadow(n) + "\n" for n, _ in USERS).encode(),
        group=b"staff:x:100:u0,u1\nwheel:x:10:u0\nempty:x:50:\n",
        mailhosts=b"u0 store1\nu1 store2 frozen\n",
    )


class Served:
    """A ServerCore serving a table, asked through the C answer path."""

    def __init__(self, table: Table, rule=None, fold_entries=4096):
        self.core = ServerCore()
        self.core.set_keys(None, SHADOW_KEY)
        self.core.install(table, 0)
        self.changes = TableChanges(self.core, rule=rule, fold_entries=fold_entries)
        self.answerer = self.core.answerer(tcp=True)

    def ask(self, op, arg=None, answerer=None):
        packet = request(int(Op[op.upper()]), arg, pad=0)
        sealed = op in ("shadow_by_name", "shadow_enum")
        if sealed:
            packet = seal(SHADOW_KEY, KEY_SHADOW, packet)
        raw = (answerer or self.answerer).answer(packet)
        if sealed:
            raw = unseal(SHADOW_KEY, raw)
        _, _, status, payload = msgpack.unpackb(raw)
        return status, payload

    def found(self, op, arg):
        status, payload = self.ask(op, arg)
        return payload if status == OK else None

    def generation(self):
        return self.ask("ping")[1][1]

    def stats(self):
        return self.ask("stats")[1]

    def enumerate(self, op):
        records, index = [], 0
        while index is not None:
            status, (index, page) = self.ask(op, index)
            assert status == OK
            records += page
        return records

    def close(self):
        self.changes.wait_folded(60)
        self.answerer.close()
        self.core.close()


@pytest.fixture
def served():
    s = Served(Table.from_bytes(**base_sources()))
    yield s
    s.close()


# ---- users ------------------------------------------------------------------


def test_insert_user_with_shadow_and_mailhost(served):
    gen = served.generation()
    status = served.changes.apply(
        [("passwd", passwd("new", 2000, gecos="New")), ("shadow", shadow("new", "$6$n")), ("mailhosts", "new store9")]
    )
    assert status == ["applied"] * 3
    assert served.generation() == gen + 1  # one batch, one generation
    rec = ["new", "x", 2000, 100, "New", "/home/new", "/bin/sh", "store9"]
    assert served.found("passwd_by_name", "new") == rec
    assert served.found("passwd_by_uid", 2000) == rec
    assert served.found("shadow_by_name", "new")[:3] == ["new", "$6$n", 19000]
    assert served.found("mailhost", "new") == ["store9", False]
    assert served.found("initgroups", "new") == []
    assert served.stats()["users"] == len(USERS) + 1 and served.stats()["shadows"] == len(USERS) + 1
    assert served.found("passwd_by_name", "u3")[0] == "u3"  # the base still answers


def test_update_user_keeps_what_the_change_does_not_name(served):
    assert served.changes.apply([("passwd", passwd("u1", 1901, gecos="Moved"))]) == ["applied"]
    rec = served.found("passwd_by_name", "u1")
    assert rec[2] == 1901 and rec[4] == "Moved" and rec[7] == "store2"
    assert served.found("passwd_by_uid", 1901) == rec
    assert served.found("passwd_by_uid", 1001) is None  # its old uid is nobody's
    assert served.found("mailhost", "u1") == ["store2", True]
    assert served.found("shadow_by_name", "u1")[1] == "$6$h"
    assert sorted(served.found("initgroups", "u1")) == [100]
    served.changes.apply([("mailhosts", "u1 store3")])
    assert served.found("mailhost", "u1") == ["store3", False]
    assert served.found("passwd_by_name", "u1")[7] == "store3"
    assert served.stats()["users"] == len(USERS)


def test_delete_user(served):
    assert served.changes.apply([("del_user", "u0")]) == ["applied"]
    for op, arg in (("passwd_by_name", "u0"), ("passwd_by_uid", 1000), ("shadow_by_name", "u0"), ("mailhost", "u0")):
        assert served.ask(op, arg)[0] == NOTFOUND, op
    # still listed in staff and wheel, as group(5) would leave it
    assert sorted(served.found("initgroups", "u0")) == [10, 100]
    assert served.stats()["users"] == len(USERS) - 1
    assert served.changes.apply([("passwd", passwd("u0", 1000))]) == ["applied"]
    assert served.found("passwd_by_uid", 1000)[0] == "u0"
    assert served.found("shadow_by_name", "u0") is None  # a new user: no shadow until one is given


def test_refused_changes_are_counted_and_change_nothing(served):
    gen, before = served.generation(), served.found("passwd_by_name", "u2")
    status = served.changes.apply(
        [
            ("passwd", "u2:x:notanumber:100::/h:/bin/sh"),  # bad, as in a file
            ("passwd", passwd("u2", 1003)),  # u3's uid
            ("passwd", "+nis:x:5:5::/:/bin/sh"),  # NIS compat entries are not served
            ("passwd", passwd("u2", 1002) + "\n" + passwd("x", 9)),  # two lines in one change
            ("shadow", shadow("ghost")),  # no such user
            ("mailhosts", "ghost store1"),
            ("mailhosts", "u2 store1 melted"),
            ("group", "staff:x:10:u1"),  # wheel's gid
            ("del_user", "ghost"),
            ("del_group", "ghost"),
            ("passwd", "# a comment"),
        ]
    )
    assert status == ["bad", "dup_id", "bad", "bad", "unknown", "unknown", "bad", "dup_id", "unknown", "unknown", "bad"]
    assert served.generation() == gen  # nothing applied: no new generation
    assert served.found("passwd_by_name", "u2") == before
    st = served.stats()
    assert st["passwd_bad"] == 4 and st["passwd_dup_uid"] == 1 and st["shadow_orphan"] == 1
    assert st["mailhosts_unknown"] == 1 and st["mailhosts_bad"] == 1 and st["group_dup_gid"] == 1
    assert st["delete_unknown"] == 2 and st["changes_refused"] == 11 and st["changes_applied"] == 0


def test_new_user_is_placed_by_the_rule_as_at_load():
    rule = PlacementRule("hash", (("s1", 1.0), ("s2", 2.0), ("s3", 1.0)))
    src = base_sources()
    with Table.from_bytes(**src, rule=rule) as t:
        t.apply_changes([("passwd", passwd(f"n{i}", 5000 + i)) for i in range(30)], rule=rule)
        extra = "".join(passwd(f"n{i}", 5000 + i) + "\n" for i in range(30)).encode()
        with Table.from_bytes(**{**src, "passwd": src["passwd"] + extra}, rule=rule) as whole:
            for i in range(30):
                assert t.mailhost(f"n{i}") == whole.mailhost(f"n{i}")
                assert t.passwd_by_name(f"n{i}") == whole.passwd_by_name(f"n{i}")


# ---- groups -----------------------------------------------------------------


def test_group_insert_update_delete(served):
    assert served.changes.apply([("group", "mail:x:200:u2,u3,nobody")]) == ["applied"]
    assert served.found("group_by_name", "mail") == ["mail", "x", 200, ["u2", "u3", "nobody"]]
    assert served.found("group_by_gid", 200)[0] == "mail"
    assert served.found("initgroups", "u2") == [200]
    assert served.found("initgroups", "nobody") == [200]  # a member who is no user, as at load
    # members change: u3 leaves, u4 joins; staff loses u1
    served.changes.apply([("group", "mail:x:200:u2,u4"), ("group", "staff:x:100:u0")])
    assert served.found("initgroups", "u3") == [] and served.found("initgroups", "u4") == [200]
    assert served.found("initgroups", "nobody") is None
    assert served.found("initgroups", "u1") == []
    assert sorted(served.found("initgroups", "u0")) == [10, 100]
    # the gid changes: every member follows
    served.changes.apply([("group", "mail:x:201:u2,u4")])
    assert served.found("group_by_gid", 200) is None and served.found("group_by_gid", 201)[0] == "mail"
    assert served.found("initgroups", "u2") == [201]
    served.changes.apply([("del_group", "wheel"), ("del_group", "mail")])
    assert served.found("group_by_name", "wheel") is None and served.found("group_by_gid", 10) is None
    assert served.found("initgroups", "u0") == [100] and served.found("initgroups", "u2") == []
    assert served.stats()["groups"] == 2
    assert served.changes.apply([("group", "wheel2:x:10:u5")]) == ["applied"]  # the freed gid may be taken
    assert served.found("group_by_gid", 10)[0] == "wheel2"


def test_group_members_validated_as_in_files(served):
    assert served.changes.apply([("group", b"g:x:300:u1,,u2,\xff")]) == ["applied"]
    assert served.found("group_by_name", "g")[3] == ["u1", "u2"]
    assert served.changes.apply([("group", "g:x:300")]) == ["bad"]
    assert served.stats()["group_bad"] == 1


# ---- enumeration ------------------------------------------------------------


def test_enumeration_lists_each_record_once(served):
    served.changes.apply(
        [
            ("passwd", passwd("u3", 1003, gecos="v2")),
            ("passwd", passwd("zz", 3000)),
            ("del_user", "u4"),
            ("group", "staff:x:100:u9"),
        ]
    )
    served.changes.apply([("passwd", passwd("u3", 1003, gecos="v3"))])
    names = [r[0] for r in served.enumerate("passwd_enum")]
    assert sorted(names) == sorted({n for n, _ in USERS} - {"u4"} | {"zz"})
    assert [r for r in served.enumerate("passwd_enum") if r[0] == "u3"][0][4] == "v3"
    assert len([r[0] for r in served.enumerate("shadow_enum")]) == len(USERS) - 1
    groups = served.enumerate("group_enum")
    assert sorted(g[0] for g in groups) == ["empty", "staff", "wheel"]
    assert [g for g in groups if g[0] == "staff"][0][3] == ["u9"]


# ---- against a table built from the same state's files ----------------------


class Model:
    """The source files' state after each change; what a full load gives."""

    def __init__(self, src):
        def lines(b):
            return [ln for ln in b.decode().splitlines() if ln]

        self.passwd = {ln.split(":")[0]: ln for ln in lines(src["passwd"])}
        self.shadow = {ln.split(":")[0]: ln for ln in lines(src["shadow"])}
        self.group = {ln.split(":")[0]: ln for ln in lines(src["group"])}
        self.mailhosts = {ln.split()[0]: ln for ln in lines(src["mailhosts"])}

    def uid_holder(self, uid):
        return next((n for n, ln in self.passwd.items() if int(ln.split(":")[2]) == uid), None)

    def gid_holder(self, gid):
        return next((n for n, ln in self.group.items() if int(ln.split(":")[2]) == gid), None)

    def expect(self, kind, text):
        """The status the table must give, and the model updated."""
        if kind == "passwd":
            name, uid = text.split(":")[0], int(text.split(":")[2])
            if self.uid_holder(uid) not in (None, name):
                return "dup_id"
            self.passwd[name] = text
        elif kind == "group":
            name, gid = text.split(":")[0], int(text.split(":")[2])
            if self.gid_holder(gid) not in (None, name):
                return "dup_id"
            self.group[name] = text
        elif kind in ("shadow", "mailhosts"):
            name = text.split(":")[0] if kind == "shadow" else text.split()[0]
            if name not in self.passwd:
                return "unknown"
            getattr(self, kind)[name] = text
        elif kind == "del_user":
            if text not in self.passwd:
                return "unknown"
            for m in (self.passwd, self.shadow, self.mailhosts):
                m.pop(text, None)
        elif kind == "del_group":
            if self.group.pop(text, None) is None:
                return "unknown"
        return "applied"

    def table(self, rule=None):
        def buf(m):
            return "".join(ln + "\n" for ln in m.values()).encode()

        return Table.from_bytes(buf(self.passwd), buf(self.shadow), buf(self.group), buf(self.mailhosts), rule=rule)


def random_change(rng, names, groups):
    name = rng.choice(names)
    kind = rng.choices(["passwd", "shadow", "mailhosts", "del_user", "group", "del_group"], [5, 2, 2, 1, 3, 1])[0]
    if kind == "passwd":
        return kind, passwd(name, rng.randrange(1000, 1000 + 3 * len(names)), gecos=f"v{rng.randrange(10**6)}")
    if kind == "shadow":
        return kind, shadow(name, f"$6${rng.randrange(10**6)}")
    if kind == "mailhosts":
        return kind, f"{name} store{rng.randrange(4)}" + (" frozen" if rng.random() < 0.2 else "")
    if kind == "del_user":
        return kind, name
    group = rng.choice(groups)
    if kind == "del_group":
        return kind, group
    members = ",".join(rng.sample(names, rng.randrange(0, 6)))
    return kind, f"{group}:x:{rng.randrange(100, 100 + 2 * len(groups))}:{members}"


def assert_same(t: Table, whole: Table, names, groups, ids):
    for n in names:
        assert t.passwd_by_name(n) == whole.passwd_by_name(n), n
        assert t.shadow_by_name(n) == whole.shadow_by_name(n), n
        assert t.mailhost(n) == whole.mailhost(n), n
        got, want = t.initgroups(n), whole.initgroups(n)
        assert (got and sorted(got)) == (want and sorted(want)), n
    for g in groups:
        assert t.group_by_name(g) == whole.group_by_name(g), g
    for i in ids:
        assert t.passwd_by_uid(i) == whole.passwd_by_uid(i), i
        assert t.group_by_gid(i) == whole.group_by_gid(i), i
    for kind in ("passwd", "shadow", "group"):
        assert sorted(t.enumerate(kind)) == sorted(whole.enumerate(kind)), kind
    ts, ws = t.stats(), whole.stats()
    assert (ts["users"], ts["groups"], ts["shadows"]) == (ws["users"], ws["groups"], ws["shadows"])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_changes_match_a_full_load_of_the_same_files(seed):
    rng = random.Random(seed)
    src = base_sources()
    model = Model(src)
    names = [n for n, _ in USERS] + [f"x{i}" for i in range(10)]
    groups = ["staff", "wheel", "empty", "g1", "g2", "g3"]
    ids = range(0, 1200)
    with Table.from_bytes(**src) as t:
        for step in range(60):
            batch = [random_change(rng, names, groups) for _ in range(rng.randrange(1, 6))]
            assert t.apply_changes(batch) == [model.expect(k, x) for k, x in batch], step
            if step % 20 == 19:
                with model.table() as whole:
                    assert_same(t, whole, names, groups, ids)
        t.fold()
        assert t.delta_entries() == 0
        with model.table() as whole:
            assert_same(t, whole, names, groups, ids)


# ---- lookups during changes ---------------------------------------------------


def test_lookups_during_10000_changes_see_old_or_new_records_never_notfound():
    """Reader threads ask for users that exist throughout while 10,000
    random changes (updates of them, inserts and deletes of others, group
    changes) are applied one batch each, folds included: every answer is a
    record that was published for that user, whole, and never NOTFOUND."""
    rng = random.Random(7)
    stable = [f"s{i}" for i in range(200)]
    transient = [f"t{i}" for i in range(200)]
    src = dict(
        passwd="".join(passwd(n, 10000 + i, gecos="v0") + "\n" for i, n in enumerate(stable)).encode(),
        shadow="".join(shadow(n, "$6$0") + "\n" for n in stable).encode(),
        group=b"",
        mailhosts="".join(f"{n} store0\n" for n in stable).encode(),
    )
    served = Served(Table.from_bytes(**src), fold_entries=150)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # the writer gets the GIL back soon after each C call
    lock = threading.Lock()
    # every version published of each stable user's passwd record, shadow hash and host
    pw_seen = {n: {("v0", "store0")} for n in stable}
    sh_seen = {n: {"$6$0"} for n in stable}
    host_seen = {n: {("store0", False)} for n in stable}
    errors, asked = [], [0]
    stop = threading.Event()

    def reader(k):
        r = random.Random(k)
        answerer = served.core.answerer(tcp=True)
        try:
            while not stop.is_set():
                i = r.randrange(len(stable))
                name = stable[i]
                for op, arg in (
                    ("passwd_by_name", name),
                    ("passwd_by_uid", 10000 + i),
                    ("shadow_by_name", name),
                    ("mailhost", name),
                    ("initgroups", name),
                ):
                    status, payload = served.ask(op, arg, answerer)
                    asked[0] += 1
                    if status != OK:
                        errors.append((op, arg, status))
                        continue
                    with lock:
                        if op.startswith("passwd") and (
                            payload[0] != name
                            or payload[2] != 10000 + i
                            or (payload[4], payload[7]) not in pw_seen[name]
                        ):
                            errors.append((op, arg, payload))
                        elif op == "shadow_by_name" and payload[1] not in sh_seen[name]:
                            errors.append((op, arg, payload))
                        elif op == "mailhost" and tuple(payload) not in host_seen[name]:
                            errors.append((op, arg, payload))
        finally:
            answerer.close()

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
    for th in threads:
        th.start()
    hosts = {n: ("store0", False) for n in stable}
    live = set()
    try:
        for step in range(10_000):
            x = rng.random()
            i = rng.randrange(len(stable))
            name = stable[i]
            if x < 0.3:
                gecos = f"v{step}"
                with lock:
                    pw_seen[name].add((gecos, hosts[name][0]))
                change = ("passwd", passwd(name, 10000 + i, gecos=gecos))
            elif x < 0.4:
                with lock:
                    sh_seen[name].add(f"$6${step}")
                change = ("shadow", shadow(name, f"$6${step}"))
            elif x < 0.5:
                host = (f"store{rng.randrange(5)}", rng.random() < 0.3)
                with lock:
                    host_seen[name].add(host)
                    # the passwd record carries the host: its current gecos with the new host
                    current = served.found("passwd_by_name", name)
                    pw_seen[name].add((current[4], host[0]))
                hosts[name] = host
                change = ("mailhosts", f"{name} {host[0]}" + (" frozen" if host[1] else ""))
            elif x < 0.8:
                t = rng.choice(transient)
                if t in live:
                    change = ("del_user", t)
                    live.discard(t)
                else:
                    change = ("passwd", passwd(t, 20000 + transient.index(t)))
                    live.add(t)
            else:
                members = ",".join(rng.sample(stable + transient, rng.randrange(0, 8)))
                g = rng.randrange(20)
                change = ("group", f"g{g}:x:{500 + g}:{members}")
            assert served.changes.apply([change]) == ["applied"], change
    finally:
        stop.set()
        for th in threads:
            th.join(60)
        sys.setswitchinterval(switch)
    assert not errors, errors[:10]
    assert asked[0] > 1000  # the readers did run alongside
    assert served.changes.folds >= 1  # folds happened during the load
    assert served.changes.wait_folded(60)
    assert served.generation() >= 10_001
    for name in stable:
        assert served.found("mailhost", name) == list(hosts[name])
    for t in transient:
        assert (served.found("passwd_by_name", t) is not None) == (t in live)
    served.close()


# ---- memory ---------------------------------------------------------------------


def test_delta_is_folded_and_memory_stays_bounded():
    n = 2000
    src = dict(
        passwd="".join(passwd(f"u{i}", 1000 + i) + "\n" for i in range(n)).encode(),
        shadow="".join(shadow(f"u{i}") + "\n" for i in range(n)).encode(),
        group=b"",
        mailhosts=b"",
    )
    served = Served(Table.from_bytes(**src), fold_entries=100)
    fresh_bytes = served.stats()["table_bytes"]
    rng = random.Random(3)
    peak = 0
    for step in range(3000):
        i = rng.randrange(n)
        served.changes.apply(
            [("passwd", passwd(f"u{i}", 1000 + i, gecos=f"step {step}")), ("shadow", shadow(f"u{i}", f"$6${step}"))]
        )
        if step % 100 == 0:
            served.changes.wait_folded(60)
        peak = max(peak, served.stats()["delta_entries"])
    assert served.changes.wait_folded(60)
    st = served.stats()
    assert served.changes.folds >= 10
    assert peak <= 100 + 100  # the bound, plus what is applied while a fold runs (waited for each 100 steps)
    assert st["delta_entries"] <= 100 and st["users"] == n
    assert st["table_bytes"] < 2 * fresh_bytes
    served.close()


def test_folding_keeps_the_counters_and_changes_made_meanwhile(served):
    served.changes.apply([("passwd", "bad")])
    served.changes.fold_entries = 1
    served.changes.apply([("passwd", passwd("a1", 7001)), ("passwd", passwd("a2", 7002))])  # starts a fold
    served.changes.apply([("passwd", passwd("a3", 7003))])  # during it, or after
    assert served.changes.wait_folded(60)
    for name in ("a1", "a2", "a3"):
        assert served.found("passwd_by_name", name)[0] == name
    st = served.stats()
    assert st["passwd_bad"] == 1 and st["users"] == len(USERS) + 3


# ---- under AddressSanitizer -----------------------------------------------------

CHANGES_DRIVER = r"""
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "pw_server.h"
#include "pw_wire.h"

#define STABLE 10 /* users s0..s9 (uid 5000 + i): updated, never deleted */

static _Thread_local uint64_t rng = 88172645463325252ull;
static uint32_t rnd(uint32_t n)
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return n ? (uint32_t)(rng % n) : 0;
}

/* A change line: mostly well formed, sometimes mangled. */
static size_t make_line(int kind, char *out, size_t cap)
{
    unsigned u = rnd(40), g = rnd(10);
    int n;
    switch (kind) {
    case 0: n = rnd(4) ? snprintf(out, cap, "u%u:x:%u:%u:g%u:/h:/bin/sh", u, 1000 + rnd(60), g, rnd(99))
                       : snprintf(out, cap, "s%u:x:%u:1:v%u:/h:/bin/sh", u % STABLE, 5000 + u % STABLE, rnd(99));
            return (size_t)n; /* (never mangled: s* must stay) */
    case 1: n = snprintf(out, cap, "u%u:$6$%u:1:0:9::::", u, rnd(99)); break;
    case 2: n = snprintf(out, cap, "g%u:x:%u:u%u,s%u,,u%u", g, 100 + rnd(15), rnd(40), rnd(STABLE), rnd(40)); break;
    case 3:
        n = snprintf(out, cap, "%c%u h%u%s", rnd(2) ? 'u' : 's', u % STABLE, rnd(4), rnd(3) ? "" : " frozen");
        break;
    case 4: n = snprintf(out, cap, "u%u", u); break;
    default: n = snprintf(out, cap, "g%u", g); break;
    }
    size_t len = (size_t)n;
    for (int m = rnd(3) == 0 ? (int)rnd(3) : 0; m > 0 && len; m--)
        out[rnd((uint32_t)len)] = "::,\n#\xff x"[rnd(8)];
    if (rnd(10) == 0)
        len = rnd((uint32_t)len + 1);
    return len;
}

static pws_server *s;
static atomic_int stop, failures;
static atomic_long asked;

static int ask(int slot, pw_request *rq, uint8_t *out, size_t cap)
{
    uint8_t pkt[PW_MAX_REQUEST];
    int k = pw_encode_request(pkt, sizeof pkt, rq, 0);
    size_t n = k > 0 ? pws_answer(s, slot, pkt, (size_t)k, 1, out, cap) : 0;
    pwp_reader r;
    uint64_t id;
    int status = -1;
    pwp_reader_init(&r, out, n);
    if (n && pw_get_answer_header(&r, &id, &status) < 0)
        status = -1;
    return status;
}

/* Lookups of the stable users in a thread of its own: always found. */
static void *reader(void *arg)
{
    static _Thread_local uint8_t out[1 << 16];
    int slot = pws_slot_acquire(s);
    rng += (uint64_t)(uintptr_t)arg * 7919;
    while (!atomic_load(&stop)) {
        char name[8];
        unsigned i = rnd(STABLE);
        snprintf(name, sizeof name, "s%u", i);
        pw_request by_name = {.id = rng, .op = PW_OP_PASSWD_BY_NAME, .arg_kind = PW_ARG_STR, .name = name,
                              .name_len = (uint32_t)strlen(name)};
        pw_request by_uid = {.id = rng, .op = PW_OP_PASSWD_BY_UID, .arg_kind = PW_ARG_INT, .num = 5000 + i};
        pw_request host = by_name, groups = by_name;
        host.op = PW_OP_MAILHOST;
        groups.op = PW_OP_INITGROUPS;
        pw_request *all[] = {&by_name, &by_uid, &host, &groups};
        for (int k = 0; k < 4; k++)
            if (ask(slot, all[k], out, sizeof out) != PW_OK) {
                fprintf(stderr, "s%u op %d not found\n", i, all[k]->op);
                atomic_fetch_add(&failures, 1);
            }
        atomic_fetch_add(&asked, 4);
    }
    pws_slot_release(s, slot);
    return NULL;
}

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 1000;
    static uint8_t out[PW_MAX_TCP_ANSWER + PW_SEAL_OVERHEAD];
    char passwd[1024] = "u1:x:1001:1::/h:/bin/sh\nu2:x:1002:1::/h:/bin/sh\n";
    for (int i = 0; i < STABLE; i++)
        snprintf(passwd + strlen(passwd), 64, "s%d:x:%d:1:v:/h:/bin/sh\n", i, 5000 + i);
    const char *group = "g1:x:101:u1,u2,u9\n";
    pwpl_rule *rule = pwpl_new(PWPL_HASH);
    pwpl_add_host(rule, "a", 1, 1.0);
    char err[128];
    pwt_table *t = pwt_build(passwd, strlen(passwd), NULL, 0, group, strlen(group), NULL, 0, rule, err, sizeof err);
    s = pws_new();
    int slot = pws_slot_acquire(s);
    pws_swap_table(s, t, 1, 0);
    pthread_t readers[2];
    for (long k = 0; k < 2; k++)
        pthread_create(&readers[k], NULL, reader, (void *)(k + 1));
    static char text[8][256];
    for (int r = 0; r < rounds; r++) {
        pwt_change ch[8];
        int st[8];
        size_t n = 1 + rnd(8);
        for (size_t i = 0; i < n; i++) {
            ch[i].kind = (int)rnd(7) - (rnd(50) == 0); /* now and then a kind that is none */
            ch[i].len = make_line(ch[i].kind < 0 ? 0 : ch[i].kind, text[i], sizeof text[i]);
            ch[i].text = text[i];
        }
        pwt_table *next = pwt_apply(t, ch, n, r % 2 ? rule : NULL, st, err, sizeof err);
        if (!next) { fprintf(stderr, "apply failed: %s\n", err); return 1; }
        if (r % 97 == 96) {
            pwt_table *held = pwt_share(next), *folded = pwt_fold(held, rule, err, sizeof err);
            pwt_free(held);
            if (!folded) { fprintf(stderr, "fold failed: %s\n", err); return 1; }
            pwt_free(next);
            next = folded;
        }
        pwt_free(pws_swap_table(s, next, (uint64_t)r + 2, 0));
        t = next;
        for (int q = 0; q < 20; q++) {
            char name[8];
            snprintf(name, sizeof name, rnd(2) ? "u%u" : "g%u", rnd(40));
            pw_request rq = {.id = rng, .op = 1 + (int)rnd(12), .name = name, .name_len = (uint32_t)strlen(name),
                             .num = rnd(3) ? 1000 + rnd(60) : rnd(30)};
            rq.arg_kind = pw_op_arg_kind(rq.op);
            ask(slot, &rq, out, sizeof out);
        }
    }
    atomic_store(&stop, 1);
    for (int k = 0; k < 2; k++)
        pthread_join(readers[k], NULL);
    pwt_free(pws_swap_table(s, NULL, 0, 0));
    pws_slot_release(s, slot);
    pws_free(s);
    pwpl_free(rule);
    if (atomic_load(&failures) || atomic_load(&asked) < 100) {
        fprintf(stderr, "%d failed lookups of %ld\n", atomic_load(&failures), atomic_load(&asked));
        return 1;
    }
    puts("ok");
    return 0;
}
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_changes_under_sanitizers(tmp_path):
    """Random (and mangled) changes, folds and lookups under ASan/UBSan,
    with two reader threads asking for users that exist throughout (never
    NOTFOUND): any leak, overflow or use after free of a delta entry or of
    a table freed after the swap aborts."""
    run_under_sanitizers(tmp_path, CHANGES_DRIVER)


@pytest.fixture
def held_fold(monkeypatch):
    """Folds wait for release.set() once started (started.is_set())."""
    import pwcache.changes

    started, release = threading.Event(), threading.Event()
    real_fold = pwcache.changes.fold_table

    def slow_fold(ptr, rule=None):
        started.set()
        assert release.wait(60)
        return real_fold(ptr, rule)

    monkeypatch.setattr(pwcache.changes, "fold_table", slow_fold)
    return started, release


def test_batches_applied_during_a_fold_are_kept(served, held_fold):
    """The fold builds from a snapshot; what is applied while it runs is
    applied again to the folded table before that is served."""
    started, release = held_fold
    served.changes.fold_entries = 1
    served.changes.apply([("passwd", passwd("a1", 7001)), ("passwd", passwd("a2", 7002))])  # starts a fold
    assert started.wait(60)
    gen = served.generation()
    assert served.changes.apply([("passwd", passwd("a3", 7003)), ("del_user", "a1")]) == ["applied", "applied"]
    assert served.changes.apply([("shadow", shadow("a3", "$6$a3"))]) == ["applied"]
    assert served.found("passwd_by_name", "a3")[0] == "a3"  # served at once, before the fold ends
    release.set()
    assert served.changes.wait_folded(60)
    assert served.changes.folds == 1 and served.generation() == gen + 3
    assert served.stats()["delta_entries"] == 2  # a1 and a3: applied again on top of the folded base
    assert served.found("passwd_by_name", "a1") is None
    assert served.found("passwd_by_name", "a2")[0] == "a2"
    assert served.found("shadow_by_name", "a3")[1] == "$6$a3"
    assert served.stats()["users"] == len(USERS) + 2


def test_a_reload_during_a_fold_wins(served, held_fold):
    started, release = held_fold
    served.changes.fold_entries = 1
    served.changes.apply([("passwd", passwd("a1", 7001)), ("passwd", passwd("a2", 7002))])
    assert started.wait(60)
    served.core.install(Table.from_bytes(b"only:x:9000:1::/:/bin/sh\n"), 0)
    gen = served.generation()
    release.set()
    assert served.changes.wait_folded(60)
    assert served.changes.folds == 0 and served.generation() == gen  # the fold of the older table is dropped
    assert served.found("passwd_by_name", "a1") is None and served.found("passwd_by_name", "only")[0] == "only"
    assert served.changes.apply([("passwd", passwd("a4", 7004))]) == ["applied"]  # changes go on, on the new table
    assert served.stats()["users"] == 2


def test_a_uid_the_source_holds_twice():
    with Table.from_bytes(passwd("a", 5).encode() + b"\n" + passwd("b", 5).encode() + b"\n") as t:
        assert t.passwd_by_uid(5)[:3] == b"\x98\xa1a"  # the first holder, as at load
        assert t.apply_changes([("passwd", passwd("b", 5, gecos="x"))]) == ["dup_id"]
        assert t.apply_changes([("passwd", passwd("b", 6))]) == ["applied"]
        assert t.apply_changes([("del_user", "a")]) == ["applied"]
        assert t.passwd_by_uid(5) is None and t.passwd_by_uid(6)[:3] == b"\x98\xa1b"
