"""A two-node kernel NAT lab in network namespaces: what the NAT tests, the demo and the chaos
scenarios run on.

    front LAN 198.18.44.0/24 (bridge in <p>fsw)      back LAN 198.18.45.0/24 (bridge in <p>bsw)
      <p>cl   eth0 .2    client (lab.natprobe)          <p>be1 eth0 .21  lab.backend be1
      <p>lb1  eth0 .11 ---------- halbd ---------- eth1 .11  <p>lb1
      <p>lb2  eth0 .12 ---------- halbd ---------- eth1 .12  <p>lb2
      VIP 198.18.44.100 (front)                      gateway VIP 198.18.45.1 (back, excluded_vips)
                                                     <p>be2 eth0 .22  lab.backend be2

Both VIPs belong to one VRRP instance, so they move together; the backends' default route is
the back VIP, so replies return through whichever node holds it (LVS-NAT's "gateway" mode:
no SNAT, the backends see the client's address). NAT listeners: ``www`` TCP VIP:80 -> :7000
(hashing the client's address and port, so the one client's connections spread over both
backends) and ``dns`` UDP VIP:53 -> :7053 on both backends, Maglev pools with TCP health checks. The LB
namespaces forward (``net.ipv4.ip_forward = 1``, set in those namespaces only) and track TCP
strictly (``nf_conntrack_tcp_loose = 0``: a mid-stream packet without a conntrack entry is
invalid, as in a hardened firewall), so a takeover without replicated entries resets the
connections instead of letting the hash pick them up again by luck; and liberally inside a
known connection (``nf_conntrack_tcp_be_liberal = 1``, what the README asks of NAT nodes): a
node that held a connection before, lost it to its peer and takes it back has an entry whose
TCP window is out of date.

IPv6 (``NatLab(tmp, family=6)``, tests/lab/test_nat6.py): the same LANs carry 2001:2:0:44::/64
and 2001:2:0:45::/64 as well (every address ``nodad``); the NAT listeners bind the IPv6 VIP
2001:2:0:44::100 with IPv6 backends, whose default route is the back gateway 2001:2:0:45::1.
IPv4 stays for sync, control and metrics. The VRRP instance is then an IPv6 one (VRRPv3 over
IPv6, vrid 44): the virtual link-local address fe80::2c first, the VIP, and the back gateway
in ``excluded_vips``, moved together and announced by unsolicited Neighbor Advertisements.

    with NatLab(Path("/tmp/x")) as lab:
        lab.start("lb1"); lab.start("lb2"); lab.wait_master("lb1")
        probe = lab.probe(seconds=10)        # lab.natprobe in the client namespace
        lab.kill("lb1")                       # or lab.cut("lb1") / lab.heal("lb1")
        results = probe.results()
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import netns as nx
from .lab import log_events

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
FRONT, BACK = "198.18.44", "198.18.45"
VIP, GW = f"{FRONT}.100", f"{BACK}.1"
TCP_PORT, UDP_PORT = 80, 53
BE_TCP, BE_UDP = 7000, 7053
BULK_PORT = 5201  # iperf3: a NAT listener VIP:5201 -> iperf3 servers on the backends
LBS = {"lb1": 11, "lb2": 12}
BES = {"be1": 21, "be2": 22}
SYNC_PORT = 9400
METRICS_PORT = 9100
FRONT6, BACK6 = "2001:2:0:44", "2001:2:0:45"
VIP6, GW6 = f"{FRONT6}::100", f"{BACK6}::1"
VRID = 44
LL6 = f"fe80::{VRID:x}"  # the IPv6 instance's virtual link-local address (RFC 9568)


def node_config(name: str, *, prefix: str, state_dir: str, priority: int, interval: str,
                replicate: bool = True, preempt: bool = False, extra: str = "",
                nat_options: str = "", family: int = 4) -> str:
    me = LBS[name]
    peer = next(n for n in LBS if n != name)
    v6 = family == 6
    backends = "".join(f"""
  [[pools.backends]]
  name = "{b}"
  address = "{f'[{BACK6}::{h}]' if v6 else f'{BACK}.{h}'}:{{port}}"
""" for b, h in BES.items())
    vip = f"[{VIP6}]" if v6 else VIP
    bulk = "" if v6 else f"""[[pools]]
name = "bulk"
algorithm = "maglev"
{backends.format(port=BULK_PORT)}
[[listeners]]
name = "bulk"
mode = "nat"
protocol = "tcp"
bind = "{VIP}:{BULK_PORT}"
pool = "bulk"
"""
    # IPv6: an instance of its own (VRRPv3 over IPv6), the virtual link-local address first
    vips = f'"{LL6}/64", "{VIP6}/64"' if v6 else f'"{VIP}/24"'
    gw = f"{GW6}/64" if v6 else f"{GW}/24"
    vrrp = f"""[[vrrp]]
