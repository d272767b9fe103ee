"""MaildirWriter: durable writes, names, ownership, failures, group commit,
tmp/ cleaning; message.py: trace headers, loops, queue ids."""

import concurrent.futures as cf
import errno
import os
import threading
import time

import pytest

from delivery import message as msg
from delivery.layout import MailboxLayout
from delivery.maildir import (
    ROOT_MARKER,
    GroupSync,
    MaildirWriter,
    StorageUnavailable,
    clean_tmp,
    clean_tree,
    unique_name,
    walk_maildirs,
)
from tests.support.delivery_util import NAME_RE


@pytest.fixture
def writer(tmp_path):
    (tmp_path / ROOT_MARKER).touch()
    return MaildirWriter(MailboxLayout(tmp_path), host="store1.example")


def test_deliver_creates_maildir_and_file(writer, tmp_path):
    path = writer.deliver("juan", b"Subject: x\n\nhi\n", 3001, 3002)
    box = tmp_path / "j/u/a/juan"
    assert os.path.dirname(path) == str(box / "new")
    assert open(path, "rb").read() == b"Subject: x\n\nhi\n"
    for d in (box, box / "cur", box / "new", box / "tmp"):
        st = os.stat(d)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (3001, 3002, 0o700)
    st = os.stat(tmp_path / "j")
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o755)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (3001, 3002, 0o600)
    assert os.listdir(box / "tmp") == []


def test_unique_names(writer):
    names = {os.path.basename(writer.deliver("ana", b"a\nb\n")) for _ in range(50)}
    assert len(names) == 50
    for n in names:
        m = NAME_RE.match(n)
        assert m and m.group(5) == "store1.example" and m.group(6) == "4" and m.group(7) == "6"
        assert int(m.group(3)) == os.getpid() and abs(int(m.group(1)) - time.time()) < 60
    assert "\\057" in unique_name(1, 1, "a/b".replace("/", "\\057"))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked child names files with its own pid
        os.write(w, unique_name(1, 1, "h").encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert f"P{pid}Q" in os.read(r, 200).decode()
    os.close(r)
    os.close(w)


def test_root_without_marker_is_unavailable_and_untouched(tmp_path):
    w = MaildirWriter(MailboxLayout(tmp_path / "mnt"))
    with pytest.raises(StorageUnavailable):
        w.deliver("juan", b"x\n")
    assert not (tmp_path / "mnt").exists()
    (tmp_path / "mnt").mkdir()
    with pytest.raises(StorageUnavailable):
        w.deliver("juan", b"x\n")
    assert list((tmp_path / "mnt").iterdir()) == []


def test_failed_write_leaves_nothing(writer, tmp_path, monkeypatch):
    writer.deliver("pepe", b"first\n")
    box = tmp_path / "p/e/p/pepe"
    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError) as e:
        writer.deliver("pepe", b"second\n")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert e.value.errno == errno.EIO
    assert len(os.listdir(box / "new")) == 1 and os.listdir(box / "tmp") == []


def test_group_sync_shares_fsyncs_and_reports_errors(tmp_path):
    g = GroupSync()
    dirs = [tmp_path / f"d{i}" for i in range(4)]
    for d in dirs:
        d.mkdir()
    with cf.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda i: g.sync(str(dirs[i % 4])), range(400)))
    assert g.batches >= 1 and g.syncs <= 400
    with pytest.raises(FileNotFoundError):
        g.sync(str(tmp_path / "missing"))
    g.sync(str(dirs[0]))  # a failed batch does not poison the next


def test_group_sync_waits_for_a_sync_started_after_the_call(tmp_path, monkeypatch):
    """A caller arriving while a sync runs must not be released by it."""
    import delivery.maildir as md

    started, release = threading.Event(), threading.Event()
    log = []
    real = md.fsync_dir

    def slow(path):
        log.append(("start", path))
        if not started.is_set():
            started.set()
            release.wait(5)
        real(path)
        log.append(("end", path))

    monkeypatch.setattr(md, "fsync_dir", slow)
    g = GroupSync()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    t1 = threading.Thread(target=g.sync, args=(str(tmp_path / "a"),))
    t1.start()
    assert started.wait(5)
    t2 = threading.Thread(target=g.sync, args=(str(tmp_path / "b"),))
    t2.start()
    time.sleep(0.1)
    assert t2.is_alive()  # b's rename came after a's sync began
    release.set()
    t1.join(5)
    t2.join(5)
    assert ("end", str(tmp_path / "b")) in log


