"""Tables that outlive a restart: the sticky and flow tables saved to ``state_dir`` and loaded
at start, so that even a node without peers keeps its clients on their backends across a
restart (HAProxy loses its stick tables on a restart unless a peer holds them).

The file (``<state_dir>/<node>.tables.json``) holds each table's live entries as the table
stores them (absolute wall-clock expiry: an entry that expired while the node was down is not
loaded). It is written whole to a temporary file, fsync'd and renamed over the old one, so a
crash mid-write leaves the previous file. Loading goes through ``Table.apply`` with the usual
conflict rule (the newer version wins): entries a peer sends afterwards replace older ones from
the file, and entries the file has that no peer has are kept.

``encode``/``decode`` are pure; ``save``/``load`` do the file I/O (``save`` is meant for a
worker thread: ``snapshot`` first, on the event loop, is a copy of tuples and cheap).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .tables import Entry, Op, Tables

VERSION = 1
TABLES = ("sticky", "flow")  # the nat table follows the kernel's conntrack, which outlives halbd
MAX_FILE = 512 << 20  # refuse to read more than this (a table is bounded; a file this big is not ours)


def path_for(state_dir: str, node: str) -> Path:
    return Path(state_dir) / f"{node}.tables.json"


def snapshot(tables: Tables) -> dict[str, list[tuple]]:
    """The live entries of the saved tables, as plain tuples (cheap: no encoding yet)."""
    out = {}
    for name in TABLES:
        _, entries = tables.by_name(name).snapshot()
        out[name] = [tuple(e) for e in entries]
    return out


def encode(node: str, saved_at: float, snap: dict[str, list[tuple]]) -> bytes:
    return json.dumps({"version": VERSION, "node": node, "saved": saved_at, "tables": snap},
                      separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, list[Entry]]:
    """The file's entries per table; ValueError naming what is wrong with it."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a tables file: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ValueError(f"unknown tables file version {doc.get('version') if isinstance(doc, dict) else None!r}")
    out: dict[str, list[Entry]] = {}
    tables = doc.get("tables")
    if not isinstance(tables, dict):
        raise ValueError("no tables in the file")
    n = len(Entry._fields)
    for name in TABLES:
        rows = tables.get(name, [])
        if not isinstance(rows, list):
            raise ValueError(f"table {name}: not a list")
        entries = []
        for row in rows:
            if not isinstance(row, list) or len(row) != n:
                raise ValueError(f"table {name}: malformed entry {str(row)[:80]}")
            key, backend, pool, created, updated, expires, origin, client, listener, proto = row
            if not all(isinstance(x, str) for x in (key, backend, pool, origin, client, listener,
                                                    proto)) or \
                    not all(isinstance(x, (int, float)) for x in (created, updated, expires)):
                raise ValueError(f"table {name}: malformed entry {str(row)[:80]}")
            entries.append(Entry(key, backend, pool, float(created), float(updated),
                                 float(expires), origin, client, listener, proto))
        out[name] = entries
    return out


def apply(tables: Tables, loaded: dict[str, list[Entry]]) -> dict[str, int]:
    """Feeds the loaded entries into the tables (not logged: they are not news for peers);
    returns how many each table took (expired ones and ones a newer version beats are not)."""
    took = {}
    for name, entries in loaded.items():
        t = tables.by_name(name)
        took[name] = sum(1 for e in entries if t.apply(Op.CREATE, e, log=False))
    return took


def save(path: Path, data: bytes) -> None:
    """Writes ``data`` atomically: a temporary file beside ``path``, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load(path: Path) -> dict[str, list[Entry]] | None:
    """The file's entries, None if there is no file; ValueError if it is not readable as one."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size > MAX_FILE:
        raise ValueError(f"{path}: {size} bytes, more than a tables file can hold")
    return decode(path.read_bytes())


def counts(loaded: dict[str, Iterable]) -> dict[str, int]:
    return {k: len(list(v)) for k, v in loaded.items()}
