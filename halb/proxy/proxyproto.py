"""PROXY protocol version 2 (binary), as specified by HAProxy's ``proxy-protocol.txt``.

Pure code: ``encode_v2`` builds a header, ``decode_v2`` parses one from the start of a buffer.

Layout::

    12 bytes  signature  0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
     1 byte   version (high nibble, must be 2) | command (low nibble: 0 LOCAL, 1 PROXY)
     1 byte   family (high nibble: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX)
              | transport (low nibble: 0 UNSPEC, 1 STREAM, 2 DGRAM)
     2 bytes  length of what follows, network order
     ...      addresses (INET 12 bytes, INET6 36, UNIX 216), then TLVs (type, 2-byte length, value)
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_LEN = 16  # signature + ver/cmd + fam + len

CMD_LOCAL = 0x0
CMD_PROXY = 0x1

AF_UNSPEC = 0x0
AF_INET = 0x1
AF_INET6 = 0x2
AF_UNIX = 0x3

T_UNSPEC = 0x0
T_STREAM = 0x1
T_DGRAM = 0x2

_ADDR_LEN = {AF_UNSPEC: 0, AF_INET: 12, AF_INET6: 36, AF_UNIX: 216}

# TLV types from the spec (section 2.2.x)
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30

MAX_TLV_BYTES = 65535 - 216


class ProxyProtocolError(ValueError):
    """A malformed PROXY v2 header; the message names the problem."""


@dataclass(frozen=True)
class ProxyHeader:
    command: int  # CMD_LOCAL or CMD_PROXY
    family: int  # AF_*
    transport: int  # T_*
    src: tuple[str, int] | str | None = None  # (ip, port); UNIX: path; UNSPEC/LOCAL: None
    dst: tuple[str, int] | str | None = None
    tlvs: tuple[tuple[int, bytes], ...] = field(default_factory=tuple)

    def tlv(self, typ: int) -> bytes | None:
        for t, v in self.tlvs:
            if t == typ:
                return v
        return None


def _tlv_bytes(tlvs) -> bytes:
    out = bytearray()
    for typ, val in tlvs:
        if not 0 <= typ <= 255:
            raise ValueError(f"TLV type {typ} out of range (0..255)")
        if len(val) > 65535:
            raise ValueError(f"TLV {typ:#x} value too long ({len(val)} bytes)")
        out += struct.pack("!BH", typ, len(val)) + bytes(val)
    if len(out) > MAX_TLV_BYTES:
        raise ValueError(f"TLVs too long ({len(out)} bytes)")
    return bytes(out)


def encode_v2(src: tuple[str, int] | None, dst: tuple[str, int] | None, *,
              transport: int = T_STREAM, local: bool = False,
              tlvs: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    """A PROXY v2 header for a connection from ``src`` to ``dst`` (``(ip, port)`` pairs).

    ``local=True`` or ``src is None`` gives a LOCAL / UNSPEC header (no addresses). IPv4
    and IPv6 addresses must not be mixed, except that an IPv4-mapped IPv6 address on one side
    with an IPv4 address on the other is encoded as IPv4.
    """
    tail = _tlv_bytes(tlvs)
    if local or src is None or dst is None:
        cmd = CMD_LOCAL if local or src is None else CMD_PROXY
        return SIGNATURE + struct.pack("!BBH", 0x20 | cmd, 0x00, len(tail)) + tail
    if transport not in (T_STREAM, T_DGRAM):
        raise ValueError(f"transport {transport} must be STREAM or DGRAM")
    sa, da = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if sa.version != da.version:
        # v4 on one side, v4-mapped v6 on the other (a dual-stack socket): use plain v4
        sm = sa.ipv4_mapped if sa.version == 6 else sa
        dm = da.ipv4_mapped if da.version == 6 else da
        if sm is None or dm is None:
            raise ValueError(f"address families differ: {src[0]} and {dst[0]}")
        sa, da = sm, dm
    for name, port in (("source", src[1]), ("destination", dst[1])):
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"{name} port {port} out of range")
    fam = AF_INET if sa.version == 4 else AF_INET6
    addrs = sa.packed + da.packed + struct.pack("!HH", int(src[1]), int(dst[1]))
    body = addrs + tail
    return SIGNATURE + struct.pack("!BBH", 0x20 | CMD_PROXY, (fam << 4) | transport, len(body)) + body


def decode_v2(buf: bytes | bytearray | memoryview) -> tuple[ProxyHeader, int] | None:
    """Parses a header at the start of ``buf``.

    Returns ``(header, bytes consumed)``, or None when more bytes are needed (a prefix of a
    valid header). Raises ProxyProtocolError naming the problem when the bytes cannot start a
    valid header.
    """
    b = bytes(buf[:HEADER_LEN])
    n = min(len(b), len(SIGNATURE))
    if b[:n] != SIGNATURE[:n]:
        raise ProxyProtocolError("bad signature (not a PROXY protocol v2 header)")
    if len(b) < HEADER_LEN:
        return None
    ver_cmd, fam_tr, length = struct.unpack_from("!BBH", b, 12)
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"unsupported version {ver_cmd >> 4} (expected 2)")
    cmd = ver_cmd & 0x0F
    if cmd not in (CMD_LOCAL, CMD_PROXY):
        raise ProxyProtocolError(f"unknown command {cmd:#x}")
    fam, tr = fam_tr >> 4, fam_tr & 0x0F
    if fam not in _ADDR_LEN:
        raise ProxyProtocolError(f"unknown address family {fam:#x}")
    if tr not in (T_UNSPEC, T_STREAM, T_DGRAM):
        raise ProxyProtocolError(f"unknown transport {tr:#x}")
    total = HEADER_LEN + length
    if len(buf) < total:
        return None
    body = bytes(buf[HEADER_LEN:total])
    alen = _ADDR_LEN[fam]
    if length < alen:
        raise ProxyProtocolError(f"length {length} too short for the address block ({alen} bytes)")
    src = dst = None
    if cmd == CMD_PROXY and fam in (AF_INET, AF_INET6):
        w = 4 if fam == AF_INET else 16
        sip = ipaddress.ip_address(body[:w])
        dip = ipaddress.ip_address(body[w:2 * w])
        sp, dp = struct.unpack_from("!HH", body, 2 * w)
        src, dst = (str(sip), sp), (str(dip), dp)
    elif cmd == CMD_PROXY and fam == AF_UNIX:
        src = body[:108].split(b"\x00", 1)[0].decode("utf-8", "replace")
        dst = body[108:216].split(b"\x00", 1)[0].decode("utf-8", "replace")
    tlvs = []
    i = alen
    while i < length:
        if length - i < 3:
            raise ProxyProtocolError(f"truncated TLV at offset {HEADER_LEN + i}")
        typ, tl = struct.unpack_from("!BH", body, i)
        if i + 3 + tl > length:
            raise ProxyProtocolError(f"TLV {typ:#x} of {tl} bytes overruns the header")
        tlvs.append((typ, body[i + 3:i + 3 + tl]))
        i += 3 + tl
    return ProxyHeader(cmd, fam, tr, src, dst, tuple(tlvs)), total
