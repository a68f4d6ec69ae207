"""Chaos scenarios: kill, freeze or cut off the primary under load and count what was lost.

    python -m lab chaos [--only kill9 --only sigstop ...] [--out out]
    python -m lab chaos --family 6     # the scenarios that run over IPv6 (see IPV4_ONLY)

Each scenario builds its own lab (prefix ``hc``, 198.18.70.0/24 by default; with
``--family 6`` the same lab IPv6 end to end, 2001:2:0:70::/64, VIP 2001:2:0:70::100), runs traffic
from the client (lab.traffic), injects one failure, measures from the client's events and
from the VIP's holders (polled every 5 ms), tears the lab down, and returns its figures and
its checks. The checks' bounds come from the configured timers: a takeover must come within
Master_Down_Interval + 150 ms, no sticky client may change backend (except those whose
backend was killed), a double master must end within a few advert intervals. ``tests/chaos``
runs the same scenarios and asserts the checks; both write ``chaos-report.json`` and ``.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from . import netns as nx
from . import probe
from .demo import Traffic, VipWatch, analyze
from .lab import PY, ROOT, Lab, LabError, clean, wait_until
from .topology import HTTP_PORT, Topology

CHAOS = Topology(prefix="hc", subnet="198.18.70.0/24")
CHAOS6 = replace(CHAOS, family=6)
TAKEOVER_SLACK = 0.150  # seconds over Master_Down_Interval a takeover may take


@dataclass
class Result:
    name: str
    title: str
    figures: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)  # (description, ok, detail)
    seconds: float = 0.0
    error: str = ""

    def check(self, desc: str, ok: bool, detail: str = "") -> None:
        self.checks.append((desc, bool(ok), detail))

    @property
    def ok(self) -> bool:
        return not self.error and all(ok for _, ok, _ in self.checks)

    def failures(self) -> str:
        lines = [f"{d}: {det}" for d, ok, det in self.checks if not ok]
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "ok": self.ok, "seconds": round(self.seconds, 1),
                "figures": self.figures, "error": self.error,
                "checks": [{"check": d, "ok": ok, "detail": det} for d, ok, det in self.checks]}


# -- helpers ------------------------------------------------------------------------------------


def sticky_report(events: list[dict], exclude_backends: set[str] = frozenset(),
                  since: float = 0.0) -> dict:
    """Per sticky client (HTTP cookie clients and source-IP TCP clients), the backends its
    successful answers came from (at or after ``since``). A client answered by two backends
    lost its session, unless the first was killed (``exclude_backends``): then moving was the
    only way to keep serving it."""
    seen: dict[tuple[str, int], list[str]] = {}
    for e in sorted(events, key=lambda e: e["t"]):
        if e["k"] in ("http", "src") and e["ok"] and e["t"] >= since and e.get("b"):
            lst = seen.setdefault((e["k"], e["c"]), [])
            if not lst or lst[-1] != e["b"]:
                lst.append(e["b"])
    kept = forced = 0
    lost = []
    for key, bs in seen.items():
        if len(bs) == 1:
            kept += 1
        elif bs[0] in exclude_backends and len(bs) == 2:
            forced += 1
        else:
            lost.append((key, bs))
    return {"clients": len(seen), "src_clients": sum(1 for k in seen if k[0] == "src"),
            "kept": kept, "moved_off_killed_backend": forced, "lost": len(lost),
            "lost_examples": lost[:5]}


def health_moves(lab: Lab, since: float = 0.0) -> str:
    """The backend_down/backend_up records of every load balancer (since ``since``), for the
    detail of a failed sticky check: a sticky client moves when its node thinks its backend
    is down, and the record says why."""
    out = []
    for i in range(1, lab.topo.lbs + 1):
        node = f"lb{i}"
        for ev in ("backend_down", "backend_up"):
            try:
                recs = lab.log_events(node, ev)
            except (OSError, LabError):
                continue
            out += [(t, f"{node} {ev} {r.get('pool')}/{r.get('backend')} ({r.get('reason')})")
                    for t, r in recs if t >= since]
    return "; ".join(f"{w} at +{t - since:.2f}s" for t, w in sorted(out)[:12]) or "no backend went down"


def http_counts(events: list[dict], start: float = 0.0, end: float = float("inf")) -> tuple[int, int]:
    ok = failed = 0
    for e in events:
        if e["k"] == "http" and start <= e["t"] <= end:
            if e["ok"]:
                ok += 1
            else:
                failed += 1
    return ok, failed


def sticky_table(lab: Lab, node: str) -> dict[str, tuple[str, str]]:
    r = lab.halbctl(node, "tables", "sticky", "--limit", "1000000", "--json", timeout=20)
    if r.returncode != 0:
        raise LabError(f"halbctl tables on {node}: {r.stderr.strip()}")
    d = json.loads(r.stdout)
    return {e["key"]: (e["pool"], e["backend"]) for e in d["sticky"]["entries"]}


def _mdi(topo: Topology, node: str) -> float:
    inst = topo.instances[0]
    return topo.master_down_interval(inst.priorities[node])


def _pair(topo: Topology) -> tuple[str, str, str]:
    inst = topo.instances[0]
    old = inst.owner()
    new = max((n for n in inst.priorities if n != old), key=lambda n: inst.priorities[n])
    return old, new, str(inst.vip.ip)


class Scenario:
    """Builds the lab, runs traffic and a VIP watch; always tears down."""

    def __init__(self, topo: Topology, out: Path, name: str, seconds: float, halbd: bool = True):
        if topo.family == 6:  # files of its own beside the IPv4 run's
            name += "-v6"
        self.topo, self.out, self.name, self.halbd = topo, out, name, halbd
        self.lab = Lab(topo)
        self.lab.keep_logs = out / "chaos-logs" / name
        self.seconds = seconds
        self.traffic: list[Traffic] = []
        self.watch: VipWatch | None = None

    def __enter__(self) -> "Scenario":
        if self.lab.leftovers():  # an earlier run of this (chaos-only) prefix was interrupted
            clean(self.topo.prefix)
        self.lab.up(halbd=self.halbd)
        self.t0 = time.monotonic()
        alive = None if self.halbd else (lambda n: self.lab.alive(f"keepalived-{n}"))
        self.watch = VipWatch(self.lab, self.topo.vips[0], max_seconds=self.seconds + 60,
                              alive=alive).start()
        return self

    def start_traffic(self, tag: str, seconds: float | None = None, extra: list[str] | None = None,
                      src_block: int = 0) -> Traffic:
        t = Traffic(self.lab, self.out / f"chaos-{self.name}-{tag}.jsonl", seconds or self.seconds,
                    extra=extra, src_block=src_block)
        self.traffic.append(t)
        return t

    def __exit__(self, *exc) -> None:
        for t in self.traffic:
            t.kill()
        if self.watch:
            self.watch.stop()
        self.lab.down()


def _wait_holder(sc: Scenario, node: str, after: float, timeout: float) -> float | None:
    """Waits until ``node`` alone holds the VIP (seen by the VIP watch); returns when it added
    the VIP, from its own log (exact to the millisecond, unlike a poller that may be starved on
    a loaded machine), or the watch's time if the log has no record."""
    try:
        wait_until(lambda: sc.watch.first_time(lambda h: h == (node,), after) is not None,
                   timeout, f"{node} alone holding the VIP", interval=0.01)
    except LabError:
        return None
    seen = sc.watch.first_time(lambda h: h == (node,), after)
    added = sc.lab.vips_added_after(node, "vi1", after)
    return added if added is not None and added <= seen else seen


