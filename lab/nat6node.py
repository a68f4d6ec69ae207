"""halbd for the IPv6 NAT lab, with the IPv6 VIPs moved by the test (a stand-in until halb's
VRRPv3 over IPv6 exists; then the lab runs plain halbd with an IPv6 [[vrrp]] instance).

    python -m lab.nat6node CONFIG --vip 2001:2:0:44::100/64@eth0 --vip 2001:2:0:45::1/64@eth1 \\
        --fifo /tmp/x/lb1.cmd

It is halbd (``halb.node.Node``, the same parts, sync and control), plus: the NAT listeners'
IPv6 VIPs count as elected (so ``NatService`` treats them as an election would: only the
holder records its kernel's connections, every other node injects the replicated ones), and
a FIFO takes commands:

- ``take``: the takeover in the order an election's hooks follow: ``NatService.
  before_vips_added`` (pending conntrack entries written first), then the addresses (front
  VIP and back gateway, ``nodad``), then three unsolicited Neighbor Advertisements with the
  override flag per address (what VRRPv3 over IPv6 sends in place of gratuitous ARP);
- ``release``: the addresses removed, then ``after_vips_removed``.

At start it removes the addresses if a killed run left them (a backup starts without VIPs).
Logs ``nat6_take`` / ``nat6_release`` with the time taken.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
import time

IFA_F_NODAD = 0x02


def _parse_vip(v: str) -> tuple[ipaddress.IPv6Interface, str]:
    addr, _, dev = v.partition("@")
    return ipaddress.IPv6Interface(addr), dev or "eth0"


def _addrs(vips, add: bool) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ip:
        for iface, dev in vips:
            idx = ip.link_lookup(ifname=dev)[0]
            try:
                if add:
                    ip.addr("add", index=idx, address=str(iface.ip),
                            prefixlen=iface.network.prefixlen, flags=IFA_F_NODAD)
                else:
                    ip.addr("del", index=idx, address=str(iface.ip),
                            prefixlen=iface.network.prefixlen)
            except NetlinkError as e:
                if e.code not in (17, 99):  # EEXIST, EADDRNOTAVAIL
                    raise


def _advertise(vips, count: int = 3, spacing: float = 0.01) -> None:
    """Unsolicited NAs (override) to all-nodes, from and for each address."""
    from scapy.all import conf, get_if_hwaddr, sendp  # noqa: F401 - conf loads the routes
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
    from scapy.layers.l2 import Ether

    frames = []
    for iface, dev in vips:
        mac = get_if_hwaddr(dev)
        a = str(iface.ip)
        frames.append((dev, Ether(src=mac, dst="33:33:00:00:00:01") /
                       IPv6(src=a, dst="ff02::1", hlim=255) /
                       ICMPv6ND_NA(tgt=a, R=0, S=0, O=1) / ICMPv6NDOptDstLLAddr(lladdr=mac)))
    for i in range(count):
        for dev, f in frames:
            sendp(f, iface=dev, verbose=False)
        if i + 1 < count:
            time.sleep(spacing)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lab.nat6node")
    ap.add_argument("config")
    ap.add_argument("--vip", action="append", default=[], help="ADDR/LEN@DEV, moved as one group")
    ap.add_argument("--fifo", required=True)
    a = ap.parse_args(argv)
    vips = [_parse_vip(v) for v in a.vip]
    from halb import log
    from halb.config import load
    from halb.node import Node

    cfg = load(a.config)
    log.setup(cfg.node.name, cfg.node.log_level)
    lg = log.get_logger("nat6lab")
    _addrs(vips, add=False)  # a killed run's addresses: a node starts as a backup

    class Node6(Node):
        def _build_parts(self) -> None:
            super()._build_parts()
            if self.nat is not None:
                self.nat.elected = self.nat.elected | {str(v.ip) for v, _ in vips}

        async def start(self) -> None:
            await super().start()
            fd = os.open(a.fifo, os.O_RDWR | os.O_NONBLOCK)
            buf = bytearray()

            def readable() -> None:
                try:
                    buf.extend(os.read(fd, 4096))
                except BlockingIOError:
                    return
                while b"\n" in buf:
                    line, _, rest = bytes(buf).partition(b"\n")
                    buf[:] = rest
                    asyncio.get_running_loop().create_task(
                        self._command(line.decode().strip()))
            asyncio.get_running_loop().add_reader(fd, readable)
            lg.info("nat6_ready", fifo=a.fifo)

        async def _command(self, cmd: str) -> None:
            # pyroute2's and scapy's blocking calls run in a thread (pyroute2's IPRoute
            # refuses a thread whose event loop runs), as the election's address changes do
            run = asyncio.get_running_loop().run_in_executor
            t0 = time.monotonic()
            names = [str(v.ip) for v, _ in vips]
            if cmd == "take":
                if self.nat is not None:
                    self.nat.before_vips_added("v6", names)
                await run(None, _addrs, vips, True)
                await run(None, _advertise, vips)
                lg.info("nat6_take", vips=names, ms=round((time.monotonic() - t0) * 1000, 1))
            elif cmd == "release":
                await run(None, _addrs, vips, False)
                if self.nat is not None:
                    self.nat.after_vips_removed("v6", names)
                lg.info("nat6_release", vips=names, ms=round((time.monotonic() - t0) * 1000, 1))
            else:
                lg.warning("nat6_unknown_command", command=cmd)

    asyncio.run(Node6(cfg).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
