"""Each layout scheme against Dovecot's own expansion: a private Dovecot
(no protocols, its own base_dir) whose userdb hands out the documented
`mail=` template; `doveadm user -f mail NAME` must name the directory
MailboxLayout computes."""

import os
import pathlib
import shutil
import subprocess

import pytest

from delivery.layout import DOVECOT_TEMPLATES, SCHEMES, MailboxLayout

NAMES = ["juan", "jo", "j", "ab.c", "pepe-2", "x_y", "a1", "maria.jose", "zz", "Q9x"]

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        not shutil.which("dovecot") or not shutil.which("doveadm"),
        reason="dovecot-core not installed (deps/debian-packages.txt)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="Dovecot's master needs root"),
]


@pytest.fixture
def dovecot(tmp_path):
    started = []

    def start(scheme: str) -> pathlib.Path:
        d = tmp_path / scheme
        (d / "run").mkdir(parents=True)
        (d / "state").mkdir()
        location = MailboxLayout("/srv/mail", scheme).dovecot_location()
        conf = d / "dovecot.conf"
        conf.write_text(f"""base_dir = {d}/run
state_dir = {d}/state
instance_name = pwmail-test-{scheme}
protocols =
listen = 127.0.0.1
log_path = {d}/log
ssl = no
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid=2000 gid=2000 home=/srv/home/%u mail={location}
}}
""")
        subprocess.run(["dovecot", "-c", str(conf)], check=True, timeout=30)
        started.append(conf)
        return conf

    yield start
    for conf in started:
        subprocess.run(["dovecot", "-c", str(conf), "stop"], timeout=30)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_layout_matches_doveadm_expansion(dovecot, scheme):
    conf = dovecot(scheme)
    layout = MailboxLayout("/srv/mail", scheme)
    for name in NAMES:
        r = subprocess.run(
            ["doveadm", "-c", str(conf), "user", "-f", "mail", name], capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 0, r.stderr
        got = r.stdout.strip()
        assert got.startswith("maildir:"), got
        # Dovecot leaves empty levels as "//" and "." as "/./"; the file system folds them
        assert os.path.normpath(got[len("maildir:") :]) == str(layout.path(name)), (scheme, name, got)
    assert DOVECOT_TEMPLATES[scheme] in layout.dovecot_location()
