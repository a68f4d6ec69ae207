"""The L7 HTTP/1.1 proxy: ``HttpListener(cfg, env)`` with ``async start()`` / ``async stop()``.

Shape
-----
One ``ClientConn`` (asyncio Protocol) per client connection parses requests with llhttp
(httptools) and serves them one at a time, in order (pipelined requests wait, with reading
paused). For each request: ``routing.Router`` picks the pool, stickiness (cookie insert or
source IP, recorded in ``env.tables.sticky``) or the pool's balancer picks the backend, and
an idle keep-alive ``BackendConn`` from the listener's per-backend pool (bounded,
``POOL_MAX_IDLE``) or a new connection carries it. Request heads are rebuilt from parsed
fields, response heads from the backend's header lines once ``http_head.ResponseFramer`` has
checked them strictly (it also frames the response body: see its docstring); bodies stream
through as they arrive, Content-Length as is, chunked re-encoded chunk by chunk; nothing
buffers a whole body. Backpressure: a full write buffer on one side pauses reading on the
other.

Writes are coalesced per loop turn, as HAProxy does: what the reads of one turn produce
(requests for backends, answers for clients) waits in the connections' ``out`` lists and the
listener writes it all at the start of the next turn (``HttpListener.send_all``, one
``call_soon``), so that the peers wake once per burst rather than once per write.

A backend connection goes back to the pool only after a complete, well-framed response to a
fully sent request with keep-alive on both ends and nothing extra on the wire; anything
doubtful (parse error, extra bytes, early answer, timeout, client gone) closes it.

Timeouts cost no timer per request: each connection carries a deadline (header, body gap,
keep-alive idle, backend inactivity) and the listener sweeps them every ``tick`` (a fifth of
the shortest timeout, at most 250 ms). The only per-connection timer is the one started when
a client stops reading (``client_idle``), which is rare.

Stickiness: cookie mode inserts ``Set-Cookie: <cookie>=<backend>; path=/; HttpOnly`` on the
first answer (and whenever the client moves); a request whose cookie names a backend that is
in the pool's view (up, not drained) and not full goes there. Source mode looks the client
address up in the sticky table, so an entry replicated from a peer is honoured. Both record
``sticky_key(kind, pool, value) -> backend`` with the pool's sticky TTL (touched on use, a
debug ``sticky_new`` log line per new entry).

Retries: a connect failure tries another backend (``pool.retries``); a failure after sending
but before any response byte retries another backend only for idempotent methods whose body
was absent or fully buffered (at most ``REPLAY_MAX``). A stale reused keep-alive connection
is retried once on a fresh connection to the same backend. Answers when nothing can serve:
503 (no backend up in the pool), 502 (backend failed or sent garbage), 504 (backend timeout).

Access log (``halb.accesslog``): every exchange that ends (answered, refused, failed, its
client gone, a tunnel closed) is logged once (``_alog_x``) with the instants read on the way
(first request byte, head complete, exchange start, request sent, response head) and the bytes
queued for the client (``nb``). With the log off (``alog`` None) the per-request cost is a few
``is not None`` checks and an integer add per piece sent.

Strict parsing: what llhttp rejects and what halb checks itself
---------------------------------------------------------------
Measured with httptools 0.9 (llhttp, default strict settings; see tests/unit/test_http_head.py
and the corpus in tests/integration/test_http_smuggling.py). llhttp rejects by itself:
both Content-Length and Transfer-Encoding; duplicated Content-Length, **even with identical
values** (RFC 9112 6.3 allows merging identical duplicates and HAProxy does; halb keeps
llhttp's stricter refusal: a legitimate client never sends two); Content-Length with
sign, hex, spaces, list, empty or overflowing; Transfer-Encoding with ``chunked`` not last,
unknown single codings, duplicated TE headers; invalid chunk sizes, sizes with spaces,
overflowing sizes, bad chunk extensions, missing CRLF after chunk data; bare CR, bare LF,
NUL, other control characters and DEL in header names and values; obsolete line folding;
whitespace before the colon; invalid header name characters; unknown and lower-case
methods; malformed versions (``HTTP/1.2``, ``HTTQ/1.1``); control characters, spaces and
non-ASCII bytes in the target. Halb's own checks (``http_head.check_request`` and the
callbacks below): versions other than 1.0/1.1 (llhttp takes ``HTTP/2.0`` and 0.9-style
lines), ``Transfer-Encoding`` other than exactly ``chunked`` (``gzip, chunked`` -> 501,
empty list members such as ``,chunked`` -> 400), TE on HTTP/1.0, missing or repeated Host,
invalid Host, absolute-form whose authority differs from Host, CONNECT and upgrade requests
with a body (501; a body-less upgrade offer such as h2c or websocket is answered as plain
HTTP/1.1, Upgrade being hop-by-hop), request line length (414), header count and size (431;
trailers count too), more than ``MAX_PIPELINE`` pipelined requests in one read (400), the
whole head within ``timeouts.header`` (408), body gaps over ``timeouts.body`` (408).
Two spaces in the request line (``GET  / HTTP/1.1``), which llhttp tolerates, are checked on
the raw bytes when the request starts a read; a pipelined request cannot be checked that way,
but its line is rebuilt canonically before a backend sees it.
A refused request is answered (400/414/431/501/408) and the connection closed; its bytes
never reach a backend, because a request is only sent after its whole head has been parsed
and checked, and a body error in a request already under way closes that backend connection.
"""

from __future__ import annotations

import asyncio
import os
import re
from time import monotonic as _monotonic
from time import time as _wall
from typing import TYPE_CHECKING

import httptools

try:
    import cython  # compiled: C-level branches below (see halb/_ext.py)
except ImportError:  # pragma: no cover - Cython absent at run time
    from .. import _cyshim as cython

from ..accesslog import cookie_state, http_phase
from ..accesslog_writer import for_listener
from ..config import ListenerConfig
from ..log import get_logger
from ..metrics import record
from ..model import backend_acquire, backend_release
from ..resource import orca_header, parse_orca, utilization
from ..tables import sticky_key
from .http_head import (APP_COOKIE_MAX, HttpError, ResponseFramer, ResponseHead, app_cookie_set,
                        prefix_set_cookie, prefix_set_cookie_pairs, strip_cookie_prefix,
                        check_request, error_response, request_head, sticky_cookie,
                        trailer_lines)

if not cython.compiled:  # compiled, these are C constants cimported from http_head.pxd
    from .http_head import _F_DONE, EV_BODY, EV_DONE, EV_HEAD, EV_INTERIM, EV_NEED, EV_SWITCH
from .cache import Headers as CacheHeaders
from .cache import caches_of
from .cache import from_config as cache_from_config
from .routing import Router
from .sockets import listen_tcp

if TYPE_CHECKING:  # pragma: no cover
    from ..model import Backend, Pool
    from . import ListenerEnv

log = get_logger("http")

HIGH_WATER = 256 * 1024  # transport write buffers; pending body bytes before reading pauses
REPLAY_MAX = 64 * 1024  # request bodies up to this size are kept for a retry
# idle keep-alive connections kept per backend. As many as a busy listener has requests in
# flight to it, within reason: with 64, a thousand keep-alive clients meant a thousand backend
# connections busy at once, all but 64 of them closed after their answer and opened again for
# the next request (HAProxy's http-reuse keeps every one, pool-max-conn -1). Idle ones close
# after POOL_IDLE_TIMEOUT.
POOL_MAX_IDLE = 1024
POOL_IDLE_TIMEOUT = 30.0  # an idle pooled connection is closed after this
MAX_PIPELINE = 128  # parsed requests waiting behind the one in flight (one read's worth)


def _clock() -> float:
    """The proxy's clock for deadlines and response times: CLOCK_MONOTONIC, the clock of
    asyncio's and uvloop's ``loop.time()`` (uvloop's reads it to the millisecond, once per loop
    turn). Compiled, it is a C call instead of a method call into the loop per use."""
    if cython.compiled:
        clock_gettime(CLOCK_MONOTONIC, cython.address(ts))  # noqa: F821 - cimported (http.pxd)
        return ts.tv_sec + ts.tv_nsec * 1e-9  # noqa: F821
    return _monotonic()
RESP_MAX_HEADERS = 256  # bounds on a backend's response head
RESP_MAX_HEADER_BYTES = 64 * 1024
RESP_HEAD_BUF = RESP_MAX_HEADER_BYTES + 1024  # response bytes gathered while its head is due
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"))
_REQ_LINE_RE = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ ]+ HTTP/[0-9]\.[0-9]$")

# pause-reading reasons (bit flags) for a client connection
_P_PIPE = 1  # a request is in flight and another one has been parsed
_P_BUF = 2  # body bytes waiting for a backend connection
_P_BACKEND = 4  # the backend's write buffer is full
_P_DONE = 8  # an error answer is pending; read no more
_P_UPG = 16  # an upgrade offer waits for its answer: the bytes after it are held
_P_WRITE = 32  # (cache listeners) the client is not taking our answers: read no more requests

# request-target bytes >= 0x80 (raw UTF-8, which llhttp refuses) stand in as "x" while llhttp
# parses the line; the target goes on as it came (ClientConn._mask_target)
_MASK_HIGH = bytes(c if c < 128 else 0x78 for c in range(256))


# methods whose request content has no defined meaning (RFC 9110 9.3.1, 9.3.2): a body on
# them is forwarded, but the backend connection is not reused after it
_NO_BODY_METHODS = frozenset((b"GET", b"HEAD"))

class _Rx:
    """A request whose head has been parsed: its body state while it is received/sent."""

    __slots__ = ("req", "keep_alive", "body", "buffered", "complete", "replay", "replay_bytes",
                 "t0", "th")

    def __init__(self, req, keep_alive: bool):
        self.req = req
        self.keep_alive = keep_alive
        body = req.has_body  # a request without one allocates no lists
        self.body: list[bytes] | None = [] if body else None  # framed pieces not yet sent
        self.buffered = 0
        self.complete = False  # the whole request has been received
        self.replay: list[bytes] | None = [] if body else None  # kept for a retry (small only)
        self.replay_bytes = 0
        # access log (set only while it is on): first byte of the request, head complete
        self.t0 = -1.0
        self.th = -1.0


