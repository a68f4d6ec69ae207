"""The election with real halbd processes in network namespaces (see conftest.py for the LAN).

Timing bounds come from the configured timers: advert interval 100 ms, so for the backup
(priority 100) Skew_Time = 156/256 * 0.1 s = 61 ms and Master_Down_Interval = 361 ms; the
issue allows 150 ms on top for the client to see the VIP answer again.
"""

from __future__ import annotations

import signal
import time

import pytest

from halb.vrrp.fsm import master_down_interval, skew_time
from lab import netns as nx
from tests.helpers import wait_for

from tests.lab.conftest import (CLIENT, LB1, LB2, PY, Probe, config, events, state_of, wait_state,
                       who_answers)

pytestmark = pytest.mark.lab

VIP = "198.18.40.100"
ADV = 0.1
SLACK = 0.150


def pair(lab, *, p1=200, p2=100, start_first=None, **kw):
    """Starts lb1 (priority p1) and lb2 (priority p2); waits for lb1 master, lb2 backup."""
    a = lab.halbd("hvlb1", config("lb1", priority=p1, **kw), "lb1")
    b = lab.halbd("hvlb2", config("lb2", priority=p2, **kw), "lb2")
    wait_state(a, "master", timeout=15)
    wait_state(b, "backup", timeout=15)
    lab.wait_holder(VIP, "hvlb1")
    return a, b


def test_higher_priority_wins_kill9_failover_and_preempt_back(lab, tmp_path):
    notes = tmp_path / "notify.txt"
    notify = f"notify = \"sh -c 'echo \\\"$*\\\" >> {notes}' notify\""
    # the lower priority node starts first and is master alone
    b = lab.halbd("hvlb2", config("lb2", priority=100), "lb2")
    wait_state(b, "master", timeout=15)
    lab.wait_holder(VIP, "hvlb2")
    assert who_answers(lab, VIP) == "be2"
    # the higher priority node arrives and preempts
    a = lab.halbd("hvlb1", config("lb1", priority=200, extra_vrrp=notify), "lb1")
    wait_state(a, "master", timeout=15)
    wait_state(b, "backup", timeout=5)
    lab.wait_holder(VIP, "hvlb1")
    assert who_answers(lab, VIP) == "be1"
    wait_for(lambda: "INSTANCE vi MASTER 200" in (notes.read_text() if notes.exists() else ""),
             5, what="notify MASTER")
    lines = notes.read_text().splitlines()
    assert lines[0] == "INSTANCE vi BACKUP 200" and lines[1] == "INSTANCE vi MASTER 200"

    # kill -9 the master: the client connects again within Master_Down_Interval + 150 ms
    probe = Probe(lab, VIP, duration=10)
    probe.wait_answer("be1", after=time.monotonic() - 1)
    t_kill = time.monotonic()
    a.kill()
    t_dead = time.monotonic()
    t_ok = probe.wait_answer("be2", after=t_dead)
    took = t_ok - t_kill
    bound = master_down_interval(100, ADV) + SLACK
    print(f"kill -9 takeover seen by the client after {took * 1000:.0f} ms (bound {bound * 1000:.0f} ms)")
    assert took <= bound
    assert state_of(b) == "master"

    # restarted higher priority node removes its leftover VIP, then preempts back
    a2 = lab.halbd("hvlb1", config("lb1", priority=200), "lb1b")
    wait_state(a2, "master", timeout=15)
    wait_state(b, "backup", timeout=5)
    lab.wait_holder(VIP, "hvlb1")
    t = time.monotonic()
    probe.wait_answer("be1", after=t)
    probe.stop()


def test_sigterm_hands_over_within_skew_time(lab):
    a, b = pair(lab)
    probe = Probe(lab, VIP, duration=8)
    probe.wait_answer("be1", after=time.monotonic() - 1)
    t_sig = time.monotonic()
    a.signal(signal.SIGTERM)
    t_ok = probe.wait_answer("be2", after=t_sig)
    took = t_ok - t_sig
    bound = skew_time(100, ADV) + SLACK
    print(f"SIGTERM handover seen by the client after {took * 1000:.0f} ms (bound {bound * 1000:.0f} ms)")
    assert took <= bound
    a.p.wait(timeout=10)
    assert a.p.returncode == 0
    assert lab.holder(VIP) == ["hvlb2"]  # the stopped node removed its VIP
    probe.stop()


