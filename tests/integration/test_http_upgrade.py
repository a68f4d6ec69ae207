"""HTTP/1.1 completeness (issue 17), in-process with a real ``Node``: WebSocket through halb
with the real ``websockets`` library (plain and TLS), tunnels and their timeouts, upgrade
offers halb does not carry, 1xx with fields, trailers both ways, Via, raw UTF-8 targets."""

from __future__ import annotations

import asyncio
import ssl
import time

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

from halb.config import loads
from halb.node import Node
from tests.helpers import free_port

pytestmark = pytest.mark.integration


def config(tmp_path, bport: int, port: int, extra: str = "", tls: tuple | None = None,
           timeouts: str = "") -> str:
    t = ""
    if tls:
        t = f'''
[[listeners.tls.certificates]]
cert = "{tls[0]}"
key = "{tls[1]}"
'''
    return f'''
[node]
name = "lb1"
state_dir = "{tmp_path}"
[[pools]]
name = "p"
[[pools.backends]]
name = "s"
address = "127.0.0.1:{bport}"
[[listeners]]
name = "h"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "p"
{extra}
{t}
{timeouts}
'''


async def with_node(cfg: str, fn):
    node = Node(loads(cfg))
    await node.start()
    try:
        return await fn(node)
    finally:
        await node.stop()


class Raw:
    """A raw backend: ``answer(head, body) -> bytes | None`` per request (None: close);
    records every request's head and body as read (Content-Length or chunked, with the
    chunked framing kept as it came)."""

    def __init__(self, answer):
        self.answer = answer
        self.seen: list[tuple[bytes, bytes]] = []

    async def start(self):
        self.srv = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.srv.sockets[0].getsockname()[1]
        return self

    async def _serve(self, r, w):
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                body = b""
                low = head.lower()
                if b"transfer-encoding: chunked" in low:
                    while True:
                        line = await r.readuntil(b"\r\n")
                        body += line
                        size = int(line.split(b";")[0], 16)
                        if size == 0:
                            while True:
                                t = await r.readuntil(b"\r\n")
                                body += t
                                if t == b"\r\n":
                                    break
                            break
                        body += await r.readexactly(size + 2)
                else:
                    for h in head.split(b"\r\n"):
                        if h.lower().startswith(b"content-length:"):
                            body = await r.readexactly(int(h.split(b":")[1]))
                self.seen.append((head, body))
                out = self.answer(head, body)
                if out is None:
                    break
                w.write(out)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        w.close()

    def close(self):
        self.srv.close()


def run_raw(tmp_path, answer, go, extra: str = "") -> None:
    """``go(node, port, backend)`` against a node whose pool is one ``Raw(answer)`` backend."""
    async def main():
        be = await Raw(answer).start()
        port = free_port()
        try:
            await with_node(config(tmp_path, be.port, port, extra),
                            lambda node: go(node, port, be))
        finally:
            be.close()
    asyncio.run(main())


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\n%bContent-Length: %d\r\n\r\n%b" % (extra, len(body), body)


async def read_response(r) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    n = 0
    for h in head.split(b"\r\n"):
        if h.lower().startswith(b"content-length:"):
            n = int(h.split(b":")[1])
    return head, await asyncio.wait_for(r.readexactly(n), 5)


def metric(node, name, **labels):
    return node.metrics.value(name, labels) or 0.0


# -- WebSocket -------------------------------------------------------------------------------


async def echo(ws):
    try:
        async for msg in ws:
            await ws.send(msg)
    except ConnectionClosed:
        pass


