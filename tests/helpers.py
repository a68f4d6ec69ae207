"""Shared test helpers: free ports, backends and halbd as real processes.

    with Backends(["web1", "web2"], http=True) as bk:      # lab.backend processes
        cfg = write_config(tmp_path, f'''... {bk.http["web1"]} ...''')
        with Halbd(cfg) as node:                             # real halbd process
            node.wait_port(8080)
"""

from __future__ import annotations

import os
import signal
import asyncio
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago (TCP and UDP). One ``free_port`` call
    after another can hand out the same number twice (each is released before the next is
    picked): a "dead" backend's port then becomes a listener's, and is not dead."""
    out: list[int] = []
    while len(out) < n:
        p = free_port(host=host)
        if p not in out:
            out.append(p)
    return out


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (TCP and UDP both free when kind is STREAM) on
    ``host`` (an IPv4 or IPv6 address)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(fam, kind) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(fam, other) as s2:
                s2.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def wait_for(cond: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last_exc = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}"
                       + (f" (last error: {last_exc!r})" if last_exc else ""))


async def until(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition", *,
                interval: float = 0.02) -> float:
    """``wait_for`` inside a running event loop (the loop keeps running while it waits):
    returns ``time.monotonic()`` when ``cond()`` is first true; AssertionError at the
    deadline, naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return time.monotonic()
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_get(url: str, timeout: float = 5.0, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def write_config(dirpath: Path, text: str, name: str = "halb.toml") -> Path:
    p = Path(dirpath) / name
    p.write_text(text)
    return p


class Proc:
    """A subprocess that is always killed (process group) on exit."""

    def __init__(self, argv: list[str], *, log: Path | None = None, env: dict | None = None,
                 netns: str | None = None):
        if netns:
            argv = ["ip", "netns", "exec", netns] + argv
        self.argv = argv
        self.log = log
        self._logf = open(log, "ab") if log else subprocess.DEVNULL
        e = dict(os.environ)
        e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
        e.update(env or {})
        self.p = subprocess.Popen(argv, stdout=self._logf, stderr=subprocess.STDOUT, env=e,
                                  cwd=str(ROOT), start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.p.pid, sig)

    def kill(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.p.poll() is None:
            try:
                os.kill(self.p.pid, signal.SIGCONT)
                os.kill(self.p.pid, signal.SIGTERM)
                self.p.wait(timeout=timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                self.kill()
        return self.p.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def close(self) -> None:
        self.kill()
        if self._logf not in (None, subprocess.DEVNULL):
            self._logf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def hostport(host: str, port: int) -> str:
    """``host:port``, or ``[v6]:port`` for an IPv6 address (halb's and lab.backend's syntax)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_hostport(addr: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class Backends:
    """lab.backend processes on loopback, one per name, each on free ports; ``host`` may be
    an IPv6 address (``"::1"``): the addresses are then ``[::1]:PORT``."""

    def __init__(self, names: Iterable[str], *, http: bool = True, tcp: bool = False,
                 udp: bool = False, host: str = "127.0.0.1", logdir: Path | None = None):
        self.names = list(names)
        self.host = host
        self.http: dict[str, str] = {}
        self.tcp: dict[str, str] = {}
        self.udp: dict[str, str] = {}
        self.procs: dict[str, Proc] = {}
        self.logdir = logdir
        self.kinds = (http, tcp, udp)
        for n in self.names:
            self.start(n)

    def start(self, name: str) -> None:
        http, tcp, udp = self.kinds
        argv = [PY, "-m", "lab.backend", "--name", name]
        if http:
            self.http.setdefault(name, hostport(self.host, free_port(host=self.host)))
            argv += ["--http", self.http[name]]
        if tcp:
            self.tcp.setdefault(name, hostport(self.host, free_port(host=self.host)))
            argv += ["--tcp", self.tcp[name]]
        if udp:
            self.udp.setdefault(name, hostport(self.host,
                                               free_port(socket.SOCK_DGRAM, host=self.host)))
            argv += ["--udp", self.udp[name]]
        log = self.logdir / f"backend-{name}.log" if self.logdir else None
        self.procs[name] = Proc(argv, log=log)
        addr = self.http.get(name) or self.tcp.get(name)
        if addr:
            h, p = split_hostport(addr)
            wait_for(lambda: port_open(h, p), 10, what=f"backend {name} on {addr}")
        else:
            time.sleep(0.3)

    def kill(self, name: str) -> None:
        self.procs[name].kill()

    def close(self) -> None:
        for p in self.procs.values():
            p.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Halbd(Proc):
    """A real halbd process running ``config``; its log goes next to the config."""

    def __init__(self, config: Path, *, netns: str | None = None, extra: list[str] | None = None,
                 env: dict | None = None, log: Path | None = None):
        config = Path(config)
        self.config = config
        super().__init__([PY, "-m", "halb.cli.halbd", str(config)] + (extra or []),
                         log=log or config.with_suffix(".log"), env=env, netns=netns)

    def wait_port(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        def ready():
            if not self.alive():
                raise AssertionError(f"halbd exited with {self.p.returncode}:\n{self.output()[-3000:]}")
            return port_open(host, port)
        wait_for(ready, timeout, what=f"halbd listening on {host}:{port}")

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        def seen():
            if not self.alive():
                raise AssertionError(f"halbd exited with {self.p.returncode}:\n{self.output()[-3000:]}")
            out = self.output()
            return out if needle in out else None
        return wait_for(seen, timeout, what=f"{needle!r} in halbd log")  # type: ignore[return-value]
