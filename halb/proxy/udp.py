"""L4 UDP listener: per-client flows over connected UDP sockets towards the backends.

The first datagram from a client address opens a *flow*: a backend is chosen (a flow entry
replicated from a peer for this client wins, then source stickiness, then the pool's
algorithm), a flow-table entry ``flow_key(listener, "udp", "ip:port")`` is written, and a UDP
socket connected to that backend is opened. Datagrams from the client go out on that socket;
what the backend answers on it goes back to the client from the listener's own socket, so the
client sees replies from the address it sent to (a listener bound to a wildcard address learns
each flow's destination address with IP_PKTINFO / IPV6_RECVPKTINFO and answers from it).

A flow ends after ``udp_flow_timeout`` without a datagram either way. ``limits.max_flows``
bounds the flows (and so the sockets): datagrams that would open a flow beyond it are
dropped and counted (``halb_l4_events_total{event="flows_dropped"}``). When a flow's backend
goes down (health checks, passive ejection, or an ICMP port unreachable seen on its socket)
the flow moves to another backend on its next datagram.

No task per flow: event-loop reader callbacks on raw non-blocking sockets, bounded bursts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from typing import TYPE_CHECKING

from .. import log as hlog
from ..balance import hash_key_for
from ..model import Pool
from ..tables import flow_key, sticky_key
from .sockets import bind_udp, format_addr, raise_nofile
from .l4stats import l4_counters
from ..log import RateLimitedLog

if TYPE_CHECKING:  # pragma: no cover
    from ..config import ListenerConfig
    from ..model import Backend
    from . import ListenerEnv

_log = hlog.get_logger("udp")

BURST = 64  # datagrams per readiness event
MAX_DATAGRAM = 65535
RCVBUF = 1 << 20
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # linux/in.h
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
CMSG_SPACE = 64


def reply_pktinfo(family: int, ancdata: list) -> tuple[int, int, bytes] | None:
    """From the ancillary data of a received datagram, the cmsg that makes a reply leave from
    the address the datagram was sent to (a wildcard-bound listener must answer from it)."""
    for level, typ, data in ancdata:
        if family == socket.AF_INET and level == socket.IPPROTO_IP and typ == IP_PKTINFO \
                and len(data) >= 12:
            # struct in_pktinfo {int ifindex; in_addr spec_dst; in_addr addr}: source := addr
            return (socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, data[8:12], bytes(4)))
        if family == socket.AF_INET6 and level == socket.IPPROTO_IPV6 and typ == IPV6_PKTINFO \
                and len(data) >= 20:
            # struct in6_pktinfo {in6_addr addr; int ifindex}
            return (socket.IPPROTO_IPV6, IPV6_PKTINFO, bytes(data[:16]) + struct.pack("=i", 0))
    return None


class _Flow:
    __slots__ = ("lst", "caddr", "client", "key", "sock", "fd", "backend", "last", "n", "seen",
                 "dead", "rd", "local")

    def __init__(self, lst: "UdpListener", caddr: tuple):
        self.lst = lst
        self.caddr = caddr
        self.client = format_addr(caddr)
        self.key = flow_key(lst.name, "udp", self.client)
        self.sock: socket.socket | None = None
        self.fd = -1
        self.backend: "Backend | None" = None
        self.last = 0.0
        self.n = 0  # datagrams both ways
        self.seen = 0
        self.dead = False  # the backend refused (ICMP unreachable): move on the next datagram
        self.rd = self.on_replies
        self.local: tuple | None = None  # wildcard listener: cmsg setting the reply's source

    def attach(self, b: "Backend") -> bool:
        """Opens a socket connected to ``b``; False (and logged) if that fails."""
        lst = self.lst
        try:
            fam, sa = lst.addr_of(b)
            s = socket.socket(fam, socket.SOCK_DGRAM)
            try:
                s.setblocking(False)
                s.connect(sa)
            except BaseException:
                s.close()
                raise
        except OSError as e:
            lst.rlog.warning("backend_socket_failed", key=b.name, listener=lst.name,
                             backend=b.name, error=str(e))
            return False
        self.sock = s
        self.fd = s.fileno()
        self.backend = b
        self.dead = False
        Pool.acquire(b)
        lst.loop.add_reader(self.fd, self.rd)
        return True

    def detach(self, error: bool = False) -> None:
        b = self.backend
        if self.sock is not None:
            self.lst.loop.remove_reader(self.fd)
            self.sock.close()
            self.sock = None
            self.fd = -1
        if b is not None:
            self.backend = None
            Pool.release(b)
            self.lst.env.metrics.observe(b, None, error)

    def on_replies(self) -> None:
        lst = self.lst
        out = lst.sock
        if out is None or self.sock is None:
            return
        buf, mv = lst.rbuf, lst.rmv
        recv_into = self.sock.recv_into
        caddr = self.caddr
        local = self.local
        for _ in range(BURST):
            try:
                n = recv_into(buf)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                self.refused()
                return
            except OSError as e:
                lst.rlog.warning("backend_recv_failed", key=self.backend.name, listener=lst.name,
                                 backend=self.backend.name, error=str(e))
                return
            self.n += 1
            try:
                if local is None:
                    out.sendto(mv[:n], caddr)
                else:
                    out.sendmsg([mv[:n]], [local], 0, caddr)
            except BlockingIOError:
                lst.event("reply_dropped")
            except OSError as e:
                lst.event("reply_dropped")
                lst.rlog.warning("client_send_failed", key=lst.name, listener=lst.name,
                                 client=self.client, error=str(e))

    def refused(self) -> None:
        """ICMP port unreachable from the backend: a passive failure; move on next datagram."""
        lst = self.lst
        b = self.backend
        if b is None or self.dead:
            return
        self.dead = True
        lst.event("backend_refused")
        lst.pool.report_result(b, False, lst.env.clock.now())
        lst.rlog.warning("backend_refused", key=b.name, listener=lst.name, pool=lst.pool.name,
                         backend=b.name, client=self.client)


class UdpListener:
    def __init__(self, cfg: "ListenerConfig", env: "ListenerEnv"):
        self.cfg = cfg
        self.env = env
        self.name = cfg.name
        self.pool: Pool = env.pools[cfg.pool]
        self.hashing = hash_key_for(self.pool.cfg, "0.0.0.0") is not None
        self.sticky_src = self.pool.cfg.sticky.mode == "source"
        self.timeout = cfg.udp_flow_timeout
        self.max_flows = cfg.limits.max_flows
        self.flows: dict[tuple, _Flow] = {}
        self.sock: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.buf = bytearray(MAX_DATAGRAM)
        self.mv = memoryview(self.buf)
        self.rbuf = bytearray(MAX_DATAGRAM)
        self.rmv = memoryview(self.rbuf)
        self._addrs: dict = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.rlog = RateLimitedLog(_log)
        self._events, _ = l4_counters(env.metrics.registry)
        self._ev_children: dict[str, object] = {}
        self.sweep_interval = min(1.0, max(0.02, self.timeout / 4))
        # bound to a wildcard address: learn each datagram's destination (IP_PKTINFO) so the
        # replies leave from the address the client sent to
        try:
            self.wildcard = ipaddress.ip_address(cfg.bind.host).is_unspecified
        except ValueError:
            self.wildcard = False
        self.family = socket.AF_INET
        self.handover: socket.socket | None = None  # a socket taken over (upgrade)

    def refresh_pool(self) -> None:
        """The pool's config changed (reload): the facts cached from it, again."""
        self.hashing = hash_key_for(self.pool.cfg, "0.0.0.0") is not None
        self.sticky_src = self.pool.cfg.sticky.mode == "source"
        if self.loop is not None:
            self.loop.create_task(self._resolve_all())

    def reconfigure(self, cfg: "ListenerConfig") -> None:
        """A reload changed this listener's settings (same bind): applied in place; the socket
        and the flows stay."""
        self.cfg = cfg
        self.pool = self.env.pools[cfg.pool]
        self.timeout = cfg.udp_flow_timeout
        self.max_flows = cfg.limits.max_flows
        raise_nofile(self.max_flows + 1024)
        self.sweep_interval = min(1.0, max(0.02, self.timeout / 4))
        self.refresh_pool()

    async def _resolve_all(self) -> None:
        for b in list(self.pool.backends):
            if b in self._addrs:
                continue
            try:
                infos = await self.loop.getaddrinfo(b.host, b.port, type=socket.SOCK_DGRAM)
                self._addrs[b] = (infos[0][0], infos[0][4])
            except (OSError, IndexError) as e:
                _log.warning("backend_resolve_failed", pool=self.pool.name, backend=b.name,
                             host=b.host, error=str(e))

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = loop = asyncio.get_running_loop()
        raise_nofile(self.max_flows + 1024)
        for b in self.pool.backends:
            try:
                infos = await loop.getaddrinfo(b.host, b.port, type=socket.SOCK_DGRAM)
                self._addrs[b] = (infos[0][0], infos[0][4])
            except (OSError, IndexError) as e:
                _log.warning("backend_resolve_failed", pool=self.pool.name, backend=b.name,
                             host=b.host, error=str(e))
        self.sock = self.handover or bind_udp(self.cfg.bind.host, self.cfg.bind.port)
        self.handover = None
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        except OSError:  # pragma: no cover
            pass
        self.family = self.sock.family
        if self.wildcard:
            if self.family == socket.AF_INET6:
                self.sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            else:
                self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        loop.add_reader(self.sock.fileno(), self._on_datagrams)
        self._sweeper = loop.call_later(self.sweep_interval, self._sweep)
        _log.info("listener_started", listener=self.name, bind=str(self.cfg.bind), mode="udp",
                  pool=self.pool.name, flow_timeout=self.timeout, max_flows=self.max_flows)

    def take_socket(self) -> socket.socket:
        """A duplicate of the listening socket, for the process or listener that replaces
        this one (the flows this one holds end when it stops)."""
        return self.sock.dup()

    async def stop(self, grace: float = 0.0) -> None:
        if self.loop is None:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        for f in list(self.flows.values()):
            self._end(f)
        _log.info("listener_stopped", listener=self.name)

    def addr_of(self, b: "Backend") -> tuple[int, tuple]:
        a = self._addrs.get(b)
        if a is not None:
            return a
        return (socket.AF_INET6 if ":" in b.host else socket.AF_INET), (b.host, b.port)

    # -- datagrams from clients -----------------------------------------------------------------

    def _on_datagrams(self) -> None:
        sock = self.sock
        if sock is None:
            return
        buf, mv = self.buf, self.mv
        flows = self.flows
        now = self.env.clock.now()  # one reading per burst
        wildcard = self.wildcard
        anc = None
        for _ in range(BURST):
            try:
                if wildcard:
                    n, anc, _flags, caddr = sock.recvmsg_into([buf], CMSG_SPACE)
                else:
                    n, caddr = sock.recvfrom_into(buf)
            except BlockingIOError:
                return
            except OSError as e:  # e.g. a stray ICMP error reported on the socket
                _log.debug("recv_failed", listener=self.name, error=str(e))
                continue
            f = flows.get(caddr)
            if f is None:
                f = self._open(caddr, now)
                if f is None:
                    continue
                if wildcard:
                    f.local = reply_pktinfo(self.family, anc)
            elif f.dead or not f.backend.healthy or f.backend.ejected_until > now:
                if not self._move(f, now):
                    continue
            f.n += 1
            try:
                f.sock.send(mv[:n])
            except BlockingIOError:
                self.event("datagram_dropped")
            except ConnectionRefusedError:
                f.refused()
            except OSError as e:
                self.event("datagram_dropped")
                self.rlog.warning("backend_send_failed", key=f.backend.name, listener=self.name,
                                  backend=f.backend.name, error=str(e))

    def _choose(self, caddr: tuple, key: str, now: float, exclude=frozenset()) -> "Backend | None":
        pool = self.pool
        if not exclude:
            e = self.env.tables.flow.get(key)  # ours from before, or replicated from a peer
            if e is not None and e.pool == pool.name:
                b = pool.by_name.get(e.backend)
                if b is not None and b.is_up(now):
                    return b
            if self.sticky_src:
                e = self.env.tables.sticky.get(sticky_key("src", pool.name, caddr[0]))
                if e is not None and e.pool == pool.name:
                    b = pool.by_name.get(e.backend)
                    if b is not None and b.is_up(now) and not b.is_full():
                        return b
        hk = hash_key_for(pool.cfg, caddr[0]) if self.hashing else None
        return pool.pick(hk, exclude=exclude)

    def _open(self, caddr: tuple, now: float) -> _Flow | None:
        if len(self.flows) >= self.max_flows:
            self.event("flows_dropped")
            self.rlog.warning("max_flows_reached", key=self.name, listener=self.name,
                              max_flows=self.max_flows)
            return None
        f = _Flow(self, caddr)
        if not self._connect(f, now):
            return None
        f.last = now
        self.flows[caddr] = f
        self.env.metrics.conn_open(self.name)
        return f

    def _connect(self, f: _Flow, now: float, exclude=frozenset()) -> bool:
        tried = set(exclude)
        for _ in range(self.pool.cfg.retries + 1):
            b = self._choose(f.caddr, f.key, now, tried)
            if b is None:
                break
            if f.attach(b):
                self._record(f, b)
                return True
            tried.add(b)
        self.event("no_backend")
        self.rlog.warning("no_backend", key=self.name, listener=self.name, pool=self.pool.name,
                          client=f.client)
        return False

    def _record(self, f: _Flow, b: "Backend") -> None:
        tables = self.env.tables
        tables.flow.put(f.key, b.name, self.timeout, pool=self.pool.name, client=f.client,
                        listener=self.name, proto="udp")
        if self.sticky_src:
            tables.sticky.put(sticky_key("src", self.pool.name, f.caddr[0]), b.name,
                              self.pool.cfg.sticky.ttl, pool=self.pool.name)

    def _move(self, f: _Flow, now: float) -> bool:
        """The flow's backend is down: move the flow to another one (or end it)."""
        old = f.backend
        f.detach(error=True)
        self.event("flow_moved")
        if self._connect(f, now, exclude={old} if old is not None else frozenset()):
            _log.info("flow_moved", listener=self.name, client=f.client,
                      old=old.name if old else "", new=f.backend.name)
            return True
        self._end(f)
        return False

    def _end(self, f: _Flow) -> None:
        if self.flows.get(f.caddr) is f:
            del self.flows[f.caddr]
            self.env.metrics.conn_close(self.name)
        f.detach()
        f.rd = None  # break the flow <-> bound method cycle: freed at once, not by the GC
        self.env.tables.flow.delete(f.key)

    # -- housekeeping ---------------------------------------------------------------------------

    def _sweep(self) -> None:
        """Ends idle flows and touches active flows' table entries (at most once a second)."""
        now = self.env.clock.now()
        flow = self.env.tables.flow
        timeout = self.timeout
        try:
            for f in list(self.flows.values()):
                if f.n != f.seen:
                    f.seen = f.n
                    f.last = now
                    if flow.touch(f.key, timeout) is None and f.backend is not None:
                        self._record(f, f.backend)  # expired in the table meanwhile
                elif now - f.last >= timeout:
                    self.event("flow_expired")
                    self._end(f)
        except Exception:
            _log.exception("sweep_failed", listener=self.name)
        self._sweeper = self.loop.call_later(self.sweep_interval, self._sweep)

    def event(self, name: str) -> None:
        c = self._ev_children.get(name)
        if c is None:
            c = self._ev_children[name] = self._events.labels(self.name, name)
        c.inc()

    @property
    def address(self) -> tuple | None:
        return self.sock.getsockname() if self.sock is not None else None

    def stats(self) -> dict:
        return {"flows": len(self.flows)}
