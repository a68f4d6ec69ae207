"""The election over IPv6 with real halbd processes (and keepalived) in network namespaces.

The lab LAN is dual stack (conftest.py). Each IPv6 instance announces the virtual link-local
address fe80::28 first and the service address 2001:2:40::100 (RFC 9568); adverts go to
ff02::12 from the node's link-local address with hop limit 255; a new master sends unsolicited
Neighbor Advertisements (Override set) so the client's neighbor cache moves to its MAC.

The bounds are those of the IPv4 tests (test_election.py): Master_Down_Interval + 150 ms for a
kill -9, Skew_Time + 150 ms for SIGTERM, as seen by a client connecting to the VIP every 10 ms.
"""

from __future__ import annotations

import json
import shutil
import signal
import time

import pytest

from halb.vrrp import codec
from halb.vrrp.fsm import master_down_interval, skew_time
from lab import netns as nx
from tests.helpers import wait_for
from tests.lab.conftest import (CLIENT6, LB1_6, PY, Probe, VipWatch, config, events, state_of,
                                wait_state, who_answers)
from tests.lab.measure_takeover import start_keepalived
from tests.lab.test_election_keepalived import ka_state, wait_ka

pytestmark = pytest.mark.lab

VIP6 = "2001:2:40::100"
LL = "fe80::28"
VIPS6 = (f"{LL}/64", f"{VIP6}/64")
ADV = 0.1
SLACK = 0.150

# reads VRRP frames on the client's eth0 for a while and prints them (hex), one per line
SNIFF = r"""
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
s.bind(("eth0", 0)); s.settimeout(0.2)
end = time.monotonic() + float(sys.argv[1]); n = 0
while time.monotonic() < end and n < 20:
    try:
        f = s.recv(2048)
    except socket.timeout:
        continue
    if len(f) > 54 and f[20] == 112:
        print(f.hex(), flush=True); n += 1
"""


def v6pair(lab, p1=200, p2=100, **kw):
    a = lab.halbd("hvlb1", config("lb1", priority=p1, vips=VIPS6, **kw), "lb1")
    b = lab.halbd("hvlb2", config("lb2", priority=p2, vips=VIPS6, **kw), "lb2")
    wait_state(a, "master", timeout=15)
    wait_state(b, "backup", timeout=15)
    lab.wait_holder(VIP6, "hvlb1")
    return a, b


def mac_of(ns: str) -> str:
    return nx.run_in(ns, ["cat", "/sys/class/net/eth0/address"]).stdout.strip()


def neigh(ns: str, addr: str) -> str:
    """The link-layer address ``ns`` has for ``addr`` ("" if none)."""
    out = nx.run_in(ns, ["ip", "-6", "-j", "neigh", "show", addr, "dev", "eth0"]).stdout
    entries = json.loads(out or "[]")
    return entries[0].get("lladdr", "") if entries else ""


def test_ipv6_adverts_on_the_wire(lab):
    a, b = v6pair(lab)
    out = nx.run_in("hvcl", [PY, "-c", SNIFF, "1.0"], timeout=15).stdout
    frames = [bytes.fromhex(x) for x in out.split()]
    assert frames, "no advert seen on the LAN in 1 s"
    lb1_mac = mac_of("hvlb1")
    for f in frames:
        pkt = f[14:]
        assert f[0:6] == bytes.fromhex("333300000012")  # ff02::12's multicast MAC
        assert ":".join(f"{x:02x}" for x in f[6:12]) == lb1_mac  # only the master sends
        src = codec.source_of(pkt)
        assert src.startswith("fe80:")  # from the interface's link-local address
        assert pkt[7] == 255  # hop limit
        d = codec.Decoder()
        d.add(40, (LL, VIP6), "rfc9568")
        adv = d.decode(pkt)
        assert isinstance(adv, codec.Advert), adv  # the pseudo-header checksum is right
        assert adv.dst == "ff02::12" and adv.priority == 200 and adv.interval == ADV
        assert adv.addresses == (LL, VIP6)  # the virtual link-local address first
    # the master holds both addresses, the backup neither
    assert {LL, VIP6} <= lab.vips("hvlb1") and not ({LL, VIP6} & lab.vips("hvlb2"))
    assert who_answers(lab, VIP6) == "be1"
    # the VIPs are deprecated (preferred lifetime 0): never the source the kernel picks for
    # the node's own connections, though the VIP shares the node address's /64
    addrs = json.loads(nx.run_in("hvlb1", ["ip", "-6", "-j", "addr", "show", "dev", "eth0"]).stdout)
    info = {a["local"]: a for a in addrs[0]["addr_info"]}
    assert info[VIP6]["preferred_life_time"] == 0 and info[LL]["preferred_life_time"] == 0
    route = json.loads(nx.run_in("hvlb1", ["ip", "-6", "-j", "route", "get", CLIENT6]).stdout)
    assert route[0]["prefsrc"] == LB1_6, route


