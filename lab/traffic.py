"""Steady client traffic towards a VIP, one JSON line per request: what the demo and the chaos
suite measure failovers with. Runs inside the client's namespace; standard library plus
httptools (a halb dependency), so it also runs as a plain file in the containerlab client.

    python -m lab.traffic --vip 198.18.0.100 --seconds 10 --out events.jsonl

Three streams run side by side until ``--seconds`` pass or SIGTERM/SIGINT arrives:
  http  ``--clients`` simulated browsers, each keeping the sticky cookie it was given, sent by
        ``--concurrency`` keep-alive workers at ``--rate`` requests/s in total; a failed
        request (refused, reset, timeout, non-200) is recorded and the worker reconnects.
  tcp   one long-lived connection: ``WHO`` names the backend, then a numbered line every 10 ms
        must come back; on error it reconnects.
  src   ``--src-clients CIDR``: one client per source address in CIDR (the addresses must exist
        in the namespace), each opening a new TCP connection every ``--src-interval``
        (``WHO``, one echo, close): the listener's source-IP stickiness, kept in the replicated
        table, must send each address to the same backend every time.
  udp   one socket (one flow) sending a numbered datagram every 10 ms; a reply within
        ``--udp-timeout`` counts as ok.
Each event: {"t": CLOCK_MONOTONIC seconds (the same clock in every namespace), "k": stream,
"c": client, "ok": bool, "b": backend, "via": address the backend saw the request come from
(the load balancer that proxied it), "ms": latency, "err": reason}.
A summary (counts per stream) is printed as one JSON line on stdout at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

import httptools

_now = time.monotonic  # CLOCK_MONOTONIC is system-wide: comparable across namespaces
# A failed request is recorded, never fatal: OSError (refused, reset, unreachable), timeouts,
# RuntimeError (uvloop: writing to a transport the peer closed) and HTTP parse errors.


class Recorder:
    def __init__(self, path: str | None):
        self.f = open(path, "w", buffering=1 << 16) if path else None
        self.counts: dict[str, list[int]] = {}

    def add(self, kind: str, ok: bool, **kw) -> None:
        c = self.counts.setdefault(kind, [0, 0])
        c[0 if ok else 1] += 1
        if self.f:
            ev = {"t": round(_now(), 6), "k": kind, "ok": ok}
            ev.update(kw)
            self.f.write(json.dumps(ev, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self.f:
            self.f.close()


class _Resp:
    """httptools callbacks for one response."""

    def __init__(self):
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        if len(self.body) < 1 << 16:
            self.body += body

    def on_message_complete(self) -> None:
        self.done = True


async def _http_request(reader, writer, host: str, cookie: str | None, timeout: float):
    if ":" in host:  # an IPv6 literal: bracketed in the Host header (RFC 9110 4.2.2)
        host = f"[{host}]"
    req = (f"GET /demo HTTP/1.1\r\nHost: {host}\r\nUser-Agent: halb-lab-traffic\r\n"
           + (f"Cookie: {cookie}\r\n" if cookie else "") + "\r\n").encode()
    writer.write(req)
    resp = _Resp()
    parser = httptools.HttpResponseParser(resp)
    deadline = _now() + timeout
    while not resp.done:
        left = deadline - _now()
        if left <= 0:
            raise asyncio.TimeoutError()
        data = await asyncio.wait_for(reader.read(65536), left)
        if not data:
            raise ConnectionResetError("connection closed before the response ended")
        parser.feed_data(data)
    return parser.get_status_code(), resp, parser.should_keep_alive()


class Http:
    def __init__(self, rec: Recorder, a):
        self.rec = rec
        self.a = a
        self.cookies: list[str | None] = [None] * a.clients
        self.next_client = 0
        self.interval = a.concurrency / a.rate if a.rate > 0 else 0.0

    async def worker(self, stop: asyncio.Event, wid: int) -> None:
        a = self.a
        reader = writer = None
        nxt = _now() + (wid * self.interval / max(a.concurrency, 1))
        while not stop.is_set():
            delay = nxt - _now()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    break
                except asyncio.TimeoutError:
                    pass
            nxt = max(nxt + self.interval, _now() - 1.0)
            cid = self.next_client
            self.next_client = (cid + 1) % a.clients
            t0 = _now()
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(a.vip, a.http_port), a.timeout)
                status, resp, keep = await _http_request(reader, writer, a.vip, self.cookies[cid],
                                                         a.timeout - (_now() - t0))
                hdr = dict(resp.headers)
                backend = hdr.get(b"x-backend", b"").decode("latin-1")
                sc = hdr.get(b"set-cookie")
                if sc:
                    self.cookies[cid] = sc.decode("latin-1").split(";", 1)[0].strip()
                via = ""
                try:
                    via = json.loads(bytes(resp.body)).get("client", "").rsplit(":", 1)[0]
                except (ValueError, AttributeError):
                    pass
                ok = status == 200
                self.rec.add("http", ok, c=cid, b=backend, via=via,
                             ms=round((_now() - t0) * 1000, 2),
                             **({} if ok else {"err": f"status {status}"}))
                if not keep:
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.TimeoutError, RuntimeError, httptools.HttpParserError) as e:
                self.rec.add("http", False, c=cid, ms=round((_now() - t0) * 1000, 2),
                             err=type(e).__name__ + (f": {e}" if str(e) else ""))
                if writer is not None:
                    writer.transport.abort()
                reader = writer = None
                try:  # a short pause so a refusing VIP is not hammered
                    await asyncio.wait_for(stop.wait(), a.retry_pause)
                except asyncio.TimeoutError:
                    pass
        if writer is not None:
            writer.transport.abort()


async def tcp_stream(rec: Recorder, a, stop: asyncio.Event) -> None:
    seq = 0
    reader = writer = None
    backend = ""
    while not stop.is_set():
        t0 = _now()
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(a.vip, a.tcp_port), a.timeout)
                writer.write(b"WHO\n")
                backend = (await asyncio.wait_for(reader.readline(), a.timeout)).decode().strip()
                if not backend:
                    raise ConnectionResetError("closed before naming the backend")
            seq += 1
            line = f"{seq}\n".encode()
            writer.write(line)
            got = await asyncio.wait_for(reader.readline(), a.timeout)
            if got != line:
                raise ConnectionResetError(f"echo mismatch: {got[:40]!r}")
            rec.add("tcp", True, c=0, b=backend, ms=round((_now() - t0) * 1000, 2))
        except (OSError, asyncio.TimeoutError, RuntimeError) as e:  # uvloop: closed transport
            rec.add("tcp", False, c=0, ms=round((_now() - t0) * 1000, 2),
                    err=type(e).__name__ + (f": {e}" if str(e) else ""))
            if writer is not None:
                writer.transport.abort()
            reader = writer = None
        try:
            await asyncio.wait_for(stop.wait(), a.stream_interval)
        except asyncio.TimeoutError:
            pass
    if writer is not None:
        writer.transport.abort()


async def src_client(rec: Recorder, a, stop: asyncio.Event, idx: int, addr: str) -> None:
    # staggered, so the clients do not all connect in the same instant
    first = a.src_interval * idx / max(a.n_src, 1)
    try:
        await asyncio.wait_for(stop.wait(), first)
        return
    except asyncio.TimeoutError:
        pass
    while not stop.is_set():
        t0 = _now()
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(a.vip, a.tcp_port, local_addr=(addr, 0)), a.timeout)
            writer.write(b"WHO\nping\n")
            backend = (await asyncio.wait_for(reader.readline(), a.timeout)).decode().strip()
            echo = await asyncio.wait_for(reader.readline(), a.timeout)
            if not backend or echo != b"ping\n":
                raise ConnectionResetError(f"bad answer {backend!r} {echo[:20]!r}")
            rec.add("src", True, c=idx, b=backend, ms=round((_now() - t0) * 1000, 2))
        except (OSError, asyncio.TimeoutError, RuntimeError) as e:  # uvloop: closed transport
            rec.add("src", False, c=idx, ms=round((_now() - t0) * 1000, 2),
                    err=type(e).__name__ + (f": {e}" if str(e) else ""))
        finally:
            if writer is not None:
                writer.transport.abort()
        try:
            await asyncio.wait_for(stop.wait(), a.src_interval)
        except asyncio.TimeoutError:
            pass


class _UdpProto(asyncio.DatagramProtocol):
    def __init__(self):
        self.waiting: dict[bytes, asyncio.Future] = {}

    def datagram_received(self, data: bytes, addr) -> None:
        backend, _, payload = data.partition(b"|")
        fut = self.waiting.pop(payload, None)
        if fut is not None and not fut.done():
            fut.set_result(backend.decode("latin-1"))

    def error_received(self, exc) -> None:  # ICMP errors: the request times out instead
        pass


async def udp_stream(rec: Recorder, a, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    tr, proto = await loop.create_datagram_endpoint(_UdpProto, remote_addr=(a.vip, a.udp_port))
    seq = 0
    pending: set[asyncio.Task] = set()

    async def one(n: int) -> None:
        key = f"u{n}".encode()
        fut = loop.create_future()
        proto.waiting[key] = fut
        t0 = _now()
        try:
            tr.sendto(key)
            backend = await asyncio.wait_for(fut, a.udp_timeout)
            rec.add("udp", True, c=0, b=backend, ms=round((_now() - t0) * 1000, 2))
        except (OSError, asyncio.TimeoutError, RuntimeError) as e:  # uvloop: closed transport
            proto.waiting.pop(key, None)
            rec.add("udp", False, c=0, ms=round((_now() - t0) * 1000, 2), err=type(e).__name__)

    try:
        while not stop.is_set():
            seq += 1
            if len(pending) < 256:  # bounded: at most 256 datagrams in flight
                t = asyncio.ensure_future(one(seq))
                pending.add(t)
                t.add_done_callback(pending.discard)
            try:
                await asyncio.wait_for(stop.wait(), a.stream_interval)
            except asyncio.TimeoutError:
                pass
        if pending:
            await asyncio.wait(pending, timeout=a.udp_timeout + 0.5)
    finally:
        tr.close()


async def run(a) -> dict:
    rec = Recorder(a.out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    loop.call_later(a.seconds, stop.set)
    tasks = []
    if a.clients > 0:
        http = Http(rec, a)
        tasks += [asyncio.ensure_future(http.worker(stop, i)) for i in range(a.concurrency)]
    if a.tcp_port and not a.no_streams:
        tasks.append(asyncio.ensure_future(tcp_stream(rec, a, stop)))
    if a.udp_port and not a.no_streams:
        tasks.append(asyncio.ensure_future(udp_stream(rec, a, stop)))
    if a.src_clients and a.tcp_port:
        import ipaddress
        net = ipaddress.ip_network(a.src_clients, strict=False)
        addrs = [str(x) for x in net]  # every address: they live in the namespace's own /24
        a.n_src = len(addrs)
        tasks += [asyncio.ensure_future(src_client(rec, a, stop, i, ad)) for i, ad in enumerate(addrs)]
    print(json.dumps({"event": "started", "t": _now(), "pid": os.getpid()}), flush=True)
    await asyncio.gather(*tasks)
    rec.close()
    return {"event": "done", "t": _now(),
            "counts": {k: {"ok": v[0], "failed": v[1]} for k, v in rec.counts.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lab.traffic", description=__doc__.splitlines()[0])
    ap.add_argument("--vip", required=True)
    ap.add_argument("--http-port", type=int, default=80)
    ap.add_argument("--tcp-port", type=int, default=9000, help="0: no TCP stream")
    ap.add_argument("--udp-port", type=int, default=9001, help="0: no UDP stream")
    ap.add_argument("--clients", type=int, default=200, help="simulated sticky clients (0: no HTTP)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rate", type=float, default=400.0, help="HTTP requests/s in total")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=1.0, help="per request")
    ap.add_argument("--udp-timeout", type=float, default=0.3)
    ap.add_argument("--stream-interval", type=float, default=0.01)
    ap.add_argument("--retry-pause", type=float, default=0.005)
    ap.add_argument("--src-clients", default="", metavar="CIDR",
                    help="source-sticky TCP clients, one per address (at most 256)")
    ap.add_argument("--src-interval", type=float, default=0.25)
    ap.add_argument("--no-streams", action="store_true", help="no TCP and UDP stream")
    ap.add_argument("--out", help="JSON lines file for the events")
    a = ap.parse_args(argv)
    if not (0 < a.seconds <= 3600):
        ap.error("--seconds: 0 < s <= 3600")
    if not (1 <= a.concurrency <= 256) or not (0 <= a.clients <= 100_000):
        ap.error("--concurrency 1..256, --clients 0..100000")
    if a.src_clients:
        import ipaddress
        try:
            if ipaddress.ip_network(a.src_clients, strict=False).num_addresses > 256:
                ap.error("--src-clients: at most 256 addresses")
        except ValueError as e:
            ap.error(f"--src-clients: {e}")
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    summary = asyncio.run(run(a))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
