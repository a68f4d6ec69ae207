"""A client resumes its TLS session on the standby after a takeover: real halbd processes in
namespaces, the VIP elected by VRRP, ticket keys shared over mutual-TLS sync.

LAN ``tk*`` 198.18.57.0/24: tklb1 .11 (priority 200, master), tklb2 .12 (backup), tkcl .2
(the client and an HTTP backend). Both nodes have the HTTPS listener ``www`` on the VIP
198.18.57.100:8443. The client (one process, so it keeps its ssl sessions) makes a TLS 1.2 and
a TLS 1.3 session through the VIP, that is through tklb1; tklb1 is killed with SIGKILL,
tklb2 takes the VIP over, and the client's next connections resume both sessions on tklb2
(``session_reused``), with no full handshake.
"""

from __future__ import annotations

import datetime
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from halb import pki
from lab import netns as nx
from lab.lab import log_events
from tests.helpers import Halbd, Proc, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]

PREFIX = "tk"
SUBNET = "198.18.57.0/24"
LB1, LB2, CLIENT = "198.18.57.11", "198.18.57.12", "198.18.57.2"
VIP = "198.18.57.100"
PORT = 8443
SYNC_PORT = 7457
BACKEND = f"{CLIENT}:9157"

CLIENT_SCRIPT = r"""
import json, socket, ssl, sys, time
vip, port = sys.argv[1], int(sys.argv[2])
ctxs = {}
for v in ("TLSv1_2", "TLSv1_3"):
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE
    c.minimum_version = c.maximum_version = getattr(ssl.TLSVersion, v)
    ctxs[v] = c

def fetch(v, session=None):
    with socket.create_connection((vip, port), timeout=3) as raw:
        s = ctxs[v].wrap_socket(raw, server_hostname="www.example", session=session)
        s.sendall(b"GET /who HTTP/1.1\r\nHost: www.example\r\nConnection: close\r\n\r\n")
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ssl.SSLEOFError:
            pass
        out = (data.split(b"\r\n", 1)[0].decode(), s.session_reused, s.session)
        s.close()
        return out

first = {}
for v in ctxs:
    status, reused, sess = fetch(v)
    first[v] = sess
    print(json.dumps({"phase": "first", "version": v, "status": status, "reused": reused}),
          flush=True)
sys.stdin.readline()  # the test kills the master and waits for the backup to take over
deadline = time.monotonic() + 10
for v, sess in first.items():
    while True:
        try:
            status, reused, _ = fetch(v, sess)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                status, reused = f"error {e}", None
                break
            time.sleep(0.1)
    print(json.dumps({"phase": "after", "version": v, "status": status, "reused": reused}),
          flush=True)
"""


def server_cert(d: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cp, kp = d / "www.pem", d / "www.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cp, kp


def config(tmp: Path, name: str, prio: int, me: str, peer: str, peer_ip: str,
           cert: tuple[Path, Path]) -> Path:
    p = tmp / "pki"
    text = f"""
[node]
name = "{name}"
state_dir = "{tmp}"

[control]
socket = "{tmp}/{name}.sock"

[[pools]]
name = "p"
[[pools.backends]]
name = "s1"
address = "{BACKEND}"

[[listeners]]
name = "www"
mode = "http"
bind = "{VIP}:{PORT}"
pool = "p"
[listeners.tls]
[[listeners.tls.certificates]]
cert = "{cert[0]}"
key = "{cert[1]}"

[[vrrp]]
name = "vi"
interface = "eth0"
vrid = 57
priority = {prio}
vips = ["{VIP}/24"]
advert_interval = "100ms"

[sync]
listen = "{me}:{SYNC_PORT}"
[[sync.peers]]
name = "{peer}"
address = "{peer_ip}:{SYNC_PORT}"
[sync.tls]
cert = "{p / f'{name}.pem'}"
key = "{p / f'{name}.key'}"
ca = "{p / 'ca.pem'}"
"""
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


def became(proc, state):
    return [e for e in log_events(proc.output(), "vrrp_state") if e.get("new") == state]


@pytest.fixture
def lan():
    tmp = Path(tempfile.mkdtemp(prefix="halb-tk-"))
    nx.cleanup(PREFIX)
    net = nx.Lan(PREFIX, SUBNET)
    try:
        net.add_host("tklb1", LB1)
        net.add_host("tklb2", LB2)
        net.add_host("tkcl", CLIENT)
        yield tmp
    finally:
        net.close()
        nx.cleanup(PREFIX)
        shutil.rmtree(tmp, ignore_errors=True)


def test_tls_sessions_resume_on_the_standby_after_a_takeover(lan):
    tmp = lan
    pki.generate(tmp / "pki", ["tklb1", "tklb2"], ips={"tklb1": [LB1], "tklb2": [LB2]})
    cert = server_cert(tmp)
    procs = [Proc([sys.executable, "-m", "lab.backend", "--name", "s1", "--http", BACKEND],
                  netns="tkcl", log=tmp / "backend.log")]
    client = None
    try:
        a = Halbd(config(tmp, "tklb1", 200, LB1, "tklb2", LB2, cert), netns="tklb1",
                  log=tmp / "tklb1.log")
        procs.append(a)
        wait_for(lambda: became(a, "master"), 15, interval=0.02, what="tklb1 master")
        b = Halbd(config(tmp, "tklb2", 100, LB2, "tklb1", LB1, cert), netns="tklb2",
                  log=tmp / "tklb2.log")
        procs.append(b)
        wait_for(lambda: became(b, "backup"), 15, interval=0.02, what="tklb2 backup")
        wait_for(lambda: any(e.get("peer") == "tklb1"
                             for e in log_events(b.output(), "tls_ticket_keys_received")),
                 15, what="tklb1's ticket keys on tklb2")
        client = subprocess.Popen(["ip", "netns", "exec", "tkcl", sys.executable, "-c",
                                   CLIENT_SCRIPT, VIP, str(PORT)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = [json.loads(client.stdout.readline()) for _ in range(2)]
        assert all(x["phase"] == "first" and x["status"].startswith("HTTP/1.1 200")
                   and x["reused"] is False for x in lines), lines
        assert not became(b, "master")  # the sessions were made through tklb1
        t0 = time.monotonic()
        a.signal(signal.SIGKILL)
        wait_for(lambda: became(b, "master"), 5, interval=0.01, what="tklb2 master")
        client.stdin.write("go\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=30)
        after = [json.loads(x) for x in out.splitlines() if x.strip()]
        assert len(after) == 2, (out, err)
        for x in after:
            assert x["status"].startswith("HTTP/1.1 200"), (x, err)
            assert x["reused"] is True, f"{x['version']}: no resumption on tklb2 after the " \
                                        f"takeover ({time.monotonic() - t0:.2f} s after the kill)"
        assert "tls_resumption_limited" not in b.output()
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait(5)
        for p in reversed(procs):
            p.close()
