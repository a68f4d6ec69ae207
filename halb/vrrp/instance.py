"""The election's async edge: raw IP protocol 112 sockets, timers and actions around the pure FSM.

``halb.vrrp.election.Election`` builds one ``Instance`` per ``[[vrrp]]`` section and one
``Channel`` per interface, and hands them itself: they use its clock, pools (tracking), metrics
(``VrrpMetrics``), address socket, VIP hooks and preempt hold.

One ``Channel`` per interface owns a raw socket (protocol 112, bound to the device, TTL 255,
multicast on 224.0.0.18 with loop off, or unicast to ``unicast_peers``) and the ``Decoder`` for
its VRIDs; received packets are checked cheaply, then parsed, then handed to the instance's
FSM. One ``Instance`` per ``[[vrrp]]`` drives its ``Fsm``: a single timer at the FSM's next
deadline, and the FSM's actions: send adverts, add/remove VIPs (pyroute2, in call order on one
worker thread), gratuitous ARP bursts and refreshes (scapy frames, packet socket), state-change
logs and metrics, and the notify command (``CMD INSTANCE <name> <MASTER|BACKUP|FAULT> <prio>``,
keepalived's arguments; run in order per instance, each bounded by NOTIFY_TIMEOUT, its output
logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shlex
import signal
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from .. import log as hlog
from ..config import TrackConfig, VrrpConfig
from . import codec
from .authhmac import HmacAuth
from .fsm import (BACKUP, FAULT, INIT, MASTER, AddVips, Fsm, Garp, Notify, Params, RemoveVips,
                  SendAdvert, StateChange)
from .garp import GarpSender, frames as garp_frames
from . import sockdiag
from .netlink import AddrSocket, LinkError, Netlink
from .track import Tracker, combine, make_tracker

if TYPE_CHECKING:  # pragma: no cover
    from .election import Election

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IP_MULTICAST_ALL = 49  # linux/in.h: 0 = only groups joined on this socket
IPV6_MULTICAST_ALL = 29  # linux/in6.h
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
IPV6_RECVHOPLIMIT = getattr(socket, "IPV6_RECVHOPLIMIT", 51)
IPV6_HOPLIMIT = getattr(socket, "IPV6_HOPLIMIT", 52)
ANC_SIZE = socket.CMSG_SPACE(20) + socket.CMSG_SPACE(4)  # in6_pktinfo + hop limit
RCVBUF = 256 * 1024
MAX_BATCH = 64  # packets read per wake-up before yielding to the loop
NOTIFY_TIMEOUT = 10.0
NOTIFY_QUEUE = 32
NOTIFY_OUTPUT = 4096
INVALID_LOG_EVERY = 10.0  # seconds between log lines per (channel, reason)
MAX_SOURCES = 256  # (source, reason) pairs of refused adverts kept per instance, and log keys
OWN_IFACE_CHECK = 1.0
LINKLOCAL_WAIT = 3.0  # seconds to wait for the interface's link-local address to leave DAD  # the instance's own interface is always tracked (weight 0)

log = hlog.get_logger("vrrp")
STATES = (INIT, BACKUP, MASTER, FAULT)


class Channel:
    """The raw socket of one interface and address family, shared by the instances on it."""

    def __init__(self, ifname: str, ifindex: int, election: "Election", family: int = 4):
        self.ifname = ifname
        self.ifindex = ifindex
        self.election = election
        self.family = family
        self.decoder = codec.Decoder()
        self.by_vrid: dict[int, Instance] = {}
        self.own: set[str] = set()
        self.sock: socket.socket | None = None
        self._log_at: dict[str, float] = {}
        self.send_errors = 0
        self._pktinfo: dict[str, list] = {}  # source -> ancillary data for sendmsg

    def open(self, loop: asyncio.AbstractEventLoop, multicast: bool) -> None:
        if self.family == 6:
            s = self._open6(multicast)
        else:
            s = self._open4(multicast)
        self.sock = s
        loop.add_reader(s.fileno(), self._readable6 if self.family == 6 else self._readable)

    def _open4(self, multicast: bool) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, codec.PROTO)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.ifname.encode())
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, codec.TTL)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, codec.TTL)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            mreqn = struct.pack("=4s4si", socket.inet_aton(codec.GROUP), b"\0" * 4, self.ifindex)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
            if multicast:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        return s

    def _open6(self, multicast: bool) -> socket.socket:
        # the checksum is computed and checked here, not by the kernel (no IPV6_CHECKSUM): a
        # bad one is counted and logged like any refused advert instead of vanishing
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, codec.PROTO)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.ifname.encode())
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, codec.TTL)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, codec.TTL)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self.ifindex)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)
            if multicast:
                mreq = socket.inet_pton(socket.AF_INET6, codec.GROUP6) + struct.pack("=I", self.ifindex)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        return s

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.sock is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def send(self, payload: bytes, src: str, dst: str) -> bool:
        if self.sock is None:
            return False
        anc = self._pktinfo.get(src)
        if anc is None:
            if self.family == 6:
                info = socket.inet_pton(socket.AF_INET6, src) + struct.pack("=I", self.ifindex)
                anc = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, info)]
            else:
                info = struct.pack("=i4s4s", self.ifindex, socket.inet_aton(src), b"\0" * 4)
                anc = [(socket.IPPROTO_IP, IP_PKTINFO, info)]
            if len(self._pktinfo) < 16:
                self._pktinfo[src] = anc
        addr = (dst, 0, 0, self.ifindex) if self.family == 6 else (dst, 0)
        try:
            self.sock.sendmsg([payload], anc, 0, addr)
            return True
        except OSError as e:  # e.g. the link is down: counted and logged, never fatal
            self.send_errors += 1
            self._rate_log("send_failed", interface=self.ifname, dst=dst, error=str(e))
            return False

    def _rate_log(self, key: str, event_name: str = "", **fields) -> None:
        now = time.monotonic()
        if now - self._log_at.get(key, -1e9) >= INVALID_LOG_EVERY:
            if len(self._log_at) >= MAX_SOURCES:
                self._log_at.clear()
            self._log_at[key] = now
            log.warning(event_name or key, **fields)

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        for _ in range(MAX_BATCH):
            try:
                data = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._rate_log("recv_failed", interface=self.ifname, error=str(e))
                return
            try:
                self._packet(data)
            except Exception:  # noqa: BLE001 - one packet never takes the election down
                log.exception("advert_handling_failed", interface=self.ifname)

    def _readable6(self) -> None:
        """IPv6: the kernel hands over the VRRP message alone; the source comes with the
        address, the destination and hop limit as ancillary data, and the fixed header is
        rebuilt from them so the decoder checks both families the same way."""
        sock = self.sock
        if sock is None:
            return
        for _ in range(MAX_BATCH):
            try:
                data, anc, _flags, addr = sock.recvmsg(65535, ANC_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._rate_log("recv_failed", interface=self.ifname, error=str(e))
                return
            hop, dst = -1, b"\0" * 16
            for level, typ, val in anc:
                if level == socket.IPPROTO_IPV6 and typ == IPV6_HOPLIMIT and len(val) >= 4:
                    hop = struct.unpack("=i", val[:4])[0]
                elif level == socket.IPPROTO_IPV6 and typ == IPV6_PKTINFO and len(val) >= 16:
                    dst = val[:16]
            try:
                src = socket.inet_pton(socket.AF_INET6, addr[0].split("%", 1)[0])
                if not 0 <= hop <= 255 or len(data) > 65535:
                    raise ValueError(f"no hop limit ({hop})")
                self._packet(codec.ipv6_header(src, dst, hop, len(data)) + data)
            except Exception:  # noqa: BLE001 - one packet never takes the election down
                log.exception("advert_handling_failed", interface=self.ifname)

    def _packet(self, data: bytes) -> None:
        src = codec.source_of(data)
        if src in self.own:
            # our own address as the source: multicast loop is off and nothing should unicast
            # to us, so this is a forgery (or a duplicate address): counted, never used
            off = 40 if data[0] >> 4 == 6 else (data[0] & 0x0F) * 4
            vrid = data[off + 1] if len(data) > off + 1 else None
            self._invalid(vrid, codec.Invalid("own_address", f"from {src}"), src)
            return
        r = self.decoder.decode(data)
        if isinstance(r, codec.Invalid):
            vrid, _ = self.decoder.last_invalid or (None, r)
            self._invalid(vrid, r, src)
            return
        inst = self.by_vrid.get(r.vrid)
        if inst is not None:
            inst.on_advert(r)

    def _invalid(self, vrid: int | None, r: codec.Invalid, src: str) -> None:
        inst = self.by_vrid.get(vrid) if vrid is not None else None
        label = inst.name if inst else f"iface:{self.ifname}"
        self.election.metrics.invalid.labels(label, r.reason).inc()
        if inst is not None:
            inst.count_invalid(src, r)
        if r.reason == "checksum_mode" and inst is not None:
            theirs = "keepalived" if inst.cfg.checksum == "rfc9568" else "rfc9568"
            self._rate_log(f"checksum_mismatch:{src}", interface=self.ifname, instance=label,
                           source=src, ours=inst.cfg.checksum, theirs=theirs,
                           hint=f"the peer {src} computes VRRP checksums the {theirs!r} way and "
                                f"drops our adverts too (both nodes will be master): set "
                                f"checksum = \"{theirs}\" in [[vrrp]] {inst.name!r} "
                                f"(keepalived needs \"keepalived\")",
                           event_name="vrrp_checksum_mismatch")
            return
        self._rate_log(f"invalid_advert:{r.reason}", interface=self.ifname, instance=label,
                       reason=r.reason, detail=r.detail)


class Instance:
    """One virtual router: its FSM, its timer and the actions."""

    def __init__(self, cfg: VrrpConfig, election: "Election"):
        self.cfg = cfg
        self.name = cfg.name
        self.election = election
        self.clock = election.clock
        self.fsm: Fsm | None = None
        self.channel: Channel | None = None
        self.address = ""
        self.signer: codec.Signer | None = None
        self.hmac_auth: HmacAuth | None = None  # keepalived's auth_hmac, shared with the decoder
        self.family = 6 if cfg.vips and cfg.vips[0].version == 6 else 4
        self.dsts: tuple[str, ...] = tuple(cfg.unicast_peers) or (
            codec.GROUP6 if self.family == 6 else codec.GROUP,)
        # IPv6: the virtual link-local address first (RFC 9568 section 5.2.9), as the config
        # check guarantees one is there
        self.vip_strs = tuple(str(v.ip) for v in sorted(
            cfg.vips, key=lambda v: 0 if v.version == 6 and v.ip.is_link_local else 1))
        self.trackers: list[Tracker] = []
        self.mac = ""
        self.garp = GarpSender(cfg.interface)
        self._frames: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task] = []
        self._garp_handles: list[asyncio.TimerHandle] = []
        self._notify_q: asyncio.Queue | None = None
        self.ifindex = 0
        # excluded VIPs (not in adverts, moved with this instance): interface -> addresses
        self.extra: dict[str, list] = {}
        for vip, dev in cfg.excluded_vips:
            self.extra.setdefault(dev or cfg.interface, []).append(vip)
        self.extra_index: dict[str, int] = {}
        self.extra_garp: dict[str, tuple[GarpSender, list[bytes]]] = {}
        self.all_vip_strs = self.vip_strs + tuple(str(v.ip) for v, _ in cfg.excluded_vips)
        self.invalid: dict[str, int] = {}  # reason -> adverts refused
        self.invalid_sources: dict[tuple[str, str], list] = {}  # (source, reason) -> [n, detail]

    def count_invalid(self, src: str, r: codec.Invalid) -> None:
        self.invalid[r.reason] = self.invalid.get(r.reason, 0) + 1
        k = (src, r.reason)
        e = self.invalid_sources.get(k)
        if e is None:
            if len(self.invalid_sources) >= MAX_SOURCES:  # a spoofing flood: keep the totals
                return
            e = self.invalid_sources[k] = [0, ""]
        e[0] += 1
        e[1] = r.detail

    # -- set up ---------------------------------------------------------------------------------

    async def _source(self, netlink: Netlink) -> str:
        """The address adverts come from: the interface's first IPv4 address, or (IPv6) its
        link-local address (a global one when the unicast peers are global: they check the
        source against their own peer list), waited for while duplicate address detection
        still holds it (a tentative address cannot be a source), at most LINKLOCAL_WAIT s."""
        if self.family == 4:
            return await netlink.primary_address(self.cfg.interface, self.vip_strs)
        link_local = not any(not ipaddress.IPv6Address(p).is_link_local
                             for p in self.cfg.unicast_peers)
        deadline = time.monotonic() + LINKLOCAL_WAIT
        while True:
            addr, tentative = await netlink.link_local(self.cfg.interface, self.all_vip_strs,
                                                       link_local)
            if addr and not tentative or time.monotonic() >= deadline:
                return addr
            await asyncio.sleep(0.1)

    async def prepare(self, netlink: Netlink, hold: bool) -> None:
        cfg = self.cfg
        st = await netlink.link(cfg.interface)
        if not st["exists"]:
            raise OSError(f"vrrp instance {cfg.name!r}: no interface {cfg.interface!r}")
        self.ifindex = st["index"]
        self.mac = st["mac"]
        self.address = cfg.source_address or await self._source(netlink)
        if not self.address:
            kind = "link-local IPv6" if self.family == 6 else "IPv4"
            raise OSError(f"vrrp instance {cfg.name!r}: no {kind} address on {cfg.interface!r} "
                          "to send adverts from (set source_address)")
        key = cfg.auth_key.encode() if cfg.auth_key else b""
        ah = cfg.auth_hmac
        self.hmac_auth = None if ah is None else HmacAuth(
            dict(ah.keys), ah.active_key, mode=ah.mode, anti_replay=ah.anti_replay,
            time_window=ah.time_window)
        self.signer = codec.Signer(cfg.vrid, self.vip_strs, self.address, cfg.checksum, key,
                                   hmac_auth=self.hmac_auth)
        router = self.family == 6 and _forwarding6(cfg.interface)
        self._frames = garp_frames(self.mac, self.vip_strs, router) if self.mac else []
        for dev, vips in self.extra.items():
            xs = st if dev == cfg.interface else await netlink.link(dev)
            if not xs["exists"]:
                raise OSError(f"vrrp instance {cfg.name!r}: no interface {dev!r} "
                              f"(excluded_vips)")
            self.extra_index[dev] = xs["index"]
            if dev == cfg.interface:
                self._frames += garp_frames(self.mac, [str(v.ip) for v in vips],
                                            _forwarding6(dev)) if self.mac else []
            elif xs["mac"]:
                self.extra_garp[dev] = (GarpSender(dev),
                                        garp_frames(xs["mac"], [str(v.ip) for v in vips],
                                                    _forwarding6(dev)))
        for add in (True, False):  # encode the netlink requests now, not during a takeover
            for v in cfg.vips:
                self.election.addrs.prepare(add, self.ifindex, v)
            for dev, vips in self.extra.items():
                for v in vips:
                    self.election.addrs.prepare(add, self.extra_index[dev], v)
        self.fsm = Fsm(Params(vrid=cfg.vrid, priority=cfg.priority, interval=cfg.advert_interval,
                              address=self.address, preempt=cfg.preempt,
                              preempt_delay=cfg.preempt_delay, garp_refresh=cfg.garp.refresh))
        self.fsm.hold_sync = hold  # refreshed after the awaits below
        own_iface = TrackConfig(type="interface", interface=cfg.interface, weight=0,
                                interval=OWN_IFACE_CHECK)
        tcs = [own_iface] + [t for t in cfg.track
                             if not (t.type == "interface" and t.interface == cfg.interface
                                     and t.weight == 0)]
        self.trackers = [make_tracker(t, pools=self.election.pools, clock=self.clock,
                                      netlink=netlink) for t in tcs]
        # first verdicts before the FSM starts, so a node never briefly claims a VIP it
        # should not (scripts are bounded by their timeouts)
        await asyncio.gather(*(t.poll() for t in self.trackers))
        # the hold may have been released by state sync during the awaits above
        self.fsm.hold_sync = self.election._hold
        for t in self.trackers:
            if t.ok is False:
                log.warning("track_failed", instance=self.name, tracker=t.name,
                            detail=t.verdict.detail, weight=t.weight)

    def start(self, adopt: bool = False) -> None:
        assert self.fsm is not None
        m = self.election.metrics
        for s in STATES:
            m.state.labels(self.name, s).set(1 if s == INIT else 0)
        m.priority.labels(self.name).set(self.fsm.priority)
        self._notify_q = asyncio.Queue(NOTIFY_QUEUE)
        if self.cfg.notify:
            self._tasks.append(asyncio.create_task(self._notifier(), name=f"vrrp-notify-{self.name}"))
        fault, delta = combine((t.weight, t.ok) for t in self.trackers)
        now = self.clock.now()
        self.fsm.set_tracking(now, fault, delta)
        self._apply(self.fsm.adopt(now) if adopt else self.fsm.start(now))
        for t in self.trackers:
            self._tasks.append(asyncio.create_task(self._track_loop(t),
                                                   name=f"vrrp-track-{self.name}-{t.name}"))

    # -- inputs ---------------------------------------------------------------------------------

    def on_advert(self, adv: codec.Advert) -> None:
        if self.fsm is None or self.fsm.stopped:
            return
        self.election.metrics.received.labels(self.name).inc()
        before = self.fsm.master
        self._apply(self.fsm.on_advert(self.clock.now(), adv.src, adv.priority, adv.interval))
        if self.fsm.master != before and self.fsm.state == BACKUP and self.fsm.master:
            log.info("vrrp_master_seen", instance=self.name, master=self.fsm.master,
                     priority=adv.priority, interval=adv.interval)

    def _on_timer(self) -> None:
        self._timer = None
        if self.fsm is None or self.fsm.stopped:
            return
        try:
            self._apply(self.fsm.on_timer(self.clock.now()))
        except Exception:  # noqa: BLE001
            log.exception("timer_failed", instance=self.name)
            self._schedule()

    async def _track_loop(self, t: Tracker) -> None:
        while True:
            await asyncio.sleep(t.cfg.interval)
            try:
                changed = await t.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("track_poll_failed", instance=self.name, tracker=t.name)
                continue
            if changed and self.fsm is not None and not self.fsm.stopped:
                log.info("track_changed", instance=self.name, tracker=t.name, ok=t.ok,
                         detail=t.verdict.detail, weight=t.weight)
                fault, delta = combine((x.weight, x.ok) for x in self.trackers)
                self._apply(self.fsm.set_tracking(self.clock.now(), fault, delta))

    def call(self, method: str, *args) -> None:
        """Runs an FSM input (``handover``, ``sync_peer_lost``, ...) and its actions."""
        assert self.fsm is not None
        self._apply(getattr(self.fsm, method)(self.clock.now(), *args))

    # -- actions --------------------------------------------------------------------------------

    def _apply(self, acts: list) -> None:
        for a in acts:
            try:
                self._act(a)
            except Exception:  # noqa: BLE001 - one failed action never stops the others
                log.exception("action_failed", instance=self.name, action=repr(a))
        self._schedule()

    def _act(self, a: Any) -> None:
        if isinstance(a, SendAdvert):
            self.send_advert(a.priority, a.interval)
        elif isinstance(a, AddVips):
            self._vip_op(add=True, adopt=a.adopt)
        elif isinstance(a, RemoveVips):
            self._vip_op(add=False)
        elif isinstance(a, Garp):
            self._send_garp(a.burst)
        elif isinstance(a, StateChange):
            self._state_changed(a)
        elif isinstance(a, Notify):
            self._queue_notify(a)

    def send_advert(self, priority: int, interval: float) -> None:
        assert self.signer is not None and self.channel is not None
        for dst in self.dsts:
            if self.channel.send(self.signer.payload(priority, interval, dst), self.address, dst):
                self.election.metrics.sent.labels(self.name).inc()

    def _vip_op(self, add: bool, adopt: bool = False) -> None:
        """Adds or removes the VIPs now (one netlink request each, ~0.1 ms), so the gratuitous
        ARPs that follow announce addresses that are already in place. Stale TCP sockets on
        the VIPs (orphans of an earlier run or an earlier term as master) are destroyed just
        before the VIPs are added and just after they are removed (``sockdiag``)."""
        if add:
            for h in self.election.vip_hooks:
                try:
                    h.before_vips_added(self.name, self.all_vip_strs)
                except Exception:  # noqa: BLE001 - a hook never delays or stops a takeover
                    log.exception("vip_hook_failed", instance=self.name, when="before_add")
            if not adopt:
                self._destroy_stale("before_add")
        groups = [(self.cfg.interface, self.ifindex, self.cfg.vips)]
        groups += [(dev, self.extra_index[dev], vips) for dev, vips in self.extra.items()
                   if dev in self.extra_index]
        for dev, ifindex, vips in groups:  # front and back addresses move as one group
            try:
                changed = self.election.addrs.change(add, ifindex, vips)
            except LinkError as e:
                log.error("vip_failed", instance=self.name, op="add" if add else "remove",
                          interface=dev, error=str(e))
                continue
            if changed:
                log.info("vips_added" if add else "vips_removed", instance=self.name,
                         interface=dev, vips=changed)
        if not add:
            self._destroy_stale("after_remove")
            for h in self.election.vip_hooks:
                try:
                    h.after_vips_removed(self.name, self.all_vip_strs)
                except Exception:  # noqa: BLE001
                    log.exception("vip_hook_failed", instance=self.name, when="after_remove")

    def _destroy_stale(self, when: str) -> None:
        el = self.election
        if el.sockdiag_broken:
            return
        try:
            done, gone = sockdiag.destroy(self.vip_strs)
        except OSError as e:  # no sock_diag destroy here: say so once, never fail the takeover
            el.sockdiag_broken = True
            log.warning("stale_sockets_unavailable", instance=self.name, error=str(e),
                        hint="CONFIG_INET_DIAG_DESTROY and CAP_NET_ADMIN are needed; stale "
                             "connections on the VIPs then age out (tcp_fin_timeout)")
            return
        if done:
            el.metrics.stale_sockets.labels(self.name).inc(done)
            log.info("stale_sockets_destroyed", instance=self.name, when=when, sockets=done,
                     vips=list(self.vip_strs))

    def _send_garp(self, burst: bool) -> None:
        if not self._frames:
            return
        count = max(1, self.cfg.garp.count) if burst else 1
        if self.cfg.garp.count == 0 and burst:
            return
        self.garp.send(self._frames)
        for g, fr in self.extra_garp.values():
            g.send(fr)
        loop = asyncio.get_running_loop()
        self._garp_handles = [h for h in self._garp_handles if not h.cancelled()]
        for i in range(1, count):
            self._garp_handles.append(
                loop.call_later(i * self.cfg.garp.spacing, self._garp_again))

    def _garp_again(self) -> None:
        if self.fsm is not None and self.fsm.state == MASTER:
            self.garp.send(self._frames)
            for g, fr in self.extra_garp.values():
                g.send(fr)

    def _state_changed(self, a: StateChange) -> None:
        m = self.election.metrics
        m.state.labels(self.name, a.old).set(0)
        m.state.labels(self.name, a.new).set(1)
        m.transitions.labels(self.name, a.new).inc()
        assert self.fsm is not None
        m.priority.labels(self.name).set(self.fsm.priority)
        if a.new != MASTER:
            for h in self._garp_handles:
                h.cancel()
            self._garp_handles.clear()
        log.info("vrrp_state", instance=self.name, vrid=self.cfg.vrid, old=a.old, new=a.new,
                 reason=a.reason, priority=self.fsm.priority, master=self.fsm.master,
                 interval=self.fsm.interval)

    def _queue_notify(self, n: Notify) -> None:
        m = self.election.metrics
        if self.fsm is not None:
            m.priority.labels(self.name).set(self.fsm.priority)
        if not self.cfg.notify or self._notify_q is None:
            return
        try:
            self._notify_q.put_nowait(n)
        except asyncio.QueueFull:
            log.warning("notify_dropped", instance=self.name, state=n.state,
                        reason="queue full")

    async def _notifier(self) -> None:
        assert self._notify_q is not None
        while True:
            n: Notify = await self._notify_q.get()
            await run_notify(self.cfg.notify, self.name, n.state, n.priority)

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.fsm is None or self.fsm.stopped:
            return
        d = self.fsm.deadline()
        if d is None:
            return
        delay = max(0.0, d - self.clock.now())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    # -- stop -----------------------------------------------------------------------------------

    async def release(self) -> None:
        """An upgrade's old process lets go silently (see Fsm.release)."""
        self._cancel_timers()
        if self.fsm is not None:
            self._apply(self.fsm.release(self.clock.now()))
        await self._end_tasks()

    def _cancel_timers(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for h in self._garp_handles:
            h.cancel()

    async def _end_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        self.garp.close()
        for g, _ in self.extra_garp.values():
            g.close()

    async def stop(self) -> None:
        self._cancel_timers()
        if self.fsm is not None and not self.fsm.stopped:
            self._apply(self.fsm.shutdown(self.clock.now()))
        if self._notify_q is not None and self.cfg.notify:
            # let the last notifications (e.g. BACKUP on shutdown) run, bounded
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drain_notify(), timeout=2.0)
        await self._end_tasks()

    async def _drain_notify(self) -> None:
        while self._notify_q is not None and not self._notify_q.empty():
            await asyncio.sleep(0.01)

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict:
        f = self.fsm
        now = self.clock.now()
        return {
            "name": self.name,
            "vrid": self.cfg.vrid,
            "interface": self.cfg.interface,
            "state": f.state if f else INIT,
            "priority": f.priority if f else self.cfg.priority,
            "base_priority": self.cfg.priority,
            "vips": [str(v) for v in self.cfg.vips]
                    + [f"{v} dev {dev or self.cfg.interface}" for v, dev in self.cfg.excluded_vips],
            "master": f.master if f else "",
            "advert_interval": f.interval if f else self.cfg.advert_interval,
            "preempt": self.cfg.preempt,
            "since": max(0.0, now - f.since) if f and f.since else 0.0,
            "checksum": self.cfg.checksum,
            "auth": (f"auth_hmac {self.cfg.auth_hmac.mode} key {self.cfg.auth_hmac.active_key}"
                     if self.cfg.auth_hmac else "auth_key" if self.cfg.auth_key else ""),
            "invalid_adverts": dict(self.invalid),
            "invalid_sources": [{"source": s, "reason": r, "count": n, "detail": d}
                                for (s, r), (n, d) in sorted(self.invalid_sources.items())],
        }


def _forwarding6(ifname: str) -> bool:
    """Whether ``ifname`` forwards IPv6 (this network namespace): the NAs' Router flag."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/forwarding") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


async def run_notify(command: str, name: str, state: str, priority: int) -> int | None:
    """Runs the notify command with keepalived's arguments; returns its exit status (None when
    it could not run or timed out). Output (bounded) goes to the log."""
    argv = shlex.split(command) + ["INSTANCE", name, state, str(priority)]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        log.error("notify_failed", instance=name, state=state, command=command, error=str(e))
        return None
    try:
        out = await asyncio.wait_for(proc.stdout.read(NOTIFY_OUTPUT), NOTIFY_TIMEOUT)
        rc = await asyncio.wait_for(proc.wait(), NOTIFY_TIMEOUT)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        log.error("notify_timeout", instance=name, state=state, command=command,
                  timeout=NOTIFY_TIMEOUT)
        return None
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    log.info("notify", instance=name, state=state, priority=priority, exit=rc,
             output=out.decode(errors="replace").strip()[:NOTIFY_OUTPUT])
    return rc
