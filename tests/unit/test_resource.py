"""Resource-based balancing (halb.resource, algorithm = "resource"): ORCA load reports parsed,
the EWMA, the documented weight formula, and a pool whose weights follow reported load."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from halb import resource as rs
from halb.agent import AgentReply, load_of, parse
from halb.balance import make_balancer
from halb.config import (BackendConfig, ConfigError, Endpoint, PoolConfig, ResourceConfig,
                         loads)
from halb.model import Pool

pytestmark = pytest.mark.unit


# -- ORCA reports ---------------------------------------------------------------------------

@pytest.mark.parametrize("value,want", [
    (b"TEXT cpu_utilization=0.3, mem_utilization=0.8, named_metrics.foo=0.5",
     {"cpu_utilization": 0.3, "mem_utilization": 0.8, "named_metrics.foo": 0.5}),
    (b"TEXT cpu_utilization:0.7,application_utilization:0.8,rps_fractional:1000,eps:2",
     {"cpu_utilization": 0.7, "application_utilization": 0.8, "rps_fractional": 1000.0,
      "eps": 2.0}),
    (b"text utilization.total=0.5", {"utilization.total": 0.5}),
    (b'JSON {"cpu_utilization": 0.3, "named_metrics": {"q": 0.5}, "request_cost": {"x": 9}}',
     {"cpu_utilization": 0.3, "named_metrics.q": 0.5}),
    (b'JSON {"cpuUtilization": 1.5, "utilization": {"gpu": 0.25}}',
     {"cpu_utilization": 1.5, "utilization.gpu": 0.25}),
])
def test_orca_reports_parse(value, want):
    assert rs.parse_orca(value) == (rs.OK, want)


@pytest.mark.parametrize("value", [
    b"", b"TEXT", b"TEXT ", b"cpu_utilization=0.3", b"XML <a/>", b"TEXT cpu_utilization=",
    b"TEXT cpu_utilization=abc", b"TEXT cpu_utilization=nan", b"TEXT cpu_utilization=inf",
    b"TEXT =0.3", b"TEXT cpu_utilization=0.2,cpu_utilization=0.3", b"TEXT bogus_field=0.1",
    b'TEXT cpu_utilization="0.7"', b"JSON {", b"JSON [1]", b'JSON {"cpu_utilization": "x"}',
    b'JSON {"named_metrics": 3}', b'JSON {"cpu_utilization": true}',
    b"TEXT cpu_utilization=0." + b"1" * 5000,
    b"TEXT " + b",".join(b"named_metrics.m%d=0.1" % i for i in range(100)),
])
def test_malformed_reports_give_nothing(value):
    assert rs.parse_orca(value) == (rs.MALFORMED, {})


def test_binary_reports_are_unsupported_not_malformed():
    assert rs.parse_orca(b"BIN CgkJAAAAAAAA4D8=") == (rs.UNSUPPORTED, {})


def test_header_found_in_raw_head_runs():
    parts = [b"Content-Type: text/plain\r\nX-Backend: a",
             b"Endpoint-Load-Metrics:  TEXT cpu_utilization=0.25 \r\nX-Other: 1"]
    assert rs.orca_header(parts) == b"TEXT cpu_utilization=0.25"
    assert rs.orca_header([b"X-Backend: a\r\nX-Endpoint-Load-Metrics-Note: x"]) is None
    assert rs.orca_header([b"endpoint-load-metrics-bin: AAAA"]) == b"BIN AAAA"
    assert rs.orca_header([]) is None


def test_utilization_takes_the_largest_configured_metric_clamped():
    rep = {"cpu_utilization": 0.3, "mem_utilization": 0.8, "named_metrics.q": 2.5}
    assert rs.utilization(rep, ("cpu_utilization",)) == 0.3
    assert rs.utilization(rep, ("cpu_utilization", "mem_utilization")) == 0.8
    assert rs.utilization(rep, ("named_metrics.q",)) == 1.0  # above 1: saturated
    assert rs.utilization({"cpu_utilization": -0.2}, ("cpu_utilization",)) == 0.0
    assert rs.utilization(rep, ("application_utilization",)) is None


# -- EWMA -------------------------------------------------------------------------------------

def test_ewma_first_report_is_taken_as_is_and_tau_is_the_time_constant():
    assert rs.smooth(-1.0, 0.4, 5.0, 2.0) == 0.4
    s = rs.smooth(0.2, 0.9, 2.0, 2.0)  # one time constant: 1 - 1/e of the way
    assert s == pytest.approx(0.2 + 0.7 * (1 - math.exp(-1)), abs=1e-12)
    assert rs.smooth(0.2, 0.9, 0.0, 2.0) == 0.2  # no time passed: no change
    assert rs.smooth(0.2, 0.9, 0.5, 0.0) == 0.9  # smoothing off
    assert rs.smooth(0.2, 0.9, -3.0, 2.0) == 0.2  # a clock step back counts as no time


def test_ewma_does_not_depend_on_the_report_rate():
    # 100 reports 10 ms apart move the average as far as one report a second later
    s = 0.2
    for _ in range(100):
        s = rs.smooth(s, 0.9, 0.01, 2.0)
    assert s == pytest.approx(rs.smooth(0.2, 0.9, 1.0, 2.0), abs=1e-9)


# -- the weight formula ---------------------------------------------------------------------

def test_weight_formula():
    assert rs.weight(1, -1.0, 0.05) == 100  # no report: the ceiling
    assert rs.weight(1, 0.2, 0.05) == 80
    assert rs.weight(3, 0.5, 0.05) == 150
    assert rs.weight(1, 0.999, 0.05) == 5  # the floor: 5 % of the weight
    assert rs.weight(1, 1.0, 0.01) == 1
    assert rs.weight(256, 0.0, 0.05) == 25600
    assert rs.weight(1, 0.125, 0.05) == 88  # 87.5 rounds half up
    assert rs.weight(0, 0.2, 0.05) == 0  # a drained backend stays out


def test_shares_of_20_50_80_percent():
    assert rs.shares([1, 1, 1], [0.2, 0.5, 0.8], 0.05) == pytest.approx([8 / 15, 5 / 15, 2 / 15])


# -- a pool whose weights follow reported load ---------------------------------------------

def rpool(weights=(1, 1, 1), **rc) -> Pool:
    bks = tuple(BackendConfig(name=f"b{i}", address=Endpoint("127.0.0.1", 10000 + i), weight=w)
                for i, w in enumerate(weights))
    cfg = PoolConfig(name="p", backends=bks, algorithm="resource",
                     resource=ResourceConfig(**rc))
    return Pool(cfg, make_balancer(cfg))


def picks(p: Pool, n: int) -> Counter:
    c = Counter()
    for _ in range(n):
        c[p.pick().name] += 1
    return c


def test_pool_shares_follow_the_formula_and_no_report_means_the_ceiling():
    p = rpool()
    assert p.view.weights == (100, 100, 100)
    for b, u in zip(p.backends, (0.2, 0.5, 0.8)):
        p.report_load(b, u, 1.0)
    assert p.view.weights == (100, 100, 100)  # weights follow at the next tick, not per report
    p.tick(1.0)
    assert p.view.weights == (80, 50, 20)
    got = picks(p, 30_000)
    want = rs.shares([1, 1, 1], [0.2, 0.5, 0.8], 0.05)
    for i, w in enumerate(want):
        assert abs(got[f"b{i}"] / 30_000 - w) < 0.002, got


def test_rising_load_moves_the_weight_as_the_ewma_says_then_reports_go_stale():
    p = rpool(smoothing=2.0, stale_after=10.0)
    b0, b1, b2 = p.backends
    for b, u in zip(p.backends, (0.2, 0.5, 0.8)):
        p.report_load(b, u, 0.0)
    p.tick(0.0)
    # b0's load rises to 0.9, reported every 250 ms (the others keep reporting theirs)
    t = 0.0
    seen = []
    while t < 6.0:
        t = round(t + 0.25, 2)
        for b, u in zip(p.backends, (0.9, 0.5, 0.8)):
            p.report_load(b, u, t)
        p.tick(t)
        seen.append(p.view.weights[0])
        s = 0.9 - 0.7 * math.exp(-t / 2.0)
        assert p.view.weights[0] == rs.weight(1, s, 0.05), t
    assert seen == sorted(seen, reverse=True) and seen[0] == 72 and seen[-1] == 13
    assert b0.load_raw == 0.9
    # nothing more reported: at stale_after the weights revert to the configured ones
    p.tick(t + 9.0)
    assert p.view.weights[0] < 100
    p.tick(t + 10.5)
    assert p.view.weights == (100, 100, 100)
    assert b0.load == -1.0
    # and the next report starts afresh, not from the stale average
    p.report_load(b0, 0.6, t + 11.0)
    assert b0.load == 0.6


def test_the_ceiling_is_the_runtime_weight_and_a_drain_stays_a_drain():
    p = rpool(weights=(2, 1))
    b0, b1 = p.backends
    p.report_load(b0, 0.5, 1.0)
    p.report_load(b1, 0.5, 1.0)
    p.tick(1.0)
    assert p.view.weights == (100, 50)
    p.set_weight(b1, 4, 1.0)
    assert p.view.weights == (100, 200)
    p.set_weight(b1, 0, 1.0)
    assert p.view.backends == (b0,)
    p.set_drain(b0, True, 1.0)
    assert p.view.backends == ()


def test_same_reports_same_weights_and_picks():
    def run():
        p = rpool()
        for k in range(40):
            for i, b in enumerate(p.backends):
                p.report_load(b, ((k * 7 + i * 13) % 10) / 10, k * 0.1)
            p.tick(k * 0.1)
        return p.view.weights, [p.pick().name for _ in range(500)]
    assert run() == run()


def test_a_reload_to_resource_reads_load_and_back_forgets_it():
    p = rpool()
    b0 = p.backends[0]
    p.report_load(b0, 0.5, 1.0)
    p.tick(1.0)
    assert p.view.weights[0] == 50
    wrr = PoolConfig(name="p", backends=p.cfg.backends, algorithm="wrr")
    p.reconfigure(wrr, 1.5)
    assert not p.resource and p.view.weights == (1, 1, 1) and b0.load == -1.0
    # an agent's percentage was a weight under wrr; under resource it will be load again
    b0.agent_weight = 0
    p.reconfigure(PoolConfig(name="p", backends=p.cfg.backends, algorithm="resource"), 2.0)
    assert p.resource and b0.agent_weight == -1 and p.view.weights == (100, 100, 100)


# -- the agent as a source --------------------------------------------------------------------

def test_agent_words_report_load():
    r = parse("cpu_utilization=0.35 mem_utilization:0.9 up")
    assert r.metrics == (("cpu_utilization", 0.35), ("mem_utilization", 0.9)) and r.down is False
    assert load_of(r, ("cpu_utilization",)) == 0.35
    assert load_of(r, ("cpu_utilization", "mem_utilization")) == 0.9
    # HAProxy agents send the idle share as a percentage: 70% idle is a load of 0.3
    assert load_of(parse("70%"), ("cpu_utilization",)) == pytest.approx(0.3)
    assert load_of(parse("weight:150%"), ("cpu_utilization",)) == 0.0
    # the metric word wins over the percentage; nothing said: None
    assert load_of(parse("70% cpu_utilization=0.5"), ("cpu_utilization",)) == 0.5
    assert load_of(parse("ready"), ("cpu_utilization",)) is None
    assert load_of(AgentReply(), ("cpu_utilization",)) is None
    assert parse("cpu_utilization=nan").metrics == ()


# -- config ----------------------------------------------------------------------------------

BASE = """
[node]
name = "lb1"
[[pools]]
name = "web"
algorithm = "resource"
  [[pools.backends]]
  address = "127.0.0.1:9001"
  [[pools.backends]]
  address = "127.0.0.1:9002"
