"""Replicated tables: the sticky-session table and the flow/NAT table.

A ``Table`` is a plain bounded map of key -> ``Entry`` with TTLs (wall-clock, because entries
travel between nodes) and a change log of numbered ``Change`` records (create, refresh,
delete, expire). The state-sync layer ships that log; a peer feeds what it receives into
``apply()``, which resolves conflicting writes deterministically (newer ``updated`` wins, then
the greater ``origin`` node name), so every node converges on the same table.

Bounds: ``max_entries`` (the entry expiring soonest is evicted, logged as EXPIRE) and
``log_size`` (a reader further behind than the log gets ``None`` from ``changes_since`` and
must take a snapshot). Refreshes of a busy entry are logged at most once per quarter TTL.
Deleted keys leave tombstones (bounded like the entries) so that an older version arriving
late from a peer cannot bring an entry back; a table that has no peers
(``tombstones=False``, a node without ``[sync]``) keeps none.

Pure code: no I/O; time comes from the injected clock.
"""

from __future__ import annotations

import heapq
import random
from itertools import islice
from collections import deque
from enum import IntEnum
from typing import Callable, Iterable, Iterator, NamedTuple

from .clock import Clock, WallClock


class Op(IntEnum):
    CREATE = 1
    REFRESH = 2
    DELETE = 3
    EXPIRE = 4


class Entry(NamedTuple):
    """One table entry. Immutable: a change makes a new version (``_replace``).

    Inside a table, entries and change records are stored as plain tuples of strings, floats
    and ints, which CPython's garbage collector stops tracking after one pass (it does so for
    exact tuples only, not for NamedTuple instances); readers get ``Entry`` views. With
    100,000s of tracked entry objects a full collection stopped the node for 360 ms (200,000
    entries), the stalls the failover demo showed; with plain tuples it is a few milliseconds.
    """

    key: str
    backend: str  # backend name within ``pool``
    pool: str
    created: float
    updated: float
    expires: float
    origin: str  # node that wrote this version
    client: str = ""  # flow table: client "ip:port"
    listener: str = ""
    proto: str = ""  # flow table: "tcp" | "udp"

    def wins_over(self, other: "Entry") -> bool:
        return (self.updated, self.origin) > (other.updated, other.origin)


# module constants as plain ints: an enum member lookup costs more than the rest of a table
# operation, and a Change holding an enum member (an object the GC tracks) would stay tracked.
# Plain ints compare equal to the Op members.
_CREATE, _REFRESH, _DELETE, _EXPIRE = 1, 2, 3, 4
_REMOVALS = frozenset((_DELETE, _EXPIRE))


class Change(NamedTuple):  # immutable; a NamedTuple is built several times faster than a frozen dataclass
    seq: int
    op: int  # an Op value (a plain int: Op members compare equal to it)
    entry: Entry  # the entry as of this change


_new = tuple.__new__


def _view(t: tuple) -> Entry:
    """The Entry view of a stored plain tuple (no copy of the fields)."""
    return _new(Entry, t)


