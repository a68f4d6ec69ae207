"""The L7 HTTP proxy through a real halbd with real clients (urllib, http.client, curl, raw
sockets): round robin, sticky cookie across 50 requests and its move when the backend dies,
host/path/header routes, X-Forwarded-For, 10 MiB uploads (Content-Length and chunked) and
downloads checksummed, keep-alive reuse, TLS with SNI, and the sticky-table log records."""

from __future__ import annotations

import datetime
import hashlib
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from lab.backend import pattern
from tests.helpers import Backends, Halbd, free_port, free_ports, http_get, wait_for, write_config

pytestmark = pytest.mark.integration

WEB = ["web1", "web2", "web3"]
OTHER = ["api1", "static1", "canary1"]
MiB = 1 << 20


def _make_cert(d: Path, name: str) -> tuple[Path, Path, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cp, kp = d / f"{name}.pem", d / f"{name}.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cp, kp, cert.public_bytes(serialization.Encoding.DER)


class Env:
    pass


@pytest.fixture(scope="module")
def env():
    d = Path(tempfile.mkdtemp(prefix="halb-http-"))
    e = Env()
    e.dir = d
    e.certs = {n: _make_cert(d, n) for n in ("default.test", "b.test")}
    with Backends(WEB + OTHER, logdir=d) as bk:
        e.bk = bk
        e.port, e.tls_port = free_ports(2)

        def backends(names):
            return "\n".join(f'[[pools.backends]]\nname = "{n}"\naddress = "{bk.http[n]}"\n'
                             for n in names)
        cfg = write_config(d, f'''
[node]
name = "lb1"
log_level = "debug"
state_dir = "{d}"

[[pools]]
name = "web"
{backends(WEB)}
[pools.sticky]
mode = "cookie"
cookie = "HALBSRV"
ttl = "10m"
[pools.health]
type = "http"
path = "/healthz"
interval = "200ms"
timeout = "200ms"
rise = 1
fall = 1

[[pools]]
name = "api"
{backends(["api1"])}
[[pools]]
name = "static"
{backends(["static1"])}
[[pools]]
name = "canary"
{backends(["canary1"])}

[[listeners]]
name = "http"
mode = "http"
bind = "127.0.0.1:{e.port}"
pool = "web"
[[listeners.routes]]
pool = "api"
host = "api.test"
[[listeners.routes]]
pool = "static"
path_prefix = "/static/"
[[listeners.routes]]
pool = "canary"
header = {{ name = "X-Canary", value = "yes" }}

[[listeners]]
name = "https"
mode = "http"
bind = "127.0.0.1:{e.tls_port}"
pool = "api"
[[listeners.tls.certificates]]
cert = "{e.certs['default.test'][0]}"
key = "{e.certs['default.test'][1]}"
server_names = ["default.test"]
[[listeners.tls.certificates]]
cert = "{e.certs['b.test'][0]}"
key = "{e.certs['b.test'][1]}"
server_names = ["b.test"]
''')
        with Halbd(cfg) as h:
            h.wait_port(e.port)
            h.wait_port(e.tls_port)
            e.h = h
            e.url = f"http://127.0.0.1:{e.port}"
            yield e
    shutil.rmtree(d, ignore_errors=True)


def _get(e, path="/", headers=None):
    st, hd, body = http_get(e.url + path, headers=headers)
    return st, hd, body


def test_round_robin_over_three_backends(env):
    seen = [_get(env, f"/rr?i={i}")[1]["X-Backend"] for i in range(9)]
    assert sorted(set(seen)) == WEB
    # strict rotation: every window of three requests visits each backend once
    for i in range(0, 9, 3):
        assert sorted(seen[i:i + 3]) == WEB, seen


def test_routes_reach_the_right_pools(env):
    assert _get(env, "/x", {"Host": "api.test"})[1]["X-Backend"] == "api1"
    assert _get(env, "/x", {"Host": "API.test:80"})[1]["X-Backend"] == "api1"
    assert _get(env, "/static/app.js")[1]["X-Backend"] == "static1"
    assert _get(env, "/x", {"X-Canary": "yes"})[1]["X-Backend"] == "canary1"
    assert _get(env, "/x", {"X-Canary": "no"})[1]["X-Backend"] in WEB
    assert _get(env, "/x", {"Host": "other.test"})[1]["X-Backend"] in WEB
    # first match wins: host route before path route
    assert _get(env, "/static/x", {"Host": "api.test"})[1]["X-Backend"] == "api1"


def test_x_forwarded_for_and_forwarded(env):
    st, _, body = _get(env, "/echo")
    j = json.loads(body)
    h = {k.lower(): v for k, v in j["headers"]}
    assert h["x-forwarded-for"] == "127.0.0.1"
    assert h["x-forwarded-proto"] == "http"
    assert h["forwarded"].startswith("for=127.0.0.1;proto=http")
    st, _, body = _get(env, "/echo", {"X-Forwarded-For": "203.0.113.9"})
    h = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert h["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"


def test_keep_alive_and_connection_reuse_to_backends(env):
    c = http.client.HTTPConnection("127.0.0.1", env.port, timeout=5)
    clients = set()
    for i in range(12):
        c.request("GET", f"/ka?i={i}")
        r = c.getresponse()
        j = json.loads(r.read())
        assert r.status == 200
        clients.add(j["client"])
    c.close()
    # 12 requests over one client connection reached 3 backends over reused connections:
    # far fewer backend source ports than requests
    assert len(clients) <= 6, clients


def test_sticky_cookie_keeps_client_then_moves_when_backend_dies(env):
    st, hd, _ = _get(env, "/s")
    sc = hd.get("Set-Cookie", "")
    assert sc.startswith("HALBSRV=") and "path=/" in sc and "HttpOnly" in sc
    first = sc.split(";")[0].split("=", 1)[1]
    assert first == hd["X-Backend"]
    cookie = {"Cookie": f"HALBSRV={first}"}
    for i in range(50):
        st, hd, _ = _get(env, f"/s?i={i}", cookie)
        assert st == 200 and hd["X-Backend"] == first, (i, hd)
        assert "Set-Cookie" not in hd  # honoured, not re-set
    env.bk.kill(first)
    try:
        def moved():
            st, hd, _ = _get(env, "/s", cookie)
            return hd if st == 200 and hd["X-Backend"] != first else None
        hd = wait_for(moved, 10, what="the client to move off the dead backend")
        new = hd["X-Backend"]
        assert hd["Set-Cookie"].startswith(f"HALBSRV={new};")
        cookie = {"Cookie": f"HALBSRV={new}"}
        for i in range(20):
            st, hd, _ = _get(env, f"/s2?i={i}", cookie)
            assert st == 200 and hd["X-Backend"] == new
    finally:
        env.bk.start(first)
        wait_for(lambda: _get(env, "/up", {"Cookie": f"HALBSRV={first}"})[1]["X-Backend"] == first,
                 10, what=f"{first} back in the pool")
    # the sticky table recorded both backends (debug log line per new entry)
    out = env.h.output()
    recs = [json.loads(l) for l in out.splitlines() if '"sticky_new"' in l]
    keys = {r["key"] for r in recs}
    assert f"cookie/web/{first}" in keys and f"cookie/web/{new}" in keys


def test_10mib_download_and_uploads_intact(env, tmp_path):
    n = 10 * MiB
    want = hashlib.sha256(pattern(n)).hexdigest()
    # download with curl
    out = subprocess.run(["curl", "-sS", "--fail", "-o", "-", f"{env.url}/download?bytes={n}"],
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout) == n and hashlib.sha256(out.stdout).hexdigest() == want
    # upload with Content-Length (curl)
    blob = tmp_path / "blob"
    data = bytes(range(256)) * (n // 256)
    data = hashlib.sha256(b"seed").digest() * 7 + data[:-224]
    blob.write_bytes(data)
    want_up = hashlib.sha256(data).hexdigest()
    out = subprocess.run(["curl", "-sS", "--fail", "-H", "Expect:", "--data-binary", f"@{blob}",
                          f"{env.url}/upload"], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    j = json.loads(out.stdout)
    assert (j["bytes"], j["sha256"]) == (n, want_up)
    # chunked upload (curl)
    out = subprocess.run(["curl", "-sS", "--fail", "-H", "Expect:", "-H", "Transfer-Encoding: chunked",
                          "--data-binary", f"@{blob}", f"{env.url}/upload"],
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    j = json.loads(out.stdout)
    assert (j["bytes"], j["sha256"]) == (n, want_up)

    # chunked upload with http.client from a generator, in uneven pieces
    def gen():
        for i in range(0, n, 100_003):
            yield data[i:i + 100_003]
    c = http.client.HTTPConnection("127.0.0.1", env.port, timeout=30)
    c.request("PUT", "/upload", body=gen(), encode_chunked=True,
              headers={"Transfer-Encoding": "chunked"})
    r = c.getresponse()
    j = json.loads(r.read())
    c.close()
    assert r.status == 200 and (j["bytes"], j["sha256"]) == (n, want_up)


def test_head_and_status_pass_through(env):
    c = http.client.HTTPConnection("127.0.0.1", env.port, timeout=5)
    c.request("HEAD", "/download?bytes=1000")
    r = c.getresponse()
    assert r.status == 200 and r.getheader("Content-Length") == "1000" and r.read() == b""
    c.request("GET", "/status/404")  # the same connection keeps working after a HEAD
    r = c.getresponse()
    assert r.status == 404 and r.read() == b"status 404\n"
    c.close()


def test_tls_sni_picks_the_certificate(env):
    def handshake(sni):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", env.tls_port), timeout=5) as s:
            with ctx.wrap_socket(s, server_hostname=sni) as t:
                der = t.getpeercert(binary_form=True)
                t.sendall(b"GET /tls HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                buf = b""
                while chunk := t.recv(65536):
                    buf += chunk
                return der, buf
    der, resp = handshake("b.test")
    assert der == env.certs["b.test"][2]
    assert resp.startswith(b"HTTP/1.1 200 ") and b"X-Backend: api1" in resp
    body = json.loads(resp.split(b"\r\n\r\n", 1)[1])
    h = {k.lower(): v for k, v in body["headers"]}
    assert h["x-forwarded-proto"] == "https"
    assert handshake("default.test")[0] == env.certs["default.test"][2]
    assert handshake("unknown.test")[0] == env.certs["default.test"][2]
    assert handshake(None)[0] == env.certs["default.test"][2]
    # a real client verifying against the certificate as its CA, by name
    out = subprocess.run(["curl", "-sS", "--fail", "--cacert", str(env.certs["b.test"][0]),
                          "--resolve", f"b.test:{env.tls_port}:127.0.0.1",
                          f"https://b.test:{env.tls_port}/curl"], capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["backend"] == "api1"


def test_pipelined_requests_answered_in_order(env):
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as s:
        s.sendall(b"".join(b"GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5))
                  + b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    paths = [json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0])["path"]
             for part in buf.split(b"HTTP/1.1 200 ")[1:]]
    assert paths == [f"/p{i}" for i in range(5)] + ["/last"]


def test_no_backend_answers_503(env, tmp_path):
    # a separate node whose only backend is a closed port: the pool never has a backend up
    port, dead = free_ports(2)  # distinct: the dead port must not be the listener's
    cfg = write_config(tmp_path, f'''
[node]
name = "lb2"
state_dir = "{tmp_path}"
[[pools]]
name = "p"
retries = 1
[[pools.backends]]
name = "gone"
address = "127.0.0.1:{dead}"
[pools.health]
type = "tcp"
interval = "100ms"
timeout = "100ms"
fall = 1
rise = 1
[[listeners]]
name = "h"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "p"
''')
    with Halbd(cfg) as h:
        h.wait_port(port)
        st, hd, body = http_get(f"http://127.0.0.1:{port}/")
        assert st in (502, 503)  # 502 while the first check runs, 503 once it is down
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/")[0] == 503, 5, what="503")
        st, hd, body = http_get(f"http://127.0.0.1:{port}/")
        assert b"no backend available in pool p" in body


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_backpressure_slow_reader_bounded_memory(env):
    """A client that does not read a 100 MiB answer: the proxy stops reading the backend
    instead of buffering, then delivers every byte intact once the client reads."""
    n = 100 * MiB
    base = _rss(env.h.pid)
    s = socket.create_connection(("127.0.0.1", env.port), timeout=30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(b"GET /download?bytes=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % n)
    time.sleep(1.5)  # the backend wrote it all at once; the proxy must have paused reading it
    grown = _rss(env.h.pid) - base
    assert grown < 12 * MiB, f"proxy buffered {grown / MiB:.1f} MiB for a slow reader"
    h = hashlib.sha256()
    got = 0
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head, rest = buf.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: %d" % n in head
    h.update(rest)
    got = len(rest)
    while chunk := s.recv(1 << 20):
        h.update(chunk)
        got += len(chunk)
    s.close()
    assert got == n and h.hexdigest() == hashlib.sha256(pattern(n)).hexdigest()
