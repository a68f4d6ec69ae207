"""Scale-out behind ECMP ([bgp], lab.ecmplab): four halb nodes announce a VIP to an FRR router
that spreads flows over them; the router's kernel FIB is the judge of what was announced, the
clients of what was lost.

- announce/withdraw: all four nodes in the FIB once ready; a node whose pool has no eligible
  backend withdraws (and announces again when one is back); halbctl status and the metrics
  show the session and what is announced;
- graceful leave: ``halbctl drain-node`` then SIGTERM under a stream of new HTTP connections
  (100/s): 0 failed requests, the node gone from the FIB; it joins again on restart;
- kill -9 of a node (halbd and its FRR): the router stops using it within BFD's detection time
  (3 x 100 ms) plus the FIB update.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from lab.ecmplab import VIP, EcmpLab, read_probes

pytestmark = pytest.mark.lab

NODES = ["n1", "n2", "n3", "n4"]


@pytest.fixture
def ecmp(request):
    if not shutil.which("vtysh"):
        pytest.fail("FRR is not installed: apt-get install frr (./dev test installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="halb-ecmp-"))
    lab = None
    try:
        lab = EcmpLab(tmp, nodes=4, withdraw_wait="1s")
        for n in NODES:
            lab.start(n)
        lab.wait_paths(NODES, timeout=30)
        yield lab
    finally:
        if lab is not None:
            lab.close()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"lab files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def test_announce_status_metrics_and_withdraw_without_healthy_backend(ecmp):
    lab = ecmp
    st = lab.status("n1")["bgp"]
    assert st["speaker"] == "frr" and st["asn"] == 65001
    assert [(v["vip"], v["prefix"], v["announced"]) for v in st["vips"]] == [(VIP, f"{VIP}/32", True)]
    lab.wait(lambda: [(s["peer"], s["state"], s.get("bfd")) for s in lab.status("n1")["bgp"]["sessions"]]
             == [("198.19.81.1", "Established", "up")], 10, "n1's session Established, BFD up")
    m = lab.metrics("n1")
    assert m[f'halb_bgp_announced{{vip="{VIP}"}}'] == 1
    assert m['halb_bgp_session_up{peer="198.19.81.1"}'] == 1
    assert m['halb_bgp_bfd_up{peer="198.19.81.1"}'] == 1
    assert m["halb_bgp_announcements_total"] >= 1
    # n3's pool loses every backend (admin drain on that node only): n3 withdraws
    lab.halbctl("n3", "drain", "web", "be1")
    assert lab.nodes_in_fib() == NODES  # one backend left: still announced
    t0 = time.monotonic()
    lab.halbctl("n3", "drain", "web", "be2")
    lab.wait_paths(["n1", "n2", "n4"], timeout=5)
    took = time.monotonic() - t0
    assert took < 2.0, f"withdrawal reached the router's FIB after {took:.2f} s"
    v = lab.status("n3")["bgp"]["vips"][0]
    assert not v["announced"] and v["reason"] == "no healthy backend in web"
    assert lab.metrics("n3")[f'halb_bgp_announced{{vip="{VIP}"}}'] == 0
    lab.halbctl("n3", "enable", "web", "be2")
    lab.wait_paths(NODES, timeout=5)


def test_graceful_leave_loses_no_request_and_join(ecmp):
    lab = ecmp
    probe, out = lab.probe(seconds=7, interval=0.01, timeout=2.0)
    time.sleep(2)
    t0 = time.monotonic()
    r = lab.halbctl("n2", "drain-node")
    assert "withdrawn: 198.19.83.10/32" in r, r
    assert lab.nodes_in_fib() == ["n1", "n3", "n4"]  # gone before drain-node returned
    assert time.monotonic() - t0 >= 1.0  # it waited withdraw_wait
    assert lab.status("n2")["bgp"]["leaving"] is True
    lab.stop("n2")  # nothing announced any more: the stop has nothing to withdraw
    time.sleep(1)
    lab.start("n2")  # a node joining: announced once ready
    lab.wait_paths(NODES, timeout=15)
    probe.wait(30)
    probes = read_probes(out)
    failed = [p for p in probes if not p["ok"]]
    assert len(probes) > 300, len(probes)
    assert failed == [], f"{len(failed)} of {len(probes)} requests failed: {failed[:5]}"


def test_kill_node_router_stops_using_it_within_bfd_time(ecmp):
    lab = ecmp
    seen = {}

    def bfd_up():
        for n in NODES:
            seen[n] = [(s["state"], s.get("bfd")) for s in lab.status(n)["bgp"]["sessions"]]
        return all(v == [("Established", "up")] for v in seen.values())
    try:
        lab.wait(bfd_up, 20, "BFD up on every node")
    except TimeoutError:
        raise AssertionError(f"BFD not up on every node: {seen}") from None
    t0 = time.monotonic()
    lab.kill_node("n4")
    lab.wait_paths(["n1", "n2", "n3"], timeout=5)
    took = time.monotonic() - t0
    # BFD: 3 x 100 ms; the BGP hold time (3 s) would be the fallback without it
    assert took < 1.5, f"the router used the dead node for {took:.2f} s"
    # the others serve on: 100 new connections, none fails
    probe, out = lab.probe(seconds=1.5, interval=0.01, timeout=2.0)
    probe.wait(30)
    probes = read_probes(out)
    assert probes and all(p["ok"] for p in probes), [p for p in probes if not p["ok"]][:5]
