"""pdeliveryd's duplicate table survives restarts (issue 15): the file in
the storage root is written once a copy is durable, before its 250, read at
start, bounded by dedup_window and dedup_max; a SIGKILL after the copy is
durable, before the client read its 250, then the MTA's retry: one copy."""

import signal
import socket

from delivery import dedup
from delivery.dedup import COMPACT_SLACK, DEDUP_FILE, DedupTable
from delivery.layout import MailboxLayout
from tests.support.delivery_util import Pdeliveryd, codes, free_port_on, lmtp_session, messages, pwserver_env, wait_for


def key(n: int):
    return (f"4AbC{n}", "juan", bytes([n % 256]) * 16)


def lines(path) -> list[bytes]:
    return path.read_bytes().splitlines()


def test_remembered_keys_survive_a_new_table_and_each_record_is_synced(tmp_path):
    path = tmp_path / DEDUP_FILE
    synced = []
    t = DedupTable(3600, 100, path, sync=lambda p, fd: synced.append(p))
    t.remember(key(1))
    t.remember(key(2))
    assert synced == [str(path), str(path)]
    assert t.seen(key(1)) and not t.seen(key(3))
    t.close()
    again = DedupTable(3600, 100, path)
    assert again.seen(key(1)) and again.seen(key(2)) and not again.seen(key(3))
    assert not again.seen(("4AbC1", "ana", key(1)[2])) and not again.seen(("4AbC1", "juan", b"\0" * 16))


def test_expired_torn_and_excess_records_are_dropped_at_load(tmp_path, monkeypatch):
    path = tmp_path / DEDUP_FILE
    now = 1_800_000_000.0
    monkeypatch.setattr(dedup.time, "time", lambda: now)
    old = dedup._line(key(1), now - 7200)
    recent = b"".join(dedup._line(key(n), now - 10 + n) for n in range(2, 7))
    path.write_bytes(old + recent + b"garbage\n" + dedup._line(key(9), now)[:-7])  # torn last line
    t = DedupTable(3600, 3, path)
    t.load()
    assert [t.seen(key(n)) for n in range(1, 10)] == [False, False, False, True, True, True, False, False, False]
    assert lines(path) == [dedup._line(key(n), now - 10 + n)[:-1] for n in (4, 5, 6)]  # rewritten clean


def test_file_stays_bounded_by_dedup_max(tmp_path):
    path = tmp_path / DEDUP_FILE
    t = DedupTable(3600, 10, path, sync=lambda p, fd: None)
    for n in range(3 * COMPACT_SLACK):
        t.remember(key(n))
        assert len(lines(path)) <= 2 * 10 + COMPACT_SLACK
    t.close()
    again = DedupTable(3600, 10, path)
    assert len(again) == 0
    again.load()
    assert len(again) == 10 and all(again.seen(key(n)) for n in range(3 * COMPACT_SLACK - 10, 3 * COMPACT_SLACK))


def test_unmounted_root_gets_no_file(tmp_path):
    path = tmp_path / DEDUP_FILE
    t = DedupTable(3600, 10, path, usable=lambda: False)
    t.remember(key(1))
    assert t.seen(key(1)) and not path.exists()


STORE = "127.0.0.35"
QID = "4AVdup1"
SCRIPT = (
    b"LHLO mx\r\nMAIL FROM:<s@x> XQUEUEID=" + QID.encode() + b"\r\nRCPT TO:<juan@x>\r\nDATA\r\n"
    b"Subject: once\r\n\r\nonly one copy\r\n.\r\n"
)


def test_sigkill_before_the_250_is_read_then_retry_stores_one_copy(tmp_path):
    root = tmp_path / "root"
    box = MailboxLayout(root).path("juan")
    with pwserver_env(tmp_path) as env:
        port = free_port_on([STORE])
        srv = Pdeliveryd(root, STORE, port, env)
        try:
            # the MTA sends the message and never reads the replies (they are lost with the server)
            with socket.create_connection((STORE, port), timeout=10) as s:
                s.sendall(SCRIPT)
                wait_for(
                    lambda: (root / DEDUP_FILE).exists() and QID.encode() in (root / DEDUP_FILE).read_bytes(),
                    timeout=30,
                )
                srv.signal(signal.SIGKILL)
                srv.proc.wait(timeout=30)
        finally:
            srv.stop()
        assert len(messages(box)) == 1
        with Pdeliveryd(root, STORE, port, env) as srv:
            out = lmtp_session(STORE, port, SCRIPT + b"QUIT\r\n")
            assert codes(out)[-2:] == ["250", "221"], out
            assert b"already delivered (duplicate)" in out
            # another message from the same queue run is stored as usual
            other = SCRIPT.replace(b"only one copy", b"another message")
            assert codes(lmtp_session(STORE, port, other + b"QUIT\r\n"))[-2:] == ["250", "221"]
        files = messages(box)
        assert len(files) == 2
        assert sorted(f.read_bytes().rsplit(b"\n\n", 1)[1] for f in files) == [b"another message\n", b"only one copy\n"]


def test_a_file_that_fails_leaves_the_table_in_memory(tmp_path):
    path = tmp_path / DEDUP_FILE

    def failing_sync(p, fd):
        raise OSError(5, "I/O error")

    t = DedupTable(3600, 10, path, sync=failing_sync)
    t.remember(key(1))  # logged; the copy is durable, so no exception reaches the delivery
    t.remember(key(2))
    assert t.seen(key(1)) and t.seen(key(2))
    assert [line.split()[1] for line in lines(path)] == [b"4AbC1"]  # nothing written after the failure
    assert t._fd < 0
