"""ResponseFramer, the framing of backend responses, against llhttp (httptools' response
parser, which halb used before and which stays the reference): for well-formed responses cut
at every kind of boundary both find the same status, body and keep-alive; malformed ones are
refused with a reason, and the ones llhttp refuses too are named as such."""

from __future__ import annotations

import httptools
import pytest

from halb.proxy.http_head import FR, ResponseFramer, ResponseHead

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("dual_module")]
DUAL_MODULE = "halb.proxy.http_head"  # every test runs compiled and from source (conftest.py)

GOOD = {
    "length": b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 5\r\n\r\nhello",
    "length-zero": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "no-reason": b"HTTP/1.1 404\r\nContent-Length: 2\r\n\r\nno",
    "obs-text-reason": b"HTTP/1.1 200 \xe9t\xe9\r\nContent-Length: 1\r\n\r\nx",
    "chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
    "chunked-upper-ext": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                          b"A;name=value\r\n0123456789\r\n0\r\n\r\n"),
    "chunked-trailers": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-Other: 2\r\n\r\n"),
    "chunked-leading-zeros": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"0003\r\nabc\r\n0\r\n\r\n"),
    "close": b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    "http10-keepalive": b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
    "http10-plain": b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "until-close": b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it",
    "until-close-11": b"HTTP/1.1 200 OK\r\n\r\nbody until close",
    "204": b"HTTP/1.1 204 No Content\r\nX: y\r\n\r\n",
    "304-with-length": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    "crlf-before": b"\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
    "empty-value": b"HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Tab:\tv\t\r\nContent-Length: 1\r\n\r\nx",
    "interim": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone"),
}

