"""Mutual TLS for state sync: credentials from ``sync.tls`` and the peer-name check.

Both ends present a certificate signed by the cluster CA (``halb.pki`` makes them). The
follower dials a peer with the peer's configured name as the TLS target name, so the
peer's certificate must name it (SAN DNS or CN); the sender accepts a follower only if its
certificate names one of ``sync.peers[].name`` and its hello names the same node.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from ..config import TLSFiles


@dataclass(frozen=True)
class TLSMaterial:
    ca: bytes
    cert: bytes
    key: bytes


def load(tls: TLSFiles, where: str = "sync.tls") -> TLSMaterial:
    """Reads the PEM files; OSError naming the key and the file when one cannot be read."""
    out = {}
    for field in ("ca", "cert", "key"):
        path = getattr(tls, field)
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
        except OSError as e:
            raise OSError(f"{where}.{field}: cannot read {path!r}: {e.strerror or e}") from None
        if b"-----BEGIN" not in data:
            raise OSError(f"{where}.{field}: {path!r} is not a PEM file")
        out[field] = data
    return TLSMaterial(**out)


def server_credentials(m: TLSMaterial) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(m.key, m.cert)], root_certificates=m.ca,
                                       require_client_auth=True)


def channel_credentials(m: TLSMaterial) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=m.ca, private_key=m.key,
                                        certificate_chain=m.cert)


def peer_names(context) -> set[str]:
    """Names (CN and SAN entries) in the verified client certificate of an RPC; empty if none."""
    try:
        ac = context.auth_context() or {}
    except Exception:  # noqa: BLE001 - no auth context means no identity
        return set()
    names: set[str] = set()
    for k in ("x509_common_name", "x509_subject_alternative_name"):
        for v in ac.get(k, ()):
            names.add(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
    return names
