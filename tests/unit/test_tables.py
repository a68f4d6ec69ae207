"""halb.tables: TTLs, bounds, the change log and conflict resolution on apply()."""

import pytest

from halb.clock import FakeClock
from halb.tables import Change, Entry, Op, Table, Tables, flow_key, nat_key, sticky_key

pytestmark = pytest.mark.unit


def table(name="t", node="a", clock=None, **kw):
    return Table(name, node=node, clock=clock or FakeClock(1000.0), **kw)


def ops(t, since=0):
    return [(c.op, c.entry.key) for c in t.changes_since(since)]


def test_put_get_and_expiry_by_ttl():
    clk = FakeClock(1000.0)
    t = table(clock=clk)
    e = t.put("k", "web1", 10, pool="web")
    assert t.get("k") == e and e.origin == "a" and e.expires == 1010.0
    clk.advance(9.9)
    assert "k" in t
    clk.advance(0.2)
    assert t.get("k") is None and len(t) == 0
    assert ops(t) == [(Op.CREATE, "k"), (Op.EXPIRE, "k")]


def test_expire_removes_due_entries_and_logs_them():
    clk = FakeClock(1000.0)
    t = table(clock=clk)
    for i in range(5):
        t.put(f"k{i}", "b", 10 + i)
    clk.advance(12.5)  # k0, k1, k2 due
    assert t.expire() == 3
    assert sorted(e.key for e in t.entries()) == ["k3", "k4"]
    assert [o for o, _ in ops(t, 5)] == [Op.EXPIRE] * 3


def test_put_same_backend_refreshes_and_logs_at_most_once_per_quarter_ttl():
    clk = FakeClock(1000.0)
    t = table(clock=clk)
    t.put("k", "b1", 100)
    seq = t.seq
    for _ in range(10):  # 10 x 2 s = 20 s < 25 s (a quarter of the TTL)
        clk.advance(2)
        t.put("k", "b1", 100)
    assert t.seq == seq and t.get("k").expires == clk.now() + 100
    clk.advance(6)
    t.put("k", "b1", 100)
    assert ops(t, seq) == [(Op.REFRESH, "k")]


def test_put_other_backend_is_a_create_keeping_created():
    clk = FakeClock(1000.0)
    t = table(clock=clk)
    t.put("k", "b1", 100)
    clk.advance(1)
    e = t.put("k", "b2", 100)
    assert e.backend == "b2" and e.created == 1000.0 and e.updated == 1001.0
    assert ops(t) == [(Op.CREATE, "k"), (Op.CREATE, "k")]


def test_max_entries_evicts_the_one_expiring_soonest():
    t = table(max_entries=3)
    t.put("a", "b", 30)
    t.put("b", "b", 10)
    t.put("c", "b", 20)
    t.put("d", "b", 40)
    assert sorted(e.key for e in t.entries()) == ["a", "c", "d"]
    assert t.stats["evicted"] == 1 and (Op.EXPIRE, "b") in ops(t)


def test_changes_since_and_log_bound():
    t = table(log_size=4)
    for i in range(6):
        t.put(f"k{i}", "b", 10)
    assert t.first_seq == 3
    assert [c.seq for c in t.changes_since(2)] == [3, 4, 5, 6]
    assert [c.seq for c in t.changes_since(4, limit=1)] == [5]
    assert t.changes_since(6) == []
    assert t.changes_since(1) is None  # too far behind: take a snapshot


def test_log_holds_copies_not_the_live_entry():
    clk = FakeClock(1000.0)
    t = table(clock=clk)
    t.put("k", "b1", 100)
    c = t.changes_since(0)[0]
    clk.advance(50)
    t.touch("k", 100)
    assert c.entry.expires == 1100.0 and t.get("k").expires == 1150.0
    with pytest.raises(AttributeError):
        c.seq = 7  # changes are immutable


