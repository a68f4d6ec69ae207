"""Lab topologies as plain data, and the per-node halbd configs they imply.

A ``Topology`` is the short description (name prefix, subnet, how many load balancers,
backends and clients, active-passive or active-active); everything else (namespace names,
addresses, VIPs, priorities, ports, config text) is derived from it, so the netns lab, the
containerlab topology, the demo and the chaos suite all agree on one layout:

    subnet .11 .12 ...   load balancers (lb1, lb2, ...)      VIPs .100 (.101 ...)
    subnet .21 .22 ...   backends (web1, web2, ...): http :8080, tcp :9000, udp :9001
    subnet .31 ...       clients (c1, ...)
    subnet .128-.191     extra source addresses of c1 (source-sticky TCP clients: two blocks
                         of 32, ``source_block(0)`` and ``source_block(1)``)
    namespaces <prefix>-lb1, <prefix>-web1, <prefix>-c1; the bridge in <prefix>-sw
    VIP :80 http (sticky cookie), :9000 tcp (sticky source), :9001 udp

``family=6`` makes the same layout IPv6 end to end, on a dual-stack LAN (every host keeps its
IPv4 address as well). The IPv6 addresses come from 2001:2::/48 (RFC 5180, the IPv6
benchmarking range, as 198.18.0.0/15 is IPv4's), one /64 per IPv4 subnet, written so that an
IPv4 address can be read off its IPv6 one:

    IPv4 subnet 198.(18+a).b.0/24     ->  2001:2:0:N::/64, N = the decimal digits of 256a + b
                                          read as hex (198.18.0.0/24 -> 2001:2::/64,
                                          198.18.70.0/24 -> 2001:2:0:70::/64,
                                          198.19.1.0/24 -> 2001:2:0:257::/64)
    host .H (LB, backend, client, VIP) ->  <net6>::H, again decimal digits (.11 -> ::11,
                                          .100 -> ::100)
    the first client's extra sources  ->  <net6>::128:0 - ::128:3f (contiguous, so that each
                                          block of 32 is a CIDR: ``source_block``)
    VRRP instance with VRID V         ->  also the virtual link-local fe80::<V in hex>/64, first
                                          in its vips (RFC 9568; halb's config requires one)

In an IPv6 topology the VIPs (/64), the listeners (``[v6]:port``), the backends (they listen
on their IPv6 address), state sync and metrics are IPv6; VRRP adverts go to ff02::12 from
each node's link-local address. The IPv4 output (``family=4``, the default) is unchanged.

Pure code: no I/O except ``write_configs``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

MODES = ("active-passive", "active-active")

HTTP_PORT, TCP_PORT, UDP_PORT = 80, 9000, 9001
BACKEND_HTTP, BACKEND_TCP, BACKEND_UDP = 8080, 9000, 9001
SYNC_PORT = 9400
FAMILIES = (4, 6)
NET6 = ipaddress.IPv6Network("2001:2::/48")  # RFC 5180: the IPv6 benchmarking range
METRICS_PORT = 9100
VRID_BASE = 51
PRIO_HIGH, PRIO_LOW = 200, 100
COOKIE = "HALBSRV"


@dataclass(frozen=True)
class Host:
    role: str  # "lb" | "backend" | "client"
    name: str  # lb1, web1, c1
    netns: str  # <prefix>-<name>
    address: ipaddress.IPv4Interface
    address6: ipaddress.IPv6Interface | None = None  # an IPv6 topology's hosts only

    @property
    def ip(self) -> str:
        """The address the lab's traffic, sync and configs use: IPv6 in an IPv6 topology."""
        return str((self.address6 or self.address).ip)


