"""Prometheus metrics of one node, in a registry of its own (never the process-global one).

The data plane calls ``observe`` once per finished request or connection and ``conn_open`` /
``conn_close`` per client connection; those are the hot paths. They do not go through
prometheus_client's Counter / Histogram children (a method call, a mutex and checks per update,
5-8% of the L7 proxy's CPU): each backend and listener has a plain list of numbers, found in a
dict keyed by the Backend object (or listener name) and bumped in place; custom collectors turn
the lists into the same families (names, types, help, labels, buckets) at scrape time. Values
that live in the model anyway (a backend's active connections, its health state, the pool
views, the table sizes) are not pushed at all: a collector reads them at scrape time too.

Consistency of a scrape. Only the event loop's thread writes the lists; a scrape runs in the
metrics server's thread. Each list is copied in one step (``s[:]``, which the GIL does not
interrupt), so a backend's buckets and ``_count`` always agree with each other; but a scrape may
fall between two statements of one ``observe``, so ``_sum`` (or ``requests_total``) may already
include a request that ``_count`` does not yet, and different backends are read at slightly
different instants -- as with HAProxy's stats. A scrape never raises because of a concurrent
update: the dicts are copied (one C-level step) before they are walked.

Families (all prefixed ``halb_``)::

    halb_info{node, version}                              1
    halb_backend_requests_total{pool, backend}            requests/connections finished
    halb_backend_errors_total{pool, backend}              of those, failed
    halb_backend_response_seconds{pool, backend}          histogram of response times
    halb_backend_active_connections{pool, backend}        live, read from Backend.active
    halb_backend_up{pool, backend}                        1 if the backend may serve
    halb_backend_state{pool, backend, state}              1 for the current state
                                                          (up, down, drain, ejected)
    halb_backend_weight{pool, backend}                    effective weight in the view (0: out;
                                                          algorithm resource: hundredths)
    halb_backend_load{pool, backend}                      smoothed reported load, 0..1
                                                          (algorithm resource, fresh reports)
    halb_load_reports_total{pool, result}                 load reports read: ok, malformed,
                                                          unsupported, no_metric
    halb_health_transitions_total{pool, backend, to}      active check verdict changes
    halb_pool_backends_serving{pool}                      backends in the pool's view
    halb_pool_backup_active{pool}                         1 while backups serve
    halb_listener_connections_total{listener}             client connections accepted
    halb_listener_active_connections{listener}            client connections open
    halb_table_entries{table}                             sticky / flow table sizes
    halb_table_capacity{table}                            their bounds
    halb_access_log_lines_total                           access log lines written
    halb_access_log_dropped_total                         lost: buffer full or write failed
    halb_http2_events_total{listener, event}              HTTP/2 connections, streams, limits
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__
from . import log as hlog

if TYPE_CHECKING:  # pragma: no cover
    from .config import Endpoint
    from .model import Backend, Pool, PoolView
    from .tables import Tables

STATES = ("up", "down", "drain", "ejected", "maint")
RT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
              10.0, 30.0)

# A backend's list: [requests, errors, rt sum, then one count per bucket of _RT_BOUNDS (not
# cumulative; the last is +Inf)]. The hot paths index it with literals (faster than names).
_REQ, _ERR, _SUM, _B0 = 0, 1, 2, 3
_RT_BOUNDS = RT_BUCKETS + (float("inf"),)
_RT_LE = tuple(floatToGoString(b) for b in _RT_BOUNDS)  # the "le" label values, as Histogram
# (Metrics.observe finds the bucket with comparisons written out for these bounds: change both.)
# A listener's list: [connections accepted, connections open].
_TOTAL, _OPEN = 0, 1

_REQ_HELP = "Requests or connections finished at a backend"
_ERR_HELP = "Requests or connections that failed at a backend"
_RT_HELP = "Backend response time"
_LCONN_HELP = "Client connections accepted"
_LOPEN_HELP = "Client connections open"

_log = hlog.get_logger("metrics")


class _BackendCollector(Collector):
    """halb_backend_requests_total, _errors_total, _response_seconds from the backends' lists."""

    def __init__(self, metrics: "Metrics"):
        self.m = metrics

    def _families(self):
        labels = ["pool", "backend"]
        return (CounterMetricFamily("halb_backend_requests", _REQ_HELP, labels=labels),
                CounterMetricFamily("halb_backend_errors", _ERR_HELP, labels=labels),
                HistogramMetricFamily("halb_backend_response_seconds", _RT_HELP, labels=labels))

    def describe(self):
        return self._families()

    def collect(self):
        req, err, rt = self._families()
        for labels, s in tuple(self.m._bk_state.items()):
            s = s[:]  # one step: buckets and count from one instant
            req.add_metric(labels, float(s[_REQ]))
            err.add_metric(labels, float(s[_ERR]))
            buckets = []
            acc = 0
            for le, n in zip(_RT_LE, s[_B0:]):
                acc += n
                buckets.append((le, float(acc)))
            rt.add_metric(labels, buckets, float(s[_SUM]))
        return (req, err, rt)


