"""Balancing algorithms: pure code, no I/O, no clock.

``make_balancer(pool_cfg)`` returns a ``Balancer`` for the pool's configured algorithm. The pool
(``halb.model.Pool``) calls ``rebuild(view)`` on every view swap and ``pick(view, key, exclude)``
for each new connection or request. A view holds only backends that may serve (down, drained
and passively ejected backends are left out by the pool; backups replace the primaries when none
is up) together with their effective weights (slow start already applied), so the algorithms
here only skip, at pick time, backends that are full (``max_conns`` reached) or in ``exclude``
(already tried for this request). Derived structures (schedules, hash tables) are cached per
``view.version``.

    roundrobin  each backend in turn
    wrr         smooth weighted round robin (nginx): a precomputed cycle, O(1) per pick
    leastconn   least active connections per unit of weight, ties in turn
    p2c         two random candidates, the less loaded wins (seedable RNG)
    leasttime   least (EWMA response time x (in-flight + 1)) / weight; a backend without a
                sample yet is rated like the fastest sampled one, so it gets traffic
    source      hash of the key (client IP) onto the weighted backends, O(log n)
    maglev      Maglev consistent hashing (prime table, weights as repeated turns), O(1)
    resource    smooth weighted round robin over weights that follow the load the backends
                report (halb.resource computes them, the pool puts them in the view)

Hashes are stable across processes and hosts (never Python's randomized ``hash()``), so two
nodes with the same backends map a key to the same backend.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import zlib
from itertools import accumulate
from typing import TYPE_CHECKING, Collection, Mapping, Protocol

from .config import HASH_ALGORITHMS, PoolConfig

if TYPE_CHECKING:  # pragma: no cover
    from .model import Backend, PoolView

_MASK32 = 0xFFFFFFFF


def key_hash(key: bytes) -> int:
    """A stable 32-bit hash of ``key``: CRC-32 spread with a multiply-xorshift finalizer."""
    h = zlib.crc32(key)
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & _MASK32
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & _MASK32
    return h ^ (h >> 16)


def name_hashes(name: str) -> tuple[int, int]:
    """Two independent stable 64-bit hashes of a backend name (Maglev offset and skip)."""
    d = hashlib.blake2b(name.encode("utf-8"), digest_size=16, person=b"halb-maglev").digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


class Balancer(Protocol):
    def rebuild(self, view: "PoolView") -> None: ...

    def pick(self, view: "PoolView", key: bytes | None,
             exclude: Collection["Backend"]) -> "Backend | None": ...


def _usable(b: "Backend", exclude: Collection["Backend"]) -> bool:
    return not (b.max_conns > 0 and b.active >= b.max_conns) and (not exclude or b not in exclude)


# ---------------------------------------------------------------------------------------------
# Round robin


class RoundRobin:
    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def rebuild(self, view: "PoolView") -> None:
        pass

    def pick(self, view, key, exclude):
        bs = view.backends
        n = len(bs)
        if not n:
            return None
        i = self._next % n
        for k in range(n):
            b = bs[i]
            i += 1
            if i == n:
                i = 0
            if _usable(b, exclude):
                self._next = i
                return b
        return None


# ---------------------------------------------------------------------------------------------
# Smooth weighted round robin (nginx)


def swrr_schedule(weights: tuple[int, ...] | list[int]) -> list[int]:
    """One full cycle of nginx's smooth weighted round robin: the backend index of each pick.

    Weights are divided by their greatest common divisor first, so the cycle is as short as
    the proportions allow.
    """
    from math import gcd

    g = 0
    for w in weights:
        g = gcd(g, w)
    ws = [w // g for w in weights] if g > 1 else list(weights)
    total = sum(ws)
    cur = [0] * len(ws)
    out = []
    rng = range(len(ws))
    for _ in range(total):
        best = -1
        for i in rng:
            cur[i] += ws[i]
            if best < 0 or cur[i] > cur[best]:
                best = i
        cur[best] -= total
        out.append(best)
    return out


class SmoothWeighted:
    """nginx's smooth weighted round robin.

    When the cycle is short enough (total weight x backends <= ``max_schedule_work``) it is
    precomputed at rebuild and a pick is a step along it (skipped slots are consumed, so the
    remaining backends keep their proportions). Otherwise the live algorithm runs, O(n) a pick,
    skipping unusable backends exactly as nginx does.
    """

    __slots__ = ("_version", "_sched", "_pos", "_cur", "max_schedule_work")

    def __init__(self, max_schedule_work: int = 1 << 16) -> None:
        self.max_schedule_work = max_schedule_work
        self._version = -1
        self._sched: list["Backend"] | None = None
        self._pos = 0
        self._cur: dict["Backend", int] = {}

    def rebuild(self, view: "PoolView") -> None:
        self._version = view.version
        n = len(view.backends)
        total = sum(view.weights)
        # keep the live state of backends that stay, so a rebuild does not restart the cycle
        self._cur = {b: self._cur.get(b, 0) for b in view.backends}
        if n and total * n <= self.max_schedule_work:
            old = self._sched
            self._sched = [view.backends[i] for i in swrr_schedule(view.weights)]
            # carry on at the same fraction of the cycle: frequent rebuilds (slow-start ticks)
            # must not keep restarting it, or the head of the cycle would get all the picks
            self._pos = (self._pos * len(self._sched) // len(old)) if old else 0
        else:
            self._sched = None

    def pick(self, view, key, exclude):
        if view.version != self._version:
            self.rebuild(view)
        sched = self._sched
        if sched is not None:
            n = len(sched)
            pos = self._pos
            for _ in range(n):
                b = sched[pos]
                pos += 1
                if pos == n:
                    pos = 0
                if _usable(b, exclude):
                    self._pos = pos
                    return b
            self._pos = pos
            return None
        # live nginx algorithm
        cur = self._cur
        total = 0
        best = None
        best_cur = 0
        for b, w in zip(view.backends, view.weights):
            if not _usable(b, exclude):
                continue
            c = cur[b] + w
            cur[b] = c
            total += w
            if best is None or c > best_cur:
                best, best_cur = b, c
        if best is not None:
            cur[best] = best_cur - total
        return best


# ---------------------------------------------------------------------------------------------
# Weighted least connections


class LeastConn:
    """Least ``(active + 1) / weight`` (the load the next connection would bring), ties taken
    in turn starting after the last pick so equal backends share evenly."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def rebuild(self, view: "PoolView") -> None:
        pass

    def pick(self, view, key, exclude):
        bs = view.backends
        ws = view.weights
        n = len(bs)
        if not n:
            return None
        start = self._next % n
        best = None
        best_i = 0
        ba = bw = 0
        for k in range(n):
            i = start + k
            if i >= n:
                i -= n
            b = bs[i]
            a = b.active
            mc = b.max_conns
            if (mc and a >= mc) or (exclude and b in exclude):
                continue
            a += 1
            w = ws[i]
            # a / w < ba / bw without division
            if best is None or a * bw < ba * w:
                best, best_i, ba, bw = b, i, a, w
        if best is not None:
            self._next = best_i + 1
        return best


