"""pdelivery end to end: real pwserver, real pdeliveryd on two storage
addresses (127.0.0.2, 127.0.0.3) sharing one LMTP port, sysexits only."""

import re
import shutil
import subprocess

import pytest

from delivery.layout import MailboxLayout
from tests.support import pwtest
from tests.support.delivery_util import Pdeliveryd, client_conf, codes, env_with, free_port_on, messages, write_users
from tests.system.test_examples import EXAMPLES, uncommented_settings

STORES = ["127.0.0.2", "127.0.0.3"]
MSG = b"From: a@example.org\nSubject: via pdelivery\n\nhello\n.\n..two dots\n"


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    d = tmp_path_factory.mktemp("pdelivery")
    users = write_users(d / "users")
    port = free_port_on(STORES)
    settings = d / "pwmail.toml"
    settings.write_text(f"[delivery]\nlmtp_port = {port}\nconnect_timeout = 2.0\n")
    with pwtest.PwServer(users) as pw:
        conf = client_conf(d / "pwserver.conf", [pw.address])
        env = env_with(conf, settings)
        b = {
            "d": d,
            "env": env,
            "port": port,
            "conf": conf,
            "settings": settings,
            "l2": MailboxLayout(d / "store2"),
            "l3": MailboxLayout(d / "store3"),
        }
        try:
            b["s2"] = Pdeliveryd(d / "store2", STORES[0], port, env)
            b["s3"] = Pdeliveryd(d / "store3", STORES[1], port, env)
            yield b
        finally:
            for key in ("s2", "s3"):  # the current ones: a test may have restarted them
                if key in b:
                    b[key].stop()


def pdelivery(bed, *args, stdin=MSG, env=None):
    return subprocess.run(
        [str(pwtest.BIN / "pdelivery"), *args], input=stdin, capture_output=True, env=env or bed["env"], timeout=60
    )


def test_routes_each_user_to_its_mailhost(bed):
    r = pdelivery(bed, "-f", "a@example.org", "-i", "4AU1Q1", "-d", "juan")
    assert r.returncode == 0, r.stderr
    r = pdelivery(bed, "-f", "a@example.org", "-i", "4AU1Q2", "-d", "jo")
    assert r.returncode == 0, r.stderr
    [f] = messages(bed["l2"].path("juan"))
    assert f.read_bytes() == b"Return-Path: <a@example.org>\nDelivered-To: juan\n" + MSG
    assert len(messages(bed["l3"].path("jo"))) == 1
    assert not bed["l3"].path("juan").exists() and not bed["l2"].path("jo").exists()


def test_unknown_user_is_67_with_511(bed):
    r = pdelivery(bed, "-f", "a@x", "-d", "nadie")
    assert r.returncode == 67 and b"5.1.1" in r.stderr


def test_frozen_mailbox_is_75(bed):
    r = pdelivery(bed, "-f", "a@x", "-d", "mudando")
    assert r.returncode == 75 and b"4.2.1" in r.stderr


def test_pwserver_down_is_75(bed, tmp_path):
    conf = client_conf(tmp_path / "dead.conf", ["127.0.0.1:9"], timeout_ms=200)
    r = pdelivery(bed, "-f", "a@x", "-d", "juan", env=env_with(conf, bed["settings"]))
    assert r.returncode == 75 and b"4.4.3" in r.stderr


def test_usage_errors_stay_in_sysexits(bed):
    assert pdelivery(bed, "-d").returncode == 75
    assert pdelivery(bed, "--bogus").returncode == 75
    assert pdelivery(bed, "-l", "juan").returncode == 75


def test_lmtp_port_flag_overrides_settings(bed):
    r = pdelivery(bed, "--lmtp-port", "9", "-f", "a@x", "-d", "juan")
    assert r.returncode == 75 and b"4.4.1" in r.stderr


