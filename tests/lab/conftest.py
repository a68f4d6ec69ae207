"""Lab fixtures for the election tests: a LAN in network namespaces, real halbd processes.

Topology (all names start with ``hv``; dual stack, 198.18.40.0/24 and 2001:2:40::/64):

    hvsw:  bridge hvbr0
    hvlb1: eth0 198.18.40.11  2001:2:40::11   halbd (or keepalived)
    hvlb2: eth0 198.18.40.12  2001:2:40::12   halbd (or keepalived)
    hvcl:  eth0 198.18.40.2   2001:2:40::2    client, TCP backends on 198.18.40.2:7001/7002
                                              (lab.backend)

VIPs come from 198.18.40.100-199 (IPv6: 2001:2:40::100-199 and the virtual link-local fe80::28). Each test leaves nothing behind (namespaces, processes),
also when it fails; ``lab.netns.cleanup("hv")`` first removes what an interrupted run left.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from lab import netns as nx
from lab.lab import log_events
from tests.helpers import Halbd, Proc, wait_for

PREFIX = "hv"
SUBNET = "198.18.40.0/24"
LB1, LB2, CLIENT = "198.18.40.11", "198.18.40.12", "198.18.40.2"
SUBNET6 = "2001:2:40::/64"
LB1_6, LB2_6, CLIENT6 = "2001:2:40::11", "2001:2:40::12", "2001:2:40::2"
BACKEND_PORT = 7001  # be1 (lb1's pool); be2 listens on 7002 (lb2's pool)
VIP_PORT = 8000
PY = sys.executable


def config(name: str, *, backend_port: int | None = None, vrid: int = 40, priority: int = 100, vips=("198.18.40.100/24",),
           interval: str = "100ms", preempt: bool = True, checksum: str = "rfc9568",
           extra_vrrp: str = "", extra: str = "", listen_vips: bool = True,
           instance: str = "vi", auth_key: str = "") -> str:
    """A halbd config: a TCP listener on each VIP in front of the client-side backend."""
    listeners = ""
    if listen_vips:
        for i, v in enumerate(vips):
            ip = v.split("/")[0]
            if ip.startswith("fe80:"):
                continue  # a virtual link-local address: in adverts, not served
            bind = f"[{ip}]:{VIP_PORT}" if ":" in ip else f"{ip}:{VIP_PORT}"
            listeners += f"""
[[listeners]]
name = "l{i}"
mode = "tcp"
bind = "{bind}"
pool = "p"
"""
    vips_toml = ", ".join(f'"{v}"' for v in vips)
    auth = f'auth_key = "{auth_key}"\n' if auth_key else ""
    return f"""
[node]
name = "{name}"
log_level = "info"
state_dir = "/tmp"

[control]
socket = "/tmp/halb-lab-{name}-{vrid}.sock"

[[pools]]
name = "p"
  [[pools.backends]]
  name = "b1"
  address = "{CLIENT}:{backend_port or (7001 if name.endswith('1') else 7002)}"
{listeners}
[[vrrp]]
name = "{instance}"
interface = "eth0"
vrid = {vrid}
priority = {priority}
vips = [{vips_toml}]
advert_interval = "{interval}"
preempt = {"true" if preempt else "false"}
checksum = "{checksum}"
{auth}{extra_vrrp}
{extra}
"""


class Lab:
    """The LAN plus helpers to start halbd nodes and look at the VIPs."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        nx.cleanup(PREFIX)
        self.lan = nx.Lan(PREFIX, SUBNET, subnet6=SUBNET6)
        try:
            self.lan.add_host("hvlb1", LB1, address6=LB1_6)
            self.lan.add_host("hvlb2", LB2, address6=LB2_6)
            self.lan.add_host("hvcl", CLIENT, address6=CLIENT6)
        except Exception:
            self.lan.close()
            raise
        self.procs: list[Proc] = []
        self.backends = {n: self.backend(n, CLIENT, port) for n, port in (("be1", 7001), ("be2", 7002))}

    def backend(self, name: str, host: str, port: int, ns: str = "hvcl") -> Proc:
        p = self.proc([PY, "-m", "lab.backend", "--name", name, "--tcp", f"{host}:{port}"],
                      ns, f"backend-{name}")
        return p

    def proc(self, argv, ns: str, logname: str) -> Proc:
        p = Proc(argv, netns=ns, log=self.tmp / f"{logname}.log")
        self.procs.append(p)
        return p

    def halbd(self, ns: str, text: str, tag: str | None = None) -> Halbd:
        tag = tag or ns
        path = self.tmp / f"{tag}.toml"
        path.write_text(text)
        h = Halbd(path, netns=ns, log=self.tmp / f"{tag}-{len(self.procs)}.log")
        self.procs.append(h)
        return h

    def vips(self, ns: str) -> set[str]:
        try:
            return set(nx.addresses("eth0", ns=ns)) - {LB1, LB2, CLIENT, LB1_6, LB2_6, CLIENT6}
        except Exception:  # noqa: BLE001 - the namespace may be going away
            return set()

    def holder(self, vip: str) -> list[str]:
        ip = vip.split("/")[0]
        return [ns for ns in ("hvlb1", "hvlb2") if ip in self.vips(ns)]

    def wait_holder(self, vip: str, ns: str, timeout: float = 10.0) -> None:
        wait_for(lambda: self.holder(vip) == [ns], timeout, interval=0.01,
                 what=f"{vip} held by {ns} alone (now {self.holder(vip)})")

    def client(self, code: str, timeout: float = 30.0) -> str:
        """Runs python ``code`` in the client namespace; returns its stdout."""
        r = nx.run_in("hvcl", [PY, "-c", code], timeout=timeout)
        return r.stdout

    def close(self) -> None:
        for p in reversed(self.procs):
            p.close()
        self.lan.close()


