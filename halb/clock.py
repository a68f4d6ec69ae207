"""Injected time. Logic never reads the clock itself; it is handed ``now``.

``monotonic`` is for timers (election, health, timeouts); ``wall`` is for values that cross
process boundaries (replicated table timestamps), where monotonic clocks do not agree.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...


class MonotonicClock:
    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()


class WallClock:
    __slots__ = ()

    def now(self) -> float:
        return time.time()


class FakeClock:
    """A clock for tests: starts at ``start`` and moves only when told."""

    __slots__ = ("t",)

    def __init__(self, start: float = 1000.0):
        self.t = float(start)

    def now(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t
