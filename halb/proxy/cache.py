"""An HTTP cache for one listener: RFC 9111 as a shared cache, in RAM, bounded. Pure: no I/O and
no clock (callers hand in wall-clock seconds), so every rule is tested without sockets.

What the proxy asks (``halb.proxy.http`` drives it):

    d = cache.request(method, host, target, headers, has_body, now)
        -> Decision(action, entry, key, cond)
           "hit"        serve ``entry`` (``respond``): a full response or a 304
           "revalidate" forward with ``cond`` (If-None-Match / If-Modified-Since lines) added;
                        a 304 from the backend freshens the entry (``freshen``) and the entry is
                        served, anything else goes to the client (and may replace the entry)
           "miss"       forward; the response may be stored (``storable`` then ``store``)
           "bypass"     forward; nothing is stored (not GET/HEAD, a body, Range, no-store,
                        a conditional request for a stale entry ...)
    cache.storable(d, status, headers, now) -> (max-age, reason): reason "" when storable
    cache.store(d, status, headers, body, t_req, t_resp, now)
    cache.invalidate(host, target)     an unsafe method's success (RFC 9111 4.4)
    cache.purge(prefix, host)          halbctl cache purge

Rules (shared cache, RFC 9111; the request's and response's Cache-Control both count):

- Only GET responses are stored; HEAD is answered from a stored GET. Requests with a body, with
  ``Range``, or with ``Cache-Control: no-store`` go to the backend and store nothing.
- Not stored: ``no-store`` or ``private`` responses, ``Vary: *``, status 206, statuses that are
  neither heuristically cacheable (RFC 9110 15.1: 200 203 204 300 301 308 404 405 410 414 501)
  nor given explicit freshness, ``Set-Cookie`` unless ``store_set_cookie``, responses to requests
  with ``Authorization`` unless ``public``, ``s-maxage`` or ``must-revalidate`` allows them,
  bodies over ``max_object``, and responses with no freshness at all (see below).
- Freshness lifetime: ``s-maxage``, else ``max-age``, else ``Expires`` - ``Date``, else 10% of
  ``Date`` - ``Last-Modified`` (heuristic), else ``default_ttl`` (0: not stored); never more than
  ``max_age``. ``no-cache`` (response) or ``must-revalidate`` past expiry: stored, but always
  revalidated before use.
- Age (RFC 9111 4.2.3) from ``Date``, ``Age``, the request and response times; served with an
  ``Age`` header.
- Request ``Cache-Control: no-cache`` / ``max-age=0`` / ``Pragma: no-cache``: revalidated;
  ``max-age=N``, ``min-fresh=N`` honoured; ``only-if-cached`` gets 504 on a miss.
- Conditional requests on a fresh entry: ``If-None-Match`` (weak comparison, ``*``), else
  ``If-Modified-Since`` against ``Last-Modified``: 304 from the cache.
- Keys: host (lower case) and target; ``Vary`` names the request headers that pick one of
  several representations of the same key (at most ``MAX_VARIANTS``).
- Bounds: total bytes (bodies and heads) ``max_size``, ``max_entries``, least recently used
  evicted first.
"""

from __future__ import annotations

import calendar
import collections
import email.utils
import re
from dataclasses import dataclass
from typing import Iterable

HEURISTIC_STATUSES = frozenset((200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501))
MAX_VARIANTS = 16  # representations of one URL (distinct Vary values) kept
ENTRY_OVERHEAD = 256  # bytes counted per entry beyond its head and body
HEURISTIC_FRACTION = 0.1  # of the time since Last-Modified (RFC 9111 4.2.2)
# not stored with an entry: hop-by-hop (RFC 9110 7.6.1) and per-message fields
_DROP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                   b"transfer-encoding", b"upgrade", b"content-length", b"age",
                   b"proxy-authenticate", b"proxy-authorization"))
# what a 304 carries from the entry (RFC 9110 15.4.5)
_304_FIELDS = (b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary",
               b"last-modified")
_DIRECTIVE = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^,]*))?\s*(?:,|$)')
ACTIONS = ("hit", "revalidate", "miss", "bypass")
STATES = ("HIT", "MISS", "STALE", "REVALIDATED", "BYPASS")  # access log words


