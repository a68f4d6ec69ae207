"""The node's configuration: one TOML file, read with tomllib into one typed model.

Everything outside this module sees only the frozen dataclasses below, never raw dicts.
Validation collects every problem it finds; each names the key path and the reason, e.g.
``pools[0].backends[2].address: port 99999 out of range``. Unknown keys are errors, so a
typo never silently falls back to a default.

Durations are written as numbers of seconds (``2``, ``0.1``) or strings with a unit
(``"100ms"``, ``"2s"``, ``"5m"``, ``"1h"``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

ALGORITHMS = ("roundrobin", "wrr", "leastconn", "p2c", "leasttime", "source", "maglev",
              "resource")
HASH_ALGORITHMS = ("source", "maglev")
MODES = ("tcp", "udp", "http", "nat")
NAT_PROTOCOLS = ("tcp", "udp")
NAT_HASHES = ("client_ip", "client_ip_port")
RELAYS = ("auto", "splice", "copy")
HEALTH_TYPES = ("none", "tcp", "http", "grpc")
POOL_PROTOS = ("http1", "h2")
STICKY_MODES = ("none", "cookie", "source", "app_cookie")
CHECKSUM_MODES = ("rfc9568", "keepalived")
TRACK_TYPES = ("interface", "pool", "script")
LOG_LEVELS = ("debug", "info", "warning", "error")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
COOKIE_NAME_RE = HEADER_NAME_RE
COOKIE_PREFIX_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")  # a backend name in front of a cookie value


# ---------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class ConfigError(Exception):
    """One or more problems in a config; ``str()`` gives one line per problem."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# ---------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NodeConfig:
    name: str
    log_level: str = "info"
    state_dir: str = "/run/halb"
    # the sticky and flow tables saved to <state_dir>/<name>.tables.json every save_interval
    # and on stop, loaded at start (halb.tablestore)
    save_tables: bool = True
    save_interval: float = 30.0


@dataclass(frozen=True)
class MetricsConfig:
    address: Endpoint | None = None  # None: no metrics endpoint


@dataclass(frozen=True)
class TLSFiles:
    cert: str
    key: str
    ca: str = ""  # required where mutual TLS is used


@dataclass(frozen=True)
class ControlConfig:
    socket: str = ""  # default: <state_dir>/<node>.sock
    address: Endpoint | None = None  # optional TCP listener, needs tls
    tls: TLSFiles | None = None


@dataclass(frozen=True)
class HealthConfig:
    type: str = "none"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    jitter: float = 0.1  # fraction of interval
    method: str = "GET"
    path: str = "/"
    host: str = ""
    expect_status: tuple[int, ...] = tuple(range(200, 400))  # HAProxy's httpchk: 2xx and 3xx
    expect_body: str = ""
    port: int = 0  # 0: the backend's own port
    service: str = ""  # type = "grpc": the service name asked of grpc.health.v1.Health/Check


@dataclass(frozen=True)
class AgentConfig:
    """``[pools.agent]``: HAProxy's agent-check (halb.agent)."""

    port: int
    interval: float = 2.0
    timeout: float = 1.0
    send: str = ""  # sent after connecting (e.g. "status\n"); "" sends nothing


@dataclass(frozen=True)
class ResourceConfig:
    """``[pools.resource]``: how ``algorithm = "resource"`` turns reported load into weights
    (halb.resource has the formula)."""

    metrics: tuple[str, ...] = ("cpu_utilization",)  # the largest of these is the load
    smoothing: float = 2.0  # EWMA time constant, seconds (0: none)
    stale_after: float = 10.0  # older reports no longer count: the configured weight applies
    floor: float = 0.05  # least share of its weight a saturated backend keeps


@dataclass(frozen=True)
class PassiveConfig:
    max_failures: int = 0  # 0: passive checks off
    on_5xx: bool = False
    cooldown: float = 10.0


@dataclass(frozen=True)
class StickyConfig:
    mode: str = "none"
    cookie: str = "HALBSRV"
    ttl: float = 1800.0
    max_entries: int = 100_000
    # app_cookie: HAProxy's ``cookie NAME prefix``: the backend's name goes in front of the
    # application's cookie value (``web1~abc``) and comes off again on the way in; no table
    prefix: bool = False


@dataclass(frozen=True)
class BackendConfig:
    name: str
    address: Endpoint
    weight: int = 1
    max_conns: int = 0  # 0: unlimited
    backup: bool = False


@dataclass(frozen=True)
class PoolConfig:
    name: str
    backends: tuple[BackendConfig, ...]
    algorithm: str = "roundrobin"
    hash_key: str = "client_ip"  # client_ip | header:NAME | cookie:NAME
    maglev_table_size: int = 65537
    slow_start: float = 0.0
    retries: int = 2  # other backends tried after a connect failure (redispatch)
    health: HealthConfig = field(default_factory=HealthConfig)
    passive: PassiveConfig = field(default_factory=PassiveConfig)
    sticky: StickyConfig = field(default_factory=StickyConfig)
    agent: AgentConfig | None = None  # [pools.agent]
    resource: ResourceConfig = field(default_factory=ResourceConfig)  # [pools.resource]
    proto: str = "http1"  # L7: "h2" speaks HTTP/2 (h2c) to the backends (halb.proxy.h2back)
    h2_max_streams: int = 100  # proto = "h2": streams at once on one backend connection
    h2_max_conns: int = 8  # proto = "h2": connections per backend (streams wait beyond)


@dataclass(frozen=True)
class HeaderMatch:
    name: str
    value: str = ""  # "": the header only has to be present


@dataclass(frozen=True)
class RouteConfig:
    pool: str
    host: str = ""  # exact, or "*.example.com"
    path_prefix: str = ""
    header: HeaderMatch | None = None


@dataclass(frozen=True)
class TLSCertificate:
    cert: str
    key: str
    server_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class ListenerTLS:
    certificates: tuple[TLSCertificate, ...]
    # session resumption (halb.tlstickets, halb.proxy.tls_openssl)
    session_cache: int = 20_000  # sessions kept for session-ID resumption (0: off)
    session_lifetime: float = 300.0  # a session (ticket or cache entry) resumes this long
    tickets: bool = True  # stateless session tickets (TLS 1.2 and 1.3)
    ticket_rotate: float = 3600.0  # a new ticket key this often
    ticket_keys_kept: int = 2  # earlier keys that still decrypt
    ticket_keys: str = ""  # HAProxy tls-ticket-keys file (then no rotation, no sharing)
    share_ticket_keys: bool = True  # keys go to the peers over an authenticated [sync]


@dataclass(frozen=True)
class TimeoutsConfig:
    connect: float = 3.0  # to a backend
    client_idle: float = 60.0  # keep-alive idle / L4 idle
    header: float = 10.0  # whole request head must arrive within
    body: float = 30.0  # max gap between body bytes
    server: float = 30.0  # backend must start answering within
    tunnel: float = 3600.0  # L4 idle both directions


@dataclass(frozen=True)
class LimitsConfig:
    max_conns: int = 10_000
    max_header_bytes: int = 16_384
    max_headers: int = 100
    max_request_line: int = 8_192
    max_flows: int = 65_536  # UDP


@dataclass(frozen=True)
class CacheConfig:
    """``[listeners.cache]``: an HTTP cache in front of the listener's pools (halb.proxy.cache)."""
    max_size: int = 64 << 20  # bytes of stored responses (bodies and heads) in all
    max_object: int = 1 << 20  # the largest body stored
    max_entries: int = 10_000
    max_age: float = 3600.0  # no response is fresh longer than this
    default_ttl: float = 0.0  # freshness of a response with none given (0: not stored)
    store_set_cookie: bool = False
    pools: tuple[str, ...] = ()  # only requests routed to these pools (empty: every pool)


@dataclass(frozen=True)
class Http2Config:
    """``[listeners.http2]``: HTTP/2 towards clients (halb.proxy.h2front)."""
    enabled: bool = True
    alpn: tuple[str, ...] = ("h2", "http/1.1")  # TLS listeners: offered in this order
    h2c: bool = True  # plain listeners: HTTP/2 with prior knowledge (the connection preface)
    max_concurrent_streams: int = 100  # SETTINGS_MAX_CONCURRENT_STREAMS (HAProxy's default)
    max_resets_per_s: int = 100  # client RST_STREAMs in one second (rapid reset) -> GOAWAY
    max_control_frames_per_s: int = 100  # SETTINGS/PING/PRIORITY frames in one second
    max_frame_size: int = 16384  # SETTINGS_MAX_FRAME_SIZE: larger frames end the connection


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    mode: str
    bind: Endpoint
    pool: str
    routes: tuple[RouteConfig, ...] = ()
    tls: ListenerTLS | None = None
    forwarded_headers: bool = True  # X-Forwarded-For/-Proto and Forwarded (http)
    via: str = "halb"  # http: the Via pseudonym ("Via: 1.1 halb"); "" sends none
    proxy_protocol: bool = False  # PROXY v2 towards backends (tcp)
    relay: str = "auto"  # tcp: "auto" (copy, splice while the node is busy), "splice", "copy"
    udp_flow_timeout: float = 30.0
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    # mode = "nat": the kernel forwards (nftables DNAT, halb.nat); tcp or udp, and which part
    # of the client's address the consistent hash reads
    protocol: str = "tcp"
    hash: str = "client_ip"  # client_ip | client_ip_port
    access_log: bool = True  # false: this listener writes no access log lines
    cache: CacheConfig | None = None  # http: [listeners.cache]
    http2: Http2Config = field(default_factory=Http2Config)  # http: [listeners.http2]