def test_storage_down_then_retry_delivers_once(bed):
    """Two users on two hosts, one host down: 75; retry after it returns:
    the copy already stored is acknowledged, not stored twice."""
    n_ana, n_pepe = len(messages(bed["l2"].path("ana"))), len(messages(bed["l3"].path("pepe")))
    bed["s3"].stop()
    try:
        r = pdelivery(bed, "-f", "a@x", "-i", "4AU1Q9", "-d", "ana", "pepe")
        assert r.returncode == 75 and b"pepe" in r.stderr
        assert len(messages(bed["l2"].path("ana"))) == n_ana + 1
    finally:
        bed["s3"] = Pdeliveryd(bed["d"] / "store3", STORES[1], bed["port"], bed["env"], init_root=False)
    r = pdelivery(bed, "-f", "a@x", "-i", "4AU1Q9", "-d", "ana", "pepe")
    assert r.returncode == 0, r.stderr
    assert len(messages(bed["l2"].path("ana"))) == n_ana + 1
    assert len(messages(bed["l3"].path("pepe"))) == n_pepe + 1


def test_lmtp_mode_per_recipient(bed):
    script = (
        b"LHLO mx.example\r\nMAIL FROM:<a@x>\r\nRCPT TO:<juan>\r\nRCPT TO:<nadie>\r\n"
        b"RCPT TO:<mudando>\r\nRCPT TO:<pepe>\r\nDATA\r\nSubject: l\r\n\r\nvia -l\r\n.\r\nQUIT\r\n"
    )
    n_juan, pepe_before = len(messages(bed["l2"].path("juan"))), set(messages(bed["l3"].path("pepe")))
    r = pdelivery(bed, "-l", stdin=script)
    assert r.returncode == 0, r.stderr
    assert codes(r.stdout) == ["220", "250", "250", "250", "550", "450", "250", "354", "250", "250", "221"]
    assert len(messages(bed["l2"].path("juan"))) == n_juan + 1
    # the new file, found by difference: Maildir names do not sort by time
    (new,) = set(messages(bed["l3"].path("pepe"))) - pepe_before
    assert new.read_bytes().endswith(b"Subject: l\n\nvia -l\n")


def test_placement_rule_when_the_server_names_no_host(bed, tmp_path):
    """A password server with no mailhosts map and no rule answers an empty
    host: pdelivery then applies [placement] itself (docs/placement.md)."""
    users = tmp_path / "users"
    users.mkdir()
    (users / "passwd").write_text((bed["d"] / "users" / "passwd").read_text())
    settings = tmp_path / "pwmail.toml"
    settings.write_text(
        f"[delivery]\nlmtp_port = {bed['port']}\n\n"
        f'[placement]\nrule = "ranges"\nranges = ["a-i {STORES[1]}", "j-z {STORES[0]}"]\n'
    )
    with pwtest.PwServer(users, env={"PWMAIL_CONF": str(tmp_path / "absent.toml")}) as pw:
        with pw.client() as c:
            assert c.passwd_by_name("ana").mailhost == ""
        conf = client_conf(tmp_path / "pw.conf", [pw.address])
        n_ana3 = len(messages(bed["l3"].path("ana")))
        n_pepe2 = len(messages(bed["l2"].path("pepe")))
        for user in ("ana", "pepe"):
            r = pdelivery(bed, "-f", "a@x", "-d", user, env=env_with(conf, settings))
            assert r.returncode == 0, r.stderr
    assert len(messages(bed["l3"].path("ana"))) == n_ana3 + 1  # a-i -> 127.0.0.3
    assert len(messages(bed["l2"].path("pepe"))) == n_pepe2 + 1  # j-z -> 127.0.0.2


def _all_counts(bed):
    return {(s, u): len(messages(bed[s].path(u))) for s in ("l2", "l3") for u in ("juan", "pepe", "ana", "jo")}


@pytest.mark.parametrize(
    "args",
    [
        ["-f", "a@x", "-d", "juan@x>\r\nRCPT TO:<pepe"],
        ["-f", "a@x>\r\nRCPT TO:<pepe>", "-d", "juan"],
        ["-f", "a@x", "-i", "Q1\r\nRCPT TO:<pepe>", "-d", "juan"],
        ["-f", "a@x", "-d", "ju\x01an"],
    ],
    ids=["-d", "-f", "-i", "control"],
)
def test_injection_in_arguments_is_64_and_delivers_nothing(bed, args):
    before = _all_counts(bed)
    r = pdelivery(bed, *args)
    assert r.returncode == 64, r.stderr
    assert r.stderr.count(b"\n") == 1 and r.stderr.startswith(b"pdelivery: ")
    assert _all_counts(bed) == before


