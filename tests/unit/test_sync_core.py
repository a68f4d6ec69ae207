"""halb.sync.core: what a sender ships to one follower and how the follower applies it.

Pure: batches go through protobuf serialization (as on the wire) but no sockets.
"""

import math

import pytest

from halb.clock import FakeClock
from halb.sync.core import Kind, ProtocolError, TableReceiver, TableSender, decode, encode
from halb.tables import Op, Table
from halb.v1 import sync_pb2 as pb

pytestmark = pytest.mark.unit


def mk(node, clock, **kw):
    return Table("sticky", node=node, clock=clock, **kw)


def wire(b):
    return pb.SyncBatch.FromString(b.SerializeToString())


def drain(sender, receiver, now, acks=True, limit=100_000):
    """Moves every batch the sender has to the receiver; returns the batches' kinds."""
    kinds = []
    for _ in range(limit):
        b = sender.next_batch(now)
        if b is None:
            return kinds
        b = wire(b)
        receiver.handle(b)
        kinds.append(b.kind)
        if acks:
            c = receiver.cursor()
            sender.ack(c.epoch, c.seq)
    raise AssertionError("sender never ran dry")


def view(t):
    return sorted((e.key, e.backend, e.origin, e.expires) for e in t.entries())


def test_first_contact_is_a_snapshot_then_changes():
    clk = FakeClock(1000.0)
    a, b = mk("a", clk), mk("b", clk)
    for i in range(10):
        a.put(f"k{i}", f"w{i % 3}", 100)
    s = TableSender(a, "a", batch_size=4, max_backlog=1000)
    r = TableReceiver(b, "a")
    assert s.start(0, 0) == "snapshot"
    kinds = drain(s, r, clk.now())
    assert kinds == [Kind.KIND_SNAPSHOT_BEGIN] + [Kind.KIND_SNAPSHOT] * 3 + [Kind.KIND_SNAPSHOT_END]
    assert view(a) == view(b) and (r.epoch, r.seq) == (a.epoch, a.seq) and r.learned
    assert s.out.lag(a) == 0
    a.put("new", "w1", 100)
    a.delete("k3")
    assert s.out.lag(a) == 2
    assert drain(s, r, clk.now()) == [Kind.KIND_CHANGES]
    assert view(a) == view(b) and s.out.lag(a) == 0


def test_resume_in_same_epoch_sends_only_missing_changes():
    clk = FakeClock(1000.0)
    a, b = mk("a", clk), mk("b", clk)
    a.put("k0", "w", 100)
    s = TableSender(a, "a", batch_size=100, max_backlog=1000)
    r = TableReceiver(b, "a")
    s.start(0, 0)
    drain(s, r, clk.now())
    cursor = r.cursor()
    for i in range(1, 5):
        a.put(f"k{i}", "w", 100)
    # stream broke; a new stream starts from the follower's cursor
    s2 = TableSender(a, "a", batch_size=100, max_backlog=1000)
    r.reset_stream()
    assert s2.start(cursor.epoch, cursor.seq) == "resume"
    b1 = s2.next_batch(clk.now())
    assert b1.kind == Kind.KIND_CHANGES and list(b1.entries.keys) == ["k1", "k2", "k3", "k4"]
    r.handle(wire(b1))
    assert view(a) == view(b) and s2.next_batch(clk.now()) is None


@pytest.mark.parametrize("why", ["new_epoch", "log_overrun", "backlog"])
def test_snapshot_instead_of_resume(why):
    clk = FakeClock(1000.0)
    a = mk("a", clk, log_size=50)
    b = mk("b", clk)
    a.put("k", "w", 100)
    s = TableSender(a, "a", batch_size=100, max_backlog=100 if why != "backlog" else 10)
    r = TableReceiver(b, "a")
    s.start(0, 0)
    drain(s, r, clk.now())
    epoch, seq = r.epoch, r.seq
    n = {"new_epoch": 1, "log_overrun": 60, "backlog": 20}[why]
    for i in range(n):
        a.put(f"x{i}", "w", 100)
    if why == "new_epoch":  # the sender restarted: a new table incarnation
        a2 = mk("a", clk)
        a2.put("k", "w", 100)
        s = TableSender(a2, "a", batch_size=100, max_backlog=100)
        assert a2.epoch != epoch
    else:
        s = TableSender(a, "a", batch_size=100, max_backlog=s.max_backlog)
    assert s.start(epoch, seq) == "snapshot"


