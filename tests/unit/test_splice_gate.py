"""halb.proxy.tcp.SpliceGate: the relay = "auto" decision, fed CPU samples (pure, no I/O)."""

import pytest

from halb.splicegate import SpliceGate

pytestmark = pytest.mark.unit


def feed(gate, busy_fractions, start=(0.0, 100.0), step=0.25, others=0.0, quota=None):
    """Samples so that each interval of ``step`` seconds the event loop thread used ``busy``
    of a core and the process's other threads ``others``; returns the gate's decision after
    each. A ``start`` earlier than the last sample re-bases the gate (no decision)."""
    loop, wall = start
    proc = loop
    gate.sample(loop, proc, wall, quota)
    out = []
    for b in busy_fractions:
        loop += b * step
        proc += (b + others) * step
        wall += step
        gate.sample(loop, proc, wall, quota)
        out.append(gate.splice)
    return out


def test_copies_until_busy_then_splices_until_idle():
    g = SpliceGate(high=0.75, low=0.5)  # binary fractions: the sums are exact
    assert g.splice is False
    assert feed(g, [0.125, 0.6875, 0.75, 0.6875, 0.5625, 0.53125, 0.5, 0.6875, 0.71875, 1.0,
                    0.25]) == [
        False, False, True, True, True, True, False, False, False, True, False]
    assert g.changes == 4
    assert g.busy == 0.25


def test_first_sample_only_sets_the_reference():
    g = SpliceGate()
    assert g.sample(50.0, 60.0, 10.0) is False  # CPU seconds since start-up say nothing
    assert g.splice is False and g.busy == 0.0
    assert g.sample(50.25, 60.25, 10.25) is True  # one busy interval opens it
    assert g.splice and g.busy == 1.0


def test_sample_reports_changes_only():
    g = SpliceGate(high=0.75, low=0.5)
    changed = []
    cpu, wall = 0.0, 0.0
    g.sample(cpu, cpu, wall)
    for b in [0.875, 0.875, 0.875, 0.125, 0.125]:
        cpu += b
        wall += 1
        changed.append(g.sample(cpu, cpu, wall))
    assert changed == [True, False, False, True, False]


def test_clock_that_does_not_advance_is_ignored():
    g = SpliceGate()
    g.sample(1.0, 1.0, 5.0)
    assert g.sample(2.0, 2.0, 5.0) is False  # no division by zero, no decision
    assert g.sample(2.0, 2.0, 4.0) is False  # a clock going back re-bases
    assert g.splice is False
    assert g.sample(2.9375, 2.9375, 5.0) is True  # 0.9375 of a core since the re-base
    assert g.busy == 0.9375


def test_cpu_time_going_back_counts_as_idle():
    g = SpliceGate()
    feed(g, [1.0])
    assert g.splice
    g.sample(0.0, 0.0, 1000.0)  # whatever happened, it is not load
    assert g.busy == 0.0 and g.splice is False


def test_defaults_leave_room_for_a_copying_relay():
    # measured: an iperf3 stream copied through halbd used about 0.67 of a core; it must not
    # open the gate, a saturated loop must
    g = SpliceGate()
    assert feed(g, [0.6875, 0.75, 0.875]) == [False, False, False]
    assert feed(g, [1.0], start=(10.0, 50.0)) == [True]
    assert feed(g, [0.75, 0.625, 0.5625], start=(20.0, 25.0)) == [True, True, False]


def test_other_threads_do_not_count_without_a_quota():
    # the control plane's threads (gRPC, metrics) busy on another core leave the loop's room
    g = SpliceGate()
    assert feed(g, [0.5, 0.5, 0.5], others=0.5) == [False, False, False]
    assert g.busy == 0.5


def test_under_a_quota_the_whole_process_counts():
    g = SpliceGate()
    # 0.375 core of a 0.4 core quota: 94% of what the process may use
    assert feed(g, [0.375], quota=0.4) == [True]
    assert g.busy == pytest.approx(0.9375)
    # the loop at 0.25 and other threads at 0.125, of the same quota: still as busy
    assert feed(g, [0.25], others=0.125, start=(5.0, 50.0), quota=0.4) == [True]
    # the same use with the quota lifted: the loop's 0.25 of a core is what counts
    assert feed(g, [0.25], others=0.125, start=(6.0, 25.0), quota=None) == [False]
    assert g.busy == 0.25
    # a quota of several cores: the loop thread is the limit (one core)
    assert feed(g, [1.0], others=0.5, start=(7.0, 12.0), quota=4.0) == [True]
    assert g.busy == 1.0


def test_a_nonsense_quota_is_ignored():
    g = SpliceGate()
    assert feed(g, [0.25], others=0.5, quota=0.0) == [False]
    assert g.busy == 0.25


@pytest.mark.parametrize("high,low", [(0.5, 0.5), (0.4, 0.6), (0.8, 0.0), (0.8, -1.0)])
def test_bad_thresholds_are_refused(high, low):
    with pytest.raises(ValueError, match="low < high"):
        SpliceGate(high=high, low=low)