def test_snapshot_is_consistent_copies_of_live_entries():
    clk = FakeClock(1000.0)
    t = table(clock=clk)
    t.put("a", "b", 10)
    t.put("b", "b", 100)
    clk.advance(20)
    seq, entries = t.snapshot()
    assert seq == t.seq and [e.key for e in entries] == ["b"]
    with pytest.raises(AttributeError):
        entries[0].backend = "changed"  # entries are immutable versions
    assert t.get("b").backend == "b"


def test_apply_newer_wins_then_origin_name():
    clk = FakeClock(1000.0)
    t = table(node="b", clock=clk)
    local = t.put("k", "web1", 100)
    older = Entry("k", "web2", "", 990.0, 999.0, 1099.0, "a")
    assert not t.apply(Op.CREATE, older) and t.get("k").backend == "web1"
    assert t.stats["conflicts_lost"] == 1
    tie_lower = Entry("k", "web2", "", 990.0, local.updated, 1100.0, "a")  # "a" < "b"
    assert not t.apply(Op.CREATE, tie_lower)
    tie_higher = Entry("k", "web3", "", 990.0, local.updated, 1100.0, "c")
    assert t.apply(Op.CREATE, tie_higher) and t.get("k").backend == "web3"
    newer = Entry("k", "web4", "", 990.0, 1001.0, 1101.0, "a")
    assert t.apply(Op.REFRESH, newer)
    got = t.get("k")
    assert got.backend == "web4" and got.origin == "a" and got == newer


def test_apply_is_idempotent_and_keeps_origin_in_the_log():
    t = table(node="b")
    e = Entry("k", "web1", "p", 1000.0, 1000.0, 1100.0, "a")
    assert t.apply(Op.CREATE, e)
    assert not t.apply(Op.CREATE, e)
    assert len(t) == 1 and t.seq == 1
    assert t.changes_since(0)[0].entry.origin == "a"


def test_apply_ignores_expired_entries():
    t = table(node="b")
    assert not t.apply(Op.CREATE, Entry("k", "w", "", 900.0, 900.0, 999.0, "a"))
    assert len(t) == 0


def test_apply_delete_older_than_local_loses():
    clk = FakeClock(1000.0)
    t = table(node="b", clock=clk)
    t.put("k", "w", 100)
    assert not t.apply(Op.DELETE, Entry("k", "w", "", 990.0, 999.0, 1090.0, "a"))
    assert "k" in t
    assert t.apply(Op.DELETE, Entry("k", "w", "", 990.0, 1001.0, 1090.0, "a"))
    assert "k" not in t and ops(t)[-1] == (Op.DELETE, "k")


def test_deleted_entry_is_not_resurrected_by_an_older_version():
    """A delete that overtakes the create (through another peer) must win when the create
    arrives late, and a local delete must not be undone by a peer's older refresh."""
    t = table(node="c")
    assert not t.apply(Op.DELETE, Entry("k", "w", "", 1000.0, 1005.0, 1100.0, "b"))
    assert not t.apply(Op.CREATE, Entry("k", "w", "", 1000.0, 1000.0, 1100.0, "a"))
    assert "k" not in t
    assert t.apply(Op.CREATE, Entry("k", "w2", "", 1006.0, 1006.0, 1106.0, "a"))  # newer: back
    clk = FakeClock(1000.0)
    u = table(node="a", clock=clk)
    u.put("x", "w", 100)
    clk.advance(5)
    u.delete("x")
    assert not u.apply(Op.REFRESH, Entry("x", "w", "", 1000.0, 1003.0, 1103.0, "b"))
    assert "x" not in u


def test_tombstones_are_bounded_and_purged():
    clk = FakeClock(1000.0)
    t = table(node="a", clock=clk, max_entries=10)
    for i in range(30):
        t.put(f"k{i}", "w", 50)
        t.delete(f"k{i}")
    assert len(t._tombs) <= 10
    clk.advance(60)
    t.expire()
    assert len(t._tombs) == 0


