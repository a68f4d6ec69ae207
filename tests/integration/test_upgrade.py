"""Zero-downtime upgrade of halbd itself (issue 16): ``halbctl upgrade`` under load (HTTP
keep-alive and new connections, a long-lived TCP echo, new TCP connections): every request
answered, the new process serves from then on (its pid in status), the long-lived connection
goes on in the old process until it ends, the tables are handed over, the old process exits
once drained. A new process that cannot start leaves the old one serving."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.helpers import Backends, Halbd, free_ports, port_open, wait_for, write_config
from tests.integration.test_halbctl import halbctl
from tests.integration.test_reload import Load

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def config(d, bk, hport, tport) -> str:
    web = "".join(f'[[pools.backends]]\nname = "{n}"\naddress = "{bk.http[n]}"\n'
                  for n in ("b1", "b2"))
    tcp = "".join(f'[[pools.backends]]\nname = "{n}"\naddress = "{bk.tcp[n]}"\n'
                  for n in ("b1", "b2"))
    return f'''
[node]
name = "up"
state_dir = "{d}"
[[pools]]
name = "web"
{web}
[pools.sticky]
mode = "source"
ttl = "10m"
[[pools]]
name = "api"
{web}
[[pools]]
name = "tcp"
{tcp}
[[listeners]]
name = "www"
mode = "http"
bind = "127.0.0.1:{hport}"
pool = "web"
  [[listeners.routes]]
  pool = "api"
  path_prefix = "/api/"
[[listeners]]
name = "echo"
mode = "tcp"
bind = "127.0.0.1:{tport}"
pool = "tcp"
'''


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (the old process is our child) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_upgrade_under_load_loses_nothing_and_keeps_the_tables(tmp_path):
    hport, tport = free_ports(2)
    new_pid = 0
    with Backends(["b1", "b2"], tcp=True, logdir=tmp_path) as bk:
        cfg = write_config(tmp_path, config(tmp_path, bk, hport, tport))
        sock = f"{tmp_path}/up.sock"
        try:
            with Halbd(cfg) as h:
                h.wait_port(hport)
                h.wait_port(tport)
                old_pid = json.loads(halbctl("--socket", sock, "status", "--json")[1])["node"]["pid"]
                with Load(hport, tport) as load:
                    time.sleep(1.0)
                    before = {t["name"]: t["size"] for t in json.loads(
                        halbctl("--socket", sock, "status", "--json")[1])["tables"]}
                    t0 = time.monotonic()
                    code, out, err = halbctl("--socket", sock, "upgrade", "--drain", "20",
                                             "--json")
                    took = time.monotonic() - t0
                    assert code == 0, err
                    r = json.loads(out)
                    assert r["ok"] and r["pid"] != old_pid, r
                    new_pid = int(r["pid"])
                    wait_for(lambda: json.loads(halbctl("--socket", sock, "status", "--json")[1])
                             ["node"]["pid"] == new_pid, 10, what="the new process on the socket")
                    time.sleep(2.0)
                    n_after = dict(load.n)
                    time.sleep(1.0)
                    assert alive(old_pid), "the old process should still drain the echo"
                print(f"\nupgrade took {took * 1000:.0f} ms; " + load.report("halb upgrade"))
                assert load.failures() == {}
                assert all(load.n[k] > n_after[k] for k in load.n), (n_after, load.n)
                # the long-lived echo ended with the load: the old process has nothing left
                wait_for(lambda: not alive(old_pid), 15, what="the old process gone")
                st = json.loads(halbctl("--socket", sock, "status", "--json")[1])
                after = {t["name"]: t["size"] for t in st["tables"]}
                assert after["sticky"] >= before["sticky"] > 0, (before, after)
                log = h.output()
                assert '"event":"upgrade_handed_over"' in log
                assert '"event":"upgrade_took_over"' in log
                assert '"event":"upgrade_final_tables"' in log
        finally:
            if new_pid and alive(new_pid):
                os.kill(new_pid, signal.SIGTERM)
                wait_for(lambda: not alive(new_pid), 10, what="the new process stopped")


def test_a_new_process_that_cannot_start_leaves_the_old_one_serving(tmp_path):
    hport, tport = free_ports(2)
    with Backends(["b1", "b2"], tcp=True, logdir=tmp_path) as bk:
        text = config(tmp_path, bk, hport, tport)
        cfg = write_config(tmp_path, text)
        sock = f"{tmp_path}/up.sock"
        with Halbd(cfg) as h:
            h.wait_port(hport)
            old_pid = json.loads(halbctl("--socket", sock, "status", "--json")[1])["node"]["pid"]
            cfg.write_text(text + "\n[[pools]]\n")  # the new process cannot parse it
            code, out, err = halbctl("--socket", sock, "upgrade")
            assert code == 3 and "carries on" in err, (code, out, err)
            st = json.loads(halbctl("--socket", sock, "status", "--json")[1])
            assert st["node"]["pid"] == old_pid
            import http.client
            c = http.client.HTTPConnection("127.0.0.1", hport, timeout=5)
            c.request("GET", "/")
            assert c.getresponse().status == 200
            c.close()
            assert h.alive()


def test_a_new_process_that_fails_after_the_handover_gives_everything_back(tmp_path):
    """The new process gets the sockets, sync and metrics ports, then fails (a listener added
    to the file since cannot bind): the old one takes sync and metrics back and serves on."""
    import socket
    import urllib.request
    hport, tport, mport, sport, busy_port = free_ports(5)
    busy = socket.socket()
    busy.bind(("127.0.0.1", busy_port))
    busy.listen()
    with Backends(["b1", "b2"], tcp=True, logdir=tmp_path) as bk:
        text = config(tmp_path, bk, hport, tport) + f'''
[metrics]
address = "127.0.0.1:{mport}"
[sync]
listen = "127.0.0.1:{sport}"
insecure = true
  [[sync.peers]]
  name = "other"
  address = "127.0.0.1:{free_ports(1)[0]}"
'''
        cfg = write_config(tmp_path, text)
        sock = f"{tmp_path}/up.sock"
        with Halbd(cfg) as h:
            h.wait_port(hport)
            h.wait_port(sport)
            old_pid = json.loads(halbctl("--socket", sock, "status", "--json")[1])["node"]["pid"]
            cfg.write_text(text + f'''
[[listeners]]
name = "late"
mode = "tcp"
bind = "127.0.0.1:{busy_port}"
pool = "tcp"
''')
            code, out, err = halbctl("--socket", sock, "upgrade")
            assert code == 3 and "carries on" in err, (code, out, err)
            assert '"event":"upgrade_failed"' in h.output()
            st = json.loads(halbctl("--socket", sock, "status", "--json")[1])
            assert st["node"]["pid"] == old_pid and st["sync_enabled"]
            wait_for(lambda: b"halb_info" in urllib.request.urlopen(
                f"http://127.0.0.1:{mport}/metrics", timeout=2).read(), 5,
                what="the metrics endpoint back on the old process")
            wait_for(lambda: port_open("127.0.0.1", sport), 5, what="sync port back")
            assert h.alive()
    busy.close()