def test_ipv6_kill9_takeover_moves_the_clients_neighbor_cache(lab):
    a, b = v6pair(lab)
    probe = Probe(lab, VIP6, duration=10, step=0.01)
    probe.wait_answer("be1", after=time.monotonic() - 1)
    lb1_mac, lb2_mac = mac_of("hvlb1"), mac_of("hvlb2")
    assert neigh("hvcl", VIP6) == lb1_mac
    t_kill = time.monotonic()
    a.kill()
    t_ok = probe.wait_answer("be2", after=time.monotonic())
    took = t_ok - t_kill
    bound = master_down_interval(100, ADV) + SLACK
    # the unsolicited NA (Override) replaced the dead master's MAC at once: without it the
    # client would keep sending to lb1's MAC until neighbor unreachability detection (5 s+)
    assert neigh("hvcl", VIP6) == lb2_mac
    res = [r for r in probe.results() if r["t"] >= t_kill]
    failed = [r for r in res if not r["who"]]
    print(f"IPv6 kill -9 takeover seen by the client after {took * 1000:.0f} ms "
          f"(bound {bound * 1000:.0f} ms); {len(failed)} of {len(res)} probes after the kill "
          f"failed")
    assert took <= bound
    assert state_of(b) == "master"
    # the restarted node preempts back; the client follows
    a2 = lab.halbd("hvlb1", config("lb1", priority=200, vips=VIPS6), "lb1b")
    wait_state(a2, "master", timeout=15)
    wait_state(b, "backup", timeout=5)
    lab.wait_holder(VIP6, "hvlb1")
    probe.wait_answer("be1", after=time.monotonic())
    assert neigh("hvcl", VIP6) == lb1_mac
    probe.stop()


def test_ipv6_sigterm_hands_over_within_skew_time(lab):
    a, b = v6pair(lab)
    probe = Probe(lab, VIP6, duration=8, step=0.01)
    probe.wait_answer("be1", after=time.monotonic() - 1)
    t_sig = time.monotonic()
    a.signal(signal.SIGTERM)
    t_ok = probe.wait_answer("be2", after=t_sig)
    took = t_ok - t_sig
    bound = skew_time(100, ADV) + SLACK
    print(f"IPv6 SIGTERM handover seen by the client after {took * 1000:.0f} ms "
          f"(bound {bound * 1000:.0f} ms)")
    assert took <= bound
    a.p.wait(timeout=10)
    assert a.p.returncode == 0
    assert lab.holder(VIP6) == ["hvlb2"] and LL not in lab.vips("hvlb1")
    probe.stop()


def test_ipv4_and_ipv6_instances_with_one_vrid_side_by_side(lab):
    """VRIDs of the two families are separate spaces: vrid 40 over IPv4 and over IPv6 on the
    same interface, each with its own master."""
    v6 = f"""
[[vrrp]]
name = "vi6"
interface = "eth0"
vrid = 40
priority = {{p}}
vips = ["{LL}/64", "{VIP6}/64"]
advert_interval = "100ms"
"""
    a = lab.halbd("hvlb1", config("lb1", priority=200, extra=v6.replace("{p}", "100")), "lb1")
    b = lab.halbd("hvlb2", config("lb2", priority=100, extra=v6.replace("{p}", "200")), "lb2")
    wait_state(a, "master", timeout=15)
    wait_state(b, "master", instance="vi6", timeout=15)
    wait_state(b, "backup", timeout=5)
    wait_state(a, "backup", instance="vi6", timeout=5)
    lab.wait_holder("198.18.40.100", "hvlb1")
    lab.wait_holder(VIP6, "hvlb2")
    for p in (a, b):
        assert not events(p, "invalid_advert:vrid") and not events(p, "invalid_advert:addresses")


@pytest.fixture
def _keepalived():
    assert shutil.which("keepalived"), "keepalived is installed by ./dev (APT_BASE)"


