"""The failover demo (``./dev demo`` = ``python -m lab demo``).

Builds the default lab (two LB nodes, active-passive; three backends; one client), sends
steady traffic from the client (HTTP from many sticky clients, a TCP and a UDP stream), shows
``halbctl status``, kills the primary with ``kill -9`` and prints what the failover cost:
when the standby held the VIP, when the VIP answered from the standby, the requests that
failed in between, and how many sticky clients kept their backend. Writes
``<out>/failover.png`` (requests per 10 ms by serving node and by backend, kill marked) and
``<out>/failover.json``, then tears the lab down.

Then the kernel NAT part (``run_nat_demo``) on a lab of its own (``lab.natlab``, prefix
``hd``): a long-lived stream (4 TCP connections and 2 UDP flows echoing every 20 ms) through
the ``mode = "nat"`` listeners, kill -9 of the master 2.5 s into it, and its timeline: when
the standby became master, how many replicated conntrack entries its kernel had, and per
connection the last echo before the kill and the first after it, on the same socket and the
same backend. Its figures go into ``failover.json`` under "nat" and ``failover-nat.png``.

Which node served a request is not guessed: the backends echo the address the request came
from, and each LB node connects to the backends from its own address.

``python -m lab demo --family 6`` runs the proxy part over IPv6 (``Topology.family``: the VIP
2001:2::100 with the virtual link-local fe80::33, listeners, backends, state sync and the
client's sources in 2001:2::/64), with the same timeline, figures and picture; the NAT part is
IPv4 only (its timeline reads IPv4 sockets and conntrack entries; lab.natlab itself runs over
IPv6, see tests/lab/test_nat6.py and ``python -m lab chaos --family 6``) and is skipped with a
note.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import netns as nx
from .lab import PY, Lab, LabError, ROOT
from .topology import HTTP_PORT, TCP_PORT, UDP_PORT, Topology

BIN = 0.01  # seconds per histogram bin


# -- measuring ----------------------------------------------------------------------------------


class VipWatch:
    """Polls which LB nodes hold ``vip`` (every ``interval``, one netlink socket kept open per
    namespace: a round costs about 2 ms per node) and records each change with its
    CLOCK_MONOTONIC time. A node counts as a holder while its halbd process exists (also when
    stopped): a killed node's kernel keeps the address, but nothing answers there any more.
    Bounded: stops after ``max_seconds`` or ``stop()``."""

    def __init__(self, lab: Lab, vip: str, interval: float = 0.002, max_seconds: float = 120.0,
                 alive=None):
        self.lab, self.vip, self.interval, self.max_seconds = lab, vip, interval, max_seconds
        self.alive = alive or lab.alive  # node name -> whether its election process exists
        self.changes: list[tuple[float, tuple[str, ...]]] = []
        self._family = 10 if ":" in vip else 2  # AF_INET6, AF_INET
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="vip-watch", daemon=True)

    def _run(self) -> None:
        from pyroute2 import IPRoute
        socks = {h.name: IPRoute(netns=h.netns) for h in self.lab.topo.lb_hosts}
        try:
            end = time.monotonic() + self.max_seconds
            last = None
            while not self._stop.is_set() and time.monotonic() < end:
                cur = []
                for name, ip in socks.items():
                    try:
                        addrs = {m.get_attr("IFA_ADDRESS") for m in ip.get_addr(family=self._family)}
                    except Exception:  # noqa: BLE001 - namespace going away
                        continue
                    if self.vip in addrs and self.alive(name):
                        cur.append(name)
                t = time.monotonic()
                if tuple(cur) != last:
                    self.changes.append((t, tuple(cur)))
                    last = tuple(cur)
                self._stop.wait(self.interval)
        finally:
            for ip in socks.values():
                ip.close()

    def start(self) -> "VipWatch":
        self._t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)

    def first_time(self, cond, after: float) -> float | None:
        for t, holders in self.changes:
            if t >= after and cond(holders):
                return t
        return None

    def double_master_seconds(self, start: float, end: float) -> float:
        """Time in [start, end] during which more than one live node held the VIP (for a
        restarted node: the address its killed predecessor left, until it removes it)."""
        total = 0.0
        pts = self.changes + [(end, ())]
        for (t, h), (t2, _) in zip(pts, pts[1:]):
            a, b = max(t, start), min(t2, end)
            if b > a and len(h) > 1:
                total += b - a
        return total


class Traffic:
    """lab.traffic running in the client namespace, events in ``path`` (JSON lines)."""

    def __init__(self, lab: Lab, path: Path, seconds: float, vip: str | None = None,
                 extra: list[str] | None = None, src_block: int | None = 0,
                 start_timeout: float = 15.0):
        self.path = path
        self.lab = lab
        self._early = ""  # stdout read past the "started" line, handed to wait()
        argv = [PY, "-m", "lab.traffic", "--vip", vip or lab.topo.vips[0], "--seconds", str(seconds),
                "--http-port", str(HTTP_PORT), "--tcp-port", str(TCP_PORT),
                "--udp-port", str(UDP_PORT), "--out", str(path)]
        if src_block is not None and lab.topo.client_sources >= 32 * (src_block + 1):
            argv += ["--src-clients", lab.topo.source_block(src_block)]
        argv += extra or []
        self.p = nx.popen_in(lab.topo.client_hosts[0].netns, argv, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                             env={"PYTHONPATH": str(ROOT), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        line = self._first_line(start_timeout)
        if line is None or not line.startswith('{"event": "started"'):
            self.p.kill()
            try:
                _, err = self.p.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a grandchild holds the pipe open
                err = ""
            why = (f"printed nothing within {start_timeout:g} s" if line is None
                   else f"printed {line.strip()[:300]!r}")
            raise LabError(f"traffic generator did not start (it {why}): {(err or '')[-2000:]}")

    def _first_line(self, timeout: float) -> str | None:
        """The generator's first line, or None if none came within ``timeout`` seconds (a bare
        ``readline()`` would block the demo, with the lab up, if the generator hung). Reads the
        pipe itself (select + os.read), before anything used the text wrapper's buffer; what
        came after the line is kept for ``wait()``. At EOF: what there was (maybe "")."""
        fd = self.p.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
        line, nl, rest = buf.partition(b"\n")
        self._early = rest.decode(errors="replace")
        return line.decode(errors="replace") + nl.decode()

    def wait(self, timeout: float) -> dict:
        try:
            out, err = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, err = self.p.communicate()
            raise LabError("traffic generator overran its time") from None
        if self.p.returncode != 0:
            raise LabError(f"traffic generator failed ({self.p.returncode}): {err[-2000:]}")
        return json.loads((self._early + out).strip().splitlines()[-1])

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)

    def events(self) -> list[dict]:
        out = []
        with open(self.path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:  # a line cut short by a kill
                    pass
        return out


@dataclass
class Failover:
    """What one failover cost, from the client's events (times in ms after the kill)."""
    kill_t: float
    old: str
    new: str
    vip_moved_ms: float | None = None  # the standby added the VIP
    answered_ms: float | None = None  # first HTTP answer through the standby
    tcp_ms: float | None = None  # first TCP echo after the kill (reconnected)
    udp_ms: float | None = None  # first UDP reply through the standby after the kill
    failed_http: int = 0  # failed HTTP requests between the kill and the first answer
    failed_http_total: int = 0  # failed HTTP requests after the kill
    failed_tcp: int = 0
    failed_udp: int = 0
    failed_src: int = 0
    sticky_checked: int = 0  # HTTP clients (cookie) answered before and after the kill
    sticky_kept: int = 0
    sticky_moved: list = field(default_factory=list)
    src_checked: int = 0  # source-sticky TCP clients (replicated table) before and after
    src_kept: int = 0
    src_moved: list = field(default_factory=list)
    tcp_same_backend: bool | None = None
    udp_same_backend: bool | None = None

    @property
    def sticky_pct(self) -> float | None:
        return 100.0 * self.sticky_kept / self.sticky_checked if self.sticky_checked else None

    @property
    def src_pct(self) -> float | None:
        return 100.0 * self.src_kept / self.src_checked if self.src_checked else None

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("sticky_moved", "src_moved")}
        d["sticky_moved"] = self.sticky_moved[:20]
        d["src_moved"] = self.src_moved[:20]
        d["sticky_pct"] = self.sticky_pct
        d["src_pct"] = self.src_pct
        return d