class _ListenerCollector(Collector):
    """halb_listener_connections_total and halb_listener_active_connections."""

    def __init__(self, metrics: "Metrics"):
        self.m = metrics

    def _families(self):
        return (CounterMetricFamily("halb_listener_connections", _LCONN_HELP, labels=["listener"]),
                GaugeMetricFamily("halb_listener_active_connections", _LOPEN_HELP,
                                  labels=["listener"]))

    def describe(self):
        return self._families()

    def collect(self):
        total, active = self._families()
        for name, s in tuple(self.m._ls.items()):
            s = s[:]
            total.add_metric([name], float(s[_TOTAL]))
            active.add_metric([name], float(s[_OPEN]))
        return (total, active)


class _PoolCollector(Collector):
    """Reads the pools' live state at scrape time."""

    def __init__(self, metrics: "Metrics"):
        self.m = metrics

    def collect(self):
        active = GaugeMetricFamily("halb_backend_active_connections",
                                   "Open connections / in-flight requests at a backend",
                                   labels=["pool", "backend"])
        up = GaugeMetricFamily("halb_backend_up", "1 if the backend is in its pool's view (may serve)",
                               labels=["pool", "backend"])
        state = GaugeMetricFamily("halb_backend_state",
                                  "1 for the backend's current state (up, down, drain, ejected)",
                                  labels=["pool", "backend", "state"])
        weight = GaugeMetricFamily("halb_backend_weight",
                                   "Effective weight in the pool's view (0: not serving)",
                                   labels=["pool", "backend"])
        serving = GaugeMetricFamily("halb_pool_backends_serving",
                                    "Backends in the pool's view", labels=["pool"])
        backup = GaugeMetricFamily("halb_pool_backup_active", "1 while the pool's backups serve",
                                   labels=["pool"])
        load = GaugeMetricFamily("halb_backend_load",
                                 "Smoothed load the backend reports (0..1), algorithm resource "
                                 "(absent without a fresh report)", labels=["pool", "backend"])
        reports = CounterMetricFamily("halb_load_reports",
                                      "Load reports read (algorithm resource) by result: ok, "
                                      "malformed, unsupported (BIN), no_metric (none of the "
                                      "configured metrics)", labels=["pool", "result"])
        with self.m._lock:
            snaps = list(self.m._pools.values())
        any_resource = False
        for pool, states, weights, nserving, is_backup in snaps:
            if getattr(pool, "resource", False):
                any_resource = True
                stale = pool.cfg.resource.stale_after
                now = time.monotonic()
                for b in pool.backends:
                    if b.load >= 0 and now - b.load_at <= stale:
                        load.add_metric([pool.name, b.name], b.load)
                for res, n in list(pool.load_reports.items()):
                    reports.add_metric([pool.name, res], n)
            for b in pool.backends:
                labels = [pool.name, b.name]
                active.add_metric(labels, max(0, b.active))
                w = weights.get(b.name, 0)
                up.add_metric(labels, 1 if w > 0 else 0)
                weight.add_metric(labels, w)
                cur = states.get(b.name, "up")
                for s in STATES:
                    state.add_metric(labels + [s], 1 if s == cur else 0)
            serving.add_metric([pool.name], nserving)
            backup.add_metric([pool.name], 1 if is_backup else 0)
        yield from (active, up, state, weight, serving, backup)
        if any_resource:  # (only then: scrapes of other nodes stay as they were)
            yield from (load, reports)


class _AccessLogCollector(Collector):
    """halb_access_log_lines_total and halb_access_log_dropped_total: plain counts the access
    logger keeps (halb.accesslog_writer), read at scrape time."""

    def __init__(self, metrics: "Metrics"):
        self.m = metrics

    def collect(self):
        alog = self.m._alog
        yield CounterMetricFamily("halb_access_log_lines", "Access log lines written",
                                  value=float(alog.written if alog is not None else 0))
        yield CounterMetricFamily("halb_access_log_dropped",
                                  "Access log lines lost: the buffer was full (the writer "
                                  "could not keep up or was stuck) or the write failed",
                                  value=float(alog.lost if alog is not None else 0))