def test_nopreempt_leaves_the_vip_with_the_live_master(lab):
    b = lab.halbd("hvlb2", config("lb2", priority=100), "lb2")
    wait_state(b, "master", timeout=15)
    a = lab.halbd("hvlb1", config("lb1", priority=200, preempt=False), "lb1")
    wait_state(a, "backup", timeout=15)
    # many Master_Down_Intervals later, the lower priority master still holds the VIP
    time.sleep(master_down_interval(200, ADV) * 4)
    assert state_of(a) == "backup" and state_of(b) == "master"
    assert lab.holder(VIP) == ["hvlb2"]
    assert [e["new"] for e in events(b, "vrrp_state")] == ["backup", "master"]
    # without a master it takes over as usual
    b.kill()
    wait_state(a, "master", timeout=5)


def test_failing_tracked_pool_moves_the_vip(lab):
    health = """
  [pools.health]
  type = "tcp"
  interval = "100ms"
  timeout = "100ms"
  rise = 1
  fall = 1
"""
    track = """
[[vrrp.track]]
type = "pool"
pool = "p"
min_up = 1
weight = -150
interval = "50ms"
"""
    c1 = config("lb1", priority=200, extra_vrrp=track).replace('address = "198.18.40.2:7001"\n',
                                                               'address = "198.18.40.2:7001"\n' + health)
    assert "pools.health" in c1
    a = lab.halbd("hvlb1", c1, "lb1")
    b = lab.halbd("hvlb2", config("lb2", priority=100), "lb2")
    wait_state(a, "master", timeout=15)
    wait_state(b, "backup", timeout=15)
    lab.wait_holder(VIP, "hvlb1")
    # lb1's backend dies: its pool has no backend up, priority 200 - 150 = 50 < 100
    lab.backends["be1"].kill()
    wait_state(b, "master", timeout=5)
    wait_state(a, "backup", timeout=5)
    lab.wait_holder(VIP, "hvlb2")
    st = [e for e in events(a, "vrrp_state") if e["new"] == "backup"][-1]
    assert st["priority"] == 50
    assert who_answers(lab, VIP) == "be2"
    # the backend returns: priority 200 again, lb1 preempts back
    lab.backends["be1"] = lab.backend("be1", CLIENT, 7001)
    wait_state(a, "master", timeout=5)
    lab.wait_holder(VIP, "hvlb1")


FLOOD = r"""
import random, sys
from scapy.all import Ether, IP, Raw, sendp, conf
from scapy.layers.vrrp import VRRPv3
sys.path.insert(0, sys.argv[1])
from halb.vrrp import codec
conf.verb = 0
rnd = random.Random(7)
src, vip, lb1, lb2 = "198.18.40.2", "198.18.40.100", "198.18.40.11", "198.18.40.12"
good = codec.build_payload(vrid=40, priority=254, interval=0.1, addresses=[vip], src=src,
                           dst="224.0.0.18", mode="rfc9568")
pkts = []
def ip(payload, ttl=255, dst="224.0.0.18", s=src):
    return IP(src=s, dst=dst, ttl=ttl, proto=112) / Raw(payload)
for i in range(int(sys.argv[2])):
    kind = i % 10
    if kind == 0:   # priority 254 with a bad checksum
        p = ip(good[:6] + b"\x12\x34" + good[8:])
    elif kind == 1:  # priority 254, TTL 64 (not from this link)
        p = ip(good, ttl=64)
    elif kind == 2:  # keepalived checksum while the VRID uses rfc9568
        p = ip(codec.build_payload(vrid=40, priority=254, interval=0.1, addresses=[vip],
                                   src=src, dst="224.0.0.18", mode="keepalived"))
    elif kind == 3:  # VRRPv2
        p = ip(bytes([0x21]) + good[1:])
    elif kind == 4:  # truncated
        p = ip(good[:rnd.randrange(1, 8)])
    elif kind == 5:  # random garbage
        p = ip(bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 60))))
    elif kind == 6:  # unknown VRID
        p = ip(codec.build_payload(vrid=41, priority=254, interval=0.1, addresses=[vip],
                                   src=src, dst="224.0.0.18", mode="rfc9568"))
    elif kind == 7:  # other addresses, not the owner
        p = ip(codec.build_payload(vrid=40, priority=254, interval=0.1, addresses=["198.18.40.150"],
                                   src=src, dst="224.0.0.18", mode="rfc9568"))
    elif kind == 8:  # priority 0 with a bad checksum, unicast to the backup
        z = codec.build_payload(vrid=40, priority=0, interval=0.1, addresses=[vip], src=lb1,
                                dst=lb2, mode="rfc9568")
        p = ip(z[:6] + b"\0\0" + z[8:], dst=lb2, s=lb1)
    else:  # type 2, length lies
        p = ip(bytes([0x32]) + good[1:] + b"\0\0\0\0")
    dstmac = "01:00:5e:00:00:12"
    pkts.append(Ether(dst=dstmac) / p)
sendp(pkts, iface="eth0", inter=0)
print(len(pkts))
"""


