"""Kernel NAT listeners across takeovers, judged by the clients (lab.natlab, lab.natprobe).

50 long-lived TCP connections (each echoing every 50 ms) and 16 UDP flows through the NAT
listeners of a two-node cluster; the master is killed (kill -9) ten times, alternating nodes,
or cut off (both links down) and healed. Every connection must go on, on the backend it had,
with a short gap; the same run with replication off (the negative control) must lose
connections, so the test can tell the difference.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pytest

from lab import natlab
from lab import netns as nx
from lab.natlab import NatLab
from tests.lab.conftest import lab_lock

pytestmark = pytest.mark.lab

MEDIAN_GAP_MS = 250.0  # the bound on the median per-connection gap at a takeover
ROUND = 3.0  # seconds per kill round: takeover, restart, the restarted node learns the tables


@pytest.fixture
def natlab_(request):
    tmp = Path(tempfile.mkdtemp(prefix=f"halb-nat-{request.node.name[:30]}-"))
    with lab_lock():
        lab = None
        try:
            param = getattr(request, "param", True)
            opts = param if isinstance(param, dict) else {"replicate": param}
            lab = NatLab(tmp, **opts)
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
    lab.wait(lambda: lab.holders() == ["lb1"], 5, "VIP on lb1 alone")


def gaps_at(results: list[dict], t: float, window: float = 1.5) -> list[float]:
    """Per connection, the longest gap between answers that started within ``window`` before
    the event at ``t`` (0 if the connection answered on its beat through it)."""
    out = []
    for c in results:
        g = [ms for start, ms in c["gaps"] if t - window <= start <= t + 0.05]
        out.append(max(g, default=0.0))
    return out


def report(name: str, results: list[dict], events: list[float]) -> dict:
    per_event = [gaps_at(results, t) for t in events]
    medians = [statistics.median(g) for g in per_event]
    worst = [max(g) for g in per_event]
    broken = [c for c in results if c["error"] or len(c["backends"]) != 1]
    moved = [c for c in results if len(c["backends"]) > 1]
    lost = sum(c["lost"] for c in results if c["kind"] == "udp")
    sent = sum(c["sent"] for c in results if c["kind"] == "udp")
    print(f"\n{name}: {len(results)} connections/flows, {len(events)} takeovers; broken "
          f"{len(broken)}, moved to another backend {len(moved)}; per takeover median gap "
          f"{[round(m) for m in medians]} ms, worst {[round(w) for w in worst]} ms; UDP "
          f"datagrams lost {lost} of {sent}")
    # gaps under --gap-ms (150 ms) are not listed; each connection's longest one over the run
    # (every takeover in it, and the 50 ms beat itself) says how short they were
    longest = [c["max_gap_ms"] for c in results]
    print(f"longest gap per connection over the run: median {statistics.median(longest):.0f} "
          f"ms, max {max(longest):.0f} ms")
    return {"medians": medians, "worst": worst, "broken": broken, "moved": moved}


def run_kills(lab: NatLab, rounds: int) -> tuple[list[dict], list[float]]:
    settle(lab)
    probe = lab.probe(seconds=3.0 + rounds * ROUND + 2.0)
    time.sleep(2.0)  # every connection and flow established, replicated
    kills = []
    for i in range(rounds):
        m = lab.master()
        assert m is not None, f"round {i}: no single master"
        other = "lb2" if m == "lb1" else "lb1"
        kills.append(time.monotonic())
        lab.kill(m)
        lab.wait_state(other, "master", timeout=5)
        time.sleep(0.5)
        lab.start(m)  # preempt is off: the restarted node stays backup
        lab.wait_state(m, "backup")
        lab.wait_synced(m)
        left = kills[-1] + ROUND - time.monotonic()
        if left > 0:
            time.sleep(left)
    return probe.results(), kills


def test_connections_survive_ten_kills_on_the_same_backend(natlab_):
    lab = natlab_
    results, kills = run_kills(lab, 10)
    r = report("kill -9 x10", results, kills)
    assert len(results) == 66
    assert not r["broken"], r["broken"][:5]
    assert all(c["replies"] >= 50 for c in results), [c["replies"] for c in results]
    assert statistics.median(r["medians"]) <= MEDIAN_GAP_MS, r["medians"]
    # the tables held what the kernel held: the standby's nat table and conntrack
    master = lab.master()
    standby = "lb2" if master == "lb1" else "lb1"
    assert lab.nat_entries(standby) >= 50, lab.conntrack(standby)
    # halbctl status: who holds each NAT listener, what replication wrote
    st = {n: json.loads(lab.halbctl(n, "status", "--json"))["nat"] for n in ("lb1", "lb2")}
    assert [x["held"] for x in st[master]["listeners"]] == [True] * 3, st[master]
    assert not any(x.get("held") for x in st[standby]["listeners"]), st[standby]
    assert all(x["backends_in_map"] == 2 for x in st[standby]["listeners"])
    assert int(st[standby]["injected"]) + int(st[standby]["refreshed"]) >= 50, st[standby]
    text = lab.halbctl(standby, "status")
    assert "kernel NAT (nftables table halb_hn; replication on" in text, text
    for n in ("lb1", "lb2"):  # no kernel write refused, no event lost, on either node
        m = lab.metrics(n)
        errs = {k: v for k, v in m.items() if k.startswith("halb_nat_inject_errors")}
        print(n, {k: v for k, v in m.items() if k.startswith(("halb_nat_kernel_writes",
                                                               "halb_nat_events"))})
        assert not any(errs.values()), errs
        assert m.get("halb_nat_events_lost_total", 0) == 0


@pytest.mark.parametrize("natlab_", [False], indirect=True, ids=["replication_off"])
def test_negative_control_without_replication_connections_break(natlab_):
    """The same lab with [nat] replicate = false: the new master's kernel has no entry for the
    established connections, strict TCP tracking calls their packets invalid, and they die."""
    lab = natlab_
    results, kills = run_kills(lab, 2)
    r = report("kill -9 x2, replication off", results, kills)
    tcp_broken = [c for c in r["broken"] if c["kind"] == "tcp"]
    assert len(tcp_broken) >= 25, f"only {len(tcp_broken)} of 50 TCP connections broke"


def test_connections_survive_the_master_cut_off(natlab_):
    """Links cut: no closed sync stream, no RST; the backup's VRRP timers (50 ms adverts)
    decide, the cut node sees its link down and gives the VIPs up (Fault). Healed, it comes
    back as backup (preempt off) and learns the tables; the next round cuts the new master."""
    lab = natlab_
    settle(lab)
    rounds = 4
    probe = lab.probe(seconds=3.0 + rounds * 4.0 + 2.0)
    time.sleep(2.0)
    cuts = []
    for i in range(rounds):
        m = lab.master()
        assert m is not None, f"round {i}: no single master"
        other = "lb2" if m == "lb1" else "lb1"
        cuts.append(time.monotonic())
        lab.cut(m)
        lab.wait_state(other, "master", timeout=5)
        time.sleep(1.5)
        lab.heal(m)
        lab.wait_state(m, "backup", timeout=5)
        t = time.monotonic()
        lab.wait(lambda: len(lab.nodes[m].events("sync_learned")) > 1 or
                 time.monotonic() - t > 2.0, 5, f"{m} relearned")
        time.sleep(max(0.0, cuts[-1] + 4.0 - time.monotonic()))
    results = probe.results()
    r = report("cut x4", results, cuts)
    assert not r["broken"], r["broken"][:5]
    assert statistics.median(r["medians"]) <= natlab.CUT_MEDIAN_GAP_MS, r["medians"]


def test_a_bulk_transfer_goes_on_at_its_rate_after_a_takeover(natlab_):
    """iperf3 through the bulk NAT listener; the master is killed in the middle. The transfer
    must not stop, and after the takeover it runs at its earlier rate (the standby's
    conntrack entry carries it, liberal TCP window tracking as the README asks)."""
    lab = natlab_
    lab.iperf_servers()
    settle(lab)
    run = lab.iperf(seconds=6, interval=0.25)
    time.sleep(2.5)
    t_kill = time.monotonic()
    lab.kill("lb1")
    lab.wait_state("lb2", "master", timeout=5)
    res = run.results()
    assert "error" not in res, res.get("error")
    iv = [(i["sum"]["start"], i["sum"]["bits_per_second"]) for i in res["intervals"]]
    before = [bps for t, bps in iv if 0.5 <= t < 2.0]
    after = [bps for t, bps in iv if t >= 3.5]
    gbit = lambda xs: round(statistics.median(xs) / 1e9, 2)  # noqa: E731
    stalled = [t for t, bps in iv if bps < 1e6]
    print(f"\nbulk: {gbit(before)} Gbit/s before the kill, {gbit(after)} Gbit/s after "
          f"(0.25 s intervals; stalled intervals at {stalled}); kill at "
          f"{t_kill - time.monotonic():.1f} s from the end")
    assert len(after) >= 6 and not [t for t in stalled if t >= 3.0], iv
    # the bytes after the takeover went through lb2's kernel, not the dead node's
    out = nx.run_in(lab.ns["lb2"], ["nft", "-j", "list", "counters", "table", "ip",
                                    "halb_hn"]).stdout
    through = sum(o["counter"]["bytes"] for o in json.loads(out)["nftables"]
                  if "counter" in o and o["counter"]["name"].startswith("be_bulk_"))
    print(f"lb2 forwarded {through / 1e9:.1f} GB of the transfer")
    assert through > 1e9, through
    # "at its rate": not the crawl of a window that the standby's conntrack entry mistracks
    # (0 B/s, hundreds of invalid drops), nor a fraction of it. The survivor is busy right
    # after the takeover (replication, its own halbd) on this 2-core machine shared with
    # other work: one CI run saw 0.69x, so the floor is half the earlier rate
    assert statistics.median(after) >= 0.5 * statistics.median(before), (before, after)


def test_drain_moves_new_connections_and_keeps_established_ones(natlab_):
    """halbctl drain rewrites only the map slots of the drained backend (one nftables
    transaction): established connections on it go on (their conntrack entry holds the
    backend), new ones go elsewhere; enable brings it back."""
    lab = natlab_
    settle(lab)
    probe = lab.probe(seconds=7.0, tcp_conns=30, udp_flows=0)
    time.sleep(2.0)
    lab.halbctl("lb1", "drain", "tcp", "be1")
    lab.wait(lambda: lab.nodes["lb1"].events("nat_slots_updated"), 5, "slots rewritten")
    upd = lab.nodes["lb1"].events("nat_slots_updated")[-1]
    assert upd["listener"] == "www" and upd["backends"] == ["be2"], upd
    fresh = lab.probe(seconds=1.0, tcp_conns=20, udp_flows=0).results()
    assert {c["backends"][0] for c in fresh if c["backends"]} == {"be2"}, fresh
    assert not [c for c in fresh if c["error"]], fresh
    res = probe.results()
    on_be1 = [c for c in res if c["backends"] == ["be1"]]
    print(f"\ndrain: {len(on_be1)} of 30 established connections were on be1 and went on; "
          f"slots moved {upd['moved']} of {upd['size']} in {upd['ms']} ms")
    assert on_be1 and not [c for c in res if c["error"]], res
    lab.halbctl("lb1", "enable", "tcp", "be1")
    lab.wait(lambda: len(lab.nodes["lb1"].events("nat_slots_updated")) >= 2, 5, "slots back")
    assert lab.nodes["lb1"].events("nat_slots_updated")[-1]["backends"] == ["be1", "be2"]


SHORT = r"""
import socket, sys
n = 0
for i in range(int(sys.argv[2])):
    s = socket.create_connection((sys.argv[1], 80), timeout=5)
    s.sendall(b"WHO\n")
    if s.recv(100):
        n += 1
    s.close()
