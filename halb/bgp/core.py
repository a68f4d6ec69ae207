"""Which VIPs this node announces over BGP, with no I/O and no clock of its own.

Scale-out behind ECMP: every node is active; a router spreads flows over the nodes that
announce a VIP (/32, or /128). A node should be in the router's ECMP set exactly when it can
serve the VIP, so the rules are:

- **ready**: nothing is announced before the node is ready: its parts started (listeners bound,
  NAT rules applied) and state sync learned the tables from its peers (or gave up waiting);
- **healthy**: a VIP is announced only while at least one of its services (the listeners bound
  to it) has a pool with an eligible backend; when none has, the VIP is withdrawn (the router
  then sends its flows to nodes that can serve them) and announced again once one has;
- **leaving** (``halbctl drain-node``, or a stop): every VIP is withdrawn first; the caller
  waits ``withdraw_wait`` for the router to move traffic, and only then stops. ``join`` ends
  a leave that was not a stop (``halbctl undrain-node``);
- **announce delay**: a VIP that became announceable is announced once it stayed so for
  ``announce_delay`` (a backend that flaps does not flap the route); withdrawals are at once.

The core keeps what it believes the speaker holds (``announced``); the edge carries out the
commands and reports back with ``done(cmd, ok)``; a command that failed is retried on the next
``step`` (the speaker restarted, vtysh timed out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple


class Announce(NamedTuple):
    prefix: str  # "198.51.100.10/32" or "2001:db8::10/128"


class Withdraw(NamedTuple):
    prefix: str


def prefix_of(vip: str) -> str:
    """A VIP's host route: /32 for IPv4, /128 for IPv6."""
    return f"{vip}/128" if ":" in vip else f"{vip}/32"


@dataclass
class BgpCore:
    """``vips``: VIP address -> the pools of the listeners bound to it (any healthy one keeps
    the VIP announced). ``announce_delay``: seconds a VIP must stay announceable first."""

    vips: Mapping[str, Iterable[str]]
    announce_delay: float = 0.0
    announced: set[str] = field(default_factory=set)  # prefixes the speaker holds (we believe)
    # prefixes whose state in the speaker is unknown (at start: a halbd killed with -9 may
    # have left them; after forget): told again, announce or withdraw, on the next step
    unknown: set[str] = field(default_factory=set)
    leaving: bool = False
    reasons: dict[str, str] = field(default_factory=dict)  # vip -> why not announced ("" = is)
    _since: dict[str, float] = field(default_factory=dict)  # vip -> announceable since
    _in_flight: set[tuple[str, str]] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=lambda: {
        "announcements": 0, "withdrawals": 0, "failures": 0})

    def __post_init__(self) -> None:
        self.vips = {v: tuple(p) for v, p in self.vips.items()}

    def wanted(self, now: float, *, ready: bool, healthy: Mapping[str, bool]) -> set[str]:
        """The prefixes that should be announced now (and why the others are not, in
        ``reasons``)."""
        out = set()
        for vip, pools in self.vips.items():
            if self.leaving:
                why = "node leaving (drain-node)"
            elif not ready:
                why = "node not ready (starting, or tables not learned from peers)"
            elif not any(healthy.get(p, False) for p in pools):
                why = f"no healthy backend in {', '.join(pools)}"
            else:
                why = ""
            if why:
                self._since.pop(vip, None)
                self.reasons[vip] = why
                continue
            since = self._since.setdefault(vip, now)
            if now - since < self.announce_delay:
                self.reasons[vip] = f"announce delay ({self.announce_delay:g} s)"
                continue
            self.reasons[vip] = ""
            out.add(prefix_of(vip))
        return out

    def step(self, now: float, *, ready: bool, healthy: Mapping[str, bool]) -> list[Announce | Withdraw]:
        """The commands that bring the speaker to what should be announced now; withdrawals
        first. A command stays in flight until ``done``."""
        want = self.wanted(now, ready=ready, healthy=healthy)
        cmds: list[Announce | Withdraw] = []
        for p in sorted((self.announced | self.unknown) - want):
            if ("w", p) not in self._in_flight:
                cmds.append(Withdraw(p))
                self._in_flight.add(("w", p))
        for p in sorted((want - self.announced) | (want & self.unknown)):
            if ("a", p) not in self._in_flight:
                cmds.append(Announce(p))
                self._in_flight.add(("a", p))
        return cmds

    def done(self, cmd: Announce | Withdraw, ok: bool) -> bool:
        """The edge carried out ``cmd`` (``ok``) or failed (retried on the next step). True
        when it changed what is announced: a command that only told the speaker again what
        it held (after ``forget``: at start, at each resync) is not an announcement or a
        withdrawal for the counters and the log."""
        kind = "a" if isinstance(cmd, Announce) else "w"
        self._in_flight.discard((kind, cmd.prefix))
        if not ok:
            self.counts["failures"] += 1
            return False
        self.unknown.discard(cmd.prefix)
        changed = (kind == "a") != (cmd.prefix in self.announced)
        if kind == "a":
            self.announced.add(cmd.prefix)
            if changed:
                self.counts["announcements"] += 1
        else:
            self.announced.discard(cmd.prefix)
            if changed:
                self.counts["withdrawals"] += 1
        return changed

    def set_vips(self, vips: Mapping[str, Iterable[str]]) -> None:
        """New VIPs and pools (a reload). What is announced stays announced until a step
        decides otherwise: a VIP no longer in ``vips`` is withdrawn then, a new one announced."""
        old = set(self.vips)
        self.vips = {v: tuple(p) for v, p in vips.items()}
        for v in old - set(self.vips):
            self._since.pop(v, None)
            self.reasons.pop(v, None)

    def leave(self) -> None:
        """Withdraw everything from the next step on, and announce nothing until ``join``."""
        self.leaving = True

    def join(self) -> None:
        self.leaving = False

    def forget(self) -> None:
        """The speaker's state is unknown (at start; it may have restarted): every VIP is
        told again on the next step, announced or withdrawn."""
        self.unknown = {prefix_of(v) for v in self.vips}
