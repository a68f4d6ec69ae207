"""python -m lab: up builds a working lab, refuses a second one, status reports it, down
removes everything, also after an interrupted run; the active-active topology splits the VIPs.

Names hl6-*, addresses 198.18.60.0/24 (reserved for these tests; 2001:2:0:60::/64 with
--family 6).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from lab import netns as nx
from lab.lab import RUN_ROOT, Lab, LabError, clean, http_get
from lab.topology import DEFAULT, Topology

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "hl6"
SUBNET = "198.18.60.0/24"
TOPO = replace(DEFAULT, prefix=PREFIX, subnet=SUBNET)
CLI = [sys.executable, "-m", "lab"]
ARGS = ["--prefix", PREFIX, "--subnet", SUBNET]


def lab_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT))


def our_processes() -> list[str]:
    """Processes that belong to an hl6 lab: halbd with its config there, or its backends."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"{RUN_ROOT}/{PREFIX}/" in cmd or ("lab.backend" in cmd and "198.18.60." in cmd):
            out.append(f"{d}: {cmd}")
    return out


def nothing_left() -> list[str]:
    left = [n for n in nx.list_ns() if n.startswith(PREFIX + "-")]
    with nx.ipr() as ip:
        left += [l.get_attr("IFLA_IFNAME") for l in ip.get_links()
                 if (l.get_attr("IFLA_IFNAME") or "").startswith(PREFIX + "-")]
    if (RUN_ROOT / PREFIX).exists():
        left.append(str(RUN_ROOT / PREFIX))
    return left + our_processes()


@pytest.fixture
def cleanup():
    clean(PREFIX)  # an interrupted earlier run of these tests
    yield
    clean(PREFIX)
    assert not nothing_left()


def test_topology_description_is_validated():
    with pytest.raises(ValueError, match="198.18.0.0/15"):
        Topology(subnet="10.0.0.0/24")
    with pytest.raises(ValueError, match="prefix"):
        Topology(prefix="has-dash")
    with pytest.raises(ValueError, match="active-active needs at least 2"):
        Topology(mode="active-active", lbs=1)
    aa = Topology(mode="active-active")
    assert [i.owner() for i in aa.instances] == ["lb1", "lb2"]  # crossed priorities
    assert aa.vips == ["198.18.0.100", "198.18.0.101"]


