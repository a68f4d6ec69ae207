"""Per-listener timeouts and limits through a real halbd: a slowloris head, an idle
keep-alive connection and a stalled body are cut off within their configured timeouts; a
slow backend gets 504 after the server timeout, an unreachable one 504 after the connect
timeout; connections over max_conns are closed at once while the others keep working."""

from __future__ import annotations

import socket
import time

import pytest

from tests.helpers import Backends, Halbd, free_port, free_ports, write_config

pytestmark = pytest.mark.integration

T = 0.5  # the short timeouts configured below
SLACK = 2.5  # scheduling slack on a loaded 2-core machine


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    d = tmp_path_factory.mktemp("limits")
    # a backend whose accept queue is full: connects to it hang (SYNs dropped)
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(0)
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(hang.getsockname())
        fillers.append(f)
    time.sleep(0.1)
    with Backends(["web1"], logdir=d) as bk:
        lim, cap = free_ports(2)
        cfg = write_config(d, f'''
[node]
name = "lb1"
state_dir = "{d}"
[[pools]]
name = "web"
[[pools.backends]]
name = "web1"
address = "{bk.http['web1']}"
[[pools]]
name = "hang"
retries = 0
[[pools.backends]]
name = "hang"
address = "127.0.0.1:{hang.getsockname()[1]}"

[[listeners]]
name = "lim"
mode = "http"
bind = "127.0.0.1:{lim}"
pool = "web"
[[listeners.routes]]
pool = "hang"
path_prefix = "/hang"
[listeners.timeouts]
header = {T}
client_idle = {T}
body = {T}
server = {T}
connect = {T}

[[listeners]]
name = "cap"
mode = "http"
bind = "127.0.0.1:{cap}"
pool = "web"
[listeners.limits]
max_conns = 3
''')
        with Halbd(cfg) as h:
            h.wait_port(lim)
            h.wait_port(cap)
            yield lim, cap, h
    for f in fillers:
        f.close()
    hang.close()


def _read_until_closed(s: socket.socket, limit: float) -> tuple[bytes, float]:
    t0 = time.monotonic()
    s.settimeout(limit)
    buf = b""
    try:
        while chunk := s.recv(65536):
            buf += chunk
    except ConnectionResetError:
        pass
    return buf, time.monotonic() - t0


def test_slowloris_head_is_cut_off(node):
    lim, _, h = node
    s = socket.create_connection(("127.0.0.1", lim))
    t0 = time.monotonic()
    s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")
    closed_at = None
    try:
        for i in range(int((T + SLACK) / 0.1)):  # one header byte every 100 ms
            s.sendall(b"X-%d: v\r\n" % i)
            time.sleep(0.1)
    except (BrokenPipeError, ConnectionResetError):
        closed_at = time.monotonic() - t0
    buf, _ = _read_until_closed(s, 1.0)
    s.close()
    elapsed = closed_at if closed_at is not None else time.monotonic() - t0
    assert buf.startswith(b"HTTP/1.1 408 ") or closed_at is not None
    assert elapsed < T + SLACK


def test_idle_keepalive_connection_closed(node):
    lim, _, _ = node
    s = socket.create_connection(("127.0.0.1", lim))
    s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    s.settimeout(5)
    first = s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200 ")
    buf, waited = _read_until_closed(s, T + SLACK + 2)
    s.close()
    assert buf == b"" or b"HTTP/1.1 200" not in buf
    assert T * 0.8 <= waited < T + SLACK


def test_silent_new_connection_closed(node):
    lim, _, _ = node
    s = socket.create_connection(("127.0.0.1", lim))
    buf, waited = _read_until_closed(s, T + SLACK + 2)
    s.close()
    assert buf == b"" and waited < T + SLACK


def test_stalled_body_gets_408(node):
    lim, _, _ = node
    s = socket.create_connection(("127.0.0.1", lim))
    s.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly-a-little")
    buf, waited = _read_until_closed(s, T + SLACK + 2)
    s.close()
    assert waited < T + SLACK
    # the backend may have answered already (it answers when the body is complete, so it
    # cannot have): the client sees a 408 and a closed connection
    assert buf.startswith(b"HTTP/1.1 408 "), buf[:200]


def test_slow_backend_gets_504(node):
    lim, _, _ = node
    s = socket.create_connection(("127.0.0.1", lim))
    t0 = time.monotonic()
    s.sendall(b"GET /sleep?ms=3000 HTTP/1.1\r\nHost: a\r\n\r\n")
    s.settimeout(T + SLACK + 2)
    buf = s.recv(65536)
    elapsed = time.monotonic() - t0
    s.close()
    assert buf.startswith(b"HTTP/1.1 504 "), buf[:200]
    assert T * 0.8 <= elapsed < T + SLACK


def test_unreachable_backend_connect_timeout_504(node):
    lim, _, _ = node
    s = socket.create_connection(("127.0.0.1", lim))
    t0 = time.monotonic()
    s.sendall(b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n")
    s.settimeout(T + SLACK + 2)
    buf = s.recv(65536)
    elapsed = time.monotonic() - t0
    s.close()
    assert buf.startswith(b"HTTP/1.1 504 "), buf[:200]
    assert b"connect timeout" in buf
    assert T * 0.8 <= elapsed < T + SLACK


def test_max_conns_excess_closed_at_once(node):
    _, cap, h = node
    held = [socket.create_connection(("127.0.0.1", cap)) for _ in range(3)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", cap))
        buf, waited = _read_until_closed(extra, 3)
        extra.close()
        assert buf == b"" and waited < 1.0
        # the held connections still work
        for s in held:
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            s.settimeout(5)
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in held:
            s.close()
    # once they are gone, new connections are served again
    time.sleep(0.2)
    s = socket.create_connection(("127.0.0.1", cap))
    s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    buf, _ = _read_until_closed(s, 5)
    s.close()
    assert buf.startswith(b"HTTP/1.1 200 ")
    assert h.alive()
