"""ctnetlink (conntrack over netlink) messages, encoded and decoded with ``struct`` only.

Pure code: no sockets, no clock. ``halb.nat.ctsock`` is the socket edge that feeds this module
datagrams and sends what it builds. Written from the kernel UAPI headers
(``linux/netfilter/nfnetlink.h``, ``nfnetlink_conntrack.h``, ``nf_conntrack_common.h``,
``nf_conntrack_tcp.h``, ``linux/netlink.h``).

What it speaks (IPv4 and IPv6, TCP and UDP):

- ``encode_create``: an entry with its DNAT, the way halb's standby installs the flows the
  master replicated to it (``IPCTNL_MSG_CT_NEW``; the kernel computes the translated reply
  tuple itself from ``CTA_NAT_DST``);
- ``encode_update`` (timeout, mark, TCP state of an existing entry), ``encode_delete``,
  ``encode_get`` (one entry by its original tuple), ``encode_dump``, ``encode_marker`` (an
  acked no-op that ends a batch);
- ``parse`` / ``Parser``: every netlink message of a datagram, as ``Event`` (conntrack
  entries from events, dumps and get replies), ``NlAck``, ``NlError`` or ``NlDone``;
- ``encode_event``: a conntrack message shaped like the kernel's own events, for tests and
  benchmarks (a fake kernel).

Bounds: ``parse`` never raises. A datagram is walked message by message; a message whose
header does not fit what is left ends the walk (nothing after it can be found), a message
whose attributes overrun it or lack a tuple is skipped; both are counted as bad. Unknown
message types and unknown attributes are ignored (newer kernels add attributes). Encoders
raise ``ValueError`` on input they cannot encode (bad address, port out of range, protocol
other than TCP/UDP, address families that differ within one flow).

Byte order: netlink and attribute headers are host order; conntrack payloads (addresses,
ports, ``CTA_STATUS``, ``CTA_TIMEOUT``, ``CTA_MARK``, ``CTA_ID``, ``CTA_USE``) are network
order. Speed: each message part is one precompiled ``struct.Struct`` call with the constant
attribute headers passed as prebuilt bytes; the parser checks the headers of the two tuples
the kernel writes first in one masked compare and reads them in one ``unpack_from``, and
walks attributes for the rest and for any other shape (ICMP, zones, foreign encoders).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from struct import Struct
from typing import NamedTuple, Union

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6
IPPROTO_TCP, IPPROTO_UDP = 6, 17

# -- netlink (linux/netlink.h) ------------------------------------------------------------------
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_ECHO = 0x1, 0x2, 0x4, 0x8
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x100, 0x200, 0x400, 0x800
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000
NLA_TYPE_MASK = 0x3FFF
NLMSG_HDRLEN = 16

# -- nfnetlink (nfnetlink.h, nfnetlink_conntrack.h) -----------------------------------------------
NFNL_SUBSYS_CTNETLINK = 1
NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE, NFNLGRP_CONNTRACK_DESTROY = 1, 2, 3
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
CT_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
CT_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE

# enum ctattr_type
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO = 1, 2, 3, 4
CTA_HELP, CTA_NAT_SRC, CTA_TIMEOUT, CTA_MARK = 5, 6, 7, 8
CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_USE, CTA_ID, CTA_NAT_DST = 9, 10, 11, 12, 13
CTA_ZONE, CTA_MARK_MASK = 18, 21
# enum ctattr_tuple, ctattr_ip, ctattr_l4proto
CTA_TUPLE_IP, CTA_TUPLE_PROTO, CTA_TUPLE_ZONE = 1, 2, 3
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
# enum ctattr_protoinfo, ctattr_protoinfo_tcp
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, CTA_PROTOINFO_TCP_FLAGS_REPLY = 4, 5
# enum ctattr_nat, ctattr_protonat
CTA_NAT_V4_MINIP, CTA_NAT_V4_MAXIP, CTA_NAT_PROTO, CTA_NAT_V6_MINIP, CTA_NAT_V6_MAXIP = 1, 2, 3, 4, 5
CTA_PROTONAT_PORT_MIN, CTA_PROTONAT_PORT_MAX = 1, 2

# -- enum ip_conntrack_status (nf_conntrack_common.h) --------------------------------------------
IPS_EXPECTED = 1 << 0
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IPS_SEQ_ADJUST = 1 << 6
IPS_SRC_NAT_DONE = 1 << 7
IPS_DST_NAT_DONE = 1 << 8
IPS_DYING = 1 << 9
IPS_FIXED_TIMEOUT = 1 << 10
IPS_TEMPLATE = 1 << 11
IPS_UNTRACKED = 1 << 12
IPS_HELPER = 1 << 13
IPS_OFFLOAD = 1 << 14
IPS_HW_OFFLOAD = 1 << 15
# What a created entry claims: the kernel answers EBUSY to a create without CONFIRMED.
CREATE_STATUS = IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED

# -- enum tcp_conntrack, TCP flags (nf_conntrack_tcp.h) ------------------------------------------
TCP_CONNTRACK_NONE, TCP_CONNTRACK_SYN_SENT, TCP_CONNTRACK_SYN_RECV = 0, 1, 2
TCP_CONNTRACK_ESTABLISHED, TCP_CONNTRACK_FIN_WAIT, TCP_CONNTRACK_CLOSE_WAIT = 3, 4, 5
TCP_CONNTRACK_LAST_ACK, TCP_CONNTRACK_TIME_WAIT, TCP_CONNTRACK_CLOSE = 6, 7, 8
TCP_CONNTRACK_MAX = 10
IP_CT_TCP_FLAG_WINDOW_SCALE = 0x01
IP_CT_TCP_FLAG_SACK_PERM = 0x02
IP_CT_TCP_FLAG_CLOSE_INIT = 0x04
IP_CT_TCP_FLAG_BE_LIBERAL = 0x08


@dataclass(frozen=True, slots=True)
class Flow:
    """One DNAT'ed connection: original tuple client -> VIP, and where DNAT sent it.

    Addresses are strings; the family follows from them (all IPv4 or all IPv6). The parser
    produces IPv6 addresses in ``inet_ntop``'s compressed form, so compare flows built from
    such strings.
    """

    proto: int  # IPPROTO_TCP or IPPROTO_UDP
    src: str  # client address
    sport: int
    dst: str  # the VIP as the client addressed it
    dport: int
    nat_dst: str  # the backend address after DNAT
    nat_dport: int  # the backend port after DNAT

    @property
    def family(self) -> int:
        return AF_INET6 if ":" in self.src else AF_INET


class Event(NamedTuple):
    """One conntrack entry as a message reported it.

    ``kind``: "new" (an event of NFNLGRP_CONNTRACK_NEW: the kernel flags those
    NLM_F_CREATE|NLM_F_EXCL), "update" (any other CT_NEW message: update events), "destroy"
    (CT_DELETE: destroy events, also those of a delete request), "dump" (the kernel's answers
    to a request, a dump or a single get: it flags every unicast answer NLM_F_MULTI).
    ``flow`` is None when the entry carries no DNAT (reply source == original destination,
    address and port) or is neither TCP nor UDP. Only the DNAT is read: for an entry that is
    also source-NAT'ed (``status & IPS_SRC_NAT``) the translated source is not in ``flow``.
    """

    kind: str
    flow: Flow | None
    status: int  # CTA_STATUS bits (IPS_*)
    portid: int  # nlmsg_pid: the socket whose request caused it, 0 = the kernel itself
    timeout: int  # CTA_TIMEOUT seconds, 0 if absent
    mark: int
    tcp_state: int  # TCP_CONNTRACK_*, -1 if none


class NlAck(NamedTuple):
    """NLMSG_ERROR with error 0: the request ``seq`` (sent with NLM_F_ACK) was carried out."""

    seq: int


class NlError(NamedTuple):
    """NLMSG_ERROR with an error: request ``seq`` failed with ``errno`` (positive)."""

    seq: int
    errno: int


class NlDone(NamedTuple):
    """NLMSG_DONE: the end of the dump requested with ``seq``."""

    seq: int


Message = Union[Event, NlAck, NlError, NlDone]

# -- structs -------------------------------------------------------------------------------------
_NLA = Struct("=HH")  # struct nlattr: nla_len, nla_type (host order)
_NLMSG = Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
_NLH_NFGEN = Struct("=IHHIIBBH")  # nlmsghdr + struct nfgenmsg (family, version, res_id=0)
_I32 = Struct("=i")
_BE32 = Struct("!I")
_BE16 = Struct("!H")
_BE_U32_ATTR = Struct("!4sI")  # a header (prebuilt bytes) and one u32 payload
_STATUS_TIMEOUT = Struct("!4sI4sI")
_STATUS_TIMEOUT_MARK = Struct("!4sI4sI4sI")
# PROTOINFO { TCP { STATE u8, FLAGS_ORIGINAL {flags, mask}, FLAGS_REPLY {flags, mask} } }
_TCP_PROTOINFO = Struct("!12sB3x16s")


def _hdr(atype: int, payload_len: int) -> bytes:
    """A prebuilt attribute header (nla_len counts header and payload, not the padding)."""
    return _NLA.pack(4 + payload_len, atype)


class _Fam:
    """Everything that depends on the address family: sizes, attribute types, prebuilt
    constant header runs and the structs a tuple and a NAT range are packed with."""

    def __init__(self, af: int, alen: int, ip_src: int, ip_dst: int, nat_min: int,
                 nat_max: int) -> None:
        self.af, self.alen, self.ip_src = af, alen, ip_src
        ip_nest = 4 + 2 * (4 + alen)
        proto_nest = 4 + 3 * 8  # NUM (u8, padded), SRC_PORT, DST_PORT (be16, padded)
        self.tuple_len = 4 + ip_nest + proto_nest
        # CTA_TUPLE_x { CTA_TUPLE_IP { SRC, DST }, CTA_TUPLE_PROTO { NUM, SRC_PORT, DST_PORT } }
        tuple_fmt = f"12s{alen}s4s{alen}s16sH2x4sH2x"
        self.tuple = Struct("!" + tuple_fmt)
        self.pair = Struct("!" + tuple_fmt * 2)
        self.head = {t: _hdr(t | NLA_F_NESTED, self.tuple_len - 4)
                     + _hdr(CTA_TUPLE_IP | NLA_F_NESTED, ip_nest - 4) + _hdr(ip_src, alen)
                     for t in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY)}
        self.dst_hdr = _hdr(ip_dst, alen)
        self.proto_run = {p: _hdr(CTA_TUPLE_PROTO | NLA_F_NESTED, proto_nest - 4)
                          + _hdr(CTA_PROTO_NUM, 1) + bytes((p, 0, 0, 0))
                          + _hdr(CTA_PROTO_SRC_PORT, 2)
                          for p in (IPPROTO_TCP, IPPROTO_UDP)}
        self.dport_hdr = _hdr(CTA_PROTO_DST_PORT, 2)
        # CTA_NAT_DST { MINIP, MAXIP, CTA_NAT_PROTO { PORT_MIN, PORT_MAX } }
        nat_proto = 4 + 2 * 8
        self.nat_len = 4 + 2 * (4 + alen) + nat_proto
        self.nat = Struct(f"!8s{alen}s4s{alen}s8sH2x4sH2x")
        self.nat_head = _hdr(CTA_NAT_DST | NLA_F_NESTED, self.nat_len - 4) + _hdr(nat_min, alen)
        self.nat_max_hdr = _hdr(nat_max, alen)
        self.nat_proto_run = (_hdr(CTA_NAT_PROTO | NLA_F_NESTED, nat_proto - 4)
                              + _hdr(CTA_PROTONAT_PORT_MIN, 2))
        self.nat_pmax_hdr = _hdr(CTA_PROTONAT_PORT_MAX, 2)

    def pton(self, addr: str) -> bytes:
        return socket.inet_pton(self.af, addr)


_V4 = _Fam(AF_INET, 4, CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_NAT_V4_MINIP, CTA_NAT_V4_MAXIP)
_V6 = _Fam(AF_INET6, 16, CTA_IP_V6_SRC, CTA_IP_V6_DST, CTA_NAT_V6_MINIP, CTA_NAT_V6_MAXIP)
_STATUS_HDR = _hdr(CTA_STATUS, 4)
_TIMEOUT_HDR = _hdr(CTA_TIMEOUT, 4)
_MARK_HDR = _hdr(CTA_MARK, 4)
_MARK_MASK_HDR = _hdr(CTA_MARK_MASK, 4)
_ID_HDR = _hdr(CTA_ID, 4)
_USE_HDR = _hdr(CTA_USE, 4)
_TCP_LEN = 4 + 4 + 8 + 8 + 8  # PROTOINFO { TCP { STATE, FLAGS_ORIGINAL, FLAGS_REPLY } }
_TCP_HEAD = (_hdr(CTA_PROTOINFO | NLA_F_NESTED, _TCP_LEN - 4)
             + _hdr(CTA_PROTOINFO_TCP | NLA_F_NESTED, _TCP_LEN - 8)
             + _hdr(CTA_PROTOINFO_TCP_STATE, 1))


def _tcp_flags_run(flags: int, mask: int) -> bytes:
    # struct nf_ct_tcp_flags { __u8 flags; __u8 mask; }, for both directions
    return (_hdr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, 2) + bytes((flags, mask, 0, 0))
            + _hdr(CTA_PROTOINFO_TCP_FLAGS_REPLY, 2) + bytes((flags, mask, 0, 0)))


# BE_LIBERAL in both directions: the standby never saw the window, so without it the first
# packets after a takeover fall outside the window it would guess and are dropped as invalid.
_LIBERAL = _tcp_flags_run(IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL)


def _fam_of(flow: Flow) -> _Fam:
    return _V6 if ":" in flow.src else _V4


# -- encoders ------------------------------------------------------------------------------------
def encode_create(flow: Flow, *, seq: int, timeout: int, mark: int = 0,
                  tcp_state: int = TCP_CONNTRACK_ESTABLISHED, ack: bool = False) -> bytes:
    """IPCTNL_MSG_CT_NEW with NLM_F_REQUEST|NLM_F_CREATE (no NLM_F_EXCL): creates the entry.

    The reply tuple sent is the exact inverse of the original one; ``CTA_NAT_DST`` (one
    address, one port) makes the kernel translate it. Status CONFIRMED|SEEN_REPLY|ASSURED;
    TCP entries get ``tcp_state`` and BE_LIBERAL both ways. Without NLM_F_ACK (``ack``) the
    kernel answers only on error. For an entry that exists already the kernel refuses the
    NAT part (EOPNOTSUPP: NAT can only be set on a new entry); see ``encode_update``.
    """
    fam = _V6 if ":" in flow.src else _V4  # _fam_of, inlined: this is the takeover's hot path
    try:
        s, d, n = fam.pton(flow.src), fam.pton(flow.dst), fam.pton(flow.nat_dst)
        proto_run = fam.proto_run[flow.proto]
        sp, dp, np_ = flow.sport, flow.dport, flow.nat_dport
        head, dst_hdr, dph = fam.head, fam.dst_hdr, fam.dport_hdr
        tuples = fam.pair.pack(head[CTA_TUPLE_ORIG], s, dst_hdr, d, proto_run, sp, dph, dp,
                               head[CTA_TUPLE_REPLY], d, dst_hdr, s, proto_run, dp, dph, sp)
        if mark:
            stm = _STATUS_TIMEOUT_MARK.pack(_STATUS_HDR, CREATE_STATUS, _TIMEOUT_HDR, timeout,
                                            _MARK_HDR, mark)
        else:
            stm = _STATUS_TIMEOUT.pack(_STATUS_HDR, CREATE_STATUS, _TIMEOUT_HDR, timeout)
        tcp = _TCP_PROTOINFO.pack(_TCP_HEAD, tcp_state, _LIBERAL) if flow.proto == IPPROTO_TCP else b""
        nat = fam.nat.pack(fam.nat_head, n, fam.nat_max_hdr, n, fam.nat_proto_run, np_,
                           fam.nat_pmax_hdr, np_)
        total = 20 + len(tuples) + len(stm) + len(tcp) + len(nat)
        flags = NLM_F_REQUEST | NLM_F_CREATE | (NLM_F_ACK if ack else 0)
        nlh = _NLH_NFGEN.pack(total, CT_NEW, flags, seq, 0, fam.af, 0, 0)
    except (OSError, KeyError, struct.error, TypeError) as e:
        raise ValueError(f"cannot encode {flow!r}: {e}") from e
    return b"".join((nlh, tuples, stm, tcp, nat))


def encode_update(flow: Flow, *, seq: int, timeout: int, mark: int | None = None,
                  tcp_state: int | None = None, ack: bool = False) -> bytes:
    """IPCTNL_MSG_CT_NEW without NLM_F_CREATE: refreshes an existing entry's timeout (and mark,
    TCP state), found by its original tuple; ENOENT if there is none. No NAT (the kernel
    cannot change it on an existing entry)."""
    fam = _fam_of(flow)
    try:
        tup = _tuple_bytes(fam, CTA_TUPLE_ORIG, flow.proto, fam.pton(flow.src), flow.sport,
                           fam.pton(flow.dst), flow.dport)
        parts = [tup, _BE_U32_ATTR.pack(_TIMEOUT_HDR, timeout)]
        if mark is not None:
            parts.append(_BE_U32_ATTR.pack(_MARK_HDR, mark))
        if tcp_state is not None and flow.proto == IPPROTO_TCP:
            parts.append(_TCP_PROTOINFO.pack(_TCP_HEAD, tcp_state, _LIBERAL))
        body = b"".join(parts)
        flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
        nlh = _NLH_NFGEN.pack(20 + len(body), CT_NEW, flags, seq, 0, fam.af, 0, 0)
    except (OSError, KeyError, struct.error, TypeError) as e:
        raise ValueError(f"cannot encode {flow!r}: {e}") from e
    return nlh + body


def _tuple_bytes(fam: _Fam, which: int, proto: int, src: bytes, sport: int, dst: bytes,
                 dport: int) -> bytes:
    return fam.tuple.pack(fam.head[which], src, fam.dst_hdr, dst, fam.proto_run[proto], sport,
                          fam.dport_hdr, dport)


def _by_orig_tuple(msg_type: int, flow: Flow, seq: int, flags: int) -> bytes:
    fam = _fam_of(flow)
    try:
        tup = _tuple_bytes(fam, CTA_TUPLE_ORIG, flow.proto, fam.pton(flow.src), flow.sport,
                           fam.pton(flow.dst), flow.dport)
        nlh = _NLH_NFGEN.pack(20 + len(tup), msg_type, flags, seq, 0, fam.af, 0, 0)
    except (OSError, KeyError, struct.error, TypeError) as e:
        raise ValueError(f"cannot encode {flow!r}: {e}") from e
    return nlh + tup


def encode_delete(flow: Flow, *, seq: int, ack: bool = False) -> bytes:
    """IPCTNL_MSG_CT_DELETE of the entry with ``flow``'s original tuple (ENOENT if none)."""
    return _by_orig_tuple(CT_DELETE, flow, seq, NLM_F_REQUEST | (NLM_F_ACK if ack else 0))


