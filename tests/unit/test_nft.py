"""halb.nat.nft: the libnftables JSON documents of the kernel NAT mode (pure; the kernel side
is tests/integration/test_nft_kernel.py)."""

from __future__ import annotations

import json

import pytest

from halb.balance import maglev_table
from halb.nat import nft
from halb.nat.nft import NatBackend, NatRuleset, NatService

pytestmark = pytest.mark.unit

VIP = "198.18.80.100"
BK = (NatBackend("b1", "198.18.81.11", 8080), NatBackend("b2", "198.18.81.12", 8080))


def svc(name="web", proto="tcp", port=80, port_end=None, hash_fields="src_port", seed=0x1234,
        slots=(0, 1, -1, 1, 0), backends=BK, **kw) -> NatService:
    return NatService(name, proto, VIP, port, port if port_end is None else port_end,
                      hash_fields, seed, tuple(slots), tuple(backends), **kw)


def cmds(doc, verb=None, kind=None):
    out = []
    for c in doc["nftables"]:
        (v, body), = c.items()
        (k, obj), = body.items()
        if (verb is None or v == verb) and (kind is None or k == kind):
            out.append(obj)
    return out


def rules(doc, chain):
    return [r["expr"] for r in cmds(doc, "add", "rule") if r["chain"] == chain]


def test_build_starts_with_table_and_flush_and_is_json():
    doc = nft.build(NatRuleset(services=(svc(),)))
    assert doc["nftables"][:2] == [{"add": {"table": {"family": "ip", "name": "halb"}}},
                                   {"flush": {"table": {"family": "ip", "name": "halb"}}}]
    assert json.loads(json.dumps(doc)) == doc
    assert nft.build(NatRuleset(services=(svc(),))) == doc  # deterministic


def test_chains_hooks_and_priorities():
    doc = nft.build(NatRuleset(services=(svc(),), exempt_tcp_ports=(7000,)))
    chains = {c["name"]: (c["type"], c["hook"], c["prio"], c["policy"])
              for c in cmds(doc, "add", "chain")}
    assert chains == {
        "raw": ("filter", "prerouting", -300, "accept"),
        "rawout": ("filter", "output", -300, "accept"),
        "events": ("filter", "prerouting", -150, "accept"),
        "prerouting": ("nat", "prerouting", -100, "accept"),
        "output": ("nat", "output", -100, "accept"),
        "forward": ("filter", "forward", 0, "accept"),
    }
    assert all(c["table"] == "halb" and c["family"] == "ip" for c in cmds(doc, "add", "chain"))
    # no listeners, no exempt ports: an empty table
    empty = nft.build(NatRuleset(table="t2"))
    assert not cmds(empty, "add", "chain") and cmds(empty, "add", "table") == [
        {"family": "ip", "name": "t2"}]


def test_hashed_dnat_rule_and_drop_behind_it():
    s = svc()
    doc = nft.build(NatRuleset(services=(s,)))
    pre = rules(doc, "prerouting")
    assert rules(doc, "output") == pre
    match = [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                        "right": VIP}},
             {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                        "right": 80}}]
    ct_mark = {"ct": {"key": "mark"}}
    assert pre[0] == match + [
        {"mangle": {"key": ct_mark, "value": {"jhash": {
            "mod": 5, "seed": 0x1234, "expr": {"concat": [
                {"payload": {"protocol": "ip", "field": "saddr"}},
                {"payload": {"protocol": "tcp", "field": "sport"}}]}}}}},
        {"dnat": {"family": "ip",
                  "addr": {"map": {"key": ct_mark, "data": "@slots_web"}},
                  "port": {"map": {"key": ct_mark, "data": "@ports_web"}}}}]
    assert pre[1] == match + [{"counter": "drop_web"}, {"drop": None}]


