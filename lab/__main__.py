"""python -m lab {up,down,status,demo,chaos,configs}: the network-namespace lab.

    python -m lab up [--mode active-active] [--prefix hl --subnet 198.18.0.0/24]
    python -m lab status [--json]
    python -m lab down                       # also cleans up after a crashed or interrupted run
    python -m lab demo [--out out]           # the failover demo (./dev demo)
    python -m lab chaos [--out out]          # the chaos scenarios, with a report
    python -m lab configs                    # regenerate lab/configs/clab (containerlab)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

from .topology import DEFAULT, MODES, Topology


def _topology(a) -> Topology:
    return replace(DEFAULT, prefix=a.prefix, subnet=a.subnet, mode=a.mode, lbs=a.lbs,
                   backends=a.backends, clients=a.clients)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab", description="halb network-namespace lab")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def topo_args(p, prefix="hl", subnet="198.18.0.0/24"):
        p.add_argument("--prefix", default=prefix, help=f"name prefix (default {prefix}; "
                       "namespaces are <prefix>-lb1, ...)")
        p.add_argument("--subnet", default=subnet, help=f"default {subnet}")
        p.add_argument("--mode", choices=MODES, default="active-passive")
        p.add_argument("--lbs", type=int, default=2)
        p.add_argument("--backends", type=int, default=3)
        p.add_argument("--clients", type=int, default=1)

    p = sub.add_parser("up", help="build the lab and start halbd and the backends")
    topo_args(p)
    p.add_argument("--no-tls", action="store_true", help="sync without mutual TLS")
    p.add_argument("--timeout", type=float, default=30.0)
    p = sub.add_parser("down", help="remove everything a lab with this prefix made")
    p.add_argument("--prefix", default="hl")
    p = sub.add_parser("status", help="namespaces, processes, VIP holders, halbctl status")
    p.add_argument("--prefix", default="hl")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("demo", help="the failover demo: build, load, kill -9, timeline, PNG, down")
    topo_args(p)
    p.add_argument("--out", default="out", help="directory for failover.png and the timeline")
    p.add_argument("--before", type=float, default=3.0, help="seconds of traffic before the kill")
    p.add_argument("--after", type=float, default=3.0, help="seconds of traffic after the kill")
    p = sub.add_parser("chaos", help="the chaos scenarios; writes chaos-report.json/.md")
    topo_args(p, prefix="hc", subnet="198.18.70.0/24")
    p.add_argument("--out", default="out")
    p.add_argument("--only", action="append", help="run only these scenarios (repeatable)")
    sub.add_parser("configs", help="regenerate lab/configs/clab/*.toml and the lab PKI")
    a = ap.parse_args(argv)

    if os.geteuid() != 0 and a.cmd not in ("configs",):
        print("python -m lab: needs root (network namespaces)", file=sys.stderr)
        return 1
    from .lab import Lab, LabError

    try:
        if a.cmd == "up":
            lab = Lab(_topology(a))
            lab.up(timeout=a.timeout, tls=not a.no_tls)
            st = lab.status()
            print(f"lab {a.prefix!r} is up ({a.mode}); VIPs: "
                  + ", ".join(f"{v} on {','.join(h) or 'nobody'}" for v, h in st["vips"].items()))
            print(f"state, configs and logs in {lab.dir}; `python -m lab down --prefix {a.prefix}`"
                  " removes it")
            return 0
        if a.cmd == "down":
            from .lab import clean
            removed = clean(a.prefix)  # with or without a state file (crashed run)
            print(f"removed {len(removed)} item(s)" + (": " + ", ".join(removed) if removed else ""))
            return 0
        if a.cmd == "status":
            lab = Lab.load(a.prefix)
            st = lab.status()
            for h in lab.topo.lb_hosts:
                if lab.alive(h.name):
                    r = lab.halbctl(h.name, "status", *(["--json"] if a.json else []))
                    st.setdefault("halbctl", {})[h.name] = (r.stdout if r.returncode == 0
                                                            else f"error: {r.stderr.strip()}")
            if a.json:
                print(json.dumps(st, indent=1))
            else:
                print(f"lab {st['prefix']} ({st['mode']}, {st['subnet']}) in {st['dir']}")
                for ns, ok in st["namespaces"].items():
                    print(f"  netns {ns:12} {'present' if ok else 'MISSING'}")
                for n, pr in st["processes"].items():
                    print(f"  {n:6} pid {pr['pid']}: {'running' if pr['alive'] else 'NOT RUNNING'}")
                for v, hs in st["vips"].items():
                    print(f"  VIP {v}: {', '.join(hs) or 'nobody'}")
                for n, out in st.get("halbctl", {}).items():
                    print(f"--- halbctl status on {n}\n{out.rstrip()}")
            return 0
        if a.cmd == "demo":
            from .demo import run_demo
            return run_demo(_topology(a), out_dir=a.out, before=a.before, after=a.after)
        if a.cmd == "chaos":
            from .chaos import run_all
            return run_all(_topology(a), out_dir=a.out, only=a.only)
        if a.cmd == "configs":
            from . import clab
            for p in clab.write():
                print(p)
            return 0
    except LabError as e:
        print(f"python -m lab {a.cmd}: {e}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
