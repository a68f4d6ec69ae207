"""The relay = "auto" decision of the TCP listeners: copy while the node has CPU to spare,
splice while it is busy (HAProxy's ``option splice-auto``).

One ``SpliceGate`` per node: the node's ticker feeds it CPU samples four times a second
(``halb.cpu.cpu_quota`` gives the cgroup quota), every ``relay = "auto"`` TCP listener reads
its ``splice`` flag per readiness event, and the metrics read ``splice`` and ``busy`` at scrape
time (``halb_l4_relay_splicing``, ``halb_cpu_busy_ratio``). Pure logic: no I/O, no clock.
"""

from __future__ import annotations


class SpliceGate:
    """Whether ``relay = "auto"`` listeners splice right now: pure logic, fed CPU samples.

    Splicing spares the proxy the two copies of every byte, so it pays when the node's CPU is
    what limits the relay. While the CPU has room, copying through a small buffer moved more
    (measured on loopback with iperf3: copy 1.29x the Gbit/s of splice at 1.1x its CPU per
    byte; with halbd held to 40% of a core, splice 1.22x the Gbit/s of copy). HAProxy's
    ``splice-auto`` copies in the first case too.

    ``busy`` is how short the relay is of CPU over the last sample: the CPU time of the event
    loop's thread as a fraction of one core (the relays run there, the control plane's threads
    do not count), or, under a cgroup quota (``halb.cpu.cpu_quota``, in cores), the whole
    process's CPU time as a fraction of the quota, whichever is larger. The gate opens at
    ``high`` or more and closes again at ``low`` or less; the gap is wider than what splicing
    saves, so it does not flap.
    """

    __slots__ = ("high", "low", "splice", "busy", "_loop", "_proc", "_wall", "changes")

    def __init__(self, high: float = 0.9, low: float = 0.6):
        if not 0.0 < low < high:
            raise ValueError(f"SpliceGate needs 0 < low < high (low={low}, high={high})")
        self.high, self.low = high, low
        self.splice = False
        self.busy = 0.0
        self._loop = self._proc = self._wall = None
        self.changes = 0

    def sample(self, loop_cpu_s: float, process_cpu_s: float, wall_s: float,
               quota: float | None = None) -> bool:
        """Feeds the event loop thread's and the process's CPU time, a monotonic clock and the
        cgroup quota in cores (None: none); returns True if ``splice`` changed."""
        if self._wall is None or wall_s <= self._wall:
            self._loop, self._proc, self._wall = loop_cpu_s, process_cpu_s, wall_s
            return False
        span = wall_s - self._wall
        busy = max(0.0, loop_cpu_s - self._loop) / span
        if quota is not None and quota > 0:
            busy = max(busy, max(0.0, process_cpu_s - self._proc) / (span * quota))
        self.busy = busy
        self._loop, self._proc, self._wall = loop_cpu_s, process_cpu_s, wall_s
        want = busy >= self.high if not self.splice else busy > self.low
        if want != self.splice:
            self.splice = want
            self.changes += 1
            return True
        return False
