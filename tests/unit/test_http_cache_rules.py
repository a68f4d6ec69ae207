"""The HTTP cache's rules (halb.proxy.cache, RFC 9111 as a shared cache), without sockets: each
test breaks when its rule is broken."""

from __future__ import annotations

import email.utils

import pytest

from halb.proxy.cache import HttpCache, Headers, directives, http_date, seconds

pytestmark = pytest.mark.unit

T0 = 1_800_000_000.0  # a fixed wall clock


def date(t: float) -> str:
    return email.utils.formatdate(t, usegmt=True)


def cache(**kw) -> HttpCache:
    args = dict(max_size=1 << 20, max_object=64 << 10)
    args.update(kw)
    return HttpCache(**args)


def H(**fields) -> Headers:
    items = []
    for k, v in fields.items():
        for one in (v if isinstance(v, list) else [v]):
            items.append((k.replace("_", "-").encode(), str(one).encode()))
    return Headers(items)


def req(c: HttpCache, target=b"/a", method=b"GET", now=T0, body=False, host="Example.com",
        **hdrs):
    headers = [(k.replace("_", "-").title().encode(), str(one).encode())
               for k, v in hdrs.items() for one in (v if isinstance(v, list) else [v])]
    return c.request(method, host, target, headers, body, now)


def fill(c: HttpCache, target=b"/a", status=200, body=b"hello", now=T0, reqh=None, **resp):
    d = req(c, target, now=now, **(reqh or {}))
    h = H(**resp)
    life, why = c.storable(d, status, h, now)
    assert not why, why
    return c.store(d, status, b"OK", h, body, life, now, now)


def test_directives_and_values():
    assert directives(['max-age=60, s-maxage="30", no-cache', "Private"]) == {
        "max-age": "60", "s-maxage": "30", "no-cache": "", "private": ""}
    assert directives(['no-cache="Set-Cookie, X", public']) == {"no-cache": "Set-Cookie, X",
                                                                 "public": ""}
    assert seconds("60") == 60 and seconds("x") is None and seconds("99999999999") == 2 ** 31
    assert http_date(date(T0)) == T0 and http_date("junk") is None
    assert http_date("Sunday, 06-Nov-94 08:49:37 GMT") == 784111777.0  # RFC 850 form


def test_miss_store_hit_with_age():
    c = cache()
    assert req(c).action == "miss"
    fill(c, cache_control="max-age=60", date=date(T0 - 5), age="3")
    d = req(c, now=T0 + 10)
    assert d.action == "hit" and d.state == "HIT"
    # RFC 9111 4.2.3: corrected initial age = max(apparent 5, 3 + delay 0) = 5, plus 10 resident
    st, data = c.respond(d, T0 + 10, "1.1", False, False, b"")
    assert st == 200 and b"\r\nAge: 15\r\n" in data and data.endswith(b"\r\n\r\nhello")
    assert b"Content-Length: 5\r\n" in data
    assert req(c, now=T0 + 56).action == "miss"  # 5 + 56 > 60: stale, no validator: fetch


@pytest.mark.parametrize("resp,why", [
    (dict(cache_control="no-store, max-age=60"), "no-store"),
    (dict(cache_control="private, max-age=60"), "private"),
    (dict(cache_control="max-age=60", vary="*"), "vary"),
    (dict(cache_control="max-age=60", set_cookie="a=b"), "set-cookie"),
    (dict(), "no freshness"),  # nothing to go by and default_ttl = 0
    (dict(cache_control="no-cache"), "no freshness"),  # always revalidated, but no validator
])
def test_not_storable(resp, why):
    c = cache()
    d = req(c)
    assert c.storable(d, 200, H(**resp), T0)[1] == why


def test_status_rules():
    c = cache()
    d = req(c)
    assert c.storable(d, 206, H(cache_control="max-age=60"), T0)[1] == "status"
    # 500 is not heuristically cacheable: only with explicit freshness
    assert c.storable(d, 500, H(last_modified=date(T0 - 1000)), T0)[1] == "status"
    assert c.storable(d, 500, H(cache_control="max-age=5"), T0) == (5.0, "")
    assert c.storable(d, 404, H(last_modified=date(T0 - 1000), date=date(T0)), T0) == (100.0, "")


def test_request_side_bypasses():
    c = cache()
    assert req(c, method=b"POST").action == "bypass"
    assert req(c, body=True).action == "bypass"
    assert req(c, range="bytes=0-1").action == "bypass"
    d = req(c, cache_control="no-store")
    assert d.action == "bypass" and c.storable(d, 200, H(cache_control="max-age=9"), T0)[1]
    assert req(c, method=b"HEAD").action == "bypass"  # a HEAD miss stores nothing


def test_set_cookie_stored_when_configured():
    c = cache(store_set_cookie=True)
    assert c.storable(req(c), 200, H(cache_control="max-age=60", set_cookie="a=b"), T0)[1] == ""


