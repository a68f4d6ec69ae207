"""Failover keeps sticky clients on their backends: 200 clients (each its own source address,
127.1.0.x) are pinned through halbd ``a`` (HTTP listener, source-IP stickiness, round-robin
pool of four backends); ``a`` is killed with SIGKILL and every client then goes through
halbd ``b``: each one must land on the very backend it had, which ``b`` only knows from the
replicated sticky table (its own round robin, visited in another order, would scatter them).
"""

from __future__ import annotations

import asyncio
import http.client
import random
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from halb.sync.client import fetch_tables
from tests.helpers import Backends, Halbd, free_port, wait_for, write_config

@pytest.fixture
def own_tmp():
    """A directory of our own, not tmp_path: other pytest sessions on this machine rotate
    /tmp/pytest-of-<user> and would delete a running test's configs and logs."""
    d = Path(tempfile.mkdtemp(prefix="halb-sync-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

BACKENDS = ["s1", "s2", "s3", "s4"]
CLIENTS = [f"127.1.0.{i}" for i in range(1, 201)]


def config(tmp, name, http_port, sync_port, peers, bk):
    be = "".join(f'[[pools.backends]]\nname = "{n}"\naddress = "{bk.http[n]}"\n' for n in BACKENDS)
    ps = "".join(f'[[sync.peers]]\nname = "{n}"\naddress = "127.0.0.1:{p}"\n' for n, p in peers)
    return write_config(tmp, f'''
[node]
name = "{name}"
state_dir = "{tmp}"
[[pools]]
name = "web"
algorithm = "roundrobin"
[pools.sticky]
mode = "source"
ttl = "10m"
{be}
[[listeners]]
name = "www"
mode = "http"
bind = "127.0.0.1:{http_port}"
pool = "web"
[sync]
listen = "127.0.0.1:{sync_port}"
insecure = true
{ps}''', name=f"{name}.toml")


def backend_for(port: int, src: str) -> str:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(src, 0))
    try:
        c.request("GET", "/who")
        r = c.getresponse()
        r.read()
        assert r.status == 200, r.status
        return r.getheader("X-Backend")
    finally:
        c.close()


def test_sticky_clients_keep_their_backends_after_the_node_dies(own_tmp):
    tmp_path = own_tmp
    ha, hb, sa, sb, probe = (free_port() for _ in range(5))
    with Backends(BACKENDS, http=True) as bk:
        ca = config(tmp_path, "a", ha, sa, [("b", sb), ("probe", probe)], bk)
        cb = config(tmp_path, "b", hb, sb, [("a", sa), ("probe", probe)], bk)
        with Halbd(ca) as a, Halbd(cb) as b:
            a.wait_port(ha)
            b.wait_port(hb)
            before = {src: backend_for(ha, src) for src in CLIENTS}
            assert set(before.values()) == set(BACKENDS)  # spread over all four

            def replicated():
                t = asyncio.run(fetch_tables(f"127.0.0.1:{sb}", "probe", timeout=10))["sticky"]
                return sum(1 for src in CLIENTS if (e := t.get(f"src/web/{src}")) is not None
                           and e.backend == before[src]) == len(CLIENTS)
            wait_for(replicated, 15, interval=0.2, what="b holds every client's sticky entry")

            a.signal(signal.SIGKILL)
            a.p.wait(5)
            order = CLIENTS[:]
            random.Random(7).shuffle(order)
            after = {src: backend_for(hb, src) for src in order}
            moved = {s: (before[s], after[s]) for s in CLIENTS if before[s] != after[s]}
            assert not moved, f"{len(moved)} of {len(CLIENTS)} clients moved: {list(moved.items())[:5]}"
            # control: clients b has never seen are spread by its own round robin
            fresh = {backend_for(hb, f"127.2.0.{i}") for i in range(1, 9)}
            assert len(fresh) > 1