@dataclass(frozen=True)
class Instance:
    """One VRRP instance: a VIP and each LB node's priority for it (IPv6: with the virtual
    link-local address its adverts list first)."""
    name: str
    vrid: int
    vip: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    priorities: dict[str, int]  # lb name -> priority
    link_local: ipaddress.IPv6Interface | None = None

    @property
    def vips(self) -> list[str]:
        """The instance's ``vips`` in the config: the virtual link-local first (IPv6)."""
        return ([str(self.link_local)] if self.link_local else []) + [str(self.vip)]

    def owner(self) -> str:
        """The LB node that should hold the VIP when every node is up."""
        return max(self.priorities, key=lambda n: (self.priorities[n], n))


@dataclass(frozen=True)
class Topology:
    prefix: str = "hl"
    subnet: str = "198.18.0.0/24"
    lbs: int = 2
    backends: int = 3
    clients: int = 1
    mode: str = "active-passive"
    advert_interval: float = 0.1
    preempt: bool = True
    health_interval: float = 0.2
    sticky_ttl: float = 600.0
    interface: str = "eth0"  # the data interface inside each node (containerlab: eth1)
    client_sources: int = 64  # extra addresses on the first client, from .128
    family: int = 4  # 6: IPv6 VIPs, listeners, backends and sync (dual-stack LAN)
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        problems = []
        net = self.network
        if net.version != 4 or net.prefixlen > 24:
            problems.append(f"subnet {self.subnet}: need an IPv4 /24 or larger")
        if not ipaddress.ip_network("198.18.0.0/15").supernet_of(net):
            problems.append(f"subnet {self.subnet}: must lie in 198.18.0.0/15 (benchmarking range)")
        if not (1 <= self.lbs <= 9):
            problems.append(f"lbs={self.lbs}: need 1..9")
        if not (1 <= self.backends <= 9):
            problems.append(f"backends={self.backends}: need 1..9")
        if not (1 <= self.clients <= 9):
            problems.append(f"clients={self.clients}: need 1..9")
        if not (0 <= self.client_sources <= 64):
            problems.append(f"client_sources={self.client_sources}: need 0..64")
        if self.family not in FAMILIES:
            problems.append(f"family={self.family!r}: expected 4 or 6")
        if self.mode not in MODES:
            problems.append(f"mode={self.mode!r}: expected one of {', '.join(MODES)}")
        if self.mode == "active-active" and self.lbs < 2:
            problems.append("active-active needs at least 2 LB nodes")
        # namespaces <prefix>-<name>, bridge ports <prefix>-b<n> (lab.netns.Lan: prefix <= 8)
        if not (self.prefix.isascii() and self.prefix.isalnum() and 1 <= len(self.prefix) <= 6):
            problems.append(f"prefix {self.prefix!r}: 1..6 letters or digits")
        if problems:
            raise ValueError("; ".join(problems))

    # -- layout -------------------------------------------------------------------------------

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(self.subnet, strict=False)  # type: ignore[return-value]

    def _addr(self, host: int) -> ipaddress.IPv4Interface:
        net = self.network
        return ipaddress.IPv4Interface(f"{net.network_address + host}/{net.prefixlen}")

    @property
    def network6(self) -> ipaddress.IPv6Network:
        """The IPv6 /64 of this topology (see the module docstring for the mapping)."""
        index = (int(self.network.network_address) - int(ipaddress.IPv4Address("198.18.0.0"))) >> 8
        return ipaddress.IPv6Network((int(NET6.network_address) | (int(str(index), 16) << 64), 64))

    def _addr6(self, host: int) -> ipaddress.IPv6Interface:
        return ipaddress.IPv6Interface((int(self.network6.network_address) | int(str(host), 16), 64))

    def _host(self, role: str, name: str, n: int) -> Host:
        return Host(role, name, f"{self.ns_prefix}{name}", self._addr(n),
                    self._addr6(n) if self.family == 6 else None)

    @property
    def lb_hosts(self) -> list[Host]:
        return [self._host("lb", f"lb{i}", 10 + i) for i in range(1, self.lbs + 1)]

    @property
    def backend_hosts(self) -> list[Host]:
        return [self._host("backend", f"web{i}", 20 + i) for i in range(1, self.backends + 1)]

    @property
    def client_hosts(self) -> list[Host]:
        return [self._host("client", f"c{i}", 30 + i) for i in range(1, self.clients + 1)]

    @property
    def hosts(self) -> list[Host]:
        return self.lb_hosts + self.backend_hosts + self.client_hosts

    @property
    def ns_prefix(self) -> str:
        """What every namespace and root-namespace link of this lab starts with: ``hl-``.
        The dash keeps labs apart: cleaning up ``hl-`` never touches ``hl6-``."""
        return f"{self.prefix}-"

    def source_addresses(self) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        """The extra addresses of the first client (source-sticky clients)."""
        if self.family == 6:
            base = int(self.network6.network_address) + _SOURCES6
            return [ipaddress.IPv6Interface((base + i, 64)) for i in range(self.client_sources)]
        return [self._addr(128 + i) for i in range(self.client_sources)]

    def source_block(self, k: int, size: int = 32) -> str:
        """CIDR of the k-th block of ``size`` client source addresses."""
        if (k + 1) * size > self.client_sources:
            raise ValueError(f"block {k} of {size} needs {(k + 1) * size} client sources")
        if self.family == 6:
            return (f"{self.network6.network_address + _SOURCES6 + k * size}"
                    f"/{128 - (size - 1).bit_length()}")
        return f"{self.network.network_address + 128 + k * size}/{32 - (size - 1).bit_length()}"

    @property
    def switch_netns(self) -> str:
        """The namespace holding the bridge every host is plugged into (``lab.netns.Lan``)."""
        return f"{self.ns_prefix}sw"

    @property
    def instances(self) -> list[Instance]:
        """Active-passive: one VIP, lb1 highest. Active-active: one VIP per LB node, each
        node highest on its own VIP (crossed priorities)."""
        names = [h.name for h in self.lb_hosts]
        count = len(names) if self.mode == "active-active" else 1
        out = []
        for k in range(count):
            prios = {}
            for j, n in enumerate(names):
                prios[n] = PRIO_HIGH if j == k else max(PRIO_LOW - 10 * ((j - k) % len(names) - 1), 1)
            if self.family == 6:
                out.append(Instance(f"vi{k + 1}", VRID_BASE + k, self._addr6(100 + k), prios,
                                    ipaddress.IPv6Interface(f"fe80::{VRID_BASE + k:x}/64")))
            else:
                out.append(Instance(f"vi{k + 1}", VRID_BASE + k, ipaddress.IPv4Interface(
                    f"{self.network.network_address + 100 + k}/32"), prios))
        return out

    @property
    def vips(self) -> list[str]:
        return [str(i.vip.ip) for i in self.instances]

    def lb(self, name: str) -> Host:
        for h in self.lb_hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def master_down_interval(self, priority: int = PRIO_LOW) -> float:
        """RFC 9568: 3 x Master_Adver_Interval + Skew_Time, for a backup of ``priority``."""
        skew = ((256 - priority) * self.advert_interval) / 256
        return 3 * self.advert_interval + skew

    # -- configs ------------------------------------------------------------------------------

    def node_config(self, lb_name: str, *, state_dir: str, pki_dir: str | None,
                    control_socket: str = "") -> str:
        """The TOML config of LB node ``lb_name``. ``pki_dir`` holds ca.pem and <node>.pem/.key
        from ``halb.pki.generate``; None runs sync without TLS. ``control_socket`` defaults to
        ``<state_dir>/<node>.sock``."""
        me = self.lb(lb_name)
        iface = self.interface
        q = _q
        lines = [
            "# generated by lab.topology; do not edit (python -m lab configs)",
            "[node]", f"name = {q(lb_name)}", f"state_dir = {q(state_dir)}", "",
            "[control]", f"socket = {q(control_socket or f'{state_dir}/{lb_name}.sock')}", "",
            "[metrics]", f"address = {q(_ep(me.ip, METRICS_PORT))}", "",
        ]
        for inst in self.instances:
            lines += [
                "[[vrrp]]", f"name = {q(inst.name)}", f"interface = {q(iface)}",
                f"vrid = {inst.vrid}", f"priority = {inst.priorities[lb_name]}",
                f"vips = [{', '.join(q(v) for v in inst.vips)}]",
                f"advert_interval = {q(_ms(self.advert_interval))}",
                f"preempt = {'true' if self.preempt else 'false'}",
                "[vrrp.garp]", "count = 3", 'spacing = "10ms"', "",
            ]
        peers = [h for h in self.lb_hosts if h.name != lb_name]
        if peers:
            lines += ["[sync]", f"listen = {q(_ep(me.ip, SYNC_PORT))}"]
            if pki_dir is None:
                lines.append("insecure = true")
            else:
                lines += ["[sync.tls]", f"cert = {q(f'{pki_dir}/{lb_name}.pem')}",
                          f"key = {q(f'{pki_dir}/{lb_name}.key')}", f"ca = {q(f'{pki_dir}/ca.pem')}"]
            for p in peers:
                lines += ["[[sync.peers]]", f"name = {q(p.name)}",
                          f"address = {q(_ep(p.ip, SYNC_PORT))}"]
            lines.append("")
        hi = _ms(self.health_interval)
        for pool, port, health, sticky in (
                ("web", BACKEND_HTTP, ("http", '"/healthz"'), "cookie"),
                ("tcp", BACKEND_TCP, ("tcp", None), "source"),
                ("udp", BACKEND_UDP, ("none", None), "source")):
            lines += ["[[pools]]", f"name = {q(pool)}", 'algorithm = "roundrobin"']
            lines += ["[pools.health]", f"type = {q(health[0])}"]
            if health[0] != "none":
                lines += [f"interval = {q(hi)}", f"timeout = {q(hi)}", "rise = 1", "fall = 2"]
                if health[1]:
                    lines.append(f"path = {health[1]}")
            lines += ["[pools.sticky]", f"mode = {q(sticky)}", f"ttl = {q(_ms(self.sticky_ttl))}"]
            if sticky == "cookie":
                lines.append(f"cookie = {q(COOKIE)}")
            for b in self.backend_hosts:
                lines += ["[[pools.backends]]", f"name = {q(b.name)}",
                          f"address = {q(_ep(b.ip, port))}"]
            lines.append("")
        for inst in self.instances:
            vip = str(inst.vip.ip)
            sfx = "" if len(self.instances) == 1 else f"-{inst.name}"
            for lname, mode, port, pool in (("http", "http", HTTP_PORT, "web"),
                                            ("tcp", "tcp", TCP_PORT, "tcp"),
                                            ("udp", "udp", UDP_PORT, "udp")):
                lines += ["[[listeners]]", f"name = {q(lname + sfx)}", f"mode = {q(mode)}",
                          f"bind = {q(_ep(vip, port))}", f"pool = {q(pool)}"]
                if mode == "udp":
                    lines.append('udp_flow_timeout = "30s"')
                lines += ["[listeners.timeouts]", 'connect = "1s"', ""]
        return "\n".join(lines).rstrip() + "\n"

    def write_configs(self, out_dir: Path, *, state_dir: str, pki_dir: str | None,
                      control_socket: str = "") -> dict[str, Path]:
        """Writes <out_dir>/<lb>.toml for every LB node; returns name -> path."""
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for h in self.lb_hosts:
            p = out_dir / f"{h.name}.toml"
            p.write_text(self.node_config(h.name, state_dir=state_dir, pki_dir=pki_dir,
                                          control_socket=control_socket))
            paths[h.name] = p
        return paths


_SOURCES6 = 0x128_0000  # <net6>::128:0, the first client's extra IPv6 sources


def _ep(host: str, port: int) -> str:
    """``host:port``, the host bracketed when it is an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:g}ms" if ms < 10_000 else f"{seconds:g}s"


DEFAULT = Topology()
ACTIVE_ACTIVE = Topology(mode="active-active")
DEFAULT6 = Topology(family=6)