def test_ipv6_mixed_pair_with_keepalived(lab, _keepalived):
    """halbd and keepalived in one IPv6 VRID: one master at a time, failover both ways."""
    ka = start_keepalived(lab, "hvlb2", "lb2", 100, ADV, vips=VIPS6)
    wait_ka(ka, "master")
    lab.wait_holder(VIP6, "hvlb2")
    cfg = config("lb1", priority=200, vips=VIPS6, listen_vips=False)
    h = lab.halbd("hvlb1", cfg, "lb1")
    wait_state(h, "master", timeout=15)  # halbd preempts keepalived
    wait_ka(ka, "backup", timeout=5)
    lab.wait_holder(VIP6, "hvlb1")
    w = VipWatch(lab, VIP6)
    time.sleep(1.0)  # ten adverts each way: both keep their state, nothing refused
    assert state_of(h) == "master" and ka_state(ka) == "backup"
    bad = [e for e in events(h, "invalid_advert") + events(h, "vrrp_checksum_mismatch")]
    assert not [e for e in bad if "checksum" in json.dumps(e)], bad
    # halbd crashes: keepalived takes over
    t0 = time.monotonic()
    h.kill()
    wait_ka(ka, "master", timeout=5)
    assert time.monotonic() - t0 <= master_down_interval(100, ADV) + SLACK
    assert VIP6 in lab.vips("hvlb2")  # (the crashed halbd's copy stays until it restarts)
    # halbd comes back and preempts; then keepalived is stopped and halbd stays master
    h2 = lab.halbd("hvlb1", cfg, "lb1b")
    wait_state(h2, "master", timeout=15)
    wait_ka(ka, "backup", timeout=5)
    lab.wait_holder(VIP6, "hvlb1")
    w.both.clear()
    time.sleep(0.5)
    w.stop()
    assert not w.both, f"both nodes held {VIP6}"
    # and the other way: keepalived master, halbd backup, graceful stop of keepalived
    h2.signal(signal.SIGTERM)
    h2.p.wait(timeout=10)
    wait_ka(ka, "master", timeout=5)
    h3 = lab.halbd("hvlb1", config("lb1", priority=50, vips=VIPS6, listen_vips=False), "lb1c")
    wait_state(h3, "backup", timeout=15)
    time.sleep(0.5)
    assert state_of(h3) == "backup" and ka_state(ka) == "master"
    t0 = time.monotonic()
    ka.signal(signal.SIGTERM)
    wait_state(h3, "master", timeout=5)
    assert time.monotonic() - t0 <= skew_time(50, ADV) + SLACK + 0.1
    lab.wait_holder(VIP6, "hvlb1")


def test_ipv6_unicast_with_auth_hmac_refuses_forgeries(lab):
    """Unicast between the nodes' global IPv6 addresses (adverts then come from those, so each
    side's peer check holds), signed with auth_hmac; a forged priority-0 advert from the
    master's address with a wrong key is refused and nothing moves; kill -9 still fails over."""
    from tests.lab.conftest import LB1_6, LB2_6
    auth = '[vrrp.auth_hmac]\nkeys = { "1" = "hex:' + "ab" * 32 + '" }\n'
    u1 = f'unicast_peers = ["{LB2_6}"]\n{auth}'
    u2 = f'unicast_peers = ["{LB1_6}"]\n{auth}'
    a = lab.halbd("hvlb1", config("lb1", priority=200, vips=VIPS6, extra_vrrp=u1), "lb1")
    b = lab.halbd("hvlb2", config("lb2", priority=100, vips=VIPS6, extra_vrrp=u2), "lb2")
    wait_state(a, "master", timeout=15)
    wait_state(b, "backup", timeout=15)
    lab.wait_holder(VIP6, "hvlb1")
    started = [e for e in events(a, "election_started")][0]["instances"][0]
    assert started["address"] == LB1_6  # a global source for global unicast peers
    forge = (
        "import socket, sys\n"
        "from halb.vrrp import codec\n"
        "from halb.vrrp.authhmac import HmacAuth\n"
        f"ah = HmacAuth({{1: b'x' * 32}}, 1)\n"
        f"m = codec.build_payload(vrid=40, priority=0, interval=0.1, addresses=['{LL}', '{VIP6}'],"
        f" src='{LB1_6}', dst='{LB2_6}')\n"
        f"p = m + ah.trailer(m, '{LB1_6}', 40)\n"
        "s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)\n"
        "from scapy.layers.inet6 import IPv6\n"
        f"pkt = bytes(IPv6(src='{LB1_6}', dst='{LB2_6}', hlim=255, nh=112) / p)\n"
        "for _ in range(30):\n"
        f"    s.sendto(pkt, ('{LB2_6}', 0))\n"
    )
    from tests.helpers import ROOT
    nx.run_in("hvcl", [PY, "-c", forge], timeout=60, cwd=str(ROOT))
    time.sleep(master_down_interval(100, ADV) * 2)
    assert state_of(b) == "backup" and lab.holder(VIP6) == ["hvlb1"]
    refused = [e for e in events(b, "invalid_advert:auth_mac")]
    assert refused and refused[0]["reason"] == "auth_mac", events(b, "invalid_advert")
    t0 = time.monotonic()
    a.kill()
    wait_state(b, "master", timeout=5)
    assert time.monotonic() - t0 <= master_down_interval(100, ADV) + SLACK
    assert VIP6 in lab.vips("hvlb2")