def encode_get(flow: Flow, *, seq: int, ack: bool = False) -> bytes:
    """IPCTNL_MSG_CT_GET of one entry by its original tuple: the answer is one CT_NEW message
    (kind "dump": the kernel flags it NLM_F_MULTI), or NlError ENOENT."""
    return _by_orig_tuple(CT_GET, flow, seq, NLM_F_REQUEST | (NLM_F_ACK if ack else 0))


def encode_dump(*, seq: int, family: int = AF_INET, mark: int | None = None,
                mark_mask: int = 0xFFFFFFFF) -> bytes:
    """IPCTNL_MSG_CT_GET with NLM_F_DUMP: every entry of ``family`` (AF_UNSPEC: all), or only
    those with ``entry.mark & mark_mask == mark``. Answers: "dump" events, then NlDone."""
    body = b""
    if mark is not None:
        try:
            body = (_BE_U32_ATTR.pack(_MARK_HDR, mark)
                    + _BE_U32_ATTR.pack(_MARK_MASK_HDR, mark_mask))
        except struct.error as e:
            raise ValueError(f"bad mark {mark!r}/{mark_mask!r}: {e}") from e
    return _NLH_NFGEN.pack(20 + len(body), CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, 0, family,
                           0, 0) + body


def encode_marker(*, seq: int) -> bytes:
    """NLMSG_NOOP with NLM_F_REQUEST|NLM_F_ACK: netlink skips it and acks it (NlAck(seq)) in
    order, so its ack means every message sent before it has been processed. 16 bytes."""
    return _NLMSG.pack(NLMSG_HDRLEN, NLMSG_NOOP, NLM_F_REQUEST | NLM_F_ACK, seq, 0)