def test_source_address_hash_and_udp():
    s = svc(proto="udp", port=53, hash_fields="src", seed=7)
    expr = rules(nft.build(NatRuleset(services=(s,))), "prerouting")[0]
    assert expr[1]["match"]["left"] == {"payload": {"protocol": "udp", "field": "dport"}}
    assert expr[2]["mangle"]["value"] == {"jhash": {
        "mod": 5, "seed": 7, "expr": {"payload": {"protocol": "ip", "field": "saddr"}}}}


def test_maps_hold_the_filled_slots_only():
    doc = nft.build(NatRuleset(services=(svc(),)))
    maps = {m["name"]: (m["type"], m["map"]) for m in cmds(doc, "add", "map")}
    assert maps == {"slots_web": ("mark", "ipv4_addr"), "ports_web": ("mark", "inet_service")}
    assert [m["name"] for m in cmds(doc, "flush", "map")] == ["slots_web", "ports_web"]
    el = {e["name"]: e["elem"] for e in cmds(doc, "add", "element")}
    assert el["slots_web"] == [[0, "198.18.81.11"], [1, "198.18.81.12"], [3, "198.18.81.12"],
                               [4, "198.18.81.11"]]
    assert el["ports_web"] == [[0, 8080], [1, 8080], [3, 8080], [4, 8080]]
    # every command that fills a map comes after its flush
    order = [next(iter(c)) + ":" + next(iter(next(iter(c.values()))))
             for c in doc["nftables"]]
    assert order.index("flush:map") < order.index("add:element")


def test_no_backend_at_all_gives_empty_maps():
    s = svc(slots=(-1, -1, -1), backends=())
    doc = nft.build(NatRuleset(services=(s,)))
    assert not cmds(doc, "add", "element")
    assert [m["name"] for m in cmds(doc, "add", "map")] == ["slots_web", "ports_web"]
    assert len(rules(doc, "prerouting")) == 2  # clients are dropped


def test_ports_zero_and_ranges():
    zero = (NatBackend("b1", "198.18.81.11", 0), NatBackend("b2", "198.18.81.12", 0))
    # single port: port 0 = the listener's port
    s = svc(backends=zero)
    el = {e["name"]: e["elem"] for e in cmds(nft.build(NatRuleset(services=(s,))), "add",
                                             "element")}
    assert el["ports_web"] == [[0, 80], [1, 80], [3, 80], [4, 80]]
    # a range with port-0 backends keeps the client's port: no port map, no port in dnat
    r = svc(port=9000, port_end=9003, backends=zero)
    doc = nft.build(NatRuleset(services=(r,)))
    assert [m["name"] for m in cmds(doc, "add", "map")] == ["slots_web"]
    dn = rules(doc, "prerouting")[0]
    assert dn[1]["match"]["right"] == {"range": [9000, 9003]}
    assert "port" not in dn[-1]["dnat"]
    fwd = rules(doc, "forward")
    assert {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}},
                      "right": {"range": [9000, 9003]}}} in fwd[0]
    # a range onto fixed ports: every port of the range goes to the backend's port
    f = svc(port=9000, port_end=9003)
    assert "port" in rules(nft.build(NatRuleset(services=(f,))), "prerouting")[0][-1]["dnat"]
    # mixing both on a range cannot be expressed
    with pytest.raises(ValueError, match="port range"):
        nft.build(NatRuleset(services=(svc(port=9000, port_end=9003,
                                           backends=(BK[0], zero[1])),)))


def test_events_rule_defaults_and_override():
    t, u = svc(), svc(name="dns", proto="udp", port=53)
    c = svc(name="c", port=81, ct_events=("new",))
    ev = rules(nft.build(NatRuleset(services=(t, u, c))), "events")
    assert [e[-1]["mangle"]["value"] for e in ev] == [["assured", "destroy"],
                                                     ["new", "destroy"], "new"]
    assert all(e[-1]["mangle"]["key"] == {"ct": {"key": "event"}} for e in ev)
    assert all(e[-2] == {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                   "right": "new"}} for e in ev)
    assert t.events == ("assured", "destroy") and u.events == ("new", "destroy")
    with pytest.raises(ValueError, match="ct_events"):
        nft.build(NatRuleset(services=(svc(ct_events=("bogus",)),)))
    with pytest.raises(ValueError, match="ct_events"):
        nft.build(NatRuleset(services=(svc(ct_events=()),)))


