"""A corpus of malformed and smuggling requests sent over raw sockets to a real halbd.

Each is answered 400/414/431/501 and the connection closed, and not one byte of any of them
reaches the backend: a raw-socket backend records everything it receives. Afterwards the node
still serves normally, pipelined good-then-bad requests serve the good one only, and a client
breaking its chunked body mid-request does not desynchronise other clients' requests.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.helpers import Backends, Halbd, free_port, write_config

pytestmark = pytest.mark.integration

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Backend: trap\r\n\r\nok"


class Recorder:
    """A raw TCP backend: records every byte; answers each complete head with a 200."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.data = bytearray()
        self.conns: list[dict] = []  # per backend connection: its bytes, and whether it ended
        self.lock = threading.Lock()
        self.stop = False
        self.t = threading.Thread(target=self._accept, daemon=True)
        self.t.start()

    def _accept(self):
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        c.settimeout(0.5)
        buf = b""
        me = {"data": bytearray(), "closed": False}
        with self.lock:
            self.conns.append(me)
        try:
            self._loop(c, buf, me)
        finally:
            me["closed"] = True

    def _loop(self, c, buf, me):
        with c:
            while not self.stop:
                try:
                    d = c.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not d:
                    return
                with self.lock:
                    self.data += d
                    me["data"] += d
                buf += d
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    c.sendall(OK)

    def take(self) -> bytes:
        with self.lock:
            d = bytes(self.data)
            self.data.clear()
        return d

    def close(self):
        self.stop = True
        self.sock.close()


H = b"Host: a.test\r\n"
POST = b"POST /p HTTP/1.1\r\n" + H
GET = b"GET /g HTTP/1.1\r\n" + H
CH = b"Transfer-Encoding: chunked\r\n"