class _TableCollector(Collector):
    def __init__(self, metrics: "Metrics"):
        self.m = metrics

    def collect(self):
        entries = GaugeMetricFamily("halb_table_entries", "Entries in a replicated table",
                                    labels=["table"])
        cap = GaugeMetricFamily("halb_table_capacity", "Bound on a replicated table's entries",
                                labels=["table"])
        tables = self.m._tables
        if tables is not None:
            for t in tables:
                entries.add_metric([t.name], len(t))
                cap.add_metric([t.name], t.max_entries)
        yield entries
        yield cap


class Metrics:
    def __init__(self, node_name: str):
        self.node = node_name
        disable_created_metrics()  # no *_created series: halbd owns its process
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        info = Gauge("halb_info", "halb node", ["node", "version"], registry=r)
        info.labels(node_name, __version__).set(1)
        # Backend -> its list (see _REQ...); (pool, backend) labels -> the same list, for the
        # scrape and so that a new Backend object with the same names counts on where the old
        # one left off, as a labelled Counter child would.
        self._bk: dict[Any, list] = {}
        self._bk_state: dict[tuple[str, str], list] = {}
        self._ls: dict[str, list] = {}  # listener name -> [accepted, open]
        # Registered in this order so that the families come out as they always have.
        r.register(_BackendCollector(self))
        self._transitions = Counter("halb_health_transitions",
                                    "Active health check verdict changes", ["pool", "backend", "to"],
                                    registry=r)
        r.register(_ListenerCollector(self))
        self._lock = threading.Lock()
        # pool name -> (pool, {backend: state}, {backend: effective weight}, serving, backup)
        self._pools: dict[str, tuple[Any, dict[str, str], dict[str, int], int, bool]] = {}
        self._tables: "Tables | None" = None
        r.register(_PoolCollector(self))
        r.register(_TableCollector(self))
        self._upgrades = Counter("halb_http_upgrades", "HTTP connections switched to another "
                                 "protocol (101) and relayed as a tunnel",
                                 ["listener", "protocol"], registry=r)
        self._tunnels = Gauge("halb_http_tunnels_active", "Tunnels (after a 101) open",
                              ["listener"], registry=r)
        self._alog: Any = None  # the node's AccessLog (halb.accesslog_writer), read at scrape
        r.register(_AccessLogCollector(self))
        # (registered last: the families above keep the order they always had)
        self._h2 = Counter("halb_http2_events", "HTTP/2 client connections, streams and the "
                           "attack limits they met (halb.proxy.h2front)", ["listener", "event"],
                           registry=r)
        self._h2c: dict[tuple[str, str], Any] = {}
        self._server = None
        self._thread = None

    # -- endpoint -----------------------------------------------------------------------------

    def serve(self, endpoint: "Endpoint") -> bool:
        """Serves /metrics on ``endpoint`` in a thread; logs (never raises) if it cannot bind."""
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(endpoint.port, addr=endpoint.host,
                                                           registry=self.registry)
        except (OSError, ValueError) as e:
            _log.error("metrics_serve_failed", address=str(endpoint), error=str(e))
            return False
        _log.info("metrics_serving", address=str(endpoint))
        return True

    def close(self) -> None:
        srv, self._server = self._server, None
        if srv is not None:
            srv.shutdown()
            srv.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    # -- pools and health ---------------------------------------------------------------------

    def pool_view(self, pool: "Pool", view: "PoolView", now: float) -> None:
        """Called on every view swap: snapshots the backends' states for scrapes."""
        states = {b.name: b.state(now) for b in pool.backends}
        weights = {b.name: w for b, w in zip(view.backends, view.weights)}
        snap = (pool, states, weights, len(view.backends), view.backup)
        with self._lock:
            self._pools[pool.name] = snap

    def pool_removed(self, pool_name: str) -> None:
        """A reload removed the pool: its live gauges go (its counters stay)."""
        with self._lock:
            self._pools.pop(pool_name, None)

    def health_change(self, pool_name: str, backend_name: str, up: bool) -> None:
        self._transitions.labels(pool_name, backend_name, "up" if up else "down").inc()

    # -- listeners ----------------------------------------------------------------------------

    def _listener(self, name: str) -> list:
        s = self._ls.get(name)
        if s is None:
            s = self._ls[name] = [0, 0]
        return s

    def conn_open(self, listener_name: str) -> None:
        try:
            s = self._ls[listener_name]
        except KeyError:
            s = self._listener(listener_name)
        s[0] += 1  # _TOTAL
        s[1] += 1  # _OPEN

    def conn_close(self, listener_name: str) -> None:
        try:
            s = self._ls[listener_name]
        except KeyError:
            s = self._listener(listener_name)
        s[1] -= 1  # _OPEN

    def tunnel_open(self, listener_name: str, protocol: str) -> None:
        """An HTTP connection became a tunnel (``protocol``: websocket or other)."""
        self._upgrades.labels(listener_name, protocol).inc()
        self._tunnels.labels(listener_name).inc()

    def http2_event(self, listener_name: str, event: str) -> None:
        """One HTTP/2 event: connections, streams, rapid_resets, control_floods, ..."""
        c = self._h2c.get((listener_name, event))
        if c is None:
            c = self._h2c[(listener_name, event)] = self._h2.labels(listener_name, event)
        c.inc()

    def tunnel_close(self, listener_name: str) -> None:
        self._tunnels.labels(listener_name).dec()

    # -- backends -----------------------------------------------------------------------------

    def _backend(self, b: "Backend") -> list:
        labels = (str(b.pool), str(b.name))
        s = self._bk_state.get(labels)
        if s is None:
            s = [0, 0, 0.0] + [0] * len(_RT_BOUNDS)
            self._bk_state[labels] = s
        self._bk[b] = s
        return s

    def observe(self, backend: "Backend", rt: float | None, error: bool) -> None:
        """One request or connection finished at ``backend`` (rt in seconds, None if unknown)."""
        record(self._bk, self, backend, rt, error)

    # -- tables -------------------------------------------------------------------------------

    def tables(self, tables: "Tables") -> None:
        """Remembers the node's tables; their sizes are read at scrape time."""
        self._tables = tables

    def access_log(self, alog: Any) -> None:
        """Remembers the node's access logger; its line counts are read at scrape time."""
        self._alog = alog

    def splice_gate(self, gate: Any) -> None:
        """Gauges of the node's SpliceGate (halb.splicegate), read at scrape time."""
        Gauge("halb_l4_relay_splicing", "1 while relay = \"auto\" TCP listeners splice (the "
              "node is busy), 0 while they copy; a listener whose sockets refused splice "
              "copies regardless (halb_l4_events splice_unavailable)",
              registry=self.registry).set_function(lambda: 1.0 if gate.splice else 0.0)
        Gauge("halb_cpu_busy_ratio", "CPU used over the last 250 ms: the event loop thread's, "
              "of one core, or the process's, of its cgroup quota, whichever is larger",
              registry=self.registry).set_function(lambda: gate.busy)

    # -- helpers for tests and halbctl --------------------------------------------------------

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.registry.get_sample_value(name, labels or {})


