"""Application-cookie stickiness (issue 18): the backend's own session cookie (JSESSIONID)
pins a client to the backend that set it. 200 clients keep their backend across 50 requests
each, through a kill -9 of the node they started on (node b knows the cookies only from the
replicated sticky table), and move only when their backend goes down. The same in prefix mode
(HAProxy's ``cookie JSESSIONID prefix``: the backend's name rides in the cookie, no table, no
sync between the nodes), where the application must only ever see its own cookie values."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from halb.sync.client import fetch_tables
from tests.helpers import free_port, wait_for, write_config
from tests.helpers import Halbd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

BACKENDS = ["j1", "j2", "j3", "j4"]
CLIENTS = 200
PER_NODE = 25  # requests per client through each node: 50 in all


class App:
    """A backend that starts a session (Set-Cookie: JSESSIONID) for a request without one of
    its own sessions."""

    def __init__(self, name: str):
        counter = itertools.count(1)
        app = self
        self.down = False  # True: every request gets its connection closed, no answer
        self.saw_prefix = 0  # requests whose Cookie still had a prefix (prefix mode)

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # head and body are two writes

            def do_GET(self):
                if app.down:
                    self.close_connection = True
                    return
                body = name.encode()
                if "~" in (self.headers.get("Cookie") or ""):  # a prefix halb failed to take off
                    app.saw_prefix += 1
                    self.send_response(400)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                if f"JSESSIONID={name}." not in (self.headers.get("Cookie") or ""):
                    # no session, or one this backend does not know (Tomcat starts a new one)
                    self.send_header("Set-Cookie", f"JSESSIONID={name}.{next(counter)}; Path=/; "
                                                   f"HttpOnly")
                self.send_header("X-Backend", name)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def config(tmp, name, http_port, sync_port, peers, apps, prefix: bool = False) -> str:
    """A node's config; ``sync_port`` 0: no [sync] section."""
    be = "".join(f'[[pools.backends]]\nname = "{n}"\naddress = "127.0.0.1:{a.port}"\n'
                 for n, a in apps.items())
    ps = "".join(f'[[sync.peers]]\nname = "{n}"\naddress = "127.0.0.1:{p}"\n' for n, p in peers)
    sync = f'[sync]\nlisten = "127.0.0.1:{sync_port}"\ninsecure = true\n{ps}' if sync_port else ""
    return write_config(tmp, f'''
[node]
name = "{name}"
state_dir = "{tmp}"
[access_log]
enabled = false
[[pools]]
name = "web"
algorithm = "roundrobin"
retries = 3
[pools.sticky]
mode = "app_cookie"
cookie = "JSESSIONID"
ttl = "10m"
prefix = {"true" if prefix else "false"}
[pools.passive]
max_failures = 1
cooldown = "30s"
{be}
[[listeners]]
name = "www"
mode = "http"
bind = "127.0.0.1:{http_port}"
pool = "web"
{sync}''', name=f"{name}.toml")


CONNS: dict[tuple[int, int], http.client.HTTPConnection] = {}


def ask(port: int, cookie: str, client: int) -> tuple[str, str]:
    """(backend, the session cookie now): one request with the client's cookie, if any, on
    the client's own keep-alive connection to the node at ``port``."""
    c = CONNS.get((port, client))
    if c is None:
        c = CONNS[(port, client)] = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", "/", headers={"Cookie": f"JSESSIONID={cookie}"} if cookie else {})
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
    sc = r.getheader("Set-Cookie") or ""
    if sc.startswith("JSESSIONID="):
        cookie = sc.split(";")[0].split("=", 1)[1]
    return r.getheader("X-Backend"), cookie


