"""HTTP/1.1 message heads: strict checks and rewriting. Pure functions, no I/O, no clock.

The byte-level parsing of requests is llhttp's (via httptools, in its default strict mode);
this module adds the checks llhttp does not make and builds the heads halb sends on. See
``halb/proxy/http.py`` for which malformed classes llhttp rejects itself (measured). Backend
responses are framed and checked here (``ResponseFramer``: one pass over each head, no Python
call per piece), to the same strictness, tested against llhttp (tests/unit/test_http_framer.py).

Request heads are rebuilt from the parsed fields, never copied as raw bytes: the backend only
ever sees a canonical ``METHOD SP target SP HTTP/1.1`` line, single-spaced ``Name: value``
headers and framing halb chose itself (Content-Length kept as parsed, chunked re-encoded).
That is what keeps a lenient quirk of one client from reaching a backend that reads it
differently. Response heads get a new status line and framing lines of halb's own; their other
header lines go to the client as the backend sent them (``ResponseHead.take``), but only after
``ResponseFramer`` has accepted the whole head, and without the hop-by-hop ones.

When compiled (halb/_ext.py), some functions take a ``cython.compiled`` branch: a C loop doing
what the plain-Python branch beside it does with bytes methods.
"""

from __future__ import annotations

import re
from functools import lru_cache
from http import HTTPStatus

try:
    import cython  # compiled: C-level branches below (see halb/_ext.py)
except ImportError:  # pragma: no cover - Cython absent at run time
    from .. import _cyshim as cython

# Connection-specific headers (RFC 9110 7.6.1) that a proxy must not forward, lower case.
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te",
                        b"transfer-encoding", b"upgrade", b"trailer", b"proxy-authenticate",
                        b"proxy-authorization"))
# Request headers halb (re)writes itself when forwarded headers are on.
_FWD = frozenset((b"x-forwarded-for", b"x-forwarded-proto", b"forwarded"))

_K_PLAIN, _K_HOP, _K_XFF, _K_XFP, _K_FWD = 0, 1, 2, 3, 4  # what _req_kind says of a name


def _req_kind(n: bytes) -> int:
    """What a request header name is to ``request_head``: hop-by-hop (``_K_HOP``), one of the
    forwarded headers (``_K_XFF``, ``_K_XFP``, ``_K_FWD``) or ordinary (``_K_PLAIN``); any
    case. Dispatches on the length, then compares in C when compiled: no lower-case copy, no
    hash (checked against HOP_BY_HOP and _FWD at import)."""
    ln = len(n)
    if ln == 10:
        if _is(n, b"connection") or _is(n, b"keep-alive"):
            return _K_HOP
    elif ln == 17:
        if _is(n, b"transfer-encoding"):
            return _K_HOP
        if _is(n, b"x-forwarded-proto"):
            return _K_XFP
    elif ln == 15:
        if _is(n, b"x-forwarded-for"):
            return _K_XFF
    elif ln == 9:
        if _is(n, b"forwarded"):
            return _K_FWD
    elif ln == 7:
        if _is(n, b"upgrade") or _is(n, b"trailer"):
            return _K_HOP
    elif ln == 2:
        if _is(n, b"te"):
            return _K_HOP
    elif ln == 16:
        if _is(n, b"proxy-connection"):
            return _K_HOP
    elif ln == 18:
        if _is(n, b"proxy-authenticate"):
            return _K_HOP
    elif ln == 19:
        if _is(n, b"proxy-authorization"):
            return _K_HOP
    return _K_PLAIN


_HOST_RE = re.compile(rb"^(?:[A-Za-z0-9._~!$&'()*+,;=%-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")

REASONS = {s.value: s.phrase for s in HTTPStatus}


