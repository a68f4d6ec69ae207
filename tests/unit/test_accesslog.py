"""halb.accesslog (pure: formats, templates, timers, termination states, sampling) and the
access logger's bounded buffer (halb.accesslog_writer.AccessLog with an injected destination:
a stuck one makes lines drop and count, never wait)."""

from __future__ import annotations

import asyncio
import calendar
import json
import random
import threading
import time

import pytest

from halb.accesslog import (BADREQ, FIELDS, TARGET_MAX, Formatter, Sampler, check_format,
                            cookie_state, escape, http_phase, http_timers, ms, parse_template,
                            request_line, tcp_phase, tcp_timers, term_state)
from halb.accesslog_writer import AccessLog, StreamSink
from halb.config import AccessLogConfig
from halb.metrics import Metrics

pytestmark = pytest.mark.unit

# 07/Dec/2026:15:01:02.345 UTC
WALL = calendar.timegm((2026, 12, 7, 15, 1, 2, 0, 0, 0)) + 0.3455

HTTP_ARGS = dict(wall=WALL, client="198.18.0.5:41234", listener="www", pool="web",
                 backend="web1", tq=0, tw=0, tc=1, tr=2, ta=3, status=200, nbytes=1234, nin=-1,
                 term="--", ck="--", method="GET", request="GET /index.html HTTP/1.1",
                 retries=0, fc=3, sc=1)
TCP_ARGS = dict(wall=WALL, client="198.18.0.5:41236", listener="db", pool="db",
                backend="db1", tw=0, tc=1, tt=5012, nin=567, nout=1234, term="--", retries=0,
                fc=1, sc=1)


def http_line(fmt: str, **over) -> str:
    a = dict(HTTP_ARGS, **over)
    return Formatter(fmt).http(*a.values())


def tcp_line(fmt: str, **over) -> str:
    a = dict(TCP_ARGS, **over)
    return Formatter(fmt).tcp(*a.values())


# -- text: HAProxy's httplog / tcplog layout ---------------------------------------------------


def test_text_http_line_is_haproxy_httplog():
    assert http_line("text") == (
        '198.18.0.5:41234 [07/Dec/2026:15:01:02.345] www web/web1 0/0/1/2/3 200 1234 - - '
        '---- -/3/-/1/0 0/0 "GET /index.html HTTP/1.1"')


def test_text_http_line_of_a_refused_request():
    assert http_line("text", pool="-", backend="-", tq=-1, tw=-1, tc=-1, tr=-1, ta=0,
                     status=400, nbytes=158, term="PR", method="-", request=BADREQ) == (
        '198.18.0.5:41234 [07/Dec/2026:15:01:02.345] www -/- -1/-1/-1/-1/0 400 158 - - '
        'PR-- -/3/-/1/0 0/0 "<BADREQ>"')


def test_text_http_line_carries_cookie_state_in_tsc():
    line = http_line("text", ck="NI")
    assert " --NI " in line


def test_text_tcp_line_is_haproxy_tcplog_plus_bytes_in():
    assert tcp_line("text") == (
        "198.18.0.5:41236 [07/Dec/2026:15:01:02.345] db db/db1 0/1/5012 1234 -- -/1/-/1/0 0/0 "
        "567")


def test_date_cache_follows_the_second():
    f = Formatter("text")
    a = f.http(*dict(HTTP_ARGS, wall=WALL + 0.6539).values())
    b = f.http(*dict(HTTP_ARGS, wall=WALL + 0.655).values())  # next second
    c = f.http(*dict(HTTP_ARGS, wall=WALL + 86400 * 25).values())  # next year
    assert "[07/Dec/2026:15:01:02.999]" in a
    assert "[07/Dec/2026:15:01:03.000]" in b
    assert "[01/Jan/2027:15:01:02.345]" in c


# -- json --------------------------------------------------------------------------------------


