"""The nftables side of the kernel NAT mode, as pure code: builders of libnftables JSON
documents (``{"nftables": [...]}`` dicts) for halb's own table, and the incremental map
updates. No I/O; ``halb.nat.nftapply`` applies the documents (one atomic transaction each).

Everything lives in one table, ``ip halb`` (``NatRuleset.table``), which halbd owns entirely:

    chain raw       filter, hook prerouting, priority raw (-300)   } notrack for the sync
    chain rawout    filter, hook output,     priority raw (-300)   } link's TCP port(s)
    chain events    filter, hook prerouting, priority -150 (after conntrack at -200, before
                    DNAT at -100): ``ct state new ct event set <events>`` per listener
    chain prerouting  nat, hook prerouting, priority dstnat (-100)  } the hashed DNAT and,
    chain output      nat, hook output,     priority -100           } behind it, the drop
    chain forward   filter, hook forward, priority filter (0): the per-backend counters

(The output nat chain serves a client on the LB host itself; its connections get no ct
events, since a local client does not survive its node's failure anyway.)

IPv6 listeners (an IPv6 VIP, IPv6 backends) live in a second table of the same name, ``ip6
halb``, with the same chains and objects (``ip6`` payloads, ``ipv6_addr`` maps, ``jhash ip6
saddr``), built in the same document. Two tables rather than one ``inet`` table: the IPv4
table's commands stay exactly those of an IPv4-only ruleset (same rules, same cost per
packet), and each family's packets walk only their own family's rules.

Per listener (service) ``S``:

    map slots_S   type mark : ipv4_addr      slot -> backend address
    map ports_S   type mark : inet_service   slot -> backend port (absent on a port range
                                             that keeps the client's port, see NatService)
    counter be_S_B / rbe_S_B                 packets and bytes to / from backend B of the
                                             listener's connections (forward hook: it sees
                                             the translated addresses; one counter per
                                             direction)
    counter drop_S                           first packets dropped because their slot is
                                             empty (no backend); never sent to the VIP itself

and the rules (the prerouting and output nat chains hold the same two)::

    ip daddr VIP tcp dport PORT[-END] ct mark set jhash ip saddr [. tcp sport] mod M seed S
        dnat to ct mark map @slots_S : ct mark map @ports_S
    ip daddr VIP tcp dport PORT[-END] counter name drop_S drop

What nft 1.0.6 accepts, found by trying (and why the rule is not the single
``dnat ip to jhash ... map @m`` over a ``mark : ipv4_addr . inet_service`` map):

- a named map of ``type mark`` refuses a jhash key: "datatype mismatch, map expects packet
  mark, mapping expression has type integer" (jhash yields a bare 32-bit integer and no
  ``type`` name selects that type). ``typeof jhash ip saddr mod M : ip daddr . tcp dport``
  loads from nft's text syntax, with the rule, but then 1.0.6's ``nft list ruleset``
  segfaults (printing the typeof of a hash); the JSON listing shows it as ``"type":
  "integer"``, which the JSON parser refuses ("unqualified type integer");
- the JSON parser of 1.0.6 takes a single datatype name for a map's data (``"map":
  STRING``): ``"ipv4_addr . inet_service"`` is refused ("Invalid map type") and a list
  silently makes a *set*. So no address.port map can be made through JSON in 1.0.6;
- what works in JSON, and lists and reloads cleanly as text: the slot goes into the
  connection's ``ct mark`` first, ``{"mangle": {"key": {"ct": {"key": "mark"}}, "value":
  {"jhash": {"mod": M, "seed": S, "expr": ...}}}}``, then ``{"dnat": {"family": "ip",
  "addr": {"map": {"key": {"ct": {"key": "mark"}}, "data": "@slots_S"}}, "port": {"map":
  {"key": {"ct": {"key": "mark"}}, "data": "@ports_S"}}}}`` looks the address and the port
  up in two ``type mark`` maps. Both maps change in the same transaction, so no client sees
  one without the other. The nat chain sees only a connection's first packet, so this costs
  nothing afterwards, and the ct mark of a listener's connection is its slot (conntrack
  events and ``conntrack -L`` show it). halb owns the ct mark of connections to its NAT
  listeners: another ruleset must not use it for them.

The kernel's hash is predictable: ``slot_of`` computes nft_jhash (``jhash()`` of the key
registers: the address, and with ``src_port`` the port zero-padded to 32 bits, then
``(h * M) >> 32``), checked against the kernel's choices in the tests.

When a client's slot is empty the map lookup fails, the DNAT rule ends there, and the next
rule drops the packet (counted in ``drop_S``): the client is never sent to the VIP itself.

Updates: ``build`` makes the whole table in one document (add table, flush table, re-add
chains, counters, maps (each flushed and refilled) and rules); applying it twice gives the
same state, and named counters keep their values. Objects of listeners that are gone are
deleted when the previous ruleset is passed (``previous=``); ``fresh=True`` deletes and
re-creates the table in the same transaction instead (exact state, counters start at 0).
``slot_update`` changes only the map elements whose value changed (a Maglev table changes
minimally on health/drain/weight changes), so the transaction stays small.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

FAMILY = "ip"  # the IPv4 listeners' table
FAMILY6 = "ip6"  # the IPv6 listeners' table: same name, same layout
FAMILIES = (FAMILY, FAMILY6)
PRIO_RAW = -300
PRIO_EVENTS = -150  # after conntrack (-200), before DNAT (-100)
PRIO_DSTNAT = -100
PRIO_FILTER = 0
MAX_NAME = 255  # NFT_SET_MAXNAMELEN / NFT_OBJ_MAXNAMELEN is 256 with the NUL

PROTOS = ("tcp", "udp")
HASH_FIELDS = ("src", "src_port")
# the ct event names nft knows (``ct event set``)
CT_EVENTS = frozenset({"new", "related", "destroy", "reply", "assured", "protoinfo", "helper",
                       "mark", "seqadj", "secmark", "label"})
# one event when a connection starts to count and one at its end: TCP once established
# (ASSURED, an [UPDATE]), UDP on its first packet ([NEW])
DEFAULT_CT_EVENTS = {"tcp": ("assured", "destroy"), "udp": ("new", "destroy")}

CHAIN_RAW, CHAIN_RAWOUT, CHAIN_EVENTS = "raw", "rawout", "events"
CHAIN_PREROUTING, CHAIN_OUTPUT, CHAIN_FORWARD = "prerouting", "output", "forward"


# ---------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class NatBackend:
    name: str
    address: str  # IPv4, or IPv6 for a listener with an IPv6 VIP (same family as the VIP)
    port: int  # 0 = the port the client asked for (no port translation)


@dataclass(frozen=True)
class NatService:
    """One NAT listener. ``slots`` is the consistent-hash table: ``slots[i]`` indexes
    ``backends`` (``-1`` = no backend: such clients are dropped); its length is the hash
    modulus. ``seed`` is the explicit jhash seed (without one nft picks a random seed, which
    would differ between nodes). ``hash_fields``: ``"src"`` hashes the client address,
    ``"src_port"`` the address and the source port.

    Ports: a backend port of 0 means "the port the client asked for". On a single-port
    listener that is ``port``; on a range (``port_end > port``) the destination port is left
    as it is, which needs all backends at port 0 (a range mixing port 0 and fixed ports is
    refused). ``ct_events`` defaults to ``DEFAULT_CT_EVENTS[proto]``."""

    name: str
    proto: str
    vip: str
    port: int
    port_end: int
    hash_fields: str
    seed: int
    slots: tuple[int, ...]
    backends: tuple[NatBackend, ...]
    ct_events: tuple[str, ...] | None = None
    # 0: report a connection once established (TCP) or started (UDP); N > 0: once the client
    # has sent N packets (IPVS's sync_threshold), so short connections report nothing at all
    # (see ``events_rules``). Needs conntrack accounting (net.netfilter.nf_conntrack_acct = 1).
    report_after_packets: int = 0

    @property
    def events(self) -> tuple[str, ...]:
        return tuple(self.ct_events) if self.ct_events is not None \
            else DEFAULT_CT_EVENTS[self.proto]

    @property
    def modulus(self) -> int:
        return len(self.slots)

    @property
    def family(self) -> str:
        """The nft family of the listener's table: ``ip`` or ``ip6``, by its VIP."""
        return FAMILY6 if ":" in self.vip else FAMILY


