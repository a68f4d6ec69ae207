"""The kernel NAT mode's decisions, with no I/O: which conntrack events become nat-table
entries, which replicated entries become kernel entries, and how the two are reconciled.

The kernel forwards NAT listeners' packets itself (nftables DNAT, ``halb.nat.nft``); its
conntrack table holds one entry per connection with the backend DNAT chose. halb mirrors the
entries of its NAT listeners in the replicated ``nat`` table (``halb.tables``), so a standby
holds every connection of the master in its own kernel before it takes the VIP over:

- the node that **holds a listener's VIP** (its master) is the source of truth for that
  listener: its kernel's events (``assured`` for TCP, ``new`` for UDP, and ``destroy``) write
  the nat table (origin = this node), and sync ships the writes;
- every **other node** mirrors the nat table into its kernel: a replicated create or refresh
  becomes a conntrack entry with the same original tuple and DNAT to the same backend; a
  replicated delete removes it. A node never writes its kernel from the table for a VIP it
  holds (the kernel is the truth there), and never deletes table entries for a VIP it does
  not hold (an injected copy timing out on a standby says nothing about the connection);
- **reconcile** (periodically, and after the kernel reported lost events) closes every gap
  both ways: on a holder, kernel entries missing from the table are added, table entries the
  kernel no longer has are deleted, live ones refreshed (which also keeps the standbys' copies
  alive); on a standby, table entries its kernel lacks are injected again and kernel entries
  of the node's NAT listeners that the table does not know are removed once they were seen
  unknown twice in a row (an entry in flight from the master is not removed by a race).

**Shared VIPs** (``[bgp]``: every node announces the VIP and an ECMP router spreads the flows
over all of them, so every node holds it at once and each is the truth for the connections
that started on it): a node records its own kernel's connections (origin = this node) and
injects every peer's into its kernel, so a flow the router moves to it (a node died, left or
joined) finds its entry and its backend there. The rules differ from the elected case:

- a kernel ``destroy`` deletes the table entry only when this node wrote it: a copy that
  times out here says nothing about the connection on its origin;
- a peer's delete removes the copy here; a peer's expiry does not (the copy's kernel timeout
  governs: if the flow moved here its traffic keeps it alive);
- reconcile refreshes only this node's own entries, injects the peers' entries this kernel
  lacks, deletes only its own entries its kernel no longer has, and adopts (records as its
  own) a kernel entry the table no longer has: a moved flow whose origin died outlives the
  origin's table entry.

A nat entry: key ``listener/proto/client_ip:port/vport`` (``halb.tables.nat_key``), backend =
the backend's name in the listener's pool, client = ``ip:port`` (``[ip]:port`` for an IPv6
client, the usual literal form), listener, proto. The backend's address comes from the pool
config, which every node shares. IPv6 listeners work alike: the addresses are compared in
their compressed form (``inet_ntop``'s, which the ctnetlink parser produces), so the
listener's VIP and backends must be given in that form (``NatService`` normalises them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple

from ..tables import Entry, Table, nat_key
from .ctnl import IPPROTO_TCP, IPPROTO_UDP, IPS_ASSURED, Event, Flow

PROTO_NUM = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}
PROTO_NAME = {v: k for k, v in PROTO_NUM.items()}
_CREATE, _REFRESH, _DELETE, _EXPIRE = 1, 2, 3, 4


@dataclass(frozen=True)
class Service:
    """One NAT listener as the core sees it."""

    name: str
    proto: str  # "tcp" | "udp"
    vip: str
    port: int
    pool: str
    backends: dict[str, tuple[str, int]]  # backend name -> (address, port), from the config

    def by_address(self) -> dict[tuple[str, int], str]:
        return {a: n for n, a in self.backends.items()}


def client_of(ip: str, port: int) -> str:
    """A nat entry's client: ``ip:port``, ``[ip]:port`` for IPv6."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def split_client(client: str) -> tuple[str, int]:
    """``client_of``'s inverse; ValueError on a malformed one."""
    host, _, port = client.rpartition(":")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"bad client {client!r}")
        host = host[1:-1]
    if not host:
        raise ValueError(f"bad client {client!r}")
    return host, int(port)


