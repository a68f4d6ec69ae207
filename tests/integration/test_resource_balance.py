"""algorithm = "resource" against a real halbd (issue 18, item 3): three backends report 20 %,
50 % and 80 % CPU, in an ORCA ``endpoint-load-metrics`` response header or through the
agent-check; the shares of new requests follow the documented formula within 2 %; a backend
whose load rises gets fewer requests within a few seconds; malformed reports are counted and
change nothing; halbctl backends and the metrics show the load."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.parse
import urllib.request
from collections import Counter

import pytest

from halb.resource import shares
from tests.helpers import Backends, Halbd, free_ports, wait_for, write_config
from tests.integration.test_agent_check import Agent
from tests.integration.test_halbctl import halbctl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

NAMES = ["a", "b", "c"]
N = 3000  # requests per share measurement
TOL = 0.02
FLOOR = 0.05  # the default [pools.resource] floor


def backends_of(sock: str) -> dict:
    out = json.loads(halbctl("--socket", sock, "backends", "--json")[1])
    return {b["name"]: b for b in out}


def set_load(k: Backends, name: str, value: str) -> None:
    """The backend sends ``endpoint-load-metrics: value`` from now on (asked directly)."""
    q = urllib.parse.urlencode({"h": value})
    with urllib.request.urlopen(f"http://{k.http[name]}/admin/load?{q}", data=b"",
                                timeout=5) as r:
        assert r.status == 200


def orca(cpu: float) -> str:
    return f"TEXT cpu_utilization={cpu}, mem_utilization=0.1, named_metrics.queue=3"


def assert_formula(got: Counter, loads: list[float], what: str) -> None:
    n = sum(got.values())
    # the README's formula restated here: weight ~ configured weight x max(floor, 1 - load)
    head = [max(FLOOR, 1 - u) for u in loads]
    want = [x / sum(head) for x in head]
    assert want == pytest.approx(shares([1] * len(NAMES), loads, FLOOR), abs=1e-3)
    for name, w in zip(NAMES, want):
        assert abs(got[name] / n - w) <= TOL, (what, name, got[name] / n, w, got)


def test_orca_header_loads_set_the_shares_and_a_rising_load_loses_them(tmp_path):
    port, mport = free_ports(2)
    with Backends(NAMES, logdir=tmp_path) as k:
        for name, cpu in zip(NAMES, (0.2, 0.5, 0.8)):
            set_load(k, name, orca(cpu))
        pools = "".join(f'''
[[pools.backends]]
name = "{n}"
address = "{k.http[n]}"
''' for n in NAMES)
        cfg = write_config(tmp_path, f'''
[node]
name = "rs"
state_dir = "{tmp_path}"
[access_log]
enabled = false
[metrics]
address = "127.0.0.1:{mport}"
[[pools]]
name = "web"
algorithm = "resource"
{pools}
[pools.resource]
smoothing = "1s"
stale_after = "60s"
[[listeners]]
name = "www"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "web"
''')
        sock = f"{tmp_path}/rs.sock"
        with Halbd(cfg) as h:
            h.wait_port(port)
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

            def spread(n: int) -> Counter:
                got = Counter()
                for _ in range(n):
                    c.request("GET", "/")
                    r = c.getresponse()
                    r.read()
                    assert r.status == 200
                    # the report reaches the client unchanged (it is not hop-by-hop)
                    assert r.getheader("endpoint-load-metrics", "").startswith("TEXT ")
                    got[r.getheader("X-Backend")] += 1
                return got

            # before any report every backend weighs its configured weight (x 100)
            assert [backends_of(sock)[n]["effective_weight"] for n in NAMES] == [100] * 3
            assert [backends_of(sock)[n]["load"] for n in NAMES] == [-1] * 3

            def reported():
                spread(30)
                bs = backends_of(sock)
                return [bs[n]["effective_weight"] for n in NAMES] == [80, 50, 20]
            wait_for(reported, 10, interval=0.05, what="weights 80/50/20 from the reports")
            bs = backends_of(sock)
            assert [bs[n]["load"] for n in NAMES] == pytest.approx([0.2, 0.5, 0.8])
            got = spread(N)
            assert_formula(got, [0.2, 0.5, 0.8], "20/50/80")
            code, out, _ = halbctl("--socket", sock, "backends")
            assert code == 0 and "load" in out and "80%" in out and "0.20" in out, out

            # a's load rises to 90 %: its share falls within a few seconds (smoothing 1 s)
            set_load(k, "a", orca(0.9))
            t0 = time.monotonic()
            windows = []
            while time.monotonic() - t0 < 8.0:
                w = spread(150)
                windows.append((time.monotonic() - t0, w["a"] / 150))
                if w["a"] / 150 <= 0.2:
                    break
            took, share = windows[-1]
            assert share <= 0.2 and took <= 5.0, windows
            # settled (the average within 0.5 % of 0.9): the new shares follow the formula
            wait_for(lambda: spread(20) and backends_of(sock)["a"]["load"] >= 0.895, 10,
                     interval=0.05, what="a's load settled at 0.9")
            got = spread(N)
            assert_formula(got, [0.9, 0.5, 0.8], "90/50/80")
            assert got["a"] / N < 0.2 < got["b"] / N

            # a malformed report is ignored and counted; the smoothed load stays
            set_load(k, "c", "TEXT cpu_utilization=lots")
            before = backends_of(sock)["c"]["load"]
            spread(300)
            assert backends_of(sock)["c"]["load"] == before
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                text = r.read().decode()
            malformed = [ln for ln in text.splitlines()
                         if ln.startswith('halb_load_reports_total{pool="web",result="malformed"}')]
            assert malformed and float(malformed[0].split()[-1]) >= 50, malformed
            assert 'halb_backend_load{backend="a",pool="web"}' in text
            c.close()
            assert h.stop() == 0 and '"level":"error"' not in h.output(), h.output()[-2000:]


def who(port: int) -> str:
    """One TCP connection through halbd: the echo backend says its name."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"WHO\n")
        data = b""
        while b"\n" not in data:
            chunk = s.recv(64)
            if not chunk:
                break
            data += chunk
        return data.split(b"\n", 1)[0].decode()


