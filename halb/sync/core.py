"""The pure core of state sync: what a sender ships to one follower, how a follower applies it.

No sockets, no clock reads: the gRPC edge (``halb.sync.service``) feeds messages in and sends
what comes out. The protocol itself is described in ``proto/halb/v1/sync.proto``.

``TableSender``   one table, one follower stream: snapshot or resume, batches, acks, lag.
``TableReceiver`` one table, one sender: applies snapshots and changes, keeps the cursor that
                  the next hello carries so a broken stream resumes where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..tables import Entry, Op, Table
from ..v1 import sync_pb2 as pb

Kind = pb.SyncBatch.Kind
MAX_BATCH_BYTES = 1 << 20  # a batch is cut at ~1 MiB, well under the 4 MiB message limit
MAX_MESSAGE_BYTES = 4 << 20
SCAN_FACTOR = 8  # changes of other origins scanned per batch, as a multiple of batch_size
TABLE_NAMES = ("sticky", "flow", "nat")
_OPMAP = {int(o): o for o in Op}


class ProtocolError(Exception):
    """A peer sent something the protocol does not allow (the stream is dropped)."""


def encode(ops: list[int], entries: list[Entry]) -> pb.SyncEntries:
    """Entries (with their ops) as the columns of one ``SyncEntries`` message."""
    strings = [""]
    index = {"": 0}

    def names(values):
        out = []
        for v in values:
            i = index.get(v)
            if i is None:
                i = index[v] = len(strings)
                strings.append(v)
            out.append(i)
        return out
    return pb.SyncEntries(
        ops=ops, keys=[e.key for e in entries], backends=names([e.backend for e in entries]),
        pools=names([e.pool for e in entries]), created=[e.created for e in entries],
        updated=[e.updated for e in entries], expires=[e.expires for e in entries],
        origins=names([e.origin for e in entries]), clients=[e.client for e in entries],
        listeners=names([e.listener for e in entries]), protos=names([e.proto for e in entries]),
        strings=strings)


def columns(m: pb.SyncEntries) -> list:
    """The columns of a ``SyncEntries`` in Entry field order, names resolved, plus the ops
    first; ProtocolError when the columns disagree or an index is out of the string table."""
    n = len(m.keys)
    cols = (m.ops, m.backends, m.pools, m.created, m.updated, m.expires, m.origins, m.clients,
            m.listeners, m.protos)
    if any(len(c) != n for c in cols):
        raise ProtocolError(f"entry columns of different lengths ({n} keys)")
    strings = list(m.strings)
    try:
        names = [[strings[i] for i in col]
                 for col in (m.backends, m.pools, m.origins, m.listeners, m.protos)]
    except IndexError:
        raise ProtocolError(f"string index out of the table ({len(strings)} strings)") from None
    backends, pools, origins, listeners, protos = names
    return [list(m.ops), list(m.keys), backends, pools, list(m.created), list(m.updated),
            list(m.expires), origins, list(m.clients), listeners, protos]


def decode(m: pb.SyncEntries) -> list[tuple[int, Entry]]:
    """(op, Entry) pairs of a ``SyncEntries``, unvalidated (tests and one-shot readers)."""
    ops, *fields = columns(m)
    return [(op, Entry(*f)) for op, f in zip(ops, zip(*fields))]


def _size(e: Entry) -> int:
    return 40 + len(e.key) + len(e.client)  # names are interned in the string table
@dataclass
class OutState:
    """What one follower acknowledged of one of our tables (kept across its streams)."""
    epoch: int = 0
    seq: int = 0

    def lag(self, table: Table) -> int:
        """Our log records it has not acknowledged yet."""
        return table.seq - self.seq if self.epoch == table.epoch else table.seq

    def lag_seconds(self, table: Table, now: float) -> float:
        if self.lag(table) <= 0:
            return 0.0
        start = self.seq if self.epoch == table.epoch else 0
        ch = table.changes_since(start, limit=1)
        if not ch:  # log no longer reaches back that far: at least as old as the oldest record
            ch = table.changes_since(table.first_seq - 1, limit=1)
        if not ch:
            return 0.0
        return max(0.0, now - ch[0].entry.updated)


class TableSender:
    """Builds the batches one follower gets of one table.

    ``start(epoch, seq)`` takes the follower's cursor from its hello and decides between
    resuming from the log and a snapshot; ``next_batch(now)`` returns the next ``SyncBatch``
    (without its batch id) or None when the follower has everything; ``ack(epoch, seq)``
    records its acknowledgement.
    """

    def __init__(self, table: Table, node: str, *, batch_size: int, max_backlog: int,
                 out: OutState | None = None, max_bytes: int = MAX_BATCH_BYTES):
        self.table = table
        self.node = node
        self.batch_size = max(1, batch_size)
        self.max_backlog = max_backlog
        self.max_bytes = max_bytes
        self.out = out if out is not None else OutState()
        self.mode = "changes"
        self.cursor = 0  # highest log seq covered by what was sent
        self._snap: list[Entry] = []
        self._snap_live = 0
        self._snap_i = 0
        self._snap_seq = 0
        self._snap_begun = False
        self.snapshots = 0
        self.resumed = False

    def start(self, epoch: int, seq: int) -> str:
        t = self.table
        if (epoch == t.epoch and seq <= t.seq and t.seq - seq <= self.max_backlog
                and t.changes_since(seq, limit=1) is not None):
            self.mode = "changes"
            self.cursor = seq
            self.resumed = True
            self.out.epoch, self.out.seq = epoch, max(seq, self.out.seq if self.out.epoch == epoch else 0)
            return "resume"
        self._begin_snapshot()
        return "snapshot"

    def _begin_snapshot(self) -> None:
        self.mode = "snapshot"
        self._snap_seq = self.table.seq
        self._snap = list(self.table.entries())  # live entries; read field by field as sent
        self._snap_live = len(self._snap)
        self._snap += self.table.tombstones()  # then what was deleted (op DELETE)
        self._snap_i = 0
        self._snap_begun = False
        self.snapshots += 1

    def _batch(self, kind: int, seq: int, now: float, ops=(), entries=()) -> pb.SyncBatch:
        b = pb.SyncBatch(kind=kind, table=self.table.name, epoch=self.table.epoch, seq=seq,
                         sent=now)
        if entries:
            b.entries.CopyFrom(encode(ops, entries))
        return b

    def next_batch(self, now: float) -> pb.SyncBatch | None:
        if self.mode == "snapshot":
            return self._next_snapshot(now)
        t = self.table
        if self.cursor >= t.seq:
            return None
        if t.seq - self.cursor > self.max_backlog:
            self._begin_snapshot()
            return self._next_snapshot(now)
        changes = t.changes_since(self.cursor, limit=self.batch_size * SCAN_FACTOR)
        if changes is None:  # the log was overwritten past this follower: snapshot instead
            self._begin_snapshot()
            return self._next_snapshot(now)
        ops: list[int] = []
        out: list[Entry] = []
        size = 0
        node = self.node
        covered = self.cursor
        for ch in changes:
            e = ch.entry
            if e.origin == node:
                if len(out) >= self.batch_size or size >= self.max_bytes:
                    break
                ops.append(ch.op)
                out.append(e)
                size += _size(e)
            covered = ch.seq
        self.cursor = covered
        return self._batch(Kind.KIND_CHANGES, covered, now, ops, out)

    def _next_snapshot(self, now: float) -> pb.SyncBatch | None:
        if not self._snap_begun:
            self._snap_begun = True
            return self._batch(Kind.KIND_SNAPSHOT_BEGIN, self._snap_seq, now)
        snap = self._snap
        if self._snap_i >= len(snap):
            self.mode = "changes"
            self.cursor = self._snap_seq
            self._snap = []
            return self._batch(Kind.KIND_SNAPSHOT_END, self._snap_seq, now)
        ops: list[int] = []
        out: list[Entry] = []
        size = 0
        i = self._snap_i
        get = self.table.get  # skip entries replaced, removed or expired since the snapshot began
        create, delete = int(Op.CREATE), int(Op.DELETE)
        live = self._snap_live
        while i < len(snap) and len(out) < self.batch_size and size < self.max_bytes:
            e = snap[i]
            i += 1
            if i <= live:
                # skip entries replaced, removed or expired since the snapshot began: their
                # change follows in the log. An unlogged expiry bump (a busy entry touched
                # within a quarter TTL) is the same logged version: send its current copy.
                cur = get(e.key)
                if cur is None or cur.updated != e.updated or cur.origin != e.origin \
                        or cur.backend != e.backend:
                    continue
                e = cur
                ops.append(create)
            else:
                ops.append(delete)
            out.append(e)
            size += _size(e)
        self._snap_i = i
        return self._batch(Kind.KIND_SNAPSHOT, self._snap_seq, now, ops, out)

    def ack(self, epoch: int, seq: int) -> None:
        if epoch == self.table.epoch and seq > 0:
            if self.out.epoch != epoch:
                self.out.epoch, self.out.seq = epoch, seq
            elif seq > self.out.seq:
                self.out.seq = seq


class TableReceiver:
    """Applies one sender's batches of one table; ``epoch``/``seq`` is the resume cursor."""

    def __init__(self, table: Table, peer: str):
        self.table = table
        self.peer = peer
        self.epoch = 0
        self.seq = 0
        self.in_snapshot = False
        self.learned = False  # a snapshot completed or a resume started on the current stream
        self._snap_epoch = 0
        self._snap_seq = 0
        self.applied = 0
        self.invalid = 0
        self.snapshots = 0

    def reset_stream(self) -> None:
        self.in_snapshot = False
        self.learned = False

    def cursor(self) -> pb.SyncCursor:
        return pb.SyncCursor(table=self.table.name, epoch=self.epoch, seq=self.seq)

    def handle(self, b: pb.SyncBatch) -> int:
        """Applies one batch; returns how many entries changed our table."""
        k = b.kind
        if k == Kind.KIND_CHANGES:
            if self.in_snapshot:
                raise ProtocolError(f"{self.table.name}: changes inside a snapshot")
            if b.epoch != self.epoch:
                raise ProtocolError(f"{self.table.name}: changes for epoch {b.epoch}, "
                                    f"expected {self.epoch}")
            if b.seq < self.seq:
                raise ProtocolError(f"{self.table.name}: sequence went back from {self.seq} to {b.seq}")
            n = self._apply(b.entries)
            self.seq = b.seq
            self.learned = True
            return n
        if k == Kind.KIND_SNAPSHOT_BEGIN:
            if not b.epoch:
                raise ProtocolError(f"{self.table.name}: snapshot without epoch")
            self.in_snapshot = True
            self._snap_epoch, self._snap_seq = b.epoch, b.seq
            return 0
        if k == Kind.KIND_SNAPSHOT:
            if not self.in_snapshot or b.epoch != self._snap_epoch:
                raise ProtocolError(f"{self.table.name}: snapshot data outside a snapshot")
            return self._apply(b.entries)  # CREATE, or DELETE for recent deletions
        if k == Kind.KIND_SNAPSHOT_END:
            if not self.in_snapshot or b.epoch != self._snap_epoch or b.seq != self._snap_seq:
                raise ProtocolError(f"{self.table.name}: snapshot end does not match its begin")
            self.in_snapshot = False
            self.epoch, self.seq = self._snap_epoch, self._snap_seq
            self.learned = True
            self.snapshots += 1
            return 0
        raise ProtocolError(f"unexpected batch kind {k}")

    def _apply(self, m: pb.SyncEntries) -> int:
        if not m.keys:
            return 0
        ops, keys, backends, pools, created, updated, expires, origins, clients, listeners, \
            protos = columns(m)
        apply = self.table.apply
        opmap = _OPMAP
        isfinite = math.isfinite
        n = 0
        for op, k, b, p, c, u, x, o, cl, li, pr in zip(ops, keys, backends, pools, created,
                                                        updated, expires, origins, clients,
                                                        listeners, protos):
            op = opmap.get(op)
            if op is None or not k or not o or not (isfinite(c) and isfinite(u) and isfinite(x)):
                self.invalid += 1
                continue
            if apply(op, Entry(k, b, p, c, u, x, o, cl, li, pr), log=False):
                n += 1
        self.applied += n
        return n
