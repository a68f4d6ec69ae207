"""halb.nat.core: which conntrack events write the nat table, which replicated changes write the
kernel, and reconcile -- with a fake clock, no sockets."""

from __future__ import annotations

import pytest

from halb.clock import FakeClock
from halb.nat.core import Inject, NatCore, Remove, Service
from halb.nat.ctnl import IPPROTO_TCP, IPPROTO_UDP, IPS_ASSURED, IPS_CONFIRMED, IPS_SEEN_REPLY, Event, Flow
from halb.tables import Op, Table, nat_key

pytestmark = pytest.mark.unit

VIP = "198.18.0.100"
WWW = Service("www", "tcp", VIP, 80, "web", {"web1": ("198.18.1.21", 8080),
                                             "web2": ("198.18.1.22", 8080)})
DNS = Service("dns", "udp", "198.18.0.101", 53, "dns", {"ns1": ("198.18.1.31", 53)})
ESTABLISHED = IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED


def flow(sport=40000, be="198.18.1.21", proto=IPPROTO_TCP, dst=VIP, dport=80, bport=8080):
    return Flow(proto, "198.18.0.5", sport, dst, dport, be, bport)


def ev(kind, f, status=ESTABLISHED, portid=0):
    return Event(kind, f, status, portid, 100, 0, 3 if f and f.proto == IPPROTO_TCP else -1)


class World:
    def __init__(self, holds=True, node="lb1"):
        self.clock = FakeClock(1000.0)
        self.table = Table("nat", node=node, clock=self.clock)
        self.held = {VIP, "198.18.0.101"} if holds else set()
        self.core = NatCore([WWW, DNS], self.table, lambda v: v in self.held, ttl=3600.0,
                            own_portids=lambda: (777,))


def test_holder_records_established_tcp_and_new_udp_and_deletes_on_destroy():
    w = World()
    w.core.on_event(ev("update", flow(), status=IPS_CONFIRMED))  # not assured yet: wait
    assert len(w.table) == 0
    w.core.on_event(ev("update", flow()))
    e = w.table.get(nat_key("www", "tcp", "198.18.0.5:40000", 80))
    assert e is not None and e.backend == "web1" and e.pool == "web" and e.origin == "lb1"
    assert e.client == "198.18.0.5:40000" and e.listener == "www" and e.proto == "tcp"
    assert e.expires == pytest.approx(1000.0 + 3600.0)
    udp = flow(sport=5000, be="198.18.1.31", proto=IPPROTO_UDP, dst="198.18.0.101", dport=53,
               bport=53)
    w.core.on_event(ev("new", udp, status=IPS_CONFIRMED))  # UDP: the new event is enough
    assert w.table.get(nat_key("dns", "udp", "198.18.0.5:5000", 53)).backend == "ns1"
    w.core.on_event(ev("destroy", flow()))
    assert w.table.get(nat_key("www", "tcp", "198.18.0.5:40000", 80)) is None
    assert w.core.stats["recorded"] == 2 and w.core.stats["ended"] == 1


def test_events_a_holder_must_not_record():
    w = World()
    w.core.on_event(ev("update", flow(), portid=777))  # our own injection, echoed
    w.core.on_event(ev("update", flow(dport=81)))  # not a NAT listener
    w.core.on_event(ev("update", flow(be="198.18.1.99")))  # a backend not in the pool
    w.core.on_event(ev("update", None))  # an entry without DNAT
    assert len(w.table) == 0
    assert w.core.stats["own_echo"] == 1 and w.core.stats["unknown_backend"] == 1


def test_a_standby_never_writes_the_table_from_its_kernel():
    """An injected copy timing out (destroy) on a standby says nothing about the connection."""
    w = World(holds=False)
    w.table.apply(Op.CREATE, _entry("lb2"))
    w.core.on_event(ev("destroy", flow()))
    w.core.on_event(ev("update", flow(sport=1)))
    assert len(w.table) == 1 and w.core.stats["ignored"] == 2


def _entry(origin, backend="web1", sport=40000, t=1000.0):
    from halb.tables import Entry
    return Entry(nat_key("www", "tcp", f"198.18.0.5:{sport}", 80), backend, "web", t, t,
                 t + 3600, origin, f"198.18.0.5:{sport}", "www", "tcp")