@dataclass(frozen=True)
class NatRuleset:
    table: str = "halb"
    services: tuple[NatService, ...] = ()
    exempt_tcp_ports: tuple[int, ...] = ()  # the sync link: notrack both ways


# ---------------------------------------------------------------------------------------------
# Names

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def obj_name(*parts: str) -> str:
    """An nft object name from parts joined by "_" (characters other than [A-Za-z0-9_]
    become "_", so the name needs no quoting in nft's text syntax)."""
    return "_".join(_UNSAFE.sub("_", p) for p in parts)


def slots_map(service: NatService | str) -> str:
    return obj_name("slots", _sname(service))


def ports_map(service: NatService | str) -> str:
    return obj_name("ports", _sname(service))


def backend_counter(service: NatService | str, backend: NatBackend | str) -> str:
    return obj_name("be", _sname(service), _bname(backend))


def reply_counter(service: NatService | str, backend: NatBackend | str) -> str:
    return obj_name("rbe", _sname(service), _bname(backend))


def drop_counter(service: NatService | str) -> str:
    return obj_name("drop", _sname(service))


def _sname(s: NatService | str) -> str:
    return s if isinstance(s, str) else s.name


def _bname(b: NatBackend | str) -> str:
    return b if isinstance(b, str) else b.name


# ---------------------------------------------------------------------------------------------
# Validation