@dataclass(frozen=True)
class GarpConfig:
    count: int = 3
    spacing: float = 0.01
    # periodic gratuitous ARP while master (0: off). On by default: if a client missed every
    # burst (a frame lost while two masters met), its ARP cache is corrected within this
    # instead of when the entry ages out (30-60 s on Linux); one frame per VIP per period.
    refresh: float = 10.0


@dataclass(frozen=True)
class TrackConfig:
    type: str
    weight: int = 0  # 0: failure forces Fault; otherwise added to priority (negative lowers it)
    interface: str = ""
    pool: str = ""
    min_up: int = 1
    command: str = ""
    interval: float = 1.0
    timeout: float = 1.0
    rise: int = 1
    fall: int = 1


@dataclass(frozen=True)
class AuthHmacConfig:
    """keepalived's ``auth_hmac`` block (``halb.vrrp.authhmac``): the same keys, ids, modes."""

    keys: tuple[tuple[int, bytes], ...] = field(repr=False)  # (id, key bytes); secrets
    active_key: int = 1
    mode: str = "enforce"  # "permissive", "receive-only"
    anti_replay: str = "time"  # or "monotonic"
    time_window: int = 5  # seconds (time mode)


@dataclass(frozen=True)
class VrrpConfig:
    name: str
    interface: str
    vrid: int
    priority: int
    vips: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]
    advert_interval: float = 1.0
    preempt: bool = True
    preempt_delay: float = 0.0
    unicast_peers: tuple[str, ...] = ()
    source_address: str = ""
    checksum: str = "rfc9568"
    auth_key: str = ""
    auth_hmac: AuthHmacConfig | None = None
    notify: str = ""
    garp: GarpConfig = field(default_factory=GarpConfig)
    track: tuple[TrackConfig, ...] = ()
    # addresses that move with this instance but are not listed in its adverts (keepalived's
    # virtual_ipaddress_excluded), each on its own interface ("" = the instance's): e.g. the
    # back-side gateway address that NAT listeners' backends route their replies through
    excluded_vips: tuple[tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, str], ...] = ()


@dataclass(frozen=True)
class SyncPeer:
    name: str
    address: Endpoint


@dataclass(frozen=True)
class SyncConfig:
    listen: Endpoint
    peers: tuple[SyncPeer, ...]
    tls: TLSFiles | None = None
    batch_size: int = 512
    max_backlog: int = 100_000  # a peer further behind than this gets a snapshot
    fast_takeover: bool = True  # closed sync stream + one silent advert interval -> take over
    insecure: bool = False  # explicitly allowed: no [sync.tls] (plaintext, unauthenticated)


@dataclass(frozen=True)
class NatConfig:
    table: str = "halb"  # the nftables table (family ip) halbd owns whole
    replicate: bool = True  # conntrack entries of NAT listeners travel over [sync]
    reconcile_interval: float = 30.0  # kernel conntrack <-> the nat table, both ways
    entry_ttl: float = 3600.0  # a nat table entry lives this long past its last refresh
    max_entries: int = 262_144
    # the consistent-hash table of every NAT listener (a prime; the same on every node): the
    # kernel's map holds one element per slot, so it is smaller than a proxy pool's Maglev
    # table (65537): 4093 slots apply in ~30 ms and spread 40 backends within 1%
    hash_slots: int = 4093
    # 0: replicate every connection once established; N: only once the client has sent N
    # packets (IPVS's sync_threshold): connections shorter than that cost no replication
    # (needs net.netfilter.nf_conntrack_acct = 1)
    replicate_after_packets: int = 0


@dataclass(frozen=True)
class BgpConfig:
    """``[bgp]``: scale-out behind ECMP. halbd drives the node's FRR bgpd (through vtysh),
    announcing each VIP as a host route while the node can serve it (``halb.bgp``)."""

    asn: int  # the local AS of the speaker's `router bgp` block the networks go into
    speaker: str = "frr"
    vtysh: str = "vtysh"  # the command
    pathspace: str = ""  # FRR's -N (one FRR per network namespace); "" = the default
    vips: tuple[str, ...] = ()  # () = the bind addresses of every listener (not [[vrrp]] VIPs)
    announce_delay: float = 0.0  # a VIP announceable this long is announced
    withdraw_wait: float = 3.0  # drain-node / stop: withdraw, wait this long, then stop
    interval: float = 1.0  # health re-check and speaker poll
    command_timeout: float = 5.0  # one vtysh run
    resync_interval: float = 30.0  # every announced VIP told to the speaker again (it restarted)


@dataclass(frozen=True)
class AccessLogConfig:
    """``[access_log]`` (halb.accesslog, halb.accesslog_writer)."""

    enabled: bool = True
    destination: str = "stderr"  # as written: stderr | stdout | file:PATH | syslog | syslog:H:P
    format: str = "text"  # text | json | a template with %{field} names
    sample: float = 1.0  # fraction of requests and connections logged (counter-based)
    facility: str = "local0"  # syslog destinations
    buffer: int = 16_384  # lines waiting for the writer; beyond, lines are dropped (counted)
    # the destination taken apart: kind "stderr", "stdout", "file" (path), "syslog" (path of
    # the unix socket) or "syslog-udp" (address)
    kind: str = "stderr"
    path: str = ""
    address: Endpoint | None = None


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    pools: tuple[PoolConfig, ...]
    listeners: tuple[ListenerConfig, ...] = ()
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    vrrp: tuple[VrrpConfig, ...] = ()
    sync: SyncConfig | None = None
    nat: NatConfig = field(default_factory=NatConfig)
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    bgp: BgpConfig | None = None
    source: str = ""  # file the config was read from
    # what is valid but likely to hurt (e.g. a split brain with keepalived): halbd --check
    # prints them, halbd logs them at start
    warnings: tuple[Problem, ...] = ()

    def pool(self, name: str) -> PoolConfig:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def control_socket(self) -> str:
        return self.control.socket or f"{self.node.state_dir}/{self.node.name}.sock"


# ---------------------------------------------------------------------------------------------
# Parsing helpers


_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(us|ms|s|m|h)?\s*$")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as ``"100ms"``; raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 2, 0.5, \"100ms\" or \"2s\"")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"expected a duration such as 2, 0.5, \"100ms\" or \"2s\", got {value!r}")


def parse_endpoint(value: Any, *, allow_port_zero: bool = False) -> Endpoint:
    """``host:port`` or ``[v6]:port``; raises ValueError naming the problem.

    An IPv6 address must be in brackets (``[2001:db8::1]:80``: without them the port cannot
    be told from the address) and is kept in its canonical form (``[2001:DB8:0::1]`` ->
    ``2001:db8::1``), the form the kernel reports peers in: sticky keys, duplicate binds and
    sync peers then compare equal however the address was written."""
    if not isinstance(value, str):
        raise ValueError(f"expected \"host:port\", got {type(value).__name__}")
    bracketed = value.startswith("[")
    if bracketed:
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"expected \"[address]:port\", got {value!r}")
        port_s = rest[1:]
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep:
            raise ValueError(f"missing port in {value!r} (expected \"host:port\")")
        if ":" in host:
            raise ValueError(f"IPv6 address without brackets in {value!r} (write "
                             f"\"[ADDRESS]:PORT\", e.g. \"[{host}]:{port_s}\")")
    if not host:
        raise ValueError(f"missing host in {value!r}")
    if not port_s.isdigit():
        raise ValueError(f"port {port_s!r} is not a number")
    port = int(port_s)
    if port > 65535 or (port == 0 and not allow_port_zero):
        raise ValueError(f"port {port} out of range")
    if not re.match(r"^[A-Za-z0-9.:_-]+$", host):
        raise ValueError(f"invalid host {host!r}")
    if bracketed:
        try:
            a = ipaddress.IPv6Address(host)
            host = f"::ffff:{a.ipv4_mapped}" if a.ipv4_mapped else a.compressed
        except ValueError:
            raise ValueError(f"[{host}] in {value!r} is not an IPv6 address (brackets are for "
                             f"IPv6 addresses only)") from None
    return Endpoint(host, port)


