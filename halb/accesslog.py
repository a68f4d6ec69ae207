"""Access log lines: what one HTTP exchange or one L4 TCP connection becomes in the log. Pure:
no I/O, no clock (the caller hands in monotonic timestamps and the wall-clock offset).

The writer (a bounded buffer drained by a thread, the destinations, SIGUSR1 reopen, the
dropped-lines counter) is ``halb.accesslog_writer``; the listeners call its ``AccessLog``.

Formats
-------
``text`` (the default) is HAProxy's ``option httplog`` / ``option tcplog`` layout, so that an
HAProxy user reads it at once (times in UTC)::

    198.18.0.5:41234 [07/Dec/2026:15:01:02.345] www web/web1 0/0/1/2/3 200 1234 - - ---- -/3/-/1/0 0/0 "GET /index.html HTTP/1.1"
    198.18.0.5:41236 [07/Dec/2026:15:01:02.345] db db/db1 0/1/5012 1234 -- -/1/-/1/0 0/0 567

HTTP: ``client [request start] listener pool/backend Tq/Tw/Tc/Tr/Ta status bytes - -
termination(4) ac/fc/bc/sc/retries sq/bq "request line"``; TCP: ``client [accept]
listener pool/backend Tw/Tc/Tt bytes_out termination(2) ac/fc/bc/sc/retries sq/bq bytes_in``.
The two ``- -`` are HAProxy's captured cookies (halb captures none); ``ac`` and ``bc`` (process-
and backend-wide connection counts) are ``-``, halb counts neither on this path; ``fc`` is the
listener's open client connections and ``sc`` the backend's active connections (requests in
flight) when the line is made; ``sq/bq`` is ``0/0``: halb never queues (a full backend is
skipped). The 4-character HTTP termination state is HAProxy's ``%tsc``: the two characters of
``term`` and the persistence-cookie pair (``-`` unless the pool has ``sticky.mode =
"cookie"``; then the request's cookie ``N`` none, ``V`` valid and used, ``I`` names no
backend, ``D`` names a backend that is down or full; and ``I`` if halb inserted a
``Set-Cookie``, ``N`` if not).

``json``: one object per line with the fields below (``mode`` "http" or "tcp"; an HTTP line
has ``bytes`` and, after a 101, ``bytes_in``; a TCP line ``bytes_in`` and ``bytes_out``).

A template: any other string with ``%{name}`` fields (``%%`` is a literal ``%``), e.g.
``"%{client} %{status} %{bytes}"``; a field that does not apply (``status`` of a TCP line) is
``-``. Field names are checked when the config is read (``parse_template``).

Fields (times in ms, -1 for a phase never reached, as HAProxy's):

    time      request start (HTTP: first byte of the request; TCP: accept), ISO 8601 UTC, ms
    client    ip:port ([v6]:port)          listener, pool, backend   (- when none)
    Tq        request head received, from its first byte
    Tw        waiting in halb before a backend was tried (pipelined requests wait; usually 0)
    Tc        backend connect time (0 for a reused keep-alive connection; with retries, from
              the first attempt)
    Tr        backend response head, after the request was sent
    Ta        total active time of the exchange (HTTP); Tt: of the connection (TCP)
    status    HTTP status sent to the client (-1: none)
    bytes     bytes sent to the client (HTTP: response head and body; TCP: = bytes_out)
    bytes_in  bytes from the client (TCP; HTTP: what went up a tunnel after a 101)
    bytes_out bytes sent to the client
    term      termination state, 2 characters (``term_state``); tsc: HTTP's 4 (above)
    method, request (``METHOD target HTTP/x.y``, the target cut at 1024 bytes; bytes below 0x20
              or above 0x7e, ``"`` and ``#`` written ``#XX`` as HAProxy does), retries, mode,
    conns     (fc), backend_conns (sc)
    cache     what the listener's HTTP cache did (``[listeners.cache]``): HIT (answered from it),
              MISS (went to the backend; stored if storable), STALE (revalidated with the
              backend, which sent a new response), REVALIDATED (the backend's 304 made the stored
              one fresh, which was sent), BYPASS (not cacheable: method, body, Range,
              no-store, ...); ``-`` when no cache looked at it. In JSON lines only when not ``-``

Sampling (``Sampler``) is counter-based and deterministic: with ``sample = p``, exactly
``floor(N * p)`` of N exchanges are logged (to the millionth), evenly spread: every 4th for
0.25, the same ones on every run.
"""

