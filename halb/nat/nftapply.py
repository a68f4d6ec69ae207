"""The edge of the kernel NAT mode's nftables side: applies the JSON documents that
``halb.nat.nft`` builds and reads the table back.

libnftables through ctypes when the library loads (``libnftables.so.1``): one context per
call (``nft_ctx_new(0)``, JSON output on, output and errors buffered), so a call runs in the
network namespace of the calling thread and leaves nothing behind. Without the library it
runs ``nft -j -f -`` as a subprocess (bounded by ``timeout``). A document is one command
buffer, which libnftables commits as one transaction: all of it or nothing.

Errors raise ``NftError`` with nft's own message (it names the problem, e.g.
``Error: Could not process rule: No such file or directory``).

The calls block (a full 65537-slot table takes about 0.5 s to apply, an update of half its
slots about 0.2 s; ctypes releases the GIL meanwhile): from asyncio, run them in an executor.
``counters()`` reads the named counters with one netlink dump (well under a millisecond),
since nft's own listing loads every map element first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import socket
import struct
import subprocess
import threading

NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_JSON = 1 << 4
LIBRARY_NAMES = ("libnftables.so.1", "libnftables.so")
DEFAULT_TIMEOUT = 60.0


class NftError(Exception):
    """nft refused a document or a listing; ``str(e)`` is nft's error text."""


class _Lib:
    """The few libnftables entry points, typed."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        v, p, i, u, s = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, \
            ctypes.c_bool
        for name, res, args in (
                ("nft_ctx_new", v, [ctypes.c_uint32]),
                ("nft_ctx_free", None, [v]),
                ("nft_ctx_output_set_flags", None, [v, u]),
                ("nft_ctx_buffer_output", i, [v]),
                ("nft_ctx_buffer_error", i, [v]),
                ("nft_ctx_get_output_buffer", p, [v]),
                ("nft_ctx_get_error_buffer", p, [v]),
                ("nft_run_cmd_from_buffer", i, [v, p]),
                ("nft_ctx_set_dry_run", None, [v, s])):
            fn = getattr(lib, name)
            fn.restype = res
            fn.argtypes = args
            setattr(self, name, fn)

    def run(self, text: str, *, dry_run: bool = False) -> tuple[int, str, str]:
        ctx = self.nft_ctx_new(NFT_CTX_DEFAULT)
        if not ctx:
            raise NftError("nft_ctx_new failed")
        try:
            # JSON output also makes the parser take the input as JSON
            self.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
            if self.nft_ctx_buffer_output(ctx) or self.nft_ctx_buffer_error(ctx):
                raise NftError("libnftables: cannot buffer output")
            if dry_run:
                self.nft_ctx_set_dry_run(ctx, True)
            rc = self.nft_run_cmd_from_buffer(ctx, text.encode())
            out = self.nft_ctx_get_output_buffer(ctx) or b""
            err = self.nft_ctx_get_error_buffer(ctx) or b""
            return rc, out.decode(errors="replace"), err.decode(errors="replace")
        finally:
            self.nft_ctx_free(ctx)


_lib: _Lib | None = None
_lib_error: str | None = None
_lib_lock = threading.Lock()


def _load() -> _Lib | None:
    global _lib, _lib_error
    with _lib_lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        names = list(LIBRARY_NAMES)
        found = ctypes.util.find_library("nftables")
        if found:
            names.append(found)
        for nm in names:
            try:
                _lib = _Lib(ctypes.CDLL(nm))
                return _lib
            except (OSError, AttributeError) as e:
                _lib_error = f"{nm}: {e}"
        return None


class Nft:
    """Runs nft commands. ``method``: ``"auto"`` (libnftables, else the ``nft`` binary),
    ``"lib"`` or ``"cli"``. ``nft`` is the binary's path for the subprocess way."""

    def __init__(self, method: str = "auto", *, nft: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT):
        if method not in ("auto", "lib", "cli"):
            raise ValueError(f"method must be auto, lib or cli, not {method!r}")
        self.lib = _load() if method in ("auto", "lib") else None
        if method == "lib" and self.lib is None:
            raise NftError(f"libnftables cannot be loaded ({_lib_error})")
        self.nft = nft or shutil.which("nft") or "/usr/sbin/nft"
        self.timeout = timeout

    @property
    def method(self) -> str:
        return "lib" if self.lib is not None else "cli"

    def run(self, doc: dict | str, *, dry_run: bool = False) -> str:
        """Run one JSON document (a dict or its text); return nft's (JSON) output."""
        text = doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":"))
        if self.lib is not None:
            rc, out, err = self.lib.run(text, dry_run=dry_run)
        else:
            rc, out, err = self._cli(text, dry_run)
        if rc != 0:
            raise NftError(err.strip() or f"nft failed (rc {rc})")
        return out

    def _cli(self, text: str, dry_run: bool) -> tuple[int, str, str]:
        argv = [self.nft, "-j"] + (["-c"] if dry_run else []) + ["-f", "-"]
        try:
            p = subprocess.run(argv, input=text, capture_output=True, text=True,
                               timeout=self.timeout, env=dict(os.environ, LC_ALL="C"))
        except subprocess.TimeoutExpired as e:
            raise NftError(f"nft did not finish within {self.timeout} s") from e
        except OSError as e:
            raise NftError(f"cannot run {self.nft}: {e}") from e
        return p.returncode, p.stdout, p.stderr

    # -- the operations

    def apply(self, doc: dict) -> None:
        """Apply ``doc`` as one transaction (nothing of it when any part fails). An empty
        document is a no-op."""
        if not doc.get("nftables"):
            return
        self.run(doc)

    def check(self, doc: dict) -> None:
        """Validate ``doc`` against the kernel's current state without committing it."""
        if doc.get("nftables"):
            self.run(doc, dry_run=True)

    def list_table(self, name: str = "halb", family: str = "ip") -> dict:
        """The JSON listing of ``table <family> <name>`` (raises NftError when there is
        none)."""
        out = self.run({"nftables": [{"list": {"table": {"family": family, "name": name}}}]})
        try:
            return json.loads(out)
        except ValueError as e:
            raise NftError(f"nft listed no JSON: {out[:200]!r}") from e

    def counters(self, name: str = "halb") -> dict[str, tuple[int, int]]:
        """``{counter: (packets, bytes)}`` of the named counters of the tables ``ip <name>``
        and ``ip6 <name>`` (the IPv6 listeners'; counter names are per listener, so they do
        not collide); empty when there is no such table. Read with one netlink dump of each
        table's counter objects: nft's own listing would load every map element first (0.6 s
        for a 65537-slot table). Falls back to the listing when netlink fails."""
        out: dict[str, tuple[int, int]] = {}
        for family, nfproto in (("ip", NFPROTO_IPV4), ("ip6", NFPROTO_IPV6)):
            try:
                out.update(netlink_counters(name, family=nfproto))
                continue
            except (OSError, ValueError, struct.error):
                pass
            try:
                out.update(counters_of(self.list_table(name, family)))
            except NftError as e:
                if "No such file or directory" not in str(e):
                    raise
        return out


