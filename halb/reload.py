"""What a config reload changes: the difference between the running config and a new one, as
a plan the node applies in place (``Node.reload``). Pure: no I/O, no clock.

Reloadable in place, without a restart and without touching what did not change:

- pools: added, removed, changed (algorithm, hashing, retries, slow start, health, passive
  checks, stickiness, backends). A changed pool keeps its ``Pool`` object (the listeners hold
  it); its unchanged backends keep their ``Backend`` objects, so health state, counters, open
  connections and runtime admin changes (drain, weight) carry over. A backend whose address
  changed is a new backend.
- listeners: added, removed, changed. A changed listener with the same mode and bind is
  reconfigured in place (routes, timeouts, limits, headers, the pool it serves; TCP relay and
  PROXY protocol): its socket and its connections stay. One whose TLS certificates changed, or
  an added listener on the bind of a removed one, takes over the old listening socket (the
  kernel's accept queue is kept), and the old listener's connections drain.

Not reloadable (the reload is refused, nothing changes, the keys are named): ``[node]``,
``[control]``, ``[metrics]``, ``[[vrrp]]``, ``[sync]``, ``[nat]`` and NAT listeners (the kernel
NAT mode's rules follow the election), and any other top-level section. They need a restart
(on a backup first, then a ``halbctl failover``). Unchanged, those parts are not touched at all:
a master stays master and sends every advert.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .config import Config, ListenerConfig, PoolConfig

# top-level sections a reload may change; every other one must be unchanged
RELOADABLE = ("pools", "listeners")
IGNORED = ("source", "warnings")


@dataclass
class Plan:
    """What a reload does. ``refused``: (key, reason) pairs that stop it; ``changes``: one
    line per change, for the log and for ``halbctl reload``."""

    refused: list[tuple[str, str]] = field(default_factory=list)
    pools_added: list[PoolConfig] = field(default_factory=list)
    pools_removed: list[str] = field(default_factory=list)
    pools_changed: list[PoolConfig] = field(default_factory=list)
    listeners_added: list[ListenerConfig] = field(default_factory=list)
    listeners_removed: list[str] = field(default_factory=list)
    # (new config, how): "in place" or "new socket" (TLS changed: the old socket is handed over)
    listeners_changed: list[tuple[ListenerConfig, str]] = field(default_factory=list)
    # added listener name -> removed listener name whose socket it takes over (same bind)
    handover: dict[str, str] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused

    @property
    def empty(self) -> bool:
        return not (self.pools_added or self.pools_removed or self.pools_changed
                    or self.listeners_added or self.listeners_removed or self.listeners_changed)


def _diff_fields(a: Any, b: Any, prefix: str) -> list[str]:
    """Dotted names of the dataclass fields that differ (one level of nesting spelled out)."""
    out = []
    for f in fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if va != vb:
            out.append(f"{prefix}.{f.name}" if prefix else f.name)
    return out


def _backend_changes(old: PoolConfig, new: PoolConfig) -> list[str]:
    ob = {b.name: b for b in old.backends}
    nb = {b.name: b for b in new.backends}
    out = []
    for n in nb:
        if n not in ob:
            out.append(f"backend {new.name}/{n} added ({nb[n].address})")
        elif ob[n] != nb[n]:
            what = ", ".join(_diff_fields(ob[n], nb[n], ""))
            out.append(f"backend {new.name}/{n} changed ({what})")
    for n in ob:
        if n not in nb:
            out.append(f"backend {old.name}/{n} removed")
    return out


def plan(old: Config, new: Config) -> Plan:
    p = Plan()
    for f in fields(Config):
        if f.name in RELOADABLE or f.name in IGNORED:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a != b:
            keys = _diff_fields(a, b, f.name) if hasattr(a, "__dataclass_fields__") and \
                type(a) is type(b) else [f.name]
            for k in keys:
                p.refused.append((k, "cannot change on reload (restart the node: a backup "
                                     "first, then halbctl failover)"))
    # pools
    old_pools = {pc.name: pc for pc in old.pools}
    new_pools = {pc.name: pc for pc in new.pools}
    for name, pc in new_pools.items():
        o = old_pools.get(name)
        if o is None:
            p.pools_added.append(pc)
            p.changes.append(f"pool {name} added ({len(pc.backends)} backends)")
        elif o != pc:
            p.pools_changed.append(pc)
            other = [k for k in _diff_fields(o, pc, f"pool {name}") if not k.endswith(".backends")]
            p.changes.extend(f"{k} changed" for k in other)
            p.changes.extend(_backend_changes(o, pc))
    for name in old_pools:
        if name not in new_pools:
            p.pools_removed.append(name)
            p.changes.append(f"pool {name} removed")
    # listeners
    old_l = {lc.name: lc for lc in old.listeners}
    new_l = {lc.name: lc for lc in new.listeners}
    removed = [n for n in old_l if n not in new_l]
    for name, lc in new_l.items():
        o = old_l.get(name)
        if lc.mode == "nat" or (o is not None and o.mode == "nat"):
            if o != lc:
                p.refused.append((f"listeners[{name}]", "NAT listeners cannot change on "
                                  "reload (restart the node)"))
            continue
        if o is None:
            p.listeners_added.append(lc)
            p.changes.append(f"listener {name} added ({lc.mode} on {lc.bind})")
            for r in removed:
                ro = old_l[r]
                if ro.bind == lc.bind and ro.mode == lc.mode and r not in p.handover.values():
                    p.handover[name] = r
            continue
        if o == lc:
            continue
        what = ", ".join(_diff_fields(o, lc, ""))
        if o.mode != lc.mode or o.bind != lc.bind:
            # a new socket elsewhere: the old listener goes, the new one comes
            p.listeners_removed.append(name)
            p.listeners_added.append(lc)
            p.changes.append(f"listener {name} replaced ({what})")
        elif o.tls != lc.tls or (o.http2.enabled, o.http2.alpn, o.http2.h2c) != \
                (lc.http2.enabled, lc.http2.alpn, lc.http2.h2c):
            # (TLS, or whether HTTP/2 is offered and how: a new HttpListener and SSL context)
            p.listeners_changed.append((lc, "new socket"))
            p.changes.append(f"listener {name} changed ({what}; its socket handed over)")
        else:
            p.listeners_changed.append((lc, "in place"))
            p.changes.append(f"listener {name} changed ({what})")
    for name in removed:
        if old_l[name].mode == "nat":
            continue
        p.listeners_removed.append(name)
        taker = next((a for a, r in p.handover.items() if r == name), None)
        p.changes.append(f"listener {name} removed" +
                         (f" (its socket goes to {taker})" if taker else ""))
    return p
