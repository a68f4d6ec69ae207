"""VRRPv3 adverts on the wire (RFC 9568), IPv4 and IPv6, built and parsed with scapy's ``VRRPv3``.

IPv6 adverts go to ff02::12 from the interface's link-local address with hop limit 255 and
carry 16-byte addresses; their checksum always includes the IPv6 pseudo-header (RFC 9568
section 5.2.8, RFC 8200 section 8.1: source, destination, upper-layer length, next header 112),
which is what keepalived sends too, so the ``checksum`` setting below applies to IPv4 only. A
raw IPv6 socket delivers the payload alone: the caller rebuilds the fixed 40-byte header from
the ancillary data (``ipv6_header``) and hands ``Decoder.decode`` the whole packet, so both
families take one path.

Two checksum settings (IPv4):

- ``rfc9568``: the 16-bit one's complement of the one's complement sum of the VRRP message
  alone (RFC 9568 section 5.2.8; no pseudo-header);
- ``keepalived``: the same sum with the IPv4 pseudo-header (source, destination, zero, protocol
  112, VRRP length) in front, what keepalived sends and what scapy computes by default.

Optional HMAC-SHA256 authentication (halb to halb, not part of VRRP): a 40-byte trailer after
the address list::

    counter  8 bytes, big endian: nanoseconds since the epoch at send time, strictly
             increasing per sender (a restarted sender continues from the wall clock, so it is
             never locked out; a sender whose clock jumps back is refused until it catches up)
    mac     32 bytes: HMAC-SHA256(key, source address (4) || VRRP message with checksum 0 || counter)

The checksum then covers the VRRP message and the trailer, so any IP-level receiver sees a
consistent datagram. A receiver with a key refuses adverts without the trailer, with a bad MAC
or with a counter not greater than the last one accepted from that source.

keepalived's ``auth_hmac`` trailer (28 bytes, ``halb.vrrp.authhmac``; the VRRP checksum covers
the message alone) is the other, interoperable choice: an instance has one or the other.

The receive path (``Decoder.decode``) runs the cheap checks on raw bytes first (size, TTL,
protocol, version/type, known VRID, length, checksum, MAC, replay) and only then hands the
packet to scapy; an invalid packet gives ``Invalid(reason)`` and is never an exception.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import ipaddress
import struct
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from scapy.layers.inet import IP, checksum
from scapy.layers.inet6 import IPv6
from scapy.layers.vrrp import VRRPv3

from .authhmac import TRAILER as HMAC_TRAILER
from .authhmac import HmacAuth

PROTO = 112
GROUP = "224.0.0.18"
GROUP6 = "ff02::12"
TTL = 255
VERSION = 3
TYPE_ADVERT = 1
AUTH_TRAILER = 40
MAX_INTERVAL_CS = 4095

# every reason an advert can be refused (metric label values)
REASONS = ("short", "not_ipv4", "protocol", "ttl", "version", "type", "vrid", "length",
           "checksum", "checksum_mode", "interval", "addresses", "auth_missing", "auth_mac",
           "auth_replay", "auth_malformed", "auth_stale", "auth_unknown_key", "unknown_peer",
           "own_address", "parse")
CHECKSUM_MODES = ("rfc9568", "keepalived")


@dataclass(frozen=True, slots=True)
class Advert:
    """One received (or to be sent) advert."""

    src: str
    dst: str
    vrid: int
    priority: int
    interval: float  # seconds (centiseconds on the wire)
    addresses: tuple[str, ...]
    ttl: int = TTL
    counter: int | None = None  # authentication counter, when present


@dataclass(frozen=True, slots=True)
class Invalid:
    reason: str
    detail: str = ""


def to_centis(interval: float) -> int:
    cs = int(round(interval * 100))
    if not 1 <= cs <= MAX_INTERVAL_CS:
        raise ValueError(f"advert interval {interval}s out of range (0.01..40.95)")
    return cs


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    return checksum(data)


def is_v6(addr: str) -> bool:
    return ":" in addr


def pseudo_header(src: str, dst: str, length: int) -> bytes:
    if is_v6(src):  # RFC 8200 section 8.1
        return (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
                + struct.pack("!I3xB", length, PROTO))
    return (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
            + struct.pack("!BBH", 0, PROTO, length))


def ipv6_header(src: bytes, dst: bytes, hop_limit: int, payload_len: int) -> bytes:
    """The fixed IPv6 header (packed addresses) of a packet carrying ``payload_len`` bytes of
    VRRP: what a raw socket's recvmsg leaves out."""
    return struct.pack("!IHBB", 0x60000000, payload_len, PROTO, hop_limit) + src + dst