def test_clients_keep_the_backend_that_set_their_session_through_a_takeover(tmp_path):
    apps = {n: App(n) for n in BACKENDS}
    ha, hb, sa, sb, probe = (free_port() for _ in range(5))
    try:
        ca = config(tmp_path, "a", ha, sa, [("b", sb), ("probe", probe)], apps)
        cb = config(tmp_path, "b", hb, sb, [("a", sa), ("probe", probe)], apps)
        with Halbd(ca) as a, Halbd(cb) as b:
            a.wait_port(ha)
            b.wait_port(hb)
            cookies = [""] * CLIENTS
            home: list[str] = [""] * CLIENTS
            for rnd in range(PER_NODE):
                for i in range(CLIENTS):
                    be, cookies[i] = ask(ha, cookies[i], i)
                    if rnd == 0:
                        home[i] = be
                    assert be == home[i], f"client {i} moved from {home[i]} to {be} on a"
            assert set(home) == set(BACKENDS)

            def replicated():
                t = asyncio.run(fetch_tables(f"127.0.0.1:{sb}", "probe", timeout=10))["sticky"]
                return all((e := t.get(f"app/web/{c}")) is not None and e.backend == h
                           for c, h in zip(cookies, home))
            wait_for(replicated, 15, interval=0.2, what="b holds every session")
            a.signal(signal.SIGKILL)
            a.p.wait(5)
            for rnd in range(PER_NODE):
                for i in reversed(range(CLIENTS)):  # another order than a's round robin saw
                    be, cookies[i] = ask(hb, cookies[i], i)
                    assert be == home[i], f"client {i} moved from {home[i]} to {be} after the takeover"
            # a backend goes down: its clients move (and get a new session), the others stay
            apps["j2"].down = True
            moved = stayed = 0
            for i in range(CLIENTS):
                be, cookies[i] = ask(hb, cookies[i], i)
                if home[i] == "j2":
                    assert be != "j2"
                    moved += 1
                else:
                    assert be == home[i]
                    stayed += 1
            print(f"\n{CLIENTS} clients x {2 * PER_NODE} requests: none moved through the kill -9 "
                  f"takeover; after j2 went down {moved} moved, {stayed} stayed")
            assert moved and stayed
    finally:
        for c in CONNS.values():
            c.close()
        CONNS.clear()
        for app in apps.values():
            app.close()


def test_prefix_mode_keeps_sessions_through_a_takeover_without_any_table(tmp_path):
    """Prefix mode: the client's cookie says j1~<session>, the application sees <session>.
    Two nodes with no sync at all: the second knows nothing, yet sends every client where it
    went before (the cookie carries the backend); a backend that goes down loses its clients,
    who get a new session from their new backend, prefixed with its name."""
    apps = {n: App(n) for n in BACKENDS}
    ha, hb = free_port(), free_port()
    try:
        ca = config(tmp_path, "a", ha, 0, [], apps, prefix=True)
        cb = config(tmp_path, "b", hb, 0, [], apps, prefix=True)
        with Halbd(ca) as a, Halbd(cb) as b:
            a.wait_port(ha)
            b.wait_port(hb)
            cookies = [""] * CLIENTS
            home: list[str] = [""] * CLIENTS
            for rnd in range(PER_NODE):
                for i in range(CLIENTS):
                    be, cookies[i] = ask(ha, cookies[i], i)
                    if rnd == 0:
                        home[i] = be
                        assert cookies[i].startswith(f"{be}~{be}."), cookies[i]
                    assert be == home[i], f"client {i} moved from {home[i]} to {be} on a"
            assert set(home) == set(BACKENDS)
            a.signal(signal.SIGKILL)
            a.p.wait(5)
            for rnd in range(PER_NODE):
                for i in reversed(range(CLIENTS)):  # another order than a's round robin saw
                    be, cookies[i] = ask(hb, cookies[i], i)
                    assert be == home[i], f"client {i} moved from {home[i]} to {be} after the takeover"
            apps["j2"].down = True
            moved = stayed = 0
            for i in range(CLIENTS):
                be, cookies[i] = ask(hb, cookies[i], i)
                if home[i] == "j2":
                    assert be != "j2" and cookies[i].startswith(f"{be}~{be}."), (be, cookies[i])
                    moved += 1
                else:
                    assert be == home[i]
                    stayed += 1
            assert moved and stayed
            assert sum(x.saw_prefix for x in apps.values()) == 0
            print(f"\nprefix mode, {CLIENTS} clients x {2 * PER_NODE} requests, no sync: none moved "
                  f"through the kill -9; after j2 went down {moved} moved (new session), {stayed} stayed")
    finally:
        for c in CONNS.values():
            c.close()
        CONNS.clear()
        for app in apps.values():
            app.close()
