import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# grpc.aio starts one engine (a completion queue and its poller thread) on first use and shuts
# it down when its last object is freed; that shutdown joins the poller thread and waits for
# the queue to drain. In this one long pytest process many tests run in-process nodes, each in
# its own asyncio.run() loop: when a leftover grpc.aio object from an earlier test is freed by
# the garbage collector at some arbitrary later allocation, with operations of its closed loop
# still pending, that join can wait forever (seen once: a test hung inside Table.put). Holding
# one reference to the engine for the session keeps it up, so no test ever shuts it down; grpc
# binds each call to the loop it runs in, so later loops work on the same engine. halbd itself
# runs one loop for its whole life and never meets this.
from grpc._cython import cygrpc  # noqa: E402

cygrpc.init_grpc_aio()
