"""L4 TCP listener: accept, pick a backend, connect (with redispatch), relay both ways.

The relay runs on event-loop reader/writer callbacks over raw non-blocking sockets, with no
task or stream per connection. Each readiness event moves bytes one of two ways:

* **copy**: ``recv_into`` a shared 32 KiB scratch buffer and ``send``; only bytes the peer
  could not take yet are kept per connection.
* **splice**: bytes move socket -> pipe -> socket inside the kernel (``os.splice``), never
  through Python. Pipes come from a small per-listener free list and are held by a direction
  only while it has bytes in flight, so an idle connection costs two sockets and no pipes.

``relay = "auto"`` (the default, like HAProxy's ``option splice-auto``) copies while the node
has CPU to spare and splices while it is busy (``halb.splicegate.SpliceGate``: the node's
ticker samples the process's CPU time four times a second); ``"splice"`` and ``"copy"`` fix the
method. A listener
whose sockets refuse splice(2) copies from then on.

Backpressure: when the destination cannot take more, the direction stops reading its source
(``remove_reader``) and waits for the destination to become writable (``add_writer``). Half
close: EOF from one side becomes ``shutdown(SHUT_WR)`` towards the other; the connection is
closed when both directions are done, on an error, or after ``timeouts.tunnel`` without a
byte in either direction.

Connecting: the pool picks (hash key from the client IP for hashing pools); a refused or
timed-out connect (``timeouts.connect``) is reported to the pool's passive checks and the
connection is redispatched to a backend not tried yet, at most ``retries`` times. With
``proxy_protocol = true`` a PROXY v2 header naming the client and the address it connected to
is written before the relay starts. ``limits.max_conns`` bounds open connections: at the bound
the listener stops accepting (new clients wait in the kernel's backlog) until one closes.

Every relayed connection is an entry of the flow table (``flow_key(listener, "tcp",
"ip:port")``), touched at most about once per second while active and deleted on close.
Pools with ``sticky.mode = "source"`` keep a client IP on its backend through the sticky
table (also honouring entries replicated from peers) while that backend is up.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from typing import TYPE_CHECKING

from .. import log as hlog
from ..accesslog_writer import for_listener
from ..balance import hash_key_for
from ..model import Pool
from ..tables import flow_key, sticky_key
from . import proxyproto
from .sockets import format_addr, listen_tcp, raise_nofile
from ..log import RateLimitedLog
from .l4stats import l4_counters

if TYPE_CHECKING:  # pragma: no cover
    from ..config import ListenerConfig
    from ..model import Backend
    from . import ListenerEnv

_log = hlog.get_logger("tcp")

HAVE_SPLICE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")
SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if HAVE_SPLICE else 0
PIPE_SIZE = 1 << 18  # bytes a direction may hold in flight (F_SETPIPE_SZ)
COPY_BUF = 1 << 15  # measured on loopback: 16 and 32 KiB relay faster and cheaper than 256 KiB,
#                    and 64 KiB spent twice the CPU per byte (softirq work landed on our core)
BURST = 8  # read/write rounds per readiness event before yielding to other connections
ACCEPT_BURST = 64
MAX_FREE_PIPES = 256
STOP_GRACE = 2.0  # seconds stop() lets open connections finish before closing them
_ACCEPT_PAUSE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# splice(2) refused by these sockets (EINVAL), the kernel (ENOSYS, EOPNOTSUPP) or a sandbox's
# system call filter (EPERM): the listener copies from then on. Under relay = "auto" this first
# shows when the node gets busy, so it must not cost the connection.
_NO_SPLICE_ERRNOS = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM}


# ---------------------------------------------------------------------------------------------
# Shared helpers


class PipePool:
    """A free list of non-blocking pipe pairs of ``size`` bytes; only empty pipes go back."""

    def __init__(self, size: int = PIPE_SIZE, keep: int = MAX_FREE_PIPES):
        self.size = size
        self.keep = keep
        self.free: list[tuple[int, int]] = []
        self.created = 0

    def get(self) -> tuple[int, int]:
        if self.free:
            return self.free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            import fcntl

            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.size)
        except (OSError, AttributeError):  # keep the default size (64 KiB)
            pass
        self.created += 1
        return r, w

    def put(self, p: tuple[int, int]) -> None:
        if len(self.free) < self.keep:
            self.free.append(p)
        else:
            os.close(p[0])
            os.close(p[1])

    @staticmethod
    def discard(p: tuple[int, int]) -> None:
        os.close(p[0])
        os.close(p[1])

    def close(self) -> None:
        for p in self.free:
            self.discard(p)
        self.free.clear()


# ---------------------------------------------------------------------------------------------
# Relay directions


class _Fixed:
    """The gate of a listener whose relay method is set: ``relay = "splice"`` or ``"copy"``."""

    __slots__ = ("splice",)

    def __init__(self, splice: bool):
        self.splice = splice


class _Dir:
    """One direction (src -> dst) of a relay.

    Each readiness event moves bytes by splice (socket -> pipe -> socket in the kernel) or by
    copy (``recv_into`` a shared scratch buffer, then ``send``), as the listener's gate says at
    that moment. The method only changes between events, when nothing is in flight: a
    direction that could not hand all its bytes on waits for ``dst`` to become writable
    (bytes in its pipe, ``pending``, or in ``left``) and reads nothing until they are gone.
    """

    __slots__ = ("conn", "src", "dst", "sfd", "dfd", "pipe", "pending", "left", "done",
                 "nbytes", "rd")

    def __init__(self, conn: "_Conn", src: socket.socket, dst: socket.socket):
        self.conn = conn
        self.src, self.dst = src, dst
        self.sfd, self.dfd = src.fileno(), dst.fileno()
        self.pipe: tuple[int, int] | None = None
        self.pending = 0
        self.left = b""
        self.done = False
        self.nbytes = 0
        self.rd = self.on_readable  # made once: idle connections are many, stalls are few

    def on_readable(self) -> None:
        conn = self.conn
        if conn.lst.gate.splice:
            self._splice(conn)
        else:
            self._copy(conn)

    def _splice(self, conn: "_Conn") -> None:
        pipes = conn.lst.pipes
        pipe = self.pipe
        if pipe is None:
            pipe = self.pipe = pipes.get()
        splice = os.splice
        for _ in range(BURST):
            try:
                n = splice(self.sfd, pipe[1], PIPE_SIZE, flags=SPLICE_FLAGS)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in _NO_SPLICE_ERRNOS:  # splice refused here: the pipe is empty
                    self.pipe = None
                    pipes.put(pipe)
                    conn.lst.splice_failed(e)
                    self._copy(conn)
                    return
                conn.abort(e, self.src)
                return
            if n == 0:
                self.eof()
                return
            self.nbytes += n
            try:
                m = splice(pipe[0], self.dfd, n, flags=SPLICE_FLAGS)
            except BlockingIOError:
                m = 0
            except OSError as e:
                conn.abort(e, self.dst)
                return
            if m < n:
                self.pending = n - m
                self._stall(conn)
                return
            if n < PIPE_SIZE:  # the socket is most likely drained: skip the EAGAIN round
                break
        self.pipe = None
        pipes.put(pipe)

    def _copy(self, conn: "_Conn") -> None:
        lst = conn.lst
        buf = lst.scratch
        mv = lst.scratch_mv
        recv_into = self.src.recv_into
        send = self.dst.send
        for _ in range(BURST):
            try:
                n = recv_into(buf)
            except BlockingIOError:
                return
            except OSError as e:
                conn.abort(e, self.src)
                return
            if n == 0:
                self.eof()
                return
            self.nbytes += n
            try:
                m = send(mv[:n])
            except BlockingIOError:
                m = 0
            except OSError as e:
                conn.abort(e, self.dst)
                return
            if m < n:
                self.left = bytes(mv[m:n])
                self._stall(conn)
                return
            if n < COPY_BUF:  # drained, most likely
                return

    def _stall(self, conn: "_Conn") -> None:
        loop = conn.loop
        loop.remove_reader(self.sfd)
        loop.add_writer(self.dfd, self.on_writable)

    def on_writable(self) -> None:
        conn = self.conn
        try:
            if self.pending:
                m = os.splice(self.pipe[0], self.dfd, self.pending, flags=SPLICE_FLAGS)
                self.pending -= m
                if self.pending:
                    return
                conn.lst.pipes.put(self.pipe)
                self.pipe = None
            else:
                m = self.dst.send(self.left)
                self.left = self.left[m:]
                if self.left:
                    return
        except BlockingIOError:
            return
        except OSError as e:
            conn.abort(e, self.dst)
            return
        loop = conn.loop
        loop.remove_writer(self.dfd)
        loop.add_reader(self.sfd, self.rd)

    def eof(self) -> None:
        conn = self.conn
        conn.loop.remove_reader(self.sfd)
        if self.pipe is not None:
            conn.lst.pipes.put(self.pipe)  # empty: EOF is only read with nothing pending
            self.pipe = None
        self.done = True
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.dir_done()

    def release(self) -> None:
        if self.pipe is not None:
            PipePool.discard(self.pipe)  # may still hold bytes
            self.pipe = None
        self.left = b""
        self.rd = self.conn = None  # break reference cycles: freed at once, not by the GC


# ---------------------------------------------------------------------------------------------
# One client connection

CONNECTING, PREAMBLE, RELAY, CLOSED = range(4)
_NONE: frozenset = frozenset()


class _Conn:
    __slots__ = ("lst", "loop", "cs", "caddr", "client", "bs", "backend", "tried", "attempts",
                 "timer", "t0", "rt", "state", "up", "down", "last", "seen", "key", "preamble",
                 "alog", "ta", "tf", "why")

    def __init__(self, lst: "TcpListener", cs: socket.socket, caddr: tuple):
        # the access log (one line at close), if on for the node and this listener
        self.alog = lst.alog if lst.cfg.access_log else None
        self.ta = lst.env.clock.now() if self.alog is not None else -1.0  # accepted
        self.tf = -1.0  # first connect attempt
        self.why = ""  # termination state when not a normal end (halb.accesslog)
        self.lst = lst
        self.loop = lst.loop
        self.cs = cs
        self.caddr = caddr
        self.client = format_addr(caddr)
        self.bs: socket.socket | None = None
        self.backend: "Backend | None" = None
        self.tried: set | None = None  # backends whose connect failed (made on first failure)
        self.attempts = 0
        self.timer: asyncio.TimerHandle | None = None
        self.t0 = 0.0
        self.rt: float | None = None
        self.state = CONNECTING
        self.up = self.down = None  # directions client->backend, backend->client
        self.last = 0.0
        self.seen = 0
        self.key = ""
        self.preamble = b""

    # -- choosing and connecting ---------------------------------------------------------------

    def _choose(self) -> "Backend | None":
        lst = self.lst
        pool = lst.pool
        if self.attempts == 0 and lst.sticky_src:
            e = lst.env.tables.sticky.get(sticky_key("src", pool.name, self.caddr[0]))
            if e is not None and e.pool == pool.name:
                b = pool.by_name.get(e.backend)
                if b is not None and b.is_up(lst.env.clock.now()) and not b.is_full():
                    return b
        key = hash_key_for(pool.cfg, self.caddr[0]) if lst.hashing else None
        return pool.pick(key, exclude=self.tried or _NONE)

    def connect_next(self) -> None:
        lst = self.lst
        while self.attempts <= lst.retries:
            b = self._choose()
            if b is None:
                break
            self.attempts += 1
            if self.attempts > 1:
                lst.event("redispatched")
            self.backend = b
            Pool.acquire(b)
            try:
                bs = socket.socket(lst.family_of(b), socket.SOCK_STREAM)
            except OSError as e:
                Pool.release(b)
                self.backend = None
                lst.rlog.warning("backend_socket_failed", error=str(e))
                self.why = "RC"  # out of sockets (the access log's resource state)
                break
            bs.setblocking(False)
            bs.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.bs = bs
            self.t0 = lst.env.clock.now()
            if self.tf < 0:
                self.tf = self.t0
            err = bs.connect_ex(lst.sockaddr_of(b))
            if err in (0, errno.EINPROGRESS):
                self.loop.add_writer(bs.fileno(), self.on_connected)
                self.timer = self.loop.call_later(lst.connect_timeout, self.on_connect_timeout)
                return
            self._failed(os.strerror(err))
        lst.event("no_backend")
        lst.rlog.warning("no_backend", key=lst.name, listener=lst.name, pool=lst.pool.name,
                         client=self.client, tried=[b.name for b in self.tried or ()])
        if not self.why:  # (a last connect timeout set "sC")
            self.why = "SC"
        self.close()

    def on_connected(self) -> None:
        bs = self.bs
        self.loop.remove_writer(bs.fileno())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        err = bs.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._failed(os.strerror(err))
            self.connect_next()
            return
        self._established()

    def on_connect_timeout(self) -> None:
        self.timer = None
        if self.state != CONNECTING or self.bs is None:
            return
        self.loop.remove_writer(self.bs.fileno())
        self._failed("connect timeout")
        self.connect_next()

    def _failed(self, reason: str) -> None:
        """The connect to ``self.backend`` failed: account for it and forget the socket."""
        lst = self.lst
        b = self.backend
        if self.bs is not None:
            self.bs.close()
            self.bs = None
        self.backend = None
        if self.tried is None:
            self.tried = set()
        self.tried.add(b)
        Pool.release(b)
        lst.pool.report_result(b, False, lst.env.clock.now())
        lst.env.metrics.observe(b, None, True)
        lst.event("connect_failed")
        lst.rlog.warning("backend_connect_failed", key=b.name, listener=lst.name,
                         pool=lst.pool.name, backend=b.name, reason=reason)
        self.why = "sC" if reason == "connect timeout" else "SC"  # if no other one serves

    def _established(self) -> None:
        lst = self.lst
        b = self.backend
        now = lst.env.clock.now()
        self.rt = now - self.t0
        self.last = now
        self.why = ""  # (an earlier attempt's failure is not how this one ends)
        lst.pool.report_result(b, True, now)
        env = lst.env
        if lst.sticky_src:
            env.tables.sticky.put(sticky_key("src", lst.pool.name, self.caddr[0]), b.name,
                                  lst.pool.cfg.sticky.ttl, pool=lst.pool.name)
        self.key = flow_key(lst.name, "tcp", self.client)
        env.tables.flow.put(self.key, b.name, lst.tunnel, pool=lst.pool.name,
                            client=self.client, listener=lst.name, proto="tcp")
        if lst.cfg.proxy_protocol:
            try:
                dst = self.cs.getsockname()
                self.preamble = proxyproto.encode_v2(self.caddr[:2], dst[:2])
            except (OSError, ValueError):
                self.preamble = proxyproto.encode_v2(None, None, local=True)
            self.state = PREAMBLE
            self.on_preamble_writable()
            return
        self._relay()

    def on_preamble_writable(self) -> None:
        try:
            n = self.bs.send(self.preamble)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self.abort(e)
            return
        self.preamble = self.preamble[n:]
        if self.preamble:  # rare: a fresh socket's buffer takes a PROXY header at once
            self.loop.add_writer(self.bs.fileno(), self.on_preamble_writable)
            return
        self.loop.remove_writer(self.bs.fileno())
        self._relay()

    def _relay(self) -> None:
        self.state = RELAY
        self.up = _Dir(self, self.cs, self.bs)
        self.down = _Dir(self, self.bs, self.cs)
        self.loop.add_reader(self.up.sfd, self.up.rd)
        self.loop.add_reader(self.down.sfd, self.down.rd)

    # -- ending ---------------------------------------------------------------------------------

    def dir_done(self) -> None:
        if self.up.done and self.down.done:
            self.close()

    def abort(self, exc: BaseException | None = None, sock: socket.socket | None = None) -> None:
        """A relay error on ``sock`` (the client's or the backend's socket)."""
        if exc is not None and getattr(exc, "errno", None) not in (errno.ECONNRESET, errno.EPIPE):
            _log.debug("relay_error", listener=self.lst.name, client=self.client, error=str(exc))
        if not self.why:
            self.why = "CD" if sock is self.cs else "SD"
        self.close()

    def close(self) -> None:
        if self.state == CLOSED:
            return
        if self.alog is not None:
            self._alog()
        self.state = CLOSED
        lst = self.lst
        loop = self.loop
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for s in (self.cs, self.bs):
            if s is not None:
                fd = s.fileno()
                if fd >= 0:
                    loop.remove_reader(fd)
                    loop.remove_writer(fd)
        for d in (self.up, self.down):
            if d is not None:
                d.release()
        self.cs.close()
        if self.bs is not None:
            self.bs.close()
        b = self.backend
        if b is not None:
            Pool.release(b, self.rt)
            lst.env.metrics.observe(b, self.rt, False)
        if self.key:
            lst.env.tables.flow.delete(self.key)
        if self.up is not None:
            lst.nbytes_in += self.up.nbytes  # pushed to the counters once per sweep
            lst.nbytes_out += self.down.nbytes
        lst.closed(self)

    def _alog(self) -> None:
        """The connection's access log line (halb.accesslog), made as it closes."""
        lst = self.lst
        b = self.backend
        up = self.up
        self.alog.tcp(self.ta, self.tf, self.t0 + self.rt if self.rt is not None else -1.0,
                      lst.env.clock.now(), self.client, lst.name, lst.pool.name,
                      b.name if b is not None else "-", up.nbytes if up is not None else 0,
                      self.down.nbytes if up is not None else 0, self.why or "--",
                      self.attempts - 1 if self.attempts > 1 else 0, len(lst.conns),
                      b.active if b is not None else 0)