class _Reader:
    """Walks one TOML table, records problems with key paths and flags unknown keys."""

    def __init__(self, data: Any, path: str, problems: list[Problem]):
        self.path = path
        self.problems = problems
        self.ok = isinstance(data, dict)
        self.data: dict = data if self.ok else {}
        if not self.ok:
            self.error(f"expected a table, got {_tname(data)}")
        self.seen: set[str] = set()

    def sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, reason: str, key: str | None = None) -> None:
        self.problems.append(Problem(self.sub(key) if key else self.path, reason))

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, kind: type | tuple, default: Any = None, *, required: bool = False):
        self.seen.add(key)
        if key not in self.data:
            if required:
                self.error("is required", key)
            return default
        v = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(v, bool) and bool not in kinds:
            self.error(f"expected {_kname(kinds)}, got boolean", key)
            return default
        if int in kinds and float in kinds and isinstance(v, int):
            return v
        if not isinstance(v, kinds):
            self.error(f"expected {_kname(kinds)}, got {_tname(v)}", key)
            return default
        return v

    def conv(self, key: str, fn: Callable[[Any], Any], default: Any = None, *, required=False):
        self.seen.add(key)
        if key not in self.data:
            if required:
                self.error("is required", key)
            return default
        try:
            return fn(self.data[key])
        except ValueError as e:
            self.error(str(e), key)
            return default

    def int_in(self, key: str, lo: int, hi: int, default: int, *, required=False) -> int:
        v = self.get(key, int, default, required=required)
        if v is not None and not (lo <= v <= hi) and key in self.data:
            self.error(f"{v} out of range ({lo}..{hi})", key)
            return default
        return v

    def choice(self, key: str, choices: tuple[str, ...], default: str, *, required=False) -> str:
        v = self.get(key, str, default, required=required)
        if key in self.data and isinstance(self.data[key], str) and v not in choices:
            self.error(f"unknown value {v!r} (expected one of: {', '.join(choices)})", key)
            return default
        return v

    def duration(self, key: str, default: float, *, lo: float = 0.0, hi: float = 86400.0 * 365):
        v = self.conv(key, parse_duration, default)
        if key in self.data and v is not None and not (lo <= v <= hi):
            self.error(f"{_fmt_s(v)} out of range ({_fmt_s(lo)}..{_fmt_s(hi)})", key)
            return default
        return v

    def name(self, key: str = "name", *, required=True) -> str:
        v = self.get(key, str, "", required=required)
        if v and not NAME_RE.match(v):
            self.error(f"invalid name {v!r} (letters, digits, '_', '.', '-'; at most 63)", key)
        return v

    def table(self, key: str) -> "_Reader | None":
        self.seen.add(key)
        if key not in self.data:
            return None
        return _Reader(self.data[key], self.sub(key), self.problems)

    def tables(self, key: str) -> list["_Reader"]:
        self.seen.add(key)
        if key not in self.data:
            return []
        v = self.data[key]
        if not isinstance(v, list):
            self.error(f"expected an array of tables, got {_tname(v)}", key)
            return []
        return [_Reader(item, f"{self.sub(key)}[{i}]", self.problems) for i, item in enumerate(v)]

    def strings(self, key: str) -> list[str]:
        v = self.get(key, list, [])
        out = []
        for i, item in enumerate(v or []):
            if not isinstance(item, str):
                self.problems.append(Problem(f"{self.sub(key)}[{i}]", f"expected a string, got {_tname(item)}"))
            else:
                out.append(item)
        return out

    def done(self) -> None:
        if not self.ok:
            return
        for k in self.data:
            if k not in self.seen:
                self.error("unknown key", k)


def _tname(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(v), type(v).__name__)


def _kname(kinds: tuple) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    if set(kinds) == {int, float}:
        return "a number"
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _fmt_s(v: float) -> str:
    return f"{v * 1000:g}ms" if v < 1 and v != 0 else f"{v:g}s"


def _dupes(readers: list[_Reader], names: list[str], what: str) -> None:
    seen: dict[str, int] = {}
    for r, n in zip(readers, names):
        if not n:
            continue
        if n in seen:
            r.error(f"duplicate {what} name {n!r} (also at index {seen[n]})", "name")
        else:
            seen[n] = int(r.path.rsplit("[", 1)[1].rstrip("]"))


# ---------------------------------------------------------------------------------------------
# Sections


def _node(r: _Reader) -> NodeConfig:
    name = r.name()
    level = r.choice("log_level", LOG_LEVELS, "info")
    state_dir = r.get("state_dir", str, "/run/halb")
    save = r.get("save_tables", bool, True)
    interval = r.duration("save_interval", 30.0, lo=1.0, hi=86400.0)
    r.done()
    return NodeConfig(name=name, log_level=level, state_dir=state_dir, save_tables=save,
                      save_interval=interval)


def _tls_files(r: _Reader, *, need_ca: bool) -> TLSFiles:
    cert = r.get("cert", str, "", required=True)
    key = r.get("key", str, "", required=True)
    ca = r.get("ca", str, "", required=need_ca)
    r.done()
    for k, path in (("cert", cert), ("key", key), ("ca", ca)):
        _file_problem(r, k, path)
    return TLSFiles(cert=cert, key=key, ca=ca)


def _file_problem(r: _Reader, key: str, path: str | None) -> None:
    """A named file that cannot be read is an error at check time, not at the first handshake."""
    if not path:
        return
    p = Path(path)
    if not p.exists():
        r.error(f"no such file {path!r}", key)
    elif not p.is_file():
        r.error(f"{path!r} is not a file", key)
    elif not os.access(p, os.R_OK):
        r.error(f"{path!r} is not readable", key)


def _health(r: _Reader) -> HealthConfig:
    d = HealthConfig()
    typ = r.choice("type", HEALTH_TYPES, "tcp")
    interval = r.duration("interval", d.interval, lo=0.01, hi=3600)
    timeout = r.duration("timeout", d.timeout, lo=0.001, hi=3600)
    rise = r.int_in("rise", 1, 100, d.rise)
    fall = r.int_in("fall", 1, 100, d.fall)
    jitter = r.get("jitter", (int, float), d.jitter)
    if r.has("jitter") and jitter is not None and not (0 <= jitter <= 0.5):
        r.error(f"{jitter} out of range (0..0.5, a fraction of the interval)", "jitter")
        jitter = d.jitter
    method = r.get("method", str, d.method)
    if r.has("method") and not re.match(r"^[A-Z]{1,16}$", method or ""):
        r.error(f"invalid HTTP method {method!r}", "method")
    path = r.get("path", str, d.path)
    if r.has("path") and (not path.startswith("/") or any(c in path for c in " \r\n\0")):
        r.error(f"invalid path {path!r} (must start with '/' and hold no spaces)", "path")
    host = r.get("host", str, "")
    statuses = r.get("expect_status", (int, list), list(d.expect_status))
    if isinstance(statuses, int):
        statuses = [statuses]
    for i, s in enumerate(statuses or []):
        if not isinstance(s, int) or isinstance(s, bool) or not 100 <= s <= 599:
            r.problems.append(Problem(f"{r.sub('expect_status')}[{i}]", f"invalid HTTP status {s!r}"))
    body = r.get("expect_body", str, "")
    port = r.int_in("port", 0, 65535, 0)
    service = r.get("service", str, "")
    if service and (len(service) > 200 or any(ord(c) < 33 or ord(c) > 126 for c in service)):
        r.error(f"invalid gRPC service name {service!r}", "service")
    r.done()
    if typ != "grpc" and r.has("service"):
        r.error(f"service needs type = \"grpc\" (type is {typ!r})", "service")
    if typ != "http" and any(r.has(k) for k in ("method", "path", "expect_status", "expect_body", "host")):
        r.error(f"HTTP settings need type = \"http\" (type is {typ!r})")
    if timeout is not None and interval is not None and timeout > interval * 10:
        r.error(f"timeout {_fmt_s(timeout)} is longer than 10 x interval", "timeout")
    return HealthConfig(type=typ, interval=interval, timeout=timeout, rise=rise, fall=fall,
                        jitter=float(jitter), method=method, path=path, host=host,
                        expect_status=tuple(s for s in statuses if isinstance(s, int)),
                        expect_body=body, port=port, service=service)


def _passive(r: _Reader) -> PassiveConfig:
    d = PassiveConfig()
    mf = r.int_in("max_failures", 0, 1000, d.max_failures)
    on5 = r.get("on_5xx", bool, d.on_5xx)
    cd = r.duration("cooldown", d.cooldown, lo=0.1, hi=86400)
    r.done()
    return PassiveConfig(max_failures=mf, on_5xx=on5, cooldown=cd)


def _sticky(r: _Reader) -> StickyConfig:
    d = StickyConfig()
    mode = r.choice("mode", STICKY_MODES, d.mode)
    cookie = r.get("cookie", str, d.cookie)
    if r.has("cookie") and not COOKIE_NAME_RE.match(cookie or ""):
        r.error(f"invalid cookie name {cookie!r}", "cookie")
    ttl = r.duration("ttl", d.ttl, lo=1, hi=86400 * 30)
    mx = r.int_in("max_entries", 1, 10_000_000, d.max_entries)
    prefix = r.get("prefix", bool, False)
    r.done()
    if mode == "app_cookie" and not r.has("cookie"):
        r.error("app_cookie needs the name of the application's session cookie (e.g. "
                "cookie = \"JSESSIONID\")", "cookie")
    if prefix and mode != "app_cookie":
        r.error(f"prefix needs mode = \"app_cookie\" (mode is {mode!r})", "prefix")
    return StickyConfig(mode=mode, cookie=cookie, ttl=ttl, max_entries=mx, prefix=bool(prefix))


