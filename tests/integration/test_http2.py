"""HTTP/2 towards clients through a real halbd, with real clients: curl --http2 (TLS, ALPN) and
--http2-prior-knowledge (h2c), nghttp, httpx[http2]. Each stream goes through the listener's
HTTP/1.1 exchange: routing, sticky cookie, X-Forwarded-For/Via, access log, bodies both ways
(checksummed), flow control with a slow reader, the HTTP/1.1 backends behind."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from lab.backend import pattern
from tests.helpers import Backends, Halbd, free_ports, wait_for, write_config
from tests.integration.test_http_proxy import _make_cert

pytestmark = pytest.mark.integration

WEB = ["web1", "web2"]
MiB = 1 << 20


class Env:
    pass


@pytest.fixture(scope="module")
def env():
    d = Path(tempfile.mkdtemp(prefix="halb-h2-"))
    e = Env()
    e.dir = d
    e.cert = _make_cert(d, "h2.test")
    with Backends(WEB + ["api1"], logdir=d) as bk:
        e.bk = bk
        e.port, e.tls_port, e.h1tls_port, e.mport = free_ports(4)

        def backends(names):
            return "\n".join(f'[[pools.backends]]\nname = "{n}"\naddress = "{bk.http[n]}"\n'
                             for n in names)
        cfg = write_config(d, f'''
[node]
name = "lb1"
log_level = "debug"
state_dir = "{d}"

[metrics]
address = "127.0.0.1:{e.mport}"

[access_log]
destination = "file:{d}/access.log"

[[pools]]
name = "web"
{backends(WEB)}
[pools.sticky]
mode = "cookie"
cookie = "HALBSRV"

[[pools]]
name = "api"
{backends(["api1"])}

[[listeners]]
name = "h2c"
mode = "http"
bind = "127.0.0.1:{e.port}"
pool = "web"
[[listeners.routes]]
pool = "api"
path_prefix = "/api/"

[[listeners]]
name = "h2tls"
mode = "http"
bind = "127.0.0.1:{e.tls_port}"
pool = "web"
[[listeners.tls.certificates]]
cert = "{e.cert[0]}"
key = "{e.cert[1]}"

[[listeners]]
name = "h1only"
mode = "http"
bind = "127.0.0.1:{e.h1tls_port}"
pool = "web"
[listeners.http2]
alpn = ["http/1.1"]
[[listeners.tls.certificates]]
cert = "{e.cert[0]}"
key = "{e.cert[1]}"
''')
        with Halbd(cfg) as h:
            for p in (e.port, e.tls_port, e.h1tls_port):
                h.wait_port(p)
            e.h = h
            yield e
    shutil.rmtree(d, ignore_errors=True)


def _curl(*args, timeout=20) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "15", *args], capture_output=True,
                          timeout=timeout)


def test_curl_h2c_prior_knowledge_routes_and_forwards(env):
    r = _curl("--http2-prior-knowledge", "-D", "-", "-o", "/dev/null",
              "-w", "%{http_version}\n", f"http://127.0.0.1:{env.port}/x")
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    assert out.startswith("HTTP/2 200"), out
    assert out.strip().endswith("2")
    assert "set-cookie: HALBSRV=web" in out.lower() or "set-cookie: halbsrv=web" in out.lower()
    r = _curl("--http2-prior-knowledge", f"http://127.0.0.1:{env.port}/api/echo")
    j = json.loads(r.stdout)
    assert j["backend"] == "api1"  # the route by path prefix
    hd = {k.lower(): v for k, v in j["headers"]}
    assert hd["x-forwarded-for"] == "127.0.0.1"
    assert hd["x-forwarded-proto"] == "http"
    assert "halb" in hd["via"]
    assert hd["host"] == f"127.0.0.1:{env.port}"


def test_curl_http2_over_tls_alpn(env):
    r = _curl("--http2", "-k", "-w", "\n%{http_version}", f"https://127.0.0.1:{env.tls_port}/e")
    assert r.returncode == 0, r.stderr
    body, ver = r.stdout.decode().rsplit("\n", 1)
    assert ver == "2"
    hd = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert hd["x-forwarded-proto"] == "https"
    # a listener whose ALPN list leaves h2 out stays on HTTP/1.1
    r = _curl("--http2", "-k", "-o", "/dev/null", "-w", "%{http_version}",
              f"https://127.0.0.1:{env.h1tls_port}/e")
    assert r.stdout == b"1.1", r.stdout


def test_sticky_cookie_over_h2(env):
    with httpx.Client(http2=True, http1=False, base_url=f"http://127.0.0.1:{env.port}") as c:
        r = c.get("/first")
        assert r.http_version == "HTTP/2"
        b = r.headers["x-backend"]
        assert r.cookies["HALBSRV"] == b
        seen = {c.get(f"/again{i}").headers["x-backend"] for i in range(20)}
        assert seen == {b}


def test_httpx_many_streams_bodies_both_ways(env):
    """Eight downloads at once on one connection, then uploads (Content-Length and chunked).
    The uploads go one at a time: httpcore 1.0's HTTP/2 client can stall with several
    concurrent uploads on one connection when they wait for window updates (each upload task
    blocks reading the socket while another one holds the update); concurrent uploads are
    tested with curl below."""
    async def run():
        async with httpx.AsyncClient(http2=True, verify=False, timeout=20) as c:
            base = f"https://127.0.0.1:{env.tls_port}"
            up = pattern(3 * MiB + 7)
            gets = [c.get(f"{base}/download", params={"bytes": 1 * MiB + i}) for i in range(8)]
            rs = await asyncio.gather(*gets, c.post(f"{base}/upload", content=up))
            for i, r in enumerate(rs[:8]):
                assert r.http_version == "HTTP/2"
                assert r.content == pattern(1 * MiB + i)

            async def chunks():  # a body of unknown length: chunked towards the backend
                for i in range(0, len(up), 65536):
                    yield up[i:i + 65536]
            rs = rs[8:] + [await c.post(f"{base}/upload", content=chunks())]
            for r in rs:
                assert r.http_version == "HTTP/2"
                j = r.json()
                assert j["bytes"] == len(up)
                assert j["sha256"] == hashlib.sha256(up).hexdigest()
    asyncio.run(run())


def test_nghttp_concurrent_uploads_one_connection(env):
    """Four 3 MiB uploads multiplexed on one HTTP/2 connection (nghttp sends all its URIs over
    one): each arrives whole at its backend, flow control both ways with the 256 KiB stream
    windows. (curl 7.88's --parallel with --http2-prior-knowledge fails against HAProxy too.)"""
    up = pattern(3 * MiB + 11)
    f = env.dir / "up.bin"
    f.write_bytes(up)
    c0, s0 = _events(env, "connections"), _events(env, "streams")
    r = subprocess.run(["nghttp", "-d", str(f)] + [f"http://127.0.0.1:{env.port}/upload{i}"
                                                   for i in range(4)],
                       capture_output=True, timeout=40)
    assert r.returncode == 0, r.stderr
    answers = [json.loads(x) for x in r.stdout.replace(b"}{", b"}\n{").splitlines() if x]
    assert len(answers) == 4
    for j in answers:
        assert j["bytes"] == len(up)
        assert j["sha256"] == hashlib.sha256(up).hexdigest()
    assert _events(env, "streams") == s0 + 4
    assert _events(env, "connections") == c0 + 1


def _events(env, event: str, listener: str = "h2c") -> float:
    m = _curl(f"http://127.0.0.1:{env.mport}/metrics").stdout.decode()
    key = f'halb_http2_events_total{{event="{event}",listener="{listener}"}} '
    return next((float(x[len(key):]) for x in m.splitlines() if x.startswith(key)), 0.0)


def test_nghttp_client_and_head(env):
    r = subprocess.run(["nghttp", "-ns", f"http://127.0.0.1:{env.port}/a",
                        f"http://127.0.0.1:{env.port}/download?bytes=100000"],
                       capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(b"\n") >= 3
    r = subprocess.run(["nghttp", "-v", "-H", ":method: HEAD",
                        f"http://127.0.0.1:{env.port}/download?bytes=5000"],
                       capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert b":status: 200" in r.stdout
    assert b"content-length: 5000" in r.stdout


def test_slow_reader_flow_control(env):
    """A client that reads a large body slowly (small windows) gets all of it intact."""
    async def run():
        async with httpx.AsyncClient(http2=True, http1=False, timeout=30) as c:
            async with c.stream("GET", f"http://127.0.0.1:{env.port}/download",
                                params={"bytes": 8 * MiB}) as r:
                h = hashlib.sha256()
                n = 0
                async for piece in r.aiter_raw(65536):
                    h.update(piece)
                    n += len(piece)
                    if n < 2 * MiB:
                        await asyncio.sleep(0.002)
                assert n == 8 * MiB
                assert h.hexdigest() == hashlib.sha256(pattern(8 * MiB)).hexdigest()
    asyncio.run(run())


def test_access_log_and_metrics(env):
    _curl("--http2-prior-knowledge", f"http://127.0.0.1:{env.port}/logged-h2")
    log = env.dir / "access.log"
    wait_for(lambda: log.exists() and b"/logged-h2" in log.read_bytes(), 5, what="log line")
    line = [x for x in log.read_text().splitlines() if "/logged-h2" in x][-1]
    assert " 200 " in line and "h2c" in line
    m = _curl(f"http://127.0.0.1:{env.mport}/metrics").stdout.decode()
    assert 'halb_http2_events_total{event="streams",listener="h2c"}' in m
    assert 'halb_http2_events_total{event="connections",listener="h2c"}' in m


def test_http11_still_served_on_the_same_listeners(env):
    r = _curl("--http1.1", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
              f"http://127.0.0.1:{env.port}/h1")
    assert r.stdout == b"1.1 200"
    r = _curl("--http1.1", "-k", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
              f"https://127.0.0.1:{env.tls_port}/h1")
    assert r.stdout == b"1.1 200"


def test_backend_down_answers_503_over_h2(env):
    # a route to a pool that has no backend up: halb's own answer goes as an HTTP/2 response
    env.bk.kill("api1")
    try:
        deadline = time.monotonic() + 5
        code = b""
        while time.monotonic() < deadline:
            r = _curl("--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}",
                      f"http://127.0.0.1:{env.port}/api/x")
            code = r.stdout
            if code in (b"502", b"503"):
                break
        assert code in (b"502", b"503")
    finally:
        env.bk.start("api1")


# a node with two HTTP listeners on pool web: "keep" (port p2) and "gone" (port p1), the one the
# reload tests below remove
_KEEP = """
[node]
name = "lb1"
state_dir = "{d}"
[[pools]]
name = "web"
[[pools.backends]]
name = "r1"
address = "{b}"
[[listeners]]
name = "keep"
mode = "http"
bind = "127.0.0.1:{p2}"
pool = "web"
"""
_GONE = """
[[listeners]]
name = "gone"
mode = "http"
bind = "127.0.0.1:{p1}"
pool = "web"
"""


def test_a_stream_under_way_finishes_after_the_goaway_of_a_reload(tmp_path):
    """A reload removes the listener while a request is in flight (nghttp, h2c): the client
    gets GOAWAY (NO_ERROR, last stream = the request's) at once, and then its answer, whole (h2's own
    close_connection would have closed the connection's state machine and failed the stream)."""
    import signal
    with Backends(["r1"], logdir=tmp_path) as bk:
        p1, p2 = free_ports(2)
        text, gone = _KEEP, _GONE
        cfg = write_config(tmp_path, (text + gone).format(d=tmp_path, b=bk.http["r1"], p1=p1, p2=p2))
        with Halbd(cfg) as h:
            h.wait_port(p1)
            p = subprocess.Popen(["nghttp", "-v", f"http://127.0.0.1:{p1}/sleep?ms=1500"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(0.4)  # the request is at the backend
            cfg.write_text(text.format(d=tmp_path, b=bk.http["r1"], p1=p1, p2=p2))
            h.signal(signal.SIGHUP)
            out = p.communicate(timeout=15)[0]
    goaway = out.find("recv GOAWAY frame")
    status = out.find(":status: 200")
    # (nghttp's request is stream 13: it opens priority streams 3-11 first)
    assert goaway >= 0 and "last_stream_id=13, error_code=NO_ERROR" in out[goaway:goaway + 200], out
    assert status > goaway, out  # the answer came after the GOAWAY...
    assert "recv DATA frame" in out[status:] and "END_STREAM" in out[status:], out  # ...whole
    assert p.returncode == 0, out


def test_reload_removing_the_listener_sends_goaway(tmp_path):
    """A reload that removes a listener tells its HTTP/2 clients at once (GOAWAY, NO_ERROR):
    their counterpart of the Connection: close an HTTP/1.1 client gets during the drain."""
    import signal
    import socket

    import h2.config
    import h2.connection
    import h2.events
    with Backends(["r1"], logdir=tmp_path) as bk:
        p1, p2 = free_ports(2)
        text, gone = _KEEP, _GONE
        cfg = write_config(tmp_path, (text + gone).format(d=tmp_path, b=bk.http["r1"], p1=p1,
                                                         p2=p2))
        with Halbd(cfg) as h:
            h.wait_port(p1)
            c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                     header_encoding=None))
            s = socket.create_connection(("127.0.0.1", p1), timeout=5)
            c.initiate_connection()
            c.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"),
                               (b":authority", b"x"), (b":path", b"/before")], end_stream=True)
            s.sendall(c.data_to_send())
            got = []
            while not any(isinstance(e, h2.events.StreamEnded) for e in got):
                got += c.receive_data(s.recv(65536))
            assert any(isinstance(e, h2.events.ResponseReceived) for e in got)
            cfg.write_text(text.format(d=tmp_path, b=bk.http["r1"], p1=p1, p2=p2))
            h.signal(signal.SIGHUP)
            t0 = time.monotonic()
            term = None
            while term is None and time.monotonic() - t0 < 5:
                data = s.recv(65536)
                if not data:
                    break
                for e in c.receive_data(data):
                    if isinstance(e, h2.events.ConnectionTerminated):
                        term = e
            s.close()
            assert term is not None and term.error_code == 0 and term.last_stream_id == 1
            h.wait_log("reload_done", 10)


def test_no_exception_logged(env):
    """Last in this module: nothing above made halbd log a traceback or an asyncio error."""
    out = env.h.output()
    for bad in ("Traceback", "Exception in callback", "Fatal error", "exception="):
        assert bad not in out, out[out.index(bad) - 2000:out.index(bad) + 2000]