from __future__ import annotations

import json
import time

# the field names of templates and JSON lines, in the order of the docstring
FIELDS = ("time", "client", "listener", "pool", "backend", "Tq", "Tw", "Tc", "Tr", "Ta", "Tt",
          "status", "bytes", "bytes_in", "bytes_out", "term", "tsc", "method", "request",
          "retries", "mode", "conns", "backend_conns", "cache")
FORMATS = ("text", "json")
TARGET_MAX = 1024  # request target bytes kept in a line (HAProxy's tune.http.logurilen)
TEMPLATE_MAX = 1024  # characters of a template
LINE_MAX = 8192  # a line is cut here whatever made it long (a bound, not a format rule)
SAMPLE_SCALE = 1_000_000
# syslog facilities by name (RFC 5424 6.2.1); access log lines are sent with severity info
FACILITIES = {"kern": 0, "user": 1, "daemon": 3, "auth": 4, "syslog": 5, "local0": 16,
              "local1": 17, "local2": 18, "local3": 19, "local4": 20, "local5": 21,
              "local6": 22, "local7": 23}
SEVERITY_INFO = 6

# termination state, first character: who or what ended it (HAProxy's meanings)
END_NORMAL = "-"
END_CLIENT_ABORT = "C"  # the client closed or reset the connection
END_CLIENT_TIMEOUT = "c"  # the client sent (or took) nothing in time
END_SERVER_ABORT = "S"  # the backend refused, reset or closed, or no backend was available
END_SERVER_TIMEOUT = "s"  # the backend did not connect or answer in time
END_PROXY = "P"  # halb refused the request or the backend's response (400, 414, 431, 501...)
END_RESOURCE = "R"  # a local resource ran out (sockets)
END_KILLED = "K"  # halb stopped (or a reload removed the listener) with the exchange open
# second character: the phase it was in
PH_REQUEST = "R"  # waiting for (or reading) a complete request; nothing sent to a backend
PH_QUEUE = "Q"  # waiting in a queue (halb has none: never reported)
PH_CONNECT = "C"  # choosing or connecting to a backend
PH_HEADERS = "H"  # request sent, waiting for the response head
PH_DATA = "D"  # data moving (response body, tunnel, L4 relay)
PH_LAST = "L"  # last data to the client after the backend finished (halb logs when the
#                response is handed to the connection, so never reported)
PH_NONE = "-"


def term_state(who: str, phase: str) -> str:
    """The two-character termination state: ``--`` for a normal end, else who + phase."""
    if who == END_NORMAL:
        return "--"
    return who + phase


def http_phase(head_done: bool, tried: bool, sent: bool, resp_started: bool,
               req_complete: bool = True) -> str:
    """The phase an HTTP exchange had reached: response started, or request body still going
    to the backend (D); request sent, waiting for the response head (H); a backend being
    chosen or connected (C); else the request itself (R)."""
    if not head_done:
        return PH_REQUEST
    if resp_started:
        return PH_DATA
    if sent:
        return PH_HEADERS if req_complete else PH_DATA
    if tried:
        return PH_CONNECT
    return PH_REQUEST


def tcp_phase(connected: bool) -> str:
    return PH_DATA if connected else PH_CONNECT


def cookie_state(mode: str, cookie: str, known: bool, used: bool, inserted: bool) -> str:
    """HAProxy's ``%tsc`` characters 3 and 4 for a pool's cookie persistence: the request's
    cookie (N none, V valid and used, I names no backend, D names one that is down or full)
    and what halb did (I inserted a Set-Cookie, N nothing); ``--`` without cookie mode."""
    if mode != "cookie":
        return "--"
    if not cookie:
        c = "N"
    elif used:
        c = "V"
    elif not known:
        c = "I"
    else:
        c = "D"
    return c + ("I" if inserted else "N")