def record(bk: dict, m: "Metrics", backend: "Backend", rt: float | None, error: bool) -> None:
    """``Metrics.observe``: ``bk`` is ``m._bk``. The data plane calls it directly with its
    listener's ``bk`` (compiled: a C call, the bucket search on a C double)."""
    s = bk.get(backend)
    if s is None:
        s = m._backend(backend)
    s[0] += 1  # _REQ
    if error:
        s[1] += 1  # _ERR
    if rt is None:
        return
    r = rt
    if not r >= 0.0:  # (NaN is not >= 0)
        return
    s[2] += r  # _SUM
    # The bucket: the first bound >= rt, as Histogram.observe. A binary search written out
    # over RT_BUCKETS (4-5 float comparisons, no call: half the cost of bisect_left here);
    # s[3 + i] counts bucket i, s[18] the +Inf one. test_metrics checks it at every bound.
    if r <= 0.01:
        if r <= 0.001:
            if r <= 0.0005:
                s[3] += 1
            else:
                s[4] += 1
        elif r <= 0.0025:
            s[5] += 1
        elif r <= 0.005:
            s[6] += 1
        else:
            s[7] += 1
    elif r <= 0.25:
        if r <= 0.025:
            s[8] += 1
        elif r <= 0.05:
            s[9] += 1
        elif r <= 0.1:
            s[10] += 1
        else:
            s[11] += 1
    elif r <= 2.5:
        if r <= 0.5:
            s[12] += 1
        elif r <= 1.0:
            s[13] += 1
        else:
            s[14] += 1
    elif r <= 10.0:
        if r <= 5.0:
            s[15] += 1
        else:
            s[16] += 1
    elif r <= 30.0:
        s[17] += 1
    else:
        s[18] += 1
