"""Balancing algorithms over pool views: distributions, Maglev properties, load awareness,
skipping of full/excluded backends, hash keys."""

from __future__ import annotations

import random
from collections import Counter, deque

import pytest

from halb.balance import (MaglevHash, SmoothWeighted, hash_key_for, key_hash, make_balancer,
                          maglev_table, swrr_schedule)
from halb.config import ALGORITHMS, BackendConfig, Endpoint, PoolConfig
from halb.model import Pool

pytestmark = pytest.mark.unit

PICKS = 100_000


def pool_cfg(weights, algorithm="roundrobin", *, names=None, max_conns=0, **kw) -> PoolConfig:
    names = names or [f"b{i}" for i in range(len(weights))]
    bks = tuple(BackendConfig(name=n, address=Endpoint("127.0.0.1", 10000 + i), weight=w,
                              max_conns=max_conns) for i, (n, w) in enumerate(zip(names, weights)))
    return PoolConfig(name="p", backends=bks, algorithm=algorithm, **kw)


def make_pool(weights, algorithm="roundrobin", *, seed=None, **kw) -> Pool:
    cfg = pool_cfg(weights, algorithm, **kw)
    return Pool(cfg, make_balancer(cfg, seed=seed))


def keys(n: int, prefix: str = "") -> list[bytes]:
    return [f"{prefix}10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}".encode() for i in range(n)]


def assert_shares(counts: Counter, weights, pool: Pool, tol: float = 0.02) -> None:
    total = sum(counts.values())
    wsum = sum(weights)
    for b, w in zip(pool.backends, weights):
        want = w / wsum
        got = counts[b.name] / total
        assert abs(got - want) <= tol * want, (
            f"{b.name}: share {got:.4f}, want {want:.4f} (+-{tol:.0%}); counts {dict(counts)}")


def sequential(pool: Pool, key_list=None, n=PICKS) -> Counter:
    c = Counter()
    if key_list is None:
        for _ in range(n):
            c[pool.pick().name] += 1
    else:
        for k in key_list:
            c[pool.pick(k).name] += 1
    return c


def concurrent(pool: Pool, concurrency: int = 1000, n=PICKS, rt=None) -> Counter:
    """Picks under load: ``concurrency`` connections open, each new one closes the oldest
    (equal durations), so each backend's share of picks follows its share of open ones."""
    c = Counter()
    open_ = deque()
    for _ in range(n):
        b = pool.pick()
        Pool.acquire(b)
        open_.append(b)
        c[b.name] += 1
        if len(open_) > concurrency:
            old = open_.popleft()
            Pool.release(old, rt(old) if rt else None)
    return c


# -- distributions ----------------------------------------------------------------------------

W = (5, 3, 2)


def test_roundrobin_equal_shares_and_order():
    p = make_pool((1, 1, 1, 1))
    seq = [p.pick().name for _ in range(8)]
    assert seq == ["b0", "b1", "b2", "b3"] * 2
    assert_shares(sequential(p), (1, 1, 1, 1), p)


def test_wrr_weighted_shares_and_smoothness():
    p = make_pool(W, "wrr")
    assert_shares(sequential(p), W, p)
    # nginx's smooth sequence for weights 5, 1, 1 is "a a b a c a a"
    p = make_pool((5, 1, 1), "wrr", names=["a", "b", "c"])
    assert "".join(p.pick().name for _ in range(14)) == "aabacaa" * 2


def test_swrr_schedule_reduces_by_gcd():
    assert swrr_schedule([10, 20]) == [1, 0, 1]


def test_wrr_live_path_matches_precomputed_cycle():
    cfg = pool_cfg((7, 4, 3, 1), "wrr")
    sched = Pool(cfg, SmoothWeighted())
    live = Pool(cfg, SmoothWeighted(max_schedule_work=0))
    assert [sched.pick().name for _ in range(150)] == [live.pick().name for _ in range(150)]
    assert_shares(sequential(live, n=15_000), (7, 4, 3, 1), live)


def test_wrr_frequent_rebuilds_do_not_restart_the_cycle():
    p = make_pool((5, 1, 1), "wrr", names=["a", "b", "c"])
    c = Counter()
    for i in range(700):
        if i % 3 == 0:
            p.refresh(float(i))  # e.g. slow-start ticks: a new view version each time
        c[p.pick().name] += 1
    assert c == Counter({"a": 500, "b": 100, "c": 100})


