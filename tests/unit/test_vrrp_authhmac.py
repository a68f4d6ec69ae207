"""keepalived's auth_hmac trailer: the draft's appendix vectors (from keepalived's own
test/auth_hmac_test.c), every mutation class, freshness window, replay, sequence rules, modes,
and the trailer inside halb's codec (Signer/Decoder) on whole IPv4 packets."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest

from halb.config import ConfigError, loads
from halb.vrrp import authhmac
from halb.vrrp.authhmac import HmacAuth, clock_seq, seq_after
from halb.vrrp.codec import Advert, Decoder, Invalid, Signer, build_packet, vrrp_checksum

pytestmark = pytest.mark.unit

KEY = bytes(range(32))
# the draft's appendix images: key 00..1f, VRID 51, priority 200, sequence 0x6800000080000000
V4 = bytes.fromhex("3133c80100644402c0000264" "010100006800000080000000"
                   "1b84bc4e8e43892dc6d98448f8ee2265")
V6 = bytes.fromhex("3133c8010064a2e9" "fe800000000000000000000000000100"
                   "010100006800000080000000" "c8c56146ebfd66ee10ec4d8186461b78")
VEC_SEQ = 0x6800000080000000


class Clock:
    def __init__(self, sec: float):
        self.ns = int(sec * 1e9)

    def __call__(self) -> int:
        return self.ns


def auth(**kw) -> HmacAuth:
    kw.setdefault("anti_replay", "monotonic")  # the vectors' timestamps are long past
    return HmacAuth({1: KEY}, 1, **kw)


def independent_hmac(key: bytes, src_packed: bytes, family: int, vrid: int, msg: bytes,
                     prefix: bytes) -> bytes:
    """The draft's construction written out again, apart from the code under test."""
    pseudo = bytes([family, 3, vrid, 0]) + src_packed + bytes(16 - len(src_packed))
    zeroed = msg[:6] + b"\x00\x00" + msg[8:]
    return hmac.new(key, pseudo + zeroed + prefix + bytes(16), hashlib.sha256).digest()[:16]


@pytest.mark.parametrize("vec,src,mlen", [(V4, "198.51.100.10", 12), (V6, "fe80::10", 24)])
def test_appendix_vectors_verify(vec, src, mlen):
    a = auth()
    assert a.check(vec[:mlen], vec[mlen:], src, 51) is None
    assert a.check(vec[:mlen], vec[mlen:], src, 51) == "auth_replay"  # the same image again
    assert auth().check(vec[:mlen], vec[mlen:], src, 51) is None  # a second peer: its own mark


@pytest.mark.parametrize("vec,src,mlen", [(V4, "198.51.100.10", 12), (V6, "fe80::10", 24)])
def test_our_trailer_equals_the_vector_bytes(vec, src, mlen):
    """Signed at the vector's sequence, halb's trailer is the vector's, byte for byte."""
    a = auth()
    a.send_seq = VEC_SEQ - 1  # next_seq gives max(clock, last + 1): the clock is far past it
    a.now_ns = lambda: 0
    assert a.trailer(vec[:mlen], src, 51) == vec[mlen:]
    # and the construction agrees with an independent one
    import ipaddress
    ip = ipaddress.ip_address(src)
    assert vec[mlen + 12:] == independent_hmac(KEY, ip.packed, ip.version, 51, vec[:mlen],
                                               vec[mlen:mlen + 12])


def test_ipv4_vector_checksum_is_the_message_alone():
    msg = V4[:12]
    assert vrrp_checksum(msg[:6] + b"\0\0" + msg[8:], "198.51.100.10", "224.0.0.18",
                         "rfc9568") == struct.unpack("!H", msg[6:8])[0]


MSG6 = 24
TR = MSG6  # trailer offset in the IPv6 image