class Table:
    def __init__(self, name: str, *, node: str, clock: Clock | None = None,
                 max_entries: int = 100_000, log_size: int = 100_000,
                 epoch: int | None = None, tombstones: bool = True):
        if max_entries < 1 or log_size < 1:
            raise ValueError("max_entries and log_size must be positive")
        self.name = name
        self.node = node
        self.clock = clock or WallClock()
        self.max_entries = max_entries
        self.epoch = epoch if epoch is not None else random.getrandbits(63) or 1
        self.seq = 0
        self._entries: dict[str, tuple] = {}  # key -> plain tuple in Entry field order
        self._heap: list[tuple[float, str]] = []
        self._log: deque[tuple] = deque(maxlen=log_size)  # plain (seq, op, entry tuple)
        self._logged_expiry: dict[str, float] = {}
        # deleted keys -> (updated, origin, until): an older version of a deleted entry that
        # arrives late (through another peer) must not bring it back; bounded like the entries
        self._tombs: dict[str, tuple[float, str, float]] = {}
        self._tomb_holes = 0  # keys purged from _tombs since it was last rebuilt
        self.keep_tombs = tombstones
        self.expire_more = False  # the last expire() stopped at its limit
        self.listeners: list[Callable[[Change], None]] = []
        # called with (op, entry) for every change a peer's version made here (``apply``
        # returned True), logged or not: a part that mirrors the table elsewhere (the kernel
        # NAT mode's conntrack entries) hears about remote writes this way
        self.on_apply: list[Callable[[int, Entry], None]] = []
        self.stats = {"created": 0, "refreshed": 0, "deleted": 0, "expired": 0, "evicted": 0,
                      "applied": 0, "conflicts_lost": 0}

    # -- reading ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def get(self, key: str) -> Entry | None:
        t = self._entries.get(key)
        if t is None:
            return None
        e = _new(Entry, t)
        if e.expires <= self.clock.now():
            self._remove(e, _EXPIRE)
            return None
        return e

    def entries(self) -> Iterator[Entry]:
        return iter([_new(Entry, t) for t in self._entries.values()])

    def page(self, offset: int, limit: int, prefix: str = "") -> tuple[list[Entry], int]:
        """Entries sorted by key, for paged dumps; returns (page, total matching)."""
        keys = sorted(k for k in self._entries if k.startswith(prefix))
        return [_new(Entry, self._entries[k]) for k in keys[offset:offset + limit]], len(keys)

    # -- local writes -------------------------------------------------------------------------

    def put(self, key: str, backend: str, ttl: float, *, pool: str = "", client: str = "",
            listener: str = "", proto: str = "") -> Entry:
        now = self.clock.now()
        old = self._entries.get(key)
        if old is not None:
            old = _new(Entry, old)
        if old is not None and old.expires > now and old.backend == backend and old.pool == pool:
            return self._refresh(old, now, ttl)
        if old is None and len(self._entries) >= self.max_entries:
            self.expire(limit=64)  # bounded work on the data path
            if len(self._entries) >= self.max_entries:
                self._evict_one()
        created = old.created if old is not None and old.expires > now else now
        e = Entry(key, backend, pool, created, now, now + ttl, self.node, client, listener, proto)
        self._store(e)
        self._log_change(_CREATE, e)
        self.stats["created"] += 1
        return e

    def touch(self, key: str, ttl: float) -> Entry | None:
        """Marks activity on an entry and pushes its expiry out; None if it is gone."""
        e = self.get(key)
        if e is not None:
            e = self._refresh(e, self.clock.now(), ttl)
        return e

    def delete(self, key: str) -> bool:
        t = self._entries.get(key)
        if t is None:
            return False
        self._remove(_new(Entry, t), _DELETE)
        return True

    def expire(self, limit: int = 1_000_000) -> int:
        """Removes expired entries; returns how many. Does at most ``limit`` steps of work
        (heap pops, including the stale ones deleted entries leave behind, and purged
        tombstones), so a caller can yield to the event loop between chunks: ``expire_more``
        tells whether work was left."""
        now = self.clock.now()
        n = 0
        work = 0
        h = self._heap
        while h and h[0][0] <= now and work < limit:
            exp, key = heapq.heappop(h)
            work += 1
            t = self._entries.get(key)
            if t is not None and t[5] == exp:
                self._remove(_new(Entry, t), _EXPIRE, from_heap=True)
                n += 1
        if self._tombs and work < limit:
            work += self._purge_tombs(now, limit - work)
        self.expire_more = work >= limit
        return n

    def clear(self) -> None:
        """Drops every entry without logging (a fresh snapshot will follow)."""
        self._entries.clear()
        self._heap.clear()
        self._logged_expiry.clear()
        self._tombs.clear()

    # -- replication --------------------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        return self._log[0][0] if self._log else self.seq + 1

    def changes_since(self, seq: int, limit: int = 1 << 30) -> list[Change] | None:
        """Changes after ``seq``, oldest first; None if the log no longer reaches back that far."""
        if seq >= self.seq:
            return []
        first = self.first_seq
        if seq + 1 < first:
            return None
        start = seq + 1 - first
        log = self._log
        tail = len(log) - start
        if tail <= start:  # a reader near the end (the usual case): walk from the right end
            raw = list(islice(reversed(log), tail))
            raw.reverse()
            raw = raw[:limit]
        else:  # islice walks the deque once; indexing it element by element is O(n) per index
            raw = islice(log, start, start + limit)
        return [Change(q, o, _new(Entry, t)) for q, o, t in raw]

    def snapshot(self) -> tuple[int, list[Entry]]:
        """(sequence number the snapshot is consistent with, copies of every live entry)."""
        now = self.clock.now()
        return self.seq, [_new(Entry, t) for t in self._entries.values() if t[5] > now]

    def tombstones(self) -> list[Entry]:
        """Recent deletions as entries (op DELETE) for snapshots: a snapshot must also say what
        is gone, or a stale copy a follower got from a third node would live on."""
        now = self.clock.now()
        return [Entry(k, "", "", upd, upd, until, origin)
                for k, (upd, origin, until) in self._tombs.items() if until > now]

    def apply(self, op: Op, entry: Entry, *, log: bool = True) -> bool:
        """Applies a change received from a peer; True if it changed this table.

        The change is logged here too (with its origin kept) unless ``log`` is False. State
        sync passes False: in its full mesh every node hears each change from its origin, it
        ships only its own changes, and remote changes flooding the bounded log would push
        this node's own changes out of its followers' reach (and cost twice the time).
        """
        now = self.clock.now()
        local = self._entries.get(entry.key)
        if local is not None:
            local = _new(Entry, local)
        if op in _REMOVALS:
            if local is None:
                if op == _DELETE:
                    self._tomb(entry.key, entry.updated, entry.origin, entry.expires)
                return False
            if op == _EXPIRE and (local.expires > entry.expires or entry.expires > entry.updated):
                # the version that expired there is older than ours, or it was evicted there
                # before its time (that node's capacity, not the entry's end)
                return False
            if local.wins_over(entry):
                self.stats["conflicts_lost"] += 1
                return False
            self._remove(local, op, origin=entry.origin, updated=entry.updated, log=log)
            self.stats["applied"] += 1
            for fn in self.on_apply:
                fn(op, entry)
            return True
        if entry.expires <= now:
            return False
        if local is not None and not entry.wins_over(local):
            if local != entry and local.updated != entry.updated:
                self.stats["conflicts_lost"] += 1
            return False
        if local is None and self._tombs:
            t = self._tombs.get(entry.key)
            if t is not None and (entry.updated, entry.origin) <= (t[0], t[1]):
                self.stats["conflicts_lost"] += 1
                return False
        if local is None and len(self._entries) >= self.max_entries:
            self.expire(limit=64)
            if len(self._entries) >= self.max_entries:
                self._evict_one()
        e = entry
        self._store(e)
        if log:
            self._log_change(op if local is None or op == _REFRESH else _CREATE, e)
        self.stats["applied"] += 1
        for fn in self.on_apply:
            fn(op, e)
        return True

    # -- internals ----------------------------------------------------------------------------

    def _store(self, e: Entry) -> None:
        self._entries[e.key] = tuple(e)
        if self._tombs:
            self._tombs.pop(e.key, None)
        heapq.heappush(self._heap, (e.expires, e.key))
        self._logged_expiry[e.key] = e.expires
        if len(self._heap) > 2 * len(self._entries) + 1024:
            self._heap = [(x[5], x[0]) for x in self._entries.values()]
            heapq.heapify(self._heap)

    def _refresh(self, e: Entry, now: float, ttl: float) -> Entry:
        new_exp = now + ttl
        if new_exp <= e.expires:
            return e
        key = e.key
        heapq.heappush(self._heap, (new_exp, key))
        last = self._logged_expiry.get(key, 0.0)
        if new_exp - last >= ttl * 0.25:
            e = e._replace(expires=new_exp, updated=now, origin=self.node)
            self._entries[key] = tuple(e)
            self._logged_expiry[key] = new_exp
            self._log_change(_REFRESH, e)
            self.stats["refreshed"] += 1
        else:
            e = e._replace(expires=new_exp)
            self._entries[key] = tuple(e)
        if len(self._heap) > 2 * len(self._entries) + 1024:
            self._heap = [(x[5], x[0]) for x in self._entries.values()]
            heapq.heapify(self._heap)
        return e

    def _remove(self, e: Entry, op: Op, *, from_heap: bool = False, origin: str | None = None,
                updated: float | None = None, log: bool = True) -> None:
        del self._entries[e.key]
        self._logged_expiry.pop(e.key, None)
        gone = e._replace(origin=origin or self.node,
                          updated=updated if updated is not None else max(self.clock.now(), e.updated))
        if op == _DELETE:
            self._tomb(e.key, gone.updated, gone.origin, e.expires)
        if log:
            self._log_change(op, gone)
        self.stats["deleted" if op == _DELETE else "expired"] += 1

    def _tomb(self, key: str, updated: float, origin: str, until: float) -> None:
        if not self.keep_tombs:
            return
        t = self._tombs.pop(key, None)
        if t is not None and (t[0], t[1]) > (updated, origin):
            updated, origin, until = t[0], t[1], max(t[2], until)
        self._tombs[key] = (updated, origin, until)
        if len(self._tombs) > self.max_entries:
            del self._tombs[next(iter(self._tombs))]
            self._tombs_removed(1)

    def _purge_tombs(self, now: float, limit: int) -> int:
        # insertion order is close to expiry order; a long-lived one at the front only delays
        # the purge of the ones behind it, the size bound still holds
        tombs = self._tombs
        dead = []
        for k, t in tombs.items():  # one pass (next(iter()) per key rescans the freed slots)
            if t[2] > now or len(dead) >= limit:
                break
            dead.append(k)
        for k in dead:
            del tombs[k]
        self._tombs_removed(len(dead))
        return len(dead)

    def _tombs_removed(self, n: int) -> None:
        # a dict keeps the slots of deleted keys until it grows, and iterating from the front
        # walks them all: once they outnumber both 4096 and the live keys, it is rebuilt compact
        self._tomb_holes += n
        if self._tomb_holes > 4096 and self._tomb_holes > len(self._tombs):
            self._tombs = dict(self._tombs)
            self._tomb_holes = 0

    def _evict_one(self) -> None:
        h = self._heap
        while h:
            exp, key = heapq.heappop(h)
            t = self._entries.get(key)
            if t is not None and t[5] == exp:
                self._remove(_new(Entry, t), _EXPIRE, from_heap=True)
                self.stats["evicted"] += 1
                return

    def _log_change(self, op: Op, e: Entry) -> None:
        self.seq += 1
        op = int(op)
        self._log.append((self.seq, op, tuple(e)))
        if self.listeners:
            ch = Change(self.seq, op, e)
            for fn in self.listeners:
                fn(ch)


