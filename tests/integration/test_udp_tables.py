"""The UDP proxy's flow-table records on an in-process Node: one entry per client flow with
what was routed, removed when the flow expires; an entry replicated from a peer sends the
client to the backend the peer chose."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from halb.config import loads
from halb.node import Node
from halb.tables import Entry, Op, flow_key, sticky_key
from tests.helpers import Backends, free_port, split_hostport, until

pytestmark = pytest.mark.integration

NAMES = ["u1", "u2", "u3"]


def udp_ready(addr: str, timeout: float = 15.0) -> None:
    """Waits until the UDP echo backend at ``addr`` answers (a fresh process may be slow)."""
    host, port = split_hostport(addr)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                s.sendto(b"ping", (host, port))
                if s.recvfrom(100)[0].endswith(b"|ping"):
                    return
            except OSError:  # timeout, or refused while it is not bound yet
                time.sleep(0.05)
    raise TimeoutError(f"UDP backend {addr} does not answer")


@pytest.fixture(scope="module")
def backends():
    with Backends(NAMES, http=False, udp=True) as bk:
        for a in bk.udp.values():
            udp_ready(a)
        yield bk


@pytest.fixture
def state():
    d = Path(tempfile.mkdtemp(prefix="l4ut"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def config(bk, state: Path, port: int) -> str:
    be = "".join(f'[[pools.backends]]\nname = "{n}"\naddress = "{bk.udp[n]}"\n' for n in NAMES)
    return f'''
[node]
name = "n1"
state_dir = "{state}"
[[pools]]
name = "dns"
{be}
[[listeners]]
name = "u"
mode = "udp"
bind = "127.0.0.1:{port}"
pool = "dns"
udp_flow_timeout = "1s"
'''


async def ask(s: socket.socket, port: int, msg: bytes) -> str:
    loop = asyncio.get_running_loop()
    s.setblocking(False)
    await loop.sock_sendto(s, msg, ("127.0.0.1", port))
    data = await asyncio.wait_for(loop.sock_recv(s, 70000), 3)
    return data.partition(b"|")[0].decode()


def udp_client() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def test_flow_entries_record_routes_and_expire(backends, state):
    port = free_port(socket.SOCK_DGRAM)

    async def main():
        node = Node(loads(config(backends, state, port)))
        await node.start()
        clients = [udp_client() for _ in range(3)]
        try:
            flow = node.tables.flow
            routed = {}
            for c in clients:
                routed[c.getsockname()[1]] = await ask(c, port, b"hello")
            assert sorted(routed.values()) == NAMES
            assert len(flow) == 3
            socks = [f.sock for f in node.listeners[0].flows.values()]
            assert len(socks) == 3 and all(s.fileno() >= 0 for s in socks)
            for cport, name in routed.items():
                e = flow.get(flow_key("u", "udp", f"127.0.0.1:{cport}"))
                assert e is not None
                assert (e.backend, e.pool, e.listener, e.proto, e.client) == (
                    name, "dns", "u", "udp", f"127.0.0.1:{cport}")
            await until(lambda: len(flow) == 0, 5)  # idle 1s: flows and entries go
            assert {c.op for c in flow.changes_since(0)} >= {Op.CREATE}
            assert all(b.active == 0 for b in node.pools["dns"].backends)
            assert all(s.fileno() == -1 for s in socks)  # the flows' sockets are closed
        finally:
            for c in clients:
                c.close()
            await node.stop()

    asyncio.run(main())


def test_replicated_flow_entry_is_honoured(backends, state):
    port = free_port(socket.SOCK_DGRAM)

    async def main():
        node = Node(loads(config(backends, state, port)))
        await node.start()
        c = udp_client()
        try:
            cport = c.getsockname()[1]
            now = node.wall.now()
            # a peer routed this client to u3 before a failover; round robin would say u1
            e = Entry(flow_key("u", "udp", f"127.0.0.1:{cport}"), "u3", "dns", now, now,
                      now + 60, "peer", client=f"127.0.0.1:{cport}", listener="u", proto="udp")
            assert node.tables.flow.apply(Op.CREATE, e)
            for _ in range(3):
                assert await ask(c, port, b"q") == "u3"
            other = udp_client()
            try:
                assert await ask(other, port, b"q") == "u1"  # others still balanced
            finally:
                other.close()
        finally:
            c.close()
            await node.stop()

    asyncio.run(main())


def test_ipv6_clients_get_replies_from_the_v6_listener(backends, state):
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    text = config(backends, state, port).replace(f'bind = "127.0.0.1:{port}"',
                                                 f'bind = "[::1]:{port}"')

    async def main():
        node = Node(loads(text))
        await node.start()
        c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        c.bind(("::1", 0))
        c.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendto(c, b"v6?", ("::1", port))
            data, src = await asyncio.wait_for(loop.sock_recvfrom(c, 1000), 3)
            name, _, payload = data.partition(b"|")
            assert name.decode() in NAMES and payload == b"v6?"
            assert src[:2] == ("::1", port)
            cport = c.getsockname()[1]
            e = node.tables.flow.get(flow_key("u", "udp", f"[::1]:{cport}"))
            assert e is not None and e.backend == name.decode()
        finally:
            c.close()
            await node.stop()

    asyncio.run(main())


def test_wildcard_listener_answers_from_the_address_the_client_used(backends, state):
    port = free_port(socket.SOCK_DGRAM)
    text = config(backends, state, port).replace(f'bind = "127.0.0.1:{port}"',
                                                 f'bind = "0.0.0.0:{port}"')

    async def main():
        node = Node(loads(text))
        await node.start()
        loop = asyncio.get_running_loop()
        clients = []
        try:
            for dst in ("127.0.0.2", "127.0.0.3"):  # loopback aliases: not the routing source
                c = udp_client()
                c.setblocking(False)
                clients.append(c)
                for i in range(2):  # the flow's first datagram and a later one
                    await loop.sock_sendto(c, b"where%d" % i, (dst, port))
                    data, src = await asyncio.wait_for(loop.sock_recvfrom(c, 1000), 3)
                    assert data.endswith(b"|where%d" % i)
                    assert src == (dst, port)  # a client with a connected socket accepts it
        finally:
            for c in clients:
                c.close()
            await node.stop()

    asyncio.run(main())


def test_source_stickiness_keeps_an_ip_on_one_backend_across_flows(backends, state):
    port = free_port(socket.SOCK_DGRAM)
    text = config(backends, state, port).replace('name = "dns"\n',
                                                 'name = "dns"\n[pools.sticky]\nmode = "source"\n', 1)

    async def main():
        node = Node(loads(text))
        await node.start()
        clients = [udp_client() for _ in range(4)]  # one IP, four ports: four flows
        try:
            names = {await ask(c, port, b"s") for c in clients}
            assert len(names) == 1  # round robin alone would spread four flows over three
            e = node.tables.sticky.get(sticky_key("src", "dns", "127.0.0.1"))
            assert e is not None and e.backend in names
            other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            other.bind(("127.0.0.2", 0))
            try:
                await ask(other, port, b"s")
                assert node.tables.sticky.get(sticky_key("src", "dns", "127.0.0.2")) is not None
            finally:
                other.close()
        finally:
            for c in clients:
                c.close()
            await node.stop()

    asyncio.run(main())