def _backend(r: _Reader, idx: int) -> BackendConfig:
    addr = r.conv("address", parse_endpoint, None, required=True)
    name = r.name(required=False) or (str(addr) if addr else f"backend{idx}")
    weight = r.int_in("weight", 0, 256, 1)
    max_conns = r.int_in("max_conns", 0, 1_000_000, 0)
    backup = r.get("backup", bool, False)
    r.done()
    return BackendConfig(name=name, address=addr or Endpoint("invalid", 1), weight=weight,
                         max_conns=max_conns, backup=backup)


def _hash_key(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {_tname(v)}")
    if v == "client_ip":
        return v
    kind, sep, name = v.partition(":")
    if sep and kind in ("header", "cookie") and name and HEADER_NAME_RE.match(name):
        return f"{kind}:{name.lower() if kind == 'header' else name}"
    raise ValueError(f"unknown hash key {v!r} (expected client_ip, header:NAME or cookie:NAME)")


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


def _pool(r: _Reader, default_algorithm: str = "roundrobin") -> PoolConfig:
    name = r.name()
    algo = r.choice("algorithm", ALGORITHMS, default_algorithm)
    hk = r.conv("hash_key", _hash_key, "client_ip")
    size = r.int_in("maglev_table_size", 7, 10_000_019, 65537)
    if r.has("maglev_table_size") and isinstance(size, int) and not _is_prime(size):
        r.error(f"{size} is not a prime number", "maglev_table_size")
        size = 65537
    if r.has("hash_key") and algo not in HASH_ALGORITHMS:
        r.error(f"hash_key needs a hashing algorithm (source or maglev), not {algo!r}", "hash_key")
    slow = r.duration("slow_start", 0.0, hi=3600)
    retries = r.int_in("retries", 0, 10, 2)
    proto = r.choice("proto", POOL_PROTOS, "http1")
    h2_streams = r.int_in("h2_max_streams", 1, 10_000, 100)
    h2_conns = r.int_in("h2_max_conns", 1, 1024, 8)
    if proto != "h2":
        for k in ("h2_max_streams", "h2_max_conns"):
            if r.has(k):
                r.error(f"{k} needs proto = \"h2\" (proto is {proto!r})", k)
    h = r.table("health")
    health = _health(h) if h else HealthConfig()
    p = r.table("passive")
    passive = _passive(p) if p else PassiveConfig()
    s = r.table("sticky")
    sticky = _sticky(s) if s else StickyConfig()
    ar = r.table("agent")
    agent = None
    if ar:
        port = ar.int_in("port", 1, 65535, 0, required=True)
        interval = ar.duration("interval", 2.0, lo=0.05, hi=3600)
        timeout = ar.duration("timeout", 1.0, lo=0.01, hi=60)
        send = ar.get("send", str, "")
        if send and len(send) > 256:
            ar.error(f"at most 256 characters, got {len(send)}", "send")
        ar.done()
        agent = AgentConfig(port=port or 1, interval=interval, timeout=timeout, send=send)
    rr = r.table("resource")
    resource = _resource(rr, agent) if rr else ResourceConfig()
    if rr and algo != "resource":
        r.error(f"[pools.resource] needs algorithm = \"resource\" (algorithm is {algo!r})",
                "resource")
    brs = r.tables("backends")
    if r.has("backends") and isinstance(r.data.get("backends"), list) and not brs:
        r.error("needs at least one backend", "backends")
    elif not r.has("backends"):
        r.error("is required", "backends")
    backends = [_backend(b, i) for i, b in enumerate(brs)]
    _dupes(brs, [b.name for b in backends], "backend")
    seen_addr: dict[Endpoint, int] = {}
    for i, (br, b) in enumerate(zip(brs, backends)):
        if b.address.host == "invalid":
            continue
        if b.address in seen_addr:
            br.error(f"duplicate backend address {b.address} (also at index {seen_addr[b.address]})",
                     "address")
        seen_addr.setdefault(b.address, i)
    if algo == "maglev" and size <= len(backends):
        r.error(f"{size} must be larger than the number of backends ({len(backends)})",
                "maglev_table_size")
    if backends and all(b.backup for b in backends):
        r.error("every backend is a backup; at least one must be a primary", "backends")
    if sticky.prefix:  # the name goes into a cookie value, ahead of a '~'
        for br, b in zip(brs, backends):
            if not COOKIE_PREFIX_RE.match(b.name):
                br.error(f"backend name {b.name!r} cannot prefix a cookie value ([pools.sticky] "
                         "prefix = true): letters, digits and . _ - : only", "name")
    r.done()
    return PoolConfig(name=name, backends=tuple(backends), algorithm=algo, hash_key=hk,
                      maglev_table_size=size, slow_start=slow, retries=retries, health=health,
                      passive=passive, sticky=sticky, agent=agent, resource=resource,
                      proto=proto, h2_max_streams=h2_streams, h2_max_conns=h2_conns)


def _resource_metrics(v: Any) -> tuple[str, ...]:
    from .resource import valid_metric
    names = [v] if isinstance(v, str) else v
    if not isinstance(names, list) or not names or len(names) > 8:
        raise ValueError(f"expected a metric name or a list of 1 to 8, got {_tname(v)}")
    for n in names:
        if not isinstance(n, str) or not valid_metric(n):
            raise ValueError(f"unknown metric {n!r} (expected cpu_utilization, mem_utilization, "
                             f"application_utilization, named_metrics.NAME or utilization.NAME)")
    return tuple(dict.fromkeys(names))


def _resource(r: _Reader, agent: AgentConfig | None) -> ResourceConfig:
    d = ResourceConfig()
    metrics = r.conv("metric", _resource_metrics, d.metrics)
    smoothing = r.duration("smoothing", d.smoothing, lo=0.0, hi=600)
    stale = r.duration("stale_after", d.stale_after, lo=0.1, hi=86400)
    floor = r.get("floor", (int, float), d.floor)
    if r.has("floor") and floor is not None and not 0.01 <= floor <= 1:
        r.error(f"{floor} out of range (0.01..1, a fraction of the backend's weight)", "floor")
        floor = d.floor
    r.done()
    if agent is not None and stale is not None and stale <= agent.interval:
        r.error(f"stale_after {_fmt_s(stale)} must be longer than the agent interval "
                f"{_fmt_s(agent.interval)} (every agent report would be stale by the next)",
                "stale_after")
    return ResourceConfig(metrics=metrics or d.metrics, smoothing=smoothing, stale_after=stale,
                          floor=float(floor if floor is not None else d.floor))


def _route(r: _Reader) -> RouteConfig:
    pool = r.get("pool", str, "", required=True)
    host = (r.get("host", str, "") or "").lower()
    if host and not re.match(r"^(\*\.)?[a-z0-9.-]+(:[0-9]+)?$", host):
        r.error(f"invalid host {host!r}", "host")
    pp = r.get("path_prefix", str, "")
    if pp and not pp.startswith("/"):
        r.error(f"must start with '/', got {pp!r}", "path_prefix")
    header = None
    hr = r.table("header")
    if hr:
        hn = hr.get("name", str, "", required=True)
        if hn and not HEADER_NAME_RE.match(hn):
            hr.error(f"invalid header name {hn!r}", "name")
        hv = hr.get("value", str, "")
        hr.done()
        header = HeaderMatch(name=hn.lower(), value=hv)
    r.done()
    if not (host or pp or header):
        r.error("a route needs at least one of host, path_prefix, header")
    return RouteConfig(pool=pool, host=host, path_prefix=pp, header=header)


def _timeouts(r: _Reader) -> TimeoutsConfig:
    d = TimeoutsConfig()
    vals = {k: r.duration(k, getattr(d, k), lo=0.001, hi=86400)
            for k in ("connect", "client_idle", "header", "body", "server", "tunnel")}
    r.done()
    return TimeoutsConfig(**vals)


def _limits(r: _Reader) -> LimitsConfig:
    vals = dict(
        max_conns=r.int_in("max_conns", 1, 1_000_000, LimitsConfig.max_conns),
        max_header_bytes=r.int_in("max_header_bytes", 1024, 1 << 20, LimitsConfig.max_header_bytes),
        max_headers=r.int_in("max_headers", 1, 1000, LimitsConfig.max_headers),
        max_request_line=r.int_in("max_request_line", 64, 1 << 20, LimitsConfig.max_request_line),
        max_flows=r.int_in("max_flows", 1, 10_000_000, LimitsConfig.max_flows),
    )
    r.done()
    return LimitsConfig(**vals)


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.I)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024, "m": 1000 ** 2,
               "mb": 1000 ** 2, "mi": 1 << 20, "mib": 1 << 20, "g": 1000 ** 3, "gb": 1000 ** 3,
               "gi": 1 << 30, "gib": 1 << 30}


def parse_size(v: Any) -> int:
    """Bytes: an integer, or a string such as "64MiB", "512k", "1GB"; ValueError otherwise."""
    if isinstance(v, bool):
        raise ValueError(f"expected a size such as \"64MiB\", got {_tname(v)}")
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"{v} is negative")
        return v
    if not isinstance(v, str):
        raise ValueError(f"expected a size such as \"64MiB\", got {_tname(v)}")
    m = _SIZE_RE.match(v)
    if not m:
        raise ValueError(f"invalid size {v!r} (e.g. \"64MiB\", \"512KiB\", \"1000000\")")
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]


