"""Mutual TLS in front of a gRPC server, so that every refused handshake is seen, counted and
logged with the peer's address and the reason.

gRPC's own TLS refuses a bad client certificate inside its C core: Python hears nothing, and
the only trace is a native log line that names no peer. So the sync port is served here: an
asyncio listener does the TLS handshake (Python's ``ssl``: CA, client certificate required,
ALPN ``h2``), and relays the decrypted bytes to the gRPC server, which listens in plaintext
on an ephemeral loopback port. The verified identity of each relayed connection (remote
address, certificate names) is kept by the relay's local port, so the servicer can read it
back from ``context.peer()`` (``identity(peer)``); a connection to the loopback port that did
not come through here has no identity and is refused by the servicer.

    front = TLSFront(files, on_refusal=fn)       # fn(remote, reason, detail)
    port = await front.start(host, port, upstream_port)
    front.identity("ipv4:127.0.0.1:51234") -> (remote, names) | None
    await front.stop()

Bounded: at most ``MAX_CONNS`` connections, the handshake within ``HANDSHAKE_TIMEOUT``, reads
of ``CHUNK`` bytes with backpressure (``drain``) in both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
from typing import Callable

from .. import log as hlog
from ..config import TLSFiles

HANDSHAKE_TIMEOUT = 5.0
UPSTREAM_TIMEOUT = 2.0
MAX_CONNS = 256
CHUNK = 64 * 1024

log = hlog.get_logger("tls")


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
        self.upstream = 0
        self._server: asyncio.AbstractServer | None = None
        self._ids: dict[int, tuple[str, frozenset[str]]] = {}
        self._conns: set[asyncio.Task] = set()

    async def start(self, host: str, port: int, upstream_port: int) -> int:
        self.upstream = upstream_port
        self._server = await asyncio.start_server(self._conn, host or None, port,
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
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        self._conns.clear()
        self._ids.clear()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        peer = writer.get_extra_info("peername") or ("?", 0)
        remote = f"{peer[0]}:{peer[1]}"
        if len(self._conns) >= MAX_CONNS:
            self.on_refusal(remote, "too_many_connections", f"more than {MAX_CONNS} open")
            writer.transport.abort()
            return
        self._conns.add(task)
        up_w = None
        # a duplicate of the socket outlives the transport's close, so that a failed handshake
        # can still tell how much the client had sent; closed right after the handshake
        ts = writer.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(ts.fileno())) if ts is not None else None
        try:
            try:
                await writer.start_tls(self.ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
                _close(sock)
            except BaseException as e:  # noqa: BLE001 - every failure is classified
                if isinstance(e, asyncio.CancelledError):
                    raise
                why = classify(e)
                if why is None and _bytes_received(sock) > 5:  # a FIN counts as one byte
                    # it sent a ClientHello, then closed or reset: the client refused our
                    # certificate (gRPC's client sends its alert and resets at once)
                    why = ("tls_aborted_by_client", f"the client closed the handshake "
                                                    f"({type(e).__name__}): it may not trust "
                                                    f"our certificate (another CA?)")
                _close(sock)
                log.debug("tls_front_handshake_failed", remote=remote, error=repr(e)[:300])
                if why is not None:
                    self.on_refusal(remote, *why)
                return
            sslobj = writer.get_extra_info("ssl_object")
            names = frozenset(cert_names(sslobj.getpeercert() if sslobj else None))
            try:
                up_r, up_w = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.upstream), UPSTREAM_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as e:
                log.error("tls_front_upstream_failed", part=self.part, remote=remote, error=str(e))
                return
            lport = up_w.get_extra_info("sockname")[1]
            self._ids[lport] = (remote, names)
            try:
                await asyncio.gather(_pump(reader, up_w), _pump(up_r, writer))
            finally:
                self._ids.pop(lport, None)
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(task)
            for w in (up_w, writer):
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.transport.abort()


_TCP_INFO_BYTES_RECEIVED = 128  # struct tcp_info.tcpi_bytes_received (Linux 4.1+)


def _close(sock) -> None:
    if sock is not None:
        sock.close()


def _bytes_received(sock) -> int:
    """Bytes the peer sent on this TCP connection (0 when unknown)."""
    if sock is None:
        return 0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        return struct.unpack_from("=Q", info, _TCP_INFO_BYTES_RECEIVED)[0]
    except (OSError, struct.error, AttributeError, ValueError):
        return 0


async def _pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await r.read(CHUNK)
            if not data:
                break
            w.write(data)
            await w.drain()
    except (OSError, ssl.SSLError, RuntimeError):
        pass
    finally:
        # one side ended: end both (HTTP/2 has no half-closed connection worth keeping)
        with contextlib.suppress(Exception):
            w.transport.abort()