def test_exempt_ports_notrack_both_ways_in_both_raw_chains():
    doc = nft.build(NatRuleset(exempt_tcp_ports=(7000, 7001)))
    for chain in ("raw", "rawout"):
        got = [(r[0]["match"]["left"]["payload"]["field"], r[0]["match"]["right"], r[1])
               for r in rules(doc, chain)]
        assert got == [("dport", 7000, {"notrack": None}), ("sport", 7000, {"notrack": None}),
                       ("dport", 7001, {"notrack": None}), ("sport", 7001, {"notrack": None})]
    with pytest.raises(ValueError):
        nft.build(NatRuleset(exempt_tcp_ports=(0,)))


def test_counters_per_backend_both_directions():
    doc = nft.build(NatRuleset(services=(svc(),)))
    names = [c["name"] for c in cmds(doc, "add", "counter")]
    assert names == ["drop_web", "be_web_b1", "rbe_web_b1", "be_web_b2", "rbe_web_b2"]
    fwd = rules(doc, "forward")
    assert [r[-1] for r in fwd] == [{"counter": n} for n in names[1:]]
    to_b1, from_b1 = fwd[0], fwd[1]
    l4 = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}
    # the listener's connections only (the original tuple), after the transport match so
    # that nft's text listing loads again
    orig = [{"match": {"op": "==", "left": {"ct": {"key": "ip daddr", "dir": "original"}},
                       "right": VIP}},
            {"match": {"op": "==", "left": {"ct": {"key": "proto-dst", "dir": "original"}},
                       "right": 80}}]
    assert to_b1 == [l4, {"match": {"op": "==", "left": {"ct": {"key": "direction"}},
                                    "right": "original"}},
                     {"match": {"op": "==", "left": {"payload": {"protocol": "ip",
                                                                 "field": "daddr"}},
                                "right": "198.18.81.11"}},
                     {"match": {"op": "==", "left": {"payload": {"protocol": "th",
                                                                 "field": "dport"}},
                                "right": 8080}}] + orig + [{"counter": "be_web_b1"}]
    assert from_b1 == [l4, {"match": {"op": "==", "left": {"ct": {"key": "direction"}},
                                      "right": "reply"}},
                       {"match": {"op": "==", "left": {"payload": {"protocol": "ip",
                                                                   "field": "saddr"}},
                                  "right": "198.18.81.11"}},
                       {"match": {"op": "==", "left": {"payload": {"protocol": "th",
                                                                   "field": "sport"}},
                                  "right": 8080}}] + orig + [{"counter": "rbe_web_b1"}]


def test_names_are_sanitized_and_collisions_refused():
    s = svc(name="web-1", backends=(NatBackend("be.one", "198.18.81.11", 80),), slots=(0,))
    doc = nft.build(NatRuleset(services=(s,)))
    assert {m["name"] for m in cmds(doc, "add", "map")} == {"slots_web_1", "ports_web_1"}
    assert "be_web_1_be_one" in [c["name"] for c in cmds(doc, "add", "counter")]
    a = svc(name="a-b", slots=(0,), backends=BK[:1])
    b = svc(name="a_b", port=81, slots=(0,), backends=BK[:1])
    with pytest.raises(ValueError, match="same nft object name"):
        nft.build(NatRuleset(services=(a, b)))


@pytest.mark.parametrize("kw, text", [
    ({"proto": "sctp"}, "proto"),
    ({"hash_fields": "dst"}, "hash_fields"),
    ({"seed": -1}, "seed"),
    ({"seed": 1 << 32}, "seed"),
    ({"slots": (0, 2)}, "slot 1"),
    ({"slots": (0, -2)}, "slot 1"),
    ({"slots": ()}, "slot table"),
    ({"port": 0}, "port"),
    ({"port": 90, "port_end": 80}, "port_end"),
    ({"backends": (BK[0], BK[0])}, "twice"),
    ({"backends": (NatBackend("x", "198.18.81.300", 80),), "slots": (0,)}, "IPv4"),
    ({"backends": (NatBackend("x", "2001:db8::1", 80),), "slots": (0,)}, "IPv4"),
    ({"backends": (NatBackend("x", "198.18.81.1", 70000),), "slots": (0,)}, "port"),
    ({"name": ""}, "name"),
])
def test_invalid_listeners_are_refused(kw, text):
    with pytest.raises(ValueError, match=text):
        nft.build(NatRuleset(services=(svc(**kw),)))


