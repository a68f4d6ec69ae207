"""Many concurrent clients through a real halbd over pooled backend connections, with some
clients misbehaving (aborting mid-answer, breaking their chunked body, sending garbage): every
answer a well-behaved client gets is the answer to its own request (the echo backend returns
the request path, and uploads come back with their own checksum), so no connection reuse ever
mixes two clients' exchanges. Bounded: 48 clients x 15 requests."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random

import pytest

from tests.helpers import Backends, Halbd, free_port, write_config

pytestmark = pytest.mark.integration

CLIENTS = 48
REQUESTS = 15


async def _read_response(r: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    head = await r.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for l in lines[1:]:
        if l:
            k, _, v = l.partition(": ")
            hdrs[k.lower()] = v
    if "content-length" in hdrs:
        body = await r.readexactly(int(hdrs["content-length"]))
    elif hdrs.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await r.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                await r.readuntil(b"\r\n")
                break
            body += await r.readexactly(size)
            await r.readexactly(2)
    else:
        body = await r.read()
    return status, hdrs, body


async def good_client(port: int, cid: int, rng: random.Random, errors: list) -> int:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    done = 0
    try:
        for i in range(REQUESTS):
            path = f"/c{cid}/r{i}"
            kind = rng.random()
            if kind < 0.25:  # upload, Content-Length or chunked
                data = rng.randbytes(rng.randint(1, 200_000))
                if rng.random() < 0.5:
                    w.write(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                            + data)
                else:
                    pieces = [data[j:j + 7000] for j in range(0, len(data), 7000)]
                    w.write(f"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                            + b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n")
                st, _, body = await asyncio.wait_for(_read_response(r), 15)
                j = json.loads(body)
                if st != 200 or j["sha256"] != hashlib.sha256(data).hexdigest():
                    errors.append(f"client {cid} upload {i}: {st} {body[:100]!r}")
            elif kind < 0.35:  # two pipelined requests
                w.write(f"GET {path}a HTTP/1.1\r\nHost: t\r\n\r\nGET {path}b HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                for suffix in "ab":
                    st, _, body = await asyncio.wait_for(_read_response(r), 15)
                    if st != 200 or json.loads(body)["path"] != path + suffix:
                        errors.append(f"client {cid} pipelined {i}{suffix}: {st} {body[:100]!r}")
            else:
                w.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                st, _, body = await asyncio.wait_for(_read_response(r), 15)
                if st != 200 or json.loads(body)["path"] != path:
                    errors.append(f"client {cid} get {i}: {st} {body[:100]!r}")
            done += 1
    finally:
        w.close()
    return done


async def bad_client(port: int, cid: int, rng: random.Random) -> None:
    for i in range(REQUESTS):
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            continue
        kind = rng.randrange(4)
        try:
            if kind == 0:  # ask for a big answer and walk away in the middle of it
                w.write(b"GET /download?bytes=3000000 HTTP/1.1\r\nHost: t\r\n\r\n")
                await r.read(10_000)
            elif kind == 1:  # a chunked body that turns bad after the head went out
                w.write(b"POST /bad HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n")
                await asyncio.sleep(0.01)
                w.write(b"zz\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n")
                await asyncio.wait_for(r.read(), 5)
            elif kind == 2:  # a Content-Length body cut short by a close
                w.write(b"POST /short HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000)
            else:  # garbage
                w.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(64))
                await asyncio.wait_for(r.read(), 5)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            w.close()


def test_concurrent_clients_never_get_each_others_answers(tmp_path):
    names = ["w1", "w2", "w3"]
    with Backends(names, logdir=tmp_path) as bk:
        port = free_port()
        backs = "\n".join(f'[[pools.backends]]\nname = "{n}"\naddress = "{bk.http[n]}"\n' for n in names)
        cfg = write_config(tmp_path, f'''
[node]
name = "cc"
state_dir = "{tmp_path}"
[[pools]]
name = "p"
algorithm = "leastconn"
{backs}
[[listeners]]
name = "h"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "p"
''')
        with Halbd(cfg) as h:
            h.wait_port(port)

            async def main():
                rng = random.Random(7)
                errors: list = []
                good = [good_client(port, c, random.Random(rng.random()), errors) for c in range(CLIENTS)]
                bad = [bad_client(port, 1000 + c, random.Random(rng.random())) for c in range(CLIENTS // 4)]
                res = await asyncio.wait_for(asyncio.gather(*good, *bad), 120)
                return errors, sum(x for x in res if x)
            errors, done = asyncio.run(main())
            assert errors == []
            assert done == CLIENTS * REQUESTS
            assert h.alive()
            out = h.output()
            assert "Traceback" not in out and "Fatal error" not in out, out[-3000:]
            assert '"level":"error"' not in out, out[-3000:]