def analyze(events: list[dict], kill_t: float, lab: Lab, old: str, new: str,
            vip_added_t: float | None, until: float | None = None) -> Failover:
    addr = {h.ip: h.name for h in lab.topo.lb_hosts}
    f = Failover(kill_t=kill_t, old=old, new=new)
    if vip_added_t is not None:
        f.vip_moved_ms = (vip_added_t - kill_t) * 1000
    end = until if until is not None else float("inf")
    before: dict[tuple[str, int], str] = {}
    after: dict[tuple[str, int], str] = {}
    first_ok = None
    tcp_before = udp_before = None
    for e in sorted(events, key=lambda e: e["t"]):
        t, k = e["t"], e["k"]
        if t > end:
            break
        served_by = addr.get(e.get("via", ""))
        started_after_kill = t - e.get("ms", 0) / 1000 >= kill_t
        if t < kill_t:
            if e["ok"]:
                if k in ("http", "src"):
                    before[(k, e["c"])] = e["b"]
                elif k == "tcp":
                    tcp_before = e["b"]
                elif k == "udp":
                    udp_before = e["b"]
            continue
        if k == "http":
            if e["ok"] and served_by == new:
                if first_ok is None:
                    first_ok = t
                    f.answered_ms = (t - kill_t) * 1000
                after.setdefault((k, e["c"]), e["b"])
            elif not e["ok"]:
                f.failed_http_total += 1
                if first_ok is None:
                    f.failed_http += 1
        elif k == "src":
            if e["ok"] and started_after_kill:
                after.setdefault((k, e["c"]), e["b"])
            elif not e["ok"]:
                f.failed_src += 1
        elif k == "tcp":
            if e["ok"]:
                # the first echo on a connection opened after the kill: through the standby
                if f.tcp_ms is None and started_after_kill:
                    f.tcp_ms = (t - kill_t) * 1000
                    f.tcp_same_backend = (e["b"] == tcp_before) if tcp_before else None
            else:
                f.failed_tcp += 1
        elif k == "udp":
            if e["ok"]:
                if f.udp_ms is None and started_after_kill:
                    f.udp_ms = (t - kill_t) * 1000
                    f.udp_same_backend = (e["b"] == udp_before) if udp_before else None
            else:
                f.failed_udp += 1
    for (k, c), b in after.items():
        if (k, c) not in before:
            continue
        if k == "http":
            f.sticky_checked += 1
            if before[(k, c)] == b:
                f.sticky_kept += 1
            else:
                f.sticky_moved.append((c, before[(k, c)], b))
        else:
            f.src_checked += 1
            if before[(k, c)] == b:
                f.src_kept += 1
            else:
                f.src_moved.append((c, before[(k, c)], b))
    return f