def test_wrr_skips_full_keeps_others_proportional():
    p = make_pool((5, 3, 2), "wrr")
    p.backends[0].max_conns = 1
    Pool.acquire(p.backends[0])  # b0 is full
    c = sequential(p, n=10_000)
    assert c["b0"] == 0
    assert abs(c["b1"] / 10_000 - 0.6) < 0.01


def test_wrr_uses_view_weights_not_admin_weights():
    p = make_pool((1, 1), "wrr")
    p.set_weight(p.backends[0], 3, 0.0)  # admin weight -> rebuild -> view weight 3
    assert_shares(sequential(p, n=40_000), (3, 1), p)


def test_leastconn_weighted_shares_under_load():
    p = make_pool(W, "leastconn")
    assert_shares(concurrent(p), W, p)


def test_leastconn_prefers_less_loaded():
    p = make_pool((1, 1, 1), "leastconn")
    b0, b1, b2 = p.backends
    for _ in range(3):
        Pool.acquire(b0)
    Pool.acquire(b1)
    assert p.pick() is b2
    Pool.acquire(b2)
    Pool.acquire(b2)
    assert p.pick() is b1
    # weight counts: 4 connections on weight 4 beat 2 on weight 1
    p = make_pool((4, 1), "leastconn")
    for _ in range(4):
        Pool.acquire(p.backends[0])
    for _ in range(2):
        Pool.acquire(p.backends[1])
    assert p.pick() is p.backends[0]


def test_leastconn_ties_rotate():
    p = make_pool((1, 1, 1), "leastconn")
    assert sorted(p.pick().name for _ in range(3)) == ["b0", "b1", "b2"]


def test_p2c_equal_shares_and_seeded_determinism():
    p = make_pool((1, 1, 1, 1, 1), "p2c", seed=7)
    assert_shares(sequential(p), (1,) * 5, p)
    a = make_pool((1, 1, 1, 1), "p2c", seed=42)
    b = make_pool((1, 1, 1, 1), "p2c", seed=42)
    assert [a.pick().name for _ in range(200)] == [b.pick().name for _ in range(200)]


def test_p2c_weighted_shares_under_load():
    p = make_pool(W, "p2c", seed=3)
    assert_shares(concurrent(p), W, p)


def test_p2c_prefers_less_loaded_of_two():
    p = make_pool((1, 1), "p2c", seed=1)
    for _ in range(5):
        Pool.acquire(p.backends[0])
    assert all(p.pick() is p.backends[1] for _ in range(50))


def test_leasttime_weighted_shares_under_load():
    p = make_pool(W, "leasttime")
    assert_shares(concurrent(p, rt=lambda b: 0.01), W, p)


def test_leasttime_prefers_faster_and_less_busy():
    p = make_pool((1, 1), "leasttime")
    fast, slow = p.backends
    fast.ewma_rt, slow.ewma_rt = 0.010, 0.050
    assert p.pick() is fast
    for _ in range(4):  # fast: 0.010 * 5 = 0.05 ... ties; one more makes it worse
        Pool.acquire(fast)
    Pool.acquire(fast)  # 0.010 * 6 = 0.06 > 0.05
    assert p.pick() is slow
    # under simulated load the faster backend takes about 5x the traffic
    p = make_pool((1, 1), "leasttime")
    rts = {"b0": 0.002, "b1": 0.010}
    c = concurrent(p, concurrency=60, n=20_000, rt=lambda b: rts[b.name])
    assert c["b0"] > 3 * c["b1"]


def test_leasttime_unsampled_backend_gets_traffic_but_not_all():
    p = make_pool((1, 1, 1), "leasttime")
    b0, b1, new = p.backends
    b0.ewma_rt, b1.ewma_rt = 0.020, 0.030
    Pool.acquire(b0)  # b0: 0.020 x 2 in flight; new: rated like the fastest, 0.020 x 1
    assert p.pick() is new
    Pool.acquire(new)  # its in-flight request counts: 0.040, like b0; b1 0.030 wins
    assert p.pick() is b1
    Pool.release(b0)
    Pool.release(new)
    # it must not swallow everything while it has no sample
    c = Counter()
    for _ in range(30):
        b = p.pick()
        Pool.acquire(b)
        c[b.name] += 1
    assert c["b2"] < 15 and c["b0"] > 0 and c["b1"] > 0


@pytest.mark.parametrize("algo", ["source", "maglev"])
def test_hash_equal_shares_over_many_keys(algo):
    p = make_pool((1, 1, 1, 1), algo)
    assert_shares(sequential(p, keys(PICKS)), (1, 1, 1, 1), p)


@pytest.mark.parametrize("algo", ["source", "maglev"])
def test_hash_weighted_shares_over_many_keys(algo):
    p = make_pool(W, algo)
    assert_shares(sequential(p, keys(PICKS, "w")), W, p)


