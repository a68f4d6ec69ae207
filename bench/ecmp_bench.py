"""Scale-out behind ECMP: what 1, 2 and 4 halb nodes carry together, in one run:

    python bench/ecmp_bench.py [--duration 5] [--nodes 1,2,4]

Topology: ``lab.ecmplab`` (prefix ``hgb``): a client, an FRR router spreading flows over the
nodes that announce the VIP (ECMP, L4 hash), N halb nodes (HTTP listener on the VIP, [bgp]),
two lab.backend HTTP backends. Per node count, from the client:

- **requests/s**: ``wrk -t1 -c64`` keep-alive ``GET /`` (64 connections: the router hashes
  them over the nodes), and the nodes' CPU (every halbd's utime+stime from /proc) per request;
- **Gbit/s**: ``wrk -t1 -c16`` fetching ``/download?bytes=1048576`` through the nodes.

Everything (client, router, nodes, backends) shares this machine's cores, so the scaling
figure says how much of the machine N nodes can use, not what N machines would do; the CPU per
request says whether spreading costs anything per request. Results: ``bench/out/ecmp-latest.json``
and ``.md``. Every loop is bounded; the lab is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab import netns as nx  # noqa: E402
from lab.ecmplab import HTTP_PORT, VIP, EcmpLab  # noqa: E402

OUT = ROOT / "bench" / "out"
CLK = os.sysconf("SC_CLK_TCK")


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / CLK
        except (OSError, IndexError, ValueError):
            pass
    return total


def _halbd_pids(lab: EcmpLab) -> list[int]:
    pids = []
    for n in lab.names:
        for pid in nx.ns_pids(lab.ns[n]):
            try:
                if b"halb.cli.halbd" in open(f"/proc/{pid}/cmdline", "rb").read():
                    pids.append(pid)
            except OSError:
                pass
    return pids


def _wrk(lab: EcmpLab, path: str, conns: int, seconds: float) -> dict:
    r = nx.run_in(lab.ns["cl"], ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
                                 f"http://{VIP}:{HTTP_PORT}{path}"], timeout=seconds + 30)
    req = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    tr = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", r.stdout)
    total = re.search(r"(\d+) requests in", r.stdout)
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
    sock = re.search(r"Socket errors: (.*)", r.stdout)
    unit = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    bps = float(tr.group(1)) * unit.get(tr.group(2), 1) * 8 if tr else 0.0
    return {"rps": float(req.group(1)) if req else 0.0, "gbit": bps / 1e9,
            "requests": int(total.group(1)) if total else 0,
            "non2xx": int(errs.group(1)) if errs else 0,
            "socket_errors": sock.group(1).strip() if sock else ""}


def run(nodes: int, seconds: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"halb-ecmpbench-{nodes}-"))
    with EcmpLab(tmp, prefix="hgb", nodes=nodes) as lab:
        for n in lab.names:
            lab.start(n)
        lab.wait_paths(lab.names, timeout=30)
        # no access log on the nodes (the lab's config); warm up the connections
        _wrk(lab, "/", 64, 1)
        pids = _halbd_pids(lab)
        c0 = _cpu(pids)
        small = _wrk(lab, "/", 64, seconds)
        c1 = _cpu(pids)
        big = _wrk(lab, "/download?bytes=1048576", 16, seconds)
        c2 = _cpu(pids)
        return {"nodes": nodes, "rps": round(small["rps"]), "requests": small["requests"],
                "cpu_us_per_request": round((c1 - c0) / max(1, small["requests"]) * 1e6, 1),
                "gbit": round(big["gbit"], 2),
                "cpu_s_per_gb": round((c2 - c1) / max(1e-9, big["gbit"] * seconds / 8), 2),
                "errors": {"small": [small["non2xx"], small["socket_errors"]],
                           "big": [big["non2xx"], big["socket_errors"]]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--nodes", default="1,2,4")
    a = ap.parse_args(argv)
    rows = []
    for n in [int(x) for x in a.nodes.split(",")]:
        r = run(n, a.duration)
        rows.append(r)
        print(json.dumps(r), flush=True)
    base = rows[0]
    lines = [f"ECMP scale-out, {os.cpu_count()} cores shared by client, router, nodes and "
             f"backends, {a.duration:g} s per run ({time.strftime('%Y-%m-%d')})", "",
             "| nodes | requests/s | x 1 node | CPU us/request (all halbd) | Gbit/s (1 MiB) | "
             "x 1 node | halbd CPU s/GB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['nodes']} | {r['rps']} | {r['rps'] / max(1, base['rps']):.2f} | "
                     f"{r['cpu_us_per_request']} | {r['gbit']} | "
                     f"{r['gbit'] / max(1e-9, base['gbit']):.2f} | {r['cpu_s_per_gb']} |")
    md = "\n".join(lines) + "\n"
    print(md)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ecmp-latest.json").write_text(json.dumps(rows, indent=1))
    (OUT / "ecmp-latest.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