def test_injection_in_lmtp_input_is_501_and_64(bed):
    before = _all_counts(bed)
    r = pdelivery(bed, "-l", stdin=b"LHLO mx\r\nMAIL FROM:<a@x>\r\nRCPT TO:<juan\x00>\r\nDATA\r\nQUIT\r\n")
    assert r.returncode == 64 and codes(r.stdout) == ["220", "250", "250", "501", "554", "221"]
    r = pdelivery(bed, "-l", "-i", "Q\rX", stdin=b"QUIT\r\n")
    assert r.returncode == 64 and r.stdout == b""
    assert _all_counts(bed) == before


# ---- the C program: the Python one's behaviour, at a fraction of the cost --------------


def python_pdelivery(bed, *args, stdin=MSG, env=None):
    """delivery/pdelivery.py, the reference the C program must match."""
    return subprocess.run(
        [str(pwtest.BIN / "python"), "-m", "delivery.pdelivery", *args],
        input=stdin,
        capture_output=True,
        env=env or bed["env"],
        timeout=60,
    )


def test_pdelivery_on_path_is_the_c_program():
    """No interpreter starts per message (issue 15: 135 ms of imports a run)."""
    assert (pwtest.BIN / "pdelivery").read_bytes()[:4] == b"\x7fELF"


def _normalized(out: bytes) -> list[bytes]:
    """The replies, with what differs between any two runs taken out: host
    names (getfqdn and gethostname may differ) and the stores' file names."""
    lines = out.split(b"\r\n")
    for i, line in enumerate(lines):
        if line.startswith(b"220 ") or (line.startswith(b"250-") and lines[i + 1 : i + 2] == [b"250-PIPELINING"]):
            lines[i] = line[:4] + b"HOST"
        lines[i] = re.sub(rb"^(250 2\.0\.0 \S+ delivered) .*", rb"\1", lines[i])
    return lines


LMTP_SCRIPTS = {
    "deliver": b"LHLO x\r\nMAIL FROM:<a@x> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<juan>\r\nRCPT TO:<Pepe+t@example.org>\r\n"
    b"RCPT TO:<nadie@x>\r\nRCPT TO:<mudando>\r\nDATA\r\n..leading dot\r\nbody\r\n.\r\nQUIT\r\n",
    "errors": b"HELO x\r\nMAIL FROM:<a@x>\r\nLHLO\r\nLHLO x\r\nRCPT TO:<juan>\r\nMAIL FROM:<a@x> FOO=1\r\n"
    b"MAIL FROM:<a@x> SIZE=999999999999\r\nMAIL FROM:<a@x> BODY=9BIT\r\nMAIL FROM:<a@x> XQUEUEID=Q1\r\n"
    b"MAIL FROM:<b@x>\r\nRCPT TO:<juan> NOTIFY=NEVER\r\nRCPT TO:<>\r\nRCPT juan\r\nDATA x\r\nNOOP\r\n"
    b"VRFY juan\r\nHELP\r\nRSET\r\nDATA\r\nbogus\r\nNOOP \xff\r\nRCPT TO:<@route:juan>\r\nQUIT\r\n",
    "bdat": b"LHLO x\r\nMAIL FROM:<a@x>\r\nRCPT TO:<jo>\r\nBDAT 7\r\nchunked\r\nBDAT 2 LAST\r\n\r\nQUIT\r\n",
    "bdat-no-rcpt": b"LHLO x\r\nMAIL FROM:<a@x>\r\nBDAT 3 LAST\r\nabcQUIT\r\n",
    "bad-bdat": b"LHLO x\r\nBDAT abc\r\nQUIT\r\n",
    "too-many-errors": b"LHLO x\r\n" + b"x\r\n" * 25,
    "long-line": b"LHLO x\r\n" + b"N" * 3000 + b"\r\nQUIT\r\n",
    "bad-queue-id": b"LHLO x\r\nMAIL FROM:<a@x> XQUEUEID=Q!1\r\nRCPT TO:<juan>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
    "bad-sender": b"LHLO x\r\nMAIL FROM:<a\x01b@x>\r\nRCPT TO:<juan>\r\nRCPT TO:<ju an>\r\nDATA\r\nQUIT\r\n",
    "eof-in-data": b"LHLO x\r\nMAIL FROM:<a@x>\r\nRCPT TO:<juan>\r\nDATA\r\nnever ended\r\n",
    "no-quit": b"LHLO x\r\nNOOP\r\n",
}