def source_of(packet: bytes) -> str:
    """The source address of an IPv4 or IPv6 packet ("" when too short to tell)."""
    if len(packet) >= 40 and packet[0] >> 4 == 6:
        return str(ipaddress.IPv6Address(packet[8:24]))
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        return str(ipaddress.IPv4Address(packet[12:16]))
    return ""


def vrrp_checksum(payload: bytes, src: str, dst: str, mode: str) -> int:
    """The checksum of ``payload`` (checksum field zeroed) in setting ``mode`` (IPv6: always
    with the pseudo-header)."""
    if is_v6(src):
        if mode not in CHECKSUM_MODES:
            raise ValueError(f"unknown checksum mode {mode!r}")
        return inet_checksum(pseudo_header(src, dst, len(payload)) + payload)
    if mode == "rfc9568":
        return inet_checksum(payload)
    if mode == "keepalived":
        return inet_checksum(pseudo_header(src, dst, len(payload)) + payload)
    raise ValueError(f"unknown checksum mode {mode!r}")


def _with_checksum(payload: bytes, ck: int) -> bytes:
    return payload[:6] + struct.pack("!H", ck) + payload[8:]


def _mac(key: bytes, src: str, message: bytes, counter: int) -> bytes:
    zeroed = message[:6] + b"\0\0" + message[8:]
    return hmac.new(key, ipaddress.ip_address(src).packed + zeroed + struct.pack("!Q", counter),
                    hashlib.sha256).digest()


def build_payload(*, vrid: int, priority: int, interval: float, addresses: Iterable[str],
                  src: str, dst: str, mode: str = "rfc9568", key: bytes = b"",
                  counter: int | None = None) -> bytes:
    """The VRRP message (the IP payload) of one advert, checksum filled in for ``mode``.

    With ``key``, the authentication trailer is appended (``counter`` defaults to now in ns).
    """
    addrs = list(addresses)
    under = IPv6(src=src, dst=dst, hlim=TTL, nh=PROTO) if is_v6(src) else \
        IP(src=src, dst=dst, ttl=TTL, proto=PROTO)
    pkt = under / VRRPv3(
        version=VERSION, type=TYPE_ADVERT, vrid=vrid, priority=priority,
        adv=to_centis(interval), addrlist=addrs, chksum=0)
    message = bytes(pkt[VRRPv3])
    if key:
        if counter is None:
            counter = time.time_ns()
        message = message + struct.pack("!Q", counter) + _mac(key, src, message, counter)
    return _with_checksum(message, vrrp_checksum(message, src, dst, mode))


def build_packet(*, src: str, dst: str, ttl: int = TTL, **kw) -> bytes:
    """A whole IPv4 or IPv6 packet (header by scapy) carrying ``build_payload(...)``, for
    tests/tools."""
    payload = build_payload(src=src, dst=dst, **kw)
    if is_v6(src):
        return bytes(IPv6(src=src, dst=dst, hlim=ttl, nh=PROTO) / payload)
    return bytes(IP(src=src, dst=dst, ttl=ttl, proto=PROTO) / payload)


class Signer:
    """Builds adverts for one instance, caching the scapy build per (priority, interval, dst)."""

    def __init__(self, vrid: int, addresses: Iterable[str], src: str, mode: str, key: bytes = b"",
                 now_ns: Callable[[], int] = time.time_ns, hmac_auth: HmacAuth | None = None):
        self.vrid = vrid
        self.hmac_auth = hmac_auth  # keepalived's auth_hmac (signs unless receive-only)
        self.addresses = tuple(addresses)
        self.src = src
        self.mode = mode
        self.key = key
        self._now_ns = now_ns
        self._last = 0
        self._cache: dict[tuple[int, int, str], bytes] = {}

    def payload(self, priority: int, interval: float, dst: str) -> bytes:
        cs = to_centis(interval)
        k = (priority, cs, dst)
        base = self._cache.get(k)
        if base is None:
            if len(self._cache) > 64:
                self._cache.clear()
            base = build_payload(vrid=self.vrid, priority=priority, interval=cs / 100,
                                 addresses=self.addresses, src=self.src, dst=dst, mode=self.mode)
            self._cache[k] = base
        ah = self.hmac_auth
        if ah is not None:
            # the checksum (in base) covers the message alone; the HMAC reads it as zero
            return base + ah.trailer(base, self.src, self.vrid) if ah.signs else base
        if not self.key:
            return base
        counter = max(self._now_ns(), self._last + 1)
        self._last = counter
        message = _with_checksum(base, 0)
        message = message + struct.pack("!Q", counter) + _mac(self.key, self.src, message, counter)
        return _with_checksum(message, vrrp_checksum(message, self.src, dst, self.mode))


