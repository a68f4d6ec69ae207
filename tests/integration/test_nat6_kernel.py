"""The kernel NAT mode over IPv6 against the kernel (root): the ``ip6`` table that
halb.nat.nft builds, loaded with the real nft (libnftables), forwarding real IPv6 TCP and UDP
to the backends its slot table names; the event socket's BPF filter on IPv6 entries; and an
IPv6 conntrack entry with DNAT injected through ctnetlink (halb.nat.ctsock) carrying a
connection whose own entry was lost, as on a standby after a takeover.

Topology (per test; names ``h6k`` + a random tag, addresses in 2001:2::/48 only, every
address ``nodad``; removed in a finalizer, also when the test fails):

    <t>c   client   eth0 2001:2:0:80::2/64
                        |
    <t>lb  LB       eth0 2001:2:0:80::1/64 + VIP 2001:2:0:80::100/128, IPv6 forwarding on
                    eth1 (a bridge) 2001:2:0:81::1/64
                        |
    <t>b1, <t>b2     backends 2001:2:0:81::11 / ::12, default route via 2001:2:0:81::1; TCP
                     8080 answers "<name>\\n" then echoes "<name>:<data>", UDP 5353 echoes
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

from halb.nat import ctnl, nft
from halb.nat.ctnl import Event, Flow
from halb.nat.ctsock import GROUPS_ALL, CtSocket, attach_filter, dump, inject
from halb.nat.nft import NatBackend, NatRuleset, NatService
from halb.nat.nftapply import Nft
from tests.integration.test_nft_kernel import SERVER, in_ns, sh

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(90),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(not shutil.which("ip") or not shutil.which("nft")
                       or not shutil.which("conntrack"), reason="needs iproute2, nft, conntrack"),
]

VIP = "2001:2:0:80::100"
CLIENT = "2001:2:0:80::2"
B1, B2 = "2001:2:0:81::11", "2001:2:0:81::12"
SEED = 0x5EED1234
SERVER6 = (SERVER.replace("s = socket.socket()", "s = socket.socket(socket.AF_INET6)")
           .replace('("0.0.0.0", int(p))', '("::", int(p))')
           .replace("socket.socket(socket.AF_INET, socket.SOCK_DGRAM)",
                    "socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)"))


class Topo6:
    def __init__(self):
        t = "h6k" + secrets.token_hex(2)
        self.c, self.lb, self.b1, self.b2 = t + "c", t + "lb", t + "b1", t + "b2"
        self.procs: list[subprocess.Popen] = []
        self.made: list[str] = []

    def up(self) -> "Topo6":
        for ns in (self.c, self.lb, self.b1, self.b2):
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
        lb = [f"link add eth0 type veth peer name eth0 netns {self.c}",
              "link add eth1 type bridge",
              f"link add p1 type veth peer name eth0 netns {self.b1}",
              f"link add p2 type veth peer name eth0 netns {self.b2}",
              "link set p1 master eth1", "link set p2 master eth1",
              "addr add 2001:2:0:80::1/64 dev eth0 nodad",
              f"addr add {VIP}/128 dev eth0 nodad",
              "addr add 2001:2:0:81::1/64 dev eth1 nodad"]
        lb += [f"link set {i} up" for i in ("lo", "eth0", "eth1", "p1", "p2")]
        sh("ip", "-n", self.lb, "-batch", "-", input="\n".join(lb) + "\n")
        sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=self.lb)
        sh("ip", "-n", self.c, "-batch", "-", input="\n".join([
            "link set lo up", "link set eth0 up", f"addr add {CLIENT}/64 dev eth0 nodad"]) + "\n")
        for ns, addr in ((self.b1, B1), (self.b2, B2)):
            sh("ip", "-n", ns, "-batch", "-", input="\n".join([
                "link set lo up", "link set eth0 up", f"addr add {addr}/64 dev eth0 nodad",
                "route add ::/0 via 2001:2:0:81::1"]) + "\n")
        for ns, name in ((self.b1, "b1"), (self.b2, "b2")):
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER6,
                                  name, "8080", "5353"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.procs.append(p)
            assert p.stdout.readline().strip() == "ready"
        return self

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
            p.kill()
            p.wait(5)
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)

    def apply(self, doc: dict) -> None:
        in_ns(self.lb, Nft().apply, doc)

    def conntrack(self, *args: str) -> str:
        return sh("conntrack", *args, ns=self.lb, check=False).stdout


@pytest.fixture
def topo(request):
    t = Topo6()
    request.addfinalizer(t.close)
    return t.up()


def backends(port: int = 8080):
    return (NatBackend("b1", B1, port), NatBackend("b2", B2, port))


def web(size: int = 251) -> NatService:
    return NatService("web6", "tcp", VIP, 80, 80, "src_port", SEED,
                      nft.maglev_slots([("b1", 1), ("b2", 1)], size), backends())


def dns(size: int = 251) -> NatService:
    return NatService("dns6", "udp", VIP, 53, 53, "src", SEED ^ 0xFFFF,
                      nft.maglev_slots([("b1", 1), ("b2", 1)], size), backends(5353))


def predicted(svc: NatService, src: str, sport: int = 0) -> str:
    b = nft.backend_of(svc, src, sport)
    return b.name if b else ""


def _connect(src: str, sport: int, timeout: float = 3.0) -> socket.socket:
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.settimeout(timeout)
    try:
        s.bind((src, sport))
        s.connect((VIP, 80))
    except BaseException:
        s.close()
        raise
    return s


def _line(s: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        d = s.recv(100)
        if not d:
            break
        buf += d
    return buf.decode().strip()


def _hello(src: str, sport: int) -> str:
    with _connect(src, sport) as s:
        return _line(s)


def _udp(src: str, sport: int) -> str:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u:
        u.settimeout(3)
        u.bind((src, sport))
        u.sendto(b"hi", (VIP, 53))
        return u.recv(100).decode().split(":")[0]


def test_ipv6_ruleset_forwards_by_the_slot_table_and_counts(topo):
    """The IPv4 and IPv6 listeners' tables in one transaction; every IPv6 connection and flow
    goes where the slot table and the kernel's jhash over the 16-byte source address (and
    the port, zero-padded) say; conntrack's mark is the slot; the ip6 table's counters see
    the packets; the IPv4 table is there, untouched by the IPv6 traffic."""
    v4 = NatService("web4", "tcp", "198.18.80.100", 80, 80, "src", 1, (0,),
                    (NatBackend("b1", "198.18.81.11", 8080),))
    svc, udp = web(), dns()
    topo.apply(nft.build(NatRuleset(services=(v4, svc, udp), exempt_tcp_ports=(9400,)),
                         fresh=True))
    text = sh("nft", "list", "table", "ip6", "halb", ns=topo.lb).stdout
    assert "jhash ip6 saddr . tcp sport mod 251 seed 0x5eed1234" in text, text
    ports = list(range(20000, 20400, 2))
    got = in_ns(topo.c, lambda: [_hello(CLIENT, p) for p in ports])
    want = [predicted(svc, CLIENT, p) for p in ports]
    assert got == want
    assert {"b1", "b2"} <= set(got)
    seen = 0
    for line in topo.conntrack("-L", "-f", "ipv6", "-p", "tcp", "--dport", "80").splitlines():
        f = {}
        for x in line.split():
            if "=" in x:
                f.setdefault(*x.split("=", 1))
        if f.get("src") == CLIENT and "mark" in f:
            assert int(f["mark"]) == nft.slot_of(svc, CLIENT, int(f["sport"])), line
            seen += 1
    assert seen >= 150
    uports = list(range(30000, 30050))
    answers = in_ns(topo.c, lambda: [_udp(CLIENT, p) for p in uports])
    # hash "src": one client address, one backend for all its flows
    assert answers == [predicted(udp, CLIENT)] * 50
    c = in_ns(topo.lb, Nft().counters, "halb")
    n1 = want.count("b1")
    assert c["be_web6_b1"][0] >= 3 * n1 and c["be_web6_b2"][0] >= 3 * (200 - n1)
    assert c["rbe_web6_b1"][0] >= 2 * n1 and c["rbe_web6_b2"][0] >= 2 * (200 - n1)
    ub = predicted(udp, CLIENT)
    assert c[f"be_dns6_{ub}"][0] == c[f"rbe_dns6_{ub}"][0] == 50
    assert c["drop_web6"] == (0, 0)
    assert c["be_web4_b1"] == (0, 0)  # the ip table's counter, read in the same call


def test_injected_ipv6_nat_entry_carries_an_established_connection(topo):
    """A standby's view of a takeover, in one LB: an IPv6 connection is established through
    the hashed DNAT, then the LB loses its conntrack entry (conntrack -D) while TCP is
    tracked strictly (tcp_loose = 0). The connection's next packets are invalid, unless the
    entry is injected again through ctnetlink (original tuple, DNAT to the backend, TCP
    established and liberal): then it goes on, on the same backend. The negative control is
    a second connection whose entry is not injected: it breaks. The BPF event filter, with
    the IPv6 listener in it, lets the kernel's event of the real connection through and
    drops the echo of our own injection."""
    svc = web()
    topo.apply(nft.build(NatRuleset(services=(svc,)), fresh=True))
    sh("sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0", ns=topo.lb)
    inj = in_ns(topo.lb, CtSocket)
    ev = in_ns(topo.lb, CtSocket, groups=GROUPS_ALL)
    try:
        attach_filter(ev, [(6, VIP, 80)], drop_portids=[inj.portid])
        kept_port = next(p for p in range(41000, 42000) if predicted(svc, CLIENT, p) == "b2")
        lost_port = kept_port + 1
        kept = in_ns(topo.c, _connect, CLIENT, kept_port)
        lost = in_ns(topo.c, _connect, CLIENT, lost_port)
        try:
            assert _line(kept) == "b2"
            assert _line(lost) == predicted(svc, CLIENT, lost_port)
            kept.sendall(b"one\n")
            assert _line(kept) == "b2:one"
            # the kernel's own (portid 0) assured event of the kept connection, parsed as IPv6
            flow = Flow(6, CLIENT, kept_port, VIP, 80, B2, 8080)
            deadline = time.monotonic() + 5
            got: list[Event] = []
            while not any(e.flow == flow for e in got) and time.monotonic() < deadline:
                ev.wait(1, 0.2)
                got += [m for m in ev.read() if isinstance(m, Event)]
            mine = [e for e in got if e.flow == flow]
            assert mine and mine[0].portid == 0 and mine[0].status & ctnl.IPS_ASSURED, got
            assert mine[0].mark == nft.slot_of(svc, CLIENT, kept_port)

            # both entries lost, as on a node that never saw these connections (once the
            # connections are quiet: a delayed ACK meeting no entry would be reset already)
            time.sleep(0.5)
            for p in (kept_port, lost_port):
                sh("conntrack", "-D", "-f", "ipv6", "-p", "tcp", "--sport", str(p), ns=topo.lb)
            assert str(kept_port) not in topo.conntrack("-L", "-f", "ipv6")
            r = in_ns(topo.lb, lambda: inject(inj, [flow], timeout=600))
            assert (r.ok, r.errors) == (1, {}), r
            line = next(x for x in topo.conntrack("-L", "-f", "ipv6").splitlines()
                        if f"sport={kept_port} " in x)
            assert f"src={B2} dst={CLIENT} sport=8080 dport={kept_port}" in line, line
            assert "ESTABLISHED" in line and "[ASSURED]" in line, line
            assert flow in {e.flow for e in in_ns(topo.lb, dump, inj,
                                                   family=socket.AF_INET6)}

            kept.sendall(b"two\n")
            assert _line(kept) == "b2:two"  # on the same backend, through the injected entry
            lost.settimeout(2)
            with pytest.raises(OSError):  # reset by the LB's own stack or timed out
                lost.sendall(b"two\n")
                if not _line(lost):
                    raise ConnectionResetError("closed")
            # our own injection was reported, and the filter dropped it in the kernel
            time.sleep(0.2)
            echoes = [m for m in ev.read() if isinstance(m, Event) and m.portid == inj.portid]
            assert not echoes, echoes
            assert ev.bad == 0 and ev.overruns == 0
        finally:
            kept.close()
            lost.close()
    finally:
        inj.close()
        ev.close()
