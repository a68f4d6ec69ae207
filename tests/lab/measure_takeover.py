"""Takeover times of halb and keepalived on the same lab topology (standalone, root).

    .venv/bin/python tests/lab/measure_takeover.py [--runs 10] [--interval 0.1] [--only halb|keepalived]

Topology (tests/lab/conftest.py): lb1 (priority 200, master) and lb2 (priority 100) on one
bridge with the client; one VIP, advert interval 100 ms. For halb, each node's halbd listens on
VIP:8000 and proxies to its own backend in the client namespace (be1, be2); for keepalived, a
TCP backend (be1, be2) listens on VIP:8000 inside each LB namespace (ip_nonlocal_bind). The
client probes VIP:8000 every 5 ms; a takeover is done when the first connect started after the
event is answered by be2. The time is measured from the signal (kill -9 of the master's
process group, or SIGTERM) to the end of that connect. After each run the old master is
started again and preempts back.

Prints one line per run and a summary (median, max) per implementation and event; with
``--json FILE`` also writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lab import netns as nx  # noqa: E402
from tests.helpers import Proc  # noqa: E402
from tests.lab.conftest import (PY, VIP_PORT, Lab, Probe, config, lab_lock,  # noqa: E402
                                wait_state)

VIP = "198.18.40.100"


def keepalived_conf(name: str, priority: int, interval: float, *, unicast: tuple[str, str] = (),
                    extra: str = "", vips: tuple[str, ...] = ()) -> str:
    """keepalived's config for the lab's VRID 40 (``unicast``: (own address, peer); ``extra``:
    lines for the instance, e.g. an ``auth_hmac`` block; ``vips``: instead of the lab's VIP)."""
    vip_lines = "\n        ".join(vips or (f"{VIP}/24",))
    if unicast:
        extra = (f"    unicast_src_ip {unicast[0]}\n    unicast_peer {{\n        {unicast[1]}\n"
                 f"    }}\n") + extra
    return f"""
global_defs {{
    router_id {name}
    vrrp_version 3
    script_user root
    enable_script_security
}}
vrrp_instance vi {{
    state BACKUP
    interface eth0
    virtual_router_id 40
    priority {priority}
    advert_int {interval}
{extra}    virtual_ipaddress {{
        {vip_lines}
    }}
}}
"""


def start_keepalived(lab: Lab, ns: str, name: str, priority: int, interval: float,
                     vips: tuple[str, ...] = ()) -> Proc:
    d = lab.tmp / f"ka-{name}-{len(lab.procs)}"
    d.mkdir()
    conf = d / "keepalived.conf"
    conf.write_text(keepalived_conf(name, priority, interval, vips=vips))
    return lab.proc(["keepalived", "-n", "-l", "-D", "-P", "-f", str(conf),
                     "-p", str(d / "k.pid"), "-r", str(d / "v.pid"), "-c", str(d / "c.pid")],
                    ns, f"keepalived-{name}-{len(lab.procs)}")


class Pair:
    def __init__(self, lab: Lab, impl: str, interval: float):
        self.lab, self.impl, self.interval = lab, impl, interval
        self.nodes: dict[str, Proc] = {}
        if impl == "keepalived":
            for ns, be, port in (("hvlb1", "be1", 7101), ("hvlb2", "be2", 7102)):
                nx.sysctl("net.ipv4.ip_nonlocal_bind", 1, ns=ns)
                lab.proc([PY, "-m", "lab.backend", "--name", be, "--tcp", f"{VIP}:{VIP_PORT}"],
                         ns, f"vip-backend-{be}")

    def start(self, ns: str) -> Proc:
        name, prio = ("lb1", 200) if ns == "hvlb1" else ("lb2", 100)
        if self.impl == "halb":
            p = self.lab.halbd(ns, config(name, priority=prio, interval=f"{self.interval}s"),
                               f"{name}-{len(self.lab.procs)}")
        else:
            p = start_keepalived(self.lab, ns, name, prio, self.interval)
        self.nodes[ns] = p
        return p

    def settled(self, timeout: float = 20.0) -> None:
        """lb1 master with the VIP, lb2 backup, the client reaching be1."""
        if self.impl == "halb":
            wait_state(self.nodes["hvlb1"], "master", timeout=timeout)
            wait_state(self.nodes["hvlb2"], "backup", timeout=timeout)
        self.lab.wait_holder(VIP, "hvlb1", timeout=timeout)


def run(impl: str, runs: int, interval: float, tmp: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"kill9": [], "sigterm": []}
    with lab_lock():
        return _run(impl, runs, interval, tmp, out)


def _run(impl: str, runs: int, interval: float, tmp: Path, out: dict) -> dict[str, list[float]]:
    lab = Lab(tmp)
    try:
        pair = Pair(lab, impl, interval)
        pair.start("hvlb1")
        pair.start("hvlb2")
        pair.settled()
        for event in ("kill9", "sigterm"):
            for i in range(runs):
                probe = Probe(lab, VIP, duration=15, step=0.005)
                probe.wait_answer("be1", after=time.monotonic(), timeout=10)
                time.sleep(0.05 + (i % 10) * interval / 10)  # spread the event over the interval
                master = pair.nodes["hvlb1"]
                t0 = time.monotonic()
                if event == "kill9":
                    master.kill()
                else:
                    master.signal(signal.SIGTERM)
                t_ok = probe.wait_answer("be2", after=time.monotonic(), timeout=10)
                took = t_ok - t0
                out[event].append(took)
                print(f"{impl:10s} {event:8s} run {i + 1:2d}: {took * 1000:6.1f} ms", flush=True)
                probe.stop()
                master.stop(timeout=5)
                master.close()
                pair.start("hvlb1")
                pair.settled()
    finally:
        lab.close()
        nx.cleanup("hv")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--only", choices=("halb", "keepalived"))
    ap.add_argument("--json", help="write the raw numbers (seconds) here")
    args = ap.parse_args()
    if not 1 <= args.runs <= 100:
        ap.error("--runs: 1..100")
    results = {}
    for impl in ("halb", "keepalived"):
        if args.only and impl != args.only:
            continue
        with tempfile.TemporaryDirectory(prefix=f"halb-measure-{impl}-") as d:
            results[impl] = run(impl, args.runs, args.interval, Path(d))
    print()
    print(f"takeover seen by a TCP client, advert interval {args.interval * 1000:.0f} ms, "
          f"{args.runs} runs each (ms)")
    print(f"{'':12s}{'event':10s}{'median':>8s}{'max':>8s}{'min':>8s}")
    for impl, r in results.items():
        for event, xs in r.items():
            if xs:
                print(f"{impl:12s}{event:10s}{statistics.median(xs) * 1000:8.1f}"
                      f"{max(xs) * 1000:8.1f}{min(xs) * 1000:8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
