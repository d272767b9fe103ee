"""A message body as the LMTP machine hands it over: counted as it arrives.

lmtp.py writes the unstuffed data (the wire form: CRLF line ends) in pieces
of any size. A Body keeps what the checks and the delivery need later
without keeping the message: its size and longest line (limits), the line
ends the Maildir form drops and adds (S= and W= of the file name), a running
digest (the duplicate table) and the head (loop and queue-id checks).
`MemoryBody` also keeps the bytes (pdelivery relays them as they came);
pdeliveryd's `spool.SpooledBody` keeps them in a file past a small size.
"""

from __future__ import annotations

import hashlib

from delivery.message import HEADER_SCAN_MAX

_CR, _LF = 0x0D, 0x0A


class Body:
    """Counters only; subclasses keep the bytes (`_keep`)."""

    def __init__(self):
        self.size = 0  # bytes of the wire form
        self.longest_line = 0  # in bytes, counting a CR before its LF (message.max_line_length)
        self.crlf = 0  # CRLF pairs: the Maildir form keeps only their LF
        self.newlines = 0  # LF bytes, in either form
        self._head = bytearray()
        self._head_done = False
        self._digest = hashlib.blake2b(digest_size=16)
        self._line = 0  # length of the line still open at the end of the last piece
        self._cr = False  # the last piece ended with a CR

    def write(self, piece: bytes) -> None:
        if not piece:
            return
        self.size += len(piece)
        self._digest.update(piece)
        self.newlines += piece.count(b"\n")
        self.crlf += piece.count(b"\r\n") + (self._cr and piece[0] == _LF)
        self._cr = piece[-1] == _CR
        self._count_lines(piece)
        self._keep_head(piece)
        self._keep(piece)

    def finish(self) -> None:
        """The data is complete (no more write())."""
        self._head_done = True

    def discard(self) -> None:
        """Release what the body holds outside this process's memory."""

    @property
    def lf_size(self) -> int:
        """Bytes of the Maildir form (CRLF -> LF)."""
        return self.size - self.crlf

    @property
    def head(self) -> bytes:
        """The first bytes, through the first empty CRLF line or HEADER_SCAN_MAX
        bytes: message.header_section() of it is that of the whole message."""
        return bytes(self._head)

    def digest(self) -> bytes:
        """message.digest() of the whole wire form."""
        return self._digest.digest()

    def _count_lines(self, piece: bytes) -> None:
        if piece.find(b"\n") < 0:
            self._line += len(piece)
            self.longest_line = max(self.longest_line, self._line)
            return
        lengths = list(map(len, piece.split(b"\n")))
        lengths[0] += self._line
        self.longest_line = max(self.longest_line, max(lengths))
        self._line = lengths[-1]

    def _keep_head(self, piece: bytes) -> None:
        if self._head_done:
            return
        start = max(0, len(self._head) - 3)  # an empty line straddling two pieces
        self._head += piece[: HEADER_SCAN_MAX - len(self._head)]
        end = self._head.find(b"\r\n\r\n", start)
        if end >= 0:
            del self._head[end + 4 :]
            self._head_done = True
        elif len(self._head) >= HEADER_SCAN_MAX:
            self._head_done = True

    def _keep(self, piece: bytes) -> None:
        pass


class MemoryBody(Body):
    """The wire form in memory too (`data`): for pdelivery, which relays it."""

    def __init__(self):
        super().__init__()
        self._data = bytearray()

    def _keep(self, piece: bytes) -> None:
        self._data += piece

    @property
    def data(self) -> bytes:
        return bytes(self._data)
