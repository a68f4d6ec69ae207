"""The composition root: builds one node from its config and wires the parts together.

Nothing else reaches across parts. The parts meet only in the plain shared types created
here: the pools (``halb.model.Pool``), the replicated tables (``halb.tables.Tables``), the
metrics registry and the clocks. Each part is an object with ``async start()`` and
``async stop()``; the node starts them in dependency order and stops them in reverse.

    data plane:  listeners (halb.proxy)      -> pools, tables, metrics
    health:      checkers (halb.health)      -> pools
    election:    instances (halb.vrrp)       -> pools (tracking), VIPs
    state sync:  halb.sync                   -> tables, election (fast takeover)
    control:     halb.control                -> everything above, read and admin calls
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from typing import Any

from . import log as hlog
from .clock import Clock, MonotonicClock, WallClock
from .config import Config
from .cpu import cpu_quota
from .model import Pool, PoolView
from .sdnotify import Notifier
from .tables import Tables

TICK = 0.25  # pool ticks (slow start, passive ejection end) and table expiry
STANDALONE_LOG = 4096  # table change log kept by a node without [sync]
QUOTA_TICKS = 40  # the CPU quota is re-read every 10 s
EXPIRE_CHUNK = 256  # table entries (or stale heap items, tombstones) per expire() call
# Expiry work between two yields to the event loop: a chunk of 2000 took 5-10 ms, a stall
# every proxy on the node feels; 1 ms of work per loop turn keeps a backlog of 100,000
# entries to about 1.5 s of background work.
EXPIRE_BUDGET = 0.001


class Node:
    def __init__(self, cfg: Config, *, clock: Clock | None = None, wall: Clock | None = None):
        from .metrics import Metrics

        self.cfg = cfg
        self.name = cfg.node.name
        self.clock = clock or MonotonicClock()
        self.wall = wall or WallClock()
        self.log = hlog.get_logger("node")
        self.metrics = Metrics(self.name)
        self.pools: dict[str, Pool] = {}
        for pc in cfg.pools:
            self.pools[pc.name] = Pool(pc, on_change=self._pool_changed)
        sticky_max = max((p.sticky.max_entries for p in cfg.pools), default=100_000)
        flow_max = max((lc.limits.max_flows for lc in cfg.listeners), default=65_536) * 4
        # A node without [sync] has no one to ship changes to or take them from: a short log
        # (for halbctl and tests to look at) and no tombstones. Under connection churn the full
        # log and tombstones held 300,000+ tuples (37 MB) that no one would ever read.
        if cfg.sync is not None:
            log_size, tombs = max(cfg.sync.max_backlog, 100_000), True
        else:
            log_size, tombs = STANDALONE_LOG, False
        self.tables = Tables(self.name, self.wall, sticky_max=sticky_max, flow_max=flow_max,
                             log_size=log_size, tombstones=tombs, nat_max=cfg.nat.max_entries)
        from .splicegate import SpliceGate

        self.splice_gate = SpliceGate()  # relay = "auto" TCP listeners splice while it is open
        self.metrics.splice_gate(self.splice_gate)
        self.cpu_quota: float | None = None  # cores (cgroup quota), re-read by the ticker
        self._ticks = 0
        self.parts: list[Any] = []  # started in order, stopped in reverse
        self._build_parts()
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._draining: set[asyncio.Task] = set()  # listeners a reload removed, draining
        self._saving: asyncio.Task | None = None  # a periodic table save under way
        self._started = False  # every part started (only then are the tables worth saving)

    # -- wiring -------------------------------------------------------------------------------

    def _build_parts(self) -> None:
        from .health import HealthChecker
        from .proxy import make_listener

        self.health = [HealthChecker(pool, self.clock, self.metrics)
                       for pool in self.pools.values() if pool.cfg.health.type != "none"]
        self.listeners = [make_listener(lc, self) for lc in self.cfg.listeners
                          if lc.mode != "nat"]
        self.parts.extend(self.health)
        self.parts.extend(self.listeners)
        self.nat = None
        nat_listeners = [lc for lc in self.cfg.listeners if lc.mode == "nat"]
        if nat_listeners:  # the kernel forwards these: rules in place before any VIP is taken
            from .nat.service import NatService
            self.nat = NatService(
                nat_listeners, self.pools, self.tables.nat, self.cfg.nat,
                registry=self.metrics.registry,
                sync_ports=(self.cfg.sync.listen.port,) if self.cfg.sync else (),
                elected_vips={str(v.ip) for vc in self.cfg.vrrp for v in vc.vips})
            self.parts.append(self.nat)
        self.election = None
        if self.cfg.vrrp:
            from .vrrp.election import Election
            sync_cfg = self.cfg.sync
            self.election = Election(
                self.cfg.vrrp, clock=self.clock, registry=self.metrics.registry, pools=self.pools,
                fast_takeover=sync_cfg.fast_takeover if sync_cfg is not None else True)
            if self.nat is not None:
                self.election.vip_hooks.append(self.nat)
            self.parts.append(self.election)
        self.sync = None
        if self.cfg.sync:
            from .sync.service import SyncService
            self.sync = SyncService(
                self.cfg.sync, name=self.name, tables=self.tables, wall=self.wall,
                registry=self.metrics.registry, election=self.election,
                advert_interval=max((v.advert_interval for v in self.cfg.vrrp), default=1.0))
            self.parts.insert(0, self.sync)
        from .control.api import ControlTargets
        from .control.server import ControlServer
        self.control = ControlServer(
            self.cfg.control, registry=self.metrics.registry,
            targets=ControlTargets(name=self.name, config=self.cfg, pools=self.pools,
                                   tables=self.tables, clock=self.clock, election=self.election,
                                   sync=self.sync, nat=self.nat,
                                   reload=self.reload_file
                                   if self.cfg.source and not self.cfg.source.startswith("<")
                                   else None))
        # first: a second halbd started by mistake with the same config fails on the live
        # control socket before its election or listeners touch anything
        self.parts.insert(0, self.control)

    def _pool_changed(self, pool: Pool, view: PoolView) -> None:
        m = getattr(self, "metrics", None)
        if m is not None:
            m.pool_view(pool, view, self.clock.now())
        nat = getattr(self, "nat", None)
        if nat is not None:
            nat.pool_changed(pool, view)

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts every part in order; if one fails, the ones started are stopped again (a
        master sends priority 0 and removes its VIPs) and the error is raised."""
        for w in self.cfg.warnings:
            self.log.warning("config_warning", key=w.path, reason=w.reason)
        if self.cfg.metrics.address:
            self.metrics.serve(self.cfg.metrics.address)
        for pool in self.pools.values():
            pool.refresh(self.clock.now())
        if self.cfg.node.save_tables:
            self._load_tables()  # before the data plane and sync start: peers' newer win
        started: list[Any] = []
        try:
            for part in self.parts:
                await part.start()
                started.append(part)
        except BaseException as e:
            err: BaseException = e
            if isinstance(e, OSError) and e.errno is not None:  # a bare socket error: say where
                err = OSError(e.errno, f"{_describe(part)}: {e.strerror or e}")
            for part in reversed(started):
                try:
                    await part.stop()
                except Exception:
                    self.log.exception("part_stop_failed", part=type(part).__name__)
            self.metrics.close()
            if err is not e:
                raise err from e
            raise
        self._started = True
        self._tasks.append(asyncio.create_task(self._ticker(), name="node-ticker"))
        self.log.info("node_started", pid=os.getpid(), config=self.cfg.source,
                      listeners=[str(lc.bind) for lc in self.cfg.listeners])

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                # CPython starts a young collection after 700 more container allocations than
                # deallocations; freeing an old object counts as one less. Under connection
                # churn the tables allocate about as many tuples as they free, so the young
                # generation grew unchecked (215,000 tuples after 20 s of 9,000 new TCP
                # connections/s) until one collection stalled the loop for 60-80 ms. Collected
                # every tick it stays small (a few ms at most under that churn), and the middle
                # generation is collected when due, before it grows as large.
                gc.collect(1 if gc.get_count()[1] >= gc.get_threshold()[1] else 0)
                self._ticks += 1
                if self._ticks % QUOTA_TICKS == 1:  # a quota can change at run time
                    self.cpu_quota = cpu_quota()
                gate = self.splice_gate
                # thread_time: this (the event loop's) thread, where every relay runs
                if gate.sample(time.thread_time(), time.process_time(), time.monotonic(),
                               self.cpu_quota):
                    self.log.info("l4_relay_method", method="splice" if gate.splice else "copy",
                                  busy=round(gate.busy, 2), quota=self.cpu_quota)
                now = self.clock.now()
                for pool in self.pools.values():
                    pool.tick(now)
                # in chunks: a burst of flows expiring together must not stall the loop (and
                # with it the proxies and the VRRP adverts)
                while True:
                    t0 = time.monotonic()
                    while True:
                        for t in self.tables:
                            t.expire(limit=EXPIRE_CHUNK)
                        more = any(t.expire_more for t in self.tables)
                        if not more or time.monotonic() - t0 >= EXPIRE_BUDGET:
                            break
                    if not more:
                        break
                    await asyncio.sleep(0)
                self.metrics.tables(self.tables)
                nc = self.cfg.node
                if nc.save_tables and self._ticks % max(1, round(nc.save_interval / TICK)) == 0 \
                        and self._saving is None:
                    self._saving = asyncio.get_running_loop().create_task(self._save_tables())
            except Exception:  # a bug here must not stop the node
                self.log.exception("tick_failed")

    # -- tables across restarts (halb.tablestore) ---------------------------------------------

    def _tables_path(self):
        from . import tablestore
        return tablestore.path_for(self.cfg.node.state_dir, self.name)

    def _load_tables(self) -> None:
        from . import tablestore
        path = self._tables_path()
        try:
            loaded = tablestore.load(path)
        except (OSError, ValueError) as e:
            self.log.error("tables_load_failed", file=str(path), error=str(e))
            return
        if loaded is None:
            return
        took = tablestore.apply(self.tables, loaded)
        self.log.info("tables_loaded", file=str(path), entries=took,
                      in_file=tablestore.counts(loaded))

    async def _save_tables(self) -> None:
        """A snapshot on the loop (a copy of tuples), encoded and written in a thread."""
        from . import tablestore
        try:
            snap = tablestore.snapshot(self.tables)
            path = self._tables_path()
            await asyncio.to_thread(self._write_tables, path, snap)
        except Exception as e:  # a full disk must not stop the node
            self.log.error("tables_save_failed", file=str(self._tables_path()), error=str(e))
        finally:
            self._saving = None

    def _write_tables(self, path, snap) -> None:
        from . import tablestore
        os.makedirs(path.parent, exist_ok=True)
        tablestore.save(path, tablestore.encode(self.name, self.wall.now(), snap))

    # -- reload -------------------------------------------------------------------------------

    async def reload(self, new: Config) -> "ReloadResult":
        """Applies a new config in place (SIGHUP, ``halbctl reload``); see halb/reload.py for
        what may change. The config has been parsed and validated already (``load``: a
        ConfigError changes nothing). Refused changes, or a new listener that cannot bind,
        change nothing either; otherwise pools, backends and listeners change in place and
        every change is logged. One reload at a time."""
        from .reload import plan as make_plan

        async with self._reload_lock:
            p = make_plan(self.cfg, new)
            if not p.ok:
                errors = [f"{k}: {why}" for k, why in p.refused]
                self.log.error("reload_refused", config=new.source, errors=errors)
                return ReloadResult(False, [], errors)
            if p.empty:
                self.cfg = new
                self.control.targets.config = new
                self.log.info("reload_done", config=new.source, changes=[])
                return ReloadResult(True, [], [])
            now = self.clock.now()
            from .health import HealthChecker
            from .proxy import make_listener

            # 1. what can fail first: new pools (a rollback deletes them), new listeners and
            # their sockets (a listener replacing another takes over its socket)
            added_pools = []
            for pc in p.pools_added:
                pool = Pool(pc, on_change=self._pool_changed)
                pool.refresh(now)
                self.pools[pc.name] = pool
                added_pools.append(pool)
            by_name = {lst.cfg.name: lst for lst in self.listeners}
            replaced = {name: by_name[name] for name, how in
                        ((lc.name, how) for lc, how in p.listeners_changed) if how == "new socket"}
            new_lst = []
            try:
                for lc in p.listeners_added + [lc for lc, how in p.listeners_changed
                                               if how == "new socket"]:
                    lst = make_listener(lc, self)
                    old = replaced.get(lc.name) or by_name.get(p.handover.get(lc.name, ""))
                    if old is not None:
                        lst.handover = old.take_socket()
                    await lst.start()
                    new_lst.append(lst)
            except Exception as e:
                for lst in new_lst:
                    await _quietly(lst.stop(), self.log)
                for pool in added_pools:
                    del self.pools[pool.name]
                err = f"listener {lc.name!r} ({lc.mode} on {lc.bind}): {e}"
                self.log.error("reload_failed", config=new.source, error=err)
                return ReloadResult(False, [], [err])
            # 2. pools: changed in place; health checks follow
            for pool in added_pools:
                if pool.cfg.health.type != "none":
                    hc = HealthChecker(pool, self.clock, self.metrics)
                    self.health.append(hc)
                    self.parts.append(hc)
                    await hc.start()
            for pc in p.pools_changed:
                pool = self.pools[pc.name]
                old_cfg = pool.cfg
                pool.reconfigure(pc, now)
                if old_cfg.health != pc.health or [
                        (b.name, b.address) for b in old_cfg.backends] != [
                        (b.name, b.address) for b in pc.backends]:
                    await self._restart_health(pool)
            # 3. listeners: changed in place, new ones in, old ones out (they drain)
            changed_pools = {pc.name for pc in p.pools_changed}
            for lc, how in p.listeners_changed:
                if how == "in place":
                    by_name[lc.name].reconfigure(lc)
            for lst in self.listeners:
                if lst.cfg.mode in ("tcp", "udp") and lst.cfg.pool in changed_pools \
                        and hasattr(lst, "refresh_pool"):
                    lst.refresh_pool()
            gone = [by_name[n] for n in p.listeners_removed] + list(replaced.values())
            keep = [lst for lst in self.listeners if lst not in gone]
            self.listeners = keep + new_lst
            self.parts = [x for x in self.parts if x not in gone] + new_lst
            for lst in gone:  # they stop accepting at once and drain in the background
                t = asyncio.get_running_loop().create_task(_quietly(lst.stop(), self.log))
                self._draining.add(t)
                t.add_done_callback(self._draining.discard)
            # 4. pools no longer named anywhere
            for name in p.pools_removed:
                pool = self.pools.pop(name)
                for hc in [h for h in self.health if h.pool is pool]:
                    await _quietly(hc.stop(), self.log)
                    self.health.remove(hc)
                    self.parts.remove(hc)
                self.metrics.pool_removed(name)
            self.cfg = new
            self.control.targets.config = new
            for line in p.changes:
                self.log.info("reload_change", change=line)
            self.log.info("reload_done", config=new.source, changes=len(p.changes))
            return ReloadResult(True, p.changes, [])

    async def _restart_health(self, pool: Pool) -> None:
        from .health import HealthChecker

        for hc in [h for h in self.health if h.pool is pool]:
            await _quietly(hc.stop(), self.log)
            self.health.remove(hc)
            self.parts.remove(hc)
        if pool.cfg.health.type != "none":
            hc = HealthChecker(pool, self.clock, self.metrics)
            self.health.append(hc)
            self.parts.append(hc)
            await hc.start()

    async def reload_file(self) -> "ReloadResult":
        """Reads the config file the node was started from again and reloads it."""
        from .config import ConfigError, load

        try:
            new = load(self.cfg.source)
        except ConfigError as e:
            errors = [str(pr) for pr in e.problems]
            self.log.error("reload_invalid", config=self.cfg.source, errors=errors)
            return ReloadResult(False, [], errors)
        return await self.reload(new)

    def request_stop(self, graceful: bool = True) -> None:
        self._graceful = graceful
        self._stop.set()

    async def run(self) -> None:
        """Starts the node and runs until SIGTERM or SIGINT; then stops gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # before start: a stop during start waits
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload_file()))
        await self.start()
        # what start-up built (modules, config, parts) lives as long as the process: keep it
        # out of every later collection so GC pauses scale with traffic state only
        gc.collect()
        gc.freeze()
        sd = Notifier()  # systemd Type=notify: ready now, watchdog from this loop
        if sd.enabled:
            sd.ready(f"serving {len(self.cfg.listeners)} listeners, "
                     f"{len(self.cfg.vrrp)} vrrp instances")
            if sd.watchdog_interval:
                self._tasks.append(asyncio.create_task(self._watchdog(sd), name="sd-watchdog"))
        await self._stop.wait()
        self.log.info("node_stopping", graceful=getattr(self, "_graceful", True))
        sd.stopping("stopping")
        await self.stop()
        sd.close()

    async def _watchdog(self, sd: "Notifier") -> None:
        """Pings systemd's watchdog from the event loop: a loop that stops turning (a stuck
        handler) stops the pings, and systemd restarts the unit."""
        while True:
            sd.watchdog()
            await asyncio.sleep(sd.watchdog_interval or 1.0)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._draining:
            await asyncio.gather(*list(self._draining), return_exceptions=True)
        # the election first: a master sends priority 0 before any other part stops, so the
        # backup's Skew_Time starts at once (Election.stop is idempotent: the loop skips it)
        if self.election is not None:
            try:
                await self.election.stop()
            except Exception:
                self.log.exception("part_stop_failed", part="Election")
        for part in reversed(self.parts):
            try:
                await part.stop()
            except Exception:
                self.log.exception("part_stop_failed", part=type(part).__name__)
        if self._saving is not None:
            await asyncio.gather(self._saving, return_exceptions=True)
        if self.cfg.node.save_tables and self._started:
            from . import tablestore
            path = self._tables_path()
            try:
                snap = tablestore.snapshot(self.tables)
                self._write_tables(path, snap)
                self.log.info("tables_saved", file=str(path),
                              entries={k: len(v) for k, v in snap.items()})
            except Exception as e:
                self.log.error("tables_save_failed", file=str(path), error=str(e))
        self.metrics.close()
        self.log.info("node_stopped")


class ReloadResult:
    """What a reload did: ``ok``; ``changes`` (one line each); ``errors`` (why it changed
    nothing: config problems with their key paths, refused keys, a listener that cannot bind)."""

    __slots__ = ("ok", "changes", "errors")

    def __init__(self, ok: bool, changes: list[str], errors: list[str]):
        self.ok = ok
        self.changes = changes
        self.errors = errors

    def __repr__(self) -> str:
        return f"ReloadResult(ok={self.ok}, changes={self.changes}, errors={self.errors})"


async def _quietly(aw, log) -> None:
    try:
        await aw
    except Exception:
        log.exception("part_stop_failed")


def _describe(part: Any) -> str:
    cfg = getattr(part, "cfg", None)
    if cfg is not None and hasattr(cfg, "bind") and hasattr(cfg, "mode"):
        return f"listener {cfg.name!r} ({cfg.mode} on {cfg.bind})"
    return type(part).__name__