print(n)
"""


@pytest.mark.parametrize("natlab_", [{"nat_options": "replicate_after_packets = 8"}],
                         indirect=True, ids=["after_8_packets"])
def test_replicate_after_packets_skips_short_connections_and_keeps_long_ones(natlab_):
    """[nat] replicate_after_packets = 8 (IPVS's sync_threshold): 200 one-request connections
    write nothing to the nat table, the long-lived ones are replicated once the client has
    sent 8 packets, and survive a kill -9 as before."""
    lab = natlab_
    settle(lab)
    probe = lab.probe(seconds=7.0, tcp_conns=20, udp_flows=4)
    out = nx.run_in(lab.ns["cl"], [natlab.PY, "-c", SHORT, natlab.VIP, "200"], timeout=60).stdout
    assert out.strip() == "200"
    time.sleep(1.0)
    on_standby = lab.nat_entries("lb2")
    print(f"\nafter 200 short connections and 24 long ones: {on_standby} nat entries on lb2")
    assert on_standby == 24, on_standby
    st = json.loads(lab.halbctl("lb1", "status", "--json"))["nat"]
    assert st["replicate_after_packets"] == 8, st
    kill = time.monotonic()
    lab.kill("lb1")
    lab.wait_state("lb2", "master", timeout=5)
    res = probe.results()
    r = report("replicate_after_packets = 8, kill -9", res, [kill])
    assert not r["broken"], r["broken"][:5]
