"""Active health checks: a pure per-backend state machine and a thin asyncio edge.

The core (``CheckState``) follows HAProxy's rise/fall thresholds: an up backend goes down after
``fall`` consecutive failed checks, a down backend goes up after ``rise`` consecutive good ones;
a result against the streak resets it. Like HAProxy's default ``init-state up``, a backend
starts up and its very first check, if it fails, takes it down at once (a backend that is dead
when the node starts gets no traffic for ``fall`` intervals); from then on the thresholds apply.

``evaluate_http`` and ``build_request`` are pure too. The edge (``HealthChecker``) runs one task
per backend: TCP connect or HTTP checks at ``interval``, each spread by ``jitter`` (a fraction of
the interval) and the first one placed at random within the first interval, so the checks of
many backends do not fire together. Every check is bounded by ``timeout`` (connect, request and
response together) and reads at most ``MAX_RESPONSE`` bytes. Verdict changes go through
``pool.set_health`` (one atomic view swap), are logged with pool, backend and reason, and are
counted with ``metrics.health_change``.

A check that times out while halb's own event loop was stalled (the process stopped by SIGSTOP,
a paused VM, a loop busy for longer than a quarter of the timeout) says nothing about the
backend: its timer fired late, so the answer may have been waiting unread. Such a result is
*inconclusive* (``ok=None``): it neither counts toward ``fall`` nor breaks a streak, and the check
is repeated at once. ``MAX_INCONCLUSIVE`` of them in a row count as one failure, so a loop that
stays overloaded cannot keep a dead backend up for ever.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httptools

from . import log as hlog
from .config import Endpoint, HealthConfig

if TYPE_CHECKING:  # pragma: no cover
    from .clock import Clock
    from .model import Backend, Pool

MAX_RESPONSE = 64 * 1024  # bytes of an HTTP check response read at most (head + body)
USER_AGENT = "halb-health"


# ---------------------------------------------------------------------------------------------
# Pure core

MAX_INCONCLUSIVE = 3  # inconclusive checks in a row that count as one failure


@dataclass(frozen=True, slots=True)
class Transition:
    up: bool
    reason: str
    streak: int  # consecutive results that led to the change


class CheckState:
    """Rise/fall state of one backend's active check. ``result`` returns a ``Transition`` when
    the verdict changes, else None."""

    __slots__ = ("rise", "fall", "up", "streak", "checks", "last_ok", "last_reason", "inconclusive")

    def __init__(self, rise: int, fall: int, up: bool = True):
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise = rise
        self.fall = fall
        self.up = up
        self.streak = 0  # consecutive results against the current verdict
        self.checks = 0
        self.last_ok: bool | None = None
        self.last_reason = ""
        self.inconclusive = 0  # inconclusive results in a row (our own loop was late)

    def result(self, ok: bool | None, reason: str = "") -> Transition | None:
        """Applies one check's result; ``ok=None`` is an inconclusive one (see the module)."""
        if ok is None:
            self.inconclusive += 1
            if self.inconclusive < MAX_INCONCLUSIVE:
                return None
            ok = False  # a loop late check after check: count it, a dead backend must go down
        self.inconclusive = 0
        first = self.checks == 0
        self.checks += 1
        self.last_ok = ok
        self.last_reason = reason
        if ok == self.up:
            self.streak = 0
            return None
        self.streak += 1
        need = self.fall if self.up else self.rise
        if first and self.up:
            need = 1  # init-state up: the first failed check takes a fresh backend down
        if self.streak < need:
            return None
        t = Transition(up=ok, reason=reason, streak=self.streak)
        self.up = ok
        self.streak = 0
        return t


def stall_allowance(timeout: float) -> float:
    """How late a check's timeout may fire before the check says nothing about the backend:
    a quarter of the timeout, at least 20 ms (one busy loop turn is not a stall)."""
    return max(0.02, timeout / 4)


def first_delay(interval: float, rnd: random.Random) -> float:
    """When a backend's first check runs: spread uniformly over the first interval."""
    return rnd.uniform(0.0, interval)


def next_delay(interval: float, jitter: float, rnd: random.Random) -> float:
    """The gap to the next check: ``interval`` spread by +-``jitter`` x interval."""
    if jitter <= 0:
        return interval
    return interval * (1.0 + rnd.uniform(-jitter, jitter))


def build_request(cfg: HealthConfig, backend: "Backend") -> bytes:
    port = cfg.port or backend.port
    host = cfg.host
    if not host:
        h = f"[{backend.host}]" if ":" in backend.host else backend.host
        host = h if port == 80 else f"{h}:{port}"
    return (f"{cfg.method} {cfg.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
            f"Accept: */*\r\nConnection: close\r\n\r\n").encode("latin-1")


