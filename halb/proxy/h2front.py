"""HTTP/2 towards clients: ALPN ``h2`` on TLS listeners and h2c with prior knowledge on plain
ones, each stream carried by the listener's own HTTP/1.1 exchange (``http.ClientConn``).

Shape
-----
The protocol core is the ``h2`` library (python-hyper: sans I/O, it validates frames, pseudo
and connection-specific headers, content-length against DATA, flow-control windows, the
HPACK decoder's header list size and CONTINUATION backlog). ``H2Conn`` is the thin asyncio
Protocol that drives it. As HAProxy translates HTTP/2 streams into its internal HTTP message
(HTX) and hands them to the same HTTP processing as HTTP/1.1, each stream here is turned into
an HTTP/1.1 request head (plus a chunked or Content-Length body) fed to a ``ClientConn`` of the
listener whose transport is the stream (``_StreamTr``): routing, stickiness (cookie, source,
app cookie), forwarded headers (X-Forwarded-For/-Proto, Forwarded, Via), limits (header count
and size, ``max_conns`` counting streams), timeouts (header, body, server, connect, the client
send timeout), retries, cache, metrics and the access log are then the HTTP/1.1 ones, not a
copy. The ClientConn's answer (HTTP/1.1 bytes) is parsed by llhttp (httptools) and sent as
HEADERS, DATA and trailing HEADERS (trailers) frames; hop-by-hop fields are dropped.

Flow control both ways, bounded: request DATA is acknowledged (WINDOW_UPDATE) only while the
stream's ClientConn reads (it pauses when its backend is slow), so a client can have at most
``STREAM_WINDOW`` bytes in flight per stream and ``CONN_WINDOW`` per connection. Response
bytes wait in the stream's buffer while the client's window is closed; past ``STREAM_HIGH``
the stream's ClientConn is told to pause (it stops reading its backend) and, as for an
HTTP/1.1 client that reads nothing, its send timer (``timeouts.client_idle``) resets the
stream when the window stays closed (a zero-window stall).

gRPC (``content-type: application/grpc*``): trailers pass as HEADERS frames, ``grpc-timeout``
sets a deadline after which the stream is answered ``grpc-status: 4`` (DEADLINE_EXCEEDED) and
its backend exchange dropped, and an answer that is not gRPC (halb's own 502/503/504, or a
backend's HTML error) is turned into a trailers-only gRPC answer (HTTP 200, ``grpc-status``
from the HTTP status as in gRPC's http-grpc-status-mapping: 502/503/504/429 -> 14
UNAVAILABLE, 400 -> 13, 401 -> 16, 403 -> 7, 404 -> 12, others 2 UNKNOWN).

Attack limits (``[listeners.http2]``; each counted in ``halb_http2_events_total``): rapid
reset (client RST_STREAMs per second), SETTINGS/PING/PRIORITY floods (control frames per
second), concurrent streams (SETTINGS_MAX_CONCURRENT_STREAMS, enforced by h2), HPACK bombs
(SETTINGS_MAX_HEADER_LIST_SIZE from ``limits.max_header_bytes``, enforced while decoding),
CONTINUATION floods (h2 refuses a header block of more than 64 frames), oversized frames
(SETTINGS_MAX_FRAME_SIZE), idle and stalled connections. A bad frame costs its stream (stream
errors: RST_STREAM) or its connection (GOAWAY), never the process.
"""

from __future__ import annotations

import functools
import re
from time import monotonic
from typing import TYPE_CHECKING

import httptools
from hyperframe.frame import GoAwayFrame

from ..log import get_logger
from . import h2lib as h2

if TYPE_CHECKING:  # pragma: no cover
    from .http import HttpListener

log = get_logger("h2")


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STREAM_WINDOW = 256 * 1024  # our SETTINGS_INITIAL_WINDOW_SIZE: request bytes in flight per stream
CONN_WINDOW = 1 << 20  # the connection's receive window
STREAM_HIGH = 256 * 1024  # response bytes buffered per stream before its exchange pauses
STREAM_LOW = 64 * 1024

# response fields that HTTP/2 forbids (RFC 9113 8.2.2)
_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                  b"upgrade", b"te"))
_GRPC_TIMEOUT = re.compile(rb"^(\d{1,8})([HMSmun])$")
_GRPC_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
# gRPC's "HTTP to gRPC Status Code Mapping" (doc/http-grpc-status-mapping.md)
_GRPC_FROM_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
GRPC_DEADLINE_EXCEEDED = 4