def test_json_http_line_has_every_field_typed():
    d = json.loads(http_line("json"))
    assert d == {"time": "2026-12-07T15:01:02.345Z", "mode": "http",
                 "client": "198.18.0.5:41234", "listener": "www", "pool": "web",
                 "backend": "web1", "Tq": 0, "Tw": 0, "Tc": 1, "Tr": 2, "Ta": 3, "status": 200,
                 "bytes": 1234, "term": "--", "tsc": "----", "method": "GET",
                 "request": "GET /index.html HTTP/1.1", "retries": 0, "conns": 3,
                 "backend_conns": 1}


def test_json_http_line_of_a_tunnel_has_bytes_in_and_escapes_backslashes():
    d = json.loads(http_line("json", status=101, nin=77, request='GET /a\\b"c HTTP/1.1'))
    assert d["status"] == 101 and d["bytes_in"] == 77
    assert d["request"] == 'GET /a\\b"c HTTP/1.1'


def test_json_tcp_line():
    d = json.loads(tcp_line("json", term="SC", backend="-", tc=-1))
    assert d == {"time": "2026-12-07T15:01:02.345Z", "mode": "tcp", "client": "198.18.0.5:41236",
                 "listener": "db", "pool": "db", "backend": "-", "Tw": 0, "Tc": -1, "Tt": 5012,
                 "bytes_in": 567, "bytes_out": 1234, "term": "SC", "retries": 0, "conns": 1,
                 "backend_conns": 1}


# -- templates ---------------------------------------------------------------------------------


def test_template_renders_named_fields_and_literals():
    f = "%{client} %{status} %{bytes} {%{backend}} 100%% %{Tq}/%{Ta} %{request}"
    assert http_line(f) == '198.18.0.5:41234 200 1234 {web1} 100% 0/3 GET /index.html HTTP/1.1'
    # fields that do not apply to an L4 connection are "-"
    assert tcp_line(f) == "198.18.0.5:41236 - 1234 {db1} 100% -/- -"
    assert tcp_line("%{bytes_in}>%{bytes_out} %{Tt} %{mode}") == "567>1234 5012 tcp"
    assert http_line("%{bytes_in} %{mode} %{tsc}") == "- http ----"


def test_template_every_field_renders():
    spec = " ".join(f"%{{{n}}}" for n in FIELDS)
    assert len(http_line(spec).split(" ")) >= len(FIELDS)
    assert len(tcp_line(spec).split(" ")) == len(FIELDS)


@pytest.mark.parametrize("spec,parts", [
    ("%{client}", [("", "client")]),
    ("a %{status} b", [("a ", "status"), (" b", "")]),
    ("%%%{bytes}%%", [("%", "bytes"), ("%", "")]),
])
def test_parse_template(spec, parts):
    assert parse_template(spec) == parts


@pytest.mark.parametrize("spec,reason", [
    ("%{client} %{sttaus}", "unknown field 'sttaus' in %{sttaus} (known: time, client,"),
    ("%{client", "unclosed %{ at character 1"),
    ("100% %{status}", "a lone '%' at character 4"),
    ("%{status} %", "a lone '%' at character 11"),
    ("x" * 1025 + "%{status}", "template too long"),
])
def test_bad_templates_are_refused_with_a_reason(spec, reason):
    with pytest.raises(ValueError) as ei:
        check_format(spec)
    assert reason in str(ei.value)


@pytest.mark.parametrize("spec", ["txt", "JSON", "haproxy", ""])
def test_unknown_format_names(spec):
    with pytest.raises(ValueError, match="unknown format"):
        check_format(spec)


def test_a_template_without_fields_is_refused():
    with pytest.raises(ValueError, match="no %{field}"):
        check_format("just %% text")


# -- request line ------------------------------------------------------------------------------


def test_request_line_escapes_like_haproxy():
    assert request_line(b"GET", b"/a b\"c#d\x01\x7f\xc3\xa9", "1.1") == \
        "GET /a b#22c#23d#01#7F#C3#A9 HTTP/1.1"
    assert escape(b"/plain?x=1&y=%20") == "/plain?x=1&y=%20"


def test_request_line_target_is_cut():
    line = request_line(b"GET", b"/" + b"a" * 5000, "1.0")
    assert line == "GET /" + "a" * (TARGET_MAX - 1) + " HTTP/1.0"


