"""The upgrade handover's wire format (halb.upgrade): messages, descriptors, blobs, bounds."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from halb import upgrade as up

pytestmark = pytest.mark.unit


def test_messages_descriptors_and_blobs_cross_a_unix_socket(tmp_path):
    async def main():
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.setblocking(False)
        b.setblocking(False)
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        blob = os.urandom(300_000)  # larger than one socket buffer
        await up.send(a, {"type": "hello", "pid": 7})
        assert (await up.recv(b))[0] == {"type": "hello", "pid": 7, "blob": 0}
        sender = asyncio.ensure_future(up.send(a, {"type": "handover", "listeners": ["www"]},
                                               [lst.fileno()], blob))
        msg, fds, got = await up.recv(b, with_fds=True)
        await sender
        assert msg["listeners"] == ["www"] and got == blob and len(fds) == 1
        s = socket.socket(fileno=fds[0])
        assert s.getsockname() == lst.getsockname()  # the same listening socket
        c = socket.create_connection(lst.getsockname())
        conn, _ = s.accept()  # accepted through the handed-over descriptor
        for x in (conn, c, s, lst, a, b):
            x.close()
    asyncio.run(main())


def test_a_closed_peer_and_silence_are_errors_not_hangs():
    async def main():
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.setblocking(False)
        b.setblocking(False)
        with pytest.raises(up.UpgradeError, match="within"):
            await up.recv(b, timeout=0.2)
        a.close()
        with pytest.raises(up.UpgradeError, match="closed"):
            await up.recv(b, timeout=1)
        b.close()
    asyncio.run(main())


def test_an_oversized_message_is_refused():
    async def main():
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.setblocking(False)
        b.setblocking(False)
        a.sendall((up.MAX_MSG + 1).to_bytes(4, "big"))
        with pytest.raises(up.UpgradeError, match="too large"):
            await up.recv(b, timeout=1)
        a.close()
        b.close()
    asyncio.run(main())
