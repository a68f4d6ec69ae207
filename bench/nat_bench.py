"""The kernel NAT mode side by side with the direct path and HAProxy, in one topology, one run:

    python bench/nat_bench.py [--duration 8] [--rounds 3] [--conns 64]

Topology: ``lab.natlab`` (prefix ``hb``): client -- front LAN -- lb1 (and its standby lb2,
replication on) -- back LAN -- two backends, each running nginx (``worker_processes 1``, a
small answer) and an iperf3 server. Three paths from the same client to the same backends:

- **nat**: halb's NAT listeners on the VIP (kernel DNAT on lb1, conntrack events read by lb1's
  halbd and replicated to lb2, which writes them into its kernel);
- **direct**: the client addresses backend 1 itself, routed through lb1 (the same forwarding,
  no NAT, no conntrack replication): the ceiling;
- **haproxy**: HAProxy (``nbthread 1``, ``mode tcp``, ``option splice-auto``, round robin),
  as its users configure it for L4, on lb1's own address.

Measured per path, median of ``--rounds`` alternating runs:
- Gbit/s of one iperf3 TCP stream (``-t duration``), and the whole machine's CPU seconds per GB
  (every process and the kernel's softirq work are on the same two cores, so the machine-wide
  figure is the honest one for kernel forwarding);
- new connections/s: wrk ``-c conns`` with ``Connection: close`` (one client connection and,
  through HAProxy, one backend connection per request), the machine's CPU microseconds per
  connection, and for nat the replication's own cost (lb1's and lb2's halbd CPU per
  connection) and whether it kept up: conntrack events lost (ENOBUFS) on lb1 and entries
  injected on lb2 against connections made.

Results: ``bench/out/nat-latest.json`` and ``.md``; the ratios nat/direct and nat/HAProxy are
printed. Every loop is bounded; the lab is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.__main__ import NGINX_CONF, busy_elsewhere, cpu_seconds, parse_wrk  # noqa: E402
from lab import netns as nx  # noqa: E402
from lab import natlab  # noqa: E402
from lab.natlab import BACK, BES, FRONT, LBS, VIP, NatLab  # noqa: E402

OUT = ROOT / "bench" / "out"
WEB_PORT = 8080  # nginx on the backends; the NAT listener VIP:8080
HAP_WEB, HAP_BULK = 8081, 5202  # HAProxy on lb1's front address
BULK = natlab.BULK_PORT

EXTRA = f"""
[[pools]]
name = "web"
algorithm = "maglev"
""" + "".join(f"""  [[pools.backends]]
  name = "{b}"
  address = "{BACK}.{h}:{WEB_PORT}"
""" for b, h in BES.items()) + f"""
[[listeners]]
name = "web"
mode = "nat"
protocol = "tcp"
bind = "{VIP}:{WEB_PORT}"
pool = "web"
hash = "client_ip_port"
"""

HAPROXY = """
global
    nbthread 1
    maxconn 7000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe_web
    bind {lb}:{web}
    default_backend be_web
backend be_web
    balance roundrobin
{web_servers}
frontend fe_bulk
    bind {lb}:{bulk}
    option splice-auto
    default_backend be_bulk
backend be_bulk
    option splice-auto
    server b1 {be1}:{bulk_be}
