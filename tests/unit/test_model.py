"""The pool model: views swapped atomically; down, drained, full and ejected backends skipped;
backups only when no primary can serve; passive checks; slow start; accounting."""

from __future__ import annotations

from collections import Counter

import pytest

from halb.clock import FakeClock
from halb.config import BackendConfig, Endpoint, PassiveConfig, PoolConfig
from halb.model import EWMA_ALPHA, Pool

pytestmark = pytest.mark.unit


def make(weights=(1, 1, 1), backups=(), algorithm="roundrobin", max_conns=0, **kw) -> Pool:
    bks = [BackendConfig(name=f"b{i}", address=Endpoint("127.0.0.1", 9000 + i), weight=w,
                         max_conns=max_conns) for i, w in enumerate(weights)]
    bks += [BackendConfig(name=f"k{i}", address=Endpoint("127.0.0.1", 9100 + i), weight=w, backup=True)
            for i, w in enumerate(backups)]
    return Pool(PoolConfig(name="web", backends=tuple(bks), algorithm=algorithm, **kw))


def names(view) -> list[str]:
    return [b.name for b in view.backends]


def picks(pool: Pool, n: int = 60) -> Counter:
    return Counter(pool.pick().name for _ in range(n))


# -- views ------------------------------------------------------------------------------------

def test_view_swap_is_atomic_and_versioned():
    seen = []
    p = make()
    p.on_change = lambda pool, view: seen.append(view)
    v1 = p.view
    p.set_health(p.backends[0], False, 1.0)
    v2 = p.view
    assert v2 is not v1 and v2.version == v1.version + 1
    assert names(v1) == ["b0", "b1", "b2"]  # the old view is untouched (immutable)
    assert names(v2) == ["b1", "b2"]
    assert seen == [v2]
    with pytest.raises(AttributeError):
        v2.backends = ()  # frozen
    assert p.set_health(p.backends[0], False, 2.0) is False  # no change, no swap
    assert p.view is v2


# -- skipping ---------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["roundrobin", "wrr", "leastconn", "p2c", "leasttime",
                                       "source", "maglev", "resource"])
def test_down_and_drained_backends_never_picked(algorithm):
    p = make((1, 1, 1, 1), algorithm=algorithm)
    b0, b1, b2, b3 = p.backends
    p.set_health(b0, False, 1.0)
    p.set_drain(b1, True, 1.0)
    p.set_weight(b2, 0, 1.0)  # weight 0 drains too
    assert names(p.view) == ["b3"]
    assert b1.state(1.0) == "drain" and b2.state(1.0) == "drain" and b0.state(1.0) == "down"
    got = Counter(p.pick(f"10.0.0.{i}".encode()).name for i in range(100))
    assert got == Counter({"b3": 100})
    p.set_drain(b1, False, 2.0)
    p.set_weight(b2, 1, 2.0)
    assert names(p.view) == ["b1", "b2", "b3"]


def test_full_backends_skipped_until_released():
    p = make((1, 1), max_conns=2)
    b0, b1 = p.backends
    for _ in range(2):
        Pool.acquire(b0)
    assert b0.is_full()
    assert picks(p, 10) == Counter({"b1": 10})
    for _ in range(2):
        Pool.acquire(b1)
    assert p.pick() is None  # everything full
    Pool.release(b0, 0.01)
    assert p.pick() is b0


def test_set_weight_range():
    p = make()
    with pytest.raises(ValueError, match="weight 257 out of range"):
        p.set_weight(p.backends[0], 257, 0.0)


# -- backups ----------------------------------------------------------------------------------

def test_backups_serve_only_when_no_primary_is_up():
    p = make((1, 1), backups=(1, 1))
    b0, b1, k0, k1 = p.backends
    assert names(p.view) == ["b0", "b1"] and not p.view.backup
    p.set_health(b0, False, 1.0)
    assert names(p.view) == ["b1"] and not p.view.backup
    p.set_health(b1, False, 2.0)
    assert names(p.view) == ["k0", "k1"] and p.view.backup
    assert set(picks(p, 10)) == {"k0", "k1"}
    p.set_health(k0, False, 3.0)
    assert names(p.view) == ["k1"]
    p.set_health(b1, True, 4.0)  # a primary is back: backups leave at once
    assert names(p.view) == ["b1"] and not p.view.backup
    assert picks(p, 10) == Counter({"b1": 10})


def test_backups_serve_when_every_primary_is_drained():
    p = make((1, 1), backups=(1,))
    for b in p.backends[:2]:
        p.set_drain(b, True, 1.0)
    assert names(p.view) == ["k0"] and p.view.backup
    p.set_drain(p.backends[0], False, 2.0)
    assert names(p.view) == ["b0"] and not p.view.backup


def test_no_backend_at_all():
    p = make((1,), backups=(1,))
    for b in p.backends:
        p.set_health(b, False, 1.0)
    assert p.view.backends == () and p.pick() is None and p.up_count(1.0) == 0


# -- passive checks ---------------------------------------------------------------------------

