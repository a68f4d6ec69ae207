"""Access logs end to end (issue 16): real nodes, real sockets, the log file (or syslog
datagrams) parsed line by line and matched with what the clients saw.

- 10,000 HTTP requests from 8 keep-alive clients to two backends (statuses 200..503 chosen by
  the client, Content-Length and chunked bodies of 0..100,000 bytes, HEAD and POST), plus
  requests halb refuses (400, 414, 431, 501), 503s with no backend up and 502s with every
  backend refusing: every line of the file parsed, one per request, status, bytes, backend,
  client port and termination state as the client saw them (and HAProxy's halog, where
  installed, counts the same statuses and termination states);
- an L4 TCP listener: one line per connection with bytes in and out;
- JSON lines, termination states of failed exchanges (504 sH, 502 PH, SD, CH) and a WebSocket
  style tunnel logged once at its end (101, bytes both ways);
- syslog over UDP (RFC 5424 header parsed);
- a destination that blocks (a FIFO nobody reads): lines are dropped and counted, requests
  are not slowed;
- logrotate with a real halbd: the file renamed, SIGUSR1, new lines in the new file;
- per-listener ``access_log = false``, ``enabled = false`` and sampling.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from halb.config import loads
from halb.node import Node
from tests.helpers import Backends, Halbd, free_ports, http_get, wait_for, write_config

pytestmark = pytest.mark.integration

HTTP_RE = re.compile(
    r'^(?P<ip>[0-9.]+):(?P<port>\d+) \[(?P<date>\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d\.\d{3})\] '
    r'(?P<listener>\S+) (?P<pool>\S+)/(?P<backend>\S+) '
    r'(?P<Tq>-?\d+)/(?P<Tw>-?\d+)/(?P<Tc>-?\d+)/(?P<Tr>-?\d+)/(?P<Ta>\d+) '
    r'(?P<status>-?\d+) (?P<bytes>\d+) - - (?P<term>[-a-zA-Z]{2})(?P<ck>[-A-Z]{2}) '
    r'-/(?P<fc>\d+)/-/(?P<sc>\d+)/(?P<retries>\d+) 0/0 "(?P<request>[^"]*)"$')
TCP_RE = re.compile(
    r'^(?P<ip>[0-9.]+):(?P<port>\d+) \[(?P<date>\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d\.\d{3})\] '
    r'(?P<listener>\S+) (?P<pool>\S+)/(?P<backend>\S+) (?P<Tw>-?\d+)/(?P<Tc>-?\d+)/(?P<Tt>\d+) '
    r'(?P<bytes_out>\d+) (?P<term>[-a-zA-Z]{2}) -/(?P<fc>\d+)/-/(?P<sc>\d+)/(?P<retries>\d+) 0/0 '
    r'(?P<bytes_in>\d+)$')
SYSLOG_RE = re.compile(
    r'^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<host>\S+) '
    r'(?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) (?P<sd>-) (?P<msg>.*)$')


# ---------------------------------------------------------------------------------------------
# Backends and clients


class Backend:
    """An HTTP/1.1 backend whose answer the request target chooses: ``?s=STATUS&n=BYTES&c=1``
    (chunked); it names itself in ``X-Backend``. ``mode``: "ok", or for one-off behaviours
    "silent" (never answers), "garbage", "cut" (a head promising 1000 bytes, 10, then close),
    "upgrade" (101, then echoes what comes)."""

    def __init__(self, name: str, mode: str = "ok"):
        self.name = name
        self.mode = mode
        self.requests = 0

    async def start(self) -> "Backend":
        self.srv = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.srv.sockets[0].getsockname()[1]
        return self

    async def _serve(self, r, w):
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                line, *hl = head.split(b"\r\n")
                method, target, _ = line.split(b" ")
                cl = 0
                for h in hl:
                    if h.lower().startswith(b"content-length:"):
                        cl = int(h.split(b":")[1])
                if cl:
                    await r.readexactly(cl)
                self.requests += 1
                path = target.decode()
                if path.startswith("/silent"):
                    await asyncio.sleep(3600)
                if path.startswith("/garbage"):
                    w.write(b"NOT HTTP AT ALL\r\n\r\n")
                    await w.drain()
                    break
                if path.startswith("/cut"):
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"z" * 10)
                    await w.drain()
                    break
                if path.startswith("/upgrade"):
                    w.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                            b"Upgrade: websocket\r\n\r\n")
                    await w.drain()
                    while True:
                        data = await r.read(65536)
                        if not data:
                            break
                        w.write(data)
                        await w.drain()
                    break
                q = parse_qs(urlsplit(path).query)
                status = int(q.get("s", ["200"])[0])
                n = int(q.get("n", ["0"])[0])
                chunked = q.get("c", ["0"])[0] == "1"
                hdr = f"HTTP/1.1 {status} Whatever\r\nX-Backend: {self.name}\r\n"
                if status in (204, 304):
                    w.write(hdr.encode() + b"\r\n")
                elif chunked:
                    w.write(hdr.encode() + b"Transfer-Encoding: chunked\r\n\r\n")
                    if method != b"HEAD":
                        left = n
                        while left:
                            k = min(left, 3000)
                            w.write(b"%x\r\n%s\r\n" % (k, b"c" * k))
                            left -= k
                        w.write(b"0\r\n\r\n")
                else:
                    w.write(hdr.encode() + f"Content-Length: {n}\r\n\r\n".encode()
                            + (b"b" * n if method != b"HEAD" else b""))
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        w.close()

    def close(self):
        self.srv.close()


async def read_response(r, head_req: bool) -> tuple[int, int, dict]:
    """(status, bytes received: head and body as framed, headers) of one response."""
    head = await r.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    hdrs = {}
    for h in lines[1:]:
        if b":" in h:
            k, v = h.split(b":", 1)
            hdrs[k.strip().lower().decode()] = v.strip().decode()
    n = len(head)
    if head_req or status in (204, 304) or 100 <= status < 200:
        return status, n, hdrs
    if "content-length" in hdrs:
        cl = int(hdrs["content-length"])
        await r.readexactly(cl)
        return status, n + cl, hdrs
    if hdrs.get("transfer-encoding") == "chunked":
        while True:
            line = await r.readuntil(b"\r\n")
            n += len(line)
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while True:
                    t = await r.readuntil(b"\r\n")
                    n += len(t)
                    if t == b"\r\n":
                        break
                return status, n, hdrs
            await r.readexactly(size + 2)
            n += size + 2
    rest = await r.read()  # until close
    return status, n + len(rest), hdrs


async def raw_exchange(port: int, data: bytes) -> tuple[int, int, int]:
    """Sends ``data`` on a new connection, reads until halb closes: (status, bytes, port)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    cport = w.get_extra_info("sockname")[1]
    w.write(data)
    await w.drain()
    got = await r.read()
    while True:
        more = await r.read()
        if not more:
            break
        got += more
    w.close()
    return int(got.split(b" ")[1]), len(got), cport


