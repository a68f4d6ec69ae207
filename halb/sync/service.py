"""State sync's gRPC edge: the Sync server (we send our tables) and one follower link per peer
(we receive theirs). The protocol is described in ``proto/halb/v1/sync.proto``; the decisions
(snapshot or resume, batching, applying) live in the pure ``halb.sync.core``.

Built by the composition root (and by ``halb.sync.standalone.SyncNode``) as::

    SyncService(cfg.sync, name=node_name, tables=tables, wall=wall_clock, registry=registry,
                election=election_or_None, advert_interval=longest_vrrp_advert_interval)

``tables`` are the replicated tables (``halb.tables.Tables`` or a list of ``Table``), ``wall``
the wall clock they are written with, ``registry`` the metrics registry (``halb_sync_*``;
None: no metrics), ``election`` what it tells the election (``hooks.ElectionHooks``) and
``advert_interval`` the longest VRRP advert interval (it bounds the start-up hold).

- Memory: a sender never queues per follower; it reads its bounded change log at the
  follower's cursor and keeps at most ``WINDOW`` unacknowledged batches in flight. A follower
  further behind than ``sync.max_backlog`` (or than the log) gets a snapshot instead.
- Fast crash detection: a follower link is one long-lived stream; when it ends (the peer's
  kernel closed the connection, or keepalive gave up) the link calls
  ``election.sync_peer_lost(peer_host)`` at once (and ``sync_peer_dead`` when a probe finds
  the peer's sync port refusing connections), and ``sync_peer_seen`` on reconnect.
- Start: ``election.set_preempt_hold(True)`` until a snapshot from every reachable peer has
  been applied (or 3 advert intervals + 2 s passed with the remaining peers unreachable).
- Reconnects back off with jitter (tenacity), reset after a link that was up.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
from grpc import aio
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from .. import log as hlog
from ..clock import Clock
from ..config import SyncConfig, SyncPeer
from ..tables import Table, Tables
from ..v1 import sync_pb2 as pb
from ..v1 import sync_pb2_grpc as pbg
from . import security
from ..tlsfront import RefusalLog, TLSFront, peer_address, remote_host
from .core import MAX_MESSAGE_BYTES, Kind, OutState, ProtocolError, TableReceiver, TableSender
from .hooks import ElectionHooks
from ..tlstickets import TicketKey, TicketKeys

MAX_TICKET_KEYS = 256  # keys taken from one KIND_TLS_TICKET_KEYS batch

WINDOW = 8  # unacknowledged batches in flight per follower stream
HELLO_TIMEOUT = 5.0  # a follower must say hello within this
# Under a stream of changes the sender waits until this long after its last batch before it
# builds the next, so batches fill up instead of carrying one or two entries each (each gRPC
# message and its ack cost tens of microseconds of Python on both sides: at 5,000 new NAT
# connections/s, 10,000 changes/s, one-entry batches cost each node more CPU than the kernel's
# forwarding). The first change after a quiet spell goes out at once.
COALESCE = 0.001
# The follower acknowledges cumulatively: at once when half the window is unacknowledged (a
# snapshot, a burst), else at most this long after the first unacknowledged batch, so a steady
# stream of small batches costs one ack write per few batches instead of one each. Acks only
# open the sender's window (and feed its lag figures): the entries are applied on receipt.
ACK_DELAY = 0.002
ACK_EVERY = WINDOW // 2
CONNECT_TIMEOUT = 3.0  # dial + TLS + welcome
MAX_BACKOFF = 2.0  # reconnect backoff cap (seconds, random exponential with jitter)
# ... while the peer's host answers "connection refused" (up, but no halbd listening: it is
# restarting): an attempt costs one SYN and its RST, so retry often and the link is back
# within this of the restarted peer's listener, not after the full backoff
REFUSED_BACKOFF = 0.1
HARD_HOLD = 60.0  # never hold preemption longer than this, even for a slow snapshot
KEEPALIVE_MS = 5000  # HTTP/2 pings on idle links; a silent peer is dropped after ~2x this
MAX_SOURCES = 32  # advert source addresses told per welcome (one per VRRP instance)
UNKNOWN = "(unknown)"
PROBE_TIMEOUT = 0.25  # the connect that tells a dead peer process from a live one
PROBE_RETRIES = (0.0, 0.005, 0.01, 0.02, 0.04)  # waits before each probe connect
PROBE_HOLD = 0.02  # an accepted probe that stays open this long shows a live listener


def _common_options() -> list[tuple[str, Any]]:
    return [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
            ("grpc.http2.ping_timeout_ms", KEEPALIVE_MS)]  # an unanswered ping ends the link


def _server_options() -> list[tuple[str, Any]]:
    return _common_options() + [
        ("grpc.so_reuseport", 0),  # a second node on the same port must fail, not share it
        ("grpc.http2.max_ping_strikes", 0),  # the followers' keepalive pings are welcome
    ]


def _channel_options(peer_name: str, tls: bool) -> list[tuple[str, Any]]:
    opts = _common_options() + [
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),
        ("grpc.use_local_subchannel_pool", 1),  # a fresh channel means a fresh connection
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    if tls:
        opts.append(("grpc.ssl_target_name_override", peer_name))
    return opts


def classify_out(msg: str) -> str | None:
    """The reason a connection we made to a peer was refused, from gRPC's error text; None
    when it was not a refusal (nothing listening, a timeout, a cut link)."""
    if "PERMISSION_DENIED" in msg:
        return "refused_by_peer"
    if "Hostname Verification" in msg or "Peer name" in msg or "No match found for server name" in msg:
        return "tls_name_mismatch"
    if "CERTIFICATE_VERIFY_FAILED" in msg:
        return "tls_expired" if "expired" in msg else "tls_unknown_ca"
    if "ALERT" in msg.upper() and "andshake" in msg:
        return "tls_rejected_by_peer"
    if "andshake" in msg or "TSI_" in msg or "WRONG_VERSION" in msg:
        return "tls_handshake_failed"
    return None


def _describe(e: BaseException) -> str:
    if isinstance(e, aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e) or type(e).__name__


_exp_wait = wait_random_exponential(multiplier=0.05, max=MAX_BACKOFF)


def _reconnect_wait(retry_state) -> float:
    """Random exponential backoff up to MAX_BACKOFF; at most REFUSED_BACKOFF while the
    peer's port refuses connections (see REFUSED_BACKOFF)."""
    w = _exp_wait(retry_state)
    exc = retry_state.outcome.exception() if retry_state.outcome is not None else None
    if exc is not None and "onnection refused" in str(exc):
        return min(w, REFUSED_BACKOFF)
    return w


