"""Tracking verdicts (rise/fall), how verdicts combine into fault/priority, the notify
command's arguments, gratuitous ARP frames and the netlink request encoding."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

import pytest
from scapy.layers.l2 import ARP, Ether

from halb.clock import FakeClock
from halb.config import TrackConfig
from halb.vrrp.garp import frames
from halb.vrrp.instance import run_notify
from halb.vrrp.netlink import AddrSocket
from halb.vrrp.track import Tracker, Verdict, combine, make_tracker, run_script

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("rise,fall,results,verdicts", [
    (1, 1, [True, False, True], [True, False, True]),
    (2, 3, [True, False, False, True, False, False, False], [True] * 6 + [False]),
    (2, 3, [False, True, False, True, True], [False, False, False, False, True]),
    (1, 2, [True, False, True, False, False], [True, True, True, True, False]),
    (3, 1, [False, True, True, False, True, True, True], [False] * 6 + [True]),
])
def test_verdict_rise_fall(rise, fall, results, verdicts):
    v = Verdict(rise=rise, fall=fall)
    got = []
    for r in results:
        v.observe(r)
        got.append(v.ok)
    assert got == verdicts


def test_verdict_first_result_decides_and_reports_change():
    v = Verdict(rise=5, fall=5)
    assert v.ok is None
    assert v.observe(False) is True and v.ok is False
    assert v.observe(False) is False


@pytest.mark.parametrize("items,fault,delta", [
    ([], False, 0),
    ([(0, True)], False, 0),
    ([(0, False)], True, 0),
    ([(0, None)], False, 0),             # not checked yet: counts as ok
    ([(-30, False), (-20, True)], False, -30),
    ([(25, True), (10, False)], False, 25),  # keepalived: positive weight added while ok
    ([(-50, False), (0, False), (40, True)], True, -10),
])
def test_combine(items, fault, delta):
    assert combine(items) == (fault, delta)


class _Pool:
    def __init__(self, n):
        self.n = n

    def up_count(self, now):
        return self.n


def test_pool_tracker_min_up():
    pools = {"web": _Pool(1)}
    t = make_tracker(TrackConfig(type="pool", pool="web", min_up=2, weight=-50), pools=pools,
                     clock=FakeClock(5.0), netlink=None)
    assert isinstance(t, Tracker)
    asyncio.run(t.poll())
    assert t.ok is False and "1 up, need 2" in t.verdict.detail
    pools["web"].n = 2
    assert asyncio.run(t.poll()) is True and t.ok is True


def test_interface_tracker_uses_link_state():
    class NL:
        def __init__(self):
            self.st = {"exists": True, "up": True, "mac": "", "index": 3}

        def link(self, name):
            async def f():
                return dict(self.st)
            return f()
    nl = NL()
    t = make_tracker(TrackConfig(type="interface", interface="eth1", fall=2), pools={},
                     clock=FakeClock(5.0), netlink=nl)
    asyncio.run(t.poll())
    assert t.ok is True
    nl.st["up"] = False
    asyncio.run(t.poll())
    assert t.ok is True  # fall = 2
    asyncio.run(t.poll())
    assert t.ok is False
    nl.st["exists"] = False
    asyncio.run(t.poll())
    assert t.verdict.detail == "no such interface"


def test_script_exit_status_and_timeout():
    assert asyncio.run(run_script("exit 0", 2.0))[0] is True
    ok, detail = asyncio.run(run_script("exit 3", 2.0))
    assert not ok and detail == "exit status 3"
    ok, detail = asyncio.run(run_script("sleep 5", 0.2))
    assert not ok and "timed out" in detail


def test_notify_gets_keepalived_arguments(tmp_path):
    out = tmp_path / "args"
    rc = asyncio.run(run_notify(f"sh -c 'echo \"$@\" > {out}' notify", "vi_1", "MASTER", 150))
    assert rc == 0
    assert out.read_text().strip() == "INSTANCE vi_1 MASTER 150"
    assert asyncio.run(run_notify("/nonexistent/notify-script", "vi", "FAULT", 1)) is None


def test_garp_frames():
    fs = frames("02:00:00:00:00:01", ["198.18.40.100", "198.18.40.101/24", "2001:2::1"])
    assert len(fs) == 3  # the IPv6 address gets an unsolicited NA (below)
    for f, ip in zip(fs, ["198.18.40.100", "198.18.40.101"]):
        e = Ether(f)
        assert e.dst == "ff:ff:ff:ff:ff:ff" and e.src == "02:00:00:00:00:01"
        a = e[ARP]
        assert a.op == 1 and a.psrc == ip and a.pdst == ip and a.hwsrc == "02:00:00:00:00:01"


@pytest.mark.parametrize("router", [False, True])
def test_unsolicited_neighbor_advertisements(router):
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6, in6_chksum
    mac = "02:00:00:00:00:01"
    fs = frames(mac, ["2001:2::100/64", "fe80::7"], router)
    assert len(fs) == 2
    for f, ip in zip(fs, ["2001:2::100", "fe80::7"]):
        e = Ether(f)
        assert e.dst == "33:33:00:00:00:01" and e.src == mac and e.type == 0x86DD
        i6 = e[IPv6]
        assert i6.src == ip and i6.dst == "ff02::1" and i6.hlim == 255  # RFC 4861 7.1.2
        na = e[ICMPv6ND_NA]
        assert na.type == 136 and na.code == 0 and na.tgt == ip
        assert (na.R, na.S, na.O) == (int(router), 0, 1)  # override, unsolicited
        assert e[ICMPv6NDOptDstLLAddr].lladdr == mac
        raw = bytes(i6.payload)
        assert in6_chksum(58, i6, raw[:2] + b"\0\0" + raw[4:]) == struct.unpack("!H", raw[2:4])[0]


def test_netlink_request_encoding_ipv6_nodad():
    a = AddrSocket()
    v = ipaddress.ip_interface("2001:2::100/64")
    add = a.prepare(True, 7, v)
    family, prefixlen, flags, _scope, index = struct.unpack_from("=BBBBI", add, 16)
    assert (family, prefixlen, index) == (10, 64, 7)
    assert flags & 0x02  # IFA_F_NODAD: no duplicate address detection delay on takeover
    assert struct.pack("=HHI", 8, 8, 0x02) in add  # IFA_FLAGS attribute, NODAD
    # IFA_CACHEINFO: preferred lifetime 0, valid forever (never chosen as a source)
    assert struct.pack("=HHIIII", 20, 6, 0, 0xFFFFFFFF, 0, 0) in add
    rm = a.prepare(False, 7, v)
    assert struct.unpack_from("=BBBBI", rm, 16)[2] == 0


def test_netlink_request_encoding():
    a = AddrSocket()
    v = ipaddress.ip_interface("198.18.40.100/24")
    add = a.prepare(True, 7, v)
    length, typ, flags, seq, pid = struct.unpack_from("=IHHII", add, 0)
    assert length == len(add) and typ == 20 and flags == 0x1 | 0x4 | 0x400 | 0x200
    family, prefixlen, _flags, _scope, index = struct.unpack_from("=BBBBI", add, 16)
    assert (family, prefixlen, index) == (2, 24, 7)
    assert ipaddress.IPv4Address("198.18.40.100").packed in add
    rm = a.prepare(False, 7, v)
    assert struct.unpack_from("=H", rm, 4)[0] == 21
    assert a.prepare(True, 7, v) is add  # cached
