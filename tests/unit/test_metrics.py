"""halb.metrics: the hot-path counters export what prometheus_client's own metrics would.

``observe`` / ``conn_open`` / ``conn_close`` keep plain lists that a collector turns into
families at scrape time. Checked here: the exported text against values computed in the test,
against prometheus_client's Counter / Histogram / Gauge fed the same calls (bucket edges
included), and scrapes running in another thread while the calls go on.
"""

from __future__ import annotations

import math
import sys
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from halb.config import BackendConfig, Endpoint, PoolConfig
from halb.metrics import RT_BUCKETS, Metrics
from halb.model import Pool
from halb.tables import Tables

pytestmark = pytest.mark.unit

BACKEND_FAMILIES = ("halb_backend_requests", "halb_backend_errors", "halb_backend_response_seconds")
LISTENER_FAMILIES = ("halb_listener_connections", "halb_listener_active_connections")


def _pool(name="api", n=2) -> Pool:
    return Pool(PoolConfig(name=name, backends=tuple(
        BackendConfig(name=f"{name}{i}", address=Endpoint("127.0.0.1", 9000 + i)) for i in range(n))))


def _families(text: str, names) -> str:
    """The lines of ``text`` that belong to the families ``names`` (HELP, TYPE and samples)."""
    out = []
    for line in text.splitlines():
        word = line.split()[2] if line.startswith("#") else line.split("{")[0].split(" ")[0]
        if any(word == n or word == n + "_total" or
               (word.startswith(n + "_") and word[len(n) + 1:] in ("total", "bucket", "count", "sum"))
               for n in names):
            out.append(line)
    return "\n".join(out)


def _le(b: float) -> str:
    return "+Inf" if b == math.inf else repr(b)


def test_exported_text_matches_values_computed_here():
    m = Metrics("n")
    a0, a1 = _pool().backends
    calls = [(a0, 0.0003, False), (a0, 0.004, False), (a0, 0.004, True), (a0, 0.2, False),
             (a0, None, True), (a0, 45.0, False), (a1, 0.0005, False), (a1, 0.0025, True)]
    for b, rt, err in calls:
        m.observe(b, rt, err)
    for _ in range(3):
        m.conn_open("front")
    m.conn_close("front")
    m.conn_open("l4")

    expected = []
    for fam, kind, help_ in (("halb_backend_requests", "counter", "Requests or connections finished at a backend"),
                             ("halb_backend_errors", "counter", "Requests or connections that failed at a backend"),
                             ("halb_backend_response_seconds", "histogram", "Backend response time")):
        name = fam + "_total" if kind == "counter" else fam
        expected += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        for b in (a0, a1):
            mine = [(rt, err) for bb, rt, err in calls if bb is b]
            lab = f'backend="{b.name}",pool="api"'
            if fam == "halb_backend_requests":
                expected.append(f"{name}{{{lab}}} {float(len(mine))}")
            elif fam == "halb_backend_errors":
                expected.append(f"{name}{{{lab}}} {float(sum(e for _, e in mine))}")
            else:
                rts = [rt for rt, _ in mine if rt is not None]
                for bound in RT_BUCKETS + (math.inf,):
                    n = sum(1 for rt in rts if rt <= bound)
                    expected.append(f'{name}_bucket{{backend="{b.name}",le="{_le(bound)}",pool="api"}} {float(n)}')
                expected.append(f"{name}_count{{{lab}}} {float(len(rts))}")
                expected.append(f"{name}_sum{{{lab}}} {sum(rts, 0.0)!r}")
    expected += ["# HELP halb_listener_connections_total Client connections accepted",
                 "# TYPE halb_listener_connections_total counter",
                 'halb_listener_connections_total{listener="front"} 3.0',
                 'halb_listener_connections_total{listener="l4"} 1.0',
                 "# HELP halb_listener_active_connections Client connections open",
                 "# TYPE halb_listener_active_connections gauge",
                 'halb_listener_active_connections{listener="front"} 2.0',
                 'halb_listener_active_connections{listener="l4"} 1.0']

    text = generate_latest(m.registry).decode()
    assert _families(text, BACKEND_FAMILIES + LISTENER_FAMILIES) == "\n".join(expected)
    assert "_created" not in text
    # a0: buckets 0.0005 -> 1, 0.005 -> 3, 0.25 -> 4, +Inf -> 5 (45 s); a1: 0.0005 exactly is <= 0.0005
    assert m.value("halb_backend_response_seconds_bucket", {"pool": "api", "backend": "api0", "le": "0.005"}) == 3
    assert m.value("halb_backend_response_seconds_bucket", {"pool": "api", "backend": "api0", "le": "30.0"}) == 4
    assert m.value("halb_backend_response_seconds_bucket", {"pool": "api", "backend": "api1", "le": "0.0005"}) == 1
    assert m.value("halb_backend_requests_total", {"pool": "api", "backend": "api0"}) == 6.0
    assert m.value("halb_backend_errors_total", {"pool": "api", "backend": "api1"}) == 1.0
    assert m.value("halb_listener_active_connections", {"listener": "front"}) == 2.0
    assert m.value("halb_listener_connections_total", {"listener": "nope"}) is None


