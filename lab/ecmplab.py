"""Scale-out behind ECMP: a router namespace running FRR and N halb nodes announcing a VIP over
BGP ([bgp]); what tests/lab/test_ecmp.py and ``python -m lab demo --mode ecmp`` run on.

    client LAN 198.19.80.0/24 (bridge in <p>csw)   fabric LAN 198.19.81.0/24 (bridge in <p>fsw)
      <p>cl  eth0 .2  clients                         <p>rt  eth1 .1   router: FRR zebra, bgpd
      <p>rt  eth0 .1  router --------------------->                    (AS 65000), bfdd
                                                      <p>n1..n4 eth0 .11-.14  halbd + FRR bgpd
                                                               (AS 65001), VIP on lo
                                                      <p>be1, <p>be2 eth0 .21, .22  lab.backend

The router accepts BGP from any address of the fabric LAN (``bgp listen range``, peer group
NODES, AS 65001) with BFD (100 ms x 3) and BGP timers 1/3 s, installs up to 8 equal paths
(``maximum-paths 8``) and hashes flows on addresses and ports
(``net.ipv4.fib_multipath_hash_policy = 1``, set in the router's namespace only). Each node
runs its own FRR (zebra, bfdd, bgpd; pathspace = its namespace name, so vtysh -N reaches the
right one) with ``no bgp network import-check`` (the VIP is on lo, not a route in its RIB);
halbd's [bgp] adds and removes ``network VIP/32``. Each node runs an HTTP listener on VIP:80
in front of the two backends (health-checked every 200 ms).

    with EcmpLab(Path("/tmp/x"), nodes=4) as lab:
        for n in lab.names: lab.start(n)
        lab.wait_paths(4)                     # the router's FIB has 4 next hops for the VIP
        lab.halbctl("n2", "drain-node")       # graceful leave
        lab.kill_node("n3")                   # halbd and its FRR killed with -9
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import netns as nx
from .lab import log_events

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
CLIENT, FABRIC = "198.19.80", "198.19.81"
VIP = "198.19.83.10"
ROUTER_AS, NODE_AS = 65000, 65001
HTTP_PORT, BE_HTTP = 80, 8080
NAT_PORT, BE_TCP = 9000, 7000  # the NAT listener (nat=True): a TCP echo on the backends
SYNC_PORT = 9400
BES = {"be1": 21, "be2": 22}
METRICS_PORT = 9100
FRR = Path("/usr/lib/frr")
FRR_RUN = Path("/var/run/frr")
BFD_MS = 100  # BFD transmit/receive interval; x 3 = detection time


def frr_router_config(hostname: str) -> str:
    return f"""frr defaults datacenter
hostname {hostname}
log stdout informational
!
bfd
 profile fast
  receive-interval {BFD_MS}
  transmit-interval {BFD_MS}
  detect-multiplier 3
!
router bgp {ROUTER_AS}
 bgp router-id {FABRIC}.1
 no bgp ebgp-requires-policy
 bgp bestpath as-path multipath-relax
 neighbor NODES peer-group
 neighbor NODES remote-as {NODE_AS}
 neighbor NODES bfd profile fast
 neighbor NODES timers 1 3
 neighbor NODES timers connect 1
 bgp listen range {FABRIC}.0/24 peer-group NODES
 address-family ipv4 unicast
  maximum-paths 8
 exit-address-family
!
"""


def frr_node_config(hostname: str, addr: str) -> str:
    return f"""frr defaults datacenter
hostname {hostname}
log stdout informational
!
bfd
 profile fast
  receive-interval {BFD_MS}
  transmit-interval {BFD_MS}
  detect-multiplier 3
!
router bgp {NODE_AS}
 bgp router-id {addr}
 no bgp ebgp-requires-policy
 no bgp network import-check
 neighbor {FABRIC}.1 remote-as {ROUTER_AS}
 neighbor {FABRIC}.1 bfd profile fast
 neighbor {FABRIC}.1 timers 1 3
 neighbor {FABRIC}.1 timers connect 1