def _ipv4(value: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except (ipaddress.AddressValueError, ValueError) as e:
        raise ValueError(f"{what}: {value!r} is not an IPv4 address") from e


def _addr(value: str, family: str, what: str) -> str:
    if family == FAMILY:
        return _ipv4(value, what)
    try:
        return str(ipaddress.IPv6Address(value))
    except (ipaddress.AddressValueError, ValueError) as e:
        raise ValueError(f"{what}: {value!r} is not an IPv6 address (the VIP is IPv6; an "
                         f"IPv4 backend behind an IPv6 VIP would be NAT64, which this mode "
                         f"does not do)") from e


def _port(value: int, what: str, *, zero: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or \
            not ((0 if zero else 1) <= value <= 65535):
        raise ValueError(f"{what}: bad port {value!r}")
    return value


def _translated(service: NatService) -> bool:
    """Whether the listener's DNAT sets a port (else the client's port stays)."""
    return service.port_end == service.port or any(b.port for b in service.backends)


def backend_port(service: NatService, backend: NatBackend) -> int | None:
    """The port DNAT sends ``backend``'s clients to; None = the port the client asked for."""
    if backend.port:
        return backend.port
    return service.port if service.port_end == service.port else None


def validate(service: NatService) -> None:
    """Raise ValueError when ``service`` cannot be expressed (messages name the field)."""
    w = f"nat listener {service.name!r}"
    if not service.name or len(service.name) > 200:
        raise ValueError(f"{w}: bad name")
    if service.proto not in PROTOS:
        raise ValueError(f"{w}: proto must be one of {PROTOS}, not {service.proto!r}")
    if not isinstance(service.vip, str):
        raise ValueError(f"{w} vip: {service.vip!r} is not an address")
    _addr(service.vip, service.family, f"{w} vip")
    _port(service.port, f"{w} port")
    _port(service.port_end, f"{w} port_end")
    if service.port_end < service.port:
        raise ValueError(f"{w}: port_end {service.port_end} < port {service.port}")
    if service.hash_fields not in HASH_FIELDS:
        raise ValueError(f"{w}: hash_fields must be one of {HASH_FIELDS}")
    if not isinstance(service.seed, int) or not 0 <= service.seed <= 0xFFFFFFFF:
        raise ValueError(f"{w}: seed must be a 32-bit unsigned integer")
    m = len(service.slots)
    if not 1 <= m <= 0xFFFFFFFF:
        raise ValueError(f"{w}: the slot table is empty")
    n = len(service.backends)
    for i, s in enumerate(service.slots):
        if not isinstance(s, int) or not -1 <= s < n:
            raise ValueError(f"{w}: slot {i} = {s!r} is not a backend index (0..{n - 1}) or -1")
    names = set()
    for b in service.backends:
        if not b.name:
            raise ValueError(f"{w}: a backend without a name")
        if b.name in names:
            raise ValueError(f"{w}: backend {b.name!r} twice")
        names.add(b.name)
        _addr(b.address, service.family, f"{w} backend {b.name!r} address")
        _port(b.port, f"{w} backend {b.name!r} port", zero=True)
    if service.port_end != service.port:
        fixed = [b.name for b in service.backends if b.port]
        if fixed and len(fixed) != n:
            raise ValueError(f"{w}: a port range needs every backend at port 0 (keep the "
                             f"client's port) or every backend at a fixed port")
    ev = service.events
    if not ev or any(e not in CT_EVENTS for e in ev):
        raise ValueError(f"{w}: ct_events must be a non-empty subset of {sorted(CT_EVENTS)}")


def _validate_ruleset(rs: NatRuleset) -> None:
    if not rs.table or _UNSAFE.search(rs.table) or len(rs.table) > MAX_NAME:
        raise ValueError(f"bad nft table name {rs.table!r}")
    seen: dict[str, str] = {}
    ranges: list[tuple[str, str, int, int, str]] = []
    for s in rs.services:
        validate(s)
        for nm in _object_names(s):
            if len(nm) > MAX_NAME:
                raise ValueError(f"nft object name too long: {nm[:40]}...")
            if nm in seen:
                raise ValueError(f"nat listeners {seen[nm]!r} and {s.name!r} give the same nft "
                                 f"object name {nm!r}")
            seen[nm] = s.name
        for (proto, vip, lo, hi, other) in ranges:
            if proto == s.proto and vip == s.vip and lo <= s.port_end and s.port <= hi:
                raise ValueError(f"nat listeners {other!r} and {s.name!r} overlap on "
                                 f"{s.proto} {s.vip}")
        ranges.append((s.proto, s.vip, s.port, s.port_end, s.name))
    for p in rs.exempt_tcp_ports:
        _port(p, "exempt_tcp_ports")


def _object_names(s: NatService) -> list[str]:
    names = [slots_map(s), ports_map(s), drop_counter(s)]
    for b in s.backends:
        names += [backend_counter(s, b), reply_counter(s, b)]
    return names


# ---------------------------------------------------------------------------------------------
# JSON pieces


def _payload(proto: str, field: str) -> dict:
    return {"payload": {"protocol": proto, "field": field}}


def _ct(key: str, direction: str | None = None) -> dict:
    d = {"key": key}
    if direction:
        d["dir"] = direction
    return {"ct": d}


def _match(left, right, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _ports_value(lo: int, hi: int):
    return lo if lo == hi else {"range": [lo, hi]}


def _listener_match(s: NatService) -> list[dict]:
    return [_match(_payload(s.family, "daddr"), s.vip),
            _match(_payload(s.proto, "dport"), _ports_value(s.port, s.port_end))]


def hash_expr(s: NatService) -> dict:
    """``jhash ip[6] saddr [. <proto> sport] mod M seed S`` as JSON."""
    key = _payload(s.family, "saddr")
    if s.hash_fields == "src_port":
        key = {"concat": [key, _payload(s.proto, "sport")]}
    return {"jhash": {"mod": len(s.slots), "seed": s.seed, "expr": key}}


def dnat_rule_expr(s: NatService) -> list[dict]:
    nat: dict = {"family": s.family,
                 "addr": {"map": {"key": _ct("mark"), "data": "@" + slots_map(s)}}}
    if _translated(s):
        nat["port"] = {"map": {"key": _ct("mark"), "data": "@" + ports_map(s)}}
    return _listener_match(s) + [{"mangle": {"key": _ct("mark"), "value": hash_expr(s)}},
                                 {"dnat": nat}]


def drop_rule_expr(s: NatService) -> list[dict]:
    return _listener_match(s) + [{"counter": drop_counter(s)}, {"drop": None}]


def events_rule_expr(s: NatService) -> list[dict]:
    ev = list(s.events)
    return _listener_match(s) + [_match(_ct("state"), "new", "in"),
                                 {"mangle": {"key": _ct("event"),
                                             "value": ev[0] if len(ev) == 1 else ev}}]


REPORT_MARK = 0x80000000  # the ct mark bit that reports a connection (report_after_packets)


def events_rules(s: NatService) -> list[list[dict]]:
    """The events chain's rules of one listener. With ``report_after_packets`` = N > 0 a new
    connection reports nothing (``ct event set 0``); at the client's N-th packet its event
    mask becomes {mark, destroy} and the REPORT_MARK bit is set in its ct mark, which the
    kernel reports as one [UPDATE] (the slot in the mark's low bits was only needed for the
    first packet's DNAT), and its end as one [DESTROY]. A connection shorter than N packets
    never costs an event."""
    n = s.report_after_packets
    if n <= 0:
        return [events_rule_expr(s)]
    at_n = _match({"ct": {"key": "packets", "dir": "original"}}, n)
    return [
        _listener_match(s) + [_match(_ct("state"), "new", "in"),
                              {"mangle": {"key": _ct("event"), "value": 0}}],
        _listener_match(s) + [at_n, {"mangle": {"key": _ct("event"),
                                                "value": ["mark", "destroy"]}}],
        _listener_match(s) + [at_n, {"mangle": {"key": _ct("mark"), "value": {
            "|": [_ct("mark"), REPORT_MARK]}}}],
    ]


def _counter_rules(s: NatService) -> list[list[dict]]:
    """Per backend: packets of the listener's connections to it (original direction, after
    DNAT) and from it (reply direction)."""
    out = []
    # the ct original matches after the transport match: nft's text parser needs that
    # protocol context for ``ct original proto-dst`` (the listing must load again)
    orig = [_match(_ct(f"{s.family} daddr", "original"), s.vip),
            _match(_ct("proto-dst", "original"), _ports_value(s.port, s.port_end))]
    l4 = _match({"meta": {"key": "l4proto"}}, s.proto)
    for b in s.backends:
        bp = backend_port(s, b)
        pv = _ports_value(s.port, s.port_end) if bp is None else bp
        out.append([l4, _match(_ct("direction"), "original"),
                    _match(_payload(s.family, "daddr"), b.address),
                    _match(_payload("th", "dport"), pv)] + orig +
                   [{"counter": backend_counter(s, b)}])
        out.append([l4, _match(_ct("direction"), "reply"),
                    _match(_payload(s.family, "saddr"), b.address),
                    _match(_payload("th", "sport"), pv)] + orig +
                   [{"counter": reply_counter(s, b)}])
    return out


def slot_values(s: NatService, slots: Sequence[int] | None = None,
                backends: Sequence[NatBackend] | None = None) -> tuple[list, list]:
    """The elements of the address map and of the port map (``[[slot, value], ...]``) for
    ``slots`` (default ``s.slots``) over ``backends`` (default ``s.backends``); the port
    list is empty when the listener does not translate ports."""
    slots = s.slots if slots is None else slots
    backends = s.backends if backends is None else backends
    addrs, ports = [], []
    tr = _translated(s)
    for k, i in enumerate(slots):
        if i < 0:
            continue
        b = backends[i]
        addrs.append([k, b.address])
        if tr:
            ports.append([k, backend_port(s, b)])
    return addrs, ports


# ---------------------------------------------------------------------------------------------
# Documents


def _tbl(table: str, family: str = FAMILY) -> dict:
    return {"family": family, "name": table}


def _obj(table: str, name: str, family: str = FAMILY, **kw) -> dict:
    d = {"family": family, "table": table, "name": name}
    d.update(kw)
    return d


def _rule(table: str, chain: str, expr: list[dict], comment: str | None = None,
          family: str = FAMILY) -> dict:
    r = {"family": family, "table": table, "chain": chain, "expr": expr}
    if comment:
        r["comment"] = comment
    return {"add": {"rule": r}}


def _services(rs: NatRuleset, family: str) -> list[NatService]:
    return [s for s in rs.services if s.family == family]


def _chains(rs: NatRuleset, family: str = FAMILY) -> dict[str, dict]:
    """The chains the ``family`` table of ``rs`` needs: name -> the chain's hook properties."""
    ch: dict[str, dict] = {}
    if rs.exempt_tcp_ports:
        ch[CHAIN_RAW] = {"type": "filter", "hook": "prerouting", "prio": PRIO_RAW}
        ch[CHAIN_RAWOUT] = {"type": "filter", "hook": "output", "prio": PRIO_RAW}
    if _services(rs, family):
        ch[CHAIN_EVENTS] = {"type": "filter", "hook": "prerouting", "prio": PRIO_EVENTS}
        ch[CHAIN_PREROUTING] = {"type": "nat", "hook": "prerouting", "prio": PRIO_DSTNAT}
        ch[CHAIN_OUTPUT] = {"type": "nat", "hook": "output", "prio": PRIO_DSTNAT}
        ch[CHAIN_FORWARD] = {"type": "filter", "hook": "forward", "prio": PRIO_FILTER}
    return ch


def _maps(s: NatService) -> list[tuple[str, str]]:
    m = [(slots_map(s), "ipv6_addr" if s.family == FAMILY6 else "ipv4_addr")]
    if _translated(s):
        m.append((ports_map(s), "inet_service"))
    return m


def _counters(s: NatService) -> list[str]:
    out = [drop_counter(s)]
    for b in s.backends:
        out += [backend_counter(s, b), reply_counter(s, b)]
    return out


def build(rs: NatRuleset, *, previous: NatRuleset | None = None, fresh: bool = False) -> dict:
    """The whole table as one document (one transaction): add table, flush table (its
    rules), then every chain, counter, map (flushed and refilled) and rule. Applying it
    twice gives the same state; named counters keep their values. ``previous`` (the ruleset
    applied last) lets it delete the chains, maps and counters that are no longer used;
    ``fresh`` deletes and re-creates the whole table in the same transaction instead (exact
    state whatever was there, counters from 0).

    IPv6 listeners get the same layout in a second table of the same name, ``ip6 <table>``,
    in the same document (one transaction for both). Without IPv6 listeners the ``ip6``
    table is removed (when ``fresh``, or when ``previous`` had some), and the ``ip`` table's
    commands are exactly those of an IPv4-only ruleset."""
    _validate_ruleset(rs)
    t = rs.table
    if previous is not None and not fresh and previous.table != t:
        raise ValueError("previous ruleset is of another table")
    cmds = _build_family(rs, FAMILY, previous, fresh)
    if _services(rs, FAMILY6):
        cmds += _build_family(rs, FAMILY6, previous, fresh)
    elif fresh or (previous is not None and _services(previous, FAMILY6)):
        cmds += [{"add": {"table": _tbl(t, FAMILY6)}}, {"delete": {"table": _tbl(t, FAMILY6)}}]
    return {"nftables": cmds}


def _build_family(rs: NatRuleset, fam: str, previous: NatRuleset | None,
                  fresh: bool) -> list[dict]:
    t = rs.table
    services = _services(rs, fam)
    cmds: list[dict] = [{"add": {"table": _tbl(t, fam)}}]
    if fresh:
        cmds += [{"delete": {"table": _tbl(t, fam)}}, {"add": {"table": _tbl(t, fam)}}]
    else:
        cmds.append({"flush": {"table": _tbl(t, fam)}})
    chains = _chains(rs, fam)
    maps = [m for s in services for m in _maps(s)]
    counters = [c for s in services for c in _counters(s)]
    if previous is not None and not fresh and \
            (fam == FAMILY or _services(previous, FAMILY6)):  # else: a new ip6 table
        have_maps = {nm for nm, _ in maps}
        have_counters = set(counters)
        for s in _services(previous, fam):
            for nm, _ in _maps(s):
                if nm not in have_maps:
                    cmds.append({"delete": {"map": _obj(t, nm, fam)}})
            for nm in _counters(s):
                if nm not in have_counters:
                    cmds.append({"delete": {"counter": _obj(t, nm, fam)}})
        for nm in _chains(previous, fam):
            if nm not in chains:
                cmds.append({"delete": {"chain": _obj(t, nm, fam)}})
    for nm, hook in chains.items():
        cmds.append({"add": {"chain": _obj(t, nm, fam, policy="accept", **hook)}})
    for nm in counters:
        cmds.append({"add": {"counter": _obj(t, nm, fam)}})
    for s in services:
        addrs, ports = slot_values(s)
        for (nm, dtype), elems in zip(_maps(s), (addrs, ports)):
            cmds.append({"add": {"map": _obj(t, nm, fam, type="mark", map=dtype)}})
            if not fresh:
                cmds.append({"flush": {"map": _obj(t, nm, fam)}})
            if elems:
                cmds.append({"add": {"element": _obj(t, nm, fam, elem=elems)}})
    for p in rs.exempt_tcp_ports:
        for chain in (CHAIN_RAW, CHAIN_RAWOUT):
            for field in ("dport", "sport"):
                cmds.append(_rule(t, chain, [_match(_payload("tcp", field), p),
                                             {"notrack": None}], family=fam))
    for s in services:
        cmds += [_rule(t, CHAIN_EVENTS, r, family=fam) for r in events_rules(s)]
    for chain in (CHAIN_PREROUTING, CHAIN_OUTPUT):
        for s in services:
            cmds.append(_rule(t, chain, dnat_rule_expr(s), family=fam))
            cmds.append(_rule(t, chain, drop_rule_expr(s), family=fam))
    for s in services:
        for expr in _counter_rules(s):
            cmds.append(_rule(t, CHAIN_FORWARD, expr, family=fam))
    return cmds


def delete(table: str = "halb") -> dict:
    """Remove the table, both families (at stop). Adding each first makes this succeed when
    it is absent."""
    return {"nftables": [c for fam in FAMILIES for c in (
        {"add": {"table": _tbl(table, fam)}}, {"delete": {"table": _tbl(table, fam)}})]}


def slot_update(service: NatService, old_slots: Sequence[int], new_slots: Sequence[int], *,
                table: str = "halb",
                old_backends: Sequence[NatBackend] | None = None) -> dict:
    """Only the map elements whose value changed, in one document (deletes of the changed
    keys, then adds of their new values); ``{"nftables": []}`` when nothing changed.

    Both tables index ``service.backends`` unless ``old_backends`` gives the list
    ``old_slots`` indexes. The table size is the hash modulus built into the rule, so it
    cannot change here (a new size needs ``build``); neither can the listener's port mode."""
    validate(service)
    if len(old_slots) != len(new_slots) or len(new_slots) != len(service.slots):
        raise ValueError(f"nat listener {service.name!r}: slot tables of sizes "
                         f"{len(old_slots)} and {len(new_slots)} for a modulus of "
                         f"{len(service.slots)}; a new size needs a full build")
    old_b = tuple(service.backends if old_backends is None else old_backends)
    if old_backends is not None:
        probe = NatService(service.name, service.proto, service.vip, service.port,
                           service.port_end, service.hash_fields, service.seed,
                           tuple(old_slots), old_b, service.ct_events)
        validate(probe)
        if _translated(probe) != _translated(service):
            raise ValueError(f"nat listener {service.name!r}: the port translation changes; "
                             f"that needs a full build")
    else:
        nb = len(old_b)
        for i, s in enumerate(old_slots):
            if not isinstance(s, int) or not -1 <= s < nb:
                raise ValueError(f"old slot {i} = {s!r} is not a backend index or -1")
    for i, s in enumerate(new_slots):
        if not isinstance(s, int) or not -1 <= s < len(service.backends):
            raise ValueError(f"new slot {i} = {s!r} is not a backend index or -1")
    tr = _translated(service)
    dels: dict[str, list] = {}
    adds: dict[str, list] = {}
    am, pm = slots_map(service), ports_map(service)
    for k, (o, n) in enumerate(zip(old_slots, new_slots)):
        ob = old_b[o] if o >= 0 else None
        nb_ = service.backends[n] if n >= 0 else None
        oa = ob.address if ob else None
        na = nb_.address if nb_ else None
        if oa != na:
            if oa is not None:
                dels.setdefault(am, []).append(k)
            if na is not None:
                adds.setdefault(am, []).append([k, na])
        if tr:
            op = backend_port(service, ob) if ob else None
            np_ = backend_port(service, nb_) if nb_ else None
            if op != np_:
                if op is not None:
                    dels.setdefault(pm, []).append(k)
                if np_ is not None:
                    adds.setdefault(pm, []).append([k, np_])
    fam = service.family
    cmds = [{"delete": {"element": _obj(table, nm, fam, elem=keys)}}
            for nm, keys in dels.items()]
    cmds += [{"add": {"element": _obj(table, nm, fam, elem=el)}} for nm, el in adds.items()]
    return {"nftables": cmds}


# ---------------------------------------------------------------------------------------------
# The kernel's hash, to predict a client's slot (nft_jhash: reciprocal_scale(jhash(key, len,
# seed), mod) over the registers the key was loaded into)

_M32 = 0xFFFFFFFF


def _rol(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


def jhash(data: bytes, seed: int) -> int:
    """The Linux kernel's ``jhash()`` (Bob Jenkins' lookup3, ``include/linux/jhash.h``)."""
    n = len(data)
    a = b = c = (0xDEADBEEF + n + seed) & _M32
    k = 0
    while n > 12:
        a = (a + int.from_bytes(data[k:k + 4], "little")) & _M32
        b = (b + int.from_bytes(data[k + 4:k + 8], "little")) & _M32
        c = (c + int.from_bytes(data[k + 8:k + 12], "little")) & _M32
        # mix
        a = (a - c) & _M32; a ^= _rol(c, 4); c = (c + b) & _M32  # noqa: E702
        b = (b - a) & _M32; b ^= _rol(a, 6); a = (a + c) & _M32  # noqa: E702
        c = (c - b) & _M32; c ^= _rol(b, 8); b = (b + a) & _M32  # noqa: E702
        a = (a - c) & _M32; a ^= _rol(c, 16); c = (c + b) & _M32  # noqa: E702
        b = (b - a) & _M32; b ^= _rol(a, 19); a = (a + c) & _M32  # noqa: E702
        c = (c - b) & _M32; c ^= _rol(b, 4); b = (b + a) & _M32  # noqa: E702
        n -= 12
        k += 12
    if n == 0:
        return c
    tail = data[k:k + n] + bytes(12 - n)  # the last 1..12 bytes, little-endian words
    a = (a + int.from_bytes(tail[0:4], "little")) & _M32
    b = (b + int.from_bytes(tail[4:8], "little")) & _M32
    c = (c + int.from_bytes(tail[8:12], "little")) & _M32
    # final
    c ^= b; c = (c - _rol(b, 14)) & _M32  # noqa: E702
    a ^= c; a = (a - _rol(c, 11)) & _M32  # noqa: E702
    b ^= a; b = (b - _rol(a, 25)) & _M32  # noqa: E702
    c ^= b; c = (c - _rol(b, 16)) & _M32  # noqa: E702
    a ^= c; a = (a - _rol(c, 4)) & _M32  # noqa: E702
    b ^= a; b = (b - _rol(a, 14)) & _M32  # noqa: E702
    c ^= b; c = (c - _rol(b, 24)) & _M32  # noqa: E702
    return c


def hash_key(service: NatService, client_ip: str, client_port: int = 0) -> bytes:
    """The bytes the rule's jhash reads: the client address, and with ``src_port`` its
    port in the next 32-bit register (network order, zero-padded)."""
    key = ipaddress.ip_address(client_ip).packed
    if len(key) != (16 if service.family == FAMILY6 else 4):
        raise ValueError(f"client {client_ip!r} is not of the listener's family")
    if service.hash_fields == "src_port":
        key += client_port.to_bytes(2, "big") + b"\0\0"
    return key


def slot_of(service: NatService, client_ip: str, client_port: int = 0) -> int:
    """The slot the kernel picks for a new connection from ``client_ip:client_port``."""
    h = jhash(hash_key(service, client_ip, client_port), service.seed)
    return (h * len(service.slots)) >> 32


def backend_of(service: NatService, client_ip: str, client_port: int = 0) -> NatBackend | None:
    """The backend the kernel DNATs that connection to (None: the slot is empty)."""
    i = service.slots[slot_of(service, client_ip, client_port)]
    return service.backends[i] if i >= 0 else None


def maglev_slots(backends: Iterable[tuple[str, int]], size: int) -> tuple[int, ...]:
    """The Maglev table of ``(name, weight)`` backends as indexes into ``backends`` (the
    project's ``halb.balance.maglev_table``, run over the names sorted as ``MaglevHash``
    does, so every node builds the same table); all -1 when no backend has a weight."""
    from ..balance import maglev_table

    bl = list(backends)
    order = sorted(range(len(bl)), key=lambda i: bl[i][0])
    if not any(bl[i][1] > 0 for i in order):
        return (-1,) * size
    idx = maglev_table([bl[i][0] for i in order], [bl[i][1] for i in order], size)
    return tuple(order[j] for j in idx)
