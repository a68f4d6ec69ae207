"""TLS session resumption on the HTTPS listeners, with real halbd processes and real clients
(Python's ssl session API and openssl s_client):

- a session made through node ``a`` resumes on node ``b`` after ``a`` is killed: ``b`` holds
  ``a``'s ticket keys, received over the mutually authenticated sync channel (TLS 1.2 and 1.3);
- a ticket whose key a node does not know (a standalone node) gets a full handshake and the
  request is served, no error;
- over an unauthenticated sync (``insecure = true``) no key travels: the session does not
  resume on the peer (a full handshake there);
- TLS 1.2 without tickets resumes from the session cache (``openssl s_client -no_ticket
  -sess_out / -sess_in``).
"""

from __future__ import annotations

import datetime
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
from pathlib import Path

import pytest

from halb import pki
from tests.helpers import Backends, Halbd, free_ports, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

V12, V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3


@pytest.fixture
def own_tmp():
    d = Path(tempfile.mkdtemp(prefix="halb-tlsres-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _server_cert(d: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("www.example")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cp, kp = d / "www.pem", d / "www.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cp, kp


def node_config(tmp: Path, name: str, port: int, bk: Backends, cert: tuple[Path, Path], *,
                sync_port: int = 0, peer: tuple[str, int] | None = None, tls: bool = True,
                extra: str = "", metrics_port: int = 0) -> Path:
    text = f'''
[node]
name = "{name}"
state_dir = "{tmp}"
{f'[metrics]{chr(10)}address = "127.0.0.1:{metrics_port}"' if metrics_port else ""}
[[pools]]
name = "web"
[[pools.backends]]
name = "s1"
address = "{bk.http['s1']}"
[[listeners]]
name = "www"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "web"
[listeners.tls]
{extra}
[[listeners.tls.certificates]]
cert = "{cert[0]}"
key = "{cert[1]}"
'''
    if peer is not None:
        text += f'''[sync]
listen = "127.0.0.1:{sync_port}"
{"" if tls else "insecure = true"}
[[sync.peers]]
name = "{peer[0]}"
address = "127.0.0.1:{peer[1]}"
'''
        if tls:
            p = tmp / "pki"
            text += f'''[sync.tls]
cert = "{p / f'{name}.pem'}"
key = "{p / f'{name}.key'}"
ca = "{p / 'ca.pem'}"
'''
    return write_config(tmp, text, name=f"{name}.toml")


def client_context(version: ssl.TLSVersion, tickets: bool = True) -> ssl.SSLContext:
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE
    c.minimum_version = c.maximum_version = version
    if not tickets:
        c.options |= ssl.OP_NO_TICKET
    return c


def fetch(port: int, cctx: ssl.SSLContext, session=None):
    """One HTTPS request; (status line, resumed?, the session to resume next time)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        s = cctx.wrap_socket(raw, server_hostname="www.example", session=session)
        s.sendall(b"GET /who HTTP/1.1\r\nHost: www.example\r\nConnection: close\r\n\r\n")
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ssl.SSLEOFError:
            pass
        reused, sess = s.session_reused, s.session
        s.close()
    status = data.split(b"\r\n", 1)[0]
    assert status.startswith(b"HTTP/1.1 200 "), data[:200]
    assert b"X-Backend: s1" in data, data[:300]
    return status, reused, sess


def metrics(port: int) -> dict[str, float]:
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("halb_tls"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def test_a_session_made_on_a_resumes_on_b_after_a_dies(own_tmp):
    pki.generate(own_tmp / "pki", ["a", "b"])
    cert = _server_cert(own_tmp)
    ha, hb, hc, sa, sb, mb = free_ports(6)
    with Backends(["s1"]) as bk:
        ca = node_config(own_tmp, "a", ha, bk, cert, sync_port=sa, peer=("b", sb))
        cb = node_config(own_tmp, "b", hb, bk, cert, sync_port=sb, peer=("a", sa),
                         metrics_port=mb)
        cc = node_config(own_tmp, "c", hc, bk, cert)  # standalone: keys of its own
        with Halbd(ca) as a, Halbd(cb) as b, Halbd(cc) as c:
            for n, p in ((a, ha), (b, hb), (c, hc)):
                n.wait_port(p)
            b.wait_log("tls_ticket_keys_received", timeout=20)  # a's keys are on b
            clients = {v: client_context(v) for v in (V12, V13)}
            sessions = {}
            for v, cctx in clients.items():
                _, reused, sess = fetch(ha, cctx)
                assert not reused  # the first handshake is a full one
                _, reused, sess2 = fetch(ha, cctx, sess)
                assert reused, f"{v.name}: no resumption on the node that issued the ticket"
                sessions[v] = sess
            # a ticket whose key the node does not know: a full handshake, the request served
            for v, cctx in clients.items():
                _, reused, _ = fetch(hc, cctx, sessions[v])
                assert not reused, f"{v.name}: c cannot know a's ticket key"
            a.signal(signal.SIGKILL)
            a.p.wait(5)
            for v, cctx in clients.items():
                _, reused, _ = fetch(hb, cctx, sessions[v])
                assert reused, f"{v.name}: a's session did not resume on b after a died"
            m = metrics(mb)
            # b resumed both with a's key (renewed: a new ticket under b's own key)
            assert m['halb_tls_tickets_total{listener="www",result="renewed"}'] == 2, m
            assert m['halb_tls_tickets_total{listener="www",result="issued"}'] >= 2, m
            assert m['halb_tls_ticket_keys{listener="www",source="peer"}'] >= 1, m
            assert m['halb_tls_ticket_keys{listener="www",source="own"}'] == 1, m
            assert m['halb_tls_sessions_resumed_total{listener="www"}'] == 2, m
            for n in (b, c):
                log = n.log.read_text()
                assert "Traceback" not in log and "tls_ticket_callback_failed" not in log
                assert "tls_resumption_limited" not in log
            # keys are secrets: the received key batch is logged by count only
            line = next(x for x in b.log.read_text().splitlines()
                        if "tls_ticket_keys_received" in x)
            assert "peer" in line and "aes" not in line and "hmac" not in line, line


def test_keys_do_not_travel_over_an_unauthenticated_sync(own_tmp):
    cert = _server_cert(own_tmp)
    ha, hb, sa, sb = free_ports(4)
    with Backends(["s1"]) as bk:
        ca = node_config(own_tmp, "a", ha, bk, cert, sync_port=sa, peer=("b", sb), tls=False)
        cb = node_config(own_tmp, "b", hb, bk, cert, sync_port=sb, peer=("a", sa), tls=False)
        with Halbd(ca) as a, Halbd(cb) as b:
            a.wait_port(ha)
            b.wait_port(hb)
            b.wait_log("tls_ticket_keys_not_shared")
            b.wait_log("sync_connected")
            for v in (V12, V13):
                cctx = client_context(v)
                _, _, sess = fetch(ha, cctx)
                _, reused, _ = fetch(ha, cctx, sess)
                assert reused
                _, reused, _ = fetch(hb, cctx, sess)
                assert not reused, f"{v.name}: resumed on b without an authenticated key exchange"
            assert "tls_ticket_keys_received" not in b.log.read_text()


def test_tls12_session_cache_without_tickets_and_tickets_off(own_tmp):
    cert = _server_cert(own_tmp)
    (h,) = free_ports(1)
    with Backends(["s1"]) as bk:
        cfg = node_config(own_tmp, "a", h, bk, cert, extra="tickets = false")
        with Halbd(cfg) as a:
            a.wait_port(h)
            # Python's client offers no ticket: the session cache resumes it
            cctx = client_context(V12, tickets=False)
            _, reused, sess = fetch(h, cctx)
            assert not reused and not sess.has_ticket
            _, reused, _ = fetch(h, cctx, sess)
            assert reused
            # a client that asks for a ticket gets none (tickets = false), yet resumes
            cctx = client_context(V12)
            _, _, sess = fetch(h, cctx)
            assert not sess.has_ticket
            _, reused, _ = fetch(h, cctx, sess)
            assert reused
            # openssl s_client: a session saved and resumed (TLS 1.2, no ticket)
            sf = own_tmp / "sess.pem"
            base = ["openssl", "s_client", "-connect", f"127.0.0.1:{h}", "-tls1_2", "-no_ticket", "-ign_eof",
                    "-servername", "www.example"]
            req = b"GET /who HTTP/1.1\r\nHost: www.example\r\nConnection: close\r\n\r\n"
            r1 = subprocess.run(base + ["-sess_out", str(sf)], input=req, capture_output=True,
                                timeout=10)
            assert b"HTTP/1.1 200 " in r1.stdout and b"\nNew, TLSv1.2" in r1.stdout, r1.stdout[-500:]
            r2 = subprocess.run(base + ["-sess_in", str(sf)], input=req, capture_output=True,
                                timeout=10)
            assert b"HTTP/1.1 200 " in r2.stdout and b"\nReused, TLSv1.2" in r2.stdout, r2.stdout[-500:]


def test_session_cache_off_and_tickets_off_means_no_resumption(own_tmp):
    """The control: with both off, the same client gets a full handshake every time (so the
    test above does measure the cache)."""
    cert = _server_cert(own_tmp)
    (h,) = free_ports(1)
    with Backends(["s1"]) as bk:
        cfg = node_config(own_tmp, "a", h, bk, cert, extra="tickets = false\nsession_cache = 0")
        with Halbd(cfg) as a:
            a.wait_port(h)
            cctx = client_context(V12, tickets=False)
            _, _, sess = fetch(h, cctx)
            _, reused, _ = fetch(h, cctx, sess)
            assert not reused


def test_nodes_sharing_a_key_file_resume_and_a_reload_reads_new_keys(own_tmp):
    """HAProxy's tls-ticket-keys way: the same file on two nodes (no sync at all) lets a
    session made on one resume on the other; a reload after the file's keys changed (same
    path, so an equal config) takes the new keys: the old session no longer resumes."""
    import base64
    import os
    cert = _server_cert(own_tmp)
    keys_a, keys_b = own_tmp / "a.keys", own_tmp / "b.keys"
    text = "\n".join(base64.b64encode(os.urandom(80)).decode() for _ in range(3)) + "\n"
    keys_a.write_text(text)
    keys_b.write_text(text)
    ha, hb = free_ports(2)
    with Backends(["s1"]) as bk:
        ca = node_config(own_tmp, "a", ha, bk, cert, extra=f'ticket_keys = "{keys_a}"')
        cb = node_config(own_tmp, "b", hb, bk, cert, extra=f'ticket_keys = "{keys_b}"')
        with Halbd(ca) as a, Halbd(cb) as b:
            a.wait_port(ha)
            b.wait_port(hb)
            sessions = {}
            for v in (V12, V13):
                cctx = client_context(v)
                _, reused, sess = fetch(ha, cctx)
                assert not reused
                _, reused, _ = fetch(hb, cctx, sess)
                assert reused, f"{v.name}: the same key file on b did not resume a's session"
                sessions[v] = (cctx, sess)
            keys_b.write_text("\n".join(base64.b64encode(os.urandom(80)).decode()
                                        for _ in range(2)) + "\n")
            n = b.log.read_text().count("tls_ticket_keys_loaded")
            b.signal(signal.SIGHUP)
            b.wait_log("reload_done")
            assert b.log.read_text().count("tls_ticket_keys_loaded") == n + 1
            for v, (cctx, sess) in sessions.items():
                _, reused, _ = fetch(hb, cctx, sess)
                assert not reused, f"{v.name}: b still holds the keys it was told to drop"
                _, reused, _ = fetch(ha, cctx, sess)
                assert reused  # a was not reloaded