!
"""


def node_config(name: str, *, ns: str, state_dir: str, addr: str, withdraw_wait: str,
                peers: dict[str, str] | None = None, prefix: str = "hg") -> str:
    def backends(port: int) -> str:
        return "".join(f"""
  [[pools.backends]]
  name = "{b}"
  address = "{FABRIC}.{h}:{port}"
""" for b, h in BES.items())
    nat = ""
    if peers is not None:  # the NAT listener, replicated over a full mesh of sync links
        mesh = "".join(f"""
  [[sync.peers]]
  name = "{p}"
  address = "{a}:{SYNC_PORT}"
""" for p, a in peers.items())
        nat = f"""
[[pools]]
name = "echo"
algorithm = "maglev"
  [pools.health]
  type = "tcp"
  interval = "200ms"
  timeout = "150ms"
  rise = 1
  fall = 2
{backends(BE_TCP)}
[[listeners]]
name = "echo"
mode = "nat"
protocol = "tcp"
bind = "{VIP}:{NAT_PORT}"
pool = "echo"
hash = "client_ip_port"

[nat]
table = "halb_{prefix}"
reconcile_interval = "5s"
entry_ttl = "60s"

[sync]
listen = "{addr}:{SYNC_PORT}"
insecure = true
{mesh}"""
    return f"""
[node]
name = "{name}"
state_dir = "{state_dir}"
save_tables = false

[control]
socket = "{state_dir}/{ns}.sock"

[metrics]
address = "{addr}:{METRICS_PORT}"

[access_log]
enabled = false

[[pools]]
name = "web"
algorithm = "maglev"
  [pools.health]
  type = "http"
  path = "/healthz"
  interval = "200ms"
  timeout = "150ms"
  rise = 1
  fall = 2
{backends(BE_HTTP)}
[[listeners]]
name = "web"
mode = "http"
bind = "{VIP}:{HTTP_PORT}"
pool = "web"

