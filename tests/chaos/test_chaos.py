"""Chaos suite: each scenario of lab.chaos in its own lab (names hc-*, 198.18.70.0/24), bounded
in time, asserting bounds derived from the configured timers (takeover within
Master_Down_Interval + 150 ms, one master again within 3 adverts + 500 ms) and zero lost sticky
sessions; kill9, partition and nat_kill9 also over IPv6 (chaos.CHAOS6). The figures of every
scenario that ran go to out/chaos-report.json and .md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab import chaos
from lab.lab import Lab

pytestmark = pytest.mark.chaos

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "out"
RESULTS: list[chaos.Result] = []


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if RESULTS:
        jp, _ = chaos.write_report(RESULTS, OUT, chaos.CHAOS)
        assert json.loads(jp.read_text())["scenarios"]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("name", list(chaos.SCENARIOS))
def test_scenario(name):
    r = chaos.run_one(name, chaos.CHAOS, OUT)
    RESULTS.append(r)
    left = Lab(chaos.CHAOS).leftovers()
    assert not left, f"left behind: {left}"
    assert r.checks and r.ok, f"{r.title}:\n{r.failures()}\nfigures: {r.figures}"


# Over IPv6 (lab.chaos.CHAOS6: the same lab, names hc-*, IPv6 end to end in 2001:2:0:70::/64):
# the scenarios whose takeover path differs by family (a crash: fast takeover from the closed
# sync stream; a cut: the VRRP timers, both masters, Neighbor Advertisements when healing),
# and the kernel NAT mode's kill -9 (lab.natlab's IPv6 variant: IPv6 conntrack entries
# replicated and injected, the VIP and back gateway moved by VRRPv3 over IPv6; ~18 s).
# `python -m lab chaos --family 6` runs every scenario over IPv6.
IPV6_SCENARIOS = ["kill9", "partition", "nat_kill9"]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("name", IPV6_SCENARIOS)
def test_scenario_ipv6(name):
    r = chaos.run_one(name, chaos.CHAOS6, OUT)
    RESULTS.append(r)
    left = Lab(chaos.CHAOS6).leftovers()
    assert not left, f"left behind: {left}"
    assert r.title.endswith("(IPv6)")
    assert r.checks and r.ok, f"{r.title}:\n{r.failures()}\nfigures: {r.figures}"


def test_report_figures_from_events():
    """The report's arithmetic on a hand-made event list (no lab)."""
    ev = [{"t": 1.0, "k": "http", "c": 1, "ok": True, "b": "web1"},
          {"t": 2.0, "k": "http", "c": 1, "ok": True, "b": "web1"},
          {"t": 1.0, "k": "http", "c": 2, "ok": True, "b": "web2"},
          {"t": 2.5, "k": "http", "c": 2, "ok": True, "b": "web3"},  # lost
          {"t": 1.0, "k": "src", "c": 2, "ok": True, "b": "web2"},  # another kind: own client
          {"t": 1.5, "k": "http", "c": 3, "ok": False},
          {"t": 1.0, "k": "http", "c": 4, "ok": True, "b": "web2"},
          {"t": 3.0, "k": "http", "c": 4, "ok": True, "b": "web1"}]  # web2 was killed: forced
    st = chaos.sticky_report(ev, exclude_backends={"web2"})
    assert st["clients"] == 4 and st["src_clients"] == 1
    assert st["kept"] == 2 and st["moved_off_killed_backend"] == 2 and st["lost"] == 0
    st = chaos.sticky_report(ev)
    assert st["lost"] == 2 and st["kept"] == 2
    assert chaos.http_counts(ev) == (6, 1)
    assert chaos.http_counts(ev, 2.0, 2.6) == (2, 0)