@pytest.mark.parametrize("what,off,expected", [
    ("priority", 2, "auth_mac"),
    ("advert interval", 5, "auth_mac"),
    ("checksum", 6, None),  # read as zero: the kernel (IPv6) or a per-peer rewrite may change it
    ("vip", 8 + 15, "auth_mac"),
    ("ext type", TR + 0, "auth_malformed"),
    ("key id", TR + 1, "auth_unknown_key"),
    ("reserved", TR + 2, "auth_malformed"),
    ("seconds", TR + 4, "auth_mac"),
    ("counter", TR + 10, "auth_mac"),
    ("hmac", TR + 12, "auth_mac"),
])
def test_one_flipped_byte(what, off, expected):
    img = bytearray(V6)
    img[off] ^= 0x01
    assert auth().check(bytes(img[:MSG6]), bytes(img[MSG6:]), "fe80::10", 51) == expected, what


def test_the_pseudo_header_binds_source_and_vrid():
    assert auth().check(V6[:MSG6], V6[MSG6:], "fe80::20", 51) == "auth_mac"
    assert auth().check(V6[:MSG6], V6[MSG6:], "fe80::10", 52) == "auth_mac"
    assert auth().check(V4[:12], V4[12:], "198.51.100.11", 51) == "auth_mac"


def test_short_trailer_is_malformed():
    assert auth().check(V4[:12], V4[12:-1], "198.51.100.10", 51) == "auth_malformed"


def test_freshness_window_in_time_mode():
    now = 1_900_000_000
    send = HmacAuth({1: KEY}, 1, time_window=5, now_ns=Clock(now))
    tr = send.trailer(V4[:12], "198.51.100.10", 51)
    for skew, want in ((0, None), (5, None), (-5, None), (6, "auth_stale"), (-6, "auth_stale"),
                       (100, "auth_stale")):
        recv = HmacAuth({1: KEY}, 1, time_window=5, now_ns=Clock(now + skew))
        assert recv.check(V4[:12], tr, "198.51.100.10", 51) == want, skew
    # stale is judged before the HMAC: a stale stamp with garbage HMAC is "stale", not "mac"
    bad = tr[:12] + bytes(16)
    recv = HmacAuth({1: KEY}, 1, time_window=5, now_ns=Clock(now + 100))
    assert recv.check(V4[:12], bad, "198.51.100.10", 51) == "auth_stale"


def test_replay_needs_growth_and_the_mark_moves_only_for_verified_trailers():
    clk = Clock(1_900_000_000)
    send = HmacAuth({1: KEY}, 1, now_ns=clk)
    recv = HmacAuth({1: KEY}, 1, now_ns=clk)
    t1 = send.trailer(V4[:12], "198.51.100.10", 51)
    t2 = send.trailer(V4[:12], "198.51.100.10", 51)  # same instant: counter + 1
    assert seq_after(int.from_bytes(t2[4:12], "big"), int.from_bytes(t1[4:12], "big"))
    assert recv.check(V4[:12], t2, "198.51.100.10", 51) is None
    assert recv.check(V4[:12], t1, "198.51.100.10", 51) == "auth_replay"  # older
    assert recv.check(V4[:12], t2, "198.51.100.10", 51) == "auth_replay"  # the same
    # a forged trailer with a huge sequence does not move the mark
    forged = t2[:4] + struct.pack("!Q", int.from_bytes(t2[4:12], "big") + 10**6) + bytes(16)
    assert recv.check(V4[:12], forged, "198.51.100.10", 51) == "auth_mac"
    t3 = send.trailer(V4[:12], "198.51.100.10", 51)
    assert recv.check(V4[:12], t3, "198.51.100.10", 51) is None
    # marks are per source and vrid
    assert recv.check(V4[:12], t1, "198.51.100.10", 52) == "auth_mac"  # vrid is bound


