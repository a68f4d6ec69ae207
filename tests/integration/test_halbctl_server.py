"""halbctl against the control server running in this process over the parts of a node.

The server is given real pools (halb.model), real tables (halb.tables) and scripted election
and sync parts, so every control call and every error path of the gRPC edge is exercised here,
including those that need an elected master (failover) or sync peers. The same commands run
against real halbd processes in test_halbctl.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time

import grpc
import pytest

from halb.cli import halbctl
from halb.clock import MonotonicClock, WallClock
from halb.config import ConfigError, loads
from halb.control.api import ControlTargets
from halb.control.server import ControlServer
from halb.model import Pool
from halb.tables import Tables, sticky_key, flow_key

pytestmark = pytest.mark.integration


class FirstUp:
    """A trivial balancer: the first backend of the view (enough to see drains take effect)."""

    def rebuild(self, view):
        pass

    def pick(self, view, key, exclude):
        for b in view.backends:
            if b not in exclude:
                return b
        return None


class Election:
    def __init__(self):
        self.instances = {"vi1": {"name": "vi1", "vrid": 51, "interface": "veth0", "state": "master",
                                  "priority": 150, "base_priority": 150,
                                  "vips": ["198.18.0.100/24"], "master": "198.18.0.1",
                                  "advert_interval": 0.1, "preempt": True, "since": 12.5},
                          "vi2": {"name": "vi2", "vrid": 52, "interface": "veth0", "state": "backup",
                                  "priority": 100, "base_priority": 100,
                                  "vips": ["198.18.0.101/24"], "master": "198.18.0.2",
                                  "advert_interval": 1.0, "preempt": False}}

    def status(self):
        return [dict(v) for v in self.instances.values()]

    async def handover(self, name):
        inst = self.instances[name]  # KeyError: unknown
        if inst["state"] != "master":
            raise ValueError(f"{name} is {inst['state']}, not master")
        inst["state"] = "backup"


class Sync:
    ready = False

    def status(self):
        return [{"name": "lb2", "address": "198.18.0.2:7001", "connected": True,
                 "state": "streaming", "lag_entries": 3, "lag_seconds": 0.002, "acked_seq": 1234,
                 "epoch": 99, "last_error": "", "refused": 0},
                {"name": "lb3", "address": "198.18.0.3:7001", "connected": False,
                 "state": "backoff", "lag_entries": 0, "lag_seconds": 0.0, "acked_seq": 0,
                 "epoch": 0, "last_error": "connection refused", "refused": 2}]


class Broken:
    def status(self):
        raise RuntimeError("boom")


def parts(cfg, election=None, sync=None) -> ControlTargets:
    """What the control server reads and acts on, built from ``cfg`` like a node's."""
    name = cfg.node.name
    return ControlTargets(name=name, config=cfg,
                          pools={pc.name: Pool(pc, FirstUp()) for pc in cfg.pools},
                          tables=Tables(name, WallClock(), sticky_max=5000, flow_max=5000),
                          clock=MonotonicClock(), election=election, sync=sync)


