"""Gratuitous ARP for the VIPs of a new master, built with scapy, sent on an AF_PACKET socket.

The frames (one per IPv4 VIP: a broadcast ARP request whose sender and target address are both
the VIP, as keepalived sends them) are built once per interface MAC and sent from a
non-blocking packet socket bound to the interface, so a burst costs a few syscalls.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Iterable

from scapy.layers.l2 import ARP, Ether

BROADCAST = "ff:ff:ff:ff:ff:ff"
ETH_P_ARP = 0x0806


def frames(mac: str, vips: Iterable[str]) -> list[bytes]:
    """Gratuitous ARP request frames announcing each IPv4 address in ``vips`` at ``mac``."""
    out = []
    for v in vips:
        ip = str(ipaddress.ip_interface(v).ip) if "/" in str(v) else str(v)
        if ipaddress.ip_address(ip).version != 4:
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
