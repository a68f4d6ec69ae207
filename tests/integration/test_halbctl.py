"""halbctl against a real halbd process: every subcommand, unknown names, and the node down.

One node (module fixture) with two TCP listeners over two lab.backend echo servers:
``front`` -> pool ``web`` (smooth weighted round robin), ``stick`` -> pool ``stick``
(source-IP stickiness). The control API listens on a unix socket under tmp_path and on TCP
with mutual TLS (certificates from ``halbctl pki init``). Tests that change a backend undo it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import stat
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from halb.cli.halbctl import main as halbctl_main

from tests.helpers import (PY, ROOT, Backends, Halbd, free_port, free_ports, http_get, wait_for,
                           write_config)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def halbctl_process(*argv, timeout=20):
    """halbctl as its own process: (exit code, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([PY, "-m", "halb.cli.halbctl", *argv], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=str(ROOT))
    return p.returncode, p.stdout, p.stderr


def halbctl(*argv):
    """halbctl's main() in this process (a new Python process per call costs about a second on
    a busy 2-core machine); the same (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = halbctl_main(list(argv))
    return code, out.getvalue(), err.getvalue()


def status_json(sock: str) -> dict | None:
    """What ``halbctl status --json`` prints, asked in-process (for polling loops)."""
    import grpc
    from halb.cli.halbctl import to_dict
    from halb.v1 import control_pb2 as pb, control_pb2_grpc as pb_grpc
    if not os.path.exists(sock):
        return None
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        try:
            return to_dict(pb_grpc.ControlStub(ch).Status(pb.StatusRequest(), timeout=3))
        except grpc.RpcError:
            return None


def who(port: int) -> str:
    """The backend a new connection through the listener on ``port`` reaches."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"WHO\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(64)
            if not chunk:
                break
            buf += chunk
        return buf.decode().strip()


class N:
    pass


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("halbctl")
    pki = tmp / "pki"
    code, out, err = halbctl_process("pki", "init", "--out", str(pki), "lb1", "admin",
                                     "--ip", "lb1=127.0.0.1")
    assert code == 0, err
    with Backends(["web1", "web2"], http=False, tcp=True, logdir=tmp) as bk:
        n = N()
        n.tmp, n.pki = tmp, pki
        n.sock = str(tmp / "run" / "lb1.sock")
        n.front, n.stick, n.ctl_port = free_ports(3)
        n.metrics = free_port()
        n.cfg = write_config(tmp, f"""
[node]
name = "lb1"

[metrics]
address = "127.0.0.1:{n.metrics}"

[control]
socket = "{n.sock}"
address = "127.0.0.1:{n.ctl_port}"
[control.tls]
cert = "{pki / 'lb1.pem'}"
key = "{pki / 'lb1.key'}"
ca = "{pki / 'ca.pem'}"

[[listeners]]
name = "front"
mode = "tcp"
bind = "127.0.0.1:{n.front}"
pool = "web"

[[listeners]]
name = "stick"
mode = "tcp"
bind = "127.0.0.1:{n.stick}"
pool = "stick"

[[pools]]
name = "web"
algorithm = "wrr"
[[pools.backends]]
name = "web1"
address = "{bk.tcp['web1']}"
[[pools.backends]]
name = "web2"
address = "{bk.tcp['web2']}"

[[pools]]
name = "stick"
[pools.sticky]
mode = "source"
ttl = "10m"
[[pools.backends]]
name = "web1"
address = "{bk.tcp['web1']}"
[[pools.backends]]
name = "web2"
address = "{bk.tcp['web2']}"
""")
        with Halbd(n.cfg) as d:
            n.halbd = d
            d.wait_port(n.front)
            d.wait_port(n.stick)
            wait_for(lambda: os.path.exists(n.sock), 10, what="control socket")
            yield n


def ctl(n, *argv, **kw):
    return halbctl("--socket", n.sock, *argv, **kw)


def status(n) -> dict:
    code, out, err = ctl(n, "status", "--json")
    assert code == 0, err
    return json.loads(out)


def backend(n, pool, name) -> dict:
    d = status(n)
    p = next(p for p in d["pools"] if p["name"] == pool)
    return next(b for b in p["backends"] if b["name"] == name)


def test_socket_is_owner_only(node):
    st = os.stat(node.sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_status_table_and_json(node):
    code, out, err = halbctl_process("--socket", node.sock, "status")  # the CLI as a process
    assert code == 0, err
    for needle in ("node lb1", "election: not configured", "peers: state sync not configured",
                   "web1", "web2", "sticky", "flow", "stick"):
        assert needle in out, f"{needle!r} missing:\n{out}"
    d = status(node)
    assert d["node"]["name"] == "lb1" and d["node"]["pid"] == node.halbd.pid
    assert d["node"]["config"] == str(node.cfg) and d["node"]["uptime_seconds"] > 0
    assert {p["name"] for p in d["pools"]} == {"web", "stick"}
    assert {t["name"] for t in d["tables"]} == {"sticky", "flow", "nat"}
    assert not d["election_enabled"] and d["instances"] == []


def test_status_through_config_and_mtls(node):
    code, out, err = halbctl("--config", str(node.cfg), "status", "--json")
    assert code == 0, err
    assert json.loads(out)["node"]["name"] == "lb1"
    p = node.pki
    code, out, err = halbctl("--address", f"127.0.0.1:{node.ctl_port}", "--ca", str(p / "ca.pem"),
                             "--cert", str(p / "admin.pem"), "--key", str(p / "admin.key"),
                             "backends", "web", "--json")
    assert code == 0, err
    assert {b["name"] for b in json.loads(out)} == {"web1", "web2"}


def test_backends(node):
    code, out, err = ctl(node, "backends")
    assert code == 0, err
    assert "web1" in out and "web2" in out and "stick" in out
    code, out, err = ctl(node, "backends", "web", "--json")
    rows = json.loads(out)
    assert [r["pool"] for r in rows] == ["web", "web"]
    assert all(r["state"] == "up" and r["healthy"] for r in rows)
    code, out, err = ctl(node, "backends", "nope")
    assert code == 1 and "no such pool 'nope'" in err


def test_drain_then_enable_steers_new_connections(node):
    before = Counter(who(node.front) for _ in range(6))
    assert before == {"web1": 3, "web2": 3}
    code, out, err = ctl(node, "drain", "web", "web1")
    assert code == 0 and "web/web1: drain" in out, err
    try:
        assert backend(node, "web", "web1")["state"] == "drain"
        assert Counter(who(node.front) for _ in range(6)) == {"web2": 6}
    finally:
        code, out, err = ctl(node, "enable", "web", "web1")
    assert code == 0 and "web/web1: up" in out, err
    assert Counter(who(node.front) for _ in range(6)) == {"web1": 3, "web2": 3}
    assert backend(node, "web", "web1")["total"] >= 6


def test_weight_steers_new_connections(node):
    code, out, err = ctl(node, "weight", "web", "web1", "3")
    assert code == 0 and "weight 3" in out, err
    try:
        assert Counter(who(node.front) for _ in range(8)) == {"web1": 6, "web2": 2}
        code, out, err = ctl(node, "weight", "web", "web1", "0")
        assert code == 0 and "web/web1: drain" in out
        assert Counter(who(node.front) for _ in range(4)) == {"web2": 4}
        code, _, err = ctl(node, "weight", "web", "web1", "300")
        assert code == 1 and "out of range" in err
    finally:
        assert ctl(node, "weight", "web", "web1", "1")[0] == 0
    assert backend(node, "web", "web1")["weight"] == 1


def test_tables_after_traffic(node):
    first = who(node.stick)
    assert all(who(node.stick) == first for _ in range(3))  # source stickiness holds
    held = socket.create_connection(("127.0.0.1", node.front), timeout=5)
    try:
        client = "%s:%d" % held.getsockname()
        wait_for(lambda: any(t["name"] == "flow" and t["size"] >= 1
                             for t in status_json(node.sock)["tables"]), 10, interval=0.05,
                 what="the open connection in the flow table")
        code, out, _ = ctl(node, "tables", "flow", "--prefix", "front/", "--json")
        assert code == 0
        assert any(e["client"] == client for e in json.loads(out)["flow"]["entries"])
        code, out, err = ctl(node, "tables", "sticky", "--json")
        assert code == 0, err
        entries = json.loads(out)["sticky"]["entries"]
        e = next(e for e in entries if e["key"] == "src/stick/127.0.0.1")
        assert e["backend"] == first and e["pool"] == "stick" and e["origin"] == "lb1"
        assert e["expires"] - time.time() > 500  # ttl 10m
        code, out, err = ctl(node, "tables")
        assert code == 0 and "src/stick/127.0.0.1" in out and f"front/tcp/{client}" in out
        code, out, _ = ctl(node, "tables", "sticky", "--prefix", "src/nope/", "--json")
        assert json.loads(out)["sticky"] == {"total": 0, "entries": []}
    finally:
        held.close()


def test_failover_without_election_and_unknown_names(node):
    for argv, needle in ((("failover", "vi1"), "no such instance 'vi1'"),
                         (("drain", "nope", "web1"), "no such pool 'nope'"),
                         (("enable", "web", "web9"), "no such backend 'web9' in pool 'web'"),
                         (("weight", "stick", "web9", "2"), "no such backend 'web9' in pool 'stick'")):
        code, out, err = ctl(node, *argv)
        assert code == 1, (argv, code, out, err)
        assert needle in err, (argv, err)
    assert node.halbd.alive()
    _, _, body = http_get(f"http://127.0.0.1:{node.metrics}/metrics")
    lines = body.decode().splitlines()
    assert any(l.startswith('halb_control_requests_total{') and 'method="Drain"' in l
               and 'code="NOT_FOUND"' in l and l.endswith(" 1.0") for l in lines), \
        [l for l in lines if "control" in l]


def test_watch_count(node):
    t0 = time.monotonic()
    code, out, err = halbctl_process("--socket", node.sock, "watch", "--interval", "0.3",
                                     "--count", "2")
    assert code == 0, err
    assert time.monotonic() - t0 >= 0.3
    assert out.count("node lb1") == 2 and "refresh 1/2" in out and "refresh 2/2" in out


def test_pki_init_certs_verify(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    code, out, err = halbctl("pki", "init", "--out", str(tmp_path), "lb1", "lb2", "--ip",
                             "lb2=198.18.80.2")
    assert code == 0, err
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    for n in ("lb1", "lb2"):
        cert = x509.load_pem_x509_certificate((tmp_path / f"{n}.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                               ec.ECDSA(cert.signature_hash_algorithm))
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == n
    code, _, err = halbctl("pki", "init", "--out", str(tmp_path), "lb1", "--ip", "lb1=nope")
    assert code == 1 and "invalid IP address" in err


def test_unreachable_node(node, tmp_path):
    # a socket file that nobody answers on, as a killed node leaves it
    dead = str(tmp_path / "dead.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(dead)
    s.close()
    code, _, err = halbctl("--socket", dead, "--timeout", "1", "status")
    assert code == 2 and "node unreachable" in err
    code, _, err = halbctl("--socket", str(tmp_path / "none.sock"), "drain", "web", "web1")
    assert code == 2 and "does not exist" in err
    p = node.pki
    code, _, err = halbctl("--address", f"127.0.0.1:{free_port()}", "--ca", str(p / "ca.pem"),
                           "--cert", str(p / "admin.pem"), "--key", str(p / "admin.key"),
                           "--timeout", "1", "status")
    assert code == 2 and "node unreachable" in err


def test_status_shows_what_a_node_knows_of_its_peers(tmp_path):
    """Two nodes replicating over mutual TLS: lb1's status lists lb2 as connected with its
    replication progress; after lb2 is killed, lb1 shows it disconnected."""
    code, _, err = halbctl("pki", "init", "--out", str(tmp_path / "pki"), "lb1", "lb2",
                           "--ip", "lb1=127.0.0.1", "--ip", "lb2=127.0.0.1")
    assert code == 0, err
    ports = {n: free_port() for n in ("lb1", "lb2")}
    lport = free_port()
    socks = {n: str(tmp_path / f"{n}.sock") for n in ports}
    with Backends(["b1"], http=False, tcp=True) as bk:
        cfgs = {}
        for n, other in (("lb1", "lb2"), ("lb2", "lb1")):
            cfgs[n] = write_config(tmp_path, f"""
[node]
name = "{n}"
[control]
socket = "{socks[n]}"
[[listeners]]
name = "front"
mode = "tcp"
bind = "127.0.0.1:{lport if n == 'lb1' else free_port()}"
pool = "stick"
[[pools]]
name = "stick"
[pools.sticky]
mode = "source"
[[pools.backends]]
name = "b1"
address = "{bk.tcp['b1']}"
[sync]
listen = "127.0.0.1:{ports[n]}"
[[sync.peers]]
name = "{other}"
address = "127.0.0.1:{ports[other]}"
[sync.tls]
cert = "{tmp_path / 'pki' / f'{n}.pem'}"
key = "{tmp_path / 'pki' / f'{n}.key'}"
ca = "{tmp_path / 'pki' / 'ca.pem'}"
""", name=f"{n}.toml")
        with Halbd(cfgs["lb1"]) as a, Halbd(cfgs["lb2"]) as b:
            a.wait_port(lport)

            def peer(sock, name):  # polled in-process: a halbctl process per poll is slow
                d = status_json(sock)
                if d is None:
                    return None
                assert d["sync_enabled"]
                return next((p for p in d["peers"] if p["name"] == name), None)

            p = wait_for(lambda: (x := peer(socks["lb1"], "lb2")) and x["connected"] and x, 20,
                         interval=0.3, what="lb1 to see lb2 connected")
            assert p["address"] == f"127.0.0.1:{ports['lb2']}"
            assert who(lport) == "b1"  # a sticky entry on lb1
            p = wait_for(lambda: (x := peer(socks["lb1"], "lb2")) and x["acked_seq"] >= 1
                         and x["lag_entries"] == 0 and x, 20, interval=0.3,
                         what="lb2 to acknowledge lb1's sticky entry")
            assert p["sent_entries"] >= 1
            code, out, _ = halbctl("--socket", socks["lb2"], "status", "--json")
            assert code == 0 and json.loads(out)["sync_ready"] is True  # lb2 learned from lb1
            assert json.loads(out)["peers"][0]["name"] == "lb1"
            code, out, err = halbctl("--socket", socks["lb1"], "status")
            assert code == 0 and "lb2" in out and "connected" in out, err
            b.kill()
            p = wait_for(lambda: (x := peer(socks["lb1"], "lb2")) and not x["connected"] and x, 20,
                         interval=0.3, what="lb1 to see lb2 gone")
            code, out, err = halbctl("--socket", socks["lb1"], "status")
            assert code == 0 and "disconnected" in out


def test_node_stopped_last(node):
    """Runs last in this module: stops the node and checks halbctl's answer and the cleanup."""
    assert node.halbd.stop() == 0
    assert not os.path.exists(node.sock), "halbd removes its control socket when it stops"
    code, _, err = halbctl_process("--config", str(node.cfg), "status")
    assert code == 2 and "does not exist" in err and "is halbd running" in err


def test_refusals_show_in_status_json_and_stderr_stays_json(tmp_path):
    """lb1's peer lb2 is played by two impostors: a follower with a certificate from another
    CA dials lb1 (an inbound refusal), and at lb2's address a server with a good certificate
    that names another node answers (an outbound refusal). Both are counted by reason in
    `halbctl status --json`; lb1's stderr is one JSON object per line throughout."""
    for d, nodes in (("pki", ["lb1", "lb9"]), ("other", ["lb2"])):
        code, _, err = halbctl("pki", "init", "--out", str(tmp_path / d), *nodes,
                               *[f"--ip={n}=127.0.0.1" for n in nodes])
        assert code == 0, err
    ports = {n: free_port() for n in ("lb1", "lb2", "x")}
    sock = str(tmp_path / "lb1.sock")

    def node(name, me, peer, peer_port, pki, ca=None):
        return write_config(tmp_path, f"""
[node]
name = "{name}"
[control]
socket = "{tmp_path / f'{name}-{me}.sock'}"
[[pools]]
name = "p"
[[pools.backends]]
address = "127.0.0.1:9"
[sync]
listen = "127.0.0.1:{ports[me]}"
[[sync.peers]]
name = "{peer}"
address = "127.0.0.1:{peer_port}"
[sync.tls]
cert = "{tmp_path / pki / f'{name}.pem'}"
key = "{tmp_path / pki / f'{name}.key'}"
ca = "{ca or tmp_path / pki / 'ca.pem'}"
""", name=f"{name}-{me}.toml")
    both = tmp_path / "both.pem"
    both.write_bytes((tmp_path / "pki" / "ca.pem").read_bytes() + (tmp_path / "other" / "ca.pem").read_bytes())
    lb1 = node("lb1", "lb1", "lb2", ports["lb2"], "pki")
    lb1 = Path(str(lb1))
    lb1.write_text(lb1.read_text().replace(f'socket = "{tmp_path / "lb1-lb1.sock"}"', f'socket = "{sock}"'))
    foreign = node("lb2", "x", "lb1", ports["lb1"], "other", ca=both)   # dials lb1
    wrong = node("lb9", "lb2", "lb1", free_port(), "pki")               # answers as lb9
    with Halbd(lb1) as a, Halbd(foreign), Halbd(wrong):
        def refusals():
            d = status_json(sock)
            p = d and next((p for p in d["peers"] if p["name"] == "lb2"), None)
            if not p:
                return None
            got = {(r["direction"], r["reason"]) for r in p.get("refusals", [])}
            return p if {("in", "tls_unknown_ca"), ("out", "tls_name_mismatch")} <= got else None
        p = wait_for(refusals, 20, interval=0.3, what="both refusals in lb1's status")
        assert int(p["refused_in"]) >= 1 and int(p["refused_out"]) >= 1
        code, out, err = halbctl("--socket", sock, "status", "--json")
        assert code == 0, err
        st = json.loads(out)
        peer = next(x for x in st["peers"] if x["name"] == "lb2")
        assert int(peer["refused"]) == int(peer["refused_in"]) + int(peer["refused_out"])
        time.sleep(0.5)
        lines = [ln for ln in a.output().splitlines() if ln.strip()]
        assert lines
        bad = []
        for ln in lines:
            try:
                json.loads(ln)
            except ValueError:
                bad.append(ln)
        assert not bad, bad[:5]
        recs = [json.loads(ln) for ln in lines]
        assert any(r["event"] == "sync_refused" and r.get("direction") == "in"
                   and r.get("reason") == "tls_unknown_ca" for r in recs)
