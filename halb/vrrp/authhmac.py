"""keepalived's VRRP ``auth_hmac`` trailer (keepalived 2.4, draft-cassen-vrrp-auth-hmac), byte for
byte, so halb and keepalived authenticate each other's adverts.

A 28-byte trailer follows the VRRP message (after the address list)::

    ext_type  1   1 = HMAC-SHA256 truncated to 128 bits
    key_id    1   which configured key verifies it (1..255)
    reserved  2   zero
    sec       4   \\
    subsec    2    > the 64-bit sequence: UTC seconds, a 1/65536 s fraction, a counter
    ctr       2   /
    hmac     16   HMAC-SHA256(key, pseudo || message with checksum 0 || trailer[:12] || 16 zeros)

``pseudo`` is 20 bytes: address family (4 or 6), VRRP version, VRID, a zero byte, then the source
address (zero padded). The IP header is not covered; the VRRP checksum is read as zero, so a
checksum rewritten per unicast destination (or by the kernel, IPv6) does not change the HMAC.
For IPv4 the VRRP checksum covers the message alone, never the trailer; the IP total length
includes it.

Sequence: the sender emits ``max(clock, last + 1)`` where clock is the wall time packed as
``sec << 32 | subsec << 16``; with ``anti_replay = "time"`` a sequence stranded more than the
window ahead of the clock (the clock was stepped back) restarts from the clock. The receiver
(time mode) drops a trailer whose ``sec`` is more than ``time_window`` seconds from its own clock
(``stale``, checked before the HMAC so a replayed flood costs no digest), then verifies the key
and HMAC, then requires the sequence to grow per sender (RFC 1982 serial order; a mark older
than the window expires, so a sender restarted after a clock step is not locked out).

Modes (keepalived's rollout): ``receive-only`` verifies a trailer that is present and sends none,
``permissive`` signs and still accepts adverts without one, ``enforce`` (default) signs and
refuses adverts without a valid trailer.

Pure code: the wall clock is handed in; no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
import time
from typing import Callable

TRAILER = 28
EXT_SHA256 = 1
HMAC_LEN = 16
PSEUDO_LEN = 20
KEY_MIN, KEY_MAX = 32, 64
WINDOW_MIN, WINDOW_MAX, WINDOW_FLOOR = 1, 300, 5
MODES = ("enforce", "permissive", "receive-only")
ANTI_REPLAY = ("time", "monotonic")
MAX_SENDERS = 256  # replay marks kept (per VRID and source); the oldest goes first

_M64 = (1 << 64) - 1
_ZERO_HMAC = bytes(HMAC_LEN)
_PREFIX = struct.Struct("!BBHIHH")  # ext_type, key_id, reserved, sec, subsec, ctr


def default_window(advert_interval: float) -> int:
    """keepalived's default freshness window: 3 advert intervals (whole seconds), 5..300."""
    return min(WINDOW_MAX, max(WINDOW_FLOOR, 3 * int(advert_interval)))


def decode_key(value: str) -> bytes:
    """A key as keepalived writes it: ``hex:`` then hex digits, or the ASCII text itself."""
    if value.startswith("hex:"):
        digits = value[4:]
        try:
            return bytes.fromhex(digits)
        except ValueError:
            raise ValueError(f"invalid hex key ({len(digits)} characters after hex:)") from None
    return value.encode()


def pseudo_header(src: str, vrid: int, version: int = 3) -> bytes:
    ip = ipaddress.ip_address(src)
    return bytes((ip.version, version, vrid, 0)) + ip.packed.ljust(16, b"\0")


def digest(key: bytes, pseudo: bytes, message: bytes, prefix: bytes) -> bytes:
    """The 16-byte truncated HMAC over the pseudo-header, the message with its checksum field
    read as zero, the trailer's first 12 bytes and a zeroed HMAC field."""
    zeroed = message[:6] + b"\0\0" + message[8:]
    return hmac.new(key, pseudo + zeroed + prefix + _ZERO_HMAC, hashlib.sha256).digest()[:HMAC_LEN]