# (raw, llhttp refuses it too): llhttp, in httptools' default (strict) mode, is the reference;
# where it is lenient halb is stricter on purpose, as RFC 9112 allows a proxy to be
BAD = {
    "length-and-chunked": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", True),
    "length-not-digits": (b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello", True),
    "length-negative": (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", True),
    "length-list": (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 1\r\n\r\nx", True),
    "lengths-differ": (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
                       True),
    "length-huge": (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n", True),
    "chunk-size-not-hex": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"zz\r\nhello\r\n0\r\n\r\n", True),
    "chunk-size-empty": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"\r\nhello\r\n0\r\n\r\n", True),
    "chunk-size-huge": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"fffffffffffffffff\r\nx\r\n", True),
    "chunk-size-space": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5 \r\nhello\r\n0\r\n\r\n", True),
    "chunk-no-crlf": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"5\r\nhelloXX0\r\n\r\n", True),
    "chunk-size-bare-lf": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"5\nhello\r\n0\r\n\r\n", True),
    "trailer-no-colon": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"0\r\nnot a header\r\n\r\n", True),
    "bare-lf-header": (b"HTTP/1.1 200 OK\r\nX: a\nContent-Length: 1\r\n\r\nx", False),
    "bare-cr-value": (b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 1\r\n\r\nx", True),
    "nul-value": (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 1\r\n\r\nx", True),
    "space-before-colon": (b"HTTP/1.1 200 OK\r\nX : a\r\nContent-Length: 1\r\n\r\nx", True),
    "no-colon": (b"HTTP/1.1 200 OK\r\nJustAName\r\nContent-Length: 1\r\n\r\nx", True),
    "empty-name": (b"HTTP/1.1 200 OK\r\n: a\r\nContent-Length: 1\r\n\r\nx", True),
    "obs-fold": (b"HTTP/1.1 200 OK\r\nX: a\r\n  b\r\nContent-Length: 1\r\n\r\nx", False),
    "status-two-digits": (b"HTTP/1.1 20 OK\r\nContent-Length: 1\r\n\r\nx", True),
    "status-letters": (b"HTTP/1.1 2x0 OK\r\nContent-Length: 1\r\n\r\nx", True),
    "status-no-space": (b"HTTP/1.1 200OK\r\nContent-Length: 1\r\n\r\nx", True),
    "version-2": (b"HTTP/2.0 200 OK\r\nContent-Length: 1\r\n\r\nx", False),
    "version-12": (b"HTTP/1.2 200 OK\r\nContent-Length: 1\r\n\r\nx", False),
    "not-http": (b"XTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", True),
    "reason-ctl": (b"HTTP/1.1 200 O\x01K\r\nContent-Length: 1\r\n\r\nx", False),
    "switching": (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", False),
}


def llhttp(raw: bytes):
    """(status, body, keep-alive) per final response as llhttp reads ``raw``, or its error."""
    class P:
        def __init__(self):
            self.out = []
            self.body = b""
            self.status = 0

        def on_headers_complete(self):
            self.status = parser.get_status_code()

        def on_body(self, b):
            self.body += b

        def on_message_complete(self):
            if self.status >= 200:
                self.out.append((self.status, self.body, parser.should_keep_alive()))
            self.body = b""
    p = P()
    parser = httptools.HttpResponseParser(p)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserError as e:
        return ("refused", str(e))
    return p.out


def frame(raw: bytes, step: int, head_req: bool = False, eof: bool = True):
    """What ResponseFramer makes of ``raw`` fed ``step`` bytes at a time: a list of events
    (interim statuses, the final (status, body, keep)), or ("refused", reason)."""
    fr = ResponseFramer(ResponseHead(), 65536)
    fr.start(head_req)
    out: list = []
    status, keep, body = 0, False, b""
    for i in range(0, len(raw), step):
        fr.feed(raw[i:i + step])
        while True:
            ev = fr.next()
            if ev == FR.NEED:
                break
            if ev == FR.ERROR:
                assert fr.error
                return ("refused", fr.error)
            if ev == FR.INTERIM:
                out.append(("interim", fr.status))
            elif ev == FR.HEAD:
                status, keep = fr.status, fr.keep
            elif ev == FR.BODY:
                body += fr.piece
            elif ev == FR.DONE:
                out.append((status, body, keep))
                assert fr.pos == len(fr.buf), "bytes after the response"
                return out
    if eof and fr.state == FR.S_EOF:  # a body delimited by the close ends here
        out.append((status, body, keep))
        return out
    return out + [("incomplete", fr.state)]


@pytest.mark.parametrize("name", sorted(GOOD))
@pytest.mark.parametrize("step", [1, 2, 3, 7, 10 ** 6])
def test_good_responses_frame_as_llhttp_does(name, step):
    raw = GOOD[name]
    got = frame(raw, step)
    finals = [x for x in got if x[0] != "interim"]
    ref = llhttp(raw)
    if ref == [] and got and got[-1][0] != "incomplete":  # until close: llhttp waits for EOF
        assert finals[0][2] is False and finals[0][1] == raw.partition(b"\r\n\r\n")[2]
        return
    assert finals == ref, (got, ref)


def test_equal_content_lengths_count_as_one():
    # RFC 9110 8.6 lets a recipient take identical duplicates as one value (HAProxy does);
    # llhttp refuses them, halb follows the RFC and HAProxy here
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"
    assert frame(raw, 1) == [(200, b"abc", True)]
    assert llhttp(raw)[0] == "refused"


def test_interim_responses_come_first():
    assert frame(GOOD["interim"], 1) == [("interim", 100), ("interim", 103), (201, b"done", True)]


@pytest.mark.parametrize("name", sorted(BAD))
@pytest.mark.parametrize("step", [1, 4, 10 ** 6])
def test_bad_responses_are_refused(name, step):
    raw, llhttp_refuses = BAD[name]
    got = frame(raw, step)
    assert got[0] == "refused", got
    if llhttp_refuses:
        assert llhttp(raw)[0] == "refused"


def test_head_request_and_bodiless_statuses_have_no_body():
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    assert frame(raw, 1, head_req=True) == [(200, b"", True)]
    # a body after the head of a HEAD answer is left over: the proxy drops that connection
    fr = ResponseFramer(ResponseHead(), 65536)
    fr.start(True)
    fr.feed(raw + b"EVIL!")
    assert [fr.next(), fr.next()] == [FR.HEAD, FR.DONE] and fr.buf[fr.pos:] == b"EVIL!"


def test_bytes_after_a_response_are_left_for_the_caller():
    fr = ResponseFramer(ResponseHead(), 65536)
    fr.start(False)
    fr.feed(GOOD["length"] + b"HTTP/1.1 200 OK\r\n")
    assert [fr.next(), fr.next(), fr.next()] == [FR.HEAD, FR.BODY, FR.DONE]
    assert fr.piece == b"hello" and fr.buf[fr.pos:] == b"HTTP/1.1 200 OK\r\n"


def test_waits_are_bounded():
    fr = ResponseFramer(ResponseHead(), 1000)
    fr.start(False)
    fr.feed(b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 2000)  # a head without end
    assert fr.next() == FR.ERROR and "too large" in fr.error
    fr.start(False)
    fr.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;" + b"e" * 5000)
    assert [fr.next(), fr.next()] == [FR.HEAD, FR.ERROR] and "too long" in fr.error
    fr.start(False)
    fr.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
            + b"X: 1\r\n" * 300)  # trailers past max_head
    assert [fr.next(), fr.next()] == [FR.HEAD, FR.ERROR] and "trailer" in fr.error
    fr.start(False)  # the framer is reusable after an error
    fr.feed(GOOD["length"])
    assert [fr.next(), fr.next(), fr.next()] == [FR.HEAD, FR.BODY, FR.DONE]


def test_large_bodies_stream_in_pieces():
    body = bytes(range(256)) * 4096  # 1 MiB
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    assert frame(raw, 65536) == [(200, body, True)]
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(
        b"%x\r\n%b\r\n" % (len(body[i:i + 70000]), body[i:i + 70000])
        for i in range(0, len(body), 70000)) + b"0\r\n\r\n"
    assert frame(chunked, 65536) == [(200, body, True)]


def _events(fr: ResponseFramer, raw: bytes, step: int) -> list:
    out = []
    for i in range(0, len(raw), step):
        fr.feed(raw[i:i + step])
        while True:
            ev = fr.next()
            if ev == FR.NEED:
                break
            out.append(ev)
            if ev in (FR.DONE, FR.ERROR, FR.SWITCH):
                return out
    return out


@pytest.mark.parametrize("step", [1, 5, 10 ** 6])
def test_interim_responses_keep_their_fields(step):
    fr = ResponseFramer(ResponseHead(), 65536)
    fr.start(False)
    raw = (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nConnection: x\r\n\r\n"
           b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    fr.feed(raw[:raw.index(b"HTTP/1.1 200")])
    assert fr.next() == FR.INTERIM
    head = fr.rh.build(fr.status, None, False, False, None, False, b"Via: 1.1 halb\r\n")
    assert head == (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"
                    b"Via: 1.1 halb\r\n\r\n")
    assert _events(fr, raw[raw.index(b"HTTP/1.1 200"):], step) == [FR.HEAD, FR.DONE]


@pytest.mark.parametrize("step", [1, 3, 10 ** 6])
def test_101_switches_only_after_an_offer(step):
    raw = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi")
    fr = ResponseFramer(ResponseHead(), 65536)
    fr.start(False, True)
    assert _events(fr, raw, step)[-1] == FR.SWITCH
    assert fr.rh.upgrade == b"websocket"
    head = fr.rh.build(101, None, False, False)
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head
    assert b"Upgrade" not in head and b"Connection" not in head  # hop-by-hop: the proxy adds
    if step == 10 ** 6:
        assert fr.buf[fr.pos:] == b"\x81\x02hi"  # the new protocol's first bytes
    fr.start(False)  # no offer: a 101 is refused
    assert _events(fr, raw, step)[-1] == FR.ERROR and "upgrade" in fr.error
    fr.start(False, True)  # a 101 that names no protocol is refused too
    assert _events(fr, b"HTTP/1.1 101 Switching Protocols\r\n\r\n", step)[-1] == FR.ERROR


@pytest.mark.parametrize("step", [1, 4, 10 ** 6])
def test_trailer_lines_are_kept(step):
    fr = ResponseFramer(ResponseHead(), 65536)
    fr.start(False)
    assert _events(fr, GOOD["chunked-trailers"], step)[-1] == FR.DONE
    assert fr.trailers == [b"X-Sum: 1\r\n", b"X-Other: 2\r\n"]
    fr.start(False)
    assert fr.trailers is None
    assert _events(fr, GOOD["chunked"], step)[-1] == FR.DONE
    assert fr.trailers is None
