"""What state sync tells the election: the one other part ``SyncService`` calls.

``halb.vrrp.election.Election`` has these methods; the composition root passes the election
(or None when the node runs none) to ``SyncService(election=...)``. Tests pass a recorder.
"""

from __future__ import annotations

from typing import Protocol


class ElectionHooks(Protocol):
    def set_preempt_hold(self, hold: bool) -> None:
        """True at start while the tables are learned from the peers; False once learned (or
        the bounded wait ended): no VIP is preempted back with tables still empty."""

    def sync_peer_lost(self, peer_ip: str) -> None:
        """The sync stream from the peer at ``peer_ip`` closed (fast takeover may arm)."""

    def sync_peer_dead(self, peer_ip: str) -> None:
        """The peer's sync port refused a connection after its stream closed: its process is
        gone."""

    def sync_peer_seen(self, peer_ip: str) -> None:
        """A sync stream from the peer at ``peer_ip`` is up (again)."""

    def advert_sources(self) -> list[str]:
        """The source addresses of this node's VRRP adverts (told to the peers at connect)."""

    def sync_peer_sources(self, peer_ip: str, sources: list[str]) -> None:
        """The peer at ``peer_ip`` sends its VRRP adverts from ``sources`` (e.g. its IPv6
        link-local address): the ``sync_peer_*`` calls for ``peer_ip`` apply to those too."""