# id -> (request bytes, accepted statuses)
CORPUS: dict[str, tuple[bytes, tuple[int, ...]]] = {
    # Content-Length / Transfer-Encoding smuggling
    "cl_and_te": (POST + b"Content-Length: 6\r\n" + CH + b"\r\n0\r\n\r\nX", (400,)),
    # names that fold to a framing header once "-" and "_" are alike (CGI/WSGI backends)
    "te_underscore": (POST + b"Transfer_Encoding: chunked\r\n\r\n0\r\n\r\n", (400,)),
    "cl_underscore": (POST + b"Content_Length: 3\r\n\r\nabc", (400,)),
    "te_three_dashes": (POST + b"Transfer---Encoding: chunked\r\n\r\n0\r\n\r\n", (400,)),
    "te_three_underscores": (POST + b"Transfer___Encoding: chunked\r\n\r\n0\r\n\r\n",
                             (400,)),
    "cl_mixed_fold": (GET + b"content-_LENGTH: 3\r\n\r\nabc", (400,)),
    "te_and_cl": (POST + CH + b"Content-Length: 6\r\n\r\n0\r\n\r\nX", (400,)),
    "cl_duplicate_same": (POST + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", (400,)),
    "cl_duplicate_diff": (POST + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", (400,)),
    "cl_list": (POST + b"Content-Length: 3, 3\r\n\r\nabc", (400,)),
    "cl_negative": (POST + b"Content-Length: -3\r\n\r\nabc", (400,)),
    "cl_plus_sign": (POST + b"Content-Length: +3\r\n\r\nabc", (400,)),
    "cl_hex": (POST + b"Content-Length: 0x3\r\n\r\nabc", (400,)),
    "cl_inner_space": (POST + b"Content-Length: 1 2\r\n\r\nabc", (400,)),
    "cl_empty": (POST + b"Content-Length: \r\n\r\n", (400,)),
    "cl_overflow": (POST + b"Content-Length: 184467440737095516160\r\n\r\n", (400,)),
    "te_gzip_chunked": (POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", (501,)),
    "te_chunked_not_last": (POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", (400, 501)),
    "te_identity": (POST + b"Transfer-Encoding: identity\r\n\r\nabc", (400, 501)),
    "te_xchunked": (POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", (400, 501)),
    "te_two_headers": (POST + CH + CH + b"\r\n0\r\n\r\n", (400,)),
    "te_leading_comma": (POST + b"Transfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n", (400,)),
    "te_space_before_colon": (POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", (400,)),
    "te_vertical_tab": (POST + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n", (400,)),
    "te_on_http10": (b"POST /p HTTP/1.0\r\n" + H + CH + b"\r\n0\r\n\r\n", (400,)),
    # chunk framing
    "chunk_size_not_hex": (POST + CH + b"\r\nzz\r\nab\r\n0\r\n\r\n", (400,)),
    "chunk_size_negative": (POST + CH + b"\r\n-2\r\nab\r\n0\r\n\r\n", (400,)),
    "chunk_size_overflow": (POST + CH + b"\r\n10000000000000000\r\nab\r\n0\r\n\r\n", (400,)),
    "chunk_size_space": (POST + CH + b"\r\n2 \r\nab\r\n0\r\n\r\n", (400,)),
    "chunk_ext_control_char": (POST + CH + b"\r\n2;\x01x\r\nab\r\n0\r\n\r\n", (400,)),
    "chunk_ext_bare_lf": (POST + CH + b"\r\n2;a\nb\r\nab\r\n0\r\n\r\n", (400,)),
    "chunk_data_overrun": (POST + CH + b"\r\n2\r\nabc\r\n0\r\n\r\n", (400,)),
    "chunk_size_lf_only": (POST + CH + b"\r\n2\nab\r\n0\r\n\r\n", (400,)),
    # header syntax
    "bare_cr_in_value": (GET + b"X-A: a\rb\r\n\r\n", (400,)),
    "bare_cr_in_name": (GET + b"X\r-A: b\r\n\r\n", (400,)),
    "nul_in_value": (GET + b"X-A: a\x00b\r\n\r\n", (400,)),
    "control_char_in_value": (GET + b"X-A: a\x01b\r\n\r\n", (400,)),
    "del_in_value": (GET + b"X-A: a\x7fb\r\n\r\n", (400,)),
    "obs_fold_space": (GET + b"X-A: a\r\n b\r\n\r\n", (400,)),
    "obs_fold_tab": (GET + b"X-A: a\r\n\tb\r\n\r\n", (400,)),
    "space_before_colon": (b"GET /g HTTP/1.1\r\nHost : a.test\r\n\r\n", (400,)),
    "invalid_name_char": (GET + b"X(A): b\r\n\r\n", (400,)),
    "empty_header_name": (GET + b": b\r\n\r\n", (400,)),
    "bare_lf_header_line": (GET + b"X-A: b\nX-B: c\r\n\r\n", (400,)),
    "space_starts_first_header": (b"GET /g HTTP/1.1\r\n Host: a.test\r\n\r\n", (400,)),
    # request line
    "lf_only_request": (b"GET /g HTTP/1.1\nHost: a.test\n\n", (400,)),
    "invalid_method_token": (b"G(T /g HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    "lowercase_method": (b"get /g HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    "unknown_method": (b"BREW /g HTTP/1.1\r\n" + H + b"\r\n", (400, 501)),
    "double_space_request_line": (b"GET  /g HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    "space_in_target": (b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    "control_char_in_target": (b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    "version_1_2": (b"GET /g HTTP/1.2\r\n" + H + b"\r\n", (400,)),
    "version_2_0": (b"GET /g HTTP/2.0\r\n" + H + b"\r\n", (400,)),
    "http_0_9_line": (b"GET /g\r\n\r\n", (400,)),
    "bad_protocol_name": (b"GET /g HTTQ/1.1\r\n" + H + b"\r\n", (400,)),
    "relative_target": (b"GET g HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    # Host and target
    "missing_host": (b"GET /g HTTP/1.1\r\n\r\n", (400,)),
    "duplicate_host": (GET + b"Host: b.test\r\n\r\n", (400,)),
    "invalid_host": (b"GET /g HTTP/1.1\r\nHost: a.test/evil\r\n\r\n", (400,)),
    "absolute_form_host_mismatch": (b"GET http://b.test/g HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    "absolute_form_userinfo": (b"GET http://u@a.test/g HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    "connect_method": (b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n", (400, 501)),
    # limits (listener: max_headers 20, max_header_bytes 2048, max_request_line 1024)
    "too_many_headers": (GET + b"".join(b"X-%d: v\r\n" % i for i in range(25)) + b"\r\n", (431,)),
    "header_too_large": (GET + b"X-Big: " + b"v" * 3000 + b"\r\n\r\n", (431,)),
    "headers_too_large_total": (GET + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 150) for i in range(15))
                                + b"\r\n", (431,)),
    "request_line_too_long": (b"GET /" + b"a" * 1200 + b" HTTP/1.1\r\n" + H + b"\r\n", (414,)),
    "trailer_section_too_large": (POST + CH + b"\r\n0\r\n" + b"".join(b"T-%d: v\r\n" % i for i in range(30))
                                  + b"\r\n", (431, 400)),
}


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    d = tmp_path_factory.mktemp("smuggle")
    rec = Recorder()
    with Backends(["good"], logdir=d) as bk:
        port = free_port()
        cfg = write_config(d, f'''
[node]
name = "lb1"
state_dir = "{d}"
[[pools]]
name = "trap"
[[pools.backends]]
name = "rec"
address = "127.0.0.1:{rec.port}"
[[pools]]
name = "good"
[[pools.backends]]
name = "good"
address = "{bk.http['good']}"
[[listeners]]
name = "h"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "trap"
[[listeners.routes]]
pool = "good"
path_prefix = "/good"
[listeners.limits]
max_headers = 20
max_header_bytes = 2048
max_request_line = 1024
''')
        with Halbd(cfg) as h:
            h.wait_port(port)
            try:
                yield port, rec, h
            finally:
                rec.close()


def exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Sends ``data``; returns everything received and whether the server closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return buf, True
            if not chunk:
                return buf, True
            buf += chunk
        return buf, False


def test_corpus_size():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("case", list(CORPUS), ids=list(CORPUS))
def test_malformed_request_refused(node, case):
    port, rec, h = node
    data, statuses = CORPUS[case]
    resp, closed = exchange(port, data)
    assert closed, f"connection left open; got {resp[:200]!r}"
    status = int(resp.split(b" ", 2)[1]) if resp.startswith(b"HTTP/1.1 ") else None
    assert status in statuses, resp[:300]
    assert b"Connection: close" in resp.split(b"\r\n\r\n")[0]
    assert rec.take() == b"", "bytes of a refused request reached the backend"
    assert h.alive()


def test_node_still_serves_and_trap_got_nothing(node):
    port, rec, h = node
    time.sleep(0.2)  # anything late would have arrived by now
    assert rec.take() == b""
    resp, _ = exchange(port, b"GET /good HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 200 ") and b"X-Backend: good" in resp
    resp, _ = exchange(port, b"GET /t HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 200 ") and b"X-Backend: trap" in resp
    assert rec.take().startswith(b"GET /t HTTP/1.1\r\n")
    assert h.alive()


def test_pipelined_good_then_bad_serves_only_the_good(node):
    port, rec, h = node
    resp, closed = exchange(port, b"GET /t1 HTTP/1.1\r\n" + H + b"\r\n"
                            + POST + b"Content-Length: 3\r\n" + CH + b"\r\n0\r\n\r\n")
    assert closed
    assert resp.startswith(b"HTTP/1.1 200 ") and b"\r\n\r\nokHTTP/1.1 400 " in resp
    got = rec.take()
    assert got.startswith(b"GET /t1 HTTP/1.1\r\n") and got.count(b"HTTP/1.1") == 1
    assert b"POST" not in got


def test_broken_chunked_body_does_not_desync_others(node):
    """A client whose chunked body turns bad after its head went out: its backend connection
    is closed (never reused), the client gets 400, and another client on the same pool keeps
    getting its own answers."""
    port, rec, h = node
    rec.take()
    a = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        a.sendall(POST + CH + b"\r\n5\r\nhello\r\n")
        deadline = time.monotonic() + 5
        while b"hello" not in rec.data and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b"hello" in rec.data  # the head and the first chunk went to the backend
        a.sendall(b"zz\r\nGET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n")
        try:  # the answer may have come already, then the proxy closed: a reset is fine
            while a.recv(65536):
                pass
        except ConnectionResetError:
            pass
    finally:
        a.close()
    # the client's request had already been answered by the trap (it answers every head) or
    # is refused now; either way the smuggled request never reached the backend
    assert b"/smuggled" not in rec.take()
    for i in range(5):
        resp, _ = exchange(port, b"GET /b%d HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n" % i)
        assert resp.startswith(b"HTTP/1.1 200 ")
        got = rec.take()
        assert got.startswith(b"GET /b%d HTTP/1.1\r\n" % i) and b"smuggled" not in got


def test_pipeline_depth_is_bounded(node):
    """One read carrying 300 tiny pipelined requests: the first 128 are served in order, the
    rest refused with one 400, then the connection closes."""
    port, rec, h = node
    rec.take()
    data = b"".join(b"GET /q%d HTTP/1.1\r\nHost: a.test\r\n\r\n" % i for i in range(300))
    resp, closed = exchange(port, data, timeout=10)
    assert closed
    assert resp.count(b"HTTP/1.1 200 ") == 128
    assert resp.count(b"HTTP/1.1 400 ") == 1 and b"too many pipelined requests" in resp
    got = rec.take()
    assert got.count(b"GET /q") == 128 and b"GET /q127 " in got and b"GET /q128 " not in got
    assert h.alive()


def test_ordinary_underscore_headers_still_pass(node):
    port, rec, h = node
    rec.take()
    resp, _ = exchange(port, b"GET /u HTTP/1.1\r\nHost: a.test\r\nMy_Custom_Header: 1\r\n"
                             b"Content_Type_X: 2\r\nConnection: close\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 200 "), resp[:200]
    got = rec.take()
    assert b"My_Custom_Header: 1\r\n" in got and b"Content_Type_X: 2\r\n" in got


def test_get_with_a_body_never_shares_its_backend_connection(node):
    """A GET with a body is forwarded, body and all, but its backend connection is
    closed after the response instead of going back to the pool: a backend that ignores the
    body would read it as the start of the next request (CL.0). A GET without a body leaves its
    connection pooled (the control)."""
    port, rec, h = node

    def conn_with(marker: bytes) -> dict:
        with rec.lock:
            return next(c for c in rec.conns if marker in c["data"])

    def ask(data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(data)
            buf = b""
            while b"\r\n\r\nok" not in buf:
                chunk = s.recv(65536)
                assert chunk, buf
                buf += chunk
            assert buf.startswith(b"HTTP/1.1 200 "), buf[:200]

    ask(b"GET /withbody HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello")
    ask(b"GET /plain HTTP/1.1\r\nHost: a.test\r\n\r\n")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not conn_with(b"/withbody")["closed"]:
        time.sleep(0.02)
    wb = conn_with(b"/withbody")
    assert wb["closed"] and wb["data"].endswith(b"hello"), wb  # forwarded, then closed
    plain = conn_with(b"/plain")
    assert plain is not wb and b"hello" not in plain["data"]  # a fresh connection for it
    time.sleep(0.3)
    assert not plain["closed"]  # the control: kept for reuse
