"""The network-namespace lab: build a topology, run halbd and backends in it, tear it down.

    lab = Lab(Topology(prefix="hl6", subnet="198.18.60.0/24"))
    lab.up()                      # refuses (LabError) while a lab with this prefix stands
    lab.vip_holders()             # {"198.18.60.100": ["lb1"]}
    lab.kill_lb("lb1")            # kill -9
    lab.down()                    # everything it made, also after a crash (by name prefix)

Every namespace and root-namespace link is named ``<prefix>-...``; the state (topology,
pids) lives in ``/run/halb-lab/<prefix>/state.json`` next to the configs, certificates, logs
and control sockets, so ``python -m lab down`` in another process (or after a crash) finds
and removes everything; without a state file it still removes whatever carries the prefix.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from . import netns as nx
from .topology import (BACKEND_HTTP, BACKEND_TCP, BACKEND_UDP, HTTP_PORT, Topology)

ROOT = Path(__file__).resolve().parents[1]
RUN_ROOT = Path(os.environ.get("HALB_LAB_RUN", "/run/halb-lab"))
PY = sys.executable
CLONE_NEWNET = 0x40000000


class LabError(Exception):
    pass


class ProcessDied(LabError):
    """A lab process exited while it should be running; waiting longer cannot help."""


# -- running code inside a namespace -----------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def ns_call(ns: str, fn: Callable[..., Any], *args, timeout: float = 10.0) -> Any:
    """Runs ``fn(*args)`` in a short-lived thread switched into namespace ``ns`` (setns only
    moves the calling thread, so the caller stays where it is). Sockets made there stay there."""
    box: dict = {}

    def target():
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"setns({ns}): {os.strerror(e)}")
            finally:
                os.close(fd)
            box["v"] = fn(*args)
        except BaseException as e:  # handed to the caller
            box["e"] = e

    t = threading.Thread(target=target, name=f"ns-{ns}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"call in namespace {ns} took longer than {timeout}s")
    if "e" in box:
        raise box["e"]
    return box.get("v")


def log_events(text: str, event: str) -> list[dict]:
    """The records of ``event`` in a halbd log (one JSON object per line; other lines, such
    as a --check warning printed before logging starts, are passed over)."""
    out = []
    for line in text.splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if d.get("event") == event:
            out.append(d)
    return out


def http_get(host: str, port: int, path: str = "/", timeout: float = 1.0,
             headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 GET (Connection: close), for probes; (status, headers, body)."""
    import http.client
    c = http.client.HTTPConnection(host, port, timeout=timeout)  # brackets an IPv6 Host itself
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def tcp_ok(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except ProcessDied:
            raise
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(interval)
    raise LabError(f"timed out after {timeout:g}s waiting for {what}" + (f" ({last!r})" if last else ""))


def clean(prefix: str, run_root: Path | None = None) -> list[str]:
    """Removes whatever a lab with ``prefix`` left behind, with or without its state file."""
    try:
        lab = Lab.load(prefix, run_root)
    except LabError:
        lab = Lab(dataclasses.replace(Topology(), prefix=prefix), run_root)
    return lab.down()


# -- the lab ------------------------------------------------------------------------------------


def _topo_to_json(t: Topology) -> dict:
    d = dataclasses.asdict(t)
    d.pop("extra", None)
    return d


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_ours(pid: int) -> bool:
    """Whether ``pid`` is still a halbd or lab backend (not a recycled pid)."""
    cmd = _cmdline(pid)
    return "halb.cli.halbd" in cmd or "lab.backend" in cmd


class Lab:
    def __init__(self, topo: Topology, run_root: Path | None = None):
        self.topo = topo
        self.dir = (run_root or RUN_ROOT) / topo.prefix
        self.state_file = self.dir / "state.json"
        self.procs: dict[str, subprocess.Popen] = {}  # started by this process
        self.pids: dict[str, int] = {}
        self.ports: dict[str, str] = {}  # host name -> its veth on the bridge (switch namespace)
        self.deaths: dict[str, list[float]] = {}  # LB node -> CLOCK_MONOTONIC of each kill -9
        self.keep_logs: Path | None = None  # down() copies the logs and configs here first

    # -- state ------------------------------------------------------------------------------

    @classmethod
    def load(cls, prefix: str, run_root: Path | None = None) -> "Lab":
        """The lab recorded under ``prefix``; LabError when there is none."""
        sf = (run_root or RUN_ROOT) / prefix / "state.json"
        try:
            st = json.loads(sf.read_text())
        except (OSError, ValueError) as e:
            raise LabError(f"no lab state for prefix {prefix!r} ({sf}: {e})") from None
        lab = cls(Topology(**st["topology"]), run_root)
        lab.pids = {k: int(v) for k, v in st.get("pids", {}).items()}
        lab.ports = dict(st.get("ports", {}))
        return lab

    def _save(self, phase: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"topology": _topo_to_json(self.topo), "phase": phase,
                                   "pids": self.pids, "ports": self.ports,
                                   "created": time.time()}, indent=1))
        tmp.replace(self.state_file)

    def leftovers(self) -> list[str]:
        """What still stands under this prefix: namespaces, root links, the state file."""
        pre = self.topo.ns_prefix
        found = [n for n in nx.list_ns() if n.startswith(pre)]
        with nx.ipr() as ip:
            found += [l.get_attr("IFLA_IFNAME") for l in ip.get_links()
                      if (l.get_attr("IFLA_IFNAME") or "").startswith(pre)]
        if self.state_file.exists():
            found.append(str(self.state_file))
        return found

    # -- paths ------------------------------------------------------------------------------

    @property
    def config_dir(self) -> Path:
        return self.dir / "configs"

    @property
    def pki_dir(self) -> Path:
        return self.dir / "pki"

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    def config_path(self, lb: str) -> Path:
        return self.config_dir / f"{lb}.toml"

    def control_socket(self, lb: str) -> Path:
        return self.run_dir / f"{lb}.sock"

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    # -- up -------------------------------------------------------------------------------------

    def up(self, *, wait: bool = True, timeout: float = 30.0, tls: bool = True,
           halbd: bool = True) -> None:
        """Builds the namespaces, writes configs and certificates, starts backends and (unless
        ``halbd`` is False: LB namespaces left empty for another program) halbd.

        Refuses with LabError while anything of a lab with the same prefix still stands. On any
        failure everything made so far is removed again before the error propagates."""
        left = self.leftovers()
        if left:
            raise LabError(
                f"a lab with prefix {self.topo.prefix!r} is still standing ({', '.join(left[:6])}"
                f"{', ...' if len(left) > 6 else ''}); run `python -m lab down --prefix "
                f"{self.topo.prefix}` first")
        t = self.topo
        try:
            self._save("building")
            for d in (self.config_dir, self.log_dir, self.run_dir):
                d.mkdir(parents=True, exist_ok=True)
            v6 = t.family == 6
            lan = nx.Lan(t.ns_prefix, str(t.network), subnet6=str(t.network6) if v6 else None)
            for h in t.hosts:
                lan.add_host(h.netns, str(h.address.ip), ifname=t.interface,
                             address6=str(h.address6.ip) if h.address6 else None)
                self.ports[h.name] = lan.port_of(h.netns)
            if t.source_addresses():
                with nx.ipr(t.client_hosts[0].netns) as ip:  # one netlink socket for all
                    idx = ip.link_lookup(ifname=t.interface)[0]
                    for a in t.source_addresses():
                        ip.addr("add", index=idx, address=str(a.ip), prefixlen=a.network.prefixlen)
                if v6:  # the client's own connections from its own address (see _vip_labels)
                    nx.run_in(t.client_hosts[0].netns, ["ip", "-6", "addrlabel", "add", "prefix",
                                                        t.source_block(0, t.client_sources),
                                                        "label", "1000"])
            for h in t.lb_hosts:
                # listeners use IP_FREEBIND; this covers any socket that does not
                nx.sysctl("net.ipv4.ip_nonlocal_bind", 1, ns=h.netns)
                if v6:
                    nx.sysctl("net.ipv6.ip_nonlocal_bind", 1, ns=h.netns)
                    self._vip_labels(h.netns)
            pki = None
            if tls:
                from halb import pki as hpki
                hpki.generate(self.pki_dir, [h.name for h in t.lb_hosts],
                              ips={h.name: sorted({str(h.address.ip), h.ip}) for h in t.lb_hosts})
                pki = str(self.pki_dir)
            t.write_configs(self.config_dir, state_dir=str(self.run_dir), pki_dir=pki)
            for b in t.backend_hosts:
                self.start_backend(b.name)
            for h in t.lb_hosts if halbd else []:
                self.start_lb(h.name)
            self._save("up")
            if wait:
                self.wait_ready(timeout, vips=halbd)
        except BaseException:
            self.down()
            raise

    def _vip_labels(self, ns: str) -> None:
        """Keeps an LB node from choosing an IPv6 VIP as the source of its own connections
        (to the backends, its health checks, sync). Source address selection (RFC 6724)
        ranks a VIP and the node's own address in the same /64 equal up to the last rule,
        and Linux then takes the newest address: the VIP. Connections from the VIP would
        break the lab's attribution (the backends name the LB node by the source they see)
        and, after a kill -9 leaves the VIP on the dead node's interface, could get their
        answers delivered there. A policy label of their own on the VIPs (rule 6, "prefer a
        matching label") rules them out; IPv4 picks the subnet's primary address anyway.
        The client's extra source addresses get one too, so that only the source-sticky
        clients, which bind them, use them."""
        for i in self.topo.instances:
            nx.run_in(ns, ["ip", "-6", "addrlabel", "add", "prefix", f"{i.vip.ip}/128",
                           "label", str(1000 + i.vrid)])

    def _spawn(self, name: str, ns: str, argv: list[str]) -> int:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path(name), "ab") as logf:
            p = nx.popen_in(ns, argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=str(ROOT), env=env)
        self.procs[name] = p
        self.pids[name] = p.pid
        return p.pid

    def start_backend(self, name: str) -> int:
        h = next(b for b in self.topo.backend_hosts if b.name == name)
        ip = f"[{h.ip}]" if ":" in h.ip else h.ip
        return self._spawn(name, h.netns, [PY, "-m", "lab.backend", "--name", name,
                                           "--http", f"{ip}:{BACKEND_HTTP}",
                                           "--tcp", f"{ip}:{BACKEND_TCP}",
                                           "--udp", f"{ip}:{BACKEND_UDP}"])

    def start_lb(self, name: str) -> int:
        """Starts (or restarts) halbd on LB node ``name``."""
        h = self.topo.lb(name)
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            raise LabError(f"halbd on {name} is still running (pid {old.pid})")
        with contextlib.suppress(FileNotFoundError):
            self.control_socket(name).unlink()
        pid = self._spawn(name, h.netns, [PY, "-m", "halb.cli.halbd", str(self.config_path(name))])
        if self.state_file.exists():
            self._save("up")
        return pid

    def kill_backend(self, name: str) -> None:
        """kill -9 of backend ``name``'s process."""
        self.send_signal(name, signal.SIGKILL)
        p = self.procs.get(name)
        if p is not None:
            p.wait(timeout=10)

    def send_signal(self, name: str, sig: int) -> None:
        pid = self.pids[name]
        os.kill(pid, sig)

    def kill_lb(self, name: str, sig: int = signal.SIGKILL, wait: bool = True) -> float:
        """Sends ``sig`` (default kill -9) to halbd on ``name``; returns CLOCK_MONOTONIC at the
        moment it was sent. With SIGKILL and ``wait``, returns once the process is gone."""
        t = time.monotonic()
        self.send_signal(name, sig)
        if sig == signal.SIGKILL:
            self.deaths.setdefault(name, []).append(t)
        p = self.procs.get(name)
        if wait and sig == signal.SIGKILL and p is not None:
            p.wait(timeout=10)
        return t

    def log_events(self, name: str, event: str, instance: str | None = None
                   ) -> list[tuple[float, dict]]:
        """``event`` records from halbd's log on ``name`` as (CLOCK_MONOTONIC, record); the
        wall-clock ``ts`` (ms) is mapped onto the monotonic clock of this same host."""
        import datetime as dt
        offset = time.time() - time.monotonic()
        try:
            lines = self.log_path(name).read_text(errors="replace").splitlines()
        except OSError:
            return []
        out = []
        needle = f'"event":"{event}"'
        for line in lines:
            if needle not in line:
                continue
            try:
                rec = json.loads(line)
                if instance is not None and rec.get("instance") != instance:
                    continue
                wall = dt.datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                    tzinfo=dt.timezone.utc).timestamp()
            except (ValueError, KeyError):
                continue
            out.append((wall - offset, rec))
        return out

    def vips_added_after(self, name: str, instance: str, t: float) -> float | None:
        """When halbd on ``name`` first added ``instance``'s VIPs at or after ``t`` (its log)."""
        times = [at for at, _ in self.log_events(name, "vips_added", instance) if at >= t - 0.001]
        return min(times) if times else None

    def master_intervals(self, name: str, instance: str, until: float | None = None
                         ) -> list[tuple[float, float]]:
        """When halbd on ``name`` was master of ``instance``: [(start, end)] in CLOCK_MONOTONIC,
        from its own log (``vrrp_state`` records) and the kills sent to it. A frozen (SIGSTOP)
        master still counts: it still holds the VIP and believes it is master."""
        marks: list[tuple[float, str]] = [(t, "dead") for t in self.deaths.get(name, [])]
        for t, rec in self.log_events(name, "vrrp_state", instance):
            marks.append((t, "master" if rec.get("new") == "master" else "other"))
        marks.sort()
        out: list[tuple[float, float]] = []
        begin = None
        for t, what in marks:
            if what == "master":
                if begin is None:
                    begin = t
            elif begin is not None:
                out.append((begin, t))
                begin = None
        if begin is not None:
            out.append((begin, until if until is not None else time.monotonic()))
        return out

    def _master_levels(self, instance: str, start: float, end: float) -> list[tuple[float, int]]:
        """(time, number of masters from then on) over [start, end]."""
        points: list[tuple[float, int]] = []
        for h in self.topo.lb_hosts:
            for a, b in self.master_intervals(h.name, instance, until=end):
                a, b = max(a, start), min(b, end)
                if b > a:
                    points += [(a, 1), (b, -1)]
        points.sort()
        out, level = [(start, 0)], 0
        for t, d in points:
            level += d
            out.append((t, level))
        return out

    def double_master_seconds(self, instance: str, start: float, end: float) -> float:
        """Seconds in [start, end] during which two or more nodes were master of ``instance``."""
        lv = self._master_levels(instance, start, end) + [(end, 0)]
        return sum(t2 - t for (t, n), (t2, _) in zip(lv, lv[1:]) if n >= 2)

    def double_master_end(self, instance: str, start: float, end: float) -> float | None:
        """When the last stretch of two or more masters in [start, end] ended (None: there was
        none; ``end``: it had not ended)."""
        last = None
        lv = self._master_levels(instance, start, end)
        for (t, n), (t2, _) in zip(lv, lv[1:] + [(end, 0)]):
            if n >= 2:
                last = t2
        return last


    def alive(self, name: str) -> bool:
        p = self.procs.get(name)
        if p is not None:
            return p.poll() is None
        pid = self.pids.get(name)
        return bool(pid) and _is_ours(pid)

    # -- observing --------------------------------------------------------------------------

    def vip_holders(self) -> dict[str, list[str]]:
        """VIP -> LB nodes whose data interface holds it right now."""
        vips = self.topo.vips
        out: dict[str, list[str]] = {v: [] for v in vips}
        for h in self.topo.lb_hosts:
            try:
                addrs = set(nx.addresses(self.topo.interface, ns=h.netns))
            except Exception:  # noqa: BLE001 - a namespace being torn down
                continue
            for v in vips:
                if v in addrs:
                    out[v].append(h.name)
        return out

    def in_client(self, fn: Callable[..., Any], *args, client: int = 0, timeout: float = 10.0):
        return ns_call(self.topo.client_hosts[client].netns, fn, *args, timeout=timeout)

    def halbctl(self, name: str, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "halb.cli.halbctl", "--socket", str(self.control_socket(name)),
                               *args], capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                              env={**os.environ, "PYTHONPATH": str(ROOT)})

    def output(self, name: str, tail: int = 4000) -> str:
        try:
            return self.log_path(name).read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise ProcessDied(f"{name} exited with {p.returncode}; the end of its log "
                                  f"({self.log_path(name)}):\n{self.output(name, 2500)}")

    def wait_ready(self, timeout: float = 30.0, vips: bool = True) -> None:
        """Until every backend answers, and (``vips``) each VIP is held by its owner only and
        answers HTTP."""
        t = self.topo

        def backends_up():
            self._check_alive()
            return all(self.in_client(tcp_ok, b.ip, BACKEND_HTTP)
                       for b in t.backend_hosts)
        wait_until(backends_up, timeout, "the backends")
        if not vips:
            return

        def vips_owned():
            self._check_alive()
            holders = self.vip_holders()
            return all(holders[str(i.vip.ip)] == [i.owner()] for i in t.instances)
        try:
            wait_until(vips_owned, timeout, "each VIP held by its owner only")
        except ProcessDied:
            raise
        except LabError as e:
            raise LabError(f"{e}; VIPs now {self.vip_holders()}; the LB nodes' last election and "
                           f"sync records:\n{self._diag()}") from None

        def http_ok():
            self._check_alive()
            return all(self.in_client(http_get, v, HTTP_PORT, "/ready")[0] == 200 for v in t.vips)
        wait_until(http_ok, timeout, "HTTP answers on every VIP")

    def _diag(self, n: int = 8) -> str:
        out = []
        for h in self.topo.lb_hosts:
            lines = [ln for ln in self.output(h.name, 200_000).splitlines()
                     if '"part":"vrrp"' in ln or '"part":"sync"' in ln]
            out += [f"  {h.name}: {ln[:300]}" for ln in lines[-n:]]
        return "\n".join(out)

    def status(self) -> dict:
        t = self.topo
        procs = {name: {"pid": self.pids.get(name), "alive": self.alive(name)}
                 for name in [h.name for h in t.lb_hosts + t.backend_hosts]}
        present = set(nx.list_ns())
        return {"prefix": t.prefix, "subnet": t.subnet, "mode": t.mode, "family": t.family,
                "dir": str(self.dir),
                "namespaces": {h.netns: h.netns in present for h in t.hosts},
                "vips": self.vip_holders() if all(h.netns in present for h in t.lb_hosts) else {},
                "processes": procs}

    # -- down -----------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Removes everything this lab made: processes, namespaces, links, state directory.
        Safe to call at any time, also when nothing (or only part) stands."""
        removed = []
        for name, pid in list(self.pids.items()):
            p = self.procs.get(name)
            if (p.poll() is None) if p is not None else _is_ours(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGCONT)  # a stopped process cannot die of SIGKILL late
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                removed.append(f"{name}[{pid}]")
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self.procs.clear()
        self.pids.clear()
        removed += nx.cleanup(self.topo.ns_prefix)
        if self.keep_logs is not None and self.log_dir.exists():
            self.keep_logs.mkdir(parents=True, exist_ok=True)
            for src in list(self.log_dir.glob("*.log")) + list(self.config_dir.glob("*.toml")):
                with contextlib.suppress(OSError):
                    shutil.copy2(src, self.keep_logs / src.name)
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
            removed.append(str(self.dir))
        with contextlib.suppress(OSError):  # only when no other lab lives there
            self.dir.parent.rmdir()
        return removed
