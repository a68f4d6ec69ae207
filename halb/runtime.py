"""Backends changed at run time (``halbctl backend add|del|maint|ready``) and how they outlive
a reload or a restart: HAProxy's ``server-state-file`` semantics.

The changes are kept as an overlay over the config file, saved in
``<state_dir>/<node>.runtime.json``: backends added (name -> address, weight, backup,
max_conns), backends deleted (name -> the config entry they had when deleted), backends in
maintenance. ``effective(cfg, overlay)`` is the config the node runs: the file's, with the
overlay applied where the file did not change the backend since:

- an added backend stays unless the file now has a backend of that name (the file wins);
- a deleted backend stays deleted while the file still has it exactly as it was when deleted;
  if the file changed it (or dropped it), the deletion is forgotten;
- maintenance stays while the backend exists.

Entries that no longer apply are pruned. Pure except ``load``/``save``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import BackendConfig, Config, PoolConfig, parse_endpoint

VERSION = 1
MAX_FILE = 16 << 20


@dataclass
class PoolOverlay:
    added: dict[str, BackendConfig] = field(default_factory=dict)
    deleted: dict[str, BackendConfig] = field(default_factory=dict)
    maint: set[str] = field(default_factory=set)

    def empty(self) -> bool:
        return not (self.added or self.deleted or self.maint)


Overlay = dict[str, PoolOverlay]


def path_for(state_dir: str, node: str) -> Path:
    return Path(state_dir) / f"{node}.runtime.json"


def effective(cfg: Config, ov: Overlay) -> Config:
    """``cfg`` with the overlay applied; prunes the overlay of what no longer applies."""
    pools = []
    for pc in cfg.pools:
        o = ov.get(pc.name)
        if o is None:
            pools.append(pc)
            continue
        file_b = {b.name: b for b in pc.backends}
        for n in [n for n in o.added if n in file_b]:
            del o.added[n]  # the file now defines it: the file wins
        for n, was in list(o.deleted.items()):
            if file_b.get(n) != was:
                del o.deleted[n]  # the file changed (or dropped) it since
        backends = [b for b in pc.backends if b.name not in o.deleted]
        backends += list(o.added.values())
        names = {b.name for b in backends}
        o.maint &= names
        pools.append(replace(pc, backends=tuple(backends)) if backends != list(pc.backends) else pc)
    for name in [n for n, o in ov.items() if o.empty() or name_missing(cfg, n)]:
        del ov[name]
    return replace(cfg, pools=tuple(pools))


def name_missing(cfg: Config, pool: str) -> bool:
    return all(pc.name != pool for pc in cfg.pools)


def add(ov: Overlay, pool: PoolConfig, b: BackendConfig) -> None:
    o = ov.setdefault(pool.name, PoolOverlay())
    o.deleted.pop(b.name, None)
    o.added[b.name] = b


def delete(ov: Overlay, pool: PoolConfig, file_pool: PoolConfig | None, name: str) -> None:
    o = ov.setdefault(pool.name, PoolOverlay())
    o.maint.discard(name)
    if name in o.added:
        del o.added[name]
        return
    if file_pool is not None:
        for b in file_pool.backends:
            if b.name == name:
                o.deleted[name] = b


def set_maint(ov: Overlay, pool: str, name: str, on: bool) -> None:
    o = ov.setdefault(pool, PoolOverlay())
    if on:
        o.maint.add(name)
    else:
        o.maint.discard(name)


# -- the file ---------------------------------------------------------------------------------


def _b(b: BackendConfig) -> dict:
    return {"address": str(b.address), "weight": b.weight, "backup": b.backup,
            "max_conns": b.max_conns}


def _from(name: str, d: dict) -> BackendConfig:
    if not isinstance(d, dict):
        raise ValueError(f"backend {name}: not an object")
    return BackendConfig(name=name, address=parse_endpoint(str(d["address"])),
                         weight=int(d.get("weight", 1)), backup=bool(d.get("backup", False)),
                         max_conns=int(d.get("max_conns", 0)))


def encode(ov: Overlay) -> bytes:
    return json.dumps({"version": VERSION, "pools": {
        p: {"added": {n: _b(b) for n, b in o.added.items()},
            "deleted": {n: _b(b) for n, b in o.deleted.items()},
            "maint": sorted(o.maint)} for p, o in ov.items() if not o.empty()}},
        indent=1, sort_keys=True).encode()


def decode(data: bytes) -> Overlay:
    try:
        doc = json.loads(data)
        if doc.get("version") != VERSION:
            raise ValueError(f"unknown version {doc.get('version')!r}")
        ov: Overlay = {}
        for p, d in doc.get("pools", {}).items():
            o = PoolOverlay()
            o.added = {n: _from(n, x) for n, x in d.get("added", {}).items()}
            o.deleted = {n: _from(n, x) for n, x in d.get("deleted", {}).items()}
            o.maint = {str(n) for n in d.get("maint", [])}
            ov[str(p)] = o
        return ov
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"not a runtime state file: {e}") from None


def load(path: Path) -> Overlay:
    try:
        if path.stat().st_size > MAX_FILE:
            raise ValueError(f"{path}: too large for a runtime state file")
        return decode(path.read_bytes())
    except FileNotFoundError:
        return {}


def save(path: Path, ov: Overlay) -> None:
    os.makedirs(path.parent, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(encode(ov))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