def test_replicated_changes_become_kernel_writes_only_where_the_vip_is_not_held():
    w = World(holds=False)
    assert w.core.on_remote(Op.CREATE, _entry("lb2")) == Inject(flow())
    assert w.core.on_remote(Op.REFRESH, _entry("lb2")) == Inject(flow())
    rm = w.core.on_remote(Op.DELETE, _entry("lb2"))
    f = flow()
    assert isinstance(rm, Remove) and (rm.flow.src, rm.flow.sport, rm.flow.dst, rm.flow.dport) \
        == (f.src, f.sport, f.dst, f.dport)
    assert w.core.on_remote(Op.CREATE, _entry("lb2", backend="gone")) is None
    assert w.core.stats["unknown_backend"] == 1
    w.held.add(VIP)  # the holder's kernel is the truth
    assert w.core.on_remote(Op.CREATE, _entry("lb2")) is None


def test_table_sync_drives_the_core_through_on_apply():
    """The Table hook the service uses: a peer's version applied calls on_apply, logged or not."""
    w = World(holds=False)
    seen = []
    w.table.on_apply.append(lambda op, e: seen.append(w.core.on_remote(op, e)))
    assert w.table.apply(Op.CREATE, _entry("lb2"), log=False)
    assert not w.table.apply(Op.CREATE, _entry("lb2"), log=False)  # no change, no call
    newer = _entry("lb2", t=1001.0)
    assert w.table.apply(Op.DELETE, newer, log=False)
    assert [type(x).__name__ for x in seen] == ["Inject", "Remove"]


def test_reconcile_on_the_holder_adds_lost_entries_refreshes_and_drops_ended():
    w = World()
    w.core.on_event(ev("update", flow(sport=1)))
    w.core.on_event(ev("update", flow(sport=2)))
    w.clock.advance(1000.0)  # past a quarter of the TTL: a touch is logged (and replicated)
    seq = w.table.seq
    # the kernel has 1 (alive), 3 (its event was lost), and not 2 (its destroy was lost)
    ops = w.core.reconcile([ev("dump", flow(sport=1)), ev("dump", flow(sport=3, be="198.18.1.22"))])
    assert ops == []
    keys = {e.key: e for e in w.table.entries()}
    assert set(keys) == {nat_key("www", "tcp", f"198.18.0.5:{p}", 80) for p in (1, 3)}
    assert keys[nat_key("www", "tcp", "198.18.0.5:1", 80)].expires == pytest.approx(2000 + 3600)
    assert keys[nat_key("www", "tcp", "198.18.0.5:3", 80)].backend == "web2"
    ops_logged = [c.op for c in w.table.changes_since(seq)]
    assert sorted(ops_logged) == [Op.CREATE, Op.REFRESH, Op.DELETE]


def test_reconcile_on_a_standby_injects_missing_and_removes_unknown_after_two_passes():
    w = World(holds=False)
    w.table.apply(Op.CREATE, _entry("lb2", sport=1))
    w.table.apply(Op.CREATE, _entry("lb2", sport=2))
    kernel = [ev("dump", flow(sport=1)), ev("dump", flow(sport=9))]  # 2 missing, 9 unknown
    ops = w.core.reconcile(kernel)
    assert ops == [Inject(flow(sport=2))]
    ops = w.core.reconcile(kernel)
    assert Remove(flow(sport=9)) in ops and Inject(flow(sport=2)) in ops
    assert len(w.table) == 2  # a standby's reconcile never writes the table


def test_reconcile_leaves_entries_recorded_while_the_dump_ran():
    """The dump runs in a thread: a connection recorded after it began is missing from it only
    because it is newer, and must not be deleted (its standby copy would go with it)."""
    w = World()
    w.core.on_event(ev("update", flow(sport=1)))
    since = w.clock.advance(1.0)
    w.core.on_event(ev("update", flow(sport=2)))  # during the dump
    w.core.reconcile([ev("dump", flow(sport=1))], since)
    assert len(w.table) == 2
    w.core.reconcile([ev("dump", flow(sport=1))], w.clock.advance(1.0))  # next pass: gone
    assert [e.client for e in w.table.entries()] == ["198.18.0.5:1"]


