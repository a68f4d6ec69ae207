"""Simple backends for the lab, the demo and the tests: HTTP, TCP echo, UDP echo.

    python -m lab.backend --name web1 --http 127.0.0.1:9001 [--tcp ADDR] [--udp ADDR]

HTTP (HTTP/1.1, keep-alive, Content-Length and chunked bodies):
  GET  /healthz             200 "ok" (or 503 after POST /admin/sick; POST /admin/well heals)
  GET  /download?bytes=N    N bytes of a fixed pattern (``pattern(N)``), with Content-Length
  GET  /status/NNN          answers status NNN
  GET  /sleep?ms=N          answers after N milliseconds
  POST /admin/load?h=VALUE  every answer from now on carries ``endpoint-load-metrics: VALUE``
                            (an ORCA load report, e.g. ``TEXT cpu_utilization=0.8``); empty: none
  POST|PUT anything         streams the body into SHA-256; answers {"sha256", "bytes"}
  anything else             JSON echo: backend, method, path, headers, client address
Every answer carries ``X-Backend: NAME``.
TCP: echo; a connection whose first bytes are ``WHO\\n`` gets ``NAME\\n`` first.
UDP: echo prefixed with ``NAME|``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import sys
from urllib.parse import parse_qs, urlsplit

import httptools

_PAT = bytes(range(256)) * 256  # 64 KiB


def pattern(n: int) -> bytes:
    """The bytes /download?bytes=n returns."""
    reps, rest = divmod(n, len(_PAT))
    return _PAT * reps + _PAT[:rest]


class _Http(asyncio.Protocol):
    def __init__(self, srv: "Backend"):
        self.srv = srv
        self.parser = httptools.HttpRequestParser(self)
        self.tr: asyncio.Transport | None = None
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.hash = hashlib.sha256()
        self.nbytes = 0

    def connection_made(self, tr):
        self.tr = tr
        self.peer = tr.get_extra_info("peername")

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._send(400, b"upgrade not supported\n", close=True)
        except httptools.HttpParserError:
            self._send(400, b"bad request\n", close=True)

    # httptools callbacks
    def on_message_begin(self):
        self._reset()

    def on_url(self, url: bytes):
        self.url += url

    def on_header(self, name: bytes, value: bytes):
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes):
        self.hash.update(body)
        self.nbytes += len(body)

    def on_message_complete(self):
        method = self.parser.get_method().decode()
        u = urlsplit(self.url.decode("latin-1"))
        q = parse_qs(u.query)
        keep = self.parser.should_keep_alive()
        srv = self.srv
        srv.requests += 1
        if u.path == "/healthz":
            if srv.sick:
                self._send(503, b"sick\n", keep=keep)
            else:
                self._send(200, b"ok\n", keep=keep)
        elif u.path == "/admin/sick":
            srv.sick = True
            self._send(200, b"now sick\n", keep=keep)
        elif u.path == "/admin/well":
            srv.sick = False
            self._send(200, b"now well\n", keep=keep)
        elif u.path == "/admin/load":
            srv.load = q.get("h", [""])[0]
            self._send(200, f"load {srv.load}\n".encode(), keep=keep)
        elif u.path == "/download":
            n = min(int(q.get("bytes", ["0"])[0]), 1 << 30)
            self._send(200, pattern(n), keep=keep, ctype="application/octet-stream")
        elif u.path.startswith("/status/"):
            code = int(u.path.rsplit("/", 1)[1] or 200)
            self._send(code, f"status {code}\n".encode(), keep=keep)
        elif u.path == "/sleep":
            ms = min(int(q.get("ms", ["0"])[0]), 60_000)
            asyncio.get_running_loop().call_later(ms / 1000, self._send, 200, b"slept\n", keep)
        elif method in ("POST", "PUT") or self.nbytes:
            body = json.dumps({"backend": srv.name, "sha256": self.hash.hexdigest(),
                               "bytes": self.nbytes}).encode()
            self._send(200, body, keep=keep, ctype="application/json")
        else:
            body = json.dumps({"backend": srv.name, "method": method, "path": u.path,
                               "query": u.query, "headers": self.headers,
                               "client": f"{self.peer[0]}:{self.peer[1]}" if self.peer else ""}).encode()
            self._send(200, body, keep=keep, ctype="application/json")

    def _send(self, code: int, body: bytes, keep: bool = True, *, ctype: str = "text/plain",
              close: bool = False) -> None:
        if self.tr is None or self.tr.is_closing():
            return
        keep = keep and not close
        head = (f"HTTP/1.1 {code} X\r\nContent-Length: {len(body)}\r\nContent-Type: {ctype}\r\n"
                f"X-Backend: {self.srv.name}\r\n"
                + (f"endpoint-load-metrics: {self.srv.load}\r\n" if self.srv.load else "")
                + ("" if keep else "Connection: close\r\n") + "\r\n")
        self.tr.write(head.encode() + body)
        if not keep:
            self.tr.close()


class _Tcp(asyncio.Protocol):
    def __init__(self, srv: "Backend"):
        self.srv = srv
        self.first = True

    def connection_made(self, tr):
        self.tr = tr
        self.srv.tcp_conns += 1

    def data_received(self, data: bytes) -> None:
        if self.first:
            self.first = False
            if data.startswith(b"WHO\n"):
                self.tr.write(self.srv.name.encode() + b"\n")
                data = data[4:]
        if data:
            self.tr.write(data)

    def eof_received(self):
        return False  # close after the echo is flushed


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, srv: "Backend"):
        self.prefix = srv.name.encode() + b"|"

    def connection_made(self, tr):
        self.tr = tr

    def datagram_received(self, data: bytes, addr) -> None:
        self.tr.sendto(self.prefix + data, addr)


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class Backend:
    def __init__(self, name: str):
        self.name = name
        self.sick = False
        self.load = ""  # endpoint-load-metrics value sent on every answer ("" none)
        self.requests = 0
        self.tcp_conns = 0
        self.servers: list = []

    async def start(self, http: str | None = None, tcp: str | None = None,
                    udp: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        if http:
            h, p = _split(http)
            self.servers.append(await loop.create_server(lambda: _Http(self), h, p,
                                                         reuse_address=True, backlog=1024))
        if tcp:
            h, p = _split(tcp)
            self.servers.append(await loop.create_server(lambda: _Tcp(self), h, p,
                                                         reuse_address=True, backlog=1024))
        if udp:
            h, p = _split(udp)
            tr, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(h, p))
            self.servers.append(tr)

    def close(self) -> None:
        for s in self.servers:
            s.close()


async def _main(a) -> None:
    b = Backend(a.name)
    b.load = a.load or ""
    await b.start(a.http, a.tcp, a.udp)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    print(f"backend {a.name} ready pid={os.getpid()}", flush=True)
    await stop.wait()
    b.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lab.backend", description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--http")
    ap.add_argument("--tcp")
    ap.add_argument("--udp")
    ap.add_argument("--load", help="endpoint-load-metrics value on every HTTP answer")
    a = ap.parse_args(argv)
    if not (a.http or a.tcp or a.udp):
        ap.error("give at least one of --http, --tcp, --udp")
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(_main(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
