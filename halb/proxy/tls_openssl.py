"""What Python's ``ssl`` does not offer, set on the ``SSL_CTX`` of an ``ssl.SSLContext``
through ctypes: session-ticket keys of our own (OpenSSL's ticket key callback, fed by a
``halb.tlstickets.TicketRing``), the session cache's size and the session lifetime.

Why ctypes: the HTTPS listeners are asyncio's SSL transports, which take only a stdlib
``ssl.SSLContext``; pyOpenSSL contexts cannot be used there, and neither API has ticket keys
(HAProxy and nginx use ``SSL_CTX_set_tlsext_ticket_key_cb`` for the same reason). The
``SSL_CTX *`` is the first field after the object header of CPython's ``_ssl._SSLContext``;
``bind`` checks that pointer by a round trip before using it (the options OpenSSL reports for
it must equal ``ctx.options``, before and after Python toggles one) and, if the check or
anything else fails, says why (``Binding.problem``): the caller then keeps OpenSSL's own
per-process ticket keys (tickets still resume on this node, not on its peer).

The callback runs inside the handshake, in the event loop's thread (asyncio's SSL transport
calls OpenSSL there; ctypes takes the GIL back for it). It never raises into OpenSSL: any
error gives "no ticket" / "unknown ticket", and the client gets a full handshake.
"""

from __future__ import annotations

import ctypes
import os
import ssl
import sys
from typing import Callable

from ..tlstickets import TicketRing

SSL_CTRL_SET_SESS_CACHE_SIZE = 42
SSL_CTRL_SET_SESS_CACHE_MODE = 44
SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB = 72
SSL_SESS_CACHE_OFF = 0
SSL_SESS_CACHE_SERVER = 2

# int cb(SSL *s, unsigned char key_name[16], unsigned char iv[16], EVP_CIPHER_CTX *ctx,
#        HMAC_CTX *hctx, int enc)
TICKET_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)


class TicketStats:
    """Counts by what the callback did (read at scrape time)."""
    __slots__ = ("issued", "resumed", "renewed", "unknown", "errors")

    def __init__(self):
        self.issued = self.resumed = self.renewed = self.unknown = self.errors = 0


def _loaded_paths() -> tuple[str | None, str | None]:
    """The libssl and libcrypto the ``_ssl`` module runs with (not some other copy)."""
    ssl_path = crypto_path = None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.rsplit(None, 1)[-1] if "/" in line else ""
                base = os.path.basename(p)
                if base.startswith("libssl.so") and ssl_path is None:
                    ssl_path = p
                elif base.startswith("libcrypto.so") and crypto_path is None:
                    crypto_path = p
    except OSError:
        pass
    return ssl_path, crypto_path


class _Lib:
    def __init__(self):
        import ctypes.util
        sp, cp = _loaded_paths()
        sp = sp or ctypes.util.find_library("ssl")
        cp = cp or ctypes.util.find_library("crypto")
        if not sp or not cp:
            raise OSError("libssl/libcrypto not found")
        s = ctypes.CDLL(sp)
        c = ctypes.CDLL(cp)
        vp, i, l, u64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_uint64
        s.SSL_CTX_get_options.argtypes, s.SSL_CTX_get_options.restype = [vp], u64
        s.SSL_CTX_ctrl.argtypes, s.SSL_CTX_ctrl.restype = [vp, i, l, vp], l
        s.SSL_CTX_callback_ctrl.argtypes, s.SSL_CTX_callback_ctrl.restype = [vp, i, TICKET_CB], l
        s.SSL_CTX_set_timeout.argtypes, s.SSL_CTX_set_timeout.restype = [vp, l], l
        s.SSL_CTX_get_timeout.argtypes, s.SSL_CTX_get_timeout.restype = [vp], l
        c.EVP_aes_256_cbc.restype = vp
        c.EVP_aes_128_cbc.restype = vp
        c.EVP_sha256.restype = vp
        c.EVP_EncryptInit_ex.argtypes = [vp, vp, vp, ctypes.c_char_p, ctypes.c_char_p]
        c.EVP_EncryptInit_ex.restype = i
        c.EVP_DecryptInit_ex.argtypes = [vp, vp, vp, ctypes.c_char_p, ctypes.c_char_p]
        c.EVP_DecryptInit_ex.restype = i
        c.HMAC_Init_ex.argtypes = [vp, ctypes.c_char_p, i, vp, vp]
        c.HMAC_Init_ex.restype = i
        self.ssl, self.crypto = s, c
        self.aes256 = c.EVP_aes_256_cbc()
        self.aes128 = c.EVP_aes_128_cbc()
        self.sha256 = c.EVP_sha256()


_lib: _Lib | None = None
_lib_problem = ""


def _library() -> _Lib | None:
    global _lib, _lib_problem
    if _lib is None and not _lib_problem:
        try:
            _lib = _Lib()
        except (OSError, AttributeError) as e:
            _lib_problem = f"cannot use OpenSSL through ctypes: {e}"
    return _lib