class _NotConnected(Exception):
    """The link never came up (retried with growing backoff)."""


class _WasConnected(Exception):
    """A link that was up broke (reconnect at once, backoff starts over)."""


class Peer:
    """Everything this node knows about one configured peer, kept across its streams."""

    def __init__(self, cfg: SyncPeer, tables: list[Table]):
        self.cfg = cfg
        self.name = cfg.name
        self.host = cfg.address.host
        self.address = str(cfg.address)
        # follower side (we receive its tables)
        self.state = "connecting"
        self.connected = False
        self.last_error = ""
        self.rx = {t.name: TableReceiver(t, cfg.name) for t in tables}
        self.learned = False
        self.attempts = 0
        self.connects = 0
        self.goodbye = False  # its current stream said KIND_GOODBYE: a planned close
        self.disconnects = 0
        self.received_entries = 0
        self.received_bytes = 0
        self.apply_delay = 0.0  # last batch: sent on the peer -> applied here (wall clocks)
        # sender side (it follows our tables)
        self.out = {t.name: OutState() for t in tables}
        self.streams = 0
        self.sent_entries = 0
        self.sent_bytes = 0
        self.sent_batches = 0
        self.snapshots_sent = 0
        self.resumes = 0
        self.refusals = RefusalLog()  # its connections to us ("in"), ours to it ("out")

    @property
    def refused(self) -> int:
        return self.refusals.total

    def refusal(self, direction: str, reason: str, remote: str, detail: str) -> None:
        self.refusals.add(direction, reason, remote, detail)


class _Stream:
    __slots__ = ("batch", "acked", "wake", "closed", "error", "goodbye", "keys", "keys_sent")

    def __init__(self):
        self.batch = 0
        self.acked = 0
        self.wake = asyncio.Event()
        self.closed = False
        self.error = ""
        self.goodbye = False  # say KIND_GOODBYE and end (SyncService.goodbye)
        self.keys = False  # the follower gets our TLS ticket keys (hello asked, link is mTLS)
        self.keys_sent = -1  # TicketKeys.version last sent


class _Servicer(pbg.SyncServicer):
    def __init__(self, svc: "SyncService"):
        self.svc = svc

    async def Follow(self, request_iterator, context):  # noqa: N802 - gRPC method name
        await self.svc._serve(context)