@pytest.mark.parametrize("algo", ["source", "maglev"])
def test_hash_same_key_same_backend(algo):
    p = make_pool((1, 1, 1, 1, 1), algo)
    for k in keys(500):
        first = p.pick(k)
        assert all(p.pick(k) is first for _ in range(3))


@pytest.mark.parametrize("algo", ["source", "maglev"])
def test_hash_ipv6_clients_spread_and_stay(algo):
    """IPv6 client addresses are keys like any other: spread evenly, each one kept."""
    p = make_pool((1, 1, 1, 1), algo)
    cfg = p.cfg
    v6 = [hash_key_for(cfg, f"2001:2::{i >> 16:x}:{i & 0xffff:x}") for i in range(PICKS)]
    assert len(set(v6)) == PICKS
    assert_shares(sequential(p, v6), (1, 1, 1, 1), p)
    assert all(p.pick(k) is p.pick(k) for k in v6[:200])


def test_key_hash_is_stable():
    # fixed values: the hash must not change between processes, hosts or releases
    assert key_hash(b"") == key_hash(b"")
    assert key_hash(b"10.0.0.1") != key_hash(b"10.0.0.2")
    assert key_hash(b"10.0.0.1") == 1340728231


# -- Maglev -----------------------------------------------------------------------------------

