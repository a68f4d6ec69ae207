"""The election: every VRRP instance of a node, the part that ``halb.node`` builds.

    election = Election(cfg.vrrp, clock=clock, registry=registry, pools=pools,
                        fast_takeover=True)
    await election.start() / await election.stop()
    election.status() -> [ {name, vrid, interface, state, priority, base_priority, vips,
                            master, advert_interval, preempt, since}, ... ]
    election.handover(name)                 # graceful: priority 0, step down, hold (see below)
    election.sync_peer_lost(ip) / sync_peer_seen(ip) / sync_peer_dead(ip)
                                            # state sync stream closed / opened, peer gone
    election.set_preempt_hold(True|False)   # state sync: do not preempt while learning tables
    election.vip_hooks.append(h)            # h.before_vips_added(instance, vips) and
                                            # h.after_vips_removed(instance, vips), in the
                                            # event loop, synchronously (the kernel NAT mode
                                            # commits its pending conntrack entries first)

What it is given: the ``[[vrrp]]`` sections, the node's monotonic clock, the metrics registry
(``halb_vrrp_*``, see ``metrics``), the pools (name -> ``halb.model.Pool``) that ``track``
entries of type ``pool`` look at, and whether fast takeover is on (``sync.fast_takeover``;
off, the ``sync_peer_*`` calls do nothing). State sync calls the ``sync_peer_*`` and
``set_preempt_hold`` methods (``halb.sync.hooks.ElectionHooks``); the control API calls
``status`` and ``handover``.

Each instance (``instance.Instance``) drives its pure FSM (``fsm``); one ``instance.Channel``
per interface and address family owns the raw socket (VRIDs of IPv4 and IPv6 are separate
spaces, RFC 9568).

Graceful handover (``handover(name)``, also what the control API exposes): the master sends
priority 0 (backups take over after Skew_Time), removes its VIPs and becomes backup with a
*handover hold*: it does not preempt the new master, even with a higher priority and preempt
on, until there is no master at all (it then takes over as usual, which ends the hold) or the
daemon restarts. So an operator can drain a node and it stays drained.

Shutdown (SIGTERM): a master sends priority 0 and removes its VIPs before the process exits.
"""

from __future__ import annotations

import asyncio
from typing import Any, Mapping

from prometheus_client import CollectorRegistry

from .. import log as hlog
from ..clock import Clock
from ..config import VrrpConfig
from ..model import Pool
from .fsm import INIT, MASTER
from .instance import Channel, Instance
from .metrics import VrrpMetrics
from .netlink import AddrSocket, LinkError, Netlink

log = hlog.get_logger("vrrp")
MAX_ALIASED_PEERS = 64
MAX_ALIASES = 32


