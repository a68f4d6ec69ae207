"""VIPs and link state through pyroute2 (netlink), from asyncio.

pyroute2's synchronous ``IPRoute`` cannot run inside a running event loop (and its asyncio
variant does not work under uvloop), so every netlink call goes to one worker thread that owns
one ``IPRoute`` socket; the coroutines below await it. Adding and removing addresses is
idempotent: an address already present (EEXIST) or already gone (EADDRNOTAVAIL) is success.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import socket
import threading
from typing import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

EEXIST, EADDRNOTAVAIL, ENODEV = 17, 99, 19
IFF_UP, IFF_RUNNING, IFF_LOWER_UP = 0x1, 0x40, 0x10000

Vip = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class LinkError(Exception):
    """A netlink operation failed (the interface is missing, permission denied, ...)."""


class Netlink:
    """One worker thread with one IPRoute socket. ``close()`` ends both."""

    def __init__(self):
        self._ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="halb-netlink")
        self._local = threading.local()
        self._closed = False

    def _ipr(self) -> IPRoute:
        ip = getattr(self._local, "ip", None)
        if ip is None:
            # pyroute2 runs its own loop in this thread; uvloop (the daemon's loop policy)
            # cannot carry netlink sockets, so it gets a plain selector loop
            ip = self._local.ip = IPRoute(use_event_loop=asyncio.SelectorEventLoop())
        return ip

    def _run(self, fn, *args) -> asyncio.Future:
        """Submits ``fn`` to the worker now (so calls run in the order they were made)."""
        if self._closed:
            raise LinkError("netlink closed")
        return asyncio.get_running_loop().run_in_executor(self._ex, fn, *args)

    def _index(self, ifname: str) -> int:
        idx = self._ipr().link_lookup(ifname=ifname)
        if not idx:
            raise LinkError(f"no interface {ifname!r}")
        return idx[0]

    # -- blocking parts (worker thread) ---------------------------------------------------------

    def _add(self, ifname: str, vips: tuple[Vip, ...]) -> list[str]:
        ip, idx, added = self._ipr(), self._index(ifname), []
        for v in vips:
            try:
                ip.addr("add", index=idx, address=str(v.ip), prefixlen=v.network.prefixlen)
                added.append(str(v.ip))
            except NetlinkError as e:
                if e.code != EEXIST:
                    raise LinkError(f"add {v} on {ifname}: {e}") from None
        return added

    def _remove(self, ifname: str, vips: tuple[Vip, ...]) -> list[str]:
        ip = self._ipr()
        try:
            idx = self._index(ifname)
        except LinkError:
            return []  # the interface is gone and its addresses with it
        removed = []
        for v in vips:
            try:
                ip.addr("del", index=idx, address=str(v.ip), prefixlen=v.network.prefixlen)
                removed.append(str(v.ip))
            except NetlinkError as e:
                if e.code not in (EADDRNOTAVAIL, ENODEV):
                    raise LinkError(f"remove {v} from {ifname}: {e}") from None
        return removed

    def _held(self, ifname: str) -> list[str]:
        idx = self._index(ifname)
        return [m.get_attr("IFA_ADDRESS") for m in self._ipr().get_addr(index=idx)]

    def _link(self, ifname: str) -> dict:
        idx = self._ipr().link_lookup(ifname=ifname)
        if not idx:
            return {"exists": False, "up": False, "mac": ""}
        link = self._ipr().get_links(idx[0])[0]
        flags = link["flags"]
        oper = link.get_attr("IFLA_OPERSTATE") or ""
        up = bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP) and oper in ("UP", "UNKNOWN")
        return {"exists": True, "up": up, "mac": link.get_attr("IFLA_ADDRESS") or "",
                "index": idx[0]}

    def _primary(self, ifname: str, exclude: frozenset[str]) -> str:
        idx = self._index(ifname)
        for m in self._ipr().get_addr(index=idx, family=socket.AF_INET):
            a = m.get_attr("IFA_ADDRESS")
            if a not in exclude:
                return a
        return ""

    # -- awaitables (submitted at call time, run in call order) ----------------------------------

    def add_vips(self, ifname: str, vips: Iterable[Vip]) -> "asyncio.Future[list[str]]":
        """Adds every VIP to ``ifname``; returns those that were not there yet."""
        return self._run(self._add, ifname, tuple(vips))

    def remove_vips(self, ifname: str, vips: Iterable[Vip]) -> "asyncio.Future[list[str]]":
        """Removes every VIP from ``ifname``; returns those that were there."""
        return self._run(self._remove, ifname, tuple(vips))

    def addresses(self, ifname: str) -> "asyncio.Future[list[str]]":
        return self._run(self._held, ifname)

    def link(self, ifname: str) -> "asyncio.Future[dict]":
        """{"exists", "up" (admin up, carrier, operstate up), "mac", "index"}."""
        return self._run(self._link, ifname)

    def primary_address(self, ifname: str, exclude: Iterable[str] = ()) -> "asyncio.Future[str]":
        """The first IPv4 address on ``ifname`` that is not in ``exclude`` (the VIPs); "" if none."""
        return self._run(self._primary, ifname, frozenset(exclude))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def _close():
            ip = getattr(self._local, "ip", None)
            if ip is not None:
                ip.close()
        try:
            self._ex.submit(_close).result(timeout=2)
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
        self._ex.shutdown(wait=False)
