"""Kernel NAT listeners over IPv6 across takeovers, judged by the clients (lab.natlab with
family=6, lab.natprobe): IPv6 VIP, IPv6 backends, the ip6 nftables table, IPv6 conntrack
entries replicated over sync and injected on the standby.

The nodes run plain halbd and the IPv6 VIP (with its virtual link-local address, and the
back gateway in excluded_vips) is moved by halb's VRRPv3 over IPv6, as in production: kill -9
of the master, alternating nodes, then a SIGTERM handover. The gaps therefore include the
failure detection (a closed sync stream: fast takeover; else Master_Down_Interval), and are
held to the IPv4 test's bound (tests/lab/test_nat.py). The negative control (replication
off) must lose the TCP connections.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pytest

from lab import netns as nx
from lab.natlab import NatLab
from tests.lab.conftest import lab_lock
from tests.lab.test_nat import MEDIAN_GAP_MS, report

pytestmark = pytest.mark.lab

ROUND = 3.0
TCP, UDP = 30, 8


@pytest.fixture
def lab6(request):
    tmp = Path(tempfile.mkdtemp(prefix=f"halb-nat6-{request.node.name[:30]}-"))
    with lab_lock():
        lab = None
        try:
            lab = NatLab(tmp, prefix="hn6", family=6,
                         replicate=getattr(request, "param", True))
            yield lab
        finally:
            if lab is not None:
                lab.close()
            rep = getattr(request.node, "rep_call", None)
            if rep is not None and rep.failed:
                print(f"lab files kept in {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)


def settle(lab: NatLab) -> None:
    lab.start("lb1")
    lab.wait_state("lb1", "master")
    lab.start("lb2")
    lab.wait_state("lb2", "backup")
    lab.wait_synced("lb2")
    lab.wait(lambda: lab.holders() == ["lb1"], 5, "the IPv6 VIP on lb1 alone")


def counters(lab: NatLab, name: str) -> dict[str, int]:
    """Packets per named counter of the node's ip6 table."""
    out = nx.run_in(lab.ns[name], ["nft", "-j", "list", "counters", "table", "ip6",
                                   "halb_hn6"]).stdout
    return {o["counter"]["name"]: o["counter"]["packets"]
            for o in json.loads(out)["nftables"] if "counter" in o}


def to_backends(lab: NatLab, name: str) -> int:
    return sum(v for k, v in counters(lab, name).items() if k.startswith("be_"))


def run_kills(lab: NatLab, rounds: int, *, handover_last: bool = False):
    """kill -9 of the master ``rounds`` times (alternating nodes, the killed one restarted as
    a backup), then (``handover_last``) a SIGTERM handover. Returns the probe's results, the
    moments of the kills, the last master, and per takeover the packets the new master
    forwarded to the backends in the 0.5 s after it became master (its ip6 table's counters:
    the clients really moved to it)."""
    settle(lab)
    probe = lab.probe(seconds=3.0 + rounds * ROUND + (ROUND if handover_last else 0) + 2.0,
                      tcp_conns=TCP, udp_flows=UDP)
    time.sleep(2.0)  # every connection and flow established, replicated
    events, moved, took = [], [], []
    for i in range(rounds + (1 if handover_last else 0)):
        m = lab.master()
        assert m is not None, f"round {i}: no single master"
        other = "lb2" if m == "lb1" else "lb1"
        before = to_backends(lab, other)
        events.append(time.monotonic())
        armed = len(lab.nodes[other].events("fast_takeover_armed"))
        if i < rounds:
            lab.kill(m)
        else:
            lab.stop(m, wait=False)  # SIGTERM: VIPs given up, priority 0 advert
        lab.wait_state(other, "master", timeout=5)
        took.append(round((time.monotonic() - events[-1]) * 1000))
        if i < rounds:
            # the closed sync stream was matched to the IPv6 master (its sync welcome named
            # its advert source, a link-local address): fast takeover, not Master_Down_Interval
            assert len(lab.nodes[other].events("fast_takeover_armed")) > armed, \
                lab.nodes[other].log.read_text()[-3000:]
        else:
            lab.nodes[m].proc.wait(10)
        time.sleep(0.5)
        moved.append(to_backends(lab, other) - before)
        lab.start(m)  # preempt is off: the restarted node stays backup
        lab.wait_state(m, "backup")
        lab.wait_synced(m)
        time.sleep(max(0.0, events[-1] + ROUND - time.monotonic()))
    print(f"\nthe other node logged master (seen by the test) {took} ms after the kill or "
          f"SIGTERM")
    return probe.results(), events, lab.master(), moved


