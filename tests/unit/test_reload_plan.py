"""The reload plan (halb.reload, pure) and Pool.reconfigure: what a reload changes, what it
keeps, what it refuses."""

from __future__ import annotations

import pytest

from halb.config import loads
from halb.model import Pool
from halb.reload import plan

pytestmark = pytest.mark.unit

BASE = '''
[node]
name = "lb1"
[[pools]]
name = "web"
algorithm = "wrr"
[[pools.backends]]
name = "w1"
address = "198.18.0.11:80"
[[pools.backends]]
name = "w2"
address = "198.18.0.12:80"
weight = 2
[[pools]]
name = "api"
[[pools.backends]]
name = "a1"
address = "198.18.0.21:80"
[[listeners]]
name = "www"
mode = "http"
bind = "127.0.0.1:8080"
pool = "web"
[[listeners]]
name = "db"
mode = "tcp"
bind = "127.0.0.1:5432"
pool = "api"
[[vrrp]]
name = "vi"
interface = "eth0"
vrid = 51
priority = 150
vips = ["198.18.0.100/24"]
checksum = "rfc9568"
'''


def cfg(text: str = BASE):
    return loads(text)


def test_nothing_changed_is_an_empty_plan():
    p = plan(cfg(), cfg())
    assert p.ok and p.empty and p.changes == []


def test_backends_added_removed_and_changed():
    new = BASE.replace('name = "w2"\naddress = "198.18.0.12:80"\nweight = 2',
                       'name = "w2"\naddress = "198.18.0.12:80"\nweight = 5') \
              .replace('name = "w1"\naddress = "198.18.0.11:80"\n',
                       'name = "w3"\naddress = "198.18.0.13:80"\n')
    p = plan(cfg(), cfg(new))
    assert p.ok and [pc.name for pc in p.pools_changed] == ["web"]
    assert sorted(p.changes) == ["backend web/w1 removed",
                                 "backend web/w2 changed (weight)",
                                 "backend web/w3 added (198.18.0.13:80)"]


def test_listener_in_place_new_socket_replaced_and_handover():
    new = BASE.replace('[[listeners]]\nname = "www"\nmode = "http"\nbind = "127.0.0.1:8080"\n'
                       'pool = "web"\n',
                       '[[listeners]]\nname = "www"\nmode = "http"\nbind = "127.0.0.1:8080"\n'
                       'pool = "api"\nvia = "edge"\n')
    p = plan(cfg(), cfg(new))
    assert [(lc.name, how) for lc, how in p.listeners_changed] == [("www", "in place")]
    assert p.changes == ["listener www changed (pool, via)"]
    # a renamed listener on the same bind takes the old one's socket over
    renamed = BASE.replace('name = "db"', 'name = "pg"')
    p = plan(cfg(), cfg(renamed))
    assert [lc.name for lc in p.listeners_added] == ["pg"] and p.listeners_removed == ["db"]
    assert p.handover == {"pg": "db"}
    # a new bind: the listener is replaced (new socket first, then the old one goes)
    moved = BASE.replace('bind = "127.0.0.1:5432"', 'bind = "127.0.0.1:5433"')
    p = plan(cfg(), cfg(moved))
    assert [lc.name for lc in p.listeners_added] == ["db"] and p.listeners_removed == ["db"]
    assert p.handover == {}


def test_pools_added_and_removed_with_their_listeners():
    new = BASE.replace('pool = "api"\n[[vrrp]]', 'pool = "web"\n[[vrrp]]').replace(
        '[[pools]]\nname = "api"\n[[pools.backends]]\nname = "a1"\naddress = "198.18.0.21:80"\n',
        '[[pools]]\nname = "cache"\n[[pools.backends]]\nname = "c1"\naddress = "198.18.0.31:80"\n')
    p = plan(cfg(), cfg(new))
    assert p.ok
    assert [pc.name for pc in p.pools_added] == ["cache"] and p.pools_removed == ["api"]


@pytest.mark.parametrize("change,key", [
    (('priority = 150', 'priority = 100'), "vrrp"),
    (('name = "lb1"', 'name = "lb2"'), "node.name"),
    (('[[vrrp]]', '[metrics]\naddress = "127.0.0.1:9100"\n[[vrrp]]'), "metrics.address"),
])
def test_sections_that_need_a_restart_are_refused(change, key):
    p = plan(cfg(), cfg(BASE.replace(*change)))
    assert not p.ok
    assert [k for k, _ in p.refused] == [key]
    assert "restart" in p.refused[0][1]


def test_pool_reconfigure_keeps_backends_state_and_runtime_weight():
    old = cfg().pool("web")
    pool = Pool(old)
    w1, w2 = pool.by_name["w1"], pool.by_name["w2"]
    w1.active = 3
    w1.healthy = False
    pool.set_weight(w2, 7, 0.0)  # a runtime change (halbctl weight)
    # w1's weight changed in the config, w2's did not; w4 is new; w2 keeps its runtime weight
    new = cfg(BASE.replace('name = "w1"\naddress = "198.18.0.11:80"\n',
                           'name = "w1"\naddress = "198.18.0.11:80"\nweight = 3\n')
              .replace('[[pools]]\nname = "api"',
                       '[[pools.backends]]\nname = "w4"\naddress = "198.18.0.14:80"\n'
                       '[[pools]]\nname = "api"')).pool("web")
    gone = pool.reconfigure(new, 1.0)
    assert gone == []
    assert pool.by_name["w1"] is w1 and w1.active == 3 and not w1.healthy and w1.weight == 3
    assert pool.by_name["w2"] is w2 and w2.weight == 7
    assert [b.name for b in pool.view.backends] == ["w2", "w4"]  # w1 is down
    # an address change is a new backend; a removed one is returned
    moved = cfg(BASE.replace('198.18.0.12:80', '198.18.0.99:80')).pool("web")
    gone = pool.reconfigure(moved, 2.0)
    assert {b.name for b in gone} == {"w2", "w4"}
    assert pool.by_name["w2"] is not w2 and pool.by_name["w2"].port == 80
    assert pool.by_name["w2"].host == "198.18.0.99"


def test_algorithm_change_rebuilds_the_balancer():
    pool = Pool(cfg().pool("web"))
    before = pool.balancer
    pool.reconfigure(cfg(BASE.replace('algorithm = "wrr"', 'algorithm = "leastconn"'))
                     .pool("web"), 1.0)
    assert pool.balancer is not before and type(pool.balancer).__name__ == "LeastConn"
    same = pool.balancer
    pool.reconfigure(cfg(BASE.replace('algorithm = "wrr"', 'algorithm = "leastconn"')
                         .replace('weight = 2', 'weight = 4')).pool("web"), 2.0)
    assert pool.balancer is same