# -- timers and termination states --------------------------------------------------------------


def test_ms_and_timers():
    assert ms(1.0, 1.0019) == 1 and ms(1.0, 1.0) == 0 and ms(2.0, 1.0) == 0
    assert ms(-1.0, 5.0) == -1 and ms(5.0, -1.0) == -1
    assert http_timers(10.0, 10.001, 10.002, 10.0025, 10.0125, 10.0205) == (1, 1, 0, 10, 20)
    # no backend tried (503): Tw, Tc, Tr never reached
    assert http_timers(10.0, 10.001, -1.0, -1.0, -1.0, 10.002) == (1, -1, -1, -1, 2)
    # connect failed: Tc and Tr never reached
    assert http_timers(10.0, 10.0, 10.0, -1.0, -1.0, 13.0) == (0, 0, -1, -1, 3000)
    # a request never parsed
    assert http_timers(10.0, -1.0, -1.0, -1.0, -1.0, 10.5) == (-1, -1, -1, -1, 500)
    assert tcp_timers(5.0, 5.0, 5.003, 10.0) == (0, 3, 5000)
    assert tcp_timers(5.0, 5.0, -1.0, 8.0) == (0, -1, 3000)
    assert tcp_timers(5.0, -1.0, -1.0, 5.0) == (-1, -1, 0)


def test_sub_millisecond_phases_are_zero_and_phases_add_up():
    # a request head in one packet, a reused connection: 0, as HAProxy's timers read them
    assert http_timers(5.0, 5.0009, 5.0011, 5.0012, 5.002, 5.003) == (0, 0, 0, 0, 3)
    rnd = random.Random(7)
    for _ in range(20_000):
        t = sorted(86_400.0 + rnd.random() * rnd.choice((0.002, 0.05, 3.0)) for _ in range(6))
        tq, tw, tc, tr, ta = http_timers(*t)
        assert min(tq, tw, tc, tr) >= 0 and tq + tw + tc + tr <= ta, t


@pytest.mark.parametrize("args,phase", [
    ((False, False, False, False), "R"),  # head never complete
    ((True, False, False, False), "R"),  # refused before any backend
    ((True, True, False, False), "C"),  # choosing / connecting
    ((True, True, True, False), "H"),  # sent, waiting for the response head
    ((True, True, True, True), "D"),  # response under way
])
def test_http_phase(args, phase):
    assert http_phase(*args) == phase


def test_http_phase_request_body_still_going_is_data():
    assert http_phase(True, True, True, False, False) == "D"


@pytest.mark.parametrize("who,phase,term", [
    ("-", "D", "--"), ("C", "H", "CH"), ("c", "R", "cR"), ("S", "C", "SC"),
    ("s", "H", "sH"), ("P", "R", "PR"), ("R", "C", "RC"), ("K", "D", "KD"),
])
def test_term_state(who, phase, term):
    assert term_state(who, phase) == term


def test_tcp_phase():
    assert tcp_phase(False) == "C" and tcp_phase(True) == "D"


@pytest.mark.parametrize("args,state", [
    (("none", "web1", True, True, True), "--"),
    (("cookie", "", False, False, True), "NI"),  # no cookie: one inserted
    (("cookie", "web1", True, True, False), "VN"),  # valid, used, nothing to insert
    (("cookie", "zzz", False, False, True), "II"),  # names no backend
    (("cookie", "web2", True, False, True), "DI"),  # names one that is down: moved
])
def test_cookie_state(args, state):
    assert cookie_state(*args) == state


# -- sampling ----------------------------------------------------------------------------------


def test_sampling_is_counter_based_and_exact():
    s = Sampler(0.25)
    taken = [i for i in range(1, 21) if s.take()]
    assert taken == [4, 8, 12, 16, 20]
    for rate, n in ((0.1, 1000), (0.333, 3000), (0.5, 10), (0.001, 5000), (1.0, 7)):
        s = Sampler(rate)
        assert sum(s.take() for _ in range(n)) == int(n * rate + 1e-9)
    a, b = Sampler(0.37), Sampler(0.37)
    assert [a.take() for _ in range(200)] == [b.take() for _ in range(200)]


