"""VRRPv3 codec: round trips, both checksum settings, every invalid-packet class, HMAC auth."""

from __future__ import annotations

import random
import struct

import pytest
from scapy.layers.inet import IP, in4_chksum
from scapy.layers.vrrp import VRRPv3

from halb.vrrp import codec
from halb.vrrp.codec import Advert, Decoder, Invalid, Signer, build_packet, build_payload

pytestmark = pytest.mark.unit

SRC, DST = "198.18.40.11", "224.0.0.18"
VIPS = ["198.18.40.100", "198.18.40.101"]
KEY = b"correct horse battery"


def ref_sum(data: bytes) -> int:
    """RFC 1071 written out independently of the code under test."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def pkt(**kw) -> bytes:
    args = dict(src=SRC, dst=DST, vrid=40, priority=100, interval=0.1, addresses=VIPS,
                mode="rfc9568")
    args.update(kw)
    return build_packet(**args)


def dec(mode="rfc9568", key=b"", peers=None, vrid=40, vips=VIPS) -> Decoder:
    d = Decoder()
    d.add(vrid, vips, mode, key, peers)
    return d


def with_checksum(packet: bytes, mode: str) -> bytes:
    """``packet`` with its VRRP checksum recomputed (after a test tampered with it)."""
    p = bytearray(packet)
    p[26:28] = b"\0\0"
    payload = bytes(p[20:])
    ck = ref_sum(payload) if mode == "rfc9568" else ref_sum(codec.pseudo_header(SRC, DST, len(payload)) + payload)
    p[26:28] = struct.pack("!H", ck)
    return bytes(p)


# -- known vectors and checksum settings ----------------------------------------------------------


def test_known_vector_both_settings():
    # VRRPv3, VRID 40, priority 100, one address, 10 cs; sums worked out by hand:
    # message words 3128 6401 000a 0000 c612 2864 -> sum 83aa -> checksum 7c55 (rfc9568);
    # + pseudo-header c612 280b e000 0012 0070 000c -> checksum ada8 (keepalived)
    p = build_payload(vrid=40, priority=100, interval=0.1, addresses=["198.18.40.100"],
                      src=SRC, dst=DST, mode="rfc9568")
    assert p.hex() == "31286401000a7c55c6122864"
    k = build_payload(vrid=40, priority=100, interval=0.1, addresses=["198.18.40.100"],
                      src=SRC, dst=DST, mode="keepalived")
    assert k.hex() == "31286401000aada8c6122864"


@pytest.mark.parametrize("vrid,prio,interval,addrs", [
    (1, 1, 0.01, ["10.0.0.1"]), (40, 100, 1.0, VIPS), (255, 255, 40.95, ["198.18.40.199"] * 3),
    (7, 254, 0.35, [f"198.18.40.{100 + i}" for i in range(20)]),
])
def test_keepalived_setting_matches_scapy_default(vrid, prio, interval, addrs):
    ours = build_payload(vrid=vrid, priority=prio, interval=interval, addresses=addrs,
                         src=SRC, dst=DST, mode="keepalived")
    theirs = bytes(IP(src=SRC, dst=DST, ttl=255) / VRRPv3(vrid=vrid, priority=prio,
                                                         adv=round(interval * 100), addrlist=addrs))[20:]
    assert ours == theirs
    zeroed = ours[:6] + b"\0\0" + ours[8:]
    assert struct.unpack("!H", ours[6:8])[0] == ref_sum(codec.pseudo_header(SRC, DST, len(ours)) + zeroed)
    assert struct.unpack("!H", ours[6:8])[0] == in4_chksum(112, IP(src=SRC, dst=DST), zeroed)


@pytest.mark.parametrize("vrid,prio,interval", [(1, 1, 0.01), (40, 100, 1.0), (200, 255, 40.95)])
def test_rfc9568_setting_has_no_pseudo_header(vrid, prio, interval):
    p = build_payload(vrid=vrid, priority=prio, interval=interval, addresses=VIPS,
                      src=SRC, dst=DST, mode="rfc9568")
    zeroed = p[:6] + b"\0\0" + p[8:]
    assert struct.unpack("!H", p[6:8])[0] == ref_sum(zeroed)
    assert ref_sum(p) == 0


@pytest.mark.parametrize("mode", ["rfc9568", "keepalived"])
def test_round_trip(mode):
    for vrid, prio, interval in [(1, 1, 0.01), (40, 100, 0.1), (255, 0, 40.95), (9, 255, 3.0)]:
        d = dec(mode, vrid=vrid)
        a = d.decode(pkt(vrid=vrid, priority=prio, interval=interval, mode=mode))
        assert a == Advert(src=SRC, dst=DST, vrid=vrid, priority=prio, interval=interval,
                           addresses=tuple(VIPS), ttl=255)
    assert not d.invalid


def test_interval_out_of_range_refused_on_build():
    for bad in (0.0, 0.004, 41.0):
        with pytest.raises(ValueError):
            codec.to_centis(bad)


# -- invalid packets: each class rejected and counted ---------------------------------------------


def _set(packet: bytes, offset: int, value: bytes) -> bytes:
    return packet[:offset] + value + packet[offset + len(value):]


def _ip_ttl(ttl: int) -> bytes:
    return bytes(IP(src=SRC, dst=DST, ttl=ttl, proto=112) / pkt()[20:])


INVALID = [
    ("short", lambda: pkt()[:18]),
    ("short", lambda: pkt()[:25]),
    ("not_ipv4", lambda: b"\x50" + pkt()[1:]),  # neither IPv4 nor IPv6
    ("protocol", lambda: bytes(IP(src=SRC, dst=DST, ttl=255, proto=17) / pkt()[20:])),
    ("length", lambda: pkt()[:-4]),  # IP total length says more than arrived
    ("ttl", lambda: _ip_ttl(64)),
    ("ttl", lambda: _ip_ttl(254)),
    ("version", lambda: with_checksum(_set(pkt(), 20, b"\x21"), "rfc9568")),
    ("type", lambda: with_checksum(_set(pkt(), 20, b"\x32"), "rfc9568")),
    ("vrid", lambda: pkt(vrid=41)),
    ("length", lambda: bytes(IP(src=SRC, dst=DST, ttl=255, proto=112) / (pkt()[20:] + b"\0\0\0\0"))),
    ("length", lambda: with_checksum(_set(pkt(), 23, b"\x03"), "rfc9568")),  # count says 3
    ("checksum", lambda: _set(pkt(), 26, b"\x12\x34")),
    ("checksum_mode", lambda: pkt(mode="keepalived")),  # the other setting, named
    ("interval", lambda: with_checksum(_set(pkt(), 24, b"\x00\x00"), "rfc9568")),
    ("addresses", lambda: pkt(addresses=["198.18.40.100", "198.18.40.150"])),
]


@pytest.mark.parametrize("reason,make", INVALID, ids=[f"{r}-{i}" for i, (r, _) in enumerate(INVALID)])
def test_invalid_rejected_and_counted(reason, make):
    d = dec()
    r = d.decode(make())
    assert isinstance(r, Invalid) and r.reason == reason, r
    assert d.invalid[reason] == 1 and sum(d.invalid.values()) == 1
    assert reason in codec.REASONS


def test_invalid_known_vrid_is_attributed():
    d = dec()
    d.decode(_set(pkt(), 26, b"\x12\x34"))
    assert d.last_invalid[0] == 40 and d.last_invalid[1].reason == "checksum"
    d.decode(pkt(vrid=41))
    assert d.last_invalid[0] is None


def test_owner_may_send_other_addresses():
    a = dec().decode(pkt(priority=255, addresses=["198.18.40.150"]))
    assert isinstance(a, Advert) and a.priority == 255


def test_keepalived_setting_rejects_rfc9568_checksum():
    assert dec("keepalived").decode(pkt(mode="rfc9568")).reason == "checksum_mode"
    assert isinstance(dec("keepalived").decode(pkt(mode="keepalived")), Advert)


def test_unicast_peers_filter():
    d = dec(peers=["198.18.40.12"])
    assert d.decode(pkt()).reason == "unknown_peer"
    assert isinstance(dec(peers=[SRC]).decode(pkt()), Advert)


def test_fuzz_never_raises():
    rnd = random.Random(4)
    good = pkt()
    d = dec()
    for i in range(3000):
        b = bytearray(good)
        for _ in range(rnd.randint(1, 6)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        if i % 5 == 0:
            b = b[:rnd.randrange(len(b) + 1)]
        r = d.decode(bytes(b))
        assert isinstance(r, (Advert, Invalid))
    r = d.decode(good)
    assert isinstance(r, Advert)
    assert sum(d.invalid.values()) > 2500


# -- authentication -------------------------------------------------------------------------------


def auth_pkt(signer: Signer, prio=100, dst=DST) -> bytes:
    return bytes(IP(src=SRC, dst=dst, ttl=255, proto=112) / signer.payload(prio, 0.1, dst))


def test_auth_accept_then_replay_rejected():
    s = Signer(40, VIPS, SRC, "rfc9568", KEY)
    d = dec(key=KEY)
    p1, p2 = auth_pkt(s), auth_pkt(s)
    a1 = d.decode(p1)
    assert isinstance(a1, Advert) and a1.counter is not None
    assert isinstance(d.decode(p2), Advert)
    assert d.decode(p1).reason == "auth_replay"
    assert d.decode(p2).reason == "auth_replay"
    assert d.invalid["auth_replay"] == 2


@pytest.mark.parametrize("mode", ["rfc9568", "keepalived"])
def test_auth_checksum_covers_trailer(mode):
    s = Signer(40, VIPS, SRC, mode, KEY)
    payload = s.payload(100, 0.1, DST)
    assert len(payload) == 8 + 4 * len(VIPS) + codec.AUTH_TRAILER
    assert codec.vrrp_checksum(payload, SRC, DST, mode) == 0


def test_auth_wrong_key_or_tampering_rejected():
    s = Signer(40, VIPS, SRC, "rfc9568", b"another key!")
    assert dec(key=KEY).decode(auth_pkt(s)).reason == "auth_mac"
    good = Signer(40, VIPS, SRC, "rfc9568", KEY)
    tampered = with_checksum(_set(auth_pkt(good), 22, b"\xfe"), "rfc9568")  # priority 254
    assert dec(key=KEY).decode(tampered).reason == "auth_mac"


def test_auth_missing_rejected_and_unexpected_trailer_refused():
    assert dec(key=KEY).decode(pkt()).reason == "auth_missing"
    s = Signer(40, VIPS, SRC, "rfc9568", KEY)
    assert dec().decode(auth_pkt(s)).reason == "length"


def test_auth_restarted_sender_is_not_locked_out():
    clock = [1_700_000_000_000_000_000]
    s1 = Signer(40, VIPS, SRC, "rfc9568", KEY, now_ns=lambda: clock[0])
    d = dec(key=KEY)
    for _ in range(5):
        assert isinstance(d.decode(auth_pkt(s1)), Advert)  # same ns: counter still increases
    clock[0] += 2_000_000_000
    s2 = Signer(40, VIPS, SRC, "rfc9568", KEY, now_ns=lambda: clock[0])  # restart
    assert isinstance(d.decode(auth_pkt(s2)), Advert)
    old = Signer(40, VIPS, SRC, "rfc9568", KEY, now_ns=lambda: clock[0] - 10**9)
    assert d.decode(auth_pkt(old)).reason == "auth_replay"


def test_replay_state_is_bounded():
    d = dec(key=KEY)
    for i in range(Decoder.MAX_SENDERS + 50):
        src = f"198.18.{41 + i // 250}.{i % 250 + 1}"
        s = Signer(40, VIPS, src, "rfc9568", KEY)
        p = bytes(IP(src=src, dst=DST, ttl=255, proto=112) / s.payload(100, 0.1, DST))
        assert isinstance(d.decode(p), Advert)
    assert len(d._last_counter) <= Decoder.MAX_SENDERS


def test_repeated_adverts_are_parsed_once_but_always_checked():
    d = dec()
    good = pkt()
    first = d.decode(good)
    assert d.decode(good) == first and len(d._parsed) == 1
    # the cheap checks still run on every packet: same message, other TTL or checksum
    assert d.decode(_ip_ttl(64)).reason == "ttl"
    assert d.decode(_set(good, 26, b"\x12\x34")).reason == "checksum"
    bad = pkt(addresses=["198.18.40.150"])
    assert d.decode(bad).reason == "addresses" and d.decode(bad).reason == "addresses"
    assert d.invalid["addresses"] == 2
    for i in range(Decoder.MAX_PARSED + 10):  # bounded
        d.decode(pkt(priority=1 + i % 254, interval=0.01 * (1 + i // 254)))
    assert len(d._parsed) <= Decoder.MAX_PARSED


# -- IPv6 (RFC 9568: ff02::12, hop limit 255, 16-byte addresses, pseudo-header checksum) ---------

SRC6, DST6 = "fe80::a", "ff02::12"
VIPS6 = ["fe80::1", "2001:2::100"]


def pkt6(**kw) -> bytes:
    args = dict(src=SRC6, dst=DST6, vrid=40, priority=100, interval=1.0, addresses=VIPS6)
    args.update(kw)
    return build_packet(**args)


def _v6(payload: bytes, src: str = SRC6) -> bytes:
    from scapy.layers.inet6 import IPv6
    return bytes(IPv6(src=src, dst=DST6, hlim=255, nh=112) / payload)


def dec6(**kw) -> Decoder:
    return dec(vips=VIPS6, **kw)


def with_checksum6(packet: bytes) -> bytes:
    p = bytearray(packet)
    p[46:48] = b"\0\0"
    payload = bytes(p[40:])
    pseudo = bytes(p[8:40]) + struct.pack("!I", len(payload)) + b"\0\0\0\x70"
    p[46:48] = struct.pack("!H", ref_sum(pseudo + payload))
    return bytes(p)


def test_ipv6_known_vector():
    # written out by hand: version 3 type 1, vrid 40, priority 100, 2 addresses, 100 cs,
    # checksum over the IPv6 pseudo-header (fe80::a, ff02::12, length 40, next header 112)
    want = bytes.fromhex("31 28 64 02 00 64 4c b4"
                         "fe80 0000 0000 0000 0000 0000 0000 0001"
                         "2001 0002 0000 0000 0000 0000 0000 0100")
    for mode in codec.CHECKSUM_MODES:  # the IPv4 setting does not change IPv6 adverts
        assert build_payload(vrid=40, priority=100, interval=1.0, addresses=VIPS6, src=SRC6,
                             dst=DST6, mode=mode) == want
    pseudo = (bytes.fromhex("fe80" + "0" * 24 + "000a") + bytes.fromhex("ff02" + "0" * 24 + "0012")
              + struct.pack("!I", len(want)) + b"\0\0\0\x70")
    assert ref_sum(pseudo + want[:6] + b"\0\0" + want[8:]) == 0x4CB4
    # and scapy's own IPv6 VRRPv3 build (in6_chksum) agrees
    from scapy.layers.inet6 import IPv6
    ref = bytes(IPv6(src=SRC6, dst=DST6, hlim=255) / VRRPv3(vrid=40, priority=100, adv=100,
                                                             addrlist=VIPS6))
    assert ref[40:] == want


def test_ipv6_packet_shape_and_round_trip():
    p = pkt6()
    assert p[0] >> 4 == 6 and p[6] == 112 and p[7] == 255  # next header, hop limit
    assert struct.unpack_from("!H", p, 4)[0] == 8 + 2 * 16  # payload length
    r = dec6().decode(p)
    assert r == Advert(src=SRC6, dst=DST6, vrid=40, priority=100, interval=1.0,
                       addresses=tuple(VIPS6))
    assert codec.source_of(p) == SRC6


def test_ipv6_rebuilt_header_decodes_like_the_wire():
    # what the channel does with a raw socket's payload and ancillary data
    p = pkt6()
    rebuilt = codec.ipv6_header(p[8:24], p[24:40], p[7], len(p) - 40) + p[40:]
    assert rebuilt == p


INVALID6 = [
    ("short", lambda: pkt6()[:44]),
    ("protocol", lambda: _set(pkt6(), 6, b"\x11")),
    ("length", lambda: pkt6()[:-4]),  # the payload length says more than arrived
    ("ttl", lambda: _set(pkt6(), 7, b"\xfe")),  # hop limit 254: crossed a router
    ("ttl", lambda: _set(pkt6(), 7, b"\x40")),
    ("checksum", lambda: _set(pkt6(), 46, b"\x12\x34")),
    # the sum without the pseudo-header (an IPv4 habit) is wrong over IPv6
    ("checksum", lambda: _set(pkt6(), 46, struct.pack(
        "!H", ref_sum(pkt6()[40:46] + b"\0\0" + pkt6()[48:])))),
    ("length", lambda: with_checksum6(_set(pkt6(), 43, b"\x03"))),  # count says 3
    ("length", lambda: with_checksum6(_v6(pkt6()[40:] + b"\0" * 4))),  # 4 bytes too many
    ("addresses", lambda: pkt6(addresses=["fe80::1", "2001:2::101"])),
    ("vrid", lambda: pkt6(vrid=41)),
    ("interval", lambda: with_checksum6(_set(pkt6(), 44, b"\x00\x00"))),
]


@pytest.mark.parametrize("reason,make", INVALID6,
                         ids=[f"{r}-{i}" for i, (r, _) in enumerate(INVALID6)])
def test_ipv6_invalid_rejected_and_counted(reason, make):
    d = dec6()
    r = d.decode(make())
    assert isinstance(r, Invalid) and r.reason == reason, r
    assert d.invalid[reason] == 1 and sum(d.invalid.values()) == 1


def test_ipv6_auth_trailer_round_trip_and_tamper():
    s = Signer(40, VIPS6, SRC6, "rfc9568", KEY)
    payload = s.payload(100, 1.0, DST6)
    assert len(payload) == 8 + 32 + codec.AUTH_TRAILER
    p = _v6(payload)
    d = dec6(key=KEY)
    r = d.decode(p)
    assert isinstance(r, Advert) and r.counter is not None
    again = d.decode(p)
    assert isinstance(again, Invalid) and again.reason == "auth_replay"
    # the MAC covers the 16-byte source: the same message from another address is refused
    # even with its checksum made right for that source
    forged = with_checksum6(_v6(payload, src="fe80::b"))
    assert dec6(key=KEY).decode(forged) == Invalid("auth_mac", "fe80::b")


def test_ipv6_fuzz_never_raises():
    rnd = random.Random(6)
    base = pkt6()
    d = dec6()
    for _ in range(3000):
        b = bytearray(base)
        for _ in range(rnd.randint(1, 6)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        r = d.decode(bytes(b[:rnd.randint(0, len(b))]))
        assert isinstance(r, (Advert, Invalid))
