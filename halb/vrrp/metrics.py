"""The election's metric families (``halb_vrrp_*``), registered in the node's registry.

``Election`` builds one ``VrrpMetrics`` from the registry it is given; its channels and
instances update the families (labels: the instance name, and the state, the new state or the
reason of a refused advert).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class VrrpMetrics:
    """The election's families in the node's registry."""

    def __init__(self, registry: CollectorRegistry | None):
        self.state = Gauge("halb_vrrp_state", "1 for the instance's current state",
                           ["instance", "state"], registry=registry)
        self.priority = Gauge("halb_vrrp_priority", "Effective priority (with tracking)",
                              ["instance"], registry=registry)
        self.transitions = Counter("halb_vrrp_transitions", "State changes", ["instance", "to"],
                                   registry=registry)
        self.invalid = Counter("halb_vrrp_invalid_adverts", "Adverts dropped, by reason "
                               "(instance is iface:<name> when the VRID is unknown)",
                               ["instance", "reason"], registry=registry)
        self.sent = Counter("halb_vrrp_adverts_sent", "Adverts sent", ["instance"],
                            registry=registry)
        self.received = Counter("halb_vrrp_adverts_received", "Valid adverts received",
                                ["instance"], registry=registry)
        self.stale_sockets = Counter("halb_vrrp_stale_sockets_destroyed", "TCP sockets left on "
                                     "a VIP (by an earlier run or term) aborted around a VIP "
                                     "change", ["instance"], registry=registry)