# -- scenarios ----------------------------------------------------------------------------------


def kill9(topo: Topology, out: Path) -> Result:
    r = Result("kill9", "kill -9 of the primary under load")
    old, new, vip = _pair(topo)
    mdi = _mdi(topo, new)
    with Scenario(topo, out, r.name, 6.0) as sc:
        tr = sc.start_traffic("load")
        time.sleep(2.0)
        kill_t = sc.lab.kill_lb(old)
        time.sleep(3.0)
        tr.wait(15)
        ev = tr.events()
        fo = analyze(ev, kill_t, sc.lab, old, new, sc.lab.vips_added_after(new, "vi1", kill_t))
        st = sticky_report(ev)
        r.figures = {"vip_moved_ms": fo.vip_moved_ms, "takeover_ms": fo.answered_ms,
                     "failed_http": fo.failed_http, "failed_http_after_kill": fo.failed_http_total,
                     "failed_tcp": fo.failed_tcp, "lost_udp": fo.failed_udp,
                     "sticky_clients": st["clients"], "sticky_kept": st["kept"],
                     "sticky_lost": st["lost"], "master_down_interval_ms": mdi * 1000,
                     "double_master_s": sc.lab.double_master_seconds("vi1", kill_t - 2, time.monotonic())}
        bound = (mdi + TAKEOVER_SLACK) * 1000
        r.check(f"the VIP answered from {new} within Master_Down_Interval + 150 ms ({bound:.0f} ms)",
                fo.answered_ms is not None and fo.answered_ms <= bound, f"{fo.answered_ms} ms")
        r.check("no sticky session lost", st["lost"] == 0 and st["clients"] >= 100 and st["src_clients"] >= 32,
                f"{st['lost']} of {st['clients']} lost: {st['lost_examples']}"
                + (f"; {health_moves(sc.lab, sc.t0)}" if st["lost"] else ""))
    return r


def sigstop(topo: Topology, out: Path, freeze: float = 2.0) -> Result:
    r = Result("sigstop", f"SIGSTOP of the primary for {freeze:g} s, then SIGCONT")
    old, new, vip = _pair(topo)
    mdi = _mdi(topo, new)
    with Scenario(topo, out, r.name, 8.0) as sc:
        tr = sc.start_traffic("load")
        time.sleep(2.0)
        stop_t = sc.lab.kill_lb(old, signal.SIGSTOP)
        time.sleep(freeze)
        cont_t = time.monotonic()
        sc.lab.send_signal(old, signal.SIGCONT)
        _wait_holder(sc, old if topo.preempt else new, cont_t, 5.0)
        time.sleep(max(0.0, 8.0 - (time.monotonic() - stop_t) - 2.5))
        tr.wait(15)
        sc.watch.stop()
        ev = tr.events()
        taken = sc.lab.vips_added_after(new, "vi1", stop_t)
        single = sc.lab.double_master_end("vi1", cont_t, time.monotonic()) or cont_t
        dm_after = sc.lab.double_master_seconds("vi1", cont_t, time.monotonic())
        end_holders = sc.watch.changes[-1][1] if sc.watch.changes else ()
        fo = analyze(ev, stop_t, sc.lab, old, new, taken, until=cont_t)
        st = sticky_report(ev)
        r.figures = {"vip_moved_ms": fo.vip_moved_ms, "takeover_ms": fo.answered_ms,
                     "double_master_after_sigcont_ms": dm_after * 1000,
                     "single_master_after_sigcont_ms": (single - cont_t) * 1000,
                     "failed_http": http_counts(ev, stop_t)[1], "sticky_clients": st["clients"],
                     "sticky_kept": st["kept"], "sticky_lost": st["lost"],
                     "double_master_s": sc.lab.double_master_seconds("vi1", stop_t, time.monotonic())}
        bound = (mdi + TAKEOVER_SLACK) * 1000
        r.check(f"{new} took the VIP within Master_Down_Interval + 150 ms ({bound:.0f} ms)",
                fo.vip_moved_ms is not None and fo.vip_moved_ms <= bound, f"{fo.vip_moved_ms} ms")
        dm_bound = 3 * topo.advert_interval + 0.5
        r.check(f"one master again within 3 adverts + 500 ms ({dm_bound * 1000:.0f} ms) of SIGCONT",
                single is not None and single - cont_t <= dm_bound and dm_after <= dm_bound,
                f"one master {(single - cont_t) * 1000:.0f} ms after SIGCONT, "
                f"two masters for {dm_after * 1000:.0f} ms after SIGCONT")
        r.check("exactly one master at the end", len(end_holders) == 1, f"holders {end_holders}")
        r.check("no sticky session lost", st["lost"] == 0 and st["clients"] >= 100 and st["src_clients"] >= 32,
                f"{st['lost']} of {st['clients']}: {st['lost_examples']}"
                + (f"; {health_moves(sc.lab, sc.t0)}" if st["lost"] else ""))
    return r


