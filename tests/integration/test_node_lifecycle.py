"""halbd's life cycle: a start that fails half way undoes what it started and says why."""

import os
import socket

import pytest

from tests.helpers import Backends, Halbd, free_port, wait_for, write_config

pytestmark = pytest.mark.integration


def test_failed_start_stops_the_parts_already_started(tmp_path):
    sock_path = tmp_path / "lb1.sock"
    with Backends(["b1"], tcp=True, http=False) as bk, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        free = free_port()
        cfg = write_config(tmp_path, f'''
[node]
name = "lb1"
state_dir = "{tmp_path}"
[control]
socket = "{sock_path}"
[[pools]]
name = "p"
  [[pools.backends]]
  address = "{bk.tcp['b1']}"
[[listeners]]
name = "first"
mode = "tcp"
bind = "127.0.0.1:{free}"
pool = "p"
[[listeners]]
name = "second"
mode = "tcp"
bind = "127.0.0.1:{port}"
pool = "p"
''')
        node = Halbd(cfg)
        try:
            wait_for(lambda: not node.alive(), 15, what="halbd to give up")
            assert node.p.returncode == 1
            out = node.output()
            assert "cannot start" in out and str(port) in out, out[-2000:]
            # the control socket and the first listener, started before the failure, are gone
            assert not sock_path.exists()
            with socket.socket() as probe:
                assert probe.connect_ex(("127.0.0.1", free)) != 0
        finally:
            node.close()


def test_sigterm_stops_cleanly_and_removes_the_control_socket(tmp_path):
    sock_path = tmp_path / "lb1.sock"
    port = free_port()
    with Backends(["b1"], tcp=True, http=False) as bk:
        cfg = write_config(tmp_path, f'''
[node]
name = "lb1"
[control]
socket = "{sock_path}"
[[pools]]
name = "p"
  [[pools.backends]]
  address = "{bk.tcp['b1']}"
[[listeners]]
name = "l"
mode = "tcp"
bind = "127.0.0.1:{port}"
pool = "p"
''')
        with Halbd(cfg) as node:
            node.wait_port(port)
            assert sock_path.exists() and oct(os.stat(sock_path).st_mode & 0o777) == "0o600"
            assert node.stop(timeout=10) == 0
            assert "node_stopped" in node.output()
            assert not sock_path.exists()
