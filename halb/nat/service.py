"""The kernel NAT mode's edge: nftables rules, conntrack events and injection, around
``halb.nat.core``.

    nat = NatService(listeners, pools, tables.nat, cfg.nat, registry=..., sync_ports=(9400,),
                     elected_vips={"198.18.0.100"})
    election.vip_hooks.append(nat)      # before_vips_added / after_vips_removed
    pool.on_change -> nat.pool_changed(pool, view)
    await nat.start() / await nat.stop()

- **Rules**: one nftables table (``[nat] table``, family ip; IPv6 listeners in ``ip6`` table
  of the same name, same layout, same transaction) holds every NAT listener's DNAT,
  chosen by a jhash of the client address (or address and port) with a fixed seed into a map
  filled from the pool's Maglev table, so every node sends a client to the same backend. A
  pool view change (health, drain, weight) rewrites only the map slots that changed, in one
  transaction: established connections keep their conntrack entry and their backend.
- **Events**: a netlink socket subscribed to conntrack's new/update/destroy groups; the table's
  ``ct event set`` rules limit the kernel to one event when a connection is established (TCP:
  assured; UDP: new) and one when it ends. Read in bounded bursts on the event loop; ENOBUFS
  (events lost) schedules a reconcile.
- **Injection**: replicated entries become conntrack entries (ctnetlink create with NAT, in
  batches of up to 256 per datagram, errors only acknowledged), queued and flushed on the next
  loop turn, and flushed synchronously before this node adds a VIP (takeover order: conntrack
  entries, then the VIPs, then gratuitous ARP).
- **Reconcile**: every ``reconcile_interval`` (and soon after lost events, and 1 s after a
  takeover or a demotion) the kernel's entries are dumped (in a worker thread) and compared
  with the nat table (``NatCore.reconcile``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import time
import zlib
from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .. import log as hlog
from ..config import ListenerConfig, NatConfig
from ..tables import Table
from . import ctnl, nft, nftapply
from .core import PROTO_NUM, Inject, NatCore, Remove, Service
from .ctsock import CtSocket, attach_filter, dump

log = hlog.get_logger("nat")

GROUPS = (1 << 0) | (1 << 1) | (1 << 2)  # NFNLGRP_CONNTRACK_NEW, _UPDATE, _DESTROY
READ_BURST = 64  # datagrams read per wake-up before yielding to the loop
INJECT_BATCH = 256  # conntrack creates per datagram
MAX_PENDING = 1 << 20  # queued kernel writes (a bound: past it, reconcile catches up)
INJECT_TIMEOUT = 3600  # seconds a replicated conntrack entry lives without a refresh
AFTER_CHANGE = 1.0  # reconcile this long after a takeover or a demotion
DUMP_TIMEOUT = 10.0
SEQ_MASK = 0xFFFFFFFF
FORWARD_SYSCTL = "/proc/sys/net/ipv4/ip_forward"
FORWARD6_SYSCTL = "/proc/sys/net/ipv6/conf/all/forwarding"
ACCT_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_acct"


def _sysctl(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "?"


def _norm(addr: str) -> str:
    """An address in its compressed form (IPv6 as ``inet_ntop`` writes it); anything else
    (a name) as it is."""
    try:
        return str(ipaddress.ip_address(str(addr)))
    except ValueError:
        return str(addr)


def seed_of(name: str) -> int:
    """The jhash seed of a listener: fixed by its name, so every node hashes alike (nftables
    picks a random seed when none is given)."""
    return zlib.crc32(name.encode()) & 0xFFFFFFFF


class NatService:
    def __init__(self, listeners: Iterable[ListenerConfig], pools: dict[str, Any], table: Table,
                 cfg: NatConfig, *, registry=None, sync_ports: Iterable[int] = (),
                 elected_vips: Iterable[str] = (), shared_vips: Iterable[str] = ()):
        self.cfg = cfg
        self.listeners = [lc for lc in listeners if lc.mode == "nat"]
        self.pools = pools
        self.table = table
        self.sync_ports = tuple(sync_ports)
        self.elected = frozenset(_norm(v) for v in elected_vips)  # VIPs [[vrrp]] moves
        self.held: set[str] = set()  # of those, the ones this node holds now
        self.services = []
        self.sizes: dict[str, int] = {}
        for lc in self.listeners:
            pool = pools[lc.pool]
            # addresses in their compressed form: the kernel's events compare equal to them
            backends = {b.name: (_norm(b.address.host), b.address.port)
                        for b in pool.cfg.backends}
            self.services.append(Service(lc.name, lc.protocol, _norm(lc.bind.host),
                                         lc.bind.port, lc.pool, backends))
            self.sizes[lc.name] = cfg.hash_slots
        # VIPs every node holds at once ([bgp], ECMP): see halb.nat.core
        self.shared = frozenset(_norm(v) for v in shared_vips)
        self.core = NatCore(self.services, table, self.holds, ttl=cfg.entry_ttl,
                            own_portids=self._own_portids, shared=self.shared)
        self.slots: dict[str, tuple[int, ...]] = {}
        self.events: CtSocket | None = None
        self.inject_sock: CtSocket | None = None
        self._pending: dict[tuple, Inject | Remove] = {}  # by original tuple: the last word wins
        self._flush_handle: asyncio.Handle | None = None
        self._tasks: list[asyncio.Task] = []
        self._reconcile_soon: asyncio.Event | None = None  # made in start() (needs a loop)
        self._applied = False
        self.report_after = cfg.replicate_after_packets
        self.counts = {"injected": 0, "refreshed": 0, "inject_errors": 0, "removed": 0, "overruns": 0,
                       "reconciles": 0, "reconcile_failed": 0, "rules_applied": 0,
                       "rules_failed": 0, "dropped_pending": 0}
        self.inject_errors: dict[str, int] = {}
        self.last_reconcile = 0.0
        if registry is not None:
            registry.register(_Collector(self))
        table.on_apply.append(self._remote)

    # -- ownership -----------------------------------------------------------------------------

    @property
    def has_v6(self) -> bool:
        return any(":" in s.vip for s in self.services)

    @property
    def has_v4(self) -> bool:
        return any(":" not in s.vip for s in self.services)

    def holds(self, vip: str) -> bool:
        return vip in self.held or vip not in self.elected

    def _own_portids(self) -> tuple[int, ...]:
        return (self.inject_sock.portid,) if self.inject_sock is not None else ()

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._reconcile_soon = asyncio.Event()
        fwd = _sysctl(FORWARD_SYSCTL)
        if fwd != "1" and self.has_v4:
            log.error("nat_forwarding_off", sysctl="net.ipv4.ip_forward", value=fwd,
                      hint="NAT listeners forward packets: set net.ipv4.ip_forward = 1")
        fwd6 = _sysctl(FORWARD6_SYSCTL)
        if fwd6 != "1" and self.has_v6:
            log.error("nat_forwarding_off", sysctl="net.ipv6.conf.all.forwarding", value=fwd6,
                      hint="IPv6 NAT listeners forward packets: set "
                           "net.ipv6.conf.all.forwarding = 1")
        if self.report_after and _sysctl(ACCT_SYSCTL) != "1":
            log.error("nat_accounting_off", sysctl="net.netfilter.nf_conntrack_acct",
                      value=_sysctl(ACCT_SYSCTL), replicate_after_packets=self.report_after,
                      hint="[nat] replicate_after_packets counts packets with conntrack "
                           "accounting: set the sysctl to 1; until then every connection is "
                           "replicated once established")
            self.report_after = 0
        for s in self.services:
            pool = self.pools[s.pool]
            self.slots[s.name] = self._slots_for(s, pool.view)
        self.core.report_mark = nft.REPORT_MARK if self.report_after else 0
        self._apply_rules()
        loop = asyncio.get_running_loop()
        if self.cfg.replicate:  # without replication the kernel's events are nobody's business
            self.inject_sock = CtSocket()
            self.events = CtSocket(groups=GROUPS)
            try:  # only our listeners' events reach us, and none that our own writes caused
                attach_filter(self.events,
                              [(PROTO_NUM[s.proto], s.vip, s.port) for s in self.services],
                              drop_portids=[self.inject_sock.portid])
            except (OSError, ValueError) as e:
                log.warning("nat_event_filter_unavailable", error=str(e),
                            hint="every conntrack event of this namespace is parsed in halbd")
            loop.add_reader(self.events.fileno(), self._readable)
            self._tasks.append(asyncio.create_task(self._reconciler(), name="nat-reconcile"))
        log.info("nat_started", table=self.cfg.table, replicate=self.cfg.replicate,
                 listeners=[f"{s.name} {s.proto} {s.vip}:{s.port} -> {s.pool}"
                            for s in self.services])

    def release(self) -> None:
        """An upgrade: the new process owns the nftables table now; this one's stop leaves
        it in place."""
        self._applied = False

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self.events is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.events.fileno())
            self.events.close()
            self.events = None
        if self.inject_sock is not None:
            self.inject_sock.close()
            self.inject_sock = None
        if self._applied:
            try:
                nftapply.apply(nft.delete(self.cfg.table))
            except nftapply.NftError as e:
                log.warning("nat_rules_remove_failed", table=self.cfg.table, error=str(e))
        log.info("nat_stopped")

    # -- rules ---------------------------------------------------------------------------------

    def _slots_for(self, s: Service, view) -> tuple[int, ...]:
        """The Maglev table over the view's backends (weight 0 for the rest), as indexes into
        the listener's backends in config order (the nft service's ``backends``)."""
        weight = {b.name: w for b, w in zip(view.backends, view.weights)}
        return nft.maglev_slots([(n, weight.get(n, 0)) for n in s.backends], self.sizes[s.name])

    def _nft_service(self, s: Service, lc: ListenerConfig) -> "nft.NatService":
        return nft.NatService(
            name=s.name, proto=s.proto, vip=s.vip, port=s.port, port_end=s.port,
            hash_fields="src_port" if lc.hash == "client_ip_port" else "src",
            seed=seed_of(s.name), slots=self.slots[s.name],
            backends=tuple(nft.NatBackend(n, a, p) for n, (a, p) in s.backends.items()),
            report_after_packets=self.report_after if self.cfg.replicate else 0)

    def ruleset(self) -> "nft.NatRuleset":
        return nft.NatRuleset(
            table=self.cfg.table,
            services=tuple(self._nft_service(s, lc) for s, lc in zip(self.services, self.listeners)),
            exempt_tcp_ports=self.sync_ports)

    def _apply_rules(self) -> None:
        t0 = time.monotonic()
        # fresh: whatever an earlier run left (kill -9, another config) goes in the same
        # transaction; conntrack entries do not depend on the rules and live on
        nftapply.apply(nft.build(self.ruleset(), fresh=True))  # NftError: the start fails
        self._applied = True
        self.counts["rules_applied"] += 1
        log.info("nat_rules_applied", table=self.cfg.table,
                 ms=round((time.monotonic() - t0) * 1000, 1))

    def pool_changed(self, pool, view) -> None:
        """A pool's view changed (health, drain, weight): rewrite the slots that moved."""
        if not self._applied:
            return
        for s, lc in zip(self.services, self.listeners):
            if s.pool != pool.name:
                continue
            new = self._slots_for(s, view)
            old = self.slots[s.name]
            if new == old:
                continue
            doc = nft.slot_update(self._nft_service(s, lc), old, new, table=self.cfg.table)
            try:
                t0 = time.monotonic()
                if doc:
                    nftapply.apply(doc)
                self.slots[s.name] = new
                self.counts["rules_applied"] += 1
                moved = sum(1 for a, b in zip(old, new) if a != b)
                log.info("nat_slots_updated", listener=s.name, moved=moved, size=len(new),
                         backends=sorted(b.name for b in view.backends),
                         ms=round((time.monotonic() - t0) * 1000, 1))
            except nftapply.NftError as e:
                self.counts["rules_failed"] += 1
                log.error("nat_slots_update_failed", listener=s.name, error=str(e))

    # -- election hooks ------------------------------------------------------------------------

    def before_vips_added(self, instance: str, vips: Iterable[str]) -> None:
        """Takeover: every replicated entry is in the kernel before the VIPs are."""
        mine = [_norm(v) for v in vips if _norm(v) in self.elected]
        if not mine:
            return
        t0 = time.monotonic()
        n = len(self._pending)
        self._flush()
        self.held.update(mine)
        log.info("nat_takeover", instance=instance, vips=mine, flushed=n,
                 entries=len(self.table), ms=round((time.monotonic() - t0) * 1000, 2))
        self._soon()

    def after_vips_removed(self, instance: str, vips: Iterable[str]) -> None:
        mine = [_norm(v) for v in vips if _norm(v) in self.held]
        if mine:
            self.held.difference_update(mine)
            log.info("nat_released", instance=instance, vips=mine)
            self._soon()

    def _soon(self) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(AFTER_CHANGE, self._reconcile_soon.set)

    # -- kernel -> table -----------------------------------------------------------------------

    def _readable(self) -> None:
        ev_sock = self.events
        if ev_sock is None:
            return
        try:
            msgs = ev_sock.read(READ_BURST)
        except OSError as e:
            log.warning("nat_events_read_failed", error=str(e))
            return
        over = ev_sock.overruns - self.counts["overruns"]
        if over > 0:
            self.counts["overruns"] = ev_sock.overruns
            log.warning("nat_events_lost", overruns=ev_sock.overruns,
                        hint="the kernel dropped conntrack events (ENOBUFS): reconciling")
            self._reconcile_soon.set()
        if not self.cfg.replicate:
            return
        on_event = self.core.on_event
        for m in msgs:
            if isinstance(m, ctnl.Event):
                try:
                    on_event(m)
                except Exception:  # noqa: BLE001 - one bad event never stops the reader
                    log.exception("nat_event_failed")

    # -- table -> kernel -----------------------------------------------------------------------

    def _remote(self, op: int, e) -> None:
        if not self.cfg.replicate:
            return
        act = self.core.on_remote(op, e)
        if act is None:
            return
        self._queue(act)

    def _queue(self, act: Inject | Remove) -> None:
        f = act.flow
        k = (f.proto, f.src, f.sport, f.dst, f.dport)
        if k not in self._pending and len(self._pending) >= MAX_PENDING:
            self.counts["dropped_pending"] += 1  # reconcile injects it later
            return
        self._pending[k] = act
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if not self._pending or self.inject_sock is None:
            return
        acts = list(self._pending.values())
        self._pending.clear()
        self._write(acts)

    def _write(self, acts: list) -> None:
        sock = self.inject_sock
        if sock is None:
            return
        base = sock.next_seq(len(acts))
        msgs = [ctnl.encode_create(a.flow, seq=(base + i) & SEQ_MASK, timeout=INJECT_TIMEOUT)
                if isinstance(a, Inject) else ctnl.encode_delete(a.flow, seq=(base + i) & SEQ_MASK)
                for i, a in enumerate(acts)]
        sent = 0
        exists: list[Inject] = []
        try:
            for i in range(0, len(msgs), INJECT_BATCH):
                k = sock.send_batch(msgs[i:i + INJECT_BATCH])
                sent += k
                # the kernel handles a datagram inside send(): its refusals are queued now
                for seq in self._drain_errors():
                    j = (seq - base) & SEQ_MASK
                    if j < len(acts) and isinstance(acts[j], Inject):
                        exists.append(acts[j])
                if k < len(msgs[i:i + INJECT_BATCH]):
                    break  # the socket is full: the rest goes on the next loop turn
            if exists:
                # already in the kernel (a node that held the connection before): the kernel
                # cannot change an entry's NAT, so refresh its timeout and make its TCP
                # tracking liberal (its window may be out of date)
                b2 = sock.next_seq(len(exists))
                sock.send_batch([ctnl.encode_update(a.flow, seq=(b2 + i) & SEQ_MASK,
                                                    timeout=INJECT_TIMEOUT,
                                                    tcp_state=ctnl.TCP_CONNTRACK_ESTABLISHED)
                                 for i, a in enumerate(exists)])
                self._drain_errors()
                self.counts["refreshed"] += len(exists)
        except OSError as e:
            log.warning("nat_inject_failed", entries=len(msgs) - sent, error=str(e))
        n_inj = sum(1 for a in acts[:sent] if isinstance(a, Inject))
        self.counts["injected"] += n_inj - len(exists)
        self.counts["removed"] += sent - n_inj
        for a in acts[sent:]:
            self._queue(a)

    def _drain_errors(self) -> list[int]:
        """The kernel answers only failures (no per-message ack): count them by errno. A
        delete of an entry that is already gone (ENOENT) is not a failure; a create of one
        that exists (EOPNOTSUPP: it has NAT already) is returned (its seq) for a refresh."""
        sock = self.inject_sock
        exists: list[int] = []
        if sock is None:
            return exists
        try:
            answers = sock.read(64)
        except OSError:
            return exists
        for m in answers:
            if not isinstance(m, ctnl.NlError) or m.errno == errno.ENOENT:
                continue
            if m.errno in (errno.EOPNOTSUPP, errno.EEXIST):
                exists.append(m.seq)
                continue
            name = errno.errorcode.get(m.errno, str(m.errno))
            self.inject_errors[name] = self.inject_errors.get(name, 0) + 1
            self.counts["inject_errors"] += 1
        return exists

    # -- reconcile -----------------------------------------------------------------------------

    async def _reconciler(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._reconcile_soon.wait(), self.cfg.reconcile_interval)
            self._reconcile_soon.clear()
            if not self.cfg.replicate:
                continue
            try:
                since = self.table.clock.now()
                evs = await loop.run_in_executor(None, self._dump)
                self._drain_errors()
                ops = self.core.reconcile(evs, since)
                for op in ops:
                    self._queue(op)
                self.counts["reconciles"] += 1
                self.last_reconcile = time.time()
                if ops:
                    log.info("nat_reconciled", kernel=len(evs), table=len(self.table),
                             kernel_writes=len(ops))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - retried next interval
                self.counts["reconcile_failed"] += 1
                log.warning("nat_reconcile_failed", error=str(e))

    def _dump(self) -> list:
        # both families only when there are IPv6 listeners (an IPv4-only node dumps as before)
        fam = socket.AF_UNSPEC if self.has_v6 else socket.AF_INET
        return dump(family=fam, timeout=DUMP_TIMEOUT)

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> dict:
        return {
            "table": self.cfg.table,
            "replicate": self.cfg.replicate,
            "replicate_after_packets": self.report_after,
            "listeners": [{"name": s.name, "proto": s.proto, "vip": s.vip, "port": s.port,
                           "pool": s.pool, "held": self.holds(s.vip),
                           "backends_in_map": len({i for i in self.slots.get(s.name, ()) if i >= 0})}
                          for s in self.services],
            "entries": len(self.table),
            "counts": dict(self.counts),
            "core": dict(self.core.stats),
            "inject_errors": dict(self.inject_errors),
        }

    def backend_counters(self) -> dict[str, tuple[int, int]]:
        try:
            return nftapply.counters(self.cfg.table)
        except Exception:  # noqa: BLE001 - a scrape never fails because of nft
            return {}


