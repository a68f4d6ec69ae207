"""Zero-downtime upgrade of halbd itself (``halbctl upgrade`` or SIGUSR2): the running
process (the old one) starts a new one from the same config file and hands it over:

1. old: listens on ``<state_dir>/<node>.upgrade`` (a unix socket, 0600) and starts
   ``halbd CONFIG --upgrade-from PATH``; the new process parses its config, builds its node
   and connects: ``hello`` (its pid and listener names). Anything wrong so far, and the old
   process carries on alone.
2. old: tells its sync followers goodbye (a planned close: no fast takeover on the peers) and
   stops its sync server and metrics endpoint (their ports go to the new process), then sends
   ``handover``: the listening sockets (SCM_RIGHTS, by listener name), the instances it is
   master of, its sticky and flow tables.
3. new: starts with those sockets (the kernel's accept queues never close), adopts the master
   instances (master at once, VIPs left in place, adverts at once), binds sync, metrics and
   the control socket (a new socket renamed over the old path), and says ``ready``; or
   ``failed`` with the reason, and the old process takes its sync and metrics back.
4. old: stops its election without a word (no priority-0 advert, no VIP removal), stops
   accepting, lets its connections finish (bounded), sends its tables once more (``final``:
   what changed while it drained) and exits.

This module is the wire format: length-prefixed JSON messages on a unix stream socket, file
descriptors attached to the ``handover`` message, a table blob after it. Bounded: message
sizes, the number of descriptors, every wait.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct

MAX_MSG = 1 << 20  # a JSON message
MAX_BLOB = 512 << 20  # the tables (bounded by their max_entries)
MAX_FDS = 1024
TIMEOUT = 30.0  # each step of the handover


class UpgradeError(Exception):
    pass


def path_for(state_dir: str, node: str) -> str:
    return f"{state_dir}/{node}.upgrade"


async def send(sock: socket.socket, msg: dict, fds: list[int] = (), blob: bytes = b"") -> None:
    """One message: 4-byte length + JSON (+ descriptors) [+ 8-byte length + blob]."""
    loop = asyncio.get_running_loop()
    data = json.dumps(dict(msg, blob=len(blob))).encode()
    if len(data) > MAX_MSG:
        raise UpgradeError("upgrade message too large")
    head = struct.pack("!I", len(data)) + data
    if fds:
        if len(fds) > MAX_FDS:
            raise UpgradeError("too many sockets to hand over")
        # a few hundred bytes on a fresh unix socket: one sendmsg, the buffer has room
        n = socket.send_fds(sock, [head], list(fds))
        if n < len(head):
            await loop.sock_sendall(sock, head[n:])
    else:
        await loop.sock_sendall(sock, head)
    if blob:
        await loop.sock_sendall(sock, struct.pack("!Q", len(blob)) + blob)


async def _exact(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, min(n - len(buf), 1 << 20))
        if not chunk:
            raise UpgradeError("the other process closed the upgrade socket")
        buf += chunk
    return bytes(buf)


async def recv(sock: socket.socket, *, with_fds: bool = False,
               timeout: float = TIMEOUT) -> tuple[dict, list[int], bytes]:
    """The next message: (JSON, descriptors, blob)."""
    loop = asyncio.get_running_loop()
    fds: list[int] = []

    async def go():
        nonlocal fds
        if with_fds:
            sock.setblocking(True)
            sock.settimeout(timeout)
            try:
                msg, fds, _flags, _addr = await loop.run_in_executor(
                    None, socket.recv_fds, sock, 4, MAX_FDS)
            finally:
                sock.setblocking(False)
            if len(msg) < 4:
                while len(msg) < 4:
                    more = await loop.sock_recv(sock, 4 - len(msg))
                    if not more:
                        raise UpgradeError("the other process closed the upgrade socket")
                    msg += more
        else:
            msg = await _exact(sock, 4)
        (n,) = struct.unpack("!I", msg[:4])
        if n > MAX_MSG:
            raise UpgradeError("upgrade message too large")
        d = json.loads(await _exact(sock, n))
        blob = b""
        if d.get("blob"):
            (m,) = struct.unpack("!Q", await _exact(sock, 8))
            if m > MAX_BLOB:
                raise UpgradeError("upgrade table blob too large")
            blob = await _exact(sock, m)
        return d, fds, blob
    try:
        return await asyncio.wait_for(go(), timeout)
    except asyncio.TimeoutError:
        for fd in fds:
            socket.close(fd)
        raise UpgradeError(f"no answer on the upgrade socket within {timeout:.0f} s") from None