def _ranges(codes) -> str:
    """``200-399`` rather than 200 numbers; runs of consecutive codes collapse."""
    out, cs = [], sorted(set(codes))
    i = 0
    while i < len(cs):
        j = i
        while j + 1 < len(cs) and cs[j + 1] == cs[j] + 1:
            j += 1
        out.append(str(cs[i]) if i == j else f"{cs[i]}-{cs[j]}")
        i = j + 1
    return ",".join(out)


def evaluate_http(cfg: HealthConfig, status: int | None, body: bytes, *,
                  complete: bool = True) -> tuple[bool, str]:
    """The verdict on an HTTP check response: (ok, reason)."""
    if status is None:
        return False, "no HTTP response"
    if status not in cfg.expect_status:
        return False, f"status {status} (expected {_ranges(cfg.expect_status)})"
    if cfg.expect_body:
        if cfg.expect_body.encode("utf-8") not in body:
            more = "" if complete else f" in the first {len(body)} bytes"
            return False, f"status {status}, body lacks {cfg.expect_body!r}{more}"
    return True, f"status {status}"


class _ResponseReader:
    """httptools callbacks: status, body up to the bound, completion."""

    def __init__(self, limit: int):
        self.limit = limit
        self.status: int | None = None
        self.body = bytearray()
        self.complete = False
        self.headers_done = False
        self.parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.status = self.parser.get_status_code()

    def on_body(self, data: bytes) -> None:
        room = self.limit - len(self.body)
        if room > 0:
            self.body += data[:room]

    def on_message_complete(self) -> None:
        self.complete = True


# ---------------------------------------------------------------------------------------------
# Async edge