def test_a_mark_outside_the_window_expires_in_time_mode():
    """A receiver holding a mark an hour ahead (the sender's clock was stepped back) accepts
    the sender's next advert once the mark is outside the window, and orders from there."""
    clk = Clock(1_900_000_000)
    send = HmacAuth({1: KEY}, 1, now_ns=clk)
    recv = HmacAuth({1: KEY}, 1, now_ns=clk)
    recv._marks[(51, "198.51.100.10")] = clock_seq(clk.ns + 3600 * 10**9)
    tr = send.trailer(V4[:12], "198.51.100.10", 51)
    assert recv.check(V4[:12], tr, "198.51.100.10", 51) is None
    assert recv.check(V4[:12], tr, "198.51.100.10", 51) == "auth_replay"
    # monotonic mode keeps its mark
    mono = HmacAuth({1: KEY}, 1, anti_replay="monotonic", now_ns=clk)
    mono._marks[(51, "198.51.100.10")] = clock_seq(clk.ns + 7200 * 10**9)
    assert mono.check(V4[:12], tr, "198.51.100.10", 51) == "auth_replay"


def test_send_sequence_rules():
    clk = Clock(1_900_000_000.5)
    a = HmacAuth({1: KEY}, 1, now_ns=clk)
    s1 = a.next_seq()
    assert s1 >> 32 == 1_900_000_000 and (s1 >> 16) & 0xFFFF == 0x8000 and s1 & 0xFFFF == 0
    assert a.next_seq() == s1 + 1  # the clock did not move: the counter does
    # time mode: a sequence stranded an hour ahead restarts from the clock
    a.send_seq = clock_seq(clk.ns + 3600 * 10**9)
    assert a.next_seq() >> 32 == 1_900_000_000
    # monotonic mode keeps strict growth
    m = HmacAuth({1: KEY}, 1, anti_replay="monotonic", now_ns=clk)
    m.send_seq = clock_seq(clk.ns + 3600 * 10**9)
    s = m.next_seq()
    assert s >> 32 == 1_900_003_600 and s & 0xFFFF == 1


def test_receive_only_signs_nothing_and_modes_say_what_they_accept():
    ro = auth(mode="receive-only")
    assert not ro.signs and ro.accepts_unsigned
    assert ro.check(V4[:12], V4[12:], "198.51.100.10", 51) is None  # still verifies
    assert auth(mode="permissive").signs and auth(mode="permissive").accepts_unsigned
    assert auth().signs and not auth().accepts_unsigned


@pytest.mark.parametrize("kw,msg", [
    (dict(keys={1: b"short"}), "5 bytes"),
    (dict(keys={1: bytes(65)}), "65 bytes"),
    (dict(keys={0: KEY}, active_key=0), "key id 0"),
    (dict(active_key=2), "active_key 2"),
    (dict(mode="strict"), "mode"),
    (dict(anti_replay="none"), "anti_replay"),
    (dict(time_window=301), "time_window"),
])
def test_bad_parameters_are_refused(kw, msg):
    args = dict(keys={1: KEY}, active_key=1)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        HmacAuth(args.pop("keys"), args.pop("active_key"), **args)


# -- inside the codec: whole IPv4 packets ------------------------------------------------------

SRC, PEER, DST = "198.18.40.11", "198.18.40.12", "198.18.40.12"
VIPS = ("198.18.40.100",)


def signer(mode="enforce", clk=None, checksum="keepalived", key=KEY, kid=1):
    a = HmacAuth({kid: key}, kid, mode=mode, now_ns=clk or Clock(1_900_000_000))
    return Signer(51, VIPS, SRC, checksum, hmac_auth=a)


def decoder(mode="enforce", clk=None, checksum="keepalived", keys=None):
    d = Decoder()
    d.add(51, VIPS, checksum, peers=[SRC], hmac_auth=HmacAuth(
        keys or {1: KEY}, next(iter(keys or {1: KEY})), mode=mode,
        now_ns=clk or Clock(1_900_000_000)))
    return d