def clock_seq(now_ns: int) -> int:
    sec, ns = divmod(now_ns, 1_000_000_000)
    return ((sec & 0xFFFFFFFF) << 32) | (((ns << 16) // 1_000_000_000) << 16)


def seq_after(a: int, b: int) -> bool:
    """``a`` comes after ``b`` in 64-bit serial number order (RFC 1982)."""
    d = (a - b) & _M64
    return 0 < d < (1 << 63)


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


class HmacAuth:
    """One VRRP instance's ``auth_hmac``: its keys, mode, send sequence and replay marks."""

    def __init__(self, keys: dict[int, bytes], active_key: int, *, mode: str = "enforce",
                 anti_replay: str = "time", time_window: int = WINDOW_FLOOR,
                 now_ns: Callable[[], int] = time.time_ns, max_senders: int = MAX_SENDERS):
        for kid, k in keys.items():
            if not 1 <= kid <= 255:
                raise ValueError(f"key id {kid} not in 1..255")
            if not KEY_MIN <= len(k) <= KEY_MAX:
                raise ValueError(f"key {kid}: {len(k)} bytes, not in {KEY_MIN}..{KEY_MAX}")
        if active_key not in keys:
            raise ValueError(f"active_key {active_key} is not one of the keys")
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if anti_replay not in ANTI_REPLAY:
            raise ValueError(f"anti_replay {anti_replay!r} is not time or monotonic")
        if not WINDOW_MIN <= time_window <= WINDOW_MAX:
            raise ValueError(f"time_window {time_window} not in {WINDOW_MIN}..{WINDOW_MAX}")
        self.keys = dict(keys)
        self.active_key = active_key
        self.mode = mode
        self.time_mode = anti_replay == "time"
        self.window = time_window
        self.now_ns = now_ns
        self.max_senders = max_senders
        self.send_seq = 0
        self._marks: dict[tuple[int, str], int] = {}  # (vrid, source) -> last accepted sequence
        self.last_skew = 0  # seconds, of the last trailer checked in time mode

    @property
    def signs(self) -> bool:
        return self.mode != "receive-only"

    @property
    def accepts_unsigned(self) -> bool:
        return self.mode != "enforce"

    def next_seq(self) -> int:
        clk = clock_seq(self.now_ns())
        if seq_after(clk, self.send_seq):
            self.send_seq = clk
            return clk
        ahead = _s32((self.send_seq >> 32) - (clk >> 32))
        if self.time_mode and ahead > self.window:
            self.send_seq = clk  # the clock was stepped back: receivers would call us stale
        else:
            self.send_seq = (self.send_seq + 1) & _M64
        return self.send_seq

    def trailer(self, message: bytes, src: str, vrid: int, version: int = 3) -> bytes:
        """The trailer that signs ``message`` (the VRRP message, any checksum) from ``src``."""
        seq = self.next_seq()
        prefix = _PREFIX.pack(EXT_SHA256, self.active_key, 0, seq >> 32, (seq >> 16) & 0xFFFF,
                              seq & 0xFFFF)
        return prefix + digest(self.keys[self.active_key], pseudo_header(src, vrid, version),
                               message, prefix)

    def check(self, message: bytes, trailer: bytes, src: str, vrid: int,
              version: int = 3) -> str | None:
        """None if ``trailer`` authenticates ``message`` from ``src``; else the reason
        (``auth_malformed``, ``auth_stale``, ``auth_unknown_key``, ``auth_mac``,
        ``auth_replay``). The replay mark moves only for a verified trailer."""
        if len(trailer) != TRAILER:
            return "auth_malformed"
        ext, kid, reserved, sec, subsec, ctr = _PREFIX.unpack_from(trailer)
        if ext != EXT_SHA256 or reserved:
            return "auth_malformed"
        seq = (sec << 32) | (subsec << 16) | ctr
        now_sec = self.now_ns() // 1_000_000_000
        if self.time_mode:
            skew = _s32(now_sec - sec)
            self.last_skew = skew
            if not -self.window <= skew <= self.window:
                return "auth_stale"
        key = self.keys.get(kid)
        if key is None:
            return "auth_unknown_key"
        want = digest(key, pseudo_header(src, vrid, version), message, trailer[:12])
        if not hmac.compare_digest(want, trailer[12:]):
            return "auth_mac"
        k = (vrid, src)
        mark = self._marks.get(k)
        if mark is not None and self.time_mode:
            age = _s32(now_sec - (mark >> 32))
            if not -self.window <= age <= self.window:
                mark = None  # outside the window it orders nothing the window lets through
        if mark is not None and not seq_after(seq, mark):
            return "auth_replay"
        self._marks.pop(k, None)
        if len(self._marks) >= self.max_senders:
            self._marks.pop(next(iter(self._marks)))
        self._marks[k] = seq
        return None
