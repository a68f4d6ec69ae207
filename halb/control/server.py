"""The control part of a node: the ``halb.v1.Control`` gRPC service (plus the standard gRPC
health service and server reflection) on a unix socket, and optionally on TCP with mutual TLS.

The unix socket is the default transport; its file permissions (0600, owner only) are its
access control. A stale socket file left by a dead node is removed at start; a socket that a
running process still answers on is left alone and the start fails with a clear message.

The calls themselves live in ``halb.control.api``; this module is the thin gRPC edge: it maps
``ControlError`` to a gRPC status and any unexpected exception to INTERNAL (logged), so one
bad request never takes the node down.

Built by the composition root as ``ControlServer(cfg.control, targets=ControlTargets(...),
registry=registry)``: ``targets`` are the node's parts the calls read and act on (see
``halb.control.api.ControlTargets``; the socket path is ``targets.config.control_socket``),
``registry`` the metrics registry for ``halb_control_*`` (None: no metrics).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
import ssl
import stat
from pathlib import Path
from typing import Any, Callable

import grpc
from grpc import aio
from prometheus_client import CollectorRegistry, Counter
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from .. import log as hlog
from ..tlsfront import RefusalLog, TLSFront
from ..config import ControlConfig
from ..v1 import control_pb2 as pb
from ..v1 import control_pb2_grpc as pb_grpc
from .api import ControlAPI, ControlError, ControlTargets

SERVICE = pb.DESCRIPTOR.services_by_name["Control"].full_name  # "halb.v1.Control"
MAX_MESSAGE = 4 << 20  # a page of 1000 entries is ~200 KB; requests are tiny
MAX_CONCURRENT_RPCS = 64
STOP_GRACE = 1.0


class _Servicer(pb_grpc.ControlServicer):
    def __init__(self, api: ControlAPI, log, counter=None):
        self.api = api
        self.log = log
        self.counter = counter

    async def _call(self, method: str, context: aio.ServicerContext, fn: Callable[[], Any]):
        code = grpc.StatusCode.OK
        try:
            r = fn()
            if inspect.isawaitable(r):
                r = await r
            return r
        except ControlError as e:
            code = e.code
            self.log.info("control_refused", method=method, code=e.code.name, reason=e.message)
            await context.abort(e.code, e.message)
        except Exception as e:  # a bug must not take the node down; tell the caller
            code = grpc.StatusCode.INTERNAL
            self.log.exception("control_failed", method=method)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method} failed: {type(e).__name__}: {e}")
        finally:
            if self.counter is not None:
                self.counter.labels(method=method, code=code.name).inc()

    async def Status(self, request, context):
        return await self._call("Status", context, self.api.status)

    async def Drain(self, request, context):
        b = await self._call("Drain", context,
                             lambda: self.api.drain(request.pool, request.backend, True))
        self.log.info("backend_drained", pool=b.pool, backend=b.name)
        return pb.BackendReply(backend=b)

    async def Enable(self, request, context):
        b = await self._call("Enable", context,
                             lambda: self.api.drain(request.pool, request.backend, False))
        self.log.info("backend_enabled", pool=b.pool, backend=b.name)
        return pb.BackendReply(backend=b)

    async def SetWeight(self, request, context):
        b = await self._call("SetWeight", context,
                             lambda: self.api.set_weight(request.pool, request.backend, request.weight))
        self.log.info("backend_weight_set", pool=b.pool, backend=b.name, weight=b.weight)
        return pb.BackendReply(backend=b)

    async def Failover(self, request, context):
        i = await self._call("Failover", context, lambda: self.api.failover(request.instance))
        self.log.info("failover_requested", instance=i.name, state=i.state)
        return pb.FailoverReply(instance=i)

    async def Reload(self, request, context):
        r = await self._call("Reload", context, self.api.reload)
        self.log.info("reload_requested", ok=r.ok, changes=len(r.changes), errors=len(r.errors))
        return r

    async def CachePurge(self, request, context):
        r = await self._call("CachePurge", context, lambda: self.api.cache_purge(
            request.prefix, request.host, request.listener))
        self.log.info("cache_purged", prefix=request.prefix, host=request.host,
                      listener=request.listener, purged=r.purged)
        return r

    async def AddBackend(self, request, context):
        b = await self._call("AddBackend", context, lambda: self.api.add_backend(request))
        return pb.BackendReply(backend=b)

    async def DeleteBackend(self, request, context):
        b = await self._call("DeleteBackend", context,
                             lambda: self.api.delete_backend(request.pool, request.backend))
        return pb.BackendReply(backend=b)

    async def SetMaintenance(self, request, context):
        b = await self._call("SetMaintenance", context, lambda: self.api.set_maintenance(
            request.pool, request.backend, request.maint))
        return pb.BackendReply(backend=b)

    async def Upgrade(self, request, context):
        r = await self._call("Upgrade", context, lambda: self.api.upgrade(request))
        self.log.info("upgrade_requested", ok=r.ok, pid=r.pid, error=r.error)
        return r

    async def LeaveNode(self, request, context):
        r = await self._call("LeaveNode", context, lambda: self.api.leave_node(request))
        self.log.info("node_left", withdrawn=list(r.withdrawn), waited=round(r.waited_seconds, 2))
        return r

    async def JoinNode(self, request, context):
        r = await self._call("JoinNode", context, self.api.join_node)
        self.log.info("node_joined", announced=list(r.announced))
        return r

    async def DumpTable(self, request, context):
        return await self._call("DumpTable", context, lambda: self.api.dump_table(request))


def _socket_in_use(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def prepare_socket_path(path: str) -> None:
    """Creates the socket's directory and removes a stale socket file; raises OSError when the
    path is taken by something else (a live node, or a file that is not a socket)."""
    p = Path(path)
    if len(os.fsencode(path)) > 107:
        raise OSError(f"control socket path too long for a unix socket ({len(path)} bytes): {path}")
    if not p.parent.exists():
        p.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        st = p.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"control socket path {path} exists and is not a socket; not removing it")
    if _socket_in_use(path):
        raise OSError(f"control socket {path} is in use by a running process (another halbd?)")
    p.unlink()


class ControlServer:
    """``ControlServer(cfg, targets=..., registry=...)``: a node part with ``async start()`` /
    ``async stop()``."""

    def __init__(self, cfg: ControlConfig, *, targets: ControlTargets,
                 registry: CollectorRegistry | None = None):
        self.cfg = cfg
        self.targets = targets
        self.registry = registry
        self.log = hlog.get_logger("control")
        self.socket_path = targets.config.control_socket
        self.api = ControlAPI(targets, targets.clock.now())
        self.server: aio.Server | None = None
        self.health: HealthServicer | None = None
        self.tcp_port: int | None = None
        self.front: TLSFront | None = None
        self.refusals = RefusalLog()  # TLS handshakes refused on control.address
        self.api.refusals = self.refusals
        self._counter = self._make_counter()
        self._collector = None
        self._ino = 0  # the socket file this server made (stop removes only that one)

    def _refused(self, remote: str, reason: str, detail: str) -> None:
        self.refusals.add("in", reason, remote, detail)
        self.log.warning("control_refused", remote=remote, reason=reason, detail=detail)

    def _make_counter(self):
        if self.registry is None:
            return None
        try:
            return Counter("halb_control_requests", "Control API calls by method and result",
                           ["method", "code"], registry=self.registry)
        except ValueError:  # already registered in this registry (a second server in one process)
            return None

    async def start(self) -> None:
        opts = [("grpc.max_receive_message_length", 64 << 10),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.so_reuseport", 0)]
        server = aio.server(options=opts, maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS)
        pb_grpc.add_ControlServicer_to_server(_Servicer(self.api, self.log, self._counter), server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
        path = self.socket_path
        prepare_socket_path(path)
        old = os.umask(0o177)  # the socket is created 0600: only its owner may connect
        try:
            if server.add_insecure_port(f"unix:{path}") == 0:
                raise OSError(f"cannot listen on control socket {path}")
        finally:
            os.umask(old)
        try:
            os.chmod(path, 0o600)
            await server.start()
            self._ino = os.lstat(path).st_ino
            if self.cfg.address is not None and self.cfg.tls is not None:
                # TCP with mutual TLS: halb's TLS front (every refused handshake is counted
                # and logged with the remote address) relays to the unix socket
                addr = str(self.cfg.address)
                try:
                    self.front = TLSFront(self.cfg.tls, self._refused, part="control")
                    self.tcp_port = await self.front.start(self.cfg.address.host,
                                                           self.cfg.address.port, path)
                except (OSError, ssl.SSLError) as e:
                    self.front = None
                    raise OSError(f"cannot listen on control address {addr}: "
                                  f"{getattr(e, 'strerror', None) or e}") from None
                self._register_metrics()
        except BaseException:
            await server.stop(None)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self.server = server
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.log.info("control_listening", socket=path,
                      address=str(self.cfg.address) if self.cfg.address else "")

    def _register_metrics(self) -> None:
        reg = self.registry
        if reg is None:
            return
        refusals = self.refusals

        class _Collector:
            def describe(self):
                return []

            def collect(self):
                from prometheus_client.core import CounterMetricFamily
                f = CounterMetricFamily("halb_control_refusals", "TLS handshakes refused on "
                                        "control.address, by reason", labels=["reason"])
                for (_d, rsn), n in refusals.by_reason().items():
                    f.add_metric([rsn], n)
                yield f
        self._collector = _Collector()
        try:
            reg.register(self._collector)
        except ValueError:
            self._collector = None

    async def stop(self) -> None:
        if self.front is not None:
            await self.front.stop()
            self.front = None
        if self._collector is not None and self.registry is not None:
            with contextlib.suppress(KeyError):
                self.registry.unregister(self._collector)
            self._collector = None
        server, self.server = self.server, None
        if server is None:
            return
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        await server.stop(STOP_GRACE)
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.socket_path)
            # not when an upgraded process has put its own socket there since
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._ino:
                os.unlink(self.socket_path)
        self.log.info("control_stopped")