def test_passive_ejection_and_return_after_cooldown():
    clock = FakeClock()
    p = make((1, 1), passive=PassiveConfig(max_failures=3, cooldown=10.0), slow_start=0.0)
    b0, b1 = p.backends
    now = clock.now()
    assert p.report_result(b0, False, now) is False
    assert p.report_result(b0, False, now) is False
    assert p.report_result(b0, True, now) is False  # a success resets the streak
    assert [p.report_result(b0, False, now) for _ in range(3)] == [False, False, True]
    assert b0.state(now) == "ejected" and names(p.view) == ["b1"]
    assert b0.failures == 5
    assert p.report_result(b0, False, clock.advance(1.0)) is False  # already out: not extended
    assert b0.ejected_until == now + 10.0
    p.tick(clock.advance(8.0))  # t+9: still out
    assert names(p.view) == ["b1"]
    p.tick(clock.advance(1.0))  # t+10: back
    assert names(p.view) == ["b0", "b1"] and b0.state(clock.now()) == "up"
    assert b0.consecutive_failures == 0


def test_passive_off_never_ejects():
    p = make((1, 1))
    for _ in range(100):
        p.report_result(p.backends[0], False, 1.0)
    assert names(p.view) == ["b0", "b1"]


def test_passive_ejection_is_capped_and_never_empties_the_pool():
    clock = FakeClock(1.0)
    p = make((1, 1, 1, 1), passive=PassiveConfig(max_failures=1, cooldown=5.0))
    b0, b1, b2, b3 = p.backends
    assert p.report_result(b0, False, clock.now()) is True
    assert p.report_result(b1, False, clock.now()) is True
    assert p.report_result(b2, False, clock.now()) is False  # at most half of the pool is ejected
    assert names(p.view) == ["b2", "b3"]
    p.tick(clock.advance(6.0))
    solo = make((1,), passive=PassiveConfig(max_failures=1, cooldown=5.0))
    assert solo.report_result(solo.backends[0], False, 1.0) is False  # the last one stays
    assert names(solo.view) == ["b0"]


def test_slow_start_leaves_drained_backends_at_zero_and_hash_pools_unramped():
    clock = FakeClock(100.0)
    p = make((10, 10), algorithm="wrr", slow_start=10.0)
    b0, b1 = p.backends
    p.set_weight(b0, 0, clock.now())
    p.set_health(b0, False, clock.now())
    p.set_health(b0, True, clock.now())
    p.tick(clock.advance(1.0))
    assert names(p.view) == ["b1"]  # weight 0 is not ramped up to 1
    h = make((10, 10), algorithm="maglev", slow_start=10.0)
    h.set_health(h.backends[0], False, clock.now())
    h.set_health(h.backends[0], True, clock.now())
    assert h.view.weights == (10, 10)


def test_passive_ejection_of_last_primary_brings_backups():
    p = make((1,), backups=(1,), passive=PassiveConfig(max_failures=1, cooldown=5.0))
    assert p.report_result(p.backends[0], False, 1.0) is True
    assert names(p.view) == ["k0"] and p.view.backup
    p.tick(6.0)
    assert names(p.view) == ["b0"]


# -- slow start -------------------------------------------------------------------------------

def test_slow_start_ramps_weight_of_returning_backend():
    clock = FakeClock(100.0)
    p = make((10, 10), algorithm="wrr", slow_start=10.0)
    b0, b1 = p.backends
    assert p.view.weights == (10, 10)  # at start nothing ramps
    p.set_health(b0, False, clock.now())
    p.set_health(b0, True, clock.now())
    assert b0.up_since == clock.now()
    assert dict(zip(names(p.view), p.view.weights)) == {"b0": 1, "b1": 10}  # at least 1
    ramp = []
    for _ in range(12):
        p.tick(clock.advance(1.0))
        ramp.append(dict(zip(names(p.view), p.view.weights))["b0"])
    assert ramp[:10] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert ramp[10:] == [10, 10]
    v = p.view.version
    p.tick(clock.advance(1.0))
    assert p.view.version == v  # ramp over: no more rebuilds
    # the balancer follows the ramped weights
    p.set_health(b0, False, clock.now())
    p.set_health(b0, True, clock.now())
    p.tick(clock.advance(2.5))  # b0 at 25%: weight 2 of 12
    c = picks(p, 1200)
    assert c["b0"] == 200 and c["b1"] == 1000


def test_slow_start_after_passive_ejection():
    clock = FakeClock(0.0)
    p = make((8, 8), slow_start=4.0, passive=PassiveConfig(max_failures=1, cooldown=1.0))
    b0 = p.backends[0]
    p.report_result(b0, False, clock.advance(1.0))
    p.tick(clock.advance(1.0))
    assert dict(zip(names(p.view), p.view.weights))["b0"] == 1
    p.tick(clock.advance(2.0))
    assert dict(zip(names(p.view), p.view.weights))["b0"] == 4


# -- accounting -------------------------------------------------------------------------------

def test_acquire_release_and_ewma():
    p = make((1,))
    b = p.backends[0]
    Pool.acquire(b)
    Pool.acquire(b)
    assert (b.active, b.inflight, b.total) == (2, 2, 2)
    Pool.release(b, 0.100)
    assert b.ewma_rt == pytest.approx(0.100)  # first sample taken as is
    Pool.release(b, 0.200)
    assert b.ewma_rt == pytest.approx(0.100 + EWMA_ALPHA * 0.100)
    assert (b.active, b.inflight, b.total) == (0, 0, 2)
    Pool.acquire(b)
    Pool.release(b, None)  # no sample: EWMA unchanged
    assert b.ewma_rt == pytest.approx(0.130)
