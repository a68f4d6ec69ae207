"""State-sync benchmark: replication throughput and lag between two processes on loopback.

    python -m bench.sync_bench [--entries 100000] [--rate 10000] [--seconds 5] [--tls]

The sender (this process, core 0) and the receiver (a subprocess, core 1) are full sync
peers (halb.sync.standalone.SyncNode: the same SyncService halbd runs, real gRPC on
loopback). Three figures:

  snapshot   N entries written before the receiver connects; entries/s from its connect to
             the snapshot applied (what a restarted node or a new peer goes through)
  stream     N entries written as fast as the sender can (1,000 per loop turn) while the
             receiver is connected; entries/s from the first write to the last one applied
  lag        changes at a steady --rate for --seconds; per change, the time from the write
             on the sender (the entry's own wall-clock ``updated``) to its apply on the
             receiver (wall clock, same host): p50 / p99 / max

CPU figures (process CPU time per entry on each side, and the entries/s one core each would
allow) hold up better on a busy machine than the wall-clock ones. ``--gc`` shows what the
garbage collector costs: with 100k+ live entries a full collection stops a process for
0.2-1 s (the lag's max and p99 with the default GC); ``--gc freeze`` moves survivors to the
permanent generation every second, which keeps every collection small.

Results: printed, and written to bench/out/sync.json (sync-<gc>.json for other --gc values).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from halb.config import Endpoint, SyncConfig, SyncPeer, TLSFiles  # noqa: E402
from halb.sync.standalone import SyncNode  # noqa: E402
from halb.tables import sticky_key  # noqa: E402

OUT = ROOT / "bench" / "out"


def _pin(core: int) -> None:
    try:
        if os.cpu_count() and os.cpu_count() > 1:
            os.sched_setaffinity(0, {core})
    except OSError:
        pass


def _cfg(port: int, peer: str, peer_port: int, tls: TLSFiles | None, batch: int) -> SyncConfig:
    return SyncConfig(listen=Endpoint("127.0.0.1", port),
                      peers=(SyncPeer(peer, Endpoint("127.0.0.1", peer_port)),),
                      tls=tls, batch_size=batch, max_backlog=1_000_000)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- receiver (subprocess) ---------------------------------------------------------------------


async def receiver(args) -> None:
    _pin(1)
    tls = TLSFiles(**json.loads(args.tls_rx)) if args.tls_rx else None
    node = SyncNode("rx", _cfg(args.port, "tx", args.peer_port, tls, args.batch),
                    sticky_max=4 * args.entries + 10 * args.rate * args.seconds,
                    log_size=1_000_000)
    count = {"snap": 0, "stream": 0, "lag": 0}
    last = {"snap": 0.0, "stream": 0.0, "lag": 0.0}
    lags: list[float] = []

    from halb.sync import core

    handle = core.TableReceiver.handle

    def measured(self, b):  # counts and lags per batch, right after it was applied
        n = handle(self, b)
        if b.entries.keys:
            now = time.time()
            for k, u in zip(b.entries.keys, b.entries.updated):
                kind = k[7:k.index("/", 7)]  # "cookie/<kind>/..."
                count[kind] += 1
                last[kind] = now
                if kind == "lag":
                    lags.append(now - u)
        return n

    core.TableReceiver.handle = measured
    t0 = time.time()
    await node.start()
    p = node.sync.peers["tx"]
    t_conn = None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), stop.set)  # the sender closes our stdin at the end
    while not stop.is_set():
        if t_conn is None and p.connected:
            t_conn = time.time()
        print(json.dumps({"count": count, "last": last, "t_conn": t_conn, "t0": t0,
                          "learned": p.learned, "cpu": time.process_time()}), flush=True)
        try:
            await asyncio.wait_for(stop.wait(), 0.05)
        except asyncio.TimeoutError:
            pass
    lags.sort()
    print(json.dumps({"final": True, "count": count, "last": last, "t_conn": t_conn,
                      "cpu": time.process_time(),
                      "lags": {"n": len(lags),
                               "p50": lags[len(lags) // 2] if lags else None,
                               "p99": lags[int(len(lags) * 0.99)] if lags else None,
                               "max": lags[-1] if lags else None}}), flush=True)
    await node.stop()


# -- sender (this process) ---------------------------------------------------------------------


class Rx:
    def __init__(self, argv):
        self.proc = None
        self.argv = argv
        self.state: dict = {}

    async def start(self):
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        self.reader = asyncio.create_task(self._read())

    async def _read(self):
        while line := await self.proc.stdout.readline():
            try:
                self.state = json.loads(line)
            except ValueError:
                pass

    async def until(self, cond, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state and cond(self.state):
                return self.state
            if self.proc.returncode is not None:
                raise RuntimeError("receiver exited")
            await asyncio.sleep(0.01)
        raise TimeoutError(f"receiver state: {self.state}")

    async def finish(self):
        self.proc.stdin.close()
        await asyncio.wait_for(self.reader, 30)
        await self.proc.wait()
        return self.state


async def sender(args) -> dict:
    _pin(0)
    tx_port, rx_port = _free_port(), _free_port()
    tls_tx = tls_rx = None
    if args.tls:
        from halb import pki
        d = tempfile.mkdtemp(prefix="syncbench")
        res = pki.generate(d, ["tx", "rx"])
        files = {n: dict(cert=res["nodes"][n]["cert"], key=res["nodes"][n]["key"],
                         ca=res["ca"]["cert"]) for n in ("tx", "rx")}
        tls_tx, tls_rx = TLSFiles(**files["tx"]), json.dumps(files["rx"])
    node = SyncNode("tx", _cfg(tx_port, "rx", rx_port, tls_tx, args.batch),
                    sticky_max=4 * args.entries + 10 * args.rate * args.seconds,
                    log_size=1_000_000)
    t = node.tables.sticky
    n = args.entries
    for i in range(n):
        t.put(sticky_key("cookie", "snap", f"{i:08d}"), f"web{i % 8}", 3600.0, pool="web")
    await node.start()
    argv = [sys.executable, "-m", "bench.sync_bench", "--role", "rx", "--gc", args.gc,
            "--port", str(rx_port),
            "--peer-port", str(tx_port), "--entries", str(n), "--rate", str(args.rate),
            "--seconds", str(args.seconds), "--batch", str(args.batch)]
    if tls_rx:
        argv += ["--tls-rx", tls_rx]
    rx = Rx(argv)
    await rx.start()
    res: dict = {"entries": n, "batch_size": args.batch, "tls": bool(args.tls), "gc": args.gc,
                 "load_before": os.getloadavg()[0]}

    def cpu_figures(tx0, rx0, st, count):
        """CPU microseconds per entry on each side, and the entries/s one core each allows."""
        tx_us = (time.process_time() - tx0) / count * 1e6
        rx_us = (st["cpu"] - rx0) / count * 1e6
        return {"sender_cpu_us_per_entry": round(tx_us, 2), "receiver_cpu_us_per_entry":
                round(rx_us, 2), "entries_per_cpu_s": round(1e6 / max(tx_us, rx_us))}

    try:
        st0 = await rx.until(lambda s: True, 30)
        tx0, rx0 = time.process_time(), st0["cpu"]
        st = await rx.until(lambda s: s["count"]["snap"] >= n, 120)
        snap_s = st["last"]["snap"] - st["t_conn"]
        res["snapshot"] = {"seconds": round(snap_s, 3), "entries_per_s": round(n / snap_s),
                           **cpu_figures(tx0, rx0, st, n)}
        print(f"snapshot: {n} entries in {snap_s:.2f} s = {n / snap_s:,.0f} entries/s; "
              f"{res['snapshot']}", flush=True)

        await asyncio.sleep(0.5)
        tx0, rx0 = time.process_time(), rx.state["cpu"]
        t_first = time.time()
        for i in range(n):
            t.put(sticky_key("cookie", "stream", f"{i:08d}"), f"web{i % 8}", 3600.0, pool="web")
            if i % 1000 == 999:
                await asyncio.sleep(0)
        st = await rx.until(lambda s: s["count"]["stream"] >= n, 120)
        stream_s = st["last"]["stream"] - t_first
        res["stream"] = {"seconds": round(stream_s, 3), "entries_per_s": round(n / stream_s),
                         **cpu_figures(tx0, rx0, st, n)}
        print(f"stream:   {n} entries in {stream_s:.2f} s = {n / stream_s:,.0f} entries/s; "
              f"{res['stream']}", flush=True)

        await asyncio.sleep(0.5)
        per_tick, tick = max(1, args.rate // 1000), 0.001
        total = args.rate * args.seconds
        loop = asyncio.get_running_loop()
        start = loop.time()
        i = 0
        while i < total:
            target = start + (i // per_tick) * tick
            delay = target - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            for _ in range(per_tick):
                t.put(sticky_key("cookie", "lag", f"{i:08d}"), f"web{i % 8}", 3600.0, pool="web")
                i += 1
        achieved = total / (loop.time() - start)
        await rx.until(lambda s: s["count"]["lag"] >= total, 60)
        fin = await rx.finish()
        lg = fin["lags"]
        res["lag"] = {"rate_per_s": round(achieved), "changes": total,
                      "p50_ms": round(lg["p50"] * 1000, 3), "p99_ms": round(lg["p99"] * 1000, 3),
                      "max_ms": round(lg["max"] * 1000, 3)}
        print(f"lag at {achieved:,.0f} changes/s: p50 {lg['p50'] * 1000:.2f} ms, "
              f"p99 {lg['p99'] * 1000:.2f} ms, max {lg['max'] * 1000:.2f} ms", flush=True)
    finally:
        if rx.proc.returncode is None:
            rx.proc.kill()
            await rx.proc.wait()
        await node.stop()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--rate", type=int, default=10_000)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--tls", action="store_true", help="mutual TLS between the two peers")
    ap.add_argument("--gc", default="default",
                    help="garbage collector in both processes: default | off | freeze (gc.freeze()"
                         " every second) | T0,T1,T2 (gc.set_threshold)")
    ap.add_argument("--role", choices=("tx", "rx"), default="tx", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--peer-port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tls-rx", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    if args.gc != "default":  # GC's share in the lag (see the module docstring)
        import gc
        v = args.gc
        if v == "off":
            gc.disable()
        elif v == "freeze":  # survivors move to the permanent generation every second
            import threading

            def freezer():
                while True:
                    time.sleep(1.0)
                    gc.freeze()
            threading.Thread(target=freezer, daemon=True).start()
        else:
            gc.set_threshold(*map(int, v.split(",")))
    prof = None
    if os.environ.get("SYNC_BENCH_PROFILE"):  # a cProfile dump per role, for tuning
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    if args.role == "rx":
        asyncio.run(receiver(args))
        if prof:
            prof.disable()
            prof.dump_stats(os.environ["SYNC_BENCH_PROFILE"] + ".rx")
        return 0
    res = asyncio.run(sender(args))
    if prof:
        prof.disable()
        prof.dump_stats(os.environ["SYNC_BENCH_PROFILE"] + ".tx")
    res["host"] = {"cpus": os.cpu_count(), "load": os.getloadavg()}
    OUT.mkdir(parents=True, exist_ok=True)
    name = "sync.json" if args.gc == "default" else f"sync-{args.gc.replace(',', '_')}.json"
    (OUT / name).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