class HealthChecker:
    """Active checks of one pool's backends (``pool.cfg.health``)."""

    def __init__(self, pool: "Pool", clock: "Clock", metrics: Any = None, *,
                 rng: random.Random | None = None):
        self.pool = pool
        self.cfg: HealthConfig = pool.cfg.health
        self.clock = clock
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.log = hlog.get_logger("health")
        self.states = {b.name: CheckState(self.cfg.rise, self.cfg.fall, up=b.healthy)
                       for b in pool.backends}
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        if self.cfg.type == "none" or self._tasks:
            return
        for b in self.pool.backends:
            self._tasks.append(asyncio.create_task(self._run(b), name=f"health-{self.pool.name}-{b.name}"))
        self.log.info("health_started", pool=self.pool.name, type=self.cfg.type,
                      interval=self.cfg.interval, timeout=self.cfg.timeout, rise=self.cfg.rise,
                      fall=self.cfg.fall, backends=len(self.pool.backends))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, b: "Backend") -> None:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        await asyncio.sleep(first_delay(cfg.interval, self.rng))
        while True:
            started = loop.time()
            ok: bool | None = False
            try:
                ok, _ = await self.check_once(b)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one check must not end the backend's checks
                self.log.exception("health_check_crashed", pool=self.pool.name, backend=b.name)
            if ok is None:  # inconclusive: look again now rather than an interval later
                await asyncio.sleep(0)
                continue
            delay = next_delay(cfg.interval, cfg.jitter, self.rng) - (loop.time() - started)
            await asyncio.sleep(max(0.0, delay))

    async def check_once(self, b: "Backend") -> tuple[bool | None, str]:
        """Runs one check of ``b`` and applies the result; returns (ok, reason), ok None when
        the check was inconclusive (halb's own loop was late, see the module)."""
        ok, reason = await self.probe(b)
        self.apply(b, ok, reason)
        return ok, reason

    def apply(self, b: "Backend", ok: bool | None, reason: str) -> Transition | None:
        st = self.states[b.name]
        t = st.result(ok, reason)
        if self.log.enabled():
            self.log.debug("health_check", pool=self.pool.name, backend=b.name, ok=ok, reason=reason)
        if t is None:
            return None
        now = self.clock.now()
        changed = self.pool.set_health(b, t.up, now)
        if changed:
            self.log.info("backend_up" if t.up else "backend_down", pool=self.pool.name,
                          backend=b.name, address=str(Endpoint(b.host, b.port)),
                          reason=t.reason,
                          check=self.cfg.type, consecutive=t.streak)
            if self.metrics is not None:
                self.metrics.health_change(self.pool.name, b.name, t.up)
        return t

    async def probe(self, b: "Backend") -> tuple[bool | None, str]:
        cfg = self.cfg
        port = cfg.port or b.port
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.timeout
        try:
            async with asyncio.timeout_at(deadline):
                if cfg.type == "http":
                    return await self._http(b, port)
                if cfg.type == "grpc":
                    return await self._grpc(b, port)
                return await self._tcp(b, port)
        except TimeoutError:
            late = loop.time() - deadline
            if late > stall_allowance(cfg.timeout):
                return None, (f"inconclusive: halb's event loop was {late * 1000:.0f} ms late "
                              f"for the {cfg.timeout:g}s timeout")
            return False, f"timeout after {cfg.timeout:g}s"
        except ConnectionRefusedError:
            return False, "connection refused"
        except OSError as e:
            return False, f"connect error: {e.strerror or e}"

    async def _tcp(self, b: "Backend", port: int) -> tuple[bool, str]:
        _, w = await asyncio.open_connection(b.host, port, limit=4096)
        w.close()
        try:
            await w.wait_closed()
        except OSError:
            pass
        return True, "connected"

    async def _grpc(self, b: "Backend", port: int) -> tuple[bool, str]:
        """``grpc.health.v1.Health/Check`` over h2c (one connection per check, as HAProxy's
        checks do), the request and the answer (de)serialized by grpcio-health-checking's
        messages, the HTTP/2 framing by the ``h2`` library (sans I/O)."""
        from .proxy import h2lib as h2
        from grpc_health.v1 import health_pb2

        r, w = await asyncio.open_connection(b.host, port, limit=16384)
        try:
            c = h2.connection.H2Connection(h2.config.H2Configuration(
                client_side=True, header_encoding=None))
            c.initiate_connection()
            msg = health_pb2.HealthCheckRequest(service=self.cfg.service).SerializeToString()
            sid = c.get_next_available_stream_id()
            c.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                 (b":authority", f"{b.host}:{port}".encode()),
                                 (b":path", b"/grpc.health.v1.Health/Check"),
                                 (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                                 (b"user-agent", USER_AGENT.encode())])
            c.send_data(sid, b"\0" + len(msg).to_bytes(4, "big") + msg, end_stream=True)
            w.write(c.data_to_send())
            body = bytearray()
            fields: dict[bytes, bytes] = {}
            status = b""
            total = 0
            done = False
            while not done and total < MAX_RESPONSE:
                data = await r.read(16384)
                if not data:
                    return False, "connection closed before the gRPC answer"
                total += len(data)
                for ev in c.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        fields.update(ev.headers)
                        status = fields.get(b":status", b"")
                    elif isinstance(ev, h2.events.TrailersReceived):
                        fields.update(ev.headers)
                    elif isinstance(ev, h2.events.DataReceived):
                        body += ev.data
                        c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset,
                                         h2.events.ConnectionTerminated)):
                        done = True
                out = c.data_to_send()
                if out:
                    w.write(out)
            if status != b"200":
                return False, f"gRPC check answered HTTP {status.decode() or '?'}"
            gs = fields.get(b"grpc-status", b"")
            if gs != b"0":
                return False, (f"grpc-status {gs.decode() or 'missing'}: "
                               f"{fields.get(b'grpc-message', b'').decode('latin-1')}").strip()
            if len(body) < 5:
                return False, "gRPC check answered no message"
            resp = health_pb2.HealthCheckResponse.FromString(bytes(body[5:5 + int.from_bytes(
                body[1:5], "big")]))
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            return resp.status == health_pb2.HealthCheckResponse.SERVING, f"gRPC {name}"
        except Exception as e:  # h2 protocol errors, a malformed message: the check fails
            if isinstance(e, OSError):
                raise
            return False, f"bad gRPC answer: {e!r}"[:200]
        finally:
            w.close()

    async def _http(self, b: "Backend", port: int) -> tuple[bool, str]:
        r, w = await asyncio.open_connection(b.host, port, limit=16384)
        try:
            w.write(build_request(self.cfg, b))
            await w.drain()
            rd = _ResponseReader(MAX_RESPONSE)
            total = 0
            while not rd.complete and total < MAX_RESPONSE:
                data = await r.read(min(16384, MAX_RESPONSE - total))
                if not data:
                    break
                total += len(data)
                try:
                    rd.parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    break
                except httptools.HttpParserError as e:
                    return False, f"bad HTTP response: {e}"
                if rd.headers_done and not self.cfg.expect_body:
                    break  # the status is all we need
            if not rd.complete and not rd.headers_done:
                return False, "connection closed before a full response head" if total < MAX_RESPONSE \
                    else f"response head larger than {MAX_RESPONSE} bytes"
            return evaluate_http(self.cfg, rd.status, bytes(rd.body), complete=rd.complete)
        finally:
            w.close()