def metric(ns: str, port: int, name: str) -> dict[str, float]:
    """Samples of metric family ``name`` scraped inside namespace ``ns``."""
    out = nx.run_in(ns, ["curl", "-s", f"http://127.0.0.1:{port}/metrics"], timeout=10).stdout
    vals = {}
    for line in out.splitlines():
        if line.startswith(name):
            k, v = line.rsplit(" ", 1)
            vals[k] = float(v)
    return vals


def test_malformed_advert_flood_leaves_the_election_unchanged(lab):
    from tests.helpers import ROOT
    extra = "[metrics]\naddress = \"127.0.0.1:9400\"\n"
    a = lab.halbd("hvlb1", config("lb1", priority=200, extra=extra), "lb1")
    b = lab.halbd("hvlb2", config("lb2", priority=100, extra=extra), "lb2")
    wait_state(a, "master", timeout=15)
    wait_state(b, "backup", timeout=15)
    lab.wait_holder(VIP, "hvlb1")
    n_before = (len(events(a, "vrrp_state")), len(events(b, "vrrp_state")))
    r = nx.run_in("hvcl", [PY, "-c", FLOOD, str(ROOT), "3000"], timeout=60)
    assert r.stdout.strip() == "3000"
    time.sleep(master_down_interval(100, ADV) * 2)
    assert (len(events(a, "vrrp_state")), len(events(b, "vrrp_state"))) == n_before
    assert state_of(a) == "master" and state_of(b) == "backup" and a.alive() and b.alive()
    assert lab.holder(VIP) == ["hvlb1"]
    assert who_answers(lab, VIP) == "be1"
    inv = metric("hvlb2", 9400, "halb_vrrp_invalid_adverts_total")
    got = {k.split('reason="')[1].split('"')[0]: v for k, v in inv.items()}
    for reason in ("checksum", "ttl", "version", "short", "vrid", "addresses", "type"):
        assert got.get(reason, 0) >= 100, (reason, got)
    assert sum(got.values()) >= 2900, got
    st = metric("hvlb1", 9400, "halb_vrrp_state")
    assert st['halb_vrrp_state{instance="vi",state="master"}'] == 1.0


def test_unicast_with_authentication(lab):
    key = "k3y-for-the-lab"
    u1 = f'unicast_peers = ["{LB2}"]\n'
    u2 = f'unicast_peers = ["{LB1}"]\n'
    a = lab.halbd("hvlb1", config("lb1", priority=200, extra_vrrp=u1, auth_key=key), "lb1")
    b = lab.halbd("hvlb2", config("lb2", priority=100, extra_vrrp=u2, auth_key=key), "lb2")
    wait_state(a, "master", timeout=15)
    wait_state(b, "backup", timeout=15)
    lab.wait_holder(VIP, "hvlb1")
    # a forged advert from lb1's address without the key: refused, nothing changes
    forge = (
        "import sys; sys.path.insert(0, %r)\n"
        "from scapy.all import IP, Raw, send, conf\n"
        "from halb.vrrp import codec\n"
        "conf.verb = 0\n"
        "p = codec.build_payload(vrid=40, priority=0, interval=0.1, addresses=['198.18.40.100'],"
        " src='198.18.40.11', dst='198.18.40.12', mode='rfc9568', key=b'wrong key!!')\n"
        "send([IP(src='198.18.40.11', dst='198.18.40.12', ttl=255, proto=112)/Raw(p)] * 50)\n"
    )
    from tests.helpers import ROOT
    nx.run_in("hvcl", [PY, "-c", forge % str(ROOT)], timeout=60)
    time.sleep(master_down_interval(100, ADV) * 2)
    assert state_of(b) == "backup" and lab.holder(VIP) == ["hvlb1"]
    a.kill()
    wait_state(b, "master", timeout=5)