def counters_of(listing: dict) -> dict[str, tuple[int, int]]:
    """The counters in a JSON listing (see ``Nft.counters``)."""
    out: dict[str, tuple[int, int]] = {}
    for item in listing.get("nftables", ()):
        c = item.get("counter")
        if c is not None:
            out[c["name"]] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
            continue
        r = item.get("rule")
        if r is not None and r.get("comment"):
            for e in r.get("expr", ()):
                rc = e.get("counter") if isinstance(e, dict) else None
                if isinstance(rc, dict) and "packets" in rc:
                    out[r["comment"]] = (int(rc["packets"]), int(rc.get("bytes", 0)))
    return out


# ---------------------------------------------------------------------------------------------
# Named counters over netlink (NFT_MSG_GETOBJ dump, filtered by table and type)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWOBJ, NFT_MSG_GETOBJ = 18, 19
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFPROTO_IPV4, NFPROTO_IPV6 = 2, 10
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFT_OBJECT_COUNTER = 1
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
_NLA_TYPE_MASK = 0x3FFF


def _nla(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n & 3)


def _attrs(buf: bytes, off: int, end: int) -> dict[int, bytes]:
    out = {}
    while off + 4 <= end:
        n, kind = struct.unpack_from("=HH", buf, off)
        if n < 4:
            break
        out[kind & _NLA_TYPE_MASK] = buf[off + 4:off + n]
        off += (n + 3) & ~3
    return out


def netlink_counters(table: str = "halb", *, timeout: float = 5.0,
                     family: int = NFPROTO_IPV4) -> dict[str, tuple[int, int]]:
    """``{name: (packets, bytes)}`` of the named counters of ``table ip <table>`` (``family``
    NFPROTO_IPV6: ``table ip6 <table>``; empty when the table does not exist), from the
    kernel directly."""
    body = struct.pack("=BBH", family, 0, 0) + \
        _nla(NFTA_OBJ_TABLE, table.encode() + b"\0") + \
        _nla(NFTA_OBJ_TYPE, struct.pack(">I", NFT_OBJECT_COUNTER))
    seq = 1
    msg = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ,
                      NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body
    out: dict[str, tuple[int, int]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        s.settimeout(timeout)
        s.bind((0, 0))
        s.send(msg)
        while True:
            buf = s.recv(1 << 20)
            off = 0
            while off + 16 <= len(buf):
                n, kind, _flags, mseq, _pid = struct.unpack_from("=IHHII", buf, off)
                if n < 16:
                    raise ValueError("bad netlink message")
                if mseq == seq:
                    if kind == NLMSG_DONE:
                        return out
                    if kind == NLMSG_ERROR:
                        err = -struct.unpack_from("=i", buf, off + 16)[0]
                        if err == 0:
                            return out
                        if err == 2:  # ENOENT: no such table
                            return {}
                        raise OSError(err, os.strerror(err))
                    if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ:
                        a = _attrs(buf, off + 20, off + n)  # 16 header + 4 nfgenmsg
                        if struct.unpack(">I", a.get(NFTA_OBJ_TYPE, b"\0" * 4))[0] == \
                                NFT_OBJECT_COUNTER and NFTA_OBJ_NAME in a:
                            d = a.get(NFTA_OBJ_DATA, b"")
                            c = _attrs(d, 0, len(d))
                            name = a[NFTA_OBJ_NAME].split(b"\0", 1)[0].decode()
                            out[name] = (struct.unpack(">Q", c[NFTA_COUNTER_PACKETS])[0],
                                         struct.unpack(">Q", c[NFTA_COUNTER_BYTES])[0])
                off += (n + 3) & ~3


_default: Nft | None = None


def default() -> Nft:
    global _default
    if _default is None:
        _default = Nft()
    return _default


def apply(doc: dict) -> None:
    default().apply(doc)


def check(doc: dict) -> None:
    default().check(doc)


def list_table(name: str = "halb", family: str = "ip") -> dict:
    return default().list_table(name, family)


def counters(name: str = "halb") -> dict[str, tuple[int, int]]:
    return default().counters(name)
