"""The HTTP cache ([listeners.cache]) through a real halbd, in front of an origin the test
controls: every response's caching headers come from the request's query string, and the
origin counts what reached it (and the conditional headers it got), so each test sees exactly
which requests the cache answered. One test per rule of RFC 9111 the README lists."""

from __future__ import annotations

import email.utils
import http.client
import http.server
import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.helpers import Halbd, free_ports, wait_for, write_config

pytestmark = pytest.mark.integration


class Origin(http.server.ThreadingHTTPServer):
    """Answers GET/HEAD/POST by the query: cc, etag, lm (seconds ago), expires (seconds from
    now, may be negative), vary, cookie, status, size, date_ago; counts per path."""

    daemon_threads = True

    def __init__(self, addr):
        super().__init__(addr, _Handler)
        self.hits: dict[str, int] = {}
        self.seen: list[dict] = []  # (path, method, conditional headers)
        self.lock = threading.Lock()
        self.version = {}  # path -> body version (bumped by POST /bump?p=...)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # one write per response, sent at once (unbuffered, head and body went out as two
    # writes and Nagle held the second for the proxy's delayed ACK: 40 ms a request)
    wbufsize = 1 << 20
    disable_nagle_algorithm = True

    def log_message(self, *a):
        pass

    def _answer(self, head_only: bool):
        u = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(u.query))
        o: Origin = self.server  # type: ignore[assignment]
        if self.command == "POST":
            n = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(n)
        with o.lock:
            o.hits[u.path] = o.hits.get(u.path, 0) + 1
            n = o.hits[u.path]
            o.seen.append({"path": u.path, "method": self.command,
                           "inm": self.headers.get("If-None-Match"),
                           "ims": self.headers.get("If-Modified-Since"),
                           "auth": self.headers.get("Authorization")})
            ver = o.version.get(u.path, 1)
        etag = q.get("etag")
        tag = f'"{etag}-{ver}"' if etag else None
        lm = None
        if "lm" in q:
            lm = email.utils.formatdate(time.time() - float(q["lm"]), usegmt=True)
        if tag and self.headers.get("If-None-Match") == tag or (
                lm and self.headers.get("If-Modified-Since") == lm and not tag):
            self.send_response(304)
            if tag:
                self.send_header("ETag", tag)
            if "cc" in q:
                self.send_header("Cache-Control", q["cc"])
            self.send_header("X-Origin-Count", str(n))
            self.end_headers()
            return
        status = int(q.get("status", 200))
        size = int(q.get("size", 0))
        lang = self.headers.get("Accept-Language", "")
        body = (b"x" * size if size else
                f"{u.path} v{ver} lang={lang} n={n}\n".encode())
        self.send_response(status)
        if "date_ago" in q:
            self.send_header("Date", email.utils.formatdate(time.time() - float(q["date_ago"]),
                                                            usegmt=True))
        if "cc" in q:
            self.send_header("Cache-Control", q["cc"])
        if tag:
            self.send_header("ETag", tag)
        if lm:
            self.send_header("Last-Modified", lm)
        if "expires" in q:
            self.send_header("Expires", email.utils.formatdate(time.time() + float(q["expires"]),
                                                               usegmt=True))
        if "vary" in q:
            self.send_header("Vary", q["vary"])
        if "cookie" in q:
            self.send_header("Set-Cookie", "sid=abc; Path=/")
        self.send_header("X-Origin-Count", str(n))
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def do_GET(self):
        self._answer(False)

    def do_HEAD(self):
        self._answer(True)

    def do_POST(self):
        u = urllib.parse.urlsplit(self.path)
        if u.path == "/bump":
            p = dict(urllib.parse.parse_qsl(u.query))["p"]
            o: Origin = self.server  # type: ignore[assignment]
            with o.lock:
                o.version[p] = o.version.get(p, 1) + 1
        self._answer(False)


class Env:
    pass


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    origin = Origin(("127.0.0.1", 0))
    t = threading.Thread(target=origin.serve_forever, daemon=True)
    t.start()
    port, cport, mport = free_ports(3)
    cfg = write_config(d, f'''
[node]
name = "c1"
state_dir = "{d}"

[control]
socket = "{d}/c1.sock"

[metrics]
address = "127.0.0.1:{mport}"

[access_log]
format = "json"
destination = "file:{d}/access.log"

[[pools]]
name = "origin"
  [[pools.backends]]
  name = "o1"
  address = "127.0.0.1:{origin.server_address[1]}"

[[listeners]]
name = "www"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "origin"
  [listeners.cache]
  max_size = "4MiB"
  max_object = "256KiB"
  max_age = "1h"
''')
    h = Halbd(cfg)
    h.wait_port(port)
    e = Env()
    e.dir, e.port, e.mport, e.origin, e.halbd, e.sock = d, port, mport, origin, h, f"{d}/c1.sock"
    yield e
    h.close()
    origin.shutdown()


