"""TLS termination for HTTP listeners: one SSL context per certificate, chosen by SNI.

The first certificate of ``[listeners.tls]`` is the default (no SNI, or a name no
certificate lists). ``server_names`` entries are exact names or ``*.suffix`` wildcards
(matching exactly one more label, as certificate wildcards do). Exact names win over
wildcards. Backends are spoken to in plain HTTP.
"""

from __future__ import annotations

import ssl
from typing import Sequence

from ..config import ListenerTLS, TLSCertificate


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


def server_context(tls: ListenerTLS, where: str = "tls",
                   alpn: Sequence[str] = ("http/1.1",)) -> ssl.SSLContext:
    """The listener's SSL context; its SNI callback swaps in the matching certificate's.
    ``alpn``: the protocols offered, in order of preference (``h2`` when HTTP/2 is on).
    Raises OSError naming ``where`` and the files when a certificate or key cannot be loaded."""
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