def directives(values: Iterable[str]) -> dict[str, str]:
    """Cache-Control (or Pragma) values -> {directive (lower case): argument or ""}."""
    out: dict[str, str] = {}
    for v in values:
        pos = 0
        n = len(v)
        while pos < n:
            m = _DIRECTIVE.match(v, pos)
            if m is None or m.end() == pos:
                break
            name, arg = m.group(1).lower(), m.group(2) or ""
            if arg.startswith('"'):
                arg = arg[1:-1]
            out.setdefault(name, arg.strip())
            pos = m.end()
    return out


def seconds(arg: str) -> int | None:
    """A delta-seconds argument; None when it is not one (RFC 9111 1.2.2: a huge value is
    2^31)."""
    arg = arg.strip()
    if not (arg.isascii() and arg.isdigit()):  # ("²".isdigit() is true)
        return None
    return min(int(arg), 2 ** 31)


def http_date(value: str | None) -> float | None:
    """An HTTP-date (IMF-fixdate or the obsolete forms) -> epoch seconds; None if invalid."""
    if not value:
        return None
    try:
        t = email.utils.parsedate_tz(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if t is None:
        return None
    try:
        return float(calendar.timegm(t[:9]) - (t[9] or 0))
    except (OverflowError, ValueError):
        return None


def format_date(t: float) -> str:
    return email.utils.formatdate(t, usegmt=True)


def _etags(value: str) -> list[str]:
    """The entity tags of an If-None-Match value ("*" stays "*")."""
    return [t.strip() for t in value.split(",") if t.strip()]


def _weak_eq(a: str, b: str) -> bool:
    return a.removeprefix("W/") == b.removeprefix("W/")


class Headers:
    """A response's header lines as (name, value) bytes, names case kept; lookups by lower-case
    str name. Built from the head's lines (``parse``)."""

    __slots__ = ("items", "_map")

    def __init__(self, items: list[tuple[bytes, bytes]]):
        self.items = items
        self._map: dict[str, list[str]] | None = None

    @classmethod
    def parse(cls, block: bytes, drop: "Iterable[bytes]" = ()) -> "Headers":
        """The header lines of ``block``, but for those whose (lower-case) name is in
        ``drop`` (the names a Connection header lists: hop-by-hop, RFC 9111 3.1)."""
        gone = {n.lower() for n in drop}
        items = []
        for line in block.split(b"\r\n"):
            n, sep, v = line.partition(b":")
            if sep and n and (not gone or n.strip().lower() not in gone):
                items.append((n.strip(), v.strip()))
        return cls(items)

    def map(self) -> dict[str, list[str]]:
        m = self._map
        if m is None:
            m = {}
            for n, v in self.items:
                m.setdefault(n.decode("latin-1").lower(), []).append(v.decode("latin-1"))
            self._map = m
        return m

    def get(self, name: str) -> list[str]:
        return self.map().get(name, [])

    def first(self, name: str) -> str | None:
        v = self.map().get(name)
        return v[0] if v else None


@dataclass(eq=False)
class Entry:
    key: tuple[str, bytes]
    pool: str  # the pool the request was routed to (routes may read request headers)
    vary: tuple[str, ...]  # lower-case request header names from the response's Vary
    vary_values: tuple[str, ...]  # what the storing request had for them
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]  # stored lines (no hop-by-hop, no framing, no Age)
    body: bytes
    request_time: float
    response_time: float
    date: float
    age: float  # corrected_initial_age (RFC 9111 4.2.3)
    lifetime: float  # freshness lifetime, seconds
    etag: str | None
    last_modified: float | None
    last_modified_raw: str | None
    always_revalidate: bool  # response no-cache
    must_revalidate: bool  # must-revalidate / proxy-revalidate / s-maxage
    size: int = 0
    hits: int = 0
    head: bytes = b""  # status line and stored header lines, rendered once (``render``)
    cl: bytes = b""  # its Content-Length line
    # the decisions of a plain hit (GET, HEAD), made once: a request without directives or
    # validators gets one of these (they are never changed)
    hit_get: "Decision | None" = None
    hit_head: "Decision | None" = None

    def render(self) -> None:
        self.head = b"".join([b"HTTP/1.1 %d %s\r\n" % (self.status, self.reason)]
                             + [b"%s: %s\r\n" % (n, v) for n, v in self.headers])
        self.cl = b"" if self.status in (204, 304) else b"Content-Length: %d\r\n" % len(self.body)
        for head_only in (False, True):
            d = Decision("hit", self.key, head_only, state="HIT", pool=self.pool)
            d.entry = self
            if head_only:
                self.hit_head = d
            else:
                self.hit_get = d

    def current_age(self, now: float) -> float:
        return self.age + max(0.0, now - self.response_time)

    def fresh(self, now: float, max_age: float | None = None, min_fresh: float = 0.0) -> bool:
        age = self.current_age(now)
        if self.always_revalidate:
            return False
        if max_age is not None and age > max_age:
            return False
        return age + min_fresh < self.lifetime


