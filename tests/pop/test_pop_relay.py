"""SpliceRelay on its own, over loopback TCP: big transfers both ways
(commands up are copied, answers down spliced through a pipe that grows
when it fills), a client's half-close passed on, the backend's close."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from pop.relay import HAVE_SPLICE, PIPE_DEFAULT, SpliceRelay

pytestmark = pytest.mark.skipif(not HAVE_SPLICE, reason="needs splice(2)")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


async def read_all(loop, sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        data = await loop.sock_recv(sock, 1 << 16)
        if not data:
            return bytes(out)
        out += data


def test_both_ways_half_close_and_backend_close():
    up = os.urandom(3 << 20)  # more than any socket buffer: partial sends
    down = os.urandom(5 << 20)

    async def run():
        loop = asyncio.get_running_loop()
        client, proxy_c = tcp_pair()  # the user's end, the proxy's end
        proxy_b, backend = tcp_pair()  # the proxy's end, the backend's end
        for s in (client, proxy_c, proxy_b, backend):
            s.setblocking(False)
        closed = loop.create_future()
        relay = SpliceRelay(
            loop,
            proxy_c,
            proxy_b,
            to_client=b"+OK hello\r\n",
            to_backend=b"NOOP\r\n",
            pipe_size=1 << 20,
            idle_timeout=30,
            on_close=closed.set_result,
        )
        relay.start()

        async def client_side():
            await loop.sock_sendall(client, up)
            client.shutdown(socket.SHUT_WR)  # half-close: the backend must see EOF
            await asyncio.sleep(0.5)  # a slow reader: the pipe fills, then grows
            return await read_all(loop, client)

        async def backend_side():
            got = await read_all(loop, backend)  # ends at the client's half-close
            await loop.sock_sendall(backend, down)
            backend.close()
            return got

        got_down, got_up = await asyncio.wait_for(asyncio.gather(client_side(), backend_side()), 30)
        assert await asyncio.wait_for(closed, 5) is None
        client.close()
        return relay, got_up, got_down

    relay, got_up, got_down = asyncio.run(run())
    assert got_up == b"NOOP\r\n" + up
    assert got_down == b"+OK hello\r\n" + down
    assert relay.bytes_up == len(got_up) and relay.bytes_down == len(got_down)
    assert relay.down.capacity > PIPE_DEFAULT  # grown for the big answer
    assert relay.up.rfd == -1 and relay.down.rfd == -1  # pipes closed


def test_short_session_keeps_the_default_pipe():
    async def run():
        loop = asyncio.get_running_loop()
        client, proxy_c = tcp_pair()
        proxy_b, backend = tcp_pair()
        for s in (client, proxy_c, proxy_b, backend):
            s.setblocking(False)
        closed = loop.create_future()
        relay = SpliceRelay(
            loop, proxy_c, proxy_b, to_client=b"+OK\r\n", pipe_size=1 << 20, idle_timeout=30, on_close=closed.set_result
        )
        relay.start()
        await loop.sock_sendall(client, b"QUIT\r\n")
        assert await loop.sock_recv(backend, 100) == b"QUIT\r\n"
        await loop.sock_sendall(backend, b"+OK Bye.\r\n")
        backend.close()
        got = await asyncio.wait_for(read_all(loop, client), 10)
        await asyncio.wait_for(closed, 5)
        client.close()
        return relay, got

    relay, got = asyncio.run(run())
    assert got == b"+OK\r\n+OK Bye.\r\n"
    assert relay.down.capacity == PIPE_DEFAULT
