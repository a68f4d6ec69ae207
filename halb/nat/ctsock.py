"""The socket edge of ctnetlink: a NETLINK_NETFILTER socket, and two blocking helpers on it.

``CtSocket`` is non-blocking and thin: ``read()`` hands datagrams to ``halb.nat.ctnl``'s
parser, ``send_batch()`` packs encoded messages into as few datagrams as it can. An asyncio
edge watches ``fileno()``. ``inject()`` (install flows, used at takeover) and ``dump()``
(list the kernel's entries) are synchronous and bounded by a deadline; run them on a socket
that has joined no multicast group (they would swallow its events).

The socket lives in the network namespace of the thread that creates it.

Bounds: one receive buffer of ``RECV_SIZE`` bytes per socket (a netlink datagram from the
kernel is at most 32 KiB: dump parts are capped there, events are one entry each); a send
datagram holds at most ``MAX_SEND`` bytes; ``read()`` takes at most ``max_datagrams`` per call;
``inject`` and ``dump`` stop at their deadline, ``dump`` also at ``max_entries``.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from typing import Iterable, NamedTuple

from . import ctnl
from .ctnl import AF_INET, AF_INET6, Event, Flow, Message, NlAck, NlDone, NlError

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NETLINK_CAP_ACK = 10
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

GROUP_NEW = 1 << (ctnl.NFNLGRP_CONNTRACK_NEW - 1)
GROUP_UPDATE = 1 << (ctnl.NFNLGRP_CONNTRACK_UPDATE - 1)
GROUP_DESTROY = 1 << (ctnl.NFNLGRP_CONNTRACK_DESTROY - 1)
GROUPS_ALL = GROUP_NEW | GROUP_UPDATE | GROUP_DESTROY

RECV_SIZE = 64 << 10
MAX_SEND = 64 << 10
_SEQ_MASK = 0xFFFFFFFF


class CtSocket:
    """A NETLINK_NETFILTER socket. Non-blocking; the caller (an asyncio edge) watches fileno().

    ``groups``: a bitmask of GROUP_NEW | GROUP_UPDATE | GROUP_DESTROY (0: requests only).
    Buffer sizes are forced past the sysctl limits (SO_*BUFFORCE, root) when ``force_bufs``,
    else (or when that is refused) asked for with SO_*BUF and capped by the kernel.
    NETLINK_NO_ENOBUFS stays off: a full receive buffer must be reported (``overruns``), as
    the events lost then leave the reader out of step with the kernel.
    """

    def __init__(self, *, groups: int = 0, rcvbuf: int = 8 << 20, sndbuf: int = 4 << 20,
                 force_bufs: bool = True) -> None:
        self.groups = groups
        self.overruns = 0
        self._parser = ctnl.Parser()
        self._seq = 0
        self._buf = bytearray(RECV_SIZE)
        self._view = memoryview(self._buf)
        self._sock = socket.socket(socket.AF_NETLINK,
                                   socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                   NETLINK_NETFILTER)
        try:
            self._set_buf(SO_RCVBUFFORCE if force_bufs else None, socket.SO_RCVBUF, rcvbuf)
            self._set_buf(SO_SNDBUFFORCE if force_bufs else None, socket.SO_SNDBUF, sndbuf)
            self._sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 0)
            # errors echo only the failed request's header, not the whole request: a failed
            # batch of creates then costs the receive buffer 36 bytes a message, not 250
            self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self._sock.bind((0, groups))
            self.portid: int = self._sock.getsockname()[0]
        except BaseException:
            self._sock.close()
            raise

    def _set_buf(self, forced: int | None, plain: int, size: int) -> None:
        if forced is not None:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, forced, size)
                return
            except PermissionError:
                pass  # no CAP_NET_ADMIN: take what the sysctl limit allows
        self._sock.setsockopt(socket.SOL_SOCKET, plain, size)

    @property
    def bad(self) -> int:
        """Malformed messages seen (and skipped) so far."""
        return self._parser.bad

    def fileno(self) -> int:
        return self._sock.fileno()

    def next_seq(self, count: int = 1) -> int:
        """Reserves ``count`` consecutive sequence numbers (modulo 2**32); returns the first."""
        first = (self._seq + 1) & _SEQ_MASK
        self._seq = (self._seq + count) & _SEQ_MASK
        return first

    def read(self, max_datagrams: int = 64) -> list[Message]:
        """Drains what is readable now, up to ``max_datagrams`` datagrams. On ENOBUFS (the
        kernel dropped messages for a full receive buffer) counts an overrun and returns what
        it has: the caller must resynchronise (dump)."""
        out: list[Message] = []
        recv_into, view, parse_into = self._sock.recv_into, self._view, self._parser.parse_into
        for _ in range(max_datagrams):
            try:
                n = recv_into(self._buf, RECV_SIZE, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1
                break
            if n > RECV_SIZE:  # cut short (cannot happen with kernel datagrams): count it
                self._parser.bad += 1
                n = RECV_SIZE
            parse_into(view[:n], out)
        return out

    def send_batch(self, msgs: list[bytes]) -> int:
        """Sends ``msgs`` packed into datagrams of up to MAX_SEND bytes (the kernel processes
        every message of a datagram, in order, before send returns). Returns how many were
        sent: fewer than ``len(msgs)`` only when the socket would block (EAGAIN), in which
        case the caller sends the rest later (after POLLOUT)."""
        sent = 0
        i, n = 0, len(msgs)
        send = self._sock.send
        while i < n:
            j, size = i, 0
            while j < n and (j == i or size + len(msgs[j]) <= MAX_SEND):
                size += len(msgs[j])
                j += 1
            try:
                send(b"".join(msgs[i:j]) if j - i > 1 else msgs[i])
            except BlockingIOError:
                return sent
            sent += j - i
            i = j
        return sent

    def wait(self, events: int, timeout: float) -> bool:
        """Blocks until the socket is ready for ``events`` (select.POLLIN / POLLOUT) or
        ``timeout`` seconds pass; True if ready."""
        p = select.poll()
        p.register(self._sock, events)
        return bool(p.poll(max(0, int(timeout * 1000))))

    def close(self) -> None:
        self._view.release()
        self._sock.close()

    def __enter__(self) -> CtSocket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- a kernel-side event filter -----------------------------------------------------------------
#
# Every conntrack entry of the namespace reports events once someone listens (the sysctl
# nf_conntrack_events = 2, the default, means "when a listener exists"), whatever nftables'
# ``ct event set`` says for other connections: on a node that also routes or terminates other
# traffic that is several events per connection to parse and throw away (measured: 67 us of
# halbd's CPU per forwarded connection that was not halb's). A classic BPF program on the
# socket drops them in the kernel: it reads the original tuple at the fixed offsets where the
# kernel writes it (ctnetlink_dump_tuples, the same shapes ctnl's fast path checks; IPv4 and
# IPv6, whose 16-byte addresses move the protocol and port) and keeps only the listeners'
# (address, protocol, port); it also drops the events our own requests caused (nlmsg_pid = our
# injecting socket). A message of any other shape (a zone, ICMP, something unforeseen) is kept
# and left to the parser.

SO_ATTACH_FILTER = 26
_OFF_PID, _OFF_FAMILY = 12, 16
_OFF_T_ORIG, _OFF_T_IP, _OFF_T_DST, _OFF_T_DPORT = 22, 26, 38, 66  # nla_type of each header
_OFF_DST, _OFF_PROTO, _OFF_DPORT = 40, 52, 68
_MIN_LEN = 72
# the same tuple of an IPv6 entry: 16-byte addresses move everything after them
_OFF6_T_DST, _OFF6_T_DPORT = 50, 90
_OFF6_DST, _OFF6_PROTO, _OFF6_DPORT = 52, 76, 92
_MIN_LEN6 = 96
# BPF opcodes
_LD_W, _LD_H, _LD_B, _LD_LEN = 0x20, 0x28, 0x30, 0x80
_JA, _JEQ, _JGE, _RET = 0x05, 0x15, 0x35, 0x06
_ACCEPT, _DROP = 0xFFFFFFFF, 0


def _swap16(v: int) -> int:  # a host-order (little-endian) u16 as BPF's big-endian load sees it
    return int.from_bytes(v.to_bytes(2, "little"), "big")


def _swap32(v: int) -> int:
    return int.from_bytes(v.to_bytes(4, "little"), "big")


def filter_program(accept: Iterable[tuple[int, str, int]], drop_portids: Iterable[int] = ()
                   ) -> list[tuple[int, int, int, int]]:
    """The BPF program (code, jt, jf, k) that keeps events of the original tuples to
    ``accept``'s (protocol, address, port), IPv4 or IPv6 addresses, and drops those caused by
    ``drop_portids``. An entry of a family with no listener is dropped; one of an unknown
    shape is kept (the parser decides)."""
    import ipaddress
    import sys
    if sys.byteorder != "little":  # nlmsg_pid and nla_type are host order
        raise OSError(errno.ENOTSUP, "the conntrack event filter assumes a little-endian host")
    v4: list[tuple[int, int, int]] = []
    v6: list[tuple[int, bytes, int]] = []
    for proto, addr, port in accept:
        a = ipaddress.ip_address(addr)
        if a.version == 4:
            v4.append((proto, int(a), port))
        else:
            v6.append((proto, a.packed, port))
    # [code, jt, jf, k]; a jump target is "next" or a label name; labels: name -> index
    prog: list[list] = []
    labels: dict[str, int] = {}
    n = [0]

    def emit(code, k=0, jt="next", jf="next"):
        prog.append([code, jt, jf, k])

    def label(name):
        labels[name] = len(prog)

    def fresh():
        n[0] += 1
        return f"_l{n[0]}"

    emit(_LD_LEN)
    emit(_JGE, _MIN_LEN, jf="accept")
    pids = [p for p in drop_portids if p]
    if pids:
        emit(_LD_W, _OFF_PID)
        for p in pids:
            emit(_JEQ, _swap32(p), jt="drop")
    emit(_LD_B, _OFF_FAMILY)
    emit(_JEQ, AF_INET, jt="v4")
    emit(_JEQ, AF_INET6, jt="v6", jf="accept")  # another family: the parser decides
    # each family's block: the kernel's shape of the tuple (else the parser decides), then
    # one test per listener; a long program reaches its far labels through unconditional
    # jumps (a conditional jump reaches 255 instructions, BPF_JA 2**32)
    label("v4")
    for off, typ in ((_OFF_T_ORIG, ctnl.CTA_TUPLE_ORIG | ctnl.NLA_F_NESTED),
                     (_OFF_T_IP, ctnl.CTA_TUPLE_IP | ctnl.NLA_F_NESTED),
                     (_OFF_T_DST, ctnl.CTA_IP_V4_DST), (_OFF_T_DPORT, ctnl.CTA_PROTO_DST_PORT)):
        emit(_LD_H, off)
        emit(_JEQ, _swap16(typ), jf="accept")  # not the shape we know: let the parser decide
    for proto, k_addr, port in v4:
        skip = fresh()
        emit(_LD_W, _OFF_DST)
        emit(_JEQ, k_addr, jf=skip)
        emit(_LD_B, _OFF_PROTO)
        emit(_JEQ, proto, jf=skip)
        emit(_LD_H, _OFF_DPORT)
        emit(_JEQ, port, jt="accept", jf=skip)
        label(skip)
    emit(_RET, _DROP)
    label("v6")
    emit(_LD_LEN)
    emit(_JGE, _MIN_LEN6, jf="accept")
    for off, typ in ((_OFF_T_ORIG, ctnl.CTA_TUPLE_ORIG | ctnl.NLA_F_NESTED),
                     (_OFF_T_IP, ctnl.CTA_TUPLE_IP | ctnl.NLA_F_NESTED),
                     (_OFF6_T_DST, ctnl.CTA_IP_V6_DST),
                     (_OFF6_T_DPORT, ctnl.CTA_PROTO_DST_PORT)):
        emit(_LD_H, off)
        emit(_JEQ, _swap16(typ), jf="accept")
    for proto, raw, port in v6:
        skip = fresh()
        for i in range(4):
            emit(_LD_W, _OFF6_DST + 4 * i)
            emit(_JEQ, int.from_bytes(raw[4 * i:4 * i + 4], "big"), jf=skip)
        emit(_LD_B, _OFF6_PROTO)
        emit(_JEQ, proto, jf=skip)
        emit(_LD_H, _OFF6_DPORT)
        emit(_JEQ, port, jt="accept", jf=skip)
        label(skip)
    emit(_RET, _DROP)
    label("drop")
    emit(_RET, _DROP)
    label("accept")
    emit(_RET, _ACCEPT)
    # far targets: a conditional jump beyond 255 goes through a BPF_JA placed right after it
    out = _resolve(prog, labels)
    if len(out) > 4096:  # BPF_MAXINSNS
        raise ValueError("conntrack event filter too long (too many listeners)")
    return out


def _resolve(prog: list[list], labels: dict[str, int]) -> list[tuple[int, int, int, int]]:
    """Label jumps to offsets. A conditional jump whose target is more than 255 instructions
    away gets a trampoline: it jumps to a BPF_JA inserted after it (repeated until every
    jump fits; each insertion moves later labels by one)."""
    prog = [list(x) for x in prog]
    labels = dict(labels)
    while True:
        fixed = True
        for i, (code, jt, jf, k) in enumerate(prog):
            if code not in (_JEQ, _JGE):
                continue
            for slot, lbl in ((1, jt), (2, jf)):
                if lbl == "next" or isinstance(lbl, int):
                    continue
                d = labels[lbl] - i - 1
                if d > 255:
                    # insert "ja lbl" after i; the jumping side goes to it (offset 0), the
                    # other side, if "next", must now skip the inserted instruction
                    other = 2 if slot == 1 else 1
                    prog.insert(i + 1, [_JA, "next", "next", lbl])
                    for nm, at in labels.items():
                        if at > i:
                            labels[nm] = at + 1
                    prog[i][slot] = 0
                    if prog[i][other] == "next":
                        prog[i][other] = 1
                    elif isinstance(prog[i][other], int):
                        prog[i][other] += 1
                    # fix earlier integer offsets that jumped across the insertion
                    for j in range(i):
                        cj = prog[j]
                        if cj[0] in (_JEQ, _JGE):
                            for sl in (1, 2):
                                if isinstance(cj[sl], int) and j + 1 + cj[sl] > i:
                                    cj[sl] += 1
                    fixed = False
                    break
            if not fixed:
                break
        if fixed:
            break
    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        if code == _JA:
            d = labels[k] - i - 1
            if d < 0:
                raise ValueError("conntrack event filter: a backward jump")
            out.append((code, 0, 0, d))
            continue
        if code in (_JEQ, _JGE):
            r = []
            for lbl in (jt, jf):
                d = 0 if lbl == "next" else lbl if isinstance(lbl, int) else labels[lbl] - i - 1
                if not 0 <= d <= 255:
                    raise ValueError("conntrack event filter: a jump out of reach")
                r.append(d)
            out.append((code, r[0], r[1], k))
        else:
            out.append((code, 0, 0, k))
    return out


def attach_filter(sock: "CtSocket", accept: Iterable[tuple[int, str, int]],
                  drop_portids: Iterable[int] = ()) -> int:
    """Attaches ``filter_program`` to ``sock`` (SO_ATTACH_FILTER); returns its length."""
    import ctypes
    import struct as _struct
    prog = filter_program(accept, drop_portids)
    buf = ctypes.create_string_buffer(b"".join(_struct.pack("=HBBI", *ins) for ins in prog))
    fprog = _struct.pack("HL", len(prog), ctypes.addressof(buf))
    sock._sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    return len(prog)


class InjectResult(NamedTuple):
    sent: int  # creates sent
    ok: int  # creates sent that the kernel did not refuse
    errors: dict[int, int]  # errno -> count; EINVAL also for flows that could not be encoded
    failed: list[tuple[Flow, int]]  # the first MAX_FAILED refused flows and their errno
    overruns: int  # receive-buffer overruns meanwhile: refusals may have gone unreported
    seconds: float


MAX_FAILED = 64


class _Tally:
    """The answers to one inject: refusals by errno, and whether the final marker came."""

    def __init__(self, todo: list[Flow], base: int, marker: int) -> None:
        self.todo, self.base, self.marker = todo, base, marker
        self.errors: dict[int, int] = {}
        self.failed: list[tuple[Flow, int]] = []
        self.done = False

    def refuse(self, flow: Flow, err: int) -> None:
        self.errors[err] = self.errors.get(err, 0) + 1
        if len(self.failed) < MAX_FAILED:
            self.failed.append((flow, err))

    def take(self, answers: list[Message]) -> None:
        for m in answers:
            if type(m) is NlError:
                k = (m.seq - self.base) & _SEQ_MASK
                if k < len(self.todo):
                    self.refuse(self.todo[k], m.errno)
                elif m.seq == self.marker:
                    self.done = True  # cannot happen (a NOOP is always acked), but it ends
            elif type(m) is NlAck and m.seq == self.marker:
                self.done = True


def inject(sock: CtSocket, flows: Iterable[Flow], *, timeout: int, mark: int = 0,
           batch: int = 128, deadline: float = 30.0) -> InjectResult:
    """Creates ``flows`` in the kernel (``ctnl.encode_create``, ``timeout`` seconds, ``mark``).

    ``batch`` creates go in one datagram, without per-message ACK: the kernel answers only
    the refusals. It processes a datagram before send() returns, so the answers are drained
    after each one, before they can fill the receive buffer. A final marker (an acked
    NLMSG_NOOP) closes the run: its ack comes after every answer to what preceded it. A
    flow that cannot be encoded is counted as EINVAL, not sent, and does not stop the rest.
    Raises TimeoutError after ``deadline`` seconds, ValueError on a socket in groups.
    """
    if sock.groups:
        raise ValueError("inject on a socket that receives events would swallow them")
    start = time.monotonic()
    end = start + deadline
    todo = list(flows)
    n = len(todo)
    base = sock.next_seq(n + 1)
    tally = _Tally(todo, base, (base + n) & _SEQ_MASK)
    overruns0 = sock.overruns
    sent = 0
    for i in range(0, n, batch):
        msgs = []
        for k in range(i, min(i + batch, n)):
            try:
                msgs.append(ctnl.encode_create(todo[k], seq=(base + k) & _SEQ_MASK,
                                               timeout=timeout, mark=mark))
            except ValueError:
                tally.refuse(todo[k], errno.EINVAL)
        _send_all(sock, msgs, end)
        sent += len(msgs)
        tally.take(sock.read(1 << 16))
    _send_all(sock, [ctnl.encode_marker(seq=tally.marker)], end)
    while not tally.done:
        answers = sock.read(1 << 16)
        tally.take(answers)
        if tally.done or answers:
            continue
        if sock.overruns != overruns0:
            break  # the queue is empty and the marker's ack was among what was lost
        if not sock.wait(select.POLLIN, end - time.monotonic()):
            raise TimeoutError(f"inject: no ack for the final marker after {n} creates")
    refused = sum(tally.errors.values())
    unencodable = n - sent
    return InjectResult(sent, sent - (refused - unencodable), tally.errors, tally.failed,
                        sock.overruns - overruns0, time.monotonic() - start)


def _send_all(sock: CtSocket, msgs: list[bytes], end: float) -> None:
    while msgs:
        k = sock.send_batch(msgs)
        msgs = msgs[k:]
        if msgs and not sock.wait(select.POLLOUT, end - time.monotonic()):
            raise TimeoutError(f"inject: {len(msgs)} messages unsent at the deadline")


def dump(sock: CtSocket | None = None, *, family: int = AF_INET, mark: int | None = None,
         max_entries: int = 1_000_000, timeout: float = 5.0) -> list[Event]:
    """The kernel's conntrack entries of ``family`` (and ``mark``, if given), as "dump"
    events. Opens (and closes) its own socket unless given one without groups. Raises
    OSError for a kernel error, TimeoutError after ``timeout`` seconds, OverflowError for
    more than ``max_entries`` entries (after draining the rest, so the socket stays usable)."""
    if sock is not None and sock.groups:
        raise ValueError("dump on a socket that receives events would swallow them")
    own = sock is None
    s = CtSocket(rcvbuf=1 << 20, sndbuf=1 << 16) if own else sock
    try:
        return _dump(s, family, mark, max_entries, time.monotonic() + timeout)
    finally:
        if own:
            s.close()


def _dump(s: CtSocket, family: int, mark: int | None, max_entries: int,
          end: float) -> list[Event]:
    seq = s.next_seq()
    if s.send_batch([ctnl.encode_dump(seq=seq, family=family, mark=mark)]) != 1:
        raise BlockingIOError(errno.EAGAIN, "dump request not sent")
    out: list[Event] = []
    too_many = False
    while True:
        left = end - time.monotonic()
        if left <= 0 or not s.wait(select.POLLIN, left):
            raise TimeoutError(f"dump: no end after {len(out)} entries")
        for m in s.read():
            if type(m) is Event:
                if m.kind != "dump":
                    continue
                if len(out) < max_entries:
                    out.append(m)
                else:
                    too_many = True
            elif type(m) is NlDone and m.seq == seq:
                if too_many:
                    raise OverflowError(f"dump: more than {max_entries} entries")
                return out
            elif type(m) is NlError and m.seq == seq:
                raise OSError(m.errno, f"conntrack dump: {errno.errorcode.get(m.errno, '?')}")