class Decision:
    """What the cache decided for one request (see the module docstring)."""

    __slots__ = ("action", "key", "pool", "entry", "cond", "head_only", "no_store",
                 "authorized", "vary_source", "not_modified", "state")

    def __init__(self, action: str, key: tuple = ("", b""), head_only: bool = False,
                 no_store: bool = False, authorized: bool = False, vary_source=(),
                 state: str = "BYPASS", pool: str = ""):
        self.action = action
        self.key = key
        self.pool = pool
        self.entry: Entry | None = None
        self.cond = b""  # header lines for a revalidation
        self.head_only = head_only  # HEAD: no body in the answer
        self.no_store = no_store
        self.authorized = authorized  # the request carried Authorization
        self.vary_source = vary_source  # the request's header lines (for Vary)
        self.not_modified = False  # "hit": the client's conditional matched (answer 304)
        self.state = state  # access log word


_BYPASS = Decision("bypass")  # (never changed: the proxy keeps no state for a bypass)
_EMPTY: dict = {}
# the request headers the rules read, by their lower-case wire name
_REQ_NAMES = {b"range": "range", b"cache-control": "cache-control", b"pragma": "pragma",
              b"authorization": "authorization", b"if-none-match": "if-none-match",
              b"if-modified-since": "if-modified-since"}


