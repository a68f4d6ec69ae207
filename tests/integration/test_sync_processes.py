"""State sync between real halbd processes on loopback.

A feeder node ``f`` (halb.sync.standalone.SyncNode, a full sync peer on a real gRPC port, in a
thread of this process) writes 100,000 sticky entries; halbd processes ``a`` and ``b`` and the
feeder form a full mesh. ``a`` learns all of them; ``b`` starts and ``a`` is killed with
SIGKILL while it streams its snapshot to ``b`` (over a relay held to 1 MB/s, so the kill lands
mid-snapshot however fast the machine is); the feeder keeps writing and deleting while
``a`` is dead; ``a`` restarts (a new epoch) and every node converges on exactly the feeder's
table: no entry lost, none extra, every backend and version the same. What a process holds
is read over the Sync protocol itself (halb.sync.client.fetch_tables).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from halb.config import Endpoint, SyncConfig, SyncPeer
from halb.sync.client import fetch_tables
from halb.sync.standalone import SyncNode
from halb.tables import sticky_key
from tests.helpers import Halbd, free_port, wait_for, write_config

@pytest.fixture
def own_tmp():
    """A directory of our own, not tmp_path: other pytest sessions on this machine rotate
    /tmp/pytest-of-<user> and would delete a running test's configs and logs."""
    d = Path(tempfile.mkdtemp(prefix="halb-sync-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

N = 100_000


class LoopThread:
    """An asyncio loop in a thread, so the feeder serves while the test blocks on processes."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.t = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.t.start()

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *a):
        async def c():
            return fn(*a)
        return self.run(c())

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.t.join(5)


class SlowLink:
    """A TCP relay whose far-to-near direction is held to ``rate`` bytes/s (None: no limit),
    so that "kill the sender while it streams its snapshot" does not race the snapshot: at
    full loopback speed 100k entries cross in well under a second."""

    def __init__(self, target_port: int, rate: float | None):
        self.target = target_port
        self.rate = rate
        self.port = 0
        self.server = None

    async def start(self):
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _conn(self, cr, cw):
        try:
            fr, fw = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.target), 5)
        except (OSError, asyncio.TimeoutError):
            cw.close()
            return
        await asyncio.gather(self._pump(cr, fw, False), self._pump(fr, cw, True),
                             return_exceptions=True)

    async def _pump(self, r, w, slow):
        try:
            while True:
                data = await r.read(16384)
                if not data:
                    break
                w.write(data)
                await w.drain()
                if slow and self.rate:
                    await asyncio.sleep(len(data) / self.rate)
        finally:
            w.close()

    async def stop(self):
        self.server.close()


def halbd_config(tmp, name, port, peers):
    ps = "".join(f'[[sync.peers]]\nname = "{n}"\naddress = "127.0.0.1:{p}"\n' for n, p in peers)
    return write_config(tmp, f'''
[node]
name = "{name}"
state_dir = "{tmp}"
[[pools]]
name = "web"
[pools.sticky]
mode = "source"
max_entries = 200000
[[pools.backends]]
name = "web0"
address = "127.0.0.1:9"
[sync]
listen = "127.0.0.1:{port}"
batch_size = 1024
insecure = true
{ps}''', name=f"{name}.toml")


def logged(proc, event, peer):
    return f'"event":"{event}","peer":"{peer}"' in proc.output()


def test_100k_entries_replicate_and_survive_kill_9_of_the_sender(own_tmp):
    tmp_path = own_tmp
    pf, pa, pb = free_port(), free_port(), free_port()
    lt = LoopThread()
    f = SyncNode("f", SyncConfig(listen=Endpoint("127.0.0.1", pf),
                                 peers=(SyncPeer("a", Endpoint("127.0.0.1", pa)),
                                        SyncPeer("b", Endpoint("127.0.0.1", pb))),
                                 batch_size=1024))
    link = SlowLink(pa, rate=1_000_000)
    lt.run(link.start())
    ca = halbd_config(tmp_path, "a", pa, [("f", pf), ("b", pb)])
    cb = halbd_config(tmp_path, "b", pb, [("f", pf), ("a", link.port)])
    a = b = None

    def put(start, n, ttl=3600.0):
        t = f.tables.sticky
        for i in range(start, start + n):
            t.put(sticky_key("cookie", "web", f"client{i:06d}"), f"web{i % 5}", ttl, pool="web")

    def tables_of(port):
        return lt.run(fetch_tables(f"127.0.0.1:{port}", "f", timeout=60))["sticky"]

    def feeder_view():
        async def v():
            return {e.key: (e.backend, e.updated, e.origin) for e in f.tables.sticky.entries()
                    if e.expires > time.time()}
        return lt.run(v())

    try:
        lt.call(put, 0, N)
        lt.run(f.start())
        t0 = time.monotonic()
        a = Halbd(ca)
        wait_for(lambda: logged(a, "sync_learned", "f") or not a.alive(), 60, what="a learns from f")
        assert a.alive(), a.output()[-2000:]
        learn_s = time.monotonic() - t0
        got = tables_of(pa)
        assert len(got) == N, f"a holds {len(got)} of {N} entries"

        b = Halbd(cb)  # reaches a through the slow link: 1 MB/s, several seconds for 100k
        wait_for(lambda: logged(b, "sync_connected", "a"), 30, what="b connects to a")
        time.sleep(0.5)  # well into the snapshot
        a.signal(signal.SIGKILL)  # mid-stream: a is sending b its 100k snapshot
        a.p.wait(5)
        wait_for(lambda: logged(b, "sync_disconnected", "a"), 10, what="b sees a's stream close")
        assert not logged(b, "sync_learned", "a"), "a finished its snapshot before the kill"
        link.rate = None  # the restarted a reaches b at full speed

        # while a is dead: new entries, deletions and backend changes at the feeder
        lt.call(put, N, 2000)
        for i in range(0, 2000, 20):
            lt.call(f.tables.sticky.delete, sticky_key("cookie", "web", f"client{i:06d}"))
        lt.call(lambda: [f.tables.sticky.put(sticky_key("cookie", "web", f"client{i:06d}"),
                                             "web-moved", 3600.0, pool="web")
                         for i in range(5, 500, 10)])

        a = Halbd(ca)  # restarted: empty tables, a new epoch
        wait_for(lambda: logged(a, "sync_learned", "f") and logged(a, "sync_learned", "b"), 60,
                 what="restarted a learns from f and b")

        want = feeder_view()
        assert len(want) == N + 2000 - 100

        def diff(port):
            got = {k: (e.backend, e.updated, e.origin) for k, e in tables_of(port).items()}
            missing = [k for k in want if k not in got]
            extra = [k for k in got if k not in want]
            other = [(k, got[k], want[k]) for k in want if k in got and got[k] != want[k]]
            return {"missing": len(missing), "extra": len(extra), "different": len(other),
                    "examples": (missing[:3], extra[:3], other[:3])}

        def converged():
            return all(len(tables_of(p)) == len(want) for p in (pa, pb))
        try:
            wait_for(converged, 30, interval=1.0, what="a and b converge")
        except TimeoutError:
            pass
        for port in (pa, pb):
            d = diff(port)
            assert d["missing"] == d["extra"] == d["different"] == 0, (port, d)
        st = lt.call(f.sync.status)
        assert all(s["connected"] for s in st), st
        print(f"\n100k snapshot learned by a halbd in {learn_s:.2f}s")
    finally:
        for p in (a, b):
            if p is not None:
                p.close()
        lt.run(f.stop())
        lt.run(link.stop())
        lt.close()


def test_bad_sync_tls_files_and_taken_port_stop_halbd_with_a_clear_message(own_tmp):
    import os
    import socket
    import subprocess
    import sys

    from tests.helpers import ROOT
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    base = halbd_config(own_tmp, "a", free_port(), [("b", free_port())]).read_text()
    base = base.replace("insecure = true\n", "")
    bad_tls = write_config(own_tmp, base + f'''[sync.tls]
ca = "{own_tmp}/missing-ca.pem"
cert = "{own_tmp}/a.toml"
key = "{own_tmp}/a.toml"
''', name="tls.toml")
    r = subprocess.run([sys.executable, "-m", "halb.cli.halbd", str(bad_tls)], capture_output=True,
                       text=True, timeout=30, env=env, cwd=str(ROOT))
    assert r.returncode == 1
    assert f"sync.tls.ca: no such file '{own_tmp}/missing-ca.pem'" in r.stderr, r.stderr
    # a file that exists but is no PEM: caught at start, naming the key and the file
    worse = write_config(own_tmp, base + f'''[sync.tls]
ca = "{own_tmp}/a.toml"
cert = "{own_tmp}/a.toml"
key = "{own_tmp}/a.toml"
''', name="tls2.toml")
    r = subprocess.run([sys.executable, "-m", "halb.cli.halbd", str(worse)], capture_output=True,
                       text=True, timeout=30, env=env, cwd=str(ROOT))
    assert r.returncode == 1 and "sync.tls.ca:" in r.stderr and "not a PEM file" in r.stderr, r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        taken = write_config(own_tmp, halbd_config(own_tmp, "a", port, [("b", free_port())])
                             .read_text(), name="taken.toml")
        r = subprocess.run([sys.executable, "-m", "halb.cli.halbd", str(taken)],
                           capture_output=True, text=True, timeout=30, env=env, cwd=str(ROOT))
    assert r.returncode == 1 and f"sync.listen 127.0.0.1:{port}: cannot listen" in r.stderr, r.stderr
