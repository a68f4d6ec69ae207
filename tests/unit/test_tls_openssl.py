"""The OpenSSL edge of TLS resumption (halb.proxy.tls_openssl, halb.proxy.tls.server_context):
real handshakes over socketpairs between Python's ssl client and server contexts, no network."""

from __future__ import annotations

import base64
import datetime
import os
import socket
import ssl
import threading
from pathlib import Path

import pytest

from halb.config import ListenerTLS, TLSCertificate
from halb.proxy import tls_openssl
from halb.proxy.tls import server_context
from halb.tlstickets import TicketKeys

pytestmark = pytest.mark.unit

V12, V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> TLSCertificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("cert")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
         .public_key(key.public_key()).serial_number(1)
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (d / "c.pem").write_bytes(c.public_bytes(serialization.Encoding.PEM))
    (d / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return TLSCertificate(cert=str(d / "c.pem"), key=str(d / "k.pem"))


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, session=None):
    """One connection: (resumed?, the client's session after a byte each way)."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    err = []

    def serve():
        try:
            s = server.wrap_socket(a, server_side=True)
            s.recv(1)
            s.sendall(b"y")
            s.unwrap()
        except (OSError, ssl.SSLError) as e:
            err.append(e)
        finally:
            a.close()
    t = threading.Thread(target=serve)
    t.start()
    c = client.wrap_socket(b, session=session)
    c.sendall(b"x")
    assert c.recv(1) == b"y"
    out = c.session_reused, c.session
    try:
        c.unwrap()
    except (OSError, ssl.SSLError):
        pass
    c.close()
    t.join(5)
    assert not err, err
    return out


def client(version) -> ssl.SSLContext:
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE
    c.minimum_version = c.maximum_version = version
    return c


def test_the_ssl_ctx_pointer_is_found_and_checked(cert):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ptr, why = tls_openssl.ssl_ctx_pointer(ctx)
    assert ptr and not why
    before = ctx.options
    ctx.options |= ssl.OP_NO_TICKET  # OpenSSL sees what Python set: the same SSL_CTX
    lib = tls_openssl._library()
    assert lib.ssl.SSL_CTX_get_options(ptr) == int(ctx.options) != int(before)
    assert ctx.options == before | ssl.OP_NO_TICKET  # the check left the options as they were
    assert tls_openssl.ssl_ctx_pointer(object())[0] == 0  # type: ignore[arg-type]


def test_two_nodes_reading_one_key_file_resume_each_others_sessions(cert, tmp_path):
    f = tmp_path / "keys"
    f.write_text("\n".join(base64.b64encode(os.urandom(80)).decode() for _ in range(3)) + "\n")
    tls = ListenerTLS(certificates=(cert,), ticket_keys=str(f))
    a = server_context(tls, tickets=TicketKeys(), listener="www")
    b = server_context(tls, tickets=TicketKeys(), listener="www")
    other = server_context(ListenerTLS(certificates=(cert,)), tickets=TicketKeys(),
                           listener="www")
    for v in (V12, V13):
        c = client(v)
        reused, sess = handshake(a, c)
        assert not reused and sess.has_ticket
        assert handshake(b, c, sess)[0], v
        assert not handshake(other, c, sess)[0], v  # generated keys: not these


def test_when_keys_cannot_be_set_the_listener_still_serves_with_openssls_own(cert, monkeypatch):
    monkeypatch.setattr(tls_openssl, "ssl_ctx_pointer", lambda ctx: (0, "simulated"))
    tk = TicketKeys()
    ctx = server_context(ListenerTLS(certificates=(cert,)), tickets=tk, listener="www")
    assert "www" in tk.unbound
    c = client(V13)
    _, sess = handshake(ctx, c)
    assert handshake(ctx, c, sess)[0]  # OpenSSL's per-process keys: resumes on this node


def test_a_callback_error_gives_a_full_handshake_not_a_failure(cert):
    tk = TicketKeys()
    ctx = server_context(ListenerTLS(certificates=(cert,)), tickets=tk, listener="www")
    c = client(V12)
    _, sess = handshake(ctx, c)
    ring = tk.rings["www"]

    def boom(name, now):
        raise RuntimeError("bug")
    ring.lookup = boom  # type: ignore[method-assign]
    reused, _ = handshake(ctx, c, sess)
    assert not reused
    assert tk.stats["www"].errors == 1