def test_up_status_refuse_and_down(cleanup):
    r = lab_cli("up", *ARGS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{TOPO.vips[0]} on lb1" in r.stdout
    lab = Lab.load(PREFIX)
    assert {h.netns for h in TOPO.hosts} | {TOPO.switch_netns} <= set(nx.list_ns())
    # every config it wrote is valid for halbd, with sync over mutual TLS
    for h in TOPO.lb_hosts:
        chk = subprocess.run([sys.executable, "-m", "halb.cli.halbd", "--check",
                              str(lab.config_path(h.name))], capture_output=True, text=True, timeout=30)
        assert chk.returncode == 0, chk.stderr
        assert "[sync.tls]" in lab.config_path(h.name).read_text()
    assert (lab.pki_dir / "ca.pem").exists()
    # the VIP is held by the primary only and answers HTTP from the client namespace,
    # proxied by lb1 (the backend echoes the address the request came from)
    assert lab.vip_holders() == {TOPO.vips[0]: ["lb1"]}
    status, headers, body = lab.in_client(http_get, TOPO.vips[0], 80, "/x")
    assert status == 200 and headers["x-backend"] in ("web1", "web2", "web3")
    assert "halbsrv=" in headers.get("set-cookie", "").lower()
    assert json.loads(body)["client"].startswith(str(TOPO.lb("lb1").address.ip) + ":")
    # a second lab with the same prefix is refused, clearly, and the first is untouched
    r2 = lab_cli("up", *ARGS)
    assert r2.returncode == 1
    assert "still standing" in r2.stderr and f"down --prefix {PREFIX}" in r2.stderr
    assert lab.vip_holders() == {TOPO.vips[0]: ["lb1"]}
    # status (JSON) reports namespaces, processes, VIP holders and what halbctl says
    st = lab_cli("status", "--prefix", PREFIX, "--json")
    assert st.returncode == 0, st.stderr
    d = json.loads(st.stdout)
    assert d["vips"] == {TOPO.vips[0]: ["lb1"]}
    assert all(p["alive"] for p in d["processes"].values()) and len(d["processes"]) == 5
    assert all(d["namespaces"].values())
    assert json.loads(d["halbctl"]["lb2"])  # halbctl status --json through the control socket
    pids = list(lab.pids.values())
    r3 = lab_cli("down", "--prefix", PREFIX)
    assert r3.returncode == 0, r3.stderr
    assert not nothing_left()
    assert not any(os.path.exists(f"/proc/{p}") and Path(f"/proc/{p}/cmdline").read_bytes()
                   for p in pids)


def test_down_cleans_up_after_an_interrupted_up(cleanup):
    p = subprocess.Popen(CLI + ["up"] + ARGS, cwd=str(ROOT), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    # interrupt it mid-build: once the first halbd was started (or after 20 s at the latest)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any("halb.cli.halbd" in x for x in our_processes()):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(10)
    assert nothing_left(), "the interrupted run should have left something to clean up"
    # the state file is not even needed: remove it to simulate a crash before it was written
    sf = RUN_ROOT / PREFIX / "state.json"
    if sf.exists():
        sf.unlink()
    r = lab_cli("down", "--prefix", PREFIX)
    assert r.returncode == 0, r.stderr
    assert not nothing_left(), nothing_left()
    # and a new lab comes up cleanly afterwards
    lab = Lab(TOPO)
    try:
        lab.up(wait=False)
        with pytest.raises(LabError, match="still standing"):
            Lab(TOPO).up()
    finally:
        lab.down()


def test_active_active_splits_the_vips(cleanup):
    topo = replace(TOPO, mode="active-active")
    lab = Lab(topo)
    try:
        lab.up()
        v1, v2 = topo.vips
        assert lab.vip_holders() == {v1: ["lb1"], v2: ["lb2"]}
        for vip, node in ((v1, "lb1"), (v2, "lb2")):
            status, headers, body = lab.in_client(http_get, vip, 80, "/aa")
            assert status == 200
            assert json.loads(body)["client"].startswith(str(topo.lb(node).address.ip) + ":")
    finally:
        lab.down()
    assert not nothing_left()


# -- the measuring, on hand-made inputs (no namespaces) ------------------------------------------


def _log_line(wall: float, event: str, **kw) -> str:
    import datetime as dt
    ts = dt.datetime.fromtimestamp(wall, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return json.dumps({"ts": ts, "level": "info", "node": "x", "part": "vrrp", "event": event, **kw},
                      separators=(",", ":"))


def test_master_intervals_and_double_master_from_logs(tmp_path):
    lab = Lab(TOPO, run_root=tmp_path)
    lab.log_dir.mkdir(parents=True)
    off = time.time() - time.monotonic()
    t0 = time.monotonic() - 10  # lb1 master from t0+1 (frozen from t0+3 on, never steps down
    # until t0+5.2); lb2 master from t0+3.4 to t0+5.25; lb1 killed at t0+8
    lab.log_path("lb1").write_text("\n".join([
        _log_line(off + t0 + 1.0, "vrrp_state", instance="vi1", old="backup", new="master"),
        _log_line(off + t0 + 1.0, "vrrp_state", instance="vi2", old="backup", new="master"),
        "not json", _log_line(off + t0 + 1.01, "vips_added", instance="vi1")]) + "\n")
    lab.log_path("lb2").write_text("\n".join([
        _log_line(off + t0 + 3.4, "vrrp_state", instance="vi1", old="backup", new="master"),
        _log_line(off + t0 + 3.41, "vips_added", instance="vi1"),
        _log_line(off + t0 + 5.25, "vrrp_state", instance="vi1", old="master", new="backup")]) + "\n")
    lab.deaths["lb1"] = [t0 + 8.0]
    iv = lab.master_intervals("lb1", "vi1")
    assert len(iv) == 1 and abs(iv[0][0] - (t0 + 1)) < 0.01 and abs(iv[0][1] - (t0 + 8)) < 0.001
    assert abs(lab.double_master_seconds("vi1", t0, t0 + 9) - 1.85) < 0.01
    assert abs(lab.double_master_seconds("vi1", t0 + 5, t0 + 9) - 0.25) < 0.01
    assert abs(lab.double_master_end("vi1", t0, t0 + 9) - (t0 + 5.25)) < 0.01
    assert lab.double_master_end("vi1", t0 + 6, t0 + 9) is None
    assert abs(lab.vips_added_after("lb2", "vi1", t0 + 2) - (t0 + 3.41)) < 0.01
    assert lab.vips_added_after("lb2", "vi1", t0 + 4) is None


def test_failover_analysis_from_client_events():
    from lab.demo import analyze
    lab = Lab(TOPO)
    a1, a2 = str(TOPO.lb("lb1").address.ip), str(TOPO.lb("lb2").address.ip)
    k = 100.0
    ev = [
        {"t": 99.0, "k": "http", "c": 1, "ok": True, "b": "web1", "via": a1, "ms": 2},
        {"t": 99.1, "k": "http", "c": 2, "ok": True, "b": "web2", "via": a1, "ms": 2},
        {"t": 99.2, "k": "src", "c": 0, "ok": True, "b": "web3", "ms": 2},
        {"t": 99.3, "k": "src", "c": 1, "ok": True, "b": "web1", "ms": 2},
        {"t": 99.5, "k": "tcp", "c": 0, "ok": True, "b": "web2", "ms": 1},
        {"t": 100.05, "k": "http", "c": 1, "ok": False, "err": "ConnectionRefusedError", "ms": 1},
        {"t": 100.10, "k": "http", "c": 2, "ok": False, "err": "ConnectionRefusedError", "ms": 1},
        {"t": 100.12, "k": "tcp", "c": 0, "ok": False, "ms": 1},
        {"t": 100.20, "k": "http", "c": 1, "ok": True, "b": "web1", "via": a2, "ms": 3},
        {"t": 100.25, "k": "http", "c": 2, "ok": True, "b": "web3", "via": a2, "ms": 3},  # moved
        {"t": 100.26, "k": "src", "c": 0, "ok": True, "b": "web3", "ms": 5},
        {"t": 100.27, "k": "src", "c": 1, "ok": True, "b": "web1", "ms": 500},  # started before
        {"t": 100.30, "k": "tcp", "c": 0, "ok": True, "b": "web2", "ms": 4},
        {"t": 100.40, "k": "http", "c": 1, "ok": False, "err": "x", "ms": 1},
    ]
    fo = analyze(ev, k, lab, "lb1", "lb2", vip_added_t=100.15)
    assert abs(fo.vip_moved_ms - 150) < 1e-6 and abs(fo.answered_ms - 200) < 1e-6
    assert fo.failed_http == 2 and fo.failed_http_total == 3 and fo.failed_tcp == 1
    assert (fo.sticky_checked, fo.sticky_kept, fo.sticky_pct) == (2, 1, 50.0)
    assert fo.sticky_moved == [(2, "web2", "web3")]
    assert (fo.src_checked, fo.src_kept) == (1, 1)  # c1's answer began before the kill
    assert abs(fo.tcp_ms - 300) < 1e-6 and fo.tcp_same_backend is True


def test_traffic_generator_records_answers_and_failures(tmp_path):
    """lab.traffic against a lab.backend on loopback (its HTTP, TCP and UDP ports stand in for a
    VIP), then against a closed port: every request is recorded, a refusal is a failure, never
    a crash."""
    from tests.helpers import Backends, free_port
    with Backends(["webx"], http=True, tcp=True, udp=True) as bk:
        host, hport = bk.http["webx"].rsplit(":", 1)
        tport = bk.tcp["webx"].rsplit(":", 1)[1]
        uport = bk.udp["webx"].rsplit(":", 1)[1]
        out = tmp_path / "ev.jsonl"
        r = subprocess.run([sys.executable, "-m", "lab.traffic", "--vip", host, "--http-port", hport,
                            "--tcp-port", tport, "--udp-port", uport, "--seconds", "1.5",
                            "--clients", "20", "--rate", "200", "--src-clients", "127.0.0.64/30",
                            "--out", str(out)], capture_output=True, text=True, timeout=30, cwd=str(ROOT))
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout.strip().splitlines()[-1])["counts"]
        ev = [json.loads(line) for line in out.read_text().splitlines()]
    assert {e["k"] for e in ev} == {"http", "tcp", "udp", "src"}
    assert all(e["ok"] and e["b"] == "webx" for e in ev), [e for e in ev if not e["ok"]][:3]
    assert summary["http"]["ok"] >= 100 and summary["http"]["failed"] == 0
    assert {e["c"] for e in ev if e["k"] == "http"} == set(range(20))
    assert {e["c"] for e in ev if e["k"] == "src"} == {0, 1, 2, 3}
    assert all(e["via"] == "127.0.0.1" for e in ev if e["k"] == "http")  # the backend saw us
    closed = free_port()
    r = subprocess.run([sys.executable, "-m", "lab.traffic", "--vip", "127.0.0.1", "--http-port",
                        str(closed), "--tcp-port", str(closed), "--udp-port", "0", "--seconds", "0.5",
                        "--clients", "5"], capture_output=True, text=True, timeout=30, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout.strip().splitlines()[-1])["counts"]
    assert counts["http"]["ok"] == 0 and counts["http"]["failed"] > 0
    assert counts["tcp"]["ok"] == 0 and counts["tcp"]["failed"] > 0


# -- the failover demo, over IPv4 and over IPv6 ---------------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("family", [4, 6])
def test_demo_failover_client_outage_and_sticky_clients(cleanup, family):
    """`python -m lab demo` (short) on this module's lab, IPv4 and IPv6 (`--family 6`): the VIP
    answers from the standby within Master_Down_Interval + 150 ms of the kill -9, as the
    client sees it, no sticky client (cookie or source address) changed backend, and the
    IPv6 run is IPv6 end to end (VIP, the LB nodes' addresses the backends saw) and skips the
    kernel NAT part (IPv4 only) with a note."""
    import shutil
    import tempfile
    out = Path(tempfile.mkdtemp(prefix=f"halb-demo-v{family}-"))
    try:
        r = lab_cli("demo", *ARGS, "--family", str(family), "--before", "2", "--after", "2",
                    "--out", str(out), *(["--no-nat"] if family == 4 else []), timeout=200)
        print(r.stdout[-6000:])
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        doc = json.loads((out / "failover.json").read_text())
        fo = doc["failover"]
        topo = replace(TOPO, family=family)
        assert doc["family"] == family and doc["vip"] == topo.vips[0]
        assert ipaddress.ip_address(doc["vip"]).version == family
        bound = (topo.master_down_interval(topo.instances[0].priorities["lb2"]) + 0.150) * 1000
        assert fo["old"] == "lb1" and fo["new"] == "lb2"
        assert fo["answered_ms"] is not None and 0 < fo["answered_ms"] <= bound, fo
        assert fo["vip_moved_ms"] is not None and fo["vip_moved_ms"] <= fo["answered_ms"] + 1, fo
        assert fo["sticky_checked"] >= 100 and fo["sticky_kept"] == fo["sticky_checked"], fo
        assert fo["src_checked"] >= 32 and fo["src_kept"] == fo["src_checked"], fo
        assert fo["tcp_ms"] is not None and fo["udp_ms"] is not None, fo
        # the backends saw the LB nodes' own addresses of this family (never a VIP)
        vias = {e.get("via") for e in map(json.loads, (out / "failover-events.jsonl").open())
                if e["k"] == "http" and e["ok"]}
        assert vias == {h.ip for h in topo.lb_hosts}, vias
        assert (out / "failover.png").stat().st_size > 10_000
        assert "lab torn down" in r.stdout and "nothing left behind" in r.stdout
        if family == 6:
            assert "IPv6 end to end" in r.stdout
            assert "NAT part runs over IPv4 only" in r.stdout and "skipped" in r.stdout
        with pytest.raises(FileNotFoundError):
            (out / "failover-nat.png").stat()
    finally:
        shutil.rmtree(out, ignore_errors=True)
