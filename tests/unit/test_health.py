"""Health check core: rise/fall state machine, HTTP verdicts, requests, scheduling, and the
checker's verdict path (pool view swap, log, metrics) driven with a FakeClock."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import replace

import pytest

from halb import log as hlog
from halb.clock import FakeClock
from halb.config import BackendConfig, Endpoint, HealthConfig, PoolConfig
from halb.health import (MAX_INCONCLUSIVE, CheckState, HealthChecker, build_request, evaluate_http,
                         first_delay, next_delay, stall_allowance)
from halb.metrics import Metrics
from halb.model import Pool

pytestmark = pytest.mark.unit


# -- state machine ------------------------------------------------------------------------------

def run(st: CheckState, results: str) -> str:
    """Feeds results ('+' good, '-' bad); returns the verdict after each ('U' up, 'D' down)."""
    out = []
    for r in results:
        st.result(None if r == "?" else r == "+", "r")
        out.append("U" if st.up else "D")
    return "".join(out)


@pytest.mark.parametrize("rise,fall,up,results,verdicts", [
    # fresh and up: the first failure takes it down (HAProxy init-state up)
    (2, 3, True, "-", "D"),
    (2, 3, True, "-++", "DDU"),
    # after a good first check, fall consecutive failures are needed
    (2, 3, True, "+--", "UUU"),
    (2, 3, True, "+---", "UUUD"),
    # a success in between resets the failure streak
    (2, 3, True, "+--+--", "UUUUUU"),
    (2, 3, True, "+--+---", "UUUUUUD"),
    # going up needs rise consecutive successes; a failure resets
    (3, 2, False, "++-+++", "DDDDDU"),
    (1, 1, False, "+-+-", "UDUD"),
    (2, 1, True, "+-", "UD"),
    # inconclusive checks ('?', halb's own loop was late) neither count nor break a streak...
    (2, 2, True, "+-?-", "UUUD"),
    (2, 2, True, "+??-", "UUUU"),
    (2, 2, False, "+?+", "DDU"),
    (2, 1, True, "+??", "UUU"),
    # ... but MAX_INCONCLUSIVE (3) in a row count as one failure
    (2, 1, True, "+???", "UUUD"),
    (2, 2, True, "+??????", "UUUUUUD"),
    (2, 2, True, "+??+??-", "UUUUUUU"),
])
def test_rise_fall(rise, fall, up, results, verdicts):
    assert run(CheckState(rise, fall, up=up), results) == verdicts


def test_transition_carries_reason_and_streak():
    st = CheckState(2, 2)
    assert st.result(True, "status 200") is None
    assert st.result(False, "timeout") is None
    t = st.result(False, "connection refused")
    assert t is not None and t.up is False and t.reason == "connection refused" and t.streak == 2
    assert st.result(True, "status 200") is None
    t = st.result(True, "status 200")
    assert t.up is True and t.streak == 2


def test_stall_allowance():
    assert MAX_INCONCLUSIVE == 3
    assert stall_allowance(0.2) == pytest.approx(0.05)
    assert stall_allowance(2.0) == pytest.approx(0.5)
    assert stall_allowance(0.04) == pytest.approx(0.02)  # a floor: one busy loop turn is not a stall


def test_bad_thresholds_rejected():
    with pytest.raises(ValueError):
        CheckState(0, 1)


# -- HTTP verdicts and requests -------------------------------------------------------------------

HC = HealthConfig(type="http", path="/healthz", expect_status=(200, 204), expect_body="ok")


@pytest.mark.parametrize("status,body,complete,ok,reason", [
    (200, b"all ok\n", True, True, "status 200"),
    (204, b"ok", True, True, "status 204"),
    (503, b"ok", True, False, "status 503 (expected 200,204)"),
    (200, b"sick", True, False, "status 200, body lacks 'ok'"),
    (200, b"sick", False, False, "status 200, body lacks 'ok' in the first 4 bytes"),
    (None, b"", True, False, "no HTTP response"),
])
def test_evaluate_http(status, body, complete, ok, reason):
    assert evaluate_http(HC, status, body, complete=complete) == (ok, reason)


def test_evaluate_http_without_body_expectation():
    hc = replace(HC, expect_body="")
    assert evaluate_http(hc, 200, b"") == (True, "status 200")


def _pool(n=3, health=HC, **kw) -> Pool:
    bks = tuple(BackendConfig(name=f"b{i}", address=Endpoint("127.0.0.1", 9000 + i)) for i in range(n))
    return Pool(PoolConfig(name="web", backends=bks, health=health, **kw))


def test_build_request():
    p = _pool(1)
    b = p.backends[0]
    assert build_request(HC, b) == (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n"
                                    b"User-Agent: halb-health\r\nAccept: */*\r\n"
                                    b"Connection: close\r\n\r\n")
    hc = replace(HC, method="HEAD", host="app.example", path="/ready?x=1")
    assert build_request(hc, b).startswith(b"HEAD /ready?x=1 HTTP/1.1\r\nHost: app.example\r\n")


# -- scheduling -----------------------------------------------------------------------------------

def test_jitter_bounds_and_mean():
    rnd = random.Random(1)
    ds = [next_delay(2.0, 0.1, rnd) for _ in range(5000)]
    assert min(ds) >= 1.8 and max(ds) <= 2.2
    assert abs(sum(ds) / len(ds) - 2.0) < 0.01
    assert max(ds) - min(ds) > 0.35  # really spread
    assert next_delay(2.0, 0.0, rnd) == 2.0


def test_first_checks_spread_over_first_interval():
    rnd = random.Random(2)
    firsts = [first_delay(1.0, rnd) for _ in range(1000)]
    assert all(0.0 <= d <= 1.0 for d in firsts)
    bins = [0] * 10
    for d in firsts:
        bins[min(9, int(d * 10))] += 1
    assert min(bins) > 60  # ~100 each: no clustering


# -- the checker's verdict path with a FakeClock --------------------------------------------------

class Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[dict] = []

    def emit(self, record):
        self.records.append(json.loads(self.format(record)))


@pytest.fixture
def logs():
    root = logging.getLogger("halb")
    saved = (root.handlers[:], root.level, root.propagate)
    hlog.setup("t1", "info")
    h = Capture()
    h.setFormatter(root.handlers[0].formatter)
    root.handlers[:] = [h]
    yield h.records
    root.handlers[:], root.level, root.propagate = saved


def test_checker_marks_down_after_fall_intervals_and_up_after_rise(logs):
    hc = HealthConfig(type="http", interval=0.2, timeout=0.1, rise=2, fall=3)
    clock = FakeClock()
    m = Metrics("t1")
    pool = _pool(3, hc)
    pool.on_change = lambda p, v: m.pool_view(p, v, clock.now())
    chk = HealthChecker(pool, clock, m)
    b1 = pool.backends[1]
    for b in pool.backends:  # one good round: past the init-state rule
        chk.apply(b, True, "status 200")
    assert len(pool.view) == 3
    t_fail = clock.now()
    verdict_at = None
    for i in range(5):
        clock.advance(hc.interval)
        chk.apply(b1, False, "connection refused")
        if not b1.healthy and verdict_at is None:
            verdict_at = clock.now()
    assert verdict_at - t_fail == pytest.approx(hc.fall * hc.interval)
    assert b1 not in pool.view.backends and len(pool.view) == 2
    assert m.value("halb_health_transitions_total", {"pool": "web", "backend": "b1", "to": "down"}) == 1
    assert m.value("halb_backend_up", {"pool": "web", "backend": "b1"}) == 0
    assert m.value("halb_backend_state", {"pool": "web", "backend": "b1", "state": "down"}) == 1
    down = [r for r in logs if r["event"] == "backend_down"]
    assert len(down) == 1 and down[0]["pool"] == "web" and down[0]["backend"] == "b1"
    assert down[0]["reason"] == "connection refused" and down[0]["consecutive"] == 3

    t_ok = clock.now()
    for i in range(hc.rise):
        clock.advance(hc.interval)
        chk.apply(b1, True, "status 200")
    assert b1.healthy and b1 in pool.view.backends
    assert b1.up_since == clock.now() == pytest.approx(t_ok + hc.rise * hc.interval)
    assert m.value("halb_health_transitions_total", {"pool": "web", "backend": "b1", "to": "up"}) == 1
    assert m.value("halb_backend_up", {"pool": "web", "backend": "b1"}) == 1
    up = [r for r in logs if r["event"] == "backend_up"]
    assert len(up) == 1 and up[0]["reason"] == "status 200"
    # steady results change nothing and count nothing
    for _ in range(5):
        chk.apply(b1, True, "status 200")
    assert m.value("halb_health_transitions_total", {"pool": "web", "backend": "b1", "to": "up"}) == 1


def test_checker_state_follows_initial_backend_health():
    pool = Pool(_pool(2).cfg, initially_healthy=False)
    chk = HealthChecker(pool, FakeClock(), None)
    assert not chk.states["b0"].up
    chk.apply(pool.backends[0], True, "ok")
    assert not pool.backends[0].healthy  # rise = 2
    chk.apply(pool.backends[0], True, "ok")
    assert pool.backends[0].healthy
