"""Shared socket helpers for the listeners.

Listening sockets get ``SO_REUSEADDR`` (a restarted node rebinds at once) and
``IP_FREEBIND`` / ``IPV6_FREEBIND`` so a listener can bind a VIP this node does not own yet:
the election adds the address later, and the listener starts receiving traffic the moment it
does, without a rebind.
"""

from __future__ import annotations

import ipaddress
import socket

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # linux/in.h
IPV6_FREEBIND = 78  # linux/in6.h


def _family(host: str) -> int:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        # a name: resolve it once, at start
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        if not infos:  # pragma: no cover - getaddrinfo raises instead
            raise OSError(f"cannot resolve {host!r}")
        return infos[0][0]


def _resolve(host: str, port: int, family: int, kind: int) -> tuple:
    infos = socket.getaddrinfo(host, port, family, kind)
    return infos[0][4]


def _freebind(s: socket.socket, family: int) -> None:
    try:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        else:
            s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    except OSError:  # pragma: no cover - old kernels: binding a missing VIP then fails clearly
        pass


def listen_tcp(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A non-blocking listening TCP socket on ``host:port`` (the address need not exist yet)."""
    family = _family(host)
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _freebind(s, family)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(_resolve(host, port, family, socket.SOCK_STREAM))
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def bind_udp(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port`` (the address need not exist yet)."""
    family = _family(host)
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _freebind(s, family)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(_resolve(host, port, family, socket.SOCK_DGRAM))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def raise_nofile(want: int) -> int:
    """Raises the soft RLIMIT_NOFILE towards ``want`` (at most the hard limit); returns it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # pragma: no cover - keep the old limit
            pass
    return soft


def format_addr(addr: tuple) -> str:
    """``ip:port`` or ``[v6]:port`` for a socket address tuple."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