def encode_event(kind: str, flow: Flow, *, status: int = CREATE_STATUS | IPS_DST_NAT,
                 portid: int = 0, seq: int = 0, timeout: int = 120, mark: int = 0,
                 tcp_state: int = TCP_CONNTRACK_ESTABLISHED, ct_id: int = 0,
                 use: int = 1) -> bytes:
    """A conntrack message laid out like the kernel's events (ctnetlink_conntrack_event):
    for tests and benchmarks. ``kind`` "new" | "update" | "destroy" | "dump". The reply tuple
    is the translated one (backend -> client); a flow with nat_dst == dst is an entry
    without NAT. Not a request: the kernel would refuse it."""
    fam = _fam_of(flow)
    s, d, n = fam.pton(flow.src), fam.pton(flow.dst), fam.pton(flow.nat_dst)
    parts = [_tuple_bytes(fam, CTA_TUPLE_ORIG, flow.proto, s, flow.sport, d, flow.dport),
             _tuple_bytes(fam, CTA_TUPLE_REPLY, flow.proto, n, flow.nat_dport, s, flow.sport),
             _BE_U32_ATTR.pack(_ID_HDR, ct_id), _BE_U32_ATTR.pack(_STATUS_HDR, status),
             _BE_U32_ATTR.pack(_TIMEOUT_HDR, timeout), _BE_U32_ATTR.pack(_MARK_HDR, mark)]
    if flow.proto == IPPROTO_TCP:
        seen = IP_CT_TCP_FLAG_WINDOW_SCALE | IP_CT_TCP_FLAG_SACK_PERM
        parts.append(_TCP_PROTOINFO.pack(_TCP_HEAD, tcp_state, _tcp_flags_run(seen, 0)))
    parts.append(_BE_U32_ATTR.pack(_USE_HDR, use))
    body = b"".join(parts)
    mtype = CT_DELETE if kind == "destroy" else CT_NEW
    flags = {"new": NLM_F_CREATE | NLM_F_EXCL, "dump": NLM_F_MULTI}.get(kind, 0)
    return _NLH_NFGEN.pack(20 + len(body), mtype, flags, seq, portid, fam.af, 0, 0) + body