def _nft_partition(lab: Lab, a: str, b: str, on: bool) -> None:
    """Drops every frame between the bridge ports of LB nodes ``a`` and ``b`` (nftables,
    bridge family, in the switch namespace)."""
    ns = lab.topo.switch_netns
    if on:
        pa, pb = lab.ports[a], lab.ports[b]
        rules = (f"table bridge halb_chaos {{\n chain cut {{\n"
                 f"  type filter hook forward priority 0; policy accept;\n"
                 f"  iifname \"{pa}\" oifname \"{pb}\" drop\n"
                 f"  iifname \"{pb}\" oifname \"{pa}\" drop\n }}\n}}\n")
        nx.run_in(ns, ["nft", "-f", "-"], input=rules)
    else:
        nx.run_in(ns, ["nft", "delete", "table", "bridge", "halb_chaos"])


def partition(topo: Topology, out: Path, cut: float = 2.0) -> Result:
    r = Result("partition", f"partition between the LB nodes for {cut:g} s (nftables), then heal")
    old, new, vip = _pair(topo)
    mdi = _mdi(topo, new)
    with Scenario(topo, out, r.name, 9.0) as sc:
        tr = sc.start_traffic("load")
        time.sleep(2.0)
        cut_t = time.monotonic()
        _nft_partition(sc.lab, old, new, True)
        time.sleep(cut)
        heal_t = time.monotonic()
        _nft_partition(sc.lab, old, new, False)
        _wait_holder(sc, old if topo.preempt else new, heal_t, 5.0)
        time.sleep(1.5)  # let sync catch up after healing
        converge_t = time.monotonic()

        def converged():
            a, b = sticky_table(sc.lab, old), sticky_table(sc.lab, new)
            return (a, b) if a == b and len(a) >= 32 else None
        tables = None
        try:
            tables = wait_until(converged, 10.0, "the sticky tables to converge", interval=0.3)
        except LabError:
            pass
        converge_ms = (time.monotonic() - converge_t + 1.5) * 1000 if tables else None
        tr.wait(20)
        sc.watch.stop()
        ev = tr.events()
        st = sticky_report(ev)
        both = sc.lab.vips_added_after(new, "vi1", cut_t)
        single = sc.lab.double_master_end("vi1", heal_t, time.monotonic()) or heal_t
        end_holders = sc.watch.changes[-1][1] if sc.watch.changes else ()
        r.figures = {"second_master_after_cut_ms": (both - cut_t) * 1000 if both else None,
                     "single_master_after_heal_ms": (single - heal_t) * 1000,
                     "double_master_s": sc.lab.double_master_seconds("vi1", cut_t, time.monotonic()),
                     "tables_converged_after_heal_ms": converge_ms,
                     "sticky_entries": len(tables[0]) if tables else None,
                     "failed_http": http_counts(ev, cut_t)[1], "sticky_clients": st["clients"],
                     "sticky_kept": st["kept"], "sticky_lost": st["lost"]}
        bound = (mdi + TAKEOVER_SLACK) * 1000
        r.check(f"cut off, {new} became master within Master_Down_Interval + 150 ms ({bound:.0f} ms)",
                both is not None and (both - cut_t) * 1000 <= bound,
                f"{r.figures['second_master_after_cut_ms']} ms")
        dm_bound = 3 * topo.advert_interval + 0.5
        r.check(f"one master again within {dm_bound * 1000:.0f} ms of healing",
                single is not None and single - heal_t <= dm_bound,
                f"{r.figures['single_master_after_heal_ms']} ms")
        r.check("exactly one master at the end", len(end_holders) == 1, f"holders {end_holders}")
        r.check("sticky tables converge after healing", tables is not None and len(tables[0]) >= 32,
                "tables differ" if tables is None else f"{len(tables[0])} entries on both")
        r.check("no sticky session lost", st["lost"] == 0 and st["clients"] >= 100 and st["src_clients"] >= 32,
                f"{st['lost']} of {st['clients']}: {st['lost_examples']}"
                + (f"; {health_moves(sc.lab, sc.t0)}" if st["lost"] else ""))
    return r


def backend_kill(topo: Topology, out: Path) -> Result:
    r = Result("backend_kill", "a backend killed (kill -9) under load")
    victim = topo.backend_hosts[1].name
    with Scenario(topo, out, r.name, 6.0) as sc:
        tr = sc.start_traffic("load")
        time.sleep(2.0)
        kill_t = time.monotonic()
        sc.lab.kill_backend(victim)
        time.sleep(3.0)
        tr.wait(15)
        ev = tr.events()
        ok, failed = http_counts(ev, kill_t - 0.5)
        st = sticky_report(ev, exclude_backends={victim})
        served_after = {e.get("b") for e in ev if e["k"] == "http" and e["ok"] and e["t"] > kill_t + 1}
        r.figures = {"http_ok_after_kill": ok, "failed_http": failed,
                     "sticky_clients": st["clients"], "sticky_kept": st["kept"],
                     "moved_off_killed_backend": st["moved_off_killed_backend"],
                     "sticky_lost": st["lost"],
                     "double_master_s": sc.lab.double_master_seconds("vi1", kill_t - 2, time.monotonic())}
        r.check("no failed idempotent request (GET)", failed == 0 and ok > 100, f"{failed} failed of {ok + failed}")
        r.check(f"nothing served by {victim} after it died", victim not in served_after,
                f"served by {sorted(b for b in served_after if b)}")
        r.check("only the killed backend's clients moved", st["lost"] == 0,
                f"{st['lost']} others moved: {st['lost_examples']}")
    return r


