"""Small network-namespace primitives for the lab, the demo and the tests (pyroute2).

Everything is named by the caller; every name should start with a short prefix owned by the
caller, so that ``cleanup(prefix)`` can remove whatever an interrupted run left behind.
Interface names are at most 15 characters (IFNAMSIZ - 1); longer names raise ValueError.

    from lab import netns as nx
    nx.cleanup("hv")                                   # leftovers of an earlier run
    lan = nx.Lan("hv", "198.18.40.0/24")               # a bridge in its own namespace "hvsw"
    lan.add_host("hvlb1", "198.18.40.11")              # namespace hvlb1, eth0 198.18.40.11/24
    nx.run_in("hvlb1", ["ip", "addr"])                 # CompletedProcess
    p = nx.popen_in("hvlb1", ["python3", "-m", "..."]) # subprocess.Popen
    lan.close()                                        # or use Lan as a context manager

Lower level: ``create_ns``, ``delete_ns``, ``list_ns``, ``add_bridge``, ``add_veth``,
``move_link``, ``add_addr``, ``del_addr``, ``link_up``, ``link_down``, ``link_exists``,
``addresses``, ``set_master``, ``sysctl``; each takes ``ns=None`` (the root namespace) or a
namespace name.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
from typing import Iterator, Sequence

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

IFNAMSIZ = 15
ENOENT, ENODEV, EEXIST, EADDRNOTAVAIL = 2, 19, 17, 99


def _check_ifname(name: str) -> str:
    if not name or len(name) > IFNAMSIZ or "/" in name or " " in name:
        raise ValueError(f"interface name {name!r}: 1..{IFNAMSIZ} characters, no '/' or spaces")
    return name


@contextlib.contextmanager
def ipr(ns: str | None = None) -> Iterator[IPRoute]:
    """An IPRoute socket in namespace ``ns`` (None: the root namespace), closed on exit."""
    ip = IPRoute(netns=ns) if ns else IPRoute()
    try:
        yield ip
    finally:
        ip.close()


def _index(ip: IPRoute, ifname: str) -> int:
    idx = ip.link_lookup(ifname=ifname)
    if not idx:
        raise LookupError(f"no interface {ifname!r}")
    return idx[0]


# -- namespaces ---------------------------------------------------------------------------------


def list_ns() -> list[str]:
    return sorted(netns.listnetns())


def create_ns(name: str, *, lo_up: bool = True) -> str:
    """Creates namespace ``name`` (idempotent) and brings its loopback up."""
    if name not in netns.listnetns():
        netns.create(name)
    if lo_up:
        link_up("lo", ns=name)
    return name


def delete_ns(name: str) -> None:
    """Removes namespace ``name`` (its interfaces go with it); missing is fine.

    Processes still running in the namespace keep it alive until they exit; kill them first.
    """
    if name in netns.listnetns():
        try:
            netns.remove(name)
        except OSError as e:
            if e.errno != ENOENT:
                raise


# -- links ----------------------------------------------------------------------------------------


def link_exists(ifname: str, ns: str | None = None) -> bool:
    with ipr(ns) as ip:
        return bool(ip.link_lookup(ifname=ifname))


def add_bridge(name: str, ns: str | None = None, *, up: bool = True) -> str:
    """A Linux bridge ``name`` in ``ns`` (idempotent). STP off, forwarding delay 0."""
    _check_ifname(name)
    with ipr(ns) as ip:
        if not ip.link_lookup(ifname=name):
            ip.link("add", ifname=name, kind="bridge", br_stp_state=0, br_forward_delay=0)
        if up:
            ip.link("set", index=_index(ip, name), state="up")
    return name


def add_veth(name: str, peer: str, *, ns: str | None = None, peer_ns: str | None = None,
             up: bool = True) -> tuple[str, str]:
    """A veth pair: ``name`` in ``ns`` and ``peer`` in ``peer_ns`` (None: root namespace).

    The pair is created in ``ns`` with the peer placed directly in ``peer_ns``, so no name
    ever has to be unique in the root namespace except where an end lives there.
    """
    _check_ifname(name)
    _check_ifname(peer)
    a, a_ns, b, b_ns = name, ns, peer, peer_ns
    if a_ns is not None and b_ns is None:  # create from the root side
        a, a_ns, b, b_ns = peer, peer_ns, name, ns
    peer_spec: dict = {"ifname": b}
    if b_ns != a_ns:
        peer_spec["net_ns_fd"] = b_ns
    with ipr(a_ns) as ip:
        ip.link("add", ifname=a, kind="veth", peer=peer_spec)
        if up:
            ip.link("set", index=_index(ip, a), state="up")
    if up:
        link_up(b, ns=b_ns)
    return name, peer


def move_link(ifname: str, to_ns: str, ns: str | None = None) -> None:
    with ipr(ns) as ip:
        ip.link("set", index=_index(ip, ifname), net_ns_fd=to_ns)


def set_master(ifname: str, bridge: str, ns: str | None = None) -> None:
    """Enslaves ``ifname`` to ``bridge`` (both in ``ns``)."""
    with ipr(ns) as ip:
        ip.link("set", index=_index(ip, ifname), master=_index(ip, bridge))


def link_up(ifname: str, ns: str | None = None) -> None:
    with ipr(ns) as ip:
        ip.link("set", index=_index(ip, ifname), state="up")


def link_down(ifname: str, ns: str | None = None) -> None:
    with ipr(ns) as ip:
        ip.link("set", index=_index(ip, ifname), state="down")


def delete_link(ifname: str, ns: str | None = None) -> None:
    """Deletes ``ifname`` (a veth takes its peer with it); missing is fine."""
    with ipr(ns) as ip:
        idx = ip.link_lookup(ifname=ifname)
        if idx:
            try:
                ip.link("del", index=idx[0])
            except NetlinkError as e:
                if e.code != ENODEV:
                    raise


# -- addresses ------------------------------------------------------------------------------------


def _iface(addr: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if "/" not in addr:
        addr += "/128" if ":" in addr else "/32"
    return ipaddress.ip_interface(addr)


def add_addr(ifname: str, addr: str, ns: str | None = None) -> None:
    """Adds ``addr`` ("198.18.40.11/24"; no prefix means a host address) to ``ifname``.

    Idempotent: an address already present is not an error.
    """
    a = _iface(addr)
    with ipr(ns) as ip:
        try:
            ip.addr("add", index=_index(ip, ifname), address=str(a.ip),
                    prefixlen=a.network.prefixlen)
        except NetlinkError as e:
            if e.code != EEXIST:
                raise


def del_addr(ifname: str, addr: str, ns: str | None = None) -> None:
    a = _iface(addr)
    with ipr(ns) as ip:
        try:
            ip.addr("del", index=_index(ip, ifname), address=str(a.ip),
                    prefixlen=a.network.prefixlen)
        except NetlinkError as e:
            if e.code != EADDRNOTAVAIL:
                raise


def addresses(ifname: str | None = None, ns: str | None = None) -> list[str]:
    """Addresses (without prefix) on ``ifname`` (or on every interface) in ``ns``."""
    with ipr(ns) as ip:
        kw = {"index": _index(ip, ifname)} if ifname else {}
        return [m.get_attr("IFA_ADDRESS") for m in ip.get_addr(**kw)]


def add_route(dst: str, gateway: str, ns: str | None = None) -> None:
    """A route (``dst`` "0.0.0.0/0" for the default route) via ``gateway``; idempotent."""
    net = ipaddress.ip_network(dst)
    with ipr(ns) as ip:
        try:
            ip.route("add", dst=str(net.network_address), dst_len=net.prefixlen, gateway=gateway)
        except NetlinkError as e:
            if e.code != EEXIST:
                raise


def sysctl(key: str, value: str | int, ns: str | None = None) -> None:
    """Writes /proc/sys/<key with dots as slashes> inside ``ns``."""
    path = "/proc/sys/" + key.replace(".", "/")
    if ns is None:
        with open(path, "w") as f:
            f.write(str(value))
    else:
        run_in(ns, ["sysctl", "-qw", f"{key}={value}"])


# -- processes ------------------------------------------------------------------------------------


def _argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    return (["ip", "netns", "exec", ns] if ns else []) + [str(a) for a in argv]


def run_in(ns: str | None, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0,
           **kw) -> subprocess.CompletedProcess:
    """Runs ``argv`` inside ``ns`` and waits (bounded by ``timeout``); output captured as text."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(_argv(ns, argv), check=check, timeout=timeout, **kw)