def encode_error(seq: int, errno: int, *, portid: int = 0) -> bytes:
    """An NLMSG_ERROR (errno 0: an ack) as the kernel sends it with NETLINK_CAP_ACK: the
    negative errno and the request's header. For tests."""
    req = _NLMSG.pack(NLMSG_HDRLEN, CT_NEW, NLM_F_REQUEST, seq, portid)
    return _NLMSG.pack(NLMSG_HDRLEN + 4 + len(req), NLMSG_ERROR, 0, seq, portid) \
        + _I32.pack(-errno) + req


def encode_done(seq: int, *, portid: int = 0) -> bytes:
    """An NLMSG_DONE with its int payload, as ends a dump. For tests."""
    return _NLMSG.pack(NLMSG_HDRLEN + 4, NLMSG_DONE, NLM_F_MULTI, seq, portid) + _I32.pack(0)


# -- parser --------------------------------------------------------------------------------------
_ntoa = socket.inet_ntoa
_ntop = socket.inet_ntop
_nla = _NLA.unpack_from
_be32 = _BE32.unpack_from
_be16 = _BE16.unpack_from


class _Shape:
    """Tuples laid out exactly as the kernel writes them (ctnetlink_dump_tuples: nested
    headers, CTA_TUPLE_IP { SRC, DST }, CTA_TUPLE_PROTO { NUM, SRC_PORT, DST_PORT }), read in
    one ``unpack_from`` that skips the headers. The headers are checked first, all at once:
    the bytes read as one integer, masked to the header and padding bytes, must equal the
    template. Any other shape (ICMP, a zone, other orders) takes the general walk."""

    def __init__(self, fam: _Fam, which: tuple[int, ...]) -> None:
        a = fam.alen
        body = f"{a}s4x{a}s8xB3x4xH2x4xH2x"  # after each tuple's first 12 header bytes
        self.struct = Struct("!" + "".join("12x" + body for _ in which))
        zero, ones = bytes(a), b"\xff" * a
        low = b"".join(_tuple_bytes(fam, w, IPPROTO_TCP, zero, 0, zero, 0) for w in which)
        high = b"".join(_tuple_bytes(fam, w, IPPROTO_UDP, ones, 0xFFFF, ones, 0xFFFF)
                        for w in which)
        self.size = len(low)
        self.mask = int.from_bytes(bytes(0xFF if x == y else 0 for x, y in zip(low, high)),
                                   "little")
        self.template = int.from_bytes(low, "little") & self.mask
        self.ntoa = _ntoa if a == 4 else _ntoa6

    def match(self, buf, p: int) -> bool:
        return int.from_bytes(buf[p:p + self.size], "little") & self.mask == self.template