def grpc_timeout(value: bytes) -> float | None:
    """Seconds from a ``grpc-timeout`` value (``100m``, ``5S``...), None when malformed."""
    m = _GRPC_TIMEOUT.match(value)
    if m is None:
        return None
    return int(m.group(1)) * _GRPC_UNITS[m.group(2)]


def grpc_status_for(http_status: int) -> int:
    return _GRPC_FROM_HTTP.get(http_status, 2)


class H2Settings:
    """A listener's HTTP/2 settings (``[listeners.http2]``), flattened."""

    __slots__ = ("enabled", "alpn", "h2c", "max_streams", "max_resets", "max_control",
                 "max_frame", "max_header_list", "t_idle", "t_header")

    def __init__(self, cfg) -> None:
        hc = cfg.http2
        self.enabled = hc.enabled
        self.alpn = hc.alpn
        self.h2c = hc.h2c
        self.max_streams = hc.max_concurrent_streams
        self.max_resets = hc.max_resets_per_s
        self.max_control = hc.max_control_frames_per_s
        self.max_frame = hc.max_frame_size
        # the HPACK bomb limit: a decoded header list larger than this is refused
        self.max_header_list = cfg.limits.max_header_bytes + cfg.limits.max_request_line + 1024
        self.t_idle = cfg.timeouts.client_idle
        self.t_header = cfg.timeouts.header


class H2Registry:
    """The HTTP/2 connections of one listener (closed with it) and its settings."""

    def __init__(self, cfg, client_conn) -> None:
        self.s = H2Settings(cfg)
        self.cc_class = client_conn  # http.ClientConn (given: http imports this module)
        self.conns: set[H2Conn] = set()

    def reconfigure(self, cfg) -> None:
        self.s = H2Settings(cfg)

    def stop(self) -> None:
        for c in list(self.conns):
            c.goaway(h2.errors.ErrorCodes.NO_ERROR)


# header-name bytes (RFC 9110 5.6.2 tchar; h2 has lower-cased names already) and method bytes
_NAME_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
_NAME_CHARS_UPPER = _NAME_CHARS + b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class _StreamTr:
    """The transport of a stream's ClientConn: what it writes is the stream's answer."""

    __slots__ = ("st",)

    def __init__(self, st: "_Stream"):
        self.st = st

    def write(self, data: bytes) -> None:
        self.st.answer(data)

    def writelines(self, parts) -> None:
        self.st.answer(b"".join(parts))

    def close(self) -> None:
        self.st.cc_closed(False)

    def abort(self) -> None:
        self.st.cc_closed(True)

    def is_closing(self) -> bool:
        return self.st.closed

    def pause_reading(self) -> None:
        self.st.rpaused = True

    def resume_reading(self) -> None:
        st = self.st
        if st.rpaused:
            st.rpaused = False
            st.h.ack(st)

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name, default=None):
        if name == "ssl_object":  # (the stream is HTTP/2 already: no ALPN to look at)
            return default
        return self.st.h.tr.get_extra_info(name, default)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:  # pragma: no cover - no tunnels over HTTP/2 streams
        pass


