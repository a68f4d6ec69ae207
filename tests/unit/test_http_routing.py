"""HTTP routing: a pure function of host, path and headers; first matching route wins."""

from __future__ import annotations

import pytest

from halb.config import HeaderMatch, RouteConfig
from halb.proxy.routing import Router, split_host

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("dual_module")]
DUAL_MODULE = "halb.proxy.routing"  # each test against the compiled module and its .py

ROUTES = (
    RouteConfig(pool="api", host="api.example.com"),
    RouteConfig(pool="wild", host="*.example.com"),
    RouteConfig(pool="static", path_prefix="/static/"),
    RouteConfig(pool="canary", header=HeaderMatch(name="x-canary", value="yes")),
    RouteConfig(pool="debug", header=HeaderMatch(name="x-debug")),
    RouteConfig(pool="both", host="shop.test", path_prefix="/cart"),
    RouteConfig(pool="port", host="alt.test:8080"),
    RouteConfig(pool="v6", host="[2001:2::10]"),
    RouteConfig(pool="v6port", host="[2001:2::11]:8080"),
)


@pytest.mark.parametrize("host,path,headers,pool", [
    ("api.example.com", "/", {}, "api"),
    ("API.Example.COM:443", "/x", {}, "api"),  # case-insensitive, port ignored
    ("www.example.com", "/", {}, "wild"),
    ("a.b.example.com", "/", {}, "wild"),
    ("example.com", "/", {}, "default"),  # *.example.com does not match the bare domain
    ("badexample.com", "/", {}, "default"),
    ("other.test", "/static/app.js", {}, "static"),
    ("other.test", "/static", {}, "default"),
    ("api.example.com", "/static/x", {}, "api"),  # first match wins
    ("other.test", "/", {"x-canary": ["yes"]}, "canary"),
    ("other.test", "/", {"x-canary": ["no"]}, "default"),
    ("other.test", "/", {"x-canary": ["no", "yes"]}, "canary"),
    ("other.test", "/", {"x-debug": [""]}, "debug"),  # presence only
    ("shop.test", "/cart/1", {}, "both"),
    ("shop.test", "/other", {}, "default"),  # every condition of a route must hold
    ("alt.test:8080", "/", {}, "port"),
    ("alt.test:9090", "/", {}, "default"),
    ("alt.test", "/", {}, "default"),
    ("", "/", {}, "default"),
    ("[2001:2::10]", "/", {}, "v6"),  # an IPv6 literal Host (RFC 3986 3.2.2), any port
    ("[2001:2::10]:80", "/", {}, "v6"),
    ("[2001:2::11]:8080", "/", {}, "v6port"),
    ("[2001:2::11]:80", "/", {}, "default"),
    ("[2001:2::1]", "/", {}, "default"),
])
def test_route(host, path, headers, pool):
    assert Router(ROUTES, "default").route(host, path, headers) == pool


def test_no_routes_is_default_and_needs_no_headers():
    r = Router((), "web")
    assert r.route("anything", "/x") == "web"
    assert not r.needs_headers
    assert Router(ROUTES, "d").needs_headers


@pytest.mark.parametrize("raw,expected", [
    ("Example.com:80", ("example.com", "80")),
    ("example.com", ("example.com", "")),
    ("[::1]:8080", ("[::1]", "8080")),
    ("[::1]", ("[::1]", "")),
    ("1.2.3.4:5", ("1.2.3.4", "5")),
])
def test_split_host(raw, expected):
    assert split_host(raw) == expected