class HttpCache:
    """The cache of one listener (see the module docstring)."""

    def __init__(self, *, max_size: int, max_object: int, max_entries: int = 10_000,
                 max_age: float = 3600.0, default_ttl: float = 0.0,
                 store_set_cookie: bool = False):
        self.max_size = max_size
        self.max_object = max_object
        self.max_entries = max_entries
        self.max_age = max_age
        self.default_ttl = default_ttl
        self.store_set_cookie = store_set_cookie
        # key -> variants (one per Vary value set); the OrderedDict is the LRU order
        self._lru: collections.OrderedDict[tuple[str, bytes], list[Entry]] = collections.OrderedDict()
        self.size = 0
        self.entries = 0
        self.stats = collections.Counter()  # hits, misses, stored, evicted, ...

    # -- lookups ------------------------------------------------------------------------------

    def request(self, method: bytes, host: str, target: bytes,
                headers: list[tuple[bytes, bytes]], has_body: bool, now: float,
                pool: str = "") -> Decision:
        """What to do with a request (``headers``: its header lines as (name, value) bytes;
        ``host`` lower case, as the proxy has it; ``pool``: where it was routed, part of what
        selects a stored response, since routes may read request headers)."""
        if (method != b"GET" and method != b"HEAD") or has_body:
            self.stats["bypass"] += 1
            return _BYPASS
        hm = None  # the few headers the rules read (most requests carry none of them)
        for n, v in headers:
            name = _REQ_NAMES.get(n.lower())
            if name is not None:
                if hm is None:
                    hm = {}
                hm.setdefault(name, []).append(v.decode("latin-1"))
        if hm is None:
            # the common hit: no request directive, one representation, fresh
            key = (host.lower(), target)
            variants = self._lru.get(key)
            if variants is not None and len(variants) == 1:
                e = variants[0]
                if not e.vary and not e.always_revalidate and e.pool == pool and \
                        e.age + (now - e.response_time) < e.lifetime:
                    self._lru.move_to_end(key)
                    e.hits += 1
                    self.stats["hits"] += 1
                    return e.hit_head if method == b"HEAD" else e.hit_get
            hm = _EMPTY
        elif "range" in hm:
            self.stats["bypass"] += 1
            return _BYPASS
        return self._request(method, host, target, headers, hm, now, pool)

    def _request(self, method: bytes, host: str, target: bytes,
                 raw: list[tuple[bytes, bytes]], headers: dict[str, list[str]],
                 now: float, pool: str) -> Decision:
        key = (host.lower(), target)
        cc = directives(headers["cache-control"]) if "cache-control" in headers else _EMPTY
        pragma_nc = "pragma" in headers and "cache-control" not in headers and \
            "no-cache" in directives(headers["pragma"])
        d = Decision("miss", key, method == b"HEAD", "no-store" in cc,
                     "authorization" in headers, raw, "MISS", pool)
        if d.no_store:
            d.action, d.state = "bypass", "BYPASS"
            self.stats["bypass"] += 1
            return d
        e = self._find(key, raw, pool)
        if e is None and ("if-none-match" in headers or "if-modified-since" in headers):
            # the client's validators go to the backend, whose answer (a 304 for the client's
            # own copy, say) is that client's alone: nothing is stored from it
            d.action, d.state = "bypass", "BYPASS"
            self.stats["bypass"] += 1
            return d
        if e is None:
            if "only-if-cached" in cc:
                d.action, d.state = "hit", "MISS"  # answered 504 by respond()
                self.stats["misses"] += 1
                return d
            if d.head_only:  # a HEAD's response has no body to store
                d.action = "bypass"
            self.stats["misses"] += 1
            return d
        self._lru.move_to_end(key)
        max_age = seconds(cc["max-age"]) if "max-age" in cc else None
        min_fresh = (seconds(cc["min-fresh"]) or 0) if "min-fresh" in cc else 0
        revalidate = "no-cache" in cc or pragma_nc
        if not revalidate and e.fresh(now, max_age, min_fresh):
            d.action, d.entry, d.state = "hit", e, "HIT"
            if "if-none-match" in headers or "if-modified-since" in headers:
                d.not_modified = self._not_modified(e, headers)
            e.hits += 1
            self.stats["hits"] += 1
            return d
        # stale (or the client wants it revalidated)
        if "if-none-match" in headers or "if-modified-since" in headers:
            # the client's own validators go to the backend as they are; its answer (a 304
            # for the client's representation, or a full one) goes to the client
            d.action, d.state = "bypass", "BYPASS"
            self.stats["bypass"] += 1
            return d
        lines = b""
        if e.etag:
            lines += b"If-None-Match: " + e.etag.encode("latin-1") + b"\r\n"
        if e.last_modified_raw:
            lines += b"If-Modified-Since: " + e.last_modified_raw.encode("latin-1") + b"\r\n"
        if not lines:  # nothing to validate with: fetch it again
            self.stats["misses"] += 1
            return d
        d.action, d.entry, d.cond, d.state = "revalidate", e, lines, "STALE"
        self.stats["revalidations"] += 1
        return d

    def _find(self, key: tuple[str, bytes], raw: list[tuple[bytes, bytes]],
              pool: str) -> Entry | None:
        variants = self._lru.get(key)
        if not variants:
            return None
        for e in variants:
            if e.pool != pool:
                continue
            if not e.vary:
                if not e.vary_values:
                    return e
            elif e.vary_values == _vary_values(e.vary, raw):
                return e
        return None

    @staticmethod
    def _not_modified(e: Entry, headers: dict[str, list[str]]) -> bool:
        """RFC 9110 13.1.2 / 13.1.3 for a GET or HEAD the cache answers."""
        inm = headers.get("if-none-match")
        if inm:
            tags = _etags(",".join(inm))
            if "*" in tags:
                return True
            return e.etag is not None and any(_weak_eq(t, e.etag) for t in tags)
        ims = headers.get("if-modified-since")
        if ims and len(ims) == 1:
            t = http_date(ims[0])
            lm = e.last_modified if e.last_modified is not None else e.date
            return t is not None and lm <= t
        return False

    # -- storing ------------------------------------------------------------------------------

    def storable(self, d: Decision, status: int, h: Headers, now: float) -> tuple[float, str]:
        """(freshness lifetime, "") when the response may be stored, else (0, why not)."""
        if d.action not in ("miss", "revalidate") or d.head_only or d.no_store:
            return 0.0, "request"
        cc = directives(h.get("cache-control"))
        if "no-store" in cc:
            return 0.0, "no-store"
        if "private" in cc:
            return 0.0, "private"
        if status in (206, 304, 412) or status < 200:
            return 0.0, "status"
        vary = ",".join(h.get("vary"))
        if vary.strip() == "*":
            return 0.0, "vary"
        if h.get("set-cookie") and not self.store_set_cookie:
            return 0.0, "set-cookie"
        if d.authorized and not ("public" in cc or "s-maxage" in cc or "must-revalidate" in cc):
            return 0.0, "authorization"
        lifetime = self._lifetime(cc, h, now)
        if lifetime is None:
            if status not in HEURISTIC_STATUSES and "public" not in cc:
                return 0.0, "status"
            lifetime = self._heuristic(h, now)
        validators = bool(h.first("etag") or h.first("last-modified"))
        if not lifetime or "no-cache" in cc:
            if not validators:  # it could never be used without going to the backend
                return 0.0, "no freshness"
            lifetime = 0.0 if "no-cache" in cc else lifetime or 0.0
        return min(lifetime, self.max_age), ""

    def _lifetime(self, cc: dict[str, str], h: Headers, now: float) -> float | None:
        for name in ("s-maxage", "max-age"):
            if name in cc:
                v = seconds(cc[name])
                if v is not None:
                    return float(v)
        exp = h.first("expires")
        if exp is not None:
            t = http_date(exp)
            if t is None:  # an invalid Expires means already expired (RFC 9111 5.3)
                return 0.0
            date = http_date(h.first("date")) or now
            return max(0.0, t - date)
        return None

    def _heuristic(self, h: Headers, now: float) -> float | None:
        lm = http_date(h.first("last-modified"))
        if lm is not None:
            date = http_date(h.first("date")) or now
            if date > lm:
                return (date - lm) * HEURISTIC_FRACTION
        return self.default_ttl if self.default_ttl > 0 else None

    def store(self, d: Decision, status: int, reason: bytes, h: Headers, body: bytes,
              lifetime: float, t_req: float, t_resp: float) -> Entry | None:
        """Stores a complete response; returns the entry (None when it does not fit)."""
        lines = [(n, v) for n, v in h.items if n.lower() not in _DROP]
        head_bytes = sum(len(n) + len(v) + 4 for n, v in lines)
        size = len(body) + head_bytes + ENTRY_OVERHEAD
        if len(body) > self.max_object or size > self.max_size:
            self.stats["too_big"] += 1
            return None
        cc = directives(h.get("cache-control"))
        date = http_date(h.first("date")) or t_resp
        age_hdr = seconds(h.first("age") or "") or 0
        apparent = max(0.0, t_resp - date)
        corrected = age_hdr + max(0.0, t_resp - t_req)
        vary = tuple(sorted({v.strip().lower() for v in ",".join(h.get("vary")).split(",")
                             if v.strip()}))
        lm_raw = h.first("last-modified")
        e = Entry(key=d.key, pool=d.pool, vary=vary, vary_values=_vary_values(vary, d.vary_source),
                  status=status, reason=reason, headers=lines, body=body, request_time=t_req,
                  response_time=t_resp, date=date, age=max(apparent, corrected),
                  lifetime=lifetime, etag=h.first("etag"),
                  last_modified=http_date(lm_raw), last_modified_raw=lm_raw,
                  always_revalidate="no-cache" in cc,
                  must_revalidate=bool({"must-revalidate", "proxy-revalidate", "s-maxage"} & cc.keys()),
                  size=size)
        e.render()
        self._insert(e)
        self.stats["stored"] += 1
        return e

    def _insert(self, e: Entry) -> None:
        variants = self._lru.get(e.key)
        if variants is None:
            variants = self._lru[e.key] = []
        else:
            self._lru.move_to_end(e.key)
            for old in variants:
                if old.pool == e.pool and (old.vary_values == e.vary_values or old.vary != e.vary):
                    # the same representation, or a Vary that changed: the old goes
                    self._drop(variants, old)
                    break
            while len(variants) >= MAX_VARIANTS:
                self._drop(variants, variants[0])
        variants.append(e)
        self.size += e.size
        self.entries += 1
        self._evict()

    def _drop(self, variants: list[Entry], e: Entry) -> None:
        variants.remove(e)
        self.size -= e.size
        self.entries -= 1
        e.hit_get = e.hit_head = None  # (they point back at it: freed now, not by the GC)

    def _evict(self) -> None:
        while (self.size > self.max_size or self.entries > self.max_entries) and self._lru:
            key, variants = next(iter(self._lru.items()))
            if variants:
                self._drop(variants, variants[0])
                self.stats["evicted"] += 1
            if not variants:
                del self._lru[key]

    def freshen(self, e: Entry, h: Headers, t_req: float, t_resp: float) -> bool:
        """A 304 to a revalidation: the entry takes the 304's fields (RFC 9111 4.3.4) and its
        age and lifetime start again. A Set-Cookie in the 304 is not taken (unless
        ``store_set_cookie``). Returns False when the merged fields say the response may no
        longer be stored (private, no-store): the caller answers this request and drops it."""
        items = [(n, v) for n, v in h.items if n.lower() not in _DROP
                 and (self.store_set_cookie or n.lower() != b"set-cookie")]
        new = {n.lower() for n, _ in items}
        if new:
            e.headers = [(n, v) for n, v in e.headers if n.lower() not in new] + items
        merged = Headers(e.headers)
        cc = directives(merged.get("cache-control"))
        lifetime = self._lifetime(cc, merged, t_resp)
        if lifetime is None:
            lifetime = self._heuristic(merged, t_resp) or 0.0
        e.lifetime = min(lifetime, self.max_age)
        e.request_time, e.response_time = t_req, t_resp
        e.date = http_date(merged.first("date")) or t_resp
        e.age = max(0.0, t_resp - e.date) + (seconds(h.first("age") or "") or 0)
        e.etag = merged.first("etag")
        e.last_modified_raw = merged.first("last-modified")
        e.last_modified = http_date(e.last_modified_raw)
        e.always_revalidate = "no-cache" in cc
        e.render()
        size = len(e.body) + sum(len(n) + len(v) + 4 for n, v in e.headers) + ENTRY_OVERHEAD
        self.size += size - e.size
        e.size = size
        self.stats["revalidated"] += 1
        self._evict()
        return not ("private" in cc or "no-store" in cc)

    # -- answers ------------------------------------------------------------------------------

    def respond(self, d: Decision, now: float, version: str, close: bool,
                keep_alive: bool, via: bytes) -> tuple[int, bytes]:
        """(status, the whole response) for a "hit" decision."""
        e = d.entry
        if e is None:  # only-if-cached on a miss (RFC 9111 5.2.1.7)
            body = b"" if d.head_only else b"not in cache\n"
            head = (b"HTTP/1.1 504 Gateway Timeout\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: %d\r\n" % 13)
            return 504, head + _conn_lines(close, keep_alive) + via + b"\r\n" + body
        age = int(e.current_age(now))
        if d.not_modified:
            lines = [(n, v) for n, v in e.headers if n.lower() in _304_FIELDS]
            out = [b"HTTP/1.1 304 Not Modified\r\n"]
            out += [b"%s: %s\r\n" % (n, v) for n, v in lines]
            out.append(b"Age: %d\r\n" % age)
            out.append(_conn_lines(close, keep_alive))
            out.append(via)
            out.append(b"\r\n")
            return 304, b"".join(out)
        conn = b"Connection: close\r\n" if close else \
            b"Connection: keep-alive\r\n" if keep_alive else b""
        return e.status, b"".join((e.head, b"Age: %d\r\n" % age, e.cl, conn, via, b"\r\n",
                                   b"" if d.head_only else e.body))

    # -- invalidation and purge ---------------------------------------------------------------

    def invalidate(self, host: str, target: bytes) -> int:
        """An unsafe request succeeded: every stored representation of its URI goes."""
        return self._remove((host.lower(), target))

    def _remove(self, key: tuple[str, bytes]) -> int:
        variants = self._lru.pop(key, None)
        if not variants:
            return 0
        for e in variants:
            self.size -= e.size
            self.entries -= 1
            e.hit_get = e.hit_head = None
        return len(variants)

    def purge(self, prefix: str = "", host: str = "") -> int:
        """Removes the entries whose target starts with ``prefix`` (and whose host is ``host``,
        when given); returns how many went."""
        host = host.lower()
        pre = prefix.encode("latin-1", "replace")
        keys = [k for k in self._lru if k[1].startswith(pre) and (not host or k[0] == host)]
        n = sum(self._remove(k) for k in keys)
        self.stats["purged"] += n
        return n


