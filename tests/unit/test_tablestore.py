"""Tables saved and loaded across a restart (halb.tablestore)."""

from __future__ import annotations

import json

import pytest

from halb import tablestore
from halb.clock import FakeClock
from halb.tables import Tables

pytestmark = pytest.mark.unit


def tables(clock, node="lb1"):
    return Tables(node, clock, sticky_max=100, flow_max=100, nat_max=100, tombstones=False)


def test_roundtrip_keeps_live_entries_and_drops_expired(tmp_path):
    clock = FakeClock(1000.0)
    t = tables(clock)
    t.sticky.put("src/web/198.18.0.5", "web2", 600, pool="web", client="198.18.0.5")
    t.sticky.put("src/web/198.18.0.6", "web1", 5, pool="web")
    t.flow.put("tcp1/tcp/198.18.0.5:4000", "db1", 60, pool="db", client="198.18.0.5:4000",
               listener="tcp1", proto="tcp")
    t.nat.put("nat/tcp/198.18.0.5:1/80", "n1", 60, pool="n")
    path = tablestore.path_for(str(tmp_path), "lb1")
    tablestore.save(path, tablestore.encode("lb1", clock.now(), tablestore.snapshot(t)))
    assert json.loads(path.read_text())["version"] == 1
    clock.advance(10)  # the 5 s entry expired while the node was down
    fresh = tables(clock)
    took = tablestore.apply(fresh, tablestore.load(path))
    assert took == {"sticky": 1, "flow": 1}
    e = fresh.sticky.get("src/web/198.18.0.5")
    assert (e.backend, e.pool, e.client, e.origin) == ("web2", "web", "198.18.0.5", "lb1")
    assert e.expires == 1600.0  # absolute expiry kept
    assert fresh.flow.get("tcp1/tcp/198.18.0.5:4000").listener == "tcp1"
    assert len(fresh.nat) == 0  # the kernel's conntrack is the NAT table's memory
    assert fresh.sticky.seq == 0  # loaded, not logged: nothing to ship to peers


def test_a_newer_version_from_a_peer_wins_over_the_file(tmp_path):
    clock = FakeClock(1000.0)
    t = tables(clock)
    t.sticky.put("k", "old", 600, pool="web")
    path = tmp_path / "t.json"
    tablestore.save(path, tablestore.encode("lb1", clock.now(), tablestore.snapshot(t)))
    clock.advance(1)
    fresh = tables(clock, "lb2")
    fresh.sticky.put("k", "new", 600, pool="web")  # learnt from a peer, newer
    tablestore.apply(fresh, tablestore.load(path))
    assert fresh.sticky.get("k").backend == "new"


@pytest.mark.parametrize("data,why", [
    (b"{", "not a tables file"),
    (b'{"version": 9}', "version 9"),
    (b'{"version": 1}', "no tables"),
    (b'{"version": 1, "tables": {"sticky": [[1, 2]]}}', "malformed entry"),
    (b'{"version": 1, "tables": {"sticky": [["k", "b", "p", "x", 1, 2, "o", "", "", ""]]}}',
     "malformed entry"),
])
def test_a_bad_file_is_refused_with_a_reason(tmp_path, data, why):
    p = tmp_path / "t.json"
    p.write_bytes(data)
    with pytest.raises(ValueError, match=why):
        tablestore.load(p)


def test_no_file_is_not_an_error_and_save_is_atomic(tmp_path):
    p = tmp_path / "t.json"
    assert tablestore.load(p) is None
    tablestore.save(p, b"first")
    tablestore.save(p, b"second")
    assert p.read_bytes() == b"second" and not (tmp_path / "t.json.tmp").exists()