def ip(payload: bytes, src=SRC, dst=DST) -> bytes:
    from scapy.layers.inet import IP
    return bytes(IP(src=src, dst=dst, ttl=255, proto=112) / payload)


def test_codec_round_trip_and_the_checksum_leaves_the_trailer_out():
    s = signer()
    p = s.payload(200, 1.0, DST)
    assert len(p) == 12 + authhmac.TRAILER
    assert vrrp_checksum(p[:12], SRC, DST, "keepalived") == 0  # the message alone sums to 0
    r = decoder().decode(ip(p))
    assert isinstance(r, Advert) and r.priority == 200 and r.addresses == VIPS


def test_codec_refusals_by_reason():
    clk = Clock(1_900_000_000)
    s = signer(clk=clk)
    d = decoder(clk=clk)
    p = s.payload(200, 1.0, DST)
    assert isinstance(d.decode(ip(p)), Advert)
    assert d.decode(ip(p)).reason == "auth_replay"  # captured and sent again
    unsigned = build_packet(src=SRC, dst=DST, vrid=51, priority=200, interval=1.0,
                            addresses=VIPS, mode="keepalived")
    r = d.decode(unsigned)
    assert isinstance(r, Invalid) and r.reason == "auth_missing" and "enforce" in r.detail
    wrong = signer(clk=clk, key=bytes(32)).payload(200, 1.0, DST)
    assert d.decode(ip(wrong)).reason == "auth_mac"
    other_id = signer(clk=clk, kid=7).payload(200, 1.0, DST)
    r = d.decode(ip(other_id))
    assert r.reason == "auth_unknown_key" and "key id 7" in r.detail
    later = decoder(clk=Clock(1_900_000_100))
    r = later.decode(ip(signer(clk=clk).payload(200, 1.0, DST)))
    assert r.reason == "auth_stale" and "clock skew 100 s" in r.detail
    assert d.decode(ip(p + b"x")).reason == "length"
    assert set(d.invalid) == {"auth_replay", "auth_missing", "auth_mac", "auth_unknown_key",
                              "length"}


def test_codec_rollout_modes():
    clk = Clock(1_900_000_000)
    unsigned = build_packet(src=SRC, dst=DST, vrid=51, priority=200, interval=1.0,
                            addresses=VIPS, mode="keepalived")
    for mode in ("receive-only", "permissive"):
        assert isinstance(decoder(mode, clk).decode(unsigned), Advert), mode
    # receive-only sends the plain advert; permissive and enforce sign
    assert len(signer("receive-only", clk).payload(200, 1.0, DST)) == 12
    assert len(signer("permissive", clk).payload(200, 1.0, DST)) == 40
    # a receive-only node still verifies a trailer that is there
    bad = signer(clk=clk, key=bytes(32)).payload(200, 1.0, DST)
    assert decoder("receive-only", clk).decode(ip(bad)).reason == "auth_mac"


def test_checksum_mismatch_still_named_with_a_trailer():
    p = signer(checksum="rfc9568").payload(200, 1.0, DST)
    assert decoder(checksum="keepalived").decode(ip(p)).reason == "checksum_mode"


# -- config ------------------------------------------------------------------------------------

BASE = """
[node]
name = "lb1"

[[vrrp]]
name = "vi"
interface = "eth0"
vrid = 51
priority = 200
vips = ["198.18.40.100/24"]
checksum = "keepalived"
unicast_peers = ["198.18.40.12"]
"""
HEX = "hex:" + KEY.hex()