# ---------------------------------------------------------------------------------------------
# Random with two choices


class PowerOfTwo:
    """Two distinct random candidates; the one with the lower ``(active + 1) / weight`` wins
    (the first drawn on a tie). Unusable candidates fall back to a scan from a random start."""

    __slots__ = ("rng",)

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    def rebuild(self, view: "PoolView") -> None:
        pass

    def pick(self, view, key, exclude):
        bs = view.backends
        n = len(bs)
        if n == 0:
            return None
        rnd = self.rng.random
        if n == 1:
            b = bs[0]
            return b if _usable(b, exclude) else None
        i = int(rnd() * n)
        j = int(rnd() * (n - 1))
        if j >= i:
            j += 1
        a, b = bs[i], bs[j]
        ua, ub = _usable(a, exclude), _usable(b, exclude)
        if ua and ub:
            ws = view.weights
            # (a.active+1)/wa <= (b.active+1)/wb
            return a if (a.active + 1) * ws[j] <= (b.active + 1) * ws[i] else b
        if ua:
            return a
        if ub:
            return b
        start = int(rnd() * n)
        best = None
        bl = bw = 0
        ws = view.weights
        for k in range(n):
            x = (start + k) % n
            c = bs[x]
            if not _usable(c, exclude):
                continue
            load, w = c.active + 1, ws[x]
            if best is None or load * bw < bl * w:
                best, bl, bw = c, load, w
        return best