def test_bad_vip_overlaps_and_table_name():
    with pytest.raises(ValueError, match="vip"):
        nft.build(NatRuleset(services=(NatService("w", "tcp", "vip", 80, 80, "src", 1, (0,),
                                                  BK[:1]),)))
    a = svc(port=9000, port_end=9010)
    b = svc(name="other", port=9010, port_end=9020)
    with pytest.raises(ValueError, match="overlap"):
        nft.build(NatRuleset(services=(a, b)))
    nft.build(NatRuleset(services=(a, svc(name="other", proto="udp", port=9000))))
    with pytest.raises(ValueError, match="table"):
        nft.build(NatRuleset(table="ha lb"))


def test_fresh_recreates_the_table():
    doc = nft.build(NatRuleset(services=(svc(),)), fresh=True)
    t = {"family": "ip", "name": "halb"}
    assert doc["nftables"][:3] == [{"add": {"table": t}}, {"delete": {"table": t}},
                                   {"add": {"table": t}}]
    assert not cmds(doc, "flush")


def test_previous_deletes_what_is_gone():
    web, dns = svc(), svc(name="dns", proto="udp", port=53)
    old = NatRuleset(services=(web, dns), exempt_tcp_ports=(7000,))
    new = NatRuleset(services=(svc(backends=BK[:1], slots=(0, 0, 0, 0, 0)),))
    doc = nft.build(new, previous=old)
    assert {m["name"] for m in cmds(doc, "delete", "map")} == {"slots_dns", "ports_dns"}
    assert {c["name"] for c in cmds(doc, "delete", "counter")} == {
        "drop_dns", "be_dns_b1", "rbe_dns_b1", "be_dns_b2", "rbe_dns_b2", "be_web_b2",
        "rbe_web_b2"}
    assert {c["name"] for c in cmds(doc, "delete", "chain")} == {"raw", "rawout"}
    # deletions come after the flush of the rules that referenced them
    verbs = [next(iter(c)) for c in doc["nftables"]]
    assert verbs.index("flush") < verbs.index("delete")
    with pytest.raises(ValueError):
        nft.build(new, previous=NatRuleset(table="other"))
    assert not cmds(nft.build(old, previous=old), "delete")


def test_delete_document():
    t = {"family": "ip", "name": "x"}
    t6 = {"family": "ip6", "name": "x"}  # the IPv6 listeners' table goes too
    assert nft.delete("x") == {"nftables": [{"add": {"table": t}}, {"delete": {"table": t}},
                                            {"add": {"table": t6}}, {"delete": {"table": t6}}]}


def test_slot_update_changes_only_what_changed():
    s = svc()
    assert nft.slot_update(s, s.slots, s.slots) == {"nftables": []}
    new = (0, 0, 1, 1, -1)  # slot 1: b2 -> b1; 2: none -> b2; 4: b1 -> none
    doc = nft.slot_update(s, s.slots, new)
    assert doc == {"nftables": [
        {"delete": {"element": {"family": "ip", "table": "halb", "name": "slots_web",
                                "elem": [1, 4]}}},
        {"delete": {"element": {"family": "ip", "table": "halb", "name": "ports_web",
                                "elem": [4]}}},
        {"add": {"element": {"family": "ip", "table": "halb", "name": "slots_web",
                             "elem": [[1, "198.18.81.11"], [2, "198.18.81.12"]]}}},
        {"add": {"element": {"family": "ip", "table": "halb", "name": "ports_web",
                             "elem": [[2, 8080]]}}},
    ]}