"""


def log(msg: str) -> None:
    print(f"[nat-bench] {msg}", file=sys.stderr, flush=True)


class MachineCpu:
    """Busy CPU seconds of the whole machine (all cores, user + system + softirq + ...)."""

    def __init__(self):
        self.t0 = self._busy()

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")

    def seconds(self) -> float:
        return self._busy() - self.t0


def in_ns(lab: NatLab, who: str, argv: list[str], timeout: float) -> str:
    r = nx.run_in(lab.ns[who], argv, timeout=timeout, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} in {who} failed ({r.returncode}): {r.stderr[-400:]}")
    return r.stdout


def iperf(lab: NatLab, host: str, port: int, duration: int) -> dict:
    cpu = MachineCpu()
    out = in_ns(lab, "cl", ["iperf3", "-c", host, "-p", str(port), "-t", str(duration), "-J"],
                duration + 30)
    secs = cpu.seconds()
    end = json.loads(out)["end"]["sum_received"]
    return {"gbps": end["bits_per_second"] / 1e9, "bytes": end["bytes"],
            "machine_cpu_s_per_gb": secs / (end["bytes"] / 1e9)}


def wrk_close(lab: NatLab, url: str, duration: int, conns: int, pids: dict[str, int]) -> dict:
    cpu = MachineCpu()
    c0 = {k: cpu_seconds(p) for k, p in pids.items()}
    out = in_ns(lab, "cl", ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "-H",
                            "Connection: close", url], duration + 60)
    secs = cpu.seconds()
    r = parse_wrk(out)
    n = r["requests"] or 1
    r["machine_cpu_us_per_conn"] = secs * 1e6 / n
    for k, p in pids.items():
        r[f"{k}_cpu_us_per_conn"] = (cpu_seconds(p) - c0[k]) * 1e6 / n
    return r


def halbd_pid(lab: NatLab, name: str) -> int:
    """The halbd process inside ``ip netns exec`` (the Popen is the exec'd process itself)."""
    return lab.nodes[name].proc.pid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--after", type=int, default=8,
                    help="also measure new connections/s with [nat] replicate_after_packets = "
                         "AFTER (0: skip)")
    ap.add_argument("--haproxy", default=shutil.which("haproxy") or "haproxy",
                    help="the haproxy binary (e.g. ../shared/tools/haproxy-3.5)")
    a = ap.parse_args(argv)
    if not 1 <= a.duration <= 120 or not 1 <= a.rounds <= 10:
        ap.error("--duration 1..120, --rounds 1..10")
    for tool in ("wrk", "iperf3", "nginx"):
        if not shutil.which(tool):
            ap.error(f"{tool} is not installed (./dev bench installs it)")
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="halb-nat-bench-"))
    try:
        return _run(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(a, tmp: Path) -> int:
    log(f"machine busy before the run: {busy_elsewhere(1.0):.2f} cores; lab in {tmp}")
    res: dict = {"args": vars(a), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "runs": {"gbps": {}, "conns": {}}}
    with NatLab(tmp, prefix="hb", extra_config=EXTRA) as lab:
        lb1 = f"{FRONT}.{LBS['lb1']}"
        be = {b: f"{BACK}.{h}" for b, h in BES.items()}
        for b, addr in be.items():
            conf = tmp / f"nginx-{b}.conf"
            conf.write_text(NGINX_CONF.format(dir=tmp, name=b, port=WEB_PORT)
                            .replace("listen 127.0.0.1:", f"listen {addr}:"))
            lab.spawn(lab.ns[b], ["nginx", "-c", str(conf)], f"nginx-{b}")
        lab.iperf_servers()
        hap = tmp / "haproxy.cfg"
        hap.write_text(HAPROXY.format(
            lb=lb1, web=HAP_WEB, bulk=HAP_BULK, be1=be["be1"], bulk_be=BULK,
            web_servers="\n".join(f"    server {b} {addr}:{WEB_PORT}" for b, addr in be.items())))
        hp, _ = lab.spawn(lab.ns["lb1"], [a.haproxy, "-f", str(hap), "-db"], "haproxy")
        # the direct path: the client reaches the back LAN through lb1
        nx.add_route(f"{BACK}.0/24", lb1, ns=lab.ns["cl"])
        lab.start("lb1")
        lab.wait_state("lb1", "master")
        lab.start("lb2")
        lab.wait_state("lb2", "backup")
        lab.wait_synced("lb2")
        time.sleep(0.5)
        paths_bulk = {"nat": (VIP, BULK), "direct": (be["be1"], BULK), "haproxy": (lb1, HAP_BULK)}
        urls = {"nat": f"http://{VIP}:{WEB_PORT}/", "direct": f"http://{be['be1']}:{WEB_PORT}/",
                "haproxy": f"http://{lb1}:{HAP_WEB}/"}
        pids = {"lb1_halbd": halbd_pid(lab, "lb1"), "lb2_halbd": halbd_pid(lab, "lb2"),
                "haproxy": hp.pid}
        for path, url in urls.items():  # warm up every path (ARP, caches)
            in_ns(lab, "cl", ["wrk", "-t1", "-c4", "-d1s", url], 30)
        m1 = lab.metrics("lb1")
        m2 = lab.metrics("lb2")
        for rnd in range(a.rounds):
            for path in ("nat", "direct", "haproxy"):
                r = iperf(lab, *paths_bulk[path], a.duration)
                res["runs"]["gbps"].setdefault(path, []).append(r)
                log(f"round {rnd + 1} {path:8s} iperf3 {r['gbps']:.2f} Gbit/s, machine "
                    f"{r['machine_cpu_s_per_gb']:.2f} CPU s/GB")
            for path in ("nat", "direct", "haproxy"):
                r = wrk_close(lab, urls[path], a.duration, a.conns, pids)
                res["runs"]["conns"].setdefault(path, []).append(r)
                log(f"round {rnd + 1} {path:8s} wrk close {r['rps']:.0f} conn/s, machine "
                    f"{r['machine_cpu_us_per_conn']:.1f} us/conn, halbd lb1 "
                    f"{r['lb1_halbd_cpu_us_per_conn']:.1f} lb2 {r['lb2_halbd_cpu_us_per_conn']:.1f}"
                    f" us/conn, errors {r['socket_errors']}")
        time.sleep(2.0)  # the last batches replicated and injected
        n1, n2 = lab.metrics("lb1"), lab.metrics("lb2")
        def delta(m0, m, k):
            return m.get(k, 0.0) - m0.get(k, 0.0)
        nat_conns = sum(r["requests"] for r in res["runs"]["conns"]["nat"])
        res["replication"] = {
            "nat_connections_made": nat_conns,
            "lb1_events_recorded": delta(m1, n1, 'halb_nat_events_total{outcome="recorded"}'),
            "lb1_events_lost": delta(m1, n1, "halb_nat_events_lost_total"),
            "lb2_injected": delta(m2, n2, 'halb_nat_kernel_writes_total{op="inject"}'),
            "lb2_inject_errors": sum(v for k, v in n2.items()
                                     if k.startswith("halb_nat_inject_errors")),
            "lb1_table": lab.nat_entries("lb1"), "lb2_table": lab.nat_entries("lb2"),
        }
        # the same with [nat] replicate_after_packets = N: short connections skip replication
        if a.after:
            for n in ("lb2", "lb1"):
                lab.kill(n)
            lab.nat_options = f"replicate_after_packets = {a.after}"
            lab.start("lb1")
            lab.wait_state("lb1", "master")
            lab.start("lb2")
            lab.wait_state("lb2", "backup")
            lab.wait_synced("lb2")
            pids = {"lb1_halbd": halbd_pid(lab, "lb1"), "lb2_halbd": halbd_pid(lab, "lb2"),
                    "haproxy": hp.pid}
            for rnd in range(a.rounds):
                r = wrk_close(lab, urls["nat"], a.duration, a.conns, pids)
                res["runs"]["conns"].setdefault(f"nat_after{a.after}", []).append(r)
                log(f"round {rnd + 1} nat, replicate_after_packets = {a.after}: "
                    f"{r['rps']:.0f} conn/s, machine {r['machine_cpu_us_per_conn']:.1f} us/conn, "
                    f"halbd lb1 {r['lb1_halbd_cpu_us_per_conn']:.1f} lb2 "
                    f"{r['lb2_halbd_cpu_us_per_conn']:.1f} us/conn")

    med = {}
    for kind, key in (("gbps", "gbps"), ("gbps", "machine_cpu_s_per_gb"),
                      ("conns", "rps"), ("conns", "machine_cpu_us_per_conn")):
        for path, runs in res["runs"][kind].items():
            med[f"{path}.{key}"] = statistics.median(r[key] for r in runs)
    res["median"] = med
    ratio = lambda a_, b_: med[a_] / med[b_] if med.get(b_) else float("nan")  # noqa: E731
    res["ratios"] = {
        "nat/direct Gbit/s": ratio("nat.gbps", "direct.gbps"),
        "nat/haproxy Gbit/s": ratio("nat.gbps", "haproxy.gbps"),
        "nat/haproxy machine CPU per GB": ratio("nat.machine_cpu_s_per_gb",
                                                "haproxy.machine_cpu_s_per_gb"),
        "nat/haproxy new connections/s": ratio("nat.rps", "haproxy.rps"),
        "nat/direct new connections/s": ratio("nat.rps", "direct.rps"),
        "nat/haproxy machine CPU per connection": ratio("nat.machine_cpu_us_per_conn",
                                                        "haproxy.machine_cpu_us_per_conn"),
    }
    if a.after:
        k = f"nat_after{a.after}"
        res["ratios"][f"nat (replicate_after_packets = {a.after})/haproxy new connections/s"] = \
            ratio(f"{k}.rps", "haproxy.rps")
        res["ratios"][f"nat (replicate_after_packets = {a.after})/haproxy machine CPU per "
                      "connection"] = ratio(f"{k}.machine_cpu_us_per_conn",
                                            "haproxy.machine_cpu_us_per_conn")
    (OUT / "nat-latest.json").write_text(json.dumps(res, indent=1))
    lines = ["# kernel NAT mode: halb vs the direct path vs HAProxy (mode tcp)", "",
             f"{res['started']}, {a.rounds} rounds of {a.duration} s, wrk -c{a.conns}, "
             f"medians.", "", "| path | Gbit/s | machine CPU s/GB | new conn/s | machine CPU "
             "us/conn |", "| --- | --- | --- | --- | --- |"]
    for p in ("nat", "direct", "haproxy"):
        lines.append(f"| {p} | {med[p + '.gbps']:.2f} | {med[p + '.machine_cpu_s_per_gb']:.2f} | "
                     f"{med[p + '.rps']:.0f} | {med[p + '.machine_cpu_us_per_conn']:.1f} |")
    if a.after:
        p = f"nat_after{a.after}"
        lines.append(f"| nat, replicate_after_packets = {a.after} | | | {med[p + '.rps']:.0f} | "
                     f"{med[p + '.machine_cpu_us_per_conn']:.1f} |")
    lines += ["", "| ratio | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in res["ratios"].items()]
    rep = res["replication"]
    lines += ["", f"Replication at {med['nat.rps']:.0f} new connections/s: "
              f"{rep['nat_connections_made']} connections made, lb1 recorded "
              f"{rep['lb1_events_recorded']:.0f} established events, lost "
              f"{rep['lb1_events_lost']:.0f}; lb2 injected {rep['lb2_injected']:.0f} "
              f"({rep['lb2_inject_errors']:.0f} refused); nat table lb1 {rep['lb1_table']}, "
              f"lb2 {rep['lb2_table']}. halbd CPU per connection (replication): lb1 "
              f"{statistics.median(r['lb1_halbd_cpu_us_per_conn'] for r in res['runs']['conns']['nat']):.1f} us, lb2 "
              f"{statistics.median(r['lb2_halbd_cpu_us_per_conn'] for r in res['runs']['conns']['nat']):.1f} us."]
    (OUT / "nat-latest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