def test_authorization_needs_public_s_maxage_or_must_revalidate():
    c = cache()
    for cc, ok in (("max-age=60", False), ("public, max-age=60", True),
                   ("s-maxage=60", True), ("must-revalidate, max-age=60", True)):
        d = req(c, authorization="Basic x")
        assert (c.storable(d, 200, H(cache_control=cc), T0)[1] == "") is ok, cc


def test_lifetime_precedence_and_cap():
    c = cache(max_age=100)
    d = req(c)
    assert c.storable(d, 200, H(cache_control="max-age=10, s-maxage=50"), T0)[0] == 50
    assert c.storable(d, 200, H(cache_control="max-age=10", expires=date(T0 + 50),
                                date=date(T0)), T0)[0] == 10
    assert c.storable(d, 200, H(expires=date(T0 + 50), date=date(T0)), T0)[0] == 50
    assert c.storable(d, 200, H(expires="0", etag='"x"'), T0)[0] == 0  # invalid: expired
    assert c.storable(d, 200, H(cache_control="max-age=99999"), T0)[0] == 100  # capped
    c2 = cache(default_ttl=7)
    assert c2.storable(req(c2), 200, H(), T0) == (7, "")


def test_no_cache_response_is_always_revalidated():
    c = cache()
    fill(c, cache_control="no-cache", etag='"v1"')
    d = req(c, now=T0 + 1)
    assert d.action == "revalidate" and d.cond == b'If-None-Match: "v1"\r\n'


def test_request_directives():
    c = cache()
    fill(c, cache_control="max-age=60", etag='"v1"', last_modified=date(T0 - 100))
    assert req(c, now=T0 + 1).action == "hit"
    d = req(c, now=T0 + 1, cache_control="no-cache")
    assert d.action == "revalidate"
    assert d.cond == b'If-None-Match: "v1"\r\nIf-Modified-Since: ' + date(T0 - 100).encode() + b"\r\n"
    assert req(c, now=T0 + 1, pragma="no-cache").action == "revalidate"
    assert req(c, now=T0 + 20, cache_control="max-age=10").action == "revalidate"
    assert req(c, now=T0 + 20, cache_control="min-fresh=50").action == "revalidate"
    assert req(c, now=T0 + 20, cache_control="min-fresh=30").action == "hit"
    d = req(c, target=b"/none", cache_control="only-if-cached")
    st, data = c.respond(d, T0, "1.1", True, False, b"")
    assert st == 504 and data.startswith(b"HTTP/1.1 504 ")


def test_conditional_requests_on_a_hit():
    c = cache()
    lm = date(T0 - 100)
    fill(c, cache_control="max-age=60", etag='W/"v1"', last_modified=lm)

    def answer(**h):
        d = req(c, now=T0 + 1, **h)
        return c.respond(d, T0 + 1, "1.1", False, False, b"")
    st, data = answer(if_none_match='"v1"')  # weak comparison
    assert st == 304 and b"etag: w/\"v1\"" in data.lower() and b"hello" not in data
    assert answer(if_none_match='"other", W/"v1"')[0] == 304
    assert answer(if_none_match="*")[0] == 304
    assert answer(if_none_match='"other"')[0] == 200
    assert answer(if_modified_since=lm)[0] == 304
    assert answer(if_modified_since=date(T0 - 200))[0] == 200
    # If-None-Match wins over If-Modified-Since (RFC 9110 13.1.3)
    assert answer(if_none_match='"other"', if_modified_since=lm)[0] == 200


def test_stale_with_client_validators_goes_through():
    c = cache()
    fill(c, cache_control="max-age=1", etag='"v1"')
    assert req(c, now=T0 + 5, if_none_match='"v1"').action == "bypass"


def test_freshen_on_304():
    c = cache()
    e = fill(c, cache_control="max-age=1", etag='"v1"', x_keep="1")
    d = req(c, now=T0 + 5)
    assert d.action == "revalidate" and d.entry is e
    c.freshen(e, H(cache_control="max-age=60", etag='"v1"', date=date(T0 + 5)), T0 + 5, T0 + 5)
    d = req(c, now=T0 + 6)
    assert d.action == "hit"
    st, data = c.respond(d, T0 + 6, "1.1", False, False, b"")
    low = data.lower()
    assert b"cache-control: max-age=60" in low and b"max-age=1\r" not in low
    assert b"x-keep: 1" in low and b"Age: 1\r\n" in data


def test_vary_keeps_representations_apart():
    c = cache()
    fill(c, reqh={"accept_language": "en"}, body=b"EN", cache_control="max-age=60",
         vary="Accept-Language")
    assert req(c, accept_language="fr").action == "miss"
    fill(c, reqh={"accept_language": "fr"}, body=b"FR", cache_control="max-age=60",
         vary="Accept-Language")
    for lang, body in (("en", b"EN"), ("fr", b"FR")):
        d = req(c, accept_language=lang)
        assert d.action == "hit" and d.entry.body == body
    assert req(c).action == "miss"  # no Accept-Language: a third representation
    assert c.entries == 2