def test_follower_falling_behind_mid_stream_gets_a_snapshot_not_a_queue():
    clk = FakeClock(1000.0)
    a, b = mk("a", clk, log_size=30), mk("b", clk)
    s = TableSender(a, "a", batch_size=10, max_backlog=1000)
    r = TableReceiver(b, "a")
    s.start(0, 0)
    drain(s, r, clk.now())
    for i in range(100):  # the log keeps only 30: the follower's cursor fell off
        a.put(f"k{i}", "w", 100)
    kinds = drain(s, r, clk.now())
    assert kinds[0] == Kind.KIND_SNAPSHOT_BEGIN and Kind.KIND_SNAPSHOT_END in kinds
    assert view(a) == view(b)


def test_only_own_changes_are_shipped_but_all_are_covered():
    """No echo: what b learned from c is not sent back by b; its cursor still advances."""
    clk = FakeClock(1000.0)
    b, a = mk("b", clk), mk("a", clk)
    s = TableSender(b, "b", batch_size=100, max_backlog=1000)
    r = TableReceiver(a, "b")
    s.start(0, 0)
    drain(s, r, clk.now())
    from halb.tables import Entry
    b.apply(Op.CREATE, Entry("fromc", "w", "", 1000.0, 1000.0, 1100.0, "c"))
    b.put("own", "w", 100)
    bt = s.next_batch(clk.now())
    assert list(bt.entries.keys) == ["own"] and bt.seq == b.seq
    r.handle(wire(bt))
    assert "fromc" not in a and r.seq == b.seq


def test_batches_are_bounded_by_count_and_bytes():
    clk = FakeClock(1000.0)
    a = mk("a", clk)
    for i in range(50):
        a.put("k" * 1000 + str(i), "w", 100)
    s = TableSender(a, "a", batch_size=40, max_backlog=1000, max_bytes=10_000)
    s.start(0, 0)
    s.next_batch(clk.now())  # begin
    sizes = []
    while (bt := s.next_batch(clk.now())).kind == Kind.KIND_SNAPSHOT:
        sizes.append(len(bt.entries.keys))
    assert sum(sizes) == 50 and max(sizes) <= 10


def test_snapshot_skips_entries_removed_while_it_is_sent():
    clk = FakeClock(1000.0)
    a, b = mk("a", clk), mk("b", clk)
    for i in range(6):
        a.put(f"k{i}", "w", 100)
    s = TableSender(a, "a", batch_size=2, max_backlog=1000)
    r = TableReceiver(b, "a")
    s.start(0, 0)
    r.handle(wire(s.next_batch(clk.now())))  # begin
    r.handle(wire(s.next_batch(clk.now())))  # k0, k1
    a.delete("k4")
    a.put("k5", "other", 100)
    drain(s, r, clk.now())
    assert view(a) == view(b)


def test_expiry_replicates():
    clk = FakeClock(1000.0)
    a, b = mk("a", clk), mk("b", clk)
    s = TableSender(a, "a", batch_size=100, max_backlog=1000)
    r = TableReceiver(b, "a")
    s.start(0, 0)
    a.put("short", "w", 5)
    a.put("long", "w", 500)
    drain(s, r, clk.now())
    assert len(b) == 2
    clk.advance(6)
    assert a.expire() == 1
    bt = s.next_batch(clk.now())
    assert [(op, e.key) for op, e in decode(bt.entries)] == [(pb.SYNC_OP_EXPIRE, "short")]
    r.handle(wire(bt))
    assert sorted(e.key for e in b.entries()) == ["long"]


