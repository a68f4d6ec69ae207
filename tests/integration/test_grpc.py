"""gRPC through a real halbd: real grpcio servers (lab.grpc_backend) behind a ``proto = "h2"``
pool with a ``type = "grpc"`` health check, real grpcio clients over h2c and TLS (ALPN h2):
unary and bidirectional streaming, trailers (trailing metadata, grpc-status, grpc-message)
carried through, grpc-timeout honoured by halb as a deadline, halb's own errors as gRPC
statuses, a killed backend marked down by the gRPC health check, and an HTTP/1.1 client
served by the HTTP/2 backend."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from tests.helpers import PY, Halbd, Proc, free_ports, port_open, wait_for, write_config
from tests.integration.test_http_proxy import _make_cert

pytestmark = pytest.mark.integration

UNARY = "/test.Echo/Unary"
BIDI = "/test.Echo/Bidi"


class Env:
    pass


def _grpc_backend(d: Path, name: str, port: int) -> Proc:
    p = Proc([PY, "-m", "lab.grpc_backend", "--name", name, "--listen", f"127.0.0.1:{port}"],
             log=d / f"{name}.log")
    wait_for(lambda: port_open("127.0.0.1", port), 10, what=f"grpc backend {name}")
    return p


@pytest.fixture(scope="module")
def env():
    d = Path(tempfile.mkdtemp(prefix="halb-grpc-"))
    e = Env()
    e.dir = d
    e.cert = _make_cert(d, "grpc.test")
    e.g1, e.g2, e.port, e.tls_port, e.dead_port, e.mport = free_ports(6)
    e.procs = {"g1": _grpc_backend(d, "g1", e.g1), "g2": _grpc_backend(d, "g2", e.g2)}
    cfg = write_config(d, f'''
[node]
name = "lb1"
log_level = "debug"
state_dir = "{d}"

[metrics]
address = "127.0.0.1:{e.mport}"

[[pools]]
name = "grpc"
proto = "h2"
h2_max_streams = 50
h2_max_conns = 2
[[pools.backends]]
name = "g1"
address = "127.0.0.1:{e.g1}"
[[pools.backends]]
name = "g2"
address = "127.0.0.1:{e.g2}"
[pools.health]
type = "grpc"
service = "test.Echo"
interval = "200ms"
timeout = "500ms"
rise = 1
fall = 1

[[pools]]
name = "dead"
proto = "h2"
retries = 0
[[pools.backends]]
name = "nobody"
address = "127.0.0.1:{e.dead_port}"
[pools.health]
type = "grpc"
interval = "200ms"
timeout = "200ms"
fall = 1

[[pools]]
name = "tiny"
proto = "h2"
retries = 0
h2_max_streams = 1
h2_max_conns = 1
[[pools.backends]]
name = "t1"
address = "127.0.0.1:{e.g1}"

[[listeners]]
name = "grpc"
mode = "http"
bind = "127.0.0.1:{e.port}"
pool = "grpc"
[listeners.timeouts]
connect = "1s"
[[listeners.routes]]
pool = "dead"
path_prefix = "/dead."
[[listeners.routes]]
pool = "tiny"
header = {{ name = "x-pool", value = "tiny" }}

[[listeners]]
name = "grpcs"
mode = "http"
bind = "127.0.0.1:{e.tls_port}"
pool = "grpc"
[[listeners.tls.certificates]]
cert = "{e.cert[0]}"
key = "{e.cert[1]}"
''')
    try:
        with Halbd(cfg) as h:
            h.wait_port(e.port)
            h.wait_port(e.tls_port)
            e.h = h
            yield e
    finally:
        for p in e.procs.values():
            p.close()
        shutil.rmtree(d, ignore_errors=True)


def _channel(e, tls: bool = False) -> grpc.Channel:
    if tls:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(e.cert[0]).read_bytes())
        return grpc.secure_channel(f"127.0.0.1:{e.tls_port}", creds,
                                   options=(("grpc.ssl_target_name_override", "grpc.test"),))
    return grpc.insecure_channel(f"127.0.0.1:{e.port}")


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "tls"])
def test_unary_with_trailers(env, tls):
    with _channel(env, tls) as ch:
        call = ch.unary_unary(UNARY)
        seen = set()
        for i in range(10):
            resp, c = call.with_call(b"hello%d" % i, timeout=5)
            who = dict(c.trailing_metadata())["x-backend"]
            assert resp == who.encode() + b":hello%d" % i
            assert c.code() == grpc.StatusCode.OK
            seen.add(who)
        assert seen == {"g1", "g2"}  # round robin over the pool


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "tls"])
def test_error_status_and_message_pass_through(env, tls):
    with _channel(env, tls) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary(UNARY)(b"fail:NOT_FOUND:no such thing", timeout=5)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        assert ei.value.details() == "no such thing"


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "tls"])
def test_bidi_streaming(env, tls):
    with _channel(env, tls) as ch:
        call = ch.stream_stream(BIDI)
        msgs = [b"m%03d" % i + b"x" * (i * 100) for i in range(60)]
        out = list(call(iter(msgs), timeout=10))
        assert len(out) == 60
        who = out[0].split(b":", 1)[0]
        assert out == [who + b":" + m for m in msgs]


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "tls"])
def test_client_and_server_streaming(env, tls):
    with _channel(env, tls) as ch:
        msgs = [b"part%d" % i for i in range(200)]
        r = ch.stream_unary("/test.Echo/Join")(iter(msgs), timeout=10)
        who, joined = r.split(b":", 1)
        assert joined == b",".join(msgs) and who in (b"g1", b"g2")
        out = list(ch.unary_stream("/test.Echo/Count")(b"5000", timeout=20))
        who = out[0].split(b":", 1)[0]
        assert out == [who + b":%d" % i for i in range(5000)]


def test_bidi_interleaved(env):
    """Each answer comes back before the next message is sent: a real full-duplex stream."""
    import queue
    q: queue.Queue = queue.Queue()

    def gen():
        for i in range(20):
            yield b"step%d" % i
            got = q.get(timeout=5)
            assert got.endswith(b"step%d" % i)

    with _channel(env) as ch:
        for r in ch.stream_stream(BIDI)(gen(), timeout=10):
            q.put(r)


def test_client_deadline(env):
    with _channel(env) as ch:
        t = time.monotonic()
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary(UNARY)(b"sleep:3000", timeout=0.3)
        assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t < 2


def _raw_grpc(port: int, path: bytes, payload: bytes, extra=()) -> tuple[dict, dict, float]:
    """One gRPC call by hand (h2 library): a client that does not enforce the deadline itself,
    so that what ends the call is halb's. Returns (headers, trailers, seconds)."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                             header_encoding=None))
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    t0 = time.monotonic()
    try:
        c.initiate_connection()
        c.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"),
                           (b":authority", b"grpc.test"), (b":path", path),
                           (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                           *extra])
        c.send_data(1, b"\0" + len(payload).to_bytes(4, "big") + payload, end_stream=True)
        s.sendall(c.data_to_send())
        heads: dict = {}
        trailers: dict = {}
        done = False
        while not done:
            data = s.recv(65536)
            if not data:
                break
            for ev in c.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    heads = dict(ev.headers)
                    if ev.stream_ended is not None:
                        done = True
                elif isinstance(ev, h2.events.TrailersReceived):
                    trailers = dict(ev.headers)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    done = True
            s.sendall(c.data_to_send())
        return heads, trailers, time.monotonic() - t0
    finally:
        s.close()