class _Collector:
    """Sync metrics, read from the peers' state at scrape time (nothing on the hot path)."""

    def __init__(self, svc: "SyncService"):
        self.svc = svc

    def describe(self):
        return []

    def collect(self):
        svc = self.svc
        now = svc._now()
        g = {k: GaugeMetricFamily(f"halb_sync_{k}", h, labels=["peer"]) for k, h in (
            ("peer_connected", "1 while our follower link to the peer streams"),
            ("lag_entries", "Our change-log records the peer has not acknowledged"),
            ("lag_seconds", "Age of the oldest change the peer has not acknowledged"),
            ("apply_delay_seconds", "Last batch from the peer: sent there -> applied here"))}
        c = {k: CounterMetricFamily(f"halb_sync_{k}", h, labels=["peer"]) for k, h in (
            ("refused", "Connections refused (bad certificate or name, unknown peer)"),
            ("sent_entries", "Entries sent to the peer"),
            ("sent_bytes", "Bytes of batches sent to the peer"),
            ("received_entries", "Entries received from the peer"),
            ("received_bytes", "Bytes of batches received from the peer"),
            ("applied_entries", "Received entries that changed our tables"),
            ("snapshots_sent", "Snapshots sent to the peer"),
            ("snapshots_received", "Snapshots received from the peer"))}
        for p in svc.peers.values():
            lab = [p.name]
            g["peer_connected"].add_metric(lab, 1 if p.connected else 0)
            g["lag_entries"].add_metric(lab, svc._lag(p))
            g["lag_seconds"].add_metric(lab, svc._lag_seconds(p, now))
            g["apply_delay_seconds"].add_metric(lab, p.apply_delay)
            c["refused"].add_metric(lab, p.refused)
            c["sent_entries"].add_metric(lab, p.sent_entries)
            c["sent_bytes"].add_metric(lab, p.sent_bytes)
            c["received_entries"].add_metric(lab, p.received_entries)
            c["received_bytes"].add_metric(lab, p.received_bytes)
            c["applied_entries"].add_metric(lab, sum(r.applied for r in p.rx.values()))
            c["snapshots_sent"].add_metric(lab, p.snapshots_sent)
            c["snapshots_received"].add_metric(lab, sum(r.snapshots for r in p.rx.values()))
        c["refused"].add_metric([UNKNOWN], svc.unknown.refused)
        rf = CounterMetricFamily("halb_sync_refusals", "Refused connections and TLS handshakes, "
                                 "by peer, direction (in: to our sync port; out: ours to the "
                                 "peer) and reason", labels=["peer", "direction", "reason"])
        for p in list(svc.peers.values()) + [svc.unknown]:
            for (d, rsn), n in p.refusals.by_reason().items():
                rf.add_metric([p.name, d, rsn], n)
        yield rf
        ready = GaugeMetricFamily("halb_sync_ready", "1 once the tables were learned from the peers")
        ready.add_metric([], 1 if svc.ready else 0)
        yield from g.values()
        yield from c.values()
        yield ready