# ---------------------------------------------------------------------------------------------
# The listener


class TcpListener:
    def __init__(self, cfg: "ListenerConfig", env: "ListenerEnv"):
        self.cfg = cfg
        self.env = env
        self.name = cfg.name
        self.pool: Pool = env.pools[cfg.pool]
        self.retries = self.pool.cfg.retries
        self.hashing = hash_key_for(self.pool.cfg, "0.0.0.0") is not None
        self.sticky_src = self.pool.cfg.sticky.mode == "source"
        self.connect_timeout = cfg.timeouts.connect
        self.tunnel = cfg.timeouts.tunnel
        self.max_conns = cfg.limits.max_conns
        self.relay = cfg.relay if HAVE_SPLICE else "copy"
        if self.relay == "auto":
            # one per node: it follows the process's CPU (none given: copy, as when idle)
            self.gate = env.splice_gate if env.splice_gate is not None else _Fixed(False)
        else:
            self.gate = _Fixed(self.relay == "splice")
        self.pipes = PipePool()
        self.scratch = bytearray(COPY_BUF)
        self.scratch_mv = memoryview(self.scratch)
        self.conns: set[_Conn] = set()
        self.sock: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.paused = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._resume: asyncio.TimerHandle | None = None
        self._addrs: dict = {}
        self.rlog = RateLimitedLog(_log)
        events, nbytes = l4_counters(env.metrics.registry)
        self._events = events
        self._ev_children: dict[str, object] = {}
        self.bytes_in = nbytes.labels(self.name, "in")
        self.bytes_out = nbytes.labels(self.name, "out")
        self.nbytes_in = self.nbytes_out = 0
        self.sweep_interval = min(1.0, max(0.05, self.tunnel / 4))
        self.handover: socket.socket | None = None  # a listening socket taken over (reload)
        self.alog = for_listener(env, True)  # the node's access log, or None (off)

    def refresh_pool(self) -> None:
        """The pool's config changed (reload): the facts cached from it, again."""
        self.retries = self.pool.cfg.retries
        self.hashing = hash_key_for(self.pool.cfg, "0.0.0.0") is not None
        self.sticky_src = self.pool.cfg.sticky.mode == "source"
        if self.loop is not None:
            self.loop.create_task(self._resolve_all())

    def reconfigure(self, cfg: "ListenerConfig") -> None:
        """A reload changed this listener's settings (same bind): applied in place; the socket
        and the open connections stay."""
        self.cfg = cfg
        self.pool = self.env.pools[cfg.pool]
        self.connect_timeout = cfg.timeouts.connect
        self.tunnel = cfg.timeouts.tunnel
        self.max_conns = cfg.limits.max_conns
        raise_nofile(2 * self.max_conns + 1024)
        self.relay = cfg.relay if HAVE_SPLICE else "copy"
        self.gate = self.env.splice_gate if self.relay == "auto" and self.env.splice_gate is not None \
            else _Fixed(self.relay == "splice")
        self.sweep_interval = min(1.0, max(0.05, self.tunnel / 4))
        self.refresh_pool()

    async def _resolve_all(self) -> None:
        for b in list(self.pool.backends):
            if b not in self._addrs:
                await self._resolve(b)

    def take_socket(self) -> socket.socket:
        """A duplicate of the listening socket, for the listener that replaces this one."""
        return self.sock.dup()

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = loop = asyncio.get_running_loop()
        raise_nofile(2 * self.max_conns + 1024)
        for b in self.pool.backends:
            await self._resolve(b)
        self.sock = self.handover or listen_tcp(self.cfg.bind.host, self.cfg.bind.port)
        self.handover = None
        loop.add_reader(self.sock.fileno(), self._on_accept)
        self._sweeper = loop.call_later(self.sweep_interval, self._sweep)
        _log.info("listener_started", listener=self.name, bind=str(self.cfg.bind), mode="tcp",
                  pool=self.pool.name, relay=self.relay)

    async def _resolve(self, b: "Backend") -> None:
        try:
            infos = await self.loop.getaddrinfo(b.host, b.port, type=socket.SOCK_STREAM)
            fam, _, _, _, sa = infos[0]
            self._addrs[b] = (fam, sa)
        except (OSError, IndexError) as e:
            _log.warning("backend_resolve_failed", pool=self.pool.name, backend=b.name,
                         host=b.host, error=str(e))

    def family_of(self, b: "Backend") -> int:
        a = self._addrs.get(b)
        if a is not None:
            return a[0]
        return socket.AF_INET6 if ":" in b.host else socket.AF_INET

    def sockaddr_of(self, b: "Backend") -> tuple:
        a = self._addrs.get(b)
        return a[1] if a is not None else (b.host, b.port)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stops accepting; open connections get up to ``grace`` seconds to finish (an
        upgrade's old process: its drain deadline), then they are closed."""
        loop = self.loop
        if loop is None:
            return
        if self.sock is not None:
            if not self.paused:
                loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        for h in (self._sweeper, self._resume):
            if h is not None:
                h.cancel()
        deadline = time.monotonic() + max(grace, STOP_GRACE)
        while self.conns and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for c in list(self.conns):
            c.why = c.why or "KD"  # (the access log: killed by the stop)
            c.close()
        self._flush_counters()
        self.pipes.close()
        _log.info("listener_stopped", listener=self.name)

    # -- accepting ------------------------------------------------------------------------------

    def _on_accept(self) -> None:
        sock = self.sock
        if sock is None:
            return
        metrics = self.env.metrics
        for _ in range(ACCEPT_BURST):
            if len(self.conns) >= self.max_conns:
                self._pause("max_conns")
                return
            try:
                cs, caddr = sock.accept()
            except BlockingIOError:
                return
            except (ConnectionAbortedError, InterruptedError):
                continue
            except OSError as e:
                if e.errno in _ACCEPT_PAUSE_ERRNOS:
                    self.rlog.warning("accept_failed", key=self.name, listener=self.name,
                                      error=str(e))
                    self._pause("accept_error", 0.1)
                    return
                _log.exception("accept_failed", listener=self.name)
                self._pause("accept_error", 0.1)
                return
            cs.setblocking(False)
            try:
                cs.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            conn = _Conn(self, cs, caddr)
            self.conns.add(conn)
            metrics.conn_open(self.name)
            conn.connect_next()

    def _pause(self, why: str, retry: float | None = None) -> None:
        if self.paused or self.sock is None:
            return
        self.paused = True
        self.loop.remove_reader(self.sock.fileno())
        self.event(why)
        if why == "max_conns":
            self.rlog.warning("max_conns_reached", key=self.name, listener=self.name,
                              max_conns=self.max_conns)
        if retry is not None:
            self._resume = self.loop.call_later(retry, self._unpause)

    def _unpause(self) -> None:
        self._resume = None
        if self.paused and self.sock is not None:
            self.paused = False
            self.loop.add_reader(self.sock.fileno(), self._on_accept)

    def closed(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        self.env.metrics.conn_close(self.name)
        if self.paused and self._resume is None and len(self.conns) < self.max_conns:
            self._unpause()

    # -- housekeeping ---------------------------------------------------------------------------

    def event(self, name: str) -> None:
        c = self._ev_children.get(name)
        if c is None:
            c = self._ev_children[name] = self._events.labels(self.name, name)
        c.inc()

    def splice_failed(self, exc: OSError) -> None:
        """splice(2) refused these sockets: this listener copies from now on."""
        self.relay = "copy"
        self.gate = _Fixed(False)
        self.event("splice_unavailable")
        _log.warning("splice_unavailable", listener=self.name, error=str(exc))

    def _sweep(self) -> None:
        """Idle timeout and flow-table touches, once per sweep interval (at most 1 s)."""
        now = self.env.clock.now()
        flow = self.env.tables.flow
        tunnel = self.tunnel
        try:
            for c in list(self.conns):
                if c.state != RELAY:
                    if c.state == PREAMBLE and now - c.last >= self.connect_timeout:
                        c.why = "sC"
                        c.close()  # the backend never took the PROXY header
                    continue
                n = c.up.nbytes + c.down.nbytes
                if n != c.seen:
                    c.seen = n
                    c.last = now
                    if flow.touch(c.key, tunnel) is None:  # expired in the table meanwhile
                        flow.put(c.key, c.backend.name, tunnel, pool=self.pool.name,
                                 client=c.client, listener=self.name, proto="tcp")
                elif now - c.last >= tunnel:
                    self.event("idle_timeout")
                    _log.debug("idle_timeout", listener=self.name, client=c.client)
                    c.why = "cD"
                    c.close()
        except Exception:  # never let housekeeping die
            _log.exception("sweep_failed", listener=self.name)
        self._flush_counters()
        self._sweeper = self.loop.call_later(self.sweep_interval, self._sweep)

    def _flush_counters(self) -> None:
        if self.nbytes_in:
            self.bytes_in.inc(self.nbytes_in)
            self.nbytes_in = 0
        if self.nbytes_out:
            self.bytes_out.inc(self.nbytes_out)
            self.nbytes_out = 0

    # -- introspection (tests, control) ---------------------------------------------------------

    @property
    def address(self) -> tuple | None:
        return self.sock.getsockname() if self.sock is not None else None

    def stats(self) -> dict:
        return {"conns": len(self.conns), "paused": self.paused,
                "relay": self.relay, "splicing": self.gate.splice,
                "pipes_created": self.pipes.created, "pipes_free": len(self.pipes.free)}
