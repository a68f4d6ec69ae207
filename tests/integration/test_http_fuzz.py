"""Bounded mutation fuzzing of requests through a real halbd (seeded, reproducible).

Whatever a client sends, (1) the daemon stays up, (2) the client gets either an HTTP/1.1
answer or a closed connection, and (3) everything that reaches the backend is a clean,
canonical HTTP/1.1 request stream: a strict backend parses it with llhttp plus halb's own
request-line and framing rules and records any violation.
"""

from __future__ import annotations

import asyncio
import random
import re

import httptools
import pytest

from tests.helpers import Halbd, free_port, write_config

pytestmark = pytest.mark.integration

CASES = 400
SEED = 20261122

SEEDS = [
    b"GET /a?b=c HTTP/1.1\r\nHost: a.test\r\nUser-Agent: fz\r\nAccept: */*\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nhello world",
    b"PUT /c HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nT: 1\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET http://a.test/abs HTTP/1.1\r\nHost: a.test\r\nCookie: a=1; SRV=x\r\n\r\n",
    b"DELETE /d HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 10.0.0.1\r\nConnection: close\r\n\r\n",
]
ALPHABET = [b"\r", b"\n", b"\r\n", b" ", b"\t", b"\x00", b":", b",", b";", b"0", b"9", b"f", b"-",
            b"+", b"\x7f", b"\xff", b"a", b"Z", b"/", b"?", b"%", b"\"", b"\x0b", b"\x0c"]
_LINE = re.compile(rb"^[A-Z]+ /[^ ]* HTTP/1\.1$")


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        i = rng.randrange(len(b) + 1)
        if op < 0.3:
            b[i:i] = rng.choice(ALPHABET)
        elif op < 0.5 and len(b) > 1:
            del b[i:i + rng.randint(1, 3)]
        elif op < 0.7 and i < len(b):
            b[i:i + 1] = rng.choice(ALPHABET)
        elif op < 0.85:
            lines = bytes(b).split(b"\r\n")
            j = rng.randrange(len(lines))
            lines.insert(j, lines[j])  # duplicate a line (headers twice, etc.)
            b = bytearray(b"\r\n".join(lines))
        else:
            b = bytearray(bytes(b) + rng.choice(SEEDS))  # pipelined follower
    return bytes(b)


class StrictBackend(asyncio.Protocol):
    """Parses what the proxy sends with llhttp and halb's own rules; answers each request."""

    violations: list[str] = []
    requests = 0

    def connection_made(self, tr):
        self.tr = tr
        self.p = httptools.HttpRequestParser(self)
        self.buf = b""
        self.hdrs = []

    def data_received(self, data):
        self.buf += data
        try:
            self.p.feed_data(data)
        except httptools.HttpParserError as e:
            StrictBackend.violations.append(f"unparsable: {e}: {self.buf[:300]!r}")
            self.tr.close()

    def on_message_begin(self):
        self.hdrs = []
        start = self.buf.find(b"\r\n")
        line = self.buf[:start] if start >= 0 else b""
        if start >= 0 and not _LINE.match(line):
            StrictBackend.violations.append(f"non-canonical request line {line!r}")

    def on_header(self, n, v):
        self.hdrs.append((n.lower(), v))

    def on_headers_complete(self):
        names = [n for n, _ in self.hdrs]
        if names.count(b"host") != 1:
            StrictBackend.violations.append(f"Host count {names.count(b'host')}: {self.hdrs}")
        te = [v for n, v in self.hdrs if n == b"transfer-encoding"]
        if te and (te != [b"chunked"] or b"content-length" in names):
            StrictBackend.violations.append(f"bad framing headers {self.hdrs}")
        for n in (b"connection", b"keep-alive", b"upgrade", b"te"):
            if n in names:
                StrictBackend.violations.append(f"hop-by-hop header {n!r} forwarded")

    def on_message_complete(self):
        StrictBackend.requests += 1
        i = self.buf.find(b"\r\n\r\n")
        self.buf = b""
        self.tr.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


async def _client(port: int, data: bytes, sem: asyncio.Semaphore) -> bytes | None:
    async with sem:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return None
        try:
            w.write(data)
            await w.drain()
            return await asyncio.wait_for(r.read(1 << 16), 4)
        except (asyncio.TimeoutError, ConnectionError):
            return b"<timeout or reset>"
        finally:
            w.close()


def test_fuzzed_requests_never_reach_backend_malformed(tmp_path):
    async def main():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(StrictBackend, "127.0.0.1", 0)
        bport = srv.sockets[0].getsockname()[1]
        port = free_port()
        cfg = write_config(tmp_path, f'''
[node]
name = "fz"
state_dir = "{tmp_path}"
[[pools]]
name = "p"
[[pools.backends]]
name = "strict"
address = "127.0.0.1:{bport}"
[[listeners]]
name = "h"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "p"
[listeners.timeouts]
header = 1
body = 1
server = 2
client_idle = 1
''')
        rng = random.Random(SEED)
        cases = [mutate(rng, rng.choice(SEEDS)) for _ in range(CASES)]
        with Halbd(cfg) as h:
            await loop.run_in_executor(None, h.wait_port, port)
            sem = asyncio.Semaphore(32)
            answers = await asyncio.gather(*(_client(port, c, sem) for c in cases))
            assert h.alive(), h.output()[-2000:]
            # every answer is HTTP/1.1 or a closed connection
            for c, a in zip(cases, answers):
                assert a is not None
                assert a in (b"", b"<timeout or reset>") or a.startswith(b"HTTP/1.1 "), (c, a[:100])
            # the node still serves
            ok = await _client(port, SEEDS[0].replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"),
                               sem)
            assert ok.startswith(b"HTTP/1.1 200 ")
            assert h.alive()
        srv.close()
        assert StrictBackend.violations == []
        # a fair share of the mutants were still valid and served (the fuzz is not all noise)
        served = sum(1 for a in answers if a and a.startswith(b"HTTP/1.1 200"))
        refused = sum(1 for a in answers if a and a[9:12] in (b"400", b"414", b"431", b"501"))
        assert served > CASES // 10 and refused > CASES // 10, (served, refused)
        assert StrictBackend.requests >= served

    asyncio.run(main())