def _reference():
    """The families as prometheus_client's own metric classes export them (halb before the
    hot paths moved to plain lists), and the same three calls on them."""
    r = CollectorRegistry(auto_describe=True)
    Gauge("halb_info", "halb node", ["node", "version"], registry=r)
    req = Counter("halb_backend_requests", "Requests or connections finished at a backend",
                  ["pool", "backend"], registry=r)
    err = Counter("halb_backend_errors", "Requests or connections that failed at a backend",
                  ["pool", "backend"], registry=r)
    hist = Histogram("halb_backend_response_seconds", "Backend response time", ["pool", "backend"],
                     buckets=RT_BUCKETS, registry=r)
    lconns = Counter("halb_listener_connections", "Client connections accepted", ["listener"], registry=r)
    lactive = Gauge("halb_listener_active_connections", "Client connections open", ["listener"], registry=r)

    def observe(b, rt, error):
        lv = (b.pool, b.name)
        req.labels(*lv).inc()
        e = err.labels(*lv)
        h = hist.labels(*lv)
        if error:
            e.inc()
        if rt is not None and rt >= 0:
            h.observe(rt)

    def conn_open(name):
        lconns.labels(name).inc()
        lactive.labels(name).inc()

    def conn_close(name):
        lconns.labels(name)
        lactive.labels(name).dec()

    return r, observe, conn_open, conn_close


def test_same_text_as_prometheus_client_metrics_at_every_bucket_edge():
    m = Metrics("n")
    ref, r_observe, r_open, r_close = _reference()
    api, web = _pool("api"), _pool("web", 1)
    rts = [0.0, 1e-9, None, -0.5, math.nan, math.inf, 1234.5]
    for bound in RT_BUCKETS:
        rts += [math.nextafter(bound, 0), bound, math.nextafter(bound, math.inf)]
    i = 0
    for rt in rts:
        for b in (*api.backends, *web.backends):
            i += 1
            for fn in (m.observe, r_observe):
                fn(b, rt, i % 3 == 0)
    # a new Backend object with the names of an old one counts on where that one left off
    again = _pool("web", 1).backends[0]
    for fn in (m.observe, r_observe):
        fn(again, 0.07, True)
    for op, name in (("open", "a"), ("open", "b"), ("close", "a"), ("open", "a"), ("close", "c")):
        if op == "open":
            m.conn_open(name)
            r_open(name)
        else:
            m.conn_close(name)
            r_close(name)
    names = BACKEND_FAMILIES + LISTENER_FAMILIES
    got = _families(generate_latest(m.registry).decode(), names)
    want = _families(generate_latest(ref).decode(), names)
    assert got == want
    assert 'le="0.0005"' in got and 'listener="c"} -1.0' in got


def test_families_come_out_in_the_usual_order():
    m = Metrics("n")
    b = _pool().backends[0]
    m.observe(b, 0.01, False)
    m.conn_open("front")
    m.health_change("api", "api0", False)
    m.tables(Tables("n"))
    text = generate_latest(m.registry).decode()
    order = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert order == ["halb_info", "halb_backend_requests_total", "halb_backend_errors_total",
                     "halb_backend_response_seconds", "halb_health_transitions_total",
                     "halb_listener_connections_total", "halb_listener_active_connections",
                     "halb_backend_active_connections", "halb_backend_up", "halb_backend_state",
                     "halb_backend_weight", "halb_pool_backends_serving", "halb_pool_backup_active",
                     "halb_table_entries", "halb_table_capacity", "halb_http_upgrades_total",
                     "halb_http_tunnels_active", "halb_access_log_lines_total",
                     "halb_access_log_dropped_total", "halb_http2_events_total"]


class _FakeBackend:
    """All observe() needs of a Backend: hashable, with .pool and .name."""

    def __init__(self, pool: str, name: str):
        self.pool = pool
        self.name = name


def test_scrapes_concurrent_with_calls_never_raise():
    """A writer thread observes and opens/closes connections on ever new backends and listeners
    (the dicts grow and resize) while this thread scrapes; with a tiny GIL switch interval the
    threads interleave at almost every bytecode. No scrape raises, every scrape is well-formed
    (buckets cumulative, +Inf == _count), and once the writer stops the figures are exact."""
    m = Metrics("n")
    stop = threading.Event()
    errors: list[BaseException] = []
    n_backends = 400
    per_backend = 50

    def writer():
        try:
            for i in range(n_backends):
                b = _FakeBackend(f"p{i % 7}", f"b{i}")
                for j in range(per_backend):
                    m.observe(b, 0.001 * (j % 40), j % 5 == 0)
                    m.conn_open(f"l{i}")
                    if j % 2:
                        m.conn_close(f"l{i}")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            stop.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    scrapes = 0
    try:
        t = threading.Thread(target=writer)
        t.start()
        while not stop.is_set() or scrapes < 3:
            text = generate_latest(m.registry).decode()
            _check_well_formed(text)
            scrapes += 1
        t.join(timeout=30)
    finally:
        sys.setswitchinterval(old)
    assert not errors and not t.is_alive()
    assert scrapes >= 3
    for i in (0, n_backends - 1):
        lab = {"pool": f"p{i % 7}", "backend": f"b{i}"}
        assert m.value("halb_backend_requests_total", lab) == per_backend
        assert m.value("halb_backend_errors_total", lab) == per_backend // 5
        assert m.value("halb_backend_response_seconds_count", lab) == per_backend
        assert m.value("halb_listener_connections_total", {"listener": f"l{i}"}) == per_backend
        assert m.value("halb_listener_active_connections", {"listener": f"l{i}"}) == per_backend // 2


def _check_well_formed(text: str) -> None:
    last: dict[tuple, float] = {}
    for line in text.splitlines():
        if not line.startswith("halb_backend_response_seconds_"):
            continue
        name, rest = line.split("{", 1)
        labels, value = rest.rsplit("} ", 1)
        parts = dict(p.split("=", 1) for p in labels.split(","))
        key = (parts['backend'], parts['pool'])
        v = float(value)
        if name.endswith("_bucket"):
            assert v >= last.get(key, 0.0)
            last[key] = v
        elif name.endswith("_count"):
            assert v == last[key]
