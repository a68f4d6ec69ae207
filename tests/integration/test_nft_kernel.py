"""halb.nat.nft + halb.nat.nftapply against the kernel: the hashed DNAT table in network
namespaces (root).

Per test a small topology; every name starts with ``hnf`` and a per-test tag, all addresses
in 198.18.80.0/23, everything removed in a finalizer (also when the test fails):

    <t>c   client   eth0 198.18.80.2/24 (+ /32 aliases 198.18.80.10..)
                        |
    <t>lb  LB       eth0 198.18.80.1/24 + VIP 198.18.80.100/32, ip_forward=1
                    eth1 (a bridge) 198.18.81.1/24
                        |
    <t>b1, <t>b2     backends 198.18.81.11 / .12, default route via 198.18.81.1; TCP on
                     8080 (and 9000-9003) answers "<name>\\n" then echoes "<name>:<data>",
                     UDP 5353 echoes "<name>:<data>"

The client and the nft calls run in this process, each in a thread moved into the namespace
(setns affects only the calling thread); the backends are subprocesses.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from halb.nat import nft
from halb.nat.nft import NatBackend, NatRuleset, NatService
from halb.nat.nftapply import Nft, NftError, counters_of, netlink_counters

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(not shutil.which("ip") or not shutil.which("nft"),
                       reason="needs iproute2 and nft"),
]

VIP = "198.18.80.100"
CLIENT = "198.18.80.2"
B1, B2 = "198.18.81.11", "198.18.81.12"
SEED = 0x5EED1234
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

SERVER = r"""
import socket, sys, threading
name, tcp_ports, udp_ports = sys.argv[1], sys.argv[2], sys.argv[3]
tag = name.encode()
def conn(c):
    with c:
        try:
            c.sendall(tag + b"\n")
            while True:
                d = c.recv(4096)
                if not d:
                    return
                c.sendall(tag + b":" + d)
        except OSError:  # reset by the client
            pass
def tcp(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()
def udp(u):
    while True:
        d, a = u.recvfrom(65535)
        u.sendto(tag + b":" + d, a)
for p in filter(None, tcp_ports.split(",")):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(p)))
    s.listen(1024)
    threading.Thread(target=tcp, args=(s,), daemon=True).start()
for p in filter(None, udp_ports.split(",")):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", int(p)))
    threading.Thread(target=udp, args=(u,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def in_ns(ns: str, fn, *args, timeout: float = 40.0, **kw):
    """Run ``fn(*args, **kw)`` in a thread that joined network namespace ``ns``."""
    box: dict = {}

    def run():
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, os.strerror(e))
            finally:
                os.close(fd)
            box["v"] = fn(*args, **kw)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{fn.__name__} in {ns} did not finish within {timeout} s")
    if "e" in box:
        raise box["e"]
    return box["v"]


def sh(*argv: str, ns: str | None = None, check: bool = True, input: str | None = None,
       timeout: float = 20.0) -> subprocess.CompletedProcess:
    if ns:
        argv = ("ip", "netns", "exec", ns) + argv
    return subprocess.run(argv, input=input, capture_output=True, text=True, check=check,
                          timeout=timeout)


class Topo:
    def __init__(self):
        t = "hnf" + secrets.token_hex(2)
        self.c, self.lb, self.b1, self.b2 = t + "c", t + "lb", t + "b1", t + "b2"
        self.procs: list[subprocess.Popen] = []
        self.made: list[str] = []

    def up(self, aliases: int = 0) -> "Topo":
        for ns in (self.c, self.lb, self.b1, self.b2):
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
        lb = [f"link add eth0 type veth peer name eth0 netns {self.c}",
              "link add eth1 type bridge",
              f"link add p1 type veth peer name eth0 netns {self.b1}",
              f"link add p2 type veth peer name eth0 netns {self.b2}",
              "link set p1 master eth1", "link set p2 master eth1",
              "addr add 198.18.80.1/24 dev eth0", f"addr add {VIP}/32 dev eth0",
              "addr add 198.18.81.1/24 dev eth1"]
        lb += [f"link set {i} up" for i in ("lo", "eth0", "eth1", "p1", "p2")]
        sh("ip", "-n", self.lb, "-batch", "-", input="\n".join(lb) + "\n")
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=self.lb)
        cl = ["link set lo up", "link set eth0 up", f"addr add {CLIENT}/24 dev eth0"]
        cl += [f"addr add 198.18.80.{10 + i}/32 dev eth0" for i in range(aliases)]
        sh("ip", "-n", self.c, "-batch", "-", input="\n".join(cl) + "\n")
        for ns, addr in ((self.b1, B1), (self.b2, B2)):
            sh("ip", "-n", ns, "-batch", "-", input="\n".join([
                "link set lo up", "link set eth0 up", f"addr add {addr}/24 dev eth0",
                "route add default via 198.18.81.1"]) + "\n")
        for ns, name in ((self.b1, "b1"), (self.b2, "b2")):
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, name,
                                  "8080,9000,9001,9002,9003", "5353"],
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

    # -- helpers run in the namespaces

    def nft(self, method: str = "auto") -> "NsNft":
        return NsNft(self.lb, Nft(method))

    def tcp_hello(self, src: str, sport: int = 0, port: int = 80, *, dst: str = VIP,
                  ns: str | None = None) -> str:
        return in_ns(ns or self.c, _tcp_hello, src, sport, dst, port)

    def tcp_many(self, pairs, port: int = 80) -> list[str]:
        return in_ns(self.c, lambda: [_tcp_hello(a, p, VIP, port) for a, p in pairs])

    def udp_many(self, srcs, port: int = 5353) -> list[str]:
        return in_ns(self.c, lambda: [_udp_ask(a, VIP, port) for a in srcs])

    def conntrack(self, *args: str) -> str:
        return sh("conntrack", *args, ns=self.lb, check=False).stdout