def test_receiver_rejects_protocol_violations():
    clk = FakeClock(1000.0)
    r = TableReceiver(mk("b", clk), "a")
    with pytest.raises(ProtocolError):
        r.handle(pb.SyncBatch(kind=Kind.KIND_SNAPSHOT, table="sticky", epoch=5))
    with pytest.raises(ProtocolError):
        r.handle(pb.SyncBatch(kind=Kind.KIND_CHANGES, table="sticky", epoch=5, seq=3))
    r.handle(pb.SyncBatch(kind=Kind.KIND_SNAPSHOT_BEGIN, table="sticky", epoch=5, seq=3))
    with pytest.raises(ProtocolError):
        r.handle(pb.SyncBatch(kind=Kind.KIND_SNAPSHOT_END, table="sticky", epoch=5, seq=4))
    r.handle(pb.SyncBatch(kind=Kind.KIND_SNAPSHOT_END, table="sticky", epoch=5, seq=3))
    with pytest.raises(ProtocolError):
        r.handle(pb.SyncBatch(kind=Kind.KIND_CHANGES, table="sticky", epoch=5, seq=2))
    with pytest.raises(ProtocolError):
        r.handle(pb.SyncBatch(kind=Kind.KIND_WELCOME))


def test_receiver_skips_invalid_entries_and_applies_the_rest():
    from halb.tables import Entry
    clk = FakeClock(1000.0)
    t = mk("b", clk)
    r = TableReceiver(t, "a")
    r.handle(pb.SyncBatch(kind=Kind.KIND_SNAPSHOT_BEGIN, table="sticky", epoch=5, seq=0))
    r.handle(pb.SyncBatch(kind=Kind.KIND_SNAPSHOT_END, table="sticky", epoch=5, seq=0))
    good = dict(key="k", backend="w", pool="", created=1000.0, updated=1000.0, expires=1100.0,
                origin="a")
    rows = [(1, dict(good, key="")), (9, good), (1, dict(good, origin="")),
            (1, dict(good, key="n", expires=math.nan)), (1, dict(good, key="i", updated=math.inf)),
            (1, good)]
    r.handle(pb.SyncBatch(kind=Kind.KIND_CHANGES, table="sticky", epoch=5, seq=6,
                          entries=encode([op for op, _ in rows], [Entry(**d) for _, d in rows])))
    assert r.invalid == 5 and [e.key for e in t.entries()] == ["k"] and r.seq == 6


def test_three_nodes_active_active_converge_without_echo():
    clk = FakeClock(1000.0)
    names = ["a", "b", "c"]
    t = {n: mk(n, clk) for n in names}
    links = {}
    for src in names:
        for dst in names:
            if src != dst:
                s = TableSender(t[src], src, batch_size=7, max_backlog=10_000)
                s.start(0, 0)
                links[(src, dst)] = (s, TableReceiver(t[dst], src))
    for i in range(60):
        n = names[i % 3]
        t[n].put(f"k{i % 25}", f"{n}-w{i}", 100)
        if i % 7 == 0:
            t[n].delete(f"k{(i + 3) % 25}")
        clk.advance(0.5)
    for _ in range(3):
        for s, r in links.values():
            drain(s, r, clk.now())
    assert view(t["a"]) == view(t["b"]) == view(t["c"])
    # no echo: a second round moves nothing but empty cursor advances
    for s, r in links.values():
        for k in drain(s, r, clk.now()):
            assert k == Kind.KIND_CHANGES
    for (src, dst), (s, r) in links.items():
        assert s.out.lag(t[src]) == 0