def _cache(r: _Reader) -> CacheConfig:
    d = CacheConfig()
    sizes = {}
    for k, lo, hi in (("max_size", 4096, 64 << 30), ("max_object", 1, 1 << 30)):
        v = r.conv(k, parse_size, getattr(d, k))
        if v is not None and not lo <= v <= hi:
            r.error(f"{v} bytes out of range ({lo}..{hi})", k)
        sizes[k] = v if v is not None else getattr(d, k)
    c = CacheConfig(max_size=sizes["max_size"], max_object=sizes["max_object"],
                    max_entries=r.int_in("max_entries", 1, 10_000_000, d.max_entries),
                    max_age=r.duration("max_age", d.max_age, lo=1, hi=365 * 86400),
                    default_ttl=r.duration("default_ttl", d.default_ttl, hi=365 * 86400),
                    store_set_cookie=bool(r.get("store_set_cookie", bool, False)),
                    pools=tuple(r.strings("pools")))
    r.done()
    if c.max_object > c.max_size:
        r.error(f"max_object ({c.max_object}) is larger than max_size ({c.max_size})",
                "max_object")
    return c


ALPN_PROTOCOLS = ("h2", "http/1.1")


def _http2(r: _Reader) -> Http2Config:
    d = Http2Config()
    alpn = tuple(r.strings("alpn")) if r.has("alpn") else d.alpn
    for i, a in enumerate(alpn):
        if a not in ALPN_PROTOCOLS:
            r.problems.append(Problem(f"{r.sub('alpn')}[{i}]", f"unknown ALPN protocol {a!r} "
                                      f"(known: {', '.join(ALPN_PROTOCOLS)})"))
    if r.has("alpn") and "http/1.1" not in alpn and "h2" not in alpn:
        r.error("lists no protocol halb speaks", "alpn")
    c = Http2Config(
        enabled=bool(r.get("enabled", bool, d.enabled)),
        alpn=alpn,
        h2c=bool(r.get("h2c", bool, d.h2c)),
        max_concurrent_streams=r.int_in("max_concurrent_streams", 1, 10_000,
                                        d.max_concurrent_streams),
        max_resets_per_s=r.int_in("max_resets_per_s", 1, 1_000_000, d.max_resets_per_s),
        max_control_frames_per_s=r.int_in("max_control_frames_per_s", 1, 1_000_000,
                                          d.max_control_frames_per_s),
        max_frame_size=r.int_in("max_frame_size", 16384, 16777215, d.max_frame_size),
    )
    r.done()
    return c


def _listener(r: _Reader) -> ListenerConfig:
    name = r.name()
    mode = r.choice("mode", MODES, "tcp", required=True)
    bind = r.conv("bind", parse_endpoint, None, required=True)
    pool = r.get("pool", str, "", required=True)
    routes = [(_route(rr)) for rr in r.tables("routes")]
    tls = None
    tr = r.table("tls")
    if tr:
        certs = []
        for cr in tr.tables("certificates"):
            cert = cr.get("cert", str, "", required=True)
            key = cr.get("key", str, "", required=True)
            names = tuple(n.lower() for n in cr.strings("server_names"))
            cr.done()
            _file_problem(cr, "cert", cert)
            _file_problem(cr, "key", key)
            certs.append(TLSCertificate(cert=cert, key=key, server_names=names))
        if not certs:
            tr.error("needs at least one [[certificates]] entry", "certificates")
        d = ListenerTLS(certificates=())
        cache = tr.int_in("session_cache", 0, 10_000_000, d.session_cache)
        life = tr.duration("session_lifetime", d.session_lifetime, lo=1, hi=7 * 86400)
        tickets = bool(tr.get("tickets", bool, d.tickets))
        rot = tr.duration("ticket_rotate", d.ticket_rotate, lo=10, hi=7 * 86400)
        kept = tr.int_in("ticket_keys_kept", 1, 16, d.ticket_keys_kept)
        tkf = tr.get("ticket_keys", str, "")
        share = bool(tr.get("share_ticket_keys", bool, d.share_ticket_keys))
        tr.done()
        if tkf:
            _file_problem(tr, "ticket_keys", tkf)
            try:
                from .tlstickets import parse_key_file
                with open(tkf, encoding="ascii", errors="replace") as f:
                    parse_key_file(f.read(1 << 16), "")
            except OSError:
                pass  # _file_problem said it
            except ValueError as e:
                tr.error(str(e).lstrip(": "), "ticket_keys")
        elif tickets and rot is not None and kept is not None and life is not None \
                and life > rot * kept:
            tr.error(f"{_fmt_s(life)} is longer than ticket_rotate x ticket_keys_kept "
                     f"({_fmt_s(rot * kept)}): a ticket would outlive its key",
                     "session_lifetime")
        tls = ListenerTLS(certificates=tuple(certs), session_cache=cache, session_lifetime=life,
                          tickets=tickets, ticket_rotate=rot, ticket_keys_kept=kept,
                          ticket_keys=tkf, share_ticket_keys=share)
    fwd = r.get("forwarded_headers", bool, True)
    via = r.get("via", str, "halb")
    if via and not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}", via):
        r.error(f"must be a token (letters, digits, -._~ and the like, at most 64), "
                f"or \"\" for no Via; got {via!r}", "via")
    pp = r.get("proxy_protocol", bool, False)
    relay = r.choice("relay", RELAYS, "auto")
    uft = r.duration("udp_flow_timeout", 30.0, lo=0.01, hi=86400)
    t = r.table("timeouts")
    timeouts = _timeouts(t) if t else TimeoutsConfig()
    lr = r.table("limits")
    limits = _limits(lr) if lr else LimitsConfig()
    protocol = r.choice("protocol", NAT_PROTOCOLS, "tcp")
    nat_hash = r.choice("hash", NAT_HASHES, "client_ip")
    alog = r.get("access_log", bool, True)
    cr = r.table("cache")
    cache = _cache(cr) if cr else None
    h2r = r.table("http2")
    http2 = _http2(h2r) if h2r else Http2Config()
    r.done()
    if h2r and mode != "http":
        r.error(f"http2 needs mode = \"http\" (mode is {mode!r})", "http2")
    if cache is not None and mode != "http":
        r.error(f"cache needs mode = \"http\" (mode is {mode!r})", "cache")
    if mode == "nat" and "access_log" in r.data:
        r.error("access_log needs mode = \"tcp\", \"udp\" or \"http\" (a nat listener's "
                "connections are forwarded by the kernel: halb sees none to log)", "access_log")
    if mode != "nat":
        for k in ("protocol", "hash"):
            if k in r.data:
                r.error(f"{k} needs mode = \"nat\" (mode is {mode!r})", k)
    elif bind is not None:
        try:
            a = ipaddress.ip_address(bind.host)
            if a.is_unspecified or a.is_multicast:
                raise ValueError
        except ValueError:
            r.error(f"a nat listener binds one IPv4 or IPv6 address (its VIP), not "
                    f"{bind.host!r}", "bind")
    if mode != "http":
        if routes:
            r.error(f"routes need mode = \"http\" (mode is {mode!r})", "routes")
        if tls:
            r.error(f"tls needs mode = \"http\" (mode is {mode!r})", "tls")
    if mode != "http" and "via" in r.data:
        r.error(f"via needs mode = \"http\" (mode is {mode!r})", "via")
    if mode != "tcp" and pp:
        r.error(f"proxy_protocol needs mode = \"tcp\" (mode is {mode!r})", "proxy_protocol")
    if mode != "tcp" and "relay" in r.data:
        r.error(f"relay needs mode = \"tcp\" (mode is {mode!r})", "relay")
    return ListenerConfig(name=name, mode=mode, bind=bind or Endpoint("invalid", 1), pool=pool,
                          routes=tuple(routes), tls=tls, forwarded_headers=fwd, via=via,
                          proxy_protocol=pp,
                          relay=relay,
                          udp_flow_timeout=uft, timeouts=timeouts, limits=limits,
                          protocol=protocol, hash=nat_hash, access_log=bool(alog), cache=cache,
                          http2=http2)


def _nat_backend_families(l: ListenerConfig, j: int, pc: PoolConfig, pr: _Reader,
                          problems: list[Problem]) -> None:
    """A nat listener's backends: address literals of its VIP's family (the kernel DNATs to
    them; IPv6 VIP -> IPv4 backend would be NAT64, which nftables' dnat does not do)."""
    try:
        vip = ipaddress.ip_address(l.bind.host)
    except ValueError:
        return  # reported at the listener's bind
    for k, b in enumerate(pc.backends):
        key = pr.sub(f"backends[{k}].address")
        try:
            a = ipaddress.ip_address(b.address.host)
        except ValueError:
            problems.append(Problem(key, (
                f"{b.address.host!r} is not an IP address: nat listener {l.name!r} (pool "
                f"{pc.name!r}) has the kernel translate to its backends, which needs address "
                f"literals")))
            continue
        if a.version != vip.version:
            problems.append(Problem(key, (
                f"{b.address.host} is IPv{a.version} but nat listener {l.name!r} binds the "
                f"IPv{vip.version} VIP {vip}: that would be NAT{vip.version}{a.version} "
                f"(translating between families), which the kernel NAT mode does not do; "
                f"give pool {pc.name!r} IPv{vip.version} backends, or bind the listener to an "
                f"IPv{a.version} VIP")))


