"""HTTP/2 and gRPC settings: [listeners.http2], pools' proto = "h2", type = "grpc" checks, and
the pure helpers of halb.proxy.h2front (grpc-timeout, the HTTP -> gRPC status mapping)."""

import pytest

from halb.config import ConfigError, loads
from halb.proxy.h2front import grpc_status_for, grpc_timeout

pytestmark = pytest.mark.unit

BASE = """
[node]
name = "lb1"

[[pools]]
name = "web"
{pool}
  [[pools.backends]]
  address = "127.0.0.1:9001"
{health}

[[listeners]]
name = "www"
mode = "{mode}"
bind = "127.0.0.1:8080"
pool = "web"
{listener}
"""


def cfg(pool="", health="", listener="", mode="http"):
    return loads(BASE.format(pool=pool, health=health, listener=listener, mode=mode))


def problems(**kw) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        cfg(**kw)
    return [str(p) for p in ei.value.problems]


def test_defaults():
    c = cfg()
    h = c.listeners[0].http2
    assert h.enabled and h.h2c and h.alpn == ("h2", "http/1.1")
    assert h.max_concurrent_streams == 100 and h.max_frame_size == 16384
    assert c.pools[0].proto == "http1"


def test_http2_table():
    c = cfg(listener='[listeners.http2]\nalpn = ["http/1.1"]\nh2c = false\n'
                     'max_concurrent_streams = 10\nmax_resets_per_s = 5\n'
                     'max_control_frames_per_s = 7\nmax_frame_size = 32768\n')
    h = c.listeners[0].http2
    assert (h.alpn, h.h2c, h.max_concurrent_streams, h.max_resets_per_s,
            h.max_control_frames_per_s, h.max_frame_size) == (("http/1.1",), False, 10, 5, 7,
                                                              32768)


@pytest.mark.parametrize("body, needle", [
    ('alpn = ["spdy/3"]', "listeners[0].http2.alpn[0]: unknown ALPN protocol 'spdy/3'"),
    ("max_concurrent_streams = 0", "listeners[0].http2.max_concurrent_streams"),
    ("max_frame_size = 100", "listeners[0].http2.max_frame_size"),
    ("bogus = 1", "listeners[0].http2.bogus"),
])
def test_http2_errors(body, needle):
    assert any(needle in p for p in problems(listener=f"[listeners.http2]\n{body}\n")), \
        problems(listener=f"[listeners.http2]\n{body}\n")


def test_http2_needs_http_mode():
    assert any("http2 needs mode" in p for p in problems(listener="[listeners.http2]\nh2c = true",
                                                         mode="tcp"))


def test_pool_proto_and_grpc_check():
    c = cfg(pool='proto = "h2"\nh2_max_streams = 20\nh2_max_conns = 3',
            health='[pools.health]\ntype = "grpc"\nservice = "my.pkg.Svc"')
    p = c.pools[0]
    assert (p.proto, p.h2_max_streams, p.h2_max_conns) == ("h2", 20, 3)
    assert p.health.type == "grpc" and p.health.service == "my.pkg.Svc"


@pytest.mark.parametrize("kw, needle", [
    ({"pool": 'proto = "h3"'}, "pools[0].proto"),
    ({"pool": "h2_max_streams = 5"}, "h2_max_streams needs proto"),
    ({"health": '[pools.health]\ntype = "tcp"\nservice = "x"'}, "service needs type"),
    ({"health": '[pools.health]\ntype = "grpc"\nservice = "a b"'}, "invalid gRPC service"),
])
def test_pool_errors(kw, needle):
    ps = problems(**kw)
    assert any(needle in p for p in ps), ps


@pytest.mark.parametrize("v, s", [(b"100m", 0.1), (b"5S", 5.0), (b"1H", 3600.0),
                                  (b"250u", 250e-6), (b"2M", 120.0), (b"7n", 7e-9)])
def test_grpc_timeout(v, s):
    assert grpc_timeout(v) == pytest.approx(s)


@pytest.mark.parametrize("v", [b"", b"100", b"-1S", b"123456789S", b"1s", b"1 S"])
def test_grpc_timeout_malformed(v):
    assert grpc_timeout(v) is None


def test_grpc_status_mapping():
    assert [grpc_status_for(s) for s in (400, 401, 403, 404, 429, 502, 503, 504, 500, 418)] \
        == [13, 16, 7, 12, 14, 14, 14, 14, 2, 2]
