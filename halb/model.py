"""Backends and pools at run time: the plain data the parts of a node meet in.

A ``Backend`` carries its live counters (active connections, in-flight requests, response
time EWMA) and its state (health, admin drain, passive ejection, slow start). A ``Pool`` owns
its backends and an immutable ``PoolView``: the backends a balancer may pick from with their
effective weights. The view is rebuilt and swapped in one assignment whenever health, admin
state or slow-start weights change, so a balancer never sees a half-updated pool.

Pure code: every method that depends on time takes ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection

from .config import BackendConfig, PoolConfig
from .resource import RESULTS, smooth
from .resource import weight as resource_weight

if TYPE_CHECKING:  # pragma: no cover
    from .balance import Balancer

EWMA_ALPHA = 0.3


class Backend:
    __slots__ = ("pool", "index", "name", "host", "port", "cfg_weight", "weight", "max_conns",
                 "backup", "healthy", "admin_drain", "ejected_until", "up_since", "active",
                 "inflight", "total", "failures", "consecutive_failures", "ewma_rt", "maint",
                 "agent_weight", "agent_drain", "agent_maint", "agent_down", "agent_said",
                 "load", "load_raw", "load_at")

    def __init__(self, pool: str, index: int, cfg: BackendConfig, *, healthy: bool = True):
        self.pool = pool
        self.index = index
        self.name = cfg.name
        self.host = cfg.address.host
        self.port = cfg.address.port
        self.cfg_weight = cfg.weight
        self.weight = cfg.weight  # admin weight (halbctl weight); 0 drains
        self.max_conns = cfg.max_conns
        self.backup = cfg.backup
        self.healthy = healthy  # active health checks' verdict
        self.admin_drain = False  # halbctl drain
        self.ejected_until = 0.0  # passive checks: out until this monotonic time
        self.up_since = 0.0  # when it last came up (slow start)
        self.active = 0  # open connections / in-flight requests
        self.inflight = 0
        self.total = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.ewma_rt = 0.0  # seconds
        self.maint = False  # halbctl backend maint: out of service, sticky clients included
        # the agent-check's own say (halb.agent): -1 none, else the weight it set; its drain,
        # maintenance and down, which only the agent ends
        self.agent_weight = -1
        self.agent_drain = False
        self.agent_maint = False
        self.agent_down = False
        self.agent_said = ""
        # algorithm = "resource" (halb.resource): the smoothed reported load (-1: no report
        # yet), the last report as it came, and when it came (monotonic)
        self.load = -1.0
        self.load_raw = -1.0
        self.load_at = 0.0

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def is_up(self, now: float) -> bool:
        return (self.healthy and not self.maint and not self.agent_down and not self.agent_maint
                and now >= self.ejected_until)

    def is_full(self) -> bool:
        return self.max_conns > 0 and self.active >= self.max_conns

    def state(self, now: float) -> str:
        if self.maint or self.agent_maint:
            return "maint"
        if not self.healthy or self.agent_down:
            return "down"
        if now < self.ejected_until:
            return "ejected"
        if self.admin_drain or self.agent_drain or self.weight == 0 or self.agent_weight == 0:
            return "drain"
        return "up"

    def __repr__(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"Backend({self.pool}/{self.name} {h}:{self.port})"


def backend_acquire(b: Backend) -> None:
    """A connection or request starts at ``b`` (``Pool.acquire``; the L7 proxy, compiled,
    calls this directly as a C function, see model.pxd)."""
    b.active += 1
    b.inflight += 1
    b.total += 1


def backend_release(b: Backend, rt: float | None = None) -> None:
    """It ended, after ``rt`` seconds if known (the response-time average leasttime uses)."""
    b.active -= 1
    b.inflight -= 1
    if rt is not None:
        b.ewma_rt = rt if b.ewma_rt == 0.0 else b.ewma_rt + EWMA_ALPHA * (rt - b.ewma_rt)


@dataclass(frozen=True, slots=True)
class PoolView:
    """What a balancer picks from: eligible backends and their effective weights (> 0).

    ``backup`` is True when every primary is out and the view holds the backups instead.
    ``version`` grows with every rebuild so balancers can cache derived tables.
    """

    backends: tuple[Backend, ...]
    weights: tuple[int, ...]
    backup: bool
    version: int

    def __len__(self) -> int:
        return len(self.backends)


EMPTY_VIEW = PoolView((), (), False, 0)


class Pool:
    def __init__(self, cfg: PoolConfig, balancer: "Balancer | None" = None, *,
                 initially_healthy: bool | None = None,
                 on_change: Callable[["Pool", PoolView], None] | None = None):
        self.cfg = cfg
        self.name = cfg.name
        # HAProxy starts checked servers as up and lets checks take them down ("init-state up")
        healthy = True if initially_healthy is None else initially_healthy
        self.backends = [Backend(cfg.name, i, b, healthy=healthy) for i, b in enumerate(cfg.backends)]
        self.by_name = {b.name: b for b in self.backends}
        if balancer is None:
            from .balance import make_balancer
            balancer = make_balancer(cfg)
        self.balancer = balancer
        self.on_change = on_change
        self._hashing = cfg.algorithm in ("source", "maglev")
        # weights follow reported load (halb.resource); the L7 path reads load reports only then
        self.resource = cfg.algorithm == "resource"
        self.load_reports = dict.fromkeys(RESULTS, 0)  # report outcomes (metrics)
        self._load_dirty = False
        # the config facts the L7 path reads per request, flat (compiled: C fields)
        self.sticky_mode = cfg.sticky.mode
        self.sticky_cookie = cfg.sticky.cookie
        self.on_5xx = cfg.passive.on_5xx
        self.retries = cfg.retries
        self.view = EMPTY_VIEW
        self._ramping = False
        self.refresh(0.0)

    def reconfigure(self, cfg: PoolConfig, now: float) -> list[Backend]:
        """A reload changed this pool's config: applied in place (listeners hold this object).
        Backends kept by name and address keep their ``Backend`` (health, counters, open
        connections, a runtime drain); a runtime weight survives unless the config changed
        that backend's weight (HAProxy's server-state-file rule). A backend whose address
        changed, and a new one, start as new backends, up until checked otherwise (HAProxy's
        ``init-state up``). Returns the backends that left (their connections finish)."""
        old = self.by_name
        backends = []
        for i, bc in enumerate(cfg.backends):
            b = old.get(bc.name)
            if b is not None and b.host == bc.address.host and b.port == bc.address.port:
                if b.cfg_weight != bc.weight:
                    b.weight = bc.weight
                b.cfg_weight = bc.weight
                b.max_conns = bc.max_conns
                b.backup = bc.backup
                b.index = i
            else:
                b = Backend(cfg.name, i, bc, healthy=True)
                b.up_since = now
            backends.append(b)
        kept = {id(b) for b in backends}
        gone = [b for b in self.backends if id(b) not in kept]
        if (cfg.algorithm, cfg.hash_key, cfg.maglev_table_size) != (
                self.cfg.algorithm, self.cfg.hash_key, self.cfg.maglev_table_size):
            from .balance import make_balancer
            self.balancer = make_balancer(cfg)
        if (cfg.algorithm == "resource") != self.resource:
            # an agent's percentage meant a weight before and means load now (or the other way
            # round): what it set is dropped and the agent says it again within an interval
            for b in backends:
                b.agent_weight = -1
                b.load = b.load_raw = -1.0
        self.cfg = cfg
        self.backends = backends
        self.by_name = {b.name: b for b in backends}
        self._hashing = cfg.algorithm in ("source", "maglev")
        self.resource = cfg.algorithm == "resource"
        self._load_dirty = self.resource
        self.sticky_mode = cfg.sticky.mode
        self.sticky_cookie = cfg.sticky.cookie
        self.on_5xx = cfg.passive.on_5xx
        self.retries = cfg.retries
        self.refresh(now)
        return gone

    # -- view ---------------------------------------------------------------------------------

    def _effective_weight(self, b: Backend, now: float) -> int:
        w = b.weight
        if b.agent_weight >= 0 and w > 0:  # the agent's weight, unless an operator drained it
            w = b.agent_weight
        if self.resource:  # the weight so far is the ceiling; reported load takes its share
            rc = self.cfg.resource
            w = resource_weight(w, b.load if now - b.load_at <= rc.stale_after else -1.0,
                                rc.floor)
        ss = self.cfg.slow_start
        # a drained (weight 0) backend stays at 0; hashing pools do not ramp (as in HAProxy,
        # where slowstart does not apply to static/hash algorithms): a weight change would
        # rebuild the whole hash table every tick and move keys back and forth
        if w > 0 and ss > 0 and b.up_since > 0 and now - b.up_since < ss and not self._hashing:
            self._ramping = True
            w = max(1, int(w * (now - b.up_since) / ss))
        return w

    def refresh(self, now: float) -> PoolView:
        """Rebuilds the view from the backends' state and swaps it in atomically."""
        self._ramping = False
        prim = [b for b in self.backends if not b.backup and b.is_up(now)]
        pool = prim
        backup = False
        if not prim:
            pool = [b for b in self.backends if b.backup and b.is_up(now)]
            backup = bool(pool)
        chosen, weights = [], []
        for b in pool:
            if b.admin_drain or b.agent_drain:
                continue
            w = self._effective_weight(b, now)
            if w > 0:
                chosen.append(b)
                weights.append(w)
        if not chosen and not backup and prim:
            # every primary is drained: backups serve, as HAProxy does when no usable server is left
            pool = [b for b in self.backends if b.backup and b.is_up(now) and not b.admin_drain
                    and not b.agent_drain and b.weight > 0]
            if pool:
                chosen, weights, backup = pool, [self._effective_weight(b, now) for b in pool], True
        view = PoolView(tuple(chosen), tuple(weights), backup, self.view.version + 1)
        self.balancer.rebuild(view)
        self.view = view
        if self.on_change:
            self.on_change(self, view)
        return view

    def tick(self, now: float) -> None:
        """Called periodically: ends passive ejections and ramps slow-start weights."""
        expired = any(0 < b.ejected_until <= now for b in self.backends)
        if expired:
            for b in self.backends:
                if 0 < b.ejected_until <= now:
                    b.ejected_until = 0.0
                    b.consecutive_failures = 0
                    if b.healthy:
                        b.up_since = now
        if expired or self._ramping:
            self.refresh(now)
        elif self.resource and (self._load_dirty or self._loads_may_expire(now)):
            self._load_dirty = False
            view = self.view
            if [self._effective_weight(b, now) for b in view.backends] != list(view.weights):
                self.refresh(now)

    def _loads_may_expire(self, now: float) -> bool:
        stale = self.cfg.resource.stale_after
        for b in self.view.backends:
            if b.load >= 0.0 and now - b.load_at > stale:
                b.load = -1.0  # stale: forget it (the next report starts afresh)
                return True
        return False

    # -- reported load (algorithm = "resource") ------------------------------------------------

    def report_load(self, b: Backend, u: float, now: float) -> None:
        """A backend reported utilization ``u`` (0..1): smooths it into ``b.load``; the view's
        weights follow at the next ``tick`` (a report per response must not rebuild the view
        per response)."""
        rc = self.cfg.resource
        u = 0.0 if u < 0.0 else 1.0 if u > 1.0 else u
        fresh = b.load >= 0.0 and now - b.load_at <= rc.stale_after
        b.load = smooth(b.load if fresh else -1.0, u, now - b.load_at, rc.smoothing)
        b.load_raw = u
        b.load_at = now
        self._load_dirty = True

    # -- picking ------------------------------------------------------------------------------

    def pick(self, key: bytes | None = None,
             exclude: Collection[Backend] = frozenset()) -> Backend | None:
        """A backend for a new connection or request, or None when none can serve.

        ``key`` feeds hashing algorithms; ``exclude`` holds backends already tried (redispatch;
        any container, positional so that the data plane's hot path avoids keyword parsing).
        """
        view = self.view
        if not view.backends:
            return None
        b = self.balancer.pick(view, key, exclude)
        return b

    # -- accounting (called by the data plane) ------------------------------------------------

    @staticmethod
    def acquire(b: Backend) -> None:
        backend_acquire(b)

    @staticmethod
    def release(b: Backend, rt: float | None = None) -> None:
        backend_release(b, rt)

    # -- state changes ------------------------------------------------------------------------

    def set_health(self, b: Backend, healthy: bool, now: float) -> bool:
        """Applies a health verdict; returns True if the backend changed state."""
        if b.healthy == healthy:
            return False
        b.healthy = healthy
        if healthy:
            b.up_since = now
            b.consecutive_failures = 0
        self.refresh(now)
        return True

    def report_result(self, b: Backend, ok: bool, now: float) -> bool:
        """Passive check: a connection failure (or 5xx where configured). True if ejected now."""
        pc = self.cfg.passive
        if ok:
            b.consecutive_failures = 0
            return False
        b.failures += 1
        b.consecutive_failures += 1
        if pc.max_failures and b.consecutive_failures >= pc.max_failures and now >= b.ejected_until:
            if not self._may_eject(b, now):
                return False
            b.ejected_until = now + pc.cooldown
            self.refresh(now)
            return True
        return False

    def _may_eject(self, b: Backend, now: float) -> bool:
        """Passive ejection is capped, as in Envoy's max_ejection_percent: at most half of the
        pool's backends of b's kind (primary/backup) are ejected at a time, and never the last
        backend (primary or backup) still up, so a short shared failure cannot empty the pool."""
        peers = [x for x in self.backends if x.backup == b.backup]
        ejected = sum(1 for x in peers if now < x.ejected_until)
        others_up = any(x is not b and x.is_up(now) for x in self.backends)
        return others_up and ejected < max(1, len(peers) // 2)

    def set_drain(self, b: Backend, drain: bool, now: float) -> None:
        b.admin_drain = drain
        self.refresh(now)

    def set_weight(self, b: Backend, weight: int, now: float) -> None:
        if not 0 <= weight <= 256:
            raise ValueError(f"weight {weight} out of range (0..256)")
        b.weight = weight
        self.refresh(now)

    def up_count(self, now: float) -> int:
        return sum(1 for b in self.backends if b.is_up(now) and not b.backup)
