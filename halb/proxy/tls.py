"""TLS termination for HTTP listeners: one SSL context per certificate, chosen by SNI.

The first certificate of ``[listeners.tls]`` is the default (no SNI, or a name no
certificate lists). ``server_names`` entries are exact names or ``*.suffix`` wildcards
(matching exactly one more label, as certificate wildcards do). Exact names win over
wildcards. Backends are spoken to in plain HTTP.
"""

from __future__ import annotations

import ssl
import time
from typing import Callable, Sequence

from .. import log as hlog
from ..config import ListenerTLS, TLSCertificate

log = hlog.get_logger("tls")


def choose_certificate(certs: Sequence[TLSCertificate], server_name: str | None) -> int:
    """Index of the certificate to present for ``server_name`` (pure; 0 is the default)."""
    if not server_name:
        return 0
    name = server_name.lower().rstrip(".")
    for i, c in enumerate(certs):
        if name in c.server_names:
            return i
    head, dot, rest = name.partition(".")
    if dot and head:
        wild = "*." + rest
        for i, c in enumerate(certs):
            if wild in c.server_names:
                return i
    return 0


def _context(cert: TLSCertificate, where: str, alpn: Sequence[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(list(alpn))
    try:
        ctx.load_cert_chain(cert.cert, cert.key)
    except (OSError, ssl.SSLError) as e:
        reason = getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e)
        raise OSError(f"{where}: cannot load certificate {cert.cert} with key {cert.key}: "
                      f"{reason}") from None
    return ctx


def server_context(tls: ListenerTLS, where: str = "tls", *, tickets=None, listener: str = "",
                   now: Callable[[], float] = time.time,
                   alpn: Sequence[str] = ("http/1.1",)) -> ssl.SSLContext:
    """The listener's SSL context; its SNI callback swaps in the matching certificate's.
    ``alpn``: the protocols offered, in order of preference (``h2`` when HTTP/2 is on).
    Raises OSError naming ``where`` and the files when a certificate or key cannot be loaded.

    Session resumption: the session cache and lifetime of ``tls`` and, with ``tickets`` (the
    node's ``halb.tlstickets.TicketKeys``), ticket keys from the listener's ring (generated and
    rotated, shared with the peers, or read from ``tls.ticket_keys``). Whatever cannot be set
    is logged once (``tls_resumption_limited``) and OpenSSL's defaults stay."""
    ctx = _server_context(tls, where, alpn)
    if not tls.tickets:
        ctx.options |= ssl.OP_NO_TICKET  # TLS 1.2: cache only; TLS 1.3: stateful tickets
    from . import tls_openssl
    ring = None
    stats = tls_openssl.TicketStats()
    if tickets is not None:
        stats = tickets.stats.setdefault(listener, stats)
        tickets.contexts[listener] = ctx
        if tls.tickets:
            fixed = None
            if tls.ticket_keys:
                from ..tlstickets import parse_key_file
                try:
                    with open(tls.ticket_keys, encoding="ascii", errors="replace") as f:
                        fixed = parse_key_file(f.read(1 << 16), f"{where}.ticket_keys")
                except OSError as e:
                    raise OSError(f"{where}.ticket_keys: cannot read {tls.ticket_keys!r}: "
                                  f"{e.strerror or e}") from None
                except ValueError as e:
                    raise OSError(str(e)) from None
            ring = tickets.ring(listener, tls.ticket_rotate, tls.ticket_keys_kept, fixed,
                                tls.share_ticket_keys and fixed is None, now())

    def on_error(e: BaseException) -> None:  # (counted in stats.errors; logged 1st, 1001st...)
        if stats.errors % 1000 == 1:
            log.error("tls_ticket_callback_failed", listener=listener, count=stats.errors,
                      error=f"{type(e).__name__}: {e}")
    why = tls_openssl.configure(ctx, cache_size=tls.session_cache, lifetime=tls.session_lifetime,
                                ring=ring, now=now, stats=stats, on_error=on_error)
    if why:
        log.warning("tls_resumption_limited", listener=listener, reason=why,
                    effect="OpenSSL's own session cache and per-process ticket keys: sessions "
                           "resume on this node only")
        if tickets is not None:
            tickets.unbound.add(listener)
    elif tickets is not None:
        tickets.unbound.discard(listener)
    return ctx


def _server_context(tls: ListenerTLS, where: str, alpn: Sequence[str]) -> ssl.SSLContext:
    certs = tls.certificates
    contexts = [_context(c, f"{where}.certificates[{i}]", alpn) for i, c in enumerate(certs)]
    default = contexts[0]
    if len(contexts) > 1:
        def on_sni(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
            i = choose_certificate(certs, server_name)
            if i:
                sslobj.context = contexts[i]
            return None
        default.sni_callback = on_sni
    return default


class TLSCollector:
    """``halb_tls_*`` metrics of the HTTPS listeners, read at scrape time from the node's
    ``TicketKeys`` (the ticket callback's counters, the key counts) and the listeners' SSL
    contexts (sessions resumed). Never key material."""

    def __init__(self, tickets, now: Callable[[], float]):
        self.tickets = tickets
        self.now = now

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        t = CounterMetricFamily("halb_tls_tickets", "TLS session tickets by what the listener "
                                "did: issued, resumed (the current key), renewed (resumed with "
                                "an earlier or a peer's key; a new ticket given), unknown "
                                "(key unknown or expired: a full handshake), error",
                                labels=["listener", "result"])
        h = CounterMetricFamily("halb_tls_sessions_resumed", "TLS sessions resumed, by ticket "
                                "or from the session cache (OpenSSL's count of session hits)",
                                labels=["listener"])
        k = GaugeMetricFamily("halb_tls_ticket_keys", "TLS ticket keys held, own (generated or "
                              "from the key file) and received from peers",
                              labels=["listener", "source"])
        tk = self.tickets
        for name, st in sorted(tk.stats.items()):
            for r in ("issued", "resumed", "renewed", "unknown", "errors"):
                t.add_metric([name, "error" if r == "errors" else r], getattr(st, r))
        for name, ctx in sorted(tk.contexts.items()):
            try:
                h.add_metric([name], ctx.session_stats().get("hits", 0))
            except Exception:  # noqa: BLE001 - a scrape must not fail for this
                pass
        now = self.now()
        for name, ring in sorted(tk.rings.items()):
            d = ring.describe(now)
            k.add_metric([name, "own"], d["own_keys"])
            k.add_metric([name, "peer"], sum(d["peer_keys"].values()))
        yield t
        yield h
        yield k