def popen_in(ns: str | None, argv: Sequence[str], **kw) -> subprocess.Popen:
    """Starts ``argv`` inside ``ns`` in its own session (so its group can be killed)."""
    kw.setdefault("start_new_session", True)
    return subprocess.Popen(_argv(ns, argv), **kw)


def ns_pids(ns: str) -> list[int]:
    """Pids of processes whose network namespace is ``ns``."""
    try:
        target = os.stat(f"/run/netns/{ns}")
    except FileNotFoundError:
        return []
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{d}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(d))
    return pids


# -- cleanup --------------------------------------------------------------------------------------


def cleanup(prefix: str, *, kill: bool = True) -> list[str]:
    """Removes every namespace and every root-namespace link whose name starts with ``prefix``.

    With ``kill`` (default), processes still running inside those namespaces get SIGKILL first
    (they would keep the namespace alive). Returns the names removed. ``prefix`` must be at
    least two characters so a typo cannot wipe unrelated state.
    """
    if len(prefix) < 2:
        raise ValueError("cleanup prefix must be at least 2 characters")
    removed = []
    for ns in list_ns():
        if not ns.startswith(prefix):
            continue
        if kill:
            for pid in ns_pids(ns):
                if pid == os.getpid():
                    continue
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, 9)
        delete_ns(ns)
        removed.append(ns)
    with ipr() as ip:
        for link in ip.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            if name.startswith(prefix):
                try:
                    ip.link("del", index=link["index"])
                    removed.append(name)
                except NetlinkError as e:
                    if e.code != ENODEV:  # a veth peer deleted with its other end
                        raise
    return removed


