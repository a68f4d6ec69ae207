"""The node's access log (``[access_log]``): the listeners' calls, a bounded buffer, and a
thread that writes it out.

The event loop only formats a line (``halb.accesslog``, pure) and appends it to a bounded
deque: it never waits for a disk, a pipe or a socket. A background thread drains the deque
every ``FLUSH_INTERVAL`` (100 ms), or as soon as ``FLUSH_AT`` lines wait, and writes them:

- ``stderr`` / ``stdout``: the stream's file descriptor, in writes of at most ``PIPE_BUF``
  bytes cut at line ends (so that halb's own JSON log lines on the same stream never land in
  the middle of an access log line);
- ``file:/PATH``: opened ``O_APPEND`` (mode 0640) when the node starts (a path that cannot be
  opened stops the start, naming it), one write per batch; ``reopen()`` (SIGUSR1, for
  logrotate) makes the thread open the path anew, then close the old descriptor;
- ``syslog`` (``/dev/log``, unix datagrams) or ``syslog:HOST:PORT`` (UDP): one RFC 5424
  message per line, ``<PRI>1 TIMESTAMP HOSTNAME halb PROCID access - LINE``, the facility from
  ``facility`` (``local0``), severity info. A socket that cannot be reached is tried again at
  the next batch.

If the thread cannot keep up or is stuck (a full disk, a FIFO nobody reads, a syslog socket
that blocks), the deque fills to ``buffer`` lines (16,384) and further lines are dropped and
counted (``halb_access_log_dropped_total``, which also counts lines whose write failed); lines
written are counted in ``halb_access_log_lines_total``. Lines are at most
``accesslog.LINE_MAX`` characters, so the buffer is bounded in bytes as well.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from . import log as hlog
from .accesslog import (BADREQ, FACILITIES, LINE_MAX, SEVERITY_INFO, Formatter, Sampler,
                        client_addr, escape, http_timers, request_line, tcp_timers)

if TYPE_CHECKING:  # pragma: no cover
    from .config import AccessLogConfig

_log = hlog.get_logger("access_log")

FLUSH_AT = 2_048  # lines waiting that wake the writer before its interval
FLUSH_INTERVAL = 0.1  # seconds
STOP_WAIT = 2.0  # seconds stop() waits for the writer to write what is left
PIPE_BUF = 4096  # bytes one write to a pipe may carry without interleaving with others


# ---------------------------------------------------------------------------------------------
# Destinations (used by the writer thread only, but for open() at start)


class StreamSink:
    """stderr or stdout, by file descriptor (looked up at open: halbd moves its stderr)."""

    def __init__(self, which: str):
        self.which = which
        self.fd = -1
        self.stream: Any = None

    def open(self) -> None:
        stream = sys.stderr if self.which == "stderr" else sys.stdout
        try:
            self.fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # no descriptor (a test's capture)
            self.fd = -1
            self.stream = stream

    def write(self, lines: list[str]) -> None:
        if self.fd < 0:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
            return
        chunk: list[str] = []
        size = 0
        for line in lines:
            n = len(line) + 1
            if chunk and size + n > PIPE_BUF:
                _write_all(self.fd, ("\n".join(chunk) + "\n").encode("utf-8", "replace"))
                chunk = []
                size = 0
            chunk.append(line)
            size += n
        if chunk:
            _write_all(self.fd, ("\n".join(chunk) + "\n").encode("utf-8", "replace"))

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __str__(self) -> str:
        return self.which


class FileSink:
    """A file opened for appending; ``reopen`` opens the path again (after logrotate moved
    it), then closes the old descriptor."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def _open(self) -> int:
        # O_NONBLOCK for the open only: a FIFO with no reader fails (ENXIO) instead of
        # waiting; writes then block (in the writer thread), which is what fills the buffer
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                     | os.O_NONBLOCK, 0o640)
        os.set_blocking(fd, True)
        return fd

    def open(self) -> None:
        try:
            self.fd = self._open()
        except OSError as e:
            raise OSError(e.errno, f"access log file {self.path!r}: {e.strerror}") from None

    def write(self, lines: list[str]) -> None:
        _write_all(self.fd, ("\n".join(lines) + "\n").encode("utf-8", "replace"))

    def reopen(self) -> None:
        fd = self._open()
        old, self.fd = self.fd, fd
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __str__(self) -> str:
        return f"file:{self.path}"


