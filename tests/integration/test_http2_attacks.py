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

    def until(self, done, timeout: float = 3.0) -> list:
        """Frames read until ``done(frames)`` holds, a GOAWAY comes or ``timeout`` passes."""
        out: list = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done(out):
            got = self.frames(min(0.05, max(0.0, deadline - time.monotonic())))
            out += got
            if any(isinstance(f, GoAwayFrame) for f in got):
                break
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


def test_priority_flag_on_requests_is_not_a_flood(env):
    """Browsers set the PRIORITY flag on every request's HEADERS: 200 such requests in a burst
    (the control-frame limit is 50/s here) are served, none counted as a control frame."""
    before = _metric(env, "control_floods")
    r = Raw(env.port, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 1 << 20})
    served = 0
    try:
        for batch in range(10):  # 20 at a time: under max_concurrent_streams
            for i in range(20):
                sid = 1 + 2 * (batch * 20 + i)
                h = HeadersFrame(sid, _headers_block(b"/ok"), flags=["END_HEADERS", "END_STREAM",
                                                                     "PRIORITY"])
                h.depends_on, h.stream_weight, h.exclusive = 0, 255, False
                r.send(h)
            def ended(fs):
                return sum(1 for f in fs if isinstance(f, (DataFrame, HeadersFrame))
                           and "END_STREAM" in f.flags) >= 20
            fs = r.until(ended, 3.0)
            assert not any(isinstance(f, GoAwayFrame) for f in fs), fs
            served += sum(1 for f in fs if isinstance(f, (DataFrame, HeadersFrame))
                          and "END_STREAM" in f.flags)
    finally:
        r.close()
    assert served == 200
    assert _metric(env, "control_floods") == before


def test_a_huge_hpack_table_offered_is_not_used(env):
    """A client offering a 4 GiB HPACK table: halb's encoder stays at 4096 bytes (it says so
    in its first header block: a dynamic table size update of 4096), and answers go on."""
    r = Raw(env.port, settings={SettingsFrame.HEADER_TABLE_SIZE: 0xFFFFFFFF,
                                SettingsFrame.INITIAL_WINDOW_SIZE: 1 << 20})
    dec = hpack.Decoder()
    dec.max_allowed_table_size = 0xFFFFFFFF
    try:
        r.send(SettingsFrame(0, flags=["ACK"]))
        sizes = []
        for i in range(30):
            sid = 1 + 2 * i
            r.send(HeadersFrame(sid, _headers_block(b"/ok?%d" % i), flags=["END_HEADERS",
                                                                          "END_STREAM"]))
            for f in r.until(lambda fs, sid=sid: any(isinstance(x, HeadersFrame)
                                                     and x.stream_id == sid for x in fs), 2.0):
                if isinstance(f, HeadersFrame) and f.stream_id == sid:
                    dec.decode(f.data)
                    sizes.append(dec.header_table.maxsize)
    finally:
        r.close()
    assert len(sizes) == 30 and max(sizes) <= 4096, sizes
    _good_client_ok(env)


@pytest.mark.parametrize("headers", [
    [(b":method", b"PRI"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"*")],
    [(b":method", b"GE T"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")],
])
def test_malformed_requests_cost_their_stream(env, headers):
    """A PRI request (rebuilt as HTTP/1.1 it would read as a connection preface) or a method
    that is not a token: the stream is refused, the connection and the node go on. (A header
    name that is not a token is refused by h2 itself, >= 4.3, as a connection error.)"""
    before = _metric(env, "malformed_requests")
    r = Raw(env.port)
    try:
        r.send(HeadersFrame(1, hpack.Encoder().encode(headers), flags=["END_HEADERS", "END_STREAM"]))
        fs = r.until(lambda fs: any(isinstance(f, RstStreamFrame) for f in fs), 1.0)
        r.send(HeadersFrame(3, _headers_block(b"/ok"), flags=["END_HEADERS", "END_STREAM"]))
        fs += r.until(lambda fs: any(isinstance(f, HeadersFrame) and f.stream_id == 3
                                     for f in fs), 1.0)
    finally:
        r.close()
    assert any(isinstance(f, RstStreamFrame) and f.stream_id == 1 for f in fs), fs
    assert any(isinstance(f, HeadersFrame) and f.stream_id == 3 for f in fs), fs  # served
    assert not any(isinstance(f, GoAwayFrame) for f in fs), fs
    assert _metric(env, "malformed_requests") == before + 1
    _good_client_ok(env)


def test_a_larger_initial_window_resumes_waiting_streams(env):
    """A client that starts with a zero stream window and then raises
    SETTINGS_INITIAL_WINDOW_SIZE (no WINDOW_UPDATE): the answer waiting on the old window goes
    out (RFC 9113 6.9.2: the change applies to every open stream)."""
    r = Raw(env.port, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0})
    try:
        r.send(SettingsFrame(0, flags=["ACK"]))
        r.send(HeadersFrame(1, _headers_block(b"/ok"), flags=["END_HEADERS", "END_STREAM"]))
        fs = r.until(lambda fs: any(isinstance(f, HeadersFrame) and f.stream_id == 1 for f in fs), 1.0)
        fs += r.frames(0.3)
        assert not any(isinstance(f, DataFrame) and f.stream_id == 1 and f.data for f in fs), fs
        r.send(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 65535}))
        fs = r.until(lambda fs: any(isinstance(f, DataFrame) and f.stream_id == 1
                                    and "END_STREAM" in f.flags for f in fs), 0.6)
    finally:
        r.close()
    assert any(isinstance(f, DataFrame) and f.stream_id == 1 and "END_STREAM" in f.flags
               for f in fs), fs


def test_no_exception_logged(env):
    """Last in this module: nothing above made halbd log a traceback or an asyncio error."""
    out = env.h.output()
    for bad in ("Traceback", "Exception in callback", "Fatal error", "exception="):
        assert bad not in out, out[out.index(bad) - 2000:out.index(bad) + 2000]