def test_websocket_echoes_through_halb_and_closes(tmp_path):
    """The websockets client and server through halb: handshake, 100 echoes, close; the
    tunnel is counted, the backend's active count returns to 0."""
    async def main():
        async with ws_serve(echo, "127.0.0.1", 0, ping_interval=None) as srv:
            bport = srv.sockets[0].getsockname()[1]
            port = free_port()

            async def go(node):
                async with ws_connect(f"ws://127.0.0.1:{port}/chat", ping_interval=None,
                                      open_timeout=5) as ws:
                    assert ws.response.status_code == 101
                    assert ws.response.headers["Via"] == "1.1 halb"
                    for i in range(100):
                        msg = f"message {i} " + "x" * i
                        await ws.send(msg)
                        assert await asyncio.wait_for(ws.recv(), 5) == msg
                    big = b"\x00\xff" * 100_000  # a 200 kB binary frame (backpressure path)
                    await ws.send(big)
                    assert await asyncio.wait_for(ws.recv(), 10) == big
                    assert metric(node, "halb_http_tunnels_active", listener="h") == 1
                assert ws.close_code == 1000
                assert metric(node, "halb_http_upgrades_total", listener="h",
                              protocol="websocket") == 1
                for _ in range(100):
                    if metric(node, "halb_http_tunnels_active", listener="h") == 0:
                        break
                    await asyncio.sleep(0.02)
                assert metric(node, "halb_http_tunnels_active", listener="h") == 0
                assert node.pools["p"].backends[0].active == 0
                # the listener still serves plain HTTP and upgrades alike afterwards
                async with ws_connect(f"ws://127.0.0.1:{port}/again", ping_interval=None) as ws:
                    await ws.send("again")
                    assert await asyncio.wait_for(ws.recv(), 5) == "again"
            await with_node(config(tmp_path, bport, port), go)
    asyncio.run(main())


def test_idle_tunnel_outlives_keepalive_timeout_and_closes_at_tunnel_timeout(tmp_path):
    """An idle WebSocket is kept past the keep-alive timeout (client_idle = 0.3 s) and closed
    by halb once idle for timeouts.tunnel (1.5 s), counted from the last byte either way."""
    async def main():
        async with ws_serve(echo, "127.0.0.1", 0, ping_interval=None) as srv:
            bport = srv.sockets[0].getsockname()[1]
            port = free_port()
            t = '[listeners.timeouts]\nclient_idle = "300ms"\ntunnel = "1500ms"\n'

            async def go(node):
                async with ws_connect(f"ws://127.0.0.1:{port}/", ping_interval=None,
                                      close_timeout=1) as ws:
                    await asyncio.sleep(1.0)  # past client_idle, within the tunnel timeout
                    await ws.send("still here")
                    assert await asyncio.wait_for(ws.recv(), 5) == "still here"
                    last = time.monotonic()
                    with pytest.raises(ConnectionClosed):
                        await asyncio.wait_for(ws.recv(), 10)
                    idle = time.monotonic() - last
                assert 1.4 <= idle <= 3.0, f"closed after {idle:.2f} s idle"
            await with_node(config(tmp_path, bport, port, timeouts=t), go)
    asyncio.run(main())


def test_websocket_through_tls_termination(tmp_path):
    from tests.integration.test_http_proxy import _make_cert
    cert, key, _ = _make_cert(tmp_path, "ws.test")

    async def main():
        async with ws_serve(echo, "127.0.0.1", 0, ping_interval=None) as srv:
            bport = srv.sockets[0].getsockname()[1]
            port = free_port()
            ctx = ssl.create_default_context(cafile=str(cert))
            ctx.check_hostname = False

            async def go(node):
                async with ws_connect(f"wss://127.0.0.1:{port}/tls", ssl=ctx,
                                      ping_interval=None) as ws:
                    for i in range(100):
                        await ws.send(f"tls {i}")
                        assert await asyncio.wait_for(ws.recv(), 5) == f"tls {i}"
                assert ws.close_code == 1000
            await with_node(config(tmp_path, bport, port, tls=(cert, key)), go)
    asyncio.run(main())