class SyncService:
    def __init__(self, cfg: SyncConfig, *, name: str, tables: list[Table] | Tables, wall: Clock,
                 registry: CollectorRegistry | None, election: ElectionHooks | None,
                 advert_interval: float, tickets: TicketKeys | None = None):
        self.cfg = cfg
        # the HTTPS listeners' TLS ticket keys (halb.tlstickets): ours go to the followers
        # and theirs come in, over mutual TLS only (keys are secrets)
        self.tickets = tickets
        self.name = name
        self.tables: list[Table] = list(tables)
        self.wall = wall
        self.registry = registry
        self.election = election
        self.advert_interval = advert_interval
        self.log = hlog.get_logger("sync")
        self.peers: dict[str, Peer] = {p.name: Peer(p, self.tables) for p in cfg.peers}
        # refusals that name no configured peer (connections from other addresses)
        self.unknown = Peer(SyncPeer(UNKNOWN, cfg.listen), [])
        self._front: TLSFront | None = None
        self.ready = not self.peers
        self.port = 0
        self._tls: security.TLSMaterial | None = None
        self._streams: set[_Stream] = set()
        self._server: aio.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._probes: set[asyncio.Task] = set()
        self._progress = asyncio.Event()
        self._collector: _Collector | None = None
        self._stopping = False
        self._held = False
        self._wake_pending = False

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._progress = asyncio.Event()
        if self.cfg.tls:
            self._tls = security.load(self.cfg.tls)
        else:
            self.log.warning("sync_insecure", reason="no [sync.tls]: peers are not authenticated "
                             "and table contents travel in plaintext")
        for t in self.tables:
            t.listeners.append(self._on_change)
        if self.tickets is not None:
            if self._tls is not None:
                self.tickets.on_change.append(self._wake_streams)
            elif self.tickets.rings:
                self.log.warning("tls_ticket_keys_not_shared", reason="[sync] has no [sync.tls]: "
                                 "TLS ticket keys travel only over mutual TLS; sessions resume "
                                 "only on the node that made their ticket")
        server = aio.server(options=_server_options(),
                            maximum_concurrent_rpcs=4 * len(self.peers) + 4)
        pbg.add_SyncServicer_to_server(_Servicer(self), server)
        addr = str(self.cfg.listen)
        try:
            # with TLS, gRPC listens in plaintext on loopback behind the TLS front (tlsfront)
            port = server.add_insecure_port("127.0.0.1:0" if self._tls else addr)
        except RuntimeError as e:
            raise OSError(f"sync.listen {addr}: cannot listen: {e}") from None
        if not port:
            raise OSError(f"sync.listen {addr}: cannot listen (address in use or not local)")
        await server.start()
        self._server = server
        if self._tls and self.cfg.tls:
            self._front = TLSFront(self.cfg.tls, self._refused_in)
            try:
                port = await self._front.start(self.cfg.listen.host, self.cfg.listen.port, port)
            except OSError as e:
                await server.stop(grace=None)
                self._server = None
                raise OSError(f"sync.listen {addr}: cannot listen: {e.strerror or e}") from None
        self.port = port
        if self.registry is not None:
            self._collector = _Collector(self)
            self.registry.register(self._collector)
        if self.peers:
            self._hold(True)
        for p in self.peers.values():
            self._tasks.append(asyncio.create_task(self._link(p), name=f"sync-link-{p.name}"))
        self._tasks.append(asyncio.create_task(self._learn(), name="sync-learn"))
        self.log.info("sync_started", listen=addr, port=port, tls=bool(self._tls),
                      peers=[f"{p.name}@{p.address}" for p in self.peers.values()])

    async def goodbye(self, timeout: float = 1.0) -> None:
        """Tells every follower that this node stops on purpose and a successor takes the
        port over (``halbctl upgrade``), so none of them arms a fast takeover; returns once
        the goodbyes are written (bounded by ``timeout``)."""
        streams = list(self._streams)
        for st in streams:
            st.goodbye = True
            st.wake.set()
        deadline = asyncio.get_running_loop().time() + timeout
        while any(st in self._streams for st in streams) and \
                asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stopping = True
        for t in list(self._probes):
            t.cancel()
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for t in self.tables:
            if self._on_change in t.listeners:
                t.listeners.remove(self._on_change)
        if self.tickets is not None and self._wake_streams in self.tickets.on_change:
            self.tickets.on_change.remove(self._wake_streams)
        for st in list(self._streams):
            st.closed = True
            st.wake.set()
        if self._front is not None:
            await self._front.stop()
            self._front = None
        if self._server is not None:
            await self._server.stop(grace=0.2)
            self._server = None
        if self._collector is not None and self.registry is not None:
            try:
                self.registry.unregister(self._collector)
            except KeyError:
                pass
            self._collector = None

    # -- public read side ---------------------------------------------------------------------

    def status(self) -> list[dict]:
        now = self._now()
        out = []
        for p in self.peers.values():
            out.append({
                "name": p.name,
                "address": p.address,
                "connected": p.connected,
                "state": p.state,
                "lag_entries": self._lag(p),
                "lag_seconds": round(self._lag_seconds(p, now), 3),
                "acked_seq": sum(o.seq for t in self.tables
                                 if (o := p.out[t.name]).epoch == t.epoch),
                "epoch": p.rx[self.tables[0].name].epoch,
                "last_error": p.last_error,
                "refused": p.refused,
                "refused_in": p.refusals.refused_in,
                "refused_out": p.refusals.refused_out,
                "refusals": p.refusals.as_list(),
                "tables": {t.name: {"acked_seq": p.out[t.name].seq if p.out[t.name].epoch == t.epoch else 0,
                                    "lag_entries": p.out[t.name].lag(t),
                                    "peer_epoch": p.rx[t.name].epoch,
                                    "peer_seq": p.rx[t.name].seq,
                                    "applied": p.rx[t.name].applied}
                           for t in self.tables},
                "sent_entries": p.sent_entries,
                "received_entries": p.received_entries,
                "snapshots_sent": p.snapshots_sent,
                "resumes": p.resumes,
            })
        u = self.unknown
        if u.refused:
            out.append({"name": UNKNOWN, "address": "", "connected": False, "state": "down",
                        "lag_entries": 0, "lag_seconds": 0.0, "acked_seq": 0, "epoch": 0,
                        "last_error": "connections from nodes not in sync.peers",
                        "refused": u.refused, "refused_in": u.refusals.refused_in,
                        "refused_out": 0, "refusals": u.refusals.as_list()})
        return out

    # -- helpers ------------------------------------------------------------------------------

    def _now(self) -> float:
        return self.wall.now()

    def _lag(self, p: Peer) -> int:
        return sum(p.out[t.name].lag(t) for t in self.tables)

    def _lag_seconds(self, p: Peer, now: float) -> float:
        return max((p.out[t.name].lag_seconds(t, now) for t in self.tables), default=0.0)

    def _on_change(self, _change) -> None:
        # once per loop turn, however many changes a turn makes
        if not self._wake_pending and self._streams:
            self._wake_pending = True
            try:
                asyncio.get_running_loop().call_soon(self._wake_streams)
            except RuntimeError:  # a write from outside the loop (a test thread): wake now
                self._wake_streams()

    def _wake_streams(self) -> None:
        self._wake_pending = False
        for st in self._streams:
            st.wake.set()

    def _election(self) -> ElectionHooks | None:
        return None if self._stopping else self.election

    def _advert_sources(self) -> list[str]:
        el = self._election()
        if el is None:
            return []
        try:
            return [a for a in el.advert_sources() if a][:MAX_SOURCES]
        except Exception:  # noqa: BLE001 - e.g. a test's election recorder without it
            return []

    def _hold(self, hold: bool) -> None:
        el = self._election()
        if el is None:
            return
        try:
            el.set_preempt_hold(hold)
            self._held = hold
        except Exception:  # the election must not break sync (nor the other way round)
            self.log.exception("preempt_hold_failed", hold=hold)

    def _peer_event(self, p: Peer, up: bool) -> None:
        el = self._election()
        if el is None or not self.cfg.fast_takeover:
            return
        try:
            if up:
                el.sync_peer_seen(p.host)
            else:
                el.sync_peer_lost(p.host)
                t = asyncio.get_running_loop().create_task(self._probe(p, el))
                self._probes.add(t)
                t.add_done_callback(self._probes.discard)
        except Exception:
            self.log.exception("election_notify_failed", peer=p.name, up=up)

    async def _probe(self, p: Peer, el: ElectionHooks) -> None:
        """Connects to the peer's sync port right after its stream closed. Refused (RST)
        means its kernel is up and no halbd listens: the process is gone, and the election
        may take over at once. A dying process's kernel closes its streams a moment before its
        listening socket, so an accepted connection that is reset or closed at once is probed
        again; one that stays open proves a live process, and silence proves nothing (a cut
        link): the election then waits for the next advert to be late, or for the VRRP
        timers. Bounded: a few connects within about 100 ms."""
        host, port = p.cfg.address.host, p.cfg.address.port
        for delay in PROBE_RETRIES:
            await asyncio.sleep(delay)
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_TIMEOUT)
            except ConnectionRefusedError:
                self.log.info("sync_peer_dead", peer=p.name, reason="sync port refuses connections")
                try:
                    el.sync_peer_dead(p.host)
                except Exception:
                    self.log.exception("election_notify_failed", peer=p.name, up=False)
                return
            except (OSError, asyncio.TimeoutError) as e:
                self.log.info("sync_peer_probe", peer=p.name, result=type(e).__name__)
                return
            try:
                first = await asyncio.wait_for(r.read(1), PROBE_HOLD)
            except asyncio.TimeoutError:
                first = None  # stays open: a live listener
            except OSError:
                first = b""  # reset: the listener went away under us
            w.close()
            if first != b"":
                self.log.info("sync_peer_probe", peer=p.name, result="alive")
                return
        self.log.info("sync_peer_probe", peer=p.name, result="inconclusive")

    # -- start-up learning --------------------------------------------------------------------

    async def _learn(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        soft = 3 * self.advert_interval + 2.0
        reason = "learned"
        while True:
            pending = [p for p in self.peers.values() if not p.learned]
            if not pending:
                break
            waited = loop.time() - t0
            if waited >= HARD_HOLD:
                reason = "hard timeout"
                break
            if waited >= soft and not any(p.connected for p in pending):
                reason = "timeout"
                break
            self._progress.clear()
            wait = (soft - waited) if waited < soft else (HARD_HOLD - waited)
            try:
                await asyncio.wait_for(self._progress.wait(), max(0.01, wait))
            except asyncio.TimeoutError:
                pass
        self.ready = True
        self._hold(False)
        self.log.info("sync_ready", reason=reason, waited=round(loop.time() - t0, 3),
                      learned=[p.name for p in self.peers.values() if p.learned],
                      unreachable=[p.name for p in self.peers.values() if not p.learned])

    # -- sender side: a peer follows our tables -----------------------------------------------

    @property
    def refused_unknown(self) -> int:
        return self.unknown.refused

    def _remote(self, context) -> str:
        if self._front is not None:
            ident = self._front.identity(context.peer())
            if ident is not None:
                return ident[0]
        return peer_address(context.peer())

    def _refused_in(self, remote: str, reason: str, detail: str, name: str | None = None) -> None:
        """A connection to our sync port refused: counted for the configured peer its hello
        names (``name``; "" when the name is not to be trusted), or, for a refused TLS
        handshake (``name`` None: no hello yet), the peer whose address it comes from; else
        for (unknown). Logged in halb's format."""
        host = remote_host(remote)
        if name is None:
            p = next((x for x in self.peers.values() if x.host == host), self.unknown)
        else:
            p = self.peers.get(name, self.unknown) if name else self.unknown
        p.refusal("in", reason, remote, detail)
        self.log.warning("sync_refused", direction="in", peer=p.name, remote=remote,
                         follower=name or None, reason=reason, detail=detail)

    def _identity_problem(self, name: str, context) -> tuple[str, str]:
        if self._front is not None:
            ident = self._front.identity(context.peer())
            if ident is None:
                return "not_via_tls", "a plaintext connection to the internal port"
        if name not in self.peers:
            return "not_a_peer", f"node {name!r} is not in sync.peers"
        if self._front is not None:
            names = ident[1]
            if name not in names:
                return "identity_mismatch", (f"hello names {name!r} but the certificate names "
                                             f"{sorted(names)}")
        return "", ""

    async def _serve(self, context) -> None:
        try:
            first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT)
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello")
            return
        if first is aio.EOF or first.WhichOneof("msg") != "hello" or not first.hello.node:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the first message must be a hello naming the node")
            return
        hello = first.hello
        reason, problem = self._identity_problem(hello.node, context)
        if problem:
            # a good certificate but the wrong node (or a node we do not know): counted for
            # the node the hello names when it is a peer, never for one it merely claims
            named = hello.node if reason != "identity_mismatch" else ""
            self._refused_in(self._remote(context), reason, problem, named)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, problem)
            return
        await self._stream_to(self.peers[hello.node], hello, context)

    async def _stream_to(self, p: Peer, hello: pb.SyncHello, context) -> None:
        cursors = {c.table: c for c in hello.cursors}
        senders: dict[str, TableSender] = {}
        how = {}
        for t in self.tables:
            s = TableSender(t, self.name, batch_size=self.cfg.batch_size,
                            max_backlog=self.cfg.max_backlog, out=p.out[t.name])
            c = cursors.get(t.name)
            how[t.name] = s.start(c.epoch, c.seq) if c is not None else s.start(0, 0)
            senders[t.name] = s
        p.resumes += sum(1 for v in how.values() if v == "resume")
        st = _Stream()
        # keys only to a follower that asked, over our TLS front (mutually authenticated)
        st.keys = bool(hello.tls_ticket_keys) and self._front is not None \
            and self.tickets is not None
        self._streams.add(st)
        p.streams += 1
        self.log.info("sync_follower", peer=p.name, remote=self._remote(context), tables=how)
        reader = asyncio.create_task(self._read_acks(p, context, senders, st))
        try:
            await context.write(pb.SyncBatch(kind=Kind.KIND_WELCOME, node=self.name,
                                             sent=self._now(),
                                             vrrp_sources=self._advert_sources()))
            order = list(senders.values())
            loop = asyncio.get_running_loop()
            last_write = 0.0
            while not st.closed:
                st.wake.clear()
                if st.goodbye:
                    await context.write(pb.SyncBatch(kind=Kind.KIND_GOODBYE, node=self.name,
                                                     sent=self._now()))
                    break
                if st.keys and st.keys_sent != self.tickets.version:
                    st.keys_sent = self.tickets.version
                    await context.write(self._keys_batch())
                for s in order:
                    while st.batch - st.acked < WINDOW and not st.closed:
                        b = s.next_batch(self._now())
                        if b is None:
                            break
                        st.batch += 1
                        b.batch = st.batch
                        if b.kind == Kind.KIND_SNAPSHOT_BEGIN:
                            p.snapshots_sent += 1
                        await context.write(b)
                        last_write = loop.time()
                        p.sent_batches += 1
                        p.sent_entries += len(b.entries.keys)
                        p.sent_bytes += b.ByteSize()
                if st.closed:
                    break
                await st.wake.wait()
                wait = last_write + COALESCE - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
        finally:
            reader.cancel()
            self._streams.discard(st)
            p.streams -= 1
            self.log.info("sync_follower_gone", peer=p.name, error=st.error, batches=st.batch)

    def _keys_batch(self) -> pb.SyncBatch:
        assert self.tickets is not None
        keys = [pb.TLSTicketKey(listener=n, name=k.name, aes=k.aes, hmac=k.hmac,
                                created=k.created, expires=k.expires)
                for n, k in self.tickets.export(self._now())[:MAX_TICKET_KEYS]]
        return pb.SyncBatch(kind=Kind.KIND_TLS_TICKET_KEYS, node=self.name, sent=self._now(),
                            ticket_keys=keys)

    def _learn_keys(self, p: Peer, b: pb.SyncBatch) -> None:
        if self.tickets is None or self._tls is None:
            return  # never asked for (a plaintext link): ignored
        now = self._now()
        keys = [(k.listener, TicketKey(bytes(k.name), bytes(k.aes), bytes(k.hmac),
                                       float(k.created), float(k.expires)))
                for k in list(b.ticket_keys)[:MAX_TICKET_KEYS]]
        n = self.tickets.learn(p.name, keys, now)
        self.log.info("tls_ticket_keys_received", peer=p.name, sent=len(b.ticket_keys), kept=n)

    async def _read_acks(self, p: Peer, context, senders: dict[str, TableSender],
                         st: _Stream) -> None:
        try:
            while True:
                req = await context.read()
                if req is aio.EOF:
                    break
                if req.WhichOneof("msg") != "ack":
                    raise ProtocolError("only acks may follow the hello")
                a = req.ack
                if a.batch > st.batch:
                    raise ProtocolError(f"ack for batch {a.batch}, only {st.batch} sent")
                if a.batch > st.acked:
                    st.acked = a.batch
                for c in a.cursors:
                    s = senders.get(c.table)
                    if s is not None:
                        s.ack(c.epoch, c.seq)
                st.wake.set()
        except ProtocolError as e:
            st.error = str(e)
            self.log.warning("sync_protocol_error", peer=p.name, error=str(e))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the stream is gone; the writer stops
            st.error = _describe(e)
        finally:
            st.closed = True
            st.wake.set()

    # -- follower side: we follow a peer's tables ---------------------------------------------

    async def _link(self, p: Peer) -> None:
        while True:
            try:
                async for attempt in AsyncRetrying(
                        wait=_reconnect_wait,
                        retry=retry_if_exception_type(_NotConnected), reraise=True):
                    with attempt:
                        await self._follow(p)
            except _WasConnected:
                await asyncio.sleep(random.uniform(0.0, 0.05))
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the link for good
                self.log.exception("sync_link_failed", peer=p.name)
                await asyncio.sleep(1.0)

    def _channel(self, p: Peer) -> aio.Channel:
        opts = _channel_options(p.name, self._tls is not None)
        if self._tls is not None:
            return aio.secure_channel(p.address, security.channel_credentials(self._tls), opts)
        return aio.insecure_channel(p.address, opts)

    async def _follow(self, p: Peer) -> None:
        p.attempts += 1
        p.state = "connecting"
        ch = self._channel(p)
        try:
            call = pbg.SyncStub(ch).Follow(wait_for_ready=False)
            for r in p.rx.values():
                r.reset_stream()
            hello = pb.SyncHello(node=self.name, cursors=[r.cursor() for r in p.rx.values()],
                                 tls_ticket_keys=self._tls is not None
                                 and self.tickets is not None)
            try:
                await call.write(pb.FollowRequest(hello=hello))
                first = await asyncio.wait_for(call.read(), CONNECT_TIMEOUT)
            except asyncio.TimeoutError:
                call.cancel()
                self._not_connected(p, f"no answer from {p.address} within {CONNECT_TIMEOUT}s")
            except (aio.AioRpcError, aio.UsageError, grpc.RpcError) as e:
                msg = _describe(e)
                reason = classify_out(msg)
                if reason is not None:
                    p.refusal("out", reason, p.address, msg[-300:])
                    if msg != p.last_error:
                        self.log.warning("sync_refused", direction="out", peer=p.name,
                                         remote=p.address, reason=reason, detail=msg[-300:])
                self._not_connected(p, msg)
            if first is aio.EOF:
                self._not_connected(p, "stream closed before the welcome")
            if first.kind != Kind.KIND_WELCOME or first.node != p.name:
                call.cancel()
                self._not_connected(p, f"{p.address} answered as node {first.node!r}, "
                                       f"expected {p.name!r}")
            el = self._election()
            if el is not None and first.vrrp_sources:
                try:
                    el.sync_peer_sources(p.host, list(first.vrrp_sources)[:MAX_SOURCES])
                except Exception:  # the election must not break sync
                    self.log.exception("election_notify_failed", peer=p.name, up=True)
            await self._stream_from(p, call)
        finally:
            await ch.close(grace=None)

    def _not_connected(self, p: Peer, why: str) -> None:
        p.state = "down"
        if why != p.last_error:
            self.log.warning("sync_connect_failed", peer=p.name, address=p.address, error=why)
        p.last_error = why
        self._progress.set()
        raise _NotConnected(why)

    async def _stream_from(self, p: Peer, call) -> None:
        p.connected = True
        p.state = "streaming"
        p.last_error = ""
        p.connects += 1
        self._peer_event(p, True)
        self._progress.set()
        self.log.info("sync_connected", peer=p.name, address=p.address)
        why = "stream closed by the peer"
        rx = p.rx
        acked = {"want": 0, "done": 0, "waiting": False}
        ack_ev = asyncio.Event()
        loop = asyncio.get_running_loop()

        async def acker():  # acks off the read path; a backlog of them collapses into one
            while True:
                await ack_ev.wait()
                ack_ev.clear()
                if acked["want"] - acked["done"] < ACK_EVERY:
                    # the next batches share this ack: woken by ACK_DELAY, or by the reader
                    # once half the window is unacknowledged
                    acked["waiting"] = True
                    h = loop.call_later(ACK_DELAY, ack_ev.set)
                    await ack_ev.wait()
                    ack_ev.clear()
                    h.cancel()
                    acked["waiting"] = False
                n = acked["want"]
                if n > acked["done"]:
                    await call.write(pb.FollowRequest(ack=pb.SyncAck(
                        batch=n, cursors=[x.cursor() for x in rx.values()])))
                    acked["done"] = n
        ack_task = asyncio.create_task(acker())
        try:
            while True:
                b = await call.read()
                if b is aio.EOF:
                    break
                if b.kind == Kind.KIND_GOODBYE:
                    p.goodbye = True
                    why = "the peer hands over to its upgraded process"
                    break
                if b.kind == Kind.KIND_TLS_TICKET_KEYS:
                    self._learn_keys(p, b)
                    continue
                r = rx.get(b.table)
                if r is None:
                    raise ProtocolError(f"unknown table {b.table!r}")
                r.handle(b)
                p.received_entries += len(b.entries.keys)
                p.received_bytes += b.ByteSize()
                if b.sent:
                    p.apply_delay = max(0.0, self._now() - b.sent)
                snap = any(x.in_snapshot for x in rx.values())
                p.state = "snapshot" if snap else "streaming"
                acked["want"] = b.batch
                if not acked["waiting"] or b.batch - acked["done"] >= ACK_EVERY:
                    ack_ev.set()
                if ack_task.done():  # its write failed: the stream is gone
                    ack_task.result()
                if not p.learned and all(x.learned for x in rx.values()):
                    p.learned = True
                    self._progress.set()
                    self.log.info("sync_learned", peer=p.name,
                                  tables={n: x.seq for n, x in rx.items()})
        except ProtocolError as e:
            why = f"protocol error: {e}"
            call.cancel()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - gRPC errors: the stream is gone
            why = _describe(e)
        finally:
            ack_task.cancel()
            p.disconnects += 1
            p.connected = False
            p.state = "down"
            if p.goodbye:  # a planned close: no fast takeover (its successor is coming)
                p.goodbye = False
                self.log.info("sync_peer_upgrading", peer=p.name)
            else:
                self._peer_event(p, False)
            self._progress.set()
        p.last_error = why
        self.log.warning("sync_disconnected", peer=p.name, address=p.address, error=why)
        raise _WasConnected(why)
