"""A real gRPC (grpcio) backend for the HTTP/2 tests, the lab and the bench, plaintext (h2c):

    python -m lab.grpc_backend --name g1 --listen 127.0.0.1:50051

Service ``test.Echo`` with raw-bytes messages (no .proto needed):
  Unary(bytes) -> b"NAME:" + bytes; trailing metadata ``x-backend: NAME``. A request
      ``sleep:MS`` answers after MS milliseconds; ``fail:CODE:MSG`` aborts with that status.
  Bidi(stream bytes) -> stream b"NAME:" + each message, as they come.
  Join(stream bytes) -> b"NAME:" + the messages joined with b"," (client streaming).
  Count(b"N") -> stream b"NAME:0" .. b"NAME:N-1" (server streaming, N <= 100000).
and ``grpc.health.v1.Health`` (grpcio-health-checking), ``""`` and ``test.Echo`` SERVING.
"""

from __future__ import annotations

import argparse
import signal
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def serve(name: str, listen: str, workers: int = 16) -> grpc.Server:
    prefix = name.encode() + b":"

    def unary(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        if req.startswith(b"sleep:"):
            time.sleep(min(int(req[6:]), 60_000) / 1000)
        elif req.startswith(b"fail:"):
            _, code, msg = req.decode().split(":", 2)
            ctx.abort(grpc.StatusCode[code], msg)
        ctx.set_trailing_metadata((("x-backend", name),))
        return prefix + req

    def bidi(it, ctx: grpc.ServicerContext):
        for m in it:
            yield prefix + m
        ctx.set_trailing_metadata((("x-backend", name),))

    def join(it, ctx: grpc.ServicerContext) -> bytes:
        return prefix + b",".join(it)

    def count(req: bytes, ctx: grpc.ServicerContext):
        for i in range(min(int(req or b"0"), 100_000)):
            yield prefix + str(i).encode()

    handler = grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Join": grpc.stream_unary_rpc_method_handler(join),
        "Count": grpc.unary_stream_rpc_method_handler(count),
    })
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    srv.add_generic_rpc_handlers((handler,))
    hs = health.HealthServicer()
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    hs.set("test.Echo", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, srv)
    srv.add_insecure_port(listen)
    srv.start()
    return srv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--workers", type=int, default=16)
    a = ap.parse_args()
    srv = serve(a.name, a.listen, a.workers)
    print(f"grpc backend {a.name} on {a.listen}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: srv.stop(0))
    srv.wait_for_termination()


if __name__ == "__main__":
    main()