def test_upgrade_offer_headers_reach_the_backend_and_a_declined_offer_goes_on(tmp_path):
    """The offer goes on with Connection: upgrade and its Upgrade (and its Sec-WebSocket-*);
    a backend that declines (426 here) leaves an ordinary exchange, and the request the client
    pipelined right behind the offer is served next on the same connection."""
    async def go(node, port, be):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, Upgrade\r\n"
                b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
                b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")
        head, _ = await read_response(r)
        assert head.startswith(b"HTTP/1.1 426 ")
        head, body = await read_response(r)
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"next"
        w.close()
        first = be.seen[0][0]
        assert b"\r\nConnection: upgrade\r\nUpgrade: websocket\r\n" in first
        assert b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==" in first
        assert be.seen[1][0].startswith(b"GET /after ")
        assert b"upgrade" not in be.seen[1][0].lower()
        assert metric(node, "halb_http_upgrades_total", listener="h",
                      protocol="websocket") == 0
    run_raw(tmp_path, lambda h, b: b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n"
            if b"upgrade" in h.lower() else ok(b"next"), go)


def test_upgrade_offer_with_a_body_is_forwarded_as_an_ordinary_request(tmp_path):
    """POST with Connection: Upgrade, Upgrade: foo/1 and a body (issue 17: was 501): forwarded
    with its body and without the offer, then the next request on the connection; the same
    for a chunked body."""
    async def go(node, port, be):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /form HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: foo/1\r\n"
                b"Sec-WebSocket-Key: x\r\nContent-Length: 5\r\n\r\nhello"
                b"POST /c HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: foo/1\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
        head, body = await read_response(r)
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"got hello"
        head, body = await read_response(r)
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"got 3\r\nabc\r\n0\r\n\r\n"
        head, body = await read_response(r)
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"got "
        w.close()
        heads = [h for h, _ in be.seen]
        assert [h.split(b" ")[1] for h in heads] == [b"/form", b"/c", b"/next"]
        for h in heads[:2]:
            low = h.lower()
            assert b"upgrade" not in low and b"sec-websocket" not in low
    run_raw(tmp_path, lambda h, b: ok(b"got " + b), go)


def test_offers_halb_does_not_carry(tmp_path):
    """Sec-WebSocket-* without an Upgrade are not forwarded; an h2c offer is served as plain
    HTTP/1.1 (halb routes each request: HTTP/2 is not tunnelled); a 101 to a request that
    offered nothing is a backend error (502)."""
    def answer(h, b):
        if b" /switch " in h:
            return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
        return ok()
    async def go(node, port, be):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /a HTTP/1.1\r\nHost: t\r\nSec-WebSocket-Key: k\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
                b"GET /b HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
                b"GET /switch HTTP/1.1\r\nHost: t\r\n\r\n")
        for _ in range(2):
            head, _ = await read_response(r)
            assert head.startswith(b"HTTP/1.1 200 ")
        head, _ = await read_response(r)
        assert head.startswith(b"HTTP/1.1 502 ")
        w.close()
        a, b = be.seen[0][0].lower(), be.seen[1][0].lower()
        assert b"sec-websocket" not in a
        assert b"upgrade" not in b and b"http2-settings" not in b
    run_raw(tmp_path, answer, go)


# -- 1xx, trailers ---------------------------------------------------------------------------


def test_early_hints_reach_the_client_with_their_fields(tmp_path):
    async def go(node, port, be):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        hints = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert hints.startswith(b"HTTP/1.1 103 Early Hints\r\n")
        assert b"\r\nLink: </style.css>; rel=preload\r\nLink: </app.js>; rel=preload\r\n" \
            in hints
        head, body = await read_response(r)
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"page"
        w.close()
        # an HTTP/1.0 client gets no interim response (RFC 9110 15.2)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET / HTTP/1.0\r\n\r\n")
        raw = await asyncio.wait_for(r.read(), 5)
        assert raw.startswith(b"HTTP/1.1 200 ") and b" 103 " not in raw
        w.close()
    run_raw(tmp_path, lambda h, b: b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload"
                       b"\r\nLink: </app.js>; rel=preload\r\n\r\n" + ok(b"page"), go)