class HttpError(Exception):
    """A request halb refuses: ``status`` and a short reason that goes in the answer's body."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


def error_response(status: int, reason: str, *, close: bool = True) -> bytes:
    """A complete short answer: status line, a few headers and a one-line text body."""
    body = f"{status} {REASONS.get(status, 'Error')}: {reason}\n".encode("latin-1", "replace")
    return (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\nCache-Control: no-store\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


class Request:
    """A checked request head (built by ``check_request``)."""

    __slots__ = ("method", "target", "version", "headers", "host", "path", "content_length",
                 "chunked", "has_body", "conn_tokens", "_map", "upgrade", "ws_names")

    def __init__(self, method: bytes, target: bytes, version: str,
                 headers: list[tuple[bytes, bytes]], host: str = "", path: str = "/",
                 content_length: int | None = None, chunked: bool = False,
                 conn_tokens: frozenset = frozenset()):
        _fill(self, method, target, version, headers, host, path, content_length, chunked,
              conn_tokens)

    def __repr__(self) -> str:
        return (f"Request(method={self.method!r}, target={self.target!r}, "
                f"version={self.version!r}, host={self.host!r}, path={self.path!r}, "
                f"content_length={self.content_length!r}, chunked={self.chunked!r})")

    def header_map(self) -> dict[str, list[str]]:
        """Lower-case header name -> list of values (latin-1 text); built once on demand."""
        m = self._map
        if m is None:
            m = {}
            for n, v in self.headers:
                m.setdefault(n.decode("latin-1").lower(), []).append(v.decode("latin-1"))
            self._map = m
        return m

    def get(self, name: str, default=None) -> list[str] | None:
        """The values of header ``name`` (lower case), as ``header_map().get`` gives them, but
        found by a scan of the (few) headers instead of building the map: the router asks for
        one or two names per request."""
        m = self._map
        if m is not None:
            return m.get(name, default)
        out = self.values(name.encode("latin-1"))
        return default if out is None else out

    def values(self, lname: bytes) -> list[str] | None:
        """The values of the header named ``lname`` (lower-case bytes), None if absent: ``get``
        for callers that hold the name as bytes (the router: a C scan when compiled)."""
        out = None
        for n, v in self.headers:
            if _is(n, lname):
                if out is None:
                    out = []
                out.append(v.decode("latin-1"))
        return out

    def cookies(self) -> dict[str, str]:
        return parse_cookies(self.get("cookie", ()))


def _fill(r: Request, method: bytes, target: bytes, version: str,
          headers: list[tuple[bytes, bytes]], host: str, path: str, content_length: int | None,
          chunked: bool, conn_tokens: frozenset) -> None:
    r.method = method
    r.target = target  # origin-form (absolute-form is reduced to it)
    r.version = version  # "1.0" | "1.1"
    r.headers = headers
    r.host = host  # Host header (or absolute-form authority), lower case, with port
    r.path = path  # target path without the query, for routing
    r.content_length = content_length
    r.chunked = chunked
    r.has_body = chunked or bool(content_length)
    r.conn_tokens = conn_tokens  # Connection header tokens, lower case
    r._map = None
    r.upgrade = b""  # a usable upgrade offer: the Upgrade value forwarded (check_request)
    r.ws_names = _NO_TOKENS  # Sec-WebSocket-* names present (lower case)


def parse_cookies(values) -> dict[str, str]:
    """Cookie header values -> {name: value}; the first occurrence of a name wins."""
    out: dict[str, str] = {}
    for v in values:
        for part in v.split(";"):
            name, sep, val = part.strip().partition("=")
            if sep and name and name not in out:
                val = val.strip()
                if len(val) >= 2 and val[0] == val[-1] == '"':
                    val = val[1:-1]
                out[name] = val
    return out


@cython.boundscheck(False)
@cython.wraparound(False)
def _is(name: bytes, lower: bytes) -> bool:
    """``name.lower() == lower`` for a lower-case ASCII ``lower`` (C loop when compiled)."""
    if cython.compiled:
        if len(name) != len(lower):
            return False
        for k in range(len(lower)):
            c = name[k]
            if 65 <= c <= 90:
                c += 32
            if c != lower[k]:
                return False
        return True
    return name.lower() == lower


@cython.boundscheck(False)
@cython.wraparound(False)
def _is_at(data: bytes, pos: int, lower: bytes) -> bool:
    """``data[pos:pos + len(lower)].lower() == lower`` without the slice when compiled."""
    if cython.compiled:
        if pos + len(lower) > len(data):
            return False
        for k in range(len(lower)):
            c = data[pos + k]
            if 65 <= c <= 90:
                c += 32
            if c != lower[k]:
                return False
        return True
    return data[pos:pos + len(lower)].lower() == lower


_HOSTS: dict = {}  # Host value -> its checked, decoded, lower-case form; bounded
_HOSTS_MAX = 1024
_last_host = [b"", ""]  # the last valid Host value and its form: most requests repeat it


def _host_text(host: bytes) -> str | None:
    """The Host value as halb keeps it, or None if it is not a valid ``host[:port]``."""
    last = _last_host
    if host == last[0]:  # (a length test and a memcmp, where the dict would hash the value)
        return last[1]
    t = _HOSTS.get(host)
    if t is None:
        if not _HOST_RE.match(host):
            return None
        t = host.decode("latin-1").lower()
        if len(_HOSTS) >= _HOSTS_MAX:
            _HOSTS.clear()
        _HOSTS[host] = t
    last[0] = host
    last[1] = t
    return t


def _split_tokens(v: bytes) -> list[bytes]:
    if b"," not in v:
        return [v.strip().lower()]
    return [t.strip().lower() for t in v.split(b",")]


_PLAIN_CONN = frozenset((b"close", b"keep-alive", b""))
_last_path = [None, ""]  # the last request target and its path (check_request)
_NO_TOKENS: frozenset = frozenset()


def upgrade_offer(values: list[bytes], conn: list[bytes] | None, version: str,
                  has_body: bool) -> bytes:
    """The Upgrade value halb forwards for a request's upgrade offer (RFC 9110 7.8), or b"" if
    the offer is not one halb carries: it needs HTTP/1.1, ``upgrade`` among the Connection
    tokens and no body (an offer on a request with a body is forwarded as an ordinary request,
    Upgrade being hop-by-hop); ``h2c`` is taken out of the list (HTTP/2 is not tunnelled: halb
    routes each request)."""
    if version != "1.1" or not conn or b"upgrade" not in conn or has_body:
        return b""
    keep = [t.strip() for v in values for t in v.split(b",")]
    keep = [t for t in keep if t and not t.lower().startswith(b"h2c")]
    return b", ".join(keep)


def check_request(method: bytes, target: bytes, version: str,
                  headers: list[tuple[bytes, bytes]]) -> Request:
    """Applies the checks llhttp leaves to us; returns the ``Request`` or raises ``HttpError``.

    - version must be HTTP/1.0 or 1.1 (llhttp accepts 0.9 and 2.0 lines);
    - HTTP/1.1 needs exactly one Host; more than one Host is refused on any version;
      a Host must be a valid ``host[:port]``;
    - Transfer-Encoding: refused on HTTP/1.0; the only coding accepted is a single
      ``chunked`` (``gzip, chunked`` and the like get 501; empty list members get 400);
    - request target: origin-form (``/...``), ``*`` for OPTIONS, or absolute-form with an
      http(s) scheme whose authority must equal the Host header (a mismatch is refused, as
      a routing-confusion attempt); it is reduced to origin-form for the backend;
    - CONNECT is refused (501): halb is not a forward proxy.
    """
    if version not in ("1.1", "1.0"):
        raise HttpError(400, f"unsupported HTTP version {version}")
    if method == b"CONNECT":
        raise HttpError(501, "CONNECT is not supported")
    host: bytes | None = None
    te_vals: list[bytes] | None = None
    cl: bytes | None = None
    conn: list[bytes] | None = None
    upg: list[bytes] | None = None
    ws: list[bytes] | None = None
    for n, v in headers:
        ln = len(n)
        if ln == 4 and _is(n, b"host"):
            if host is not None:
                raise HttpError(400, "more than one Host header")
            host = v.strip()
        elif ln == 17 and _is(n, b"transfer-encoding"):
            if te_vals is None:
                te_vals = []
            te_vals.append(v)
        elif ln == 14 and _is(n, b"content-length"):
            cl = v
        elif ln == 10 and _is(n, b"connection"):
            if conn is None:
                conn = []
            conn.extend(_split_tokens(v))
        elif ln == 7 and _is(n, b"upgrade"):
            if upg is None:
                upg = []
            upg.append(v)
        elif ln >= 13:
            if _framing_lookalike(n):
                raise HttpError(400, f"header {n.decode('latin-1')!r} imitates Content-Length "
                                     f"or Transfer-Encoding")
            if ln >= 15 and (n[0] | 0x20) == 115 and _is_at(n, 0, b"sec-websocket-"):
                if ws is None:
                    ws = []
                ws.append(n.lower())
    if host is None and version == "1.1":
        raise HttpError(400, "missing Host header")
    host_text = ""
    if host is not None:
        host_text = _host_text(host)
        if host_text is None:
            raise HttpError(400, "invalid Host header")
    chunked = False
    if te_vals:
        if version == "1.0":
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings: list[bytes] = []
        for v in te_vals:
            codings += _split_tokens(v)
        if b"" in codings:
            raise HttpError(400, "malformed Transfer-Encoding")
        if codings != [b"chunked"]:
            raise HttpError(501, "unsupported Transfer-Encoding (only a single chunked)")
        chunked = True
    length = None
    if cl is not None:
        if chunked:  # llhttp refuses this too; kept as defence in depth
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        if not cl.strip().isdigit():
            raise HttpError(400, "malformed Content-Length")
        length = int(cl)
    # request target
    if len(target) > 0 and target[0] == 47:  # "/": origin-form
        pass
    elif target == b"*":
        if method != b"OPTIONS":
            raise HttpError(400, "asterisk-form target needs OPTIONS")
    elif target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
        rest = target.split(b"://", 1)[1]
        slash = rest.find(b"/")
        q = rest.find(b"?")
        cut = len(rest)
        if 0 <= slash < cut:
            cut = slash
        if 0 <= q < cut:
            cut = q
        authority = rest[:cut]
        if not authority or b"@" in authority or not _HOST_RE.match(authority):
            raise HttpError(400, "invalid authority in absolute-form target")
        if host is not None and host.lower() != authority.lower():
            raise HttpError(400, "absolute-form target does not match the Host header")
        if host is None:
            host = authority
            host_text = authority.decode("latin-1").lower()
            headers = headers + [(b"Host", authority)]
        target = rest[cut:] or b"/"
        if not target.startswith(b"/"):
            target = b"/" + target
    else:
        raise HttpError(400, "malformed request target")
    last = _last_path
    if target == last[0]:  # the same target as the last request (a memcmp): same path
        path = last[1]
    else:
        q = target.find(b"?")
        path = (target if q < 0 else target[:q]).decode("latin-1")
        last[0] = target
        last[1] = path
    r = Request.__new__(Request)  # as Request(...), without its argument parsing
    _fill(r, method, target, version, headers, host_text, path, length, chunked,
          frozenset(conn) if conn else _NO_TOKENS)
    if upg is not None:
        r.upgrade = upgrade_offer(upg, conn, version, r.has_body)
    if ws is not None:
        r.ws_names = frozenset(ws)
    return r


def _framing_lookalike(name: bytes) -> bool:
    """A header name that is not Content-Length or Transfer-Encoding but folds to one of them
    once case, ``-`` and ``_`` are ignored (``Transfer_Encoding``, ``Content__Length``,
    ``Transfer---Encoding``): a backend that maps ``-`` and ``_`` alike (CGI, WSGI:
    ``HTTP_TRANSFER_ENCODING``) would frame the request by it while halb does not."""
    c = name[0] | 0x20
    if c != 99 and c != 116:  # "c", "t": the rest cannot fold to either name
        return False
    folded = name.lower().replace(b"-", b"").replace(b"_", b"")
    return folded == b"contentlength" or folded == b"transferencoding"


_FTOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _quote_forwarded(s: str) -> str:
    if _FTOKEN_RE.match(s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


@lru_cache(maxsize=4096)
def forwarded_element(client_ip: str, proto: str, host: str) -> str:
    """One RFC 7239 ``Forwarded`` element: ``for=...;proto=...;host=...``."""
    node = f"[{client_ip}]" if ":" in client_ip else client_ip
    out = f"for={_quote_forwarded(node)};proto={proto}"
    if host:
        out += f";host={_quote_forwarded(host)}"
    return out


def request_head(req: Request, client_ip: str, proto: str, forwarded: bool,
                 default_host: str = "", cache: list | None = None, via: bytes = b"") -> bytes:
    """The head sent to the backend (always HTTP/1.1, keep-alive).

    Drops hop-by-hop headers and those named in Connection; keeps Content-Length, re-adds
    ``Transfer-Encoding: chunked`` for chunked bodies (re-encoded by the proxy). With
    ``forwarded``: ``X-Forwarded-For`` gets the client appended to what came in (one header),
    ``X-Forwarded-Proto`` is replaced, and an RFC 7239 ``Forwarded`` element is appended.
    ``via``: header lines added as they are (the listener's ``Via: 1.1 halb``), after the
    request's own (a Via line after the others appends to the list, RFC 9110 7.6.3).
    An upgrade offer halb carries (``req.upgrade``) goes on as ``Connection: upgrade`` and its
    ``Upgrade``; ``Sec-WebSocket-*`` headers go only with such an offer.

    ``cache`` (a connection's ``[host, tail]``) keeps the forwarded headers built for a request
    that brought none of its own: the next request on the connection with the same Host reuses
    them instead of building them again (they depend only on client, proto and Host).
    """
    drop = HOP_BY_HOP
    any_len = False  # True: Connection names extra headers, of any length
    if req.conn_tokens:
        extra = req.conn_tokens - _PLAIN_CONN
        if extra:
            drop = drop | extra
            any_len = True
    if req.ws_names and not req.upgrade:  # WebSocket headers without the offer they belong to
        drop = drop | req.ws_names
        any_len = True
    xff: list[bytes] | None = None  # incoming X-Forwarded-For / Forwarded values, if any
    fwd: list[bytes] | None = None
    size = 0  # of the header lines sent on
    headers = req.headers
    for n, v in headers:
        kind = _kind(n, any_len, drop)
        if kind == _K_HOP:
            continue
        if kind != _K_PLAIN and forwarded:  # halb writes these itself
            if kind == _K_XFF:
                if xff is None:
                    xff = []
                xff.append(v)
            elif kind == _K_FWD:
                if fwd is None:
                    fwd = []
                fwd.append(v)
            continue
        size += len(n) + len(v) + 4
    host_line = b""
    if not req.host and default_host:  # an HTTP/1.0 request without Host; HTTP/1.1 needs one
        host_line = b"Host: " + default_host.encode("latin-1") + b"\r\n"
    tail = b""
    if forwarded:
        if xff is None and fwd is None and cache is not None and cache[0] == req.host:
            tail = cache[1]
        else:
            own = xff is None and fwd is None
            if xff is None:
                xff = []
            if fwd is None:
                fwd = []
            xff.append(client_ip.encode())
            fwd.append(forwarded_element(client_ip, proto, req.host).encode("latin-1"))
            tail = b"".join((b"X-Forwarded-For: ", b", ".join(xff), b"\r\n",
                             b"X-Forwarded-Proto: ", proto.encode(), b"\r\n",
                             b"Forwarded: ", b", ".join(fwd), b"\r\n"))
            if own and cache is not None:
                cache[0] = req.host
                cache[1] = tail
    te = _TE_LINE if req.chunked else b""
    if req.upgrade:
        te = te + b"Connection: upgrade\r\nUpgrade: " + req.upgrade + b"\r\n"
    if via:
        te = te + via
    method = req.method
    target = req.target
    if cython.compiled:  # the head written into one bytes object of the size counted above
        total = len(method) + len(target) + 12 + size + len(te) + len(host_line) + len(tail) + 2
        out = _alloc(total)  # noqa: F821 - http_head.pxd's inline helpers (_alloc, _put)
        pos = _put(out, 0, method)  # noqa: F821
        pos = _put(out, pos, b" ")  # noqa: F821
        pos = _put(out, pos, target)  # noqa: F821
        pos = _put(out, pos, b" HTTP/1.1\r\n")  # noqa: F821
        for n, v in headers:  # the same decisions as above
            kind = _kind(n, any_len, drop)
            if kind == _K_HOP or (kind != _K_PLAIN and forwarded):
                continue
            pos = _put(out, pos, n)  # noqa: F821
            pos = _put(out, pos, b": ")  # noqa: F821
            pos = _put(out, pos, v)  # noqa: F821
            pos = _put(out, pos, b"\r\n")  # noqa: F821
        pos = _put(out, pos, te)  # noqa: F821
        pos = _put(out, pos, host_line)  # noqa: F821
        pos = _put(out, pos, tail)  # noqa: F821
        pos = _put(out, pos, b"\r\n")  # noqa: F821
        if pos != total:  # (_put never writes past the end: it returns -1 instead)
            raise RuntimeError("request_head: the head's size was miscounted")
        return out
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for n, v in headers:
        kind = _kind(n, any_len, drop)
        if kind == _K_HOP or (kind != _K_PLAIN and forwarded):
            continue
        parts += (n, b": ", v, b"\r\n")
    parts += (te, host_line, tail, b"\r\n")
    return b"".join(parts)


_TE_LINE = b"Transfer-Encoding: chunked\r\n"


def _kind(n: bytes, any_len: bool, drop: frozenset) -> int:
    """``_req_kind`` for request_head, where Connection may name more headers to drop
    (``any_len``: then ``drop`` holds them with the hop-by-hop ones; they come out _K_HOP)."""
    if any_len:
        lname = n.lower()
        if lname in drop:
            return _K_HOP
        return _req_kind(lname)
    return _req_kind(n)


_RESP_SPECIAL = HOP_BY_HOP | {b"content-length"}
_SPECIAL_LENS = frozenset(len(n) for n in _RESP_SPECIAL)
# ResponseHead.take tests these lengths written out (C comparisons when compiled)
if _SPECIAL_LENS != frozenset((2, 7, 10, 14, 16, 17, 18, 19)):  # pragma: no cover
    raise ImportError("ResponseHead.take's written-out header-name lengths are out of date")


class ResponseHead:
    """A backend response head and the head halb sends to the client, built from it in one
    join.

    The proxy hands it the head's header lines as they came on the wire (``take_range``),
    once ``ResponseFramer`` has checked the whole head: the lines to forward are kept as slices of
    those bytes, the framing headers (Content-Length, Transfer-Encoding, Connection) are
    noted and the hop-by-hop ones dropped. ``add`` does the same one header at a time (the
    shape a per-header parser callback gives). Headers named by Connection are dropped too
    (rare: ``build`` then lays the head out again). Both raise ``HttpError(502)`` past
    ``max_headers`` or ``max_bytes``.
    """

    __slots__ = ("parts", "headers", "content_length", "chunked", "conn_tokens", "conn_extra",
                 "nbytes", "max_headers", "max_bytes", "sline", "cl_bad", "has_te", "upgrade")

    def __init__(self, max_headers: int = 256, max_bytes: int = 65536):
        self.max_headers = max_headers
        self.max_bytes = max_bytes
        self.parts: list[bytes] = [b""]  # [status line's place, header lines or runs of them]
        self.headers: list[tuple[bytes, bytes]] = []
        self.conn_tokens: list[bytes] = []
        self.sline = b""  # the status line for the client, from take_head's head
        self.reset()

    def reset(self) -> None:
        """Ready for the next head."""
        self.parts = [b""]
        if self.headers:  # (kept when empty: only Connection-named headers fill it)
            self.headers = []
        if self.conn_tokens:
            self.conn_tokens = []
        self.content_length: int | None = None
        self.chunked = False
        self.conn_extra = False  # Connection names headers other than close/keep-alive
        self.nbytes = 0
        self.cl_bad = False  # a Content-Length not all digits, or two that differ
        self.has_te = False  # a Transfer-Encoding header, whatever its codings
        self.upgrade = b""  # the Upgrade value (a 101's protocol), which is hop-by-hop

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def take(self, block: bytes) -> None:
        """A head's header lines, each ending in CRLF, as ResponseFramer accepted them (so
        each holds a colon and no bare CR or LF); the status line and the final empty line
        excluded."""
        self.take_range(block, 0, len(block))

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def take_range(self, block: bytes, start: int, n: int) -> None:
        """``take(block[start:n])`` without copying the lines out first."""
        self.reset()
        self.nbytes = n - start
        if n - start > self.max_bytes:
            raise HttpError(502, "backend response head too large")
        parts = self.parts
        pos = start
        run = start  # start of the lines kept since the last dropped one
        count = 0
        while pos < n:
            if cython.compiled:  # the line's CR (the framer let none stand alone), its colon
                eol = _find(block, pos, n, 13)  # noqa: F821 - http_head.pxd's inline helper
                if eol < 0:
                    eol = n
                colon = _find(block, pos, eol, 58)  # noqa: F821
            else:
                eol = block.find(b"\r\n", pos)
                if eol < 0:
                    eol = n
                colon = block.find(b":", pos, eol)
            count += 1
            ln = colon - pos
            # only names of these lengths can be special (see _SPECIAL_LENS)
            if colon > pos and (ln == 14 or ln == 10 or ln == 17 or ln == 7 or ln == 2
                              or ln == 16 or ln == 18 or ln == 19):
                drop = True
                vs = colon + 1  # the value, without the spaces around it
                while vs < eol and (block[vs] == 32 or block[vs] == 9):
                    vs += 1
                ve = eol
                while ve > vs and (block[ve - 1] == 32 or block[ve - 1] == 9):
                    ve -= 1
                if ln == 14 and _is_at(block, pos, b"content-length"):
                    cl = -1
                    if 0 < ve - vs <= 18:
                        cl = 0
                        for k in range(vs, ve):
                            d = block[k] - 48
                            if d < 0 or d > 9:
                                cl = -1
                                break
                            cl = cl * 10 + d
                    # more than 18 digits (an exabyte) counts as malformed, as do two
                    # Content-Lengths that differ (two equal ones are one, RFC 9110 8.6)
                    if cl < 0 or (self.content_length is not None and self.content_length != cl):
                        self.cl_bad = True
                    else:
                        self.content_length = cl
                    drop = False
                elif ln == 10 and _is_at(block, pos, b"connection"):
                    if ve - vs == 10 and _is_at(block, vs, b"keep-alive"):
                        self.conn_tokens.append(b"keep-alive")
                    elif ve - vs == 5 and _is_at(block, vs, b"close"):
                        self.conn_tokens.append(b"close")
                    else:
                        toks = _split_tokens(block[vs:ve])
                        self.conn_tokens += toks
                        for t in toks:
                            if t not in _PLAIN_CONN:
                                self.conn_extra = True
                elif ln == 17 and _is_at(block, pos, b"transfer-encoding"):
                    toks = _split_tokens(block[vs:ve])  # (no negative index: see the decorators)
                    self.chunked = len(toks) > 0 and toks[len(toks) - 1] == b"chunked"
                    self.has_te = True
                elif ln == 7 and _is_at(block, pos, b"upgrade"):
                    self.upgrade = block[vs:ve]
                elif block[pos:colon].lower() not in _RESP_SPECIAL:
                    drop = False
                if drop:
                    if run < pos:
                        parts.append(block[run:pos])
                    run = eol + 2
            pos = eol + 2
        if count > self.max_headers:
            raise HttpError(502, "backend response head too large")
        if run < n:
            parts.append(block if run == 0 and n == len(block) else block[run:n])
        if self.conn_extra:  # build lays the head out again: it needs the pairs
            for line in block[start:n].split(b"\r\n"):
                hname, sep, hvalue = line.partition(b":")
                if sep:
                    self.headers.append((hname, hvalue.strip()))

    def add(self, name: bytes, value: bytes) -> None:
        hs = self.headers
        hs.append((name, value))
        self.nbytes += len(name) + len(value) + 4
        if self.nbytes > self.max_bytes or len(hs) > self.max_headers:
            raise HttpError(502, "backend response head too large")
        parts = self.parts
        n = len(name)
        if n in _SPECIAL_LENS:
            if n == 14 and _is(name, b"content-length"):
                v = value.strip()
                cl = int(v) if v.isdigit() and len(v) <= 18 else -1
                if cl < 0 or (self.content_length is not None and self.content_length != cl):
                    self.cl_bad = True
                else:
                    self.content_length = cl
                parts.append(name)
                parts.append(b": ")
                parts.append(value)
                parts.append(b"\r\n")
                return
            if n == 10 and _is(name, b"connection"):
                if value == b"keep-alive" or value == b"close":  # the usual ones
                    self.conn_tokens.append(value)
                else:
                    toks = _split_tokens(value)
                    self.conn_tokens += toks
                    for t in toks:
                        if t not in _PLAIN_CONN:
                            self.conn_extra = True
                return
            if n == 17 and _is(name, b"transfer-encoding"):
                self.chunked = _split_tokens(value)[-1:] == [b"chunked"]
                self.has_te = True
                return
            if n == 7 and _is(name, b"upgrade"):
                self.upgrade = value.strip()
                return
            if name.lower() in _RESP_SPECIAL:  # the other hop-by-hop headers
                return
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")

    def build(self, status: int, reason: bytes | None, chunk: bool, close: bool,
              set_cookie: bytes | None = None, keep_alive: bool = False,
              lines: bytes = b"") -> bytes:
        """The head for the client: ``chunk`` adds ``Transfer-Encoding: chunked`` (the proxy
        re-encodes the body), ``close`` adds ``Connection: close``, ``keep_alive`` adds
        ``Connection: keep-alive`` (HTTP/1.0 clients), ``set_cookie`` one ``Set-Cookie``,
        ``lines``: header lines added as they are (Via; a 101's Connection and Upgrade).
        ``reason`` None: the status line ``ResponseFramer`` read into ``sline`` (status and
        reason as the backend sent them, on HTTP/1.1)."""
        parts = self.parts
        if self.conn_extra:
            extra = set(self.conn_tokens) - _PLAIN_CONN
            if extra:
                drop = _RESP_SPECIAL | extra
                parts = [b""]
                for n, v in self.headers:
                    ln = n.lower()
                    if ln not in drop or ln == b"content-length":
                        parts += (n, b": ", v, b"\r\n")
        out = parts[:]  # parts[0] is the status line's place (see reset)
        out[0] = self.sline if reason is None and self.sline else _status_line(status, reason)
        if chunk:
            out.append(b"Transfer-Encoding: chunked\r\n")
        if set_cookie:
            out.append(b"Set-Cookie: ")
            out.append(set_cookie)
            out.append(b"\r\n")
        if close:
            out.append(b"Connection: close\r\n")
        elif keep_alive:
            out.append(b"Connection: keep-alive\r\n")
        if lines:
            out.append(lines)
        out.append(b"\r\n")
        return b"".join(out)


# -- response framing ---------------------------------------------------------------------------

# bytes allowed in a header name (RFC 9110 5.6.2 tchar) and in a field value or reason phrase
# (VCHAR, SP, HTAB, obs-text): 1 where allowed, one byte per octet value
_TCHAR = bytes(1 if (chr(c).isalnum() and c < 128) or chr(c) in "!#$%&'*+-.^_`|~" else 0
               for c in range(256))
_FCHAR = bytes(1 if c == 9 or 32 <= c <= 126 or c >= 128 else 0 for c in range(256))
_HEXVAL = bytes(c - 48 if 48 <= c <= 57 else c - 87 if 97 <= c <= 102 else c - 55 if 65 <= c <= 70
                else 255 for c in range(256))
CHUNK_LINE_MAX = 4096  # a chunk-size line with its extensions

# what ResponseFramer.next() found
EV_NEED, EV_INTERIM, EV_HEAD, EV_BODY, EV_DONE, EV_ERROR, EV_SWITCH = 0, 1, 2, 3, 4, 5, 6
# where it is in a response
_F_HEAD, _F_LEN, _F_CSIZE, _F_CDATA, _F_CEND, _F_TRAIL, _F_EOF, _F_DONE = 0, 1, 2, 3, 4, 5, 6, 7



class FR:
    """ResponseFramer's events and two of its states as Python attributes, for Python callers
    (compiled, the EV_* and _F_* names are C constants that only cimporting modules see)."""

    NEED, INTERIM, HEAD, BODY, DONE, ERROR, SWITCH = (EV_NEED, EV_INTERIM, EV_HEAD, EV_BODY,
                                                      EV_DONE, EV_ERROR, EV_SWITCH)
    S_EOF, S_DONE = _F_EOF, _F_DONE


class ResponseFramer:
    """The framing of a backend's responses on one connection, sans I/O: ``feed`` it the bytes
    read, then call ``next`` until it says ``EV_NEED``.

    What llhttp did for halb on this side, in one pass over each head and no Python call per
    piece: a strict status line (``HTTP/1.0`` or ``HTTP/1.1``, three digits, a reason without
    control bytes) and strict header lines (a token, a colon right after it, a value without
    control bytes, CR LF; no obs-fold, no bare CR or LF), then the body's framing by RFC 9112 6.3:
    none for a HEAD request, 1xx, 204 and 304; chunked when Transfer-Encoding ends in chunked;
    until close when it names other codings; else Content-Length; else until close. Both
    Content-Length and Transfer-Encoding, a Content-Length not all digits or two that differ,
    a bad chunk size or a chunk not followed by CR LF are errors (``error`` says which): the
    proxy answers 502 (or cuts a response already started) and drops the connection. Interim
    (1xx) responses come out as ``EV_INTERIM`` before the final one, their fields in ``rh``;
    101 comes out as ``EV_SWITCH`` (its head in ``rh``, the other protocol's first bytes at
    ``buf[pos:]``) when ``start`` was told the request offered an upgrade, and is an error
    otherwise. A chunked body's trailer lines are kept in ``trailers`` (checked like header
    lines; None when there were none). Every wait for bytes is bounded: ``max_head`` for a head
    or the trailers, ``CHUNK_LINE_MAX`` for a chunk-size line.

    After ``EV_HEAD``: ``status``, ``keep`` (the connection may carry another exchange when this
    one ends: HTTP/1.1 without ``Connection: close``, HTTP/1.0 with ``keep-alive``, and the body
    not delimited by the close) and ``rh`` (the head, see ``ResponseHead``). After ``EV_BODY``:
    ``piece``, body bytes as they came (chunked framing removed). After ``EV_DONE``: bytes
    beyond the response, if any, are at ``buf[pos:]`` (a backend sending what nobody asked for).
    ``minor``: the HTTP minor version of the last head (for Via).
    """

    __slots__ = ("rh", "buf", "pos", "state", "left", "status", "keep", "head_req", "piece",
                 "error", "reason", "max_head", "tbytes", "minor", "upgrade", "trailers")

    def __init__(self, rh: ResponseHead, max_head: int):
        self.rh = rh
        self.max_head = max_head
        self.buf = b""
        self.pos = 0
        self.state = _F_DONE
        self.left = 0
        self.status = 0
        self.keep = False
        self.head_req = False
        self.piece = b""
        self.error = ""
        self.reason = b""
        self.tbytes = 0
        self.minor = 1
        self.upgrade = False
        self.trailers: list[bytes] | None = None

    def start(self, head_req: bool, upgrade: bool = False) -> None:
        """A new exchange: the next bytes are the response to it (``head_req``: to a HEAD;
        ``upgrade``: the request offered an upgrade, so a 101 may switch protocols)."""
        self.state = _F_HEAD
        self.buf = b""
        self.pos = 0
        self.head_req = head_req
        self.upgrade = upgrade
        self.error = ""
        if self.trailers is not None:
            self.trailers = None

    def feed(self, data: bytes) -> None:
        if self.pos < len(self.buf):  # an unfinished head or chunk line waits in buf
            self.buf = self.buf[self.pos:] + data
        else:
            self.buf = data
        self.pos = 0

    def _wait(self, have: int) -> int:
        """EV_NEED while the ``have`` bytes of an unfinished head are within bounds."""
        if have > self.max_head:
            return self._fail("response head too large")
        return EV_NEED

    def _fail(self, why: str) -> int:
        self.error = why
        self.state = _F_DONE
        self.pos = len(self.buf)
        return EV_ERROR

    @cython.boundscheck(False)  # every index is checked against n (see the loops)
    @cython.wraparound(False)
    def next(self) -> int:
        buf = self.buf
        n = len(buf)
        while True:
            st = self.state
            pos = self.pos
            if st == _F_LEN or st == _F_CDATA:
                if pos >= n:
                    return EV_NEED
                take = n - pos
                if take > self.left:
                    take = self.left
                if pos == 0 and take == n:
                    self.piece = buf
                elif cython.compiled:  # the slice without the generic slicing call
                    self.piece = PyBytes_FromStringAndSize(  # noqa: F821 - cimported
                        PyBytes_AS_STRING(buf) + pos, take)  # noqa: F821
                else:
                    self.piece = buf[pos:pos + take]
                self.pos = pos + take
                self.left -= take
                if self.left == 0:
                    self.state = _F_DONE if st == _F_LEN else _F_CEND
                return EV_BODY
            if st == _F_HEAD:
                return self._head(buf, n)
            if st == _F_CEND:  # the CR LF after a chunk's data
                if pos + 2 > n:
                    if pos < n and buf[pos] != 13:
                        return self._fail("chunk not followed by CR LF")
                    return EV_NEED
                if buf[pos] != 13 or buf[pos + 1] != 10:
                    return self._fail("chunk not followed by CR LF")
                self.pos = pos + 2
                self.state = _F_CSIZE
                continue
            if st == _F_CSIZE:
                r = self._chunk_size(buf, pos, n)
                if r <= 0:
                    return EV_NEED if r == 0 else EV_ERROR
                continue
            if st == _F_TRAIL:
                r = self._trailer_line(buf, pos, n)
                if r <= 0:
                    return EV_NEED if r == 0 else EV_ERROR
                continue
            if st == _F_EOF:
                if pos >= n:
                    return EV_NEED
                self.piece = buf if pos == 0 else buf[pos:]
                self.pos = n
                return EV_BODY
            return EV_DONE

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def _chunk_size(self, buf: bytes, pos: int, n: int) -> int:
        """A chunk-size line at ``pos``: 1 when taken, 0 when incomplete, -1 (error set) when
        malformed: hex digits (at most 15), then optionally ``;`` extensions (which are
        dropped) after optional blanks, then CR LF."""
        stop = pos + CHUNK_LINE_MAX
        if stop > n:
            stop = n
        size = 0
        i = pos
        while i < stop and i - pos < 16:  # (16 digits are one too many: no overflow)
            v = _HEXVAL[buf[i]]
            if v == 255:
                break
            size = size * 16 + v
            i += 1
        digits = i - pos
        if i == stop and digits < 16:
            return self._line_wait(n - pos)
        if digits == 0 or digits > 15:
            self._fail("invalid chunk size")
            return -1
        c = buf[i]
        if c == 32 or c == 9 or c == 59:  # BWS ";" chunk-ext: any field bytes up to CR
            while i < stop and (buf[i] == 32 or buf[i] == 9):
                i += 1
            if i < stop and buf[i] != 59:
                self._fail("invalid chunk size")
                return -1
            while i < stop and _FCHAR[buf[i]]:
                i += 1
            if i == stop:
                return self._line_wait(n - pos)
        if buf[i] != 13:
            self._fail("invalid chunk size")
            return -1
        if i + 1 >= n:
            return 0
        if buf[i + 1] != 10:
            self._fail("invalid chunk size")
            return -1
        self.pos = i + 2
        if size == 0:
            self.state = _F_TRAIL
            self.tbytes = 0
            self.trailers = None
        else:
            self.state = _F_CDATA
            self.left = size
        return 1

    def _line_wait(self, have: int) -> int:
        """0 (wait) while the ``have`` bytes of an unfinished chunk-size line are within
        bounds, else -1 (error set)."""
        if have >= CHUNK_LINE_MAX:
            self._fail("chunk-size line too long")
            return -1
        return 0

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def _trailer_line(self, buf: bytes, pos: int, n: int) -> int:
        """One line of the trailer section (checked like a header line, kept in ``trailers``)
        or its final empty line: 1 when taken, 0 when incomplete, -1 (error set) when
        malformed."""
        if pos + 2 > n:
            if pos < n and buf[pos] == 10:
                self._fail("bare LF in trailers")
                return -1
            return 0
        if buf[pos] == 13:
            if buf[pos + 1] != 10:
                self._fail("bare CR in trailers")
                return -1
            self.pos = pos + 2
            self.state = _F_DONE
            return 1
        end = _line_end(buf, pos, n)
        if end == -1:
            if n - pos + self.tbytes > self.max_head:
                self._fail("trailer section too large")
                return -1
            return 0
        if end < 0 or _header_line_error(buf, pos, end):
            self._fail("malformed trailer line")
            return -1
        self.tbytes += end + 2 - pos
        if self.tbytes > self.max_head:
            self._fail("trailer section too large")
            return -1
        if self.trailers is None:
            self.trailers = []
        self.trailers.append(buf[pos:end + 2])
        self.pos = end + 2
        return 1

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def _head(self, buf: bytes, n: int) -> int:
        pos = self.pos
        while pos + 1 < n and buf[pos] == 13 and buf[pos + 1] == 10:  # CR LFs before a head
            pos += 2
        self.pos = pos
        # the status line
        end = _line_end(buf, pos, n)
        if end == -1:
            return self._wait(n - pos)
        if end < 0:
            return self._fail("bare CR or LF in the status line")
        if end - pos < 12 or buf[pos] != 72 or buf[pos + 1] != 84 or buf[pos + 2] != 84 \
                or buf[pos + 3] != 80 or buf[pos + 4] != 47 or buf[pos + 5] != 49 \
                or buf[pos + 6] != 46 or (buf[pos + 7] != 48 and buf[pos + 7] != 49) \
                or buf[pos + 8] != 32:
            return self._fail("malformed status line")
        minor = buf[pos + 7] - 48
        status = 0
        for k in range(pos + 9, pos + 12):
            d = buf[k] - 48
            if d < 0 or d > 9:
                return self._fail("malformed status line")
            status = status * 10 + d
        if status < 100 or (end > pos + 12 and buf[pos + 12] != 32):
            return self._fail("malformed status line")
        for k in range(pos + 12, end):
            if not _FCHAR[buf[k]]:
                return self._fail("malformed status line")
        # the header lines, up to the empty one
        hs = end + 2
        i = hs
        while True:
            if i + 2 > n:
                return self._wait(n - pos)
            if buf[i] == 13:
                if buf[i + 1] != 10:
                    return self._fail("bare CR in the response head")
                break
            e = _line_end(buf, i, n)
            if e == -1:
                return self._wait(n - pos)
            if e < 0:
                return self._fail("bare CR or LF in the response head")
            bad = _header_line_error(buf, i, e)
            if bad:
                return self._fail("obsolete line folding in the response head" if bad == 2
                                  else "malformed header line in the response head")
            i = e + 2
        hend = i + 2  # just past the head's empty line
        if hend - pos > self.max_head:
            return self._fail("response head too large")
        self.pos = hend
        self.status = status
        self.minor = minor
        rh = self.rh
        if status < 200:
            if status == 101 and not self.upgrade:
                return self._fail("backend switched protocols without an upgrade offer")
            self.reason = _reason(buf, pos, end)
            try:
                rh.take_range(buf, hs, i)  # the interim response's fields (103's Link...)
            except HttpError as err:
                return self._fail(err.reason)
            rh.sline = _sline(buf, pos, end)
            if status == 101:
                if not rh.upgrade:
                    return self._fail("101 without Upgrade")
                self.state = _F_DONE  # the rest is the other protocol's (buf[pos:])
                return EV_SWITCH
            return EV_INTERIM  # the final response follows (state stays _F_HEAD)
        try:
            rh.take_range(buf, hs, i)
        except HttpError as err:
            return self._fail(err.reason)
        rh.sline = _sline(buf, pos, end)
        if rh.cl_bad:
            return self._fail("invalid Content-Length")
        if rh.has_te and rh.content_length is not None:
            return self._fail("both Content-Length and Transfer-Encoding")
        toks = rh.conn_tokens
        if minor == 1:
            keep = b"close" not in toks
        else:
            keep = b"keep-alive" in toks and b"close" not in toks
        if self.head_req or status == 204 or status == 304:
            self.state = _F_DONE
        elif rh.chunked:
            self.state = _F_CSIZE
        elif rh.has_te or rh.content_length is None:
            self.state = _F_EOF  # the body runs until the backend closes
            keep = False
        elif rh.content_length == 0:
            self.state = _F_DONE
        else:
            self.state = _F_LEN
            self.left = rh.content_length
        self.keep = keep
        return EV_HEAD


@cython.boundscheck(False)
@cython.wraparound(False)
def _line_end(buf: bytes, pos: int, n: int) -> int:
    """Where the line at ``pos`` ends (its CR, followed by LF); -1 if ``buf`` does not hold
    all of it yet, -2 if it holds a bare CR or a LF without CR."""
    if cython.compiled:
        cr = _find(buf, pos, n, 13)  # noqa: F821 - http_head.pxd's inline helper
        lf = _find(buf, pos, n if cr < 0 else cr, 10)  # noqa: F821
    else:
        cr = buf.find(b"\r", pos, n)
        lf = buf.find(b"\n", pos, n if cr < 0 else cr)
    if lf >= 0:
        return -2
    if cr < 0 or cr + 1 >= n:
        return -1
    if buf[cr + 1] != 10:
        return -2
    return cr


@cython.boundscheck(False)
@cython.wraparound(False)
def _header_line_error(buf: bytes, pos: int, end: int) -> int:
    """0 if ``buf[pos:end]`` is a good header line (``token ":" OWS value OWS``, the value
    without control bytes), 2 if it starts with a blank (obs-fold), else 1."""
    c = buf[pos]
    if c == 32 or c == 9:
        return 2
    i = pos
    while i < end and _TCHAR[buf[i]]:
        i += 1
    if i == pos or i == end or buf[i] != 58:
        return 1
    i += 1
    while i < end:
        if not _FCHAR[buf[i]]:
            return 1
        i += 1
    return 0


def _reason(data: bytes, start: int, cr: int) -> bytes:
    """The reason phrase of the status line ``data[start:cr]`` that llhttp accepted
    (``HTTP/d.d SP 3DIGIT [SP reason]``); b"" if there is none."""
    sp = data.find(b" ", start, cr)
    if sp < 0 or sp + 4 >= cr:  # no reason: "HTTP/1.1 200"
        return b""
    return data[sp + 5:cr]


_last_sline = b""  # the last status line _sline made: most responses repeat it


@cython.boundscheck(False)
@cython.wraparound(False)
def _sline(data: bytes, start: int, cr: int) -> bytes:
    """The status line for the client from the one ``data[start:cr]`` that llhttp accepted
    (``HTTP/d.d SP 3DIGIT [SP reason]``): ``HTTP/1.1``, the backend's status and reason. The
    last one made is reused when it matches (compared in place: no slice)."""
    global _last_sline
    if cython.compiled:
        sp = start
        while sp < cr and data[sp] != 32:
            sp += 1
    else:
        sp = data.find(b" ", start, cr)
        if sp < 0:
            sp = cr
    if sp + 4 >= cr:  # no reason phrase: the standard one (or "Unknown")
        return _status_line(int(data[sp + 1:sp + 4] or b"0"), b"")
    last = _last_sline
    n = cr - sp - 1  # "200 OK"
    if len(last) == n + 11:
        if cython.compiled:
            k = 0
            while k < n and last[9 + k] == data[sp + 1 + k]:
                k += 1
            if k == n:
                return last
        elif last[9:9 + n] == data[sp + 1:cr]:
            return last
    line = b"HTTP/1.1 " + data[sp + 1:cr] + b"\r\n"
    _last_sline = line
    return line


_STATUS_LINES: dict = {}  # status -> (reason, status line): the last reason seen for it


def _status_line(status: int, reason: bytes) -> bytes:
    e = _STATUS_LINES.get(status)
    if e is not None and e[0] == reason:
        return e[1]
    line = b"HTTP/1.1 %d %b\r\n" % (status, reason or REASONS.get(status, "Unknown").encode())
    if len(_STATUS_LINES) >= 1024:
        _STATUS_LINES.clear()
    _STATUS_LINES[status] = (reason, line)
    return line


def response_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]], *,
                  chunk: bool, close: bool, set_cookie: bytes | None = None,
                  keep_alive: bool = False) -> bytes:
    """``ResponseHead`` over a complete header list (tests and one-off callers)."""
    rh = ResponseHead()
    for n, v in headers:
        rh.add(n, v)
    return rh.build(status, reason, chunk, close, set_cookie, keep_alive)


# fields that never go on in a trailer section: framing, routing, hop-by-hop (RFC 9110 6.5.1)
_NOT_IN_TRAILERS = HOP_BY_HOP | {b"content-length", b"host", b"content-type",
                                 b"content-encoding", b"content-range", b"authorization",
                                 b"set-cookie", b"cookie", b"cache-control", b"expect"}


def trailer_lines(pairs: list[tuple[bytes, bytes]] | None = None,
                  lines: list[bytes] | None = None) -> bytes:
    """The trailer section halb forwards after a chunked body's last chunk: from parsed
    ``pairs`` (a request's, from llhttp) or from checked raw ``lines`` (a response's, from
    ResponseFramer), without the fields that must not be trailers (framing, routing,
    authentication, hop-by-hop, and names that imitate the framing ones)."""
    out = []
    if pairs:
        for n, v in pairs:
            ln = n.lower()
            if ln not in _NOT_IN_TRAILERS and not _framing_lookalike(n):
                out.append(b"%b: %b\r\n" % (n, v))
    if lines:
        for line in lines:
            n = line.split(b":", 1)[0]
            if n.lower() not in _NOT_IN_TRAILERS and not _framing_lookalike(n):
                out.append(line)
    return b"".join(out)


APP_COOKIE_MAX = 256  # longer application cookie values are keyed by their first 256 bytes


def app_cookie_set(rh: "ResponseHead", name: str) -> str | None:
    """The value a response's ``Set-Cookie`` gives the application cookie ``name`` (the last
    one wins); "" when it deletes the cookie (``Max-Age=0`` or an empty value); None when the
    response does not set it. Only the app_cookie stickiness mode calls this."""
    lname = name.lower().encode("latin-1") + b"="
    found: str | None = None
    for run in rh.parts[1:]:
        for line in run.split(b"\r\n"):
            n, sep, v = line.partition(b":")
            if not sep or n.strip().lower() != b"set-cookie":
                continue
            v = v.strip()
            first, _, attrs = v.partition(b";")
            if first.strip().lower().startswith(lname):
                val = first.strip()[len(lname):].strip().strip(b'"')
                gone = not val or b"max-age=0" in attrs.lower().replace(b" ", b"")
                found = "" if gone else val[:APP_COOKIE_MAX].decode("latin-1")
    return found


def _cookie_pair_value(piece: bytes) -> tuple[bytes, bytes, bool]:
    """(name, value without quotes, quoted?) of one ``name=value`` cookie pair."""
    k, _, val = piece.partition(b"=")
    val = val.strip()
    quoted = len(val) >= 2 and val[:1] == b'"' and val[-1:] == b'"'
    return k.strip(), val[1:-1] if quoted else val, quoted


def strip_cookie_prefix(headers: list[tuple[bytes, bytes]],
                        name: str) -> tuple[list[tuple[bytes, bytes]] | None, str]:
    """Prefix mode (HAProxy's ``cookie NAME prefix``): the request's headers with the backend's
    name taken off the application cookie (``NAME=web1~abc`` -> ``NAME=abc``; the cookie name
    matched exactly, as RFC 6265 compares them), and that backend name. ``(None, "")`` when no
    ``NAME`` cookie carries a prefix (the headers are then sent on as they are)."""
    lname = name.encode("latin-1")
    out = None
    found = ""
    for i, (n, v) in enumerate(headers):
        if len(n) != 6 or n.lower() != b"cookie" or lname not in v:
            continue
        pieces = v.split(b";")
        changed = False
        for j, piece in enumerate(pieces):
            if b"=" not in piece:
                continue
            k, val, quoted = _cookie_pair_value(piece)
            if k != lname:
                continue
            be, sep, rest = val.partition(b"~")
            if not sep or not be:
                continue
            found = be.decode("latin-1")
            lead = b" " if j else b""
            pieces[j] = lead + k + b"=" + (b'"' + rest + b'"' if quoted else rest)
            changed = True
        if changed:
            if out is None:
                out = list(headers)
            out[i] = (n, b";".join(pieces))
    return out, found


def _prefixed(value: bytes, lname: bytes, pre: bytes) -> bytes | None:
    """A ``Set-Cookie`` value with ``pre`` in front of cookie ``lname``'s value; None when it
    sets another cookie or deletes this one (empty value)."""
    first, semi, attrs = value.partition(b";")
    k, val, quoted = _cookie_pair_value(first)
    if k != lname or not val:
        return None
    v = pre + val
    return k + b"=" + (b'"' + v + b'"' if quoted else v) + semi + attrs


def prefix_set_cookie_pairs(headers: list[tuple[bytes, bytes]], name: str,
                            backend: str) -> list[tuple[bytes, bytes]]:
    """``prefix_set_cookie`` for a head kept as (name, value) pairs."""
    lname = name.encode("latin-1")
    pre = backend.encode("latin-1") + b"~"
    out = []
    for n, v in headers:
        if n.strip().lower() == b"set-cookie":
            p = _prefixed(v, lname, pre)
            if p is not None:
                v = p
        out.append((n, v))
    return out


def prefix_set_cookie(runs: list[bytes], name: str, backend: str) -> list[bytes] | None:
    """Prefix mode, the way out: the response head's runs of header lines (``ResponseHead.parts``
    without its first item) with each ``Set-Cookie`` of ``name`` given the backend's prefix
    (``NAME=abc; Path=/`` -> ``NAME=web1~abc; Path=/``). A cookie being deleted (empty value)
    is left as it is. None when the response sets no such cookie."""
    lname = name.encode("latin-1")
    pre = backend.encode("latin-1") + b"~"
    out = None
    for i, run in enumerate(runs):
        if lname not in run:
            continue
        lines = run.split(b"\r\n")
        changed = False
        for j, line in enumerate(lines):
            hname, sep, value = line.partition(b":")
            if not sep or hname.strip().lower() != b"set-cookie":
                continue
            v = _prefixed(value, lname, pre)
            if v is not None:
                lines[j] = hname + b": " + v
                changed = True
        if changed:
            if out is None:
                out = list(runs)
            out[i] = b"\r\n".join(lines)
    return out


def sticky_cookie(name: str, backend: str) -> bytes:
    """HAProxy ``cookie insert`` style: ``NAME=backend; path=/; HttpOnly``."""
    return f"{name}={backend}; path=/; HttpOnly".encode("latin-1")


# _req_kind's written-out names must be the sets' (checked once, at import)
if any(_req_kind(n) != _K_HOP for n in HOP_BY_HOP) or \
        [_req_kind(n) for n in (b"x-forwarded-for", b"x-forwarded-proto", b"forwarded")] != \
        [_K_XFF, _K_XFP, _K_FWD] or _FWD != {b"x-forwarded-for", b"x-forwarded-proto",
                                              b"forwarded"}:  # pragma: no cover
    raise ImportError("http_head._req_kind is out of step with HOP_BY_HOP and _FWD")