# -- the picture --------------------------------------------------------------------------------


def plot(events: list[dict], lab: Lab, kill_t: float, fo: Failover, path: Path,
         window: tuple[float, float]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    addr = {h.ip: h.name for h in lab.topo.lb_hosts}
    lo, hi = window
    nbins = int((hi - lo) / BIN) + 1
    xs = [lo + i * BIN for i in range(nbins)]
    by_node: dict[str, list[int]] = {}
    by_backend: dict[str, list[int]] = {}
    failed = [0] * nbins
    for e in events:
        if e["k"] != "http":
            continue
        rel = e["t"] - kill_t
        i = int((rel - lo) / BIN)
        if not 0 <= i < nbins:
            continue
        if e["ok"]:
            by_node.setdefault(addr.get(e.get("via", ""), "?"), [0] * nbins)[i] += 1
            by_backend.setdefault(e.get("b") or "?", [0] * nbins)[i] += 1
        else:
            failed[i] += 1
    fig, axes = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    over = (f" (over IPv6: VIP {lab.topo.vips[0]})" if lab.topo.family == 6 else "")
    for ax, series, title in ((axes[0], by_node, "HTTP answers per 10 ms by serving LB node" + over),
                              (axes[1], by_backend, "HTTP answers per 10 ms by backend")):
        for name in sorted(series):
            ax.step(xs, series[name], where="post", label=name, linewidth=1)
        ax.step(xs, failed, where="post", label="failed", color="red", linewidth=1)
        ax.axvline(0, color="black", linestyle="--", linewidth=1)
        ax.text(0, ax.get_ylim()[1] * 0.95, " kill -9 " + fo.old, va="top", fontsize=9)
        if fo.answered_ms is not None:
            ax.axvline(fo.answered_ms / 1000, color="green", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("requests")
        ax.legend(loc="upper right", fontsize=8, ncol=4)
    axes[1].set_xlabel("seconds since kill -9 of the primary"
                       + (f"  (answered from {fo.new} after {fo.answered_ms:.0f} ms)"
                          if fo.answered_ms is not None else "  (the standby never answered)"))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the demo -----------------------------------------------------------------------------------


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _halbctl_status(lab: Lab, name: str) -> None:
    try:
        r = lab.halbctl(name, "status")
    except Exception as e:  # noqa: BLE001 - shown, not fatal for the demo
        _say(f"  (halbctl failed: {e})")
        return
    text = r.stdout if r.returncode == 0 else f"(halbctl exited {r.returncode}: {r.stderr.strip()})"
    for line in text.rstrip().splitlines():
        _say("  " + line)


def _holders_text(lab: Lab) -> str:
    held = lab.vip_holders()
    return ", ".join(f"{v} on {'+'.join(h for h in hs if lab.alive(h)) or 'nobody'}"
                     for v, hs in held.items())


def run_demo(topo: Topology, out_dir: str = "out", before: float = 3.0, after: float = 3.0,
             nat: bool = True) -> int:
    """The whole demo: the proxy listeners on the default lab, then (``nat``) the kernel NAT
    part on its own lab (``run_nat_demo``). 0 if both failovers did what they should.
    An IPv6 topology (``topo.family == 6``) runs the proxy part over IPv6; the NAT part is
    IPv4 only (its timeline is not ported to IPv6, though ``lab.natlab`` runs over IPv6) and is
    skipped with a note."""
    rc = _run_proxy_demo(topo, out_dir, before, after)
    if nat and topo.family == 6:
        _say("\n== the kernel NAT part runs over IPv4 only (its timeline is not ported to IPv6;"
             " `python -m lab chaos --family 6 --only nat_kill9` runs the NAT mode over IPv6): "
             "skipped; `./dev demo` without --family 6 runs it")
    elif nat:
        rc = max(rc, _run_nat_part(out_dir))
    return rc


def _run_proxy_demo(topo: Topology, out_dir: str, before: float, after: float) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lab = Lab(topo)
    lab.keep_logs = out / "demo-logs"
    inst = topo.instances[0]
    old = inst.owner()
    new = max((n for n in inst.priorities if n != old), key=lambda n: inst.priorities[n])
    vip = str(inst.vip.ip)
    _say(f"== building the lab: {topo.lbs} LB nodes ({topo.mode}), {topo.backends} backends, "
         f"{topo.clients} client; prefix {topo.prefix!r}, subnet {topo.subnet}"
         + (f" and {topo.network6}: IPv6 end to end (VIP, listeners, backends, state sync; "
            f"VRRPv3 adverts to ff02::12, Neighbor Advertisements in place of gratuitous ARP)"
            if topo.family == 6 else ""))
    t0 = time.monotonic()
    try:
        lab.up()
    except LabError as e:
        _say(f"!! the lab did not come up: {e}")
        return 1
    watch = traffic = None
    try:
        _say(f"   up in {time.monotonic() - t0:.1f} s; VIP {vip} on {old}; adverts every "
             f"{topo.advert_interval * 1000:g} ms, Master_Down_Interval of {new}: "
             f"{topo.master_down_interval(inst.priorities[new]) * 1000:.0f} ms")
        _say("   VIPs: " + _holders_text(lab))
        _say(f"\n== halbctl status on {old}")
        _halbctl_status(lab, old)
        events_path = out / "failover-events.jsonl"
        _say(f"\n== traffic from {topo.client_hosts[0].netns}: HTTP from 200 cookie-sticky clients "
             f"(~400 req/s), a TCP and a UDP stream (one message per 10 ms), and 32 source-IP-"
             f"sticky TCP clients (a new connection each 250 ms, each from its own address)")
        traffic = Traffic(lab, events_path, before + after + 1.0, vip=vip)
        watch = VipWatch(lab, vip).start()
        time.sleep(before)
        kill_t = lab.kill_lb(old, signal.SIGKILL)
        _say(f"\n== kill -9 halbd on {old} (pid {lab.pids[old]}) at t=0")
        time.sleep(after)
        summary = traffic.wait(timeout=after + 15)
        watch.stop()
        events = traffic.events()
        vip_added = lab.vips_added_after(new, inst.name, kill_t)  # its own log, to the ms
        fo = analyze(events, kill_t, lab, old, new, vip_added)
        (out / "failover.json").write_text(json.dumps({"family": topo.family, "vip": vip,
                                                       "summary": summary, "failover": fo.as_dict(),
                                                       "vip_changes": [(t - kill_t, h) for t, h in
                                                                       watch.changes]}, indent=1))
        _say("\n== timeline (ms after the kill)")
        _say(f"   {fo.vip_moved_ms:8.1f}  {new} holds the VIP" if fo.vip_moved_ms is not None
             else f"   {new} never took the VIP")
        if fo.answered_ms is None:
            _say(f"   NO FAILOVER: the VIP never answered HTTP from {new} within {after:g} s")
        else:
            _say(f"   {fo.answered_ms:8.1f}  the VIP answered HTTP from {new}")
        if fo.tcp_ms is not None:
            _say(f"   {fo.tcp_ms:8.1f}  the TCP stream echoed again (reconnected; same backend: "
                 f"{fo.tcp_same_backend})")
        if fo.udp_ms is not None:
            _say(f"   {fo.udp_ms:8.1f}  the UDP stream answered again (same backend: "
                 f"{fo.udp_same_backend})")
        lat = [e["ms"] for e in events if e["k"] == "http" and e["ok"] and e["t"] < kill_t]
        _say("\n== what it cost")
        _say(f"   HTTP requests failed before the VIP answered again: {fo.failed_http} "
             f"(after the kill in total: {fo.failed_http_total}); "
             f"TCP messages failed: {fo.failed_tcp}; UDP datagrams lost: {fo.failed_udp}")
        if fo.sticky_checked:
            _say(f"   sticky sessions kept, HTTP cookie clients: {fo.sticky_kept} of "
                 f"{fo.sticky_checked} ({fo.sticky_pct:.1f} %)")
        else:
            _say("   sticky sessions (HTTP cookie): none could be checked (no client was answered "
                 "both before and after the kill)")
        if fo.src_checked:
            _say(f"   sticky sessions kept, source-IP TCP clients (replicated table): "
                 f"{fo.src_kept} of {fo.src_checked} ({fo.src_pct:.1f} %); "
                 f"their failed connections: {fo.failed_src}")
        counts = summary.get("counts", {})
        _say("   traffic: " + ", ".join(f"{k} {v['ok']} ok / {v['failed']} failed"
                                        for k, v in sorted(counts.items()))
             + (f"; HTTP median latency before the kill {statistics.median(lat):.1f} ms" if lat else ""))
        _say("   VIPs now: " + _holders_text(lab))
        _say(f"\n== halbctl status on {new}")
        _halbctl_status(lab, new)
        png = out / "failover.png"
        plot(events, lab, kill_t, fo, png, (-min(before, 1.0), min(after, 2.0)))
        _say(f"\n== wrote {png}, {out / 'failover.json'} and {events_path}")
        return 0 if fo.answered_ms is not None else 1
    except LabError as e:
        _say(f"!! {e}")
        return 1
    finally:
        if traffic is not None:
            traffic.kill()
        if watch is not None:
            watch.stop()
        removed = lab.down()
        left = lab.leftovers()
        _say(f"\n== lab torn down ({len(removed)} items removed"
             + (f"; STILL PRESENT: {left})" if left else "; nothing left behind)"))


# -- the kernel NAT part ------------------------------------------------------------------------
#
# Its own lab (lab.natlab: namespaces hd*, front LAN 198.18.44.0/24, back LAN 198.18.45.0/24),
# so it never meets the proxy lab above. No proxy in the path: each node's kernel forwards
# (nftables DNAT), halbd programs it and replicates the master's conntrack entries into the
# standby's kernel. The stream is lab.natprobe with --gap-ms 0: every interval between two
# answers is listed, so each echo's CLOCK_MONOTONIC time is known.

NAT_PREFIX = "hd"
NAT_TCP_CONNS = 4
NAT_UDP_FLOWS = 2
NAT_INTERVAL = 0.02  # seconds between echoes, per connection and per flow
NAT_SECONDS = 6.0  # the stream's length
NAT_KILL_AFTER = 2.5  # seconds into the stream


def _log_mono(rec: dict, offset: float) -> float | None:
    """A halbd log record's CLOCK_MONOTONIC time (its wall-clock ``ts`` mapped with ``offset``
    = time.time() - time.monotonic() on this same host)."""
    import datetime as dt
    try:
        wall = dt.datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=dt.UTC).timestamp()
    except (KeyError, ValueError):
        return None
    return wall - offset


def _echo_times(conn: dict) -> list[float]:
    """Every answer's CLOCK_MONOTONIC time, from a lab.natprobe result run with --gap-ms 0
    (its ``gaps`` then list every interval between two answers: (start, length ms))."""
    g = conn.get("gaps") or []
    if not g:
        return []
    return [g[0][0]] + [start + ms / 1000 for start, ms in g]


def _client_ports(lab, vip: str, port: int) -> list[int]:
    """Local ports of the client's established TCP sockets to ``vip:port`` (ss in its netns)."""
    import re
    r = nx.run_in(lab.ns["cl"], ["ss", "-tnH", "state", "established", "dst", f"{vip}:{port}"],
                  check=False, timeout=10)
    return sorted({int(m) for m in re.findall(r"\s\S+:(\d+)\s+" + re.escape(vip) + ":",
                                              " " + r.stdout)})


def _conntrack_backends(lab, node: str, vip: str, port: int, backends: dict[str, str]
                        ) -> dict[int, str]:
    """Client port -> backend name of the TCP entries to ``vip:port`` in ``node``'s kernel."""
    import re
    r = nx.run_in(lab.ns[node], ["conntrack", "-L", "-p", "tcp", "-d", vip], check=False,
                  timeout=10)
    out = {}
    for line in r.stdout.splitlines():
        m = re.search(r"sport=(\d+) dport=" + str(port) + r"\s.*?\bsrc=(\S+)", line)
        if m:
            out[int(m.group(1))] = backends.get(m.group(2), m.group(2))
    return out


def _wait_started(log: Path, proc: subprocess.Popen, timeout: float) -> float:
    """lab.natprobe's ``{"started": t}`` line (its CLOCK_MONOTONIC start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith('{"started"'):
                    return float(json.loads(line)["started"])
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    raise LabError(f"the NAT stream client did not start: {log.read_text(errors='replace')[-2000:]}")


def _plot_nat(rows: list[dict], fig_path: Path, window: tuple[float, float], marks: dict) -> None:
    """One row per TCP connection / UDP flow, one tick per echo; the kill and the takeover
    marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.6))
    labels = []
    for y, r in enumerate(rows):
        xs = [t for t in r["echo_times"] if window[0] <= t <= window[1]]
        ax.scatter(xs, [y] * len(xs), marker="|", s=60, linewidths=1,
                   color="tab:blue" if r["kind"] == "tcp" else "tab:orange")
        labels.append(f"{r['kind'].upper()} {r['i']} -> {'/'.join(r['backends']) or '?'}")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylim(-0.7, len(rows) + 0.1)
    ax.axvline(0, color="black", linestyle="--", linewidth=1)
    ax.text(0, len(rows) - 0.05, "kill -9 " + marks["old"] + " ", va="top", ha="right",
            fontsize=9)
    if marks.get("master") is not None:
        ax.axvline(marks["master"], color="green", linestyle=":", linewidth=1)
        ax.text(marks["master"], len(rows) - 0.05, " " + marks["new"] + " master", va="top",
                fontsize=9, color="green")
    ax.set_xlim(*window)
    ax.set_title(f"kernel NAT mode: one tick per echo on long-lived connections through the "
                 f"VIP (the same sockets throughout); {marks['new']} master after "
                 + (f"{marks['master'] * 1000:.0f} ms" if marks.get("master") is not None
                    else "(never)"), fontsize=10)
    ax.set_xlabel("seconds since kill -9 of the master")
    fig.tight_layout()
    fig_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(fig_path, dpi=110)
    plt.close(fig)