# -- a small LAN ----------------------------------------------------------------------------------


class Lan:
    """A layer-2 segment: a bridge in its own namespace ``<prefix>sw`` (or in ``bridge_ns``),
    with hosts attached by veth pairs. Each host is a namespace with ``eth0`` on the bridge.

        with Lan("hv", "198.18.40.0/24") as lan:
            lan.add_host("hvlb1", "198.18.40.11")
            lan.add_host("hvcl", "198.18.40.2")

    Veth ends on the bridge side are named ``<prefix>b<n>``. ``close()`` removes every
    namespace and link it created and kills the processes left in them.
    """

    def __init__(self, prefix: str, subnet: str, *, bridge_ns: str | None = "",
                 bridge: str | None = None, subnet6: str | None = None):
        if len(prefix) < 2 or len(prefix) > 8:
            raise ValueError("prefix: 2..8 characters")
        self.prefix = prefix
        self.net = ipaddress.ip_network(subnet)
        self.net6 = ipaddress.ip_network(subnet6) if subnet6 else None  # dual stack
        self.hosts6: dict[str, str] = {}  # namespace -> IPv6 address
        self.bridge_ns = f"{prefix}sw" if bridge_ns == "" else bridge_ns
        self.bridge = _check_ifname(bridge or f"{prefix}br0")
        self.hosts: dict[str, str] = {}  # namespace -> address
        self._ports: dict[str, str] = {}  # namespace -> bridge-side veth
        self._namespaces: list[str] = []
        if self.bridge_ns:
            create_ns(self.bridge_ns)
            self._namespaces.append(self.bridge_ns)
        add_bridge(self.bridge, self.bridge_ns)

    def add_host(self, name: str, address: str, *, ifname: str = "eth0",
                 address6: str | None = None) -> str:
        """Namespace ``name`` with ``ifname`` on the bridge, address ``address`` in the subnet
        (and ``address6`` in the IPv6 subnet of a dual-stack LAN). IPv6 duplicate address
        detection is off inside the namespace, so addresses (the link-local one too) are
        usable at once."""
        ip = ipaddress.ip_address(address)
        if ip not in self.net:
            raise ValueError(f"{address} is not in {self.net}")
        ip6 = ipaddress.ip_address(address6) if address6 else None
        if ip6 is not None and (self.net6 is None or ip6 not in self.net6):
            raise ValueError(f"{address6} is not in {self.net6}")
        create_ns(name)
        self._namespaces.append(name)
        if self.net6 is not None:
            for conf in ("all", "default"):
                sysctl(f"net.ipv6.conf.{conf}.accept_dad", 0, name)
        br_end = _check_ifname(f"{self.prefix}b{len(self._ports) + 1}")
        self._ports[name] = br_end
        add_veth(br_end, ifname, ns=self.bridge_ns, peer_ns=name)
        set_master(br_end, self.bridge, self.bridge_ns)
        add_addr(ifname, f"{ip}/{self.net.prefixlen}", ns=name)
        self.hosts[name] = str(ip)
        if ip6 is not None and self.net6 is not None:
            add_addr(ifname, f"{ip6}/{self.net6.prefixlen}", ns=name)
            self.hosts6[name] = str(ip6)
        return name

    def port_of(self, host: str) -> str:
        """The bridge-side veth of ``host`` (bring it down to cut the host off the LAN)."""
        return self._ports[host]

    def close(self) -> None:
        for ns in reversed(self._namespaces):
            for pid in ns_pids(ns):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, 9)
            delete_ns(ns)
        self._namespaces.clear()
        if not self.bridge_ns:
            delete_link(self.bridge)
        self.hosts.clear()

    def __enter__(self) -> "Lan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
