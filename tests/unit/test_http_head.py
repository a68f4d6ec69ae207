"""Strict request checks and head rewriting (pure), and the measured llhttp baseline they
complement: if an httptools upgrade ever stops rejecting one of these, this test says so."""

from __future__ import annotations

import httptools
import pytest

from halb.proxy.http_head import (HttpError, check_request, error_response, forwarded_element,
                                  parse_cookies, request_head, response_head, ResponseHead,
                                  sticky_cookie)

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("dual_module")]
DUAL_MODULE = "halb.proxy.http_head"  # each test against the compiled module and its .py

H = [(b"Host", b"a.test")]


def req(method=b"GET", target=b"/", version="1.1", headers=None):
    return check_request(method, target, version, H if headers is None else headers)


# -- what llhttp rejects by itself (the module docstring of halb.proxy.http records this) -------

LLHTTP_REJECTS = {
    "cl_and_te": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
    "cl_dup_same": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
    "cl_dup_diff": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
    "cl_list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\n",
    "cl_sign": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\n",
    "cl_overflow": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    "te_chunked_not_last": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "te_unknown": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
    "chunk_size_bad": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "chunk_size_space": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2 \r\nab\r\n",
    "chunk_ext_ctl": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2;\x01\r\nab\r\n",
    "bare_cr": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n",
    "nul": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n",
    "space_before_colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "bad_method": b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
    "bad_version": b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
}

LLHTTP_ACCEPTS = {  # halb's own checks catch these
    "te_gzip_chunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te_http10": b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "http2_version": b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    "no_host": b"GET / HTTP/1.1\r\n\r\n",
    "double_space": b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
}


class _Sink:
    def on_message_complete(self):
        self.done = True


@pytest.mark.parametrize("name", sorted(LLHTTP_REJECTS))
def test_llhttp_rejects(name):
    with pytest.raises(httptools.HttpParserError):
        httptools.HttpRequestParser(_Sink()).feed_data(LLHTTP_REJECTS[name])


@pytest.mark.parametrize("name", sorted(LLHTTP_ACCEPTS))
def test_llhttp_accepts_what_halb_checks(name):
    s = _Sink()
    httptools.HttpRequestParser(s).feed_data(LLHTTP_ACCEPTS[name])
    assert s.done