def _canonical_ip(v: str) -> str:
    """An address as the kernel and ``ipaddress`` print it (an IPv6 zone dropped: adverts are
    sent and checked on the instance's interface); the text as it was if it is not one."""
    try:
        return str(ipaddress.ip_address(v.split("%", 1)[0]))
    except ValueError:
        return v


def _vip(v: Any) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if not isinstance(v, str):
        raise ValueError(f"expected an address such as \"198.18.0.100/24\", got {_tname(v)}")
    try:
        iface = ipaddress.ip_interface(v if "/" in v else v + ("/32" if ":" not in v else "/128"))
    except ValueError:
        raise ValueError(f"invalid address {v!r}") from None
    return iface


def _track(r: _Reader) -> TrackConfig:
    typ = r.choice("type", TRACK_TYPES, "interface", required=True)
    weight = r.int_in("weight", -254, 254, 0)
    iface = r.get("interface", str, "")
    pool = r.get("pool", str, "")
    min_up = r.int_in("min_up", 1, 10_000, 1)
    command = r.get("command", str, "")
    interval = r.duration("interval", 1.0, lo=0.01, hi=3600)
    timeout = r.duration("timeout", 1.0, lo=0.01, hi=3600)
    rise = r.int_in("rise", 1, 100, 1)
    fall = r.int_in("fall", 1, 100, 1)
    r.done()
    need = {"interface": ("interface", iface), "pool": ("pool", pool), "script": ("command", command)}[typ]
    if not need[1]:
        r.error(f"is required for type = \"{typ}\"", need[0])
    return TrackConfig(type=typ, weight=weight, interface=iface, pool=pool, min_up=min_up,
                       command=command, interval=interval, timeout=timeout, rise=rise, fall=fall)


def _hmac_key(r: _Reader, kid: str, value: str) -> bytes | None:
    """A key value as keepalived reads it: ``hex:...``, ASCII text, or ``file:PATH`` holding
    either (one trailing line end dropped)."""
    from .vrrp.authhmac import KEY_MAX, KEY_MIN, decode_key

    where = f"keys.{kid}"
    if value.startswith("file:"):
        path = value[5:]
        try:
            with open(path, "rb") as f:
                data = f.read(4 + 2 * KEY_MAX + 9)
        except OSError as e:
            r.error(f"cannot read key file {path!r}: {e.strerror or e}", where)
            return None
        if len(data) > 4 + 2 * KEY_MAX + 8:
            r.error(f"key file {path!r} is too large for a key", where)
            return None
        value = data.rstrip(b"\r\n").decode("latin-1")
    try:
        key = decode_key(value)
    except ValueError as e:
        r.error(str(e), where)
        return None
    if not KEY_MIN <= len(key) <= KEY_MAX:
        r.error(f"is {len(key)} bytes; a key is {KEY_MIN} to {KEY_MAX} bytes (e.g. "
                f"\"hex:\" and the output of `openssl rand -hex 32`)", where)
        return None
    return key


def _auth_hmac(r: _Reader, advert_interval: float) -> AuthHmacConfig:
    from .vrrp.authhmac import ANTI_REPLAY, MODES, WINDOW_MAX, WINDOW_MIN, default_window

    raw = r.get("keys", dict, {}, required=True) or {}
    keys: list[tuple[int, bytes]] = []
    for kid, value in raw.items():
        if not (str(kid).isdigit() and 1 <= int(kid) <= 255):
            r.error(f"key id {kid!r} must be a number from 1 to 255 (keys = {{ \"1\" = ... }})",
                    "keys")
            continue
        if not isinstance(value, str):
            r.error(f"expected a string (\"hex:...\", text or \"file:PATH\"), got "
                    f"{_tname(value)}", f"keys.{kid}")
            continue
        key = _hmac_key(r, str(kid), value)
        if key is not None:
            keys.append((int(kid), key))
    if r.has("keys") and isinstance(raw, dict) and not raw:
        r.error("needs at least one key", "keys")
    # one key: it signs; several (a rotation): say which
    active = r.int_in("active_key", 1, 255, int(next(iter(raw))) if len(raw) == 1 and
                      str(next(iter(raw))).isdigit() else 1, required=len(raw) > 1)
    if raw and str(active) not in {str(k) for k in raw}:
        r.error(f"{active} is not one of the keys ({', '.join(str(k) for k in raw)})",
                "active_key")
    mode = r.choice("mode", MODES, "enforce")
    anti = r.choice("anti_replay", ANTI_REPLAY, "time")
    window = r.int_in("time_window", WINDOW_MIN, WINDOW_MAX, default_window(advert_interval))
    r.done()
    return AuthHmacConfig(keys=tuple(keys), active_key=active, mode=mode, anti_replay=anti,
                          time_window=window)


def _vrrp(r: _Reader) -> VrrpConfig:
    name = r.name()
    iface = r.get("interface", str, "", required=True)
    vrid = r.int_in("vrid", 1, 255, 1, required=True)
    prio = r.int_in("priority", 1, 255, 100, required=True)
    vips_raw = r.get("vips", list, [], required=True)
    vips = []
    for i, v in enumerate(vips_raw or []):
        try:
            vips.append(_vip(v))
        except ValueError as e:
            r.problems.append(Problem(f"{r.sub('vips')}[{i}]", str(e)))
    if r.has("vips") and isinstance(vips_raw, list) and not vips_raw:
        r.error("needs at least one address", "vips")
    fam = vips[0].version if vips else 4
    if len({type(v) for v in vips}) > 1:
        r.error("IPv4 and IPv6 addresses cannot share one instance (use two instances)", "vips")
    elif fam == 6 and not any(v.ip.is_link_local for v in vips):
        # RFC 9568 section 5.2.9: an IPv6 advert's first address is the virtual router's
        # link-local address; every node of the VRID (keepalived too) lists the same one
        r.error(f"an IPv6 instance needs a virtual link-local address among its vips (RFC 9568: "
                f"it is the first address of every advert), e.g. \"fe80::{vrid:x}/64\" listed "
                f"first, the same on every node of vrid {vrid}", "vips")
    adv = r.duration("advert_interval", 1.0, lo=0.01, hi=40.95)
    preempt = r.get("preempt", bool, True)
    pdelay = r.duration("preempt_delay", 0.0, hi=3600)
    # canonical (lower case, compressed, no zone): the decoder compares them with the
    # sources of received adverts as text
    peers = [_canonical_ip(p) for p in r.strings("unicast_peers")]
    for i, p in enumerate(peers):
        try:
            pv = ipaddress.ip_address(p).version
        except ValueError:
            r.problems.append(Problem(f"{r.sub('unicast_peers')}[{i}]", f"invalid address {p!r}"))
            continue
        if vips and pv != fam:
            r.problems.append(Problem(f"{r.sub('unicast_peers')}[{i}]",
                                      f"{p} is IPv{pv}, the instance's vips are IPv{fam} (adverts "
                                      f"travel in the family of the addresses they announce)"))
    src = _canonical_ip(r.get("source_address", str, "") or "")
    if src:
        try:
            sv = ipaddress.ip_address(src).version
        except ValueError:
            r.error(f"invalid address {src!r}", "source_address")
        else:
            if vips and sv != fam:
                r.error(f"{src} is IPv{sv}, the instance's vips are IPv{fam}", "source_address")
    checksum = r.choice("checksum", CHECKSUM_MODES, "rfc9568")
    auth = r.get("auth_key", str, "")
    if r.has("auth_key") and auth is not None and len(auth) < 8:
        r.error("too short (at least 8 characters)", "auth_key")
    ah = r.table("auth_hmac")
    auth_hmac = _auth_hmac(ah, adv) if ah else None
    if auth_hmac is not None and auth:
        r.error("and auth_key cannot both be set: auth_key is halb's own trailer, auth_hmac "
                "keepalived's (use auth_hmac where keepalived shares the vrid)", "auth_hmac")
    notify = r.get("notify", str, "")
    g = r.table("garp")
    garp = GarpConfig()
    if g:
        garp = GarpConfig(count=g.int_in("count", 0, 100, 3),
                          spacing=g.duration("spacing", 0.01, hi=10),
                          refresh=g.duration("refresh", GarpConfig.refresh, hi=86400))
        g.done()
    track = tuple(_track(t) for t in r.tables("track"))
    excluded = []
    for i, v in enumerate(r.strings("excluded_vips")):
        m = re.match(r"^\s*(\S+)(?:\s+dev\s+(\S+))?\s*$", v)
        if not m:
            r.problems.append(Problem(f"{r.sub('excluded_vips')}[{i}]",
                                      f"expected \"ADDRESS/LEN\" or \"ADDRESS/LEN dev IFNAME\", "
                                      f"got {v!r}"))
            continue
        try:
            vip = _vip(m.group(1))
        except ValueError as e:
            r.problems.append(Problem(f"{r.sub('excluded_vips')}[{i}]", str(e)))
            continue
        dev = m.group(2) or ""
        excluded.append((vip, dev if dev != iface else ""))
    r.done()
    if prio == 255 and preempt is False:
        r.error("the address owner (priority 255) always preempts", "preempt")
    return VrrpConfig(name=name, interface=iface, vrid=vrid, priority=prio, vips=tuple(vips),
                      advert_interval=adv, preempt=preempt, preempt_delay=pdelay,
                      unicast_peers=tuple(peers), source_address=src, checksum=checksum,
                      auth_key=auth, auth_hmac=auth_hmac, notify=notify, garp=garp, track=track,
                      excluded_vips=tuple(excluded))