LOCK_PATH = "/run/lock/halb-lab-hv.lock"


@contextlib.contextmanager
def lab_lock(timeout: float = 600.0):
    """Serialises users of the ``hv`` namespaces across processes (two pytest sessions on one
    machine would otherwise tear down each other's LAN)."""
    os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
    with open(LOCK_PATH, "w") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{LOCK_PATH} held for more than {timeout}s")
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture
def lab(request):
    # a directory of our own rather than tmp_path: parallel pytest sessions on a shared
    # machine rotate /tmp/pytest-of-<user> and may delete a running test's configs and logs
    tmp = Path(tempfile.mkdtemp(prefix=f"halb-lab-{request.node.name[:40]}-"))
    with lab_lock():
        lab = Lab(tmp)
        try:
            yield lab
        finally:
            lab.close()
            nx.cleanup(PREFIX)
            rep = getattr(request.node, "rep_call", None)
            if rep is not None and rep.failed:
                print(f"lab files kept in {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def events(proc: Proc, event: str) -> list[dict]:
    """The JSON log records ``event`` from a halbd's log."""
    return log_events(proc.output(), event)


def state_of(proc: Proc, instance: str = "vi") -> str:
    st = [e for e in events(proc, "vrrp_state") if e.get("instance") == instance]
    return st[-1]["new"] if st else "init"


def wait_state(proc: Proc, state: str, instance: str = "vi", timeout: float = 10.0) -> None:
    def ok():
        if not proc.alive():
            raise AssertionError(f"process exited:\n{proc.output()[-3000:]}")
        return state_of(proc, instance) == state
    wait_for(ok, timeout, interval=0.02, what=f"{instance} {state}")


# A client probe: connects to VIP:port every ``step`` seconds and prints one JSON line per
# result, so the test sees when connects succeed again after a failover.
PROBE = r"""
import asyncio, json, sys, time
host, port, dur, step = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])

async def one(t):
    who = ""
    w = None
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        w.write(b"WHO\n")
        who = (await asyncio.wait_for(r.readline(), 1.0)).decode(errors="replace").strip()
    except (OSError, asyncio.TimeoutError):
        pass
    finally:
        if w is not None:
            w.close()
    print(json.dumps({"t": t, "end": time.monotonic(), "who": who}), flush=True)

async def main():
    end = time.monotonic() + dur
    tasks = set()
    while time.monotonic() < end:
        t = time.monotonic()
        if len(tasks) < 400:  # bounded: at most this many connects in flight
            task = asyncio.create_task(one(t))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(max(0.0, step - (time.monotonic() - t)))
    if tasks:
        await asyncio.wait(tasks, timeout=2)

asyncio.run(main())
"""


class VipWatch:
    """Samples who holds ``vip`` every 10 ms in a thread; records any moment with two holders
    (``both``), the number of looks and the longest time between two looks (an overlap shorter
    than that could be missed)."""

    def __init__(self, lab: Lab, vip: str):
        self.lab, self.vip = lab, vip
        self.both: list[float] = []
        self.samples = 0
        self.max_gap = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        last = time.monotonic()
        while not self._stop.is_set():
            h = self.lab.holder(self.vip)
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            last = now
            self.samples += 1
            if len(h) > 1:
                self.both.append(now)
            time.sleep(0.01)

    def stop(self):
        self._stop.set()
        self._t.join(5)


class Probe:
    """Starts a TCP connect to VIP:port from the client namespace every ``step`` seconds (each
    one on its own, so a connection stuck on a dying node does not delay the next); each
    result records who answered (the backend's name) and when (CLOCK_MONOTONIC, shared by
    every namespace, so comparable with the test's ``time.monotonic()``)."""

    def __init__(self, lab: Lab, vip: str, duration: float = 8.0, step: float = 0.005,
                 port: int = VIP_PORT):
        self.log = lab.tmp / f"probe-{len(lab.procs)}.log"
        self.proc = lab.proc([PY, "-c", PROBE, vip, str(port), str(duration), str(step)],
                             "hvcl", self.log.stem)

    def results(self) -> list[dict]:
        out = []
        for line in self.proc.output().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait_answer(self, who: str, after: float, timeout: float = 5.0) -> float:
        """Waits for the first probe started after ``after`` that ``who`` answered; returns
        the time it completed."""
        def seen():
            for r in self.results():
                if r["t"] >= after and r["who"] == who:
                    return r["end"]
            return None
        return wait_for(seen, timeout, interval=0.01, what=f"{who} answering the probe")

    def stop(self) -> None:
        self.proc.close()


def who_answers(lab: Lab, vip: str, port: int = VIP_PORT) -> str:
    out = lab.client(
        "import socket\n"
        f"s = socket.create_connection(({vip!r}, {port}), timeout=1)\n"
        "s.sendall(b'WHO\\n'); s.settimeout(2); print(s.recv(64).decode().strip())\n",
        timeout=10)
    return out.strip()