@pytest.mark.parametrize("script", LMTP_SCRIPTS.values(), ids=LMTP_SCRIPTS.keys())
def test_lmtp_mode_answers_as_the_python_one(bed, script):
    want, got = python_pdelivery(bed, "-l", stdin=script), pdelivery(bed, "-l", stdin=script)
    assert (got.returncode, _normalized(got.stdout)) == (want.returncode, _normalized(want.stdout)), got.stderr


ARGVS = {
    "no-user": ["-d"],
    "bogus-flag": ["--bogus"],
    "both-modes": ["-dl"],
    "lmtp-with-user": ["-l", "juan"],
    "space-in-sender": ["-f", "a b", "-d", "juan"],
    "null-sender": ["-f", "<>", "-d", "<juan>"],
    "long-user": ["-d", "x" * 600],
    "long-queue-id": ["-i", "a" * 129, "-d", "juan"],
    "queue-id-grammar": ["-i", "Q-1.a_b", "-d", "nadie"],
    "port-flag": ["-d", "juan", "--lmtp-port=9"],
    "port-prefix": ["--lmtp-p", "9", "-d", "juan"],
    "ambiguous-prefix": ["--l", "9", "-d", "juan"],
    "no-break-space": ["-d", "juan\u00a0x"],
    "dot-user": ["-d", ".hidden"],
    "slash-user": ["-d", "ju/an"],
    "two-ats": ["-d", "a@b@c"],
    "attached-values": ["-fa@x", "-iQ77", "-d", "jo", "juan"],
    "delimiter": ["-d", "Juan+tag@example.org"],
    "bad-port": ["--lmtp-port", "x", "-d", "juan"],
    "empty-user": ["-d", ""],
    "flags-after-users": ["-d", "juan", "-f", "a@x"],
    "users-on-both-sides": ["juan", "-d", "pepe"],
    "users-split-by-a-flag": ["-d", "juan", "-f", "a@x", "pepe"],
    "double-dash": ["-f", "a@x", "-d", "--", "jo"],
}


@pytest.mark.parametrize("argv", ARGVS.values(), ids=ARGVS.keys())
def test_arguments_give_the_exit_codes_of_the_python_one(bed, argv):
    want, got = python_pdelivery(bed, *argv), pdelivery(bed, *argv)
    assert got.returncode == want.returncode, (got.stderr, want.stderr)
    if got.returncode == 64:
        assert got.stderr.count(b"\n") == 1 and got.stderr.startswith(b"pdelivery: 5.5.4 ")


LIMITED = {  # scripts against small limits (settings below), each over one of them
    "size": b"LHLO x\r\nMAIL FROM:<a@x> SIZE=101\r\nMAIL FROM:<a@x>\r\nRCPT TO:<juan>\r\nDATA\r\n"
    + b"0123456789\r\n" * 20
    + b".\r\nQUIT\r\n",
    "size-bdat": b"LHLO x\r\nMAIL FROM:<a@x>\r\nRCPT TO:<juan>\r\nBDAT 150 LAST\r\n" + b"b" * 150 + b"QUIT\r\n",
    "line": b"LHLO x\r\nMAIL FROM:<a@x>\r\nRCPT TO:<juan>\r\nDATA\r\n" + b"L" * 30 + b"\r\n.\r\nQUIT\r\n",
    "recipients": b"LHLO x\r\nMAIL FROM:<a@x>\r\nRCPT TO:<juan>\r\nRCPT TO:<jo>\r\nRCPT TO:<ana>\r\nRSET\r\nQUIT\r\n",
    "command-line": b"LHLO x\r\nNOOP " + b"n" * 70 + b"\r\nNOOP\r\nQUIT\r\n",
    "unended-line": b"LHLO x\r\n" + b"n" * 70,
    "bad-commands": b"LHLO x\r\nx\r\ny\r\nz\r\nNOOP\r\n",
}


