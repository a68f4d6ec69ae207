"""``python -m lab demo --mode ecmp``: scale-out behind ECMP, shown.

Four halb nodes announce a VIP over BGP to an FRR router (lab.ecmplab, with the NAT listener
and a full mesh of sync links). Under 100 long-lived TCP connections through the NAT listener
(an echo every 100 ms each) and a new HTTP connection every 10 ms through the HTTP listener:
n4 dies (off the network, kill -9), n4 comes back (it learns the tables, then announces), n2
leaves gracefully (``halbctl drain-node``, then SIGTERM). The timeline says when the router's
FIB changed; ``<out>/ecmp.png`` draws the FIB's next hops, every echo of every connection and
the HTTP requests per 100 ms; ``<out>/ecmp.json`` holds the figures.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

from .demo import _echo_times, _say
from .ecmplab import EcmpLab, read_probes

PREFIX = "hge"
CONNS = 100
SECONDS = 14.0
KILL_AT, JOIN_AT, LEAVE_AT = 3.0, 6.5, 10.5


class FibWatch:
    """The router's FIB for the VIP, polled every 50 ms: [(monotonic time, nodes)]."""

    def __init__(self, lab: EcmpLab):
        self.lab = lab
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            nodes = tuple(self.lab.nodes_in_fib())
            if not self.samples or self.samples[-1][1] != nodes:
                self.samples.append((time.monotonic(), nodes))
            time.sleep(0.05)

    def start(self) -> "FibWatch":
        self._t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)

    def first(self, cond, after: float) -> float | None:
        for t, nodes in self.samples:
            if t >= after and cond(nodes):
                return t
        return None


