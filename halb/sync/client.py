"""One-shot reads of a node's replicated tables over the Sync protocol.

``fetch_tables`` opens a Follow stream as ``node`` (which must be one of the remote node's
``sync.peers``, with its certificate when the cluster uses TLS), takes the snapshot of every
table and closes the stream. Tests and benchmarks use it to compare what real ``halbd``
processes hold; it applies nothing anywhere.
"""

from __future__ import annotations

import asyncio

from grpc import aio

from ..config import TLSFiles
from ..tables import Entry
from ..v1 import sync_pb2 as pb
from ..v1 import sync_pb2_grpc as pbg
from . import security
from .core import TABLE_NAMES, Kind, decode
from .service import _channel_options


async def fetch_tables(address: str, node: str, *, peer_name: str = "",
                       tls: TLSFiles | None = None, timeout: float = 30.0
                       ) -> dict[str, dict[str, Entry]]:
    """{table name: {key: Entry}} as held by the node at ``address`` (its snapshot)."""
    opts = _channel_options(peer_name or "halb", tls is not None)
    if tls is not None:
        ch = aio.secure_channel(address, security.channel_credentials(security.load(tls)), opts)
    else:
        ch = aio.insecure_channel(address, opts)
    out: dict[str, dict[str, Entry]] = {n: {} for n in TABLE_NAMES}
    done: set[str] = set()
    try:
        call = pbg.SyncStub(ch).Follow(timeout=timeout)
        await call.write(pb.FollowRequest(hello=pb.SyncHello(node=node)))
        while len(done) < len(TABLE_NAMES):
            b = await call.read()
            if b is aio.EOF:
                raise ConnectionError(f"{address}: stream ended before the snapshot did")
            if b.kind == Kind.KIND_SNAPSHOT:
                tab = out.setdefault(b.table, {})
                for op, e in decode(b.entries):
                    if op == pb.SYNC_OP_CREATE:  # DELETE records are the sender's tombstones
                        tab[e.key] = e
            elif b.kind == Kind.KIND_SNAPSHOT_END:
                done.add(b.table)
            if b.batch:
                await call.write(pb.FollowRequest(ack=pb.SyncAck(batch=b.batch)))
        call.cancel()
    finally:
        await ch.close(grace=None)
    return out


def fetch_tables_sync(address: str, node: str, **kw) -> dict[str, dict[str, Entry]]:
    return asyncio.run(fetch_tables(address, node, **kw))