@pytest.mark.parametrize("script", LIMITED.values(), ids=LIMITED.keys())
def test_limits_are_the_python_ones(bed, tmp_path, script):
    settings = tmp_path / "pwmail.toml"
    settings.write_text(
        f"[delivery]\nlmtp_port = {bed['port']}\nmessage_size_max = 100\nmessage_line_max = 20\n"
        "recipients_max = 2\ncommand_line_max = 64\nbad_commands_max = 3\n"
    )
    env = env_with(bed["conf"], settings)
    want, got = python_pdelivery(bed, "-l", stdin=script, env=env), pdelivery(bed, "-l", stdin=script, env=env)
    assert (got.returncode, _normalized(got.stdout)) == (want.returncode, _normalized(want.stdout)), got.stderr
    big = pdelivery(bed, "-f", "a@x", "-d", "juan", stdin=b"x" * 101, env=env)
    assert big.returncode == python_pdelivery(bed, "-f", "a@x", "-d", "juan", stdin=b"x" * 101, env=env).returncode
    assert big.returncode == 67 and b"552 5.3.4" in big.stderr


BAD_SETTINGS = {
    "unknown-key": ("[delivery]\nlmtp_prot = 24\n", "lmtp_prot"),
    "wrong-type": ('[delivery]\nlmtp_port = "24"\n', "lmtp_port"),
    "port-range": ("[delivery]\nlmtp_port = 70000\n", "lmtp_port"),
    "bad-timeout": ("[delivery]\ntimeout = -1\n", "timeout"),
    "not-toml": ("[delivery\nlmtp_port = 24\n", "line 1"),
    "twice": ("[delivery]\nlmtp_port = 24\nlmtp_port = 25\n", "lmtp_port"),
    "placement-rule": ('[placement]\nrule = "modulo"\n', "rule"),
    "placement-range": ('[placement]\nranges = ["a-z"]\n', "ranges"),
    "unterminated": ('[delivery]\nmailhost_suffix = "x\n', "line 2"),
    "sub-table": ("[delivery.extra]\nx = 1\n", "[delivery.extra]"),
    "dotted-key": ("[delivery]\nlmtp.port = 24\n", "lmtp"),
    "list-of-numbers": ("[placement]\nrule = 'hash'\nhosts = [1, 2]\n", "hosts"),
}