def test_only_qualifying_connections_are_recorded_with_a_packet_threshold():
    """replicate_after_packets: the kernel sets the report bit in the ct mark at the N-th
    packet; neither an event nor reconcile records a connection without it, nor an
    unestablished TCP one in any case."""
    w = World()
    w.core.report_mark = 0x80000000
    w.core.on_event(ev("update", flow(sport=1)))  # no bit: not yet
    w.core.reconcile([ev("dump", flow(sport=2)),
                      Event("dump", flow(sport=3), IPS_CONFIRMED, 0, 100, 0x80000000, 2)])
    assert len(w.table) == 0
    marked = Event("update", flow(sport=4), ESTABLISHED, 0, 100, 0x80000001, 3)
    w.core.on_event(marked)
    w.core.reconcile([marked._replace(kind="dump", flow=flow(sport=5)), marked])
    assert sorted(e.client for e in w.table.entries()) == ["198.18.0.5:4", "198.18.0.5:5"]


# -- IPv6 listeners ---------------------------------------------------------------------------

VIP6 = "2001:2:0:44::100"
WWW6 = Service("www6", "tcp", VIP6, 80, "web6", {"web1": ("2001:2:0:45::21", 7000),
                                                "web2": ("2001:2:0:45::22", 7000)})


def test_ipv6_connection_recorded_replicated_and_removed_with_a_bracketed_client():
    clock = FakeClock(1000.0)
    master = Table("nat", node="lb1", clock=clock)
    held = {VIP6}
    core = NatCore([WWW6], master, lambda v: v in held, ttl=3600.0)
    f = Flow(IPPROTO_TCP, "2001:2:0:44::2", 40000, VIP6, 80, "2001:2:0:45::22", 7000)
    core.on_event(ev("update", f))
    key = nat_key("www6", "tcp", "[2001:2:0:44::2]:40000", 80)
    e = master.get(key)
    assert e is not None and e.backend == "web2" and e.client == "[2001:2:0:44::2]:40000"
    # the standby turns the replicated entry back into the same IPv6 flow, and its removal
    standby = NatCore([WWW6], Table("nat", node="lb2", clock=clock), lambda v: False,
                      ttl=3600.0)
    assert standby.on_remote(Op.CREATE, e) == Inject(f)
    rm = standby.on_remote(Op.DELETE, e)
    assert isinstance(rm, Remove) and rm.flow == Flow(IPPROTO_TCP, "2001:2:0:44::2", 40000,
                                                      VIP6, 80, "::", 0)
    core.on_event(ev("destroy", f))
    assert master.get(key) is None


def test_ipv6_reconcile_on_the_standby_injects_what_its_kernel_lacks():
    clock = FakeClock(1000.0)
    t = Table("nat", node="lb2", clock=clock)
    core = NatCore([WWW6], t, lambda v: False, ttl=3600.0)
    from halb.tables import Entry
    e = Entry(nat_key("www6", "tcp", "[2001:2:0:44::2]:40001", 80), "web1", "web6", 1000.0,
              1000.0, 4600.0, "lb1", "[2001:2:0:44::2]:40001", "www6", "tcp")
    t.apply(Op.CREATE, e)
    assert core.reconcile([]) == [Inject(Flow(IPPROTO_TCP, "2001:2:0:44::2", 40001, VIP6, 80,
                                              "2001:2:0:45::21", 7000))]
    # a client of the wrong family (a corrupt entry) is counted, not injected
    bad = Entry(nat_key("www6", "tcp", "198.18.0.5:1", 80), "web1", "web6", 1000.0, 1000.0,
                4600.0, "lb1", "198.18.0.5:1", "www6", "tcp")
    assert core.on_remote(Op.CREATE, bad) is None
    assert core.stats["unknown_listener"] == 1


