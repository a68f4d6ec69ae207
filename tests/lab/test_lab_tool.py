"""python -m lab: up builds a working lab, refuses a second one, status reports it, down
removes everything, also after an interrupted run; the active-active topology splits the VIPs.

Names hl6-*, addresses 198.18.60.0/24 (reserved for these tests).
"""

from __future__ import annotations

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
