"""Backend response heads that arrive in pieces, after CR LFs, behind an interim answer or too
large: the proxy takes the head from its raw bytes once ResponseFramer has checked it (no
Python call per header), so every way a head can be cut across reads must come out whole and
right."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.test_http_backend_conns import request, with_node

pytestmark = pytest.mark.integration


class Dribbler:
    """A raw backend that sends ``raw`` for every request, ``step`` bytes per write."""

    def __init__(self, raw: bytes, step: int):
        self.raw = raw
        self.step = step

    async def start(self):
        self.srv = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.srv.sockets[0].getsockname()[1]

    async def _serve(self, r, w):
        try:
            await r.readuntil(b"\r\n\r\n")
            for i in range(0, len(self.raw), self.step):
                w.write(self.raw[i:i + self.step])
                await w.drain()
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.2)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        w.close()

    def close(self):
        self.srv.close()


async def raw_request(port: int) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(r.read(), 10)
    w.close()
    return raw


HEAD = (b"HTTP/1.1 200 OK\r\nServer: dribble\r\nConnection: keep-alive, X-Hop\r\n"
        b"X-Hop: secret\r\nKeep-Alive: timeout=5\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 11\r\n\r\nhello world")


@pytest.mark.parametrize("prefix", [b"", b"\r\n", b"HTTP/1.1 100 Continue\r\n\r\n"])
@pytest.mark.parametrize("step", [1, 7, 4096])
def test_response_head_in_pieces(tmp_path, prefix, step):
    async def go(port, node):
        raw = await raw_request(port)
        head, _, body = raw.partition(b"\r\n\r\n")
        if prefix.startswith(b"HTTP/1.1 100"):  # the interim answer is passed on first
            assert head == b"HTTP/1.1 100 Continue\r\nVia: 1.1 halb"
            head, _, body = body.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"HTTP/1.1 200 OK"
        names = [ln.split(b":")[0].lower() for ln in lines[1:]]
        assert names == [b"server", b"content-type", b"content-length", b"connection", b"via"]
        assert b"Connection: close" in lines  # ours; the backend's hop-by-hop lines are gone
        assert body == b"hello world"
    asyncio.run(with_node(tmp_path, Dribbler(prefix + HEAD, step), go))


def test_response_head_too_large_is_502(tmp_path):
    big = b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\nContent-Length: 0\r\n\r\n"

    async def go(port, node):
        status, _ = await request(port, "GET", "/big")
        assert status == 502
    asyncio.run(with_node(tmp_path, Dribbler(big, 8192), go))
