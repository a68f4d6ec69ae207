"""The pure-Python fallback: halbd with Cython absent (the shim stands in) and the compiled
modules not loaded (HALB_NO_EXTENSIONS=1) serves HTTP, TCP and keep-alive like the built one."""

from __future__ import annotations

import http.client
import socket

import pytest

from tests.helpers import PY, Backends, Proc, free_port, wait_for, port_open, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LAUNCH = ("import sys; sys.modules['cython'] = None; "  # as on a machine without Cython
          "from halb.cli.halbd import main; sys.exit(main(sys.argv[1:]))")


def test_halbd_without_cython_proxies_http_and_tcp(tmp_path):
    hport, tport = free_port(), free_port()
    with Backends(["b1", "b2"], tcp=True) as bk:
        cfg = write_config(tmp_path, f"""
[node]
name = "pure"
state_dir = "{tmp_path}"
[[pools]]
name = "web"
[pools.health]
type = "none"
[[pools.backends]]
name = "b1"
address = "{bk.http['b1']}"
[[pools.backends]]
name = "b2"
address = "{bk.http['b2']}"
[[pools]]
name = "tcp"
[pools.health]
type = "none"
[[pools.backends]]
name = "b1"
address = "{bk.tcp['b1']}"
[[listeners]]
name = "www"
mode = "http"
bind = "127.0.0.1:{hport}"
pool = "web"
[[listeners]]
name = "raw"
mode = "tcp"
bind = "127.0.0.1:{tport}"
pool = "tcp"
""")
        with Proc([PY, "-c", LAUNCH, str(cfg)], log=tmp_path / "halbd.log",
                  env={"HALB_NO_EXTENSIONS": "1"}) as p:
            def up():
                assert p.alive(), (tmp_path / "halbd.log").read_text()[-3000:]
                return port_open("127.0.0.1", hport) and port_open("127.0.0.1", tport)
            wait_for(up, 20, what="halbd (pure Python) listening")
            c = http.client.HTTPConnection("127.0.0.1", hport, timeout=5)
            seen = set()
            for _ in range(10):  # keep-alive: one connection, ten requests, round robin
                c.request("GET", "/who")
                r = c.getresponse()
                body = r.read()
                assert r.status == 200, (r.status, body)
                seen.add(r.getheader("X-Backend"))
            c.close()
            assert seen == {"b1", "b2"}
            with socket.create_connection(("127.0.0.1", tport), timeout=5) as s:
                s.sendall(b"WHO\n")
                assert s.recv(100).startswith(b"b1")
            log = (tmp_path / "halbd.log").read_text()
            assert '"event":"node_started"' in log
