"""What delivery does to a message's bytes: trace headers, loop check, line ends.

The wire form (LMTP, after dot-unstuffing) ends lines with CRLF; a Maildir
file ends them with LF. Only the header section is parsed, and only to find
`Delivered-To:` (loops), the first `Received:` queue id (duplicates) and the
trace fields the final delivery's own replace (`without_replaced_trace`).
"""

from __future__ import annotations

import hashlib
import re

HEADER_SCAN_MAX = 256 * 1024  # bytes of header section examined for loops / ids

_RECEIVED_ID = re.compile(rb"\bid\s+([A-Za-z0-9._\-]+)", re.I)


def header_section(raw: bytes) -> bytes:
    """The header block (up to the first empty line), capped at HEADER_SCAN_MAX."""
    head = raw[:HEADER_SCAN_MAX]
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = head.find(sep)
        if i >= 0:
            head = head[: i + len(sep) // 2]
            break
    if head.startswith((b"\r\n", b"\n")):
        return b""
    return head


def iter_headers(raw: bytes):
    """(lower-case name, unfolded value) for each header field."""
    name = None
    value: list[bytes] = []
    for line in header_section(raw).splitlines():
        if line[:1] in (b" ", b"\t") and name is not None:
            value.append(line.strip())
            continue
        if name is not None:
            yield name, b" ".join(value)
        k, sep, v = line.partition(b":")
        if not sep:
            name = None
            continue
        name, value = k.strip().lower(), [v.strip()]
    if name is not None:
        yield name, b" ".join(value)


def local_part(address: str) -> str:
    addr = address.strip().strip("<>")
    return addr.rpartition("@")[0] if "@" in addr else addr


def is_loop(raw: bytes, user: str) -> bool:
    """True when a Delivered-To header names `user` (any domain, any case)."""
    want = user.lower()
    for name, value in iter_headers(raw):
        if name == b"delivered-to":
            got = local_part(value.decode("utf-8", "replace")).lower()
            if got == want or got.partition("+")[0] == want:
                return True
    return False


def received_queue_id(raw: bytes) -> str | None:
    """The `id` clause of the first Received header (the MTA's queue id)."""
    for name, value in iter_headers(raw):
        if name == b"received":
            m = _RECEIVED_ID.search(value)
            return m.group(1).decode("ascii") if m else None
    return None


def digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


def _header_safe(text: str) -> bytes:
    return text.replace("\r", "").replace("\n", "").encode("utf-8", "replace")


def trace_headers(return_path: str, delivered_to: str) -> bytes:
    """What delivery puts before a recipient's copy (LF line ends)."""
    return (
        b"Return-Path: <" + _header_safe(return_path) + b">\n" + b"Delivered-To: " + _header_safe(delivered_to) + b"\n"
    )


def without_replaced_trace(lines: bytes, delivered_to: str) -> bytes:
    """`lines` (whole lines, LF ends, from the top of a message) without the
    header fields our trace headers replace: every `Return-Path` (an MTA's,
    e.g. Sendmail's F=P; RFC 5321 4.4 wants one, the final delivery's) and a
    `Delivered-To` naming `delivered_to` itself (one for another address
    records an earlier hop and stays). Everything from the first empty line
    on is kept as it is. Returns `lines` itself when nothing goes."""
    low = lines.lower()
    if b"return-path" not in low and b"delivered-to" not in low:
        return lines
    ours = delivered_to.strip().strip("<>").lower().encode("utf-8", "replace")
    kept: list[bytes] = []
    dropping = dropped = False
    pos = 0
    while pos < len(lines):
        end = lines.find(b"\n", pos) + 1 or len(lines)
        line = lines[pos:end]
        if line.rstrip(b"\r\n") == b"":
            kept.append(lines[pos:])  # the end of the header section
            break
        pos = end
        if line[:1] not in (b" ", b"\t"):  # a new field (else a folded line of the last one)
            name, colon, value = line.partition(b":")
            name = name.strip().lower()
            dropping = bool(colon) and (
                name == b"return-path" or (name == b"delivered-to" and value.strip().strip(b"<>").lower() == ours)
            )
        if dropping:
            dropped = True
        else:
            kept.append(line)
    return b"".join(kept) if dropped else lines


def for_maildir(raw: bytes, return_path: str, delivered_to: str) -> bytes:
    """Trace headers + the message with LF line ends and without the fields
    they replace, as stored (pdeliveryd streams the same bytes:
    spool.SpooledBody)."""
    return trace_headers(return_path, delivered_to) + without_replaced_trace(raw.replace(b"\r\n", b"\n"), delivered_to)


def max_line_length(raw: bytes) -> int:
    """Longest line in bytes, counting a CR before its LF."""
    return max(map(len, raw.split(b"\n")), default=0)
