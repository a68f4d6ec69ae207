"""HTTP/2 towards backends: ``proto = "h2"`` pools (h2c), streams multiplexed over a bounded
number of connections per backend.

Shape
-----
The listener's exchange (``http.ClientConn``) talks to a backend through a ``BackendConn``
whatever the protocol, as HAProxy's streams talk to a server connection through its mux. For an
``h2`` pool, ``open_stream`` returns a ``BackendConn`` whose transport is one HTTP/2 stream
(``_StreamTr``): the HTTP/1.1 request it writes is parsed back by llhttp (httptools) and sent
as HEADERS + DATA (+ trailers) frames; the stream's answer is handed to the BackendConn as an
HTTP/1.1 response, chunked, with HTTP/2 trailers as chunked trailers (gRPC's ``grpc-status``
and ``grpc-message``), so its strict response framing, retries, 502/504, passive checks,
stickiness, access log and metrics are those of HTTP/1.1 backends. A stream carries one
exchange (the BackendConn is not pooled); the HTTP/2 connection is what is reused.

Bounds: at most ``h2_max_conns`` connections per backend and ``h2_max_streams`` streams each
(fewer if the backend's SETTINGS_MAX_CONCURRENT_STREAMS says so); an exchange that finds them
all busy waits for a free stream within ``timeouts.connect``. Flow control both ways: request
bytes wait for the backend's window (the BackendConn is paused past ``HIGH``, which pauses the
client side), response DATA is acknowledged only while the BackendConn reads. A connection
without streams for ``IDLE_TIMEOUT`` is closed; one the backend sent GOAWAY on takes no new
streams.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING

import httptools

from ..log import get_logger
from . import h2lib as h2
from .http_head import HttpError

if TYPE_CHECKING:  # pragma: no cover
    from .http import HttpListener

log = get_logger("h2back")

HIGH = 256 * 1024  # request bytes waiting for the backend's window before the exchange pauses
STREAM_WINDOW = 1 << 20  # our receive window per stream (what the backend may send unread)
IDLE_TIMEOUT = 30.0
_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                  b"upgrade", b"te", b"host", b"trailer"))
_BAD = (b"\r", b"\n", b"\0")


class PoolFull(HttpError):
    """No stream came free on a backend's HTTP/2 connections within the connect timeout: the
    proxy answers 503 (gRPC: UNAVAILABLE) and counts no failure against the backend."""


class Mux:
    """A listener's HTTP/2 backend connections, by backend."""

    def __init__(self, lst: "HttpListener", backend_conn):
        self.l = lst
        self.bc_class = backend_conn  # http.BackendConn (given: http imports this module)
        self.conns: dict[object, list[_Conn]] = {}
        self.waiters: dict[object, list[asyncio.Future]] = {}

    async def open_stream(self, b, pc, timeout: float):
        """A BackendConn on a new stream to backend ``b`` of pool config ``pc``."""
        BackendConn = self.bc_class
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            lst = self.conns.setdefault(b, [])
            for c in lst:
                if c.usable() and len(c.streams) < c.limit(pc.h2_max_streams):
                    break
            else:
                c = None
                if len(lst) < pc.h2_max_conns:
                    c = _Conn(self, b)
                    lst.append(c)
                    try:
                        await asyncio.wait_for(loop.create_connection(lambda: c, b.host, b.port),
                                               max(0.001, deadline - loop.time()))
                    except BaseException:
                        if c in lst:
                            lst.remove(c)
                        self._wake(b)
                        raise
                else:  # every connection is full: wait for a stream to end
                    fut = loop.create_future()
                    ws = self.waiters.setdefault(b, [])
                    ws.append(fut)
                    try:
                        await asyncio.wait_for(fut, max(0.001, deadline - loop.time()))
                    except asyncio.TimeoutError:
                        raise PoolFull(503, f"every HTTP/2 connection to {b.name} is full "
                                            f"({pc.h2_max_conns} x {pc.h2_max_streams})") from None
                    finally:
                        if fut in ws:
                            ws.remove(fut)
                    continue
            if c.closed:
                continue
            bc = BackendConn(self.l, b)
            st = _StreamTr(c, bc)
            c.streams.add(st)
            c.idle_cancel()
            bc.connection_made(st)
            return bc

    def _wake(self, b) -> None:
        ws = self.waiters.get(b)
        while ws:
            f = ws.pop(0)
            if not f.done():
                f.set_result(None)
                return

    def drop(self, c: "_Conn") -> None:
        lst = self.conns.get(c.b)
        if lst and c in lst:
            lst.remove(c)
        self._wake(c.b)

    def close(self) -> None:
        for lst in list(self.conns.values()):
            for c in list(lst):
                c.abort()
        self.conns.clear()