def test_config_auth_hmac():
    cfg = loads(BASE + f'  [vrrp.auth_hmac]\n  keys = {{ "1" = "{HEX}" }}\n')
    ah = cfg.vrrp[0].auth_hmac
    assert ah.keys == ((1, KEY),) and ah.active_key == 1 and ah.mode == "enforce"
    assert ah.anti_replay == "time" and ah.time_window == 5  # max(3 x 1 s, 5)
    assert KEY.hex() not in repr(cfg)  # secrets stay out of reprs and logs
    assert cfg.warnings == ()
    ascii_key = "x" * 40
    two = loads(BASE + f'  [vrrp.auth_hmac]\n  keys = {{ "1" = "{HEX}", "2" = "{ascii_key}" }}\n'
                       '  active_key = 2\n  mode = "receive-only"\n  time_window = 30\n')
    ah = two.vrrp[0].auth_hmac
    assert dict(ah.keys) == {1: KEY, 2: ascii_key.encode()} and ah.active_key == 2
    assert [p.path for p in two.warnings] == ["vrrp[0].auth_hmac.mode"]


def test_config_key_file(tmp_path):
    f = tmp_path / "vrrp51"
    f.write_text(HEX + "\n")
    f.chmod(0o600)
    cfg = loads(BASE + f'  [vrrp.auth_hmac]\n  keys = {{ "1" = "file:{f}" }}\n')
    assert cfg.vrrp[0].auth_hmac.keys == ((1, KEY),) and cfg.warnings == ()
    f.chmod(0o644)
    cfg = loads(BASE + f'  [vrrp.auth_hmac]\n  keys = {{ "1" = "file:{f}" }}\n')
    assert [p.path for p in cfg.warnings] == ["vrrp[0].auth_hmac.keys.1"]
    assert "0600" in cfg.warnings[0].reason


@pytest.mark.parametrize("body,path,words", [
    ('keys = { "1" = "hex:0011" }', "vrrp[0].auth_hmac.keys.1", "2 bytes"),
    ('keys = { "1" = "short" }', "vrrp[0].auth_hmac.keys.1", "32 to 64 bytes"),
    ('keys = { "1" = "hex:zz" }', "vrrp[0].auth_hmac.keys.1", "invalid hex"),
    ('keys = { "1" = "file:/nonexistent/k" }', "vrrp[0].auth_hmac.keys.1", "cannot read"),
    ('keys = { "300" = "HEX" }', "vrrp[0].auth_hmac.keys", "1 to 255"),
    ('keys = { "1" = "HEX", "2" = "HEX" }', "vrrp[0].auth_hmac.active_key", "required"),
    ('keys = { "1" = "HEX" }\n  active_key = 3', "vrrp[0].auth_hmac.active_key", "not one of"),
    ('keys = { "1" = "HEX" }\n  mode = "strict"', "vrrp[0].auth_hmac.mode", "enforce"),
    ('keys = { "1" = "HEX" }\n  time_window = 0', "vrrp[0].auth_hmac.time_window", "1"),
    ('keys = { "1" = "HEX" }\n  anti_replay = "none"', "vrrp[0].auth_hmac.anti_replay", "time"),
    ('keys = { "1" = "HEX" }\n  colour = 1', "vrrp[0].auth_hmac.colour", "unknown"),
])
def test_config_auth_hmac_errors_name_the_key(body, path, words):
    with pytest.raises(ConfigError) as ei:
        loads(BASE + "  [vrrp.auth_hmac]\n  " + body.replace("HEX", HEX) + "\n")
    got = [(p.path, p.reason) for p in ei.value.problems]
    assert any(p == path and words in r for p, r in got), got


def test_config_auth_key_and_auth_hmac_are_exclusive_and_unicast_without_auth_warns():
    with pytest.raises(ConfigError) as ei:
        loads(BASE + 'auth_key = "halb-secret"\n'
                     f'  [vrrp.auth_hmac]\n  keys = {{ "1" = "{HEX}" }}\n')
    assert any(p.path == "vrrp[0].auth_hmac" for p in ei.value.problems)
    cfg = loads(BASE)
    assert [p.path for p in cfg.warnings] == ["vrrp[0].unicast_peers"]
    assert "auth_hmac" in cfg.warnings[0].reason