class NsNft:
    """An ``Nft`` whose calls run in the LB namespace."""

    def __init__(self, ns: str, n: Nft):
        self.ns, self.n = ns, n

    def __getattr__(self, name):
        fn = getattr(self.n, name)
        return lambda *a, **kw: in_ns(self.ns, fn, *a, **kw)

    def timed_apply(self, doc: dict) -> float:
        def run():
            t0 = time.perf_counter()
            self.n.apply(doc)
            return time.perf_counter() - t0
        return in_ns(self.ns, run)

    def netlink_counters(self, table: str = "halb"):
        return in_ns(self.ns, netlink_counters, table)


def _tcp_hello(src: str, sport: int, dst: str, port: int) -> str:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # reset on close: no TIME_WAIT, so a source port can be used again at once
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.settimeout(3)
        s.bind((src, sport))
        s.connect((dst, port))
        return _line(s)


def _line(s: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        d = s.recv(100)
        if not d:
            break
        buf += d
    return buf.decode().strip()


def _udp_ask(src: str, dst: str, port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(3)
        u.bind((src, 0))
        u.sendto(b"hi", (dst, port))
        return u.recv(100).decode().split(":")[0]


@pytest.fixture
def topo(request):
    t = Topo()
    request.addfinalizer(t.close)
    return t


def backends(port: int = 8080):
    return (NatBackend("b1", B1, port), NatBackend("b2", B2, port))


def web(size: int = 251, *, hash_fields: str = "src_port", seed: int = SEED,
        slots=None) -> NatService:
    return NatService("web", "tcp", VIP, 80, 80, hash_fields, seed,
                      slots or nft.maglev_slots([("b1", 1), ("b2", 1)], size), backends())


def dns(size: int = 251) -> NatService:
    return NatService("dns", "udp", VIP, 5353, 5353, "src", SEED ^ 0xFFFF,
                      nft.maglev_slots([("b1", 1), ("b2", 1)], size), backends(5353))


def predicted(svc: NatService, src: str, sport: int = 0) -> str:
    b = nft.backend_of(svc, src, sport)
    return b.name if b else ""


# ---------------------------------------------------------------------------------------------


def test_hashed_dnat_follows_the_slot_table(topo):
    """Every TCP connection and UDP flow lands on the backend the slot table names for the
    kernel's jhash of its source (predicted in Python), source-address hashing keeps a
    client on one backend, a range listener keeps the client's port, the output chain serves
    a client on the LB itself, and the counters see the packets."""
    topo.up(aliases=50)
    svc, udp = web(), dns()
    rng = NatService("rng", "tcp", VIP, 9000, 9003, "src", 77, (1, 0, 1),
                     (NatBackend("b1", B1, 0), NatBackend("b2", B2, 0)))
    src_only = NatService("src", "tcp", VIP, 81, 81, "src", SEED, svc.slots, backends())
    rs = NatRuleset(services=(svc, udp, rng, src_only))
    n = topo.nft()
    n.apply(nft.build(rs))

    pairs = [(CLIENT, 20000 + 7 * i) for i in range(200)]
    got = topo.tcp_many(pairs)
    want = [predicted(svc, a, p) for a, p in pairs]
    assert got == want
    assert {"b1", "b2"} <= set(got)

    # the ct mark holds the slot: conntrack shows the kernel's own hash results
    marks = topo.conntrack("-L", "-p", "tcp", "--dport", "80")
    seen = 0
    for line in marks.splitlines():
        f = {}
        for x in line.split():
            if "=" in x:
                f.setdefault(*x.split("=", 1))  # the first: the original direction
        if f.get("src") == CLIENT and "mark" in f:
            assert int(f["mark"]) == nft.slot_of(svc, CLIENT, int(f["sport"]))
            seen += 1
    assert seen >= 150  # reset entries linger 10 s in CLOSE

    aliases = [f"198.18.80.{10 + i}" for i in range(50)]
    first = topo.tcp_many([(a, 0) for a in aliases], port=81)
    again = topo.tcp_many([(a, 0) for a in aliases], port=81)
    assert first == again == [predicted(src_only, a) for a in aliases]
    assert {"b1", "b2"} <= set(first)

    answers = topo.udp_many(aliases)
    assert answers == [predicted(udp, a) for a in aliases]

    for port in (9000, 9003):  # the range: DNAT keeps the port (the backends listen on it)
        assert topo.tcp_hello(CLIENT, 31000 + port, port) == predicted(rng, CLIENT)

    # the output nat chain: a client on the LB host itself
    assert topo.tcp_hello(VIP, 32000, ns=topo.lb) == predicted(svc, VIP, 32000)

    c = n.counters()
    assert c == counters_of(n.list_table("halb"))
    n_b1 = want.count("b1")
    # per connection the backend gets SYN, ACK, RST at least and sends SYN/ACK + the name
    assert c["be_web_b1"][0] >= 3 * n_b1 and c["be_web_b2"][0] >= 3 * (200 - n_b1)
    assert c["rbe_web_b1"][0] >= 2 * n_b1 and c["rbe_web_b2"][0] >= 2 * (200 - n_b1)
    u1 = answers.count("b1")
    assert c["be_dns_b1"][0] == c["rbe_dns_b1"][0] == u1
    assert c["be_dns_b2"][0] == c["rbe_dns_b2"][0] == 50 - u1
    assert c["drop_web"] == (0, 0)


def test_two_nodes_with_the_same_ruleset_pick_the_same_backends(request):
    """The same document applied on two LB nodes sends every client to the same backend;
    another seed moves clients (the seed is what makes nodes agree)."""
    a, b = Topo(), Topo()
    request.addfinalizer(a.close)
    request.addfinalizer(b.close)
    a.up(aliases=20)
    b.up(aliases=20)
    svc = web(hash_fields="src_port")
    doc = nft.build(NatRuleset(services=(svc,)))
    a.nft().apply(doc)
    b.nft().apply(doc)
    pairs = [(f"198.18.80.{10 + i % 20}", 40000 + i) for i in range(100)]
    ra, rb = a.tcp_many(pairs), b.tcp_many(pairs)
    assert ra == rb
    assert {"b1", "b2"} <= set(ra)

    other = web(hash_fields="src_port", seed=SEED + 1)
    b.nft().apply(nft.build(NatRuleset(services=(other,))))
    sh("conntrack", "-F", ns=b.lb, check=False)
    rc = b.tcp_many(pairs)
    assert rc == [predicted(other, x, p) for x, p in pairs]
    assert rc != ra


def test_slot_update_moves_new_connections_and_keeps_established_ones(topo):
    topo.up()
    svc = web()
    n = topo.nft()
    n.apply(nft.build(NatRuleset(services=(svc,))))
    # one connection to b2 that stays open across the update
    sport = next(p for p in range(45000, 46000) if predicted(svc, CLIENT, p) == "b2")
    held = in_ns(topo.c, socket.create_connection, (VIP, 80), 3, (CLIENT, sport))
    try:
        assert _line(held) == "b2"
        new_slots = tuple(0 if s == 1 else s for s in svc.slots)
        doc = nft.slot_update(svc, svc.slots, new_slots)
        changed = sum(1 for o, x in zip(svc.slots, new_slots) if o != x)
        (dele, add) = doc["nftables"]  # one map (the ports stay 8080): deletes, then adds
        assert len(dele["delete"]["element"]["elem"]) == changed
        assert len(add["add"]["element"]["elem"]) == changed
        n.apply(doc)
        pairs = [(CLIENT, 46000 + i) for i in range(100)]
        assert topo.tcp_many(pairs) == ["b1"] * 100
        held.sendall(b"still there?\n")
        assert _line(held) == "b2:still there?"
        # and back: b2 takes its slots again
        n.apply(nft.slot_update(svc, new_slots, svc.slots))
        assert topo.tcp_many(pairs) == [predicted(svc, a, p) for a, p in pairs]
        # a slot without a backend: its clients are dropped, never sent to the VIP itself
        empty = tuple(-1 if s == 1 else s for s in svc.slots)
        n.apply(nft.slot_update(svc, svc.slots, empty))
        lost = next(p for p in range(47000, 48000) if predicted(svc, CLIENT, p) == "b2")
        with pytest.raises(OSError):  # timeout: the SYN is dropped
            in_ns(topo.c, _tcp_hello_short, CLIENT, lost, VIP, 80)
        assert n.counters()["drop_web"][0] >= 1
        assert topo.tcp_hello(CLIENT, next(
            p for p in range(47000, 48000) if predicted(svc, CLIENT, p) == "b1")) == "b1"
    finally:
        held.close()


def _tcp_hello_short(src, sport, dst, port):
    with socket.socket() as s:
        s.settimeout(0.5)
        s.bind((src, sport))
        s.connect((dst, port))
        return _line(s)


def test_apply_times_with_65537_slots(topo, record_property):
    """A full table with 65537-entry maps, then an update of about half of its slots."""
    topo.up()
    svc = web(65537)
    n = topo.nft()
    doc = nft.build(NatRuleset(services=(svc,), exempt_tcp_ports=(7000,)))
    full = n.timed_apply(doc)
    again = n.timed_apply(doc)  # idempotent: the same again (maps flushed and refilled)
    new_slots = tuple(0 if s == 1 else s for s in svc.slots)
    upd_doc = nft.slot_update(svc, svc.slots, new_slots)
    changed = sum(1 for o, x in zip(svc.slots, new_slots) if o != x)
    upd = n.timed_apply(upd_doc)
    back = n.timed_apply(nft.slot_update(svc, new_slots, svc.slots))
    t0 = time.perf_counter()
    cnt = n.netlink_counters()
    nl = time.perf_counter() - t0
    for k, v in (("full_apply_s", full), ("reapply_s", again), ("update_slots", changed),
                 ("update_s", upd), ("update_back_s", back), ("netlink_counters_s", nl)):
        record_property(k, round(v, 4) if isinstance(v, float) else v)
    print(f"\n65537 slots: full apply {full:.3f} s, re-apply {again:.3f} s, update of "
          f"{changed} slots {upd:.3f} s, back {back:.3f} s, counters {nl * 1000:.2f} ms")
    assert 30000 < changed < 36000
    assert full < 10 and upd < 10
    assert set(cnt) >= {"be_web_b1", "rbe_web_b2", "drop_web"}
    pairs = [(CLIENT, 50000 + i) for i in range(20)]
    assert topo.tcp_many(pairs) == [predicted(svc, a, p) for a, p in pairs]


@pytest.mark.parametrize("method", ["lib", "cli"])
def test_invalid_document_raises_and_changes_nothing(topo, method):
    topo.up()
    n = topo.nft(method)
    svc = web()
    n.apply(nft.build(NatRuleset(services=(svc,))))
    before = n.list_table("halb")
    good = {"add": {"element": {"family": "ip", "table": "halb", "name": "slots_web",
                                "elem": [[9999, B1]]}}}
    flush = {"flush": {"map": {"family": "ip", "table": "halb", "name": "ports_web"}}}
    cases = [
        ({"add": {"element": {"family": "ip", "table": "halb", "name": "slots_web",
                              "elem": [[10000, "198.18.81.300"]]}}}, "Could not resolve"),
        ({"add": {"element": {"family": "ip", "table": "halb", "name": "slots_nope",
                              "elem": [[1, B1]]}}}, "No such file or directory"),
        # a key that is there with another value (add never overwrites)
        ({"add": {"element": {"family": "ip", "table": "halb", "name": "slots_web",
                              "elem": [[1, B2 if svc.slots[1] == 0 else B1]]}}}, "File exists"),
    ]
    for bad, text in cases:
        with pytest.raises(NftError) as ei:
            n.apply({"nftables": [good, flush, bad]})
        assert text in str(ei.value) and "Error" in str(ei.value), str(ei.value)
        assert n.list_table("halb") == before
    # a bad ruleset fails in the builder already
    with pytest.raises(ValueError):
        nft.build(NatRuleset(services=(NatService("x", "tcp", VIP, 80, 80, "src", 1, (0,),
                                                  (NatBackend("b", "198.18.81.300", 80),)),)))
    # the dry run checks against the kernel without committing
    n.check({"nftables": [good]})
    assert n.list_table("halb") == before
    with pytest.raises(NftError):
        n.check({"nftables": [cases[1][0]]})


def test_conntrack_events_of_tcp_and_udp(topo, record_property):
    """``ct event set assured,destroy`` (TCP) and ``new,destroy`` (UDP): which events the
    kernel then reports, read with ``conntrack -E``."""
    if not shutil.which("conntrack"):
        pytest.skip("needs conntrack(8)")
    topo.up()
    n = topo.nft()
    n.apply(nft.build(NatRuleset(services=(web(), dns()))))
    ev = subprocess.Popen(["ip", "netns", "exec", topo.lb, "conntrack", "-E", "-o", "id"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(ev.stdout), daemon=True)
    reader.start()

    def wait_lines(pred, what, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not any(pred(ln) for ln in list(lines)):
            assert time.monotonic() < deadline, f"no {what} event in {lines}"
            time.sleep(0.05)
    try:
        time.sleep(0.3)
        s = in_ns(topo.c, socket.create_connection, (VIP, 80), 3, (CLIENT, 41000))
        assert _line(s) in ("b1", "b2")
        s.sendall(b"x\n")
        _line(s)
        s.close()  # FIN both ways (the server closes on EOF)
        assert topo.udp_many([CLIENT])[0] in ("b1", "b2")
        wait_lines(lambda ln: "[NEW] udp" in ln, "udp NEW")
        time.sleep(0.3)
        # end both entries now (TIME_WAIT and the UDP timeout would take 120 s / 30 s, and
        # the kernel's conntrack GC reports expired entries only when it gets to them)
        for proto, port in (("tcp", "80"), ("udp", "5353")):
            r = sh("conntrack", "-D", "-p", proto, "--orig-port-dst", port, ns=topo.lb,
                   check=False)
            assert "1 flow entries have been deleted" in r.stderr + r.stdout, r
        wait_lines(lambda ln: "[DESTROY] udp" in ln, "udp DESTROY")
        wait_lines(lambda ln: "[DESTROY] tcp" in ln, "tcp DESTROY")
        time.sleep(0.2)
    finally:
        ev.terminate()
        ev.wait(5)
        reader.join(5)
    out = "".join(lines)
    tcp = [ln for ln in out.splitlines() if " tcp " in ln and "dport=80 " in ln]
    udp = [ln for ln in out.splitlines() if " udp " in ln and "dport=5353 " in ln]
    record_property("tcp_events", tcp)
    record_property("udp_events", udp)
    print("\nTCP events:\n  " + "\n  ".join(tcp) + "\nUDP events:\n  " + "\n  ".join(udp))
    kinds = lambda lines: [ln.split()[0] for ln in lines]  # noqa: E731
    assert kinds(tcp) == ["[UPDATE]", "[DESTROY]"], out
    assert "ESTABLISHED" in tcp[0] and "ASSURED" in tcp[0]
    assert kinds(udp) == ["[NEW]", "[DESTROY]"], out
    slot = nft.slot_of(web(), CLIENT, 41000)
    assert f"mark={slot} " in tcp[0] + " "


def test_reapply_keeps_counters_previous_removes_stale_and_delete(topo):
    topo.up()
    n = topo.nft()
    svc, udp = web(), dns()
    rs = NatRuleset(services=(svc, udp), exempt_tcp_ports=(7000,))
    n.apply(nft.build(rs))
    topo.tcp_many([(CLIENT, 42000 + i) for i in range(10)])
    c1 = n.counters()
    assert sum(c1[k][0] for k in ("be_web_b1", "be_web_b2")) >= 30
    listing = n.list_table("halb")
    n.apply(nft.build(rs))  # the same state again, counters kept
    assert _strip(n.list_table("halb")) == _strip(listing)
    assert n.counters() == c1

    # the sync port is not tracked, either way
    def serve_once():
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("198.18.80.1", 7000))
        ls.listen(1)
        return ls
    ls = in_ns(topo.lb, serve_once)
    try:
        c = in_ns(topo.c, socket.create_connection, ("198.18.80.1", 7000), 3)
        a, _ = ls.accept()
        c.sendall(b"sync")
        assert a.recv(10) == b"sync"
        assert "dport=7000" not in topo.conntrack("-L")
        a.close()
        c.close()
    finally:
        ls.close()

    # the UDP listener goes away: with previous= its maps and counters go too
    rs2 = NatRuleset(services=(svc,))
    n.apply(nft.build(rs2, previous=rs))
    names = {next(iter(o.values()))["name"] for o in n.list_table("halb")["nftables"]
             if set(o) & {"map", "counter", "chain"}}
    assert not any("dns" in x for x in names)
    assert "raw" not in names and "rawout" not in names
    assert "slots_web" in names and n.counters()["be_web_b1"] == c1["be_web_b1"]
    assert topo.tcp_hello(CLIENT, 43000) == predicted(svc, CLIENT, 43000)

    # fresh: the exact state, counters from zero
    n.apply(nft.build(rs, fresh=True))
    assert all(v == (0, 0) for v in n.counters().values())
    assert _strip(n.list_table("halb")) == _strip(listing, zero=True)

    # nft's text listing loads again (an admin's "nft list ruleset > file" restores)
    text = sh("nft", "list", "table", "ip", "halb", ns=topo.lb).stdout
    assert "dnat to ct mark map @slots_web:ct mark map @ports_web" in text
    n.apply(nft.delete())
    sh("nft", "-f", "-", ns=topo.lb, input=text)
    assert sh("nft", "list", "table", "ip", "halb", ns=topo.lb).stdout == text

    n.apply(nft.delete())
    with pytest.raises(NftError, match="No such file or directory"):
        n.list_table("halb")
    assert n.counters() == {} and n.netlink_counters() == {}
    n.apply(nft.delete())  # absent already: still fine
    assert "halb" not in sh("nft", "list", "tables", ns=topo.lb).stdout


def _strip(listing: dict, zero: bool = False) -> str:
    """A listing without handles (and with counters zeroed when ``zero``)."""
    def clean(x):
        if isinstance(x, dict):
            return {k: (0 if zero and k in ("packets", "bytes") else clean(v))
                    for k, v in x.items() if k != "handle"}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(listing["nftables"][1:]), sort_keys=True)
