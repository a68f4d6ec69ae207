"""Reload without dropping a request (issue 16): a real halbd under load from HTTP keep-alive,
HTTP new-connection and TCP clients, 20 reloads (SIGHUP and ``halbctl reload`` in turn) that
add and remove backends, change weights, add and remove a listener and change a route: every
request answered, no connection reset. The same load against HAProxy's own seamless reload
(master-worker, SIGUSR2) in the same run, printed beside halb's. An invalid or refused config
changes nothing."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import Backends, Halbd, free_ports, port_open, wait_for, write_config

from tests.integration.test_halbctl import halbctl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

RELOADS = 20


class Load:
    """Clients in threads until ``stop``: counts requests and failures (an exception, a reset,
    a wrong answer) per kind and the backends that answered HTTP after each mark."""

    def __init__(self, http_port: int, tcp_port: int):
        self.http_port, self.tcp_port = http_port, tcp_port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.n = {"keepalive": 0, "newconn": 0, "tcp_echo": 0, "tcp_new": 0}
        self.fail: dict[str, list[str]] = {k: [] for k in self.n}
        self.seen: list[tuple[float, str, str]] = []  # (time, path, backend)
        self.threads = [threading.Thread(target=f, daemon=True) for f in
                        (self._keepalive, self._newconn, self._tcp_echo, self._tcp_new)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _count(self, kind: str, err: str | None = None) -> None:
        with self.lock:
            self.n[kind] += 1
            if err:
                self.fail[kind].append(err)

    def _get(self, conn: http.client.HTTPConnection, path: str) -> str:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise AssertionError(f"status {r.status}: {body[:80]!r}")
        b = r.getheader("X-Backend") or "?"
        with self.lock:
            self.seen.append((time.monotonic(), path, b))
        return b

    def _keepalive(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=5)
        i = 0
        while not self.stop.is_set() and i < 200_000:
            i += 1
            try:
                self._get(conn, "/api/x" if i % 2 else "/")
                self._count("keepalive")
            except Exception as e:  # noqa: BLE001 - every failure counts
                self._count("keepalive", f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=5)
            time.sleep(0.002)
        conn.close()

    def _newconn(self) -> None:
        i = 0
        while not self.stop.is_set() and i < 100_000:
            i += 1
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=5)
            try:
                self._get(conn, "/")
                self._count("newconn")
            except Exception as e:  # noqa: BLE001
                self._count("newconn", f"{type(e).__name__}: {e}")
            conn.close()
            time.sleep(0.005)

    def _tcp_echo(self) -> None:
        """One long-lived TCP connection through the whole run, echoing every 10 ms."""
        s = socket.create_connection(("127.0.0.1", self.tcp_port), timeout=5)
        i = 0
        try:
            while not self.stop.is_set() and i < 100_000:
                i += 1
                msg = b"ping %d\n" % i
                try:
                    s.sendall(msg)
                    got = b""
                    while len(got) < len(msg):
                        chunk = s.recv(len(msg) - len(got))
                        if not chunk:
                            raise ConnectionError("closed by the proxy")
                        got += chunk
                    if got != msg:
                        raise AssertionError(f"echo {got!r} != {msg!r}")
                    self._count("tcp_echo")
                except Exception as e:  # noqa: BLE001
                    self._count("tcp_echo", f"{type(e).__name__}: {e}")
                    return
                time.sleep(0.01)
        finally:
            s.close()

    def _tcp_new(self) -> None:
        i = 0
        while not self.stop.is_set() and i < 100_000:
            i += 1
            try:
                with socket.create_connection(("127.0.0.1", self.tcp_port), timeout=5) as s:
                    s.sendall(b"WHO\nx")
                    got = b""
                    while not got.endswith(b"\nx"):
                        chunk = s.recv(100)
                        if not chunk:
                            raise ConnectionError("closed early")
                        got += chunk
                self._count("tcp_new")
            except Exception as e:  # noqa: BLE001
                self._count("tcp_new", f"{type(e).__name__}: {e}")
            time.sleep(0.01)

    def report(self, who: str) -> str:
        parts = [f"{k} {self.n[k]} ok/{len(self.fail[k])} failed" for k in self.n]
        return f"{who}: " + ", ".join(parts)

    def failures(self) -> dict[str, list[str]]:
        return {k: v for k, v in self.fail.items() if v}


def halb_config(d: Path, bk: Backends, hport: int, tport: int, xport: int, step: int) -> str:
    """The config at reload ``step``: backends come and go, weights change, a listener is
    added and removed, the /api/ route moves between pools."""
    web = ["b1", "b2"] if step % 4 in (0, 1) else ["b1", "b3"]
    if step % 5 == 4:
        web.append("b4")
    weights = {n: 1 + (step + i) % 3 for i, n in enumerate(web)}
    backends = "".join(f'[[pools.backends]]\nname = "{n}"\naddress = "{bk.http[n]}"\n'
                       f'weight = {weights[n]}\n' for n in web)
    tcp_backends = "".join(f'[[pools.backends]]\nname = "{n}"\naddress = "{bk.tcp[n]}"\n'
                           for n in (["b1", "b2"] if step % 2 == 0 else ["b2", "b3"]))
    api_pool = "api" if step % 3 != 2 else "web"
    extra = f'''
[[listeners]]
name = "extra"
mode = "http"
bind = "127.0.0.1:{xport}"
pool = "web"
''' if step % 2 == 1 else ""
    return f'''
[node]
name = "rl"
state_dir = "{d}"
[access_log]
enabled = false
[[pools]]
name = "web"
algorithm = "wrr"
{backends}
[pools.health]
type = "http"
path = "/healthz"
interval = "300ms"
timeout = "300ms"
[[pools]]
name = "api"
[[pools.backends]]
name = "b4"
address = "{bk.http['b4']}"
[[pools]]
name = "tcp"
{tcp_backends}
[[listeners]]
name = "www"
mode = "http"
bind = "127.0.0.1:{hport}"
pool = "web"
  [[listeners.routes]]
  pool = "{api_pool}"
  path_prefix = "/api/"
[[listeners]]
name = "echo"
mode = "tcp"
bind = "127.0.0.1:{tport}"
pool = "tcp"
{extra}
'''


def _supports_access_log_section() -> bool:
    from halb.config import ConfigError, loads
    try:
        loads('[node]\nname = "x"\n[access_log]\nenabled = false\n[[pools]]\nname = "p"\n'
              '[[pools.backends]]\nname = "a"\naddress = "127.0.0.1:1"\n')
        return True
    except ConfigError:
        return False


def _cfg_text(*args) -> str:
    text = halb_config(*args)
    if not _supports_access_log_section():
        text = text.replace("[access_log]\nenabled = false\n", "")
    return text


def test_twenty_reloads_under_load_lose_nothing(tmp_path):
    hport, tport, xport = free_ports(3)
    with Backends(["b1", "b2", "b3", "b4"], tcp=True, logdir=tmp_path) as bk:
        cfg = write_config(tmp_path, _cfg_text(tmp_path, bk, hport, tport, xport, 0))
        with Halbd(cfg) as h:
            h.wait_port(hport)
            h.wait_port(tport)
            sock = f"{tmp_path}/rl.sock"
            time.sleep(0.5)
            marks = []
            with Load(hport, tport) as load:
                time.sleep(0.5)
                for step in range(1, RELOADS + 1):
                    cfg.write_text(_cfg_text(tmp_path, bk, hport, tport, xport, step))
                    if step % 2:
                        code, out, err = halbctl("--socket", sock, "reload", "--json")
                        assert code == 0, err
                        r = json.loads(out)
                        assert r["ok"] and r["changes"], r
                    else:
                        n = h.output().count('"event":"reload_done"')
                        h.signal(signal.SIGHUP)
                        wait_for(lambda: h.output().count('"event":"reload_done"') > n, 10,
                                 what="reload_done after SIGHUP")
                    marks.append((time.monotonic(), step))
                    # the new listener serves at once; a removed one stops accepting
                    if step % 2 == 1:
                        c = http.client.HTTPConnection("127.0.0.1", xport, timeout=5)
                        c.request("GET", "/")
                        assert c.getresponse().status == 200
                        c.close()
                    else:
                        wait_for(lambda: not port_open("127.0.0.1", xport), 5,
                                 what="the removed listener closed")
                    time.sleep(0.35)
                time.sleep(0.3)
            print("\n" + load.report(f"halb, {RELOADS} reloads"))
            assert load.failures() == {}
            assert min(load.n.values()) > 20, load.n
            assert h.alive()
            # what the reloads asked for took effect: between the reloads of steps 19 and 20
            # the /api/ route led to pool api (b4); after step 20 it leads to pool web, whose
            # backends are then b1 and b2 (b3 and b4 gone from it)
            (t19, _), (t20, _) = marks[-2], marks[-1]
            between = [(p, b) for t, p, b in load.seen if t19 + 0.05 < t < t20 - 0.05]
            after = [(p, b) for t, p, b in load.seen if t > t20 + 0.05]
            assert between and after, "no requests between or after the last reloads"
            assert {b for p, b in between if p.startswith("/api/")} == {"b4"}
            api = {b for p, b in after if p.startswith("/api/")}
            web = {b for p, b in after if p == "/"}
            assert api and api <= {"b1", "b2"}, api
            assert web and web <= {"b1", "b2"}, web
            code, out, _ = halbctl("--socket", sock, "status", "--json")
            pools = {p["name"]: [b["name"] for b in p["backends"]]
                     for p in json.loads(out)["pools"]}
            assert pools == {"web": ["b1", "b2"], "api": ["b4"], "tcp": ["b1", "b2"]}


def test_an_invalid_or_refused_config_changes_nothing(tmp_path):
    hport, tport, xport = free_ports(3)
    with Backends(["b1", "b2", "b3", "b4"], tcp=True, logdir=tmp_path) as bk:
        good = _cfg_text(tmp_path, bk, hport, tport, xport, 0)
        cfg = write_config(tmp_path, good)
        with Halbd(cfg) as h:
            h.wait_port(hport)
            sock = f"{tmp_path}/rl.sock"
            before = json.loads(halbctl("--socket", sock, "status", "--json")[1])["pools"]
            # a bad weight and an unknown pool: every problem named with its key path
            cfg.write_text(good.replace("weight = 1", "weight = 999", 1)
                           .replace('pool = "api"\n  path', 'pool = "nope"\n  path'))
            code, out, err = halbctl("--socket", sock, "reload")
            assert code == 1
            assert "refused; nothing changed" in err
            assert "weight" in err and "999" in err and "nope" in err, err
            # a section that needs a restart
            cfg.write_text(good.replace('name = "rl"', 'name = "rl2"'))
            code, out, err = halbctl("--socket", sock, "reload")
            assert code == 1 and "node.name" in err and "restart" in err, err
            # SIGHUP with a broken file: logged, nothing changed, still serving
            cfg.write_text("[[pools]\n")
            h.signal(signal.SIGHUP)
            h.wait_log('"event":"reload_invalid"')
            after = json.loads(halbctl("--socket", sock, "status", "--json")[1])["pools"]
            strip = lambda ps: [(p["name"], [(b["name"], b["weight"]) for b in p["backends"]])
                                for p in ps]  # noqa: E731
            assert strip(after) == strip(before)
            c = http.client.HTTPConnection("127.0.0.1", hport, timeout=5)
            c.request("GET", "/api/x")
            r = c.getresponse()
            assert r.status == 200 and r.getheader("X-Backend") == "b4"
            c.close()
            assert h.alive()


HAPROXY_CFG = """
global
    master-worker
    maxconn 2000
    pidfile {pidfile}
    stats socket {d}/haproxy.sock mode 600 expose-fd listeners level admin