def _plot(path: Path, lab: EcmpLab, fib: FibWatch, conns: list[dict], http: list[dict],
          t0: float, marks: list[tuple[float, str]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(11, 9), sharex=True,
                                     gridspec_kw={"height_ratios": [1, 3, 1.2]})
    end = SECONDS
    for y, n in enumerate(lab.names):
        spans, start = [], None
        for t, nodes in fib.samples + [(t0 + end, ())]:
            x = t - t0
            if n in nodes and start is None:
                start = x
            elif n not in nodes and start is not None:
                spans.append((max(start, 0), x - max(start, 0)))
                start = None
        a1.broken_barh(spans, (y - 0.35, 0.7), color="tab:green")
    a1.set_yticks(range(len(lab.names)), lab.names)
    a1.set_title("next hops of the VIP in the router's FIB (ECMP)", fontsize=10)
    for y, c in enumerate(conns):
        xs = [t - t0 for t in _echo_times(c)]
        a2.scatter(xs, [y] * len(xs), marker="|", s=4, linewidths=0.5,
                   color="tab:red" if c["error"] else "tab:blue")
    a2.set_ylabel("TCP connection")
    a2.set_title(f"{len(conns)} long-lived connections through the NAT listener: one tick per "
                 f"echo ({sum(1 for c in conns if c['error'])} broken)", fontsize=10)
    bins = int(end * 10)
    ok = [0] * bins
    bad = [0] * bins
    for p in http:
        i = int((p["t"] - t0) * 10)
        if 0 <= i < bins:
            (ok if p["ok"] else bad)[i] += 1
    xs = [i / 10 for i in range(bins)]
    a3.bar(xs, ok, width=0.1, align="edge", color="tab:blue", label="ok")
    a3.bar(xs, bad, width=0.1, align="edge", bottom=ok, color="tab:red", label="failed")
    a3.set_ylabel("per 100 ms")
    a3.set_title(f"new HTTP connections (one request each): {sum(ok)} ok, {sum(bad)} failed",
                 fontsize=10)
    a3.legend(loc="lower right", fontsize=8)
    for ax in (a1, a2, a3):
        for x, text in marks:
            ax.axvline(x, color="black", linestyle="--", linewidth=0.8)
    for x, text in marks:
        a2.text(x, len(conns) - 0.5, " " + text, fontsize=8, va="top",
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    a3.set_xlim(0, end)
    a3.set_xlabel("seconds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_ecmp_demo(out_dir: str = "out") -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "ecmp-lab"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _say("== building: an FRR router (ECMP, BFD 100 ms x 3), 4 halb nodes announcing "
         "198.19.83.10 over BGP, 2 backends, a client")
    with EcmpLab(tmp, prefix=PREFIX, nodes=4, withdraw_wait="1s", nat=True) as lab:
        for n in lab.names:
            lab.start(n)
        took = lab.wait_paths(lab.names, timeout=30)
        _say(f"== the router's FIB has {', '.join(lab.nodes_in_fib())} after {took:.1f} s")
        _say(lab.vtysh("rt", "show ip route 198.19.83.10/32").strip())
        fib = FibWatch(lab).start()
        np_, np_out = lab.natprobe(conns=CONNS, seconds=SECONDS, interval=0.1, gap_ms=0)
        hp, hp_out = lab.probe(seconds=SECONDS, interval=0.01, timeout=2.0)
        t0 = time.monotonic()
        lab.wait(lambda: len(lab.nat_origins("n1")) >= CONNS, 10, "the connections recorded")
        share = {}
        for c, o in lab.nat_origins("n1").items():
            share[o] = share.get(o, 0) + 1
        _say(f"== {CONNS} NAT connections by the node they started on: "
             + ", ".join(f"{n} {share.get(n, 0)}" for n in lab.names))
        marks: list[tuple[float, str]] = []
        time.sleep(max(0.0, t0 + KILL_AT - time.monotonic()))
        t_kill = time.monotonic()
        lab.kill_node("n4")
        marks.append((t_kill - t0, "n4 dies"))
        time.sleep(max(0.0, t0 + JOIN_AT - time.monotonic()))
        t_join = time.monotonic()
        lab.start("n4")
        marks.append((t_join - t0, "n4 starts"))
        time.sleep(max(0.0, t0 + LEAVE_AT - time.monotonic()))
        t_leave = time.monotonic()
        lab.halbctl("n2", "drain-node")
        marks.append((t_leave - t0, "drain-node n2"))
        lab.stop("n2")
        t_stopped = time.monotonic()
        np_.wait(SECONDS + 30)
        hp.wait(SECONDS + 30)
        fib.stop()
        conns = json.loads(np_out.read_text())["conns"]
        http = read_probes(hp_out)
        n4_gone = fib.first(lambda ns: "n4" not in ns, t_kill)
        n4_back = fib.first(lambda ns: "n4" in ns, t_join)
        n2_gone = fib.first(lambda ns: "n2" not in ns, t_leave)
        ms = lambda t: None if t is None else round((t - t0) * 1000)  # noqa: E731
        timeline = [
            (ms(t_kill), "n4 dies: off the network, halbd and FRR killed with -9"),
            (ms(n4_gone), f"the router's FIB drops n4 (BFD): {ms(n4_gone) - ms(t_kill) if n4_gone else '?'} ms after"),
            (ms(t_join), "n4 starts (empty kernel): FRR, halbd; it learns the tables from 3 peers"),
            (ms(n4_back), f"n4 announces, the FIB has it again: {ms(n4_back) - ms(t_join) if n4_back else '?'} ms after its start"),
            (ms(t_leave), "halbctl drain-node n2: withdraw, wait 1 s"),
            (ms(n2_gone), f"the FIB drops n2: {ms(n2_gone) - ms(t_leave) if n2_gone else '?'} ms after"),
            (ms(t_stopped), "n2 stopped (SIGTERM)"),
        ]
        _say("\n== timeline (ms after the clients started)")
        for t, text in timeline:
            _say(f"  {t if t is not None else '?':>6}  {text}")
        broken = [c for c in conns if c["error"]]
        moved = [c for c in conns if len(c["backends"]) != 1]
        failed = [p for p in http if not p["ok"]]
        _say(f"\n== NAT connections: {len(conns) - len(broken)} of {len(conns)} went on through "
             f"all three changes ({len(moved)} changed backend); longest gap "
             f"{max((c['max_gap_ms'] for c in conns), default=0):.0f} ms")
        _say(f"== HTTP: {len(http)} requests on new connections, {len(failed)} failed "
             f"(an L7 flow ECMP moves is reset: failures can only be requests in flight on n4 "
             f"when it died)")
        png = out / "ecmp.png"
        _plot(png, lab, fib, conns, http, t0, marks)
        res = {"share": share, "timeline": timeline, "nat_conns": len(conns),
               "nat_broken": len(broken), "nat_moved_backend": len(moved),
               "http_requests": len(http), "http_failed": len(failed),
               "fib": [(round(t - t0, 3), list(n)) for t, n in fib.samples]}
        (out / "ecmp.json").write_text(json.dumps(res, indent=1))
        _say(f"\n== wrote {png} and {out / 'ecmp.json'}")
        return 0 if not broken and not moved else 1