def _ntoa6(raw: bytes) -> str:
    return _ntop(AF_INET6, raw)


# ORIG and REPLY in a row (the kernel writes them first); one tuple's payload alone
_PAIR4 = _Shape(_V4, (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY))
_PAIR6 = _Shape(_V6, (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY))


def _tuple(buf, p: int, end: int):
    """(proto, src, sport, dst, dport) of the tuple whose payload is buf[p:end], or None when
    it is malformed. Ports are 0 for protocols without them."""
    src = dst = None
    alen = 0
    proto = -1
    sport = dport = 0
    while end - p >= 4:
        ln, t = _nla(buf, p)
        if ln < 4 or ln > end - p:
            return None
        t &= NLA_TYPE_MASK
        if t == CTA_TUPLE_IP:
            got = _ip_pair(buf, p + 4, p + ln)
            if got is None:
                return None
            src, dst, alen = got
        elif t == CTA_TUPLE_PROTO:
            got = _ports(buf, p + 4, p + ln)
            if got is None:
                return None
            proto, sport, dport = got
        p += (ln + 3) & ~3
    if src is None or dst is None or proto < 0:
        return None
    return proto, src, sport, dst, dport


def _ip_pair(buf, p: int, end: int):
    """(src, dst, address length) from a CTA_TUPLE_IP payload; None if malformed or mixed."""
    src = dst = None
    alen = 0
    while end - p >= 4:
        ln, t = _nla(buf, p)
        if ln < 4 or ln > end - p:
            return None
        t &= NLA_TYPE_MASK
        if t in (CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST):
            want = 8 if t <= CTA_IP_V4_DST else 20
            if ln != want or alen not in (0, want - 4):
                return None
            alen = want - 4
            raw = bytes(buf[p + 4:p + ln])
            addr = _ntoa(raw) if alen == 4 else _ntop(AF_INET6, raw)
            if t in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                src = addr
            else:
                dst = addr
        p += (ln + 3) & ~3
    if src is None or dst is None:
        return None
    return src, dst, alen