defaults
    mode http
    timeout connect 3s
    timeout client 60s
    timeout server 30s
    option http-keep-alive
frontend www
    bind 127.0.0.1:{hport}
    use_backend api if {{ path_beg /api/ }}
    default_backend web
backend web
    balance roundrobin
{web}
backend api
    server b4 {b4}
frontend echo
    mode tcp
    bind 127.0.0.1:{tport}
    default_backend tcp
backend tcp
    mode tcp
{tcp}
"""


def test_haproxy_seamless_reload_under_the_same_load(tmp_path):
    """The anchor: the same clients against HAProxy (Debian's, master-worker) reloaded with
    SIGUSR2 twenty times with the same kinds of changes (backends, weights). Printed for
    comparison; asserted only that the comparison ran (HAProxy drops keep-alive connections
    of the old worker, so its figures may show failures that halb's do not)."""
    assert shutil.which("haproxy"), "haproxy is not installed (./dev test installs it)"
    hport, tport = free_ports(2)
    with Backends(["b1", "b2", "b3", "b4"], tcp=True, logdir=tmp_path) as bk:
        def cfg(step: int) -> str:
            web = ["b1", "b2"] if step % 4 in (0, 1) else ["b1", "b3"]
            return HAPROXY_CFG.format(
                d=tmp_path, pidfile=tmp_path / "haproxy.pid", hport=hport, tport=tport,
                b4=bk.http["b4"],
                web="".join(f"    server {n} {bk.http[n]} weight {1 + (step + i) % 3}\n"
                            for i, n in enumerate(web)),
                tcp="".join(f"    server {n} {bk.tcp[n]}\n"
                            for n in (["b1", "b2"] if step % 2 == 0 else ["b2", "b3"])))
        path = tmp_path / "haproxy.cfg"
        path.write_text(cfg(0))
        log = open(tmp_path / "haproxy.log", "w")
        p = subprocess.Popen(["haproxy", "-W", "-db", "-f", str(path)], stdout=log,
                             stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: port_open("127.0.0.1", hport) and port_open("127.0.0.1", tport),
                     10, what="haproxy listening")
            with Load(hport, tport) as load:
                time.sleep(0.5)
                for step in range(1, RELOADS + 1):
                    path.write_text(cfg(step))
                    os.kill(p.pid, signal.SIGUSR2)
                    time.sleep(0.35)
                time.sleep(0.3)
            print("\n" + load.report(f"HAProxy {RELOADS} reloads (SIGUSR2, master-worker)"))
            print(f"HAProxy failures: { {k: v[:3] for k, v in load.failures().items()} }")
            assert min(load.n.values()) > 20, load.n
        finally:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
            log.close()
