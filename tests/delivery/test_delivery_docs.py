"""The MTA configuration blocks of docs/delivery.md are the files the test
bed and the Sendmail tests run (pwmail/testbed/mailers/): a sysadmin who
copies the docs gets exactly what the tests checked."""

import pathlib
import re

from pwmail.testbed.sendmail import MAILERS

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "delivery.md"


def test_every_documented_block_is_the_shipped_file():
    blocks = dict(re.findall(r"<!-- ([\w-]+) -->\s*```m4\n(.*?)```", DOCS.read_text(), re.S))
    shipped = {p.stem: p.read_text() for p in MAILERS.glob("*.m4")}
    assert (
        set(blocks)
        == set(shipped)
        == {
            "sendmail-mailer",
            "sendmail-mailer-lmtp",
            "sendmail-mailer-direct",
            "sendmail-mailer-proxy",
            "sendmail-mailer-proxy-unix",
        }
    )
    for name, text in blocks.items():
        assert text == shipped[name], f"docs/delivery.md's {name} block differs from {MAILERS / name}.m4"


def test_every_documented_postfix_block_is_the_shipped_file():
    """main.cf and master.cf lines of "Postfix through lmtp-proxy", which
    tests/delivery/test_delivery_postfix.py runs (tests/support/postfix_util.py)."""
    blocks = dict(re.findall(r"<!-- (postfix-[\w-]+\.cf) -->\s*```\n(.*?)```", DOCS.read_text(), re.S))
    shipped = {p.name: p.read_text() for p in MAILERS.glob("postfix-*.cf")}
    assert set(blocks) == set(shipped) == {"postfix-main.cf", "postfix-master.cf"}
    for name, text in blocks.items():
        assert text == shipped[name], f"docs/delivery.md's {name} block differs from {MAILERS / name}"