def _ports(buf, p: int, end: int):
    """(proto, sport, dport) from a CTA_TUPLE_PROTO payload; None if malformed."""
    proto = -1
    sport = dport = 0
    while end - p >= 4:
        ln, t = _nla(buf, p)
        if ln < 4 or ln > end - p:
            return None
        t &= NLA_TYPE_MASK
        if t == CTA_PROTO_NUM:
            if ln < 5:
                return None
            proto = buf[p + 4]
        elif t == CTA_PROTO_SRC_PORT or t == CTA_PROTO_DST_PORT:
            if ln < 6:
                return None
            if t == CTA_PROTO_SRC_PORT:
                sport = _be16(buf, p + 4)[0]
            else:
                dport = _be16(buf, p + 4)[0]
        p += (ln + 3) & ~3
    if proto < 0:
        return None
    return proto, sport, dport


def _tcp_state(buf, p: int, end: int) -> int | None:
    """CTA_PROTOINFO payload -> TCP state, -1 without one, None if malformed."""
    while end - p >= 4:
        ln, t = _nla(buf, p)
        if ln < 4 or ln > end - p:
            return None
        if t & NLA_TYPE_MASK == CTA_PROTOINFO_TCP:
            q, qend = p + 4, p + ln
            while qend - q >= 4:
                ln2, t2 = _nla(buf, q)
                if ln2 < 4 or ln2 > qend - q:
                    return None
                if t2 & NLA_TYPE_MASK == CTA_PROTOINFO_TCP_STATE:
                    return buf[q + 4] if ln2 >= 5 else None
                q += (ln2 + 3) & ~3
        p += (ln + 3) & ~3
    return -1