def ms(a: float, b: float) -> int:
    """Whole milliseconds from ``a`` to ``b`` (monotonic seconds), cut down; -1 if either was
    never reached (negative). Cut down, a phase shorter than 1 ms is 0 (a reused connection's
    Tc, a request head in one packet's Tq) and the phases of an exchange add up to at most
    its total (Tq + Tw + Tc + Tr <= Ta). (1e-6 ms absorbs the float error of a difference.)"""
    if a < 0 or b < 0:
        return -1
    return int((b - a) * 1000.0 + 1e-6) if b > a else 0


def http_timers(t_begin: float, t_head: float, t_start: float, t_sent: float, t_resp: float,
                t_end: float) -> tuple[int, int, int, int, int]:
    """(Tq, Tw, Tc, Tr, Ta) in ms from an exchange's monotonic instants, each negative if never
    reached: first byte of the request, head complete, first backend tried (the exchange
    started), request handed to a connected backend, response head, end."""
    # (ms() for each pair, written out: this runs once per logged request)
    b, h, s, x, r, e = t_begin, t_head, t_start, t_sent, t_resp, t_end
    return (-1 if b < 0 or h < 0 else int((h - b) * 1000.0 + 1e-6) if h > b else 0,
            -1 if h < 0 or s < 0 else int((s - h) * 1000.0 + 1e-6) if s > h else 0,
            -1 if s < 0 or x < 0 else int((x - s) * 1000.0 + 1e-6) if x > s else 0,
            -1 if x < 0 or r < 0 else int((r - x) * 1000.0 + 1e-6) if r > x else 0,
            -1 if b < 0 or e < 0 else int((e - b) * 1000.0 + 1e-6) if e > b else 0)


def tcp_timers(t_accept: float, t_first: float, t_connected: float,
               t_end: float) -> tuple[int, int, int]:
    """(Tw, Tc, Tt) in ms: accept to the first connect attempt, first attempt to connected,
    accept to close."""
    return ms(t_accept, t_first), ms(t_first, t_connected), ms(t_accept, t_end)


# bytes written as they are in a request line; every other one becomes #XX (HAProxy's
# http log encoding: controls, DEL and above, '"' and '#')
_PLAIN = bytes(c for c in range(0x20, 0x7f) if c not in (0x22, 0x23))
_ESC = tuple(chr(c) if c in _PLAIN else "#%02X" % c for c in range(256))


def escape(data: bytes) -> str:
    """``data`` as printable ASCII: bytes outside 0x20..0x7e, ``"`` and ``#`` as ``#XX``."""
    if not data.translate(None, _PLAIN):
        return data.decode("ascii")
    return "".join([_ESC[c] for c in data])


def request_line(method: bytes, target: bytes, version: str) -> str:
    """``METHOD target HTTP/x.y``, the target cut at ``TARGET_MAX`` bytes and escaped."""
    if len(target) > TARGET_MAX:
        target = target[:TARGET_MAX]
    line = method + b" " + target
    if not line.translate(None, _PLAIN):  # (the usual case: nothing to escape)
        return f"{line.decode('ascii')} HTTP/{version}"
    return f"{escape(method)} {escape(target)} HTTP/{version}"


BADREQ = "<BADREQ>"  # HAProxy's request line for a request that was never parsed

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class _Clockface:
    """Wall-clock seconds -> the two date forms, the calendar part cached per second."""

    __slots__ = ("sec", "text", "iso", "msec", "mtext")

    def __init__(self):
        self.sec = -1
        self.text = ""
        self.iso = ""
        self.msec = -1  # the last text date made, by millisecond (many lines share one)
        self.mtext = ""

    def _second(self, sec: int) -> None:
        t = time.gmtime(sec)
        self.sec = sec
        self.text = (f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year:04d}:"
                     f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}")
        self.iso = (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
                    f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}")

    def text_date(self, wall: float) -> str:
        """``07/Dec/2026:15:01:02.345`` (HAProxy's %tr layout, UTC)."""
        msec = int(wall * 1000.0)
        if msec == self.msec:
            return self.mtext
        sec = msec // 1000
        if sec != self.sec:
            self._second(sec)
        self.msec = msec
        self.mtext = t = f"{self.text}.{msec - sec * 1000:03d}"
        return t

    def iso_date(self, wall: float) -> str:
        """``2026-12-07T15:01:02.345Z``."""
        msec = int(wall * 1000.0)
        sec = msec // 1000
        if sec != self.sec:
            self._second(sec)
        return f"{self.iso}.{msec - sec * 1000:03d}Z"