def preempt_restart(topo: Topology, out: Path) -> Result:
    r = Result("preempt_restart", "the old primary restarted with preempt: takes the VIP back "
               "only after learning the tables")
    old, new, vip = _pair(topo)
    mdi = _mdi(topo, new)
    with Scenario(topo, out, r.name, 12.0) as sc:
        tr_a = sc.start_traffic("before")  # clients pinned through the primary
        time.sleep(2.0)
        kill_t = sc.lab.kill_lb(old)
        took = _wait_holder(sc, new, kill_t, 5.0)
        # new clients, pinned while only the standby runs: their entries exist only there
        tr_b = sc.start_traffic("during", seconds=8.0, src_block=1,
                                extra=["--clients", "100", "--no-streams"])
        time.sleep(2.0)
        table_new = sticky_table(sc.lab, new)
        restart_t = time.monotonic()
        sc.lab.start_lb(old)
        back = _wait_holder(sc, old, restart_t, 15.0)
        table_old = sticky_table(sc.lab, old) if back else {}
        # its own log: tables learned (sync ready, preemption released) before it added the VIP
        learned = [t for t, rec in sc.lab.log_events(old, "sync_ready") if t >= restart_t]
        time.sleep(2.0)
        tr_a.wait(20)
        tr_b.wait(20)
        sc.watch.stop()
        ev_a, ev_b = tr_a.events(), tr_b.events()
        st_a, st_b = sticky_report(ev_a), sticky_report(ev_b)
        missing = [k for k in table_new if k not in table_old]
        fo = analyze(ev_a, kill_t, sc.lab, old, new, took, until=restart_t)
        r.figures = {"takeover_ms": fo.answered_ms, "vip_moved_ms": (took - kill_t) * 1000 if took else None,
                     "preempt_after_restart_ms": (back - restart_t) * 1000 if back else None,
                     "entries_on_standby": len(table_new), "missing_on_primary_after_preempt": len(missing),
                     "failed_http": http_counts(ev_a, kill_t)[1] + http_counts(ev_b)[1],
                     "sticky_clients": st_a["clients"] + st_b["clients"],
                     "sticky_kept": st_a["kept"] + st_b["kept"], "sticky_lost": st_a["lost"] + st_b["lost"],
                     "double_master_s": sc.lab.double_master_seconds("vi1", restart_t, time.monotonic()),
                     "stale_vip_on_restarted_node_s": sc.watch.double_master_seconds(restart_t, time.monotonic())}
        r.check(f"{new} took over within Master_Down_Interval + 150 ms",
                took is not None and took - kill_t <= mdi + TAKEOVER_SLACK,
                f"{r.figures['vip_moved_ms']} ms")
        r.check(f"{old} took the VIP back after restarting", back is not None, "it did not")
        r.check(f"{old} had learned the tables (sync_ready in its log) before it took the VIP back",
                back is not None and bool(learned) and learned[0] <= back,
                f"sync_ready {[(round((t - restart_t) * 1000), 'ms') for t in learned[:1]]} after the "
                f"restart, VIP back {r.figures['preempt_after_restart_ms']} ms after it")
        r.check("when it did, it held every entry the standby had made",
                back is not None and not missing and len(table_new) >= 64,
                f"{len(missing)} of {len(table_new)} missing, e.g. {missing[:3]}")
        r.check("no sticky session lost (clients from before the kill and from the standby's time)",
                st_a["lost"] + st_b["lost"] == 0 and st_b["src_clients"] >= 32,
                f"{st_a['lost']}+{st_b['lost']}: {st_a['lost_examples'] + st_b['lost_examples']}")
    return r


def failover_loop(topo: Topology, out: Path, cycles: int = 10) -> Result:
    r = Result("loop", f"{2 * cycles} failovers back and forth (kill -9 the primary, restart it, "
               "it preempts back)")
    old, new, vip = _pair(topo)
    mdi = _mdi(topo, new)
    budget = 12.0 * cycles  # seconds; each cycle is bounded below too
    with Scenario(topo, out, r.name, budget) as sc:
        tr = sc.start_traffic("load", seconds=budget)
        time.sleep(1.5)
        takeovers, preempts, errors = [], [], []
        kills: list[tuple[float, float, float]] = []
        start = time.monotonic()
        for i in range(cycles):
            if time.monotonic() - start > budget - 12:
                errors.append(f"out of time after {i} cycles")
                break
            kill_t = sc.lab.kill_lb(old)
            took = _wait_holder(sc, new, kill_t, 5.0)
            if took is None:
                errors.append(f"cycle {i}: {new} never took the VIP")
                break
            takeovers.append((took - kill_t) * 1000)
            time.sleep(0.6)
            restart_t = time.monotonic()
            kills.append((kill_t, took, restart_t))
            sc.lab.start_lb(old)
            back = _wait_holder(sc, old, restart_t, 10.0)
            if back is None:
                errors.append(f"cycle {i}: {old} never took the VIP back")
                break
            preempts.append((back - restart_t) * 1000)
            time.sleep(0.6)
        tr.stop()
        tr.wait(20)
        sc.watch.stop()
        ev = tr.events()
        st = sticky_report(ev)
        ok, failed = http_counts(ev)
        answered = []  # client-visible: the first HTTP answer through the standby
        for kill_t, took, restart_t in kills:
            fo = analyze(ev, kill_t, sc.lab, old, new, took, until=restart_t)
            answered.append(fo.answered_ms if fo.answered_ms is not None else float("inf"))
        r.figures = {"failovers": len(takeovers) + len(preempts),
                     "takeover_ms_median": statistics.median(answered) if answered else None,
                     "takeover_ms_max": max(answered) if answered else None,
                     "takeover_ms_all": [round(x, 1) for x in answered],
                     "vip_moved_ms_median": statistics.median(takeovers) if takeovers else None,
                     "vip_moved_ms_max": max(takeovers) if takeovers else None,
                     "vip_moved_ms_all": [round(x, 1) for x in takeovers],
                     "preempt_after_restart_ms_median": statistics.median(preempts) if preempts else None,
                     "http_ok": ok, "failed_http": failed, "sticky_clients": st["clients"],
                     "sticky_kept": st["kept"], "sticky_lost": st["lost"],
                     "double_master_s": sc.lab.double_master_seconds("vi1", start, time.monotonic()),
                     "stale_vip_on_restarted_node_s": sc.watch.double_master_seconds(start, time.monotonic())}
        bound = (mdi + TAKEOVER_SLACK) * 1000
        r.check(f"{2 * cycles} failovers done", not errors and len(takeovers) == cycles, "; ".join(errors))
        r.check(f"every takeover within Master_Down_Interval + 150 ms ({bound:.0f} ms): the standby "
                "held the VIP and answered HTTP through it",
                takeovers and max(takeovers) <= bound and max(answered) <= bound,
                f"VIP max {max(takeovers) if takeovers else None} ms, "
                f"answered max {max(answered) if answered else None} ms")
        r.check("no sticky session lost", st["lost"] == 0 and st["clients"] >= 100 and st["src_clients"] >= 32,
                f"{st['lost']} of {st['clients']}: {st['lost_examples']}"
                + (f"; {health_moves(sc.lab, sc.t0)}" if st["lost"] else ""))
    return r