class Running:
    """The control server on its own event loop thread."""

    def __init__(self, targets: ControlTargets):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ControlServer(targets.config.control, targets=targets)

    def run(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self):
        self.run(self.server.start())
        return self

    def __exit__(self, *exc):
        try:
            self.run(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


CONFIG = """
[node]
name = "lb1"
[control]
socket = "{sock}"
[[pools]]
name = "web"
[[pools.backends]]
name = "web1"
address = "127.0.0.1:9001"
weight = 3
[[pools.backends]]
name = "web2"
address = "127.0.0.1:9002"
[[pools.backends]]
name = "spare"
address = "127.0.0.1:9003"
backup = true
[[pools]]
name = "api"
[[pools.backends]]
name = "api1"
address = "127.0.0.1:9101"
"""


@pytest.fixture
def sock(tmp_path):
    return str(tmp_path / "run" / "lb1.sock")


@pytest.fixture
def node(sock):
    """The node's parts the control server is given (``ControlTargets``)."""
    return parts(loads(CONFIG.format(sock=sock)), election=Election(), sync=Sync())


@pytest.fixture
def running(node):
    with Running(node) as r:
        yield r


def ctl(capsys, sock, *argv):
    code = halbctl.main(["--socket", sock, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_socket_is_private_and_replaces_a_stale_one(node, sock, tmp_path):
    os.makedirs(os.path.dirname(sock))
    import socket as so
    s = so.socket(so.AF_UNIX)
    s.bind(sock)  # a socket file nobody listens on: what a killed node leaves behind
    s.close()
    with Running(node):
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        # a second server on the same live socket refuses to steal it
        other = ControlServer(node.config.control, targets=node)
        with pytest.raises(OSError, match="in use"):
            asyncio.run(other.start())
    assert not os.path.exists(sock), "socket file removed at stop"


def test_refuses_to_remove_a_file_that_is_not_a_socket(node, sock):
    os.makedirs(os.path.dirname(sock))
    open(sock, "w").close()
    with pytest.raises(OSError, match="not a socket"):
        asyncio.run(ControlServer(node.config.control, targets=node).start())
    assert os.path.isfile(sock)


def test_status_table_shows_every_part(running, sock, capsys):
    code, out, err = ctl(capsys, sock, "status")
    assert code == 0, err
    assert "node lb1" in out
    for needle in ("vi1", "master", "198.18.0.100/24", "vi2", "backup",  # election
                   "lb2", "198.18.0.2:7001", "connected", "lb3", "disconnected",
                   "connection refused", "still being learned",  # peers as this node sees them
                   "web1", "web2", "spare", "api1", "127.0.0.1:9001",  # pools
                   "sticky", "flow"):
        assert needle in out, f"{needle!r} missing from status output:\n{out}"


def test_status_json(running, node, sock, capsys):
    node.tables.sticky.put(sticky_key("src", "web", "10.0.0.1"), "web1", 60, pool="web")
    code, out, _ = ctl(capsys, sock, "status", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["node"]["name"] == "lb1" and d["node"]["pid"] == os.getpid()
    assert d["election_enabled"] and d["sync_enabled"] and d["sync_ready"] is False
    node.sync.ready = True
    assert json.loads(ctl(capsys, sock, "status", "--json")[1])["sync_ready"] is True
    inst = {i["name"]: i for i in d["instances"]}
    assert inst["vi1"]["state"] == "master" and inst["vi1"]["vrid"] == 51
    assert inst["vi1"]["advert_interval"] == pytest.approx(0.1)
    assert inst["vi1"]["state_seconds"] == pytest.approx(12.5)
    peers = {p["name"]: p for p in d["peers"]}
    assert peers["lb2"]["connected"] is True and peers["lb2"]["lag_entries"] == 3
    assert peers["lb2"]["acked_seq"] == 1234 and peers["lb3"]["refused"] == 2
    web = next(p for p in d["pools"] if p["name"] == "web")
    b = {x["name"]: x for x in web["backends"]}
    assert b["web1"]["state"] == "up" and b["web1"]["weight"] == 3
    assert b["web1"]["effective_weight"] == 3 and b["spare"]["backup"] is True
    assert b["spare"]["effective_weight"] == 0  # primaries up: the backup is not in the view
    tables = {t["name"]: t for t in d["tables"]}
    assert tables["sticky"]["size"] == 1 and tables["flow"]["size"] == 0


def test_backends_lists_one_pool_or_all(running, node, sock, capsys):
    web = node.pools["web"]
    b1 = web.by_name["web1"]
    web.acquire(b1)
    web.acquire(b1)
    code, out, _ = ctl(capsys, sock, "backends", "web", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == {"web1", "web2", "spare"}
    assert rows["web1"]["active"] == 2 and rows["web1"]["total"] == 2
    code, out, _ = ctl(capsys, sock, "backends")
    assert code == 0 and "api1" in out and "web2" in out
    code, out, err = ctl(capsys, sock, "backends", "nope")
    assert code == 1 and "no such pool 'nope'" in err and "web" in err


def test_drain_enable_change_what_the_pool_picks(running, node, sock, capsys):
    web = node.pools["web"]
    assert web.pick().name == "web1"
    code, out, _ = ctl(capsys, sock, "drain", "web", "web1")
    assert code == 0 and "web/web1: drain" in out
    assert web.by_name["web1"].admin_drain and web.pick().name == "web2"
    assert all(b.name != "web1" for b in web.view.backends)
    code, out, _ = ctl(capsys, sock, "drain", "web", "web2")
    assert code == 0
    assert web.pick().name == "spare" and web.view.backup  # every primary drained: backups serve
    for name in ("web1", "web2"):
        code, out, _ = ctl(capsys, sock, "enable", "web", name)
        assert code == 0 and f"web/{name}: up" in out
    assert web.pick().name == "web1" and not web.view.backup


def test_weight(running, node, sock, capsys):
    web = node.pools["web"]
    code, out, _ = ctl(capsys, sock, "weight", "web", "web2", "7")
    assert code == 0 and "weight 7" in out
    assert dict(zip((b.name for b in web.view.backends), web.view.weights))["web2"] == 7
    code, out, _ = ctl(capsys, sock, "weight", "web", "web2", "0", "--json")
    assert code == 0
    assert json.loads(out)["state"] == "drain" and json.loads(out)["name"] == "web2"
    assert json.loads(out)["weight"] == 0 and json.loads(out)["effective_weight"] == 0
    assert "web2" not in [b.name for b in web.view.backends]
    for bad in ("-1", "257", "99999999999"):
        code, _, err = ctl(capsys, sock, "weight", "web", "web2", bad)
        assert code == 1 and "out of range" in err, (bad, err)
    code, _, err = ctl(capsys, sock, "weight", "web", "web2", "heavy")
    assert code == 1 and "not a whole number" in err
    assert web.by_name["web2"].weight == 0


def test_unknown_names(running, sock, capsys):
    for argv, needle in ((("drain", "nope", "web1"), "no such pool 'nope'"),
                         (("enable", "web", "nope"), "no such backend 'nope' in pool 'web'"),
                         (("weight", "api", "web1", "2"), "no such backend 'web1' in pool 'api'"),
                         (("failover", "nope"), "no such instance 'nope'")):
        code, out, err = ctl(capsys, sock, *argv)
        assert code == 1, (argv, code, err)
        assert needle in err, (argv, err)


def test_failover(running, node, sock, capsys):
    code, out, err = ctl(capsys, sock, "failover", "vi1", "--json")
    assert code == 0, err
    assert json.loads(out)["name"] == "vi1" and json.loads(out)["state"] == "backup"
    assert node.election.instances["vi1"]["state"] == "backup"
    code, out, err = ctl(capsys, sock, "failover", "vi2")  # not master: refused
    assert code == 1 and "cannot hand over: instance 'vi2': vi2 is backup, not master" in err


def test_failover_without_election(sock, capsys):
    node = parts(loads(CONFIG.format(sock=sock)))
    with Running(node):
        code, _, err = ctl(capsys, sock, "failover", "vi1")
        assert code == 1 and "runs no election" in err
        code, out, _ = ctl(capsys, sock, "status")
        assert code == 0 and "election: not configured" in out and "sync not configured" in out


def test_tables_paged(running, node, sock, capsys):
    for i in range(2500):
        node.tables.sticky.put(sticky_key("src", "web", f"10.0.{i // 256}.{i % 256}"),
                               "web1" if i % 2 else "web2", 300, pool="web")
    node.tables.flow.put(flow_key("dns", "udp", "10.1.0.1:5353"), "api1", 30, pool="api",
                         client="10.1.0.1:5353", listener="dns", proto="udp")
    code, out, _ = ctl(capsys, sock, "tables", "sticky", "--limit", "2200", "--json")
    assert code == 0
    d = json.loads(out)["sticky"]
    assert d["total"] == 2500 and len(d["entries"]) == 2200  # three pages of <= 1000
    keys = [e["key"] for e in d["entries"]]
    assert keys == sorted(keys) and len(set(keys)) == 2200
    e = d["entries"][0]
    assert e["pool"] == "web" and e["origin"] == "lb1" and e["expires"] > time.time()
    code, out, _ = ctl(capsys, sock, "tables", "--prefix", "src/web/10.0.1.", "--json")
    d = json.loads(out)
    assert d["sticky"]["total"] == 256 and len(d["sticky"]["entries"]) == 100  # default limit
    assert all(x["key"].startswith("src/web/10.0.1.") for x in d["sticky"]["entries"])
    assert d["flow"]["total"] == 0
    code, out, _ = ctl(capsys, sock, "tables", "flow")
    assert code == 0 and "dns/udp/10.1.0.1:5353" in out and "1 of 1" in out
    code, out, _ = ctl(capsys, sock, "tables", "nat")
    assert code == 0 and "nat: 0 of 0 entries" in out
    code, _, err = ctl(capsys, sock, "tables", "conntrack")
    assert code == 1 and "invalid choice" in err
    code, _, err = ctl(capsys, sock, "tables", "--limit", "0")
    assert code == 1 and "out of range" in err


def test_concurrent_dumps_of_one_table_page_through_all_of_it(running, node, sock):
    """Several clients dump the same table at once, with and without a prefix: each pages
    through every key exactly once, in order (the server sorts one prefix at a time per
    table and lets requests for the prefix being sorted join that sort)."""
    from halb.v1 import control_pb2 as pb, control_pb2_grpc as pb_grpc

    async def fill():  # on the node's loop, which owns the table
        for i in range(5000):
            node.tables.sticky.put(sticky_key("src", "web", f"10.{i % 7}.{i // 256}.{i % 256}"),
                                   "web1", 300, pool="web")

    running.run(fill())
    keys = sorted(node.tables.sticky._entries)
    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def client(n, prefix):
        try:
            with grpc.insecure_channel(f"unix:{sock}") as ch:
                stub = pb_grpc.ControlStub(ch)
                seen, token = [], ""
                while True:
                    r = stub.DumpTable(pb.DumpTableRequest(table="sticky", prefix=prefix,
                                                           page_size=700, page_token=token),
                                       timeout=10)
                    seen += [e.key for e in r.entries]
                    token = r.next_page_token
                    if not token:
                        break
                results[n] = seen
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    prefixes = ["", "src/web/10.3.", "", "src/web/10.3.", "src/web/10.5."]
    threads = [threading.Thread(target=client, args=(n, p)) for n, p in enumerate(prefixes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    for n, p in enumerate(prefixes):
        assert results[n] == [k for k in keys if k.startswith(p)], p
    assert len(results[0]) == 5000


def test_dump_table_errors_from_the_api(running, sock):
    from halb.v1 import control_pb2 as pb, control_pb2_grpc as pb_grpc
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        stub = pb_grpc.ControlStub(ch)
        for req, code, needle in (
                (pb.DumpTableRequest(table="conntrack"), grpc.StatusCode.NOT_FOUND,
                 "no such table 'conntrack' (tables: sticky, flow, nat)"),
                (pb.DumpTableRequest(table="sticky", page_size=1001), grpc.StatusCode.INVALID_ARGUMENT,
                 "page_size 1001 too large"),
                (pb.DumpTableRequest(table="sticky", page_token="zz"), grpc.StatusCode.INVALID_ARGUMENT,
                 "invalid page_token")):
            with pytest.raises(grpc.RpcError) as ei:
                stub.DumpTable(req, timeout=3)
            assert ei.value.code() == code and needle in ei.value.details()
        with pytest.raises(grpc.RpcError) as ei:
            stub.Drain(pb.BackendRef(pool="", backend="web1"), timeout=3)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "pool name is required" in ei.value.details()
        # the server is still fine after the bad requests
        assert stub.Status(pb.StatusRequest(), timeout=3).node.name == "lb1"


def test_a_failing_part_gives_internal_not_a_dead_node(sock, capsys):
    node = parts(loads(CONFIG.format(sock=sock)), sync=Broken())
    with Running(node):
        code, _, err = ctl(capsys, sock, "status")
        assert code == 3 and "INTERNAL" in err and "boom" in err
        code, out, _ = ctl(capsys, sock, "drain", "web", "web1")  # other calls still work
        assert code == 0


def test_health_and_reflection(running, sock):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for svc in ("", "halb.v1.Control"):
            r = h.Check(health_pb2.HealthCheckRequest(service=svc), timeout=3)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = list(refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=3))
        names = {s.name for s in resp[0].list_services_response.service}
        assert {"halb.v1.Control", "grpc.health.v1.Health"} <= names


def test_watch_count(running, sock, capsys):
    t0 = time.monotonic()
    code, out, err = ctl(capsys, sock, "watch", "--interval", "0.2", "--count", "2")
    assert code == 0, err
    assert time.monotonic() - t0 >= 0.2
    assert out.count("node lb1") == 2 and "refresh 2/2" in out


def test_unreachable(tmp_path, capsys):
    missing = str(tmp_path / "nobody.sock")
    code, _, err = ctl(capsys, missing, "status")
    assert code == 2 and "does not exist" in err
    import socket as so
    dead = str(tmp_path / "dead.sock")
    s = so.socket(so.AF_UNIX)
    s.bind(dead)  # exists, nobody listens
    s.close()
    t0 = time.monotonic()
    code, _, err = ctl(capsys, dead, "--timeout", "1", "status")  # option after --socket value
    assert code == 2 and "node unreachable" in err, err
    assert time.monotonic() - t0 < 3


def _verify_signed_by(cert_path, ca_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    ca = x509.load_pem_x509_certificate(open(ca_path, "rb").read())
    cert = x509.load_pem_x509_certificate(open(cert_path, "rb").read())
    assert cert.issuer == ca.subject
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                           ec.ECDSA(cert.signature_hash_algorithm))  # raises if forged
    cert.verify_directly_issued_by(ca)
    return cert


def test_pki_init_then_mutual_tls_control(tmp_path, capsys):
    from cryptography import x509
    pki = tmp_path / "pki"
    code, out, err = ctl(capsys, "unused", "pki", "init", "--out", str(pki), "lb1", "admin",
                         "--ip", "lb1=127.0.0.1")
    assert code == 0, err
    assert "lb1" in out and "admin" in out and str(pki / "ca.pem") in out
    for n in ("lb1", "admin"):
        cert = _verify_signed_by(pki / f"{n}.pem", pki / "ca.pem")
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert n in san.get_values_for_type(x509.DNSName)
        assert stat.S_IMODE(os.stat(pki / f"{n}.key").st_mode) == 0o600
    lb1_san = x509.load_pem_x509_certificate((pki / "lb1.pem").read_bytes()).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in lb1_san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # a second CA: its certificates must be refused by the node
    other = tmp_path / "other"
    assert ctl(capsys, "unused", "pki", "init", "--out", str(other), "admin")[0] == 0

    from tests.helpers import free_port
    port = free_port()
    sock = str(tmp_path / "lb1.sock")
    text = CONFIG.format(sock=sock).replace(
        f'socket = "{sock}"', f'socket = "{sock}"\naddress = "127.0.0.1:{port}"')
    cfg = loads(text + f"""
[control.tls]
cert = "{pki / 'lb1.pem'}"
key = "{pki / 'lb1.key'}"
ca = "{pki / 'ca.pem'}"
""")
    node = parts(cfg)
    tls = ["--address", f"127.0.0.1:{port}", "--ca", str(pki / "ca.pem")]
    with Running(node):
        code, out, err = ctl(capsys, sock, *tls, "--cert", str(pki / "admin.pem"),
                             "--key", str(pki / "admin.key"), "status", "--json")
        assert code == 0, err
        assert json.loads(out)["node"]["name"] == "lb1"
        code, out, err = ctl(capsys, sock, *tls, "--cert", str(pki / "admin.pem"),
                             "--key", str(pki / "admin.key"), "--server-name", "lb1",
                             "drain", "web", "web2")
        assert code == 0 and node.pools["web"].by_name["web2"].admin_drain
        # a client certificate from another CA: the handshake fails, the node stays up
        code, _, err = ctl(capsys, sock, *tls, "--cert", str(other / "admin.pem"),
                           "--key", str(other / "admin.key"), "--timeout", "2", "status")
        assert code == 2 and "unreachable" in err
        code, _, err = ctl(capsys, sock, "--address", f"127.0.0.1:{port}", "status")
        assert code == 1 and "needs --ca, --cert and --key" in err
        assert ctl(capsys, sock, "status")[0] == 0  # the unix socket serves alongside


def test_pki_init_bad_input(tmp_path, capsys):
    out = str(tmp_path / "pki")
    for argv, needle in ((("lb1", "--ip", "lb9=10.0.0.1"), "unknown node 'lb9'"),
                         (("lb1", "--ip", "lb1=10.0.0.300"), "invalid IP address"),
                         (("lb1", "--ip", "lb1"), "expected NODE=IP"),
                         (("bad name",), "invalid node name")):
        code, _, err = ctl(capsys, "unused", "pki", "init", "--out", out, *argv)
        assert code == 1 and needle in err, (argv, err)
    assert not os.path.exists(out)


def test_tcp_port_taken_fails_start_cleanly(tmp_path, sock):
    import socket as so
    taken = so.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    from halb import pki
    made = pki.generate(tmp_path / "pki", ["lb1"])
    text = CONFIG.format(sock=sock).replace(
        f'socket = "{sock}"', f'socket = "{sock}"\naddress = "127.0.0.1:{port}"')
    cfg = loads(text + f"""
[control.tls]
cert = "{made['nodes']['lb1']['cert']}"
key = "{made['nodes']['lb1']['key']}"
ca = "{made['ca']['cert']}"
""")
    try:
        with pytest.raises(OSError, match=f"cannot listen on control address 127.0.0.1:{port}"):
            asyncio.run(ControlServer(cfg.control, targets=parts(cfg)).start())
        assert not os.path.exists(sock), "the unix socket is not left behind"
        # a certificate file that is missing is a config error naming the key
        with pytest.raises(ConfigError, match="control.tls.cert: no such file .*missing.pem"):
            loads(text + f"""
[control.tls]
cert = "{tmp_path / 'missing.pem'}"
key = "{made['nodes']['lb1']['key']}"
ca = "{made['ca']['cert']}"
""")
    finally:
        taken.close()


def test_watch_on_a_terminal_redraws_live(running, sock):
    import pty
    import subprocess
    import sys
    from tests.helpers import ROOT
    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="160", LINES="80", PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "halb.cli.halbctl", "--socket", sock, "watch",
                          "--interval", "0.2", "--count", "3"], stdout=slave, stderr=slave,
                         cwd=str(ROOT), env=env)
    os.close(slave)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        assert p.wait(timeout=20) == 0, out[-2000:]
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
    text = out.decode(errors="replace")
    assert "halbctl watch: every 0.2s" in text
    assert text.count("node lb1") >= 3  # the first frame and two redraws
    assert "\x1b[" in text  # drawn with terminal control sequences (rich Live), not appended


def test_garbage_and_oversized_requests_are_refused_and_the_server_lives_on(running, sock):
    from halb.v1 import control_pb2 as pb, control_pb2_grpc as pb_grpc
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        raw = ch.unary_unary("/halb.v1.Control/Drain", request_serializer=None,
                             response_deserializer=None)
        with pytest.raises(grpc.RpcError) as ei:
            raw(b"\xff\xff\xff\xff not a protobuf", timeout=3)
        assert ei.value.code() != grpc.StatusCode.OK
        unknown = ch.unary_unary("/halb.v1.Control/Explode", request_serializer=None,
                                 response_deserializer=None)
        with pytest.raises(grpc.RpcError) as ei:
            unknown(b"", timeout=3)
        assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
        stub = pb_grpc.ControlStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            stub.DumpTable(pb.DumpTableRequest(table="sticky", prefix="x" * 100_000), timeout=3)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # 64 KiB request limit
        with pytest.raises(grpc.RpcError) as ei:
            stub.DumpTable(pb.DumpTableRequest(table="sticky", prefix="x" * 2000), timeout=3)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prefix too long" in ei.value.details()
        assert stub.Status(pb.StatusRequest(), timeout=3).node.name == "lb1"


def test_other_users_cannot_use_the_socket(node):
    """The socket's mode is the access control: a user other than its owner is turned away by
    the kernel, and halbctl says so. (A forked child drops to uid 65534: the venv's python is
    not reachable for that user, so it cannot be exec'd as it.)"""
    import contextlib
    import io
    import shutil
    import socket as so
    import tempfile
    d = tempfile.mkdtemp(prefix="halbctl-perm-")
    try:
        os.chmod(d, 0o755)  # the directory is open: only the socket's own mode protects it
        path = os.path.join(d, "lb1.sock")
        with Running(parts(loads(CONFIG.format(sock=path)))):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: no gRPC use before the permission check fails
                try:
                    os.close(r)
                    os.setgid(65534)
                    os.setuid(65534)
                    s = so.socket(so.AF_UNIX)
                    try:
                        s.connect(path)
                        res = "CONNECTED"
                    except PermissionError:
                        res = "EACCES"
                    err = io.StringIO()
                    with contextlib.redirect_stderr(err):
                        code = halbctl.main(["--socket", path, "status"])
                    os.write(w, json.dumps([res, code, err.getvalue()]).encode())
                finally:
                    os._exit(0)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                data = f.read()
            os.waitpid(pid, 0)
            res, code, err = json.loads(data)
            assert res == "EACCES"
            assert code == 2 and "permission denied on control socket" in err, err
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_control_tls_refusals_are_counted_and_good_clients_served(tmp_path):
    """control.address with [control.tls]: an admin certificate from the cluster CA is served;
    one from a foreign CA is refused in the handshake, counted by reason in the status reply
    (control_refusals) and in halb_control_refusals_total, and logged as control_refused."""
    import subprocess
    import sys

    from prometheus_client import generate_latest

    from halb import pki
    from halb.config import loads as _loads
    from tests.helpers import ROOT, free_port
    good = pki.generate(tmp_path / "good", ["lb1", "admin"], ips={"lb1": ["127.0.0.1"]})
    other = pki.generate(tmp_path / "other", ["admin"])
    port = free_port()
    cfg = _loads(f"""
[node]
name = "lb1"
state_dir = "{tmp_path}"
[[pools]]
name = "p"
[[pools.backends]]
address = "127.0.0.1:9"
[control]
socket = "{tmp_path / 'c.sock'}"
address = "127.0.0.1:{port}"
[control.tls]
cert = "{good['nodes']['lb1']['cert']}"
key = "{good['nodes']['lb1']['key']}"
ca = "{good['ca']['cert']}"
""")
    from prometheus_client import CollectorRegistry
    registry = CollectorRegistry()

    def ctl(res):
        return subprocess.run([sys.executable, "-m", "halb.cli.halbctl", "--address",
                               f"127.0.0.1:{port}", "--ca", good["ca"]["cert"], "--cert",
                               res["nodes"]["admin"]["cert"], "--key", res["nodes"]["admin"]["key"],
                               "--timeout", "3", "status", "--json"],
                              capture_output=True, text=True, timeout=20, cwd=str(ROOT),
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))

    async def main():
        srv = ControlServer(cfg.control, targets=parts(cfg), registry=registry)
        await srv.start()
        try:
            loop = asyncio.get_running_loop()
            bad = await loop.run_in_executor(None, ctl, other)
            assert bad.returncode == 2, bad.stderr
            ok = await loop.run_in_executor(None, ctl, good)
            assert ok.returncode == 0, ok.stderr
            st = json.loads(ok.stdout)
            reasons = {r["reason"] for r in st["control_refusals"]}
            assert "tls_unknown_ca" in reasons, st["control_refusals"]
            assert all(r["direction"] == "in" and r["remote"] == "127.0.0.1"
                       for r in st["control_refusals"])
            text = generate_latest(registry).decode()
            assert 'halb_control_refusals_total{reason="tls_unknown_ca"}' in text
        finally:
            await srv.stop()
    asyncio.run(main())
