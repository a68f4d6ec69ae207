"""The counters the L4 listeners (TCP and UDP) share: events and relayed bytes.

Prometheus refuses a second collector of the same name in one registry, so the counters are
created once per registry and every L4 listener of the node takes its labelled children from
them.
"""

from __future__ import annotations

import weakref

_counters: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def l4_counters(registry) -> tuple:
    """(events, bytes) counters of the L4 listeners, created once per registry."""
    c = _counters.get(registry)
    if c is None:
        from prometheus_client import Counter

        events = Counter("halb_l4_events", "L4 listener events (no_backend, connect_failed, "
                         "redispatched, idle_timeout, max_conns, flows_dropped, ...)",
                         ["listener", "event"], registry=registry)
        nbytes = Counter("halb_l4_bytes", "Bytes relayed by L4 listeners",
                         ["listener", "direction"], registry=registry)
        c = _counters[registry] = (events, nbytes)
    return c
