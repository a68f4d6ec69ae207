"""Backends added, deleted and put in maintenance at run time (issue 16): ``halbctl backend
add|del|maint|ready`` against a real halbd with a live client; the changes outlive a reload
and a restart (kept in state_dir) unless the config file defines that backend itself."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time

import pytest

from tests.helpers import Backends, Halbd, free_port, wait_for, write_config
from tests.integration.test_halbctl import halbctl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

INTERVAL = 0.3  # health check interval


def config(d, bk, port, extra_backend: str = "") -> str:
    return f'''
[node]
name = "rt"
state_dir = "{d}"
[[pools]]
name = "web"
[[pools.backends]]
name = "b1"
address = "{bk.http['b1']}"
{extra_backend}
[pools.health]
type = "http"
path = "/healthz"
interval = "{int(INTERVAL * 1000)}ms"
timeout = "300ms"
[[listeners]]
name = "www"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "web"
'''


class Client:
    """Requests in a loop on one keep-alive connection; every answer's backend, with time."""

    def __init__(self, port: int):
        self.port = port
        self.seen: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        for _ in range(100_000):
            if self.stop.is_set():
                break
            try:
                c.request("GET", "/")
                r = c.getresponse()
                r.read()
                if r.status != 200:
                    self.errors.append(f"status {r.status}")
                self.seen.append((time.monotonic(), r.getheader("X-Backend")))
            except Exception as e:  # noqa: BLE001
                self.errors.append(f"{type(e).__name__}: {e}")
                c.close()
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            time.sleep(0.005)
        c.close()

    def since(self, t: float) -> set[str]:
        return {b for ts, b in list(self.seen) if ts > t}

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join(10)


def ctl(sock, *argv):
    code, out, err = halbctl("--socket", sock, *argv)
    return code, out, err


def status_backends(sock) -> dict[str, str]:
    out = json.loads(ctl(sock, "status", "--json")[1])
    return {b["name"]: b["state"] for p in out["pools"] for b in p["backends"]}


def slow_get(port: int, out: list) -> None:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/sleep?ms=800")
    r = c.getresponse()
    out.append((r.status, r.getheader("X-Backend"), r.read()))
    c.close()


def test_add_maint_ready_delete_with_a_live_client_then_reload_and_restart(tmp_path):
    port = free_port()
    with Backends(["b1", "b2", "b3"], logdir=tmp_path) as bk:
        cfg = write_config(tmp_path, config(tmp_path, bk, port))
        sock = f"{tmp_path}/rt.sock"
        with Halbd(cfg) as h:
            h.wait_port(port)
            with Client(port) as cl:
                time.sleep(0.3)
                # add: serves within one health interval
                t0 = time.monotonic()
                code, out, err = ctl(sock, "backend", "add", "web", "b2", bk.http["b2"],
                                     "--weight", "2", "--json")
                assert code == 0, err
                assert json.loads(out)["name"] == "b2"
                wait_for(lambda: "b2" in cl.since(t0), INTERVAL + 1.0, what="b2 serving")
                first = min(ts for ts, b in cl.seen if b == "b2" and ts > t0)
                print(f"\nadded backend served after {1000 * (first - t0):.0f} ms")
                assert first - t0 <= INTERVAL + 0.5
                # maint: nothing at all; ready: back
                assert ctl(sock, "backend", "maint", "web", "b2")[0] == 0
                t1 = time.monotonic()
                time.sleep(0.4)
                assert cl.since(t1 + 0.05) == {"b1"}
                assert status_backends(sock)["b2"] == "maint"
                assert ctl(sock, "backend", "ready", "web", "b2")[0] == 0
                t2 = time.monotonic()
                wait_for(lambda: "b2" in cl.since(t2), 2, what="b2 back after ready")
                # delete b1 while a slow request runs on it: it finishes; nothing new goes there
                assert ctl(sock, "backend", "maint", "web", "b2")[0] == 0
                slow: list = []
                th = threading.Thread(target=slow_get, args=(port, slow))
                th.start()
                time.sleep(0.2)  # the slow request is at b1 (b2 is in maintenance)
                assert ctl(sock, "backend", "ready", "web", "b2")[0] == 0
                code, out, err = ctl(sock, "backend", "del", "web", "b1")
                assert code == 0, err
                t3 = time.monotonic()
                th.join(10)
                assert slow == [(200, "b1", b"slept\n")]
                time.sleep(0.4)
                assert cl.since(t3 + 0.05) == {"b2"}
            assert cl.errors == []
            assert set(status_backends(sock)) == {"b2"}
            # a reload that does not touch these backends keeps the runtime changes
            code, out, err = ctl(sock, "reload")
            assert code == 0, err
            assert set(status_backends(sock)) == {"b2"}
            # refused: duplicates, bad values, unknown names, the last backend
            assert ctl(sock, "backend", "add", "web", "b2", bk.http["b3"])[0] == 1
            code, _, err = ctl(sock, "backend", "add", "web", "b9", "nohost")
            assert code == 1 and "address" in err
            assert ctl(sock, "backend", "add", "nope", "b9", bk.http["b3"])[0] == 1
            assert ctl(sock, "backend", "add", "web", "b9", bk.http["b3"], "--weight", "300")[0] == 1
            code, _, err = ctl(sock, "backend", "del", "web", "b2")
            assert code == 1 and "last backend" in err
            ctl(sock, "backend", "add", "web", "b3", bk.http["b3"])
            ctl(sock, "backend", "maint", "web", "b3")
            h.signal(signal.SIGTERM)
            assert h.stop(10) == 0
        state = json.loads((tmp_path / "rt.runtime.json").read_text())
        assert set(state["pools"]["web"]["added"]) == {"b2", "b3"}
        assert set(state["pools"]["web"]["deleted"]) == {"b1"}
        # a restart keeps them (b3 still in maintenance)
        with Halbd(cfg, log=tmp_path / "second.log") as h:
            h.wait_port(port)
            assert status_backends(sock) == {"b2": "up", "b3": "maint"}
            # the file now defines b2 itself (another address): the file wins; b1 comes back
            # because the file's b1 changed (a weight) since it was deleted
            cfg.write_text(config(tmp_path, bk, port, f'weight = 3\n[[pools.backends]]\n'
                                  f'name = "b2"\naddress = "{bk.http["b3"]}"\n'))
            code, out, err = ctl(sock, "reload")
            assert code == 0, err
            st = json.loads(ctl(sock, "status", "--json")[1])
            web = {b["name"]: b for p in st["pools"] for b in p["backends"]}
            assert set(web) == {"b1", "b2", "b3"}
            assert web["b2"]["address"] == bk.http["b3"]
            assert web["b3"]["state"] == "maint"