[bgp]
asn = {NODE_AS}
pathspace = "{ns}"
interval = "200ms"
withdraw_wait = "{withdraw_wait}"
{nat}"""


class EcmpLab:
    def __init__(self, tmp: Path, *, prefix: str = "hg", nodes: int = 4,
                 withdraw_wait: str = "1s", nat: bool = False):
        if not (FRR / "bgpd").exists():
            raise RuntimeError("FRR is not installed (apt-get install frr; ./dev test does)")
        self.tmp = Path(tmp)
        self.prefix = prefix
        self.withdraw_wait = withdraw_wait
        self.nat = nat
        self.names = [f"n{i}" for i in range(1, nodes + 1)]
        self.addr = {n: f"{FABRIC}.{10 + i}" for i, n in enumerate(self.names, 1)}
        self.ns = {n: f"{prefix}{n}" for n in self.names + list(BES) + ["cl", "rt"]}
        self.procs: list[subprocess.Popen] = []
        self.halbd: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._runs = 0
        self._dead: set[str] = set()
        nx.cleanup(prefix)
        self._frr_dirs: list[Path] = []
        self.clan = nx.Lan(f"{prefix}c", f"{CLIENT}.0/24")
        self.flan = None
        try:
            self.flan = nx.Lan(f"{prefix}f", f"{FABRIC}.0/24")
            rt = self.ns["rt"]
            self.clan.add_host(rt, f"{CLIENT}.1")
            self.flan.add_host(rt, f"{FABRIC}.1", ifname="eth1")
            nx.sysctl("net.ipv4.ip_forward", 1, ns=rt)
            nx.sysctl("net.ipv4.fib_multipath_hash_policy", 1, ns=rt)  # L4: ports too
            self.clan.add_host(self.ns["cl"], f"{CLIENT}.2")
            nx.add_route("0.0.0.0/0", f"{CLIENT}.1", ns=self.ns["cl"])
            for n in self.names:
                ns = self.ns[n]
                self.flan.add_host(ns, self.addr[n])
                nx.add_route("0.0.0.0/0", f"{FABRIC}.1", ns=ns)
                nx.add_addr("lo", f"{VIP}/32", ns=ns)
                if nat:
                    nx.sysctl("net.ipv4.ip_forward", 1, ns=ns)
                    _conntrack_strict(ns)
            for b, h in BES.items():
                self.flan.add_host(self.ns[b], f"{FABRIC}.{h}")
                extra = ["--tcp", f"{FABRIC}.{h}:{BE_TCP}"] if nat else []
                self.spawn(self.ns[b], [PY, "-m", "lab.backend", "--name", b,
                                        "--http", f"{FABRIC}.{h}:{BE_HTTP}", *extra],
                           f"backend-{b}")
                if nat:
                    self._return_to_sender(self.ns[b])
            self.start_frr("rt", frr_router_config(rt))
        except Exception:
            self.close()
            raise

    def _return_to_sender(self, ns: str) -> None:
        """A NAT listener's backend behind ECMP answers through the node that forwarded the
        connection's last packet (DNAT only: only a node with the connection's conntrack entry
        can undo it). nftables marks the connection with the forwarding node's MAC address on
        every packet from the client side, and replies are routed by that mark to that node:
        when ECMP moves a flow to another node (which has the replicated entry), the replies
        follow at its first packet."""
        macs = {}
        for n in self.names:
            link = json.loads(nx.run_in(self.ns[n], ["ip", "-j", "link", "show", "eth0"]).stdout)
            macs[n] = link[0]["address"]
        elems = ", ".join(f"{macs[n]} : {i}" for i, n in enumerate(self.names, 1))
        rules = f"""table ip halb_ret {{
 map node {{ type ether_addr : mark; elements = {{ {elems} }} }}
 chain pre {{ type filter hook prerouting priority mangle; policy accept;
  ct direction original ct mark set ether saddr map @node
 }}
 chain out {{ type route hook output priority mangle; policy accept;
  ct direction reply meta mark set ct mark
 }}
}}
"""
        nx.run_in(ns, ["nft", "-f", "-"], input=rules)
        for i, n in enumerate(self.names, 1):
            nx.run_in(ns, ["ip", "rule", "add", "fwmark", str(i), "table", str(100 + i)])
            nx.run_in(ns, ["ip", "route", "add", "default", "via", self.addr[n],
                           "table", str(100 + i)])
        nx.add_route("0.0.0.0/0", self.addr[self.names[0]], ns=ns)

    # -- processes -----------------------------------------------------------------------------

    def spawn(self, ns: str, argv: list[str], tag: str) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"{tag}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        p = subprocess.Popen(["ip", "netns", "exec", ns] + argv, stdout=open(log, "ab"),
                             stderr=subprocess.STDOUT, cwd=str(ROOT), env=env,
                             start_new_session=True)
        self.procs.append(p)
        return p, log

    def start_frr(self, who: str, conf: str) -> None:
        """zebra, bfdd and bgpd in ``who``'s namespace, pathspace = the namespace's name (their
        vty sockets in /var/run/frr/<ns>/, which ``vtysh -N <ns>`` reaches)."""
        ns = self.ns[who]
        run = FRR_RUN / ns
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        shutil.chown(run, "frr", "frr")
        self._frr_dirs.append(run)
        cfg = run / "frr.conf"  # readable by the daemons (they drop to user frr)
        cfg.write_text(conf)
        shutil.chown(cfg, "frr", "frr")
        for d in ("zebra", "bfdd", "bgpd"):  # in order, each up before the next (watchfrr's)
            # not daemonized: each stays this lab's child (killed by close), logging to a file
            self.spawn(ns, [str(FRR / d), "-N", ns, "-f", str(cfg), "-i", str(run / f"{d}.pid"),
                            "--log", "stdout"], f"frr-{who}-{d}")
            self.wait(lambda: (run / f"{d}.vty").exists() and
                      (d != "zebra" or (run / "zserv.api").exists()), 10, f"FRR {d} up in {ns}")

    def start(self, name: str) -> subprocess.Popen:
        """The node's FRR (if not running) and its halbd. A node killed before comes back
        like a rebooted machine: its link up, its conntrack table empty."""
        if name in self._dead:
            self._dead.discard(name)
            nx.run_in(self.ns[name], ["conntrack", "-F"], check=False)
            nx.link_up(self.flan.port_of(self.ns[name]), ns=self.flan.bridge_ns)
        if not (FRR_RUN / self.ns[name] / "bgpd.vty").exists():
            self.start_frr(name, frr_node_config(self.ns[name], self.addr[name]))
        self._runs += 1
        cfg = self.tmp / f"{name}.toml"
        peers = {n: a for n, a in self.addr.items() if n != name} if self.nat else None
        cfg.write_text(node_config(name, ns=self.ns[name], state_dir=str(self.tmp),
                                   addr=self.addr[name], withdraw_wait=self.withdraw_wait,
                                   peers=peers, prefix=self.prefix))
        p, log = self.spawn(self.ns[name], [PY, "-m", "halb.cli.halbd", str(cfg)],
                            f"{name}-{self._runs}")
        self.halbd[name], self.logs[name] = p, log
        return p

    def kill_node(self, name: str) -> None:
        """The node dies: off the network at once (its port on the fabric bridge down: no FIN,
        no BGP notification gets out, so the router notices by BFD alone), then halbd and its
        FRR daemons killed with -9."""
        ns = self.ns[name]
        nx.link_down(self.flan.port_of(ns), ns=self.flan.bridge_ns)
        self._dead.add(name)
        for pid in nx.ns_pids(ns):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p = self.halbd.get(name)
        if p is not None:
            p.wait(5)
        for d in ("zebra", "bfdd", "bgpd"):
            for f in (FRR_RUN / ns).glob(f"{d}.*"):
                f.unlink(missing_ok=True)

    def stop(self, name: str, timeout: float = 20.0) -> None:
        """SIGTERM to halbd: it withdraws, waits withdraw_wait, then stops."""
        p = self.halbd[name]
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            p.wait(timeout)

    def events(self, name: str, event: str) -> list[dict]:
        try:
            return log_events(self.logs[name].read_text(errors="replace"), event)
        except (OSError, KeyError):
            return []

    # -- looking ---------------------------------------------------------------------------------

    def vtysh(self, who: str, *cmds: str) -> str:
        ns = self.ns[who]
        argv = ["vtysh", "-N", ns]
        for c in cmds:
            argv += ["-c", c]
        return nx.run_in(ns, argv, check=False, timeout=15).stdout

    def fib_paths(self) -> list[str]:
        """The next hops of the VIP's route in the router's kernel FIB."""
        out = nx.run_in(self.ns["rt"], ["ip", "-j", "route", "show", f"{VIP}/32"],
                        check=False).stdout
        try:
            routes = json.loads(out or "[]")
        except ValueError:
            return []
        hops: list[str] = []
        for r in routes:
            if "gateway" in r:
                hops.append(r["gateway"])
            for nh in r.get("nexthops", []) or []:
                if "gateway" in nh:
                    hops.append(nh["gateway"])
            if "nhid" in r and not hops:
                hops += self._nhg(r["nhid"])
        return sorted(hops)

    def _nhg(self, nhid: int) -> list[str]:
        out = nx.run_in(self.ns["rt"], ["ip", "-j", "nexthop", "show", "id", str(nhid)],
                        check=False).stdout
        try:
            nh = json.loads(out or "[]")
        except ValueError:
            return []
        hops = []
        for x in nh:
            if "gateway" in x:
                hops.append(x["gateway"])
            for g in x.get("group", []) or []:
                hops += self._nhg(g["id"])
        return hops

    def nodes_in_fib(self) -> list[str]:
        by_addr = {a: n for n, a in self.addr.items()}
        return sorted(by_addr.get(h, h) for h in self.fib_paths())

    def wait_paths(self, names: list[str], timeout: float = 30.0) -> float:
        """Waits until the router's FIB sends the VIP to exactly these nodes; the seconds it took."""
        t0 = time.monotonic()
        want = sorted(names)
        self.wait(lambda: self.nodes_in_fib() == want, timeout,
                  f"the router's FIB to hold {want} (has {self.nodes_in_fib()})")
        return time.monotonic() - t0

    def halbctl(self, name: str, *args: str, timeout: float = 60.0) -> str:
        return nx.run_in(self.ns[name], [PY, "-m", "halb.cli.halbctl", "--socket",
                                         f"{self.tmp}/{self.ns[name]}.sock", *args],
                         timeout=timeout).stdout

    def status(self, name: str) -> dict:
        return json.loads(self.halbctl(name, "status", "--json"))

    def metrics(self, name: str) -> dict[str, float]:
        url = f"http://{self.addr[name]}:{METRICS_PORT}/metrics"
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

    @staticmethod
    def wait(cond, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = cond()
            if v:
                return v
            time.sleep(0.05)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    def natprobe(self, *, conns: int, seconds: float, interval: float = 0.5,
                 gap_ms: float = 150.0):
        """lab.natprobe: ``conns`` long-lived TCP connections through the NAT listener, each
        echoing every ``interval``; returns (process, output path)."""
        out = self.tmp / f"natprobe-{len(self.procs)}.json"
        p, _ = self.spawn(self.ns["cl"], [PY, "-m", "lab.natprobe", "--tcp", f"{VIP}:{NAT_PORT}",
                                          "--tcp-conns", str(conns), "--udp", "",
                                          "--interval", str(interval), "--seconds", str(seconds),
                                          "--reply-timeout", "5", "--gap-ms", str(gap_ms),
                                          "--out", str(out)],
                          f"natprobe-{len(self.procs)}")
        return p, out

    def nat_origins(self, name: str) -> dict[str, str]:
        """The node's nat table: client -> the node the connection started on (its origin)."""
        out = json.loads(self.halbctl(name, "tables", "nat", "--json", "--limit", "1000"))
        return {e["client"]: e["origin"] for e in out["nat"]["entries"]}

    def flows_through(self, name: str) -> int:
        """Connections of the NAT listener that this node's kernel forwarded packets of
        (conntrack accounting: an injected copy no packet went through counts 0)."""
        out = nx.run_in(self.ns[name], ["conntrack", "-L", "-p", "tcp", "-d", VIP,
                                        "--dport", str(NAT_PORT)], check=False).stdout
        n = 0
        for line in out.splitlines():
            pk = line.split("packets=", 1)
            if len(pk) == 2 and int(pk[1].split()[0]) > 0:
                n += 1
        return n

    def probe(self, *, seconds: float, interval: float = 0.01, timeout: float = 2.0):
        """lab.probe's new-connection probes (one GET per connection) from the client."""
        out = self.tmp / f"probe-{len(self.procs)}.jsonl"
        p, _ = self.spawn(self.ns["cl"], [PY, "-m", "lab.probe", "--target", f"{VIP}:{HTTP_PORT}",
                                          "--seconds", str(seconds), "--interval", str(interval),
                                          "--timeout", str(timeout), "--out", str(out)],
                          f"probe-{len(self.procs)}")
        return p, out

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
        if self.flan is not None:
            self.flan.close()
        self.clan.close()
        nx.cleanup(self.prefix)
        for d in self._frr_dirs:
            shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> "EcmpLab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _conntrack_strict(ns: str) -> None:
    """As lab.natlab: strict TCP tracking (a mid-stream packet without an entry is invalid,
    so a moved flow lives only by its replicated entry), liberal inside a known connection."""
    nx.run_in(ns, ["nft", "add table ip halb_probe; add chain ip halb_probe c; "
                          "add rule ip halb_probe c ct state new; delete table ip halb_probe"])
    nx.sysctl("net.netfilter.nf_conntrack_tcp_loose", 0, ns=ns)
    nx.sysctl("net.netfilter.nf_conntrack_tcp_be_liberal", 1, ns=ns)
    nx.sysctl("net.netfilter.nf_conntrack_acct", 1, ns=ns)  # flows_through() reads counters


def read_probes(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out

