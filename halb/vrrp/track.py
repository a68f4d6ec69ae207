"""Tracked objects that lower an instance's priority or force it into Fault, as keepalived does.

A tracker is checked every ``interval`` seconds; a verdict changes after ``fall`` failures in
a row (ok -> failed) or ``rise`` successes in a row (failed -> ok). The first check decides at
once. The verdicts of one instance's trackers combine (``combine``) into:

- ``fault``: some tracker with weight 0 has failed;
- ``delta``: the sum of positive weights of trackers that are ok plus the (negative) weights of
  trackers that have failed (keepalived's rule), added to the configured priority by the FSM.

Kinds: ``interface`` (link admin up with carrier, via netlink), ``pool`` (at least ``min_up``
non-backup backends up in ``pools[pool]``, the node's pools the election is given), ``script``
(a shell command exits 0 within ``timeout``; it runs without blocking the loop and is killed on
timeout).
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Mapping

from ..config import TrackConfig

if TYPE_CHECKING:  # pragma: no cover
    from ..clock import Clock
    from ..model import Pool


@dataclass
class Verdict:
    """The rise/fall filter of one tracker (pure)."""

    rise: int = 1
    fall: int = 1
    ok: bool | None = None  # None: not checked yet
    run: int = 0  # consecutive results contradicting ``ok``
    detail: str = ""

    def observe(self, result: bool, detail: str = "") -> bool:
        """Feeds one check result; returns True when the verdict changed."""
        self.detail = detail
        if self.ok is None:
            self.ok = result
            self.run = 0
            return True
        if result == self.ok:
            self.run = 0
            return False
        self.run += 1
        if self.run >= (self.rise if result else self.fall):
            self.ok = result
            self.run = 0
            return True
        return False


def combine(items: Iterable[tuple[int, bool | None]]) -> tuple[bool, int]:
    """(weight, ok) pairs -> (fault, priority delta). Unchecked trackers count as ok."""
    fault, delta = False, 0
    for weight, ok in items:
        good = ok is not False
        if weight == 0:
            fault = fault or not good
        elif weight > 0 and good:
            delta += weight
        elif weight < 0 and not good:
            delta += weight
    return fault, delta


async def run_script(command: str, timeout: float) -> tuple[bool, str]:
    """Runs ``command`` in a shell; (exit status 0, detail). Killed (its group) on timeout."""
    try:
        proc = await asyncio.create_subprocess_shell(
            command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    except OSError as e:
        return False, f"cannot run: {e}"
    try:
        rc = await asyncio.wait_for(proc.wait(), timeout)
    except asyncio.TimeoutError:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await proc.wait()
        return False, f"timed out after {timeout}s"
    except asyncio.CancelledError:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise
    return rc == 0, f"exit status {rc}"


class Tracker:
    """One tracked object: ``check()`` gives (ok, detail); the verdict filters it."""

    def __init__(self, cfg: TrackConfig, check: Callable[[], Awaitable[tuple[bool, str]]]):
        self.cfg = cfg
        self.check = check
        self.verdict = Verdict(rise=cfg.rise, fall=cfg.fall)

    @property
    def name(self) -> str:
        c = self.cfg
        return {"interface": f"interface:{c.interface}", "pool": f"pool:{c.pool}",
                "script": f"script:{c.command}"}[c.type]

    @property
    def weight(self) -> int:
        return self.cfg.weight

    @property
    def ok(self) -> bool | None:
        return self.verdict.ok

    async def poll(self) -> bool:
        """Runs one check; returns True when the verdict changed."""
        try:
            ok, detail = await self.check()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken check is a failed check
            ok, detail = False, f"check failed: {e!r}"
        return self.verdict.observe(ok, detail)


def make_tracker(cfg: TrackConfig, *, pools: Mapping[str, Pool], clock: Clock,
                 netlink: Any) -> Tracker:
    """Builds the check for one ``[[vrrp.track]]`` entry: ``pools`` (name -> Pool) and the
    monotonic ``clock`` for type pool, ``netlink`` (``halb.vrrp.netlink.Netlink``) for type
    interface."""
    if cfg.type == "interface":
        async def check_iface() -> tuple[bool, str]:
            st = await netlink.link(cfg.interface)
            if not st["exists"]:
                return False, "no such interface"
            return st["up"], "up" if st["up"] else "down"
        return Tracker(cfg, check_iface)
    if cfg.type == "pool":
        async def check_pool() -> tuple[bool, str]:
            pool = pools[cfg.pool]
            n = pool.up_count(clock.now())
            return n >= cfg.min_up, f"{n} up, need {cfg.min_up}"
        return Tracker(cfg, check_pool)
    if cfg.type == "script":
        async def check_script() -> tuple[bool, str]:
            return await run_script(cfg.command, cfg.timeout)
        return Tracker(cfg, check_script)
    raise ValueError(f"unknown track type {cfg.type!r}")