def _ct(buf, p: int, end: int, mtype: int, mflags: int, pid: int) -> Event | None:
    """The Event of one CT_NEW / CT_DELETE message (attributes in buf[p:end]), None if bad."""
    orig = reply = None
    for shape in (_PAIR4, _PAIR6):
        if end - p >= shape.size and shape.match(buf, p):
            s, d, proto, sp, dp, rs, _, _, rsp, _ = shape.struct.unpack_from(buf, p)
            ntoa = shape.ntoa
            orig = proto, ntoa(s), sp, ntoa(d), dp
            reply = proto, ntoa(rs), rsp, None, 0  # only the reply source is used
            p += shape.size
            break
    status = timeout = mark = 0
    tcp_state = -1
    while end - p >= 4:
        ln, t = _nla(buf, p)
        if ln < 4 or ln > end - p:
            return None
        t &= NLA_TYPE_MASK
        if t > CTA_MARK:
            pass  # CTA_ID, CTA_USE, counters, CTA_SYNPROXY...: not needed
        elif t == CTA_STATUS or t == CTA_TIMEOUT or t == CTA_MARK:
            if ln < 8:
                return None
            v = _be32(buf, p + 4)[0]
            if t == CTA_STATUS:
                status = v
            elif t == CTA_TIMEOUT:
                timeout = v
            else:
                mark = v
        elif t == CTA_PROTOINFO:
            tcp_state = _tcp_state(buf, p + 4, p + ln)
            if tcp_state is None:
                return None
        elif t == CTA_TUPLE_ORIG:
            orig = _tuple(buf, p + 4, p + ln)
            if orig is None:
                return None
        elif t == CTA_TUPLE_REPLY:
            reply = _tuple(buf, p + 4, p + ln)
            if reply is None:
                return None
        p += (ln + 3) & ~3
    if orig is None or reply is None:
        return None
    if mtype == CT_DELETE:
        kind = "destroy"
    elif mflags & NLM_F_MULTI:
        kind = "dump"
    elif mflags & (NLM_F_CREATE | NLM_F_EXCL) == NLM_F_CREATE | NLM_F_EXCL:
        kind = "new"
    else:
        kind = "update"
    proto, src, sport, dst, dport = orig
    rsrc, rsport = reply[1], reply[2]
    flow = None
    if (proto == IPPROTO_TCP or proto == IPPROTO_UDP) and (rsrc != dst or rsport != dport):
        flow = Flow(proto, src, sport, dst, dport, rsrc, rsport)
    return Event(kind, flow, status, pid, timeout, mark, tcp_state)


