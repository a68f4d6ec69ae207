"""The TCP relay's two methods on an in-process Node (real sockets, real echo backends):
a connection whose method changes between readiness events, even while bytes wait for a
slow reader, stays byte-exact; under CPU load the node's ticker opens the splice gate of
``relay = "auto"`` listeners and closes it when the load goes."""

from __future__ import annotations

import asyncio
import os
import hashlib
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from halb.config import loads
from halb.node import Node
from halb.proxy import tcp
from tests.helpers import Backends, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def backends():
    with Backends(["e1"], http=False, tcp=True) as bk:
        yield bk


@pytest.fixture
def state():
    d = Path(tempfile.mkdtemp(prefix="l4rm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def config(bk, state: Path, port: int, relay: str) -> str:
    return f'''
[node]
name = "n1"
state_dir = "{state}"
[[pools]]
name = "echo"
[[pools.backends]]
name = "e1"
address = "{bk.tcp["e1"]}"
[[listeners]]
name = "l4"
mode = "tcp"
bind = "127.0.0.1:{port}"
pool = "echo"
relay = "{relay}"
'''


def counting(monkeypatch, counts: dict, name: str) -> None:
    real = getattr(tcp._Dir, name)

    def wrapper(self, conn):
        counts[name] += 1
        return real(self, conn)

    monkeypatch.setattr(tcp._Dir, name, wrapper)


async def echo_roundtrip(port: int, total: int, slow_reader: bool) -> tuple[str, str, int]:
    """Sends ``total`` bytes through the echo backend; returns the sent and received hashes
    and the count received."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    rnd = random.Random(7)
    block = rnd.randbytes(1 << 20)
    sent, got = hashlib.sha256(), hashlib.sha256()
    n = [0]

    async def reader():
        while True:
            d = await r.read(1 << 16)
            if not d:
                return
            got.update(d)
            n[0] += len(d)
            if slow_reader and n[0] % (1 << 19) < len(d):
                await asyncio.sleep(0.01)  # let the relay back up and stall

    rt = asyncio.create_task(reader())
    for i in range(total >> 20):
        k = (i * 40_961) % len(block)
        chunk = block[k:] + block[:k]
        sent.update(chunk)
        w.write(chunk)
        await w.drain()
    w.write_eof()
    await asyncio.wait_for(rt, 60)
    w.close()
    return sent.hexdigest(), got.hexdigest(), n[0]


@pytest.mark.parametrize("slow_reader", [False, True], ids=["fast-reader", "slow-reader"])
def test_method_changes_mid_connection_stay_byte_exact(backends, state, monkeypatch,
                                                       slow_reader):
    port = free_port()
    counts = {"_splice": 0, "_copy": 0, "_stall": 0}
    for name in counts:
        counting(monkeypatch, counts, name)

    async def main():
        node = Node(loads(config(backends, state, port, "auto")))
        await node.start()
        lst = node.listeners[0]
        assert lst.gate is node.splice_gate
        lst.gate = tcp._Fixed(False)  # flipped below, out of the ticker's reach
        stop = asyncio.Event()

        async def flipper():
            while not stop.is_set():
                lst.gate.splice = not lst.gate.splice
                await asyncio.sleep(0.002)

        ft = asyncio.create_task(flipper())
        try:
            total = 48 << 20
            a, b, n = await echo_roundtrip(port, total, slow_reader)
            assert n == total and a == b
            assert lst.pipes.created > 0  # splice held pipes ...
            await asyncio.sleep(0.1)
            assert len(lst.pipes.free) == lst.pipes.created  # ... and gave every one back
            assert lst.stats()["conns"] == 0
        finally:
            stop.set()
            await ft
            await node.stop()

    asyncio.run(main())
    # both methods moved bytes of the same connection, many times over
    assert counts["_splice"] > 20 and counts["_copy"] > 20, counts
    if slow_reader:  # and directions waited for their destination with bytes in hand
        assert counts["_stall"] > 10, counts


@pytest.mark.parametrize("relay,splices", [("copy", False), ("splice", True)])
def test_fixed_methods_use_only_their_method(backends, state, monkeypatch, relay, splices):
    port = free_port()
    counts = {"_splice": 0, "_copy": 0}
    counting(monkeypatch, counts, "_splice")
    counting(monkeypatch, counts, "_copy")

    async def main():
        node = Node(loads(config(backends, state, port, relay)))
        await node.start()
        try:
            assert node.listeners[0].stats()["relay"] == relay
            a, b, n = await echo_roundtrip(port, 8 << 20, False)
            assert n == 8 << 20 and a == b
        finally:
            await node.stop()

    asyncio.run(main())
    used = "_splice" if splices else "_copy"
    unused = "_copy" if splices else "_splice"
    assert counts[used] > 0 and counts[unused] == 0, counts


def test_cpu_load_opens_the_gate_and_idling_closes_it(backends, state):
    """A thread of the process spinning on another core leaves the event loop's room: the gate
    stays closed. The event loop itself kept busy opens it; idling closes it again."""
    port = free_port()

    async def wait_gate(gate, want: bool, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while gate.splice != want and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert gate.splice == want, f"gate not {want} at {gate.busy:.2f} of a core"

    async def main():
        node = Node(loads(config(backends, state, port, "auto")))
        await node.start()
        lst = node.listeners[0]
        gate = node.splice_gate
        try:
            await asyncio.sleep(0.6)  # idle: copying
            assert gate.splice is False and lst.stats()["splicing"] is False
            # another thread busy (as the control plane's gRPC threads can be)
            spin_until = time.monotonic() + 1.2

            def spin():
                while time.monotonic() < spin_until:
                    pass

            t = threading.Thread(target=spin, daemon=True)
            t.start()
            while t.is_alive():
                await asyncio.sleep(0.05)
                assert not gate.splice, f"opened by another thread ({gate.busy:.2f})"
            # the event loop busy: 10 ms slices of work with a loop turn between them
            stop = asyncio.Event()

            async def burn():
                while not stop.is_set():
                    t0 = time.thread_time()
                    while time.thread_time() - t0 < 0.01:
                        pass
                    await asyncio.sleep(0)

            bt = asyncio.create_task(burn())
            try:
                await wait_gate(gate, True)
                assert lst.stats()["splicing"] is True
                scraped = generate_latest(node.metrics.registry).decode()
                assert "halb_l4_relay_splicing 1.0" in scraped
                busy = next(float(ln.split()[1]) for ln in scraped.splitlines()
                            if ln.startswith("halb_cpu_busy_ratio "))
                assert busy >= 0.9
                # a connection relayed now splices
                a, b, n = await echo_roundtrip(port, 4 << 20, False)
                assert n == 4 << 20 and a == b and lst.pipes.created > 0
            finally:
                stop.set()
                await bt
            await wait_gate(gate, False)
            assert "halb_l4_relay_splicing 0.0" in generate_latest(node.metrics.registry).decode()
            assert gate.changes >= 2
        finally:
            await node.stop()

    asyncio.run(main())


@pytest.mark.parametrize("err", ["EPERM", "ENOSYS", "EINVAL"])
def test_a_refused_splice_falls_back_to_copy_without_losing_the_connection(
        backends, state, monkeypatch, err):
    """A sandbox's system call filter (EPERM), a kernel without splice (ENOSYS) or sockets
    that cannot splice (EINVAL): under relay = "auto" that first shows when the node gets
    busy, so the connection must live on, copied, and the listener copy from then on."""
    import errno as errno_mod

    port = free_port()
    real = tcp.os.splice
    calls = {"refused": 0}

    def refusing_splice(src, dst, count, *a, **kw):
        calls["refused"] += 1
        raise OSError(getattr(errno_mod, err), "refused for the test")

    async def main():
        node = Node(loads(config(backends, state, port, "splice")))
        await node.start()
        lst = node.listeners[0]
        try:
            monkeypatch.setattr(tcp.os, "splice", refusing_splice)
            a, b, n = await echo_roundtrip(port, 2 << 20, False)
            assert n == 2 << 20 and a == b
            assert calls["refused"] >= 1
            st = lst.stats()
            assert st["relay"] == "copy" and st["splicing"] is False
            scraped = generate_latest(node.metrics.registry).decode()
            assert 'halb_l4_events_total{event="splice_unavailable",listener="l4"} 1.0' \
                in scraped
            monkeypatch.setattr(tcp.os, "splice", real)
            a, b, n = await echo_roundtrip(port, 1 << 20, False)  # later ones copy too
            assert n == 1 << 20 and a == b
            assert calls["refused"] == 1  # the first refusal switched the listener
        finally:
            await node.stop()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# A real halbd under a real cgroup CPU quota


class CpuQuota:
    """A cgroup holding a CPU quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), removed on
    exit; processes are moved in with ``add``."""

    def __init__(self, fraction: float):
        self.fraction = fraction
        name = f"halb-test-{os.getpid()}"
        v2root = Path("/sys/fs/cgroup")
        if "cpu" in (v2root / "cgroup.controllers").read_text().split() \
                if (v2root / "cgroup.controllers").exists() else False:
            sub = v2root / "cgroup.subtree_control"
            if "cpu" not in sub.read_text().split():
                sub.write_text("+cpu")
            self.dir = v2root / name
            self.dir.mkdir()
            (self.dir / "cpu.max").write_text(f"{int(fraction * 100_000)} 100000")
        else:
            self.dir = Path("/sys/fs/cgroup/cpu") / name
            self.dir.mkdir()
            (self.dir / "cpu.cfs_period_us").write_text("100000")
            (self.dir / "cpu.cfs_quota_us").write_text(str(int(fraction * 100_000)))
        self.root = self.dir.parent

    def add(self, pid: int) -> None:
        (self.dir / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        for _ in range(50):
            procs = (self.dir / "cgroup.procs").read_text().split()
            for pid in procs:
                try:
                    (self.root / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def test_halbd_under_a_cpu_quota_splices_when_the_quota_binds(state):
    """halbd held to 15% of a core: a bulk upload saturates it, the gate opens (the ticker
    reads the quota from the cgroup), the bytes stay exact, and idling closes the gate."""
    import socket

    from tests.helpers import Halbd

    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(4)
    got = {"n": 0, "h": hashlib.sha256()}
    total_expected = [1 << 62]

    def drain():  # one connection after the other (the port probe's comes first)
        buf = bytearray(1 << 20)
        while got["n"] < total_expected[0]:
            try:
                c, _ = sink.accept()
            except OSError:
                return
            while True:
                n = c.recv_into(buf)
                if not n:
                    break
                got["h"].update(memoryview(buf)[:n])
                got["n"] += n
            c.close()

    port = free_port()
    cfg = f'''
[node]
name = "n1"
state_dir = "{state}"
[[pools]]
name = "sink"
[[pools.backends]]
name = "s1"
address = "127.0.0.1:{sink.getsockname()[1]}"
[[listeners]]
name = "l4"
mode = "tcp"
bind = "127.0.0.1:{port}"
pool = "sink"
'''
    path = state / "halb.toml"
    path.write_text(cfg)
    quota = CpuQuota(0.15)
    node = Halbd(path)
    try:
        quota.add(node.pid)
        dt = threading.Thread(target=drain, daemon=True)
        dt.start()
        node.wait_port(port)
        block = random.Random(5).randbytes(1 << 20)
        sent = hashlib.sha256()
        total = 0
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            deadline = time.monotonic() + 8
            while '"method":"splice"' not in node.output():
                assert time.monotonic() < deadline, "the gate never opened:\n" + node.output()[-2000:]
                c.sendall(block)
                sent.update(block)
                total += len(block)
            for _ in range(32):  # spliced bytes too
                c.sendall(block)
                sent.update(block)
                total += len(block)
            total_expected[0] = total
            c.shutdown(socket.SHUT_WR)
            dt.join(20)
        assert got["n"] == total and got["h"].hexdigest() == sent.hexdigest()
        line = next(ln for ln in node.output().splitlines() if '"method":"splice"' in ln)
        assert '"quota":0.15' in line, line
        node.wait_log('"method":"copy"', timeout=5)  # idle again
    finally:
        node.close()
        quota.close()
        sink.close()
