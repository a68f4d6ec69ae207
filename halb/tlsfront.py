"""Mutual TLS in front of a gRPC server, so that every refused handshake is seen, counted and
logged with the peer's address and the reason.

gRPC's own TLS refuses a bad client certificate inside its C core: Python hears nothing, and
the only trace is a native log line that names no peer. So the sync port (and the control
port's TCP address) is served here: an asyncio Protocol does the TLS handshake on memory BIOs
(Python's ``ssl``: CA, client certificate required, ALPN ``h2``), and relays the decrypted
bytes to the gRPC server, which listens in plaintext on an ephemeral loopback port (sync) or
its unix socket (control). The verified identity of each relayed connection (remote
address, certificate names) is kept by the relay's local port, so the servicer can read it
back from ``context.peer()`` (``identity(peer)``); a connection to the loopback port that did
not come through here has no identity and is refused by the servicer.

    front = TLSFront(files, on_refusal=fn)       # fn(remote, reason, detail)
    port = await front.start(host, port, upstream_port)
    front.identity("ipv4:127.0.0.1:51234") -> (remote, names) | None
    await front.stop()

Bounded: at most ``MAX_CONNS`` connections, the handshake within ``HANDSHAKE_TIMEOUT``, TLS
records read ``CHUNK`` bytes at a time, and backpressure both ways (a full write buffer on one
side pauses reading on the other).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from typing import Callable

from . import log as hlog
from .config import TLSFiles

HANDSHAKE_TIMEOUT = 5.0
UPSTREAM_TIMEOUT = 2.0
MAX_CONNS = 256
CHUNK = 64 * 1024

log = hlog.get_logger("tls")


MAX_REFUSAL_KEYS = 64  # (direction, reason, remote host) pairs kept per log


def peer_address(peer: str) -> str:
    """``ip:port`` or ``[v6]:port`` from a remote as halb or gRPC write it: ``ip:port``,
    ``[v6]:port``, gRPC's ``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5`` or ``ipv6:%5B::1%5D:5``;
    anything else (``unix:...``) as it is."""
    kind, sep, rest = peer.partition(":")
    if sep and kind in ("ipv4", "ipv6"):
        peer = rest.replace("%5B", "[").replace("%5D", "]").replace("%25", "%")
    elif kind in ("unix", "unix-abstract"):
        return peer
    if peer.startswith("[") or peer.count(":") <= 1:
        return peer
    host, _, port = peer.rpartition(":")  # a bare v6 address and a port
    return f"[{host}]:{port}"


def remote_host(remote: str) -> str:
    """The host of a remote (any form ``peer_address`` reads), without port or brackets."""
    a = peer_address(remote)
    if a.startswith("unix"):
        return a
    if a.startswith("["):
        return a[1:].partition("]")[0]
    return a.rpartition(":")[0] if a.count(":") == 1 else a


class RefusalLog:
    """Refused connections by (direction, reason, remote host): counts, the last detail and
    when; bounded (the oldest key goes first). ``direction``: "in" (to our port) or "out"."""

    def __init__(self):
        self.refused_in = 0
        self.refused_out = 0
        self._by: dict[tuple[str, str, str], list] = {}  # -> [count, detail, monotonic]

    @property
    def total(self) -> int:
        return self.refused_in + self.refused_out

    def add(self, direction: str, reason: str, remote: str, detail: str) -> None:
        if direction == "in":
            self.refused_in += 1
        else:
            self.refused_out += 1
        k = (direction, reason, remote_host(remote))
        e = self._by.get(k)
        if e is None:
            if len(self._by) >= MAX_REFUSAL_KEYS:
                self._by.pop(next(iter(self._by)))
            e = self._by[k] = [0, "", 0.0]
        e[0] += 1
        e[1] = detail
        e[2] = time.monotonic()

    def by_reason(self) -> dict[tuple[str, str], int]:
        """(direction, reason) -> count, for metrics."""
        out: dict[tuple[str, str], int] = {}
        for (d, r, _h), (n, _det, _t) in self._by.items():
            out[(d, r)] = out.get((d, r), 0) + n
        return out

    def as_list(self) -> list[dict]:
        now = time.monotonic()
        return [{"direction": d, "reason": r, "remote": h, "count": n, "detail": det,
                 "last_seconds_ago": round(now - t, 3)}
                for (d, r, h), (n, det, t) in self._by.items()]


def server_context(files: TLSFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert, files.key)
    ctx.load_verify_locations(files.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])  # gRPC clients insist on it
    return ctx


def classify(e: BaseException) -> tuple[str, str] | None:
    """(reason, detail) of a failed server-side handshake; None for a connection that closed
    before saying anything (a port probe, e.g. a peer's crash-detection connect)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        code = getattr(e, "verify_code", 0)
        msg = getattr(e, "verify_message", "") or str(e)
        if code in (2, 19, 20, 21):  # unable to get (local) issuer, self-signed in chain
            return "tls_unknown_ca", f"client certificate not signed by sync.tls.ca: {msg}"
        if code == 10:
            return "tls_expired", f"client certificate expired: {msg}"
        return "tls_bad_certificate", msg
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return "tls_handshake_timeout", f"no TLS handshake within {HANDSHAKE_TIMEOUT:g} s"
    if isinstance(e, ssl.SSLError):
        why = (e.reason or str(e)).upper()
        if "NO_CERTIFICATE" in why or "PEER_DID_NOT_RETURN" in why or "CERTIFICATE_REQUIRED" in why:
            return "tls_no_certificate", "the client sent no certificate"
        if "ALERT_UNKNOWN_CA" in why or "ALERT_BAD_CERTIFICATE" in why or "ALERT" in why:
            return "tls_alert_from_client", f"the client refused our certificate: {e.reason}"
        if "WRONG_VERSION" in why or "HTTP_REQUEST" in why or "UNKNOWN_PROTOCOL" in why:
            return "tls_not_tls", "the client does not speak TLS (plaintext gRPC?)"
        if "EOF" in why or isinstance(e, ssl.SSLEOFError):
            return None
        return "tls_handshake_failed", e.reason or str(e)
    if isinstance(e, (ConnectionResetError, BrokenPipeError, EOFError,
                      asyncio.IncompleteReadError)):
        return None
    if isinstance(e, OSError):
        return "tls_handshake_failed", str(e)
    return None


def cert_names(cert: dict | None) -> set[str]:
    names: set[str] = set()
    if not cert:
        return names
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                names.add(v)
    for k, v in cert.get("subjectAltName", ()):
        if k in ("DNS", "IP Address"):
            names.add(v)
    return names


class TLSFront:
    def __init__(self, files: TLSFiles, on_refusal: Callable[[str, str, str], None],
                 part: str = "sync"):
        self.files = files
        self.ctx = server_context(files)
        self.on_refusal = on_refusal
        self.part = part
        self.upstream: int | str = 0
        self._server: asyncio.AbstractServer | None = None
        self._ids: dict[int, tuple[str, frozenset[str]]] = {}
        self._conns: set[_Client] = set()

    async def start(self, host: str, port: int, upstream: int | str) -> int:
        """Listens on ``host:port`` and relays to ``upstream``: a loopback port, or the path
        of a unix socket (``identity()`` then knows nothing: every relayed connection is one
        whose client certificate the CA signed, and that is all the upstream needs)."""
        self.upstream = upstream
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Client(self), host or None, port,
                                                reuse_address=True, backlog=128)
        return self._server.sockets[0].getsockname()[1]

    def identity(self, peer: str) -> tuple[str, frozenset[str]] | None:
        """The verified (remote, certificate names) of a relayed gRPC connection, from its
        ``context.peer()`` (``ipv4:127.0.0.1:PORT``); None if it did not come through here."""
        host, _, port = peer.rpartition(":")
        if not host.endswith("127.0.0.1") or not port.isdigit():
            return None
        return self._ids.get(int(port))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for c in list(self._conns):
            c.close()
        self._conns.clear()
        self._ids.clear()