[[listeners]]
name = "www"
mode = "http"
bind = "127.0.0.1:8080"
pool = "web"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        loads(text)
    return [str(p) for p in ei.value.problems]


def test_config_defaults_and_settings():
    cfg = loads(BASE)
    assert cfg.pools[0].resource == ResourceConfig(("cpu_utilization",), 2.0, 10.0, 0.05)
    cfg = loads(BASE.replace('[[listeners]]', '[pools.resource]\nmetric = ["cpu_utilization", '
                             '"named_metrics.queue"]\nsmoothing = "500ms"\nstale_after = "3s"\n'
                             'floor = 0.1\n[[listeners]]', 1))
    assert cfg.pools[0].resource == ResourceConfig(("cpu_utilization", "named_metrics.queue"),
                                                   0.5, 3.0, 0.1)


@pytest.mark.parametrize("edit,expected", [
    (lambda t: t.replace('algorithm = "resource"', 'algorithm = "wrr"').replace(
        '[[listeners]]', '[pools.resource]\nsmoothing = "1s"\n[[listeners]]', 1),
     "pools[0].resource: [pools.resource] needs algorithm = \"resource\" (algorithm is 'wrr')"),
    (lambda t: t.replace('[[listeners]]', '[pools.resource]\nmetric = "load"\n[[listeners]]', 1),
     "pools[0].resource.metric: unknown metric 'load' (expected cpu_utilization, "
     "mem_utilization, application_utilization, named_metrics.NAME or utilization.NAME)"),
    (lambda t: t.replace('[[listeners]]', '[pools.resource]\nfloor = 0\n[[listeners]]', 1),
     "pools[0].resource.floor: 0 out of range (0.01..1, a fraction of the backend's weight)"),
    (lambda t: t.replace('[[listeners]]', '[pools.agent]\nport = 9\ninterval = "5s"\n'
                         '[pools.resource]\nstale_after = "5s"\n[[listeners]]', 1),
     "pools[0].resource.stale_after: stale_after 5s must be longer than the agent interval 5s "
     "(every agent report would be stale by the next)"),
    (lambda t: t.replace('mode = "http"', 'mode = "tcp"'),
     "listeners[0].pool: pool 'web' balances by reported load (algorithm = \"resource\"), which "
     "a tcp listener can only learn from an agent: add [pools.agent] to the pool, or use "
     "mode = \"http\" (the endpoint-load-metrics response header)"),
])
def test_bad_resource_config_names_the_key(edit, expected):
    assert expected in problems(edit(BASE))