# -- check_request -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,status,needle", [
    (dict(version="2.0"), 400, "version"),
    (dict(version="0.9"), 400, "version"),
    (dict(headers=[]), 400, "missing Host"),
    (dict(headers=H + [(b"host", b"b.test")]), 400, "more than one Host"),
    (dict(headers=[(b"Host", b"a b")]), 400, "invalid Host"),
    (dict(headers=[(b"Host", b"a.test:80:80")]), 400, "invalid Host"),
    (dict(method=b"POST", headers=H + [(b"Transfer-Encoding", b"gzip, chunked")]), 501, "Transfer-Encoding"),
    (dict(method=b"POST", headers=H + [(b"Transfer-Encoding", b",chunked")]), 400, "malformed"),
    (dict(method=b"POST", version="1.0", headers=H + [(b"Transfer-Encoding", b"chunked")]), 400, "HTTP/1.0"),
    (dict(method=b"POST", headers=H + [(b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")]), 400, "both"),
    (dict(target=b"http://b.test/x"), 400, "does not match"),
    (dict(target=b"http://user@a.test/x"), 400, "authority"),
    (dict(target=b"ftp://a.test/x"), 400, "malformed request target"),
    (dict(target=b"a.test:443"), 400, "malformed request target"),
    (dict(target=b"*"), 400, "OPTIONS"),
    (dict(method=b"CONNECT", target=b"a.test:443"), 501, "CONNECT"),
])
def test_check_request_refuses(kw, status, needle):
    with pytest.raises(HttpError) as ei:
        req(**kw)
    assert ei.value.status == status
    assert needle in ei.value.reason


def test_check_request_accepts_and_extracts():
    r = req(method=b"POST", target=b"/a/b?q=1", headers=[(b"HOST", b"A.Test:8080"),
                                                          (b"Content-Length", b"12"),
                                                          (b"Connection", b"keep-alive, X-Secret")])
    assert (r.host, r.path, r.content_length, r.chunked) == ("a.test:8080", "/a/b", 12, False)
    assert r.conn_tokens == {b"keep-alive", b"x-secret"}
    assert r.has_body
    c = req(method=b"POST", headers=H + [(b"Transfer-Encoding", b"Chunked")])
    assert c.chunked and c.has_body and c.content_length is None
    assert not req().has_body
    assert req(method=b"OPTIONS", target=b"*").target == b"*"
    # HTTP/1.0 may omit Host
    assert req(version="1.0", headers=[]).host == ""


def test_absolute_form_is_reduced_to_origin_form():
    r = req(target=b"http://A.test/x/y?z=1")
    assert (r.target, r.path, r.host) == (b"/x/y?z=1", "/x/y", "a.test")
    r = req(target=b"https://a.test?z", version="1.0", headers=[])  # 1.0 without Host: authority
    assert (r.target, r.host) == (b"/?z", "a.test")
    assert (b"Host", b"a.test") in r.headers


# -- rewriting -----------------------------------------------------------------------------------

def _headers(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode().split("\r\n")
    assert lines[-2:] == ["", ""]
    return [tuple(l.split(": ", 1)) for l in lines[1:-2]]


def test_request_head_forwarded_headers_and_hop_by_hop():
    r = req(method=b"POST", target=b"/up", headers=[
        (b"Host", b"a.test"), (b"X-Forwarded-For", b"10.0.0.1"), (b"X-Forwarded-For", b"10.0.0.2"),
        (b"X-Forwarded-Proto", b"https"), (b"Forwarded", b"for=10.0.0.1"),
        (b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"s"), (b"Keep-Alive", b"5"),
        (b"Upgrade", b"h2c"), (b"TE", b"trailers"), (b"Transfer-Encoding", b"chunked"),
        (b"X-Other", b"o")])
    head = request_head(r, "192.0.2.7", "http", True)
    assert head.startswith(b"POST /up HTTP/1.1\r\n")
    hs = _headers(head)
    names = [n.lower() for n, _ in hs]
    for gone in ("connection", "x-secret", "keep-alive", "upgrade", "te"):
        assert gone not in names
    d = dict((n.lower(), v) for n, v in hs)
    assert d["x-forwarded-for"] == "10.0.0.1, 10.0.0.2, 192.0.2.7"
    assert d["x-forwarded-proto"] == "http"
    assert d["forwarded"] == 'for=10.0.0.1, for=192.0.2.7;proto=http;host=a.test'
    assert d["transfer-encoding"] == "chunked"
    assert names.count("transfer-encoding") == 1 and names.count("x-forwarded-for") == 1
    assert d["x-other"] == "o" and d["host"] == "a.test"


def test_request_head_without_forwarded_keeps_client_values():
    r = req(headers=H + [(b"X-Forwarded-For", b"1.1.1.1")])
    d = dict(_headers(request_head(r, "192.0.2.7", "https", False)))
    assert d["X-Forwarded-For"] == "1.1.1.1"
    assert "Forwarded" not in d and "X-Forwarded-Proto" not in d


def test_request_head_http10_without_host_gets_backend_host():
    r = req(version="1.0", headers=[])
    head = request_head(r, "192.0.2.7", "http", False, default_host="10.1.1.1:8080")
    assert head.startswith(b"GET / HTTP/1.1\r\n")
    assert ("Host", "10.1.1.1:8080") in _headers(head)


def test_forwarded_element_quotes_ipv6_and_ports():
    assert forwarded_element("2001:db8::1", "https", "") == 'for="[2001:db8::1]";proto=https'
    assert forwarded_element("192.0.2.1", "http", "a.test:8080") == \
        'for=192.0.2.1;proto=http;host="a.test:8080"'


def test_response_head_cookie_framing_and_hop_by_hop():
    hdrs = [(b"Content-Type", b"text/plain"), (b"Transfer-Encoding", b"chunked"),
            (b"X-Hop", b"1"), (b"Connection", b"X-Hop"), (b"Keep-Alive", b"timeout=5"),
            (b"Expires", b"0"), (b"Set-Cookie", b"a=1")]
    rh = ResponseHead()
    for n, v in hdrs:
        rh.add(n, v)
    assert rh.chunked and rh.content_length is None and rh.conn_tokens == [b"x-hop"]
    head = rh.build(200, b"OK", chunk=True, close=True, set_cookie=sticky_cookie("SRV", "web2"))
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    hs = _headers(head)
    assert ("Set-Cookie", "SRV=web2; path=/; HttpOnly") in hs and ("Set-Cookie", "a=1") in hs
    assert ("Connection", "close") in hs and ("Transfer-Encoding", "chunked") in hs
    assert ("Expires", "0") in hs and ("Content-Type", "text/plain") in hs
    # X-Hop was named by Connection, after it had been seen: dropped all the same
    assert all(n not in ("X-Hop", "Keep-Alive") for n, _ in hs)
    assert [n for n, _ in hs].count("Transfer-Encoding") == 1
    ka = response_head(204, b"", [], chunk=False, close=False, keep_alive=True)
    assert ka == b"HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n"
    rh = ResponseHead()
    rh.add(b"content-length", b"42")
    rh.add(b"Connection", b"keep-alive")
    assert rh.content_length == 42
    assert rh.build(200, b"OK", chunk=False, close=False) == \
        b"HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\n"


def test_response_head_bounds():
    rh = ResponseHead(max_headers=3, max_bytes=100)
    for i in range(3):
        rh.add(b"X-%d" % i, b"v")
    with pytest.raises(HttpError) as ei:
        rh.add(b"X-4", b"v")
    assert ei.value.status == 502
    rh.reset()
    with pytest.raises(HttpError):
        rh.add(b"X-Big", b"v" * 200)


def test_parse_cookies():
    assert parse_cookies(["a=1; SRV=web1", "SRV=web9; b=\"q\""]) == {"a": "1", "SRV": "web1", "b": "q"}
    assert parse_cookies(["garbage; =x; c"]) == {}


def test_error_response_is_complete_and_closes():
    r = error_response(431, "too many header fields")
    head, body = r.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"too many header fields" in body
    assert b"Connection" not in error_response(503, "x", close=False).split(b"\r\n\r\n")[0]


# -- upgrade offers, Via, trailers (issue 17) -----------------------------------------------


def _req(head: bytes):
    from halb.proxy.http_head import check_request
    lines = head.split(b"\r\n")
    method, target, version = lines[0].split(b" ")
    hdrs = [tuple(x.strip() for x in ln.split(b":", 1)) for ln in lines[1:] if ln]
    return check_request(method, target, version.decode()[5:], hdrs)


@pytest.mark.parametrize("head,offer", [
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket", b"websocket"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, upgrade\r\nUpgrade: foo/2, bar",
     b"foo/2, bar"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c", b""),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c, websocket",
     b"websocket"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket", b""),  # not named by Connection
    (b"GET / HTTP/1.0\r\nConnection: Upgrade\r\nUpgrade: websocket", b""),
    (b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: foo\r\nContent-Length: 1",
     b""),  # a body: an ordinary request
])
def test_upgrade_offers(head, offer):
    assert _req(head).upgrade == offer


def test_request_head_carries_the_offer_and_websocket_headers_only_with_it():
    from halb.proxy.http_head import request_head
    ws = (b"GET /c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
          b"Sec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13")
    out = request_head(_req(ws), "198.18.0.9", "http", False, "", None, b"Via: 1.1 halb\r\n")
    assert out == (b"GET /c HTTP/1.1\r\nHost: a\r\nSec-WebSocket-Key: k\r\n"
                   b"Sec-WebSocket-Version: 13\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
                   b"Via: 1.1 halb\r\n\r\n")
    lone = b"GET /c HTTP/1.1\r\nHost: a\r\nSec-WebSocket-Key: k\r\nX: y"
    out = request_head(_req(lone), "198.18.0.9", "http", False)
    assert out == b"GET /c HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\n"


def test_trailer_lines_leave_out_what_must_not_be_a_trailer():
    from halb.proxy.http_head import trailer_lines
    pairs = [(b"X-Sum", b"1"), (b"Content-Length", b"5"), (b"Host", b"x"),
             (b"Transfer_Encoding", b"chunked"), (b"Server-Timing", b"a;dur=1")]
    assert trailer_lines(pairs) == b"X-Sum: 1\r\nServer-Timing: a;dur=1\r\n"
    lines = [b"X-Sum: 1\r\n", b"Connection: close\r\n", b"Set-Cookie: a=b\r\n"]
    assert trailer_lines(None, lines) == b"X-Sum: 1\r\n"


@pytest.mark.parametrize("lines,want", [
    (b"Set-Cookie: JSESSIONID=abc123; Path=/; HttpOnly\r\n", "abc123"),
    (b"set-cookie: jsessionid=\"q1\"\r\n", "q1"),
    (b"Set-Cookie: OTHER=1\r\nSet-Cookie: JSESSIONID=x; Max-Age=0\r\n", ""),
    (b"Set-Cookie: JSESSIONID=\r\n", ""),
    (b"Set-Cookie: JSESSIONIDX=no\r\nX-JSESSIONID: JSESSIONID=no\r\n", None),
    (b"Set-Cookie: JSESSIONID=a\r\nSet-Cookie: JSESSIONID=b\r\n", "b"),
])
def test_app_cookie_set_reads_the_application_cookie(lines, want):
    from halb.proxy.http_head import ResponseHead, app_cookie_set
    rh = ResponseHead()
    rh.take(lines)
    assert app_cookie_set(rh, "JSESSIONID") == want


# -- app_cookie prefix mode (HAProxy's ``cookie NAME prefix``) ------------------------------------

from halb.proxy.http_head import prefix_set_cookie, prefix_set_cookie_pairs, strip_cookie_prefix  # noqa: E402


@pytest.mark.parametrize("cookie,sent,backend", [
    (b"JSESSIONID=web1~abc", b"JSESSIONID=abc", "web1"),
    (b"a=1; JSESSIONID=web2~x~y; b=2", b"a=1; JSESSIONID=x~y; b=2", "web2"),  # only the first ~
    (b'JSESSIONID="web1~abc"', b'JSESSIONID="abc"', "web1"),
    (b"JSESSIONID=abc", None, ""),  # no prefix (a session from before prefix mode): as it is
    (b"XJSESSIONID=web1~abc", None, ""),  # another cookie that ends the same
    (b"jsessionid=web1~abc", None, ""),  # cookie names are case-sensitive (RFC 6265)
    (b"JSESSIONID=~abc", None, ""),  # an empty prefix names no backend
    (b"other=web1~abc", None, ""),
])
def test_strip_cookie_prefix(cookie, sent, backend):
    headers = [(b"Host", b"a"), (b"Cookie", cookie), (b"Accept", b"*/*")]
    out, found = strip_cookie_prefix(headers, "JSESSIONID")
    assert found == backend
    if sent is None:
        assert out is None
    else:
        assert out == [(b"Host", b"a"), (b"Cookie", sent), (b"Accept", b"*/*")]
        assert headers[1] == (b"Cookie", cookie)  # the request's own list is not changed


def test_strip_cookie_prefix_in_every_cookie_header():
    headers = [(b"cookie", b"JSESSIONID=web1~a"), (b"COOKIE", b"x=1; JSESSIONID=web1~a")]
    out, found = strip_cookie_prefix(headers, "JSESSIONID")
    assert found == "web1" and out == [(b"cookie", b"JSESSIONID=a"), (b"COOKIE", b"x=1; JSESSIONID=a")]


def test_prefix_set_cookie():
    runs = [b"Content-Type: text/plain\r\nSet-Cookie: JSESSIONID=abc; Path=/; HttpOnly\r\n",
            b"set-cookie: other=1\r\nSET-COOKIE:JSESSIONID=\"q\"\r\n"]
    out = prefix_set_cookie(runs, "JSESSIONID", "web1")
    assert out == [b"Content-Type: text/plain\r\nSet-Cookie: JSESSIONID=web1~abc; Path=/; HttpOnly\r\n",
                   b"set-cookie: other=1\r\nSET-COOKIE: JSESSIONID=\"web1~q\"\r\n"]
    # a deletion (empty value), another cookie, or none at all: nothing to change
    assert prefix_set_cookie([b"Set-Cookie: JSESSIONID=; Max-Age=0\r\n"], "JSESSIONID", "w") is None
    assert prefix_set_cookie([b"Set-Cookie: XJSESSIONID=1\r\n"], "JSESSIONID", "w") is None
    assert prefix_set_cookie([b"X-JSESSIONID: 1\r\n"], "JSESSIONID", "w") is None
    assert prefix_set_cookie_pairs([(b"Set-Cookie", b"JSESSIONID=abc; Path=/"), (b"X", b"1")],
                                   "JSESSIONID", "web2") == [(b"Set-Cookie", b"JSESSIONID=web2~abc; Path=/"),
                                                             (b"X", b"1")]