class _CacheX:
    """The cache's part in one exchange (halb.proxy.cache): the cache it asked (kept: a reload
    may replace the listener's meanwhile), its decision, then the response being gathered for
    storing (``body`` None: not stored)."""

    __slots__ = ("cache", "d", "limit", "t_req", "body", "size", "status", "reason", "h",
                 "lifetime", "fresh304")

    def __init__(self, cache, d, t_req: float):
        self.cache = cache
        self.d = d
        self.limit = cache.max_object
        self.t_req = t_req
        self.body: list[bytes] | None = None
        self.size = 0
        self.status = 0
        self.reason = b""
        self.h = None
        self.lifetime = 0.0
        self.fresh304 = False


def _authority(host: str, port: int) -> str:
    """The Host a request without one gets towards backend ``host:port`` (an HTTP/1.0
    request): an IPv6 literal in brackets (RFC 9110 7.2, RFC 3986 3.2.2), no port for 80."""
    h = f"[{host}]" if ":" in host else host
    return h if port == 80 else f"{h}:{port}"


class _Settings:
    """A listener's settings that the per-request path reads, flattened into one object."""

    __slots__ = ("max_line", "max_headers", "max_header_bytes", "max_conns", "t_header",
                 "t_body", "t_idle", "t_server", "t_connect", "t_tunnel", "forwarded", "proto",
                 "name", "metrics", "bk", "via10", "via11", "alog_on")

    def __init__(self, cfg: ListenerConfig, proto: str, metrics):
        lim, t = cfg.limits, cfg.timeouts
        self.max_line = lim.max_request_line
        self.max_headers = lim.max_headers
        self.max_header_bytes = lim.max_header_bytes
        self.max_conns = lim.max_conns
        self.t_header = t.header
        self.t_body = t.body
        self.t_idle = t.client_idle
        self.t_server = t.server
        self.t_connect = t.connect
        self.t_tunnel = t.tunnel
        self.forwarded = cfg.forwarded_headers
        # Via (RFC 9110 7.6.3): "Via: <received protocol> <pseudonym>" on what halb forwards,
        # the protocol being the one the message came in with (HTTP/1.0 or 1.1)
        via = getattr(cfg, "via", "halb")
        self.via10 = b"Via: 1.0 %b\r\n" % via.encode() if via else b""
        self.via11 = b"Via: 1.1 %b\r\n" % via.encode() if via else b""
        self.proto = proto
        self.name = cfg.name
        self.metrics = metrics
        self.bk = metrics._bk  # metrics.record's per-backend counters (see _release)
        self.alog_on = getattr(cfg, "access_log", True)  # (a reload rebuilds these settings)