name = "{'front6' if v6 else 'front'}"
interface = "eth0"
vrid = {VRID}
priority = {priority}
vips = [{vips}]
excluded_vips = ["{gw} dev eth1"]
advert_interval = "{interval}"
preempt = {"true" if preempt else "false"}
checksum = "rfc9568"
"""
    return f"""
[node]
name = "{name}"
state_dir = "{state_dir}"

[control]
socket = "{state_dir}/{prefix}-{name}.sock"

[metrics]
address = "{FRONT}.{me}:{METRICS_PORT}"

[[pools]]
name = "tcp"
algorithm = "maglev"
  [pools.health]
  type = "tcp"
  interval = "200ms"
  timeout = "150ms"
  rise = 1
  fall = 2
{backends.format(port=BE_TCP)}
[[pools]]
name = "udp"
algorithm = "maglev"
  [pools.health]
  type = "tcp"
  port = {BE_TCP}
  interval = "200ms"
  timeout = "150ms"
  rise = 1
  fall = 2
{backends.format(port=BE_UDP)}
{bulk}
{extra}
[[listeners]]
name = "www"
mode = "nat"
protocol = "tcp"
bind = "{vip}:{TCP_PORT}"
pool = "tcp"
hash = "client_ip_port"  # one client address, many connections: spread them

[[listeners]]
name = "dns"
mode = "nat"
protocol = "udp"
bind = "{vip}:{UDP_PORT}"
pool = "udp"

[nat]
table = "halb_{prefix}"
replicate = {"true" if replicate else "false"}
{nat_options}

{vrrp}
[sync]
listen = "{FRONT}.{me}:{SYNC_PORT}"
insecure = true
  [[sync.peers]]
  name = "{peer}"
  address = "{FRONT}.{LBS[peer]}:{SYNC_PORT}"
