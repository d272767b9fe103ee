"""LIST, STAT and RETR agree for every stored message (issue 13, item 8):
the size pop3d announces is the octets RETR sends (RFC 1939: CRLF line
ends, before dot-stuffing), also for a message without a final line end,
with bare LF, bare CR, CR before CRLF, or lines starting with dots."""

from __future__ import annotations

import os
import poplib
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from delivery import message as delivery_message
from pop import mailbox
from pop.mailbox import MaildirMailbox
from pop.protocol import MessageSize, MultilineEncoder
from tests.support.pop_util import deliver, make_root, start_pop3d, users_pwserver

# Pieces random messages are made of: the line ends and dots that matter.
PIECES = [
    b"a",
    b"Zz",
    b" ",
    b"\t",
    b".",
    b"..",
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\r\n",
    b"\n.",
    b"\n.\n",
    b"\n..\n",
    b"\xff\x00",
    b"x" * 70,
]


def sent_octets(data: bytes, cuts=()) -> int:
    """What RETR sends for `data` (MultilineEncoder, fed in pieces split at
    `cuts`), without the final ".CRLF" and with dot-stuffing undone."""
    enc = MultilineEncoder()
    out, last = [], 0
    for cut in sorted(set(min(c, len(data)) for c in cuts)) + [len(data)]:
        out.append(enc.feed(data[last:cut]))
        last = cut
    body = b"".join(out) + enc.finish()
    assert body.endswith(b".\r\n")
    body = body[:-3]
    return len(body) - sum(1 for line in body.split(b"\r\n") if line.startswith(b"."))


def size_of(data: bytes, cuts=()) -> int:
    counter = MessageSize()
    last = 0
    for cut in sorted(set(min(c, len(data)) for c in cuts)) + [len(data)]:
        counter.feed(data[last:cut])
        last = cut
    return counter.size


CASES = [
    (b"", 0),
    (b"a", 3),
    (b"a\n", 3),
    (b"a\r\n", 3),
    (b"a\r", 3),
    (b"a\rb", 5),
    (b"\r\r\n", 3),
    (b".\n", 3),
    (b"no final newline\n\nbody", 26),
]


def test_message_size_cases():
    for data, size in CASES:
        assert size_of(data) == size == sent_octets(data), data
        assert size_of(data, range(len(data))) == size, data  # one byte at a time


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.sampled_from(PIECES) | st.binary(max_size=8), max_size=30),
    st.lists(st.integers(min_value=0, max_value=300), max_size=6),
    st.lists(st.integers(min_value=0, max_value=300), max_size=6),
)
def test_message_size_is_what_the_encoder_sends(pieces, cuts, other_cuts):
    data = b"".join(pieces)
    assert size_of(data, cuts) == sent_octets(data, other_cuts)


def random_message(rng: random.Random) -> bytes:
    data = b"".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 40)))
    return data + rng.choice([b"", b"\n", b"\r\n", b"\r", b"."])


def test_pop3d_list_stat_and_retr_agree_for_random_messages(tmp_path):
    rng = random.Random(13_8)
    layout = make_root(tmp_path / "spool")
    stored = {}  # UIDL (the file's base name) -> the bytes stored
    for i in range(80):
        raw = random_message(rng)
        if i % 2:  # through delivery's own code: trace headers, CRLF -> LF (pdeliveryd)
            raw = delivery_message.for_maildir(raw, "a@example.org", "rita@example.org")
        stored[os.path.basename(deliver(layout, "rita", raw))] = raw
    with users_pwserver(tmp_path, {"rita": ("rita-pw", "127.0.0.1")}) as conf:
        with start_pop3d(tmp_path, tmp_path / "spool", conf) as d:
            p = poplib.POP3(*d.address, timeout=30)
            p.user("rita")
            p.pass_("rita-pw")
            try:
                count, total = p.stat()
                _, listing, _ = p.list()
                sizes = [int(line.split()[1]) for line in listing]
                assert count == len(stored) and total == sum(sizes)
                names = [line.split()[1].decode() for line in p.uidl()[1]]
                for i, size in enumerate(sizes, 1):
                    assert int(p.list(i).split()[2]) == size
                    resp, lines, octets = p.retr(i)
                    # poplib's octets: each line with its CRLF, dot-stuffing undone
                    assert octets == sum(len(line) + 2 for line in lines) == size, (i, resp)
                    assert resp.split()[1] == b"%d" % size
                    assert octets == sent_octets(stored[names[i - 1]])
            finally:
                p.quit()
    # the UIDL is the name delivery gave, whose S= counts the stored bytes
    cur = layout.path("rita") / "cur"
    files = {n.split(":")[0]: os.path.getsize(cur / n) for n in os.listdir(cur)}
    assert sorted(names) == sorted(files)
    for name in names:
        assert f",S={files[name]}," in name


def test_mailbox_size_is_read_once_per_file(tmp_path, monkeypatch):
    """Sizes are remembered by file identity: a second session does not read
    a message file again; a file that changed is read again."""
    reads = []

    class CountingSize(MessageSize):
        def __init__(self):
            super().__init__()
            reads.append(1)

    monkeypatch.setattr(mailbox, "MessageSize", CountingSize)
    layout = make_root(tmp_path / "spool")
    path = deliver(layout, "sara", b"one line, no end")
    for _ in range(2):
        with MaildirMailbox(layout.path("sara")) as box:
            assert box.messages[0].size == 18
    assert len(reads) == 1
    (layout.path("sara") / "cur" / (os.path.basename(path) + ":2,")).write_bytes(b"now two lines\nof it\n")
    with MaildirMailbox(layout.path("sara")) as box:
        assert box.messages[0].size == 22
    assert len(reads) == 2
