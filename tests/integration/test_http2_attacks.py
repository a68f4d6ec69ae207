"""HTTP/2 attack limits through a real halbd, with raw frames (hyperframe/hpack, as an attacker
writes them, and the h2 library where a well-formed client helps): rapid reset
(CVE-2023-44487), CONTINUATION flood, HPACK bomb, SETTINGS and PING floods, too many
concurrent streams, oversized frames, a zero-window stall. Each limit ends the attacker's
connection (GOAWAY with its code) or stream, is counted in ``halb_http2_events_total``, and a
well-behaved client on another connection is served meanwhile and after."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import hpack
import pytest
from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame,
                              PingFrame, RstStreamFrame, SettingsFrame)

from tests.helpers import Backends, Halbd, free_ports, wait_for, write_config

pytestmark = pytest.mark.integration

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Env:
    pass


@pytest.fixture(scope="module")
def env():
    d = Path(tempfile.mkdtemp(prefix="halb-h2atk-"))
    e = Env()
    with Backends(["web1"], logdir=d) as bk:
        e.port, e.mport = free_ports(2)
        cfg = write_config(d, f'''
[node]
name = "lb1"
log_level = "info"
state_dir = "{d}"

[metrics]
address = "127.0.0.1:{e.mport}"

[access_log]
enabled = false

[[pools]]
name = "web"
[[pools.backends]]
name = "web1"
address = "{bk.http["web1"]}"

[[listeners]]
name = "h2"
mode = "http"
bind = "127.0.0.1:{e.port}"
pool = "web"
[listeners.timeouts]
client_idle = "1s"
[listeners.http2]
max_concurrent_streams = 20
max_resets_per_s = 50
max_control_frames_per_s = 50
''')
        with Halbd(cfg) as h:
            h.wait_port(e.port)
            e.h = h
            yield e
    shutil.rmtree(d, ignore_errors=True)


def _metric(e, event: str) -> float:
    out = subprocess.run(["curl", "-s", f"http://127.0.0.1:{e.mport}/metrics"],
                         capture_output=True, timeout=10).stdout.decode()
    key = f'halb_http2_events_total{{event="{event}",listener="h2"}} '
    for line in out.splitlines():
        if line.startswith(key):
            return float(line[len(key):])
    return 0.0


def _good_client_ok(e) -> None:
    r = subprocess.run(["curl", "-sS", "--max-time", "5", "--http2-prior-knowledge", "-o",
                        "/dev/null", "-w", "%{http_code} %{http_version}",
                        f"http://127.0.0.1:{e.port}/ok"], capture_output=True, timeout=10)
    assert r.stdout == b"200 2", (r.stdout, r.stderr)


def _headers_block(path: bytes = b"/", extra=()) -> bytes:
    return hpack.Encoder().encode([(b":method", b"GET"), (b":scheme", b"http"),
                                   (b":authority", b"x"), (b":path", path), *extra])


class Raw:
    """A raw HTTP/2 connection: frames written as given, frames read back parsed."""

    def __init__(self, port: int, settings: dict | None = None):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.s.sendall(PREFACE + SettingsFrame(0, settings=settings or {}).serialize())
        self.buf = b""

    def send(self, *frames) -> None:
        self.s.sendall(b"".join(f.serialize() if isinstance(f, Frame) else f for f in frames))

    def frames(self, until: float = 3.0):
        """Frames read until the connection closes or ``until`` seconds pass."""
        out = []
        deadline = time.monotonic() + until
        while time.monotonic() < deadline:
            self.s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not data:
                break
            self.buf += data
            while len(self.buf) >= 9:
                f, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
                if len(self.buf) < 9 + length:
                    break
                f.parse_body(memoryview(self.buf[9:9 + length]))
                self.buf = self.buf[9 + length:]
                out.append(f)
                if isinstance(f, GoAwayFrame):
                    return out
        return out

    def goaway(self, until: float = 3.0) -> GoAwayFrame | None:
        for f in self.frames(until):
            if isinstance(f, GoAwayFrame):
                return f
        return None

    def close(self) -> None:
        self.s.close()


def test_rapid_reset(env):
    before = _metric(env, "rapid_resets")
    r = Raw(env.port)
    sent = 0
    try:
        for i in range(200):  # HEADERS then RST_STREAM at once, the CVE-2023-44487 pattern
            sid = 1 + 2 * i
            h = HeadersFrame(sid, _headers_block(b"/slow"), flags=["END_HEADERS", "END_STREAM"])
            r.send(h, RstStreamFrame(sid, error_code=8))
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        pass  # halb closed the connection while we were still sending
    g = r.goaway()
    r.close()
    assert g is not None and g.error_code == 0xB  # ENHANCE_YOUR_CALM
    assert _metric(env, "rapid_resets") == before + 1
    _good_client_ok(env)


def test_continuation_flood(env):
    before = _metric(env, "continuation_flood")
    r = Raw(env.port)
    block = _headers_block()
    try:
        r.send(HeadersFrame(1, block[:5]))  # no END_HEADERS: CONTINUATIONs follow, forever
        for _ in range(200):
            r.send(ContinuationFrame(1, b"\x40\x01a\x01b" * 100))  # literal x-name pairs
    except (BrokenPipeError, ConnectionResetError):
        pass
    g = r.goaway()
    r.close()
    assert g is not None and g.error_code in (0x1, 0xB)
    assert _metric(env, "continuation_flood") + _metric(env, "header_list_too_large") > before
    _good_client_ok(env)


def test_hpack_bomb(env):
    """One large header put in the dynamic table, then referenced thousands of times: a few
    bytes on the wire decode to megabytes; the header list limit stops it."""
    before = _metric(env, "header_list_too_large") + _metric(env, "protocol_errors")
    r = Raw(env.port)
    big = b"a" * 4000
    enc = hpack.Encoder()
    first = enc.encode([(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"),
                        (b":path", b"/"), (b"x-bomb", big)])
    # index 62 is the x-bomb entry just added: 1-byte references to it
    block = first + b"\xbe" * 5000
    try:
        r.send(HeadersFrame(1, block[:16000], flags=["END_STREAM"] +
                            (["END_HEADERS"] if len(block) <= 16000 else [])))
        rest = block[16000:]
        while rest:
            piece, rest = rest[:16000], rest[16000:]
            r.send(ContinuationFrame(1, piece, flags=[] if rest else ["END_HEADERS"]))
    except (BrokenPipeError, ConnectionResetError):
        pass
    fs = r.frames()
    r.close()
    kinds = {type(f).__name__ for f in fs}
    assert "GoAwayFrame" in kinds or "RstStreamFrame" in kinds, kinds
    assert not any(isinstance(f, HeadersFrame) and f.stream_id == 1 for f in fs)  # not served
    assert _metric(env, "header_list_too_large") + _metric(env, "protocol_errors") > before
    _good_client_ok(env)


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_control_frame_floods(env, kind):
    before = _metric(env, "control_floods")
    r = Raw(env.port)
    try:
        for i in range(500):
            r.send(PingFrame(0, opaque_data=i.to_bytes(8, "big")) if kind == "ping"
                   else SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 65535}))
    except (BrokenPipeError, ConnectionResetError):
        pass
    g = r.goaway()
    r.close()
    assert g is not None and g.error_code == 0xB
    assert _metric(env, "control_floods") == before + 1
    _good_client_ok(env)


def test_too_many_concurrent_streams(env):
    before = _metric(env, "too_many_streams")
    r = Raw(env.port)
    for i in range(25):  # the limit is 20; /sleep keeps them open
        r.send(HeadersFrame(1 + 2 * i, _headers_block(b"/sleep?ms=2000"),
                            flags=["END_HEADERS", "END_STREAM"]))
    fs = r.frames(2.0)
    r.close()
    refused = [f for f in fs if isinstance(f, (GoAwayFrame, RstStreamFrame))]
    assert refused, [type(f).__name__ for f in fs]
    assert _metric(env, "too_many_streams") == before + 1
    _good_client_ok(env)


def test_oversized_frame(env):
    before = _metric(env, "oversized_frames")
    r = Raw(env.port)
    r.send(HeadersFrame(1, _headers_block(b"/upload", [(b"content-length", b"100000")]),
                        flags=["END_HEADERS"]))
    # a 100,000-byte DATA frame where the limit is 16,384 (SETTINGS_MAX_FRAME_SIZE)
    r.send(DataFrame(1, b"x" * 100_000))
    g = r.goaway()
    r.close()
    assert g is not None and g.error_code == 0x6  # FRAME_SIZE_ERROR
    assert _metric(env, "oversized_frames") == before + 1
    _good_client_ok(env)


def test_zero_window_stall(env):
    """A client that asks for a large body and never opens its window: the stream is reset
    after timeouts.client_idle (1 s here) and its backend connection freed."""
    before = _metric(env, "stalled_streams")
    r = Raw(env.port, {SettingsFrame.INITIAL_WINDOW_SIZE: 0})
    t0 = time.monotonic()
    r.send(HeadersFrame(1, _headers_block(b"/download?bytes=4000000"),
                        flags=["END_HEADERS", "END_STREAM"]))
    reset = None
    got = 0
    seen = []
    while time.monotonic() - t0 < 6 and reset is None:
        for f in r.frames(0.3):
            seen.append((round(time.monotonic() - t0, 2), type(f).__name__, f.stream_id))
            if isinstance(f, RstStreamFrame) and f.stream_id == 1:
                reset = time.monotonic() - t0
            elif isinstance(f, DataFrame):
                got += len(f.data)
    r.close()
    assert got == 0  # nothing beyond the (zero) window
    assert reset is not None and 0.5 < reset < 5, (reset, seen)
    assert _metric(env, "stalled_streams") == before + 1
    _good_client_ok(env)


def test_idle_connection_closed(env):
    r = Raw(env.port)
    g = r.goaway(until=4.0)  # client_idle is 1 s
    r.close()
    assert g is not None and g.error_code == 0


def test_garbage_after_preface_costs_one_connection(env):
    s = socket.create_connection(("127.0.0.1", env.port), timeout=5)
    s.sendall(PREFACE + b"\x00\x00\x04\x99\x00\x00\x00\x00\x00junk" + b"\xff" * 64)
    time.sleep(0.2)
    s.close()
    _good_client_ok(env)
    assert env.h.alive()


def test_no_exception_logged(env):
    """Last in this module: nothing above made halbd log a traceback or an asyncio error."""
    out = env.h.output()
    for bad in ("Traceback", "Exception in callback", "Fatal error", "exception="):
        assert bad not in out, out[out.index(bad) - 2000:out.index(bad) + 2000]