class _Stream:
    __slots__ = ("h", "sid", "cc", "closed", "rpaused", "unacked", "chunked", "grpc", "head",
                 "parser", "status", "rhdrs", "in_trailers", "trailers", "head_sent", "obuf",
                 "obytes", "end", "ended", "cc_paused", "head_only", "err_body", "timer",
                 "disposed", "req_done", "phead", "stall")

    def __init__(self, h: "H2Conn", sid: int):
        self.h = h
        self.sid = sid
        self.cc = None
        self.closed = False  # nothing more goes to the client on this stream
        self.rpaused = False  # the ClientConn stopped reading the request body
        self.unacked = 0  # request bytes received and not yet acknowledged
        self.chunked = False
        self.grpc = False
        self.head_only = False
        self.parser = None
        self.status = 0
        self.rhdrs: list | None = None
        self.in_trailers = False
        self.trailers: list | None = None
        self.head_sent = False
        self.obuf: list[bytes] = []
        self.obytes = 0
        self.end = False  # the answer is complete (obuf then trailers/END_STREAM)
        self.ended = False  # END_STREAM sent
        self.cc_paused = False
        self.err_body: bytes | None = None  # a non-gRPC answer to a gRPC request: its text
        self.timer = None  # the gRPC deadline
        self.disposed = False
        self.req_done = False
        self.phead: list | None = None  # the answer's head, sent at the end of the write
        self.stall = None  # timer: the client's window stays shut with the answer waiting

    # -- the ClientConn's answer (HTTP/1.1 bytes) -------------------------------------------

    def answer(self, data: bytes) -> None:
        if self.closed or self.end:
            return
        p = self.parser
        if p is None:
            p = self.parser = httptools.HttpResponseParser(self)
        try:
            p.feed_data(data)
        except httptools.HttpParserError as e:
            log.debug("h2_answer_unparsable", error=str(e))
            self.h.reset(self, h2.errors.ErrorCodes.INTERNAL_ERROR)
            return
        ph = self.phead
        if ph is not None:  # (sent once this write is parsed: END_STREAM on it if all came)
            self.phead = None
            if self.end and not self.obuf and not self.trailers:
                self.h.send_head(self, ph, True)
                return
            self.h.send_head(self, ph, False)
        if self.obuf or self.end:
            self.h.drain(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if self.in_trailers:
            if self.trailers is None:
                self.trailers = []
            if name not in _HOP:
                self.trailers.append((name, value))
        elif name not in _HOP:
            self.rhdrs.append((name, value))

    def on_message_begin(self) -> None:
        self.rhdrs = []
        self.in_trailers = False

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.in_trailers = True
        if status < 200:  # 1xx interim answers are not relayed
            return
        self.status = status
        h = self.h
        if self.grpc:
            ct = b""
            for n, v in self.rhdrs:
                if n == b"content-type":
                    ct = v
            if status != 200 or not ct.startswith(b"application/grpc"):
                self.err_body = b""
                return
        hdrs = [(b":status", str(status).encode())]
        hdrs += self.rhdrs
        self.rhdrs = None
        if self.head_only:
            h.send_head(self, hdrs, True)
        else:
            self.phead = hdrs

    def on_body(self, data: bytes) -> None:
        if self.status < 200 or self.head_only:
            return
        if self.err_body is not None:
            if len(self.err_body) < 200:
                self.err_body += data[:200]
            return
        self.obuf.append(data)
        self.obytes += len(data)
        if self.obytes > STREAM_HIGH and not self.cc_paused and self.cc is not None:
            self.cc_paused = True
            self.cc.pause_writing()

    def on_message_complete(self) -> None:
        if self.status < 200:
            self.in_trailers = False
            return
        if self.err_body is not None:
            msg = self.err_body.split(b"\n", 1)[0].decode("latin-1").strip()
            self.h.grpc_error(self, grpc_status_for(self.status), f"halb: {msg}"
                              if msg else f"halb: HTTP {self.status}")
            return
        self.end = True

    def cc_closed(self, abort: bool) -> None:
        """The stream's ClientConn closed its 'connection': after a complete answer that is
        nothing; before one, a close-delimited body ends here, an abort resets the stream."""
        if self.closed or self.disposed:
            return
        if self.end:
            return
        if not abort and self.head_sent:
            self.end = True
            self.h.drain(self)
            return
        if not abort and self.err_body is not None:
            self.on_message_complete()
            return
        if self.cc is not None and self.cc.why == "c":  # its send timer: a zero-window stall
            self.h.event("stalled_streams")
            self.h.reset(self, h2.errors.ErrorCodes.CANCEL)
            return
        self.h.reset(self, h2.errors.ErrorCodes.INTERNAL_ERROR)


class H2Conn:
    """One HTTP/2 client connection (an asyncio Protocol)."""

    def __init__(self, lst: "HttpListener", reg: H2Registry):
        self.l = lst
        self.reg = reg
        self.s = reg.s
        self.m = lst.env.metrics
        self.name = lst.name
        self.loop = lst.loop
        self.tr = None
        s = self.s
        # Inbound headers are validated by h2 (pseudo-headers, connection-specific fields,
        # names in lower case). Outbound ones are not checked again: they are the response
        # heads ResponseFramer already checked strictly, names lower-cased and hop-by-hop ones
        # dropped here; h2's checks cost about 10% of a stream (profiled with h2load).
        cfg = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                        validate_inbound_headers=True,
                                        validate_outbound_headers=False,
                                        normalize_outbound_headers=False)
        self.h2 = h2.connection.H2Connection(config=cfg)
        # HPACK without Huffman coding on what we send, as HAProxy's encoder (hpack-enc.c)
        # does: hpack's pure-Python Huffman encoder was the largest single cost of a stream
        # (with h2load: a quarter of the CPU); the header block is larger by about a third
        self.h2.encoder.encode = functools.partial(self.h2.encoder.encode, huffman=False)
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: s.max_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: s.max_frame,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list,
        })
        # (h2 reads these from local_settings only as they are acknowledged; the limits that
        # guard us apply from the first frame)
        self.h2.max_inbound_frame_size = s.max_frame
        self.h2.decoder.max_header_list_size = s.max_header_list
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.going = False  # GOAWAY sent or received: no new streams
        self.wpaused = False
        self.want_flush = False
        self.timer = None
        self.win_start = 0.0  # the one-second window of the rate limits
        self.resets = 0
        self.control = 0
        self.client_ip = ""
        self.fresh = True  # no frame read yet (the header timeout applies to the preface)

    # -- transport ------------------------------------------------------------------------

    def connection_made(self, tr, data: bytes = b"") -> None:
        self.tr = tr
        if len(self.l.conns) + len(self.reg.conns) >= self.l.settings.max_conns:
            self.closed = True
            tr.abort()
            return
        peer = tr.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self.reg.conns.add(self)
        self.event("connections")
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONN_WINDOW - 65535)
        self.flush()
        self._arm(self.s.t_header)
        if data:
            self.data_received(data)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.reg.conns.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for st in list(self.streams.values()):
            st.closed = True
            self.dispose(st)
        self.streams.clear()

    def eof_received(self):
        return False

    def pause_writing(self) -> None:
        self.wpaused = True
        if self.timer is None or not self.streams:
            self._arm(self.s.t_idle)  # a client that takes nothing is dropped

    def resume_writing(self) -> None:
        self.wpaused = False
        for st in list(self.streams.values()):
            if st.obuf or st.end:
                self.drain(st)
        if self.streams and self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def event(self, kind: str) -> None:
        self.m.http2_event(self.name, kind)

    def flush(self) -> None:
        if not self.want_flush and not self.closed:
            self.want_flush = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.want_flush = False
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.tr.write(data)
        if self.going and not self.streams and not self.closed:
            self.closed = True
            self.tr.close()

    def _arm(self, delay: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(delay, self._timeout)

    def _timeout(self) -> None:
        self.timer = None
        if self.closed:
            return
        if self.wpaused:
            self.event("stalled")
            log.debug("h2_stalled", listener=self.name, client=self.client_ip)
            self.closed = True
            self.tr.abort()
            return
        if not self.streams:
            self.event("idle_timeouts")
            self.goaway(h2.errors.ErrorCodes.NO_ERROR)

    def goaway(self, code, kind: str = "") -> None:
        if self.closed:
            return
        if kind:
            self.event(kind)
            log.info("h2_goaway", listener=self.name, client=self.client_ip, reason=kind)
        self.going = True
        if code == h2.errors.ErrorCodes.NO_ERROR and self.streams and self.tr is not None:
            # a graceful GOAWAY (the listener stops: reload, upgrade) with streams under way:
            # h2's close_connection() would close its state machine at once, failing every
            # answer still to come and every frame still to read; the frame is written by
            # hand, the streams finish, then the connection closes (no new ones: ``going``)
            self._flush()  # (what h2 holds goes first)
            f = GoAwayFrame(0)
            f.last_stream_id = self.h2.highest_inbound_stream_id
            f.error_code = 0
            self.tr.write(f.serialize())
            return
        try:
            self.h2.close_connection(error_code=code)
        except h2.exceptions.ProtocolError:  # pragma: no cover - a closed state machine
            pass
        if code != h2.errors.ErrorCodes.NO_ERROR:
            for st in list(self.streams.values()):
                self.reset(st, code, send=False)
        self.flush()
        if not self.streams:
            self.loop.call_soon(self._flush)

    # -- frames in ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed or self.going and not self.streams:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.FrameTooLargeError:
            self.goaway(h2.errors.ErrorCodes.FRAME_SIZE_ERROR, "oversized_frames")
            return
        except h2.exceptions.TooManyStreamsError:
            self.goaway(h2.errors.ErrorCodes.PROTOCOL_ERROR, "too_many_streams")
            return
        except h2.exceptions.DenialOfServiceError:
            self.goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, "header_list_too_large")
            return
        except h2.exceptions.ProtocolError as e:
            kind = "continuation_flood" if "continuation" in str(e).lower() else \
                "protocol_errors"
            log.debug("h2_protocol_error", listener=self.name, client=self.client_ip,
                      error=str(e))
            self.goaway(h2.errors.ErrorCodes.PROTOCOL_ERROR, kind)
            return
        except Exception as e:  # hpack errors and the like: this connection only
            log.debug("h2_error", listener=self.name, client=self.client_ip, error=repr(e))
            self.goaway(h2.errors.ErrorCodes.COMPRESSION_ERROR
                        if "hpack" in type(e).__module__ else
                        h2.errors.ErrorCodes.PROTOCOL_ERROR, "protocol_errors")
            return
        if self.fresh:  # the preface came: from now on the idle timeout applies
            self.fresh = False
            if not self.streams:
                self._arm(self.s.t_idle)
        prio_of_request = None
        for ev in events:
            t = type(ev)
            if t is h2.events.RequestReceived:
                prio_of_request = ev.priority_updated
                self.request(ev)
            elif t is h2.events.DataReceived:
                st = self.streams.get(ev.stream_id)
                if st is None or st.disposed:
                    if ev.flow_controlled_length:
                        self.h2.acknowledge_received_data(ev.flow_controlled_length,
                                                          ev.stream_id)
                    continue
                st.unacked += ev.flow_controlled_length
                if st.cc is not None:
                    d = ev.data
                    if d:
                        st.cc.data_received(b"%x\r\n%b\r\n" % (len(d), d) if st.chunked else d)
                if not st.rpaused:
                    self.ack(st)
            elif t is h2.events.StreamEnded:
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    self.req_end(st, None)
            elif t is h2.events.TrailersReceived:
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.req_done = True  # (StreamEnded follows: req_end once)
                    self.req_end(st, ev.headers)
            elif t is h2.events.StreamReset:
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.closed = True
                    self.dispose(st)
                if self.count_reset():
                    return
            elif t is h2.events.WindowUpdated:
                if ev.stream_id:
                    st = self.streams.get(ev.stream_id)
                    if st is not None:
                        self.drain(st)
                else:
                    for st in list(self.streams.values()):
                        if st.obuf or st.end:
                            self.drain(st)
            elif t is h2.events.PriorityUpdated and ev is prio_of_request:
                pass  # (the PRIORITY flag of a request's HEADERS, as browsers send: no flood)
            elif t is h2.events.RemoteSettingsChanged or t is h2.events.PingReceived \
                    or t is h2.events.PriorityUpdated:
                if t is h2.events.RemoteSettingsChanged:
                    h2.clamp_table(self.h2)
                    if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                        # (a larger initial window opens every stream's window at once, with
                        # no WINDOW_UPDATE: the streams waiting on the old one go on now)
                        for st in list(self.streams.values()):
                            if st.obuf or st.end:
                                self.drain(st)
                if self.count_control():
                    return
            elif t is h2.events.ConnectionTerminated:
                self.going = True
        self.flush()

    def _window(self) -> None:
        now = monotonic()
        if now - self.win_start >= 1.0:
            self.win_start = now
            self.resets = 0
            self.control = 0

    def count_reset(self) -> bool:
        self._window()
        self.resets += 1
        if self.resets > self.s.max_resets:
            self.goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, "rapid_resets")
            return True
        return False

    def count_control(self) -> bool:
        self._window()
        self.control += 1
        if self.control > self.s.max_control:
            self.goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, "control_floods")
            return True
        return False

    def ack(self, st: _Stream) -> None:
        n = st.unacked
        if n and not self.closed:
            st.unacked = 0
            try:
                self.h2.acknowledge_received_data(n, st.sid)
            except h2.exceptions.ProtocolError:  # pragma: no cover - a stream gone meanwhile
                pass
            self.flush()

    # -- a stream's request ---------------------------------------------------------------

    def request(self, ev) -> None:
        sid = ev.stream_id
        if self.going:
            self._refuse(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        method = path = authority = b""
        host = b""
        lines = []
        cookies = []
        cl = None
        grpc = False
        timeout = None
        for n, v in ev.headers:
            if b"\r" in v or b"\n" in v or b"\0" in v or (n[:1] != b":" and (
                    not n or n.translate(None, _NAME_CHARS))):  # RFC 9113 8.2.1: malformed
                # (names checked here too: they go into an HTTP/1.1 head, and h2 before 4.3
                # let CR, LF and ':' through, CVE-2025-57804)
                self._refuse(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
                self.event("malformed_requests")
                return
            if n[0] == 58:  # b":"
                if n == b":method":
                    method = v
                elif n == b":path":
                    path = v
                elif n == b":authority":
                    authority = v
                continue
            if n == b"cookie":
                cookies.append(v)
                continue
            if n == b"host":
                host = v
                continue
            if n == b"te":  # (only "trailers" gets here: h2 refuses others)
                continue
            if n == b"content-length":
                cl = v
            elif n == b"content-type" and v.startswith(b"application/grpc"):
                grpc = True
            elif n == b"grpc-timeout":
                timeout = grpc_timeout(v)
            lines.append(b"%b: %b\r\n" % (n, v))
        if method == b"CONNECT":
            self._refuse(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        if method == b"PRI" or not method or method.translate(None, _NAME_CHARS_UPPER):
            # PRI is the connection preface's, not a request's (and rebuilt as HTTP/1.1 it
            # would read as a preface); a method is a token
            self._refuse(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            self.event("malformed_requests")
            return
        st = _Stream(self, sid)
        st.grpc = grpc
        st.head_only = method == b"HEAD"
        self.streams[sid] = st
        if self.timer is not None and not self.wpaused:
            self.timer.cancel()
            self.timer = None
        if cookies:
            lines.append(b"cookie: %b\r\n" % b"; ".join(cookies))
        end = ev.stream_ended is not None
        if not end and cl is None:
            st.chunked = True
            lines.append(b"transfer-encoding: chunked\r\n")
        head = b"%b %b HTTP/1.1\r\nhost: %b\r\n%b\r\n" % (method, path or b"/",
                                                          authority or host, b"".join(lines))
        cc = self.reg.cc_class(self.l)
        st.cc = cc
        cc.connection_made(_StreamTr(st))
        if cc.closed:  # the listener's max_conns (streams count as connections)
            st.cc = None
            self.event("refused_streams")
            self.reset(st, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        if grpc and timeout is not None:
            st.timer = self.loop.call_later(timeout, self._deadline, st)
        cc.data_received(head)
        if end:
            st.req_done = True
        self.event("streams")

    def req_end(self, st: _Stream, trailers) -> None:
        if st.chunked and st.cc is not None and not st.disposed:
            if trailers:
                tl = b"".join(b"%b: %b\r\n" % (n, v) for n, v in trailers
                              if not (b"\r" in v or b"\n" in v or b"\0" in v))
                st.cc.data_received(b"0\r\n" + tl + b"\r\n")
            elif not (trailers is None and st.req_done):
                st.cc.data_received(b"0\r\n\r\n")
        st.req_done = True
        if st.end and st.ended:
            self.finish(st)

    def _refuse(self, sid: int, code) -> None:
        try:
            self.h2.reset_stream(sid, code)
        except h2.exceptions.ProtocolError:  # pragma: no cover
            pass
        self.flush()

    def _deadline(self, st: _Stream) -> None:
        st.timer = None
        if st.disposed or st.ended:
            return
        self.event("grpc_deadlines")
        st.obuf.clear()
        st.obytes = 0
        self.grpc_error(st, GRPC_DEADLINE_EXCEEDED, "halb: deadline exceeded")

    # -- a stream's answer ----------------------------------------------------------------

    def send_head(self, st: _Stream, hdrs: list, end: bool) -> None:
        if st.closed:
            return
        try:
            self.h2.send_headers(st.sid, hdrs, end_stream=end)
        except h2.exceptions.ProtocolError as e:
            log.debug("h2_bad_answer", listener=self.name, error=str(e))
            self.reset(st, h2.errors.ErrorCodes.INTERNAL_ERROR)
            return
        st.head_sent = True
        if end:
            st.end = st.ended = True
            self.finish(st)
        self.flush()

    def grpc_error(self, st: _Stream, code: int, msg: str) -> None:
        """Answers a gRPC request with ``grpc-status`` ``code`` (trailers-only when no head
        went yet) and ends its exchange."""
        if st.closed or st.ended:
            return
        tr = [(b"grpc-status", str(code).encode()),
              (b"grpc-message", msg.encode("ascii", "replace")[:200].replace(b"%", b"%25"))]
        try:
            if st.head_sent:
                self.h2.send_headers(st.sid, tr, end_stream=True)
            else:
                self.h2.send_headers(st.sid, [(b":status", b"200"),
                                              (b"content-type", b"application/grpc")] + tr,
                                     end_stream=True)
        except h2.exceptions.ProtocolError:  # pragma: no cover - the stream closed meanwhile
            pass
        st.head_sent = st.end = st.ended = True
        self.finish(st)
        self.flush()

    def drain(self, st: _Stream) -> None:
        """Sends what the client's windows allow of the stream's buffered answer, then its
        end (trailers or END_STREAM) once the buffer is empty."""
        if st.closed or st.ended:
            return
        h = self.h2
        sid = st.sid
        if not self.wpaused:
            ob = st.obuf
            sent = False
            try:
                while ob:
                    win = min(h.local_flow_control_window(sid), h.max_outbound_frame_size)
                    if win <= 0:
                        # a zero-window stall: the stream is reset if the client opens no
                        # window for timeouts.client_idle (re-armed on every progress)
                        if sent or st.stall is None:
                            if st.stall is not None:
                                st.stall.cancel()
                            st.stall = self.loop.call_later(self.s.t_idle, self._stalled, st)
                        break
                    sent = True
                    d = ob[0]
                    if len(d) <= win:
                        del ob[0]
                    else:
                        ob[0] = d[win:]
                        d = d[:win]
                    st.obytes -= len(d)
                    h.send_data(sid, d)
                if not ob and st.end:
                    if st.trailers:
                        h.send_headers(sid, st.trailers, end_stream=True)
                    else:
                        h.end_stream(sid)
                    st.ended = True
            except h2.exceptions.ProtocolError as e:
                log.debug("h2_send_failed", listener=self.name, error=str(e))
                self.reset(st, h2.errors.ErrorCodes.INTERNAL_ERROR)
                return
            self.flush()
            if not ob and st.stall is not None:
                st.stall.cancel()
                st.stall = None
        if st.cc_paused and st.obytes < STREAM_LOW and st.cc is not None:
            st.cc_paused = False
            st.cc.resume_writing()
        if st.ended:
            self.finish(st)

    def _stalled(self, st: _Stream) -> None:
        st.stall = None
        if st.disposed or st.ended or self.closed:
            return
        log.debug("h2_stream_stalled", listener=self.name, client=self.client_ip, stream=st.sid)
        self.event("stalled_streams")
        self.reset(st, h2.errors.ErrorCodes.CANCEL)

    def finish(self, st: _Stream) -> None:
        """The answer is all sent: the stream's exchange ends (its ClientConn is disposed of;
        a request still coming in is told to stop with RST_STREAM NO_ERROR, RFC 9113 8.1)."""
        if not st.req_done and not st.closed:
            try:
                self.h2.reset_stream(st.sid, h2.errors.ErrorCodes.NO_ERROR)
            except h2.exceptions.ProtocolError:  # pragma: no cover
                pass
        st.closed = True
        self.dispose(st)

    def reset(self, st: _Stream, code, send: bool = True) -> None:
        if send and not st.closed and not self.closed:
            try:
                self.h2.reset_stream(st.sid, code)
            except h2.exceptions.ProtocolError:  # pragma: no cover - already closed
                pass
            self.flush()
        st.closed = True
        self.dispose(st)

    def dispose(self, st: _Stream) -> None:
        if st.disposed:
            return
        st.disposed = True
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        if st.stall is not None:
            st.stall.cancel()
            st.stall = None
        if self.streams.get(st.sid) is st:
            del self.streams[st.sid]
        cc, st.cc = st.cc, None
        if cc is not None:
            if not st.ended:
                cc.why = "C"  # (the access log: the client went, or the stream was reset)
            cc.connection_lost(None)
        if st.unacked:
            n, st.unacked = st.unacked, 0
            try:
                self.h2.acknowledge_received_data(n, st.sid)
            except h2.exceptions.ProtocolError:
                pass
        if not self.streams and not self.closed:
            if self.going:
                self.flush()
            elif self.timer is None:
                self._arm(self.s.t_idle)