def test_tcp_listener_on_a_resource_pool_with_an_agent_or_an_http_front_is_fine():
    loads(BASE.replace('mode = "http"', 'mode = "tcp"').replace(
        '[[listeners]]', '[pools.agent]\nport = 9\n[[listeners]]', 1))
    loads(BASE + '[[listeners]]\nname = "raw"\nmode = "tcp"\nbind = "127.0.0.1:8081"\n'
                 'pool = "web"\n')


# -- metrics ---------------------------------------------------------------------------------

def test_metrics_show_load_and_report_counts_only_for_resource_pools():
    import time

    from prometheus_client import generate_latest

    from halb.metrics import Metrics
    m = Metrics("n")
    p = rpool()
    now = time.monotonic()
    p.report_load(p.backends[0], 0.25, now)
    p.load_reports["ok"] += 1
    p.load_reports["malformed"] += 2
    p.tick(now)
    m.pool_view(p, p.view, now)
    text = generate_latest(m.registry).decode()
    assert 'halb_backend_load{backend="b0",pool="p"} 0.25' in text
    assert 'backend="b1"' not in "".join(l for l in text.splitlines() if "backend_load{" in l)
    assert 'halb_load_reports_total{pool="p",result="malformed"} 2.0' in text
    assert 'halb_backend_weight{backend="b0",pool="p"} 75.0' in text
    other = Metrics("n")
    wp = Pool(PoolConfig(name="w", backends=p.cfg.backends, algorithm="wrr"))
    other.pool_view(wp, wp.view, now)
    assert "halb_backend_load" not in generate_latest(other.registry).decode()


def test_deeply_nested_json_report_is_malformed_not_an_exception():
    assert rs.parse_orca("JSON " + "[" * 3000) == (rs.MALFORMED, {})
    assert rs.parse_orca("JSON " + '{"a":' * 2000) == (rs.MALFORMED, {})
