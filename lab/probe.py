"""A client that probes a VIP the way an impatient user does: what client recovery is measured with.

    python -m lab.probe --target 198.18.70.100:80 --seconds 30 --out probes.jsonl
    python -m lab.probe --target [2001:2:0:70::100]:80 ...     # IPv6

Two kinds of probe run side by side until ``--seconds`` pass or SIGTERM arrives:
  new   every ``--interval`` (default 5 ms) a new TCP connection: one ``GET /`` with
        ``Connection: close``, answered within ``--timeout`` or failed;
  keep  ``--keepalive N`` keep-alive connections, each bound to a fixed source port
        (``--port-base`` + i), one request every ``--keep-interval``; after a failure the
        client reconnects *from the same source port* (what NAT gateways and port-reusing
        clients do), so a stale socket on the load balancer with that 4-tuple shows up as a
        stall.
Each probe: {"t": CLOCK_MONOTONIC at the start (the same clock in every namespace), "k": kind,
"c": connection (keep), "ok": bool, "ms": latency, "err": reason}. At most ``MAX_INFLIGHT``
new-connection probes are in flight; everything is bounded by ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
import time

MAX_INFLIGHT = 256
_now = time.monotonic


class Out:
    def __init__(self, path: str):
        self.f = open(path, "w", buffering=1 << 16)
        self.n = [0, 0]

    def add(self, kind: str, t: float, ok: bool, **kw) -> None:
        self.n[0 if ok else 1] += 1
        ev = {"t": round(t, 6), "k": kind, "ok": ok, "ms": round((_now() - t) * 1000, 2)}
        ev.update(kw)
        self.f.write(json.dumps(ev, separators=(",", ":")) + "\n")


async def _exchange(r: asyncio.StreamReader, w: asyncio.StreamWriter, host: str, close: bool) -> None:
    if ":" in host:  # an IPv6 literal: bracketed in the Host header
        host = f"[{host}]"
    w.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n".encode())
    await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ValueError(head.split(b"\r\n", 1)[0].decode(errors="replace")[:80])
    n = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":", 1)[1])
    await r.readexactly(n)


async def new_probe(out: Out, host: str, port: int, timeout: float, sem: asyncio.Semaphore) -> None:
    t = _now()
    w = None
    try:
        async with asyncio.timeout(timeout):
            r, w = await asyncio.open_connection(host, port)
            await _exchange(r, w, host, True)
        out.add("new", t, True)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError,
            RuntimeError) as e:
        out.add("new", t, False, err=type(e).__name__)
    finally:
        if w is not None:
            w.transport.abort()
        sem.release()


async def keeper(out: Out, i: int, host: str, port: int, sport: int, every: float,
                 timeout: float, stop: asyncio.Event) -> None:
    r = w = None
    while not stop.is_set():
        t = _now()
        try:
            async with asyncio.timeout(timeout):
                if w is None:
                    v6 = ":" in host
                    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.setblocking(False)
                    s.bind(("::" if v6 else "0.0.0.0", sport))
                    try:
                        await asyncio.get_running_loop().sock_connect(s, (host, port))
                    except BaseException:
                        s.close()
                        raise
                    r, w = await asyncio.open_connection(sock=s)
                await _exchange(r, w, host, False)
            out.add("keep", t, True, c=i)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError,
                RuntimeError) as e:
            out.add("keep", t, False, c=i, err=type(e).__name__)
            if w is not None:
                w.transport.abort()
            r = w = None
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, every - (_now() - t)))
        except asyncio.TimeoutError:
            pass
    if w is not None:
        w.transport.abort()


async def main_async(a) -> None:
    host, _, port_s = a.target.rpartition(":")
    host = host.strip("[]")  # [v6]:port
    port = int(port_s)
    out = Out(a.out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.call_later(a.seconds, stop.set)
    keepers = [asyncio.create_task(keeper(out, i, host, port, a.port_base + i, a.keep_interval,
                                          a.timeout_keep, stop)) for i in range(a.keepalive)]
    sem = asyncio.Semaphore(MAX_INFLIGHT)
    print(json.dumps({"event": "started"}), flush=True)
    tasks: set[asyncio.Task] = set()
    nxt = _now()
    while not stop.is_set() and a.interval > 0:
        await sem.acquire()
        tk = asyncio.create_task(new_probe(out, host, port, a.timeout, sem))
        tasks.add(tk)
        tk.add_done_callback(tasks.discard)
        nxt += a.interval
        delay = nxt - _now()
        if delay < -a.interval:  # a stalled loop: skip, never burst
            nxt = _now()
            delay = 0
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, delay))
        except asyncio.TimeoutError:
            pass
    await stop.wait()
    await asyncio.gather(*keepers, *tasks, return_exceptions=True)
    out.f.close()
    print(json.dumps({"event": "done", "ok": out.n[0], "failed": out.n[1]}), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.probe")
    ap.add_argument("--target", required=True, help="VIP:PORT ([VIP]:PORT for IPv6) of an HTTP listener")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--interval", type=float, default=0.005, help="new-connection probes (0: none)")
    ap.add_argument("--timeout", type=float, default=0.25, help="per new-connection probe")
    ap.add_argument("--keepalive", type=int, default=0, help="fixed-port keep-alive connections")
    ap.add_argument("--port-base", type=int, default=41000)
    ap.add_argument("--keep-interval", type=float, default=0.05)
    ap.add_argument("--timeout-keep", type=float, default=1.0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if not (0 < a.seconds <= 3600) or a.keepalive > 1000:
        ap.error("--seconds 0..3600, --keepalive at most 1000")
    asyncio.run(main_async(a))
    return 0


def recovery(events: list[dict], t: float, window: float = 5.0, kind: str = "new") -> dict:
    """Client recovery after the moment ``t`` (a resume, a heal, a preempt): the failed probes
    started in [t, t + window] and the time from ``t`` to the first answered probe after the
    last of them (0 when none failed)."""
    ev = sorted((e for e in events if e["k"] == kind and t <= e["t"] <= t + window),
                key=lambda e: e["t"])
    failed = [e for e in ev if not e["ok"]]
    if not failed:
        return {"probes": len(ev), "failed": 0, "recovery_ms": 0.0}
    last = failed[-1]["t"]
    after = next((e["t"] for e in ev if e["ok"] and e["t"] > last), None)
    return {"probes": len(ev), "failed": len(failed),
            "recovery_ms": None if after is None else round((after - t) * 1000, 1)}


def read(path) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:  # a torn last line
                pass
    return out


if __name__ == "__main__":
    sys.exit(main())
