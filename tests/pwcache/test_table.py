"""The C table against a Python reference (dicts), with Hypothesis."""

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pwcache.placement import PlacementRule
from pwcache.table import Table, TableError

NAME_CHARS = st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789._ñé")
names = st.text(NAME_CHARS, min_size=1, max_size=12).filter(lambda n: n[0] not in "+-")
ids = st.integers(0, 2**32 - 2)
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=":\n\r\0"), max_size=30)

users = st.lists(st.tuples(names, ids, ids, text), max_size=40)
groups = st.lists(st.tuples(names, ids, st.lists(names, max_size=6)), max_size=10)
garbage = st.lists(
    st.sampled_from(
        [
            "no colons here",
            "a:b:c",
            "x:x:notanumber:1:g:/h:/s",
            "y:x:1:2:g:/h:/s:extra",
            ":x:1:2:g:/h:/s",
            "+nis:x:1:2:::",
        ]
    ),
    max_size=4,
)
RULE = PlacementRule.from_settings({"rule": "hash", "hosts": ["s1", "s2:2"]})


def passwd_text(us, bad):
    lines = [f"{n}:secret:{u}:{g}:{c}:/home/{n}:/bin/sh" for n, u, g, c in us] + bad
    return ("\n".join(lines) + "\n").encode()


def reference(us, gs, mailhosts):
    """What the table must answer, following passwd(5)/group(5) files:
    the first entry of a name or id wins."""
    by_name, by_uid = {}, {}
    for n, u, g, c in us:
        if n in by_name:
            continue
        rec = [n, "x", u, g, c, f"/home/{n}", "/bin/sh", mailhosts.get(n) or RULE.pick(n)]
        by_name[n] = rec
        by_uid.setdefault(u, rec)
    gr_name, gr_gid, member_of = {}, {}, {}
    for n, gid, members in gs:
        if n in gr_name:
            continue
        rec = [n, "x", gid, members]
        gr_name[n] = rec
        gr_gid.setdefault(gid, rec)
        for m in members:
            member_of.setdefault(m, []).append(gid)
    return by_name, by_uid, gr_name, gr_gid, member_of


def check(t, us, gs, mailhosts):
    by_name, by_uid, gr_name, gr_gid, member_of = reference(us, gs, mailhosts)
    for n, rec in by_name.items():
        assert msgpack.unpackb(t.passwd_by_name(n)) == rec
        assert t.mailhost(n) == (rec[7], False)
        assert msgpack.unpackb(t.shadow_by_name(n))[:3] == [n, f"$6${n}", 19000]
    for u, rec in by_uid.items():
        assert msgpack.unpackb(t.passwd_by_uid(u)) == rec
    for n, rec in gr_name.items():
        assert msgpack.unpackb(t.group_by_name(n)) == rec
    for g, rec in gr_gid.items():
        assert msgpack.unpackb(t.group_by_gid(g)) == rec
    for m, gids in member_of.items():
        assert t.initgroups(m) == gids
    for n in by_name:
        if n not in member_of:
            assert t.initgroups(n) == []
    assert t.passwd_by_name("never-a-user") is None
    assert t.group_by_name("never-a-group") is None
    stats = t.stats()
    assert stats["users"] == len(by_name) and stats["groups"] == len(gr_name)
    assert stats["passwd_dup_name"] == len(us) - len(by_name)


def build(us, gs, bad=(), mailhosts=None):
    mailhosts = mailhosts or {}
    shadow = "".join(f"{n}:$6${n}:19000:0:99999:7:::\n" for n, _, _, _ in us).encode()
    group = "".join(f"{n}:x:{gid}:{','.join(m)}\n" for n, gid, m in gs).encode()
    mh = "".join(f"{n} {h}\n" for n, h in mailhosts.items()).encode()
    return Table.from_bytes(passwd_text(us, list(bad)), shadow, group, mh, RULE)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(users, groups, garbage, st.data())
