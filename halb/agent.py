"""HAProxy's agent-check: a backend's own view of its load and readiness.

Every ``interval`` halb connects to ``[pools.agent].port`` on each backend's host, sends
``send`` if set, and reads one line (at most ``MAX_LINE`` bytes, within ``timeout``). The line
is a list of words separated by spaces, tabs or commas (HAProxy's protocol):

- ``75%`` or ``weight:75%``: the weight becomes that share of the configured weight (at least 1
  while the share is above 0); ``weight:N``: the weight becomes N (0..256);
- ``maxconn:N``: the backend's connection limit (0: none);
- ``drain``: no new connections or requests, sticky clients keep going (like halbctl drain);
  ``maint``: no traffic at all; ``ready``: ends the agent's drain and maintenance;
- ``down``, ``fail``, ``stopped`` (optionally followed by ``#reason``): the backend is down;
  ``up``: the agent's down ends;
- with ``algorithm = "resource"`` (halb.resource), ``METRIC=VALUE`` or ``METRIC:VALUE`` words
  report load (``cpu_utilization=0.35``), and the percentage is read as HAProxy agents mean it,
  the idle share: ``70%`` reports a load of 0.30. Load is smoothed into the weight rather than
  setting it; ``weight:N`` still sets the ceiling.

Words not sent leave their settings as they are; unknown words are ignored. A failed agent
connection (refused, timeout, garbage) changes nothing: it is not a health failure. The agent's
drain, maintenance and down are its own: ``halbctl enable`` or a health check cannot end them,
and the agent cannot end an operator's drain or a failed health check (HAProxy combines them
the same way: a server is up when its health check and its agent both say so).

``parse`` is pure; ``AgentChecker`` is the I/O around it, one task per backend.
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from . import log as hlog
from .resource import utilization

if TYPE_CHECKING:  # pragma: no cover
    from .clock import Clock
    from .config import AgentConfig
    from .model import Backend, Pool

MAX_LINE = 1024
_SPLIT = re.compile(r"[ \t,]+")
_METRIC = re.compile(r"((?:cpu|mem|application)_utilization|(?:named_metrics|utilization)\."
                     r"[A-Za-z0-9_.-]{1,64})[=:]([-+0-9.e]{1,24})")


@dataclass(frozen=True)
class AgentReply:
    """What one agent line asks for; None: not said (unchanged)."""

    weight_pct: int | None = None
    weight_abs: int | None = None
    maxconn: int | None = None
    admin: str | None = None  # "ready" | "drain" | "maint"
    down: bool | None = None  # True: down/fail/stopped; False: up
    reason: str = ""
    unknown: tuple[str, ...] = ()
    metrics: tuple[tuple[str, float], ...] = ()  # METRIC=VALUE words (resource balancing)


def parse(line: str) -> AgentReply:
    """One agent line -> AgentReply (pure)."""
    text, _, reason = line.strip().partition("#")
    pct = absw = maxconn = None
    admin = None
    down = None
    unknown = []
    metrics: list[tuple[str, float]] = []
    for w in _SPLIT.split(text.strip()):
        lw = w.lower()
        if not lw:
            continue
        m = re.fullmatch(r"(?:weight:)?(\d{1,5})%", lw)
        if m:
            pct = min(int(m.group(1)), 25600)
            continue
        m = re.fullmatch(r"weight:(\d{1,5})", lw)
        if m:
            absw = min(int(m.group(1)), 256)
            continue
        m = re.fullmatch(r"maxconn:(\d{1,9})", lw)
        if m:
            maxconn = int(m.group(1))
            continue
        m = _METRIC.fullmatch(w)
        if m:
            try:
                x = float(m.group(2))
            except ValueError:
                x = float("nan")
            if x == x and x not in (float("inf"), float("-inf")):
                metrics.append((m.group(1), x))
                continue
        if lw in ("ready", "drain", "maint"):
            admin = lw
        elif lw in ("down", "fail", "failed", "stopped"):
            down = True
        elif lw == "up":
            down = False
        else:
            unknown.append(w[:40])
    return AgentReply(pct, absw, maxconn, admin, down, reason.strip()[:200], tuple(unknown),
                      tuple(metrics[:16]))


def load_of(r: AgentReply, metrics: tuple[str, ...]) -> float | None:
    """With ``algorithm = "resource"``: the load an agent reply reports for the configured
    metrics (the largest, clamped to 0..1), else from its percentage, the idle share
    (``1 - p/100``); None when it reports neither."""
    if r.metrics:
        u = utilization(dict(r.metrics), metrics)
        if u is not None:
            return u
    if r.weight_pct is not None:
        return max(0.0, 1.0 - min(r.weight_pct, 100) / 100.0)
    return None


def apply(b: "Backend", r: AgentReply) -> list[str]:
    """Sets the backend's agent state from a reply; returns what changed (for the log)."""
    changed = []
    if r.weight_pct is not None:
        w = b.cfg_weight * r.weight_pct // 100
        if r.weight_pct > 0 and w < 1 and b.cfg_weight > 0:
            w = 1
        w = min(w, 256)
        if b.agent_weight != w:
            b.agent_weight = w
            changed.append(f"weight {w} ({r.weight_pct}%)")
    elif r.weight_abs is not None and b.agent_weight != r.weight_abs:
        b.agent_weight = r.weight_abs
        changed.append(f"weight {r.weight_abs}")
    if r.maxconn is not None and b.max_conns != r.maxconn:
        b.max_conns = r.maxconn
        changed.append(f"maxconn {r.maxconn}")
    if r.admin is not None:
        drain, maint = r.admin == "drain", r.admin == "maint"
        if (b.agent_drain, b.agent_maint) != (drain, maint):
            b.agent_drain, b.agent_maint = drain, maint
            changed.append(r.admin)
    if r.down is not None and b.agent_down != r.down:
        b.agent_down = r.down
        changed.append("down" + (f" ({r.reason})" if r.reason else "") if r.down else "up")
    return changed