def client_addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# ---------------------------------------------------------------------------------------------
# Templates


def parse_template(spec: str) -> list[tuple[str, str]]:
    """``"%{client} %{status}"`` -> [("", "client"), (" ", "status")]: (literal text before,
    field name) pairs, a last ("tail", "") for text after the last field. Raises ValueError
    naming the problem (unknown field, unclosed ``%{``, a lone ``%``)."""
    if len(spec) > TEMPLATE_MAX:
        raise ValueError(f"template too long ({len(spec)} characters, at most {TEMPLATE_MAX})")
    out: list[tuple[str, str]] = []
    lit: list[str] = []
    i = 0
    n = len(spec)
    while i < n:
        c = spec[i]
        if c != "%":
            lit.append(c)
            i += 1
            continue
        if i + 1 < n and spec[i + 1] == "%":
            lit.append("%")
            i += 2
            continue
        if i + 1 < n and spec[i + 1] == "{":
            end = spec.find("}", i + 2)
            if end < 0:
                raise ValueError(f"unclosed %{{ at character {i + 1} of {spec!r}")
            name = spec[i + 2:end]
            if name not in FIELDS:
                raise ValueError(f"unknown field {name!r} in %{{{name}}} (known: "
                                 f"{', '.join(FIELDS)})")
            out.append(("".join(lit), name))
            lit = []
            i = end + 1
            continue
        raise ValueError(f"a lone '%' at character {i + 1} of {spec!r} (write %% for a "
                         f"percent sign, %{{name}} for a field)")
    if lit or not out:
        out.append(("".join(lit), ""))
    if not any(name for _, name in out):
        raise ValueError(f"no %{{field}} in {spec!r} (expected \"text\", \"json\" or a "
                         f"template such as \"%{{client}} %{{status}} %{{bytes}}\")")
    return out


def check_format(spec: str) -> str:
    """The format setting as given if valid ("text", "json" or a template); ValueError if not."""
    if spec in FORMATS:
        return spec
    if "%" not in spec:
        raise ValueError(f"unknown format {spec!r} (expected \"text\", \"json\" or a template "
                         f"with %{{field}} names such as \"%{{client}} %{{status}}\")")
    parse_template(spec)
    return spec


def _fmt_string(parts: list[tuple[str, str]]) -> str:
    """The parsed template as a ``str.format_map`` string."""
    out = []
    for lit, name in parts:
        out.append(lit.replace("{", "{{").replace("}", "}}"))
        if name:
            out.append("{" + name + "}")
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Formats


