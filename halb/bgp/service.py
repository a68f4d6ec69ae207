"""``[bgp]``'s edge: runs ``halb.bgp.core`` against the node's speaker (``halb.bgp.frr``).

    bgp = BgpService(cfg.bgp, vips={"198.51.100.10": ("web",)}, pools=pools,
                     ready=lambda: node_started and sync_ready, clock=clock, registry=registry)
    pool.on_change -> bgp.poke()         # a pool lost its last backend: withdraw now
    await bgp.start() / await bgp.leave() / await bgp.join() / await bgp.stop()

Started last and stopped first by the node: nothing is announced before the listeners and
NAT rules are up, and a stop withdraws every VIP and waits ``withdraw_wait`` (the router moves
the flows to the other nodes) before any listener closes. At start every configured VIP is
withdrawn once (a halbd killed with -9 may have left announcements in the speaker).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Callable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .. import log as hlog
from ..clock import Clock
from ..config import BgpConfig
from .core import Announce, BgpCore, prefix_of
from .frr import Frr, SpeakerError

log = hlog.get_logger("bgp")
LEAVE_TRIES = 5  # withdrawal attempts before drain-node replies (each bounded by command_timeout)
POLL_MIN = 1.0  # the sessions are read at most this often (one vtysh run each)


class BgpService:
    def __init__(self, cfg: BgpConfig, *, vips: Mapping[str, tuple[str, ...]],
                 pools: Mapping[str, Any], ready: Callable[[], bool], clock: Clock,
                 registry=None, speaker: Any = None):
        self.cfg = cfg
        self.pools = pools
        self.ready = ready
        self.clock = clock
        self.speaker = speaker or Frr(cfg)
        self.core = BgpCore(vips, announce_delay=cfg.announce_delay)
        self.sessions: list[dict] = []
        self.speaker_error = ""
        self._poke: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._last_resync = 0.0
        self._lock = asyncio.Lock()
        self._last_failure = ""
        if registry is not None:
            registry.register(_Collector(self))

    def healthy(self) -> dict[str, bool]:
        return {name: len(p.view) > 0 for name, p in self.pools.items()}

    def set_vips(self, vips: Mapping[str, tuple[str, ...]]) -> None:
        """A reload changed the listeners (their addresses or pools): the VIPs and the pools
        that keep each one announced, from now on; a VIP no longer served is withdrawn at the
        next step, a new one announced."""
        self.core.set_vips(vips)
        log.info("bgp_vips", vips=sorted(self.core.vips))
        self.poke()

    def poke(self) -> None:
        if self._poke is not None:
            self._poke.set()

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._poke = asyncio.Event()
        # whatever a killed halbd left in the speaker goes first (withdrawing what is not
        # there is a no-op)
        self.core.forget()
        self._last_resync = self.clock.now()
        self._task = asyncio.create_task(self._run(), name="bgp")
        log.info("bgp_started", speaker=self.cfg.speaker, asn=self.cfg.asn,
                 vips=sorted(self.core.vips))

    async def stop(self) -> None:
        if self._task is None:
            return
        withdrawn = await self.leave()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        self._task = None
        log.info("bgp_stopped", withdrawn=withdrawn)

    async def release(self) -> None:
        """An upgrade: the new process drives the speaker now; this one stops without
        withdrawing anything."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        log.info("bgp_released", announced=sorted(self.core.announced))

    async def leave(self, wait: float | None = None) -> list[str]:
        """Withdraws every VIP, then waits ``wait`` (default ``withdraw_wait``) for the router
        to move the flows elsewhere. Returns the prefixes withdrawn."""
        was = sorted(self.core.announced)
        self.core.leave()
        for _ in range(LEAVE_TRIES):  # a failed withdrawal (vtysh crashed) is tried again now
            await self.step()
            if not self.core.announced and not self.core.unknown:
                break
            await asyncio.sleep(0.1)
        left = [p for p in was if p not in self.core.announced]
        log.info("bgp_leaving", withdrawn=left, still=sorted(self.core.announced))
        if left or wait is not None:  # nothing was announced (a stop after drain-node): no wait
            await asyncio.sleep(self.cfg.withdraw_wait if wait is None else max(0.0, wait))
        return left

    async def join(self) -> list[str]:
        self.core.join()
        await self.step()
        return sorted(self.core.announced)

    # -- the loop ------------------------------------------------------------------------------

    async def step(self) -> None:
        async with self._lock:
            now = self.clock.now()
            if now - self._last_resync >= self.cfg.resync_interval:
                self._last_resync = now
                self.core.forget()  # the speaker may have restarted: tell it again
            cmds = self.core.step(now, ready=bool(self.ready()), healthy=self.healthy())
            for i, c in enumerate(cmds):
                try:
                    if isinstance(c, Announce):
                        await self.speaker.announce(c.prefix)
                    else:
                        await self.speaker.withdraw(c.prefix)
                except SpeakerError as e:
                    self.core.done(c, False)
                    if str(e) != self._last_failure:  # retried every interval: logged once
                        log.error("bgp_command_failed", command=type(c).__name__.lower(),
                                  prefix=c.prefix, error=str(e), hint="retried every interval")
                    self._last_failure = self.speaker_error = str(e)
                    continue
                except BaseException:  # cancelled (drain-node's caller gone) or a bug: this
                    for rest in cmds[i:]:  # command and those after it are not in flight any
                        self.core.done(rest, False)  # more; the next step sends them again
                    raise
                self._last_failure = ""
                if self.core.done(c, True) and c.prefix in (prefix_of(v) for v in self.core.vips):
                    log.info("bgp_announced" if isinstance(c, Announce) else "bgp_withdrawn",
                             prefix=c.prefix,
                             reason=self.core.reasons.get(c.prefix.rsplit("/", 1)[0], ""))

    async def _poll(self) -> None:
        try:
            async with self._lock:  # one vtysh at a time (two at once crashed vtysh 8.4 once)
                self.sessions = await self.speaker.sessions()
            self.speaker_error = ""
        except SpeakerError as e:
            if self.speaker_error != str(e):
                log.error("bgp_speaker_unreachable", error=str(e))
            self.speaker_error = str(e)
            self.sessions = []

    async def _run(self) -> None:
        assert self._poke is not None
        polled = -1e9
        while True:
            try:
                await self.step()
                now = self.clock.now()
                if now - polled >= max(self.cfg.interval, POLL_MIN):
                    polled = now
                    await self._poll()
            except Exception:
                log.exception("bgp_step_failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.cfg.interval)
            self._poke.clear()

    # -- reading -------------------------------------------------------------------------------

    def status(self) -> dict:
        return {
            "speaker": self.cfg.speaker, "asn": self.cfg.asn, "leaving": self.core.leaving,
            "speaker_error": self.speaker_error,
            "vips": [{"vip": v, "prefix": prefix_of(v), "announced": prefix_of(v) in self.core.announced,
                      "reason": self.core.reasons.get(v, "not evaluated yet"),
                      "pools": list(p)} for v, p in sorted(self.core.vips.items())],
            "sessions": list(self.sessions),
            "counts": dict(self.core.counts),
        }


class _Collector(Collector):
    def __init__(self, svc: BgpService):
        self.svc = svc

    def collect(self):
        s = self.svc
        c = s.core.counts
        for name, key, doc in (
                ("halb_bgp_announcements", "announcements", "VIP announcements made to the speaker"),
                ("halb_bgp_withdrawals", "withdrawals", "VIP withdrawals made to the speaker"),
                ("halb_bgp_command_failures", "failures", "speaker commands that failed (retried)")):
            m = CounterMetricFamily(name, doc)
            m.add_metric([], c[key])
            yield m
        a = GaugeMetricFamily("halb_bgp_announced", "1 while the VIP is announced", labels=["vip"])
        for v in sorted(s.core.vips):
            a.add_metric([v], 1 if prefix_of(v) in s.core.announced else 0)
        yield a
        g = GaugeMetricFamily("halb_bgp_leaving", "1 after drain-node (or during a stop)")
        g.add_metric([], 1 if s.core.leaving else 0)
        yield g
        up = GaugeMetricFamily("halb_bgp_session_up",
                               "1 while the BGP session with the peer is Established",
                               labels=["peer"])
        bfd = GaugeMetricFamily("halb_bgp_bfd_up", "1 while the BFD session with the peer is up "
                                "(absent without BFD)", labels=["peer"])
        for r in s.sessions:
            up.add_metric([r["peer"]], 1 if r["state"] == "Established" else 0)
            if r["bfd"]:
                bfd.add_metric([r["peer"]], 1 if r["bfd"] == "up" else 0)
        yield up
        yield bfd
        sp = GaugeMetricFamily("halb_bgp_speaker_up", "1 while the speaker answers (vtysh)")
        sp.add_metric([], 0 if s.speaker_error else 1)
        yield sp