class _StreamTr:
    """One stream, as the transport of a BackendConn."""

    __slots__ = ("c", "bc", "sid", "parser", "url", "hdrs", "in_trailers", "trailers", "obuf",
                 "obytes", "end", "ended", "closed", "rpaused", "unacked", "paused", "head_only",
                 "got_head", "chunked_in")

    def __init__(self, c: "_Conn", bc):
        self.c = c
        self.bc = bc
        self.sid = 0
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.hdrs: list = []
        self.in_trailers = False
        self.trailers: list | None = None
        self.obuf: list[bytes] = []
        self.obytes = 0
        self.end = False  # the request is complete (END_STREAM after obuf)
        self.ended = False
        self.closed = False
        self.rpaused = False
        self.unacked = 0
        self.paused = False  # we told the BackendConn to stop writing
        self.head_only = False
        self.got_head = False
        self.chunked_in = False

    # -- the BackendConn's side (asyncio transport) ----------------------------------------

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:  # (our own request head: a bug if it happens)
            log.debug("h2back_request_unparsable", error=str(e))
            self.fail()
            return
        self.c.drain(self)

    def writelines(self, parts) -> None:
        self.write(b"".join(parts))

    def is_closing(self) -> bool:
        return True  # one exchange per stream: the BackendConn is never pooled

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.c.reset(self)

    def pause_reading(self) -> None:
        self.rpaused = True

    def resume_reading(self) -> None:
        if self.rpaused:
            self.rpaused = False
            self.c.ack(self)

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return self.c.tr.get_extra_info(name, default) if self.c.tr is not None else default

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:  # pragma: no cover
        pass

    # -- llhttp callbacks (the request, HTTP/1.1 as the exchange wrote it) -------------------

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_trailers:
            if self.trailers is None:
                self.trailers = []
            self.trailers.append((name.lower(), value))
        else:
            self.hdrs.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.in_trailers = True
        p = self.parser
        method = p.get_method()
        self.head_only = method == b"HEAD"
        authority = b""
        hs = []
        grpc = False
        nobody = True
        for n, v in self.hdrs:
            if n == b"host":
                authority = v
            elif n in _HOP:
                if n == b"transfer-encoding":
                    nobody = False
                continue
            elif n == b"content-length":
                if v != b"0":
                    nobody = False
            elif n == b"content-type" and v.startswith(b"application/grpc"):
                grpc = True
            hs.append((n, v))
        self.hdrs = []
        head = [(b":method", method), (b":scheme", b"http"), (b":authority", authority),
                (b":path", self.url)]
        if grpc:
            head.append((b"te", b"trailers"))  # gRPC servers ask for it (RFC 9113 8.2.2)
        self.c.start(self, head + hs, nobody)

    def on_body(self, data: bytes) -> None:
        self.obuf.append(data)
        self.obytes += len(data)

    def on_message_complete(self) -> None:
        self.end = True

    # -- the stream's answer, handed to the BackendConn as HTTP/1.1 --------------------------

    def fail(self) -> None:
        """The stream broke (reset, connection lost, protocol error)."""
        if self.closed and self.bc is None:
            return
        self.closed = True
        bc, self.bc = self.bc, None
        self.c.forget(self)
        if bc is not None and not bc.closed:
            bc.connection_lost(None)


