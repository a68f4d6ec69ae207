"""TLS session-ticket keys: generated per HTTPS listener, rotated, shared with the peers.

A session ticket is the server's own session state, encrypted and authenticated with a key
only the server knows; a client that shows it back skips the full handshake (no certificate
signature, no key exchange of a new session). A ticket can only be read by a server holding
its key: two nodes of an HA pair that share their keys let a client resume on the standby
after a takeover.

The pure core (no I/O, no clock of its own; ``now`` is wall-clock seconds given by the caller):

- ``TicketRing``: one listener's keys. It makes a new key every ``rotate`` seconds; the newest
  encrypts new tickets; it and the ``kept`` keys before it decrypt (a key dies ``rotate *
  (kept + 1)`` after it was made). Keys learned from peers (``learn``) only decrypt, until
  their own expiry; a ticket decrypted with any key but the current one is renewed (the client
  gets a ticket under the current key). Keys from a file (``fixed``, HAProxy's
  ``tls-ticket-keys`` format) replace the generated ones: they never rotate and are not sent
  to peers (every node reads the same file).
- ``TicketKeys``: the node's rings by listener name (they outlive a reload that rebuilds the
  listener), what is shipped to peers (``export``) and what came from them (``learn``).

Bounded: ``kept`` <= 16 own keys, at most ``MAX_PEER_KEYS`` keys per (peer, listener) and
``MAX_ORIGINS`` peers. Keys are secrets: nothing here logs them, and ``describe()`` (for
logs and status) gives counts and ages only.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Callable, Iterable

NAME_LEN = 16
MAX_PEER_KEYS = 8  # keys kept per (peer, listener)
MAX_ORIGINS = 16  # peers whose keys are kept
MAX_KEPT = 16
MAX_FILE_KEYS = 16


@dataclass(frozen=True, slots=True)
class TicketKey:
    name: bytes  # 16 bytes, sent in clear in the ticket: which key to decrypt with
    aes: bytes  # 32 bytes (AES-256-CBC) or 16 (AES-128-CBC, a 48-byte file key)
    hmac: bytes  # 32 bytes (HMAC-SHA256) or 16
    created: float  # wall clock
    expires: float  # wall clock; after it the key decrypts nothing (inf: a file key)

    def __repr__(self) -> str:  # never the key material, even in a traceback or a debugger
        return f"TicketKey(created={self.created:.0f}, expires={self.expires:.0f})"


def new_key(now: float, lifetime: float, rand: Callable[[int], bytes] = os.urandom) -> TicketKey:
    return TicketKey(rand(NAME_LEN), rand(32), rand(32), now, now + lifetime)


def parse_key_file(text: str, where: str = "ticket_keys") -> list[TicketKey]:
    """Keys from a file in HAProxy's ``tls-ticket-keys`` format: one base64 key a line, 48
    bytes (16 name, 16 AES-128 key, 16 HMAC key) or 80 (16 name, 32 AES-256, 32 HMAC);
    blank lines and ``#`` comments ignored. ValueError naming the line when one is bad (the
    message never quotes a key)."""
    keys = []
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        try:
            raw = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}: line {i} is not base64") from None
        if len(raw) == 48:
            keys.append(TicketKey(raw[:16], raw[16:32], raw[32:48], 0.0, float("inf")))
        elif len(raw) == 80:
            keys.append(TicketKey(raw[:16], raw[16:48], raw[48:80], 0.0, float("inf")))
        else:
            raise ValueError(f"{where}: line {i} holds {len(raw)} bytes; a key is 48 or 80")
    if not keys:
        raise ValueError(f"{where}: no key in the file")
    if len(keys) > MAX_FILE_KEYS:
        raise ValueError(f"{where}: {len(keys)} keys; at most {MAX_FILE_KEYS}")
    if len({k.name for k in keys}) != len(keys):
        raise ValueError(f"{where}: two keys share a name (their first 16 bytes)")
    return keys


class TicketRing:
    """One listener's ticket keys (see the module doc). Not thread-safe; the event loop's
    thread owns it (the OpenSSL callbacks run in that thread, inside the handshake)."""

    def __init__(self, rotate: float, kept: int, *, fixed: list[TicketKey] | None = None,
                 rand: Callable[[int], bytes] = os.urandom):
        if rotate <= 0 or not 1 <= kept <= MAX_KEPT:
            raise ValueError("rotate must be > 0 and kept 1..16")
        self.rotate = rotate
        self.kept = kept
        self.rand = rand
        self.own: list[TicketKey] = []  # newest last
        self.fixed = list(fixed) if fixed else None
        self.peers: dict[str, list[TicketKey]] = {}  # origin node -> its keys
        self._by_name: dict[bytes, TicketKey] = {}
        self._current: TicketKey | None = None
        self.version = 0  # bumped whenever the own keys change (what peers are sent)
        self._reindex()

    # -- configuration ----------------------------------------------------------------------

    def configure(self, rotate: float, kept: int, fixed: list[TicketKey] | None) -> None:
        """A reload's new settings: generated keys stay (tickets in flight still resume)."""
        if rotate <= 0 or not 1 <= kept <= MAX_KEPT:
            raise ValueError("rotate must be > 0 and kept 1..16")
        self.rotate, self.kept = rotate, kept
        self.fixed = list(fixed) if fixed else None
        self._reindex()

    @property
    def lifetime(self) -> float:
        """How long a generated key decrypts after it was made."""
        return self.rotate * (self.kept + 1)

    # -- time -------------------------------------------------------------------------------

    def tick(self, now: float) -> bool:
        """Rotates when the newest own key is ``rotate`` old (or there is none), drops expired
        keys (own and peers'); True when the own keys changed (tell the peers)."""
        changed = False
        if self.own and now < self.own[-1].created - 1.0:  # the wall clock went back
            self.own.clear()
        if not self.own or now - self.own[-1].created >= self.rotate:
            self.own.append(new_key(now, self.lifetime, self.rand))
            changed = True
        live = [k for k in self.own if k.expires > now][-(self.kept + 1):]
        if len(live) != len(self.own):
            changed = True
            self.own = live
        for origin in list(self.peers):
            ks = [k for k in self.peers[origin] if k.expires > now]
            if ks:
                self.peers[origin] = ks
            else:
                del self.peers[origin]
        if changed:
            self.version += 1
        self._reindex()
        return changed

    # -- use --------------------------------------------------------------------------------

    def encrypt_key(self) -> TicketKey | None:
        """The key new tickets are made with (None before the first tick: no ticket)."""
        return self._current

    def lookup(self, name: bytes, now: float) -> tuple[TicketKey, bool] | None:
        """The key named ``name`` and whether the ticket should be renewed (decrypted with
        another key than the current one); None when unknown or expired (full handshake)."""
        k = self._by_name.get(bytes(name))
        if k is None or k.expires <= now:
            return None
        return k, k is not self._current

    # -- peers ------------------------------------------------------------------------------

    def exportable(self, now: float) -> list[TicketKey]:
        """Own generated keys that still decrypt (never file keys)."""
        return [k for k in self.own if k.expires > now] if self.fixed is None else []

    def learn(self, origin: str, keys: Iterable[TicketKey], now: float) -> None:
        """A peer's current keys, added to those it sent before: each decrypts until its own
        expiry, so a peer that restarts (new keys) does not take the old ones away from the
        clients that hold tickets under them. The newest ``MAX_PEER_KEYS`` are kept."""
        if origin not in self.peers and len(self.peers) >= MAX_ORIGINS:
            return
        by = {k.name: k for k in self.peers.get(origin, ()) if k.expires > now}
        for k in keys:
            if k.expires > now and len(k.name) == NAME_LEN and len(k.aes) in (16, 32) \
                    and len(k.hmac) == len(k.aes):
                by[k.name] = k
        ks = sorted(by.values(), key=lambda k: k.created)[-MAX_PEER_KEYS:]
        if ks:
            self.peers[origin] = ks
        else:
            self.peers.pop(origin, None)
        self._reindex()

    def _reindex(self) -> None:
        by: dict[bytes, TicketKey] = {}
        for ks in self.peers.values():
            for k in ks:
                by[k.name] = k
        if self.fixed is not None:
            for k in self.fixed:
                by[k.name] = k
            # HAProxy's rule: the penultimate key encrypts (the last one is the next key,
            # already known to every node before any of them encrypts with it)
            self._current = self.fixed[-2] if len(self.fixed) > 1 else self.fixed[0]
        else:
            for k in self.own:
                by[k.name] = k  # own keys win a (2^-128) name clash
            self._current = self.own[-1] if self.own else None
        self._by_name = by

    def describe(self, now: float) -> dict:
        """Counts and ages for logs and status; never key material."""
        cur = self._current
        return {"source": "file" if self.fixed is not None else "generated",
                "own_keys": len(self.fixed if self.fixed is not None else self.own),
                "peer_keys": {o: len(ks) for o, ks in sorted(self.peers.items())},
                "current_age": round(now - cur.created, 1) if cur and self.fixed is None else None}


