"""Backend connection reuse and its safety, in-process with a real ``Node`` and scripted raw
backends: keep-alive reuse, a backend connection is pooled only after a clean response
(extra bytes, a body after a HEAD answer, broken framing or an early answer close it), and a
pooled connection the backend closed is retried transparently for idempotent requests."""

from __future__ import annotations

import asyncio

import pytest

from halb.config import loads
from halb.node import Node
from tests.helpers import free_port

pytestmark = pytest.mark.integration


class Scripted:
    """A raw HTTP backend; ``answer(path, method, conn_no, req_no_on_conn)`` returns the raw
    bytes to send (None: close without answering)."""

    def __init__(self, answer):
        self.answer = answer
        self.conns = 0
        self.requests: list[tuple[int, str]] = []  # (connection number, request line)

    async def start(self):
        self.srv = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.srv.sockets[0].getsockname()[1]

    async def _serve(self, r, w):
        self.conns += 1
        no = self.conns
        k = 0
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].decode()
                method, path = line.split(" ")[:2]
                for h in head.split(b"\r\n"):
                    if h.lower().startswith(b"content-length:"):
                        await r.readexactly(int(h.split(b":")[1]))
                k += 1
                self.requests.append((no, line))
                out = self.answer(path, method, no, k)
                if out is None:
                    break
                w.write(out)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        w.close()

    def close(self):
        self.srv.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b%b" % (len(body), body, extra)