def parse_into(buf, out: list) -> int:
    """Appends the messages of datagram ``buf`` (bytes, bytearray or memoryview) to ``out``;
    returns how many bad messages it met (0 for a clean datagram). Never raises."""
    try:
        return _walk(buf, out)
    except Exception:  # noqa: BLE001 - a bug must not take the reader down: count it as bad
        return 1


def _walk(buf, out: list) -> int:
    bad = 0
    n = len(buf)
    off = 0
    unpack = _NLMSG.unpack_from
    append = out.append
    while n - off >= NLMSG_HDRLEN:
        mlen, mtype, mflags, seq, pid = unpack(buf, off)
        if mlen < NLMSG_HDRLEN or mlen > n - off:
            return bad + 1  # the next header cannot be found: the rest is lost
        end = off + mlen
        if mtype == CT_NEW or mtype == CT_DELETE:
            ev = _ct(buf, off + 20, end, mtype, mflags, pid) if mlen >= 20 else None
            if ev is None:
                bad += 1
            else:
                append(ev)
        elif mtype == NLMSG_ERROR:
            err = _I32.unpack_from(buf, off + NLMSG_HDRLEN)[0] if mlen >= 20 else 1
            if err > 0:
                bad += 1
            else:
                append(NlAck(seq) if err == 0 else NlError(seq, -err))
        elif mtype == NLMSG_DONE:
            append(NlDone(seq))
        # NLMSG_NOOP, NLMSG_OVERRUN, other subsystems' messages: nothing for us
        off += (mlen + 3) & ~3
    if off < n:
        bad += 1  # trailing bytes too short for a header
    return bad


def parse(buf) -> list[Message]:
    """The messages of one datagram. Bad messages are skipped; use ``Parser`` (or
    ``parse_into``) to count them."""
    out: list[Message] = []
    parse_into(buf, out)
    return out


class Parser:
    """``parse`` with a running count of the bad messages met (``bad``)."""

    __slots__ = ("bad",)

    def __init__(self) -> None:
        self.bad = 0

    def parse(self, buf) -> list[Message]:
        out: list[Message] = []
        self.bad += parse_into(buf, out)
        return out

    def parse_into(self, buf, out: list) -> int:
        bad = parse_into(buf, out)
        self.bad += bad
        return bad
