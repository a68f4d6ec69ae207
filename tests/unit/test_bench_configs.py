"""The bench's config templates: every field they use is one the bench fills, and the halb
config they make is valid, with the listeners the measurements rely on."""

import string

import pytest

from bench.__main__ import (BACKEND_PORTS, HALB_CONF, HALB_LOG_CONF, HAPROXY_CONF,
                            HAPROXY_LOG_CONF, NGINX_CONF, PROXY_PORTS)
from halb.config import loads

pytestmark = pytest.mark.unit


def fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def test_templates_use_only_the_ports_the_bench_fills():
    assert fields(HALB_CONF) <= {"dir", *BACKEND_PORTS, *PROXY_PORTS}
    assert fields(HAPROXY_CONF) <= {"dir", *BACKEND_PORTS, *PROXY_PORTS}
    assert fields(HALB_LOG_CONF) <= {"dir", *BACKEND_PORTS, *PROXY_PORTS}
    assert fields(HAPROXY_LOG_CONF) <= {*BACKEND_PORTS, *PROXY_PORTS}
    assert fields(NGINX_CONF) <= {"dir", "name", "port"}


@pytest.fixture(autouse=True)
def tls_files(tmp_path):
    """The files the https listener names (the bench makes them with openssl)."""
    for n in ("bench-tls.crt", "bench-tls.key"):
        (tmp_path / n).write_text("-----BEGIN X-----\n")


def test_halb_bench_config_is_valid_and_relays_as_reported(tmp_path):
    ports = {k: 20000 + i for i, k in enumerate((*BACKEND_PORTS, *PROXY_PORTS))}
    cfg = loads(HALB_CONF.format(dir=tmp_path, **ports))
    https = {lc.name: lc for lc in cfg.listeners}["https"]
    assert https.tls is not None and https.bind.port == ports["https"]
    assert https.tls.tickets and https.tls.session_cache > 0  # resumption on, as HAProxy's
    assert f"bind 127.0.0.1:{{https}} ssl crt {{dir}}/bench-tls.pem" in HAPROXY_CONF
    by_name = {lc.name: lc for lc in cfg.listeners}
    assert by_name["tcp"].relay == "auto" and by_name["tcp"].bind.port == ports["tcp"]
    assert by_name["tcpsplice"].relay == "splice"
    assert by_name["tcpsplice"].bind.port == ports["tcpsplice"]
    assert by_name["http"].forwarded_headers and len(by_name["http"].routes) == 3
    assert cfg.metrics.address.port == ports["metrics"]


def test_access_logs_off_in_the_l7_case_on_to_a_file_in_l7log(tmp_path):
    """The l7 figure is measured with no access log on either side (the default is on); the
    l7log pair logs every request to a file on both sides, over the same frontend work."""
    ports = {k: 20000 + i for i, k in enumerate((*BACKEND_PORTS, *PROXY_PORTS))}
    assert loads(HALB_CONF.format(dir=tmp_path, **ports)).access_log.enabled is False
    assert "log " not in HAPROXY_CONF and "httplog" not in HAPROXY_CONF
    cfg = loads(HALB_LOG_CONF.format(dir=tmp_path, **ports))
    al = cfg.access_log
    assert (al.enabled, al.kind, al.path, al.format, al.sample) == \
        (True, "file", f"{tmp_path}/halb-access.log", "text", 1.0)
    main = {lc.name: lc for lc in loads(HALB_CONF.format(dir=tmp_path, **ports)).listeners}
    (lc,) = cfg.listeners
    assert lc.access_log and lc.routes == main["http"].routes
    assert (lc.forwarded_headers, lc.timeouts) == (main["http"].forwarded_headers,
                                                   main["http"].timeouts)
    h = HAPROXY_LOG_CONF
    assert "option httplog" in h and "log stdout format raw" in h and "log global" in h
    # the frontend does what the l7 case's does
    fe = HAPROXY_CONF.split("frontend fe_http\n")[1].split("backend be_web")[0]
    fe = "\n".join(ln for ln in fe.splitlines() if not ln.strip().startswith("#"))
    assert fe in h