def test_agent_percentages_feed_a_tcp_pool(tmp_path):
    """HAProxy agents send the idle share as a percentage: 80%, 50% and 20% idle are loads of
    0.2, 0.5 and 0.8; a tcp listener has no response header, the agent is its source."""
    port, aport = free_ports(2)
    hosts = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}
    ks = [Backends([n], http=False, tcp=True, host=hosts[n], logdir=tmp_path) for n in NAMES]
    agents = [Agent(hosts[n], aport, w) for n, w in zip(NAMES, ("80%", "50%", "20%"))]
    try:
        pools = "".join(f'''
[[pools.backends]]
name = "{n}"
address = "{k.tcp[n]}"
''' for n, k in zip(NAMES, ks))
        cfg = write_config(tmp_path, f'''
[node]
name = "ra"
state_dir = "{tmp_path}"
[access_log]
enabled = false
[[pools]]
name = "svc"
algorithm = "resource"
{pools}
[pools.agent]
port = {aport}
interval = "200ms"
timeout = "200ms"
[pools.resource]
smoothing = "500ms"
[[listeners]]
name = "raw"
mode = "tcp"
bind = "127.0.0.1:{port}"
pool = "svc"
''')
        sock = f"{tmp_path}/ra.sock"
        with Halbd(cfg) as h:
            h.wait_port(port)
            wait_for(lambda: [backends_of(sock)[n]["effective_weight"] for n in NAMES]
                     == [80, 50, 20], 10, what="weights 80/50/20 from the agents")
            got = Counter(who(port) for _ in range(1500))
            assert_formula(got, [0.2, 0.5, 0.8], "agent 20/50/80")
            # a's agent now says 10 % idle (90 % busy): a's share falls within a few seconds
            agents[0].words = "10%"
            t0 = time.monotonic()
            windows = []
            while time.monotonic() - t0 < 8.0:
                w = Counter(who(port) for _ in range(100))
                windows.append((time.monotonic() - t0, w["a"] / 100))
                if w["a"] / 100 <= 0.2:
                    break
            took, share = windows[-1]
            assert share <= 0.2 and took <= 5.0, windows
            bs = backends_of(sock)
            assert bs["a"]["agent"] == "10%" and bs["a"]["agent_state"] == ""  # not a weight
            assert bs["a"]["load_reported"] == pytest.approx(0.9)
            assert h.stop() == 0 and '"level":"error"' not in h.output(), h.output()[-2000:]
    finally:
        for a in agents:
            a.close()
        for k in ks:
            k.close()
