"""Destroying stale TCP sockets on an address (what ``ss -K src ADDR`` does), over sock_diag.

A node that gives up a VIP, or dies with ``kill -9``, leaves its kernel holding the client
connections on that address (FIN_WAIT_2 and friends, up to ``tcp_fin_timeout``). When the
node takes the VIP again, a client that reconnects from the same source port meets the
orphan: its SYN is answered with a challenge ACK instead of a SYN-ACK and it stalls for its
connect timeout. The election therefore aborts every non-listening TCP socket whose local
address is one of the VIPs just before it adds them (and right after it removes them).

The kernel side: NETLINK_SOCK_DIAG, a SOCK_DIAG_BY_FAMILY dump filtered by state (LISTEN is
left out: halb's own listeners bind the VIPs with IP_FREEBIND and must survive), then one
SOCK_DESTROY per match with the socket's exact id and cookie (CONFIG_INET_DIAG_DESTROY; the
kernel aborts the socket as ``tcp_abort``, a TIME_WAIT one is descheduled). Bounded: at most
``MAX_SOCKETS`` destroyed per call, and every receive has a timeout.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from typing import Iterable

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
ALL_BUT_LISTEN = 0xFFFFFFFF & ~(1 << TCP_LISTEN)
RECV_TIMEOUT = 1.0
MAX_SOCKETS = 65536

_HDR = struct.Struct("=IHHII")  # nlmsghdr
_REQ = struct.Struct("=BBBBI")  # inet_diag_req_v2 up to the id
_ID_LEN = 48  # inet_diag_sockid: sport, dport, src[16], dst[16], if, cookie[2]
_MSG_ID_OFF = 4  # in inet_diag_msg: family, state, timer, retrans, then the id


class DiagError(OSError):
    """sock_diag is not available or refused the request."""


def _request(typ: int, flags: int, seq: int, family: int, states: int, sockid: bytes) -> bytes:
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, states) + sockid
    return _HDR.pack(_HDR.size + len(body), typ, flags, seq, 0) + body


def _messages(data: bytes):
    off = 0
    while off + _HDR.size <= len(data):
        length, typ, _flags, seq, _pid = _HDR.unpack_from(data, off)
        if length < _HDR.size:
            return
        yield typ, seq, data[off + _HDR.size:off + length]
        off += (length + 3) & ~3


def stale_sockets(addrs: Iterable[str], sock: socket.socket | None = None) -> list[tuple[int, bytes]]:
    """(family, sockid) of every non-listening TCP socket whose local address is in ``addrs``."""
    want: dict[int, set[bytes]] = {}
    for a in addrs:
        ip = ipaddress.ip_address(a)
        fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        want.setdefault(fam, set()).add(ip.packed.ljust(16, b"\0"))
    own = sock is None
    s = sock or _open()
    found: list[tuple[int, bytes]] = []
    try:
        for seq, (fam, packed) in enumerate(want.items(), 1):
            s.send(_request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, fam,
                            ALL_BUT_LISTEN, b"\0" * _ID_LEN))
            done = False
            while not done:
                data = s.recv(1 << 16)
                for typ, rseq, body in _messages(data):
                    if rseq != seq:
                        continue
                    if typ == NLMSG_DONE:
                        done = True
                        break
                    if typ == NLMSG_ERROR:
                        err = -struct.unpack_from("=i", body)[0]
                        raise DiagError(err, f"sock_diag dump: {os.strerror(err)}")
                    if typ == SOCK_DIAG_BY_FAMILY and len(body) >= _MSG_ID_OFF + _ID_LEN:
                        sid = body[_MSG_ID_OFF:_MSG_ID_OFF + _ID_LEN]
                        if sid[4:20] in packed and len(found) < MAX_SOCKETS:
                            found.append((fam, sid))
    finally:
        if own:
            s.close()
    return found


def destroy(addrs: Iterable[str]) -> tuple[int, int]:
    """Aborts the stale sockets on ``addrs``; returns (destroyed, gone or refused). Raises
    DiagError when sock_diag itself is unavailable (no permission, no kernel support)."""
    addrs = list(addrs)
    if not addrs:
        return 0, 0
    s = _open()
    try:
        found = stale_sockets(addrs, s)
        done = failed = 0
        for i, (fam, sid) in enumerate(found, 1000):
            s.send(_request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, i, fam, 0xFFFFFFFF, sid))
            err = _ack(s, i)
            if err == 0:
                done += 1
            elif err in (errno.EOPNOTSUPP, errno.EPERM) and done == 0 and failed == 0:
                raise DiagError(err, f"SOCK_DESTROY: {os.strerror(err)}")
            else:  # ENOENT: closed meanwhile
                failed += 1
        return done, failed
    finally:
        s.close()


def _ack(s: socket.socket, seq: int) -> int:
    while True:
        for typ, rseq, body in _messages(s.recv(1 << 16)):
            if typ == NLMSG_ERROR and rseq == seq:
                return -struct.unpack_from("=i", body)[0]


def _open() -> socket.socket:
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    except OSError as e:
        raise DiagError(e.errno, f"sock_diag: {e.strerror}") from None
    s.settimeout(RECV_TIMEOUT)
    s.bind((0, 0))
    return s
