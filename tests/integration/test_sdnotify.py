"""systemd Type=notify: a real halbd tells a NOTIFY_SOCKET (bound here, as systemd would) when
it is ready, pings the watchdog at half of WATCHDOG_USEC from its event loop, and says
STOPPING=1 on SIGTERM. systemd is not PID 1 on the test machines, so the socket is the test's;
examples/systemd/halbd@.service is the unit that uses it."""

from __future__ import annotations

import configparser
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from halb.sdnotify import Notifier
from tests.helpers import Backends, Halbd, free_port, port_open, wait_for, write_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_notifier_protocol(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        srv.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
        assert n.enabled and n.watchdog_interval == 1.5
        assert n.ready("serving 1 listeners")
        msg = srv.recv(4096).decode()
        assert msg.splitlines() == ["READY=1", f"MAINPID={os.getpid()}",
                                    "STATUS=serving 1 listeners"]
        n.watchdog()
        assert srv.recv(4096) == b"WATCHDOG=1"
        n.close()
    # abstract socket names (@...), the watchdog meant for another process, nothing set
    assert Notifier({"NOTIFY_SOCKET": "@halb-test"}).address == "\0halb-test"
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000",
                     "WATCHDOG_PID": "1"}).watchdog_interval is None
    off = Notifier({})
    assert not off.enabled and not off.ready() and not off.watchdog()
    # systemd gone: a send fails quietly and is counted
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert not gone.ready() and gone.failed == 1


def test_halbd_is_ready_pings_the_watchdog_and_says_stopping(tmp_path):
    notify = str(tmp_path / "notify")
    port = free_port()
    with Backends(["b1"], tcp=True, http=False) as bk, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(notify)
        srv.settimeout(0.05)
        cfg = write_config(tmp_path, f'''
[node]
name = "lb1"
state_dir = "{tmp_path}"
[control]
socket = "{tmp_path / 'lb1.sock'}"
[[pools]]
name = "p"
  [[pools.backends]]
  address = "{bk.tcp['b1']}"
[[listeners]]
name = "t"
mode = "tcp"
bind = "127.0.0.1:{port}"
pool = "p"
''')
        msgs: list[tuple[float, str]] = []

        def drain():
            while True:
                try:
                    msgs.append((time.monotonic(), srv.recv(4096).decode()))
                except socket.timeout:
                    return

        node = Halbd(cfg, env={"NOTIFY_SOCKET": notify, "WATCHDOG_USEC": "200000"})
        try:
            def ready():
                drain()
                return any(m.startswith("READY=1") for _, m in msgs)
            wait_for(ready, 15, what="READY=1")
            # ready means serving: the listener and the control socket are up by then
            assert port_open("127.0.0.1", port) and (tmp_path / "lb1.sock").exists()
            r = next(m for _, m in msgs if m.startswith("READY=1"))
            assert f"MAINPID={node.pid}" in r and "STATUS=serving 1 listeners" in r, r
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.0:
                drain()
            pings = [t for t, m in msgs if m == "WATCHDOG=1" and t >= t0]
            # every 100 ms (half of 200 ms): about 10 in a second
            assert 6 <= len(pings) <= 14, len(pings)
            gaps = [b - a for a, b in zip(pings, pings[1:])]
            assert max(gaps) < 0.2, gaps
            node.signal(signal.SIGTERM)
            wait_for(lambda: not node.alive(), 10, what="halbd to stop")
            drain()
            assert any(m.startswith("STOPPING=1") for _, m in msgs), msgs[-3:]
            assert node.p.returncode == 0
        finally:
            node.close()


def test_unit_file_is_type_notify_with_watchdog_capabilities_and_hardening():
    unit = ROOT / "examples" / "systemd" / "halbd@.service"
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read_string(unit.read_text())
    svc = cp["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert float(svc["WatchdogSec"].rstrip("s")) > 0
    assert svc["User"] == "halb"
    caps = set(svc["AmbientCapabilities"].split())
    assert caps == {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}
    assert set(svc["CapabilityBoundingSet"].split()) == caps
    for opt in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert opt in svc, opt
    assert svc["ExecStart"].startswith("/opt/halb/bin/halbd ")
    assert "--check" in svc["ExecStartPre"]