class Election:
    """Every VRRP instance of the node (see the module docstring for the public calls)."""

    def __init__(self, cfgs: tuple[VrrpConfig, ...], *, clock: Clock,
                 registry: CollectorRegistry | None, pools: Mapping[str, Pool],
                 fast_takeover: bool):
        self.cfgs = tuple(cfgs)
        self.clock = clock
        self.pools = pools  # for ``track`` entries of type pool
        self.fast_takeover = bool(fast_takeover)
        self.metrics = VrrpMetrics(registry)
        self.instances: dict[str, Instance] = {c.name: Instance(c, self) for c in self.cfgs}
        self.channels: dict[tuple[str, int], Channel] = {}  # (interface, 4 or 6)
        self.netlink: Netlink | None = None
        self.addrs = AddrSocket()
        self.sockdiag_broken = False
        self.vip_hooks: list[Any] = []  # see the module docstring
        self._hold = False
        self._started = False
        self.adopt: set[str] = set()  # instances to start as master (halbctl upgrade)
        # sync peer address -> the addresses its adverts come from (its IPv6 link-local
        # address, say), told by the peer when its sync stream opens
        self._aliases: dict[str, tuple[str, ...]] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.netlink = Netlink()
        try:
            for inst in self.instances.values():
                await inst.prepare(self.netlink, self._hold)
            for inst in self.instances.values():
                ck = (inst.cfg.interface, inst.family)
                ch = self.channels.get(ck)
                if ch is None:
                    ch = self.channels[ck] = Channel(inst.cfg.interface, inst.ifindex, self,
                                                     inst.family)
                ch.by_vrid[inst.cfg.vrid] = inst
                ch.own.add(inst.address)
                key = inst.cfg.auth_key.encode() if inst.cfg.auth_key else b""
                ch.decoder.add(inst.cfg.vrid, inst.vip_strs, inst.cfg.checksum, key,
                               inst.cfg.unicast_peers or None, hmac_auth=inst.hmac_auth)
                inst.channel = ch
            for ch in self.channels.values():
                multicast = any(not i.cfg.unicast_peers for i in ch.by_vrid.values())
                ch.open(loop, multicast)
        except (LinkError, OSError):
            await self._close()
            raise
        self._started = True
        for inst in self.instances.values():
            inst.start(adopt=inst.name in self.adopt)
        log.info("election_started", instances=[
            {"name": i.name, "vrid": i.cfg.vrid, "interface": i.cfg.interface,
             "address": i.address, "priority": i.cfg.priority} for i in self.instances.values()])

    async def stop(self) -> None:
        if self._started:
            await asyncio.gather(*(i.stop() for i in self.instances.values()),
                                 return_exceptions=True)
            self._started = False
            log.info("election_stopped")
        await self._close()

    async def release(self) -> None:
        """An upgrade: the new process holds the instances now; let go without a priority-0
        advert, without removing VIPs and without notify scripts."""
        if self._started:
            await asyncio.gather(*(i.release() for i in self.instances.values()),
                                 return_exceptions=True)
            self._started = False
            log.info("election_released", to="the upgraded process")
        await self._close()

    def masters(self) -> list[str]:
        return [i.name for i in self.instances.values()
                if i.fsm is not None and i.fsm.state == MASTER]

    async def _close(self) -> None:
        loop = asyncio.get_running_loop()
        for ch in self.channels.values():
            ch.close(loop)
        if self.netlink is not None:
            self.netlink.close()
        self.addrs.close()

    # -- public calls -------------------------------------------------------------------------

    def status(self) -> list[dict]:
        return [i.status() for i in self.instances.values()]

    def handover(self, name: str) -> None:
        """Graceful handover of instance ``name``: KeyError if unknown, ValueError if not master."""
        inst = self.instances[name]
        if inst.fsm is None or inst.fsm.state != MASTER:
            raise ValueError(f"instance {name!r} is not master "
                             f"(state {inst.fsm.state if inst.fsm else INIT})")
        inst.call("handover")
        log.info("handover", instance=name)

    def advert_sources(self) -> list[str]:
        return sorted({i.address for i in self.instances.values() if i.address})

    def sync_peer_sources(self, peer_ip: str, sources: list[str]) -> None:
        if peer_ip not in self._aliases and len(self._aliases) >= MAX_ALIASED_PEERS:
            return
        self._aliases[peer_ip] = tuple(a for a in sources[:MAX_ALIASES] if a != peer_ip)

    def _names(self, peer_ip: str) -> tuple[str, ...]:
        """``peer_ip`` and the advert source addresses it told us (see sync_peer_sources)."""
        return (peer_ip,) + self._aliases.get(peer_ip, ())

    def sync_peer_lost(self, peer_ip: str) -> None:
        if not self.fast_takeover:
            return
        for inst in self.instances.values():
            if inst.fsm is not None and not inst.fsm.stopped:
                for name in self._names(peer_ip):
                    inst.call("sync_peer_lost", name)
                if inst.fsm.fast_at is not None:
                    log.info("fast_takeover_armed", instance=inst.name, peer=peer_ip,
                             within=inst.fsm.mai)

    def sync_peer_dead(self, peer_ip: str) -> None:
        """State sync found ``peer_ip``'s sync port refusing connections after its stream
        closed: the process is gone (see Fsm.sync_peer_dead)."""
        if not self.fast_takeover:
            return
        for inst in self.instances.values():
            if inst.fsm is not None and not inst.fsm.stopped:
                for name in self._names(peer_ip):
                    inst.call("sync_peer_dead", name)

    def sync_peer_seen(self, peer_ip: str) -> None:
        for inst in self.instances.values():
            if inst.fsm is not None and not inst.fsm.stopped:
                for name in self._names(peer_ip):
                    inst.call("sync_peer_seen", name)

    def set_preempt_hold(self, hold: bool) -> None:
        self._hold = bool(hold)
        for inst in self.instances.values():
            if inst.fsm is not None:
                inst.call("set_preempt_hold", self._hold)
        log.info("preempt_hold", hold=self._hold)