class _Collector(Collector):
    """halb_nat_* families, read at scrape time."""

    def __init__(self, nat: NatService):
        self.nat = nat

    def describe(self):
        return []

    def collect(self):
        n = self.nat
        c = CounterMetricFamily("halb_nat_kernel_writes", "Conntrack entries written by "
                                "replication, by op", labels=["op"])
        c.add_metric(["inject"], n.counts["injected"])
        c.add_metric(["remove"], n.counts["removed"])
        c.add_metric(["refresh"], n.counts["refreshed"])
        yield c
        e = CounterMetricFamily("halb_nat_inject_errors", "Conntrack writes the kernel refused, "
                                "by errno", labels=["errno"])
        for k, v in sorted(n.inject_errors.items()):
            e.add_metric([k], v)
        yield e
        ev = CounterMetricFamily("halb_nat_events", "Conntrack events read, by outcome",
                                 labels=["outcome"])
        for k in ("recorded", "ended", "ignored", "own_echo", "unknown_backend"):
            ev.add_metric([k], n.core.stats[k])
        yield ev
        yield CounterMetricFamily("halb_nat_events_lost", "Times the kernel dropped conntrack "
                                  "events (ENOBUFS); each starts a reconcile",
                                  value=n.counts["overruns"])
        yield CounterMetricFamily("halb_nat_reconciles", "Reconcile passes",
                                  value=n.counts["reconciles"])
        held = GaugeMetricFamily("halb_nat_listener_held", "1 while this node holds the NAT "
                                 "listener's VIP", labels=["listener"])
        for s in n.services:
            held.add_metric([s.name], 1 if n.holds(s.vip) else 0)
        yield held
        pk = CounterMetricFamily("halb_nat_backend_packets", "Packets forwarded to a backend "
                                 "(nftables counters)", labels=["listener", "backend"])
        by = CounterMetricFamily("halb_nat_backend_bytes", "Bytes forwarded to a backend "
                                 "(nftables counters)", labels=["listener", "backend"])
        counters = n.backend_counters()
        for s in n.services:
            for b in s.backends:
                v = counters.get(nft.backend_counter(s.name, b))
                if v is not None:
                    pk.add_metric([s.name, b], v[0])
                    by.add_metric([s.name, b], v[1])
        yield pk
        yield by