class Tables:
    """The node's replicated tables: sticky sessions, the proxies' flows, and the kernel NAT
    mode's conntrack entries (``nat``: one entry per NAT'ed connection, see halb.nat)."""

    NAMES = ("sticky", "flow", "nat")

    def __init__(self, node: str, clock: Clock | None = None, *, sticky_max: int = 100_000,
                 flow_max: int = 262_144, log_size: int = 200_000, tombstones: bool = True,
                 nat_max: int = 262_144):
        self.sticky = Table("sticky", node=node, clock=clock, max_entries=sticky_max,
                            log_size=log_size, tombstones=tombstones)
        self.flow = Table("flow", node=node, clock=clock, max_entries=flow_max, log_size=log_size,
                          tombstones=tombstones)
        self.nat = Table("nat", node=node, clock=clock, max_entries=nat_max, log_size=log_size,
                         tombstones=tombstones)

    def __iter__(self) -> Iterator[Table]:
        return iter((self.sticky, self.flow, self.nat))

    def by_name(self, name: str) -> Table:
        if name in self.NAMES:
            return getattr(self, name)
        raise KeyError(name)

    def expire(self) -> int:
        return sum(t.expire() for t in self)


def sticky_key(kind: str, pool: str, value: str) -> str:
    """Key of a sticky entry: kind is "cookie" or "src"."""
    return f"{kind}/{pool}/{value}"


def flow_key(listener: str, proto: str, client: str) -> str:
    return f"{listener}/{proto}/{client}"


def nat_key(listener: str, proto: str, client: str, port: int) -> str:
    """Key of a nat entry: one connection (client "ip:port" to the listener's VIP at ``port``)."""
    return f"{listener}/{proto}/{client}/{port}"


def entries_from(changes: Iterable[Change]) -> list[Entry]:
    return [c.entry for c in changes]