async def request(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    cl = f"Content-Length: {len(body)}\r\n" if body else ""
    w.write(f"{method} {path} HTTP/1.1\r\nHost: t\r\n{cl}Connection: close\r\n\r\n".encode() + body)
    raw = await asyncio.wait_for(r.read(), 5)
    w.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


async def with_node(tmp_path, backend: Scripted, fn):
    await backend.start()
    port = free_port()
    node = Node(loads(f'''
[node]
name = "lb1"
state_dir = "{tmp_path}"
[[pools]]
name = "p"
retries = 1
[[pools.backends]]
name = "s"
address = "127.0.0.1:{backend.port}"
[[listeners]]
name = "h"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "p"
[listeners.timeouts]
server = 2
'''))
    await node.start()
    try:
        await fn(port, node)
    finally:
        await node.stop()
        backend.close()


def test_keepalive_reuse_and_doubtful_connections_closed(tmp_path):
    def answer(path, method, no, k):
        if path == "/extra":
            return ok(b"x", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!")  # unasked
        if path == "/headbody" and method == "HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"  # a body after HEAD
        if path == "/chunked":
            return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        if path == "/badframe":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        return ok(f"{path} on conn {no}".encode())
    be = Scripted(answer)

    async def run(port, node):
        for i in range(10):
            st, body = await request(port, "GET", f"/r{i}")
            assert (st, body) == (200, f"/r{i} on conn 1".encode())
        assert be.conns == 1  # ten clients, one reused backend connection
        st, body = await request(port, "GET", "/extra")
        assert (st, body) == (200, b"x")
        st, body = await request(port, "GET", "/after-extra")
        assert (st, body) == (200, b"/after-extra on conn 2")  # the doubtful conn was closed
        st, body = await request(port, "HEAD", "/headbody")
        assert st == 200 and body == b""
        st, body = await request(port, "GET", "/after-head")
        assert st == 200 and body.startswith(b"/after-head on conn ") and b"EVIL" not in body
        assert be.conns == 3
        st, body = await request(port, "GET", "/badframe")
        assert st == 502 and b"backend failed" in body
        st, body = await request(port, "GET", "/after-bad")
        assert st == 200 and body == b"/after-bad on conn 4"
        # a chunked answer: re-chunked for an HTTP/1.1 client, de-chunked (until close) for 1.0
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /chunked HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(r.read(), 5)
        w.close()
        assert b"Transfer-Encoding: chunked" in raw
        assert raw.endswith(b"\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /chunked HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        raw = await asyncio.wait_for(r.read(), 5)  # closed after the body: no length to go by
        w.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"chunked" not in head.lower() and b"Connection: close" in head
        assert body == b"hello world"
        b = node.pools["p"].backends[0]
        assert b.active == 0 and b.inflight == 0

    asyncio.run(with_node(tmp_path, be, run))


def test_stale_pooled_connection_retried_for_idempotent_only(tmp_path):
    # the backend answers the first request on each connection and silently closes on the
    # second: the proxy's pooled connection turns out dead when it is reused
    be = Scripted(lambda path, method, no, k: ok(f"{path} {no}".encode()) if k == 1 else None)

    async def run(port, node):
        statuses = []
        for i in range(6):
            st, body = await request(port, "GET", f"/g{i}")
            statuses.append(st)
            assert body.startswith(f"/g{i} ".encode())
        assert statuses == [200] * 6
        # the dead pooled connections did see the retried requests first
        assert sum(1 for no, line in be.requests if line.startswith("GET /g")) > 6
        b = node.pools["p"].backends[0]
        assert b.failures == 0  # a stale keep-alive connection is not a backend failure
        # the last GET's fresh connection went back to the pool, where it is now stale: a POST
        # on it is not replayed (it may have been acted on): 502, seen once by the backend
        st, body = await request(port, "POST", "/p0", b"data")
        assert st == 502
        assert [line for _, line in be.requests].count("POST /p0 HTTP/1.1") == 1
        st, body = await request(port, "POST", "/p1", b"data")  # the pool is empty now: fresh
        assert (st, body[:4]) == (200, b"/p1 ")

    asyncio.run(with_node(tmp_path, be, run))


def test_early_answer_before_body_closes_backend_connection(tmp_path):
    """A backend that answers (413) before reading the whole body: the connection is not
    pooled, the client connection is closed after the answer."""
    async def serve(r, w):
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nno\n")
        await w.drain()
        await asyncio.sleep(1)
        w.close()

    async def main():
        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        bport = srv.sockets[0].getsockname()[1]
        port = free_port()
        node = Node(loads(f'''
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
'''))
        await node.start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
            raw = await asyncio.wait_for(r.read(), 5)  # read() returns at EOF: closed by us
            assert raw.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in raw
            w.close()
            lst = node.listeners[0].idle.get(node.pools["p"].backends[0], [])
            assert lst == []
        finally:
            await node.stop()
            srv.close()

    asyncio.run(main())


def test_close_delimited_and_interim_responses(tmp_path):
    """A backend answering HTTP/1.0-style (no length, body until close) reaches an HTTP/1.1
    client chunked (keep-alive kept) and an HTTP/1.0 client close-delimited; a 100 Continue
    before the final answer is passed on to HTTP/1.1 clients."""
    async def serve(r, w):
        head = await r.readuntil(b"\r\n\r\n")
        if b" /interim " in head:
            w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await w.drain()
            await r.readexactly(4)
            w.write(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone")
            await w.drain()
            await r.read()
            w.close()
            return
        w.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for i in range(3):
            w.write(b"part%d;" % i)
            await w.drain()
            await asyncio.sleep(0.01)
        w.close()

    async def main():
        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        bport = srv.sockets[0].getsockname()[1]
        port = free_port()
        node = Node(loads(f'''
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
'''))
        await node.start()
        try:
            # HTTP/1.1 client: chunked, and the client connection stays usable
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert b"Transfer-Encoding: chunked" in head and b"Connection: close" not in head
            body = await asyncio.wait_for(r.readuntil(b"0\r\n\r\n"), 5)
            assert body == b"6\r\npart0;\r\n6\r\npart1;\r\n6\r\npart2;\r\n0\r\n\r\n"
            w.write(b"GET /b HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            rest = await asyncio.wait_for(r.read(), 5)
            assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"0\r\n\r\n")
            w.close()
            # HTTP/1.0 client: body until close
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /c HTTP/1.0\r\n\r\n")
            raw = await asyncio.wait_for(r.read(), 5)
            head, _, body = raw.partition(b"\r\n\r\n")
            assert b"Connection: close" in head and b"chunked" not in head
            assert body == b"part0;part1;part2;"
            w.close()
            # 100 Continue passes through, then the final answer
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"PUT /interim HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
            first = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert first == b"HTTP/1.1 100 Continue\r\nVia: 1.1 halb\r\n\r\n"
            w.write(b"data")
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 201 ")
            assert await asyncio.wait_for(r.readexactly(4), 5) == b"done"
            w.close()
            b = node.pools["p"].backends[0]
            await asyncio.sleep(0.05)
            assert b.active == 0
        finally:
            await node.stop()
            srv.close()

    asyncio.run(main())


def test_graceful_stop_finishes_the_answer_in_flight(tmp_path):
    async def serve(r, w):
        await r.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.4)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
        await w.drain()
        w.close()

    async def main():
        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        bport = srv.sockets[0].getsockname()[1]
        port = free_port()
        node = Node(loads(f'''
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
'''))
        await node.start()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.sleep(0.1)
        stop = asyncio.create_task(node.stop())
        raw = await asyncio.wait_for(r.read(), 5)
        assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"slow")
        assert b"Connection: close" in raw
        assert await asyncio.wait_for(idle_r.read(), 5) == b""  # idle connections closed
        await asyncio.wait_for(stop, 5)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        w.close()
        idle_w.close()
        srv.close()

    asyncio.run(main())


# Responses a backend must not send: each is answered 502 to the client (nothing of it is
# forwarded), its connection is dropped, and the next request gets a fresh connection.
BAD_RESPONSES = {
    "/cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "/cl-differ": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "/cl-junk": b"HTTP/1.1 200 OK\r\nContent-Length: 3x\r\n\r\nabc",
    "/bare-lf": b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 3\r\n\r\nabc",
    "/nul": b"HTTP/1.1 200 OK\r\nX-A: 1\x002\r\nContent-Length: 3\r\n\r\nabc",
    "/fold": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\nContent-Length: 3\r\n\r\nabc",
    "/status": b"HTTP/1.1 2OO OK\r\nContent-Length: 3\r\n\r\nabc",
    "/version": b"HTTP/2.0 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    "/switch": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
    "/not-http": b"garbage\r\n\r\n",
}


def test_malformed_responses_get_502_and_their_connection_is_dropped(tmp_path):
    def answer(path, method, no, k):
        return BAD_RESPONSES.get(path) or ok(f"{path} on conn {no}".encode())
    be = Scripted(answer)

    async def run(port, node):
        st, body = await request(port, "GET", "/first")
        assert (st, body) == (200, b"/first on conn 1")
        for path in BAD_RESPONSES:
            conns = be.conns
            st, body = await request(port, "POST", path, b"x")  # not retried: seen once
            assert st == 502 and b"backend failed" in body, (path, st, body)
            st, body = await request(port, "GET", "/after")
            assert (st, body) == (200, f"/after on conn {conns + 1}".encode()), path
        seen = [line for _, line in be.requests]
        assert all(seen.count(f"POST {p} HTTP/1.1") == 1 for p in BAD_RESPONSES)
        b = node.pools["p"].backends[0]
        assert b.active == 0 and b.inflight == 0

    asyncio.run(with_node(tmp_path, be, run))


def test_bad_chunking_after_the_head_cuts_the_client_off(tmp_path):
    """Broken chunked framing once the head went out: the client sees its response cut (no
    clean end), the backend connection is dropped, the next request is served fresh."""
    def answer(path, method, no, k):
        if path == "/badchunk":
            return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\nzz\r\nnever\r\n0\r\n\r\n")
        return ok(f"{path} on conn {no}".encode())
    be = Scripted(answer)

    async def run(port, node):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /badchunk HTTP/1.1\r\nHost: t\r\n\r\n")
        raw = await asyncio.wait_for(r.read(), 5)  # read to the close
        w.close()
        assert raw.startswith(b"HTTP/1.1 200 ") and b"never" not in raw
        assert not raw.endswith(b"0\r\n\r\n")  # no clean end: the client knows it is cut
        st, body = await request(port, "GET", "/after")
        assert (st, body) == (200, b"/after on conn 2")

    asyncio.run(with_node(tmp_path, be, run))
