"""The election: VRRPv3 (RFC 9568) over IPv4, one instance per ``[[vrrp]]`` section.

- ``codec``: adverts built and parsed with scapy's ``VRRPv3`` layer; checksum settings
  ``rfc9568`` (no pseudo-header) and ``keepalived`` (pseudo-header); optional HMAC-SHA256
  trailer with a time-based replay counter; cheap checks before scapy, invalid packets
  returned (and counted) by reason, never raised.
- ``fsm``: the pure state machine (Initialize/Backup/Master/Fault) with an injected time;
  returns actions; fast takeover, preempt holds and tracking are inputs like adverts.
- ``instance``: the async edge ``Election`` that ``halb.node`` builds: raw sockets, timers,
  VIPs (``netlink``), gratuitous ARP (``garp``), tracking (``track``), notify, metrics.

Active-active: two instances with crossed priorities on two nodes, e.g. on lb1
``vi1`` (VIP A) priority 200 and ``vi2`` (VIP B) priority 100, on lb2 the reverse; each node
masters one VIP and takes the other when its peer fails.
"""