def test_slot_update_ports_and_backend_lists():
    bk = (NatBackend("b1", "198.18.81.11", 8080), NatBackend("b2", "198.18.81.11", 8081))
    s = svc(backends=bk, slots=(0, 1, 0))
    doc = nft.slot_update(s, (0, 1, 0), (0, 0, 0), table="t")
    assert doc == {"nftables": [
        {"delete": {"element": {"family": "ip", "table": "t", "name": "ports_web",
                                "elem": [1]}}},
        {"add": {"element": {"family": "ip", "table": "t", "name": "ports_web",
                             "elem": [[1, 8080]]}}}]}
    # the backend list changed (a new backend first): indexes shift, values do not
    old_bk = BK
    new_bk = (NatBackend("b0", "198.18.81.10", 8080),) + BK
    s2 = svc(backends=new_bk, slots=(1, 2, 0, 2, 1))
    doc = nft.slot_update(s2, (0, 1, 1, 1, 0), (1, 2, 0, 2, 1), old_backends=old_bk)
    assert cmds(doc, "add", "element") == [
        {"family": "ip", "table": "halb", "name": "slots_web", "elem": [[2, "198.18.81.10"]]}]
    assert cmds(doc, "delete", "element") == [
        {"family": "ip", "table": "halb", "name": "slots_web", "elem": [2]}]


def test_slot_update_refuses_what_needs_a_build():
    s = svc()
    with pytest.raises(ValueError, match="full build"):
        nft.slot_update(s, s.slots, s.slots + (0,))
    with pytest.raises(ValueError):
        nft.slot_update(s, s.slots, (0, 1, 2, 0, 0))
    with pytest.raises(ValueError):
        nft.slot_update(s, (0, 1, 5, 0, 0), s.slots)
    zero = tuple(NatBackend(b.name, b.address, 0) for b in BK)
    r = svc(port=9000, port_end=9003, backends=zero)
    with pytest.raises(ValueError, match="port translation"):
        nft.slot_update(r, r.slots, r.slots, old_backends=BK)
    # a range without port translation updates the address map only
    doc = nft.slot_update(r, r.slots, (0, 0, 0, 0, 0))
    assert {e["name"] for e in cmds(doc, "add", "element")} == {"slots_web"}


def test_maglev_slots_reuses_balance_and_ignores_input_order():
    names = [("web3", 1), ("web1", 2), ("web2", 1)]
    got = nft.maglev_slots(names, 251)
    srt = sorted(names)
    want = maglev_table([n for n, _ in srt], [w for _, w in srt], 251)
    assert [names[i][0] for i in got] == [srt[i][0] for i in want]
    rev = list(reversed(names))
    assert [rev[i][0] for i in nft.maglev_slots(rev, 251)] == [names[i][0] for i in got]
    assert len(got) == 251 and set(got) == {0, 1, 2}
    assert got.count(1) > got.count(0)  # web1 has weight 2
    assert nft.maglev_slots([("a", 0)], 7) == (-1,) * 7
    assert nft.maglev_slots([], 7) == (-1,) * 7
    # removing a backend moves only its own slots (Maglev's minimal disruption, roughly)
    fewer = nft.maglev_slots([("web1", 2), ("web2", 1)], 251)
    moved = sum(1 for a, b in zip(got, fewer)
                if names[a][0] != [("web1", 2), ("web2", 1)][b][0])
    assert moved <= got.count(0) + 25


def test_jhash_is_lookup3():
    # Bob Jenkins' published lookup3 values (hashlittle), which Linux's jhash() computes
    assert nft.jhash(b"", 0) == 0xDEADBEEF
    assert nft.jhash(b"", 0xDEADBEEF) == 0xBD5B7DDE
    assert nft.jhash(b"Four score and seven years ago", 0) == 0x17770551
    assert nft.jhash(b"Four score and seven years ago", 1) == 0xCD628161