class _Client(asyncio.Protocol):
    """One client connection: the TLS handshake and record layer on memory BIOs (so nothing
    the client sends can slip past the handshake, on any event loop), then a relay to the
    upstream. Backpressure both ways: a side whose write buffer fills pauses the other's
    reading; before the upstream is connected at most ``2 * CHUNK`` bytes are held."""

    def __init__(self, front: TLSFront):
        self.front = front
        self.t: asyncio.Transport | None = None
        self.up: asyncio.Transport | None = None
        self.remote = "?"
        self.received = 0
        self.done = False  # handshake complete
        self.closed = False
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.lport: int | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = front.ctx.wrap_bio(self.inc, self.out, server_side=True)

    # -- client side ----------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.t = transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.remote = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
        if len(self.front._conns) >= MAX_CONNS:
            self.front.on_refusal(self.remote, "too_many_connections", f"more than {MAX_CONNS} open")
            transport.abort()
            return
        self.front._conns.add(self)
        self.timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._timeout)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.inc.write(data)
        if not self.done:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except ssl.SSLError as e:
                self._flush()  # the alert, so the client learns why
                self._refuse(e)
                return
            self._flush()
            self._handshaken()
        self._decrypt()

    def _decrypt(self) -> None:
        while not self.closed:
            try:
                chunk = self.obj.read(CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify
                self.close()
                return
            except ssl.SSLError as e:
                log.info("tls_front_record_error", part=self.front.part, remote=self.remote,
                         error=str(e))
                self.close()
                return
            if not chunk:
                break
            self._to_upstream(chunk)
        self._flush()

    def eof_received(self):
        if not self.done:
            self._refuse(ConnectionResetError("closed during the handshake"))
        else:
            self.close()
        return False

    def connection_lost(self, exc) -> None:
        if not self.done and not self.closed:
            self._refuse(exc or ConnectionResetError("closed during the handshake"))
        self.close()

    def pause_writing(self) -> None:  # the client reads slowly: stop reading the upstream
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None:
            self.up.resume_reading()

    def _timeout(self) -> None:
        if not self.done:
            self._refuse(asyncio.TimeoutError())

    def _refuse(self, e: BaseException) -> None:
        why = classify(e)
        if why is None and self.received > 0:
            # it sent a ClientHello, then closed or reset: the client refused our certificate
            # (gRPC's client sends its alert and resets at once)
            why = ("tls_aborted_by_client", f"the client closed the handshake "
                                            f"({type(e).__name__}): it may not trust our "
                                            f"certificate (another CA?)")
        log.debug("tls_front_handshake_failed", remote=self.remote, error=repr(e)[:300])
        self.close()
        if why is not None:
            self.front.on_refusal(self.remote, *why)

    def _flush(self) -> None:
        data = self.out.read()
        if data and self.t is not None and not self.t.is_closing():
            self.t.write(data)

    def write_to_client(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.obj.write(data)
        except ssl.SSLError:
            self.close()
            return
        self._flush()

    # -- upstream side --------------------------------------------------------------------

    def _handshaken(self) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        names = frozenset(cert_names(self.obj.getpeercert()))
        asyncio.get_running_loop().create_task(self._connect(names))

    async def _connect(self, names: frozenset[str]) -> None:
        loop = asyncio.get_running_loop()
        up = self.front.upstream
        try:
            if isinstance(up, str):
                coro = loop.create_unix_connection(lambda: _Upstream(self), up)
            else:
                coro = loop.create_connection(lambda: _Upstream(self), "127.0.0.1", up)
            tr, _ = await asyncio.wait_for(coro, UPSTREAM_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as e:
            log.error("tls_front_upstream_failed", part=self.front.part, remote=self.remote,
                      error=str(e) or type(e).__name__)
            self.close()
            return
        if self.closed:
            tr.abort()
            return
        sockname = tr.get_extra_info("sockname")
        if isinstance(sockname, tuple):
            self.lport = sockname[1]
            self.front._ids[self.lport] = (self.remote, names)
        self.up = tr
        for chunk in self.pending:
            tr.write(chunk)
        self.pending.clear()
        self.pending_bytes = 0
        if self.t is not None:
            self.t.resume_reading()

    def _to_upstream(self, data: bytes) -> None:
        if self.up is not None:
            self.up.write(data)
            return
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes >= 2 * CHUNK and self.t is not None:
            self.t.pause_reading()  # resumed once the upstream is connected

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        if self.lport is not None:
            self.front._ids.pop(self.lport, None)
        self.front._conns.discard(self)
        for tr in (self.t, self.up):
            if tr is not None:
                with contextlib.suppress(Exception):
                    tr.abort()


class _Upstream(asyncio.Protocol):
    def __init__(self, client: _Client):
        self.client = client

    def connection_made(self, transport) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.client.write_to_client(data)

    def eof_received(self):
        self.client.close()
        return False

    def connection_lost(self, exc) -> None:
        self.client.close()

    def pause_writing(self) -> None:  # the upstream reads slowly: stop reading the client
        if self.client.t is not None:
            self.client.t.pause_reading()

    def resume_writing(self) -> None:
        if self.client.t is not None:
            self.client.t.resume_reading()
