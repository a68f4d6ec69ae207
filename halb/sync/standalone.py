"""A sync-only node: tables plus a SyncService, without pools, listeners or election.

Benchmarks and tests use it to put many entries into a cluster of real ``halbd`` processes
(it is a full sync peer on a real gRPC port) and to measure replication on its own:

    node = SyncNode("feeder", SyncConfig(listen=..., peers=(...)))
    await node.start(); node.tables.sticky.put(...); await node.stop()

``election`` (optional) receives what sync tells an election (``hooks.ElectionHooks``);
``advert_interval`` stands for the VRRP advert interval that bounds the start-up hold.
The ``halb_sync_*`` metrics are in ``node.registry``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from ..clock import Clock, MonotonicClock, WallClock
from ..config import SyncConfig
from ..tables import Tables
from .hooks import ElectionHooks
from .service import SyncService


class SyncNode:
    def __init__(self, name: str, cfg: SyncConfig, *, election: ElectionHooks | None = None,
                 wall: Clock | None = None, sticky_max: int = 200_000, flow_max: int = 200_000,
                 log_size: int = 200_000, advert_interval: float = 1.0):
        self.name = name
        self.wall = wall or WallClock()
        self.clock = MonotonicClock()
        self.tables = Tables(name, self.wall, sticky_max=sticky_max, flow_max=flow_max,
                             log_size=max(log_size, cfg.max_backlog))
        self.registry = CollectorRegistry()
        self.election = election
        self.sync = SyncService(cfg, name=name, tables=self.tables, wall=self.wall,
                                registry=self.registry, election=election,
                                advert_interval=advert_interval)

    async def start(self) -> None:
        await self.sync.start()

    async def stop(self) -> None:
        await self.sync.stop()
