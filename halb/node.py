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
import contextlib
import gc
import os
import signal
import time
from typing import Any

from . import log as hlog
from .clock import Clock, MonotonicClock, WallClock
from .config import BackendConfig, Config
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
        from . import runtime
        from .metrics import Metrics

        self.file_cfg = cfg  # the config file's (a reload replaces it)
        self.name = cfg.node.name
        self.log = hlog.get_logger("node")
        # runtime backend changes (halbctl backend ...) kept in state_dir across restarts
        rpath = runtime.path_for(cfg.node.state_dir, self.name)
        try:
            self.runtime = runtime.load(rpath)
        except (OSError, ValueError) as e:
            self.log.error("runtime_load_failed", file=str(rpath), error=str(e))
            self.runtime = {}
        self.cfg = cfg = runtime.effective(cfg, self.runtime)
        self.clock = clock or MonotonicClock()
        self.wall = wall or WallClock()
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
        from .accesslog_writer import AccessLog

        # the listeners log through it (node.access_log); a part started before them and
        # stopped after them, so that their last lines are written
        self.access_log = AccessLog(cfg.access_log, self.metrics)
        self.parts: list[Any] = [self.access_log]  # started in order, stopped in reverse
        from .tlstickets import TicketKeys

        # TLS session-ticket keys of the HTTPS listeners (halb.tlstickets): the node's, so
        # that they outlive a reload that rebuilds a listener; rotated by the ticker, shared
        # with the peers by sync
        self.tls_tickets = TicketKeys()
        from .proxy.tls import TLSCollector

        self.metrics.registry.register(TLSCollector(self.tls_tickets, self.wall.now))
        from .proxy import ListenerEnv
        self.listener_env = ListenerEnv(self.pools, self.tables, self.clock, self.metrics,
                                        self.access_log, self.splice_gate, self.tls_tickets)
        self._build_parts()
        if self.runtime:
            self._after_change()  # backends in maintenance stay so
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._draining: set[asyncio.Task] = set()  # listeners a reload removed, draining
        self._saving: asyncio.Task | None = None  # a periodic table save under way
        self._started = False  # every part started (only then are the tables worth saving)
        self._upgrading = False
        self._defer_control = False  # an upgrade's new process: the control part starts later
        self._successor = None  # the upgrade socket to the new process, once it took over
        self._drain = 30.0  # seconds the old process of an upgrade lets its connections finish
        self._sd = None

    # -- wiring -------------------------------------------------------------------------------

    def _build_parts(self) -> None:
        from .proxy import make_listener

        # active health checks and agent checks (halb.health, halb.agent), one per pool each
        self.health = [c for pool in self.pools.values() for c in self._checkers_for(pool)]
        self.listeners = [make_listener(lc, self.listener_env) for lc in self.cfg.listeners
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
                elected_vips={str(v.ip) for vc in self.cfg.vrrp for v in vc.vips},
                shared_vips=bgp_vips(self.cfg) if self.cfg.bgp is not None else ())
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
            self.sync = self._make_sync()
            self.parts.insert(0, self.sync)
        self.bgp = None
        if self.cfg.bgp is not None:  # last: announced once everything else is up
            from .bgp.service import BgpService
            self.bgp = BgpService(self.cfg.bgp, vips=bgp_vips(self.cfg), pools=self.pools,
                                  ready=self._bgp_ready, clock=self.clock,
                                  registry=self.metrics.registry)
            self.parts.append(self.bgp)
        from .control.api import ControlTargets
        from .control.server import ControlServer
        self.control = ControlServer(
            self.cfg.control, registry=self.metrics.registry,
            targets=ControlTargets(name=self.name, config=self.cfg, pools=self.pools,
                                   tables=self.tables, clock=self.clock, election=self.election,
                                   sync=self.sync, nat=self.nat, bgp=self.bgp,
                                   reload=self.reload_file
                                   if self.cfg.source and not self.cfg.source.startswith("<")
                                   else None,
                                   backend_add=self.backend_add, backend_del=self.backend_del,
                                   backend_maint=self.backend_maint, upgrade=self.upgrade,
                                   http_caches=lambda: getattr(self.metrics, "http_caches",
                                                               None) or {}))
        # first: a second halbd started by mistake with the same config fails on the live
        # control socket before its election or listeners touch anything
        self.parts.insert(0, self.control)

    def _make_sync(self):
        from .sync.service import SyncService
        return SyncService(
            self.cfg.sync, name=self.name, tables=self.tables, wall=self.wall,
            registry=self.metrics.registry, election=self.election, tickets=self.tls_tickets,
            advert_interval=max((v.advert_interval for v in self.cfg.vrrp), default=1.0))

    def _bgp_ready(self) -> bool:
        """[bgp] announces once every part started and sync learned the peers' tables (an
        upgrade's new process got them from the old one, which was serving: no withdrawal)."""
        if getattr(self, "_upgraded_in", False):
            return self._started
        return self._started and (self.sync is None or bool(getattr(self.sync, "ready", True)))

    def _pool_changed(self, pool: Pool, view: PoolView) -> None:
        bgp = getattr(self, "bgp", None)
        if bgp is not None:
            bgp.poke()  # a pool's last backend gone: withdraw now, not at the next interval
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
                if part is self.control and self._defer_control:
                    continue  # an upgrade: started once the old process lets go of it
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
                self.tls_tickets.tick(self.wall.now())  # rotation, expiry (halb.tlstickets)
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
        every change is logged. Runtime backend changes (halb.runtime) are laid over the new
        file as over the old one. One reload (or runtime change) at a time."""
        from . import runtime

        async with self._reload_lock:
            r = await self._apply(runtime.effective(new, self.runtime), "reload")
            if r.ok:
                self.file_cfg = new
                self._after_change()
                self._reread_ticket_key_files()
            return r

    def _reread_ticket_key_files(self) -> None:
        """``[listeners.tls] ticket_keys`` files are read again on every reload: an operator
        rotates keys by changing the file's contents, not its name, so the listener (equal
        config) is kept and its ring takes the new keys. The config load before this already
        refused an unreadable or malformed file (the reload then changed nothing)."""
        from .tlstickets import parse_key_file
        for lc in self.cfg.listeners:
            t = lc.tls
            ring = self.tls_tickets.rings.get(lc.name) if t is not None else None
            if ring is None or not t.tickets or not t.ticket_keys:
                continue
            try:
                with open(t.ticket_keys, encoding="ascii", errors="replace") as f:
                    keys = parse_key_file(f.read(1 << 16), f"listener {lc.name!r} tls.ticket_keys")
            except (OSError, ValueError) as e:  # changed again since the load: keep the old
                self.log.error("tls_ticket_keys_reload_failed", listener=lc.name, error=str(e))
                continue
            ring.configure(ring.rotate, ring.kept, keys)
            self.log.info("tls_ticket_keys_loaded", listener=lc.name, keys=len(keys))

    async def _apply(self, new: Config, what: str) -> "ReloadResult":
        """Makes the running node match ``new`` (an effective config: the file's with the
        runtime changes); the caller holds the reload lock."""
        from .reload import plan as make_plan

        if True:  # (the body predates the lock's move to the callers)
            p = make_plan(self.cfg, new)
            if not p.ok:
                errors = [f"{k}: {why}" for k, why in p.refused]
                self.log.error(f"{what}_refused", config=new.source, errors=errors)
                return ReloadResult(False, [], errors)
            if p.empty:
                self.cfg = new
                self.control.targets.config = new
                self.log.info(f"{what}_done", config=new.source, changes=[])
                return ReloadResult(True, [], [])
            now = self.clock.now()
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
                    lst = make_listener(lc, self.listener_env)
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
                self.log.error(f"{what}_failed", config=new.source, error=err)
                return ReloadResult(False, [], [err])
            # 2. pools: changed in place; health checks follow
            for pool in added_pools:
                for hc in self._checkers_for(pool):
                    self.health.append(hc)
                    self.parts.append(hc)
                    await hc.start()
            for pc in p.pools_changed:
                pool = self.pools[pc.name]
                old_cfg = pool.cfg
                pool.reconfigure(pc, now)
                if old_cfg.health != pc.health or old_cfg.agent != pc.agent or [
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
            self.parts = [x for x in self.parts if x not in gone]
            # new listeners go before [bgp] (started last, stopped first: a stop withdraws the
            # VIPs before any listener closes, those of a reload included)
            at = self.parts.index(self.bgp) if self.bgp in self.parts else len(self.parts)
            self.parts[at:at] = new_lst
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
            if self.bgp is not None and new.bgp is not None:
                self.bgp.set_vips(bgp_vips(new))  # listeners and their pools may have changed
            for line in p.changes:
                self.log.info(f"{what}_change", change=line)
            self.tls_tickets.drop(lc.name for lc in new.listeners if lc.tls is not None)
            self.log.info(f"{what}_done", config=new.source, changes=len(p.changes))
            return ReloadResult(True, p.changes, [])

    # -- runtime backends (halbctl backend ...; halb.runtime) ----------------------------------

    def _after_change(self) -> None:
        """Maintenance flags onto the backends (new Backend objects included) and the runtime
        overlay to its file."""
        from . import runtime
        now = self.clock.now()
        for name, o in self.runtime.items():
            pool = self.pools.get(name)
            if pool is None:
                continue
            changed = False
            for b in pool.backends:
                m = b.name in o.maint
                if b.maint != m:
                    b.maint = m
                    changed = True
            if changed:
                pool.refresh(now)
        path = runtime.path_for(self.cfg.node.state_dir, self.name)
        if not self.runtime and not path.exists():
            return
        try:
            runtime.save(path, self.runtime)
        except OSError as e:
            self.log.error("runtime_save_failed", file=str(path), error=str(e))

    async def backend_add(self, pool_name: str, b: "BackendConfig") -> "ReloadResult":
        from . import runtime
        async with self._reload_lock:
            pool = self.pools[pool_name]
            runtime.add(self.runtime, pool.cfg, b)
            r = await self._apply(runtime.effective(self.file_cfg, self.runtime), "runtime")
            if r.ok:
                self._after_change()
                hc = next((h for h in self.health if h.pool is pool), None)
                self.log.info("backend_added", pool=pool_name, backend=b.name,
                              address=str(b.address), weight=b.weight, backup=b.backup,
                              checked=hc is not None)
            return r

    async def backend_del(self, pool_name: str, name: str) -> "ReloadResult":
        from . import runtime
        async with self._reload_lock:
            pool = self.pools[pool_name]
            b = pool.by_name[name]
            pool.set_drain(b, True, self.clock.now())  # nothing new from here on
            file_pool = next((pc for pc in self.file_cfg.pools if pc.name == pool_name), None)
            runtime.delete(self.runtime, pool.cfg, file_pool, name)
            r = await self._apply(runtime.effective(self.file_cfg, self.runtime), "runtime")
            if r.ok:
                self._after_change()
                self.log.info("backend_deleted", pool=pool_name, backend=name,
                              open_connections=b.active)
            return r

    async def backend_maint(self, pool_name: str, name: str, on: bool) -> None:
        from . import runtime
        async with self._reload_lock:
            runtime.set_maint(self.runtime, pool_name, name, on)
            self._after_change()
            self.log.info("backend_maint" if on else "backend_ready", pool=pool_name, backend=name)

    async def _stop_upgraded(self) -> None:
        """The old process after an upgrade handed over: the election lets go silently, the
        NAT rules stay (the new process owns them), the listeners stop accepting and their
        connections finish (up to the drain deadline), then the tables go to the new process
        once more and the process ends."""
        from . import tablestore
        from . import upgrade as up

        if self.bgp is not None:
            await self.bgp.release()  # the new process announces now: withdraw nothing
        if self.election is not None:
            await _quietly(self.election.release(), self.log)
        if self.nat is not None:
            self.nat.release()
        # the control socket first (the upgrade call has had its answer), so the new process
        # serves halbctl from now on
        await _quietly(self.control.stop(), self.log)
        with contextlib.suppress(Exception):
            await up.send(self._successor, {"type": "control"})
        t0 = time.monotonic()
        await asyncio.gather(*(_quietly(lst.stop(grace=self._drain), self.log)
                               for lst in self.listeners))
        self.log.info("upgrade_drained", seconds=round(time.monotonic() - t0, 3))
        for part in reversed(self.parts):
            if part in self.listeners or part is self.election or part is self.control:
                continue
            await _quietly(part.stop(), self.log)
        conn, self._successor = self._successor, None
        try:
            blob = tablestore.encode(self.name, self.wall.now(), tablestore.snapshot(self.tables))
            await up.send(conn, {"type": "final"}, (), blob)
        except Exception as e:  # noqa: BLE001 - the new process may be gone; nothing to save
            self.log.info("upgrade_final_not_sent", reason=str(e))
        finally:
            conn.close()
        self.metrics.close()
        self.log.info("node_stopped", upgraded=True)

    def _checkers_for(self, pool: Pool) -> list:
        from .agent import AgentChecker
        from .health import HealthChecker
        out: list = []
        if pool.cfg.health.type != "none":
            out.append(HealthChecker(pool, self.clock, self.metrics))
        if pool.cfg.agent is not None:
            out.append(AgentChecker(pool, self.clock, self.metrics))
        return out

    async def _restart_health(self, pool: Pool) -> None:
        for hc in [h for h in self.health if h.pool is pool]:
            await _quietly(hc.stop(), self.log)
            self.health.remove(hc)
            self.parts.remove(hc)
        for hc in self._checkers_for(pool):
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

    # -- zero-downtime upgrade (halb.upgrade) -------------------------------------------------

    async def upgrade(self, drain: float = 30.0) -> dict:
        """The old side of ``halbctl upgrade`` / SIGUSR2 (see halb.upgrade for the steps).
        Returns {"ok", "pid", "error"}; on failure the node carries on as before."""
        import socket as _socket
        import sys

        from . import tablestore
        from . import upgrade as up

        if self._upgrading:
            return {"ok": False, "pid": 0, "error": "an upgrade is already under way"}
        src = self.file_cfg.source
        if not src or src.startswith("<"):
            return {"ok": False, "pid": 0, "error": "this node has no config file to restart from"}
        self._upgrading = True
        loop = asyncio.get_running_loop()
        path = up.path_for(self.cfg.node.state_dir, self.name)
        lsock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        proc = None
        conn = None
        froze = False
        dups: list = []
        try:
            async with self._reload_lock:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                old = os.umask(0o177)
                try:
                    lsock.bind(path)
                finally:
                    os.umask(old)
                lsock.listen(1)
                lsock.setblocking(False)
                argv = [sys.executable, "-m", "halb.cli.halbd", src, "--upgrade-from", path]
                # the new process writes where this one's own lines go (not into the pipe
                # that carries gRPC's native stderr into this process's log: it ends with us)
                # (a plain Popen: asyncio's subprocess transport kills its child when the
                # loop closes, and this child must outlive this process)
                import subprocess
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                        stdout=_fd_of(sys.stdout, 1),
                                        stderr=_fd_of(sys.stderr, 2), start_new_session=True)
                self.log.info("upgrade_started", pid=proc.pid, argv=argv)
                accept = loop.create_task(loop.sock_accept(lsock))

                async def exited():
                    while proc.poll() is None:
                        await asyncio.sleep(0.05)
                died = loop.create_task(exited())
                done, _ = await asyncio.wait({accept, died}, timeout=up.TIMEOUT,
                                             return_when=asyncio.FIRST_COMPLETED)
                if accept not in done:
                    accept.cancel()
                    raise up.UpgradeError(
                        f"the new process exited with {proc.returncode} before it connected"
                        if died in done else "the new process did not connect")
                died.cancel()
                conn, _ = accept.result()
                conn.setblocking(False)
                hello, _, _ = await up.recv(conn)
                if hello.get("type") != "hello":
                    raise up.UpgradeError(f"unexpected message {hello.get('type')!r}")
                # from here the new process takes the ports: sync (after a goodbye, so that
                # no peer takes the VIP), metrics, the listening sockets
                froze = True
                if self.sync is not None:
                    await self.sync.goodbye()
                    await self.sync.stop()
                self.metrics.close()
                names, fds = [], []
                wanted = set(hello.get("listeners", ()))
                for lst in self.listeners:
                    if lst.cfg.name in wanted and hasattr(lst, "take_socket"):
                        s = lst.take_socket()
                        dups.append(s)
                        names.append(lst.cfg.name)
                        fds.append(s.fileno())
                masters = self.election.masters() if self.election is not None else []
                blob = tablestore.encode(self.name, self.wall.now(),
                                         tablestore.snapshot(self.tables))
                await up.send(conn, {"type": "handover", "listeners": names,
                                     "masters": masters}, fds, blob)
                for s in dups:
                    s.close()
                dups = []
                r, _, _ = await up.recv(conn)
                if r.get("type") != "ready":
                    raise up.UpgradeError(r.get("error") or f"unexpected {r.get('type')!r}")
        except Exception as e:  # noqa: BLE001 - whatever went wrong, carry on alone
            err = str(e) or type(e).__name__
            self.log.error("upgrade_failed", error=err)
            for s in dups:
                s.close()
            if conn is not None:
                conn.close()
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(Exception):
                    await loop.run_in_executor(None, proc.wait, 5)
            if froze:
                await self._resume_after_failed_upgrade()
            self._upgrading = False
            return {"ok": False, "pid": 0, "error": err}
        finally:
            lsock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.log.info("upgrade_handed_over", pid=proc.pid, listeners=names, masters=masters)
        if self._sd is not None and self._sd.enabled:
            self._sd.send(MAINPID=proc.pid)  # systemd follows the new process
        self._successor = conn
        self._drain = max(0.0, float(drain))
        self._graceful = True
        self._stop.set()
        return {"ok": True, "pid": proc.pid, "error": ""}

    async def _resume_after_failed_upgrade(self) -> None:
        """The new process failed after the old one let go of its sync and metrics ports."""
        if self.cfg.metrics.address:
            self.metrics.serve(self.cfg.metrics.address)
        if self.sync is not None:
            old = self.sync
            self.sync = self._make_sync()
            self.parts[self.parts.index(old)] = self.sync
            self.control.targets.sync = self.sync
            try:
                await self.sync.start()
            except Exception:
                self.log.exception("sync_restart_failed")

    async def _takeover(self, path: str):
        """The new side of an upgrade, before start: the handover from the old process."""
        self._upgraded_in = True
        import socket as _socket

        from . import tablestore
        from . import upgrade as up

        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        conn.settimeout(up.TIMEOUT)
        conn.connect(path)
        conn.setblocking(False)
        await up.send(conn, {"type": "hello", "pid": os.getpid(),
                             "listeners": [lst.cfg.name for lst in self.listeners]})
        msg, fds, blob = await up.recv(conn, with_fds=True)
        by_name = {lst.cfg.name: lst for lst in self.listeners}
        for name, fd in zip(msg.get("listeners", ()), fds):
            lst = by_name.get(name)
            s = _socket.socket(fileno=fd)
            if lst is None:
                s.close()
            else:
                lst.handover = s
        if blob:
            took = tablestore.apply(self.tables, tablestore.decode(blob))
            self.log.info("upgrade_tables", entries=took)
        if self.election is not None:
            self.election.adopt = set(msg.get("masters", ()))
        self._defer_control = True  # the old process still serves it (see _takeover_final)
        return conn

    async def _takeover_final(self, conn) -> None:
        """What the old process learnt while it drained, then the end of the handover."""
        from . import tablestore
        from . import upgrade as up
        try:
            while True:
                try:
                    msg, _, blob = await up.recv(conn, timeout=3600.0)
                except up.UpgradeError:
                    msg, blob = {"type": "gone"}, b""
                kind = msg.get("type")
                if kind == "control" or (kind in ("gone", "final") and self._defer_control):
                    # the old process let go of the control socket (or is gone): ours now
                    self._defer_control = False
                    try:
                        await self.control.start()
                    except Exception:
                        self.log.exception("control_start_failed")
                if kind == "final" and blob:
                    took = tablestore.apply(self.tables, tablestore.decode(blob))
                    self.log.info("upgrade_final_tables", entries=took)
                if kind in ("final", "gone"):
                    break
        except Exception as e:  # noqa: BLE001 - the old process may simply be gone
            self.log.info("upgrade_final_missing", reason=str(e))
        finally:
            conn.close()

    def _on_signal(self, sig: int) -> None:
        self.log.info("signal_received", signal=signal.Signals(sig).name)
        self.request_stop()

    def request_stop(self, graceful: bool = True) -> None:
        self._graceful = graceful
        self._stop.set()

    async def run(self, upgrade_from: str = "") -> None:
        """Starts the node and runs until SIGTERM or SIGINT; then stops gracefully.
        ``upgrade_from``: the old process's upgrade socket (halbd --upgrade-from)."""
        from . import upgrade as up

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # before start: a stop during start waits
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload_file()))
        loop.add_signal_handler(signal.SIGUSR2, lambda: loop.create_task(self.upgrade()))
        conn = None
        if upgrade_from:
            conn = await self._takeover(upgrade_from)
            try:
                await self.start()
            except BaseException as e:
                with contextlib.suppress(Exception):
                    await up.send(conn, {"type": "failed", "error": f"{type(e).__name__}: {e}"})
                conn.close()
                raise
            await up.send(conn, {"type": "ready", "pid": os.getpid()})
            self._tasks.append(loop.create_task(self._takeover_final(conn)))
            self.log.info("upgrade_took_over", pid=os.getpid())
        loop.add_signal_handler(signal.SIGUSR1, self.access_log.reopen)  # logrotate
        if not upgrade_from:
            await self.start()
        # what start-up built (modules, config, parts) lives as long as the process: keep it
        # out of every later collection so GC pauses scale with traffic state only
        gc.collect()
        gc.freeze()
        sd = self._sd = Notifier()  # systemd Type=notify: ready now, watchdog from this loop
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
        if self._successor is not None:
            await self._stop_upgraded()
            return
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


def bgp_vips(cfg: Config) -> dict[str, tuple[str, ...]]:
    """[bgp]'s VIPs (bgp.vips, or every listener's bind address that no [[vrrp]] instance
    moves), each with the pools of the listeners that serve it (any healthy one keeps it
    announced)."""
    import ipaddress

    def canon(h: str) -> str:
        try:
            return str(ipaddress.ip_address(h))
        except ValueError:
            return h
    elected = {canon(str(a.ip)) for vc in cfg.vrrp for a in vc.vips}
    wild = ("0.0.0.0", "::")
    vips = list(cfg.bgp.vips) if cfg.bgp and cfg.bgp.vips else sorted(
        {canon(l.bind.host) for l in cfg.listeners if l.bind.host not in wild} - elected)
    out = {}
    for v in vips:
        pools: list[str] = []
        for l in cfg.listeners:
            if canon(l.bind.host) == v or (l.bind.host in wild and (":" in v) == (l.bind.host == "::")):
                for p in [l.pool] + [r.pool for r in l.routes]:
                    if p and p not in pools:
                        pools.append(p)
        out[v] = tuple(pools)
    return out


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


def _fd_of(stream, default: int) -> int:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # a test's captured stream
        return default


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