def _sync(r: _Reader) -> SyncConfig:
    listen = r.conv("listen", parse_endpoint, None, required=True)
    peers = []
    prs = r.tables("peers")
    for pr in prs:
        pn = pr.name()
        pa = pr.conv("address", parse_endpoint, None, required=True)
        pr.done()
        peers.append(SyncPeer(name=pn, address=pa or Endpoint("invalid", 1)))
    _dupes(prs, [p.name for p in peers], "peer")
    t = r.table("tls")
    tls = _tls_files(t, need_ca=True) if t else None
    batch = r.int_in("batch_size", 1, 65536, 512)
    backlog = r.int_in("max_backlog", 100, 100_000_000, 100_000)
    fast = r.get("fast_takeover", bool, True)
    insecure = r.get("insecure", bool, False)
    r.done()
    if tls is None and not insecure:
        r.error("needs [sync.tls] (mutual TLS: ca, cert, key; `halbctl pki init` makes them), or "
                "insecure = true to replicate in plaintext with unauthenticated peers", "tls")
    if tls is not None and insecure:
        r.error("insecure = true with [sync.tls]: choose one", "insecure")
    return SyncConfig(listen=listen or Endpoint("invalid", 1), peers=tuple(peers), tls=tls,
                      batch_size=batch, max_backlog=backlog, fast_takeover=fast,
                      insecure=bool(insecure))


def _nat(r: _Reader) -> NatConfig:
    table = r.get("table", str, "halb")
    if table is not None and not re.match(r"^[A-Za-z][A-Za-z0-9_]{0,31}$", table):
        r.error(f"invalid nftables table name {table!r} (letters, digits, _; at most 32)", "table")
    vals = dict(
        table=table or "halb",
        replicate=r.get("replicate", bool, True),
        reconcile_interval=r.duration("reconcile_interval", NatConfig.reconcile_interval,
                                      lo=1.0, hi=3600),
        entry_ttl=r.duration("entry_ttl", NatConfig.entry_ttl, lo=60.0, hi=7 * 86400),
        max_entries=r.int_in("max_entries", 16, 10_000_000, NatConfig.max_entries),
        hash_slots=r.int_in("hash_slots", 3, 65537, NatConfig.hash_slots),
        replicate_after_packets=r.int_in("replicate_after_packets", 0, 1_000_000, 0),
    )
    r.done()
    if not _is_prime(vals["hash_slots"]):
        r.error(f"{vals['hash_slots']} is not a prime (Maglev needs one: e.g. 251, 1021, "
                f"4093, 16381, 65521)", "hash_slots")
    if vals["entry_ttl"] < 4 * vals["reconcile_interval"]:
        r.error(f"must be at least 4 x reconcile_interval ({_fmt_s(vals['reconcile_interval'])}): "
                f"live connections are refreshed by the reconcile pass", "entry_ttl")
    return NatConfig(**vals)


def _bgp(r: _Reader) -> BgpConfig:
    asn = r.int_in("asn", 1, 4294967295, 0, required=True)
    speaker = r.choice("speaker", ("frr",), "frr")
    vtysh = r.get("vtysh", str, "vtysh") or "vtysh"
    pathspace = r.get("pathspace", str, "")
    if pathspace and not NAME_RE.match(pathspace):
        r.error(f"invalid pathspace {pathspace!r} (letters, digits, '_', '.', '-')", "pathspace")
    vips = []
    for i, v in enumerate(r.strings("vips")):
        try:
            vips.append(str(ipaddress.ip_address(v)))
        except ValueError:
            r.problems.append(Problem(f"{r.sub('vips')}[{i}]", f"{v!r} is not an IP address"))
    vals = dict(
        announce_delay=r.duration("announce_delay", 0.0, hi=3600),
        withdraw_wait=r.duration("withdraw_wait", 3.0, hi=600),
        interval=r.duration("interval", 1.0, lo=0.05, hi=60),
        command_timeout=r.duration("command_timeout", 5.0, lo=0.1, hi=120),
        resync_interval=r.duration("resync_interval", 30.0, lo=1.0, hi=86400),
    )
    r.done()
    return BgpConfig(asn=asn or 0, speaker=speaker, vtysh=vtysh, pathspace=pathspace or "",
                     vips=tuple(vips), **vals)


def _control(r: _Reader) -> ControlConfig:
    sock = r.get("socket", str, "")
    addr = r.conv("address", parse_endpoint, None)
    t = r.table("tls")
    tls = _tls_files(t, need_ca=True) if t else None
    r.done()
    if addr and not tls:
        r.error("a TCP control address needs [control.tls] (mutual TLS)", "address")
    return ControlConfig(socket=sock, address=addr, tls=tls)


ACCESS_LOG_DEV_LOG = "/dev/log"


def _access_log_destination(v: Any) -> tuple[str, str, Endpoint | None]:
    """``[access_log] destination`` -> (kind, path, address); ValueError naming the problem."""
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {_tname(v)}")
    if v in ("stderr", "stdout"):
        return v, "", None
    if v.startswith("file:"):
        path = v[5:]
        if not path.startswith("/"):
            raise ValueError(f"file: needs an absolute path (\"file:/var/log/halb/access.log\"), "
                             f"got {path!r}")
        if path.endswith("/"):
            raise ValueError(f"file: names a directory ({path!r}), not a file")
        return "file", path, None
    if v == "syslog":
        return "syslog", ACCESS_LOG_DEV_LOG, None
    if v.startswith("syslog:"):
        try:
            ep = parse_endpoint(v[7:])
        except ValueError as e:
            raise ValueError(f"syslog:HOST:PORT: {e}") from None
        return "syslog-udp", "", ep
    raise ValueError(f"unknown destination {v!r} (expected \"stderr\", \"stdout\", "
                     f"\"file:/PATH\", \"syslog\" (/dev/log) or \"syslog:HOST:PORT\" (UDP))")


def _access_log_format(v: Any) -> str:
    from .accesslog import check_format

    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {_tname(v)}")
    return check_format(v)


def _access_log(r: _Reader) -> AccessLogConfig:
    from .accesslog import FACILITIES

    d = AccessLogConfig()
    enabled = r.get("enabled", bool, True)
    kind, path, addr = r.conv("destination", _access_log_destination, ("stderr", "", None))
    dest = r.data.get("destination") if r.has("destination") else d.destination
    if not isinstance(dest, str):
        dest = d.destination
    fmt = r.conv("format", _access_log_format, d.format)
    sample = r.get("sample", (int, float), d.sample)
    if r.has("sample") and sample is not None and not 0 < sample <= 1:
        r.error(f"{sample} out of range (a fraction: 0 < sample <= 1; 0.01 logs one "
                f"request in 100)", "sample")
        sample = d.sample
    facility = r.choice("facility", tuple(FACILITIES), d.facility)
    buffer = r.int_in("buffer", 64, 1_000_000, d.buffer)
    r.done()
    if r.has("facility") and not kind.startswith("syslog"):
        r.error(f"facility needs a syslog destination (destination is {dest!r})", "facility")
    return AccessLogConfig(enabled=bool(enabled), destination=dest or d.destination,
                           format=fmt or d.format, sample=float(sample), facility=facility,
                           buffer=buffer, kind=kind, path=path, address=addr)


# ---------------------------------------------------------------------------------------------
# Entry points


