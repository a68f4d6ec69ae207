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


def test_higher_priority_wins_kill9_failover_and_preempt_back(lab):
    notes = lab.tmp / "notify.txt"
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
import random, socket, sys
sys.path.insert(0, sys.argv[1])
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from halb.vrrp import codec
rnd = random.Random(7)
src, vip, lb1, lb2 = "198.18.40.2", "198.18.40.100", "198.18.40.11", "198.18.40.12"
G = "224.0.0.18"
good = codec.build_payload(vrid=40, priority=254, interval=0.1, addresses=[vip], src=src,
                           dst=G, mode="rfc9568")
mac = open("/sys/class/net/eth0/address").read().strip()

def frame(payload, ttl=255, dst=G, s=src):
    dmac = "01:00:5e:00:00:12" if dst == G else "ff:ff:ff:ff:ff:ff"
    return bytes(Ether(src=mac, dst=dmac) / IP(src=s, dst=dst, ttl=ttl, proto=112) / Raw(payload))

def variants(kind):
    if kind == 0:   # priority 254 with a bad checksum
        return frame(good[:6] + b"\x12\x34" + good[8:])
    if kind == 1:   # priority 254, TTL 64 (not from this link)
        return frame(good, ttl=64)
    if kind == 2:   # keepalived checksum while the VRID uses rfc9568
        return frame(codec.build_payload(vrid=40, priority=254, interval=0.1, addresses=[vip],
                                         src=src, dst=G, mode="keepalived"))
    if kind == 3:   # VRRPv2
        return frame(bytes([0x21]) + good[1:])
    if kind == 4:   # truncated
        return frame(good[:rnd.randrange(1, 8)])
    if kind == 5:   # random garbage
        return frame(bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 60))))
    if kind == 6:   # unknown VRID
        return frame(codec.build_payload(vrid=41, priority=254, interval=0.1, addresses=[vip],
                                         src=src, dst=G, mode="rfc9568"))
    if kind == 7:   # other addresses, not the owner
        return frame(codec.build_payload(vrid=40, priority=254, interval=0.1,
                                         addresses=["198.18.40.150"], src=src, dst=G,
                                         mode="rfc9568"))
    if kind == 8:   # priority 0 "from lb1" with a bad checksum, unicast to the backup
        z = codec.build_payload(vrid=40, priority=0, interval=0.1, addresses=[vip], src=lb1,
                                dst=lb2, mode="rfc9568")
        return frame(z[:6] + b"\0\0" + z[8:], dst=lb2, s=lb1)
    return frame(bytes([0x32]) + good[1:] + b"\0\0\0\0")  # type 2, length lies

frames = [variants(k) for k in range(10) for _ in range(5)]  # 50 distinct frames
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind(("eth0", 0))
import time
n = int(sys.argv[2])
for i in range(n):
    sock.send(frames[i % len(frames)])
    if i % 50 == 49:
        time.sleep(0.01)  # about 5000 packets/s, 50 per burst
print(n)
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
    print("invalid adverts counted by lb2:", got)
    # 300 of each kind were sent; a few may be dropped by a full socket buffer on a loaded
    # machine (bounded by design), so 90 % must have been seen and counted under their reason
    # kind 2 (the keepalived kind of checksum) is named as such: checksum_mode
    expected = {"checksum": 600, "checksum_mode": 300, "ttl": 300, "vrid": 300, "addresses": 300, "type": 300,
                "version": 300, "short": 300}
    for reason, n in expected.items():
        assert got.get(reason, 0) >= 0.9 * n, (reason, got)
    assert 0.9 * 3000 <= sum(got.values()) <= 3000, got
    st = metric("hvlb1", 9400, "halb_vrrp_state")
    assert st['halb_vrrp_state{instance="vi",state="master"}'] == 1.0


