"""The VRRPv3 state machine of one virtual router (RFC 9568 section 6.4), pure: no I/O, no clock.

Every input carries ``now`` (monotonic seconds) and returns a list of actions for the edge
(``halb.vrrp.instance``) to carry out; ``deadline()`` says when ``on_timer(now)`` is due next.

    fsm = Fsm(Params(vrid=40, priority=100, interval=1.0, address="198.18.40.11"))
    acts = fsm.start(now)                  # [RemoveVips(), StateChange(...), Notify(...)]
    acts = fsm.on_advert(now, src, prio, interval)
    acts = fsm.on_timer(now)               # when now >= fsm.deadline()

States: ``init``, ``backup``, ``master``, ``fault``. Timers (absolute times, None when off):
``down_at`` (Master_Down_Timer, backup), ``advert_at`` (Adver_Timer, master), ``garp_at``
(periodic gratuitous ARP refresh, master), ``fast_at`` (fast takeover, backup: the state-sync
stream from the current master closed; if the master's next advert, due one
Master_Adver_Interval after its last one, has not arrived FAST_MARGIN x that interval later,
the master is taken to be dead. Counting from the last advert rather than from the stream's
closing means a stream that closes just after an advert never turns ordinary advert jitter
into a takeover).

Rules beyond the RFC, as keepalived does them:

- Tracking: ``set_tracking(fault, delta)``. ``fault`` forces Fault (a master sends priority 0
  and gives up its VIPs); ``delta`` is added to the configured priority, clamped to 1..254;
  an owner (255) keeps 255.
- ``preempt_delay``: a backup with preempt on preempts a live lower-priority master only once it
  has been running ``preempt_delay`` seconds and has seen that lower master for as long.
- Split brain heals fast (keepalived's "received advert with lower priority, forcing new
  election"): halb announces VIPs from the node's own MAC, so after two masters meet again the
  clients' ARP caches may point at the one that yields. A master that hears a lower-priority
  master answers at once with its own advert and a gratuitous ARP burst (bursts at most once
  per ``LOWER_GARP_EVERY`` while the same lower master keeps talking), and a master that yields to
  a higher one first sends one last advert at its own priority, so the winner hears that
  there were two masters even when its own advert was the first to cross the healed link.
- Preempt holds: while ``set_preempt_hold(True)`` (state sync still learning tables) or after a
  graceful ``handover`` (until this router next becomes master because no master is left), a
  backup does not preempt a live master of lower priority; with no master at all it still
  takes over when Master_Down_Timer fires.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

INIT, BACKUP, MASTER, FAULT = "init", "backup", "master", "fault"
OWNER = 255
RESIGN = 0
FAST_MARGIN = 0.25  # fast takeover: allowance for a late advert, in Master_Adver_Intervals
LOWER_GARP_EVERY = 1.0  # seconds: gratuitous ARP bursts answering a lower master, at most


# -- actions --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendAdvert:
    priority: int
    interval: float


@dataclass(frozen=True, slots=True)
class AddVips:
    # an upgrade's new process adopts a mastership: the VIPs are in place and the sockets on
    # them are the old process's live connections, not stale ones to destroy
    adopt: bool = False


@dataclass(frozen=True, slots=True)
class RemoveVips:
    pass


@dataclass(frozen=True, slots=True)
class Garp:
    """Announce the VIPs (``burst``: the configured count and spacing; else one round)."""
    burst: bool = True


@dataclass(frozen=True, slots=True)
class StateChange:
    old: str
    new: str
    reason: str


@dataclass(frozen=True, slots=True)
class Notify:
    state: str  # MASTER | BACKUP | FAULT (keepalived's words)
    priority: int


Action = SendAdvert | AddVips | RemoveVips | Garp | StateChange | Notify


# -- parameters -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    vrid: int
    priority: int  # configured, 1..255
    interval: float  # Advertisement_Interval, seconds
    address: str  # this router's primary address (tie-break)
    preempt: bool = True
    preempt_delay: float = 0.0
    garp_refresh: float = 0.0  # 0: no periodic refresh


def skew_time(priority: int, mai: float) -> float:
    """Skew_Time = ((256 - Priority) * Master_Adver_Interval) / 256 (RFC 9568 6.1)."""
    return ((256 - priority) * mai) / 256.0


def master_down_interval(priority: int, mai: float) -> float:
    """Master_Down_Interval = 3 * Master_Adver_Interval + Skew_Time (RFC 9568 6.1)."""
    return 3.0 * mai + skew_time(priority, mai)


def _addr_key(a: str) -> int:
    try:
        return int(ipaddress.ip_address(a))
    except ValueError:
        return -1


@dataclass
class Fsm:
    p: Params
    state: str = INIT
    mai: float = 0.0  # Master_Adver_Interval (backup: the master's; master: our own)
    master: str = ""  # address of the current master (ours while master)
    master_priority: int = 0
    since: float = 0.0  # time of the last state change
    down_at: float | None = None
    advert_at: float | None = None
    garp_at: float | None = None
    fast_at: float | None = None
    fast_peer: str = ""
    last_rx: float | None = None  # when the current master's last advert arrived (backup)
    track_fault: bool = False
    track_delta: int = 0
    hold_sync: bool = False
    hold_handover: bool = False
    started_at: float | None = None
    lower_since: float | None = None  # first advert of the current lower-priority master
    lower_garp: float | None = None  # master: last GARP burst answering a lower master
    lower_rx: float | None = None  # master: last advert heard from a lower master
    transitions: int = 0
    stopped: bool = False
    _notified_priority: int = field(default=-1, repr=False)

    def __post_init__(self) -> None:
        self.mai = self.p.interval

    # -- derived --------------------------------------------------------------------------------

    @property
    def priority(self) -> int:
        """The effective priority (configured priority plus tracking, clamped)."""
        if self.p.priority == OWNER:
            return OWNER
        return max(1, min(254, self.p.priority + self.track_delta))

    @property
    def interval(self) -> float:
        """The advert interval in force: ours as master, the master's as backup."""
        return self.p.interval if self.state == MASTER else self.mai

    @property
    def skew(self) -> float:
        return skew_time(self.priority, self.mai)

    @property
    def mdi(self) -> float:
        return master_down_interval(self.priority, self.mai)

    @property
    def held(self) -> bool:
        return self.hold_sync or self.hold_handover

    def deadline(self) -> float | None:
        ts = [t for t in (self.down_at, self.advert_at, self.garp_at, self.fast_at) if t is not None]
        return min(ts) if ts else None

    # -- transitions ----------------------------------------------------------------------------

    def _go(self, new: str, now: float, reason: str, acts: list) -> None:
        old = self.state
        self.state = new
        self.since = now
        self.transitions += 1
        acts.append(StateChange(old, new, reason))
        if new in (MASTER, BACKUP, FAULT):
            acts.append(Notify(new.upper(), self.priority))

    def _to_master(self, now: float, reason: str) -> list:
        acts: list = []
        self.down_at = None
        self.fast_at = None
        self.fast_peer = ""
        self.lower_since = None
        self.hold_handover = False
        self.mai = self.p.interval
        self.master = self.p.address
        self.master_priority = self.priority
        acts.append(SendAdvert(self.priority, self.p.interval))
        acts.append(AddVips())
        acts.append(Garp(True))
        self.advert_at = now + self.p.interval
        self.garp_at = now + self.p.garp_refresh if self.p.garp_refresh > 0 else None
        self._go(MASTER, now, reason, acts)
        return acts

    def _to_backup(self, now: float, reason: str, *, mai: float | None = None,
                   down: float | None = None, master: str = "", master_priority: int = 0) -> list:
        acts: list = []
        was_master = self.state == MASTER
        self.advert_at = None
        self.garp_at = None
        self.fast_at = None
        self.fast_peer = ""
        if mai is not None:
            self.mai = mai
        self.master = master
        self.master_priority = master_priority
        self.down_at = now + (self.mdi if down is None else down)
        if was_master or self.state in (INIT, FAULT):
            acts.append(RemoveVips())
        self._go(BACKUP, now, reason, acts)
        return acts

    def _to_fault(self, now: float, reason: str) -> list:
        acts: list = []
        if self.state == MASTER:
            acts.append(SendAdvert(RESIGN, self.p.interval))
        acts.append(RemoveVips())
        self.down_at = self.advert_at = self.garp_at = self.fast_at = None
        self.fast_peer = ""
        self.master = ""
        self.master_priority = 0
        self._go(FAULT, now, reason, acts)
        return acts

    # -- inputs ---------------------------------------------------------------------------------

    def start(self, now: float) -> list:
        """Startup event (RFC 6.4.1). VIPs left behind by an earlier run are removed first."""
        self.stopped = False
        self.started_at = now
        self.lower_since = None
        self.mai = self.p.interval
        if self.track_fault:
            return self._to_fault(now, "tracking")
        if self.p.priority == OWNER and not self.held:
            acts: list = [RemoveVips()]
            return acts + self._to_master(now, "owner")
        return self._to_backup(now, "start")

    def adopt(self, now: float) -> list:
        """Startup of a new halbd that takes a master instance over from the old process
        (``halbctl upgrade``): master at once, the VIPs kept where they are (no removal, no
        stale-socket sweep), an advert and gratuitous ARPs right away. Tracking that says
        fault wins, as at any start."""
        self.stopped = False
        self.started_at = now
        self.lower_since = None
        self.mai = self.p.interval
        if self.track_fault:
            return self._to_fault(now, "tracking")
        acts = self._to_master(now, "upgrade: adopted from the old process")
        return [AddVips(adopt=True) if isinstance(a, AddVips) else a for a in acts]

    def release(self, now: float) -> list:
        """The old process of an upgrade lets go without a word: no priority-0 advert, no VIP
        removal, no state change (the new process holds the instance from now on)."""
        self.down_at = self.advert_at = self.garp_at = self.fast_at = None
        self.stopped = True
        return []

    def shutdown(self, now: float) -> list:
        """Shutdown event: a master sends priority 0 and removes its VIPs; back to Initialize."""
        acts: list = []
        if self.state == MASTER:
            acts.append(SendAdvert(RESIGN, self.p.interval))
        if self.state != INIT:
            acts.append(RemoveVips())
            self.down_at = self.advert_at = self.garp_at = self.fast_at = None
            self.master = ""
            old = self.state
            self.state = INIT
            self.since = now
            self.transitions += 1
            acts.append(StateChange(old, INIT, "shutdown"))
        self.stopped = True
        return acts

    def on_advert(self, now: float, src: str, priority: int, interval: float) -> list:
        """A valid advert for this VRID from ``src`` (already checked by the codec)."""
        if self.state == BACKUP:
            return self._backup_advert(now, src, priority, interval)
        if self.state == MASTER:
            return self._master_advert(now, src, priority, interval)
        return []  # init and fault ignore adverts

    def _may_preempt(self, now: float) -> bool:
        if self.held or not (self.p.preempt or self.p.priority == OWNER):
            return False
        if self.p.preempt_delay > 0:
            t0 = max(self.started_at or now, self.lower_since or now)
            return now >= t0 + self.p.preempt_delay
        return True

    def _backup_advert(self, now: float, src: str, priority: int, interval: float) -> list:
        if src == self.fast_peer or src == self.master:
            self.fast_at = None  # the master is alive after all
            self.fast_peer = ""
            self.last_rx = now
        if priority == RESIGN:
            # the master resigns: take over after Skew_Time
            self.down_at = now + self.skew
            if src == self.master:
                self.master = ""
            return []
        lower = priority < self.priority
        if lower:
            if self.lower_since is None or src != self.master:
                self.lower_since = now
        else:
            self.lower_since = None
        if lower and self._may_preempt(now):
            # preempt: discard; Master_Down_Timer runs out and we take over
            return []
        self.mai = interval
        self.master = src
        self.last_rx = now
        self.master_priority = priority
        self.down_at = now + self.mdi
        return []

    def _master_advert(self, now: float, src: str, priority: int, interval: float) -> list:
        if priority == RESIGN:
            # another master resigning: make sure everyone hears us right away
            self.advert_at = now + self.p.interval
            return [SendAdvert(self.priority, self.p.interval)]
        mine = self.priority
        if priority > mine or (priority == mine and _addr_key(src) > _addr_key(self.p.address)):
            # yield, but first one last advert at our priority: the winner then knows there
            # were two masters and re-announces the VIPs to clients that followed us
            acts: list = [SendAdvert(mine, self.p.interval)]
            self.lower_since = None
            acts += self._to_backup(now, f"higher priority master {src} ({priority})", mai=interval,
                                    master=src, master_priority=priority)
            return acts
        # a second, lower master: it yields when it hears us; clients may have followed its
        # gratuitous ARPs, so announce ours now (the RFC discards: it assumes a virtual MAC)
        self.advert_at = now + self.p.interval
        acts = [SendAdvert(mine, self.p.interval)]
        new_episode = self.lower_rx is None or now - self.lower_rx > 3 * self.p.interval
        self.lower_rx = now
        if new_episode or self.lower_garp is None or now - self.lower_garp >= LOWER_GARP_EVERY:
            self.lower_garp = now
            acts.append(Garp(True))
        return acts

    def on_timer(self, now: float) -> list:
        acts: list = []
        if self.state == BACKUP:
            if self.fast_at is not None and now >= self.fast_at:
                return self._to_master(now, f"fast takeover: sync stream from {self.fast_peer} "
                                            "closed and no advert")
            if self.down_at is not None and now >= self.down_at:
                return self._to_master(now, "master down")
        elif self.state == MASTER:
            if self.advert_at is not None and now >= self.advert_at:
                acts.append(SendAdvert(self.priority, self.p.interval))
                # never schedule in the past: a stalled process sends one advert, not a burst
                self.advert_at = max(self.advert_at + self.p.interval, now + self.p.interval / 2)
            if self.garp_at is not None and now >= self.garp_at:
                acts.append(Garp(False))
                self.garp_at = max(self.garp_at + self.p.garp_refresh, now + self.p.garp_refresh / 2)
        return acts

    def set_tracking(self, now: float, fault: bool, delta: int) -> list:
        """New tracking verdict: ``fault`` forces Fault; ``delta`` adjusts the priority."""
        acts: list = []
        old_prio = self.priority
        self.track_delta = delta
        was_fault = self.track_fault
        self.track_fault = fault
        if self.state == INIT:
            return acts
        if fault and self.state != FAULT:
            return self._to_fault(now, "tracking")
        if not fault and was_fault and self.state == FAULT:
            if self.p.priority == OWNER and not self.held:
                return self._to_master(now, "tracking recovered (owner)")
            return self._to_backup(now, "tracking recovered")
        if self.priority != old_prio:
            acts.append(Notify(self.state.upper(), self.priority))
            if self.state == MASTER:
                acts.append(SendAdvert(self.priority, self.p.interval))
                self.advert_at = now + self.p.interval
        return acts

    def set_preempt_hold(self, now: float, hold: bool) -> list:
        self.hold_sync = hold
        return []

    def handover(self, now: float) -> list:
        """Graceful handover: a master sends priority 0, gives up the VIPs and stays backup
        (not preempting) until no master is left. Raises ValueError when not master."""
        if self.state != MASTER:
            raise ValueError(f"not master (state {self.state})")
        acts: list = [SendAdvert(RESIGN, self.p.interval)]
        self.hold_handover = True
        acts += self._to_backup(now, "handover")
        return acts

    def sync_peer_lost(self, now: float, peer: str) -> list:
        """The state-sync stream from ``peer`` closed: if it is our master, expect an advert
        within one Master_Adver_Interval or take over."""
        if self.state == BACKUP and peer and peer == self.master:
            due = max(now, (self.last_rx if self.last_rx is not None else now) + self.mai)
            self.fast_peer = peer
            self.fast_at = due + FAST_MARGIN * self.mai
        return []

    def sync_peer_dead(self, now: float, peer: str) -> list:
        """After its sync stream closed, ``peer``'s host refused a new connection to the sync
        port: its kernel is up and no halbd listens, the process is gone. If it is our master
        and no advert came since the stream closed (the fast takeover is still armed), take
        over now instead of waiting for the next advert to be late."""
        if self.state == BACKUP and peer and peer == self.fast_peer and self.fast_at is not None:
            return self._to_master(now, f"fast takeover: sync stream from {peer} closed and its "
                                        "sync port refuses connections")
        return []

    def sync_peer_seen(self, now: float, peer: str) -> list:
        if peer and peer == self.fast_peer:
            self.fast_at = None
            self.fast_peer = ""
        return []