def test_a_table_without_peers_keeps_no_tombstones():
    clk = FakeClock(1000.0)
    t = table(node="a", clock=clk, tombstones=False, log_size=8)
    for i in range(30):
        t.put(f"k{i}", "w", 50)
        t.delete(f"k{i}")
    assert not t._tombs and t.tombstones() == []
    assert len(t) == 0 and t.stats["deleted"] == 30
    # the log is still there, as short as asked: the last 8 changes, numbered on
    assert [(c.seq, c.op, c.entry.key) for c in t.changes_since(56)] == [
        (57, Op.CREATE, "k28"), (58, Op.DELETE, "k28"), (59, Op.CREATE, "k29"),
        (60, Op.DELETE, "k29")]
    assert t.changes_since(0) is None  # a reader that far behind needs a snapshot
    # an entry deleted here comes back if re-created: nothing remembers the deletion
    t.put("k1", "v", 50)
    assert t.get("k1").backend == "v"


def test_tombstones_purged_in_chunks_in_expiry_order_and_compacted():
    # a burst of short flows leaves tombstones that expire together: purged a chunk per call,
    # oldest first, the ones not yet due kept, the dict rebuilt once many keys left it
    clk = FakeClock(1000.0)
    t = table(node="a", clock=clk, max_entries=100_000)
    for i in range(20_000):
        t.put(f"k{i}", "w", 10 + i * 0.001)
        t.delete(f"k{i}")
    clk.advance(24.9995)  # k0..k14999 due (expiry 10..24.999 s), the rest not yet
    calls = 0
    while True:
        t.expire(limit=256)
        calls += 1
        if not t.expire_more:
            break
    assert calls >= 15_000 // 256
    assert len(t._tombs) == 5_000 and next(iter(t._tombs)) == "k15000"
    # rebuilt on the way: the freed slots never outnumber both 4096 and the live keys
    assert t._tomb_holes <= max(4096, len(t._tombs)) < 15_000
    clk.advance(20)
    while t.expire(limit=256) or t.expire_more:
        pass
    assert not t._tombs


def test_remote_expiry_of_an_older_version_does_not_remove_a_refreshed_entry():
    """The peer expired its copy (TTL from an older refresh) while ours was refreshed since."""
    clk = FakeClock(1000.0)
    t = table(node="a", clock=clk)
    t.put("k", "w", 100)  # expires 1100
    clk.advance(30)
    t.touch("k", 100)  # expires 1130, logged as a refresh (>= a quarter TTL)
    clk.advance(70)
    gone = Entry("k", "w", "", 1000.0, 1100.0, 1100.0, "b")  # b's copy expired at 1100
    assert not t.apply(Op.EXPIRE, gone)
    assert "k" in t
    same = Entry("k", "w", "", 1000.0, 1130.0, 1130.0, "b")
    clk.advance(29)
    assert t.apply(Op.EXPIRE, same) and "k" not in t


def test_listeners_see_every_change_in_order():
    t = table()
    seen: list[Change] = []
    t.listeners.append(seen.append)
    t.put("a", "w", 10)
    t.delete("a")
    t.apply(Op.CREATE, Entry("b", "w", "", 1000.0, 1000.0, 1010.0, "z"))
    assert [(c.seq, c.op) for c in seen] == [(1, Op.CREATE), (2, Op.DELETE), (3, Op.CREATE)]


def test_page_sorted_with_prefix():
    t = table()
    for k in ("b/2", "a/1", "b/1", "c/1"):
        t.put(k, "w", 10)
    page, total = t.page(0, 2, prefix="b/")
    assert [e.key for e in page] == ["b/1", "b/2"] and total == 2
    page, total = t.page(1, 2)
    assert [e.key for e in page] == ["b/1", "b/2"] and total == 4


