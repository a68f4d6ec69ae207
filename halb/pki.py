"""A small PKI for a lab or a first deployment: one CA and one certificate per node.

    generate("/etc/halb/pki", ["lb1", "lb2"], ips={"lb1": ["10.0.0.1"]})

writes ``ca.pem``/``ca.key`` and ``<node>.pem``/``<node>.key`` per node. A node certificate
names the node as CN and as SAN DNS name (plus optional IP SANs) and is valid for both TLS
server and client authentication, as state sync's mutual TLS needs (the sync peers check the
name against ``sync.peers[].name``). Keys are ECDSA P-256, written with mode 0600. An
existing CA in ``out_dir`` is reused, so nodes can be added later; ``halbctl pki`` exposes this.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import NAME_RE

VALID_DAYS = 825


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cp, kp = out / "ca.pem", out / "ca.key"
    if not (cp.exists() and kp.exists()):
        return None
    cert = x509.load_pem_x509_certificate(cp.read_bytes())
    key = serialization.load_pem_private_key(kp.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{kp}: not an EC private key")
    return cert, key


def _new_ca(name: str, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS * 4))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _node_cert(name: str, ips: list[str], ca_cert: x509.Certificate,
               ca_key: ec.EllipticCurvePrivateKey, now: dt.datetime
               ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(name)]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def generate(out_dir: str | Path, nodes: list[str], ips: dict[str, list[str]] | None = None,
             *, ca_name: str = "halb cluster CA") -> dict:
    """Writes the CA (unless one exists in ``out_dir``) and one certificate per node.

    Returns ``{"ca": {"cert": path, "key": path, "created": bool}, "nodes": {name: {"cert":
    path, "key": path}}}``. Raises ValueError naming the bad node name or IP address.
    """
    ips = ips or {}
    problems = [f"invalid node name {n!r}" for n in nodes if not NAME_RE.match(n)]
    problems += [f"IP addresses given for {n!r}, which is not in the node list"
                 for n in ips if n not in nodes]
    for n, lst in ips.items():
        for ip in lst:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                problems.append(f"{n}: invalid IP address {ip!r}")
    if len(set(nodes)) != len(nodes):
        problems.append("node names repeat")
    if not nodes:
        problems.append("no node names given")
    if problems:
        raise ValueError("; ".join(problems))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    loaded = _load_ca(out)
    created = loaded is None
    if loaded is None:
        ca_cert, ca_key = _new_ca(ca_name, now)
        _write_key(out / "ca.key", ca_key)
        _write_cert(out / "ca.pem", ca_cert)
    else:
        ca_cert, ca_key = loaded
    result: dict = {"ca": {"cert": str(out / "ca.pem"), "key": str(out / "ca.key"),
                           "created": created}, "nodes": {}}
    for n in nodes:
        cert, key = _node_cert(n, ips.get(n, []), ca_cert, ca_key, now)
        _write_key(out / f"{n}.key", key)
        _write_cert(out / f"{n}.pem", cert)
        result["nodes"][n] = {"cert": str(out / f"{n}.pem"), "key": str(out / f"{n}.key")}
    return result