class Formatter:
    """Builds lines in one format: ``http(...)`` and ``tcp(...)`` return the line (no newline).
    Times are already milliseconds; ``wall`` is the start in wall-clock seconds."""

    def __init__(self, spec: str = "text"):
        self.spec = check_format(spec)
        self.face = _Clockface()
        self.tmpl = _fmt_string(parse_template(spec)) if spec not in FORMATS else ""
        if spec == "text":
            self.http = self._http_text
            self.tcp = self._tcp_text
        elif spec == "json":
            self.http = self._http_json
            self.tcp = self._tcp_json
        else:
            self.http = self._http_tmpl
            self.tcp = self._tcp_tmpl

    # -- text (HAProxy's httplog / tcplog layout) -------------------------------------------

    def _http_text(self, wall, client, listener, pool, backend, tq, tw, tc, tr, ta, status,
                   nbytes, nin, term, ck, method, request, retries, fc, sc, cache="-") -> str:
        return (f"{client} [{self.face.text_date(wall)}] {listener} {pool}/{backend} "
                f"{tq}/{tw}/{tc}/{tr}/{ta} {status} {nbytes} - - {term}{ck} "
                f"-/{fc}/-/{sc}/{retries} 0/0 \"{request}\"")

    def _tcp_text(self, wall, client, listener, pool, backend, tw, tc, tt, nin, nout, term,
                  retries, fc, sc) -> str:
        return (f"{client} [{self.face.text_date(wall)}] {listener} {pool}/{backend} "
                f"{tw}/{tc}/{tt} {nout} {term} -/{fc}/-/{sc}/{retries} 0/0 {nin}")

    # -- json ---------------------------------------------------------------------------------

    def _http_json(self, wall, client, listener, pool, backend, tq, tw, tc, tr, ta, status,
                   nbytes, nin, term, ck, method, request, retries, fc, sc, cache="-") -> str:
        # every string but the request line is a name, an address or a token: nothing to
        # escape (config names match [A-Za-z0-9_.-]); the request line is printable ASCII
        # (escape()) whose backslashes json.dumps doubles
        tail = f',"bytes_in":{nin}' if nin >= 0 else ""
        ctail = f',"cache":"{cache}"' if cache != "-" else ""
        return (f'{{"time":"{self.face.iso_date(wall)}","mode":"http","client":"{client}",'
                f'"listener":"{listener}","pool":"{pool}","backend":"{backend}",'
                f'"Tq":{tq},"Tw":{tw},"Tc":{tc},"Tr":{tr},"Ta":{ta},"status":{status},'
                f'"bytes":{nbytes}{tail},"term":"{term}","tsc":"{term}{ck}",'
                f'"method":"{method}","request":{_jstr(request)},"retries":{retries},'
                f'"conns":{fc},"backend_conns":{sc}{ctail}}}')

    def _tcp_json(self, wall, client, listener, pool, backend, tw, tc, tt, nin, nout, term,
                  retries, fc, sc) -> str:
        return (f'{{"time":"{self.face.iso_date(wall)}","mode":"tcp","client":"{client}",'
                f'"listener":"{listener}","pool":"{pool}","backend":"{backend}",'
                f'"Tw":{tw},"Tc":{tc},"Tt":{tt},"bytes_in":{nin},"bytes_out":{nout},'
                f'"term":"{term}","retries":{retries},"conns":{fc},"backend_conns":{sc}}}')

    # -- templates ----------------------------------------------------------------------------

    def _http_tmpl(self, wall, client, listener, pool, backend, tq, tw, tc, tr, ta, status,
                   nbytes, nin, term, ck, method, request, retries, fc, sc, cache="-") -> str:
        return self.tmpl.format_map({
            "time": self.face.iso_date(wall), "client": client, "listener": listener,
            "pool": pool, "backend": backend, "Tq": tq, "Tw": tw, "Tc": tc, "Tr": tr,
            "Ta": ta, "Tt": ta, "status": status, "bytes": nbytes,
            "bytes_in": nin if nin >= 0 else "-", "bytes_out": nbytes, "term": term,
            "tsc": term + ck, "method": method, "request": request, "retries": retries,
            "mode": "http", "conns": fc, "backend_conns": sc, "cache": cache})

    def _tcp_tmpl(self, wall, client, listener, pool, backend, tw, tc, tt, nin, nout, term,
                  retries, fc, sc) -> str:
        return self.tmpl.format_map({
            "time": self.face.iso_date(wall), "client": client, "listener": listener,
            "pool": pool, "backend": backend, "Tq": "-", "Tw": tw, "Tc": tc, "Tr": "-",
            "Ta": "-", "Tt": tt, "status": "-", "bytes": nout, "bytes_in": nin,
            "bytes_out": nout, "term": term, "tsc": term, "method": "-", "request": "-",
            "retries": retries, "mode": "tcp", "conns": fc, "backend_conns": sc, "cache": "-"})


def _jstr(s: str) -> str:
    if "\\" not in s:
        return f'"{s}"'
    return json.dumps(s)


# ---------------------------------------------------------------------------------------------
# Sampling


class Sampler:
    """Counter-based sampling: ``take()`` is true for ``floor(N * rate)`` of N calls, evenly
    spread and the same on every run (the rate kept to the millionth)."""

    __slots__ = ("step", "acc", "all")

    def __init__(self, rate: float = 1.0):
        if not 0 < rate <= 1:
            raise ValueError(f"sample rate {rate} out of range (0 < rate <= 1)")
        self.step = max(1, round(rate * SAMPLE_SCALE))
        self.all = self.step >= SAMPLE_SCALE
        self.acc = 0

    def take(self) -> bool:
        if self.all:
            return True
        acc = self.acc + self.step
        if acc >= SAMPLE_SCALE:
            self.acc = acc - SAMPLE_SCALE
            return True
        self.acc = acc
        return False
