"""python -m lab {up,down,status,demo,chaos,configs}: the network-namespace lab.

    python -m lab up [--mode active-active] [--prefix hl --subnet 198.18.0.0/24] [--family 6]
    python -m lab status [--json]
    python -m lab down                       # also cleans up after a crashed or interrupted run
    python -m lab demo [--out out]           # the failover demo (./dev demo)
    python -m lab demo --family 6            # ... over IPv6 (2001:2::/64; no NAT part)
    python -m lab demo --mode ecmp           # 4 nodes behind an FRR router (ECMP, BGP, BFD)
    python -m lab chaos [--out out]          # the chaos scenarios, with a report
    python -m lab chaos --family 6           # ... the ones that run over IPv6
    python -m lab configs                    # regenerate lab/configs/clab (containerlab)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import replace

from .topology import DEFAULT, MODES, Topology


def _topology(a) -> Topology:
    return replace(DEFAULT, prefix=a.prefix, subnet=a.subnet, mode=a.mode, lbs=a.lbs,
                   backends=a.backends, clients=a.clients, family=a.family)


class Terminated(BaseException):
    """SIGTERM, turned into an exception in the main thread, so that it unwinds like Ctrl-C:
    every ``finally``/``except BaseException`` on the way (the demo's teardown, a chaos
    scenario's ``__exit__``, ``Lab.up``'s cleanup) runs. Not an ``Exception``: nothing that
    reports a failed step swallows it."""


def _raise_on_sigterm() -> None:
    """Installs the SIGTERM handler (a CI timeout, `kill`): the first SIGTERM raises
    Terminated; later ones are ignored so they cannot cut the teardown short.

    Only in this process: forked children inherit the handler (pyroute2 forks a helper per
    network namespace and ends it with SIGTERM); there it restores the default and dies as
    before, instead of unwinding into main() and tearing the lab down under its parent."""
    fired = []
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if fired:
            return
        fired.append(signum)
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


def _teardown_after_signal(prefix: str, what: str, code: int) -> int:
    """After SIGTERM/Ctrl-C: the lab's own teardown already ran while unwinding, unless the
    signal cut into it; ``clean`` removes whatever is left (idempotent)."""
    from .lab import clean
    try:
        removed = clean(prefix)
    except Exception as e:  # noqa: BLE001 - reported; `python -m lab down` is the fallback
        print(f"python -m lab: {what}; cleaning up lab {prefix!r} failed: {e}; run "
              f"`python -m lab down --prefix {prefix}`", file=sys.stderr)
        return code
    print(f"python -m lab: {what}; lab {prefix!r} torn down"
          + (f" ({len(removed)} leftover item(s) removed)" if removed else ""), file=sys.stderr)
    return code


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
        p.add_argument("--family", type=int, choices=(4, 6), default=4,
                       help="6: IPv6 VIPs, listeners, backends and sync on a dual-stack LAN, "
                       "addresses from 2001:2::/48 (default 4)")

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
    for act in p._actions:  # --mode ecmp: scale-out behind ECMP (lab.ecmpdemo)
        if act.dest == "mode":
            act.choices = tuple(MODES) + ("ecmp",)
    p.add_argument("--out", default="out", help="directory for failover.png and the timeline")
    p.add_argument("--before", type=float, default=3.0, help="seconds of traffic before the kill")
    p.add_argument("--after", type=float, default=3.0, help="seconds of traffic after the kill")
    p.add_argument("--no-nat", action="store_true",
                   help="skip the second part (kernel NAT mode: a stream that survives the kill)")
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

    # the commands that build a lab tear it down on SIGTERM as on Ctrl-C (for `up`: only while
    # it is being built; once up, the lab is meant to outlive this process)
    lab_cmd = a.cmd in ("up", "demo", "chaos")
    me = os.getpid()  # a forked child unwinding to here must not clean up (see above)
    if lab_cmd:
        _raise_on_sigterm()
    try:
        if a.cmd == "up":
            lab = Lab(_topology(a))
            lab.up(timeout=a.timeout, tls=not a.no_tls)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
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
                net = st["subnet"] + (f" and {lab.topo.network6}, IPv6 VIPs"
                                      if lab.topo.family == 6 else "")
                print(f"lab {st['prefix']} ({st['mode']}, {net}) in {st['dir']}")
                for ns, ok in st["namespaces"].items():
                    print(f"  netns {ns:12} {'present' if ok else 'MISSING'}")
                for n, pr in st["processes"].items():
                    print(f"  {n:6} pid {pr['pid']}: {'running' if pr['alive'] else 'NOT RUNNING'}")
                for v, hs in st["vips"].items():
                    print(f"  VIP {v}: {', '.join(hs) or 'nobody'}")
                for n, out in st.get("halbctl", {}).items():
                    print(f"--- halbctl status on {n}\n{out.rstrip()}")
            return 0
        if a.cmd == "demo" and a.mode == "ecmp":
            from .ecmpdemo import run_ecmp_demo
            return run_ecmp_demo(a.out)
        if a.cmd == "demo":
            from .demo import run_demo
            return run_demo(_topology(a), out_dir=a.out, before=a.before, after=a.after,
                            nat=not a.no_nat)
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
    except Terminated:
        if lab_cmd and os.getpid() == me:
            return _teardown_after_signal(a.prefix, f"{a.cmd}: terminated (SIGTERM)", 128 + 15)
        raise
    except KeyboardInterrupt:
        if lab_cmd and os.getpid() == me:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: not mid-cleanup
            return _teardown_after_signal(a.prefix, f"{a.cmd}: interrupted", 128 + 2)
        raise
    return 2


if __name__ == "__main__":
    sys.exit(main())
