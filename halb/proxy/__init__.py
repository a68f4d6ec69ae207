"""The data plane: listeners that accept client traffic and relay it to a pool's backends.

Each listener is an object with ``async start()`` and ``async stop()``, built from its
``ListenerConfig`` and a ``ListenerEnv``: the few things of its node a listener uses (the
pools, the replicated tables, the clock, the metrics, the access log, the splice gate and the
TLS ticket keys),
never the node itself (DESIGN.md: a part gets what it needs), so a test builds a listener
alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..accesslog_writer import AccessLog
    from ..clock import Clock
    from ..config import ListenerConfig
    from ..metrics import Metrics
    from ..model import Pool
    from ..splicegate import SpliceGate
    from ..tables import Tables
    from ..tlstickets import TicketKeys


@dataclass(frozen=True, slots=True)
class ListenerEnv:
    """What a listener uses of its node. ``pools`` is the node's own dict (a reload adds and
    removes pools in it in place); ``access_log`` None: access logging off."""

    pools: "dict[str, Pool]"
    tables: "Tables"
    clock: "Clock"
    metrics: "Metrics"
    access_log: "AccessLog | None" = None
    splice_gate: "SpliceGate | None" = None  # relay = "auto" TCP listeners follow it (None: copy)
    tls_tickets: "TicketKeys | None" = None  # HTTPS listeners' ticket keys (None: OpenSSL's own)


def make_listener(cfg: "ListenerConfig", env: ListenerEnv) -> Any:
    if cfg.mode == "tcp":
        from .tcp import TcpListener
        return TcpListener(cfg, env)
    if cfg.mode == "udp":
        from .udp import UdpListener
        return UdpListener(cfg, env)
    from .http import HttpListener
    return HttpListener(cfg, env)
