"""``halbctl failover`` against two real halbd nodes electing a master in network namespaces.

Topology (names start with ``hk``, addresses in 198.18.80.0/24, VIP 198.18.80.100):

    hksw:  bridge hkbr0
    hklb1: eth0 198.18.80.11   halbd lb1, priority 150, preempt on
    hklb2: eth0 198.18.80.12   halbd lb2, priority 100

The control sockets are files under tmp_path, reachable from the root namespace.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import time

import grpc
import pytest

from halb.cli.halbctl import main as halbctl_main

from lab import netns as nx
from tests.helpers import PY, ROOT, Halbd, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.lab, pytest.mark.timeout(120)]

PREFIX = "hk"
SUBNET = "198.18.80.0/24"
HOSTS = {"lb1": ("hklb1", "198.18.80.11", 150), "lb2": ("hklb2", "198.18.80.12", 100)}
VIP = "198.18.80.100"
INTERVAL = 0.1  # advert interval (s)


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


def config(name: str, sock: str, priority: int) -> str:
    return f"""
[node]
name = "{name}"
[control]
socket = "{sock}"
[[pools]]
name = "p"
[[pools.backends]]
name = "b1"
address = "198.18.80.2:7000"
[[vrrp]]
name = "vi1"
interface = "eth0"
vrid = 80
priority = {priority}
vips = ["{VIP}/24"]
advert_interval = "{int(INTERVAL * 1000)}ms"
preempt = true
"""


@pytest.fixture
def cluster(tmp_path):
    nx.cleanup(PREFIX)
    procs: dict[str, Halbd] = {}
    socks = {n: str(tmp_path / f"{n}.sock") for n in HOSTS}
    lan = nx.Lan(PREFIX, SUBNET)
    try:
        for n, (ns, addr, prio) in HOSTS.items():
            lan.add_host(ns, addr)
            cfg = tmp_path / f"{n}.toml"
            cfg.write_text(config(n, socks[n], prio))
            procs[n] = Halbd(cfg, netns=ns)
        yield procs, socks
    finally:
        for p in procs.values():
            p.close()
        lan.close()
        nx.cleanup(PREFIX)


def instance(sock: str) -> dict | None:
    """The node's instance as ``halbctl status --json`` shows it (asked in-process: polling
    through a new halbctl process each time would be slow on a busy machine)."""
    from halb.cli.halbctl import to_dict
    from halb.v1 import control_pb2 as pb, control_pb2_grpc as pb_grpc
    if not os.path.exists(sock):
        return None
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        try:
            st = pb_grpc.ControlStub(ch).Status(pb.StatusRequest(), timeout=3)
        except grpc.RpcError:
            return None
    inst = to_dict(st)["instances"]
    return inst[0] if inst else None


def holds_vip(ns: str) -> bool:
    return VIP in nx.addresses("eth0", ns=ns)


def test_failover_hands_the_master_over_and_stays_drained(cluster):
    procs, socks = cluster
    wait_for(lambda: (i := instance(socks["lb1"])) and i["state"] == "master", 20, interval=0.2,
             what="lb1 master")
    wait_for(lambda: (i := instance(socks["lb2"])) and i["state"] == "backup", 20, interval=0.2,
             what="lb2 backup")
    i1 = instance(socks["lb1"])
    assert i1["vrid"] == 80 and i1["priority"] == 150 and i1["base_priority"] == 150
    assert i1["vips"] == [f"{VIP}/24"] and i1["advert_interval"] == pytest.approx(INTERVAL)
    assert holds_vip("hklb1") and not holds_vip("hklb2")
    code, out, err = halbctl("--socket", socks["lb1"], "status")
    assert code == 0 and "vi1" in out and "master" in out and f"{VIP}/24" in out

    # a backup cannot hand over; an unknown instance is named
    code, _, err = halbctl("--socket", socks["lb2"], "failover", "vi1")
    assert code == 1 and "cannot hand over" in err and "not master" in err
    code, _, err = halbctl("--socket", socks["lb1"], "failover", "vi9")
    assert code == 1 and "no such instance 'vi9' (instances: vi1)" in err

    code, out, err = halbctl_process("--socket", socks["lb1"], "failover", "vi1")  # as a process
    assert code == 0, err
    assert "vi1" in out and "backup" in out
    # lb2 takes over after hearing priority 0 (Skew_Time), far sooner than Master_Down_Interval
    wait_for(lambda: holds_vip("hklb2"), 5, interval=0.02, what="lb2 to hold the VIP")
    wait_for(lambda: (i := instance(socks["lb2"])) and i["state"] == "master", 5, interval=0.1,
             what="lb2 master")
    assert not holds_vip("hklb1")
    # lb1 has the higher priority and preempt on, yet the handover holds it back
    time.sleep(20 * INTERVAL)
    assert instance(socks["lb1"])["state"] == "backup"
    assert holds_vip("hklb2") and not holds_vip("hklb1")
    assert all(p.alive() for p in procs.values())
