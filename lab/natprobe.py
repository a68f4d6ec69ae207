"""Long-lived connections through a VIP, each echoing on a fixed beat: what a takeover costs the
clients of a NAT listener, connection by connection.

    python -m lab.natprobe --tcp 198.18.44.100:80 --tcp-conns 50 \\
        --udp 198.18.44.100:53 --udp-flows 16 --interval 0.05 --seconds 20 --out probe.json

TCP: each connection first sends ``WHO\\n`` (``lab.backend`` answers its name), then one
numbered line every ``--interval`` and waits for its echo (one line in flight, like an
interactive session). UDP: each flow (its own socket, so its own source port) sends one
numbered datagram every ``--interval``; ``lab.backend`` echoes it prefixed with ``NAME|``.

Per connection the result holds: the backend(s) that answered, echoes received, the longest
time between two answers (``max_gap_ms``: a takeover shows here), the times of gaps over
``--gap-ms``, and how the connection ended (``error``: reset, timeout, closed). Everything is
bounded by ``--seconds``; SIGTERM ends the run early (results are still written). Times are
CLOCK_MONOTONIC (the same clock in every namespace), so the caller can line them up with a kill.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
import time

_now = time.monotonic
CONNECT_TIMEOUT = 5.0


class Conn:
    def __init__(self, kind: str, i: int):
        self.kind, self.i = kind, i
        self.backends: list[str] = []
        self.replies = 0
        self.sent = 0
        self.last = 0.0
        self.max_gap = 0.0
        self.gaps: list[tuple[float, float]] = []  # (start, length) of gaps over the threshold
        self.error = ""
        self.lost = 0  # UDP: datagrams never answered

    def answered(self, t: float, backend: str, gap_ms: float) -> None:
        if backend and (not self.backends or self.backends[-1] != backend):
            self.backends.append(backend)
        if self.last:
            g = t - self.last
            self.max_gap = max(self.max_gap, g)
            if g * 1000 >= gap_ms:
                self.gaps.append((round(self.last, 4), round(g * 1000, 1)))
        self.last = t
        self.replies += 1

    def result(self) -> dict:
        return {"kind": self.kind, "i": self.i, "backends": self.backends, "replies": self.replies,
                "sent": self.sent, "max_gap_ms": round(self.max_gap * 1000, 1),
                "gaps": self.gaps, "error": self.error, "lost": self.lost}


async def tcp_conn(c: Conn, host: str, port: int, interval: float, until: float, gap_ms: float,
                   reply_timeout: float) -> None:
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as e:
        c.error = f"connect: {e or type(e).__name__}"
        return
    try:
        w.write(b"WHO\n")
        name = (await asyncio.wait_for(r.readline(), CONNECT_TIMEOUT)).decode().strip()
        c.answered(_now(), name, gap_ms)
        n = 0
        while _now() < until:
            n += 1
            line = f"{c.i}:{n}\n".encode()
            w.write(line)
            c.sent += 1
            echo = await asyncio.wait_for(r.readline(), reply_timeout)
            if not echo:
                c.error = "closed"
                return
            if echo != line:
                c.error = f"bad echo {echo[:40]!r}"
                return
            c.answered(_now(), name, gap_ms)
            await asyncio.sleep(interval)
    except asyncio.TimeoutError:
        c.error = f"no echo within {reply_timeout}s"
    except ConnectionResetError:
        c.error = "reset"
    except OSError as e:
        c.error = str(e)
    finally:
        w.close()


async def udp_flow(c: Conn, host: str, port: int, interval: float, until: float,
                   gap_ms: float) -> None:
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.connect((host, port))
    got: set[int] = set()

    def readable():
        while True:
            try:
                data = s.recv(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP unreachable during a takeover: counted as lost datagrams
                return
            name, _, body = data.partition(b"|")
            try:
                n = int(body.split(b":")[1])
            except (IndexError, ValueError):
                continue
            if n not in got:
                got.add(n)
                c.answered(_now(), name.decode(errors="replace"), gap_ms)

    loop.add_reader(s.fileno(), readable)
    try:
        n = 0
        while _now() < until:
            n += 1
            try:
                s.send(f"{c.i}:{n}".encode())
                c.sent += 1
            except OSError:
                pass
            await asyncio.sleep(interval)
        await asyncio.sleep(min(0.5, interval * 4))  # the last answers
    finally:
        loop.remove_reader(s.fileno())
        s.close()
        c.lost = c.sent - len(got)


async def main_async(a) -> list[dict]:
    until = _now() + a.seconds
    conns: list[Conn] = []
    tasks = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if a.tcp:
        h, p = a.tcp.rsplit(":", 1)
        h = h.strip("[]")  # an IPv6 literal: [addr]:port
        for i in range(a.tcp_conns):
            c = Conn("tcp", i)
            conns.append(c)
            tasks.append(asyncio.create_task(tcp_conn(c, h, int(p), a.interval, until, a.gap_ms,
                                                      a.reply_timeout)))
    if a.udp:
        h, p = a.udp.rsplit(":", 1)
        h = h.strip("[]")
        for i in range(a.udp_flows):
            c = Conn("udp", i)
            conns.append(c)
            tasks.append(asyncio.create_task(udp_flow(c, h, int(p), a.interval, until, a.gap_ms)))
    ready = _now()
    print(json.dumps({"started": ready}), flush=True)
    done = asyncio.gather(*tasks)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([done, stopper], timeout=a.seconds + 15,
                       return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    stopper.cancel()
    return [c.result() for c in conns]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tcp", default="", help="VIP:port of a TCP echo")
    ap.add_argument("--tcp-conns", type=int, default=50)
    ap.add_argument("--udp", default="", help="VIP:port of a UDP echo")
    ap.add_argument("--udp-flows", type=int, default=16)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--gap-ms", type=float, default=150.0, help="gaps at least this long are listed")
    ap.add_argument("--reply-timeout", type=float, default=10.0)
    ap.add_argument("--out", default="-")
    a = ap.parse_args(argv)
    if not 0 < a.seconds <= 3600 or a.tcp_conns > 5000 or a.udp_flows > 5000:
        ap.error("--seconds 0..3600, at most 5000 connections/flows")
    res = asyncio.run(main_async(a))
    text = json.dumps({"conns": res})
    if a.out == "-":
        print(text)
    else:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