def parse(data: dict, source: str = "") -> Config:
    """Builds the model from already-parsed TOML; raises ConfigError listing every problem."""
    problems: list[Problem] = []
    top = _Reader(data, "", problems)
    nr = top.table("node")
    if nr is None:
        problems.append(Problem("node", "is required"))
        node = NodeConfig(name="")
    else:
        node = _node(nr)
    prs = top.tables("pools")
    # behind ECMP ([bgp]) every node must pick the same backend for the same client: Maglev
    # is the pools' default there
    scale_out = isinstance(top.data.get("bgp"), dict)
    pools = [_pool(p, "maglev" if scale_out else "roundrobin") for p in prs]
    _dupes(prs, [p.name for p in pools], "pool")
    lrs = top.tables("listeners")
    listeners = [_listener(lr) for lr in lrs]
    _dupes(lrs, [l.name for l in listeners], "listener")
    pool_names = {p.name for p in pools}
    binds: dict[tuple, int] = {}
    # pools an http listener sends requests to: their responses can carry load reports
    http_fronted = {n for l in listeners if l.mode == "http"
                    for n in [l.pool] + [rt.pool for rt in l.routes]}
    for i, (lr, l) in enumerate(zip(lrs, listeners)):
        if l.pool and l.pool not in pool_names:
            lr.error(f"unknown pool {l.pool!r}", "pool")
        elif l.mode != "http" and any(p.name == l.pool and p.sticky.mode == "app_cookie"
                                      for p in pools):
            lr.error(f"pool {l.pool!r} sticks by an application cookie, which a {l.mode} "
                     f"listener cannot read (use sticky mode \"source\", or mode = \"http\")",
                     "pool")
        elif l.mode in ("tcp", "udp") and l.pool not in http_fronted and any(
                p.name == l.pool and p.algorithm == "resource" and p.agent is None for p in pools):
            lr.error(f"pool {l.pool!r} balances by reported load (algorithm = \"resource\"), "
                     f"which a {l.mode} listener can only learn from an agent: add "
                     f"[pools.agent] to the pool, or use mode = \"http\" (the "
                     f"endpoint-load-metrics response header)", "pool")
        for j, rt in enumerate(l.routes):
            if rt.pool and rt.pool not in pool_names:
                problems.append(Problem(f"{lr.sub('routes')}[{j}].pool", f"unknown pool {rt.pool!r}"))
        if l.cache is not None:
            served = {l.pool} | {rt.pool for rt in l.routes}
            for j, cp in enumerate(l.cache.pools):
                if cp not in served:
                    problems.append(Problem(f"{lr.sub('cache.pools')}[{j}]",
                                            f"{cp!r} is not a pool this listener routes to "
                                            f"({', '.join(sorted(served))})"))
        proto = l.protocol if l.mode == "nat" else ("udp" if l.mode == "udp" else "tcp")
        if l.mode == "nat" and l.pool in pool_names:
            pc = next(p for p in pools if p.name == l.pool)
            if pc.algorithm != "maglev":
                lr.error(f"pool {l.pool!r} has algorithm = {pc.algorithm!r}: a nat listener "
                         f"balances in the kernel by consistent hash, so its pool needs "
                         f"algorithm = \"maglev\" (every node then picks the same backend)",
                         "pool")
            if pc.sticky.mode != "none":
                lr.error(f"pool {l.pool!r} has sticky.mode = {pc.sticky.mode!r}: a nat "
                         f"listener keeps clients by consistent hash and replicated conntrack "
                         f"entries; set sticky.mode = \"none\" or use a tcp/udp listener",
                         "pool")
            _nat_backend_families(l, pools.index(pc), pc, prs[pools.index(pc)], problems)
        k = (proto, l.bind)
        if l.bind.host != "invalid" and k in binds:
            lr.error(f"{l.bind} is already bound by listeners[{binds[k]}]", "bind")
        binds.setdefault(k, i)
    for i, (pr, p) in enumerate(zip(prs, pools)):
        if p.sticky.mode == "cookie" and not any(
                l.mode == "http" and (l.pool == p.name or any(rt.pool == p.name for rt in l.routes))
                for l in listeners):
            pr.error("cookie stickiness needs an http listener in front of the pool", "sticky.mode")
    m = top.table("metrics")
    metrics = MetricsConfig()
    if m:
        metrics = MetricsConfig(address=m.conv("address", parse_endpoint, None))
        m.done()
    c = top.table("control")
    control = _control(c) if c else ControlConfig()
    vrs = top.tables("vrrp")
    vrrp = [_vrrp(v) for v in vrs]
    _dupes(vrs, [v.name for v in vrrp], "vrrp instance")
    seen_vrid: dict[tuple[str, int, int], int] = {}
    for i, (vr, v) in enumerate(zip(vrs, vrrp)):
        fam = 6 if v.vips and v.vips[0].version == 6 else 4
        k = (v.interface, v.vrid, fam)
        if k in seen_vrid:
            vr.error(f"vrid {v.vrid} on {v.interface} is already used by vrrp[{seen_vrid[k]}]", "vrid")
        seen_vrid.setdefault(k, i)
        for j, t in enumerate(v.track):
            if t.type == "pool" and t.pool and t.pool not in pool_names:
                problems.append(Problem(f"{vr.sub('track')}[{j}].pool", f"unknown pool {t.pool!r}"))
    s = top.table("sync")
    sync = _sync(s) if s else None
    nt = top.table("nat")
    nat = _nat(nt) if nt else NatConfig()
    alr = top.table("access_log")
    access_log = _access_log(alr) if alr else AccessLogConfig()
    br = top.table("bgp")
    bgp = _bgp(br) if br else None
    if bgp is not None and br is not None:
        elected = {_canonical_ip(str(a.ip)) for vc in vrrp for a in vc.vips}
        binds = {_canonical_ip(l.bind.host) for l in listeners
                 if l.bind.host not in ("invalid", "0.0.0.0", "::", "")}
        for i, v in enumerate(bgp.vips):
            if v in elected:
                problems.append(Problem(f"bgp.vips[{i}]", f"{v} is a [[vrrp]] VIP: a VIP is "
                                        f"either elected (one node) or announced (every node)"))
            elif v not in binds and not any(l.bind.host in ("0.0.0.0", "::") for l in listeners):
                problems.append(Problem(f"bgp.vips[{i}]", f"no listener binds {v}"))
        if not bgp.vips and not binds - elected:
            br.error("no VIP to announce: no listener binds an address that is not a [[vrrp]] "
                     "VIP (list them in bgp.vips)")
    if sync and node.name and any(p.name == node.name for p in sync.peers):
        problems.append(Problem("sync.peers", f"lists this node ({node.name!r}) as its own peer"))
    top.done()
    if problems:
        raise ConfigError(problems)
    warnings = []
    for vr, v in zip(vrs, vrrp):
        if not vr.has("checksum") and not (v.vips and v.vips[0].version == 6):
            # (IPv6 adverts always sum the pseudo-header, as keepalived does)
            warnings.append(Problem(vr.sub("checksum"), (
                f"not set, so \"rfc9568\" (no pseudo-header); keepalived checksums VRRPv3 "
                f"with one and drops such adverts (and halb drops its), so a keepalived node in "
                f"vrid {v.vrid} and this one would both be master: set checksum = "
                f"\"keepalived\" where keepalived shares the vrid, or checksum = \"rfc9568\" "
                f"to say every peer is halb")))
        if v.garp.refresh == 0:
            warnings.append(Problem(vr.sub("garp.refresh"), (
                "0 turns periodic gratuitous ARP off: a client that missed the takeover "
                "bursts keeps the old node's MAC until its ARP entry ages out (30-60 s)")))
        if v.unicast_peers and not (v.auth_key or v.auth_hmac):
            warnings.append(Problem(vr.sub("unicast_peers"), (
                "without authentication: over unicast anyone who can land a packet here with a "
                "peer's source address can demote the master or force an election (add "
                "[vrrp.auth_hmac], which keepalived 2.4 speaks too)")))
        if v.auth_hmac is not None and v.auth_hmac.mode != "enforce":
            warnings.append(Problem(vr.sub("auth_hmac.mode"), (
                f"\"{v.auth_hmac.mode}\": adverts without a trailer are still accepted (a "
                f"rollout step; set \"enforce\" once every node signs)")))
        ah_raw = vr.data.get("auth_hmac") if isinstance(vr.data, dict) else None
        for kid, value in ((ah_raw or {}).get("keys") or {}).items():
            if isinstance(value, str) and value.startswith("file:"):
                try:
                    mode = os.stat(value[5:]).st_mode
                except OSError:
                    continue
                if mode & 0o077:
                    warnings.append(Problem(vr.sub(f"auth_hmac.keys.{kid}"), (
                        f"key file {value[5:]!r} can be read by group or others (mode "
                        f"{mode & 0o777:o}; keep it 0600)")))
        if v.unicast_peers and any(p == v.source_address for p in v.unicast_peers):
            warnings.append(Problem(vr.sub("unicast_peers"),
                                    f"lists this node's own source_address {v.source_address}"))
    held = {str(a.ip) for vc in vrrp for a in vc.vips}
    for lr, l in zip(lrs, listeners):
        if l.mode == "nat" and vrrp and l.bind.host not in held:
            warnings.append(Problem(lr.sub("bind"), (
                f"{l.bind.host} is not a VIP of any [[vrrp]] instance: its connections are "
                f"replicated only while this node holds the address some other way")))
    if bgp is not None and sync is None and any(l.mode == "nat" for l in listeners):
        warnings.append(Problem("bgp", (
            "NAT listeners behind ECMP without [sync]: a connection the router moves to "
            "another node (a node died, left or joined) finds no conntrack entry there and is "
            "reset; list every other node in [[sync.peers]] (a full mesh)")))
    if sync is not None and sync.insecure:
        warnings.append(Problem("sync.insecure", (
            "true: tables travel in plaintext and any host that reaches sync.listen can feed "
            "this node's tables (use [sync.tls] outside a lab)")))
    return Config(node=node, pools=tuple(pools), listeners=tuple(listeners), metrics=metrics,
                  control=control, vrrp=tuple(vrrp), sync=sync, nat=nat,
                  access_log=access_log, bgp=bgp, source=source,
                  warnings=tuple(warnings))


def loads(text: str, source: str = "<string>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([Problem("", f"{source}: invalid TOML: {e}")]) from None
    return parse(data, source)


def load(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([Problem("", f"cannot read {p}: {e.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([Problem("", f"{p}: not UTF-8 text")]) from None
    return loads(text, str(p))