def parse_lines(path: Path, rx=HTTP_RE) -> list[dict]:
    lines = path.read_text().splitlines()
    out = []
    bad = []
    for ln in lines:
        m = rx.match(ln)
        if m is None:
            bad.append(ln)
        else:
            out.append(m.groupdict())
    assert not bad, f"{len(bad)} lines do not parse, e.g. {bad[:3]}"
    return out


async def wait_down(node: Node, pool: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    p = node.pools[pool]
    while any(b.is_up(node.clock.now()) for b in p.backends):
        assert time.monotonic() < deadline, f"pool {pool} never went down"
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# 10,000 requests, every line matched


def big_config(tmp_path, log: Path, port: int, b1: int, b2: int, dead: int, ref1: int,
               ref2: int) -> str:
    return f'''
[node]
name = "lb1"
state_dir = "{tmp_path}"
[access_log]
destination = "file:{log}"
[[pools]]
name = "web"
  [[pools.backends]]
  name = "web1"
  address = "127.0.0.1:{b1}"
  [[pools.backends]]
  name = "web2"
  address = "127.0.0.1:{b2}"
[[pools]]
name = "dead"
  [pools.health]
  type = "tcp"
  interval = "50ms"
  timeout = "40ms"
  fall = 1
  [[pools.backends]]
  name = "d1"
  address = "127.0.0.1:{dead}"
[[pools]]
name = "refused"
  [[pools.backends]]
  name = "r1"
  address = "127.0.0.1:{ref1}"
  [[pools.backends]]
  name = "r2"
  address = "127.0.0.1:{ref2}"
[[listeners]]
name = "www"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "web"
  [[listeners.routes]]
  path_prefix = "/dead/"
  pool = "dead"
  [[listeners.routes]]
  path_prefix = "/refused/"
  pool = "refused"
  [listeners.limits]
  max_request_line = 1024
  max_headers = 50
'''


STATUSES = [200] * 8 + [201, 204, 301, 404, 500, 503]
SIZES = [0, 1, 17, 100, 1000, 4000, 15000]
CLIENTS = 8
PER_CLIENT = 1250


async def client(port: int, cid: int, rnd: random.Random, seen: dict) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    cport = w.get_extra_info("sockname")[1]
    for seq in range(PER_CLIENT):
        status = rnd.choice(STATUSES)
        n = 100_000 if rnd.random() < 0.005 else rnd.choice(SIZES)
        chunked = int(rnd.random() < 0.25)
        method = "HEAD" if rnd.random() < 0.05 else "POST" if rnd.random() < 0.05 else "GET"
        rid = f"{cid}-{seq}"
        target = f"/r/{rid}?s={status}&n={n}&c={chunked}"
        body = b"p" * rnd.choice((1, 10, 3000)) if method == "POST" else b""
        w.write(f"{method} {target} HTTP/1.1\r\nHost: t\r\n".encode()
                + (b"Content-Length: %d\r\n" % len(body) if body else b"") + b"\r\n" + body)
        await w.drain()
        got, nbytes, hdrs = await read_response(r, method == "HEAD")
        assert got == status
        seen[rid] = (method, status, nbytes, hdrs["x-backend"], cport)
    w.close()


def test_ten_thousand_requests_every_line_matches(tmp_path):
    log = tmp_path / "access.log"
    port, dead, ref1, ref2 = free_ports(4)

    async def main():
        b1, b2 = await Backend("web1").start(), await Backend("web2").start()
        node = Node(loads(big_config(tmp_path, log, port, b1.port, b2.port, dead, ref1, ref2)))
        await node.start()
        seen: dict = {}
        refused = []
        other: list[tuple] = []
        try:
            await asyncio.gather(*(client(port, c, random.Random(c), seen)
                                   for c in range(CLIENTS)))
            # refused by halb, each on its own connection (halb closes after answering)
            for data, status in (
                    (b"GARBAGE\r\n\r\n", 400),
                    (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
                    (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-%d: v\r\n" % i
                                                                 for i in range(60)) + b"\r\n",
                     431),
                    (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                     501)):
                got, nbytes, cport = await raw_exchange(port, data)
                assert got == status
                refused.append((status, nbytes, cport))
            # no backend up: 503 (SC); every backend refusing: 502 (SC) after a retry
            await wait_down(node, "dead")
            r, w = await asyncio.open_connection("127.0.0.1", port)
            cport = w.get_extra_info("sockname")[1]
            for i in range(3):
                for path, status in ((f"/dead/{i}", 503), (f"/refused/{i}", 502)):
                    w.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                    await w.drain()
                    got, nbytes, _ = await read_response(r, False)
                    assert got == status
                    other.append((path, status, nbytes, cport))
            w.close()
        finally:
            await node.stop()
            b1.close()
            b2.close()
        return seen, refused, other, b1.requests + b2.requests

    seen, refused, other, served = asyncio.run(main())
    assert len(seen) == CLIENTS * PER_CLIENT == 10_000 and served == 10_000
    lines = parse_lines(log)
    assert len(lines) == 10_000 + len(refused) + len(other)
    by_id = {}
    rest = []
    for d in lines:
        m = re.match(r"^(GET|HEAD|POST) /r/(\d+-\d+)\?", d["request"])
        if m:
            assert m.group(2) not in by_id, f"two lines for request {m.group(2)}"
            by_id[m.group(2)] = d
        else:
            rest.append(d)
    assert by_id.keys() == seen.keys()
    backends = {"web1": 0, "web2": 0}
    for rid, (method, status, nbytes, backend, cport) in seen.items():
        d = by_id[rid]
        assert d["request"].startswith(f"{method} /r/{rid}?") and d["request"].endswith(" HTTP/1.1")
        assert (int(d["status"]), int(d["bytes"]), d["backend"], int(d["port"])) == \
            (status, nbytes, backend, cport), (rid, d)
        assert (d["ip"], d["listener"], d["pool"], d["term"], d["ck"], d["retries"]) == \
            ("127.0.0.1", "www", "web", "--", "--", "0")
        t = [int(d[k]) for k in ("Tq", "Tw", "Tc", "Tr", "Ta")]
        assert min(t) >= 0 and sum(t[:4]) <= t[4] < 5000, (rid, t)
        backends[backend] += 1
    assert backends["web1"] > 4000 and backends["web2"] > 4000  # round robin over both
    for status, nbytes, cport in refused:
        d = next(x for x in rest if int(x["port"]) == cport)
        assert (int(d["status"]), int(d["bytes"]), d["term"], d["pool"], d["backend"],
                d["request"], d["Tq"], d["Tr"]) == \
            (status, nbytes, "PR", "-", "-", "<BADREQ>", "-1", "-1"), d
    for path, status, nbytes, cport in other:
        d = next(x for x in rest if x["request"] == f"GET {path} HTTP/1.1")
        assert (int(d["status"]), int(d["bytes"]), int(d["port"]), d["term"]) == \
            (status, nbytes, cport, "SC"), d
        assert d["Tc"] == "-1" and d["Tr"] == "-1"
        if status == 503:  # no backend was tried
            assert (d["pool"], d["backend"], d["Tw"], d["retries"]) == ("dead", "-", "-1", "0")
        else:  # both refused the connection: the second one tried is named, one retry
            assert d["pool"] == "refused" and d["backend"] in ("r1", "r2")
            assert d["retries"] == "1" and int(d["Tw"]) >= 0
    # HAProxy's own log tool reads the file (as it reads HAProxy's "format raw" lines)
    if shutil.which("halog"):
        want = collections.Counter(s for _, s, _, _, _ in seen.values())
        want.update(s for s, _, _ in refused)
        want.update(s for _, s, _, _ in other)
        out = subprocess.run(["halog", "-s", "-4", "-st"], stdin=open(log, "rb"),
                             capture_output=True, text=True, timeout=60)
        got = {int(k): int(v) for k, v in (ln.split() for ln in out.stdout.splitlines())}
        assert got == dict(want), out.stderr
        assert f"{len(lines)} lines in" in out.stderr and "0 parsing errors" in out.stderr
        out = subprocess.run(["halog", "-s", "-4", "-tc"], stdin=open(log, "rb"),
                             capture_output=True, text=True, timeout=60)
        got = {k: int(v) for k, v in (ln.split() for ln in out.stdout.splitlines())}
        assert got == {"--": 10_000, "PR": len(refused), "SC": len(other)}


# ---------------------------------------------------------------------------------------------
# L4 TCP


def test_tcp_listener_one_line_per_connection(tmp_path):
    log = tmp_path / "access.log"
    port, dport, dead = free_ports(3)
    sizes = [(0, 0), (1, 5), (1000, 70_000), (300_000, 10), (5, 1_000_000)] * 4

    async def backend(r, w):  # "N\n" then the client's bytes; answers N bytes, then closes
        try:
            first = await r.readuntil(b"\n")
            n = int(first)
            while await r.read(65536):
                pass
            w.write(b"o" * n)
            await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        w.close()

    async def main():
        srv = await asyncio.start_server(backend, "127.0.0.1", 0)
        bport = srv.sockets[0].getsockname()[1]
        node = Node(loads(f'''
[node]
name = "lb1"
state_dir = "{tmp_path}"
[access_log]
destination = "file:{log}"
[[pools]]
name = "db"
  [[pools.backends]]
  name = "db1"
  address = "127.0.0.1:{bport}"
[[pools]]
name = "gone"
retries = 0
  [[pools.backends]]
  name = "g1"
  address = "127.0.0.1:{dead}"
[[listeners]]
name = "t"
mode = "tcp"
bind = "127.0.0.1:{port}"
pool = "db"
[[listeners]]
name = "t2"
mode = "tcp"
bind = "127.0.0.1:{dport}"
pool = "gone"
'''))
        await node.start()
        sent = []
        try:
            async def one(up: int, down: int):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                cport = w.get_extra_info("sockname")[1]
                head = b"%d\n" % down
                w.write(head + b"i" * up)
                await w.drain()
                w.write_eof()
                got = 0
                while True:
                    data = await r.read(65536)
                    if not data:
                        break
                    got += len(data)
                assert got == down
                w.close()
                sent.append((cport, len(head) + up, down))
            await asyncio.gather(*(one(u, d) for u, d in sizes))
            r, w = await asyncio.open_connection("127.0.0.1", dport)
            gone_port = w.get_extra_info("sockname")[1]
            assert await r.read() == b""  # no backend: closed
            w.close()
            await asyncio.sleep(0.2)
        finally:
            await node.stop()
            srv.close()
        return sent, gone_port

    sent, gone_port = asyncio.run(main())
    lines = parse_lines(log, TCP_RE)
    assert len(lines) == len(sizes) + 1
    by_port = {int(d["port"]): d for d in lines}
    for cport, up, down in sent:
        d = by_port[cport]
        assert (d["listener"], d["pool"], d["backend"], d["term"]) == ("t", "db", "db1", "--")
        assert (int(d["bytes_in"]), int(d["bytes_out"])) == (up, down)
        assert int(d["Tw"]) >= 0 and int(d["Tc"]) >= 0 and int(d["Tt"]) >= int(d["Tc"])
    d = by_port[gone_port]
    assert (d["listener"], d["pool"], d["backend"], d["term"], d["Tc"], d["bytes_in"],
            d["bytes_out"]) == ("t2", "gone", "-", "SC", "-1", "0", "0")


# ---------------------------------------------------------------------------------------------
# JSON, termination states, tunnels


def test_json_lines_termination_states_and_a_tunnel(tmp_path):
    log = tmp_path / "access.log"
    port = free_ports(1)[0]

    async def main():
        be = await Backend("s").start()
        node = Node(loads(f'''
[node]
name = "lb1"
state_dir = "{tmp_path}"
[access_log]
destination = "file:{log}"
format = "json"
[[pools]]
name = "p"
  [[pools.backends]]
  name = "s"
  address = "127.0.0.1:{be.port}"
[[listeners]]
name = "h"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "p"
  [listeners.timeouts]
  server = "400ms"
'''))
        await node.start()
        got = {}
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /ok?s=200&n=5 HTTP/1.1\r\nHost: t\r\n\r\n")
            got["ok"] = await read_response(r, False)
            for path in ("/silent", "/garbage"):  # (halb's connection to the client stays)
                w.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                got[path] = await read_response(r, False)
            w.close()
            # the backend dies mid-body: the client sees the break
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /cut HTTP/1.1\r\nHost: t\r\n\r\n")
            data = b""
            while True:
                more = await r.read(65536)
                if not more:
                    break
                data += more
            got["cut"] = len(data)
            w.close()
            # the client gives up while waiting for the answer (a reset: a FIN alone is a
            # half-close, after which halb still answers)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /silent/2 HTTP/1.1\r\nHost: t\r\n\r\n")
            await w.drain()
            await asyncio.sleep(0.1)
            w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                  struct.pack("ii", 1, 0))
            w.transport.abort()
            # a tunnel: 101, then 3 pieces echoed both ways
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /upgrade HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\n"
                    b"Upgrade: websocket\r\n\r\n")
            head = await r.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            for piece in (b"a" * 10, b"b" * 5000, b"c" * 3):
                w.write(piece)
                assert await r.readexactly(len(piece)) == piece
            w.write_eof()
            assert await r.read() == b""
            w.close()
            got["tunnel_head"] = len(head)
            await asyncio.sleep(0.2)
        finally:
            await node.stop()
            be.close()
        return got

    got = asyncio.run(main())
    recs = [json.loads(ln) for ln in log.read_text().splitlines()]
    by_req = {d["request"]: d for d in recs}
    assert len(recs) == 6, recs
    ok = by_req["GET /ok?s=200&n=5 HTTP/1.1"]
    assert (ok["status"], ok["bytes"], ok["term"], ok["backend"], ok["mode"], ok["method"]) == \
        (200, got["ok"][1], "--", "s", "http", "GET")
    assert ok["time"].endswith("Z") and "bytes_in" not in ok
    slow = by_req["GET /silent HTTP/1.1"]
    assert (slow["status"], slow["term"], slow["Tr"], slow["bytes"]) == \
        (504, "sH", -1, got["/silent"][1])
    assert 350 <= slow["Ta"] < 3000
    bad = by_req["GET /garbage HTTP/1.1"]
    assert (bad["status"], bad["term"], bad["bytes"]) == (502, "PH", got["/garbage"][1])
    cut = by_req["GET /cut HTTP/1.1"]
    assert (cut["status"], cut["term"], cut["bytes"]) == (200, "SD", got["cut"])
    gave_up = by_req["GET /silent/2 HTTP/1.1"]
    assert (gave_up["status"], gave_up["term"], gave_up["Tr"]) == (-1, "CH", -1)
    tun = by_req["GET /upgrade HTTP/1.1"]
    assert (tun["status"], tun["term"], tun["bytes_in"], tun["bytes"]) == \
        (101, "--", 5013, got["tunnel_head"] + 5013)