def test_slot_of_matches_what_the_kernel_chose():
    # observed on Linux 6.18 (the ct mark the DNAT rule stores is the slot; conntrack -L)
    web = svc(slots=tuple([0] * 251), seed=0x5EED1234)
    assert nft.slot_of(web, "198.18.80.2", 41000) == 3
    assert nft.slot_of(web, "198.18.80.2", 20000) == 53
    dns = svc(proto="udp", hash_fields="src", slots=tuple([0] * 251), seed=0x5EED1234 ^ 0xFFFF)
    assert nft.slot_of(dns, "198.18.80.2") == 86
    assert nft.hash_key(web, "198.18.80.2", 41000) == bytes([198, 18, 80, 2, 0xA0, 0x28, 0, 0])
    assert nft.hash_key(dns, "198.18.80.2", 41000) == bytes([198, 18, 80, 2])
    assert nft.backend_of(svc(), "198.18.80.2", 1) in BK + (None,)


def test_counters_of_a_listing():
    from halb.nat.nftapply import counters_of

    listing = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"counter": {"family": "ip", "name": "be_web_b1", "table": "halb", "handle": 4,
                     "packets": 7, "bytes": 420}},
        {"rule": {"family": "ip", "table": "halb", "chain": "c", "handle": 9,
                  "comment": "x", "expr": [{"counter": {"packets": 2, "bytes": 80}},
                                           {"drop": None}]}},
        {"rule": {"family": "ip", "table": "halb", "chain": "c", "handle": 10,
                  "expr": [{"counter": {"packets": 1, "bytes": 1}}]}},
        {"rule": {"family": "ip", "table": "halb", "chain": "c", "handle": 11,
                  "comment": "named", "expr": [{"counter": "be_web_b1"}]}},
    ]}
    assert counters_of(listing) == {"be_web_b1": (7, 420), "x": (2, 80)}



def test_events_rules_report_after_n_packets():
    """replicate_after_packets: a new connection reports nothing; the client's N-th packet
    turns on {mark, destroy} and sets the report bit in the ct mark (one [UPDATE])."""
    from dataclasses import replace
    from halb.nat import nft as n
    base = n.NatService(name="www", proto="tcp", vip="198.18.0.100", port=80, port_end=80,
                        hash_fields="src", seed=1, slots=(0, 0, 0),
                        backends=(n.NatBackend("a", "198.18.1.1", 8080),))
    assert n.events_rules(base) == [n.events_rule_expr(base)]
    rules = n.events_rules(replace(base, report_after_packets=8))
    assert len(rules) == 3
    assert rules[0][-1] == {"mangle": {"key": {"ct": {"key": "event"}}, "value": 0}}
    at8 = {"match": {"op": "==", "left": {"ct": {"key": "packets", "dir": "original"}},
                     "right": 8}}
    assert at8 in rules[1] and at8 in rules[2]
    assert rules[1][-1]["mangle"]["value"] == ["mark", "destroy"]
    assert rules[2][-1]["mangle"]["value"] == {"|": [{"ct": {"key": "mark"}}, n.REPORT_MARK]}
    doc = n.build(n.NatRuleset(table="t", services=(replace(base, report_after_packets=8),)))
    events = [c["add"]["rule"] for c in doc["nftables"]
              if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == "events"]
    assert len(events) == 3


# -- IPv6 listeners: a second table, ``ip6 <table>``, of the same layout --------------------------

VIP6 = "2001:2:0:80::100"
BK6 = (NatBackend("b1", "2001:2:0:81::11", 8080), NatBackend("b2", "2001:2:0:81::12", 8080))


def svc6(name="web6", proto="tcp", port=80, hash_fields="src_port", slots=(0, 1, -1, 1, 0),
         **kw) -> NatService:
    return NatService(name, proto, VIP6, port, port, hash_fields, 0x1234, tuple(slots), BK6, **kw)


def by_family(doc, fam):
    return {"nftables": [c for c in doc["nftables"]
                         if next(iter(next(iter(c.values())).values())).get("family") == fam]}


