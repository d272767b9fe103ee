"""pdeliveryd streams message data to disk (issue 13, item 5): memory per
session is bounded by buffers, not by the message; what is stored is byte
for byte what the in-memory writer stored, whatever the chunk edges; a
message over the size limit leaves nothing behind."""

import asyncio
import errno
import hashlib
import os
import random
import re
import socket
import threading

import pytest

from delivery import config as dconfig
from delivery import message as msg
from delivery import spool
from delivery.layout import MailboxLayout
from delivery.lmtp import CLOSED, NEED_DATA, LMTPServerConnection, MessageReceived, RcptRequest, Reply
from delivery.maildir import ROOT_MARKER, MaildirWriter, StorageFull, StorageUnavailable
from delivery.pdeliveryd import session_memory_bound
from delivery.replies import R_LOCAL_ERROR, R_STORAGE_DOWN, R_STORAGE_FULL
from delivery.spool import SpooledBody, open_unnamed
from delivery.store import MailStore
from delivery.users import Recipient
from tests.support import pwtest
from tests.support.delivery_util import (
    NAME_RE,
    Pdeliveryd,
    client_conf,
    codes,
    env_with,
    free_port_on,
    messages,
    write_users,
)

STORE = "127.0.0.31"
SESSIONS = 4
BIG = 50 * 1024 * 1024 + 12345
PROCESS_SLACK = 16 * 1024 * 1024  # the session at work's copies, threads started, allocator arenas

ACCEPT = Reply(250, "2.1.5", "ok")


# -- the old writer, for reference ------------------------------------------
def old_data_from_stuffed(stuffed: bytes) -> bytes:
    """The message the old machine (whole message in memory) took from the
    DATA stream `stuffed` (everything after the 354, terminator included)."""
    body = b"\r\n" + stuffed
    end = body.find(b"\r\n.\r\n")
    return body[: end + 2].replace(b"\r\n..", b"\r\n.")[2:]


def size_suffix(path) -> tuple[int, int]:
    m = NAME_RE.match(os.path.basename(path))
    return int(m.group(6)), int(m.group(7))


# -- the machine and the spool, fed in pieces -------------------------------
def session_script(payload: bytes, bdat_chunks: list[bytes] | None) -> bytes:
    script = b"LHLO mx\r\nMAIL FROM:<s@x>\r\nRCPT TO:<juan@x>\r\n"
    if bdat_chunks is None:
        return script + b"DATA\r\n" + payload + b"QUIT\r\n"
    for i, c in enumerate(bdat_chunks):
        last = b" LAST" if i == len(bdat_chunks) - 1 else b""
        script += b"BDAT %d%s\r\n" % (len(c), last) + c
    return script + b"QUIT\r\n"


def spooler(spool_dir, memory_max: int):
    """A body factory: SpooledBody with its spool files in `spool_dir`."""
    return lambda: SpooledBody(lambda: open_unnamed(spool_dir), memory_max)


def receive(script: bytes, pieces: list[int], new_body) -> MessageReceived:
    """Feed `script` cut at `pieces`; the message, its body from new_body()."""
    conn = LMTPServerConnection("h", new_body=new_body)
    cuts = [0, *sorted(pieces), len(script)]
    feed = [script[a:b] for a, b in zip(cuts, cuts[1:])]
    got = None
    while (ev := conn.next_event()) is not CLOSED:
        if ev is NEED_DATA:
            conn.data_to_send()
            conn.receive_data(feed.pop(0) if feed else b"")
        elif isinstance(ev, RcptRequest):
            conn.answer_rcpt(ACCEPT)
        elif isinstance(ev, MessageReceived):
            got = ev
            return got  # before answer_message(), which releases the body
    raise AssertionError("no message")


TRICKY = [
    # name, the message as the client means it (LF or CRLF as given)
    ("crlf everywhere", b"Subject: a\r\n\r\n" + b"line\r\n" * 40),
    ("dot-stuffed lines", b"Subject: d\r\n\r\n..\r\n...x\r\n..\r\n.a\r\n" * 7),
    ("bare LF and lone CR", b"Subject: b\n\nbare\nlf\r\rcr\r\r\nmix\n\r\n"),
    ("NUL bytes", b"Subject: n\r\n\r\n" + b"\x00\x00\r\n\x00\r\x00\n" * 9 + b"\x00\r\n"),
    ("terminator look-alikes", b"Subject: t\r\n\r\n.\r\r\n.\r.\r\n. \r\nx.\r\n..\r\r\n\r\n\r\n"),
    ("long line", b"Subject: l\r\n\r\n" + b"y" * 3000 + b"\r\n"),
]