def run_nat_demo(out_dir: str | Path = "out", *, seconds: float = NAT_SECONDS,
                 kill_after: float = NAT_KILL_AFTER, tcp_conns: int = NAT_TCP_CONNS,
                 udp_flows: int = NAT_UDP_FLOWS, interval: float = NAT_INTERVAL,
                 prefix: str = NAT_PREFIX, plot_png: bool = True) -> dict:
    """The kernel NAT part of the demo: a NatLab (lb1 master, lb2 backup and synced), a
    long-lived stream through the NAT listeners (``tcp_conns`` TCP connections to www and
    ``udp_flows`` UDP flows to dns, one echo each ``interval``), kill -9 of the master
    ``kill_after`` seconds into it, and the timeline: when the standby became master, how many
    replicated conntrack entries its kernel had, and per connection the last echo before the
    kill and the first after it, on the same connection and backend. Prints it, merges the
    figures into ``<out>/failover.json`` under "nat", draws ``<out>/failover-nat.png``, and
    returns them (``ok``: every connection and flow lived on, on one backend). The lab (its
    files in ``<out>/nat-lab``) is torn down in any case; a lab that does not come up or a
    standby that never takes over raises."""
    from . import natlab
    from .natlab import NatLab, Probe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = out / "nat-lab"
    shutil.rmtree(d, ignore_errors=True)  # halbd logs are appended to: no old run's events
    d.mkdir(parents=True)
    vip, tport, uport = natlab.VIP, natlab.TCP_PORT, natlab.UDP_PORT
    be_ip = {f"{natlab.BACK}.{h}": n for n, h in natlab.BES.items()}
    old, new = "lb1", "lb2"
    _say(f"\n== kernel NAT mode: lab {prefix!r} (front {natlab.FRONT}.0/24, back "
         f"{natlab.BACK}.0/24), NAT listeners www TCP {vip}:{tport} and dns UDP {vip}:{uport} "
         f"-> be1, be2; no proxy in the path: the kernel forwards, halbd programs it and "
         f"replicates conntrack entries to the standby's kernel")
    t0 = time.monotonic()
    res: dict = {}
    try:
        with NatLab(d, prefix=prefix) as lab:
            lab.start(old)
            lab.wait_state(old, "master")
            lab.start(new)
            lab.wait_state(new, "backup")
            lab.wait_synced(new)
            lab.wait(lambda: lab.holders() == [old], 5, f"the VIP on {old} alone")
            _say(f"   up in {time.monotonic() - t0:.1f} s: {old} master, {new} backup and synced; "
                 f"VRRP adverts every {lab.interval}")
            _say(f"   stream from {lab.ns['cl']}: {tcp_conns} TCP connections (each opened once, "
                 f"one echo every {interval * 1000:g} ms) and {udp_flows} UDP flows, "
                 f"{seconds:g} s; kill -9 of {old} {kill_after:g} s into it")
            stream_out = d / "stream.json"
            p, plog = lab.spawn(lab.ns["cl"], [
                PY, "-m", "lab.natprobe", "--tcp", f"{vip}:{tport}", "--tcp-conns",
                str(tcp_conns), "--udp", f"{vip}:{uport}", "--udp-flows", str(udp_flows),
                "--interval", str(interval), "--seconds", str(seconds), "--gap-ms", "0",
                "--reply-timeout", "5", "--out", str(stream_out)], "stream")
            started = _wait_started(plog, p, 15.0)
            time.sleep(max(0.0, started + min(1.0, kill_after / 2) - time.monotonic()))
            entries_before = lab.nat_entries(new)
            ports_before = _client_ports(lab, vip, tport)
            ct_old = _conntrack_backends(lab, old, vip, tport, be_ip)
            _say(f"   before the kill: the client's TCP sockets {ports_before}; {old}'s conntrack "
                 f"sends them to " + ", ".join(f":{p_} -> {b}" for p_, b in sorted(ct_old.items()))
                 + f"; {new} (standby) holds {entries_before} replicated NAT entries")
            time.sleep(max(0.0, started + kill_after - time.monotonic()))
            pid = lab.nodes[old].proc.pid
            offset = time.time() - time.monotonic()
            kill_t = time.monotonic()
            lab.kill(old)
            _say(f"\n== kill -9 halbd on {old} (pid {pid}) at t=0")
            lab.wait_state(new, "master", timeout=5)
            time.sleep(max(0.0, kill_t + min(1.5, (seconds - kill_after) / 2) - time.monotonic()))
            ports_after = _client_ports(lab, vip, tport)
            ct_new = _conntrack_backends(lab, new, vip, tport, be_ip)
            conns = Probe(lab, stream_out, p).results(timeout=seconds + 20)
            metrics = lab.metrics(new)
            node = lab.nodes[new]

            def first(event: str, **match) -> tuple[float | None, dict]:
                for rec in node.events(event):
                    if all(rec.get(k) == v for k, v in match.items()):
                        t = _log_mono(rec, offset)
                        return (None if t is None else (t - kill_t) * 1000), rec
                return None, {}

            master_ms, _ = first("vrrp_state", new="master")
            takeover_ms, takeover = first("nat_takeover")
            vips_ms, _ = first("vips_added")
            fwd = {}
            for k, v in metrics.items():
                if k.startswith("halb_nat_backend_packets"):
                    for lst in ("www", "dns"):
                        if f'listener="{lst}"' in k:
                            fwd[lst] = fwd.get(lst, 0) + int(v)

            ref_ms = next((m for m in (vips_ms, master_ms) if m is not None), 0.0)
            ref_t = kill_t + ref_ms / 1000  # the takeover: the VIPs on the standby
            rows = []
            for c in conns:
                ts = _echo_times(c)
                bef = [t for t in ts if t < kill_t]
                aft = [t for t in ts if t >= kill_t]
                last_ms = (bef[-1] - kill_t) * 1000 if bef else None
                first_ms = (aft[0] - kill_t) * 1000 if aft else None
                broken = bool(c["error"]) or not bef or not aft
                # the two echoes on either side of the moment the standby held the VIPs
                pause = next(((b - a, a, b) for a, b in itertools.pairwise(ts)
                              if a <= ref_t <= b), None)
                rows.append({"kind": c["kind"], "i": c["i"], "backends": c["backends"],
                             "replies": c["replies"], "sent": c["sent"], "lost": c["lost"],
                             "error": c["error"], "max_gap_ms": c["max_gap_ms"],
                             "last_before_ms": None if last_ms is None else round(last_ms, 1),
                             "first_after_ms": None if first_ms is None else round(first_ms, 1),
                             "gap_ms": (round(first_ms - last_ms, 1)
                                        if last_ms is not None and first_ms is not None else None),
                             "pause_ms": None if pause is None else round(pause[0] * 1000, 1),
                             "pause_from_ms": (None if pause is None
                                               else round((pause[1] - kill_t) * 1000, 1)),
                             "pause_to_ms": (None if pause is None
                                             else round((pause[2] - kill_t) * 1000, 1)),
                             "broken": broken, "same_backend": len(c["backends"]) == 1,
                             "echo_times": [round(t - kill_t, 4) for t in ts]})
            tcp = [r for r in rows if r["kind"] == "tcp"]
            udp = [r for r in rows if r["kind"] == "udp"]
            broken = [r for r in rows if r["broken"]]
            moved = [r for r in rows if not r["same_backend"]]
            longest = max((r["max_gap_ms"] for r in rows), default=0.0)
            firsts = [r["first_after_ms"] for r in tcp if r["first_after_ms"] is not None]
            same_sockets = bool(ports_before) and ports_before == ports_after
            res = {
                "prefix": prefix, "vip": vip, "tcp_listener": f"{vip}:{tport}",
                "udp_listener": f"{vip}:{uport}", "old": old, "new": new, "killed_pid": pid,
                "interval_ms": interval * 1000, "seconds": seconds, "kill_after_s": kill_after,
                "standby_entries_before_kill": entries_before,
                "became_master_ms": master_ms, "nat_takeover_ms": takeover_ms,
                "takeover_entries": takeover.get("entries"),
                "takeover_flushed": takeover.get("flushed"),
                "takeover_flush_ms": takeover.get("ms"), "vips_added_ms": vips_ms,
                "first_tcp_echo_after_ms": min(firsts) if firsts else None,
                "takeover_ref_ms": ref_ms,
                "client_ports_before": ports_before, "client_ports_after": ports_after,
                "same_sockets": same_sockets,
                "conntrack_old": {str(k): v for k, v in sorted(ct_old.items())},
                "conntrack_new": {str(k): v for k, v in sorted(ct_new.items())},
                "new_master_forwarded_packets": fwd,
                "tcp_conns": len(tcp), "udp_flows": len(udp), "broken": len(broken),
                "moved": len(moved), "longest_gap_ms": longest,
                "udp_lost": sum(r["lost"] for r in udp), "udp_sent": sum(r["sent"] for r in udp),
                "conns": rows,
            }
            res["ok"] = (master_ms is not None and len(tcp) == tcp_conns
                         and len(udp) == udp_flows and not broken and not moved)

            timeline = []
            if master_ms is not None:
                timeline.append((master_ms, f"{new} became master"))
            if takeover_ms is not None:
                timeline.append((takeover_ms, (f"{new}'s kernel had {takeover.get('entries')} "
                                               "replicated conntrack entries (nat_takeover, "
                                               "before the VIPs go up)")))
            if vips_ms is not None:
                timeline.append((vips_ms, (f"{new} holds the VIP {vip} and the backends' "
                                           f"gateway {natlab.GW}")))
            if firsts:
                timeline.append((min(firsts), "the first TCP echo after the kill"))
            def across(r: dict) -> str:
                if r["pause_ms"] is None:
                    return ""
                return (f"; across the takeover ({ref_ms:+.1f} ms) echoes at "
                        f"{r['pause_from_ms']:+.1f} and {r['pause_to_ms']:+.1f} ms, "
                        f"{r['pause_ms']:.1f} ms apart")

            lines = []
            _say("\n== NAT timeline (ms after the kill)")
            if master_ms is None:
                _say(f"   {new} never became master")
            for ms, text in sorted(timeline):
                line = f"   {ms:8.1f}  {text}"
                lines.append(line)
                _say(line)
            for r in tcp:
                if r["broken"]:
                    line = (f"   connection {r['i']}: BROKEN ({r['error'] or 'no echo after the kill'})"
                            f", backends {r['backends']}")
                else:
                    line = (f"   connection {r['i']}: last echo before the kill at "
                            f"{r['last_before_ms']:+.1f} ms, first echo after at "
                            f"{r['first_after_ms']:+.1f} ms" + across(r) + ", same connection, "
                            + (f"same backend {r['backends'][0]}" if r["same_backend"]
                               else f"MOVED between backends {r['backends']}"))
                lines.append(line)
                _say(line)
            for r in udp:
                if r["broken"]:
                    line = f"   UDP flow {r['i']}: BROKEN (no answer after the kill)"
                else:
                    line = (f"   UDP flow {r['i']}: last answer before the kill at "
                            f"{r['last_before_ms']:+.1f} ms, first answer after at "
                            f"{r['first_after_ms']:+.1f} ms" + across(r) + ", same flow, "
                            + (f"same backend {r['backends'][0]}" if r["same_backend"]
                               else f"MOVED between backends {r['backends']}")
                            + f" ({r['lost']} of {r['sent']} datagrams lost)")
                lines.append(line)
                _say(line)
            _say(f"   (kill -9 ends halbd, not {old}'s kernel: it forwards on until {new} adds "
                 f"the VIPs and sends gratuitous ARPs; from then on {new}'s kernel carries the "
                 f"same connections with the replicated entries)")
            held = [p_ for p_ in ports_before if p_ in ct_new]
            _say(f"   the client's TCP sockets after the kill: {ports_after} ("
                 + ("the same ones" if same_sockets else "NOT the same ones")
                 + f"); {new}'s conntrack holds {len(held)} of them ("
                 + ", ".join(f":{p_} -> {ct_new[p_]}" for p_ in held) + ")")
            if fwd:
                _say(f"   {new}'s kernel forwarded " + ", ".join(f"{v} {k}" for k, v in
                                                             sorted(fwd.items()))
                     + " packets to the backends since it took over (halb_nat_backend_packets)")
            tcp_worst = max((r["max_gap_ms"] for r in tcp), default=0.0)
            if tcp_worst >= 150:
                _say("   (a TCP gap of ~200 ms and more is the client's retransmission timer: "
                     "the segment in flight at the takeover is resent after the RTO, at least "
                     "200 ms on Linux)")
            summary = (f"NAT stream: {len(tcp)} TCP connections and {len(udp)} UDP flows, "
                       f"{len(broken)} broken, longest gap {longest:.0f} ms, "
                       + ("every one on its backend" if not moved
                          else f"{len(moved)} MOVED to another backend"))
            lines.append(summary)
            res["timeline"] = lines
            _say(f"\n== {summary}")
            _say(f"   (without replication, [nat] replicate = false, the same kill resets the TCP "
                 f"connections: {new}'s kernel tracks TCP strictly and has no entry for them; "
                 f"tests/lab/test_nat.py shows it)")
            fj = out / "failover.json"
            try:
                doc = json.loads(fj.read_text())
            except (OSError, ValueError):
                doc = {}
            doc["nat"] = res
            fj.write_text(json.dumps(doc, indent=1))
            written = [fj]
            if plot_png:
                png = out / "failover-nat.png"
                _plot_nat(rows, png, (-min(kill_after, 1.0), min(seconds - kill_after, 2.0)),
                          {"old": old, "new": new,
                           "master": None if master_ms is None else master_ms / 1000})
                written.insert(0, png)
            _say(f"\n== wrote {' and '.join(str(w) for w in written)} (\"nat\"); "
                 f"NAT lab files in {d}")
    finally:
        left = [n for n in nx.list_ns() if n.startswith(prefix)]
        _say("\n== NAT lab torn down" + (f"; STILL PRESENT: {left}" if left
                                          else "; nothing left behind"))
    return res


def _run_nat_part(out_dir: str) -> int:
    try:
        res = run_nat_demo(out_dir)
    except (LabError, TimeoutError, AssertionError, OSError, ValueError,
            subprocess.SubprocessError) as e:
        _say(f"!! the NAT part failed: {e}")
        return 1
    return 0 if res.get("ok") else 1