def test_ipv6_listeners_get_an_ip6_table_and_leave_the_ip_table_as_it_was():
    v4 = svc()
    only4 = nft.build(NatRuleset(services=(v4,), exempt_tcp_ports=(9400,)))
    both = nft.build(NatRuleset(services=(v4, svc6()), exempt_tcp_ports=(9400,)))
    # the IPv4 table's commands are exactly those of the IPv4-only ruleset, first
    assert both["nftables"][:len(only4["nftables"])] == only4["nftables"]
    assert by_family(both, "ip") == only4
    six = by_family(both, "ip6")
    assert len(six["nftables"]) == len(both["nftables"]) - len(only4["nftables"])
    assert six["nftables"][:2] == [{"add": {"table": {"family": "ip6", "name": "halb"}}},
                                   {"flush": {"table": {"family": "ip6", "name": "halb"}}}]
    chains = {c["name"]: (c["type"], c["hook"], c["prio"]) for c in cmds(six, "add", "chain")}
    assert chains == {"raw": ("filter", "prerouting", -300), "rawout": ("filter", "output", -300),
                      "events": ("filter", "prerouting", -150),
                      "prerouting": ("nat", "prerouting", -100),
                      "output": ("nat", "output", -100), "forward": ("filter", "forward", 0)}
    # every object of the IPv6 listener lives in the ip6 table, none of the IPv4 one
    names6 = {o["name"] for kind in ("map", "counter") for o in cmds(six, "add", kind)}
    assert names6 == {"slots_web6", "ports_web6", "drop_web6", "be_web6_b1", "rbe_web6_b1",
                      "be_web6_b2", "rbe_web6_b2"}
    assert json.loads(json.dumps(both)) == both


def test_ipv6_dnat_hashes_the_ipv6_source_into_an_ipv6_address_map():
    doc = nft.build(NatRuleset(services=(svc6(),)))
    pre = [r["expr"] for r in cmds(doc, "add", "rule")
           if r["chain"] == "prerouting" and r["family"] == "ip6"]
    ct_mark = {"ct": {"key": "mark"}}
    match = [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "daddr"}},
                        "right": VIP6}},
             {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                        "right": 80}}]
    assert pre[0] == match + [
        {"mangle": {"key": ct_mark, "value": {"jhash": {
            "mod": 5, "seed": 0x1234, "expr": {"concat": [
                {"payload": {"protocol": "ip6", "field": "saddr"}},
                {"payload": {"protocol": "tcp", "field": "sport"}}]}}}}},
        {"dnat": {"family": "ip6",
                  "addr": {"map": {"key": ct_mark, "data": "@slots_web6"}},
                  "port": {"map": {"key": ct_mark, "data": "@ports_web6"}}}}]
    assert pre[1] == match + [{"counter": "drop_web6"}, {"drop": None}]
    maps = {m["name"]: (m["family"], m["type"], m["map"]) for m in cmds(doc, "add", "map")}
    assert maps == {"slots_web6": ("ip6", "mark", "ipv6_addr"),
                    "ports_web6": ("ip6", "mark", "inet_service")}
    el = {e["name"]: e["elem"] for e in cmds(doc, "add", "element")}
    assert el["slots_web6"] == [[0, "2001:2:0:81::11"], [1, "2001:2:0:81::12"],
                                [3, "2001:2:0:81::12"], [4, "2001:2:0:81::11"]]
    ev = [r["expr"] for r in cmds(doc, "add", "rule") if r["chain"] == "events"]
    assert ev == [match + [{"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                      "right": "new"}},
                           {"mangle": {"key": {"ct": {"key": "event"}},
                                       "value": ["assured", "destroy"]}}]]


def test_ipv6_counters_match_ip6_addresses_both_ways():
    doc = nft.build(NatRuleset(services=(svc6(),)))
    fwd = [r["expr"] for r in cmds(doc, "add", "rule") if r["chain"] == "forward"]
    assert len(fwd) == 4
    orig, reply = fwd[0], fwd[1]
    assert {"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "daddr"}},
                      "right": "2001:2:0:81::11"}} in orig
    assert {"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}},
                      "right": "2001:2:0:81::11"}} in reply
    for r in fwd:
        assert {"match": {"op": "==", "left": {"ct": {"key": "ip6 daddr", "dir": "original"}},
                          "right": VIP6}} in r
    assert not any("ip" == x.get("match", {}).get("left", {}).get("payload", {}).get("protocol")
                   for r in fwd for x in r)