def test_keys_are_host_and_target():
    c = cache()
    fill(c, cache_control="max-age=60")
    assert req(c, host="EXAMPLE.com").action == "hit"
    assert req(c, host="other.example").action == "miss"
    assert req(c, target=b"/a?x=1").action == "miss"


def test_bounds_evict_least_recently_used():
    c = cache(max_size=64 << 10, max_object=16 << 10, max_entries=1000)
    for i in range(40):
        fill(c, target=b"/o%d" % i, body=b"x" * 8000, cache_control="max-age=60")
        assert c.size <= c.max_size
    assert c.entries == (64 << 10) // c._lru[("example.com", b"/o39")][0].size
    assert c.stats["evicted"] == 40 - c.entries
    assert req(c, target=b"/o0").action == "miss" and req(c, target=b"/o39").action == "hit"
    c2 = cache(max_entries=3)
    for i in range(5):
        fill(c2, target=b"/e%d" % i, cache_control="max-age=60")
    assert c2.entries == 3
    req(c2, target=b"/e2")  # a hit makes it the most recent
    fill(c2, target=b"/e9", cache_control="max-age=60")
    assert req(c2, target=b"/e2").action == "hit" and req(c2, target=b"/e3").action == "miss"


def test_too_big_not_stored():
    c = cache(max_object=10)
    d = req(c)
    h = H(cache_control="max-age=60")
    assert c.store(d, 200, b"OK", h, b"x" * 11, 60, T0, T0) is None and c.entries == 0


def test_hop_by_hop_and_framing_not_stored():
    c = cache()
    e = fill(c, cache_control="max-age=60", connection="close", keep_alive="timeout=5",
             transfer_encoding="chunked", content_length="5", age="2", x_app="1")
    names = {n.lower() for n, _ in e.headers}
    assert names == {b"cache-control", b"x-app"}


def test_invalidate_and_purge():
    c = cache()
    for t in (b"/img/1", b"/img/2", b"/css/1"):
        fill(c, target=t, cache_control="max-age=60")
    assert c.invalidate("example.com", b"/css/1") == 1 and c.entries == 2
    assert c.purge("/img/", host="other") == 0
    assert c.purge("/img/") == 2 and c.entries == 0 and c.size == 0


def test_head_answered_from_get():
    c = cache()
    fill(c, cache_control="max-age=60")
    d = req(c, method=b"HEAD")
    st, data = c.respond(d, T0, "1.1", True, False, b"Via: 1.1 halb\r\n")
    assert st == 200 and data.endswith(b"Connection: close\r\nVia: 1.1 halb\r\n\r\n")
    assert b"Content-Length: 5" in data


def test_a_conditional_miss_stores_nothing():
    """A client's If-None-Match on a URL not stored goes to the backend as it is, and the
    answer (a 304 for that client's copy) is that client's: never stored."""
    c = cache()
    d = req(c, if_none_match='"v1"')
    assert d.action == "bypass"
    d2 = req(c)
    assert c.storable(d2, 304, H(cache_control="max-age=60", etag='"v1"'), T0)[1] == "status"
    assert c.storable(d2, 412, H(cache_control="max-age=60"), T0)[1] == "status"


def test_odd_digits_never_raise():
    assert seconds("\u00b2") is None and seconds("\u0661") is None  # isdigit() but not ASCII
    c = cache()
    fill(c, cache_control="max-age=60")
    d = req(c, cache_control="max-age=\u00b2")
    assert d.action == "hit"
    e = fill(c, target=b"/b", cache_control="max-age=60", age="\u00b2")
    assert e is not None and e.age == 0


def test_freshen_keeps_no_set_cookie_and_says_when_no_longer_storable():
    c = cache()
    e = fill(c, cache_control="max-age=1", etag='"v1"')
    assert c.freshen(e, H(cache_control="max-age=60", set_cookie="sid=x"), T0 + 5, T0 + 5)
    assert b"set-cookie" not in {n.lower() for n, _ in e.headers}
    assert b"sid=x" not in e.head
    assert not c.freshen(e, H(cache_control="private, max-age=60"), T0 + 6, T0 + 6)
    size = e.size
    c.freshen(e, H(x_long="y" * 1000), T0 + 7, T0 + 7)
    assert e.size > size + 1000 and c.size == e.size


def test_routed_pool_is_part_of_what_selects_a_response():
    """Routes can read request headers: the same URL routed to two pools is two responses."""
    c = cache()
    d = c.request(b"GET", "example.com", b"/a", [], False, T0, "canary")
    h = H(cache_control="max-age=60")
    c.store(d, 200, b"OK", h, b"canary", 60, T0, T0)
    assert c.request(b"GET", "example.com", b"/a", [], False, T0, "stable").action == "miss"
    hit = c.request(b"GET", "example.com", b"/a", [], False, T0, "canary")
    assert hit.action == "hit" and hit.entry.body == b"canary"


def test_connection_named_headers_are_not_stored():
    h = Headers.parse(b"Connection: x-hop\r\nX-Hop: 1\r\nX-Keep: 2\r\n", [b"X-Hop"])
    assert [n for n, _ in h.items] == [b"Connection", b"X-Keep"]
