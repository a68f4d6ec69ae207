"""The HTTP/2 protocol core, imported in one place: ``h2`` (python-hyper, sans I/O).

``jh2`` (a fork of h2 4.x with the same API and a Rust HPACK coder) measured 60 us of CPU per
stream server side against h2's 86 us (bench/h2_stream_cost.py), but halb's HTTP/2 tests fail
with it (curl: "stream 1 was not closed cleanly"), so it is not used; a switch would be made
here, once it passes them."""

from __future__ import annotations

import h2
import h2.config as config
import h2.connection as connection
import h2.errors as errors
import h2.events as events
import h2.exceptions as exceptions
import h2.settings as settings

NAME = "h2"
VERSION = h2.__version__
HPACK_TABLE_MAX = 4096  # the dynamic table we keep for what we send, whatever the peer allows
__all__ = ["config", "connection", "errors", "events", "exceptions", "settings", "NAME",
           "VERSION", "HPACK_TABLE_MAX", "clamp_table"]


def clamp_table(conn) -> None:
    """The peer's SETTINGS_HEADER_TABLE_SIZE is the most our encoder may use, not what it must:
    hpack searches its table linearly, so a peer offering 4 GiB made every header block slower
    and the table grow without bound. Kept at 4096 (HAProxy's size; RFC 7541 4.2: the encoder
    signals the smaller size in its next header block)."""
    enc = conn.encoder
    if enc.header_table_size > HPACK_TABLE_MAX:
        enc.header_table_size = HPACK_TABLE_MAX