class _Conn:
    """One HTTP/2 connection to a backend (an asyncio Protocol), client side."""

    def __init__(self, mux: Mux, b):
        self.mux = mux
        self.b = b
        self.loop = mux.l.loop
        self.tr = None
        # what halb sends was checked already (llhttp parsed the client's request, or h2front
        # validated it; hop-by-hop fields are dropped here): h2 does not check it again, and
        # HPACK goes without Huffman coding, as in h2front (a quarter of a stream's CPU)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_inbound_headers=True,
            validate_outbound_headers=False, normalize_outbound_headers=False))
        self.h2.encoder.encode = functools.partial(self.h2.encoder.encode, huffman=False)
        self.h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536 + 1024,
        })
        self.streams: set[_StreamTr] = set()
        self.by_id: dict[int, _StreamTr] = {}
        self.closed = False
        self.going = False
        self.wpaused = False
        self.want_flush = False
        self.idle = None

    def usable(self) -> bool:
        return not self.closed and not self.going

    def limit(self, mine: int) -> int:
        return min(mine, self.h2.remote_settings.max_concurrent_streams)

    # -- transport ------------------------------------------------------------------------

    def connection_made(self, tr) -> None:
        self.tr = tr
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(4 * STREAM_WINDOW)
        self.flush()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.idle_cancel()
        self.mux.drop(self)
        for st in list(self.streams):
            st.fail()

    def eof_received(self):
        return False

    def pause_writing(self) -> None:
        self.wpaused = True

    def resume_writing(self) -> None:
        self.wpaused = False
        for st in list(self.streams):
            self.drain(st)

    def abort(self) -> None:
        if self.tr is not None and not self.closed:
            self.closed = True
            self.tr.abort()

    def flush(self) -> None:
        if not self.want_flush and not self.closed:
            self.want_flush = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.want_flush = False
        if self.closed or self.tr is None:
            return
        data = self.h2.data_to_send()
        if data:
            self.tr.write(data)

    def idle_cancel(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None

    def _idle(self) -> None:
        self.idle = None
        if not self.streams and not self.closed:
            self.going = True
            self.mux.drop(self)
            try:
                self.h2.close_connection()
                self.tr.write(self.h2.data_to_send())
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            self.closed = True
            self.tr.close()

    # -- streams --------------------------------------------------------------------------

    def start(self, st: _StreamTr, headers: list, end: bool) -> None:
        if self.closed or self.going:
            st.fail()
            return
        sid = self.h2.get_next_available_stream_id()
        st.sid = sid
        self.by_id[sid] = st
        try:
            self.h2.send_headers(sid, headers, end_stream=end)
        except h2.exceptions.ProtocolError as e:
            log.debug("h2back_send_failed", backend=self.b.name, error=str(e))
            st.fail()
            return
        if end:
            st.ended = True
            st.end = True
        self.flush()

    def drain(self, st: _StreamTr) -> None:
        if st.closed or st.ended or not st.sid:
            return
        h = self.h2
        sid = st.sid
        ob = st.obuf
        try:
            while ob and not self.wpaused:
                win = min(h.local_flow_control_window(sid), h.max_outbound_frame_size)
                if win <= 0:
                    break
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
                    h.send_headers(sid, [(n, v) for n, v in st.trailers if n not in _HOP],
                                   end_stream=True)
                else:
                    h.end_stream(sid)
                st.ended = True
        except h2.exceptions.ProtocolError as e:
            log.debug("h2back_send_failed", backend=self.b.name, error=str(e))
            self.reset(st)
            st.fail()
            return
        self.flush()
        bc = st.bc
        if bc is not None:
            if st.obytes > HIGH and not st.paused:
                st.paused = True
                bc.pause_writing()
            elif st.paused and st.obytes < HIGH // 4:
                st.paused = False
                bc.resume_writing()

    def ack(self, st: _StreamTr) -> None:
        n = st.unacked
        if n and not self.closed:
            st.unacked = 0
            try:
                self.h2.acknowledge_received_data(n, st.sid)
            except h2.exceptions.ProtocolError:
                pass
            self.flush()

    def reset(self, st: _StreamTr) -> None:
        """The BackendConn is done with the stream (closed or aborted)."""
        if st.sid and not self.closed and self.by_id.get(st.sid) is st:
            try:
                self.h2.reset_stream(st.sid, h2.errors.ErrorCodes.CANCEL)
            except h2.exceptions.ProtocolError:
                pass
            self.flush()
        st.bc = None
        self.forget(st)

    def forget(self, st: _StreamTr) -> None:
        st.closed = True
        if st in self.streams:
            self.streams.discard(st)
            if st.sid:
                self.by_id.pop(st.sid, None)
            if st.unacked:
                n, st.unacked = st.unacked, 0
                try:
                    self.h2.acknowledge_received_data(n, st.sid)
                except h2.exceptions.ProtocolError:
                    pass
            self.mux._wake(self.b)
            if not self.streams and not self.closed:
                if self.going:
                    self.abort()
                elif self.idle is None:
                    self.idle = self.loop.call_later(IDLE_TIMEOUT, self._idle)

    def _give(self, st: _StreamTr, data: bytes) -> None:
        bc = st.bc
        if bc is not None and not bc.closed:
            bc.data_received(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except Exception as e:  # noqa: BLE001 - a broken backend costs its connection only
            log.debug("h2back_protocol_error", backend=self.b.name, error=repr(e))
            try:
                self.h2.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
                self.tr.write(self.h2.data_to_send())
            except Exception:  # noqa: BLE001
                pass
            self.abort()
            return
        for ev in events:
            t = type(ev)
            sid = getattr(ev, "stream_id", 0)
            st = self.by_id.get(sid) if sid else None
            if t is h2.events.ResponseReceived:
                if st is None:
                    continue
                status = b"200"
                lines = []
                for n, v in ev.headers:
                    if b"\r" in v or b"\n" in v or b"\0" in v:
                        self.reset(st)
                        st.fail()
                        break
                    if n == b":status":
                        status = v
                    elif n[0] != 58 and n not in _HOP:
                        lines.append(b"%b: %b\r\n" % (n, v))
                else:
                    st.got_head = True
                    st.chunked_in = not st.head_only and status not in (b"204", b"304")
                    if st.chunked_in:
                        lines = [x for x in lines if not x.startswith(b"content-length:")]
                        lines.append(b"transfer-encoding: chunked\r\n")
                    self._give(st, b"HTTP/1.1 %b X\r\n%b\r\n" % (status, b"".join(lines)))
                    if ev.stream_ended is not None:
                        self._end(st, None)
            elif t is h2.events.DataReceived:
                if st is None:
                    if ev.flow_controlled_length:
                        self.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
                    continue
                st.unacked += ev.flow_controlled_length
                if ev.data and st.chunked_in:
                    self._give(st, b"%x\r\n%b\r\n" % (len(ev.data), ev.data))
                if not st.rpaused:
                    self.ack(st)
            elif t is h2.events.TrailersReceived:
                if st is not None:
                    self._end(st, ev.headers)
            elif t is h2.events.StreamEnded:
                if st is not None and not st.closed:
                    self._end(st, None)
            elif t is h2.events.StreamReset:
                if st is not None:
                    st.fail()
            elif t is h2.events.WindowUpdated:
                if sid:
                    if st is not None:
                        self.drain(st)
                else:
                    for s in list(self.streams):
                        self.drain(s)
            elif t is h2.events.RemoteSettingsChanged:
                h2.clamp_table(self.h2)  # (a backend offering a huge HPACK table: see h2front)
            elif t is h2.events.ConnectionTerminated:
                self.going = True
                self.mux.drop(self)
                last = ev.last_stream_id if ev.last_stream_id is not None else 0
                for s in list(self.streams):
                    if s.sid > last or not s.sid:
                        s.fail()
        self.flush()

    def _end(self, st: _StreamTr, trailers) -> None:
        if st.closed:
            return
        if st.chunked_in:
            tl = b""
            if trailers:
                tl = b"".join(b"%b: %b\r\n" % (n, v) for n, v in trailers
                              if n[0] != 58 and not any(x in v for x in _BAD))
            self._give(st, b"0\r\n" + tl + b"\r\n")
        if not st.ended and not self.closed:  # the answer came before the whole request
            try:
                self.h2.reset_stream(st.sid, h2.errors.ErrorCodes.NO_ERROR)
            except h2.exceptions.ProtocolError:
                pass
        st.closed = True
        st.bc = None
        self.forget(st)