def test_grpc_timeout_is_a_deadline_in_halb(env):
    heads, trailers, took = _raw_grpc(env.port, UNARY.encode(), b"sleep:3000",
                                      [(b"grpc-timeout", b"300m")])
    assert heads[b":status"] == b"200"
    assert heads.get(b"grpc-status", trailers.get(b"grpc-status")) == b"4"  # DEADLINE_EXCEEDED
    assert 0.25 < took < 2.0


def test_no_backend_is_unavailable_trailers_only(env):
    wait_for(lambda: b'halb_backend_up{backend="nobody",pool="dead"} 0.0' in subprocess.run(
        ["curl", "-s", f"http://127.0.0.1:{env.mport}/metrics"], capture_output=True).stdout,
        10, what="dead pool's backend down")
    heads, trailers, _ = _raw_grpc(env.port, b"/dead.Svc/Call", b"x")
    assert trailers == {}  # trailers-only: the status is in the one HEADERS frame
    assert heads[b":status"] == b"200"
    assert heads[b"content-type"] == b"application/grpc"
    assert heads[b"grpc-status"] == b"14"  # UNAVAILABLE
    assert b"halb" in heads[b"grpc-message"]
    with _channel(env) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary("/dead.Svc/Call")(b"x", timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_full_h2_pool_is_unavailable_not_a_failing_backend(env):
    """The tiny pool has one connection of one stream: a second call while the first holds it
    waits timeouts.connect (1 s) for a stream, then gets UNAVAILABLE (HTTP 503 mapped), and the
    backend is not blamed (no passive failure, still up)."""
    import threading
    first = {}

    def hold():
        first["r"] = _raw_grpc(env.port, UNARY.encode(), b"sleep:2500", [(b"x-pool", b"tiny")])
    t = threading.Thread(target=hold)
    t.start()
    time.sleep(0.3)
    heads, trailers, took = _raw_grpc(env.port, UNARY.encode(), b"x", [(b"x-pool", b"tiny")])
    t.join(10)
    assert heads[b":status"] == b"200"
    assert heads.get(b"grpc-status", trailers.get(b"grpc-status")) == b"14", (heads, trailers)
    assert b"full" in heads.get(b"grpc-message", trailers.get(b"grpc-message", b"")), heads
    assert 0.8 < took < 2.5, took
    h1, t1, _ = first["r"]
    assert h1.get(b"grpc-status", t1.get(b"grpc-status")) == b"0", (h1, t1)  # it was served
    out = subprocess.run(["curl", "-s", f"http://127.0.0.1:{env.mport}/metrics"],
                         capture_output=True).stdout.decode()
    assert 'halb_backend_up{backend="t1",pool="tiny"} 1.0' in out
    assert not [ln for ln in out.splitlines() if ln.startswith("halb_backend_errors_total")
                and 'pool="tiny"' in ln and not ln.endswith(" 0.0")], out


def test_http11_client_to_h2_backend(env):
    """An HTTP/1.1 client (curl) reaches the HTTP/2-only gRPC server; the gRPC trailers come
    back as chunked trailers."""
    msg = b"via-h1"
    body = b"\0" + len(msg).to_bytes(4, "big") + msg
    r = subprocess.run(["curl", "-sS", "--http1.1", "--raw", "-D", "-", "-o", str(env.dir / "b"),
                        "-H", "content-type: application/grpc", "-H", "te: trailers",
                        "--data-binary", "@-", f"http://127.0.0.1:{env.port}{UNARY}"],
                       input=body, capture_output=True, timeout=20)
    out = r.stdout.decode("latin-1").lower()
    assert r.returncode == 0, r.stderr
    assert out.startswith("http/1.1 200")
    raw = (env.dir / "b").read_bytes()
    assert b"grpc-status: 0" in raw.lower()  # the trailers, after the last chunk
    assert b":via-h1" in raw


def test_killed_backend_marked_down_by_grpc_check(env):
    env.procs["g2"].kill()
    try:
        wait_for(lambda: b'halb_backend_up{backend="g2",pool="grpc"} 0.0' in subprocess.run(
            ["curl", "-s", f"http://127.0.0.1:{env.mport}/metrics"],
            capture_output=True).stdout, 10, what="g2 down")
        with _channel(env) as ch:
            for i in range(6):
                _, c = ch.unary_unary(UNARY).with_call(b"x", timeout=5)
                assert dict(c.trailing_metadata())["x-backend"] == "g1"
        assert "health_down" in env.h.output() or "backend_down" in env.h.output()
    finally:
        env.procs["g2"] = _grpc_backend(env.dir, "g2", env.g2)
    wait_for(lambda: b'halb_backend_up{backend="g2",pool="grpc"} 1.0' in subprocess.run(
        ["curl", "-s", f"http://127.0.0.1:{env.mport}/metrics"], capture_output=True).stdout,
        10, what="g2 up again")


def test_no_exception_logged(env):
    """Last in this module: nothing above made halbd log a traceback or an asyncio error."""
    out = env.h.output()
    for bad in ("Traceback", "Exception in callback", "Fatal error", "exception="):
        assert bad not in out, out[out.index(bad) - 2000:out.index(bad) + 2000]
