"""VIPs and link state through pyroute2 (netlink), from asyncio.

pyroute2's synchronous ``IPRoute`` cannot run inside a running event loop (and its asyncio
variant does not work under uvloop), so the queries (links, addresses) go to one worker
thread that owns one ``IPRoute`` socket; the methods return futures submitted at call time.

Adding and removing VIPs is on the takeover path, where a thread hop costs milliseconds on a
loaded machine, so ``AddrSocket`` does it in the caller's thread: pyroute2's ``ifaddrmsg``
encodes the request, one blocking send and one receive of the kernel's acknowledgement on a
plain NETLINK_ROUTE socket (the kernel handles the request inside ``send``, so the receive does
not wait). Both paths are idempotent: an address already present (EEXIST) or already gone
(EADDRNOTAVAIL) is success.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import os
import socket
import struct
import threading
from typing import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_DELADDR, RTM_NEWADDR
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

EEXIST, EADDRNOTAVAIL, ENODEV = 17, 99, 19
IFA_F_NODAD, IFA_F_TENTATIVE = 0x02, 0x40
IFF_UP, IFF_RUNNING, IFF_LOWER_UP = 0x1, 0x40, 0x10000

Vip = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class LinkError(Exception):
    """A netlink operation failed (the interface is missing, permission denied, ...)."""


NLMSG_ERROR = 2
NETLINK_ROUTE = 0
ACK_TIMEOUT = 1.0


class AddrSocket:
    """Adds and removes addresses with one netlink request each, in the caller's thread."""

    def __init__(self):
        self._sock: socket.socket | None = None
        self._seq = 0
        self._cache: dict[tuple, bytes] = {}

    def _socket(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
            s.bind((0, 0))
            s.settimeout(ACK_TIMEOUT)
            self._sock = s
        return self._sock

    def prepare(self, add: bool, ifindex: int, vip: Vip) -> bytes:
        """The encoded request (cached: encoding is most of the cost); seq patched per use."""
        k = (add, ifindex, str(vip))
        data = self._cache.get(k)
        if data is None:
            m = ifaddrmsg()
            m["family"] = socket.AF_INET if vip.version == 4 else socket.AF_INET6
            m["prefixlen"] = vip.network.prefixlen
            m["index"] = ifindex
            addr = str(vip.ip)
            if vip.version == 4:
                m["attrs"] = [("IFA_LOCAL", addr), ("IFA_ADDRESS", addr)]
            else:
                # nodad: a VIP moves with its owner; duplicate address detection would keep
                # it tentative (unusable) for a second or more after every takeover
                m["flags"] = IFA_F_NODAD if add else 0
                m["attrs"] = [("IFA_ADDRESS", addr)]
                if add:
                    # preferred lifetime 0 (valid forever): the kernel never picks a VIP as
                    # the source of the node's own connections (RFC 6724 rule 3), as it would
                    # otherwise (the newest address of a prefix wins): connections to backends
                    # would leave from the VIP, and their replies follow the VIP to the other
                    # node after a takeover. Traffic to the VIP is served as before.
                    m["attrs"] += [("IFA_FLAGS", IFA_F_NODAD),
                                   ("IFA_CACHEINFO", {"ifa_preferred": 0,
                                                      "ifa_valid": 0xFFFFFFFF,
                                                      "cstamp": 0, "tstamp": 0})]
            m["header"]["type"] = RTM_NEWADDR if add else RTM_DELADDR
            m["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if add else 0)
            m["header"]["sequence_number"] = 0
            m.encode()
            data = bytes(m.data)
            if len(self._cache) < 1024:
                self._cache[k] = data
        return data

    def request(self, add: bool, ifindex: int, vip: Vip) -> bool:
        """Adds (or removes) ``vip`` on interface ``ifindex``; True if it changed anything."""
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        msg = bytearray(self.prepare(add, ifindex, vip))
        struct.pack_into("=I", msg, 8, self._seq)
        s = self._socket()
        try:
            s.send(msg)
            while True:
                data = s.recv(65536)
                off = 0
                while off + 16 <= len(data):
                    length, typ, _flags, seq, _pid = struct.unpack_from("=IHHII", data, off)
                    if typ == NLMSG_ERROR and seq == self._seq:
                        err = -struct.unpack_from("=i", data, off + 16)[0]
                        if err == 0:
                            return True
                        if (add and err == EEXIST) or (not add and err in (EADDRNOTAVAIL, ENODEV)):
                            return False
                        raise LinkError(f"{'add' if add else 'remove'} {vip} on interface "
                                        f"{ifindex}: {os.strerror(err)}")
                    if length < 16:
                        break
                    off += (length + 3) & ~3
        except OSError as e:
            self.close()  # a timed-out or broken socket may hold stale replies
            raise LinkError(f"{'add' if add else 'remove'} {vip}: {e}") from None

    def change(self, add: bool, ifindex: int, vips: Iterable[Vip]) -> list[str]:
        return [str(v.ip) for v in vips if self.request(add, ifindex, v)]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


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

    def _link_local(self, ifname: str, exclude: frozenset[str],
                    link_local: bool = True) -> tuple[str, bool]:
        idx = self._index(ifname)
        found = ("", True)
        for m in self._ipr().get_addr(index=idx, family=socket.AF_INET6):
            a = m.get_attr("IFA_ADDRESS")
            if a in exclude or ipaddress.IPv6Address(a).is_link_local != link_local:
                continue
            flags = m.get_attr("IFA_FLAGS") or m["flags"]
            if not flags & IFA_F_TENTATIVE:
                return a, False
            found = found if found[0] else (a, True)
        return found

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

    def link_local(self, ifname: str, exclude: Iterable[str] = (),
                   link_local: bool = True) -> "asyncio.Future[tuple[str, bool]]":
        """(the link-local IPv6 address of ``ifname`` not in ``exclude``, still tentative?);
        ("", True) if none. ``link_local=False``: a global one instead."""
        return self._run(self._link_local, ifname, frozenset(exclude), link_local)

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