@pytest.mark.parametrize("text,key", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_settings_errors_are_78_naming_file_and_key(bed, tmp_path, text, key):
    settings = tmp_path / "pwmail.toml"
    settings.write_text(text)
    for args in (["-f", "a@x", "-d", "juan"], ["-l"]):
        r = pdelivery(bed, *args, env=env_with(bed["conf"], settings), stdin=b"QUIT\r\n")
        assert r.returncode == 78, r.stderr
        line = r.stderr.decode()
        assert str(settings) in line and key in line and r.stdout == b""


def test_other_sections_may_use_all_of_toml(bed, tmp_path):
    """Only [delivery], [placement] and [hosts] are read; the others are skipped,
    whatever TOML they hold (inline tables, multi-line strings and arrays)."""
    settings = tmp_path / "pwmail.toml"
    settings.write_text(
        '# the site\'s settings\n[pop]\nbackends = { store1 = "10.1.0.11:110", "store 2" = { a = [1, [2]] } }\n'
        'banner = """two\nlines "" \\""""\nmotd = \'\'\'raw\nstring\'\'\'\nwhen = 1979-05-27T07:32:00Z\n'
        '[[move.jobs]]\nname = "x"\n'
        f"[delivery]  # ours\nlmtp_port = {bed['port']}\nconnect_timeout = 2\n"
        'mailhost_names = [\n  "a", # one\n  "b",\n]\n'
        'mailhost_suffix = "\\u0000"\n'.replace('"\\u0000"', '""')
        + "[placement]\nrule = \"ranges\"\nranges = ['a-z 127.0.0.2']\n"
    )
    n = len(messages(bed["l3"].path("jo")))
    r = pdelivery(bed, "-f", "a@x", "-d", "jo", env=env_with(bed["conf"], settings))
    assert r.returncode == 0, r.stderr
    assert len(messages(bed["l3"].path("jo"))) == n + 1
    assert python_pdelivery(bed, "-f", "a@x", "-d", "jo", env=env_with(bed["conf"], settings)).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is in deps/debian-packages.txt")
def test_valgrind_memcheck_clean(bed, tmp_path):
    bad_settings = tmp_path / "pwmail.toml"
    bad_settings.write_text("[delivery]\nlmtp_port = 24\n[placement]\nrule = 'hash'\nhosts = ['a:x']\n")
    hosts = tmp_path / "hosts.toml"  # the [hosts] reader: inline tables kept, then freed
    hosts.write_text(
        "[delivery]\nlmtp_port = 9\n[hosts]\n"
        f'"127.0.0.2" = {{ address = "127.0.0.2", lmtp = {bed["port"]}, pop = 110 }}\n'
        '"127.0.0.3" = "127.0.0.3"\n[pop]\nbackends = { a = { b = [1, { c = 2 }] } }\n'
    )
    bad_hosts = tmp_path / "bad-hosts.toml"
    bad_hosts.write_text('[hosts]\nstore1 = { address = "10.0.0.1", lmtp = 1, lmtp = 2, x = { y = 1 } }\n')
    runs = [
        (["-f", "a@x", "-i", "VG1", "-d", "juan", "pepe", "nadie"], MSG, bed["env"], 67),
        (["-f", "a@x", "-d", "mudando"], MSG, bed["env"], 75),
        (["-l", "-i", "VG2"], LMTP_SCRIPTS["deliver"], bed["env"], 0),
        (["-l"], LMTP_SCRIPTS["errors"] + LMTP_SCRIPTS["bdat"], bed["env"], 0),
        (["-f", "a@x>", "-d", "juan"], MSG, bed["env"], 64),
        (["-d", "juan"], MSG, env_with(bed["conf"], bad_settings), 78),
        (["-f", "a@x", "-i", "VG3", "-d", "juan"], MSG, env_with(bed["conf"], hosts), 0),
        (["-d", "juan"], MSG, env_with(bed["conf"], bad_hosts), 78),
    ]
    for args, stdin, env, code in runs:
        r = subprocess.run(
            [
                "valgrind",
                "-q",
                "--error-exitcode=99",
                "--leak-check=full",
                "--errors-for-leak-kinds=definite,indirect",
                "--track-fds=no",
                str(pwtest.BIN / "pdelivery"),
                *args,
            ],
            input=stdin,
            env=env,
            capture_output=True,
            timeout=300,
        )
        assert r.returncode == code, (args, r.stderr[-3000:])


@pytest.mark.parametrize("live", [False, True], ids=["as-installed", "every-key-live"])
def test_the_example_settings_are_accepted(bed, tmp_path, live):
    """examples/pwmail.toml, as installed (all commented) and with every key
    of every section at its default (the C program knows each [delivery]
    key of delivery/config.py, pdeliveryd's too)."""
    settings = tmp_path / "pwmail.toml"
    settings.write_text(uncommented_settings() if live else (EXAMPLES / "pwmail.toml").read_text())
    n = len(messages(bed["l2"].path("ana")))
    r = pdelivery(bed, "--lmtp-port", str(bed["port"]), "-f", "a@x", "-d", "ana", env=env_with(bed["conf"], settings))
    assert r.returncode == 0, r.stderr
    assert len(messages(bed["l2"].path("ana"))) == n + 1
