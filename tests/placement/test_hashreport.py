"""pwmail hash-report: the figures on name lists small enough to check by hand."""

import random
import subprocess

import pytest

from pwmail.placement.hashreport import ALL_SCHEMES, ascii_login, isp_logins, leaf_dir, measure, read_names
from tests.support import pwtest


def test_leaf_dirs_follow_the_layout_and_the_extra_schemes():
    assert leaf_dir("juan", "first3") == "j/u/a"
    assert leaf_dir("juan", "first2last") == "j/u/n"
    assert leaf_dir("juan", "firstlast2") == "j/a/n"
    assert leaf_dir("juan", "first2") == "j/u"
    assert leaf_dir("juan", "last3") == "n/a/u"
    assert leaf_dir("jo", "last3") == "o/j"
    assert len(leaf_dir("juan", "hash2").split("/")) == 2


def test_measure_counts_directories_mean_max_and_cv():
    names = ["juan", "juana", "julio", "ana"]  # first3: j/u/a x2, j/u/l, a/n/a
    s = measure(names, "first3")
    assert (s.dirs, s.largest, s.sizes) == (3, 2, [2, 1, 1])
    assert s.mean == pytest.approx(4 / 3)
    assert s.cv == pytest.approx(((2 - 4 / 3) ** 2 + 2 * (1 - 4 / 3) ** 2) ** 0.5 / 3**0.5 / (4 / 3))
    even = measure(["abc", "abd", "abe"], "first3")
    assert even.cv == 0 and even.dirs == 3


def test_isp_logins_are_ascii_unique_and_usable():
    people = [("Juan", "Pérez"), ("Julia", "Pérez"), ("José", "Núñez"), ("Ana", "De la Cruz")] * 50
    logins = isp_logins(people, random.Random(1))
    assert len(logins) == len(set(logins)) == 200
    assert all(login.isascii() and login[0].isalpha() and len(login) <= 16 for login in logins)
    assert ascii_login("Núñez") == "nunez" and ascii_login("De la Cruz") == "delacruz"
    assert "jperez" in logins


def test_cli_on_a_passwd_file_with_chart(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "passwd").write_text("".join(f"u{i:05d}:x:{i}:1::/:/bin/sh\n" for i in range(3000)))
    png = tmp_path / "fig.png"
    r = subprocess.run(
        [str(pwtest.BIN / "pwmail"), "hash-report", "--users", str(tmp_path / "passwd"), "--png", str(png)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:]
        for line in r.stdout.splitlines()
        if line.startswith("| ") and "scheme" not in line
    }
    assert set(rows) == set(ALL_SCHEMES)
    # u00000..u02999: first3 has three directories (u/0/0, u/0/1, u/0/2) of 1000
    assert rows["first3"][1].strip() == "3" and rows["first3"][3].strip() == "1000"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_names(str(tmp_path / "passwd"))[:2] == ["u00000", "u00001"]


def test_faker_names_when_faker_is_there():
    pytest.importorskip("faker")
    from pwmail.placement.hashreport import faker_names

    names = faker_names("es_AR", 500)
    assert len(names) == len(set(names)) >= 490
    assert measure(names, "hash2").largest <= 5
