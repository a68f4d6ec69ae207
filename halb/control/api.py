"""The control API's logic, apart from gRPC: reads a node's parts into reply messages and
carries out admin calls, raising ``ControlError`` (a gRPC status code and a message naming
the problem) for bad requests.

The node's parts are reached only through the interfaces they publish:
``node.pools`` (``halb.model.Pool``), ``node.tables`` (``halb.tables.Tables``),
``node.election`` (``status()`` -> list of instance dicts, ``handover(name)`` raising
KeyError / ValueError) and ``node.sync`` (``status()`` -> list of peer dicts); either of the
last two may be None. Time comes from the node's clocks.
"""

from __future__ import annotations

import base64
import bisect
import inspect
import os
from typing import Any, Iterable

import grpc

from .. import __version__
from ..model import Backend, Pool
from ..v1 import control_pb2 as pb

MAX_PAGE = 1000
DEFAULT_PAGE = 100
MAX_PREFIX = 1024
MAX_KEY = 4096  # table keys are "kind/pool/value"; a page token carries one
KEYS_TTL = 2.0  # seconds a sorted key list serves further pages of the same dump
KEYS_CACHE = 4  # sorted key lists kept at most
MAX_NAME = 256  # longer names cannot exist (config names are <= 63 chars); refuse early


class ControlError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


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
        pool=pool.name, name=b.name, address=f"{b.host}:{b.port}", state=b.state(now),
        healthy=b.healthy, drain=b.admin_drain, weight=max(0, b.weight),
        config_weight=max(0, b.cfg_weight), effective_weight=eff, active=max(0, b.active),
        total=max(0, b.total), failures=max(0, b.failures), backup=b.backup,
        max_conns=max(0, b.max_conns), ewma_rt_seconds=b.ewma_rt)


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
        preempt=bool(_field(d, "preempt", False)), state_seconds=_float(_field(d, "since")))


def peer_msg(d: Any) -> pb.Peer:
    return pb.Peer(
        name=str(_field(d, "name", "")), address=_text(_field(d, "address")),
        connected=bool(_field(d, "connected", False)), state=_text(_field(d, "state")),
        lag_entries=_uint(_field(d, "lag_entries")), lag_seconds=_float(_field(d, "lag_seconds")),
        acked_seq=_uint(_field(d, "acked_seq")), epoch=_uint(_field(d, "epoch")),
        last_error=_text(_field(d, "last_error")), refused=_uint(_field(d, "refused")),
        sent_entries=_uint(_field(d, "sent_entries")),
        received_entries=_uint(_field(d, "received_entries")),
        snapshots_sent=_uint(_field(d, "snapshots_sent")), resumes=_uint(_field(d, "resumes")))


def entry_msg(e: Any) -> pb.TableEntry:
    return pb.TableEntry(key=e.key, pool=e.pool, backend=e.backend, created=e.created,
                         updated=e.updated, expires=e.expires, origin=e.origin, client=e.client,
                         listener=e.listener, proto=e.proto)


# ---------------------------------------------------------------------------------------------
# The calls


class ControlAPI:
    """The control calls over one node; every method raises ControlError for a bad request."""

    def __init__(self, node: Any, started: float):
        self.node = node
        self.started = started  # node.clock time the node was built
        self._keys: dict[tuple[str, str], tuple[float, Any, list[str]]] = {}

    def _now(self) -> float:
        return self.node.clock.now()

    # -- reading ------------------------------------------------------------------------------

    def election_status(self) -> list[pb.Instance]:
        el = getattr(self.node, "election", None)
        if el is None:
            return []
        return [instance_msg(d) for d in (el.status() or ())]

    def sync_status(self) -> list[pb.Peer]:
        sy = getattr(self.node, "sync", None)
        if sy is None:
            return []
        return [peer_msg(d) for d in (sy.status() or ())]

    def status(self) -> pb.StatusReply:
        node = self.node
        now = self._now()
        cfg = node.cfg
        tables = []
        for t in node.tables:
            tables.append(pb.TableInfo(name=t.name, size=len(t), max_entries=t.max_entries,
                                       seq=t.seq, epoch=_uint(getattr(t, "epoch", 0))))
        return pb.StatusReply(
            node=pb.NodeInfo(name=node.name, version=__version__,
                             uptime_seconds=max(0.0, now - self.started), pid=os.getpid(),
                             config=cfg.source),
            election_enabled=getattr(node, "election", None) is not None,
            instances=self.election_status(),
            sync_enabled=getattr(node, "sync", None) is not None,
            sync_ready=bool(getattr(getattr(node, "sync", None), "ready", True)),
            peers=self.sync_status(),
            pools=[pool_msg(p, now) for p in node.pools.values()],
            tables=tables)

    def _backend(self, pool_name: str, backend_name: str) -> tuple[Pool, Backend]:
        _name(pool_name, "pool")
        _name(backend_name, "backend")
        pool = self.node.pools.get(pool_name)
        if pool is None:
            raise _missing(f"no such pool {pool_name!r} (pools: {_names(self.node.pools)})")
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

    async def failover(self, instance: str) -> pb.Instance:
        _name(instance, "instance")
        el = getattr(self.node, "election", None)
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

    def _sorted_keys(self, table: Any, prefix: str) -> list[str]:
        """The table's keys with ``prefix``, sorted; reused for KEYS_TTL so that paging
        through a large table sorts it once, not once per page."""
        now = self._now()
        k = (table.name, prefix)
        hit = self._keys.get(k)
        if hit is not None and now - hit[0] < KEYS_TTL and hit[1] is table:
            return hit[2]
        entries, _ = table.page(0, len(table) + 1, prefix)
        keys = [e.key for e in entries]
        self._keys[k] = (now, table, keys)
        while len(self._keys) > KEYS_CACHE:
            del self._keys[min(self._keys, key=lambda x: self._keys[x][0])]
        return keys

    def dump_table(self, req: pb.DumpTableRequest) -> pb.DumpTableReply:
        """One page of entries sorted by key. The page token is the last key returned, so an
        entry added or removed between pages never makes a later page skip or repeat one."""
        try:
            table = self.node.tables.by_name(req.table)
        except KeyError:
            raise _missing(f"no such table {req.table!r} (tables: sticky, flow)") from None
        size = req.page_size or DEFAULT_PAGE
        if size > MAX_PAGE:
            raise _bad(f"page_size {size} too large (at most {MAX_PAGE})")
        if len(req.prefix) > MAX_PREFIX:
            raise _bad(f"prefix too long ({len(req.prefix)} characters, at most {MAX_PREFIX})")
        after = parse_page_token(req.page_token)
        if after is not None and not after.startswith(req.prefix):
            raise _bad("page_token does not belong to this prefix")
        if after is None:  # a first page lists the keys afresh
            self._keys.pop((table.name, req.prefix), None)
        keys = self._sorted_keys(table, req.prefix)
        start = bisect.bisect_right(keys, after) if after is not None else 0
        out: list[pb.TableEntry] = []
        i = start
        while i < len(keys) and len(out) < size:
            e = table.get(keys[i])  # None: deleted or expired since the keys were listed
            if e is not None:
                out.append(entry_msg(e))
            i += 1
        more = i < len(keys)
        return pb.DumpTableReply(table=table.name, total=len(keys), offset=start, entries=out,
                                 next_page_token=make_page_token(keys[i - 1]) if more else "")


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