def stuff(message: bytes) -> bytes:
    """The DATA stream for `message` (CRLF-ended): dots doubled, terminator."""
    body = b"\r\n" + message
    return body.replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


@pytest.mark.parametrize("name,message", TRICKY, ids=[t[0] for t in TRICKY])
@pytest.mark.parametrize("mode", ["data", "bdat"])
def test_stored_bytes_and_sizes_match_the_old_writer_at_any_chunk_edge(tmp_path, name, message, mode):
    root = tmp_path / "root"
    root.mkdir()
    (root / ROOT_MARKER).touch()
    writer = MaildirWriter(MailboxLayout(root))
    if mode == "data":
        payload = stuff(message)
        script = session_script(payload, None)
        expected_data = old_data_from_stuffed(payload)
    else:
        half = len(message) // 2
        script = session_script(b"", [message[:half], message[half:]])
        expected_data = message
    assert expected_data == message
    trace = msg.trace_headers("s@x", "juan@x")
    old = writer.deliver("juan", msg.for_maildir(expected_data, "s@x", "juan@x"))
    old_bytes = open(old, "rb").read()
    rnd = random.Random(f"{name}-{mode}")
    splits = [list(range(1, len(script)))]  # byte by byte
    splits += [rnd.sample(range(1, len(script)), rnd.randint(1, 40)) for _ in range(12)]
    for pieces in splits:
        for memory_max in (0, 7, 1 << 20):  # spooled at once, soon, never
            ev = receive(script, pieces, spooler(tmp_path, memory_max))
            body = ev.body
            assert body.error is None
            assert body.spooled == (memory_max < len(old_bytes) - len(trace))
            new = writer.deliver("juan", body.stored_with(trace, "juan@x"))
            assert open(new, "rb").read() == old_bytes
            assert size_suffix(new) == size_suffix(old)
            assert body.size == len(expected_data) and body.digest() == msg.digest(expected_data)
            assert msg.header_section(body.head) == msg.header_section(expected_data)
            assert body.longest_line == msg.max_line_length(expected_data)
            body.discard()
            os.unlink(new)


def test_any_data_stream_unstuffs_as_the_old_machine_did(tmp_path):
    """Random DATA streams of the bytes that matter (CR, LF, dots, NUL),
    sloppy clients' unstuffed dots included, cut anywhere."""
    rnd = random.Random(5)
    for _ in range(300):
        raw = bytes(rnd.choice(b"\r\n.\r\n.x\x00") for _ in range(rnd.randint(0, 60))) + b"\r\n.\r\n"
        expected = old_data_from_stuffed(raw)
        script = session_script(raw, None)
        pieces = rnd.sample(range(1, len(script)), rnd.randint(1, min(30, len(script) - 1)))
        ev = receive(script, pieces, spooler(tmp_path, rnd.choice([0, 5, 1 << 20])))
        assert ev.body.size == len(expected) and ev.body.digest() == msg.digest(expected), raw
        assert ev.body.lf_size == len(expected.replace(b"\r\n", b"\n"))
        assert ev.body.newlines == expected.count(b"\n")
        fd = open_unnamed(tmp_path)
        try:
            ev.body.write_to(fd)
            assert os.pread(fd, 1000, 0) == expected.replace(b"\r\n", b"\n"), raw
        finally:
            os.close(fd)
            ev.body.discard()


def test_bdat_without_final_newline_and_cr_at_the_chunk_edge(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / ROOT_MARKER).touch()
    writer = MaildirWriter(MailboxLayout(root))
    message = b"Subject: e\r\n\r\nends with a CR\r\n...no final line end\r"
    chunks = [b"Subject: e\r", b"\n\r\nends with a CR\r", b"\n...no final line end\r"]
    ev = receive(session_script(b"", chunks), [], spooler(tmp_path, 0))
    new = writer.deliver("juan", ev.body.stored_with(msg.trace_headers("s@x", "juan@x"), "juan@x"))
    old = writer.deliver("juan", msg.for_maildir(message, "s@x", "juan@x"))
    assert open(new, "rb").read() == open(old, "rb").read()
    assert open(new, "rb").read().endswith(b"\n...no final line end\r")
    assert size_suffix(new) == size_suffix(old)


