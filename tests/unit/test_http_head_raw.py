"""The response head taken from its raw lines (``ResponseHead.take``, what the proxy uses after
ResponseFramer checked them) gives the same head, framing and errors as the per-header ``add``
path. Finding the head's end (after CR LFs, behind interim answers) is ResponseFramer's, tested
in test_http_framer.py."""

from __future__ import annotations

import httptools
import pytest

from halb.proxy.http_head import HttpError, ResponseHead

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("dual_module")]
DUAL_MODULE = "halb.proxy.http_head"  # every test runs compiled and from source (conftest.py)

HEADS = [
    [(b"Server", b"nginx"), (b"Date", b"Sun, 22 Nov 2026 05:00:00 GMT"),
     (b"Content-Type", b"text/plain"), (b"Content-Length", b"14"), (b"Connection", b"keep-alive")],
    [(b"Connection", b"close"), (b"X-Empty", b"")],
    [(b"Transfer-Encoding", b"chunked"), (b"Keep-Alive", b"timeout=5"), (b"Set-Cookie", b"a=b")],
    [(b"Connection", b"X-Hop, keep-alive"), (b"X-Hop", b"1"), (b"Y", b"2"), (b"Content-Length", b"0")],
    [],
    [(b"Proxy-Connection", b"x"), (b"TE", b"y"), (b"Trailer", b"z"), (b"Upgrade", b"h2c"),
     (b"content-LENGTH", b"5")],
    [(b"User-Agent", b"ua"), (b"Proxy-Authenticate", b"p"), (b"Proxy-Authorization", b"q"),
     (b"Content-Length", b"123456789012345678901234")],  # longer than 18 digits
    [(b"CONNECTION", b"Keep-Alive"), (b"Transfer-Encoding", b"gzip, chunked")],
]
BUILDS = [(200, b"OK", False, False, None, False), (200, b"OK", True, True, b"c=1", False),
          (304, b"", False, False, None, True), (599, b"Odd", False, True, None, False)]


def _lines(hs, sep=b": "):
    return b"".join(n + sep + v + b"\r\n" for n, v in hs)


@pytest.mark.parametrize("hs", HEADS)
@pytest.mark.parametrize("sep", [b": ", b":", b":  "])
def test_take_matches_add(hs, sep):
    a = ResponseHead()
    for n, v in hs:
        a.add(n, v)
    b = ResponseHead()
    b.take(_lines(hs, sep))
    assert (a.content_length, a.chunked, a.conn_tokens, a.conn_extra) == \
        (b.content_length, b.chunked, b.conn_tokens, b.conn_extra)
    for args in BUILDS:
        got = b.build(*args)
        if sep == b": ":
            assert got == a.build(*args)
        # whatever the spacing, the same headers go out (where llhttp takes the head)
        assert _parsed(got) == _parsed(a.build(*args))


def _parsed(head: bytes):
    class P:
        def __init__(self):
            self.h = []

        def on_header(self, n, v):
            self.h.append((n.lower(), v))
    p = P()
    try:
        httptools.HttpResponseParser(p).feed_data(head)
    except httptools.HttpParserError as e:  # e.g. CL with TE chunked, CL overflow
        return ("refused", str(e))
    return p.h


def test_take_bounds():
    rh = ResponseHead(max_headers=3, max_bytes=100)
    with pytest.raises(HttpError) as e:
        rh.take(_lines([(b"A", b"1")] * 4))
    assert e.value.status == 502
    with pytest.raises(HttpError):
        rh.take(_lines([(b"A", b"x" * 120)]))
    rh.take(_lines([(b"A", b"1")] * 3))  # at the bounds: fine
    assert rh.build(200, b"OK", False, False).count(b"A: 1") == 3