class TicketKeys:
    """The node's rings, by HTTPS listener name; ``on_change`` is called (no arguments) when
    own keys that peers should get changed."""

    def __init__(self):
        self.rings: dict[str, TicketRing] = {}
        self.shared: dict[str, bool] = {}  # listener -> its keys go to the peers
        self.on_change: list[Callable[[], None]] = []
        self.version = 0
        self.stats: dict[str, object] = {}  # listener -> its callback's counters (the edge's)
        self.contexts: dict[str, object] = {}  # listener -> its current SSL context
        self.unbound: set[str] = set()  # listeners whose OpenSSL context could not take keys

    def ring(self, listener: str, rotate: float, kept: int, fixed: list[TicketKey] | None,
             share: bool, now: float) -> TicketRing:
        r = self.rings.get(listener)
        if r is None:
            r = self.rings[listener] = TicketRing(rotate, kept, fixed=fixed)
        else:
            r.configure(rotate, kept, fixed)
        self.shared[listener] = share
        r.tick(now)
        self._changed()
        return r

    def drop(self, keep: Iterable[str]) -> None:
        """Forgets the rings of listeners no longer configured (after a reload)."""
        names = set(keep)
        for n in [n for n in self.rings if n not in names]:
            del self.rings[n]
            self.shared.pop(n, None)
            self.stats.pop(n, None)
            self.contexts.pop(n, None)
            self._changed()

    def tick(self, now: float) -> None:
        changed = False
        for r in self.rings.values():
            changed |= r.tick(now)
        if changed:
            self._changed()

    def _changed(self) -> None:
        self.version += 1
        for fn in list(self.on_change):
            fn()

    def export(self, now: float) -> list[tuple[str, TicketKey]]:
        """(listener, key) of every own key the peers should hold."""
        return [(n, k) for n, r in sorted(self.rings.items()) if self.shared.get(n)
                for k in r.exportable(now)]

    def learn(self, origin: str, keys: Iterable[tuple[str, TicketKey]], now: float) -> int:
        """A peer's export; keys of listeners we do not have (or do not share) are ignored.
        Returns how many keys of that peer are held now."""
        by: dict[str, list[TicketKey]] = {}
        for listener, k in keys:
            by.setdefault(listener, []).append(k)
        n = 0
        for name, r in self.rings.items():
            ks = by.get(name, []) if self.shared.get(name) else []
            r.learn(origin, ks, now)
            n += len(r.peers.get(origin, ()))
        return n
