"""Driving a sans-I/O server connection in tests (pop/protocol.py, pop/imap_protocol.py)."""

from __future__ import annotations


def drive(conn, data: bytes, closed: type, *, bytewise: bool = False):
    """Feed data, collect (events, output) until an event waits for its
    answer (NEED_REPLY) or the session closes (an event of type `closed`)."""
    events = []
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            ev = conn.next_event()
            if ev in ("NEED_DATA", "NEED_REPLY"):
                break
            events.append(ev)
            if isinstance(ev, closed):
                return events, conn.data_to_send()
        if events and not isinstance(events[-1], closed) and conn._awaiting is not None:
            break
    return events, conn.data_to_send()