def test_unicast_with_authentication(lab):
    key = "k3y-for-the-lab"
    u1 = f'unicast_peers = ["{LB2}"]\n'
    u2 = f'unicast_peers = ["{LB1}"]\n'
    a = lab.halbd("hvlb1", config("lb1", priority=200, extra_vrrp=u1, auth_key=key), "lb1")
    b = lab.halbd("hvlb2", config("lb2", priority=100, extra_vrrp=u2, auth_key=key,
                                  extra="[metrics]\naddress = \"127.0.0.1:9400\"\n"), "lb2")
    wait_state(a, "master", timeout=15)
    wait_state(b, "backup", timeout=15)
    lab.wait_holder(VIP, "hvlb1")
    # a forged advert from lb1's address without the key: refused, nothing changes
    forge = (
        "import socket, sys; sys.path.insert(0, %r)\n"
        "from scapy.layers.inet import IP\n"
        "from halb.vrrp import codec\n"
        "p = codec.build_payload(vrid=40, priority=0, interval=0.1, addresses=['198.18.40.100'],"
        " src='198.18.40.11', dst='198.18.40.12', mode='rfc9568', key=b'wrong key!!')\n"
        "pkt = bytes(IP(src='198.18.40.11', dst='198.18.40.12', ttl=255, proto=112) / p)\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)\n"
        "for _ in range(50):\n"
        "    s.sendto(pkt, ('198.18.40.12', 0))\n"
    )
    from tests.helpers import ROOT
    nx.run_in("hvcl", [PY, "-c", forge % str(ROOT)], timeout=60)
    time.sleep(master_down_interval(100, ADV) * 2)
    assert state_of(b) == "backup" and lab.holder(VIP) == ["hvlb1"]
    inv = metric("hvlb2", 9400, "halb_vrrp_invalid_adverts_total")
    assert inv.get('halb_vrrp_invalid_adverts_total{instance="vi",reason="auth_mac"}') == 50.0, inv
    assert metric("hvlb2", 9400, "halb_vrrp_adverts_received_total")[
        'halb_vrrp_adverts_received_total{instance="vi"}'] > 10
    a.kill()
    wait_state(b, "master", timeout=5)


def test_active_active_with_interface_and_script_tracking(lab):
    """Two instances with crossed priorities split the VIPs; a tracked link going down moves
    one VIP (priority weight), a failing tracked script moves the other (weight 0: Fault)."""
    vip2 = "198.18.40.101"
    flag = lab.tmp / "lb2-sick"
    nx.add_veth("hvtk0", "hvtk1", ns="hvlb1", peer_ns="hvlb1")

    def second(prio: int, track: str = "") -> str:
        return f"""
[[listeners]]
name = "l-vi2"
mode = "tcp"
bind = "{vip2}:8000"
pool = "p"

[[vrrp]]
name = "vi2"
interface = "eth0"
vrid = 41
priority = {prio}
vips = ["{vip2}/24"]
advert_interval = "100ms"
{track}"""
    iface_track = '\n[[vrrp.track]]\ntype = "interface"\ninterface = "hvtk0"\nweight = -150\ninterval = "50ms"\n'
    script_track = (f'\n[[vrrp.track]]\ntype = "script"\ncommand = "test ! -e {flag}"\n'
                    'weight = 0\ninterval = "50ms"\ntimeout = "1s"\n')
    a = lab.halbd("hvlb1", config("lb1", priority=200, instance="vi1", extra_vrrp=iface_track,
                                  extra=second(100)), "lb1")
    b = lab.halbd("hvlb2", config("lb2", priority=100, instance="vi1",
                                  extra=second(200, script_track)), "lb2")
    wait_state(a, "master", "vi1", timeout=15)
    wait_state(b, "master", "vi2", timeout=15)
    lab.wait_holder(VIP, "hvlb1")
    lab.wait_holder(vip2, "hvlb2")
    assert who_answers(lab, VIP) == "be1" and who_answers(lab, vip2) == "be2"

    nx.link_down("hvtk0", ns="hvlb1")  # 200 - 150 = 50 < 100: lb2 preempts vi1
    wait_state(b, "master", "vi1", timeout=5)
    lab.wait_holder(VIP, "hvlb2")
    nx.link_up("hvtk0", ns="hvlb1")
    wait_state(a, "master", "vi1", timeout=5)
    lab.wait_holder(VIP, "hvlb1")

    flag.write_text("1")  # lb2's script fails: vi2 goes to Fault, priority 0 hands over
    wait_state(b, "fault", "vi2", timeout=5)
    wait_state(a, "master", "vi2", timeout=5)
    lab.wait_holder(vip2, "hvlb1")
    flag.unlink()
    wait_state(b, "master", "vi2", timeout=5)
    lab.wait_holder(vip2, "hvlb2")

    a.kill()  # both VIPs on the survivor
    wait_state(b, "master", "vi1", timeout=5)
    assert {VIP, vip2} <= lab.vips("hvlb2")