def test_ip6_table_removed_when_the_last_ipv6_listener_goes():
    v4 = svc()
    plain = nft.build(NatRuleset(services=(v4,)))
    assert not by_family(plain, "ip6")["nftables"]  # incremental, no IPv6 before: untouched
    gone = nft.build(NatRuleset(services=(v4,)), previous=NatRuleset(services=(v4, svc6())))
    t6 = {"family": "ip6", "name": "halb"}
    assert by_family(gone, "ip6")["nftables"] == [{"add": {"table": t6}},
                                                  {"delete": {"table": t6}}]
    fresh = nft.build(NatRuleset(services=(v4,)), fresh=True)  # whatever an old run left
    assert by_family(fresh, "ip6")["nftables"] == [{"add": {"table": t6}},
                                                   {"delete": {"table": t6}}]
    # a listener that goes from a kept ip6 table: its objects deleted there
    both = NatRuleset(services=(svc6(), svc6("dns6", "udp", 53, "src")))
    less = nft.build(NatRuleset(services=(svc6(),)), previous=both)
    dels = {(o["family"], o["name"]) for kind in ("map", "counter")
            for o in cmds(less, "delete", kind)}
    assert ("ip6", "slots_dns6") in dels and ("ip6", "drop_dns6") in dels
    assert all(f == "ip6" for f, _ in dels)
    # a new ip6 table next to a previous IPv4-only ruleset: nothing to delete in it
    new6 = nft.build(NatRuleset(services=(v4, svc6())), previous=NatRuleset(services=(v4,)))
    assert not cmds(by_family(new6, "ip6"), "delete")


def test_ipv6_slot_update_writes_the_ip6_table():
    s = svc6()
    doc = nft.slot_update(s, s.slots, (0, 0, -1, 1, 0))
    assert doc == {"nftables": [
        {"delete": {"element": {"family": "ip6", "table": "halb", "name": "slots_web6",
                                "elem": [1]}}},
        {"add": {"element": {"family": "ip6", "table": "halb", "name": "slots_web6",
                             "elem": [[1, "2001:2:0:81::11"]]}}}]}


@pytest.mark.parametrize("vip,backends,text", [
    (VIP6, BK, "backend 'b1' address: '198.18.81.11' is not an IPv6 address (the VIP is IPv6; "
               "an IPv4 backend behind an IPv6 VIP would be NAT64"),
    (VIP, BK6, "backend 'b1' address: '2001:2:0:81::11' is not an IPv4 address"),
    ("2001:2::zz", BK6, "vip: '2001:2::zz' is not an IPv6 address"),
])
def test_family_mixed_listeners_are_refused(vip, backends, text):
    s = NatService("m", "tcp", vip, 80, 80, "src", 1, (0, 1), backends)
    with pytest.raises(ValueError, match=r"nat listener 'm'.*" + text.replace("(", r"\(")
                       .replace(")", r"\)")):
        nft.build(NatRuleset(services=(s,)))


def test_ipv6_hash_key_is_the_16_byte_address_then_the_padded_port():
    s = svc6()
    key = nft.hash_key(s, "2001:2:0:80::2", 41000)
    assert key == bytes.fromhex("20010002000000800000000000000002") + bytes([0xA0, 0x28, 0, 0])
    assert nft.hash_key(svc6(hash_fields="src"), "2001:2:0:80::2") == key[:16]
    with pytest.raises(ValueError):
        nft.hash_key(s, "198.18.80.2", 1)  # not the listener's family
    assert nft.slot_of(s, "2001:2:0:80::2", 41000) == \
        (nft.jhash(key, 0x1234) * 5) >> 32