@pytest.mark.parametrize("refused", [[], ["_copy_file_range"], ["_copy_file_range", "_sendfile"]])
def test_spool_copy_falls_back_when_the_kernel_cannot_copy(tmp_path, monkeypatch, refused):
    for name in refused:

        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(spool, name, refuse)
    data = bytes(random.Random(1).randbytes(3 * spool.COPY_CHUNK + 17))
    src = open_unnamed(tmp_path)
    dst = open_unnamed(tmp_path)
    try:
        spool.write_all(src, data)
        spool.write_all(dst, b"trace\n")
        spool.copy_range(src, dst, len(data) - 5, 5)
        assert os.pread(dst, len(data) + 100, 0) == b"trace\n" + data[5:]
    finally:
        os.close(src)
        os.close(dst)


@pytest.mark.parametrize(
    "failure,expected",
    [
        (StorageFull(errno.ENOSPC, "full"), R_STORAGE_FULL),
        (OSError(errno.ENOSPC, "no space left"), R_STORAGE_FULL),
        (StorageUnavailable(errno.ENOENT, "not mounted"), R_STORAGE_DOWN),
        (OSError(errno.EIO, "I/O error"), R_LOCAL_ERROR),
    ],
)
def test_a_spool_that_cannot_be_written_is_answered_for_every_recipient(tmp_path, failure, expected):
    root = tmp_path / "root"
    root.mkdir()
    (root / ROOT_MARKER).touch()
    layout = MailboxLayout(root)
    store = MailStore(MaildirWriter(layout), io_threads=2)

    def open_spool():
        raise failure

    store.writer.open_spool = open_spool
    store.spool_memory_max = 10
    try:
        ev = receive(
            b"LHLO mx\r\nMAIL FROM:<s@x>\r\nRCPT TO:<juan@x>\r\nRCPT TO:<ana@x>\r\nDATA\r\n"
            + stuff(b"Subject: s\r\n\r\n" + b"q" * 100 + b"\r\n"),
            [60],
            store.new_body,
        )
        assert ev.body.error is failure
        recipients = [Recipient("juan", 2001, 2001), Recipient("ana", 2003, 2003)]
        assert asyncio.run(store.deliver(ev, recipients)) == [expected, expected]
    finally:
        store.close()
    assert list(root.iterdir()) == [root / ROOT_MARKER]


# -- a real pdeliveryd ------------------------------------------------------
@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    d = tmp_path_factory.mktemp("streaming")
    users = write_users(d / "users")
    settings = d / "pwmail.toml"
    settings.write_text("[delivery]\nmessage_size_max = %d\n" % (BIG + 1024 * 1024))
    with pwtest.PwServer(users) as pw:
        conf = client_conf(d / "pwserver.conf", [pw.address])
        port = free_port_on([STORE])
        with Pdeliveryd(d / "root", STORE, port, env_with(conf, settings)) as srv:
            yield {"srv": srv, "port": port, "conf": conf, "layout": MailboxLayout(d / "root")}


