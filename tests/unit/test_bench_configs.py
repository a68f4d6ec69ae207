"""The bench's config templates: every field they use is one the bench fills, and the halb
config they make is valid, with the listeners the measurements rely on."""

import string

import pytest

from bench.__main__ import BACKEND_PORTS, HALB_CONF, HAPROXY_CONF, NGINX_CONF, PROXY_PORTS
from halb.config import loads

pytestmark = pytest.mark.unit


def fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def test_templates_use_only_the_ports_the_bench_fills():
    assert fields(HALB_CONF) <= {"dir", *BACKEND_PORTS, *PROXY_PORTS}
    assert fields(HAPROXY_CONF) <= {*BACKEND_PORTS, *PROXY_PORTS}
    assert fields(NGINX_CONF) <= {"dir", "name", "port"}


def test_halb_bench_config_is_valid_and_relays_as_reported(tmp_path):
    ports = {k: 20000 + i for i, k in enumerate((*BACKEND_PORTS, *PROXY_PORTS))}
    cfg = loads(HALB_CONF.format(dir=tmp_path, **ports))
    by_name = {lc.name: lc for lc in cfg.listeners}
    assert by_name["tcp"].relay == "auto" and by_name["tcp"].bind.port == ports["tcp"]
    assert by_name["tcpsplice"].relay == "splice"
    assert by_name["tcpsplice"].bind.port == ports["tcpsplice"]
    assert by_name["http"].forwarded_headers and len(by_name["http"].routes) == 3
    assert cfg.metrics.address.port == ports["metrics"]
