"""The control API's logic, apart from gRPC: reads a node's parts into reply messages and
carries out admin calls, raising ``ControlError`` (a gRPC status code and a message naming
the problem) for bad requests.

The composition root hands it the node's parts in one ``ControlTargets``, never the node, and
they are reached only through the interfaces they publish: ``pools`` (``halb.model.Pool``),
``tables`` (``halb.tables.Tables``), ``election`` (``status()`` -> list of instance dicts,
``handover(name)`` raising KeyError / ValueError), ``sync`` (``status()`` -> list of peer
dicts, ``ready``) and ``nat`` (``status()`` -> dict); each of the last three may be None. Time
comes from the node's monotonic clock (``clock``); ``config`` gives the file the config was
read from (and the control socket's path to the server).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import inspect
import os
import random
import time
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Iterator, Mapping, NamedTuple

import grpc

from .. import __version__
from ..model import Backend, Pool
from ..v1 import control_pb2 as pb

if TYPE_CHECKING:  # pragma: no cover
    from ..clock import Clock
    from ..config import Config
    from ..nat.service import NatService
    from ..sync.service import SyncService
    from ..tables import Tables
    from ..vrrp.election import Election

MAX_PAGE = 1000
DEFAULT_PAGE = 100
MAX_PREFIX = 1024
MAX_KEY = 4096  # table keys are "kind/pool/value"; a page token carries one
KEYS_TTL = 2.0  # seconds a sorted key list serves further pages of the same dump
SORT_STEP = 2048  # keys per step of a table sort: a step takes ~1-3 ms
SORT_SLICE = 0.002  # seconds a table sort runs on the event loop before it lets others run
MAX_NAME = 256  # longer names cannot exist (config names are <= 63 chars); refuse early


class ControlError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bad(msg: str) -> ControlError:
    return ControlError(grpc.StatusCode.INVALID_ARGUMENT, msg)


def _missing(msg: str) -> ControlError:
    return ControlError(grpc.StatusCode.NOT_FOUND, msg)


def _refused(msg: str) -> ControlError:
    return ControlError(grpc.StatusCode.FAILED_PRECONDITION, msg)


def _field(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _text(v: Any) -> str:
    """A state value as text: enums by their lower-case name, None as ""."""
    if v is None:
        return ""
    name = getattr(v, "name", None)
    if isinstance(name, str) and not isinstance(v, str):
        return name.lower()
    return str(v)


def _uint(v: Any) -> int:
    try:
        return max(0, int(v or 0))
    except (TypeError, ValueError):
        return 0


def _float(v: Any) -> float:
    try:
        return float(v or 0.0)
    except (TypeError, ValueError):
        return 0.0


def _name(value: str, what: str) -> str:
    if not value:
        raise _bad(f"{what} name is required")
    if len(value) > MAX_NAME:
        raise _bad(f"{what} name is too long ({len(value)} characters)")
    return value


# ---------------------------------------------------------------------------------------------
# Messages from the node's state


def backend_msg(pool: Pool, b: Backend, now: float) -> pb.BackendStatus:
    view = pool.view
    eff = 0
    for vb, w in zip(view.backends, view.weights):
        if vb is b:
            eff = w
            break
    return pb.BackendStatus(
        pool=pool.name, name=b.name, address=_hostport(b.host, b.port), state=b.state(now),
        healthy=b.healthy, drain=b.admin_drain, weight=max(0, b.weight),
        config_weight=max(0, b.cfg_weight), effective_weight=eff, active=max(0, b.active),
        total=max(0, b.total), failures=max(0, b.failures), backup=b.backup,
        max_conns=max(0, b.max_conns), ewma_rt_seconds=b.ewma_rt, agent=b.agent_said,
        agent_state=_agent_state(b), load=_load(pool, b, now),
        load_reported=b.load_raw if pool.resource and b.load_raw >= 0 else -1.0)


def _load(pool: Pool, b: Backend, now: float) -> float:
    if not pool.resource or b.load < 0 or now - b.load_at > pool.cfg.resource.stale_after:
        return -1.0
    return b.load


def _agent_state(b: Backend) -> str:
    out = []
    if b.agent_weight >= 0:
        out.append(f"weight {b.agent_weight}")
    for flag, word in ((b.agent_drain, "drain"), (b.agent_maint, "maint"), (b.agent_down, "down")):
        if flag:
            out.append(word)
    return ", ".join(out)


def pool_msg(pool: Pool, now: float) -> pb.PoolStatus:
    return pb.PoolStatus(name=pool.name, algorithm=pool.cfg.algorithm, up=pool.up_count(now),
                         backup_active=pool.view.backup,
                         backends=[backend_msg(pool, b, now) for b in pool.backends])


def instance_msg(d: Any) -> pb.Instance:
    vips = _field(d, "vips", ()) or ()
    return pb.Instance(
        name=str(_field(d, "name", "")), vrid=_uint(_field(d, "vrid")),
        interface=str(_field(d, "interface", "") or ""), state=_text(_field(d, "state")),
        priority=_uint(_field(d, "priority")),
        base_priority=_uint(_field(d, "base_priority", _field(d, "priority"))),
        vips=[str(v) for v in vips], master=_text(_field(d, "master")),
        advert_interval=_float(_field(d, "advert_interval")),
        preempt=bool(_field(d, "preempt", False)), state_seconds=_float(_field(d, "since")),
        checksum=_text(_field(d, "checksum")), auth=_text(_field(d, "auth")),
        invalid_adverts={str(k): _uint(v) for k, v in (_field(d, "invalid_adverts", {}) or {}).items()},
        invalid_sources=[pb.InvalidSource(source=_text(_field(x, "source")),
                                          reason=_text(_field(x, "reason")),
                                          count=_uint(_field(x, "count")),
                                          detail=_text(_field(x, "detail")))
                         for x in (_field(d, "invalid_sources", ()) or ())])


def refusal_msg(x: Any) -> pb.Refusal:
    return pb.Refusal(direction=_text(_field(x, "direction")), reason=_text(_field(x, "reason")),
                      remote=_text(_field(x, "remote")), count=_uint(_field(x, "count")),
                      detail=_text(_field(x, "detail")),
                      last_seconds_ago=_float(_field(x, "last_seconds_ago")))


def peer_msg(d: Any) -> pb.Peer:
    return pb.Peer(
        name=str(_field(d, "name", "")), address=_text(_field(d, "address")),
        connected=bool(_field(d, "connected", False)), state=_text(_field(d, "state")),
        lag_entries=_uint(_field(d, "lag_entries")), lag_seconds=_float(_field(d, "lag_seconds")),
        acked_seq=_uint(_field(d, "acked_seq")), epoch=_uint(_field(d, "epoch")),
        last_error=_text(_field(d, "last_error")), refused=_uint(_field(d, "refused")),
        sent_entries=_uint(_field(d, "sent_entries")),
        received_entries=_uint(_field(d, "received_entries")),
        snapshots_sent=_uint(_field(d, "snapshots_sent")), resumes=_uint(_field(d, "resumes")),
        refused_in=_uint(_field(d, "refused_in")), refused_out=_uint(_field(d, "refused_out")),
        refusals=[refusal_msg(x) for x in (_field(d, "refusals", ()) or ())])


def entry_msg(e: Any) -> pb.TableEntry:
    return pb.TableEntry(key=e.key, pool=e.pool, backend=e.backend, created=e.created,
                         updated=e.updated, expires=e.expires, origin=e.origin, client=e.client,
                         listener=e.listener, proto=e.proto)


# ---------------------------------------------------------------------------------------------
# The calls


@dataclass(eq=False)
class ControlTargets:
    """What the control part reads and acts on: the parts of one node, not the node.
    ``config`` is replaced when a reload applies a new one (the rest stays)."""

    name: str  # the node's name
    config: Config  # ``source`` (status) and ``control_socket`` (the server)
    pools: Mapping[str, Pool]
    tables: Tables
    clock: Clock  # monotonic
    election: Election | None = None
    sync: SyncService | None = None
    nat: NatService | None = None
    bgp: Any = None  # halb.bgp.service.BgpService ([bgp]) or None
    # reads the config file again and applies it (Node.reload_file): a ReloadResult
    reload: Callable[[], Awaitable[Any]] | None = None
    # runtime backends (Node.backend_add, backend_del, backend_maint)
    backend_add: Callable[..., Awaitable[Any]] | None = None
    backend_del: Callable[..., Awaitable[Any]] | None = None
    backend_maint: Callable[..., Awaitable[Any]] | None = None
    upgrade: Callable[..., Awaitable[dict]] | None = None  # Node.upgrade
    # listener name -> HttpCache (halb.proxy.cache) of the listeners that have one
    http_caches: Callable[[], Mapping[str, Any]] | None = None


class ControlAPI:
    """The control calls over one node; every method raises ControlError for a bad request."""

    def __init__(self, targets: ControlTargets, started: float):
        self.targets = targets
        self.started = started  # clock time the node was built
        self._keys: dict[str, _Keys] = {}  # table name -> its one cached sorted key list
        self._sorting: dict[str, tuple[Any, str, asyncio.Future]] = {}  # table name -> sort under way
        self.refusals: Any = None  # the control server's RefusalLog (TLS on control.address)

    def _now(self) -> float:
        return self.targets.clock.now()

    # -- reading ------------------------------------------------------------------------------

    def election_status(self) -> list[pb.Instance]:
        el = self.targets.election
        if el is None:
            return []
        return [instance_msg(d) for d in (el.status() or ())]

    def sync_status(self) -> list[pb.Peer]:
        sy = self.targets.sync
        if sy is None:
            return []
        return [peer_msg(d) for d in (sy.status() or ())]

    def status(self) -> pb.StatusReply:
        tg = self.targets
        now = self._now()
        tables = []
        for t in tg.tables:
            tables.append(pb.TableInfo(name=t.name, size=len(t), max_entries=t.max_entries,
                                       seq=t.seq, epoch=_uint(getattr(t, "epoch", 0))))
        return pb.StatusReply(
            node=pb.NodeInfo(name=tg.name, version=__version__,
                             uptime_seconds=max(0.0, now - self.started), pid=os.getpid(),
                             config=tg.config.source),
            election_enabled=tg.election is not None,
            instances=self.election_status(),
            sync_enabled=tg.sync is not None,
            sync_ready=bool(getattr(tg.sync, "ready", True)),
            peers=self.sync_status(),
            pools=[pool_msg(p, now) for p in tg.pools.values()],
            tables=tables,
            control_refusals=[refusal_msg(x) for x in
                              (self.refusals.as_list() if self.refusals is not None else ())],
            nat=self.nat_status(), bgp=self.bgp_status())

    def bgp_status(self) -> pb.BgpStatus | None:
        bgp = self.targets.bgp
        if bgp is None:
            return None
        d = bgp.status()
        return pb.BgpStatus(
            speaker=d["speaker"], asn=d["asn"], leaving=d["leaving"],
            speaker_error=d["speaker_error"],
            vips=[pb.BgpVip(vip=v["vip"], prefix=v["prefix"], announced=v["announced"],
                            reason=v["reason"], pools=v["pools"]) for v in d["vips"]],
            sessions=[pb.BgpSession(peer=r["peer"], remote_as=r["remote_as"], state=r["state"],
                                    uptime_seconds=r["uptime_ms"] / 1000.0,
                                    prefixes_sent=r["prefixes_sent"], bfd=r["bfd"])
                      for r in d["sessions"]],
            announcements=_uint(d["counts"]["announcements"]),
            withdrawals=_uint(d["counts"]["withdrawals"]))

    async def leave_node(self, req: pb.LeaveNodeRequest) -> pb.NodeBgpReply:
        bgp = self.targets.bgp
        if bgp is None:
            raise _refused("this node announces nothing over BGP (no [bgp] in its config)")
        wait = req.wait_seconds if req.HasField("wait_seconds") else None
        if wait is not None and not 0.0 <= wait <= 600.0:
            raise _bad(f"wait {wait} out of range (0..600 s)")
        t0 = time.monotonic()
        withdrawn = await bgp.leave(wait)
        return pb.NodeBgpReply(withdrawn=withdrawn, announced=sorted(bgp.core.announced),
                               waited_seconds=time.monotonic() - t0)

    async def join_node(self) -> pb.NodeBgpReply:
        bgp = self.targets.bgp
        if bgp is None:
            raise _refused("this node announces nothing over BGP (no [bgp] in its config)")
        return pb.NodeBgpReply(announced=await bgp.join())

    def nat_status(self) -> pb.NatStatus | None:
        nat = self.targets.nat
        if nat is None:
            return None
        d = nat.status()
        c, core = d["counts"], d["core"]
        return pb.NatStatus(
            table=d["table"], replicate=d["replicate"],
            listeners=[pb.NatListener(name=x["name"], protocol=x["proto"], vip=x["vip"],
                                      port=x["port"], pool=x["pool"], held=x["held"],
                                      backends_in_map=x["backends_in_map"])
                       for x in d["listeners"]],
            injected=c["injected"], refreshed=c["refreshed"], removed=c["removed"],
            inject_errors={k: _uint(v) for k, v in d["inject_errors"].items()},
            events_lost=c["overruns"], reconciles=c["reconciles"],
            recorded=core["recorded"], ended=core["ended"],
            replicate_after_packets=d["replicate_after_packets"])

    def _backend(self, pool_name: str, backend_name: str) -> tuple[Pool, Backend]:
        _name(pool_name, "pool")
        _name(backend_name, "backend")
        pools = self.targets.pools
        pool = pools.get(pool_name)
        if pool is None:
            raise _missing(f"no such pool {pool_name!r} (pools: {_names(pools)})")
        b = pool.by_name.get(backend_name)
        if b is None:
            raise _missing(f"no such backend {backend_name!r} in pool {pool_name!r} "
                           f"(backends: {_names(pool.by_name)})")
        return pool, b

    # -- admin --------------------------------------------------------------------------------

    def drain(self, pool_name: str, backend_name: str, drain: bool) -> pb.BackendStatus:
        pool, b = self._backend(pool_name, backend_name)
        now = self._now()
        pool.set_drain(b, drain, now)
        return backend_msg(pool, b, now)

    def set_weight(self, pool_name: str, backend_name: str, weight: int) -> pb.BackendStatus:
        pool, b = self._backend(pool_name, backend_name)
        if not 0 <= weight <= 256:
            raise _bad(f"weight {weight} out of range (0..256)")
        now = self._now()
        try:
            pool.set_weight(b, weight, now)
        except ValueError as e:
            raise _bad(str(e)) from None
        return backend_msg(pool, b, now)

    def cache_purge(self, prefix: str, host: str, listener: str) -> pb.CachePurgeReply:
        caches = dict(self.targets.http_caches() if self.targets.http_caches else {})
        if not caches:
            raise _refused("no listener of this node has an HTTP cache ([listeners.cache])")
        if listener:
            if listener not in caches:
                raise ControlError(grpc.StatusCode.NOT_FOUND,
                                   f"listener {listener!r} has no HTTP cache (caches: "
                                   f"{', '.join(sorted(caches))})")
            caches = {listener: caches[listener]}
        if len(prefix) > 8192 or len(host) > 1024:
            raise _bad("prefix or host too long")
        n = sum(c.purge(prefix, host) for c in caches.values())
        return pb.CachePurgeReply(purged=n, listeners=sorted(caches),
                                  entries=sum(c.entries for c in caches.values()),
                                  bytes=sum(c.size for c in caches.values()))

    async def reload(self) -> pb.ReloadReply:
        fn = self.targets.reload
        if fn is None:
            raise _refused("this node cannot reload (no config file)")
        r = await fn()
        return pb.ReloadReply(ok=r.ok, changes=r.changes, errors=r.errors,
                              config=self.targets.config.source)

    async def add_backend(self, req: pb.AddBackendRequest) -> pb.BackendStatus:
        from ..config import BackendConfig, NAME_RE, parse_endpoint
        tg = self.targets
        if tg.backend_add is None:
            raise _refused("this node cannot change backends at run time")
        _name(req.pool, "pool")
        _name(req.name, "backend")
        pool = tg.pools.get(req.pool)
        if pool is None:
            raise _missing(f"no such pool {req.pool!r} (pools: {_names(tg.pools)})")
        if pool.cfg.name in self._nat_pools():
            raise _refused(f"pool {req.pool!r} serves a NAT listener: change it in the config "
                           f"file (its backends are kernel rules)")
        if not NAME_RE.match(req.name):
            raise _bad(f"invalid backend name {req.name!r} (letters, digits, '_', '.', '-'; "
                       f"at most 63)")
        if req.name in pool.by_name:
            raise _bad(f"pool {req.pool!r} already has a backend {req.name!r}")
        try:
            addr = parse_endpoint(req.address)
        except ValueError as e:
            raise _bad(f"address {req.address!r}: {e}") from None
        weight = req.weight if req.HasField("weight") else 1
        if not 0 <= weight <= 256:
            raise _bad(f"weight {weight} out of range (0..256)")
        if req.max_conns > 1_000_000:
            raise _bad(f"max_conns {req.max_conns} out of range (0..1000000)")
        b = BackendConfig(name=req.name, address=addr, weight=weight, backup=req.backup,
                          max_conns=req.max_conns)
        r = await tg.backend_add(req.pool, b)
        if not r.ok:
            raise _refused("; ".join(r.errors))
        return backend_msg(pool, pool.by_name[req.name], self._now())

    def _nat_pools(self) -> set[str]:
        return {lc.pool for lc in self.targets.config.listeners if lc.mode == "nat"}

    async def delete_backend(self, pool_name: str, backend_name: str) -> pb.BackendStatus:
        tg = self.targets
        if tg.backend_del is None:
            raise _refused("this node cannot change backends at run time")
        pool, b = self._backend(pool_name, backend_name)
        if pool_name in self._nat_pools():
            raise _refused(f"pool {pool_name!r} serves a NAT listener: change it in the config file")
        if len(pool.backends) == 1:
            raise _refused(f"{backend_name!r} is the last backend of pool {pool_name!r}")
        r = await tg.backend_del(pool_name, backend_name)
        if not r.ok:
            raise _refused("; ".join(r.errors))
        return backend_msg(pool, b, self._now())

    async def set_maintenance(self, pool_name: str, backend_name: str,
                              on: bool) -> pb.BackendStatus:
        tg = self.targets
        if tg.backend_maint is None:
            raise _refused("this node cannot change backends at run time")
        pool, b = self._backend(pool_name, backend_name)
        await tg.backend_maint(pool_name, backend_name, on)
        return backend_msg(pool, b, self._now())

    async def upgrade(self, req: pb.UpgradeRequest) -> pb.UpgradeReply:
        fn = self.targets.upgrade
        if fn is None:
            raise _refused("this node cannot upgrade in place")
        drain = req.drain_seconds if req.HasField("drain_seconds") else 30.0
        if not 0.0 <= drain <= 3600.0:
            raise _bad(f"drain {drain} out of range (0..3600 s)")
        r = await fn(drain)
        return pb.UpgradeReply(ok=r["ok"], pid=r["pid"], error=r["error"])

    async def failover(self, instance: str) -> pb.Instance:
        _name(instance, "instance")
        el = self.targets.election
        if el is None:
            raise _missing(f"no such instance {instance!r}: this node runs no election "
                           "(no [[vrrp]] in its config)")
        try:
            r = el.handover(instance)
            if inspect.isawaitable(r):
                await r
        except KeyError:
            names = [i.name for i in self.election_status()]
            raise _missing(f"no such instance {instance!r} (instances: "
                           f"{', '.join(names) or 'none'})") from None
        except ValueError as e:
            why = str(e) if repr(instance) in str(e) else f"instance {instance!r}: {e}"
            raise _refused(f"cannot hand over: {why}") from None
        for i in self.election_status():
            if i.name == instance:
                return i
        return pb.Instance(name=instance)

    def _drop_keys(self, name: str, only: "_Keys | None" = None) -> None:
        c = self._keys.get(name)
        if c is not None and (only is None or c is only):
            del self._keys[name]
            _release_later(c.keys)

    def _drop_stale_keys(self) -> None:
        now = self._now()
        for name in [n for n, c in self._keys.items() if now - c.at >= KEYS_TTL]:
            self._drop_keys(name)

    async def _sorted_keys(self, table: Any, prefix: str, fresh: bool) -> "SortedKeys":
        """The table's keys with ``prefix``, sorted. A first page (``fresh``) sorts them anew;
        later pages reuse that list for KEYS_TTL, so paging through a large table sorts it
        once, not once per page. One list is kept per table (keys only), and one sort runs per
        table at a time: a request for the prefix being sorted joins that sort."""
        while True:
            keys = await self._sorted_keys_once(table, prefix, fresh)
            if not keys.released:  # (dropped from the cache while this request waited)
                return keys
            fresh = True

    async def _sorted_keys_once(self, table: Any, prefix: str, fresh: bool) -> "SortedKeys":
        name = table.name
        self._drop_stale_keys()
        while True:
            c = self._keys.get(name)
            if not fresh and c is not None and c.table is table and c.prefix == prefix:
                return c.keys
            running = self._sorting.get(name)
            if running is None:
                break
            if running[0] is table and running[1] == prefix:
                return await asyncio.shield(running[2])
            await asyncio.wait([running[2]])  # another prefix of this table: after it
        task = asyncio.ensure_future(self._sort(table, prefix))
        task.add_done_callback(_retrieve)
        self._sorting[name] = (table, prefix, task)
        return await asyncio.shield(task)  # a caller that gives up leaves the list to the next

    async def _sort(self, table: Any, prefix: str) -> "SortedKeys":
        """Sorts a copy of the table's keys in short steps between the event loop's other
        work (see ``sort_keys_async``), so that VRRP adverts, health checks and traffic go on
        while a large table is sorted; only the copy of the keys is one step."""
        name = table.name
        try:
            keys = table_keys(table)  # on the loop: the table must not change while copied
            keys = await sort_keys_async(keys, prefix)
            self._drop_keys(name)
            c = self._keys[name] = _Keys(self._now(), table, prefix, keys)
            # memory: the list goes after its useful life even if no dump comes again
            asyncio.get_running_loop().call_later(KEYS_TTL, self._drop_keys, name, c)
            return keys
        finally:
            running = self._sorting.get(name)
            if running is not None and running[2] is asyncio.current_task():
                del self._sorting[name]

    async def dump_table(self, req: pb.DumpTableRequest) -> pb.DumpTableReply:
        """One page of entries sorted by key. The page token is the last key returned, so an
        entry added or removed between pages never makes a later page skip or repeat one."""
        try:
            table = self.targets.tables.by_name(req.table)
        except KeyError:
            raise _missing(f"no such table {req.table!r} (tables: sticky, flow, nat)") from None
        size = req.page_size or DEFAULT_PAGE
        if size > MAX_PAGE:
            raise _bad(f"page_size {size} too large (at most {MAX_PAGE})")
        if len(req.prefix) > MAX_PREFIX:
            raise _bad(f"prefix too long ({len(req.prefix)} characters, at most {MAX_PREFIX})")
        after = parse_page_token(req.page_token)
        if after is not None and not after.startswith(req.prefix):
            raise _bad("page_token does not belong to this prefix")
        keys = await self._sorted_keys(table, req.prefix, fresh=after is None)
        start = keys.index_after(after) if after is not None else 0
        out: list[pb.TableEntry] = []
        i, last = start, ""
        for key in keys.iter_from(start):
            if len(out) >= size:
                break
            e = table.get(key)  # None: deleted or expired since the keys were listed
            if e is not None:
                out.append(entry_msg(e))
            i, last = i + 1, key
        more = i < len(keys)
        return pb.DumpTableReply(table=table.name, total=len(keys), offset=start, entries=out,
                                 next_page_token=make_page_token(last) if more else "")


class _Keys(NamedTuple):
    at: float  # clock time the list was made
    table: Any
    prefix: str
    keys: "SortedKeys"


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # a failed sort nobody waits for any more is not logged as unretrieved


# ---------------------------------------------------------------------------------------------
# Sorting a large table without stopping the event loop
#
# A single sorted() call over a table's keys runs for 0.2 s at 262,144 keys and for seconds at
# millions, and it holds the GIL throughout: run in a worker thread (asyncio.to_thread), it
# stops the event loop just as long. So the keys are sorted on the loop itself, in steps of a
# few thousand keys (a sample sort: no step touches all keys), giving the loop back every
# SORT_SLICE; they are kept, and freed, as sorted chunks of that size. Chunks are tuples of
# strings, which the garbage collector stops scanning after one pass. What is left in one go:
# the copy of the table's keys (a C-speed list copy, ~20-30 ms per million keys) and, should a
# garbage collection run while the copy and the buckets are young, one scan of them (~50 ms
# per million keys): harmless at the flow table's 262,144, noticeable at millions of keys.


class SortedKeys:
    """Keys in order, held as consecutive sorted chunks (tuples of a few thousand keys)."""

    __slots__ = ("chunks", "firsts", "starts", "total", "released")

    def __init__(self, chunks: list[tuple[str, ...]]):
        self.chunks = chunks
        self.firsts = [c[0] for c in chunks]
        self.starts: list[int] = []
        n = 0
        for c in chunks:
            self.starts.append(n)
            n += len(c)
        self.total = n
        self.released = False  # emptied by ``_release_later``: sort again

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[str]:
        return self.iter_from(0)

    def index_after(self, key: str) -> int:
        """The position of the first key greater than ``key``."""
        ci = bisect.bisect_right(self.firsts, key) - 1
        if ci < 0:
            return 0
        return self.starts[ci] + bisect.bisect_right(self.chunks[ci], key)

    def iter_from(self, pos: int) -> Iterator[str]:
        ci = bisect.bisect_right(self.starts, pos) - 1
        if ci < 0 or pos >= self.total:
            return
        first = self.chunks[ci]
        for i in range(pos - self.starts[ci], len(first)):
            yield first[i]
        for c in islice(self.chunks, ci + 1, None):
            yield from c


def table_keys(table: Any) -> list[str]:
    """A copy of the table's keys, unsorted: a C-speed copy of its dict (~30 ms per million
    keys), not a list of Entry objects."""
    entries = getattr(table, "_entries", None)
    if isinstance(entries, dict):
        return list(entries)
    return [e.key for e in table.entries()]


def sort_keys(keys: list[str], prefix: str = "", step: int = SORT_STEP) -> SortedKeys:
    """The distinct ``keys`` that start with ``prefix``, sorted, in one go (tests, tools)."""
    chunks: list[tuple[str, ...]] = []
    for _ in _sort_steps(keys, prefix, step, chunks):
        pass
    return SortedKeys(chunks)


async def sort_keys_async(keys: list[str], prefix: str = "", step: int = SORT_STEP,
                          slice_seconds: float = SORT_SLICE) -> SortedKeys:
    """``sort_keys`` on the event loop, giving the loop back every ``slice_seconds``."""
    chunks: list[tuple[str, ...]] = []
    clock = time.perf_counter
    t = clock()
    for _ in _sort_steps(keys, prefix, step, chunks):
        if clock() - t >= slice_seconds:
            await asyncio.sleep(0)
            t = clock()
    return SortedKeys(chunks)


def _sort_steps(keys: list[str], prefix: str, step: int, out: list) -> Iterator[None]:
    """Sorts the distinct ``keys`` with ``prefix`` into ``out`` as sorted chunks, yielding
    after every step of at most a few thousand keys. Empties ``keys``, in steps too: freeing
    a long list at once takes as long as copying it."""
    if prefix:
        mine: list[str] = []
        for i in range(0, len(keys), step):
            mine += [k for k in keys[i:i + step] if k.startswith(prefix)]
            yield
        yield from _release(keys, step)
        keys = mine
    yield from _sort_into(keys, max(4, step), out, random.Random(len(keys)))


def _sort_into(keys: list[str], step: int, out: list, rnd: random.Random) -> Iterator[None]:
    """Sample sort: the keys go into buckets between splitters drawn from a random sample (a
    binary search per key), then each bucket, a few thousand keys, is sorted on its own;
    a bucket that came out too large is split again the same way. Empties ``keys``."""
    n = len(keys)
    if n <= 2 * step:
        if n:
            keys.sort()
            out.append(tuple(keys))
            keys.clear()
            yield
        return
    nb = n // step  # buckets
    over = max(2, min(8, step // 2))  # samples per bucket (bucket sizes within ~3x of step),
    # at least 2 (each splitter has samples on both sides: every bucket is smaller than n),
    # at most step / 2 (the sample is at most half the keys)
    sample = rnd.sample(keys, nb * over)
    yield
    ordered: list[tuple[str, ...]] = []
    yield from _sort_into(sample, step, ordered, rnd)
    splitters = [k for c in ordered for k in c][over:nb * over:over]
    del ordered
    buckets: list[list[str]] = [[] for _ in range(len(splitters) + 1)]
    adds = [b.append for b in buckets]
    find = bisect.bisect_right
    for i in range(0, n, step):
        for k in keys[i:i + step]:
            adds[find(splitters, k)](k)
        yield
    del adds
    yield from _release(keys, step)
    for i, b in enumerate(buckets):
        buckets[i] = []
        yield from _sort_into(b, step, out, rnd)


def _release(keys: list, step: int = SORT_STEP) -> Iterator[None]:
    """Empties a list a step at a time, from its end (no moves)."""
    while keys:
        del keys[-step:]
        yield


def _release_chunks(chunks: list, loop: asyncio.AbstractEventLoop | None) -> None:
    t = time.perf_counter()
    while chunks:
        chunks.pop()
        if loop is not None and chunks and time.perf_counter() - t >= SORT_SLICE:
            loop.call_soon(_release_chunks, chunks, loop)  # the rest after others ran
            return


def _release_later(keys: SortedKeys) -> None:
    """Frees a sorted key list a chunk at a time, between the event loop's other work
    (freeing millions of keys at once would stop the loop for a good part of a second)."""
    chunks = keys.chunks
    if len(chunks) < 8:
        return  # small: freeing it at once is cheap
    keys.chunks, keys.firsts, keys.starts, keys.total, keys.released = [], [], [], 0, True
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    _release_chunks(chunks, loop)


def make_page_token(last_key: str) -> str:
    return "k" + base64.urlsafe_b64encode(last_key.encode()).decode()


def parse_page_token(token: str) -> str | None:
    """The last key of the previous page, or None for the first page."""
    if not token:
        return None
    try:
        if len(token) > 4 * MAX_KEY or not token.startswith("k"):
            raise ValueError
        return base64.urlsafe_b64decode(token[1:].encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise _bad(f"invalid page_token {token[:40]!r} (pass next_page_token of the previous "
                   "page)") from None


def _names(d: Iterable[str], limit: int = 20) -> str:
    names = list(d)
    s = ", ".join(names[:limit])
    if len(names) > limit:
        s += f", ... ({len(names)} in all)"
    return s or "none"
