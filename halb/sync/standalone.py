"""A sync-only node: tables plus a SyncService, without pools, listeners or election.

Benchmarks and tests use it to put many entries into a cluster of real ``halbd`` processes
(it is a full sync peer on a real gRPC port) and to measure replication on its own:

    node = SyncNode("feeder", SyncConfig(listen=..., peers=(...)))
    await node.start(); node.tables.sticky.put(...); await node.stop()
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry

from ..clock import Clock, MonotonicClock, WallClock
from ..config import SyncConfig
from ..tables import Tables
from .service import SyncService


class SyncNode:
    def __init__(self, name: str, cfg: SyncConfig, *, election: Any = None, wall: Clock | None = None,
                 sticky_max: int = 200_000, flow_max: int = 200_000, log_size: int = 200_000,
                 advert_interval: float = 1.0):
        self.name = name
        self.wall = wall or WallClock()
        self.clock = MonotonicClock()
        self.tables = Tables(name, self.wall, sticky_max=sticky_max, flow_max=flow_max,
                             log_size=max(log_size, cfg.max_backlog))
        self.metrics = SimpleNamespace(registry=CollectorRegistry())
        self.election = election
        self.cfg = SimpleNamespace(vrrp=(SimpleNamespace(advert_interval=advert_interval),))
        self.sync = SyncService(cfg, self)

    async def start(self) -> None:
        await self.sync.start()

    async def stop(self) -> None:
        await self.sync.stop()