@pytest.mark.parametrize("bad", [0, -0.5, 1.01])
def test_sampling_rate_range(bad):
    with pytest.raises(ValueError):
        Sampler(bad)


# -- the logger's buffer (writer module, injected destinations) ---------------------------------


class BlockedSink:
    """A destination whose writes wait until released (a disk that hangs)."""

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Event()
        self.lines: list[str] = []

    def open(self):
        pass

    def write(self, lines):
        self.entered.set()
        self.release.wait(30)
        self.lines += lines

    def reopen(self):
        pass

    def close(self):
        pass


def _http(alog: AccessLog, i: int) -> None:
    alog.http(1.0, 1.0, 1.0, 1.0, 1.0, 1.001, "127.0.0.1", 1000 + i, "l", "p", "b", 200, 10, -1,
              "--", "--", b"GET", b"/%d" % i, "1.1", 0, 1, 0)


def test_a_stuck_writer_makes_lines_drop_and_count_never_wait():
    metrics = Metrics("n")
    sink = BlockedSink()
    alog = AccessLog(AccessLogConfig(buffer=100), metrics, sink=sink, flush_interval=0.01)

    async def main():
        await alog.start()
        _http(alog, 0)
        assert sink.entered.wait(5)  # the writer holds line 0 and is stuck in its write
        t0 = time.perf_counter()
        for i in range(1, 5001):
            _http(alog, i)
        took = time.perf_counter() - t0
        assert len(alog.q) == 100
        assert alog.dropped == 4900
        assert metrics.value("halb_access_log_dropped_total") == 4900
        assert metrics.value("halb_access_log_lines_total") == 0
        sink.release.set()
        await alog.stop()
        return took

    took = asyncio.run(main())
    assert took < 1.0  # 5,000 calls while the destination hangs: no wait
    assert [ln.split(" ")[0] for ln in sink.lines] == [f"127.0.0.1:{1000 + i}" for i in range(101)]
    assert metrics.value("halb_access_log_lines_total") == 101
    assert metrics.value("halb_access_log_dropped_total") == 4900


class FailingSink(BlockedSink):
    def write(self, lines):
        raise OSError(28, "No space left on device")


def test_failed_writes_count_as_dropped():
    metrics = Metrics("n")
    alog = AccessLog(AccessLogConfig(), metrics, sink=FailingSink(), flush_interval=0.01)

    async def main():
        await alog.start()
        for i in range(30):
            _http(alog, i)
        await alog.stop()

    asyncio.run(main())
    assert metrics.value("halb_access_log_dropped_total") == 30
    assert metrics.value("halb_access_log_lines_total") == 0


def test_sampled_logger_keeps_every_nth():
    sink = BlockedSink()
    sink.release.set()
    alog = AccessLog(AccessLogConfig(sample=0.1), None, sink=sink, flush_interval=0.01)

    async def main():
        await alog.start()
        for i in range(100):
            _http(alog, i)
        await alog.stop()

    asyncio.run(main())
    assert [int(ln.split(" ")[0].split(":")[1]) - 1000 for ln in sink.lines] == \
        list(range(9, 100, 10))


def test_disabled_logger_starts_no_thread_and_opens_nothing():
    sink = BlockedSink()
    alog = AccessLog(AccessLogConfig(enabled=False), None, sink=sink)

    async def main():
        await alog.start()
        assert alog._thread is None
        await alog.stop()

    asyncio.run(main())
    assert not sink.entered.is_set()


def test_stream_sink_writes_whole_lines_in_pipe_sized_pieces(tmp_path):
    import os
    r, w = os.pipe()
    sink = StreamSink("stderr")
    sink.fd = w
    lines = [f"line {i} " + "x" * (i * 37 % 900) for i in range(200)]
    done = threading.Thread(target=lambda: (sink.write(lines), os.close(w)))
    done.start()
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    done.join()
    os.close(r)
    data = b"".join(chunks)
    assert data.decode().splitlines() == lines
