"""Resource-based balancing (``algorithm = "resource"``): weights that follow reported load.

Pure code: no I/O, no clock (every function that depends on time takes the elapsed time).

Backends report their utilization ``u`` (a fraction, 0 idle .. 1 saturated) in one of two ways:

- an ORCA load report in an HTTP response header (what Envoy and gRPC read; Envoy's
  ``source/common/orca/orca_parser.cc``), parsed only for pools with this algorithm::

      endpoint-load-metrics: TEXT cpu_utilization=0.3, mem_utilization=0.8, named_metrics.q=0.5
      endpoint-load-metrics: JSON {"cpu_utilization": 0.3, "named_metrics": {"q": 0.5}}

  (``key:value`` is accepted for ``key=value``, as Envoy does; the ``BIN`` form and the
  ``-bin`` header, base64 protobuf, are not read and count as unsupported);
- the agent-check (``[pools.agent]``, halb.agent): a word naming the metric
  (``cpu_utilization=0.3`` or ``cpu_utilization:0.3``), else HAProxy's percentage word, which
  HAProxy agents use for the idle share (``70%`` = 70 % headroom): ``u = 1 - p/100``.

``[pools.resource] metric`` names what is read: ``cpu_utilization`` (default),
``mem_utilization``, ``application_utilization``, ``named_metrics.NAME`` or
``utilization.NAME``; a list means the largest of those reported (the scarcest resource).
Values are clamped to 0..1 (ORCA allows a CPU above 1 past a soft limit: that is saturated).

The formula (documented in README.md, "Resource-based balancing"):

    smoothed load   s <- u                              first report, or first after stale
                    s <- s + (u - s) * (1 - exp(-dt/T))  each later report, dt seconds on
    effective weight = max(1, floor(W * 100 * max(f, 1 - s) + 0.5))

with ``T = smoothing`` (0: no smoothing), ``W`` the weight that applies without this algorithm
(the configured weight, a runtime ``halbctl weight``, or an agent's ``weight:N``) -- the
ceiling -- and ``f = floor``, the least share of ``W`` an overloaded backend keeps, so it still
gets requests and reports. Weights are in hundredths of ``W`` so that weight 1 backends can be
told apart. A backend with no report yet, or whose last report is older than ``stale_after``,
weighs ``W * 100``. The shares of new requests are the effective weights over their sum
(smooth weighted round robin, exact over each cycle).
"""

from __future__ import annotations

import json
import math
from typing import Iterable

SCALE = 100  # effective weights are in hundredths of the ceiling weight
HEADER = b"endpoint-load-metrics"
MAX_HEADER = 4096  # longer report values are not parsed (counted as malformed)
MAX_FIELDS = 64

# parse results
OK = "ok"
MALFORMED = "malformed"
UNSUPPORTED = "unsupported"  # BIN / -bin (protobuf)
NO_METRIC = "no_metric"  # parsed, but none of the configured metrics in it
RESULTS = (OK, MALFORMED, UNSUPPORTED, NO_METRIC)

_TOP_FIELDS = ("cpu_utilization", "mem_utilization", "application_utilization", "eps",
               "rps_fractional", "rps")


def valid_metric(name: str) -> bool:
    """A metric ``[pools.resource] metric`` may name."""
    if name in ("cpu_utilization", "mem_utilization", "application_utilization"):
        return True
    for prefix in ("named_metrics.", "utilization."):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return 0 < len(rest) <= 64 and all(c.isalnum() or c in "_-." for c in rest)
    return False


def _number(v: object) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        x = float(v)
    elif isinstance(v, str):
        try:
            x = float(v.strip())
        except ValueError:
            return None
    else:
        return None
    if math.isnan(x) or math.isinf(x):
        return None
    return x