def test_trailers_are_forwarded_both_ways(tmp_path):
    """A chunked response's trailers reach an HTTP/1.1 client; a chunked request's reach the
    backend; fields that must not be trailers (framing, routing) are left out."""
    async def go(node, port, be):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"4\r\ndata\r\n0\r\nX-Digest: sha-256=abc\r\nHost: evil\r\n\r\n")
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert b"Transfer-Encoding: chunked" in head
        body = await asyncio.wait_for(r.readuntil(b"\r\n0\r\n"), 5)
        assert body == b"5\r\nhello\r\n0\r\n"
        trailers = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert trailers == b"X-Checksum: abc123\r\nServer-Timing: db;dur=53\r\n\r\n"
        w.close()
        assert be.seen[0][1] == b"4\r\ndata\r\n0\r\nX-Digest: sha-256=abc\r\n\r\n"
    run_raw(tmp_path, lambda h, b: (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Checksum: abc123\r\nContent-Length: 99\r\n"
            b"Server-Timing: db;dur=53\r\n\r\n"), go)


# -- Via, targets ----------------------------------------------------------------------------


def test_via_is_added_both_ways_with_the_received_protocol(tmp_path):
    def answer(h, b):
        if b" /old " in h:
            return b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
        return ok(extra=b"Via: 1.1 app\r\n")
    async def go(node, port, be):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET / HTTP/1.1\r\nHost: t\r\nVia: 1.1 cdn\r\n\r\n")
        head, _ = await read_response(r)
        assert head.index(b"Via: 1.1 app") < head.index(b"Via: 1.1 halb")
        w.write(b"GET /old HTTP/1.1\r\nHost: t\r\n\r\n")
        head, _ = await read_response(r)
        assert b"\r\nVia: 1.0 halb\r\n" in head
        w.close()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /ten HTTP/1.0\r\n\r\n")
        await asyncio.wait_for(r.read(), 5)
        w.close()
        first, _, third = (h for h, _ in be.seen)
        assert first.index(b"Via: 1.1 cdn") < first.index(b"Via: 1.1 halb")
        assert b"\r\nVia: 1.0 halb\r\n" in third
    run_raw(tmp_path, answer, go)


@pytest.mark.parametrize("via,want", [('via = "edge-7"', b"Via: 1.1 edge-7"), ('via = ""', None)])
def test_via_pseudonym_and_off(tmp_path, via, want):
    async def go(node, port, be):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        head, _ = await read_response(r)
        w.close()
        sent = be.seen[0][0]
        if want is None:
            assert b"via" not in head.lower() and b"via" not in sent.lower()
        else:
            assert want in head and want in sent
    run_raw(tmp_path, lambda h, b: ok(), go, extra=via)


def test_raw_utf8_in_the_target_is_forwarded_as_it_came(tmp_path):
    """Bytes >= 0x80 in the request target (raw UTF-8) were refused with 400; nginx forwards
    them and they carry no framing risk: halb forwards them unchanged."""
    async def go(node, port, be):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        target = "/café/ünï?q=€".encode()
        w.write(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        head, _ = await read_response(r)
        assert head.startswith(b"HTTP/1.1 200 ")
        w.write(b"GET /plain HTTP/1.1\r\nHost: t\r\n\r\n")
        head, _ = await read_response(r)
        assert head.startswith(b"HTTP/1.1 200 ")
        w.close()
        assert be.seen[0][0].startswith(b"GET " + target + b" HTTP/1.1\r\n")
        assert be.seen[1][0].startswith(b"GET /plain HTTP/1.1\r\n")
        # high bytes anywhere else in the line are still refused
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write("GÉT / HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        raw = await asyncio.wait_for(r.read(), 5)
        assert raw.startswith(b"HTTP/1.1 400 ")
        w.close()
    run_raw(tmp_path, lambda h, b: ok(), go)
