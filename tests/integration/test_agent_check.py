"""Agent checks against a real halbd (issue 18): an agent played by the test answers changing
words; weights, drain, maint and down each take effect within one agent interval, show in
``halbctl backends`` and steer traffic; an unreachable agent changes nothing."""

from __future__ import annotations

import http.client
import json
import socket
import socketserver
import threading
import time
from collections import Counter

import pytest

from tests.helpers import Backends, Halbd, free_port, wait_for, write_config
from tests.integration.test_halbctl import halbctl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

INTERVAL = 0.2


class Agent:
    """One agent per backend host: answers ``self.words`` to every connection."""

    def __init__(self, host: str, port: int, words: str):
        self.words = words
        agent = self

        class H(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.sendall(agent.words.encode() + b"\n")

        class S(socketserver.ThreadingTCPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            allow_reuse_address = True
            daemon_threads = True

        self.srv = S((host, port), H)
        self.t = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.t.start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def backends_of(sock) -> dict:
    out = json.loads(halbctl("--socket", sock, "backends", "--json")[1])
    return {b["name"]: b for b in out}


def test_agent_words_steer_weights_drain_maint_and_down(tmp_path):
    port, aport = free_port(), free_port()
    with Backends(["b1"], host="127.0.0.2", logdir=tmp_path) as k1, \
            Backends(["b2"], host="127.0.0.3", logdir=tmp_path) as k2:
        a1 = Agent("127.0.0.2", aport, "75%")
        a2 = Agent("127.0.0.3", aport, "25%")
        try:
            cfg = write_config(tmp_path, f'''
[node]
name = "ag"
state_dir = "{tmp_path}"
[access_log]
enabled = false
[[pools]]
name = "web"
algorithm = "wrr"
[[pools.backends]]
name = "b1"
address = "{k1.http['b1']}"
weight = 100
[[pools.backends]]
name = "b2"
address = "{k2.http['b2']}"
weight = 100
[pools.agent]
port = {aport}
interval = "{int(INTERVAL * 1000)}ms"
timeout = "200ms"
[[listeners]]
name = "www"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "web"
''')
            sock = f"{tmp_path}/ag.sock"
            with Halbd(cfg) as h:
                h.wait_port(port)
                wait_for(lambda: [backends_of(sock)[n]["effective_weight"] for n in ("b1", "b2")]
                         == [75, 25], 3, what="agent weights applied")
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

                def spread(n=2000):
                    got = Counter()
                    for _ in range(n):
                        c.request("GET", "/")
                        r = c.getresponse()
                        r.read()
                        got[r.getheader("X-Backend")] += 1
                    return got
                got = spread()
                assert abs(got["b1"] / 2000 - 0.75) <= 0.02, got
                for words, state, in_view in (("drain", "drain", False), ("maint", "maint", False),
                                              ("ready", "up", True), ("down #overloaded", "down",
                                                                      False), ("up", "up", True)):
                    a2.words = words
                    t0 = time.monotonic()
                    wait_for(lambda: backends_of(sock)["b2"]["state"] == state, 3,
                             what=f"b2 {state} after {words!r}")
                    took = time.monotonic() - t0
                    assert took <= INTERVAL + 0.5, (words, took)
                    b2 = backends_of(sock)["b2"]
                    assert b2["agent"] == words
                    got = spread(200)
                    assert (got["b2"] > 0) == in_view, (words, got)
                code, out, _ = halbctl("--socket", sock, "backends")
                assert code == 0 and "agent" in out
                # the agent goes away: nothing changes (not a health failure)
                a2.words = "50%"
                wait_for(lambda: backends_of(sock)["b2"]["effective_weight"] == 50, 3,
                         what="b2 at 50%")
                a2.close()
                time.sleep(4 * INTERVAL)
                b2 = backends_of(sock)["b2"]
                assert b2["state"] == "up" and b2["effective_weight"] == 50
                c.close()
                assert '"event":"agent_changed"' in h.output()
        finally:
            a1.close()
            try:
                a2.close()
            except Exception:  # noqa: BLE001 - closed above
                pass