_n = [0]


def path(env, **q) -> str:
    """A fresh path (so tests do not share entries) with the origin's instructions."""
    _n[0] += 1
    return f"/t{_n[0]}?" + urllib.parse.urlencode(q)


def get(env, target, method="GET", headers=None, body=None):
    c = http.client.HTTPConnection("127.0.0.1", env.port, timeout=5)
    try:
        c.request(method, target, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        c.close()


def origin_hits(env, target) -> int:
    return env.origin.hits.get(urllib.parse.urlsplit(target).path, 0)


def seen(env, target) -> list[dict]:
    p = urllib.parse.urlsplit(target).path
    return [s for s in env.origin.seen if s["path"] == p]


def test_max_age_hit_with_age_then_revalidated_by_etag(env):
    t = path(env, cc="max-age=2", etag="a")
    s1, h1, b1 = get(env, t)
    s2, h2, b2 = get(env, t)
    assert (s1, s2) == (200, 200) and b1 == b2
    assert origin_hits(env, t) == 1  # the second came from the cache
    assert "age" in h2 and int(h2["age"]) >= 0 and "age" not in h1
    # (the origin's Date has whole seconds, so an entry may start up to 1 s old: max-age 2)
    time.sleep(2.2)  # stale now: revalidated with the ETag, the origin answers 304
    s3, h3, b3 = get(env, t)
    assert s3 == 200 and b3 == b1 and int(h3["age"]) <= 1
    assert origin_hits(env, t) == 2
    assert seen(env, t)[-1]["inm"] == '"a-1"'
    s4, _, b4 = get(env, t)  # fresh again after the 304
    assert s4 == 200 and b4 == b1 and origin_hits(env, t) == 2


def test_stale_entry_replaced_when_the_origin_changed(env):
    t = path(env, cc="max-age=2", etag="c")
    _, _, b1 = get(env, t)
    get(env, f"/bump?p={urllib.parse.urlsplit(t).path}", method="POST", body=b"")
    time.sleep(2.2)
    _, _, b2 = get(env, t)  # revalidation: the ETag no longer matches, a full 200 comes
    assert b"v2" in b2 and b2 != b1
    _, _, b3 = get(env, t)
    assert b3 == b2 and origin_hits(env, t) == 2


@pytest.mark.parametrize("cc", ["no-store", "private", "max-age=60, no-store",
                                "private, max-age=60"])
def test_no_store_and_private_are_never_stored(env, cc):
    t = path(env, cc=cc)
    for _ in range(3):
        assert get(env, t)[0] == 200
    assert origin_hits(env, t) == 3


def test_no_cache_is_stored_but_revalidated_every_time(env):
    t = path(env, cc="no-cache", etag="n")
    for _ in range(3):
        s, _, b = get(env, t)
        assert s == 200 and b.startswith(b"/t")
    assert origin_hits(env, t) == 3
    assert [x["inm"] for x in seen(env, t)] == [None, '"n-1"', '"n-1"']


def test_s_maxage_wins_over_max_age(env):
    t = path(env, cc="max-age=0, s-maxage=60")
    get(env, t), get(env, t)
    assert origin_hits(env, t) == 1


def test_expires(env):
    fresh = path(env, expires=60)
    past = path(env, expires=-60)
    for t in (fresh, past):
        get(env, t), get(env, t)
    assert origin_hits(env, fresh) == 1 and origin_hits(env, past) == 2


def test_heuristic_freshness_from_last_modified(env):
    t = path(env, lm=100000)  # 10% of ~28 h: fresh for hours
    get(env, t), get(env, t)
    assert origin_hits(env, t) == 1
    t2 = path(env)  # no freshness information at all: not stored (default_ttl = 0)
    get(env, t2), get(env, t2)
    assert origin_hits(env, t2) == 2


def test_authorization_only_with_public(env):
    t = path(env, cc="max-age=60")
    tp = path(env, cc="public, max-age=60")
    auth = {"Authorization": "Basic dTpw"}
    for t_ in (t, tp):
        get(env, t_, headers=auth), get(env, t_, headers=auth)
    assert origin_hits(env, t) == 2 and origin_hits(env, tp) == 1


def test_set_cookie_not_stored(env):
    t = path(env, cc="max-age=60", cookie=1)
    get(env, t), get(env, t)
    assert origin_hits(env, t) == 2


def test_only_get_and_head_and_unsafe_methods_invalidate(env):
    t = path(env, cc="max-age=60")
    get(env, t)
    s, h, b = get(env, t, method="HEAD")  # HEAD answered from the stored GET
    assert s == 200 and b == b"" and int(h["content-length"]) > 0 and origin_hits(env, t) == 1
    get(env, t, method="POST", body=b"x")  # not stored, and it invalidates the entry
    assert origin_hits(env, t) == 2
    get(env, t)
    assert origin_hits(env, t) == 3
    get(env, t)
    assert origin_hits(env, t) == 3


def test_vary_two_representations(env):
    t = path(env, cc="max-age=60", vary="Accept-Language")
    _, _, en = get(env, t, headers={"Accept-Language": "en"})
    _, _, fr = get(env, t, headers={"Accept-Language": "fr"})
    assert b"lang=en" in en and b"lang=fr" in fr
    assert origin_hits(env, t) == 2
    assert get(env, t, headers={"Accept-Language": "en"})[2] == en
    assert get(env, t, headers={"Accept-Language": "fr"})[2] == fr
    assert origin_hits(env, t) == 2


def test_conditional_requests_answered_304_from_the_cache(env):
    t = path(env, cc="max-age=60", etag="e", lm=3600)
    _, h, _ = get(env, t)
    s, h2, b = get(env, t, headers={"If-None-Match": h["etag"]})
    assert s == 304 and b == b"" and h2["etag"] == h["etag"]
    s, _, _ = get(env, t, headers={"If-None-Match": 'W/"other"'})
    assert s == 200
    s, _, _ = get(env, t, headers={"If-Modified-Since": h["last-modified"]})
    assert s == 304
    earlier = email.utils.formatdate(time.time() - 7200, usegmt=True)
    assert get(env, t, headers={"If-Modified-Since": earlier})[0] == 200
    assert origin_hits(env, t) == 1


def test_request_no_cache_revalidates_and_range_bypasses(env):
    t = path(env, cc="max-age=60", etag="r")
    get(env, t)
    get(env, t, headers={"Cache-Control": "no-cache"})
    assert origin_hits(env, t) == 2 and seen(env, t)[-1]["inm"] == '"r-1"'
    get(env, t, headers={"Range": "bytes=0-3"})
    assert origin_hits(env, t) == 3


def test_max_object_relayed_not_stored(env):
    big = path(env, cc="max-age=60", size=300 * 1024)  # over max_object (256 KiB)
    s, _, b = get(env, big)
    assert s == 200 and len(b) == 300 * 1024
    get(env, big)
    assert origin_hits(env, big) == 2


def test_access_log_says_what_the_cache_did(env):
    t = path(env, cc="max-age=2", etag="l")
    get(env, t), get(env, t)
    time.sleep(2.2)
    get(env, t)
    p = urllib.parse.urlsplit(t).path

    def states():
        out = []
        for line in Path(env.dir, "access.log").read_text().splitlines():
            rec = json.loads(line)
            if p in rec.get("request", ""):
                out.append(rec.get("cache"))
        return out if len(out) == 3 else None
    assert wait_for(states, 5) == ["MISS", "HIT", "REVALIDATED"]


def metrics(env) -> dict[str, float]:
    c = http.client.HTTPConnection("127.0.0.1", env.mport, timeout=5)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(halb_http_cache_\w+)(\{[^}]*\})? ([0-9.e+-]+)$', line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def test_purge_with_halbctl_and_metrics(env):
    keep = path(env, cc="max-age=60")
    a = [f"/purge/a{i}?cc=max-age%3D60" for i in range(5)]
    for t in a + [keep]:
        get(env, t)
    before = metrics(env)
    assert before['halb_http_cache_entries{listener="www"}'] >= 6
    r = subprocess.run([sys.executable, "-m", "halb.cli.halbctl", "--socket", env.sock, "cache",
                        "purge", "/purge/", "--json"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert int(out["purged"]) == 5 and out["listeners"] == ["www"]
    for t in a:
        get(env, t)
    assert all(env.origin.hits[urllib.parse.urlsplit(t).path] == 2 for t in a)
    get(env, keep)
    assert origin_hits(env, keep) == 1
    m = metrics(env)
    assert m['halb_http_cache_purged_total{listener="www"}'] >= 5
    assert m['halb_http_cache_lookups_total{listener="www",result="hit"}'] > 0
    assert m['halb_http_cache_lookups_total{listener="www",result="miss"}'] > 0
    assert m['halb_http_cache_stored_total{listener="www"}'] > 0
    assert m['halb_http_cache_capacity_bytes{listener="www"}'] == 4 << 20
    bad = subprocess.run([sys.executable, "-m", "halb.cli.halbctl", "--socket", env.sock,
                          "cache", "purge", "--listener", "nope"], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode != 0 and "'nope' has no HTTP cache" in bad.stderr


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_memory_is_bounded(env):
    """4,000 distinct 16 KiB objects (62 MiB) through a 4 MiB cache: entries and bytes stay
    within max_size, the oldest are evicted, and halbd's RSS grows by far less than what
    passed through."""
    rss0 = _rss_kib(env.halbd.p.pid)
    c = http.client.HTTPConnection("127.0.0.1", env.port, timeout=10)
    for i in range(4000):
        c.request("GET", f"/bound/{i}?cc=max-age%3D600&size=16384")
        r = c.getresponse()
        assert len(r.read()) == 16384
    c.close()
    m = metrics(env)
    assert m['halb_http_cache_bytes{listener="www"}'] <= 4 << 20
    entries = m['halb_http_cache_entries{listener="www"}']
    assert entries <= (4 << 20) // 16384
    assert m['halb_http_cache_evicted_total{listener="www"}'] >= 4000 - entries - 50
    grew = _rss_kib(env.halbd.p.pid) - rss0
    print(f"\n4000 x 16 KiB through a 4 MiB cache: {int(entries)} entries, RSS +{grew} KiB")
    assert grew < 24 * 1024, grew  # 62 MiB went through
    # the most recent are there, the first are gone
    before = env.origin.hits["/bound/3999"], env.origin.hits["/bound/0"]
    get(env, "/bound/3999?cc=max-age%3D600&size=16384")
    get(env, "/bound/0?cc=max-age%3D600&size=16384")
    assert (env.origin.hits["/bound/3999"], env.origin.hits["/bound/0"]) == (before[0],
                                                                             before[1] + 1)


def test_a_conditional_miss_is_not_stored(env):
    """The client already holds the object (its ETag): the origin's 304 is for that client
    alone and is not stored; the next plain GET gets the whole object."""
    t = path(env, cc="max-age=60", etag="q")
    s, _, _ = get(env, t, headers={"If-None-Match": '"q-1"'})
    assert s == 304
    s, _, b = get(env, t)
    assert s == 200 and b.startswith(b"/t")
    get(env, t)
    assert origin_hits(env, t) == 2  # the 304, then the full answer (stored, then a hit)


def test_a_client_that_reads_no_answers_is_read_no_further(env):
    """Answers from the cache need no backend, so only the client's own pace can stop them:
    a client sending 2,000 requests for a 256 KiB object (100 at a time) and reading nothing
    makes halbd stop reading it (the requests of the read under way are answered), instead of
    queuing 500 MiB of answers."""
    import socket as _s
    t = "/bp/obj?cc=max-age%3D600&size=262144"
    assert get(env, t)[0] == 200 and get(env, t)[0] == 200
    rss0 = _rss_kib(env.halbd.p.pid)
    c = _s.create_connection(("127.0.0.1", env.port))
    c.setsockopt(_s.SOL_SOCKET, _s.SO_RCVBUF, 4096)
    one = f"GET {t} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    c.settimeout(0.5)
    sent = 0
    try:  # in batches of 100 (more than 128 in one read is refused as a pipelining abuse)
        for _ in range(20):
            c.sendall(one * 100)
            sent += 100
            time.sleep(0.1)
    except (TimeoutError, _s.timeout):
        pass
    time.sleep(1.5)
    grew = _rss_kib(env.halbd.p.pid) - rss0
    print(f"\n{sent} requests sent, none read: halbd RSS +{grew} KiB")
    c.close()
    assert grew < 80 * 1024, grew
    # and the listener still serves everyone else
    assert get(env, t)[0] == 200
