"""systemd's readiness and watchdog protocol (sd_notify(3)) for ``Type=notify`` units.

systemd hands the service ``NOTIFY_SOCKET`` (a unix datagram socket path, or ``@name`` for an
abstract one) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). halbd sends
``READY=1`` once every part has started (listeners bound, election and sync running, control
socket up), ``WATCHDOG=1`` from its event loop every half watchdog period (a loop that stops
turning stops the pings, and systemd restarts the unit), ``STATUS=...`` lines, and
``STOPPING=1`` when it begins to shut down. Without ``NOTIFY_SOCKET`` every call does nothing.

The protocol is one datagram per message of ``KEY=value`` lines; there is no reply. A send that
fails (systemd gone, socket full) is dropped: readiness must never block or kill the daemon.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        if path.startswith("@"):
            path = "\0" + path[1:]  # abstract namespace
        self.address = path if path.startswith(("/", "\0")) else ""
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6  # ping at half the period, as systemd asks
        self.sent = 0
        self.failed = 0
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: object) -> bool:
        """Sends ``KEY=value`` lines (keys as given, upper case); False if not sent."""
        if not self.address:
            return False
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(msg, self.address)
        except OSError:
            self.failed += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        return self.send(READY=1, MAINPID=os.getpid(), **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def stopping(self, status: str = "") -> bool:
        return self.send(STOPPING=1, **({"STATUS": status} if status else {}))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