# ---------------------------------------------------------------------------------------------
# Least response time


class LeastTime:
    """Least expected wait: ``rt * (inflight + 1) / weight`` where ``rt`` is the backend's EWMA
    response time. A backend with no sample yet (``ewma_rt == 0``) is rated with the fastest
    sampled EWMA (optimistic, so it gets traffic and a sample, yet its in-flight requests still
    count); with no samples at all this is weighted least in-flight. Ties are taken in turn."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def rebuild(self, view: "PoolView") -> None:
        pass

    def pick(self, view, key, exclude):
        bs = view.backends
        ws = view.weights
        n = len(bs)
        if not n:
            return None
        fastest = min([r for b in bs if (r := b.ewma_rt) > 0.0] or (1.0,))
        start = self._next % n
        best = None
        best_i = 0
        best_score = 0.0
        for k in range(n):
            i = start + k
            if i >= n:
                i -= n
            b = bs[i]
            mc = b.max_conns
            if (mc and b.active >= mc) or (exclude and b in exclude):
                continue
            score = (b.ewma_rt or fastest) * (b.inflight + 1) / ws[i]
            if best is None or score < best_score:
                best, best_i, best_score = b, i, score
        if best is not None:
            self._next = best_i + 1
        return best


# ---------------------------------------------------------------------------------------------
# Source hash


class SourceHash:
    """The key's hash picks a point on the cumulative weights (``hash % total``), O(log n).

    An unusable pick falls back deterministically to the next backends in view order. Without a
    key it degrades to round robin. Like HAProxy's ``balance source`` (map-based), a change in
    the set of backends remaps many keys; use ``maglev`` where that matters.
    """

    __slots__ = ("_version", "_cum", "_total", "_rr")

    def __init__(self) -> None:
        self._version = -1
        self._cum: list[int] = []
        self._total = 0
        self._rr = RoundRobin()

    def rebuild(self, view: "PoolView") -> None:
        self._version = view.version
        self._cum = list(accumulate(view.weights))
        self._total = self._cum[-1] if self._cum else 0

    def pick(self, view, key, exclude):
        if key is None:
            return self._rr.pick(view, key, exclude)
        if view.version != self._version:
            self.rebuild(view)
        bs = view.backends
        n = len(bs)
        if not n:
            return None
        i = bisect.bisect_right(self._cum, key_hash(key) % self._total)
        for _ in range(n):
            b = bs[i]
            if _usable(b, exclude):
                return b
            i += 1
            if i == n:
                i = 0
        return None


# ---------------------------------------------------------------------------------------------
# Maglev


def maglev_table(names: list[str], weights: list[int], size: int) -> list[int]:
    """The Maglev lookup table (Eisenbud et al., NSDI 2016, section 3.4): entry -> index into
    ``names``. Backends take turns in name order, each claiming its next preferred free entry;
    a backend of weight w takes w turns a round. ``size`` must be a prime larger than the
    number of backends. Construction order of the input does not matter for the result as
    long as the names are sorted (``MaglevHash`` sorts them)."""
    n = len(names)
    if n == 0:
        return []
    if size <= n:
        raise ValueError(f"maglev table size {size} must exceed the number of backends {n}")
    offsets, skips = [], []
    for nm in names:
        h1, h2 = name_hashes(nm)
        offsets.append(h1 % size)
        skips.append(h2 % (size - 1) + 1)
    nxt = offsets[:]  # each backend's next candidate entry
    table = [-1] * size
    filled = 0
    order = [i for i in range(n) if weights[i] > 0]
    if not order:
        raise ValueError("maglev needs at least one backend with a positive weight")
    # the first round gives every backend one entry, so a backend never owns none (weights may
    # add up to more than the table); later rounds give each its weight
    turns = [1] * n
    while True:
        for i in order:
            c = nxt[i]
            s = skips[i]
            for _ in range(turns[i]):
                while table[c] >= 0:
                    c += s
                    if c >= size:
                        c -= size
                table[c] = i
                filled += 1
                if filled == size:
                    return table
                c += s
                if c >= size:
                    c -= size
            nxt[i] = c
        turns = weights


class MaglevHash:
    """Maglev consistent hashing on the key. A lookup is one table entry; when that backend is
    full or excluded the next entries are tried (deterministic for a given state), so keys of a
    backend that is only momentarily unusable spread over the others. Without a key: round
    robin. Tables are cached by the (name, weight) set, so a view swap that does not change
    membership or weights (or flips back to a recent state) costs nothing."""

    __slots__ = ("size", "_version", "_table", "_cache", "_rr", "cache_size")

    def __init__(self, size: int = 65537, cache_size: int = 4) -> None:
        self.size = size
        self.cache_size = cache_size
        self._version = -1
        self._table: list["Backend"] = []
        self._cache: dict[tuple, list[int]] = {}
        self._rr = RoundRobin()

    def rebuild(self, view: "PoolView") -> None:
        self._version = view.version
        pairs = sorted(((b.name, w, b) for b, w in zip(view.backends, view.weights)),
                       key=lambda t: t[0])
        sig = tuple((nm, w) for nm, w, _ in pairs)
        idx = self._cache.pop(sig, None)
        if idx is None:
            idx = maglev_table([p[0] for p in pairs], [p[1] for p in pairs], self.size)
        self._cache[sig] = idx  # most recent last
        while len(self._cache) > self.cache_size:
            del self._cache[next(iter(self._cache))]
        objs = [p[2] for p in pairs]
        self._table = [objs[i] for i in idx]

    def pick(self, view, key, exclude):
        if key is None:
            return self._rr.pick(view, key, exclude)
        if view.version != self._version:
            self.rebuild(view)
        table = self._table
        if not table:
            return None
        size = self.size
        i = key_hash(key) % size
        b = table[i]
        if _usable(b, exclude):
            return b
        if not any(_usable(x, exclude) for x in view.backends):
            return None
        for _ in range(size):  # bounded: every backend owns entries, but never trust a loop
            i += 1
            if i == size:
                i = 0
            b = table[i]
            if _usable(b, exclude):
                return b
        for b in view.backends:  # pragma: no cover - unreachable while every backend owns entries
            if _usable(b, exclude):
                return b
        return None


# ---------------------------------------------------------------------------------------------
# Factory and hash keys


def make_balancer(pool_cfg: PoolConfig, *, seed: int | None = None) -> Balancer:
    """The balancer for ``pool_cfg.algorithm``; ``seed`` makes randomized ones deterministic."""
    a = pool_cfg.algorithm
    if a == "roundrobin":
        return RoundRobin()
    if a == "wrr" or a == "resource":
        return SmoothWeighted()
    if a == "leastconn":
        return LeastConn()
    if a == "p2c":
        return PowerOfTwo(seed)
    if a == "leasttime":
        return LeastTime()
    if a == "source":
        return SourceHash()
    if a == "maglev":
        return MaglevHash(pool_cfg.maglev_table_size)
    raise ValueError(f"unknown balancing algorithm {a!r}")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    v = headers.get(name)
    if v is None:
        for k, val in headers.items():
            if k.lower() == name:
                return val
    return v


def hash_key_for(pool_cfg: PoolConfig, client_ip: str, headers: Mapping[str, str] | None = None,
                 cookies: Mapping[str, str] | None = None) -> bytes | None:
    """The key a hashing pool balances on, per its ``hash_key`` (client_ip, header:NAME or
    cookie:NAME); the client IP when the header or cookie is missing. None for pools whose
    algorithm does not hash (the data plane can then skip the work)."""
    if pool_cfg.algorithm not in HASH_ALGORITHMS:
        return None
    hk = pool_cfg.hash_key
    if hk != "client_ip":
        kind, _, name = hk.partition(":")
        if kind == "header" and headers:
            v = _header(headers, name)
            if v:
                return b"h:" + v.encode("utf-8", "surrogateescape")
        elif kind == "cookie" and cookies:
            v = cookies.get(name)
            if v:
                return b"c:" + v.encode("utf-8", "surrogateescape")
    return client_ip.encode("ascii", "replace") if client_ip else None