"""


class Node:
    def __init__(self, name: str, ns: str, proc: subprocess.Popen, log: Path):
        self.name, self.ns, self.proc, self.log = name, ns, proc, log

    def alive(self) -> bool:
        return self.proc.poll() is None

    def events(self, event: str) -> list[dict]:
        try:
            return log_events(self.log.read_text(errors="replace"), event)
        except OSError:
            return []

    def state(self) -> str:
        st = self.events("vrrp_state")
        return st[-1]["new"] if st else "init"


class Probe:
    def __init__(self, lab: "NatLab", out: Path, proc: subprocess.Popen, key: str | None = "conns"):
        self.lab, self.out, self.proc, self.key = lab, out, proc, key

    def results(self, timeout: float = 60.0):
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        data = json.loads(self.out.read_text())
        return data[self.key] if self.key else data


class NatLab:
    def __init__(self, tmp: Path, *, prefix: str = "hn", interval: str = "50ms",
                 replicate: bool = True, extra_config: str = "", nat_options: str = "",
                 family: int = 4):
        self.tmp = Path(tmp)
        self.family = family
        self.vip = VIP6 if family == 6 else VIP
        self.prefix = prefix
        self.interval = interval
        self.replicate = replicate
        self.extra_config = extra_config  # more pools and listeners (TOML) for every node
        self.nat_options = nat_options  # more keys of [nat]
        self.nodes: dict[str, Node] = {}
        self.procs: list[subprocess.Popen] = []
        self._runs = 0
        nx.cleanup(prefix)
        self.front = nx.Lan(f"{prefix}f", f"{FRONT}.0/24")
        self.back = None
        try:
            self.back = nx.Lan(f"{prefix}b", f"{BACK}.0/24")
            self.ns = {n: f"{prefix}{n}" for n in list(LBS) + list(BES) + ["cl"]}
            self.front.add_host(self.ns["cl"], f"{FRONT}.2")
            for n, h in LBS.items():
                self.front.add_host(self.ns[n], f"{FRONT}.{h}")
                self.back.add_host(self.ns[n], f"{BACK}.{h}", ifname="eth1")
                nx.sysctl("net.ipv4.ip_forward", 1, ns=self.ns[n])
                self._conntrack_strict(self.ns[n])
            for n, h in BES.items():
                self.back.add_host(self.ns[n], f"{BACK}.{h}")
                nx.add_route("0.0.0.0/0", GW, ns=self.ns[n])
            if family == 6:
                self._ipv6()
            for n, h in BES.items():
                a = f"[{BACK6}::{h}]" if family == 6 else f"{BACK}.{h}"
                self.spawn(self.ns[n], [PY, "-m", "lab.backend", "--name", n,
                                        "--tcp", f"{a}:{BE_TCP}",
                                        "--udp", f"{a}:{BE_UDP}"], f"backend-{n}")
        except Exception:
            self.close()
            raise

    def _ipv6(self) -> None:
        """The IPv6 half of a dual-stack lab: addresses (nodad: no DAD delay), the backends'
        default route via the back gateway VIP, forwarding in the LB namespaces only."""
        def add(ns, dev, addr):
            nx.run_in(ns, ["ip", "-6", "addr", "add", addr, "dev", dev, "nodad"])
        add(self.ns["cl"], "eth0", f"{FRONT6}::2/64")
        for n, h in LBS.items():
            add(self.ns[n], "eth0", f"{FRONT6}::{h}/64")
            add(self.ns[n], "eth1", f"{BACK6}::{h}/64")
            nx.sysctl("net.ipv6.conf.all.forwarding", 1, ns=self.ns[n])
        for n, h in BES.items():
            add(self.ns[n], "eth0", f"{BACK6}::{h}/64")
            nx.run_in(self.ns[n], ["ip", "-6", "route", "add", "default", "via", GW6])

    @staticmethod
    def _conntrack_strict(ns: str) -> None:
        # the sysctl exists once nf_conntrack is loaded; a rule using ct loads it in this netns
        nx.run_in(ns, ["nft", "add table ip halb_probe; add chain ip halb_probe c; "
                              "add rule ip halb_probe c ct state new; delete table ip halb_probe"])
        nx.sysctl("net.netfilter.nf_conntrack_tcp_loose", 0, ns=ns)
        nx.sysctl("net.netfilter.nf_conntrack_tcp_be_liberal", 1, ns=ns)
        nx.sysctl("net.netfilter.nf_conntrack_acct", 1, ns=ns)  # [nat] replicate_after_packets

    def spawn(self, ns: str, argv: list[str], tag: str) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"{tag}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        p = subprocess.Popen(["ip", "netns", "exec", ns] + argv, stdout=open(log, "ab"),
                             stderr=subprocess.STDOUT, cwd=str(ROOT), env=env,
                             start_new_session=True)
        self.procs.append(p)
        return p, log

    # -- nodes -------------------------------------------------------------------------------

    def start(self, name: str, *, priority: int | None = None) -> Node:
        self._runs += 1
        prio = priority if priority is not None else (200 if name == "lb1" else 100)
        cfg = self.tmp / f"{name}.toml"
        cfg.write_text(node_config(name, prefix=self.prefix, state_dir=str(self.tmp),
                                   priority=prio, interval=self.interval,
                                   replicate=self.replicate, extra=self.extra_config,
                                   nat_options=self.nat_options, family=self.family))
        argv = [PY, "-m", "halb.cli.halbd", str(cfg)]
        p, log = self.spawn(self.ns[name], argv, f"{name}-{self._runs}")
        node = Node(name, self.ns[name], p, log)
        self.nodes[name] = node
        return node

    def kill(self, name: str) -> None:
        p = self.nodes[name].proc
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def stop(self, name: str, *, wait: bool = True, timeout: float = 10.0) -> None:
        """SIGTERM to the node's halbd (a handover: it gives the VIPs up and tells its peer
        with a priority 0 advert, then stops its other parts) and (``wait``) wait for it to
        exit."""
        p = self.nodes[name].proc
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            if wait:
                p.wait(timeout)

    def cut(self, name: str) -> None:
        """Both of the node's links down at the bridges: a cable cut (the node lives on)."""
        nx.link_down(self.front.port_of(self.ns[name]), ns=self.front.bridge_ns)
        nx.link_down(self.back.port_of(self.ns[name]), ns=self.back.bridge_ns)

    def heal(self, name: str) -> None:
        nx.link_up(self.front.port_of(self.ns[name]), ns=self.front.bridge_ns)
        nx.link_up(self.back.port_of(self.ns[name]), ns=self.back.bridge_ns)

    def freeze(self, name: str, on: bool = True) -> None:
        """SIGSTOP (or SIGCONT) the node's halbd: a hung process whose kernel goes on."""
        p = self.nodes[name].proc
        if p.poll() is None:
            os.kill(p.pid, signal.SIGSTOP if on else signal.SIGCONT)

    def partition(self, on: bool) -> None:
        """Drops every frame between the two LB nodes on both LANs (bridge-family nftables in
        the switch namespaces); clients and backends still reach both."""
        for lan in (self.front, self.back):
            a, b = (lan.port_of(self.ns[n]) for n in LBS)
            if on:
                rules = (f"table bridge halb_part {{\n chain cut {{\n"
                         f"  type filter hook forward priority 0; policy accept;\n"
                         f"  iifname \"{a}\" oifname \"{b}\" drop\n"
                         f"  iifname \"{b}\" oifname \"{a}\" drop\n }}\n}}\n")
                nx.run_in(lan.bridge_ns, ["nft", "-f", "-"], input=rules)
            else:
                nx.run_in(lan.bridge_ns, ["nft", "delete", "table", "bridge", "halb_part"])

    def holders(self) -> list[str]:
        out = []
        for n in LBS:
            try:
                if self.vip in nx.addresses("eth0", ns=self.ns[n]):
                    out.append(n)
            except Exception:  # noqa: BLE001 - the namespace may be going away
                pass
        return out

    def master(self) -> str | None:
        ms = [n for n, node in self.nodes.items() if node.alive() and node.state() == "master"]
        return ms[0] if len(ms) == 1 else None

    def wait(self, cond, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = cond()
            if v:
                return v
            time.sleep(0.02)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    def wait_state(self, name: str, state: str, timeout: float = 15.0) -> None:
        node = self.nodes[name]

        def ok():
            if not node.alive():
                raise AssertionError(f"halbd {name} exited:\n{node.log.read_text()[-3000:]}")
            return node.state() == state
        self.wait(ok, timeout, f"{name} {state}")

    def wait_synced(self, name: str, timeout: float = 15.0) -> None:
        """The node's follower link to its peer is up and has learned the tables."""
        node = self.nodes[name]
        self.wait(lambda: node.events("sync_learned"), timeout, f"{name} learned the tables")

    def nat_entries(self, name: str) -> int:
        """halbctl tables nat --json on a node: entries in its nat table."""
        out = self.halbctl(name, "tables", "nat", "--json", "--limit", "100000")
        return json.loads(out)["nat"]["total"]

    def halbctl(self, name: str, *args: str) -> str:
        """halbctl ARGS against the node's control socket, run in its namespace."""
        return nx.run_in(self.ns[name], [PY, "-m", "halb.cli.halbctl", "--socket",
                                         f"{self.tmp}/{self.prefix}-{name}.sock", *args],
                         timeout=30).stdout

    def metrics(self, name: str) -> dict[str, float]:
        """The node's Prometheus samples ``name{labels}`` -> value (fetched in its namespace)."""
        url = f"http://{FRONT}.{LBS[name]}:{METRICS_PORT}/metrics"
        r = nx.run_in(self.ns[name], [PY, "-c", "import sys, urllib.request; sys.stdout.write("
                                      f"urllib.request.urlopen({url!r}, timeout=5).read().decode())"],
                      timeout=30)
        out = {}
        for line in r.stdout.splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                try:
                    out[k] = float(v)
                except ValueError:
                    pass
        return out

    def conntrack(self, name: str) -> str:
        fam = ["-f", "ipv6"] if self.family == 6 else []
        return nx.run_in(self.ns[name], ["conntrack", "-L", *fam, "-d", self.vip],
                         check=False).stdout

    # -- clients -----------------------------------------------------------------------------

    def iperf_servers(self) -> None:
        for n, h in BES.items():
            self.spawn(self.ns[n], ["iperf3", "-s", "-B", f"{BACK}.{h}", "-p", str(BULK_PORT)],
                       f"iperf3-{n}")

    def iperf(self, *, seconds: float, interval: float = 0.25) -> "Probe":
        """iperf3 from the client through the bulk NAT listener; ``results()`` is its JSON."""
        out = self.tmp / f"iperf-{len(self.procs)}.json"
        p, _ = self.spawn(self.ns["cl"], ["sh", "-c", f"exec iperf3 -c {VIP} -p {BULK_PORT} "
                                          f"-t {seconds} -i {interval} -J --connect-timeout 3000 "
                                          f"> {out}"], f"iperf-{len(self.procs)}")
        return Probe(self, out, p, key=None)

    def probe(self, *, seconds: float, tcp_conns: int = 50, udp_flows: int = 16,
              interval: float = 0.05) -> Probe:
        out = self.tmp / f"probe-{len(self.procs)}.json"
        vip = f"[{VIP6}]" if self.family == 6 else VIP
        p, _ = self.spawn(self.ns["cl"], [PY, "-m", "lab.natprobe", "--tcp", f"{vip}:{TCP_PORT}",
                                          "--tcp-conns", str(tcp_conns), "--udp",
                                          f"{vip}:{UDP_PORT}", "--udp-flows", str(udp_flows),
                                          "--interval", str(interval), "--seconds", str(seconds),
                                          "--out", str(out)], f"probe-{len(self.procs)}")
        return Probe(self, out, p)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self.back is not None:
            self.back.close()
        self.front.close()
        nx.cleanup(self.prefix)

    def __enter__(self) -> "NatLab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

# What a client sees when the master is cut off (no closed sync stream, no RST): the VRRP
# timers (3 x 50 ms + skew) and then the client's TCP retransmission timer (200 ms minimum)
CUT_MEDIAN_GAP_MS = 450.0
