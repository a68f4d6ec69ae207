"""Structured, one-line log records (JSON), on the standard library's logging.

    log = get_logger("health")
    log.info("backend_down", pool="web", backend="web1", reason="timeout")

prints ``{"ts": "...", "level": "info", "node": "lb1", "part": "health",
"event": "backend_down", "pool": "web", "backend": "web1", "reason": "timeout"}``.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_NODE = {"name": ""}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "node": _NODE["name"],
            "part": record.name.removeprefix("halb."),
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            d.update(fields)
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d, default=str, separators=(",", ":"))


class Logger:
    __slots__ = ("_l",)

    def __init__(self, name: str):
        self._l = logging.getLogger(f"halb.{name}")

    def _emit(self, level: int, event: str, fields: dict, exc_info=None) -> None:
        if self._l.isEnabledFor(level):
            self._l.log(level, event, extra={"fields": fields}, exc_info=exc_info)

    def debug(self, event: str, **fields) -> None:
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields) -> None:
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields) -> None:
        self._emit(logging.ERROR, event, fields)

    def exception(self, event: str, **fields) -> None:
        self._emit(logging.ERROR, event, fields, exc_info=True)

    def enabled(self, level: int = logging.DEBUG) -> bool:
        return self._l.isEnabledFor(level)


class RateLimitedLog:  # (node-wide: the TCP and UDP proxies and the NAT mode use it)
    """Logs an event at most once per ``interval`` per key, counting what it suppressed."""

    def __init__(self, logger: Logger, interval: float = 1.0):
        self.log = logger
        self.interval = interval
        self._last: dict[tuple, tuple[float, int]] = {}

    def warning(self, event: str, key: str = "", **fields) -> None:
        now = time.monotonic()
        k = (event, key)
        last, suppressed = self._last.get(k, (0.0, 0))
        if now - last < self.interval:
            self._last[k] = (last, suppressed + 1)
            return
        if len(self._last) > 1024:
            self._last.clear()
        self._last[k] = (now, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        self.log.warning(event, **fields)


def get_logger(name: str) -> Logger:
    return Logger(name)


def setup(node: str, level: str = "info", stream=None) -> None:
    _NODE["name"] = node
    root = logging.getLogger("halb")
    root.handlers.clear()
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(_JsonFormatter())
    root.addHandler(h)
    root.setLevel(getattr(logging, level.upper()))
    root.propagate = False


_NATIVE_RE = None


def _native_line(line: str) -> tuple[int, str, str]:
    """(level, source, message) of a native (absl/glog) log line such as
    ``E1204 21:14:29.440309    2758 ssl_transport_security.cc:3238] No match found ...``."""
    global _NATIVE_RE
    if _NATIVE_RE is None:
        import re
        _NATIVE_RE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^\]]+)\] ?(.*)$")
    m = _NATIVE_RE.match(line)
    if not m:
        return logging.WARNING, "", line
    lvl = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
    return lvl[m.group(1)], m.group(2), m.group(3)


def capture_native_stderr() -> None:
    """Routes what native code (gRPC's C core) writes to file descriptor 2 into this log, one
    JSON object per line (part "grpc", event "native_log"), so that halbd's stderr stays
    machine-readable. Python's own records keep going to the original stderr."""
    import os
    import threading
    orig = os.dup(2)
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)
    out = os.fdopen(orig, "w", buffering=1, encoding="utf-8", errors="replace")
    sys.stderr = out
    for h in logging.getLogger("halb").handlers:
        if isinstance(h, logging.StreamHandler):
            h.setStream(out)
    glog = get_logger("grpc")

    def pump() -> None:
        with os.fdopen(r, "rb", buffering=0) as f:
            buf = b""
            while True:
                chunk = f.read(65536)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    line = raw.decode("utf-8", "replace").rstrip()
                    if line:
                        level, src, msg = _native_line(line[:4000])
                        glog._emit(level, "native_log", {"source": src, "message": msg})
                if len(buf) > 65536:  # no newline in sight: emit what there is
                    glog._emit(logging.WARNING, "native_log",
                               {"message": buf[:4000].decode("utf-8", "replace")})
                    buf = b""
    threading.Thread(target=pump, name="halb-native-stderr", daemon=True).start()
