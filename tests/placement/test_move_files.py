"""pwmail move, the file side: the mailhosts map rewrite and the Maildir
mirror (real files, no servers)."""

import os
import pathlib

import pytest

from delivery.layout import MailboxLayout
from delivery.maildir import ROOT_MARKER, MaildirWriter
from pwmail.placement.move import MailhostsFile, Throttle, message_key, scan, sync_box

FAST = Throttle(0, 0)


def test_mailhosts_update_keeps_comments_order_and_drops_duplicates(tmp_path):
    f = tmp_path / "mailhosts"
    f.write_text("# map\nana store1\njuan store1  # old\nluis store2\njuan store3\n")
    os.chmod(f, 0o640)
    m = MailhostsFile(f)
    m.update({"juan": ("store2", True), "nuevo": ("store1", False)})
    assert f.read_text() == "# map\nana store1\njuan store2 frozen\nluis store2\nnuevo store1\n"
    assert oct(f.stat().st_mode & 0o777) == "0o640"
    assert m.read() == {
        "ana": ("store1", False),
        "juan": ("store2", True),
        "luis": ("store2", False),
        "nuevo": ("store1", False),
    }
    m.update({"juan": ("store2", False)})
    assert m.read()["juan"] == ("store2", False)
    assert not list(tmp_path.glob(".mailhosts.tmp*"))


def test_message_key_is_the_uidl_whatever_the_flags():
    assert message_key("new/1.M1P1Q1.h,S=5,W=6") == "msg/1.M1P1Q1.h,S=5,W=6"
    assert message_key("cur/1.M1P1Q1.h,S=5,W=6:2,S") == "msg/1.M1P1Q1.h,S=5,W=6"
    assert message_key(".Sent/cur/9.x:2,RS") == ".Sent/msg/9.x"
    assert message_key("dovecot-uidlist") == "dovecot-uidlist"


def _box(root: pathlib.Path, user: str) -> tuple[MaildirWriter, pathlib.Path]:
    root.mkdir(exist_ok=True)
    (root / ROOT_MARKER).touch()
    w = MaildirWriter(MailboxLayout(root))
    return w, w.ensure_maildir(user)


def test_sync_mirrors_names_flags_deletions_and_other_files(tmp_path):
    w, src = _box(tmp_path / "a", "juan")
    _, dst = _box(tmp_path / "b", "juan")
    paths = [w.deliver("juan", f"Subject: {i}\n\nbody {i}\n".encode()) for i in range(5)]
    (src / "dovecot-uidlist").write_text("3 V1 N6\n")
    os.makedirs(src / ".Sent" / "cur")
    (src / ".Sent" / "cur" / "7.M1P1Q1.h,S=3,W=3:2,S").write_bytes(b"abc")
    os.utime(paths[0], ns=(1_000_000_000, 1_000_000_000))
    r = sync_box(src, dst, FAST, delete=True)
    assert r.copied == 7 and r.renamed == 0 and r.deleted == 0
    assert scan(dst).keys() == scan(src).keys()
    assert (dst / "new" / os.path.basename(paths[0])).stat().st_mtime_ns == 1_000_000_000
    # a POP session reads one (new -> cur with flags) and deletes another
    p1 = pathlib.Path(paths[1])
    os.rename(p1, src / "cur" / (p1.name + ":2,S"))
    os.unlink(paths[2])
    r = sync_box(src, dst, FAST, delete=True)
    assert (r.copied, r.renamed, r.deleted) == (0, 1, 1)
    assert sorted(p.name for p in (dst / "cur").iterdir()) == [p1.name + ":2,S"]
    assert {k: v[0] for k, v in scan(dst).items()} == {k: v[0] for k, v in scan(src).items()}
    for rel, _, _ in scan(src).values():
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()
    assert not list((dst / "tmp").iterdir())


def test_sync_without_delete_only_adds(tmp_path):
    w, src = _box(tmp_path / "a", "ana")
    w2, dst = _box(tmp_path / "b", "ana")
    w.deliver("ana", b"one\n")
    kept = w2.deliver("ana", b"only in the new box\n")
    r = sync_box(src, dst, FAST, delete=False)
    assert r.copied == 1 and os.path.exists(kept)


def test_throttle_limits_bytes_per_second():
    import time

    t = Throttle(1_000_000, 0)
    t0 = time.monotonic()
    for _ in range(5):
        t.spend(100_000)
    assert time.monotonic() - t0 >= 0.45


def test_sync_of_a_missing_box_copies_nothing(tmp_path):
    _, dst = _box(tmp_path / "b", "x1")
    r = sync_box(tmp_path / "nowhere", dst, FAST, delete=False)
    assert (r.copied, r.renamed, r.deleted) == (0, 0, 0)


@pytest.mark.parametrize("name", ["juan", "jo", "j"])
def test_scan_skips_tmp(tmp_path, name):
    w, box = _box(tmp_path / "a", name)
    (box / "tmp" / "half-written").write_bytes(b"x")
    w.deliver(name, b"m\n")
    assert [k.split("/")[0] for k in scan(box)] == ["msg"]


def test_storage_roots_from_settings_and_flags():
    from pwmail.placement.move import MoveError, storage_roots

    data = {
        "delivery": {"root": "/srv/mail", "mailhost_names": ["store1", "store1.example"]},
        "move": {"roots": {"store2": "/mnt/store2", "store1.example": "/x"}},
    }
    assert storage_roots(data, ["store3=/mnt/s3", "store2=/nfs/s2"]) == {
        "store1": "/srv/mail",
        "store1.example": "/x",
        "store2": "/nfs/s2",
        "store3": "/mnt/s3",
    }
    with pytest.raises(MoveError):
        storage_roots({}, ["store3"])
    with pytest.raises(MoveError):
        storage_roots({"move": {"rots": {}}}, [])
