"""Prometheus metrics of one node, in a registry of its own (never the process-global one).

The data plane calls ``observe`` once per finished request or connection and ``conn_open`` /
``conn_close`` per client connection; those are the hot paths, so the labelled children are
looked up once per backend or listener and cached. Values that live in the model anyway
(a backend's active connections, its health state, the pool views, the table sizes) are not
pushed at all: a custom collector reads them at scrape time, so they cost nothing per request.

Families (all prefixed ``halb_``)::

    halb_info{node, version}                              1
    halb_backend_requests_total{pool, backend}            requests/connections finished
    halb_backend_errors_total{pool, backend}              of those, failed
    halb_backend_response_seconds{pool, backend}          histogram of response times
    halb_backend_active_connections{pool, backend}        live, read from Backend.active
    halb_backend_up{pool, backend}                        1 if the backend may serve
    halb_backend_state{pool, backend, state}              1 for the current state
                                                          (up, down, drain, ejected)
    halb_backend_weight{pool, backend}                    effective weight in the view (0: out)
    halb_health_transitions_total{pool, backend, to}      active check verdict changes
    halb_pool_backends_serving{pool}                      backends in the pool's view
    halb_pool_backup_active{pool}                         1 while backups serve
    halb_listener_connections_total{listener}             client connections accepted
    halb_listener_active_connections{listener}            client connections open
    halb_table_entries{table}                             sticky / flow table sizes
    halb_table_capacity{table}                            their bounds
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from . import __version__
from . import log as hlog

if TYPE_CHECKING:  # pragma: no cover
    from .config import Endpoint
    from .model import Backend, Pool, PoolView
    from .tables import Tables

STATES = ("up", "down", "drain", "ejected")
RT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
              10.0, 30.0)

_log = hlog.get_logger("metrics")


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
        with self.m._lock:
            snaps = list(self.m._pools.values())
        for pool, states, weights, nserving, is_backup in snaps:
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
        self._requests = Counter("halb_backend_requests", "Requests or connections finished at a backend",
                                 ["pool", "backend"], registry=r)
        self._errors = Counter("halb_backend_errors", "Requests or connections that failed at a backend",
                               ["pool", "backend"], registry=r)
        self._rt = Histogram("halb_backend_response_seconds", "Backend response time",
                             ["pool", "backend"], buckets=RT_BUCKETS, registry=r)
        self._transitions = Counter("halb_health_transitions",
                                    "Active health check verdict changes", ["pool", "backend", "to"],
                                    registry=r)
        self._lconns = Counter("halb_listener_connections", "Client connections accepted",
                               ["listener"], registry=r)
        self._lactive = Gauge("halb_listener_active_connections", "Client connections open",
                              ["listener"], registry=r)
        self._lock = threading.Lock()
        # pool name -> (pool, {backend: state}, {backend: effective weight}, serving, backup)
        self._pools: dict[str, tuple[Any, dict[str, str], dict[str, int], int, bool]] = {}
        self._tables: "Tables | None" = None
        self._bk: dict[Any, tuple] = {}  # Backend -> (requests, errors, histogram) children
        self._ls: dict[str, tuple] = {}  # listener -> (total, active) children
        r.register(_PoolCollector(self))
        r.register(_TableCollector(self))
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

    def health_change(self, pool_name: str, backend_name: str, up: bool) -> None:
        self._transitions.labels(pool_name, backend_name, "up" if up else "down").inc()

    # -- listeners ----------------------------------------------------------------------------

    def _listener(self, name: str) -> tuple:
        c = self._ls.get(name)
        if c is None:
            c = self._ls[name] = (self._lconns.labels(name), self._lactive.labels(name))
        return c

    def conn_open(self, listener_name: str) -> None:
        c = self._ls.get(listener_name) or self._listener(listener_name)
        c[0].inc()
        c[1].inc()

    def conn_close(self, listener_name: str) -> None:
        c = self._ls.get(listener_name) or self._listener(listener_name)
        c[1].dec()

    # -- backends -----------------------------------------------------------------------------

    def _backend(self, b: "Backend") -> tuple:
        c = self._bk.get(b)
        if c is None:
            lv = (b.pool, b.name)
            c = self._bk[b] = (self._requests.labels(*lv), self._errors.labels(*lv),
                               self._rt.labels(*lv))
        return c

    def observe(self, backend: "Backend", rt: float | None, error: bool) -> None:
        """One request or connection finished at ``backend`` (rt in seconds, None if unknown)."""
        c = self._bk.get(backend) or self._backend(backend)
        c[0].inc()
        if error:
            c[1].inc()
        if rt is not None and rt >= 0:
            c[2].observe(rt)

    # -- tables -------------------------------------------------------------------------------

    def tables(self, tables: "Tables") -> None:
        """Remembers the node's tables; their sizes are read at scrape time."""
        self._tables = tables

    # -- helpers for tests and halbctl --------------------------------------------------------

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.registry.get_sample_value(name, labels or {})
