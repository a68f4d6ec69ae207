"""HTTP routing: which pool serves a request. A pure function of the parsed request.

Routes are tried in config order; the first one whose every given condition matches wins,
else the listener's default pool serves. Conditions:

- ``host``: exact (``api.example.com``) or a suffix wildcard (``*.example.com``, which matches
  ``a.example.com`` and ``a.b.example.com`` but not ``example.com`` itself). A route host with
  a port (``example.com:8080``) is compared with the request's Host including its port;
  otherwise the request's port is ignored. Comparison is case-insensitive.
- ``path_prefix``: the request path (without query) starts with it. ``/api`` matches ``/api``,
  ``/api/x`` and ``/apis`` (plain prefix, as HAProxy's ``path_beg``); write ``/api/`` to
  match only below the directory.
- ``header``: the request carries the header (name case-insensitive); with a value, one of the
  header's values equals it exactly.
"""

from __future__ import annotations

from typing import Mapping, Sequence

try:
    import cython  # compiled: see halb/_ext.py
except ImportError:  # pragma: no cover - Cython absent at run time
    from .. import _cyshim as cython

from ..config import RouteConfig
from .http_head import Request


def split_host(host: str) -> tuple[str, str]:
    """``("example.com", "8080")`` from ``"Example.COM:8080"``; IPv6 literals keep brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end > 0:
            return host[:end + 1], host[end + 2:] if host[end + 1:end + 2] == ":" else ""
        return host, ""
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit():
        return name, port
    return host, ""


_HOST_CACHE = 1024  # distinct Host values remembered split; the cache is emptied when full


class _Route:
    __slots__ = ("pool", "host", "host_port", "wildcard", "prefix", "hname", "hvalue", "hname_b")

    def __init__(self, rc: RouteConfig):
        self.pool = rc.pool
        h = rc.host.lower()
        self.wildcard = h.startswith("*.")
        if self.wildcard:
            h = h[1:]  # ".example.com"
        name, port = split_host(h) if not self.wildcard else (h, "")
        if self.wildcard and ":" in h:
            name, _, port = h.rpartition(":")
        self.host = name
        self.host_port = port
        self.prefix = rc.path_prefix
        self.hname = rc.header.name.lower() if rc.header else ""
        self.hname_b = self.hname.encode("latin-1")
        self.hvalue = rc.header.value if rc.header else ""

    def matches(self, host: str, port: str, path: str, headers: Mapping[str, Sequence[str]]) -> bool:
        if self.host:
            if self.host_port and self.host_port != port:
                return False
            if self.wildcard:
                if not host.endswith(self.host) or len(host) <= len(self.host):
                    return False
            elif host != self.host:
                return False
        if self.prefix and not path.startswith(self.prefix):
            return False
        if self.hname:
            if isinstance(headers, Request):  # the proxy's: scanned for the name as bytes
                vals = cython.cast(Request, headers).values(self.hname_b)
            else:
                vals = headers.get(self.hname)
            if not vals:
                return False
            if self.hvalue and self.hvalue not in vals:
                return False
        return True


class Router:
    """``Router(routes, default_pool).route(host, path, headers) -> pool name``.

    ``headers`` maps lower-case header names to the list of their values.
    """

    __slots__ = ("routes", "default", "needs_headers", "_hosts")

    def __init__(self, routes: Sequence[RouteConfig], default: str):
        self.routes = tuple(_Route(r) for r in routes)
        self.default = default
        self.needs_headers = any(r.hname for r in self.routes)
        self._hosts: dict[str, tuple[str, str]] = {}  # Host -> split_host(Host), bounded

    def route(self, host: str, path: str, headers: Mapping[str, Sequence[str]] | None = None) -> str:
        if not self.routes:
            return self.default
        hp = self._hosts.get(host)
        if hp is None:
            hp = split_host(host) if host else ("", "")
            if len(self._hosts) >= _HOST_CACHE:
                self._hosts.clear()
            self._hosts[host] = hp
        name, port = hp
        hdrs = headers or {}
        for r in self.routes:
            if r.matches(name, port, path, hdrs):
                return r.pool
        return self.default