# Maglev's extra disruption grows with N / M (measured, standard algorithm as in the paper:
# N=10 at M=65537: 1.02x ideal; N=100 at M=65537: ~1.56x; N=100 at M=262147: ~1.24x). The
# paper sizes M much larger than N; for N=100 the test uses a 262147-entry table (a config
# value, maglev_table_size), at the default size it checks the measured bound of 1.7x.
@pytest.mark.parametrize("n,size,bound", [(10, 65537, 1.5), (100, 262147, 1.5), (100, 65537, 1.7)])
def test_maglev_removal_moves_at_most_1_5x_ideal(n, size, bound):
    names = [f"backend-{i}" for i in range(n)]
    before = [names[i] for i in maglev_table(names, [1] * n, size)]
    gone = names[n // 3]
    rest = [x for x in names if x != gone]
    after = [rest[i] for i in maglev_table(rest, [1] * (n - 1), size)]
    moved = sum(1 for a, b in zip(before, after) if a != b) / size
    ideal = 1 / n
    print(f"maglev N={n} M={size}: moved {moved:.4f} of the table, ideal {ideal:.4f} "
          f"({moved / ideal:.2f}x)")
    assert moved <= bound * ideal
    # every entry of the leaving backend moved; no entry moved to it
    assert all(b != gone for b in after)
    # and over keys through the balancer
    p = make_pool([1] * n, "maglev", names=names, maglev_table_size=size)
    ks = keys(20_000, "m")
    first = [p.pick(k).name for k in ks]
    p.set_health(p.by_name[gone], False, 0.0)
    second = [p.pick(k).name for k in ks]
    moved_keys = sum(1 for a, b in zip(first, second) if a != b) / len(ks)
    print(f"  over 20000 keys: moved {moved_keys:.4f} ({moved_keys / ideal:.2f}x)")
    assert moved_keys <= bound * ideal
    assert gone not in second


def test_maglev_independent_tables_pick_identically():
    names = [f"srv{i:02d}" for i in range(17)]
    weights = [1 + (i % 4) for i in range(17)]
    shuffled = list(range(17))
    random.Random(5).shuffle(shuffled)
    a = make_pool(weights, "maglev", names=names)
    b = make_pool([weights[i] for i in shuffled], "maglev", names=[names[i] for i in shuffled])
    assert [x.name for x in a.balancer._table] == [x.name for x in b.balancer._table]
    for k in keys(5_000, "ind"):
        assert a.pick(k).name == b.pick(k).name


def test_maglev_table_size_from_config_and_cache():
    p = make_pool((1, 1, 1), "maglev", maglev_table_size=251)
    bal = p.balancer
    assert isinstance(bal, MaglevHash) and len(bal._table) == 251
    t0 = bal._table
    p.set_health(p.backends[1], False, 1.0)
    assert p.backends[1] not in bal._table
    p.set_health(p.backends[1], True, 2.0)  # back to a cached signature
    assert [x.name for x in bal._table] == [x.name for x in t0]


def test_maglev_fallback_for_full_backend_is_deterministic():
    p = make_pool((1, 1, 1, 1), "maglev", max_conns=1)
    ks = keys(2_000, "f")
    owners = {k: p.pick(k) for k in ks}
    full = p.backends[2]
    Pool.acquire(full)
    again = {k: p.pick(k) for k in ks}
    for k in ks:
        if owners[k] is not full:
            assert again[k] is owners[k]  # others keep their keys
        else:
            assert again[k] is not full and again[k] is p.pick(k)
    for b in p.backends:
        if b.active == 0:
            Pool.acquire(b)
    assert p.pick(b"x") is None  # all full


def test_maglev_every_backend_owns_entries_when_weights_exceed_the_table():
    """Weights adding up to more than the table (7 entries, weights 10 and 1) must still give
    every backend entries, and a pick that excludes the heavy one must end (it once looped
    forever and froze the node)."""
    idx = maglev_table(["a", "b"], [10, 1], 7)
    assert set(idx) == {0, 1}
    p = make_pool((10, 1), "maglev", maglev_table_size=7)
    a, b = p.backends
    assert all(p.pick(k, exclude={a}) is b for k in keys(50, "x"))
    big = maglev_table([f"n{i}" for i in range(3)], [128, 128, 128], 251)
    assert set(big) == {0, 1, 2}


# -- skipping full / excluded ---------------------------------------------------------------

ALGOS = list(ALGORITHMS)


@pytest.mark.parametrize("algo", ALGOS)
def test_full_and_excluded_backends_are_skipped(algo):
    p = make_pool((1, 2, 1), algo, seed=1, max_conns=2)
    b0, b1, b2 = p.backends
    Pool.acquire(b1)
    Pool.acquire(b1)  # b1 full
    seen = Counter()
    for k in keys(300, "s"):
        b = p.pick(k, exclude={b0})
        seen[b.name] += 1
    assert set(seen) == {"b2"}
    Pool.acquire(b2)
    Pool.acquire(b2)
    assert p.pick(b"k", exclude={b0}) is None
    Pool.release(b1)
    assert p.pick(b"k", exclude={b0}) is b1


@pytest.mark.parametrize("algo", ALGOS)
def test_empty_view_picks_none(algo):
    p = make_pool((1, 1), algo, seed=1)
    for b in p.backends:
        p.set_health(b, False, 0.0)
    assert p.pick(b"k") is None


@pytest.mark.parametrize("algo", ["source", "maglev"])
def test_hash_without_key_round_robins(algo):
    p = make_pool((1, 1, 1), algo)
    assert sorted(p.pick(None).name for _ in range(3)) == ["b0", "b1", "b2"]


# -- hash keys ----------------------------------------------------------------------------------

def test_hash_key_for():
    ip = "192.0.2.7"
    assert hash_key_for(pool_cfg((1,), "roundrobin"), ip) is None
    assert hash_key_for(pool_cfg((1,), "maglev"), ip) == b"192.0.2.7"
    hdr = pool_cfg((1,), "maglev", hash_key="header:x-user")
    assert hash_key_for(hdr, ip, {"x-user": "alice"}) == b"h:alice"
    assert hash_key_for(hdr, ip, {"X-User": "alice"}) == b"h:alice"
    assert hash_key_for(hdr, ip, {"other": "x"}) == b"192.0.2.7"
    assert hash_key_for(hdr, ip, None) == b"192.0.2.7"
    ck = pool_cfg((1,), "source", hash_key="cookie:sid")
    assert hash_key_for(ck, ip, None, {"sid": "s1"}) == b"c:s1"
    assert hash_key_for(ck, ip, None, {"SID": "s1"}) == b"192.0.2.7"  # cookie names are exact
    assert hash_key_for(ck, "", None, {}) is None


def test_make_balancer_rejects_unknown_algorithm():
    cfg = pool_cfg((1,), "roundrobin")
    object.__setattr__(cfg, "algorithm", "bogus")
    with pytest.raises(ValueError, match="unknown balancing algorithm 'bogus'"):
        make_balancer(cfg)


def test_maglev_table_entries_follow_weights_and_reject_bad_input():
    t = maglev_table(["a", "b", "c"], [5, 3, 2], 65537)
    c = Counter(t)
    assert -1 not in c and sum(c.values()) == 65537
    for i, w in enumerate((5, 3, 2)):
        assert abs(c[i] - 65537 * w / 10) <= 5  # exact up to the last round
    with pytest.raises(ValueError, match="must exceed the number of backends"):
        maglev_table(["a", "b", "c"], [1, 1, 1], 3)
    with pytest.raises(ValueError, match="positive weight"):
        maglev_table(["a"], [0], 7)
    assert maglev_table([], [], 7) == []