class HttpListener:
    def __init__(self, cfg: ListenerConfig, env: "ListenerEnv"):
        self.cfg = cfg
        self.env = env  # (halb.proxy.ListenerEnv: what a listener uses of its node)
        self.name = cfg.name
        self.router = Router(cfg.routes, cfg.pool)
        self.pools = env.pools  # (the node's dict: pools live as long as the node)
        self.ssl = None
        # HTTP/2 (halb.proxy.h2front): ALPN h2 on TLS, h2c prior knowledge on plain listeners
        h2c = getattr(cfg, "http2", None)
        self.h2 = None
        self.h2b = None  # HTTP/2 backend connections (halb.proxy.h2back), made on first use
        if h2c is not None and h2c.enabled and (h2c.h2c if not cfg.tls else "h2" in h2c.alpn):
            from .h2front import H2Registry
            self.h2 = H2Registry(cfg, ClientConn)
        if cfg.tls:
            from .tls import server_context
            alpn = [a for a in h2c.alpn if a != "h2" or self.h2 is not None] if h2c is not None \
                else ["http/1.1"]
            self.ssl = server_context(cfg.tls, f"listener {cfg.name!r} tls", listener=cfg.name,
                                      tickets=env.tls_tickets, now=_wall,
                                      alpn=alpn or ["http/1.1"])
        self.proto = "https" if cfg.tls else "http"
        self.settings = _Settings(cfg, self.proto, env.metrics)
        self.conns: set[ClientConn] = set()
        self.idle: dict[object, list[BackendConn]] = {}
        self.server: asyncio.AbstractServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        # Write coalescing, as HAProxy does: what one loop turn's reads produce (requests for
        # backends, answers for clients) is written once those reads are all handled, at the
        # start of the next turn. The peers (clients, backends) then wake once per burst of
        # writes instead of once per write: on a 2-core VM, where a wake-up is an IPI, that
        # measured about 0.8 us of kernel time per request (bench/RESULTS.md).
        self.ob_c: list[ClientConn] = []  # connections with bytes in .out, in queuing order
        self.ob_b: list[BackendConn] = []
        self.ob_armed = False
        self.handover = None  # a listening socket taken over from the listener this replaces
        self.alog = for_listener(env, True)  # the node's access log, or None (then: off)
        self.cache = None  # [listeners.cache] (halb.proxy.cache), None when off
        self.cache_pools = None
        self._set_cache(cfg, None)

    def _set_cache(self, cfg: ListenerConfig, old) -> None:
        """``old``: the cache config running until now (a reload that changes it starts with
        an empty cache; one that keeps it keeps the entries)."""
        cc = getattr(cfg, "cache", None)
        if cc is None:
            self.cache = None
        elif self.cache is None or cc != old:
            self.cache = cache_from_config(cc)
        self.cache_pools = frozenset(cc.pools) if cc is not None and cc.pools else None
        caches = caches_of(self.env.metrics) if cc is not None else \
            getattr(self.env.metrics, "http_caches", None)
        if caches is not None:
            if self.cache is not None:
                caches[self.name] = self.cache
            else:
                caches.pop(self.name, None)

    def reconfigure(self, cfg: ListenerConfig) -> None:
        """A reload changed this listener's routes, timeouts, limits, headers or default pool
        (same bind, same TLS): applied in place. The socket and the open connections stay;
        a connection keeps the settings it started with, new ones get the new ones."""
        old, self.cfg = self.cfg, cfg
        if getattr(cfg, "cache", None) != getattr(old, "cache", None):
            self._set_cache(cfg, getattr(old, "cache", None))
        self.router = Router(cfg.routes, cfg.pool)
        self.settings = _Settings(cfg, self.proto, self.env.metrics)
        if self.h2 is not None:
            self.h2.reconfigure(cfg)
        t = cfg.timeouts
        self.tick = max(0.02, min(0.25, min(t.header, t.client_idle, t.body, t.server) / 5))

    def take_socket(self):
        """A duplicate of the listening socket, for the listener that replaces this one: the
        kernel's accept queue stays with the socket while both exist."""
        import socket as _socket
        return _socket.socket(fileno=os.dup(self.server.sockets[0].fileno()))

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        sock = self.handover or listen_tcp(self.cfg.bind.host, self.cfg.bind.port)
        self.handover = None
        kw = {}
        if self.ssl is not None:
            kw["ssl"] = self.ssl
            kw["ssl_handshake_timeout"] = self.cfg.timeouts.header
        self.server = await self.loop.create_server(lambda: ClientConn(self), sock=sock, **kw)
        t = self.cfg.timeouts
        self.tick = max(0.02, min(0.25, min(t.header, t.client_idle, t.body, t.server) / 5))
        self._sweeper = self.loop.create_task(self._sweep(), name=f"http-sweep-{self.name}")
        log.info("listener_started", listener=self.name, bind=str(self.cfg.bind), mode="http",
                 tls=self.ssl is not None, routes=len(self.cfg.routes))

    async def _sweep(self) -> None:
        """Timeouts without a timer per request: every ``tick`` the connections' deadlines
        (header, body gap, keep-alive idle, backend inactivity, pooled idle) are checked."""
        while True:
            await asyncio.sleep(self.tick)
            server_to = self.cfg.timeouts.server
            now = _clock()
            try:
                for c in list(self.conns):
                    if c.tkind and now >= c.deadline:
                        c._timeout(c.tkind)
                    bc = c.conn
                    if bc is not None and bc.cc is c and not c.tunnel \
                            and now - bc.last >= server_to:
                        bc.server_timeout()
                for lst in self.idle.values():
                    while lst and now - lst[0].idle_since >= POOL_IDLE_TIMEOUT:
                        lst.pop(0).close()
            except Exception:  # a bug here must not stop the sweeps
                log.exception("sweep_failed", listener=self.name)

    async def stop(self, grace: float = 0.0) -> None:
        """Stops accepting; ``grace`` > 0 (an upgrade's old process, a listener a reload
        removed): for up to ``grace`` seconds the connections go on, each answer saying
        ``Connection: close``, so keep-alive clients move to the new socket's owner between
        requests rather than meet a close; then idle connections close and busy ones after
        their answer (2 s more at most)."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        if self.h2 is not None:
            # GOAWAY to the HTTP/2 clients at once (their counterpart of the Connection: close
            # answers below): the streams under way finish, new ones go to a new connection
            self.h2.stop()
        if grace > 0 and self.loop is not None:
            deadline = self.loop.time() + grace
            while self.conns and self.loop.time() < deadline:
                await asyncio.sleep(0.05)
        if getattr(self, "_sweeper", None) is not None:
            self._sweeper.cancel()
        for c in list(self.conns):
            c.shutdown()
        for lst in list(self.idle.values()):
            for bc in list(lst):
                bc.close()
        self.idle.clear()
        if self.h2b is not None:
            self.h2b.close()
        caches = getattr(self.env.metrics, "http_caches", None)
        if caches is not None and self.cache is not None and caches.get(self.name) is self.cache:
            del caches[self.name]  # (a listener with this name that replaces it puts its own)
        deadline = self.loop.time() + 2.0 if self.loop else 0
        while self.conns and self.loop and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for c in list(self.conns):
            c.why = "K"  # (the access log: killed while open)
            c.abort()
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - best effort on stop
                pass
        log.info("listener_stopped", listener=self.name)

    # -- write coalescing -----------------------------------------------------------------

    def defer_c(self, cc: "ClientConn") -> None:
        self.ob_c.append(cc)
        if not self.ob_armed:
            self.ob_armed = True
            self.loop.call_soon(self.send_all)

    def defer_b(self, bc: "BackendConn") -> None:
        self.ob_b.append(bc)
        if not self.ob_armed:
            self.ob_armed = True
            self.loop.call_soon(self.send_all)

    def send_all(self) -> None:
        """Writes what the last loop turn queued (``call_soon``: it runs before the next poll):
        requests to backends first, then answers to clients. A backend's work is the longer
        leg of an exchange, so it starts first and overlaps with the answers being written.
        On a core shared by clients and backends, waking the backends first also lets the
        client side run undisturbed afterwards: in the bench (bench/RESULTS.md, 2026-12-03)
        the other order caused 3x the rescheduling IPIs per request (waking a backend
        preempted a client just woken), 0.5 us more kernel time per request, 0.96x HAProxy's
        rate and 1.05x-1.13x its p99, against 1.01x-1.04x and 0.78x-0.90x this way."""
        self.ob_armed = False
        lb = self.ob_b
        if lb:
            self.ob_b = []
            for bc in lb:
                bc.send_now()
        lc = self.ob_c
        if lc:
            self.ob_c = []
            for cc in lc:
                cc.send_now()

    # -- backend connection pool ----------------------------------------------------------

    def take_idle(self, b) -> "BackendConn | None":
        lst = self.idle.get(b)
        while lst:
            bc = lst.pop()
            if not bc.closed and not bc.tr.is_closing():
                return bc
        return None

    def put_idle(self, bc: "BackendConn") -> None:
        if self.stopping or bc.closed or bc.tr is None or bc.tr.is_closing():
            bc.close()
            return
        lst = self.idle.get(bc.b)
        if lst is None:
            lst = self.idle[bc.b] = []
        elif len(lst) >= POOL_MAX_IDLE:
            bc.close()
            return
        if bc.read_paused:
            bc.resume_reading()
        bc.idle_since = _clock()
        lst.append(bc)

    def drop_idle(self, bc: "BackendConn") -> None:
        lst = self.idle.get(bc.b)
        if lst and bc in lst:
            lst.remove(bc)


class BackendConn:  # an asyncio Protocol (duck-typed: it may be compiled, see http.pxd)
    """One keep-alive connection to a backend; parses its responses and hands them up."""

    __slots__ = ("l", "b", "loop", "tr", "cc", "fr", "rh", "keep", "msg_done", "doubtful",
                 "got_bytes", "last", "idle_since", "read_paused", "closed", "close_delimited",
                 "out", "queued", "tun")

    def __init__(self, lst: HttpListener, b):
        self.l = lst
        self.b = b
        self.loop = lst.loop
        self.tr: asyncio.Transport | None = None
        self.cc: ClientConn | None = None
        self.rh = ResponseHead(RESP_MAX_HEADERS, RESP_MAX_HEADER_BYTES)
        # The responses' framing and strict checks (ResponseFramer, sans I/O): one pass over
        # each head, no Python call per piece; the head's header lines go to the client from
        # the raw bytes (ResponseHead.take_range).
        self.fr = ResponseFramer(self.rh, RESP_HEAD_BUF)
        self.keep = False
        self.msg_done = False
        self.doubtful = False
        self.got_bytes = False
        self.last = 0.0  # last activity while serving an exchange (loop time)
        self.idle_since = 0.0
        self.read_paused = False
        self.closed = False
        self.close_delimited = False
        self.out: list[bytes] = []  # request bytes for the backend, written by send_now
        self.queued = False  # in the listener's write queue (HttpListener.send_all)
        self.tun = False  # a tunnel after a 101: bytes pass through both ways as they come

    # -- transport events -----------------------------------------------------------------

    def connection_made(self, tr) -> None:
        self.tr = tr
        tr.set_write_buffer_limits(HIGH_WATER)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.l.drop_idle(self)
        cc = self.cc
        if cc is not None:
            self.cc = None
            if self.tun:
                cc.tun_end("backend closed" if exc is None else "backend reset")
            elif self.close_delimited and not self.doubtful:
                cc.resp_done(self, False)
            else:
                cc.backend_failed(self, "closed")

    @cython.locals(ev=cython.int, fr=ResponseFramer)
    def data_received(self, data: bytes) -> None:
        cc = self.cc
        if cc is None:  # an idle connection must stay silent
            self.close()
            return
        if self.tun:
            cc.tun_down(data)
            return
        self.got_bytes = True
        self.last = _clock()
        fr = self.fr
        fr.feed(data)
        err = ""
        try:
            while True:
                ev = fr.next()
                if ev == EV_BODY:
                    cc.resp_body(fr.piece)
                elif ev == EV_NEED:
                    break
                elif ev == EV_HEAD:
                    self.keep = fr.keep
                    head_only, self.close_delimited = cc.resp_head(self, fr.status, self.rh)
                    if head_only and fr.state != _F_DONE:  # (the framer decides alike)
                        self.doubtful = True
                        fr.state = _F_DONE
                elif ev == EV_DONE:
                    if fr.pos < len(fr.buf):
                        self.doubtful = True  # bytes after the response: nobody asked for them
                    self.close_delimited = False
                    self.msg_done = True
                    break
                elif ev == EV_INTERIM:
                    cc.resp_interim(fr.status, self.rh, fr.minor)
                elif ev == EV_SWITCH:
                    rest = fr.buf[fr.pos:]
                    fr.pos = len(fr.buf)
                    cc.resp_switch(self, rest)
                    return
                else:
                    err = fr.error
                    break
        except HttpError as e:  # pragma: no cover - resp_head and resp_body raise none today
            err = e.reason
        if err:
            log.debug("backend_protocol_error", backend=self.b.name, error=err)
            cc.flush()  # (what this read produced before the error goes first)
            self.doubtful = True
            self.cc = None
            self.close()
            cc.backend_failed(self, "protocol")
            return
        if cc.out:
            cc.flush()  # one write for everything this read produced (head and body)
        if self.msg_done:
            self.msg_done = False
            self.cc = None
            cc.resp_done(self, self.keep and not self.doubtful)

    def queue(self) -> None:
        """``out`` holds request bytes: the listener writes them at the end of this turn."""
        if not self.queued:
            self.queued = True
            self.l.defer_b(self)

    def send_now(self) -> None:
        self.queued = False
        out = self.out
        if out:
            if not self.closed:
                if len(out) == 1:
                    self.tr.write(out[0])
                else:
                    self.tr.writelines(out)
            out.clear()

    def pause_writing(self) -> None:
        if self.cc is not None:
            self.cc.pause(_P_BACKEND)

    def resume_writing(self) -> None:
        if self.cc is not None:
            self.cc.resume(_P_BACKEND)

    def eof_received(self):
        if self.tun and self.cc is not None:
            return self.cc.tun_eof(False)
        return False

    # -- timers and state -----------------------------------------------------------------

    def server_timeout(self) -> None:
        """No backend activity for ``timeouts.server`` (the sweep calls this)."""
        if self.read_paused:  # we stopped reading for a slow client: its timeout applies
            self.last = _clock()
            return
        cc = self.cc
        self.cc = None
        self.close()
        if cc is not None:
            cc.backend_failed(self, "timeout")

    def pause_reading(self) -> None:
        if not self.read_paused and self.tr is not None and not self.closed:
            self.read_paused = True
            self.tr.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.tr is not None and not self.closed:
            self.read_paused = False
            self.tr.resume_reading()

    def close(self) -> None:
        self.doubtful = True
        if self.tr is not None and not self.closed:
            self.closed = True
            self.tr.abort()

    def close_soft(self) -> None:
        """Closes once what is buffered for the backend is written (the end of a tunnel)."""
        self.doubtful = True
        if self.tr is not None and not self.closed:
            self.closed = True
            self.tr.close()


class ClientConn:  # an asyncio Protocol (duck-typed: it may be compiled, see http.pxd)
    """One client connection: parses its requests and runs one exchange at a time."""

    __slots__ = ("l", "env", "s", "loop", "tr", "parser", "client_ip", "accepted", "closed",
                 "eof", "paused", "in_head", "raw_head", "url", "hdrs", "hbytes", "rx", "queue",
                 "pending_error", "tkind", "deadline", "wtimer", "out", "wpaused", "up", "cur",
                 "pool", "b", "conn", "connecting", "tried", "attempts", "last_err", "sticky_b",
                 "cookie_val", "hkey", "acquired", "t0", "reused", "stale_retry", "sent_all",
                 "resp_started", "resp_chunk", "resp_close", "status", "fwd", "lver", "queued",
                 "tunnel", "held", "shut", "skip", "synth", "raw_target", "hi_start", "hi_end",
                 "alog", "cport", "t_begin", "t_start", "t_resp", "nb", "nup", "why", "lrx",
                 "lterm", "cst", "lcache")

    def __init__(self, lst: HttpListener):
        self.l = lst
        self.env = lst.env
        self.s = lst.settings
        self.loop = lst.loop
        self.tr: asyncio.Transport | None = None
        self.parser = None  # created on the first bytes: an idle connection costs less
        self.client_ip = ""
        self.accepted = False
        self.closed = False
        self.eof = False
        self.paused = 0
        # parsing state of the request being received
        self.in_head = False
        self.raw_head = 0
        self.url = b""
        self.hdrs: list[tuple[bytes, bytes]] = None  # type: ignore[assignment]  # per message
        self.hbytes = 0
        self.rx: _Rx | None = None
        self.queue: list[_Rx] = []  # short (<= MAX_PIPELINE): a list is smaller than a deque
        self.pending_error: HttpError | None = None
        # client timers
        self.tkind = ""  # which deadline applies: "" | "head" | "body" | "idle"
        self.deadline = 0.0
        self.wtimer: asyncio.TimerHandle | None = None
        self.out: list[bytes] = None  # type: ignore[assignment]  # set up by the first exchange
        # (response bytes gathered during one backend read)
        self.wpaused = False  # our write buffer towards the client is above its high mark
        self.up: list[bytes] | None = None  # request body bytes gathered during one client read
        # the exchange in flight (queue[0])
        self.cur: _Rx | None = None
        self.pool: "Pool | None" = None
        self.b: "Backend | None" = None
        self.conn: BackendConn | None = None
        self.connecting: asyncio.Task | None = None
        self.tried: tuple = ()  # backends tried for the request in flight (a few at most)
        self.attempts = 0
        self.last_err = ""
        self.sticky_b = None
        self.cookie_val = ""
        self.hkey: bytes | None = None
        self.acquired = False
        self.t0 = 0.0
        self.reused = False
        self.stale_retry = False
        self.sent_all = False
        self.resp_started = False
        self.resp_chunk = False
        self.resp_close = False
        self.status = 0
        self.fwd: list | None = None  # [Host, forwarded headers] reused by request_head
        self.lver: str | None = None  # version read off the request line (_check_line)
        self.queued = False  # in the listener's write queue (HttpListener.send_all)
        # upgrades (RFC 9110 7.8): after a 101 the connection is a tunnel to the backend
        self.tunnel = False
        self.held: bytes | None = None  # bytes after an upgrade offer, until its answer
        self.shut = 0  # a tunnel's half-closes: 1 the client's, 2 the backend's
        self.skip: _Rx | None = None  # an upgrade offer with a body (read as a plain request)
        self.synth = False  # a stand-in head is being fed to a new parser (_upgrade)
        # a request target with bytes >= 0x80: as it came (llhttp parses a masked copy)
        self.raw_target: bytes | None = None
        self.hi_start = 0
        self.hi_end = 0  # > 0: the line at data[hi_start:hi_end] has such bytes
        # the access log (halb.accesslog): None when off, and then nothing below is read
        self.alog = lst.alog if self.s.alog_on else None
        self.cport = 0
        self.t_begin = -1.0  # first byte of the request being received (when logging)
        self.t_start = -1.0  # the exchange in flight started (when logging)
        self.t_resp = -1.0  # its response head came
        self.nb = 0  # bytes queued for the client by the exchange in flight
        self.nup = 0  # bytes from the client in a tunnel
        self.why = ""  # who ended the connection, when halb knows better than "C" (c, K)
        self.lrx: _Rx | None = None  # the exchange last logged (each is logged once)
        self.lterm = ""  # the termination state of the last failed attempt
        self.cst: _CacheX | None = None  # the cache's part in the exchange in flight
        self.lcache = "-"  # the access log's cache field of the exchange in flight

    # -- transport events -----------------------------------------------------------------

    def connection_made(self, tr) -> None:
        self.tr = tr
        l = self.l
        if l.ssl is not None and l.h2 is not None:
            so = tr.get_extra_info("ssl_object")
            if so is not None and so.selected_alpn_protocol() == "h2":
                self._to_h2(b"")
                return
        # (a connection the loop accepted just before the listener stopped is served, its
        # answer saying Connection: close, rather than reset: during an upgrade or a reload
        # its client would otherwise see the one failure of the handover)
        if len(l.conns) >= self.s.max_conns:
            self.closed = True
            tr.abort()
            return
        self.accepted = True
        l.conns.add(self)
        peer = tr.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self.cport = peer[1] if peer else 0
        tr.set_write_buffer_limits(HIGH_WATER)
        self.env.metrics.conn_open(l.name)
        self._arm("head", self.s.t_header)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._cancel_timers()
        if not self.accepted:
            return
        if self.alog is not None and self.cur is not None and self.cur is not self.lrx:
            self._alog_lost(exc)  # the exchange in flight ends with the connection
        self.accepted = False
        self.l.conns.discard(self)
        self.env.metrics.conn_close(self.l.name)
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.conn is not None:
            bc = self.conn
            self.conn = None
            bc.cc = None
            if self.tunnel:
                bc.close_soft()  # what the client sent last still goes to the backend
            else:
                bc.close()
        if self.tunnel:
            self.tunnel = False
            self.env.metrics.tunnel_close(self.l.name)
            if self.acquired:  # (counted as a request at the 101: only the backend's use ends)
                self.acquired = False
                backend_release(self.b, None)
        self._release(None, False)

    def eof_received(self):
        if self.tunnel:
            return self.tun_eof(True)
        self.eof = True
        if self.in_head or self.rx is not None:
            return False  # a request cut short can never complete: close (and drop its exchange)
        if self.cur is not None:
            return True  # finish the answer in flight, then close
        return False

    def pause_writing(self) -> None:
        self.wpaused = True
        bc = self.conn
        if bc is not None:
            bc.pause_reading()
        if self.l.cache is not None and not self.tunnel:
            # answers from the cache need no backend, so pausing one would not stop them: a
            # client that sends requests and reads nothing is read no further instead (the
            # pipelined ones already parsed, at most MAX_PIPELINE, are still answered)
            self.pause(_P_WRITE)
        if self.wtimer is None:
            self.wtimer = self.loop.call_later(self.s.t_tunnel if self.tunnel else self.s.t_idle,
                                               self._send_timeout)

    def resume_writing(self) -> None:
        self.wpaused = False
        if self.wtimer is not None:
            self.wtimer.cancel()
            self.wtimer = None
        bc = self.conn
        if bc is not None:
            bc.resume_reading()
        self.resume(_P_WRITE)

    def flush(self) -> None:
        """Queues what ``out`` holds: the listener writes it at the end of this loop turn."""
        if self.out and not self.queued:
            self.queued = True
            self.l.defer_c(self)

    def put(self, data: bytes) -> None:
        """Queues bytes for the client after whatever ``out`` already holds."""
        if self.out is None:
            self.out = []
        self.out.append(data)
        self.flush()

    def send_now(self) -> None:
        self.queued = False
        out = self.out
        if out:
            if not self.closed:
                n = len(out)
                if n == 1:
                    self.tr.write(out[0])
                elif n == 2 and len(out[1]) <= 16384:  # a head and a small body: one buffer
                    self.tr.write(out[0] + out[1])
                else:
                    self.tr.writelines(out)
            out.clear()

    def _send_timeout(self) -> None:
        self.wtimer = None
        log.debug("client_send_timeout", listener=self.l.name, client=self.client_ip)
        self.why = "c"  # (the access log: the client took nothing in time)
        self.abort()

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            self.tun_up(data)
            return
        if self.closed or self.paused & _P_DONE:
            return
        if self.parser is None and data[:4] == b"PRI " and self.l.h2 is not None \
                and self.l.ssl is None:
            self._to_h2(data)  # an HTTP/2 connection preface (h2c with prior knowledge)
            return
        if self.rx is None and (not self.tkind or self.tkind == "idle"):
            self._arm("head", self.s.t_header)  # a new head starts: it has a deadline
        was_head = self.in_head
        if self.rx is None and not self.in_head:
            # a new request starts at this read: check its request line on the raw bytes
            if not self._check_line(data):
                return
            if self.hi_end:
                data = self._mask_target(data)
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._flush_up()
            self._upgrade(data, e.args[0] if e.args else len(data))
            return
        except httptools.HttpParserError as e:
            if self.cur is not None and self.cur.complete:
                self._flush_up()  # the tail of the request in flight, parsed before the error
            elif self.up:
                self.up.clear()  # the broken request's own bytes go no further
            ctx = e.__context__
            err = ctx if isinstance(ctx, HttpError) else HttpError(400, str(e) or "malformed request")
            self._refuse(err)
            return
        except HttpError as e:  # pragma: no cover - httptools wraps callback errors
            self._refuse(e)
            return
        if self.up:
            self._flush_up()
        if self.in_head:
            self.raw_head = self.raw_head + len(data) if was_head else len(data)
            s = self.s
            if self.raw_head > s.max_header_bytes + s.max_line:
                self._refuse(HttpError(431, "request head too large"))
                return
        if self.cur is None and self.queue:
            self._start(self.queue[0])

    def _to_h2(self, data: bytes) -> None:
        """The client speaks HTTP/2: the connection goes to an ``h2front.H2Conn``."""
        from .h2front import H2Conn
        l = self.l
        if self.accepted:
            self.accepted = False
            l.conns.discard(self)
            self.env.metrics.conn_close(l.name)
        self._cancel_timers()
        self.tkind = ""
        self.closed = True
        tr = self.tr
        self.tr = None
        h = H2Conn(l, l.h2)
        tr.set_protocol(h)
        h.connection_made(tr, data)

    def _flush_up(self) -> None:
        up = self.up
        if not up:
            return
        bc = self.conn
        if bc is not None and not bc.closed:
            bc.out += up
            bc.queue()
        up.clear()

    @cython.boundscheck(False)  # indices stay within data (see the loop)
    @cython.wraparound(False)
    def _check_line(self, data: bytes) -> bool:
        self.lver = None
        i = 0
        n = len(data)
        while i + 1 < n and data[i] == 13 and data[i + 1] == 10:  # leading empty lines
            i += 2
        lim = i + self.s.max_line + 2
        if cython.compiled:  # the same decisions in one pass over the bytes
            stop = n if lim > n else lim
            j = i
            end = -1
            sp = 0
            prev = 0
            dbl = False
            hi = False
            while j < stop:
                c = data[j]
                if c == 13:
                    if j + 1 < stop and data[j + 1] == 10:
                        end = j
                        break
                elif c == 32:
                    sp += 1
                    if prev == 32:
                        dbl = True
                elif c >= 128:
                    hi = True
                prev = c
                j += 1
            if end < 0:
                return True
            if hi:
                self.hi_start = i
                self.hi_end = end
            if sp == 2 and not dbl and data[i] != 32 and data[end - 1] != 32:
                self._note_version(data, end - 8)
                return True
        else:
            end = data.find(b"\r\n", i, lim)
            if end < 0:
                return True  # incomplete line: llhttp and the length limit judge it
            if not data.isascii() and not data[i:end].isascii():
                self.hi_start = i
                self.hi_end = end
            if data.count(b" ", i, end) == 2 and data[i] != 32 and data[end - 1] != 32 \
                    and data.find(b"  ", i, end) < 0:
                self._note_version(data, end - 8)
                return True  # METHOD SP target SP version: llhttp checks the three parts
        if not _REQ_LINE_RE.match(data[i:end]):
            self._refuse(HttpError(400, "malformed request line"))
            return False
        return True

    def _note_version(self, data: bytes, at: int) -> None:
        """The version of the request whose line starts this read, read off its line at ``at``
        (llhttp's get_http_version() formats a new string per request): used by the next head
        that completes, which is that request's."""
        if at >= 0 and len(data) >= at + 8 and data[at] == 72 and data[at + 1] == 84 \
                and data[at + 2] == 84 and data[at + 3] == 80 and data[at + 4] == 47 \
                and data[at + 5] == 49 and data[at + 6] == 46:  # "HTTP/1."
            minor = data[at + 7]
            if minor == 49:  # "1"
                self.lver = "1.1"
            elif minor == 48:  # "0"
                self.lver = "1.0"

    def _mask_target(self, data: bytes) -> bytes:
        """The request line at ``data[hi_start:hi_end]`` has bytes >= 0x80 (raw UTF-8, say),
        which llhttp refuses in a target though they carry no framing risk (nginx forwards
        them): llhttp is given the line with those bytes as "x" and the request keeps its
        target as it came (``raw_target``, taken by the next head to complete: this one's).
        High bytes in the method or version are left for llhttp to refuse."""
        i = self.hi_start
        end = self.hi_end
        self.hi_end = 0
        sp1 = data.find(b" ", i, end)
        sp2 = data.rfind(b" ", i, end)
        if sp1 < 0 or sp2 <= sp1:
            return data
        target = data[sp1 + 1:sp2]
        if target.isascii() or not data[i:sp1].isascii() or not data[sp2:end].isascii():
            return data
        self.raw_target = target
        return data[:sp1 + 1] + target.translate(_MASK_HIGH) + data[sp2:]

    def _upgrade(self, data: bytes, offset: int) -> None:
        """llhttp stopped after a request with ``Connection: upgrade`` and ``Upgrade``."""
        rest = data[offset:]
        skip = self.skip
        if skip is not None:
            # An upgrade offer on a request with a body is an ordinary request (RFC 9110 7.8:
            # a server may ignore Upgrade); llhttp skipped its body, so a new parser reads it,
            # primed with a stand-in head of the same framing (its callbacks are ignored).
            self.skip = None
            req = skip.req
            parser = self.parser = httptools.HttpRequestParser(self)
            self.synth = True
            if req.chunked:
                head = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            else:
                head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (
                    req.content_length or 0)
            try:
                parser.feed_data(head)
            finally:
                self.synth = False
            if self.cur is None and self.queue:
                self._start(self.queue[0])
            if rest and not self.closed:
                self.data_received(rest)
            return
        rx = self.queue[-1] if self.queue else None
        if rx is None or not rx.complete:
            if rx is not None and rx is not self.cur:
                self.queue.pop()
            self._refuse(HttpError(400, "malformed upgrade request"))
            return
        if rx.req.upgrade:
            # an offer halb carries: what follows is either the new protocol's first bytes or,
            # if the backend declines, the next request; held (one read at most, reading
            # paused) until the answer says which
            self.held = rest
            self.pause(_P_UPG)
            if self.cur is None and self.queue:
                self._start(self.queue[0])
            return
        # an offer halb does not carry (h2c, HTTP/1.0): served as plain HTTP/1.1 (Upgrade and
        # the Connection tokens are hop-by-hop and not forwarded), reading on
        if self.cur is None and self.queue:
            self._start(self.queue[0])
        if rest and not self.closed:
            self.data_received(rest)

    # -- parser callbacks (request) -------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.synth:
            return
        self.in_head = True
        self.url = b""
        self.hdrs = []
        self.hbytes = 0
        self.raw_head = 0
        if self.alog is not None:
            self.t_begin = _clock()

    def on_url(self, url: bytes) -> None:
        if self.synth:
            return
        self.url += url
        if len(self.url) > self.s.max_line:
            raise HttpError(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.synth:
            return
        hs = self.hdrs
        if hs is None:  # trailers (the head's list went to its Request)
            hs = self.hdrs = []
        hs.append((name, value))
        self.hbytes += len(name) + len(value) + 4
        s = self.s
        if len(hs) > s.max_headers:
            raise HttpError(431, "too many header fields")
        if self.hbytes > s.max_header_bytes:
            raise HttpError(431, "header fields too large")

    def on_headers_complete(self) -> None:
        if self.synth:
            return
        self.in_head = False
        if len(self.queue) >= MAX_PIPELINE:
            raise HttpError(400, "too many pipelined requests")
        p = self.parser
        version = self.lver
        if version is None:
            version = p.get_http_version()
        else:
            self.lver = None
        url = self.url
        if self.raw_target is not None:
            url = self.raw_target
            self.raw_target = None
        req = check_request(p.get_method(), url, version, self.hdrs)
        self.hdrs = None
        keep = p.should_keep_alive() and b"close" not in req.conn_tokens
        rx = _Rx(req, keep)
        if self.alog is not None:
            rx.t0 = self.t_begin
            rx.th = _clock()
            self.t_begin = -1.0
        self.hbytes = 0
        self.queue.append(rx)
        if req.has_body:
            self.rx = rx
            self._arm("body", self.s.t_body)
            if p.should_upgrade():
                self.skip = rx  # llhttp will skip this body and stop (see _upgrade)
        else:
            self.rx = None
            self._cancel_timer()
        if len(self.queue) > 1:
            self.pause(_P_PIPE)

    def on_body(self, data: bytes) -> None:
        rx = self.queue[-1]
        if rx.complete:  # trailer section bytes never come here; defensive
            return
        now = _clock()
        self.deadline = now + self.s.t_body
        if rx.req.chunked:
            piece = b"%x\r\n%b\r\n" % (len(data), data)
        else:
            piece = data
        if rx.replay is not None:
            if rx.replay_bytes + len(piece) <= REPLAY_MAX:
                rx.replay.append(piece)
                rx.replay_bytes += len(piece)
            else:
                rx.replay = None
        if rx is self.cur and self.conn is not None:
            self.conn.last = now
            self.up.append(piece)  # written once this read is parsed (see data_received)
        else:
            rx.body.append(piece)
            rx.buffered += len(piece)
            if rx.buffered > HIGH_WATER:
                self.pause(_P_BUF)

    def on_message_complete(self) -> None:
        rx = self.queue[-1] if self.queue else None
        if rx is None or rx is self.skip:
            return
        rx.complete = True
        if rx.req.chunked:
            last = b"0\r\n\r\n"
            if self.hdrs:  # trailers: forwarded, less those that must not be trailers
                last = b"0\r\n" + trailer_lines(self.hdrs) + b"\r\n"
            if rx.replay is not None:
                rx.replay.append(last)
            if rx is self.cur and self.conn is not None:
                self.up.append(last)
            else:
                rx.body.append(last)
        self.hdrs = []
        if rx is self.cur and self.conn is not None:
            self.sent_all = True
        if self.rx is rx:
            self.rx = None
            self._cancel_timer()

    # -- timers ---------------------------------------------------------------------------

    def _arm(self, kind: str, timeout: float) -> None:
        self.tkind = kind
        self.deadline = _clock() + timeout

    def _cancel_timer(self) -> None:
        self.tkind = ""

    def _cancel_timers(self) -> None:
        self.tkind = ""
        if self.wtimer is not None:
            self.wtimer.cancel()
            self.wtimer = None

    def _timeout(self, kind: str) -> None:
        """The listener's sweep found this connection's deadline passed."""
        if self.closed:
            self.tkind = ""
            return
        if kind == "idle":
            self.tkind = ""
            self.close()
            return
        if kind == "tunnel":
            self.tkind = ""
            log.debug("tunnel_timeout", listener=self.l.name, client=self.client_ip)
            self.tun_end("timeout")
            return
        if self.paused & ~_P_DONE:  # we stopped reading, not the client: wait on
            self._arm(kind, self.s.t_header if kind == "head" else self.s.t_body)
            return
        self.tkind = ""
        if kind == "body":
            self._refuse(HttpError(408, "request body timeout"))
        elif self.in_head:
            self._refuse(HttpError(408, "request header timeout"))
        elif self.cur is None and not self.queue:
            self.close()

    # -- reading control ------------------------------------------------------------------

    def pause(self, why: int) -> None:
        if not self.paused and self.tr is not None and not self.closed:
            self.tr.pause_reading()
        self.paused |= why

    def resume(self, why: int) -> None:
        if not self.paused & why:
            return
        self.paused &= ~why
        if not self.paused and self.tr is not None and not self.closed:
            self.tr.resume_reading()

    # -- refusing and closing -------------------------------------------------------------

    def _refuse(self, err: HttpError) -> None:
        """A bad request (or a timeout): answer it and close, without disturbing the exchange
        in flight unless the bad bytes belong to it; complete requests parsed before the bad
        one are served first."""
        log.debug("request_refused", listener=self.l.name, client=self.client_ip,
                  status=err.status, reason=err.reason)
        self.in_head = False
        self.rx = None
        cur = self.cur
        if cur is not None and not cur.complete:
            # the request under way is broken: its backend connection cannot be trusted
            if self.connecting is not None:
                self.connecting.cancel()
                self.connecting = None
            if self.conn is not None:
                bc = self.conn
                self.conn = None
                bc.cc = None
                bc.close()
            self._release(None, False)
            if self.resp_started:
                if self.alog is not None:
                    self._alog_x(cur, self.status, ("c" if err.status == 408 else "P") + "D")
                self.abort()
                return
            self.cur = None
            self.queue.clear()
            self._send_error(err, cur)
            return
        while self.queue and not self.queue[-1].complete and self.queue[-1] is not cur:
            self.queue.pop()  # the bad request itself, if its head had been parsed
        if self.queue:
            self.pending_error = err
            self.pause(_P_DONE)
            if self.cur is None:
                self._start(self.queue[0])
            return
        self._send_error(err)

    def _send_error(self, err: HttpError, rx: _Rx | None = None) -> None:
        """Answers a refused request and closes; ``rx``: the exchange it broke (its body was
        bad or late), None for a request that never became one."""
        self.paused |= _P_DONE
        self._cancel_timer()
        if self.tr is not None and not self.closed:
            resp = error_response(err.status, err.reason)
            if self.alog is not None:
                self._alog_refused(err.status, len(resp), rx)
            self.put(resp)
            self.close()

    def close(self) -> None:
        if self.tr is not None and not self.closed:
            if self.queued:
                self.send_now()  # what is queued goes first; tr.close() then flushes it
            self.closed = True
            self._cancel_timers()
            self.tr.close()

    def abort(self) -> None:
        if self.tr is not None and not self.tr.is_closing():
            self.closed = True
            self.tr.abort()
        elif self.tr is not None:
            self.tr.abort()

    def shutdown(self) -> None:
        """Listener stop: idle connections close now, busy ones after their answer."""
        if self.tunnel:
            self.tun_end("stopping")
        elif self.cur is None and not self.queue:
            self.close()
        else:
            self.resp_close = True
            self.pause(_P_DONE)

    # -- the exchange ---------------------------------------------------------------------

    def _start(self, rx: _Rx) -> None:
        self.cur = rx
        if self.out is None:  # idle connections never get these
            self.out = []
            self.up = []
        req = rx.req
        env = self.env
        router = self.l.router
        pool_name = router.route(req.host, req.path,
                                 req if router.needs_headers else None)  # Request.get: lazy
        pool = self.l.pools.get(pool_name)
        self.pool = pool
        self.tried = ()
        self.attempts = 0
        self.last_err = ""
        self.sticky_b = None
        self.cookie_val = ""
        self.hkey = None
        self.cst = None
        self.stale_retry = False
        self.t0 = -1.0  # (set when the request goes to a backend)
        self.nb = 0
        if self.alog is not None:
            self.t_start = _clock()
            self.t_resp = -1.0
            self.lterm = ""
        if pool is None:  # config validation makes this unreachable; stay safe
            self._answer_error(HttpError(503, f"no pool {pool_name!r}"), "SC")
            return
        cache = self.l.cache
        if cache is not None and (self.l.cache_pools is None or pool_name in self.l.cache_pools):
            if self._cache_request(cache, rx, pool_name):
                return  # answered from the cache
        mode = pool.sticky_mode
        if mode == "cookie":
            val = req.cookies().get(pool.sticky_cookie)
            self.cookie_val = val or ""
            if val:
                b = pool.by_name.get(val)
                # persistence outlives a drain (HAProxy: a draining server keeps its sticky
                # clients); only a backend that is down, ejected or full loses them
                if b is not None and b.is_up(env.clock.now()) and not b.is_full():
                    self.sticky_b = b
        elif mode == "source":
            e = env.tables.sticky.get(sticky_key("src", pool.name, self.client_ip))
            if e is not None and e.pool == pool.name:
                b = pool.by_name.get(e.backend)
                if b is not None and b.is_up(env.clock.now()) and not b.is_full():
                    self.sticky_b = b
        elif mode == "app_cookie" and pool.cfg.sticky.prefix:
            # prefix mode: the backend is named in the cookie itself (web1~abc), no table; the
            # application gets its own value back (abc) whatever becomes of the request
            hs, bname = strip_cookie_prefix(req.headers, pool.sticky_cookie)
            if hs is not None:
                req.headers = hs
                req._map = None
            self.cookie_val = bname
            b = pool.by_name.get(bname) if bname else None
            if b is not None and b.is_up(env.clock.now()) and not b.is_full():
                self.sticky_b = b
        elif mode == "app_cookie":
            # the application's own session cookie: its value was recorded (replicated) when
            # the backend set it
            val = req.cookies().get(pool.sticky_cookie)
            self.cookie_val = val or ""
            if val:
                e = env.tables.sticky.get(sticky_key("app", pool.name, val[:APP_COOKIE_MAX]))
                if e is not None and e.pool == pool.name:
                    b = pool.by_name.get(e.backend)
                    if b is not None and b.is_up(env.clock.now()) and not b.is_full():
                        self.sticky_b = b
        if pool._hashing:  # (the algorithm is one of HASH_ALGORITHMS)
            pc = pool.cfg
            from ..balance import hash_key_for
            cookies = req.cookies() if pc.hash_key.startswith("cookie:") else None
            headers = ({k: ", ".join(v) for k, v in req.header_map().items()}
                       if pc.hash_key.startswith("header:") else None)
            self.hkey = hash_key_for(pc, self.client_ip, headers, cookies)
        self._attempt()

    def _attempt(self) -> None:
        pool = self.pool
        if self.attempts == 0 and self.sticky_b is not None:
            b = self.sticky_b
        else:
            b = pool.pick(self.hkey, self.tried)
        if b is None:
            if not self.tried:
                self._answer_error(HttpError(503, f"no backend available in pool {pool.name}"),
                                   "SC")
            elif self.last_err == "timeout":
                self._answer_error(HttpError(504, "backend timed out"), self.lterm or "sH")
            elif self.last_err == "full":
                self._answer_error(HttpError(503, "every backend connection is full"), "sQ")
            else:
                self._answer_error(HttpError(502, "backend failed"), self.lterm or "SH")
            return
        self.b = b
        self.tried += (b,)
        self.attempts += 1
        bc = self.l.take_idle(b)
        if bc is not None:
            self._attach(bc, True)
        else:
            self.connecting = self.loop.create_task(self._connect(b))

    async def _connect(self, b) -> None:
        l = self.l
        err = ""
        bc = None
        try:
            pc = self.pool.cfg
            if getattr(pc, "proto", "http1") == "h2":  # a stream on an HTTP/2 connection
                mux = l.h2b
                if mux is None:
                    from .h2back import Mux
                    mux = l.h2b = Mux(l, BackendConn)
                bc = await mux.open_stream(b, pc, self.s.t_connect)
            else:
                _, bc = await asyncio.wait_for(
                    self.loop.create_connection(lambda: BackendConn(l, b), b.host, b.port),
                    self.s.t_connect)
        except asyncio.CancelledError:
            return
        except asyncio.TimeoutError:
            err = "timeout"
        except OSError as e:
            err = "connect"
            log.debug("backend_connect_failed", backend=b.name, error=str(e))
        except HttpError:  # an h2 pool whose every stream stayed taken (h2back.PoolFull)
            err = "full"
        self.connecting = None
        if self.closed or self.cur is None:
            if bc is not None:
                l.put_idle(bc)
            return
        if bc is None:
            self.last_err = err
            self.lterm = "sQ" if err == "full" else "sC" if err == "timeout" else "SC"
            if err != "full":  # (a busy backend is not a failing one: no passive failure)
                self._backend_error(b, err)
            if self.attempts <= self.pool.retries:
                self._attempt()
            else:
                self._answer_error(HttpError(504, "backend connect timeout") if err == "timeout"
                                   else HttpError(503, "every backend connection is full")
                                   if err == "full" else
                                   HttpError(502, "cannot connect to backend"), self.lterm)
            return
        self._attach(bc, False)

    def _backend_error(self, b, kind: str) -> None:
        now = self.env.clock.now()
        self.pool.report_result(b, False, now)
        record(self.s.bk, self.s.metrics, b, None, True)
        log.debug("backend_error", listener=self.l.name, pool=self.pool.name, backend=b.name,
                  error=kind)

    def _attach(self, bc: BackendConn, reused: bool) -> None:
        rx = self.cur
        b = self.b
        self.conn = bc
        bc.cc = self
        self.reused = reused
        self.resp_started = False
        self.resp_close = False
        self.sent_all = False
        self.status = 0
        bc.got_bytes = False
        req = rx.req
        bc.fr.start(req.method == b"HEAD", len(req.upgrade) > 0)  # the response head is due
        bc.close_delimited = False
        bc.doubtful = False
        if self.wpaused:  # the client still has not taken the previous answer
            bc.pause_reading()
        backend_acquire(b)
        self.acquired = True
        self.t0 = _clock()
        fwd = self.fwd
        if fwd is None and self.s.forwarded:
            fwd = self.fwd = [None, b""]  # this connection's forwarded headers, by Host
        lines = self.s.via11 if req.version == "1.1" else self.s.via10
        if self.cst is not None and self.cst.d.cond:  # revalidating a stored response
            lines = lines + self.cst.d.cond
            self.cst.t_req = _wall()
        head = request_head(req, self.client_ip, self.s.proto, self.s.forwarded,
                            "" if req.host else _authority(b.host, b.port), fwd, lines)
        bc.out.append(head)
        if rx.body:
            bc.out += rx.body
            rx.body = []
            rx.buffered = 0
            self.resume(_P_BUF)
        bc.queue()
        if rx.complete:
            self.sent_all = True
        bc.last = self.t0

    def _release(self, rt: float | None, error: bool) -> None:
        if self.acquired:
            self.acquired = False
            b = self.b
            backend_release(b, rt)
            record(self.s.bk, self.s.metrics, b, rt, error)

    # -- responses (called by BackendConn) ------------------------------------------------

    def resp_interim(self, status: int, rh: ResponseHead, minor: int) -> None:
        """A 1xx other than 101 (100 Continue, 103 Early Hints...): forwarded with its fields
        to an HTTP/1.1 client (an HTTP/1.0 one gets none, RFC 9110 15.2)."""
        if self.cur is not None and self.cur.req.version == "1.1" and not self.closed:
            head = rh.build(status, None, False, False, None, False,
                            self.s.via11 if minor == 1 else self.s.via10)
            self.nb += len(head)
            self.out.append(head)

    def resp_head(self, bc: BackendConn, status: int, rh: ResponseHead) -> tuple[bool, bool]:
        """Sends the response head on (its status line as the framer read it); returns
        (head only, close-delimited body)."""
        rx = self.cur
        req = rx.req
        b = self.b
        pool = self.pool
        self.status = status
        self.resp_started = True
        if status >= 500 and pool.on_5xx:
            pool.report_result(b, False, self.env.clock.now())
        elif b.consecutive_failures:
            pool.report_result(b, True, self.env.clock.now())
        head_only = req.method == b"HEAD" or status == 204 or status == 304
        close_delim = False  # the backend's body runs until it closes
        until_close = False  # ours to the client does (an HTTP/1.0 client cannot take chunks)
        if head_only:
            chunk = False
        elif rh.chunked or rh.content_length is None:
            close_delim = not rh.chunked
            chunk = req.version == "1.1"
            until_close = not chunk
        else:
            chunk = False
        close = (not rx.keep_alive or not rx.complete or self.eof or self.l.stopping
                 or until_close)
        self.resp_chunk = chunk
        self.resp_close = close
        set_cookie = None
        mode = pool.sticky_mode
        if mode != "none":
            self._sticky_response(mode, pool, b, rh)
            if mode == "cookie" and self.cookie_val != b.name:
                set_cookie = sticky_cookie(pool.sticky_cookie, b.name)
        if pool.resource:  # (False for every other algorithm: no header is looked at)
            self._record_load(pool, b, rh)
        if self.l.cache is not None and self._cache_response(status, rh, set_cookie):
            self.t_resp = bc.last
            return True, close_delim  # a 304 freshened the stored response, sent at the end
        if not self.closed:
            head = rh.build(status, None, chunk, close, set_cookie,
                            not close and req.version == "1.0",
                            self.s.via11 if bc.fr.minor == 1 else self.s.via10)
            self.nb += len(head)
            self.out.append(head)
        self.t_resp = bc.last  # (the time of this read)
        return head_only, close_delim

    def _record_load(self, pool, b, rh) -> None:
        """``algorithm = "resource"``: the response's ``endpoint-load-metrics`` header (an ORCA
        load report) tells ``b``'s load. A malformed one is ignored and counted."""
        v = orca_header(rh.parts[1:])
        if v is None:
            return
        res, rep = parse_orca(v)
        if res == "ok":
            u = utilization(rep, pool.cfg.resource.metrics)
            if u is None:
                res = "no_metric"
            else:
                pool.report_load(b, u, self.env.clock.now())
        pool.load_reports[res] += 1
        if res != "ok" and log.enabled():
            log.debug("load_report_ignored", pool=pool.name, backend=b.name, result=res,
                      value=v[:200].decode("latin-1"))

    def _sticky_response(self, mode: str, pool, b, rh) -> None:
        """What stickiness does with ``b``'s response head: the table modes record; prefix mode
        (no table) names ``b`` in the application cookie the response sets, if it sets it."""
        if mode != "app_cookie" or not pool.cfg.sticky.prefix:
            self._record_sticky(mode, pool, b, rh)
            return
        runs = prefix_set_cookie(rh.parts[1:], pool.sticky_cookie, b.name)
        if runs is None:
            return
        rh.parts = rh.parts[:1] + runs
        if rh.headers:  # (build lays the head out again from these: Connection named some)
            rh.headers = prefix_set_cookie_pairs(rh.headers, pool.sticky_cookie, b.name)

    def _record_sticky(self, mode: str, pool, b, rh=None) -> None:
        table = self.env.tables.sticky
        ttl = pool.cfg.sticky.ttl
        if mode == "app_cookie":
            self._record_app_cookie(table, ttl, pool, b, rh)
            return
        key = sticky_key("cookie" if mode == "cookie" else "src", pool.name,
                         b.name if mode == "cookie" else self.client_ip)
        e = table.get(key)
        if e is not None and e.backend == b.name and e.pool == pool.name:
            table.touch(key, ttl)
            return
        table.put(key, b.name, ttl, pool=pool.name, client=self.client_ip, listener=self.l.name)
        if log.enabled():
            log.debug("sticky_new", listener=self.l.name, key=key, pool=pool.name,
                      backend=b.name, client=self.client_ip)

    def _record_app_cookie(self, table, ttl: float, pool, b, rh) -> None:
        """app_cookie stickiness: a response that sets the application cookie records value ->
        backend (HAProxy's ``stick store-response res.cook(NAME)``); one that deletes it
        forgets the entry; a request that carried a recorded value keeps it alive."""
        val = app_cookie_set(rh, pool.sticky_cookie) if rh is not None else None
        if val is None:
            if self.cookie_val:
                key = sticky_key("app", pool.name, self.cookie_val[:APP_COOKIE_MAX])
                e = table.get(key)
                if e is not None and e.backend == b.name and e.pool == pool.name:
                    table.touch(key, ttl)
            return
        if val == "":
            if self.cookie_val:
                table.delete(sticky_key("app", pool.name, self.cookie_val[:APP_COOKIE_MAX]))
            return
        key = sticky_key("app", pool.name, val)
        e = table.get(key)
        if e is not None and e.backend == b.name and e.pool == pool.name:
            table.touch(key, ttl)
            return
        table.put(key, b.name, ttl, pool=pool.name, client=self.client_ip, listener=self.l.name)
        if log.enabled():
            log.debug("sticky_new", listener=self.l.name, key=key, pool=pool.name,
                      backend=b.name, client=self.client_ip)

    def resp_body(self, data: bytes) -> None:
        cst = self.cst
        if cst is not None and cst.body is not None:
            cst.size += len(data)
            if cst.size > cst.limit:
                cst.body = None  # too large to store: relayed only
            else:
                cst.body.append(data)
        if self.closed:
            return
        if self.resp_chunk:
            size = b"%x\r\n" % len(data)
            self.out += (size, data, b"\r\n")
            self.nb += len(size) + len(data) + 2
        else:
            self.out.append(data)
            self.nb += len(data)

    def resp_done(self, bc: BackendConn, reusable: bool) -> None:
        rx = self.cur
        self.conn = None
        # a GET or HEAD that carried a body never leaves its backend connection for another
        # request: a backend that ignores such a body would read it as the next request (CL.0)
        if reusable and self.sent_all and rx is not None and rx.complete and not self.closed \
                and not (rx.req.has_body and rx.req.method in _NO_BODY_METHODS):
            self.l.put_idle(bc)
        else:
            bc.close()
        rt = _clock() - self.t0
        self._release(rt, self.status >= 500)
        if self.closed:
            return
        cst = self.cst
        if cst is not None and (cst.body is not None or cst.fresh304) and rx is not None:
            if self._cache_done(rx):
                return
        if self.resp_chunk:
            tl = bc.fr.trailers
            last = b"0\r\n" + trailer_lines(None, tl) + b"\r\n" if tl else b"0\r\n\r\n"
            self.nb += len(last)
            self.put(last)
        if self.alog is not None and rx is not None:
            self._alog_x(rx, self.status, "--")
        self._next()

    def _next(self) -> None:
        """The exchange in flight is over: close, or go on with the next request."""
        rx = self.cur
        self.cur = None
        self.resume(_P_BACKEND)
        if self.queue and self.queue[0] is rx:
            del self.queue[0]
        if self.resp_close or rx is None or not rx.complete or self.eof or self.l.stopping:
            self.close()
            return
        if self.pending_error is not None and not self.queue:
            err = self.pending_error
            self.pending_error = None
            self._send_error(err)
            return
        if len(self.queue) <= 1:
            self.resume(_P_PIPE)
        if self.queue:
            self._start(self.queue[0])
        elif self.in_head:
            self._arm("head", self.s.t_header)
        elif self.rx is None and not self.closed:
            self._arm("idle", self.s.t_idle)
        if self.paused & _P_UPG and rx is not None and rx.req.upgrade:
            # the backend declined the upgrade (or none could answer): the bytes held after
            # the offer are the next request
            held = self.held
            self.held = None
            self.resume(_P_UPG)
            if held and not self.closed:
                self.data_received(held)

    def backend_failed(self, bc: BackendConn, kind: str) -> None:
        """The backend connection failed (closed, protocol error, timeout) mid-exchange."""
        if bc is not self.conn:
            return
        self.conn = None
        rx = self.cur
        b = self.b
        if self.closed or rx is None:
            self._release(None, False)
            return
        if self.resp_started:
            self._release(None, True)
            self._backend_error(b, kind)
            if self.queued:
                self.send_now()  # the part that came, then the break
            if self.alog is not None:
                self._alog_x(rx, self.status, ("s" if kind == "timeout" else
                                               "P" if kind == "protocol" else "S") + "D")
            self.abort()  # an answer is half sent: the client must see the break
            return
        replayable = (rx.req.method in IDEMPOTENT and rx.complete
                      and (not rx.req.has_body or rx.replay is not None))
        if kind == "closed" and self.reused and not bc.got_bytes and replayable \
                and not self.stale_retry:
            # a pooled keep-alive connection the backend had closed: once more, fresh
            self.stale_retry = True
            self._release(None, False)
            rx.body = list(rx.replay or ())
            self.connecting = self.loop.create_task(self._connect(b))
            return
        self.last_err = "timeout" if kind == "timeout" else "failed"
        # (the access log: the backend timed out, sent garbage, or closed before answering)
        self.lterm = "sH" if kind == "timeout" else "PH" if kind == "protocol" else "SH"
        self._release(None, True)
        self._backend_error(b, kind)
        if replayable and self.attempts <= self.pool.retries:
            rx.body = list(rx.replay or ())
            self._attempt()
            return
        self._answer_error(HttpError(504, "backend timed out") if kind == "timeout"
                           else HttpError(502, f"backend failed ({kind})"), self.lterm)

    def _answer_error(self, err: HttpError, term: str) -> None:
        """No backend could serve the request in flight: answer it; close if unsure. ``term``:
        the access log's termination state (halb.accesslog)."""
        log.debug("request_failed", listener=self.l.name, client=self.client_ip,
                  status=err.status, reason=err.reason,
                  pool=self.pool.name if self.pool else "")
        rx = self.cur
        if self.closed:
            return
        keep = rx is not None and rx.complete and rx.keep_alive and not self.eof \
            and self.pending_error is None and not self.l.stopping
        resp = error_response(err.status, err.reason, close=not keep)
        self.nb += len(resp)
        self.put(resp)
        self.resp_close = not keep
        if self.alog is not None and rx is not None:
            self._alog_x(rx, err.status, term)
        self._next()

    # -- the HTTP cache ([listeners.cache], halb.proxy.cache; only while it is on) ----------

    def _cache_request(self, cache, rx: _Rx, pool: str) -> bool:
        """Looks the request up; True when the cache answered it (the exchange is over). A
        failure inside the cache (a bug, odd input) makes the request a plain one: logged,
        never fatal to the connection."""
        req = rx.req
        if req.upgrade:  # an upgrade offer is the backend's to answer
            return False
        now = _wall()
        try:
            d = cache.request(req.method, req.host, req.target, req.headers, req.has_body,
                              now, pool)
        except Exception:  # noqa: BLE001
            log.exception("cache_failed", listener=self.l.name, when="lookup")
            return False
        if self.alog is not None:
            self.lcache = d.state
        if d.action != "hit":
            if d.action != "bypass":
                self.cst = _CacheX(cache, d, now)
            return False
        keep = rx.complete and rx.keep_alive and not self.eof and not self.l.stopping \
            and self.pending_error is None
        try:
            status, data = cache.respond(d, now, req.version, not keep,
                                         keep and req.version == "1.0",
                                         self.s.via11 if req.version == "1.1" else self.s.via10)
        except Exception:  # noqa: BLE001
            log.exception("cache_failed", listener=self.l.name, when="answer")
            return False
        self.status = status
        self.nb += len(data)
        self.put(data)
        self.resp_close = not keep
        if self.alog is not None:
            self._alog_x(rx, status, "--")
        self._next()
        return True

    def _cache_response(self, status: int, rh, set_cookie) -> bool:
        """A response head came for a request the cache looked at. Returns True when it is a
        304 that freshened the stored response (which then goes to the client instead)."""
        cst = self.cst
        req = self.cur.req
        if cst is None:
            if req.method not in _NO_BODY_METHODS and status < 400:
                self.l.cache.invalidate(req.host, req.target)  # RFC 9111 4.4
            return False
        try:
            return self._cache_head(cst, req, status, rh, set_cookie)
        except Exception:  # noqa: BLE001 - the response goes on uncached
            log.exception("cache_failed", listener=self.l.name, when="response")
            self.cst = None
            return False

    def _cache_head(self, cst: _CacheX, req, status: int, rh, set_cookie) -> bool:
        cache = cst.cache
        d = cst.d
        h = CacheHeaders.parse(b"".join(rh.parts[1:]),
                               rh.conn_tokens if rh.conn_extra else ())
        now = _wall()
        if d.action == "revalidate" and status == 304 and d.entry is not None:
            if not cache.freshen(d.entry, h, cst.t_req, now):
                cache.invalidate(req.host, req.target)  # now private or no-store: this
            cst.fresh304 = True                          # answer is the last from it
            cst.body = None
            return True
        if set_cookie is not None or not (rh.chunked or rh.content_length is not None):
            # halb's own sticky cookie is per client; a body that ends with the connection
            # cannot be told complete from cut short
            self.cst = None
            return False
        lifetime, why = cache.storable(d, status, h, now)
        if why:
            if d.action == "revalidate":  # the stored response is out of date, and no
                cache.invalidate(req.host, req.target)  # longer storable
            self.cst = None
            return False
        cst.status = status
        cst.reason = rh.sline.split(b" ", 2)[2].rstrip(b"\r\n") if rh.sline.count(b" ") >= 2 \
            else b"OK"
        cst.h = h
        cst.lifetime = lifetime
        cst.body = []
        cst.size = 0
        return False

    def _cache_done(self, rx: _Rx) -> bool:
        """The response the cache watched is complete: store it, or (after a 304 that
        freshened the entry) answer from the entry. True when the exchange was answered."""
        cst = self.cst
        self.cst = None
        cache = cst.cache
        d = cst.d
        if cst.fresh304:
            keep = rx.complete and rx.keep_alive and not self.eof and not self.l.stopping \
                and not self.resp_close
            d.action = "hit"
            d.not_modified = False
            status, data = cache.respond(d, _wall(), rx.req.version, not keep,
                                         keep and rx.req.version == "1.0",
                                         self.s.via11 if rx.req.version == "1.1" else self.s.via10)
            self.status = status
            self.nb += len(data)
            self.put(data)
            self.resp_close = not keep
            if self.alog is not None:
                self.lcache = "REVALIDATED"
                self._alog_x(rx, status, "--")
            self._next()
            return True
        if cst.h is not None:
            try:
                cache.store(d, cst.status, cst.reason, cst.h, b"".join(cst.body),
                            cst.lifetime, cst.t_req, _wall())
            except Exception:  # noqa: BLE001 - not stored; the client has its answer
                log.exception("cache_failed", listener=self.l.name, when="store")
        return False

    # -- tunnels (after a 101) ------------------------------------------------------------

    def resp_switch(self, bc: BackendConn, rest: bytes) -> None:
        """The backend accepted the upgrade offer (101): the 101 goes to the client, then the
        connection is a tunnel, bytes relayed both ways as they come (with backpressure:
        a full write buffer on one side pauses reading on the other), idle for at most the
        listener's ``timeouts.tunnel``. ``rest``: the new protocol's first bytes."""
        rx = self.cur
        b = self.b
        self.status = 101
        self.resp_started = True
        self.tunnel = True
        bc.tun = True
        rh = bc.rh
        extra = b"Connection: upgrade\r\nUpgrade: " + rh.upgrade + b"\r\n" + (
            self.s.via11 if bc.fr.minor == 1 else self.s.via10)
        if self.pool.sticky_mode != "none":
            self._sticky_response(self.pool.sticky_mode, self.pool, b, bc.rh)
        head = rh.build(101, None, False, False, None, False, extra)
        self.out.append(head)
        self.nb += len(head) + len(rest)
        self.t_resp = bc.last
        self.nup = 0
        if rest:
            self.out.append(rest)
        self.flush()
        rt = _clock() - self.t0
        # the exchange counts as a request now; the backend stays in use (leastconn) until
        # the tunnel ends (_release then)
        record(self.s.bk, self.s.metrics, b, rt, False)
        proto = rh.upgrade.split(b",")[0].strip().lower()
        self.env.metrics.tunnel_open(self.l.name,
                                      "websocket" if proto == b"websocket" else "other")
        log.debug("tunnel_open", listener=self.l.name, client=self.client_ip,
                  backend=b.name, upgrade=rh.upgrade.decode("latin-1"))
        held = self.held
        self.held = None
        if held:
            bc.out.append(held)
            bc.queue()
            self.nup += len(held)
        if rx is not None and self.queue and self.queue[0] is rx:
            del self.queue[0]
        self._arm("tunnel", self.s.t_tunnel)
        self.paused &= ~_P_PIPE
        self.resume(_P_UPG)

    def tun_up(self, data: bytes) -> None:
        """Client bytes in a tunnel."""
        bc = self.conn
        if bc is None or bc.closed:
            return
        bc.tr.write(data)
        self.nup += len(data)
        self.deadline = _clock() + self.s.t_tunnel

    def tun_down(self, data: bytes) -> None:
        """Backend bytes in a tunnel."""
        if self.closed:
            return
        if self.queued:
            self.send_now()  # the 101 and what came with it go first
        self.tr.write(data)
        self.nb += len(data)
        self.deadline = _clock() + self.s.t_tunnel

    def tun_eof(self, from_client: bool):
        """One side of a tunnel finished sending: the half-close is passed on (TCP); once
        both have, or where the other side cannot half-close (TLS), both close after what is
        buffered is written. The return value is ``eof_received``'s."""
        self.shut |= 1 if from_client else 2
        bc = self.conn
        if self.shut == 3 or bc is None or bc.closed:
            self.tun_end("closed")
            return False
        other = bc.tr if from_client else self.tr
        if self.queued and not from_client:
            self.send_now()
        if other.can_write_eof():
            other.write_eof()
            return True
        self.tun_end("closed")
        return False

    def tun_end(self, why: str) -> None:
        """The tunnel is over (closed, timeout, backend gone, listener stopping): both sides
        close once what is buffered is written."""
        if not self.tunnel:
            return
        bc = self.conn
        self.conn = None
        if bc is not None:
            bc.cc = None
            bc.close_soft()
        log.debug("tunnel_closed", listener=self.l.name, client=self.client_ip, reason=why)
        if self.alog is not None and self.cur is not None:
            self._alog_x(self.cur, 101, "cD" if why == "timeout" else "KD" if why == "stopping"
                         else "SD" if why == "backend reset" else "--")
        self.close()

    # -- the access log (halb.accesslog; called only while it is on) -----------------------

    def _alog_x(self, rx: _Rx, status: int, term: str) -> None:
        """The line of exchange ``rx`` (once), ending with ``status`` and ``term``."""
        if rx is self.lrx:
            return
        self.lrx = rx
        pool = self.pool
        b = self.b if self.attempts > 0 else None
        ck = "--"
        if pool is not None and pool.sticky_mode == "cookie":
            val = self.cookie_val
            ck = cookie_state("cookie", val, val in pool.by_name,
                              b is not None and self.sticky_b is b and self.attempts == 1,
                              b is not None and self.t_resp >= 0 and status != 101
                              and val != b.name)  # (as resp_head decides a Set-Cookie)
        req = rx.req
        self.alog.http(rx.t0, rx.th, self.t_start if b is not None else -1.0, self.t0,
                       self.t_resp, _clock(), self.client_ip, self.cport, self.l.name,
                       pool.name if pool is not None else "-",
                       b.name if b is not None else "-", status, self.nb,
                       self.nup if self.tunnel else -1, term, ck, req.method, req.target,
                       req.version, (self.attempts - 1 if self.attempts > 1 else 0)
                       + (1 if self.stale_retry else 0), len(self.l.conns),
                       b.active if b is not None else 0, self.lcache)
        self.lcache = "-"

    def _alog_refused(self, status: int, nbytes: int, rx: _Rx | None) -> None:
        """A refused request (400, 408, 413, 414, 431, 501): the exchange it broke, or a
        ``<BADREQ>`` line for one that never became an exchange."""
        who = "c" if status == 408 else "P"
        if rx is not None:
            self.nb += nbytes
            self._alog_x(rx, status, who + ("D" if self.t0 >= 0 else "R"))
            return
        now = _clock()
        t = self.t_begin if self.t_begin >= 0 else now
        self.t_begin = -1.0
        self.alog.http(t, -1.0, -1.0, -1.0, -1.0, now, self.client_ip, self.cport, self.l.name,
                       "-", "-", status, nbytes, -1, who + "R", "--", None, None, "", 0,
                       len(self.l.conns), 0)

    def _alog_lost(self, exc) -> None:
        """The client connection closed with an exchange in flight."""
        rx = self.cur
        if self.tunnel:
            term = (self.why or "C") + "D" if self.why or exc is not None else "--"
        else:
            term = (self.why or "C") + http_phase(
                True, self.attempts > 0 or self.connecting is not None, self.t0 >= 0,
                self.resp_started, rx.complete)
        self._alog_x(rx, self.status if self.resp_started else -1, term)
