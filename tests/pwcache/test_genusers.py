"""`pwmail gen-users`: the files are well formed, names are realistic and
unique, every hash is a real crypt(3) hash of the listed password, and the
mailhosts agree with the server's default rule."""

import ctypes
import re
import subprocess

from pwcache.placement import PlacementRule
from tests.support.pwtest import BIN


def test_generated_files(tmp_path):
    out = tmp_path / "users"
    r = subprocess.run(
        [str(BIN / "pwmail"), "gen-users", "2000", "--out", str(out), "--hosts", "store1,store2:3", "--groups", "20"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    passwd = [line.split(":") for line in (out / "passwd").read_text().splitlines()]
    shadow = {f[0]: f for f in (line.split(":") for line in (out / "shadow").read_text().splitlines())}
    passwords = dict(line.split(" ", 1) for line in (out / "passwords").read_text().splitlines())
    mailhosts = dict(line.split() for line in (out / "mailhosts").read_text().splitlines() if not line.startswith("#"))
    groups = [line.split(":") for line in (out / "group").read_text().splitlines()]

    names = [f[0] for f in passwd]
    assert len(names) == len(set(names)) == 2000
    assert all(re.fullmatch(r"[a-z][a-z]+[0-9]*", n) and 8 <= len(n) <= 12 for n in names)
    assert [int(f[2]) for f in passwd] == list(range(10000, 12000))
    assert all(len(f) == 7 and f[1] == "x" for f in passwd)
    assert set(shadow) == set(names) == set(passwords) == set(mailhosts)

    lib = ctypes.CDLL("libcrypt.so.1")
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    kinds = set()
    for name in names[:40]:
        h = shadow[name][1]
        kinds.add(h.split("$")[1])
        assert lib.crypt(passwords[name].encode(), h.encode()).decode() == h
        assert lib.crypt(b"wrong", h.encode()).decode() != h
    assert kinds == {"y", "6"}  # yescrypt and sha512-crypt

    rule = PlacementRule("hash", (("store1", 1.0), ("store2", 3.0)))
    assert all(mailhosts[n] == rule.pick(n) for n in names[:300])
    share = sum(1 for n in names if mailhosts[n] == "store2") / len(names)
    assert 0.68 < share < 0.82  # weight 3 of 4

    assert groups[0][:3] == ["mailusers", "x", "10000"]
    members = [m for g in groups[1:] for m in g[3].split(",") if m]
    assert 1000 < len(members) < 4000 and set(members) <= set(names)


def test_same_seed_same_names(tmp_path):
    for d in ("a", "b"):
        subprocess.run(
            [str(BIN / "pwmail"), "gen-users", "50", "--out", str(tmp_path / d)], check=True, capture_output=True
        )

    def first(d):
        return [line.split(":")[0] for line in (tmp_path / d / "passwd").read_text().splitlines()]

    assert first("a") == first("b")


def test_bad_arguments(tmp_path):
    r = subprocess.run([str(BIN / "pwmail"), "gen-users", "0", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "between" in r.stderr
    r = subprocess.run(
        [str(BIN / "pwmail"), "gen-users", "5", "--out", str(tmp_path), "--hosts", ","], capture_output=True, text=True
    )
    assert r.returncode == 1 and "no host" in r.stderr