class AgentChecker:
    """Agent checks of one pool's backends (``pool.cfg.agent``); a node part."""

    def __init__(self, pool: "Pool", clock: "Clock", metrics: Any = None, *,
                 rng: random.Random | None = None):
        self.pool = pool
        self.cfg: AgentConfig = pool.cfg.agent
        self.clock = clock
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.log = hlog.get_logger("agent")
        self._tasks: list[asyncio.Task] = []
        self.failures = 0

    async def start(self) -> None:
        for b in self.pool.backends:
            self._tasks.append(asyncio.create_task(self._run(b),
                                                   name=f"agent-{self.pool.name}-{b.name}"))
        self.log.info("agent_started", pool=self.pool.name, port=self.cfg.port,
                      interval=self.cfg.interval)

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, b: "Backend") -> None:
        await asyncio.sleep(self.rng.uniform(0.0, min(self.cfg.interval, 0.1)))
        while True:
            try:
                await self.check_once(b)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one check must not end the backend's checks
                self.log.exception("agent_check_crashed", pool=self.pool.name, backend=b.name)
            await asyncio.sleep(self.cfg.interval)

    async def read_line(self, b: "Backend") -> str | None:
        """The agent's line, or None when the agent could not be asked (not a failure)."""
        w = None
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_connection(b.host, self.cfg.port), self.cfg.timeout)
            if self.cfg.send:
                w.write(self.cfg.send.encode("latin-1", "replace"))
            data = b""
            deadline = asyncio.get_running_loop().time() + self.cfg.timeout
            while b"\n" not in data and len(data) < MAX_LINE:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                chunk = await asyncio.wait_for(r.read(MAX_LINE - len(data)), left)
                if not chunk:
                    break
                data += chunk
            return data.split(b"\n", 1)[0].decode("latin-1").strip() if data else None
        except (OSError, asyncio.TimeoutError) as e:
            self.failures += 1
            self.log.debug("agent_unreachable", pool=self.pool.name, backend=b.name,
                           error=str(e) or type(e).__name__)
            return None
        finally:
            if w is not None:
                w.close()

    async def check_once(self, b: "Backend") -> list[str] | None:
        line = await self.read_line(b)
        if line is None:
            return None
        r = parse(line)
        b.agent_said = line[:200]
        pool = self.pool
        if pool.resource:
            # the percentage is load here (its idle share), smoothed by the pool, not a weight
            u = load_of(r, pool.cfg.resource.metrics)
            if u is not None:
                pool.report_load(b, u, self.clock.now())
                pool.load_reports["ok"] += 1
            elif r.weight_abs is None and r.admin is None and r.down is None and r.maxconn is None:
                pool.load_reports["no_metric"] += 1
            if r.weight_pct is not None:
                r = replace(r, weight_pct=None)
        changed = apply(b, r)
        if changed:
            self.pool.refresh(self.clock.now())
            self.log.info("agent_changed", pool=self.pool.name, backend=b.name, said=line[:200],
                          changes=changed)
        return changed
