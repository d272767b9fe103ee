"""Where a user's Maildir lives under a storage root: the hash schemes.

The paper (III.C) keeps `juan` at `/var/spool/mail/j/u/a/juan` instead of one
huge directory; IV.1 compares other picks of letters. Each scheme below is
defined as the Dovecot `mail_location` template that computes the same path,
so Dovecot can serve the tree we deliver into (docs/delivery.md, and
tests/delivery/test_delivery_dovecot.py checks each against `doveadm user -f mail`):

| scheme       | levels                              | Dovecot template                          |
|--------------|-------------------------------------|-------------------------------------------|
| `first3`     | 1st, 2nd, 3rd character (default)   | `%1n/%1.1n/%2.1n/%n`                      |
| `first2last` | 1st, 2nd, last character            | `%1n/%1.1n/%-1.1n/%n`                     |
| `firstlast2` | 1st, next-to-last, last character   | `%1n/%-2.1n/%-1.1n/%n`                    |
| `hash2`      | MD5 of the name: 256 x 256 buckets  | `%2.256Nn/%4.65536Nn/%n`                  |

Short names follow Dovecot's substring rule, so the paths stay identical:
a character past the end of the name is the empty string and its level is
dropped (`jo` -> `j/o/jo` under `first3`, `j` -> `j/j`); a negative offset
before the start of the name starts at its first character (`j` -> `j/j/j`
under `firstlast2`). A level is one character and a mailbox directory is the
whole name, so a mailbox never collides with a hash level of another user
except that a one-character user's Maildir doubles as the level directory
of longer names (`j/j` holds `cur/ new/ tmp/` and single-letter levels;
Maildir ignores those). `nested()` tells which names lie below such a
Maildir: their path is partly owned by another user, and the Maildir writer
walks it with descriptors, never following a link.

`hash2`: `v` = the first 8 bytes of MD5(name) read big-endian; level 1 is
`v mod 256`, level 2 is `v mod 65536`, each in lowercase hex zero-padded to
2 and 4 digits (Dovecot's `%N` modifier). Level 2 ends with level 1's two
digits, so every level-1 directory holds at most 256 level-2 directories.

Names are checked (see `check_user`): they become path components, so `/`,
NUL, control bytes, a leading dot and anything not ASCII are refused. Names
are lower-cased (ASCII) first, as Dovecot does with its default
`auth_username_format = %Lu` and as pdeliveryd does with recipients:
`Juan` and `juan` share one mailbox.
"""

from __future__ import annotations

import hashlib
import pathlib
import re

SCHEMES = ("first3", "first2last", "firstlast2", "hash2")
DEFAULT_SCHEME = "first3"

# Dovecot mail_location templates, one per scheme (docs/delivery.md).
DOVECOT_TEMPLATES = {
    "first3": "%1n/%1.1n/%2.1n/%n",
    "first2last": "%1n/%1.1n/%-1.1n/%n",
    "firstlast2": "%1n/%-2.1n/%-1.1n/%n",
    "hash2": "%2.256Nn/%4.65536Nn/%n",
}

MAX_USER_LEN = 255  # one path component (NAME_MAX)
_USER_RE = re.compile(r"[!-~]+")  # printable ASCII, no space


class LayoutError(ValueError):
    """A user name that cannot name a mailbox directory."""


def check_user(user: str) -> str:
    """`user` lower-cased if it can be a path component, else raise LayoutError."""
    if not isinstance(user, str) or not user:
        raise LayoutError("empty user name")
    if len(user) > MAX_USER_LEN:
        raise LayoutError(f"user name longer than {MAX_USER_LEN}")
    if not _USER_RE.fullmatch(user) or "/" in user or user.startswith("."):
        raise LayoutError(f"user name not usable as a directory: {user!r}")
    return user.lower()


def _substr(name: str, offset: int, width: int) -> str:
    """Dovecot's %<offset>.<width>n substring rule."""
    if offset < 0:
        offset = max(0, len(name) + offset)
    return name[offset : offset + width]


def _md5_value(name: str) -> int:
    return int.from_bytes(hashlib.md5(name.encode("ascii")).digest()[:8], "big")


def levels(user: str, scheme: str = DEFAULT_SCHEME) -> list[str]:
    """The hash directories above the user's mailbox (empty levels dropped)."""
    name = check_user(user)
    if scheme == "first3":
        parts = [_substr(name, 0, 1), _substr(name, 1, 1), _substr(name, 2, 1)]
    elif scheme == "first2last":
        parts = [_substr(name, 0, 1), _substr(name, 1, 1), _substr(name, -1, 1)]
    elif scheme == "firstlast2":
        parts = [_substr(name, 0, 1), _substr(name, -2, 1), _substr(name, -1, 1)]
    elif scheme == "hash2":
        v = _md5_value(name)
        parts = [f"{v % 256:02x}", f"{v % 65536:04x}"]
    else:
        raise LayoutError(f"unknown layout scheme {scheme!r} (one of {', '.join(SCHEMES)})")
    # "." as a level is what the file system makes of it: nothing.
    return [p for p in parts if p and p != "."]


class MailboxLayout:
    """Maps user names to Maildir paths under one storage root.

    >>> MailboxLayout("/var/spool/mail").path("juan")
    PosixPath('/var/spool/mail/j/u/a/juan')
    """

    def __init__(self, root: str | pathlib.Path, scheme: str = DEFAULT_SCHEME):
        if scheme not in SCHEMES:
            raise LayoutError(f"unknown layout scheme {scheme!r} (one of {', '.join(SCHEMES)})")
        self.root = pathlib.Path(root)
        self.scheme = scheme

    def relative(self, user: str) -> pathlib.PurePosixPath:
        """The mailbox path relative to the root."""
        return pathlib.PurePosixPath(*levels(user, self.scheme), check_user(user))

    def path(self, user: str) -> pathlib.Path:
        """The user's Maildir (it may not exist yet)."""
        return self.root / self.relative(user)

    def nested(self, user: str) -> bool:
        """True when the path to `user`'s Maildir passes through the Maildir
        of a one-character user (under `first3`, `jjota` is at `j/j/o/jjota`
        and `j/j` is the Maildir of `j`): part of that path is then owned by
        another user, and delivery walks it without following links."""
        parts = self.relative(user).parts
        for i in range(1, len(parts)):
            head = parts[i - 1]
            if len(head) == 1 and self.relative(head).parts == parts[:i]:
                return True
        return False

    def dovecot_location(self) -> str:
        """The Dovecot `mail_location` serving the same tree."""
        return f"maildir:{self.root}/{DOVECOT_TEMPLATES[self.scheme]}"

    def __repr__(self) -> str:
        return f"MailboxLayout({str(self.root)!r}, scheme={self.scheme!r})"