def test_ipv6_connections_survive_kills_and_a_handover_on_the_same_backend(lab6):
    lab = lab6
    results, events, holder, moved = run_kills(lab, 4, handover_last=True)
    r = report("IPv6: kill -9 x4, then a SIGTERM handover", results, events)
    print(f"packets the new master forwarded in its first 0.5 s: {moved}")
    # each time the clients' traffic went through the node that took the VIPs over
    assert len(moved) == 5 and min(moved) >= 100, moved
    assert len(results) == TCP + UDP
    assert not [c for c in results if c["error"]], [c for c in results if c["error"]][:5]
    assert not r["broken"], r["broken"][:5]
    assert all(c["replies"] >= 100 for c in results), [c["replies"] for c in results]
    assert {c["backends"][0] for c in results if c["kind"] == "tcp"} == {"be1", "be2"}
    assert lab.holders() == [holder]
    standby = "lb2" if holder == "lb1" else "lb1"
    # the standby's nat table holds every IPv6 connection and flow, bracketed clients
    assert lab.nat_entries(standby) >= TCP + UDP, lab.conntrack(standby)
    text = lab.halbctl(standby, "tables", "nat", "--limit", "1000")
    assert "[2001:2:0:44::2]:" in text, text
    # its kernel holds them too, injected as IPv6 DNAT entries to the IPv6 backends
    ct = lab.conntrack(standby)
    assert ct.count("dst=2001:2:0:44::100 ") >= TCP + UDP and "src=2001:2:0:45::2" in ct, ct
    st = {n: json.loads(lab.halbctl(n, "status", "--json"))["nat"] for n in ("lb1", "lb2")}
    assert [(x["vip"], x["held"]) for x in st[holder]["listeners"]] == \
        [("2001:2:0:44::100", True)] * 2, st[holder]
    assert not any(x["held"] for x in st[standby]["listeners"]), st[standby]
    assert all(x["backends_in_map"] == 2 for x in st[standby]["listeners"])
    text = lab.halbctl(holder, "status")
    assert "[2001:2:0:44::100]:80" in text and "[2001:2:0:44::100]:53" in text, text
    assert int(st[standby]["injected"]) + int(st[standby]["refreshed"]) >= TCP + UDP
    for n in ("lb1", "lb2"):  # no kernel write refused, no event lost, on either node
        m = lab.metrics(n)
        errs = {k: v for k, v in m.items() if k.startswith("halb_nat_inject_errors")}
        assert not any(errs.values()), errs
        assert m.get("halb_nat_events_lost_total", 0) == 0
    # the holder forwards in its ip6 table; its counters are the metrics per backend
    counted = counters(lab, holder)
    assert counted["be_www_be1"] > 0 and counted["be_www_be2"] > 0, counted
    assert counted["rbe_dns_be1"] + counted["rbe_dns_be2"] > 0, counted
    m = lab.metrics(holder)
    assert m['halb_nat_backend_packets_total{backend="be1",listener="www"}'] > 0, m
    assert statistics.median(r["medians"]) <= MEDIAN_GAP_MS, r["medians"]


@pytest.mark.parametrize("lab6", [False], indirect=True, ids=["replication_off"])
def test_ipv6_negative_control_without_replication_connections_break(lab6):
    lab = lab6
    results, events, _, _ = run_kills(lab, 1)
    report("IPv6: kill -9 x1, replication off", results, events)
    tcp_broken = [c for c in results if c["kind"] == "tcp" and (c["error"] or
                                                                len(c["backends"]) != 1)]
    assert len(tcp_broken) >= TCP // 2, f"only {len(tcp_broken)} of {TCP} TCP connections broke"
