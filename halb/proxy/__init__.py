"""The data plane: listeners that accept client traffic and relay it to a pool's backends.

Each listener is an object with ``async start()`` and ``async stop()``, built from its
``ListenerConfig`` and the node (for its pools, tables, metrics and clocks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..config import ListenerConfig
    from ..node import Node


def make_listener(cfg: "ListenerConfig", node: "Node") -> Any:
    if cfg.mode == "tcp":
        from .tcp import TcpListener
        return TcpListener(cfg, node)
    if cfg.mode == "udp":
        from .udp import UdpListener
        return UdpListener(cfg, node)
    from .http import HttpListener
    return HttpListener(cfg, node)
