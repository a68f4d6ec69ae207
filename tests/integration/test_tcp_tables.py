"""The TCP proxy's table records, checked on an in-process Node (real sockets, real backends):
the flow table holds each relayed connection while it lives; source stickiness writes the
sticky table and honours an entry replicated from a peer; a health-down sticky backend is
left for another."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest

from halb.config import loads
from halb.node import Node
from halb.tables import Entry, Op, flow_key, sticky_key
from tests.helpers import Backends, free_port, until

pytestmark = pytest.mark.integration

NAMES = ["t1", "t2", "t3"]


@pytest.fixture(scope="module")
def backends():
    with Backends(NAMES, http=False, tcp=True) as bk:
        yield bk


@pytest.fixture
def state():
    d = Path(tempfile.mkdtemp(prefix="l4tt"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def config(bk, state: Path, port: int, sticky: str = "none") -> str:
    be = "".join(f'[[pools.backends]]\nname = "{n}"\naddress = "{bk.tcp[n]}"\n' for n in NAMES)
    return f'''
[node]
name = "n1"
state_dir = "{state}"
[[pools]]
name = "web"
[pools.sticky]
mode = "{sticky}"
ttl = "10m"
{be}
[[listeners]]
name = "l4"
mode = "tcp"
bind = "127.0.0.1:{port}"
pool = "web"
'''


async def who(port: int, src: str = "127.0.0.1"):
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    w.write(b"WHO\n")
    name = (await asyncio.wait_for(r.readline(), 5)).decode().strip()
    return name, r, w


def test_flow_table_holds_open_connections(backends, state):
    port = free_port()

    async def main():
        node = Node(loads(config(backends, state, port)))
        await node.start()
        try:
            conns = [await who(port) for _ in range(3)]
            flow = node.tables.flow
            assert len(flow) == 3
            for name, r, w in conns:
                ip, cport = w.get_extra_info("sockname")[:2]
                e = flow.get(flow_key("l4", "tcp", f"{ip}:{cport}"))
                assert e is not None
                assert (e.backend, e.pool, e.listener, e.proto, e.client) == (
                    name, "web", "l4", "tcp", f"{ip}:{cport}")
                assert e.origin == "n1" and e.expires > e.created
            assert sorted(n for n, _, _ in conns) == NAMES
            # every record is in the change log the state sync ships
            created = [c for c in flow.changes_since(0) if c.op == Op.CREATE]
            assert len(created) == 3
            for _, r, w in conns:
                w.close()
            await until(lambda: len(flow) == 0)
            assert sum(1 for c in flow.changes_since(0) if c.op == Op.DELETE) == 3
            assert node.pools["web"].by_name["t1"].active == 0
        finally:
            await node.stop()

    asyncio.run(main())


def test_source_stickiness_writes_and_honours_the_sticky_table(backends, state):
    port = free_port()

    async def main():
        node = Node(loads(config(backends, state, port, sticky="source")))
        await node.start()
        try:
            sticky = node.tables.sticky
            # a fresh client IP: picked by the algorithm, then recorded and kept
            first, _, w = await who(port, "127.0.0.2")
            w.close()
            e = sticky.get(sticky_key("src", "web", "127.0.0.2"))
            assert e is not None and e.backend == first and e.pool == "web"
            for _ in range(4):
                n, _, w = await who(port, "127.0.0.2")
                w.close()
                assert n == first
            # an entry replicated from a peer decides for a client this node never saw
            other = next(n for n in NAMES if n != first)
            now = node.wall.now()
            peer = Entry(sticky_key("src", "web", "127.0.0.3"), other, "web", now, now,
                         now + 600, "peer")
            assert sticky.apply(Op.CREATE, peer)
            for _ in range(3):
                n, _, w = await who(port, "127.0.0.3")
                w.close()
                assert n == other
            # the sticky backend goes down: the client moves and the entry follows it
            pool = node.pools["web"]
            pool.set_health(pool.by_name[other], False, node.clock.now())
            n, _, w = await who(port, "127.0.0.3")
            w.close()
            assert n != other
            assert sticky.get(sticky_key("src", "web", "127.0.0.3")).backend == n
        finally:
            await node.stop()

    asyncio.run(main())


def test_no_leaks_after_aborts_half_closes_and_bulk(backends, state):
    """200 concurrent connections that end every way a connection can (RST mid-stream, half
    close, plain close, bulk transfer): afterwards no connection, flow entry, backend count,
    pipe or file descriptor is left behind, and the node still serves."""
    import os
    import random
    import socket
    import struct

    port = free_port()

    async def one(i: int, rnd: random.Random):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        kind = i % 4
        payload = rnd.randbytes(rnd.choice([10, 1000, 200_000]))
        w.write(payload)
        if kind == 0:  # abort with RST while data is in flight both ways
            await asyncio.sleep(rnd.random() * 0.02)
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
            return
        if kind == 1:  # half close: the whole echo must still come back
            w.write_eof()
            got = await asyncio.wait_for(r.read(), 20)
            assert got == payload
            w.close()
            return
        got = await asyncio.wait_for(r.readexactly(len(payload)), 20)
        assert got == payload
        if kind == 2:
            w.close()
        else:  # leave without reading more, then close with unread data on our side
            w.write(b"x" * 1000)
            w.close()

    async def main():
        node = Node(loads(config(backends, state, port)))
        await node.start()
        lst = node.listeners[0]
        def fds(kind: str) -> int:
            n = 0
            for fd in os.listdir("/proc/self/fd"):
                try:
                    n += os.readlink(f"/proc/self/fd/{fd}").startswith(kind)
                except OSError:
                    pass
            return n

        pipes0, socks0 = fds("pipe:"), fds("socket:")
        try:
            rnd = random.Random(7)
            await asyncio.gather(*(one(i, rnd) for i in range(200)))
            await until(lambda: not lst.conns, 10)
            assert len(node.tables.flow) == 0
            assert all(b.active == 0 and b.inflight == 0 for b in node.pools["web"].backends)
            assert lst.pipes.created <= 2 * 200  # pipes are reused, not made per burst
            # only the pooled pipes (2 fds each) remain open beyond what we started with;
            # pipes still holding bytes of an aborted connection were closed with it
            await asyncio.sleep(0.1)
            assert fds("pipe:") == pipes0 + 2 * len(lst.pipes.free)
            assert fds("socket:") <= socks0 + 2  # (slack for a runtime's own lazy sockets)
            name, _, w = await who(port)
            assert name in NAMES
            w.close()
        finally:
            await node.stop()

    asyncio.run(main())


def test_ipv6_client_to_ipv4_backends(backends, state):
    import socket

    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    text = config(backends, state, port).replace(f'bind = "127.0.0.1:{port}"',
                                                 f'bind = "[::1]:{port}"')

    async def main():
        node = Node(loads(text))
        await node.start()
        try:
            r, w = await asyncio.open_connection("::1", port)
            w.write(b"WHO\nsix")
            name = (await asyncio.wait_for(r.readline(), 5)).decode().strip()
            assert name in NAMES
            assert await asyncio.wait_for(r.readexactly(3), 5) == b"six"
            cport = w.get_extra_info("sockname")[1]
            e = node.tables.flow.get(flow_key("l4", "tcp", f"[::1]:{cport}"))
            assert e is not None and e.client == f"[::1]:{cport}" and e.backend == name
            w.close()
        finally:
            await node.stop()

    asyncio.run(main())


def test_a_node_without_sync_keeps_a_short_log_and_no_tombstones(backends, state):
    """Nobody can read a standalone node's change log or needs its tombstones: under
    connection churn they held 300,000+ tuples. With [sync] both are kept in full."""
    port = free_port()

    async def main():
        node = Node(loads(config(backends, state, port)))
        await node.start()
        try:
            flow = node.tables.flow
            assert flow._log.maxlen == 4096 and not flow.keep_tombs
            for _ in range(20):
                _, r, w = await who(port)
                w.close()
            await until(lambda: flow.stats["deleted"] == 20)
            assert len(flow) == 0 and not flow._tombs
            assert sum(1 for c in flow.changes_since(0) if c.op == Op.DELETE) == 20
        finally:
            await node.stop()

    asyncio.run(main())
    synced = config(backends, state, port) + f'''
[sync]
listen = "127.0.0.1:{free_port()}"
max_backlog = 500000
insecure = true
[[sync.peers]]
name = "n2"
address = "127.0.0.1:{free_port()}"
'''
    node = Node(loads(synced))
    for t in node.tables:
        assert t._log.maxlen == 500_000 and t.keep_tombs