def status_kib(pid: int, field: str) -> int:
    text = open(f"/proc/{pid}/status").read()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def spool_files(pid: int) -> list[str]:
    """The daemon's descriptors of unnamed (spool) files."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.endswith("(deleted)"):
            out.append(target)
    return out


def send_message(port: int, rcpt: str, message: bytes, bdat_chunk: int = 0, timeout: float = 300):
    """One LMTP transaction for `message`, by DATA (it must end with CRLF)
    or in BDAT chunks of `bdat_chunk` bytes; (transcript, the reply codes
    expected for success)."""
    if bdat_chunk:
        chunks = [message[i : i + bdat_chunk] for i in range(0, len(message), bdat_chunk)]
        data = b"".join(
            b"BDAT %d%s\r\n" % (len(c), b" LAST" if i == len(chunks) - 1 else b"") + c for i, c in enumerate(chunks)
        )
        expected = ["220", "250", "250", "250"] + ["250"] * len(chunks) + ["221"]
    else:
        data = b"DATA\r\n" + stuff(message)
        expected = ["220", "250", "250", "250", "354", "250", "221"]
    with socket.create_connection((STORE, port), timeout=timeout) as s:
        s.sendall(b"LHLO mx\r\nMAIL FROM:<s@x>\r\nRCPT TO:<%s>\r\n" % rcpt.encode())
        s.sendall(data)
        s.sendall(b"QUIT\r\n")
        out = bytearray()
        while chunk := s.recv(65536):
            out += chunk
        return bytes(out), expected


def big_message(tag: bytes, final_newline: bool = True) -> bytes:
    line = b"x" * 997 + b"\r\n"
    head = b"Subject: big " + tag + b"\r\n\r\n"
    body = (line * 99 + b".leading dot\r\n") * (BIG // (len(line) * 100) + 1)
    return (head + body)[: BIG - 2] + (b"\r\n" if final_newline else b"no final line end")


# half the sessions send by DATA, half by BDAT in chunks whose edges fall
# anywhere in a line (and between CR and LF), without a final line end
SENDERS = {"juan": 0, "pepe": 1024 * 1024 + 1, "jo": 0, "ana": 999_999}


def test_parallel_big_messages_stay_within_the_session_bound(bed):
    pid = bed["srv"].proc.pid
    port = bed["port"]
    # warm up: imports, the I/O threads, one spooled message
    out, expected = send_message(port, "ana@x", b"Subject: warm\r\n\r\n" + (b"w" * 998 + b"\r\n") * 300)
    assert codes(out) == expected
    before = status_kib(pid, "VmHWM") * 1024
    users = list(SENDERS)[:SESSIONS]
    originals = {u: big_message(u.encode(), final_newline=not SENDERS[u]) for u in users}
    results = {}

    def client(u):
        results[u] = send_message(port, f"{u}@x", originals[u], SENDERS[u])

    threads = [threading.Thread(target=client, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    after = status_kib(pid, "VmHWM") * 1024
    for u in users:
        out, expected = results[u]
        assert codes(out) == expected, out[-300:]
    growth = after - before
    bound = SESSIONS * session_memory_bound(dconfig.DEFAULTS) + PROCESS_SLACK
    print(
        f"VmHWM {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB (+{growth / 2**20:.1f}; bound "
        f"{bound / 2**20:.0f}) for {SESSIONS} x {BIG / 2**20:.0f} MiB"
    )
    assert growth < bound, f"resident peak grew {growth / 2**20:.1f} MiB for {SESSIONS} messages"
    for u in users:
        [path] = [p for p in messages(bed["layout"].path(u)) if b"Subject: big" in p.read_bytes()[:200]]
        expected = msg.for_maildir(originals[u], "s@x", f"{u}@x")
        data = path.read_bytes()
        assert hashlib.sha256(data).digest() == hashlib.sha256(expected).digest()
        assert size_suffix(path) == (len(expected), len(expected) + expected.count(b"\n"))
        assert list((bed["layout"].path(u) / "tmp").iterdir()) == []
    assert spool_files(pid) == []


def test_over_the_size_limit_or_cut_mid_data_leaves_nothing(tmp_path, bed):
    settings = tmp_path / "pwmail.toml"
    settings.write_text("[delivery]\nmessage_size_max = 1000000\nspool_memory_max = 1000\n")
    root = tmp_path / "root"
    port = free_port_on([STORE])
    with Pdeliveryd(root, STORE, port, env_with(bed["conf"], settings)) as srv:
        layout = MailboxLayout(root)
        big = b"Subject: too big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 3000
        for chunk in (0, 100_000):  # DATA, BDAT
            out, _ = send_message(port, "juan@x", big, chunk)
            assert codes(out)[-2:] == ["552", "221"]
        # cut in the middle of a spooled message: the spool is let go as well
        with socket.create_connection((STORE, port), timeout=30) as s:
            s.sendall(b"LHLO mx\r\nMAIL FROM:<s@x>\r\nRCPT TO:<juan@x>\r\nDATA\r\n" + stuff(big)[:500_000])
            pwtest.wait_for(lambda: spool_files(srv.proc.pid), 30, describe=lambda: "no spool file while in DATA")
        pwtest.wait_for(
            lambda: not spool_files(srv.proc.pid),
            30,
            describe=lambda: f"spool files left open: {spool_files(srv.proc.pid)}",
        )
        box = layout.path("juan")
        assert messages(box) == []
        assert not (box / "tmp").exists() or list((box / "tmp").iterdir()) == []
        assert sorted(p.name for p in root.iterdir()) == [ROOT_MARKER]  # no spool names either


def test_docs_state_the_bound_the_code_computes():
    docs = (pwtest.ROOT / "docs" / "delivery.md").read_text()
    per_session = session_memory_bound(dconfig.DEFAULTS)
    assert f"**{per_session / 2**20:g} MiB**" in docs
    assert f"| `spool_memory_max` | {spool.SPOOL_MEMORY_MAX} |" in docs