# ---------------------------------------------------------------------------------------------
# syslog


def test_syslog_over_udp_rfc5424(tmp_path):
    port, sport = free_ports(2)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", sport))
    rx.settimeout(5)

    async def main():
        be = await Backend("s").start()
        node = Node(loads(f'''
[node]
name = "lb1"
state_dir = "{tmp_path}"
[access_log]
destination = "syslog:127.0.0.1:{sport}"
facility = "local3"
[[pools]]
name = "p"
  [[pools.backends]]
  name = "s"
  address = "127.0.0.1:{be.port}"
[[listeners]]
name = "h"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "p"
'''))
        await node.start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            for i in range(5):
                w.write(f"GET /s{i}?n={i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                await read_response(r, False)
            w.close()
        finally:
            await node.stop()
            be.close()

    t0 = time.time()
    asyncio.run(main())
    msgs = []
    for _ in range(5):
        msgs.append(rx.recv(65536).decode())
    rx.close()
    for i, m in enumerate(msgs):
        h = SYSLOG_RE.match(m)
        assert h, m
        assert int(h["pri"]) == 19 * 8 + 6  # local3.info
        assert (h["host"], h["app"], h["procid"], h["msgid"]) == \
            (socket.gethostname(), "halb", str(os.getpid()), "access")
        ts = time.mktime(time.strptime(h["ts"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        assert abs(ts - t0) < 60
        d = HTTP_RE.match(h["msg"])
        assert d and d["request"] == f"GET /s{i}?n={i} HTTP/1.1" and d["status"] == "200"


# ---------------------------------------------------------------------------------------------
# a destination that blocks


def test_a_blocked_destination_drops_and_counts_never_blocks(tmp_path):
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opened, never read (until the end)
    port = free_ports(1)[0]
    n_clients, per = 4, 750

    async def main():
        be = await Backend("s").start()
        node = Node(loads(f'''
[node]
name = "lb1"
state_dir = "{tmp_path}"
[access_log]
destination = "file:{fifo}"
buffer = 100
[[pools]]
name = "p"
  [[pools.backends]]
  name = "s"
  address = "127.0.0.1:{be.port}"
[[listeners]]
name = "h"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "p"
'''))
        await node.start()
        worst = 0.0
        try:
            async def one(c):
                nonlocal worst
                r, w = await asyncio.open_connection("127.0.0.1", port)
                for i in range(per):
                    t = time.perf_counter()
                    w.write(f"GET /{c}/{i}?n=64 HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                    status, _, _ = await read_response(r, False)
                    assert status == 200
                    worst = max(worst, time.perf_counter() - t)
                w.close()
            t0 = time.perf_counter()
            await asyncio.gather(*(one(c) for c in range(n_clients)))
            took = time.perf_counter() - t0
            await asyncio.sleep(0.3)
            alog = node.access_log
            stuck = alog.written < n_clients * per
            dropped = node.metrics.value("halb_access_log_dropped_total")
            lines = node.metrics.value("halb_access_log_lines_total")
            queued = len(alog.q)
            t1 = time.perf_counter()
        finally:
            await node.stop()
        stop_took = time.perf_counter() - t1
        be.close()
        return worst, took, stuck, dropped, lines, queued, stop_took

    try:
        worst, took, stuck, dropped, lines, queued, stop_took = asyncio.run(main())
    finally:
        # let the writer thread go: read what it holds
        os.set_blocking(reader, False)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if not os.read(reader, 1 << 20):
                    break
            except BlockingIOError:
                time.sleep(0.05)
        os.close(reader)
    total = n_clients * per
    assert stuck
    # the pipe took some lines (its 64 KiB), the buffer holds at most 100: the rest dropped
    assert queued <= 100
    assert dropped >= total - 100 - 2 * 4096, (dropped, lines, queued)
    assert dropped >= 1000
    assert worst < 0.5, f"a request waited {worst:.3f} s: the event loop was blocked"
    assert took < 60
    assert stop_took < 5  # the stop gives up on the stuck writer after 2 s


# ---------------------------------------------------------------------------------------------
# per-listener switch, enabled = false, sampling


def test_listener_switch_disabled_node_and_sampling(tmp_path):
    log = tmp_path / "a.log"
    pa, pb = free_ports(2)

    def cfg(access: str) -> str:
        return f'''
[node]
name = "lb1"
state_dir = "{tmp_path}"
[access_log]
destination = "file:{log}"
{access}
[[pools]]
name = "p"
  [[pools.backends]]
  name = "s"
  address = "127.0.0.1:{{bport}}"
[[listeners]]
name = "a"
mode = "http"
bind = "127.0.0.1:{pa}"
pool = "p"
[[listeners]]
name = "b"
mode = "http"
bind = "127.0.0.1:{pb}"
pool = "p"
access_log = false
'''

    async def run(access: str, n: int) -> None:
        be = await Backend("s").start()
        node = Node(loads(cfg(access).replace("{bport}", str(be.port))))
        await node.start()
        try:
            for port in (pa, pb):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                for i in range(n):
                    w.write(f"GET /{port}/{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                    await read_response(r, False)
                w.close()
        finally:
            await node.stop()
            be.close()

    asyncio.run(run("", 3))
    lines = parse_lines(log)
    assert [d["request"] for d in lines] == [f"GET /{pa}/{i} HTTP/1.1" for i in range(3)]
    log.unlink()
    asyncio.run(run("enabled = false", 3))
    assert not log.exists()
    asyncio.run(run("sample = 0.25", 40))
    lines = parse_lines(log)
    assert [d["request"] for d in lines] == [f"GET /{pa}/{i} HTTP/1.1" for i in range(3, 40, 4)]


def test_a_file_that_cannot_be_opened_stops_the_start_naming_it(tmp_path):
    port = free_ports(1)[0]
    bad = tmp_path / "no-such-dir" / "access.log"

    async def main():
        node = Node(loads(f'''
[node]
name = "lb1"
state_dir = "{tmp_path}"
[access_log]
destination = "file:{bad}"
[[pools]]
name = "p"
  [[pools.backends]]
  address = "127.0.0.1:9"
[[listeners]]
name = "h"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "p"
'''))
        with pytest.raises(OSError) as ei:
            await node.start()
        return str(ei.value)

    msg = asyncio.run(main())
    assert f"access log file '{bad}': No such file or directory" in msg
    with socket.socket() as s:  # the listener never started
        assert s.connect_ex(("127.0.0.1", port)) != 0


# ---------------------------------------------------------------------------------------------
# logrotate: a real halbd, SIGUSR1


def test_sigusr1_reopens_the_file_for_logrotate(tmp_path):
    log = tmp_path / "access.log"
    port = free_ports(1)[0]
    with Backends(["web1"], http=True) as bk:
        cfg = write_config(tmp_path, f'''
[node]
name = "lb1"
state_dir = "{tmp_path}"
[access_log]
destination = "file:{log}"
[[pools]]
name = "web"
  [[pools.backends]]
  name = "web1"
  address = "{bk.http["web1"]}"
[[listeners]]
name = "www"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "web"
''')
        with Halbd(cfg) as node:
            node.wait_port(port)
            for i in range(5):
                assert http_get(f"http://127.0.0.1:{port}/before/{i}")[0] == 200
            wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 5, 10,
                     what="5 lines in the log")
            rotated = tmp_path / "access.log.1"
            os.rename(log, rotated)
            node.signal(signal.SIGUSR1)
            node.wait_log('"access_log_reopened"')
            for i in range(7):
                assert http_get(f"http://127.0.0.1:{port}/after/{i}")[0] == 200
            wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 7, 10,
                     what="7 lines in the new log")
            assert node.alive()
        old = parse_lines(rotated)
        new = parse_lines(log)
        assert [d["request"] for d in old] == [f"GET /before/{i} HTTP/1.1" for i in range(5)]
        assert [d["request"] for d in new] == [f"GET /after/{i} HTTP/1.1" for i in range(7)]
        assert all(d["backend"] == "web1" and d["status"] == "200" for d in old + new)
