"""Health checks and metrics with real sockets and processes.

In-process: the checker's TCP and HTTP probes against real loopback servers (good, refused,
wrong status, wrong body, silent, garbage, oversized). Real processes: a ``halbd`` health-checks
three ``lab.backend`` HTTP servers; one is killed and restarted on the same port; the metrics
endpoint shows it go down within fall x interval + timeout and up again after rise x interval.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from dataclasses import replace

import pytest

from halb.clock import MonotonicClock
from halb.config import BackendConfig, Endpoint, HealthConfig, PoolConfig
from halb.health import MAX_RESPONSE, HealthChecker
from halb.metrics import Metrics
from halb.model import Pool
from lab.backend import Backend as LabBackend
from tests.helpers import Backends, Halbd, free_port, wait_for, write_config

pytestmark = pytest.mark.integration


# -- probes against real servers (in process) ------------------------------------------------

def _checker(port: int, health: HealthConfig) -> tuple[HealthChecker, Pool]:
    cfg = PoolConfig(name="p", backends=(BackendConfig(name="b", address=Endpoint("127.0.0.1", port)),),
                     health=health)
    pool = Pool(cfg)
    return HealthChecker(pool, MonotonicClock(), Metrics("t")), pool


async def _raw_server(handler) -> tuple[asyncio.AbstractServer, int]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


HTTP = HealthConfig(type="http", interval=0.2, timeout=0.3, path="/healthz", expect_body="ok")


def test_probes_against_real_servers():
    async def main():
        out = {}
        port = free_port()
        lb = LabBackend("web1")
        await lb.start(http=f"127.0.0.1:{port}")
        try:
            chk, _ = _checker(port, HTTP)
            out["http ok"] = await chk.probe(chk.pool.backends[0])
            out["tcp ok"] = await _checker(port, replace(HTTP, type="tcp", expect_body=""))[0].probe(
                chk.pool.backends[0])
            out["wrong body"] = await _checker(port, replace(HTTP, expect_body="pong"))[0].probe(
                chk.pool.backends[0])
            lb.sick = True
            out["sick"] = await chk.probe(chk.pool.backends[0])
            out["status list"] = await _checker(port, replace(HTTP, expect_status=(200, 503),
                                                              expect_body=""))[0].probe(
                chk.pool.backends[0])
        finally:
            lb.close()
        refused = free_port()
        chk, _ = _checker(refused, HTTP)
        out["refused"] = await chk.probe(chk.pool.backends[0])

        async def silent(r, w):
            await asyncio.sleep(5)
            w.close()

        async def garbage(r, w):
            await r.readuntil(b"\r\n\r\n")
            w.write(b"SSH-2.0-OpenSSH\r\n\r\n")
            await w.drain()
            w.close()

        async def huge(r, w):
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 200 OK\r\n")
            try:
                for _ in range(MAX_RESPONSE // 1000 + 10):
                    w.write(b"X-Pad: " + b"a" * 990 + b"\r\n")
                    await w.drain()
            except OSError:
                pass
            w.close()

        async def big_body(r, w):
            await r.readuntil(b"\r\n\r\n")
            body = b"x" * (MAX_RESPONSE * 4) + b"ok"
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            try:
                await w.drain()
            except OSError:
                pass
            w.close()

        for name, h in (("silent", silent), ("garbage", garbage), ("huge head", huge),
                        ("big body", big_body)):
            srv, p = await _raw_server(h)
            try:
                chk, _ = _checker(p, HTTP)
                t = time.monotonic()
                out[name] = await chk.probe(chk.pool.backends[0])
                out[name + " s"] = time.monotonic() - t
            finally:
                srv.close()
        return out

    out = asyncio.run(main())
    assert out["http ok"] == (True, "status 200")
    assert out["tcp ok"] == (True, "connected")
    assert out["wrong body"] == (False, "status 200, body lacks 'pong'")
    assert out["sick"] == (False, "status 503 (expected 200-399)")
    assert out["status list"] == (True, "status 503")
    assert out["refused"] == (False, "connection refused")
    assert out["silent"] == (False, "timeout after 0.3s")
    assert 0.25 <= out["silent s"] < 2.0
    assert out["garbage"][0] is False and out["garbage"][1].startswith("bad HTTP response")
    assert out["huge head"] == (False, f"response head larger than {MAX_RESPONSE} bytes")
    assert out["big body"][0] is False and "body lacks 'ok' in the first" in out["big body"][1]


def test_check_during_a_stalled_loop_is_inconclusive_not_a_failure():
    """halb stopped (SIGSTOP, a paused VM) or its loop blocked while a check is in flight: the
    timeout fires late, and the healthy backend must not be counted as failing (a false
    backend_down moves sticky clients). A silent backend still fails when the loop is not late."""
    async def main():
        port = free_port()
        lb = LabBackend("web1")
        await lb.start(http=f"127.0.0.1:{port}")
        out = {}
        try:
            for kind in ("http", "tcp"):
                chk, _ = _checker(port, replace(HTTP, type=kind, expect_body=""))
                results = []
                for _ in range(5):
                    task = asyncio.ensure_future(chk.probe(chk.pool.backends[0]))
                    await asyncio.sleep(0)  # the probe starts its connect, then the loop stalls
                    time.sleep(0.6)  # twice the 0.3 s timeout, in the loop's own thread
                    results.append(await task)
                out[kind] = results
                out[kind + " after"] = await chk.probe(chk.pool.backends[0])
        finally:
            lb.close()

        async def silent(r, w):
            await asyncio.sleep(5)
            w.close()
        srv, p = await _raw_server(silent)
        try:
            chk, _ = _checker(p, HTTP)
            out["silent"] = await chk.probe(chk.pool.backends[0])
        finally:
            srv.close()
        return out

    out = asyncio.run(main())
    for kind in ("http", "tcp"):
        assert all(ok is not False for ok, _ in out[kind]), out[kind]
        assert any(ok is None and "inconclusive" in why and "late" in why for ok, why in out[kind]), out[kind]
        assert out[kind + " after"][0] is True
    assert out["silent"] == (False, "timeout after 0.3s")


def test_checker_task_applies_verdicts_and_stops():
    async def main():
        port = free_port()
        lb = LabBackend("web1")
        await lb.start(http=f"127.0.0.1:{port}")
        hc = replace(HTTP, interval=0.05, timeout=0.2, rise=2, fall=2)
        chk, pool = _checker(port, hc)
        b = pool.backends[0]
        await chk.start()
        try:
            await asyncio.sleep(0.2)
            assert b.healthy and chk.states["b"].checks >= 2
            lb.sick = True
            for _ in range(100):
                await asyncio.sleep(0.02)
                if not b.healthy:
                    break
            assert not b.healthy and pool.view.backends == ()
            lb.sick = False
            for _ in range(100):
                await asyncio.sleep(0.02)
                if b.healthy:
                    break
            assert b.healthy and pool.view.backends == (b,)
        finally:
            await chk.stop()
            lb.close()
        n = chk.states["b"].checks
        await asyncio.sleep(0.15)
        assert chk.states["b"].checks == n  # stopped
        return chk.metrics

    m = asyncio.run(main())
    assert m.value("halb_health_transitions_total", {"pool": "p", "backend": "b", "to": "down"}) == 1
    assert m.value("halb_health_transitions_total", {"pool": "p", "backend": "b", "to": "up"}) == 1


# -- real halbd ---------------------------------------------------------------------------------

INTERVAL, TIMEOUT, RISE, FALL, JITTER = 0.2, 0.1, 2, 3, 0.1
SLACK = 1.0  # scheduling on a loaded 2-core machine; measured values are printed


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return r.read().decode()


def sample(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        lab = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.index("}") + 1]))
        if all(lab.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_halbd_marks_killed_backend_down_and_restarted_backend_up(tmp_path):
    mport = free_port()
    with Backends(["web1", "web2", "web3"], http=True, logdir=tmp_path) as bk:
        backends = "".join(f'[[pools.backends]]\nname = "{n}"\naddress = "{bk.http[n]}"\n\n'
                           for n in ("web1", "web2", "web3"))
        cfg = write_config(tmp_path, f"""
