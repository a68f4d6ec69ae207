"""Gratuitous ARP and unsolicited Neighbor Advertisements for the VIPs of a new master, built
with scapy, sent on an AF_PACKET socket.

The frames are built once per interface MAC and sent from a non-blocking packet socket bound to
the interface, so a burst costs a few syscalls:

- one per IPv4 VIP: a broadcast ARP request whose sender and target address are both the VIP,
  as keepalived sends them;
- one per IPv6 VIP: an unsolicited Neighbor Advertisement (RFC 4861 section 7.2.6) from the VIP
  to all nodes (ff02::1), hop limit 255, Override set (so neighbors replace the old owner's
  link-layer address in their caches), Solicited clear, Router set when the interface
  forwards (a host using the VIP as its default router keeps it), with the target link-layer
  address option; what keepalived sends.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Iterable

from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

BROADCAST = "ff:ff:ff:ff:ff:ff"
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ALL_NODES = "ff02::1"
ALL_NODES_MAC = "33:33:00:00:00:01"


def frames(mac: str, vips: Iterable[str], router: bool = False) -> list[bytes]:
    """Frames announcing each address in ``vips`` at ``mac``: gratuitous ARP for IPv4,
    unsolicited NA for IPv6 (``router``: the NA's Router flag)."""
    out = []
    for v in vips:
        ip = str(ipaddress.ip_interface(v).ip) if "/" in str(v) else str(v)
        if ipaddress.ip_address(ip).version == 6:
            out.append(bytes(Ether(src=mac, dst=ALL_NODES_MAC, type=ETH_P_IPV6)
                             / IPv6(src=ip, dst=ALL_NODES, hlim=255)
                             / ICMPv6ND_NA(R=int(router), S=0, O=1, tgt=ip)
                             / ICMPv6NDOptDstLLAddr(lladdr=mac)))
            continue
        out.append(bytes(Ether(src=mac, dst=BROADCAST, type=ETH_P_ARP)
                         / ARP(op=1, hwsrc=mac, psrc=ip, hwdst="00:00:00:00:00:00", pdst=ip)))
    return out


class GarpSender:
    """Sends prepared gratuitous ARP frames on one interface."""

    def __init__(self, ifname: str):
        self.ifname = ifname
        self._sock: socket.socket | None = None
        self.sent = 0
        self.errors = 0

    def _socket(self) -> socket.socket:
        if self._sock is None:
            # protocol 0: the socket sends only and never queues received frames
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            s.setblocking(False)
            s.bind((self.ifname, 0))
            self._sock = s
        return self._sock

    def send(self, frames: list[bytes]) -> int:
        """Sends every frame once; returns how many went out. Errors are counted, not raised."""
        n = 0
        for f in frames:
            try:
                self._socket().send(f)
                n += 1
            except OSError:
                self.errors += 1
                self.close()  # the interface may have been recreated: reopen next time
        self.sent += n
        return n

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