class Decoder:
    """Validates received IPv4 or IPv6 packets for the VRIDs of one interface and family.

    ``vrids`` maps VRID -> (expected addresses tuple, checksum mode, key bytes, peers or None,
    keepalived auth_hmac or None).
    ``decode(packet)`` returns an ``Advert`` or an ``Invalid``; it never raises.
    """

    MAX_SENDERS = 256  # replay state is kept for at most this many sources
    MAX_PARSED = 256  # parsed adverts remembered (a steady master needs one)

    def __init__(self):
        self.vrids: dict[int, tuple[tuple[str, ...], str, bytes, frozenset[str] | None,
                                    HmacAuth | None]] = {}
        self._last_counter: dict[tuple[int, str], int] = {}
        self.invalid: collections.Counter[str] = collections.Counter()  # reason -> count
        self.last_invalid: tuple[int | None, Invalid] | None = None  # (known VRID, why)
        self._vrid: int | None = None
        self._parsed: dict[tuple[str, str, bytes], Advert | Invalid] = {}

    def add(self, vrid: int, addresses: Iterable[str], mode: str, key: bytes = b"",
            peers: Iterable[str] | None = None, hmac_auth: HmacAuth | None = None) -> None:
        if key and hmac_auth is not None:
            raise ValueError("an instance has halb's auth_key or auth_hmac, not both")
        self.vrids[vrid] = (tuple(addresses), mode, key,
                            frozenset(peers) if peers is not None else None, hmac_auth)

    def decode(self, packet: bytes) -> Advert | Invalid:
        self._vrid = None
        try:
            r = self._decode(packet)
        except Exception as e:  # noqa: BLE001 - a packet must never be fatal
            r = Invalid("parse", repr(e)[:200])
        if isinstance(r, Invalid):
            self.invalid[r.reason] += 1
            self.last_invalid = (self._vrid, r)
        return r

    def _decode(self, packet: bytes) -> Advert | Invalid:
        n = len(packet)
        if n < 20:
            return Invalid("short", f"{n} bytes")
        version = packet[0] >> 4
        if version == 6:
            # the fixed header only: a raw socket's packet is rebuilt as such (ipv6_header),
            # and an extension header in a captured one reads as another protocol
            if n < 48:
                return Invalid("short", f"{n} bytes")
            if packet[6] != PROTO:
                return Invalid("protocol", str(packet[6]))
            ihl, alen = 40, 16
            total = 40 + struct.unpack_from("!H", packet, 4)[0]
            ttl = packet[7]
            src = str(ipaddress.IPv6Address(packet[8:24]))
            dst = str(ipaddress.IPv6Address(packet[24:40]))
        elif version == 4:
            ihl, alen = (packet[0] & 0x0F) * 4, 4
            if ihl < 20 or n < ihl + 8:
                return Invalid("short", f"{n} bytes, header {ihl}")
            if packet[9] != PROTO:
                return Invalid("protocol", str(packet[9]))
            total = struct.unpack_from("!H", packet, 2)[0]
            ttl = packet[8]
            src = str(ipaddress.IPv4Address(packet[12:16]))
            dst = str(ipaddress.IPv4Address(packet[16:20]))
        else:
            return Invalid("not_ipv4", f"IP version {version}")
        if total > n or total < ihl + 8:
            return Invalid("length", f"ip total length {total}, got {n}")
        if ttl != TTL:
            return Invalid("ttl", f"{ttl} from {src}")
        payload = packet[ihl:total]
        vt = payload[0]
        if vt >> 4 != VERSION:
            return Invalid("version", f"{vt >> 4} from {src}")
        if vt & 0x0F != TYPE_ADVERT:
            return Invalid("type", f"{vt & 0x0F} from {src}")
        vrid = payload[1]
        conf = self.vrids.get(vrid)
        if conf is None:
            return Invalid("vrid", f"{vrid} from {src}")
        self._vrid = vrid
        expected, mode, key, peers, ah = conf
        if peers is not None and src not in peers:
            return Invalid("unknown_peer", src)
        count = payload[3]
        if ah is not None:
            return self._decode_hmac(packet, payload, total, expected, mode, ah, src, dst, ttl,
                                     alen)
        want = 8 + alen * count + (AUTH_TRAILER if key else 0)
        if len(payload) != want:
            if key and len(payload) == want - AUTH_TRAILER:
                return Invalid("auth_missing", src)
            return Invalid("length", f"{len(payload)} bytes for {count} addresses from {src}")
        bad = self._checksum(payload, src, dst, mode)
        if bad is not None:
            return bad
        interval_cs = struct.unpack_from("!H", payload, 4)[0] & 0x0FFF
        if interval_cs == 0:
            return Invalid("interval", f"0 from {src}")
        counter = None
        if key:
            end = 8 + alen * count
            message, counter = payload[:end], struct.unpack_from("!Q", payload, end)[0]
            if not hmac.compare_digest(_mac(key, src, message, counter), payload[end + 8:]):
                return Invalid("auth_mac", src)
            k = (vrid, src)
            last = self._last_counter.get(k)
            if last is not None and counter <= last:
                return Invalid("auth_replay", f"counter {counter} <= {last} from {src}")
            if last is None and len(self._last_counter) >= self.MAX_SENDERS:
                self._last_counter.pop(next(iter(self._last_counter)))
            self._last_counter[k] = counter
        r = self._cached_parse(packet, total, payload[:8 + alen * count], expected, src, dst, ttl)
        if counter is not None and isinstance(r, Advert):
            r = dataclasses.replace(r, counter=counter)
        return r

    @staticmethod
    def _checksum(message: bytes, src: str, dst: str, mode: str) -> Invalid | None:
        if vrrp_checksum(message, src, dst, mode) == 0:  # a correct message sums to zero
            return None
        other = CHECKSUM_MODES[1] if mode == CHECKSUM_MODES[0] else CHECKSUM_MODES[0]
        if vrrp_checksum(message, src, dst, other) == 0:
            # a sound advert summed the other way: a peer (keepalived?) with the other
            # setting. Still refused (accepting one way only would not end a split brain:
            # the peer drops ours), but named as what it is
            return Invalid("checksum_mode", f"from {src}: its checksum is of the {other!r} "
                                            f"kind, this instance has checksum = {mode!r}")
        return Invalid("checksum", f"from {src} ({mode})")

    def _decode_hmac(self, packet: bytes, payload: bytes, total: int, expected: tuple[str, ...],
                     mode: str, ah: HmacAuth, src: str, dst: str, ttl: int,
                     alen: int) -> Advert | Invalid:
        """The rest of the checks for an instance with keepalived's auth_hmac: the trailer is
        optional on the wire (its length tells), the checksum covers the message alone."""
        end = 8 + alen * payload[3]
        n = len(payload)
        if n not in (end, end + HMAC_TRAILER):
            return Invalid("length", f"{n} bytes for {payload[3]} addresses from {src}")
        message = payload[:end]
        bad = self._checksum(message, src, dst, mode)
        if bad is not None:
            return bad
        if struct.unpack_from("!H", payload, 4)[0] & 0x0FFF == 0:
            return Invalid("interval", f"0 from {src}")
        if n == end:
            if not ah.accepts_unsigned:
                return Invalid("auth_missing", f"from {src} (auth_hmac mode = \"enforce\")")
        else:
            why = ah.check(message, payload[end:], src, payload[1])
            if why is not None:
                detail = f"from {src}"
                if why == "auth_stale":
                    detail += f": clock skew {ah.last_skew} s outside time_window {ah.window} s"
                elif why == "auth_unknown_key":
                    detail += f": key id {payload[end + 1]}"
                return Invalid(why, detail)
        return self._cached_parse(packet, total, message, expected, src, dst, ttl)

    def _cached_parse(self, packet: bytes, total: int, message: bytes, expected: tuple[str, ...],
                      src: str, dst: str, ttl: int) -> Advert | Invalid:
        # the cheap checks passed: let scapy parse the packet. A master sends the same advert
        # again and again, so the verdict is kept per (source, destination, message): a
        # steady stream costs no parsing at all (an authentication trailer, checked before,
        # is not part of the key)
        key = (src, dst, message)
        r = self._parsed.get(key)
        if r is None:
            r = self._parse(packet[:total], expected, src, dst, ttl)
            if len(self._parsed) >= self.MAX_PARSED:
                self._parsed.clear()
            self._parsed[key] = r
        return r

    @staticmethod
    def _parse(packet: bytes, expected: tuple[str, ...], src: str, dst: str,
               ttl: int) -> Advert | Invalid:
        v = (IPv6(packet) if packet[0] >> 4 == 6 else IP(packet))[VRRPv3]
        addrs = tuple(v.addrlist)
        prio = v.priority
        if prio != 255 and expected and set(addrs) != set(expected):
            return Invalid("addresses", f"{','.join(addrs)} from {src}")
        return Advert(src=src, dst=dst, vrid=v.vrid, priority=prio, interval=v.adv / 100,
                      addresses=addrs, ttl=ttl)