[node]
name = "hm1"
state_dir = "{tmp_path}"

[metrics]
address = "127.0.0.1:{mport}"

[[pools]]
name = "web"
algorithm = "roundrobin"

[pools.health]
type = "http"
path = "/healthz"
expect_body = "ok"
interval = "{int(INTERVAL * 1000)}ms"
timeout = "{int(TIMEOUT * 1000)}ms"
rise = {RISE}
fall = {FALL}
jitter = {JITTER}

{backends}""")
        with Halbd(cfg) as node:
            node.wait_port(mport)
            node.wait_log('"health_started"')
            time.sleep(2 * INTERVAL)  # every backend has had a good check
            m = scrape(mport)
            for n in ("web1", "web2", "web3"):
                assert sample(m, "halb_backend_up", pool="web", backend=n) == 1, m
            assert sample(m, "halb_pool_backends_serving", pool="web") == 3

            # kill web2: down within fall x interval (+ jitter) + timeout
            bk.kill("web2")
            t0 = time.monotonic()
            wait_for(lambda: sample(scrape(mport), "halb_backend_up", pool="web", backend="web2") == 0,
                     10, interval=0.01, what="web2 down in metrics")
            down_s = time.monotonic() - t0
            bound_down = FALL * INTERVAL * (1 + JITTER) + TIMEOUT
            print(f"\nweb2 marked down {down_s:.3f}s after kill "
                  f"(fall x interval + timeout = {FALL * INTERVAL + TIMEOUT:.3f}s, "
                  f"with jitter {bound_down:.3f}s, slack {SLACK}s)")
            assert down_s <= bound_down + SLACK
            assert down_s >= (FALL - 1) * INTERVAL * (1 - JITTER) - 0.05  # fall is honoured
            m = scrape(mport)
            assert sample(m, "halb_backend_state", pool="web", backend="web2", state="down") == 1
            assert sample(m, "halb_health_transitions_total", pool="web", backend="web2", to="down") == 1
            assert sample(m, "halb_pool_backends_serving", pool="web") == 2
            for n in ("web1", "web3"):
                assert sample(m, "halb_backend_up", pool="web", backend=n) == 1

            # restart on the same port: up after rise x interval
            bk.start("web2")
            t1 = time.monotonic()
            wait_for(lambda: sample(scrape(mport), "halb_backend_up", pool="web", backend="web2") == 1,
                     10, interval=0.01, what="web2 up in metrics")
            up_s = time.monotonic() - t1
            bound_up = RISE * INTERVAL * (1 + JITTER)
            print(f"web2 marked up {up_s:.3f}s after restart "
                  f"(rise x interval = {RISE * INTERVAL:.3f}s, with jitter {bound_up:.3f}s)")
            assert up_s <= bound_up + SLACK
            assert up_s >= (RISE - 1) * INTERVAL * (1 - JITTER) - 0.05  # rise is honoured
            m = scrape(mport)
            assert sample(m, "halb_backend_state", pool="web", backend="web2", state="up") == 1
            assert sample(m, "halb_health_transitions_total", pool="web", backend="web2", to="up") == 1
            assert sample(m, "halb_health_transitions_total", pool="web", backend="web1", to="down") is None
            assert sample(m, "halb_pool_backends_serving", pool="web") == 3

            log = node.output()
            downs = [l for l in log.splitlines() if '"backend_down"' in l]
            ups = [l for l in log.splitlines() if '"backend_up"' in l]
            assert len(downs) == 1 and '"backend":"web2"' in downs[0] and '"pool":"web"' in downs[0]
            assert '"reason":"connection refused"' in downs[0]
            assert len(ups) == 1 and '"reason":"status 200"' in ups[0]
            assert node.stop() == 0


# -- metrics endpoint -----------------------------------------------------------------------------

def test_metrics_families_over_http_and_port_taken(capfd):
    import logging

    from halb import log as hlog

    root = logging.getLogger("halb")
    saved = (root.handlers[:], root.level, root.propagate)
    hlog.setup("mt", "info")
    try:
        _metrics_families(capfd)
    finally:
        root.handlers[:], root.level, root.propagate = saved


def _metrics_families(capfd):
    from halb.tables import Tables

    m = Metrics("mt")
    cfg = PoolConfig(name="api", backends=(
        BackendConfig(name="a1", address=Endpoint("127.0.0.1", 9001), max_conns=5),
        BackendConfig(name="a2", address=Endpoint("127.0.0.1", 9002), weight=3)))
    pool = Pool(cfg, on_change=lambda p, v: m.pool_view(p, v, 1.0))
    a1, a2 = pool.backends
    for _ in range(3):
        Pool.acquire(a1)
    m.observe(a1, 0.004, False)
    m.observe(a1, 0.2, False)
    m.observe(a1, None, True)
    m.conn_open("front")
    m.conn_open("front")
    m.conn_close("front")
    pool.set_drain(a2, True, 1.0)
    tables = Tables("mt")
    tables.sticky.put("cookie/api/x", "a1", 60.0, pool="api")
    m.tables(tables)
    port = free_port()
    assert m.serve(Endpoint("127.0.0.1", port)) is True
    try:
        text = scrape(port)
        assert sample(text, "halb_info", node="mt") == 1
        assert sample(text, "halb_backend_requests_total", pool="api", backend="a1") == 3
        assert sample(text, "halb_backend_errors_total", pool="api", backend="a1") == 1
        assert sample(text, "halb_backend_response_seconds_count", pool="api", backend="a1") == 2
        assert sample(text, "halb_backend_response_seconds_bucket", pool="api", backend="a1",
                      le="0.005") == 1
        assert sample(text, "halb_backend_active_connections", pool="api", backend="a1") == 3
        Pool.release(a1)
        assert sample(scrape(port), "halb_backend_active_connections", pool="api", backend="a1") == 2
        assert sample(text, "halb_backend_state", pool="api", backend="a2", state="drain") == 1
        assert sample(text, "halb_backend_up", pool="api", backend="a2") == 0
        assert sample(text, "halb_backend_weight", pool="api", backend="a1") == 1
        assert sample(text, "halb_listener_connections_total", listener="front") == 2
        assert sample(text, "halb_listener_active_connections", listener="front") == 1
        assert sample(text, "halb_table_entries", table="sticky") == 1
        assert sample(text, "halb_table_entries", table="flow") == 0
        # a second node on the same port: logged, not raised
        m2 = Metrics("mt2")
        assert m2.serve(Endpoint("127.0.0.1", port)) is False
        err = capfd.readouterr().err
        assert '"event":"metrics_serve_failed"' in err and f"127.0.0.1:{port}" in err
        m2.close()
    finally:
        m.close()
    with pytest.raises(OSError):
        scrape(port)