def test_lag_seconds_is_the_age_of_the_oldest_unacked_change():
    clk = FakeClock(1000.0)
    a = mk("a", clk)
    s = TableSender(a, "a", batch_size=10, max_backlog=100)
    s.start(0, 0)
    s.ack(a.epoch, 0)
    a.put("k", "w", 100)
    clk.advance(2.5)
    a.put("k2", "w", 100)
    assert s.out.lag(a) == 2 and s.out.lag_seconds(a, clk.now()) == pytest.approx(2.5)
    s.ack(a.epoch, 1)
    assert s.out.lag(a) == 1 and s.out.lag_seconds(a, clk.now()) == pytest.approx(0.0)


def test_snapshot_carries_deletions_so_a_stale_third_party_copy_dies():
    """b got f's entry (e.g. from a snapshot of a third node); f deleted it since. f's snapshot
    to b no longer holds the entry, but its tombstone: b drops its stale copy."""
    from halb.tables import Entry
    clk = FakeClock(1000.0)
    f, b = mk("f", clk), mk("b", clk)
    f.put("gone", "w", 100)
    f.put("kept", "w", 100)
    b.apply(Op.CREATE, f.get("gone"))  # the stale copy, learned elsewhere
    clk.advance(1)
    f.delete("gone")
    s = TableSender(f, "f", batch_size=10, max_backlog=100)
    r = TableReceiver(b, "f")
    s.start(0, 0)
    drain(s, r, clk.now())
    assert sorted(e.key for e in b.entries()) == ["kept"]
    # and an older copy arriving after the snapshot stays out
    assert not b.apply(Op.CREATE, Entry("gone", "w", "", 1000.0, 1000.0, 1100.0, "f"))


def test_columns_travel_intact_and_malformed_columns_are_protocol_errors():
    from halb.tables import Entry
    es = [Entry(f"k{i}", f"b{i % 2}", "web", 1.0 + i, 2.0 + i, 3.0 + i, "a", f"1.2.3.{i}:5",
                "l4" if i % 2 else "", "udp") for i in range(5)]
    m = pb.SyncEntries.FromString(encode([1, 2, 3, 4, 1], es).SerializeToString())
    assert decode(m) == list(zip([1, 2, 3, 4, 1], es))
    assert len(m.strings) == 7  # "", b0, web, a, l4... interned once each
    clk = FakeClock(1000.0)
    r = TableReceiver(mk("b", clk), "a")
    r.handle(pb.SyncBatch(kind=Kind.KIND_SNAPSHOT_BEGIN, table="sticky", epoch=5, seq=0))
    short = pb.SyncEntries()
    short.CopyFrom(m)
    del short.expires[-1]
    with pytest.raises(ProtocolError, match="lengths"):
        r.handle(pb.SyncBatch(kind=Kind.KIND_SNAPSHOT, table="sticky", epoch=5, entries=short))
    bad = pb.SyncEntries()
    bad.CopyFrom(m)
    bad.backends[0] = 99
    with pytest.raises(ProtocolError, match="string index"):
        r.handle(pb.SyncBatch(kind=Kind.KIND_SNAPSHOT, table="sticky", epoch=5, entries=bad))


def test_snapshot_sends_entries_touched_while_it_is_sent():
    """A busy entry is touched on every use; a touch within a quarter TTL only moves its expiry
    (no log record). The snapshot must still carry it, or the follower never learns it."""
    clk = FakeClock(1000.0)
    a, b = mk("a", clk), mk("b", clk)
    for i in range(10):
        a.put(f"k{i}", "w1", 100)
    s = TableSender(a, "a", batch_size=4, max_backlog=1000)
    r = TableReceiver(b, "a")
    s.start(0, 0)
    clk.advance(1)
    for i in range(10):
        a.touch(f"k{i}", 100)  # unlogged expiry bump
    assert a.seq == 10
    drain(s, r, clk.now())
    assert sorted(e.key for e in b.entries()) == [f"k{i}" for i in range(10)]
    assert all(e.expires == 1101.0 for e in b.entries())