def _vary_values(vary: tuple[str, ...], raw: list[tuple[bytes, bytes]]) -> tuple[str, ...]:
    """The values of the request headers ``vary`` names, from the request's header lines,
    normalised a little (RFC 9111 4.1: whitespace around commas; list order kept)."""
    if not vary:
        return ()
    want = {n.encode("latin-1"): [] for n in vary}
    for n, v in raw:
        got = want.get(n.lower())
        if got is not None:
            got.append(v.decode("latin-1"))
    return tuple(",".join(x.strip() for x in ",".join(want[n.encode("latin-1")]).split(","))
                 for n in vary)


def _conn_lines(close: bool, keep_alive: bool) -> bytes:
    if close:
        return b"Connection: close\r\n"
    if keep_alive:
        return b"Connection: keep-alive\r\n"
    return b""


class CacheCollector:
    """The caches' counters and sizes for Prometheus, read at scrape time (``caches``: listener
    name -> HttpCache, kept by the listeners)."""

    def __init__(self, caches: dict[str, "HttpCache"]):
        self.caches = caches

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        lookups = CounterMetricFamily("halb_http_cache_lookups", "Requests the HTTP cache "
                                      "looked at, by result (hit: answered from the cache; "
                                      "miss; stale: revalidated with the backend; bypass: "
                                      "not cacheable)", labels=["listener", "result"])
        counters = {k: CounterMetricFamily(f"halb_http_cache_{k}", h, labels=["listener"])
                    for k, h in (("stored", "Responses stored"),
                                 ("evicted", "Entries evicted to stay within max_size or "
                                             "max_entries"),
                                 ("revalidated", "Stale entries a backend's 304 made fresh"),
                                 ("purged", "Entries removed by halbctl cache purge"))}
        entries = GaugeMetricFamily("halb_http_cache_entries", "Responses in the HTTP cache",
                                    labels=["listener"])
        size = GaugeMetricFamily("halb_http_cache_bytes", "Bytes the HTTP cache holds (bodies, "
                                 "heads and per-entry overhead)", labels=["listener"])
        cap = GaugeMetricFamily("halb_http_cache_capacity_bytes", "The HTTP cache's max_size",
                                labels=["listener"])
        for name, c in tuple(self.caches.items()):
            st = c.stats
            for result, k in (("hit", "hits"), ("miss", "misses"), ("stale", "revalidations"),
                              ("bypass", "bypass")):
                lookups.add_metric([name, result], float(st[k]))
            for k, fam in counters.items():
                fam.add_metric([name], float(st[k]))
            entries.add_metric([name], float(c.entries))
            size.add_metric([name], float(c.size))
            cap.add_metric([name], float(c.max_size))
        yield lookups
        yield from counters.values()
        yield entries
        yield size
        yield cap


def caches_of(metrics) -> dict[str, "HttpCache"]:
    """The node's listener -> cache map, its collector registered on first use."""
    caches = getattr(metrics, "http_caches", None)
    if caches is None:
        caches = {}
        metrics.http_caches = caches
        reg = getattr(metrics, "registry", None)
        if reg is not None:
            reg.register(CacheCollector(caches))
    return caches


def from_config(cfg) -> "HttpCache | None":
    """The cache a listener's ``[listeners.cache]`` describes (None: no cache)."""
    if cfg is None:
        return None
    return HttpCache(max_size=cfg.max_size, max_object=cfg.max_object,
                     max_entries=cfg.max_entries, max_age=cfg.max_age,
                     default_ttl=cfg.default_ttl, store_set_cookie=cfg.store_set_cookie)
