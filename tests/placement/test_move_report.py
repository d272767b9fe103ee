"""pwmail placement-report: users, messages and bytes per host from real
files and Maildirs, and from a running pwserver."""

import json
import os
import subprocess

from delivery.layout import MailboxLayout
from delivery.maildir import ROOT_MARKER, MaildirWriter
from pwmail.placement.report import build, imbalance
from tests.support import pwtest
from tests.support.delivery_util import write_users

USERS = {
    "ana": (1, 1, "s1", False),
    "juan": (2, 2, "s1", False),
    "pepe": (3, 3, "s2", True),
    "luis": (4, 4, "s1", False),
}


def setup(tmp_path):
    write_users(tmp_path / "users", USERS)
    roots = {}
    for h in ("s1", "s2"):
        (tmp_path / h).mkdir()
        (tmp_path / h / ROOT_MARKER).touch()
        roots[h] = str(tmp_path / h)
    w1 = MaildirWriter(MailboxLayout(roots["s1"]))
    w1.deliver("ana", b"x" * 100)
    w1.deliver("ana", b"y" * 50)
    w1.deliver("juan", b"z" * 10)
    MaildirWriter(MailboxLayout(roots["s2"])).deliver("pepe", b"p" * 1000)
    MaildirWriter(MailboxLayout(roots["s2"])).deliver("ana", b"stray")  # ana lives on s1
    return roots


def test_report_from_files(tmp_path):
    roots = setup(tmp_path)
    r = subprocess.run(
        [
            str(pwtest.BIN / "pwmail"),
            "placement-report",
            "--passwd",
            str(tmp_path / "users/passwd"),
            "--mailhosts",
            str(tmp_path / "users/mailhosts"),
            "--root",
            f"s1={roots['s1']}",
            "--root",
            f"s2={roots['s2']}",
            "--strays",
            "--json",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PWMAIL_CONF": str(tmp_path / "none.toml")},
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    hosts = {h["host"]: h for h in out["hosts"]}
    assert (hosts["s1"]["users"], hosts["s1"]["mailboxes"], hosts["s1"]["messages"], hosts["s1"]["bytes"]) == (
        3,
        2,
        3,
        160,
    )
    assert (hosts["s2"]["users"], hosts["s2"]["frozen"], hosts["s2"]["messages"], hosts["s2"]["bytes"]) == (
        1,
        1,
        1,
        1000,
    )
    assert out["imbalance"]["users"] == 3 / 2 - 1
    assert [p.split("/")[-1] for _, p in out["strays"]] == ["ana"]


def test_imbalance_uses_weights():
    assert imbalance([100, 100], [1, 1]) == 0
    assert imbalance([200, 100], [2, 1]) == 0
    assert abs(imbalance([150, 50], [1, 1]) - 0.5) < 1e-9


def test_report_from_a_running_server(tmp_path):
    roots = setup(tmp_path)
    with pwtest.PwServer(tmp_path / "users") as pw:
        from pwmail.placement.report import users_from_server

        users = users_from_server(pw.address)
    assert users == {n: (h, False) for n, (_, _, h, _) in USERS.items()}
    rep = build(users, roots, "first3", {})
    assert [(h.host, h.users, h.bytes) for h in rep.hosts] == [("s1", 3, 160), ("s2", 1, 1000)]
    assert "imbalance" in rep.table()