def ssl_ctx_pointer(ctx: ssl.SSLContext) -> tuple[int, str]:
    """(SSL_CTX *, "") for ``ctx``, or (0, why not). Checked by a round trip (module doc)."""
    lib = _library()
    if lib is None:
        return 0, _lib_problem
    base = getattr(ssl, "_ssl", None)
    cls = getattr(base, "_SSLContext", None)
    if sys.implementation.name != "cpython" or cls is None or not isinstance(ctx, cls) \
            or cls.__basicsize__ < object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p):
        return 0, "not CPython's _ssl._SSLContext"
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        return 0, "no SSL_CTX pointer"
    flip = ssl.OP_ENABLE_MIDDLEBOX_COMPAT
    try:
        first = lib.ssl.SSL_CTX_get_options(ptr) == int(ctx.options)
        ctx.options ^= flip
        second = lib.ssl.SSL_CTX_get_options(ptr) == int(ctx.options)
        ctx.options ^= flip
        third = lib.ssl.SSL_CTX_get_options(ptr) == int(ctx.options)
    except (OSError, ValueError) as e:
        return 0, f"SSL_CTX check failed: {e}"
    if not (first and second and third):
        return 0, "SSL_CTX_get_options of the pointer found differs from SSLContext.options"
    return ptr, ""


def _ticket_callback(lib: _Lib, ring: TicketRing, now: Callable[[], float],
                     stats: TicketStats, on_error: Callable[[BaseException], None]):
    memmove, string_at, urandom = ctypes.memmove, ctypes.string_at, os.urandom
    enc_init, dec_init, hmac_init = (lib.crypto.EVP_EncryptInit_ex, lib.crypto.EVP_DecryptInit_ex,
                                     lib.crypto.HMAC_Init_ex)
    aes256, aes128, sha256 = lib.aes256, lib.aes128, lib.sha256

    def cb(_ssl, key_name, iv, cctx, hctx, enc):
        try:
            if enc:
                k = ring.encrypt_key()
                if k is None:
                    return 0  # no key yet: an empty ticket (the session is not resumable)
                ivb = urandom(16)
                memmove(key_name, k.name, 16)
                memmove(iv, ivb, 16)
                if enc_init(cctx, aes256 if len(k.aes) == 32 else aes128, None, k.aes, ivb) != 1 \
                        or hmac_init(hctx, k.hmac, len(k.hmac), sha256, None) != 1:
                    stats.errors += 1
                    return 0  # no ticket rather than a failed handshake
                stats.issued += 1
                return 1
            got = ring.lookup(string_at(key_name, 16), now())
            if got is None:
                stats.unknown += 1
                return 0  # unknown or expired key: a full handshake
            k, renew = got
            if hmac_init(hctx, k.hmac, len(k.hmac), sha256, None) != 1 or \
                    dec_init(cctx, aes256 if len(k.aes) == 32 else aes128, None, k.aes,
                             string_at(iv, 16)) != 1:
                stats.errors += 1
                return 0
            if renew:
                stats.renewed += 1
                return 2  # good, but issue a new ticket under the current key
            stats.resumed += 1
            return 1
        except BaseException as e:  # noqa: BLE001 - never into OpenSSL
            stats.errors += 1
            try:
                on_error(e)
            except BaseException:  # noqa: BLE001
                pass
            return 0
    return TICKET_CB(cb)


def configure(ctx: ssl.SSLContext, *, cache_size: int, lifetime: float,
              ring: TicketRing | None, now: Callable[[], float], stats: TicketStats,
              on_error: Callable[[BaseException], None]) -> str:
    """Sets the session cache (``cache_size`` sessions; 0: off), the session lifetime and,
    with a ring, the ticket key callback on ``ctx``. Returns "" or the reason nothing was set
    (then OpenSSL's defaults stay: a 20,480-session cache, 300 s (TLS 1.2) / 7,200 s (1.3),
    per-process ticket keys)."""
    ptr, why = ssl_ctx_pointer(ctx)
    if not ptr:
        return why
    lib = _library()
    assert lib is not None
    s = lib.ssl
    s.SSL_CTX_ctrl(ptr, SSL_CTRL_SET_SESS_CACHE_MODE,
                   SSL_SESS_CACHE_SERVER if cache_size > 0 else SSL_SESS_CACHE_OFF, None)
    if cache_size > 0:
        s.SSL_CTX_ctrl(ptr, SSL_CTRL_SET_SESS_CACHE_SIZE, cache_size, None)
    s.SSL_CTX_set_timeout(ptr, max(1, int(lifetime)))
    if ring is not None:
        cb = _ticket_callback(lib, ring, now, stats, on_error)
        if s.SSL_CTX_callback_ctrl(ptr, SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB, cb) != 1:
            return "SSL_CTX_set_tlsext_ticket_key_cb refused"
        ctx._halb_ticket_cb = cb  # type: ignore[attr-defined]  # alive as long as the context
    return ""
