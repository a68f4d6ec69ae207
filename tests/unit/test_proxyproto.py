"""PROXY protocol v2 encoder and decoder against the byte layout of the spec."""

import struct

import pytest

from halb.proxy import proxyproto as pp

pytestmark = pytest.mark.unit

SIG = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])


def test_signature_is_the_spec_constant():
    assert pp.SIGNATURE == SIG
    assert len(pp.SIGNATURE) == 12


def test_tcp4_layout():
    h = pp.encode_v2(("192.0.2.1", 56324), ("198.18.0.10", 443))
    expect = (SIG + bytes([0x21, 0x11, 0x00, 0x0C])
              + bytes([192, 0, 2, 1]) + bytes([198, 18, 0, 10])
              + bytes([0xDC, 0x04]) + bytes([0x01, 0xBB]))
    assert h == expect
    hdr, n = pp.decode_v2(h + b"payload")
    assert n == 28
    assert hdr.command == pp.CMD_PROXY and hdr.family == pp.AF_INET and hdr.transport == pp.T_STREAM
    assert hdr.src == ("192.0.2.1", 56324) and hdr.dst == ("198.18.0.10", 443)
    assert hdr.tlvs == ()


def test_tcp6_layout():
    h = pp.encode_v2(("2001:db8::1", 1), ("2001:db8::2", 65535))
    assert h[12:16] == bytes([0x21, 0x21, 0x00, 36])
    assert h[16:32] == bytes.fromhex("20010db8000000000000000000000001")
    assert h[32:48] == bytes.fromhex("20010db8000000000000000000000002")
    assert h[48:52] == bytes([0x00, 0x01, 0xFF, 0xFF])
    assert len(h) == 52
    hdr, n = pp.decode_v2(h)
    assert n == 52 and hdr.family == pp.AF_INET6
    assert hdr.src == ("2001:db8::1", 1) and hdr.dst == ("2001:db8::2", 65535)


def test_udp4_transport_nibble():
    h = pp.encode_v2(("10.0.0.1", 5), ("10.0.0.2", 53), transport=pp.T_DGRAM)
    assert h[13] == 0x12
    assert pp.decode_v2(h)[0].transport == pp.T_DGRAM


def test_local_unspec():
    h = pp.encode_v2(None, None, local=True)
    assert h == SIG + bytes([0x20, 0x00, 0x00, 0x00])
    hdr, n = pp.decode_v2(h)
    assert n == 16 and hdr.command == pp.CMD_LOCAL and hdr.family == pp.AF_UNSPEC
    assert hdr.src is None and hdr.dst is None


def test_proxy_unspec_has_no_addresses():
    h = SIG + bytes([0x21, 0x00, 0x00, 0x00])
    hdr, n = pp.decode_v2(h)
    assert hdr.command == pp.CMD_PROXY and hdr.family == pp.AF_UNSPEC and hdr.src is None


def test_v4_mapped_v6_with_v4_becomes_v4():
    h = pp.encode_v2(("::ffff:192.0.2.7", 1000), ("192.0.2.8", 80))
    assert h[13] == 0x11
    assert pp.decode_v2(h)[0].src == ("192.0.2.7", 1000)


def test_mixed_families_rejected():
    with pytest.raises(ValueError, match="families differ"):
        pp.encode_v2(("2001:db8::1", 1), ("192.0.2.1", 2))


def test_tlvs_round_trip_and_are_counted_in_length():
    tlvs = ((pp.PP2_TYPE_AUTHORITY, b"example.com"), (pp.PP2_TYPE_UNIQUE_ID, b"\x01\x02"))
    h = pp.encode_v2(("127.0.0.1", 1), ("127.0.0.2", 2), tlvs=tlvs)
    (length,) = struct.unpack("!H", h[14:16])
    assert length == 12 + (3 + 11) + (3 + 2)
    assert h[28:31] == bytes([0x02, 0x00, 0x0B])
    hdr, n = pp.decode_v2(h)
    assert n == len(h)
    assert hdr.tlvs == tlvs
    assert hdr.tlv(pp.PP2_TYPE_AUTHORITY) == b"example.com"
    assert hdr.tlv(pp.PP2_TYPE_ALPN) is None


def test_unix_addresses():
    body = b"/run/a.sock".ljust(108, b"\x00") + b"/run/b.sock".ljust(108, b"\x00")
    h = SIG + bytes([0x21, 0x31]) + struct.pack("!H", len(body)) + body
    hdr, n = pp.decode_v2(h)
    assert n == 16 + 216 and hdr.family == pp.AF_UNIX
    assert hdr.src == "/run/a.sock" and hdr.dst == "/run/b.sock"


@pytest.mark.parametrize("cut", [0, 1, 5, 12, 15, 16, 20, 27])
def test_prefixes_need_more_bytes(cut):
    h = pp.encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2))
    assert pp.decode_v2(h[:cut]) is None


@pytest.mark.parametrize("data, problem", [
    (b"GET / HTTP/1.1\r\n\r\n", "bad signature"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "bad signature"),
    (SIG + bytes([0x11, 0x11, 0, 12]) + bytes(12), "unsupported version 1"),
    (SIG + bytes([0x22, 0x11, 0, 12]) + bytes(12), "unknown command"),
    (SIG + bytes([0x21, 0x41, 0, 12]) + bytes(12), "unknown address family"),
    (SIG + bytes([0x21, 0x13, 0, 12]) + bytes(12), "unknown transport"),
    (SIG + bytes([0x21, 0x11, 0, 8]) + bytes(8), "too short for the address block"),
    (SIG + bytes([0x21, 0x21, 0, 12]) + bytes(12), "too short for the address block"),
    (SIG + bytes([0x21, 0x11, 0, 14]) + bytes(14), "truncated TLV"),
    (SIG + bytes([0x21, 0x11, 0, 16]) + bytes(12) + bytes([0x04, 0x00, 0x05, 0x00]), "overruns"),
])
def test_malformed_headers_are_rejected_with_a_reason(data, problem):
    with pytest.raises(pp.ProxyProtocolError, match=problem):
        pp.decode_v2(data)


def test_bad_ports_and_tlvs_rejected_by_encoder():
    with pytest.raises(ValueError, match="port"):
        pp.encode_v2(("127.0.0.1", 70000), ("127.0.0.1", 1))
    with pytest.raises(ValueError, match="TLV type"):
        pp.encode_v2(("127.0.0.1", 1), ("127.0.0.1", 1), tlvs=((256, b""),))
    with pytest.raises(ValueError):
        pp.encode_v2(("not-an-ip", 1), ("127.0.0.1", 1))