def test_client_strings_round_trip():
    from halb.nat.core import client_of, split_client
    assert client_of("198.18.0.5", 1) == "198.18.0.5:1"
    assert client_of("2001:2::5", 443) == "[2001:2::5]:443"
    for ip, port in (("198.18.0.5", 1), ("2001:2::5", 443), ("::1", 65535)):
        assert split_client(client_of(ip, port)) == (ip, port)
    assert split_client("2001:2::5:443") == ("2001:2::5", 443)  # unbracketed: the last colon
    for bad in ("[2001:2::5:443", ":80", "x"):
        with pytest.raises(ValueError):
            split_client(bad)


class Shared(World):
    """A node behind ECMP ([bgp]): it holds the VIP, and so does every peer."""

    def __init__(self, node="lb1"):
        super().__init__(holds=True, node=node)
        self.core = NatCore([WWW, DNS], self.table, lambda v: True, ttl=3600.0,
                            own_portids=lambda: (777,), shared={VIP})


def test_shared_vip_records_own_connections_and_injects_every_peers():
    w = Shared()
    w.core.on_event(ev("update", flow(sport=1)))
    assert w.table.get(nat_key("www", "tcp", "198.18.0.5:1", 80)).origin == "lb1"
    # a peer's connection: into this kernel (a flow ECMP moves here finds it), though held
    assert w.core.on_remote(Op.CREATE, _entry("lb2")) == Inject(flow())
    assert w.core.on_remote(Op.REFRESH, _entry("lb2")) == Inject(flow())
    assert isinstance(w.core.on_remote(Op.DELETE, _entry("lb2")), Remove)
    # this node's own entry learned back from a peer (a restart emptied its kernel)
    assert w.core.on_remote(Op.CREATE, _entry("lb1")) == Inject(flow())
    # a peer's expiry leaves the copy to its kernel timeout (a moved flow keeps it alive)
    assert w.core.on_remote(Op.EXPIRE, _entry("lb2")) is None
    # an elected VIP the node holds is still the kernel's truth
    assert w.core.on_remote(Op.CREATE, _entry("lb2")._replace(
        key=nat_key("dns", "udp", "198.18.0.5:7", 53), listener="dns", backend="ns1",
        client="198.18.0.5:7", proto="udp")) is None


def test_shared_vip_destroy_of_a_peers_copy_keeps_the_entry():
    w = Shared()
    w.table.apply(Op.CREATE, _entry("lb2"))
    w.core.on_event(ev("destroy", flow()))  # the injected copy timed out here
    assert len(w.table) == 1 and w.core.stats["ignored"] == 1
    w.core.on_event(ev("update", flow(sport=2)))
    w.core.on_event(ev("destroy", flow(sport=2)))  # our own connection ended
    assert w.table.get(nat_key("www", "tcp", "198.18.0.5:2", 80)) is None


def test_shared_vip_reconcile_refreshes_own_injects_peers_and_adopts_orphans():
    w = Shared()
    w.core.on_event(ev("update", flow(sport=1)))  # ours, alive
    w.core.on_event(ev("update", flow(sport=2)))  # ours, ended (destroy lost)
    w.table.apply(Op.CREATE, _entry("lb2", sport=3), log=False)  # a peer's, in our kernel
    w.table.apply(Op.CREATE, _entry("lb2", sport=4), log=False)  # a peer's, missing here
    w.clock.advance(1000.0)
    ops = w.core.reconcile([ev("dump", flow(sport=1)), ev("dump", flow(sport=3)),
                            ev("dump", flow(sport=5))])  # 5: in the kernel, not in the table
    assert ops == [Inject(flow(sport=4))]
    keys = {e.key.split("/")[2]: e for e in w.table.entries()}
    assert sorted(keys) == ["198.18.0.5:1", "198.18.0.5:3", "198.18.0.5:4", "198.18.0.5:5"]
    assert keys["198.18.0.5:1"].expires == pytest.approx(2000 + 3600)  # refreshed
    assert keys["198.18.0.5:3"].origin == "lb2"  # a peer's entry is not touched (stolen)
    assert keys["198.18.0.5:3"].expires == pytest.approx(1000 + 3600)
    assert keys["198.18.0.5:5"].origin == "lb1"  # adopted: its origin's entry is gone
