"""The default placement rule: C (pw_placement.c) == Python (placement.py)
== tests/vectors/placement.json, and the properties docs/placement.md
promises."""

import json
import pathlib
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pwcache.placement import PlacementError, PlacementRule, fnv1a64
from pwcache.table import CRule, Table

VECTORS = json.loads((pathlib.Path(__file__).parents[1] / "vectors" / "placement.json").read_text())


def c_pick(rule: PlacementRule, name: str) -> str | None:
    with CRule(rule) as c:
        i = c.pick(name)
    return None if i < 0 else rule.hosts[i][0]


def test_fnv1a64_known_values():
    for text, value in VECTORS["fnv1a64"].items():
        assert fnv1a64(text.encode()) == int(value, 16)


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: str(c["settings"]))
def test_vectors_python_and_c(case):
    rule = PlacementRule.from_settings(case["settings"])
    for name, host in case["expect"].items():
        assert rule.pick(name) == host, name
        assert c_pick(rule, name) == host, name


def test_ranges_follow_the_paper():
    rule = PlacementRule.from_settings(VECTORS["cases"][0]["settings"])
    assert [rule.pick(n) for n in ("alice", "Carol", "dave", "zoe")] == ["store1", "store1", "store2", "store3"]


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=40), st.lists(st.integers(1, 5), min_size=1, max_size=6))
def test_c_equals_python_for_any_name(name, weights):
    rule = PlacementRule.from_settings({"rule": "hash", "hosts": [f"h{i}:{w}" for i, w in enumerate(weights)]})
    assert c_pick(rule, name) == rule.pick(name)


def test_weights_and_minimal_moves():
    names = [f"user{i}" for i in range(20000)]
    three = PlacementRule.from_settings({"rule": "hash", "hosts": ["a", "b", "c:2"]})
    counts = Counter(three.pick(n) for n in names)
    assert 0.45 < counts["c"] / len(names) < 0.55
    four = PlacementRule.from_settings({"rule": "hash", "hosts": ["a", "b", "c:2", "d"]})
    moved = [n for n in names if three.pick(n) != four.pick(n)]
    assert all(four.pick(n) == "d" for n in moved)  # only to the new host
    assert 0.15 < len(moved) / len(names) < 0.25  # about w_new / sum(w) = 1/5


def test_the_table_applies_the_rule_to_users_without_a_map_entry():
    rule = PlacementRule.from_settings(VECTORS["cases"][4]["settings"])
    names = list(VECTORS["cases"][4]["expect"])[:19]
    passwd = "".join(f"{n}:x:{i}:1::/:/bin/sh\n" for i, n in enumerate(names)).encode()
    with Table.from_bytes(passwd, mailhosts=f"{names[0]} mapped\n".encode(), rule=rule) as t:
        assert t.mailhost(names[0]) == ("mapped", False)
        for n in names[1:]:
            assert t.mailhost(n) == (VECTORS["cases"][4]["expect"][n], False)


@pytest.mark.parametrize(
    "bad",
    [
        {"rule": "nearest"},
        {"rule": "ranges", "ranges": ["a-c"]},
        {"rule": "ranges", "ranges": ["c-a s1"]},
        {"rule": "hash", "hosts": ["s1:0"]},
        {"rule": "hash", "hosts": ["s1:x"]},
        {"rule": "hash", "hosts": "s1"},
    ],
)
def test_bad_settings_are_refused(bad):
    with pytest.raises(PlacementError):
        PlacementRule.from_settings(bad)
