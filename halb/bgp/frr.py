"""The speaker: FRR's bgpd on this node, driven through ``vtysh``.

Why FRR (over BIRD, GoBGP, ExaBGP): it is the routing suite operators already run on hosts and
routers (Debian 12 ships 8.4), it has BFD (bfdd: sub-second failure detection between router
and node, ``neighbor X bfd``) and a withdrawal is one config change that bgpd sends as an
UPDATE at once (no MRAI for withdrawals; measured in the lab: the router's FIB loses the node
in well under a second). It is driven from Python by running ``vtysh -c`` with a timeout: no
client library, no generated gRPC stubs (GoBGP), no child process whose stdin must stay open
(ExaBGP, which also has no BFD); BIRD would need its config file rewritten and reloaded.

halb owns only the ``network`` statements of its VIPs under the operator's ``router bgp ASN``
block (the operator configures the neighbors, BFD, policies and ``no bgp network
import-check``, since the VIPs are not routes in the node's RIB). It reads the sessions with
``show bgp summary json`` and ``show bfd peers json``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from typing import Any

from ..config import BgpConfig


class SpeakerError(Exception):
    pass


def _docs(text: str) -> list[Any]:
    """The JSON documents of vtysh's output, one per ``-c`` (its warnings are skipped)."""
    out, dec, i = [], json.JSONDecoder(), 0
    while True:
        starts = [j for j in (text.find("{", i), text.find("[", i)) if j >= 0]
        if not starts:
            return out
        try:
            doc, i = dec.raw_decode(text, min(starts))
        except ValueError:
            return out
        out.append(doc)


def sessions_of(summary: Any, bfd: Any) -> list[dict]:
    """``show bgp summary json`` and ``show bfd peers json`` as one row per BGP neighbor:
    peer, remote_as, state ("Established", "Active", ...), uptime_ms, prefixes_sent, bfd
    ("up", "down", "" when the session has none)."""
    bfd_by_peer = {b.get("peer"): str(b.get("status", "")) for b in bfd or []
                   if isinstance(b, dict)}
    rows: dict[str, dict] = {}
    for fam in ("ipv4Unicast", "ipv6Unicast"):
        for peer, p in ((summary or {}).get(fam) or {}).get("peers", {}).items():
            r = rows.setdefault(peer, {"peer": peer, "remote_as": int(p.get("remoteAs", 0) or 0),
                                       "state": str(p.get("state", "")),
                                       "uptime_ms": int(p.get("peerUptimeMsec", 0) or 0),
                                       "prefixes_sent": 0, "bfd": bfd_by_peer.get(peer, "")})
            r["prefixes_sent"] += int(p.get("pfxSnt", 0) or 0)
    return [rows[k] for k in sorted(rows)]


class Frr:
    def __init__(self, cfg: BgpConfig):
        self.cfg = cfg
        exe = shutil.which(cfg.vtysh) or cfg.vtysh
        self.base = [exe] + (["-N", cfg.pathspace] if cfg.pathspace else [])
        self.runs = 0

    async def vtysh(self, *commands: str) -> str:
        """Runs one vtysh with these commands; SpeakerError when it fails or times out."""
        args = list(self.base)
        for c in commands:
            args += ["-c", c]
        self.runs += 1
        # In a worker thread with the standard library's subprocess, not the event loop's:
        # uvloop spawns with fork(), and a fork of this multi-threaded (gRPC) process now and
        # then crashed in the child before exec (exit -11); subprocess uses posix_spawn here
        # (an absolute path, close_fds=False: halbd's descriptors are close-on-exec, PEP 446).
        try:
            p = await asyncio.to_thread(
                subprocess.run, args, stdin=subprocess.DEVNULL, capture_output=True,
                timeout=self.cfg.command_timeout, close_fds=False)
        except subprocess.TimeoutExpired:
            raise SpeakerError(f"vtysh timed out after {self.cfg.command_timeout:g} s") from None
        except OSError as e:
            raise SpeakerError(f"cannot run {self.cfg.vtysh}: {e.strerror or e}") from None
        text = p.stdout.decode(errors="replace")
        if p.returncode != 0:
            msg = (p.stderr.decode(errors="replace") + text).strip().splitlines()
            msg = [m for m in msg if "vtysh.conf" not in m] or [f"exit {p.returncode}"]
            raise SpeakerError(f"vtysh: {' / '.join(msg[-3:])[:300]}")
        return text

    def _network(self, prefix: str, add: bool) -> list[str]:
        fam = "ipv6" if ":" in prefix else "ipv4"
        return ["configure terminal", f"router bgp {self.cfg.asn}",
                f"address-family {fam} unicast", ("" if add else "no ") + f"network {prefix}"]

    async def announce(self, prefix: str) -> None:
        await self.vtysh(*self._network(prefix, True))

    async def withdraw(self, prefix: str) -> None:
        try:
            await self.vtysh(*self._network(prefix, False))
        except SpeakerError as e:
            if "find" in str(e).lower() and "network" in str(e).lower():
                return  # not announced: what we wanted
            if "can't find static route" in str(e).lower():
                return
            raise

    async def sessions(self) -> list[dict]:
        text = await self.vtysh("show bgp summary json", "show bfd peers json")
        docs = _docs(text)
        summary = docs[0] if docs and isinstance(docs[0], dict) else {}
        bfd = docs[1] if len(docs) > 1 and isinstance(docs[1], list) else []
        return sessions_of(summary, bfd)
