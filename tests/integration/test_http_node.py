"""The HTTP listener running in-process inside a real ``Node`` (real sockets, real lab
backends in the same loop): the sticky table holds what was routed (cookie and source
stickiness), an entry replicated from a peer is honoured, and the per-request accounting
(pool counters, metrics) adds up."""

from __future__ import annotations

import asyncio
import time

import pytest

from halb.config import loads
from halb.node import Node
from halb.tables import Entry, Op, sticky_key
from lab.backend import Backend as LabBackend
from tests.helpers import free_port

pytestmark = pytest.mark.integration

NAMES = ["b1", "b2", "b3"]


async def _request(port: int, path: str, *, src: str = "127.0.0.1", cookie: str = "",
                   method: str = "GET", body: bytes = b"") -> tuple[int, dict, bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    extra = f"Cookie: {cookie}\r\n" if cookie else ""
    if body:
        extra += f"Content-Length: {len(body)}\r\n"
    w.write(f"{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n".encode() + body)
    raw = await asyncio.wait_for(r.read(), 5)
    w.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    hdrs = {}
    for l in lines[1:]:
        k, _, v = l.partition(": ")
        hdrs[k.lower()] = v
    return int(lines[0].split()[1]), hdrs, payload


def _config(tmp, ports: dict[str, int], lport: int) -> str:
    bks = "\n".join(f'[[pools.backends]]\nname = "{n}"\naddress = "127.0.0.1:{p}"\n'
                    for n, p in ports.items())
    return f'''
[node]
name = "lb1"
state_dir = "{tmp}"
[[pools]]
name = "ck"
{bks}
[pools.sticky]
mode = "cookie"
cookie = "SRV"
ttl = 600
[[pools]]
name = "src"
{bks}
[pools.sticky]
mode = "source"
ttl = 600
[[listeners]]
name = "h"
mode = "http"
bind = "127.0.0.1:{lport}"
pool = "ck"
[[listeners.routes]]
pool = "src"
path_prefix = "/src"
'''


def test_sticky_table_holds_what_was_routed(tmp_path):
    async def main():
        ports = {n: free_port() for n in NAMES}
        labs = []
        for n, p in ports.items():
            lb = LabBackend(n)
            await lb.start(http=f"127.0.0.1:{p}")
            labs.append(lb)
        lport = free_port()
        node = Node(loads(_config(tmp_path, ports, lport)))
        await node.start()
        try:
            table = node.tables.sticky
            # cookie stickiness: the first answer sets the cookie and records the entry
            st, h, _ = await _request(lport, "/a")
            assert st == 200
            b = h["x-backend"]
            assert h["set-cookie"] == f"SRV={b}; path=/; HttpOnly"
            e = table.get(sticky_key("cookie", "ck", b))
            assert e is not None and (e.backend, e.pool, e.origin) == (b, "ck", "lb1")
            assert 590 < e.expires - time.time() <= 600
            for _ in range(10):
                st, h, _ = await _request(lport, "/a", cookie=f"SRV={b}")
                assert h["x-backend"] == b and "set-cookie" not in h
            # an unknown backend name in the cookie: the balancer picks and the cookie is re-set
            st, h, _ = await _request(lport, "/a", cookie="SRV=nope")
            assert h["set-cookie"].startswith(f"SRV={h['x-backend']};")
            # a drained backend keeps its sticky clients (HAProxy's drain) but gets no new ones
            ck = node.pools["ck"]
            ck.set_drain(ck.by_name[b], True, node.clock.now())
            for _ in range(5):
                st, h, _ = await _request(lport, "/a", cookie=f"SRV={b}")
                assert st == 200 and h["x-backend"] == b
            fresh = {(await _request(lport, "/a"))[1]["x-backend"] for _ in range(6)}
            assert b not in fresh and len(fresh) == 2
            ck.set_drain(ck.by_name[b], False, node.clock.now())

            # source stickiness: the client address maps to one backend, recorded in the table
            seen = {(await _request(lport, "/src", src="127.0.0.1"))[1]["x-backend"] for _ in range(6)}
            assert len(seen) == 1
            e = table.get(sticky_key("src", "src", "127.0.0.1"))
            assert e is not None and e.backend == seen.pop() and e.pool == "src"

            # an entry replicated from a peer (newer, other origin) is honoured
            now = time.time()
            key = sticky_key("src", "src", "127.0.0.2")
            target = "b3"
            assert table.apply(Op.CREATE, Entry(key, target, "src", now, now, now + 600, "lb2"))
            for _ in range(5):
                st, h, _ = await _request(lport, "/src", src="127.0.0.2")
                assert h["x-backend"] == target
            assert table.get(key).backend == target
            # ... until its backend goes down: then the client moves and the entry follows
            pool = node.pools["src"]
            pool.set_health(pool.by_name[target], False, node.clock.now())
            st, h, _ = await _request(lport, "/src", src="127.0.0.2")
            assert st == 200 and h["x-backend"] != target
            assert table.get(key).backend == h["x-backend"] and table.get(key).origin == "lb1"

            # accounting: nothing left in flight, every request counted at its backend
            await asyncio.sleep(0.05)
            for p in node.pools.values():
                for bk in p.backends:
                    assert bk.active == 0 and bk.inflight == 0
            total = sum(bk.total for p in node.pools.values() for bk in p.backends)
            assert total == 1 + 10 + 1 + 5 + 6 + 6 + 5 + 1
            served = sum(node.metrics.value("halb_backend_requests_total",
                                            {"pool": p, "backend": n}) or 0
                         for p in ("ck", "src") for n in NAMES)
            assert served == total
            assert node.metrics.value("halb_listener_connections_total", {"listener": "h"}) == total
        finally:
            await node.stop()
            for lb in labs:
                lb.close()

    asyncio.run(main())


def test_retry_of_idempotent_request_after_backend_closes(tmp_path):
    """A backend that accepts, reads the request and closes without answering: GETs are
    retried on another backend (and the failure reported to passive checks); a POST with a
    body is not retried and gets 502."""
    async def main():
        seen = {"closer": 0}

        async def closer(r, w):
            try:
                await r.readuntil(b"\r\n\r\n")
                seen["closer"] += 1
            except Exception:  # noqa: BLE001
                pass
            w.close()
        srv = await asyncio.start_server(closer, "127.0.0.1", 0)
        cport = srv.sockets[0].getsockname()[1]
        gport = free_port()
        lb = LabBackend("good")
        await lb.start(http=f"127.0.0.1:{gport}")
        lport = free_port()
        node = Node(loads(f'''
[node]
name = "lb1"
state_dir = "{tmp_path}"
[[pools]]
name = "p"
retries = 2
[[pools.backends]]
name = "closer"
address = "127.0.0.1:{cport}"
[[pools.backends]]
name = "good"
address = "127.0.0.1:{gport}"
[[listeners]]
name = "h"
mode = "http"
bind = "127.0.0.1:{lport}"
pool = "p"
'''))
        await node.start()
        try:
            for i in range(6):
                st, h, _ = await _request(lport, f"/g{i}")
                assert st == 200 and h["x-backend"] == "good"
            assert seen["closer"] >= 2  # round robin sent some there first
            closer_b = node.pools["p"].by_name["closer"]
            assert closer_b.failures == seen["closer"]
            before = seen["closer"]
            statuses = [(await _request(lport, "/post", method="POST", body=b"x" * 100))[0]
                        for _ in range(6)]
            hit = seen["closer"] - before
            assert hit >= 2 and statuses.count(502) == hit  # never retried
            assert statuses.count(200) == 6 - hit
        finally:
            await node.stop()
            lb.close()
            srv.close()

    asyncio.run(main())


def test_hash_key_header_and_http10_keepalive(tmp_path):
    """A maglev pool keyed on a request header: one header value, one backend; values spread
    over the pool. An HTTP/1.0 client asking for keep-alive gets it (and its answer says so)."""
    async def main():
        ports = {n: free_port() for n in NAMES}
        labs = []
        for n, p in ports.items():
            lb = LabBackend(n)
            await lb.start(http=f"127.0.0.1:{p}")
            labs.append(lb)
        lport = free_port()
        bks = "\n".join(f'[[pools.backends]]\nname = "{n}"\naddress = "127.0.0.1:{p}"\n'
                        for n, p in ports.items())
        node = Node(loads(f'''
[node]
name = "lb1"
state_dir = "{tmp_path}"
[[pools]]
name = "mg"
algorithm = "maglev"
maglev_table_size = 251
hash_key = "header:X-User"
{bks}
[[listeners]]
name = "h"
mode = "http"
bind = "127.0.0.1:{lport}"
pool = "mg"
'''))
        await node.start()
        try:
            async def backend_for(user: str) -> str:
                r, w = await asyncio.open_connection("127.0.0.1", lport)
                w.write(f"GET / HTTP/1.1\r\nHost: t\r\nX-User: {user}\r\nConnection: close\r\n\r\n".encode())
                raw = await asyncio.wait_for(r.read(), 5)
                w.close()
                return raw.split(b"X-Backend: ", 1)[1].split(b"\r\n", 1)[0].decode()
            users = [f"user{i}" for i in range(30)]
            first = {u: await backend_for(u) for u in users}
            for u in users[:10]:
                for _ in range(3):
                    assert await backend_for(u) == first[u]
            assert len(set(first.values())) == 3  # 30 keys spread over all three backends

            r, w = await asyncio.open_connection("127.0.0.1", lport)
            for i in range(3):
                w.write(b"GET /k%d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % i)
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
                assert b"Connection: keep-alive" in head
                n = int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
                body = await asyncio.wait_for(r.readexactly(n), 5)
                assert b'"path": "/k%d"' % i in body
            w.close()
        finally:
            await node.stop()
            for lb in labs:
                lb.close()

    asyncio.run(main())
