"""The demo's kernel NAT part (lab.demo.run_nat_demo): a long-lived stream through the NAT
listeners survives kill -9 of the master on the same connections and backends, and the
timeline says so.

Its own NatLab, prefix "hd" (198.18.44.0/24 and 198.18.45.0/24 inside its namespaces).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from lab import netns as nx
from lab.demo import NAT_PREFIX, NAT_TCP_CONNS, NAT_UDP_FLOWS, run_nat_demo
from tests.lab.conftest import lab_lock

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]


@pytest.fixture
def out_dir(request):
    d = Path(tempfile.mkdtemp(prefix="halb-demo-nat-"))
    yield d
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"demo files kept in {d}")
    else:
        shutil.rmtree(d, ignore_errors=True)


def test_nat_stream_survives_the_kill_on_the_same_connections(out_dir, capsys):
    with lab_lock():
        res = run_nat_demo(out_dir)
    printed = capsys.readouterr().out
    with capsys.disabled():
        print(printed)

    # the lab is gone
    assert not [n for n in nx.list_ns() if n.startswith(NAT_PREFIX)]

    # every TCP connection and UDP flow lived on, answered on both sides of the kill, on
    # one backend
    conns = res["conns"]
    tcp = [c for c in conns if c["kind"] == "tcp"]
    udp = [c for c in conns if c["kind"] == "udp"]
    assert (len(tcp), len(udp)) == (NAT_TCP_CONNS, NAT_UDP_FLOWS)
    for c in conns:
        assert not c["error"], c
        assert not c["broken"], c
        assert len(c["backends"]) == 1 and c["same_backend"], c
        assert c["last_before_ms"] < 0 < c["first_after_ms"], c
        assert c["pause_ms"] is not None and c["pause_ms"] < 1000, c
    assert res["ok"] and res["broken"] == 0 and res["moved"] == 0
    # the same sockets before and after, each in the new master's conntrack, on its backend
    assert res["same_sockets"] and len(res["client_ports_before"]) == NAT_TCP_CONNS
    assert set(res["conntrack_new"]) == {str(p) for p in res["client_ports_before"]}
    assert res["conntrack_new"] == res["conntrack_old"]
    assert set(res["conntrack_new"].values()) <= {c["backends"][0] for c in tcp}

    # the takeover's figures
    assert res["old"] == "lb1" and res["new"] == "lb2"
    assert 0 < res["became_master_ms"] < 2000
    assert res["vips_added_ms"] is not None and res["nat_takeover_ms"] is not None
    assert res["nat_takeover_ms"] <= res["vips_added_ms"]  # entries first, then the VIPs
    assert res["takeover_entries"] >= NAT_TCP_CONNS + NAT_UDP_FLOWS
    assert res["standby_entries_before_kill"] >= NAT_TCP_CONNS + NAT_UDP_FLOWS
    assert res["new_master_forwarded_packets"].get("www", 0) > 0
    assert 0 < res["longest_gap_ms"] < 1000

    # written: failover.json under "nat", the picture
    doc = json.loads((out_dir / "failover.json").read_text())
    assert doc["nat"]["ok"] is True
    assert doc["nat"]["takeover_entries"] == res["takeover_entries"]
    assert len(doc["nat"]["conns"]) == NAT_TCP_CONNS + NAT_UDP_FLOWS
    assert (out_dir / "failover-nat.png").stat().st_size > 10_000

    # the printed timeline
    assert "== NAT timeline (ms after the kill)" in printed
    assert "lb2 became master" in printed
    assert f"lb2's kernel had {res['takeover_entries']} replicated conntrack entries" in printed
    for c in tcp:
        assert (f"connection {c['i']}: last echo before the kill at {c['last_before_ms']:+.1f} ms,"
                f" first echo after at {c['first_after_ms']:+.1f} ms") in printed
        assert f"same connection, same backend {c['backends'][0]}" in printed
    for c in udp:
        assert f"UDP flow {c['i']}: last answer before the kill at" in printed
    assert (f"NAT stream: {NAT_TCP_CONNS} TCP connections and {NAT_UDP_FLOWS} UDP flows, "
            f"0 broken, longest gap") in printed
    assert "every one on its backend" in printed
    assert res["timeline"][-1] in printed
    assert "NAT lab torn down; nothing left behind" in printed