def test_table_matches_a_dict(us, gs, bad, data):
    mailhosts = {n: "mh-" + n for n, _, _, _ in us if data.draw(st.booleans())}
    with build(us, gs, bad, mailhosts) as t:
        check(t, us, gs, mailhosts)
        assert t.stats()["passwd_bad"] == len(bad)


@settings(max_examples=50, deadline=None)
@given(users, groups, users, groups)
def test_reload_gives_a_table_of_the_new_sources_only(us1, gs1, us2, gs2):
    old = build(us1, gs1)
    with build(us2, gs2) as new:
        old.close()  # the old one goes first: the new one owns all it needs
        check(new, us2, gs2, {})
        gone = {n for n, *_ in us1} - {n for n, *_ in us2}
        for n in gone:
            assert new.passwd_by_name(n) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.binary(max_size=400), st.binary(max_size=400), st.binary(max_size=200))
def test_any_bytes_load_without_crashing(p, s, g, m):
    with Table.from_bytes(p, s, g, m, RULE) as t:
        st_ = t.stats()
        assert st_["users"] <= p.count(b"\n") + 1
        for line in p.split(b"\n")[:5]:
            name = line.split(b":")[0]
            rec = t.passwd_by_name(name) if name else None
            assert rec is None or msgpack.unpackb(rec)[0].encode() == name


def test_malformed_lines_are_counted():
    passwd = (
        b"ok:x:1:1::/:/bin/sh\n"
        b"short:x:1\n"
        b"baduid:x:-1:1::/:/bin/sh\n"
        b"bigid:x:4294967295:1::/:/bin/sh\n"
        b"badutf8:x:2:2:\xff\xfe:/:/bin/sh\n"
        b"# a comment\n\n"
        b"ok:x:3:3::/:/bin/sh\n"
        b"other:x:1:1::/:/bin/sh"
    )  # no final newline; duplicate uid
    shadow = b"ok:h:1:2:3:4:5:6:7\nnouser:h:::::::\nok:h:::::::\nbad:h\n"
    group = b"g:x:10:ok,,\xff,ok\ng:x:11:\nh:x:10:\nbroken\n"
    mh = b"ok host1 frozen\nok host2\nonlyname\nstranger h\n# c\n"
    with Table.from_bytes(passwd, shadow, group, mh) as t:
        s = t.stats()
        assert (s["users"], s["passwd_bad"], s["passwd_dup_name"], s["passwd_dup_uid"]) == (2, 4, 1, 1)
        assert (s["shadows"], s["shadow_orphan"], s["shadow_dup"], s["shadow_bad"]) == (1, 1, 1, 1)
        assert (s["groups"], s["group_dup_name"], s["group_dup_gid"], s["group_bad"], s["group_bad_member"]) == (
            2,
            1,
            1,
            1,
            1,
        )
        assert (s["mailhosts_dup"], s["mailhosts_bad"], s["mailhosts_unknown"]) == (1, 1, 1)
        assert t.mailhost("ok") == ("host1", True)
        assert msgpack.unpackb(t.shadow_by_name("ok")) == ["ok", "h", 1, 2, 3, 4, 5, 6, 7]
        assert t.initgroups("ok") == [10, 10]
        assert msgpack.unpackb(t.passwd_by_uid(1))[0] == "ok"


def test_wrapper_checks_types_and_frees():
    t = Table.from_bytes(b"a:x:1:1::/:/bin/sh\n")
    with pytest.raises(TypeError):
        t.passwd_by_name(5)
    with pytest.raises(ValueError):
        t.passwd_by_uid(2**32)
    with pytest.raises(TypeError):
        Table.from_bytes("text, not bytes")
    assert t.passwd_by_name("x" * 300) is None
    t.close()
    t.close()  # twice is fine
    with pytest.raises(ValueError):
        t.passwd_by_name("a")


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(TableError, match="nope"):
        Table.from_files(tmp_path / "nope")
    (tmp_path / "passwd").write_bytes(b"")
    with Table.from_files(tmp_path / "passwd") as t:
        assert t.stats()["users"] == 0
