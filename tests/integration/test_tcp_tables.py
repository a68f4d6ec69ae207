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
from tests.helpers import Backends, free_port

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


async def until(cond, timeout: float = 5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


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