def test_active_active_convergence_in_any_order():
    """Two nodes write the same keys; applying each other's logs in either order converges."""
    ca, cb = FakeClock(1000.0), FakeClock(1000.0)
    a, b = table(node="a", clock=ca), table(node="b", clock=cb)
    a.put("k1", "x", 100)
    b.put("k1", "y", 100)  # same time: tie -> origin "b" wins
    ca.advance(1)
    a.put("k2", "x", 100)
    cb.advance(2)
    b.put("k2", "y", 100)  # newer wins
    a.delete("k1")  # at 1001: newer than b's k1 -> deleted everywhere
    la, lb = a.changes_since(0), b.changes_since(0)
    for c in reversed(lb):  # out of order on purpose
        a.apply(c.op, c.entry)
    for c in lb:
        a.apply(c.op, c.entry)
    for c in la:
        b.apply(c.op, c.entry)

    def view(t):
        return sorted((e.key, e.backend, e.origin) for e in t.entries())
    assert view(a) == view(b) == [("k2", "y", "b")]


def test_tables_and_keys():
    ts = Tables("n", FakeClock(0.0), sticky_max=5, flow_max=7, nat_max=9)
    assert [t.name for t in ts] == ["sticky", "flow", "nat"]
    assert ts.by_name("flow").max_entries == 7 and ts.sticky.epoch != ts.flow.epoch
    assert ts.by_name("nat").max_entries == 9
    with pytest.raises(KeyError):
        ts.by_name("conntrack")
    assert nat_key("www", "tcp", "198.18.0.5:40000", 80) == "www/tcp/198.18.0.5:40000/80"
    assert sticky_key("cookie", "web", "v") == "cookie/web/v"
    assert flow_key("l", "udp", "1.2.3.4:5") == "l/udp/1.2.3.4:5"
    with pytest.raises(ValueError):
        Table("x", node="n", max_entries=0)


def test_apply_stores_the_given_entry_and_log_false_logs_nothing():
    t = table(node="b")
    e = Entry("k", "w", "", 1000.0, 1000.0, 1100.0, "a")
    assert t.apply(Op.CREATE, e, log=False)
    assert t.get("k") == e and t.seq == 0 and t.changes_since(0) == []
    assert t.apply(Op.DELETE, Entry("k", "w", "", 1000.0, 1001.0, 1100.0, "a"), log=False)
    assert "k" not in t and t.seq == 0
    f = Entry("j", "w", "", 1000.0, 1000.0, 1100.0, "a")
    assert t.apply(Op.CREATE, f) and t.get("j") == f and t.seq == 1


def test_eviction_on_a_peer_does_not_remove_the_entry_here():
    """A peer with a smaller table evicts (logged as EXPIRE before the entry's time): that is
    its capacity, not the entry's end; a natural expiry still replicates."""
    clk = FakeClock(1000.0)
    small = table(node="b", clock=clk, max_entries=2)
    here = table(node="a", clock=clk)
    for k, ttl in (("x", 10), ("y", 20), ("z", 30)):
        e = here.put(k, "w", ttl)
        small.apply(Op.CREATE, e)
    evicted = [c for c in small.changes_since(0) if c.op == Op.EXPIRE]
    assert [c.entry.key for c in evicted] == ["x"]
    assert not here.apply(Op.EXPIRE, evicted[0].entry) and "x" in here
    clk.advance(25)
    assert small.expire() == 1  # y, naturally
    natural = [c for c in small.changes_since(0) if c.op == Op.EXPIRE][-1]
    assert natural.entry.key == "y" and here.apply(Op.EXPIRE, natural.entry)
    assert "y" not in here._entries


def test_entries_and_changes_are_invisible_to_the_garbage_collector():
    """Tables of 100,000s of entries must not lengthen GC pauses: what a table stores (entries
    and change records) becomes untracked by CPython's collector, so the number of tracked
    objects does not grow with the table."""
    import gc
    t = table(clock=FakeClock(1000.0), max_entries=100_000)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(20_000):
        t.put(f"k{i}", "web1", 100, pool="p", client="1.2.3.4:5", proto="tcp")
    for i in range(0, 20_000, 3):
        t.touch(f"k{i}", 200)
    for i in range(0, 20_000, 7):
        t.delete(f"k{i}")
    gc.collect()
    grown = len(gc.get_objects()) - before
    assert grown < 200, f"{grown} more objects tracked by the GC after 20,000 entries"