class Prober:
    """lab.probe in the client namespace: a new connection to the VIP every 5 ms (and, with
    ``keepalive``, fixed-source-port keep-alive clients), one JSON line per probe."""

    def __init__(self, lab: Lab, path: Path, seconds: float, *, interval: float = 0.005,
                 keepalive: int = 0):
        self.path = path
        vip = lab.topo.vips[0]
        argv = [PY, "-m", "lab.probe", "--target",
                f"[{vip}]:{HTTP_PORT}" if ":" in vip else f"{vip}:{HTTP_PORT}",
                "--seconds", str(seconds), "--interval", str(interval),
                "--keepalive", str(keepalive), "--out", str(path)]
        self.p = nx.popen_in(lab.topo.client_hosts[0].netns, argv, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                             env={"PYTHONPATH": str(ROOT), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        line = self.p.stdout.readline()
        if not line.startswith('{"event": "started"'):
            self.kill()
            raise LabError(f"lab.probe did not start: {line!r} {self.p.stderr.read()[-1000:]}")

    def stop(self, timeout: float = 15.0) -> list[dict]:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return probe.read(self.path)

    def kill(self) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(10)


def _single_holder(sc: "Scenario", node: str, after: float, timeout: float,
                   alone: bool = True) -> bool:
    """Waits until ``node`` holds the VIP (``alone``: and no other node does)."""
    def seen(h):
        return h == (node,) if alone else node in h
    try:
        wait_until(lambda: sc.watch.first_time(seen, after) is not None,
                   timeout, f"{node} holding the VIP", interval=0.01)
        return True
    except LabError:
        return False


def split_brain(topo: Topology, out: Path, reps: int = 10, cut: float = 2.0) -> Result:
    """Two masters meet again, ``reps`` times each way: the primary frozen (SIGSTOP) for
    ``cut`` seconds then resumed, and the LB nodes partitioned for ``cut`` seconds then healed.
    What counts is the client: a new connection to the VIP every 5 ms, and the time from the
    resume (heal) to the first answer after the last failed probe."""
    r = Result("split_brain", f"split brain healed, {reps}x SIGSTOP {cut:g} s + SIGCONT and "
               f"{reps}x partition {cut:g} s + heal: client recovery")
    old, new, vip = _pair(topo)
    bound = (topo.advert_interval + 0.050) * 1000
    budget = reps * 2 * (cut + 6.0) + 10
    with Scenario(topo, out, r.name, budget) as sc:
        pr = Prober(sc.lab, out / f"chaos-{sc.name}-probes.jsonl", budget)
        moments: list[tuple[str, int, float]] = []  # (kind, rep, resume/heal time)
        errors = []
        try:
            time.sleep(1.0)
            for kind in ("sigstop", "partition"):
                for i in range(reps):
                    t0 = time.monotonic()
                    if kind == "sigstop":
                        sc.lab.kill_lb(old, signal.SIGSTOP)
                    else:
                        _nft_partition(sc.lab, old, new, True)
                    if not _single_holder(sc, new, t0, cut + 2.0, alone=False):
                        errors.append(f"{kind} {i}: {new} never took the VIP")
                    time.sleep(max(0.0, cut - (time.monotonic() - t0)))
                    t1 = time.monotonic()
                    if kind == "sigstop":
                        sc.lab.send_signal(old, signal.SIGCONT)
                    else:
                        _nft_partition(sc.lab, old, new, False)
                    moments.append((kind, i, t1))
                    if not _single_holder(sc, old, t1, 5.0):
                        errors.append(f"{kind} {i}: {old} did not end alone with the VIP")
                    time.sleep(1.5)  # steady again before the next round
        finally:
            with contextlib.suppress(Exception):
                _nft_partition(sc.lab, old, new, False)
            with contextlib.suppress(Exception):
                sc.lab.send_signal(old, signal.SIGCONT)
            ev = pr.stop()
        rec = {k: [] for k in ("sigstop", "partition")}
        failed = {k: 0 for k in rec}
        for kind, i, t1 in moments:
            x = probe.recovery(ev, t1, window=1.4)
            rec[kind].append(x["recovery_ms"] if x["recovery_ms"] is not None else float("inf"))
            failed[kind] += x["failed"]
        for kind in rec:
            v = rec[kind]
            r.figures[f"{kind}_client_recovery_ms_median"] = statistics.median(v) if v else None
            r.figures[f"{kind}_client_recovery_ms_max"] = max(v) if v else None
            r.figures[f"{kind}_client_recovery_ms_all"] = [round(x, 1) for x in v]
            r.figures[f"{kind}_failed_probes_after"] = failed[kind]
        r.figures["probes"] = len(ev)
        r.figures["double_master_s"] = sc.lab.double_master_seconds("vi1", 0, time.monotonic())
        r.check(f"{2 * reps} rounds done", not errors and len(moments) == 2 * reps, "; ".join(errors))
        r.check("probes ran all along (a new connection every 5 ms)", len(ev) >= 100 * budget / 4,
                f"{len(ev)} probes")
        for kind, word in (("sigstop", "SIGCONT"), ("partition", "healing")):
            v = rec[kind]
            r.check(f"after {word}, clients served again within one advert interval + 50 ms "
                    f"({bound:.0f} ms), every time", len(v) == reps and max(v) <= bound,
                    f"recovery ms {[round(x, 1) for x in v]}")
    return r


def preempt_stale(topo: Topology, out: Path, rounds: int = 3) -> Result:
    """kill -9 of the primary under fixed-source-port keep-alive clients, restart, preempt
    back: the restarted node's kernel still holds the old connections' sockets (TIME_WAIT,
    FIN_WAIT) for those 4-tuples; unless they are destroyed before it takes the VIP, the
    clients' next requests stall for their whole timeout."""
    r = Result("preempt_stale", f"kill -9, restart and preempt x{rounds} under 32 keep-alive "
               "clients with fixed source ports: no request stalls on a stale socket")
    old, new, vip = _pair(topo)
    budget = rounds * 14.0 + 10
    with Scenario(topo, out, r.name, budget) as sc:
        pr = Prober(sc.lab, out / f"chaos-{sc.name}-probes.jsonl", budget, interval=0,
                    keepalive=32)
        preempts, errors = [], []
        try:
            time.sleep(1.0)
            for i in range(rounds):
                kill_t = sc.lab.kill_lb(old)
                if not _single_holder(sc, new, kill_t, 5.0):
                    errors.append(f"round {i}: {new} never took the VIP")
                    break
                time.sleep(1.0)
                restart_t = time.monotonic()
                sc.lab.start_lb(old)
                back = _wait_holder(sc, old, restart_t, 15.0)
                if back is None:
                    errors.append(f"round {i}: {old} never took the VIP back")
                    break
                preempts.append(back)
                time.sleep(3.0)
        finally:
            ev = pr.stop()
        destroyed = sum(rec.get("sockets", 0) for n in (old, new)
                        for _, rec in sc.lab.log_events(n, "stale_sockets_destroyed"))
        stalls, failed = [], 0
        for t in preempts:
            win = [e for e in ev if e["k"] == "keep" and t - 0.5 <= e["t"] <= t + 2.5]
            failed += sum(1 for e in win if not e["ok"])
            stalls += [e for e in win if not e["ok"] and e["ms"] >= 500]
        r.figures = {"preempts": len(preempts), "keepalive_clients": 32,
                     "requests": sum(1 for e in ev if e["k"] == "keep"),
                     "failed_around_preempt": failed, "stalled_requests": len(stalls),
                     "stale_sockets_destroyed": destroyed}
        r.check(f"{rounds} preempts done", not errors and len(preempts) == rounds, "; ".join(errors))
        r.check("no request stalled (>= 500 ms, the 1 s timeout) around a preempt",
                not stalls, f"{len(stalls)} stalled, e.g. {stalls[:3]}")
        r.check("keep-alive clients ran", r.figures["requests"] >= 32 * 10, str(r.figures["requests"]))
    return r


def _keepalived_conf(topo: Topology, node: str) -> str:
    inst = topo.instances[0]
    return (f"global_defs {{\n  router_id {node}\n  vrrp_version 3\n}}\n"
            f"vrrp_instance {inst.name} {{\n  state BACKUP\n  interface {topo.interface}\n"
            f"  virtual_router_id {inst.vrid}\n  priority {inst.priorities[node]}\n"
            f"  advert_int {topo.advert_interval:g}\n"
            f"  virtual_ipaddress {{\n    {inst.vip} dev {topo.interface}\n  }}\n}}\n")


def keepalived_baseline(topo: Topology, out: Path, kills: int = 5) -> Result:
    """The same kill -9 on the same topology with keepalived (Debian's) as the election and a
    plain HTTP server on each LB node, so halb's figures have a reference measured here."""
    r = Result("keepalived", f"reference: keepalived, same topology and timers, kill -9 of the "
               f"master x{kills}")
    old, new, vip = _pair(topo)
    with Scenario(topo, out, r.name, 15.0 * kills, halbd=False) as sc:
        lab = sc.lab

        def start(node: str) -> None:
            conf = lab.dir / f"keepalived-{node}.conf"
            conf.write_text(_keepalived_conf(topo, node))
            for pf in (f"ka-{node}.pid", f"ka-{node}-vrrp.pid"):  # a killed one's: "already running"
                (lab.dir / pf).unlink(missing_ok=True)
            h = topo.lb(node)
            lab._spawn(f"keepalived-{node}", h.netns,
                       ["keepalived", "-n", "-l", "-D", "-G", "--vrrp", "-f", str(conf),
                        "-p", str(lab.dir / f"ka-{node}.pid"), "-r", str(lab.dir / f"ka-{node}-vrrp.pid")])

        for h in topo.lb_hosts:  # what answers on the VIP: an HTTP server named after the node
            any_addr = "[::]" if topo.family == 6 else "0.0.0.0"
            lab._spawn(f"http-{h.name}", h.netns, [sys.executable, "-m", "lab.backend", "--name",
                                                     h.name, "--http", f"{any_addr}:{HTTP_PORT}"])
            start(h.name)
        wait_until(lambda: sc.watch.first_time(lambda hs: hs == (old,), 0) is not None, 20,
                   f"keepalived on {old} holding the VIP")
        tr = sc.start_traffic("load", seconds=15.0 * kills, src_block=None, extra=["--no-streams"])
        time.sleep(1.0)
        moments, errors = [], []
        for i in range(kills):
            kill_t = time.monotonic()
            os.killpg(lab.pids[f"keepalived-{old}"], signal.SIGKILL)  # parent and VRRP child
            lab.procs[f"keepalived-{old}"].wait(10)
            if not _wait_answer(tr, new, kill_t, 5.0):
                errors.append(f"kill {i}: {new} never answered")
                break
            moments.append(kill_t)
            time.sleep(0.5)
            # the killed keepalived left its VIP behind: a restart cleans it up, as halbd does
            start(old)
            try:
                wait_until(lambda: sc.watch.first_time(lambda hs: hs == (old,), kill_t + 0.5)
                           is not None, 10, f"{old} taking the VIP back")
            except LabError:
                errors.append(f"kill {i}: {old} did not take the VIP back")
                break
            time.sleep(0.5)
        tr.stop()
        tr.wait(20)
        ev = tr.events()
        answered = [_first_answer(ev, new, t) for t in moments]
        answered = [(a - t) * 1000 for a, t in zip(answered, moments) if a is not None]
        failed = [sum(1 for e in ev if e["k"] == "http" and not e["ok"] and t <= e["t"] <= t + 2)
                  for t in moments]
        ver = subprocess.run(["keepalived", "--version"], capture_output=True, text=True, timeout=10)
        r.figures = {"kills": len(moments), "version": (ver.stdout + ver.stderr).split("\n")[0].strip(),
                     "takeover_ms_median": statistics.median(answered) if answered else None,
                     "takeover_ms_max": max(answered) if answered else None,
                     "takeover_ms_all": [round(x, 1) for x in answered],
                     "failed_http_per_kill_median": statistics.median(failed) if failed else None}
        r.check(f"{kills} kills measured", not errors and len(answered) == kills, "; ".join(errors))
    return r


def _first_answer(events: list[dict], node: str, after: float) -> float | None:
    for e in events:
        if e["k"] == "http" and e["ok"] and e.get("b") == node and e["t"] - e.get("ms", 0) / 1000 >= after:
            return e["t"]
    return None


def _wait_answer(tr: Traffic, node: str, after: float, timeout: float) -> bool:
    """Until the traffic's event file shows an answer from ``node`` to a request sent after
    ``after`` (the file is flushed in blocks, so this is approximate; figures come later)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            with open(tr.path) as f:
                tail = f.readlines()[-400:]
        except OSError:
            continue
        for line in tail:
            if f'"b":"{node}"' in line:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if e["t"] - e.get("ms", 0) / 1000 >= after:
                    return True
    return False


# -- the kernel NAT mode (lab.natlab: its own two LANs, prefix "hq") ---------------------------

NAT_PREFIX = "hq"
NAT_MEDIAN_GAP_MS = 250.0


def _nat_gaps(results: list[dict], t: float, window: float = 2.5) -> list[float]:
    out = []
    for c in results:
        g = [ms for start, ms in c["gaps"] if t - window <= start <= t + 0.05]
        out.append(max(g, default=0.0))
    return out


def _nat_scenario(name: str, title: str, out: Path, act: Callable, *, seconds: float,
                  family: int = 4) -> Result:
    """A NAT lab (lb1 master, lb2 backup and synced), 50 TCP connections and 16 UDP flows
    echoing every 50 ms, ``act(lab)`` returning the moments to measure gaps at; every
    connection must survive on its backend. ``family`` 6: the NAT lab's IPv6 variant (IPv6
    VIP, backends and clients, the VIP elected by VRRPv3 over IPv6)."""
    from .natlab import NatLab

    r = Result(name, title)
    d = out / f"{name}{'-v6' if family == 6 else ''}-lab"
    d.mkdir(parents=True, exist_ok=True)
    with NatLab(d, prefix=NAT_PREFIX, family=family) as lab:
        lab.start("lb1")
        lab.wait_state("lb1", "master")
        lab.start("lb2")
        lab.wait_state("lb2", "backup")
        lab.wait_synced("lb2")
        probe = lab.probe(seconds=seconds)
        time.sleep(2.0)
        moments = act(lab)
        res = probe.results()
    broken = [c for c in res if c["error"]]
    moved = [c for c in res if len(c["backends"]) > 1]
    per = [_nat_gaps(res, t) for t in moments]
    medians = [statistics.median(g) for g in per]
    udp = [c for c in res if c["kind"] == "udp"]
    r.figures = {"connections": sum(1 for c in res if c["kind"] == "tcp"), "udp_flows": len(udp),
                 "events": len(moments), "broken": len(broken), "moved_backend": len(moved),
                 "median_gap_ms": [round(m, 1) for m in medians],
                 "worst_gap_ms": [round(max(g), 1) for g in per],
                 "udp_lost": sum(c["lost"] for c in udp),
                 "udp_sent": sum(c["sent"] for c in udp)}
    r.check("every TCP connection and UDP flow lives on", len(res) == 66 and not broken,
            f"{len(broken)} broken: {[c['error'] for c in broken][:5]}")
    r.check("every connection stays on its backend", not moved,
            f"{len(moved)} moved: {[c['backends'] for c in moved][:5]}")
    return r


def nat_kill9(topo: Topology, out: Path, rounds: int = 3) -> Result:
    def act(lab):
        kills = []
        for _ in range(rounds):
            m = lab.master()
            other = "lb2" if m == "lb1" else "lb1"
            kills.append(time.monotonic())
            lab.kill(m)
            lab.wait_state(other, "master", timeout=5)
            time.sleep(0.5)
            lab.start(m)
            lab.wait_state(m, "backup")
            lab.wait_synced(m)
            time.sleep(max(0.0, kills[-1] + 3.0 - time.monotonic()))
        return kills
    r = _nat_scenario("nat_kill9", f"NAT listeners: kill -9 of the master, {rounds}x alternating",
                      out, act, seconds=3.0 + rounds * 3.0 + 2.0, family=topo.family)
    med = r.figures.get("median_gap_ms") or [float("inf")]
    r.check(f"median gap per connection at a takeover <= {NAT_MEDIAN_GAP_MS:.0f} ms",
            statistics.median(med) <= NAT_MEDIAN_GAP_MS, f"{med} ms")
    return r


def nat_sigstop(topo: Topology, out: Path, freeze: float = 2.0) -> Result:
    def act(lab):
        t = [time.monotonic()]
        lab.freeze("lb1")
        lab.wait_state("lb2", "master", timeout=5)
        time.sleep(max(0.0, t[0] + freeze - time.monotonic()))
        t.append(time.monotonic())
        lab.freeze("lb1", on=False)
        lab.wait(lambda: lab.nodes["lb2"].state() == "backup", 5, "lb2 backup after SIGCONT")
        time.sleep(2.0)
        return t
    return _nat_scenario("nat_sigstop", f"NAT listeners: master frozen (SIGSTOP) {freeze:g} s, "
                         "then SIGCONT (it takes the VIPs back)", out, act, seconds=9.0,
                         family=topo.family)


def nat_partition(topo: Topology, out: Path, cut: float = 2.0) -> Result:
    def act(lab):
        t = [time.monotonic()]
        lab.partition(True)
        lab.wait_state("lb2", "master", timeout=5)
        time.sleep(max(0.0, t[0] + cut - time.monotonic()))
        t.append(time.monotonic())
        lab.partition(False)
        lab.wait(lambda: lab.nodes["lb2"].state() == "backup", 5, "lb2 backup after heal")
        time.sleep(2.0)
        return t
    return _nat_scenario("nat_partition", f"NAT listeners: the LB nodes partitioned {cut:g} s "
                         "(both master), then healed", out, act, seconds=9.0,
                         family=topo.family)


SCENARIOS: dict[str, Callable[[Topology, Path], Result]] = {
    "kill9": kill9, "sigstop": sigstop, "partition": partition, "backend_kill": backend_kill,
    "preempt_restart": preempt_restart, "loop": failover_loop, "keepalived": keepalived_baseline,
    "split_brain": split_brain, "preempt_stale": preempt_stale,
    "nat_kill9": nat_kill9, "nat_sigstop": nat_sigstop, "nat_partition": nat_partition,
}


# Scenarios that do not run over IPv6 (``--family 6``), and why. None now: the NAT scenarios
# run on lab.natlab's IPv6 variant since halb's VRRP elects IPv6 VIPs.
IPV4_ONLY: dict[str, str] = {}


def run_one(name: str, topo: Topology, out: Path) -> Result:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if topo.family == 6 and name in IPV4_ONLY:
        return Result(name, f"{name} (IPv6)", error=f"not over IPv6: {IPV4_ONLY[name]}")
    try:
        r = SCENARIOS[name](topo, out)
    except Exception as e:  # noqa: BLE001 - reported as the scenario's error
        r = Result(name, name, error=f"{type(e).__name__}: {e}")
    if topo.family == 6:
        r.title += " (IPv6)"
    r.seconds = time.monotonic() - t0
    return r


# -- the report ---------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def write_report(results: list[Result], out: Path, topo: Topology) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    takeovers, moved = [], []  # kill -9 takeovers only (not the SIGSTOP or partition cases)
    for r in results:
        f = r.figures
        if r.name == "loop":
            takeovers += f.get("takeover_ms_all") or []
            moved += f.get("vip_moved_ms_all") or []
        elif r.name in ("kill9", "preempt_restart"):
            if f.get("takeover_ms") is not None:
                takeovers.append(f["takeover_ms"])
            if f.get("vip_moved_ms") is not None:
                moved.append(f["vip_moved_ms"])
    summary = {"takeover_ms_median": statistics.median(takeovers) if takeovers else None,
               "takeover_ms_max": max(takeovers) if takeovers else None,
               "takeover_samples": len(takeovers),
               "vip_moved_ms_median": statistics.median(moved) if moved else None,
               "vip_moved_ms_max": max(moved) if moved else None,
               "failed_http": sum(r.figures.get("failed_http") or 0 for r in results),
               "sticky_kept": sum(r.figures.get("sticky_kept") or 0 for r in results),
               "sticky_lost": sum(r.figures.get("sticky_lost") or 0 for r in results),
               "double_master_s": sum(r.figures.get("double_master_s") or 0 for r in results),
               # after SIGCONT / after healing: the part that is not the expected reaction
               "double_master_after_recovery_ms": sum(
                   r.figures.get(k) or 0 for r in results
                   for k in ("double_master_after_sigcont_ms", "single_master_after_heal_ms")),
               # what a client sees after two masters meet again (split_brain scenario)
               "client_recovery_ms_max": max(
                   (r.figures.get(k) for r in results
                    for k in ("sigstop_client_recovery_ms_max", "partition_client_recovery_ms_max")
                    if r.figures.get(k) is not None), default=None),
               "stalled_requests_after_preempt": sum(
                   r.figures.get("stalled_requests") or 0 for r in results)}
    data = {"topology": {"subnet": topo.subnet, "lbs": topo.lbs, "backends": topo.backends,
                         "family": topo.family,
                         "advert_interval_ms": topo.advert_interval * 1000,
                         "master_down_interval_ms": _mdi(topo, _pair(topo)[1]) * 1000},
            "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "summary": summary, "scenarios": [r.as_dict() for r in results]}
    sfx = "-v6" if topo.family == 6 else ""  # `chaos --family 6` keeps the IPv4 report
    jp = out / f"chaos-report{sfx}.json"
    jp.write_text(json.dumps(data, indent=1, default=str))
    lines = ["# halb chaos report" + (" (IPv6)" if topo.family == 6 else ""), "",
             f"Generated {data['generated']}; {topo.lbs} LB nodes, {topo.backends} backends, adverts "
             f"every {topo.advert_interval * 1000:g} ms, Master_Down_Interval "
             f"{data['topology']['master_down_interval_ms']:.0f} ms (backup).", "",
             f"**Takeover after kill -9** (to the first HTTP answer through the standby, seen by "
             f"the client): median {_fmt(summary['takeover_ms_median'])} ms, max "
             f"{_fmt(summary['takeover_ms_max'])} ms over {summary['takeover_samples']} samples; "
             f"the standby held the VIP after a median {_fmt(summary['vip_moved_ms_median'])} ms "
             f"(max {_fmt(summary['vip_moved_ms_max'])} ms). "
             f"Failed HTTP requests {summary['failed_http']}; sticky sessions kept "
             f"{summary['sticky_kept']}, lost {summary['sticky_lost']}; time with two masters "
             f"{summary['double_master_s']:.2f} s, nearly all of it while the primary was frozen or "
             f"cut off (a second master is then the expected reaction); after SIGCONT and after "
             f"healing together {summary['double_master_after_recovery_ms']:.0f} ms.", "",
             f"**Client recovery after a split brain heals** (a new connection to the VIP every "
             f"5 ms; from SIGCONT or healing to the first answer after the last failed probe): "
             f"max {_fmt(summary['client_recovery_ms_max'])} ms. Requests stalled on a stale "
             f"socket after a preempt: {summary['stalled_requests_after_preempt']}.", "",
             ]
    ka = next((r for r in results if r.name == "keepalived" and r.figures.get("takeover_ms_median")), None)
    if ka:
        lines += [f"**Reference, keepalived** {ka.figures.get('version', '')} on the same topology and "
                  f"timers (kill -9 of the master, first HTTP answer through the backup): median "
                  f"{_fmt(ka.figures['takeover_ms_median'])} ms, max {_fmt(ka.figures['takeover_ms_max'])} ms "
                  f"over {ka.figures['kills']} kills.", ""]
    lines += ["| scenario | result | figures |", "| --- | --- | --- |"]
    for r in results:
        figs = ", ".join(f"{k} {_fmt(v)}" for k, v in r.figures.items() if not isinstance(v, list))
        lines.append(f"| {r.title} | {'ok' if r.ok else 'FAILED'} ({r.seconds:.0f} s) | {figs} |")
    lines.append("")
    for r in results:
        if not r.ok:
            lines += [f"## {r.name}: failed", "", "```", r.failures(), "```", ""]
    mp = out / f"chaos-report{sfx}.md"
    mp.write_text("\n".join(lines))
    return jp, mp


def run_all(topo: Topology, out_dir: str = "out", only: list[str] | None = None) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = only or [n for n in SCENARIOS if topo.family == 4 or n not in IPV4_ONLY]
    bad = [n for n in names if n not in SCENARIOS]
    if bad:
        print(f"unknown scenario(s) {', '.join(bad)}; known: {', '.join(SCENARIOS)}")
        return 2
    if topo.family == 6:
        bad = [n for n in names if n in IPV4_ONLY]
        if bad:
            print(f"not over IPv6: {', '.join(f'{n} ({IPV4_ONLY[n]})' for n in bad)}")
            return 2
        skipped = [n for n in SCENARIOS if n in IPV4_ONLY and not only]
        print(f"== over IPv6 ({topo.network6}, VIP {topo.vips[0]})"
              + (f"; skipped, IPv4 only: {', '.join(skipped)} ({IPV4_ONLY[skipped[0]]})"
                 if skipped else ""), flush=True)
    results = []
    for n in names:
        print(f"== {n} ...", flush=True)
        r = run_one(n, topo, out)
        results.append(r)
        print(f"   {'ok' if r.ok else 'FAILED'} in {r.seconds:.0f} s: "
              + ", ".join(f"{k}={_fmt(v)}" for k, v in r.figures.items() if not isinstance(v, list)))
        if not r.ok:
            print("   " + r.failures().replace("\n", "\n   "))
    jp, mp = write_report(results, out, topo)
    print(f"wrote {jp} and {mp}")
    return 0 if all(r.ok for r in results) else 1
