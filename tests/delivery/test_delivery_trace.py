"""Trace headers (issue 15): the final delivery writes exactly one
`Return-Path` (the envelope sender, RFC 5321 4.4) and one `Delivered-To`
per recipient; a `Return-Path` already in the message (Sendmail's F=P) is
replaced, an earlier hop's `Delivered-To` for another address stays, and
the rest of the message is stored byte for byte, whether pdeliveryd keeps
it in memory or copies it from its spool file."""

import os
import random

import pytest

from delivery import message as msg
from delivery.layout import MailboxLayout
from delivery.maildir import ROOT_MARKER, MaildirWriter
from delivery.message import HEADER_SCAN_MAX
from tests.delivery.test_delivery_streaming import receive, session_script, spooler, stuff
from tests.support.delivery_util import NAME_RE, codes, lmtp_session, messages, one_store

OURS = b"Return-Path: <s@x>\nDelivered-To: juan@x\n"
REST = b"Received: from a by mx (8.17) id 4AbC;\n\tMon, 7 Dec 2026\nSubject: t\n\nReturn-Path: <body@x>\nbody\n"

CASES = [
    # name, the message (CRLF), what follows our trace headers in the stored file (LF)
    ("one Return-Path", b"Return-Path: <mta@x>\r\n" + REST.replace(b"\n", b"\r\n"), REST),
    (
        "two Return-Paths, one folded",
        b"Return-Path: <mta@x>\r\nReturn-Path:\r\n <old@x>\r\n" + REST.replace(b"\n", b"\r\n"),
        REST,
    ),
    (
        "Return-Path lower case, after other fields",
        b"Received: a\r\nreturn-path : <x@y>\r\nSubject: s\r\n\r\nb\r\n",
        b"Received: a\nSubject: s\n\nb\n",
    ),
    (
        "an earlier hop's Delivered-To stays",
        b"Delivered-To: list@lists.example\r\nReturn-Path: <mta@x>\r\nSubject: s\r\n\r\nb\r\n",
        b"Delivered-To: list@lists.example\nSubject: s\n\nb\n",
    ),
    ("none: unchanged", REST.replace(b"\n", b"\r\n"), REST),
    ("no header section", b"\r\nReturn-Path: <body@x>\r\n", b"\nReturn-Path: <body@x>\n"),
    ("only a header, no empty line", b"Return-Path: <a@b>\r\nSubject: s", b"Subject: s"),
]


@pytest.mark.parametrize("name,message,after", CASES, ids=[c[0] for c in CASES])
def test_for_maildir_replaces_return_path(name, message, after):
    assert msg.for_maildir(message, "s@x", "juan@x") == OURS + after


def test_delivered_to_identical_to_ours_is_not_doubled():
    lines = b"Delivered-To: <Juan@X>\nDelivered-To: ana@x\nSubject: s\n\n"
    assert msg.without_replaced_trace(lines, "juan@x") == b"Delivered-To: ana@x\nSubject: s\n\n"
    assert msg.without_replaced_trace(b"Subject: s\n\n", "juan@x") == b"Subject: s\n\n"


def size_suffix(path) -> tuple[int, int]:
    m = NAME_RE.match(os.path.basename(path))
    return int(m.group(6)), int(m.group(7))


@pytest.fixture
def writer(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / ROOT_MARKER).touch()
    return MaildirWriter(MailboxLayout(root))


@pytest.mark.parametrize("name,message,after", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("mode", ["data", "bdat"])
def test_streamed_copy_is_exact_at_any_chunk_edge_in_memory_or_spooled(tmp_path, writer, name, message, after, mode):
    if mode == "data":
        script = session_script(stuff(message if message.endswith(b"\r\n") else message + b"\r\n"), None)
        if not message.endswith(b"\r\n"):
            after += b"\n"
    else:
        script = session_script(b"", [message[:5], message[5:]])
    expected = OURS + after
    rnd = random.Random(name)
    splits = [list(range(1, len(script)))] + [rnd.sample(range(1, len(script)), 9) for _ in range(6)]
    for pieces in splits:
        for memory_max in (0, 9, 1 << 20):
            ev = receive(script, pieces, spooler(tmp_path, memory_max))
            path = writer.deliver("juan", ev.body.stored_with(msg.trace_headers("s@x", "juan@x"), "juan@x"))
            stored = open(path, "rb").read()
            assert stored == expected, (pieces, memory_max)
            assert size_suffix(path) == (len(stored), len(stored) + stored.count(b"\n"))
            ev.body.discard()
            os.unlink(path)


def test_header_section_longer_than_the_scan_keeps_fields_past_it(tmp_path, writer):
    """Only the first HEADER_SCAN_MAX bytes are edited; the copy stays exact."""
    filler = b"X-Filler: " + b"f" * 70 + b"\r\n"
    head = b"Return-Path: <a@b>\r\n" + filler * (HEADER_SCAN_MAX // len(filler) + 10)
    message = head + b"Return-Path: <late@b>\r\n\r\nbody\r\n"
    ev = receive(session_script(stuff(message), None), [1000, 200_000], spooler(tmp_path, 0))
    path = writer.deliver("juan", ev.body.stored_with(msg.trace_headers("s@x", "juan@x"), "juan@x"))
    stored = open(path, "rb").read()
    assert stored == OURS + message[len(b"Return-Path: <a@b>\r\n") :].replace(b"\r\n", b"\n")
    assert size_suffix(path) == (len(stored), len(stored) + stored.count(b"\n"))
    ev.body.discard()


STORE = "127.0.0.33"


def test_pdeliveryd_stores_one_return_path_the_envelope_senders(tmp_path):
    with one_store(tmp_path, STORE) as (_, port):
        data = (
            b"Return-Path: <ana@mx.example>\r\nReturn-Path: <ana@mx.example>\r\n"
            b"Delivered-To: list@lists.example\r\nSubject: two\r\n\r\nbody\r\n"
        )
        big = data + (b"y" * 98 + b"\r\n") * 3000  # past spool_memory_max: from the spool
        for payload in (data, big):
            out = lmtp_session(
                STORE,
                port,
                b"LHLO mx\r\nMAIL FROM:<ana@example.org>\r\n"
                b"RCPT TO:<juan@example.org>\r\nRCPT TO:<ana@example.org>\r\nDATA\r\n" + stuff(payload) + b"QUIT\r\n",
            )
            assert codes(out) == ["220", "250", "250", "250", "250", "354", "250", "250", "221"], out
        layout = MailboxLayout(tmp_path / "root")
        for user in ("juan", "ana"):
            files = messages(layout.path(user))
            assert len(files) == 2
            for f, payload in zip(sorted(files, key=lambda p: os.stat(p).st_size), (data, big)):
                stored = f.read_bytes()
                assert stored.count(b"Return-Path:") == 1 and stored.count(b"Delivered-To:") == 2
                assert stored == (
                    b"Return-Path: <ana@example.org>\nDelivered-To: "
                    + user.encode()
                    + b"@example.org\n"
                    + payload[62:].replace(b"\r\n", b"\n")
                )
                assert size_suffix(f) == (len(stored), len(stored) + stored.count(b"\n"))