class SyslogSink:
    """RFC 5424 messages, one datagram per line, to a unix socket (``/dev/log``) or over UDP."""

    def __init__(self, address: str | tuple[str, int], facility: str = "local0",
                 hostname: str | None = None, app: str = "halb"):
        self.address = address
        self.pri = FACILITIES[facility] * 8 + SEVERITY_INFO
        host = (hostname or socket.gethostname() or "-").split()[0][:255]
        self.prefix = f" {host} {app} {os.getpid()} access - "
        self.sock: socket.socket | None = None

    def open(self) -> None:
        pass  # connected by the writer thread (a name may need a lookup; a socket may be gone)

    def _connect(self) -> socket.socket:
        if isinstance(self.address, str):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            target: Any = self.address
        else:
            host, port = self.address
            fam, _, _, _, target = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
            s = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            s.connect(target)
        except OSError:
            s.close()
            raise
        return s

    def write(self, lines: list[str]) -> int:
        """Sends the lines; returns how many could not be sent (counted as dropped)."""
        if self.sock is None:
            self.sock = self._connect()  # OSError: the whole batch is lost (the caller counts)
        now = time.time()
        sec = int(now)
        t = time.gmtime(sec)
        head = (f"<{self.pri}>1 {t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:"
                f"{t.tm_min:02d}:{t.tm_sec:02d}.{int((now - sec) * 1000):03d}Z{self.prefix}")
        send = self.sock.send
        lost = 0
        for i, line in enumerate(lines):
            try:
                send((head + line).encode("utf-8", "replace"))
            except OSError as e:
                lost += 1
                if e.errno not in (errno.ECONNREFUSED, errno.ENOBUFS, errno.EAGAIN,
                                   errno.EMSGSIZE):
                    # the socket went away (syslogd restarted): the rest of the batch is
                    # lost, the next batch connects again
                    self.close()
                    return lost + len(lines) - i - 1
        return lost

    def reopen(self) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __str__(self) -> str:
        return "syslog:" + (self.address if isinstance(self.address, str)
                            else f"{self.address[0]}:{self.address[1]}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def make_sink(cfg: "AccessLogConfig"):
    kind = cfg.kind
    if kind in ("stderr", "stdout"):
        return StreamSink(kind)
    if kind == "file":
        return FileSink(cfg.path)
    if kind == "syslog":
        return SyslogSink(cfg.path, cfg.facility)
    a = cfg.address
    return SyslogSink((a.host, a.port), cfg.facility)


# ---------------------------------------------------------------------------------------------
# The node's logger


class AccessLog:
    """The listeners' access logger and the part that writes its lines (``start``/``stop``).

    ``http(...)`` and ``tcp(...)`` run in the event loop: sample, format, append to the
    buffer (or drop and count). ``reopen()`` (SIGUSR1) asks the writer to reopen the file."""

    def __init__(self, cfg: "AccessLogConfig", metrics: Any = None, *, sink: Any = None,
                 max_lines: int | None = None, flush_at: int = FLUSH_AT,
                 flush_interval: float = FLUSH_INTERVAL):
        self.cfg = cfg
        self.enabled = cfg.enabled
        self.fmt = Formatter(cfg.format)
        self._http = self.fmt.http
        self._tcp = self.fmt.tcp
        self._meth = self.fmt.spec != "text"
        self._cip: Any = None  # the last client address formatted (ip, port, "ip:port")
        self._cport = 0
        self._client = ""
        self.sampler = Sampler(cfg.sample)
        self.sink = sink if sink is not None else make_sink(cfg)
        self.q: collections.deque[str] = collections.deque()
        # lines waiting for the writer; more are dropped (and counted)
        self.max_lines = max_lines if max_lines is not None else cfg.buffer
        self.flush_at = max(1, min(flush_at, self.max_lines // 2))
        self.flush_interval = flush_interval
        # wall clock = monotonic + offset (refreshed by the writer at every batch)
        self.offset = time.time() - time.monotonic()
        self.dropped = 0  # lines the buffer had no room for (event loop thread)
        self.failed = 0  # lines whose write failed (writer thread)
        self.written = 0  # (writer thread)
        self._wake = threading.Event()
        self._reopen = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_error = 0.0
        if metrics is not None:
            metrics.access_log(self)

    # -- the event loop's side ----------------------------------------------------------------

    def http(self, t_begin: float, t_head: float, t_start: float, t_sent: float,
             t_resp: float, t_end: float, ip: str, port: int, listener: str, pool: str,
             backend: str, status: int, nbytes: int, nin: int, term: str, ck: str,
             method: bytes | None, target: bytes | None, version: str, retries: int,
             fc: int, sc: int, cache: str = "-") -> None:
        """One HTTP exchange (``target`` None: a request never parsed, ``<BADREQ>``)."""
        s = self.sampler
        if not s.all and not s.take():
            return
        tq, tw, tc, tr, ta = http_timers(t_begin, t_head, t_start, t_sent, t_resp, t_end)
        if target is None:
            meth, req = "-", BADREQ
        else:
            req = request_line(method, target, version)
            meth = escape(method) if self._meth else ""  # (the text format has no use for it)
        if ip is self._cip and port == self._cport:  # (a keep-alive connection's lines)
            client = self._client
        else:
            self._cip = ip
            self._cport = port
            self._client = client = client_addr(ip, port)
        self.put(self._http(t_begin + self.offset, client, listener, pool, backend, tq, tw, tc,
                            tr, ta, status, nbytes, nin, term, ck, meth, req, retries, fc, sc,
                            cache))

    def tcp(self, t_accept: float, t_first: float, t_connected: float, t_end: float,
            client: str, listener: str, pool: str, backend: str, nin: int, nout: int,
            term: str, retries: int, fc: int, sc: int) -> None:
        """One L4 TCP connection, at its close."""
        s = self.sampler
        if not s.all and not s.take():
            return
        tw, tc, tt = tcp_timers(t_accept, t_first, t_connected, t_end)
        self.put(self._tcp(t_accept + self.offset, client, listener, pool, backend, tw, tc, tt,
                           nin, nout, term, retries, fc, sc))

    def put(self, line: str) -> None:
        q = self.q
        if len(q) >= self.max_lines:
            self.dropped += 1
            return
        if len(line) > LINE_MAX:
            line = line[:LINE_MAX]
        q.append(line)
        if len(q) == self.flush_at:
            self._wake.set()

    def reopen(self) -> None:
        """SIGUSR1: the writer reopens its destination (a file after logrotate moved it)."""
        if self._thread is not None:
            self._reopen = True
            self._wake.set()

    # -- life cycle (a node part) --------------------------------------------------------------

    async def start(self) -> None:
        if not self.enabled:
            return
        self.sink.open()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="halb-access-log", daemon=True)
        self._thread.start()
        _log.info("access_log_started", destination=str(self.sink), format=self.cfg.format,
                  sample=self.cfg.sample)

    async def stop(self) -> None:
        t = self._thread
        if t is None:
            return
        self._stopping = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, t.join, STOP_WAIT)
        if t.is_alive():  # stuck in a write (a FIFO nobody reads): left behind, a daemon
            # thread; it closes its destination if the write ever returns
            _log.warning("access_log_writer_stuck", destination=str(self.sink),
                         lines_waiting=len(self.q))
        self._thread = None
        if self.dropped or self.failed:
            _log.warning("access_log_dropped", dropped=self.dropped + self.failed)

    # -- the writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        wake = self._wake
        while True:
            wake.wait(self.flush_interval)
            wake.clear()
            self.offset = time.time() - time.monotonic()
            stopping = self._stopping
            self._drain()
            if self._reopen:
                self._reopen = False
                try:
                    self.sink.reopen()
                    _log.info("access_log_reopened", destination=str(self.sink))
                except OSError as e:
                    _log.error("access_log_reopen_failed", destination=str(self.sink),
                               error=str(e))
            if stopping:
                self._drain()
                self.sink.close()
                return

    def _drain(self) -> None:
        q = self.q
        while q:
            n = min(len(q), 4096)
            pop = q.popleft
            batch = [pop() for _ in range(n)]
            try:
                lost = self.sink.write(batch) or 0
            except OSError as e:
                lost = n
                now = time.monotonic()
                if now - self._last_error >= 10.0:  # at most one line per 10 s
                    self._last_error = now
                    _log.error("access_log_write_failed", destination=str(self.sink),
                               error=str(e), lines=n)
            self.failed += lost
            self.written += n - lost

    # -- introspection ------------------------------------------------------------------------

    @property
    def lost(self) -> int:
        """Lines dropped (buffer full) or failed (write error), for the metric."""
        return self.dropped + self.failed


def for_listener(node: Any, enabled: bool) -> "AccessLog | None":
    """The logger a listener logs through: the node's, if logging is on for the node and for
    this listener (``access_log = false`` under [[listeners]] silences one)."""
    alog = getattr(node, "access_log", None)
    if alog is None or not alog.enabled or not enabled:
        return None
    return alog