def parse_orca(value: bytes | str) -> tuple[str, dict[str, float]]:
    """An ``endpoint-load-metrics`` value -> (result, {metric: value}); ``result`` is one of
    ``OK``, ``MALFORMED`` (nothing taken from it), ``UNSUPPORTED`` (the BIN form). Named maps
    are flattened: ``named_metrics.NAME`` and ``utilization.NAME``. A malformed field spoils
    the whole report (as in Envoy): half a report would compare backends unevenly."""
    if isinstance(value, bytes):
        if len(value) > MAX_HEADER:
            return MALFORMED, {}
        value = value.decode("latin-1")
    elif len(value) > MAX_HEADER:
        return MALFORMED, {}
    v = value.strip()
    fmt, _, rest = v.partition(" ")
    fmt = fmt.upper()
    out: dict[str, float] = {}
    if fmt == "TEXT":
        fields = [f for f in rest.split(",") if f.strip()]
        if not fields or len(fields) > MAX_FIELDS:
            return MALFORMED, {}
        for f in fields:
            f = f.strip()
            i = f.find("=")
            j = f.find(":")
            if i < 0 or (0 <= j < i):
                i = j
            if i <= 0:
                return MALFORMED, {}
            k, x = f[:i].strip(), _number(f[i + 1:])
            if x is None or not k or k in out:
                return MALFORMED, {}
            if k not in _TOP_FIELDS and not valid_metric(k):
                return MALFORMED, {}
            out[k] = x
        return OK, out
    if fmt == "JSON":
        try:
            d = json.loads(rest)
        except (ValueError, RecursionError):  # (deep nesting: "[[[[..." raises the latter)
            return MALFORMED, {}
        if not isinstance(d, dict):
            return MALFORMED, {}
        for k, x in d.items():
            if k in ("named_metrics", "utilization", "request_cost"):
                if not isinstance(x, dict):
                    return MALFORMED, {}
                if k == "request_cost":
                    continue
                for nk, nx in list(x.items())[:MAX_FIELDS]:
                    n = _number(nx)
                    if n is None or not isinstance(nk, str) or not valid_metric(f"{k}.{nk}"):
                        return MALFORMED, {}
                    out[f"{k}.{nk}"] = n
                continue
            # proto3 JSON: camelCase names are accepted too
            kk = {"cpuUtilization": "cpu_utilization", "memUtilization": "mem_utilization",
                  "applicationUtilization": "application_utilization",
                  "rpsFractional": "rps_fractional"}.get(k, k)
            n = _number(x)
            if n is None:
                return MALFORMED, {}
            out[kk] = n
        return OK, out
    if fmt == "BIN":
        return UNSUPPORTED, {}
    return MALFORMED, {}


def utilization(report: dict[str, float], metrics: Iterable[str]) -> float | None:
    """The load a report gives for the configured metrics: the largest present, clamped to
    0..1; None when it holds none of them."""
    u = None
    for m in metrics:
        x = report.get(m)
        if x is not None and (u is None or x > u):
            u = x
    if u is None:
        return None
    return 0.0 if u < 0.0 else 1.0 if u > 1.0 else u


def orca_header(parts: list[bytes]) -> bytes | None:
    """The ``endpoint-load-metrics`` value in a response head's header runs
    (``ResponseHead.parts[1:]``, raw ``name: value`` lines); the first wins. None: absent.
    ``endpoint-load-metrics-bin`` is returned as ``b"BIN "`` + value."""
    for run in parts:
        low = run.lower()
        if b"endpoint-load-metrics" not in low:
            continue
        for line in run.split(b"\r\n"):
            n, sep, v = line.partition(b":")
            if not sep:
                continue
            n = n.strip().lower()
            if n == HEADER:
                return v.strip()
            if n == HEADER + b"-bin":
                return b"BIN " + v.strip()
    return None


def smooth(prev: float, u: float, dt: float, tau: float) -> float:
    """The exponentially weighted moving average after a report ``u`` arriving ``dt`` seconds
    after the last one, with time constant ``tau`` seconds (the weight of the past decays as
    ``exp(-dt/tau)``, whatever the report rate). ``prev < 0``: no history, ``u`` itself."""
    if prev < 0.0 or tau <= 0.0:
        return u
    if dt <= 0.0:
        dt = 0.0
    return prev + (u - prev) * (1.0 - math.exp(-dt / tau))


def weight(ceiling: int, load: float, floor: float) -> int:
    """The effective weight of a backend of (ceiling) weight ``ceiling`` and smoothed load
    ``load`` (< 0: no fresh report: the ceiling), in hundredths (``SCALE``)."""
    if ceiling <= 0:
        return 0
    if load < 0.0:
        return ceiling * SCALE
    h = 1.0 - (1.0 if load > 1.0 else load)
    if h < floor:
        h = floor
    return max(1, int(ceiling * SCALE * h + 0.5))


def shares(ceilings: list[int], loads: list[float], floor: float) -> list[float]:
    """The share of new requests each backend gets by the formula (for tests and docs)."""
    ws = [weight(c, u, floor) for c, u in zip(ceilings, loads)]
    t = sum(ws)
    return [w / t for w in ws] if t else [0.0 for _ in ws]