def test_clean_tmp_and_walk(writer, tmp_path):
    writer.deliver("juan", b"x\n")
    writer.deliver("jo", b"x\n")
    box = tmp_path / "j/u/a/juan"
    old, new = box / "tmp/old", box / "tmp/new"
    old.write_bytes(b"o")
    new.write_bytes(b"n")
    t = time.time() - 37 * 3600
    os.utime(old, (t, t))
    assert sorted(walk_maildirs(tmp_path)) == sorted([str(box), str(tmp_path / "j/o/jo")])
    assert clean_tmp(box) == 1
    assert not old.exists() and new.exists()
    # the whole tree, by descriptors: a link in a level is not followed
    os.utime(new, (0, 0))
    elsewhere = tmp_path / "elsewhere" / "x"
    (elsewhere / "tmp").mkdir(parents=True)
    (elsewhere / "new").mkdir()
    (elsewhere / "tmp" / "keep").write_bytes(b"k")
    os.utime(elsewhere / "tmp" / "keep", (0, 0))
    (tmp_path / "j/o/link").symlink_to(elsewhere.parent, target_is_directory=True)
    assert clean_tree(tmp_path / "j") == 1
    assert not new.exists() and (elsewhere / "tmp" / "keep").exists()


def test_trace_headers_and_line_ends():
    raw = b"Subject: a\r\n\r\nbody\r\n"
    assert msg.for_maildir(raw, "s@x", "juan@y") == b"Return-Path: <s@x>\nDelivered-To: juan@y\nSubject: a\n\nbody\n"
    # no header injection through the envelope
    assert msg.for_maildir(raw, "a>\nX-Evil: 1", "juan\r\nX-Evil: 2").split(b"\n")[:2] == [
        b"Return-Path: <a>X-Evil: 1>",
        b"Delivered-To: juanX-Evil: 2",
    ]


def test_loop_detection_only_in_headers():
    assert msg.is_loop(b"X: 1\r\nDelivered-To: Juan+x@other\r\n\r\nbody\r\n", "juan")
    assert msg.is_loop(b"Delivered-To:\r\n juan@y\r\n\r\n", "juan")  # folded
    assert not msg.is_loop(b"Subject: x\r\n\r\nDelivered-To: juan@y\r\n", "juan")
    assert not msg.is_loop(b"Delivered-To: juana@y\r\n\r\n", "juan")


def test_received_queue_id():
    raw = (
        b"Received: from a (a [1.2.3.4])\r\n\tby mx.example (8.17.1/8.17.1) with ESMTP id 4AU0x1y2\r\n"
        b"\tfor <juan@x>; Mon, 30 Nov 2026\r\nReceived: by other id ZZZ\r\n\r\n"
    )
    assert msg.received_queue_id(raw) == "4AU0x1y2"
    assert msg.received_queue_id(b"Subject: none\r\n\r\n") is None


@pytest.mark.parametrize("swap", ["tmp", "new"])
def test_links_planted_by_the_user_are_not_followed(writer, tmp_path, swap):
    """The daemon runs as root in directories users own: a link in place of
    tmp/ or new/ must not send a write elsewhere. (The Maildir itself sits
    in a root-owned 0755 level: its user cannot swap it.)"""
    writer.deliver("mallory", b"first\n", 3005, 3005)
    box = tmp_path / "m/a/l/mallory"
    target = tmp_path / "elsewhere"
    target.mkdir()
    st = os.stat(box.parent)
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o755)
    victim = box / swap
    victim.rename(tmp_path / f"moved-{swap}")
    victim.symlink_to(target, target_is_directory=True)
    with pytest.raises(OSError) as e:
        writer.deliver("mallory", b"second\n", 3005, 3005)
    assert e.value.errno in (errno.ELOOP, errno.ENOTDIR)  # O_NOFOLLOW with O_DIRECTORY: either
    assert list(target.iterdir()) == []
    old = target / "old"
    old.write_bytes(b"x")
    os.utime(old, (0, 0))
    assert clean_tmp(box) == 0 and old.exists()


def test_nested_maildirs_are_walked_without_links(writer, tmp_path):
    """first3 puts `jjota` below the Maildir of `j` (j/j): `j` owns part of
    jjota's path and may plant links there; they are not followed."""
    layout = writer.layout
    assert layout.nested("jjota") and not layout.nested("juan") and not layout.nested("j")
    writer.deliver("j", b"to j\n", 3010, 3010)
    writer.deliver("jjota", b"to jjota\n", 3011, 3011)
    assert len(os.listdir(tmp_path / "j/j/o/jjota/new")) == 1
    assert len(os.listdir(tmp_path / "j/j/new")) == 1
    # j (who owns j/j) swaps the level j/j/o for a link to a place of its choosing
    target = tmp_path / "elsewhere"
    (target / "jjota" / "tmp").mkdir(parents=True)
    (target / "jjota" / "new").mkdir()
    (tmp_path / "j/j/o").rename(tmp_path / "j/j/o-moved")
    (tmp_path / "j/j/o").symlink_to(target, target_is_directory=True)
    with pytest.raises(OSError) as e:
        writer.deliver("jjota", b"diverted?\n", 3011, 3011)
    assert e.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert os.listdir(target / "jjota" / "new") == [] and os.listdir(target / "jjota" / "tmp") == []
    old = target / "jjota" / "tmp" / "old"
    old.write_bytes(b"x")
    os.utime(old, (0, 0))
    assert writer.clean_tmp("jjota") == 0 and old.exists()
    # and a new nested mailbox is not created through the link either
    with pytest.raises(OSError):
        writer.deliver("jjoyce", b"new box\n", 3012, 3012)
    assert not (target / "y").exists()
