"""A small gRPC load client for the bench's grpc case: unary calls to ``/test.Echo/Unary``
(lab.grpc_backend) from ``--threads`` threads over one channel (one HTTP/2 connection), for
``--duration`` seconds; prints one JSON line: calls, errors, seconds, calls_per_s.

    python bench/grpc_load.py --target 127.0.0.1:8080 --threads 32 --duration 10
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import grpc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--duration", type=float, default=10.0)
    a = ap.parse_args()
    ch = grpc.insecure_channel(a.target)
    call = ch.unary_unary("/test.Echo/Unary")
    call(b"warm", timeout=10)
    counts = [0] * a.threads
    errors = [0] * a.threads
    stop = time.monotonic() + a.duration

    def worker(i: int) -> None:
        while time.monotonic() < stop:
            try:
                call(b"ping", timeout=10)
                counts[i] += 1
            except grpc.RpcError:
                errors[i] += 1

    t0 = time.monotonic()
    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(a.threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(a.duration + 30)
    took = time.monotonic() - t0
    n = sum(counts)
    print(json.dumps({"calls": n, "errors": sum(errors), "seconds": round(took, 3),
                      "calls_per_s": round(n / took, 1)}))
    ch.close()


if __name__ == "__main__":
    main()
