"""The ctnetlink codec and socket edge (halb/nat/ctnl.py, ctsock.py) against the kernel, each
test in a network namespace of its own (``hct<pid>-<n>``, removed afterwards, also on
failure), checked with the ``conntrack`` CLI (conntrack-tools) where it helps.

Sockets are made in a short-lived thread switched into the namespace (setns moves only the
calling thread; a socket stays in the namespace it was made in), so the test process itself
never leaves its own namespace. Root is required (CI is root).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import queue
import re
import select
import socket
import struct
import subprocess
import threading
import time
from typing import Any, Callable

import pytest

from halb.nat import ctnl
from halb.nat.ctnl import Event, Flow, NlAck, NlError
from halb.nat.ctsock import (GROUP_NEW, GROUPS_ALL, CtSocket, attach_filter, dump, inject)
from lab.lab import ns_call as _ns_call

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

VIP = "198.18.60.100"
BACKENDS = ("198.18.70.1", "198.18.70.2")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_names = itertools.count(1)


def sh(*args: str, timeout: float = 10) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True,
                          timeout=timeout).stdout


def ns_call(ns: str, fn: Callable[..., Any], *args, timeout: float = 10.0, **kw) -> Any:
    """``fn(*args, **kw)`` in a thread that has entered namespace ``ns`` (lab.lab.ns_call)."""
    return _ns_call(ns, lambda: fn(*args, **kw), timeout=timeout)


@pytest.fixture
def ns(request):
    """A fresh network namespace with lo up; deleted afterwards whatever happens."""
    name = f"hct{os.getpid()}-{next(_names)}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)  # a stale one
    sh("ip", "netns", "add", name)
    request.addfinalizer(lambda: subprocess.run(["ip", "netns", "del", name],
                                                capture_output=True, timeout=10))
    sh("ip", "-n", name, "link", "set", "lo", "up")
    return name


@pytest.fixture
def socks(request):
    """Closes the CtSockets a test registers."""
    made: list[CtSocket] = []

    def close() -> None:
        for s in made:
            _pending.pop(id(s), None)
            s.close()
    request.addfinalizer(close)
    return made


def ct_socket(ns: str, socks: list, **kw) -> CtSocket:
    s = ns_call(ns, CtSocket, **kw)
    socks.append(s)
    return s


def flows(n: int, *, proto: int = 6, v6: bool = False) -> list[Flow]:
    if v6:
        return [Flow(proto, f"2001:db8:50::{i + 1:x}", 10000 + i, "2001:db8:60::100", 80,
                     f"2001:db8:70::{i % 2 + 1}", 8080) for i in range(n)]
    return [Flow(proto, f"198.18.{50 + i // 50000}.{(i // 250) % 250 + 1}",
                 10000 + i % 50000 % 250 * 200 + i // 62500, VIP, 80, BACKENDS[i % 2], 8080)
            for i in range(n)]


def cli_entries(ns: str, *args: str) -> list[dict]:
    """``conntrack -L`` parsed: per entry its state, flags and both tuples."""
    out = sh("ip", "netns", "exec", ns, "conntrack", "-L", *args, timeout=20)
    entries = []
    for line in out.splitlines():
        kv = re.findall(r"(\w+)=(\S+)", line)
        keys = [k for k, _ in kv]
        if keys[:8] != ["src", "dst", "sport", "dport"] * 2:
            continue
        v = [x for _, x in kv]
        entries.append({"line": line, "proto": line.split()[0], "orig": (v[0], v[1], int(v[2]), int(v[3])),
                        "reply": (v[4], v[5], int(v[6]), int(v[7])),
                        "established": " ESTABLISHED " in line, "assured": "[ASSURED]" in line,
                        "mark": int(dict(kv).get("mark", "0"))})
    return entries


_pending: dict[int, list] = {}  # per socket: messages read but not yet looked at


def read_until(sock: CtSocket, pred: Callable[[Event], bool], timeout: float = 5.0) -> Event:
    """The first event matching ``pred``, reading as needed; later messages of the same read
    stay pending for the next call."""
    pending = _pending.setdefault(id(sock), [])
    seen: list = []
    end = time.monotonic() + timeout
    while True:
        while pending:
            m = pending.pop(0)
            seen.append(m)
            if isinstance(m, Event) and pred(m):
                return m
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no matching event in {timeout}s; saw {seen[-20:]}")
        if sock.wait(select.POLLIN, left):
            pending += sock.read()


def request(sock: CtSocket, msg_fn: Callable[..., bytes], *args, **kw) -> list:
    """Sends one request with NLM_F_ACK; returns the answers up to its ack/error."""
    seq = sock.next_seq()
    assert sock.send_batch([msg_fn(*args, seq=seq, ack=True, **kw)]) == 1
    out: list = []
    end = time.monotonic() + 5
    while time.monotonic() < end:
        sock.wait(select.POLLIN, end - time.monotonic())
        for m in sock.read():
            out.append(m)
            if isinstance(m, (NlAck, NlError)) and m.seq == seq:
                return out
    raise AssertionError(f"no ack for seq {seq}: {out}")


# -- inject and the conntrack CLI ----------------------------------------------------------------
def test_inject_1000_dnat_flows_as_conntrack_lists_them(ns, socks):
    s = ct_socket(ns, socks)
    fl = flows(1000)
    r = inject(s, fl, timeout=600)
    assert (r.sent, r.ok, r.errors, r.overruns) == (1000, 1000, {}, 0)

    entries = cli_entries(ns, "-p", "tcp")
    assert len(entries) == 1000
    by_orig = {e["orig"]: e for e in entries}
    for f in fl:
        e = by_orig[(f.src, f.dst, f.sport, f.dport)]
        assert e["established"] and e["assured"], e["line"]
        # the kernel translated the reply tuple: backend -> client
        assert e["reply"] == (f.nat_dst, f.src, f.nat_dport, f.sport), e["line"]

    # the kernel refuses NAT on an entry that exists: EOPNOTSUPP, not EEXIST (no NLM_F_EXCL);
    # a flow that cannot be encoded is counted as EINVAL and does not stop the others
    bad = Flow(6, "198.18.50.1", 70000, VIP, 80, BACKENDS[0], 8080)
    new = Flow(6, "198.18.53.1", 1, VIP, 80, BACKENDS[0], 8080)
    again = inject(s, fl[:10] + [bad, new], timeout=600)
    assert (again.sent, again.ok) == (11, 1)
    assert again.errors == {errno.EOPNOTSUPP: 10, errno.EINVAL: 1}
    assert (fl[0], errno.EOPNOTSUPP) in again.failed and (bad, errno.EINVAL) in again.failed
    # an update (no NAT, no NLM_F_CREATE) refreshes an entry
    assert request_ok(s, ctnl.encode_update, fl[0], timeout=999, mark=5)
    (e,) = cli_entries(ns, "-p", "tcp", "-s", fl[0].src, "--sport", str(fl[0].sport))
    assert e["mark"] == 5 and int(e["line"].split()[2]) >= 990
    # ... and only an entry that exists
    (answer,) = request(s, ctnl.encode_update, Flow(6, "198.18.53.1", 2, VIP, 80, BACKENDS[0],
                                                    8080), timeout=9)
    assert isinstance(answer, NlError) and answer.errno == errno.ENOENT


def test_create_without_confirmed_is_ebusy(ns, socks):
    """CTA_STATUS without IPS_CONFIRMED: the kernel answers EBUSY (why encode_create sets it)."""
    s = ct_socket(ns, socks)
    f = flows(1)[0]
    good = ctnl.encode_create(f, seq=1, timeout=60, ack=True)
    status_attr = struct.pack("=HH", 8, ctnl.CTA_STATUS) + struct.pack("!I", ctnl.CREATE_STATUS)
    at = good.index(status_attr) + 4
    no_confirmed = (ctnl.IPS_SEEN_REPLY | ctnl.IPS_ASSURED).to_bytes(4, "big")
    bad = good[:at] + no_confirmed + good[at + 4:]
    assert s.send_batch([bad]) == 1
    assert read_acks(s, 1) == [NlError(1, errno.EBUSY)]
    assert s.send_batch([good]) == 1
    assert read_acks(s, 1) == [NlAck(1)]


def read_acks(s: CtSocket, seq: int) -> list:
    end = time.monotonic() + 5
    got: list = []
    while time.monotonic() < end and not got:
        s.wait(select.POLLIN, end - time.monotonic())
        got = [m for m in s.read() if isinstance(m, (NlAck, NlError)) and m.seq == seq]
    return got


def test_inject_rate_10000(ns, socks):
    s = ct_socket(ns, socks)
    fl = flows(10000)
    r = inject(s, fl, timeout=600)
    assert (r.ok, r.errors, r.overruns) == (10000, {}, 0)
    rate = r.sent / r.seconds
    print(f"\ninject: {r.sent} entries in {r.seconds * 1000:.0f} ms = {rate:,.0f} entries/s")
    count = int(sh("ip", "netns", "exec", ns, "conntrack", "-C").split()[0])
    assert count == 10000
    assert rate > 5000  # measured ~40-50k/s; a floor far below that, for slow CI machines

    # and back out in batches: deletes without ACK answer nothing when all succeed
    seq = s.next_seq(len(fl))
    msgs = [ctnl.encode_delete(f, seq=seq + i) for i, f in enumerate(fl)]
    assert s.send_batch(msgs) == len(msgs)
    assert [m for m in s.read() if isinstance(m, NlError)] == []
    assert int(sh("ip", "netns", "exec", ns, "conntrack", "-C").split()[0]) == 0


def test_ipv6_inject_and_dump(ns, socks):
    s = ct_socket(ns, socks)
    v6 = flows(50, proto=17, v6=True) + flows(50, proto=6, v6=True)
    v4 = flows(20)
    r = inject(s, v6 + v4, timeout=300)
    assert (r.ok, r.errors) == (120, {})
    entries = cli_entries(ns, "-f", "ipv6")
    assert len(entries) == 100
    by_orig = {(e["proto"], e["orig"]): e for e in entries}
    for f in v6:
        e = by_orig[("tcp" if f.proto == 6 else "udp", (f.src, f.dst, f.sport, f.dport))]
        assert e["reply"] == (f.nat_dst, f.src, f.nat_dport, f.sport), e["line"]
        assert e["assured"] and (f.proto == 17 or e["established"])
    # the dump filters by family
    assert {e.flow for e in dump(s, family=socket.AF_INET6)} == set(v6)
    assert {e.flow for e in dump(s, family=socket.AF_INET)} == set(v4)
    assert len(dump(s, family=socket.AF_UNSPEC)) == 120


# -- events --------------------------------------------------------------------------------------
class CliEvents:
    """``conntrack -E`` in the namespace, its lines collected by a thread."""

    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "conntrack", "-E"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, *needles: str, timeout: float = 5.0) -> str:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if all(n in line for n in needles):
                return line
        raise AssertionError(f"conntrack -E printed no line with {needles}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def test_events_of_an_injected_flow(ns, socks, request):
    ev = ct_socket(ns, socks, groups=GROUPS_ALL)
    inj = ct_socket(ns, socks)
    cli = CliEvents(ns)
    request.addfinalizer(cli.close)
    # conntrack -E needs a moment to subscribe: probe with a flow of its own until it shows
    probe = Flow(17, "198.18.51.1", 1, VIP, 53, BACKENDS[0], 53)
    end = time.monotonic() + 10
    while True:
        assert request_ok(inj, ctnl.encode_create, probe, timeout=5)
        try:
            cli.wait_for("[NEW]", "src=198.18.51.1 ", timeout=0.3)
            break
        except AssertionError:
            assert time.monotonic() < end, "conntrack -E never subscribed"
            assert request_ok(inj, ctnl.encode_delete, probe)
    assert request_ok(inj, ctnl.encode_delete, probe)

    f = Flow(6, "198.18.50.7", 43210, VIP, 80, BACKENDS[1], 8080)
    assert inject(inj, [f], timeout=120, mark=3).ok == 1
    new = read_until(ev, lambda e: e.kind == "new" and e.flow == f)
    assert new.portid == inj.portid != 0  # nlmsg_pid: the socket that asked for it
    assert (new.timeout, new.mark, new.tcp_state) == (120, 3, ctnl.TCP_CONNTRACK_ESTABLISHED)
    want = ctnl.IPS_CONFIRMED | ctnl.IPS_SEEN_REPLY | ctnl.IPS_ASSURED | ctnl.IPS_DST_NAT
    assert new.status & want == want
    line = cli.wait_for("[NEW]", "src=198.18.50.7 ")
    assert "src=198.18.70.2 dst=198.18.50.7 sport=8080 dport=43210" in line
    assert "ESTABLISHED" in line and "[ASSURED]" in line

    assert request_ok(inj, ctnl.encode_delete, f)
    gone = read_until(ev, lambda e: e.kind == "destroy" and e.flow == f)
    assert gone.portid == inj.portid and gone.status & ctnl.IPS_DYING
    cli.wait_for("[DESTROY]", "src=198.18.50.7 ")
    assert ev.overruns == 0 and ev.bad == 0


def request_ok(sock: CtSocket, msg_fn, *args, **kw) -> bool:
    return isinstance(request(sock, msg_fn, *args, **kw)[-1], NlAck)


def test_events_of_a_real_dnat_connection(ns, socks):
    """A TCP connection DNAT'ed by nftables on the output hook: the events come from the
    kernel itself (portid 0) and give the VIP and the backend."""
    # client and backend addresses on lo; the VIP routed out of lo, so connect() has a route
    # before the output hook's DNAT turns the destination into a local one
    for cmd in (["addr", "add", "198.18.50.1/32", "dev", "lo"],
                ["addr", "add", "198.18.70.1/32", "dev", "lo"],
                ["route", "add", "198.18.60.0/24", "dev", "lo"]):
        sh("ip", "-n", ns, *cmd)
    rules = ("add table ip t\n"
             "add chain ip t out { type nat hook output priority -100; }\n"
             f"add rule ip t out ip daddr {VIP} tcp dport 80 dnat to 198.18.70.1:8080\n")
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True,
                   check=True, timeout=10)
    ev = ct_socket(ns, socks, groups=GROUPS_ALL)

    def sockets() -> tuple[socket.socket, socket.socket]:
        lst = socket.create_server(("198.18.70.1", 8080))
        cl = socket.socket()
        cl.bind(("198.18.50.1", 0))
        return lst, cl

    lst, cl = ns_call(ns, sockets)
    try:
        cl.settimeout(5)
        cl.connect((VIP, 80))
        port = cl.getsockname()[1]
        conn, peer = lst.accept()
        assert peer == ("198.18.50.1", port)
        cl.sendall(b"x")
        assert conn.recv(1) == b"x"
        want = Flow(6, "198.18.50.1", port, VIP, 80, "198.18.70.1", 8080)
        new = read_until(ev, lambda e: e.kind == "new" and e.flow == want)
        assert new.portid == 0 and new.status & ctnl.IPS_DST_NAT
        est = read_until(ev, lambda e: e.flow == want
                         and e.tcp_state == ctnl.TCP_CONNTRACK_ESTABLISHED)
        assert est.kind == "update" and est.portid == 0
        conn.close()
        cl.close()
        fin = read_until(ev, lambda e: e.flow == want and e.tcp_state in (
            ctnl.TCP_CONNTRACK_FIN_WAIT, ctnl.TCP_CONNTRACK_CLOSE_WAIT,
            ctnl.TCP_CONNTRACK_LAST_ACK, ctnl.TCP_CONNTRACK_TIME_WAIT, ctnl.TCP_CONNTRACK_CLOSE))
        assert fin.kind == "update"
        # the entry in a dump, as the kernel's own entry with its DNAT
        (d,) = [e for e in dump(ns_call(ns, CtSocket)) if e.flow == want]
        assert d.kind == "dump" and d.status & ctnl.IPS_DST_NAT
    finally:
        cl.close()
        lst.close()
    assert ev.bad == 0


# -- overruns ------------------------------------------------------------------------------------
def test_enobufs_is_counted_not_raised(ns, socks):
    reader = ct_socket(ns, socks, groups=GROUP_NEW, rcvbuf=4096, force_bufs=False)
    inj = ct_socket(ns, socks)
    r = inject(inj, flows(5000), timeout=60)
    assert r.ok == 5000
    got: list = []
    empty = 0
    for _ in range(10000):  # bounded: each read takes at most 64 datagrams
        batch = reader.read()
        got += batch
        if not batch:
            empty += 1
            if empty >= 3:
                break
        else:
            empty = 0
    assert reader.overruns > 0
    assert 0 < len(got) < 5000 and all(e.kind == "new" for e in got)
    assert reader.bad == 0
    # the socket keeps working after an overrun
    f = Flow(6, "198.18.52.1", 1, VIP, 80, BACKENDS[0], 8080)
    assert request_ok(inj, ctnl.encode_create, f, timeout=60)
    assert read_until(reader, lambda e: e.flow == f).kind == "new"


# -- dump ----------------------------------------------------------------------------------------
def test_dump_returns_the_injected_entries(ns, socks):
    s = ct_socket(ns, socks)
    a, b = flows(600)[:300], flows(600)[300:]
    assert inject(s, a, timeout=300, mark=7).ok == 300
    assert inject(s, b, timeout=300, mark=8).ok == 300
    all_ = dump(s)
    assert len(all_) == 600 and {e.flow for e in all_} == set(a + b)
    assert all(e.kind == "dump" and e.tcp_state == 3 and e.status & ctnl.IPS_ASSURED
               for e in all_)
    marked = dump(s, mark=7)
    assert {e.flow for e in marked} == set(a) and {e.mark for e in marked} == {7}
    # a private socket, made in the namespace
    assert len(ns_call(ns, dump, mark=8)) == 300
    # bounded: too many entries is an error, and the socket stays usable
    with pytest.raises(OverflowError):
        dump(s, max_entries=100)
    assert len(dump(s)) == 600
    with pytest.raises(ValueError):
        dump(ct_socket(ns, socks, groups=GROUP_NEW))


def test_event_filter_keeps_only_the_listeners_and_drops_our_own(ns, socks):
    """The BPF filter on the event socket: events of other destinations, ports or protocols,
    and those our own injecting socket caused, never reach user space."""
    ev = ct_socket(ns, socks, groups=GROUPS_ALL)
    inj, own = ct_socket(ns, socks), ct_socket(ns, socks)
    n = attach_filter(ev, [(6, VIP, 80), (17, VIP, 53)], drop_portids=[own.portid])
    assert n > 10
    keep = Flow(6, "198.18.50.1", 1001, VIP, 80, BACKENDS[0], 8080)
    keep_udp = Flow(17, "198.18.50.1", 1002, VIP, 53, BACKENDS[0], 53)
    others = [Flow(6, "198.18.50.1", 1003, VIP, 81, BACKENDS[0], 8080),         # port
              Flow(17, "198.18.50.1", 1004, VIP, 80, BACKENDS[0], 8080),        # protocol
              Flow(6, "198.18.50.1", 1005, "198.18.60.101", 80, BACKENDS[0], 8080)]  # address
    assert inject(inj, others + [keep, keep_udp], timeout=60).ok == 5
    assert inject(own, [Flow(6, "198.18.50.1", 1006, VIP, 80, BACKENDS[1], 8080)],
                  timeout=60).ok == 1
    marker = Flow(6, "198.18.50.9", 9999, VIP, 80, BACKENDS[1], 8080)
    assert inject(inj, [marker], timeout=60).ok == 1
    seen = []
    read_until(ev, lambda e: seen.append(e) or e.flow == marker)
    assert [e.flow for e in seen if e.kind == "new"] == [keep, keep_udp, marker], seen
    assert ev.bad == 0 and ev.overruns == 0