class Inject(NamedTuple):
    flow: Flow


class Remove(NamedTuple):
    flow: Flow


class NatCore:
    """Decisions for the NAT listeners of one node. ``holds(vip)`` tells whether this node
    holds a VIP now (its election's view); ``ttl`` is the nat table entries' lifetime past
    their last refresh."""

    def __init__(self, services: Iterable[Service], table: Table, holds: Callable[[str], bool],
                 *, ttl: float, own_portids: Callable[[], Iterable[int]] = tuple,
                 report_mark: int = 0, shared: Iterable[str] = ()):
        self.services = {s.name: s for s in services}
        self._by_dst = {(PROTO_NUM[s.proto], s.vip, s.port): s for s in self.services.values()}
        self._by_addr = {s.name: s.by_address() for s in self.services.values()}
        self.table = table
        self.holds = holds
        self.ttl = ttl
        self.own_portids = own_portids
        # with [nat] replicate_after_packets the kernel marks a connection with this bit once
        # it qualifies; reconcile adds only such connections (0: every established one)
        self.report_mark = report_mark
        self.shared = frozenset(shared)  # VIPs every node holds at once (ECMP; [bgp])
        self._unknown_seen: set[tuple] = set()  # standby: kernel tuples unknown last pass
        self.stats = {"events": 0, "ignored": 0, "own_echo": 0, "recorded": 0, "ended": 0,
                      "unknown_backend": 0, "unknown_listener": 0}

    # -- kernel -> table (on the VIP's holder) ----------------------------------------------

    def service_of(self, flow: Flow) -> Service | None:
        return self._by_dst.get((flow.proto, flow.dst, flow.dport))

    def key_of(self, s: Service, flow: Flow) -> str:
        return nat_key(s.name, s.proto, client_of(flow.src, flow.sport), flow.dport)

    def on_event(self, ev: Event) -> None:
        """One conntrack event from this node's kernel."""
        self.stats["events"] += 1
        f = ev.flow
        s = self.service_of(f) if f is not None else None
        if s is None or not self.holds(s.vip):
            self.stats["ignored"] += 1
            return
        if ev.portid and ev.portid in self.own_portids():
            self.stats["own_echo"] += 1  # our own injection, reported back
            return
        key = self.key_of(s, f)
        if ev.kind == "destroy":
            if s.vip in self.shared and not self._mine(key):
                self.stats["ignored"] += 1  # a copy of a peer's connection ended here
                return
            if self.table.delete(key):
                self.stats["ended"] += 1
            return
        if not self.qualifies(ev):
            self.stats["ignored"] += 1  # a handshake not completed yet: the assured event follows
            return
        self._record(s, f, key)

    def _mine(self, key: str) -> bool:
        e = self.table.get(key)
        return e is None or e.origin == self.table.node

    def _record(self, s: Service, f: Flow, key: str) -> bool:
        name = self._by_addr[s.name].get((f.nat_dst, f.nat_dport))
        if name is None:
            self.stats["unknown_backend"] += 1
            return False
        self.table.put(key, name, self.ttl, pool=s.pool, client=client_of(f.src, f.sport),
                       listener=s.name, proto=s.proto)
        self.stats["recorded"] += 1
        return True

    # -- table -> kernel (on every other node) -----------------------------------------------

    def flow_of(self, e: Entry) -> Flow | None:
        """The conntrack entry a nat-table entry stands for; None if this node's config has no
        such listener or backend (counted)."""
        s = self.services.get(e.listener)
        if s is None:
            self.stats["unknown_listener"] += 1
            return None
        be = s.backends.get(e.backend)
        if be is None:
            self.stats["unknown_backend"] += 1
            return None
        try:
            src, sport = split_client(e.client)
            vport = int(e.key.rsplit("/", 1)[1])
            if (":" in src) != (":" in s.vip):
                raise ValueError("client and VIP of different families")
            return Flow(PROTO_NUM[s.proto], src, sport, s.vip, vport, be[0], be[1])
        except (ValueError, IndexError, KeyError):
            self.stats["unknown_listener"] += 1
            return None

    def on_remote(self, op: int, e: Entry) -> Inject | Remove | None:
        """A peer's change applied to the nat table: what this node's kernel should do."""
        s = self.services.get(e.listener)
        if s is None:
            self.stats["unknown_listener"] += 1
            return None
        if s.vip in self.shared:
            if op == _EXPIRE:
                return None  # the copy's kernel timeout governs (a moved flow keeps it alive)
            # (an entry of this node's own, from a peer: its earlier run's, learned back after
            # a restart with an empty kernel; ECMP sends its flows here again: inject it too)
        elif self.holds(s.vip):
            return None  # the kernel is the truth for a VIP this node holds
        f = self.flow_of(e) if op in (_CREATE, _REFRESH) else self._flow_for_removal(s, e)
        if f is None:
            return None
        return Inject(f) if op in (_CREATE, _REFRESH) else Remove(f)

    def _flow_for_removal(self, s: Service, e: Entry) -> Flow | None:
        # a removal needs only the original tuple (a deleted entry may name a backend that is
        # gone from this node's config)
        try:
            src, sport = split_client(e.client)
            vport = int(e.key.rsplit("/", 1)[1])
            return Flow(PROTO_NUM[s.proto], src, sport, s.vip, vport,
                        "::" if ":" in s.vip else "0.0.0.0", 0)
        except (ValueError, IndexError):
            return None

    # -- reconcile ---------------------------------------------------------------------------

    def qualifies(self, ev: Event) -> bool:
        """Whether a connection of the holder's kernel belongs in the nat table: established
        (TCP), and reported by the kernel's packet threshold when one is set."""
        f = ev.flow
        if f is not None and f.proto == IPPROTO_TCP and not ev.status & IPS_ASSURED:
            return False
        return not self.report_mark or bool(ev.mark & self.report_mark)

    def reconcile(self, kernel: Iterable[Event], since: float = float("inf")) -> list[Inject | Remove]:
        """Compares the kernel's conntrack entries (dump events; entries of other listeners
        are passed over) with the nat table and closes the gaps as the module docstring says.
        Table writes are done here; kernel writes are returned. ``since``: the table clock's
        time when the kernel's dump began; an entry written at or after it may be missing
        from the dump only because it is newer, and is left alone."""
        ops: list[Inject | Remove] = []
        seen: set[str] = set()
        unknown_now: set[tuple] = set()
        for ev in kernel:
            f = ev.flow
            s = self.service_of(f) if f is not None else None
            if s is None:
                continue
            key = self.key_of(s, f)
            seen.add(key)
            e = self.table.get(key)
            if s.vip in self.shared:
                if e is None:
                    if self.qualifies(ev):
                        self._record(s, f, key)  # a lost event, or adopted: origin gone
                    else:
                        seen.discard(key)
                elif e.origin == self.table.node:
                    self.table.touch(key, self.ttl)
            elif self.holds(s.vip):
                if not self.qualifies(ev):
                    seen.discard(key)
                elif e is None or self._by_addr[s.name].get((f.nat_dst, f.nat_dport)) != e.backend:
                    self._record(s, f, key)  # an event was lost (or a backend changed)
                else:
                    self.table.touch(key, self.ttl)  # live: refresh (and the standbys' copies)
            elif e is None:
                t = (f.proto, f.src, f.sport, f.dst, f.dport)
                if t in self._unknown_seen:
                    ops.append(Remove(f))
                else:
                    unknown_now.add(t)
        self._unknown_seen = unknown_now
        for e in self.table.entries():
            if e.key in seen:
                continue
            s = self.services.get(e.listener)
            if s is None:
                continue
            if s.vip in self.shared and e.origin != self.table.node:
                f = self.flow_of(e)
                if f is not None:
                    ops.append(Inject(f))  # a peer's connection this kernel lacks
            elif self.holds(s.vip):
                if e.updated >= since:
                    continue  # recorded while the dump ran
                self.table.delete(e.key)  # the connection is over (its destroy event was lost)
                self.stats["ended"] += 1
            else:
                f = self.flow_of(e)
                if f is not None:
                    ops.append(Inject(f))
        return ops
