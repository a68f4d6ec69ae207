"""Cost of the per-request metrics calls: ``Metrics.observe`` and ``conn_open`` + ``conn_close``.

    python -m bench.metrics_bench [--ref REV] [--calls N] [--repeat R]

Times the calls the data plane makes per finished request (``observe(backend, rt, error)``,
rt drawn once from a fixed-seed mix of 0.1-50 ms, 2% errors, 4 backends in turn) and per client
connection (``conn_open`` + ``conn_close`` on one listener), in a tight loop: ns per call, best
of R runs of N calls (the least disturbed run), the loop's own overhead (the same loop calling a
no-op method) subtracted. With ``--ref REV`` it also times ``halb/metrics.py`` as it was at git
revision REV (loaded from ``git show``, in this process) and checks that both versions export
the same /metrics text after the same calls. Bounded: a few seconds with the defaults.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client import generate_latest

import halb
from halb.config import BackendConfig, Endpoint, PoolConfig
from halb.model import Pool

ROOT = Path(__file__).resolve().parent.parent


def load_ref(rev: str):
    """halb/metrics.py at git revision ``rev``, as module ``halb._metrics_ref``."""
    src = subprocess.run(["git", "show", f"{rev}:halb/metrics.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("halb._metrics_ref", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "halb"
    sys.modules[spec.name] = mod
    exec(compile(src, f"{rev}:halb/metrics.py", "exec"), mod.__dict__)
    return mod


def _backends():
    cfg = PoolConfig(name="web", backends=tuple(
        BackendConfig(name=f"b{i}", address=Endpoint("127.0.0.1", 9000 + i)) for i in range(4)))
    return Pool(cfg).backends


def _workload(n: int):
    rng = random.Random(42)
    bks = _backends()
    calls = [(bks[i % len(bks)], rng.choice((0.0001, 0.0008, 0.002, 0.004, 0.007, 0.02, 0.05)),
              rng.random() < 0.02) for i in range(n)]
    return bks, calls


class _Noop:
    def observe(self, backend, rt, error):
        pass

    def conn_open(self, name):
        pass

    def conn_close(self, name):
        pass


def _time_observe(m, calls, repeat: int) -> float:
    best = float("inf")
    observe = m.observe
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for b, rt, err in calls:
            observe(b, rt, err)
        best = min(best, time.perf_counter_ns() - t0)
    return best / len(calls)


def _time_conn(m, n: int, repeat: int) -> float:
    best = float("inf")
    conn_open, conn_close = m.conn_open, m.conn_close
    rng = range(n)
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _i in rng:
            conn_open("front")
            conn_close("front")
        best = min(best, time.perf_counter_ns() - t0)
    return best / n


def measure(metrics_cls, calls, n: int, repeat: int, base: tuple[float, float]) -> tuple[float, float]:
    m = metrics_cls("bench")
    m.conn_open("front")  # the first call per listener/backend creates its state: not timed
    m.conn_close("front")
    for b, _rt, _err in calls[:8]:
        m.observe(b, None, False)
    return (_time_observe(m, calls, repeat) - base[0], _time_conn(m, n, repeat) - base[1])


def exported(metrics_cls) -> str:
    """The /metrics text after a fixed set of calls (rt edge cases included)."""
    m = metrics_cls("bench")
    bks, calls = _workload(500)
    for b, rt, err in calls:
        m.observe(b, rt, err)
    for rt in (0.0, 0.0005, 0.00050001, 30.0, 31.0, float("inf"), float("nan"), -1.0, None):
        m.observe(bks[0], rt, rt is None)
    for _ in range(3):
        m.conn_open("front")
    m.conn_close("front")
    m.conn_close("other")
    return generate_latest(m.registry).decode()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", help="also time halb/metrics.py at this git revision")
    ap.add_argument("--calls", type=int, default=100_000, help="calls per run (default 100000)")
    ap.add_argument("--repeat", type=int, default=5, help="runs; the best is kept (default 5)")
    a = ap.parse_args(argv)

    from halb.metrics import Metrics

    _bks, calls = _workload(a.calls)
    noop = _Noop()
    base = (_time_observe(noop, calls, a.repeat), _time_conn(noop, a.calls, a.repeat))
    versions = {}
    if a.ref:
        versions[a.ref] = load_ref(a.ref).Metrics
    versions["working tree"] = Metrics
    print(f"python {sys.version.split()[0]}, halb {halb.__version__}; {a.calls} calls, best of "
          f"{a.repeat}; loop overhead subtracted: {base[0]:.0f} ns (observe), "
          f"{base[1]:.0f} ns (open+close)")
    print(f"{'version':<14} {'observe ns':>11} {'open+close ns':>14}")
    results = {}
    for name, cls in versions.items():
        results[name] = measure(cls, calls, a.calls, a.repeat, base)
        print(f"{name:<14} {results[name][0]:>11.0f} {results[name][1]:>14.0f}")
    if a.ref:
        old, new = results[a.ref], results["working tree"]
        print(f"speed-up: observe {old[0] / new[0]:.1f}x, open+close {old[1] / new[1]:.1f}x")
        same = exported(versions[a.ref]) == exported(Metrics)
        print(f"exported /metrics text identical to {a.ref}'s: {'yes' if same else 'NO'}")
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
