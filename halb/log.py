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
