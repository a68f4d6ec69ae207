"""[bgp] on a real halbd whose speaker cannot be reached (no vtysh at the configured path):
the node serves, reports the speaker's failure (status, metric, log), announces nothing, and
still leaves and joins on request; drain-node on a node without [bgp] is refused. The path
with a real FRR is tests/lab/test_ecmp.py."""

from __future__ import annotations

import contextlib
import io
import json
import urllib.request

import pytest

from halb.cli.halbctl import main as halbctl_main
from tests.helpers import Backends, Halbd, free_port, http_get, wait_for, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def halbctl(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = halbctl_main(list(argv))
    return code, out.getvalue(), err.getvalue()


def config(tmp, be, port, mport, bgp: bool) -> str:
    return f"""
[node]
name = "n1"
state_dir = "{tmp}"
save_tables = false
[control]
socket = "{tmp}/n1.sock"
[metrics]
address = "127.0.0.1:{mport}"
[[pools]]
name = "web"
algorithm = "maglev"
backends = [{{name = "a", address = "{be}"}}]
[[listeners]]
name = "web"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "web"
""" + ("""
[bgp]
asn = 65001
vtysh = "/nonexistent/vtysh"
interval = "100ms"
withdraw_wait = "0.2s"
""" if bgp else "")


def test_unreachable_speaker_is_reported_and_nothing_breaks(tmp_path):
    with Backends(["a"], logdir=tmp_path) as bes:
        port, mport = free_port(), free_port()
        cfg = write_config(tmp_path, config(tmp_path, bes.http["a"], port, mport, True))
        with Halbd(cfg) as d:
            d.wait_port(port)
            sock = f"{tmp_path}/n1.sock"
            assert http_get(f"http://127.0.0.1:{port}/")[0] == 200  # serves regardless

            def st():
                code, out, _ = halbctl("--socket", sock, "status", "--json")
                return json.loads(out)["bgp"] if code == 0 else None
            b = wait_for(lambda: (x := st()) and x.get("speaker_error") and x, 10,
                         what="the speaker's failure in status")
            assert "cannot run /nonexistent/vtysh" in b["speaker_error"]
            assert b["vips"][0]["vip"] == "127.0.0.1" and not b["vips"][0].get("announced")
            text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
            assert "halb_bgp_speaker_up 0.0" in text
            assert 'halb_bgp_announced{vip="127.0.0.1"} 0.0' in text
            fails = [l for l in text.splitlines() if l.startswith("halb_bgp_command_failures_total ")]
            assert fails and float(fails[0].split()[1]) >= 1
            code, out, _ = halbctl("--socket", sock, "status")
            assert code == 0 and "BGP (frr, AS 65001" in out and "cannot run" in out
            code, out, _ = halbctl("--socket", sock, "drain-node", "--wait", "0.1", "--json")
            assert code == 0 and json.loads(out)["waited_seconds"] >= 0.1
            assert st()["leaving"] is True
            assert "node leaving" in st()["vips"][0]["reason"]
            code, out, _ = halbctl("--socket", sock, "drain-node", "--wait", "-1")
            assert code == 1  # out of range
            code, out, _ = halbctl("--socket", sock, "undrain-node")
            assert code == 0 and "joined" in out
            assert not st().get("leaving")
            # retried every 100 ms, logged once
            fl = [l for l in d.output().splitlines() if "bgp_command_failed" in l]
            assert len(fl) == 1, "\n".join(fl)


def test_drain_node_without_bgp_is_refused(tmp_path):
    with Backends(["a"], logdir=tmp_path) as bes:
        port, mport = free_port(), free_port()
        cfg = write_config(tmp_path, config(tmp_path, bes.http["a"], port, mport, False))
        with Halbd(cfg) as d:
            d.wait_port(port)
            code, out, err = halbctl("--socket", f"{tmp_path}/n1.sock", "drain-node")
            assert code == 1 and "no [bgp]" in err
            code, out, _ = halbctl("--socket", f"{tmp_path}/n1.sock", "status", "--json")
            assert "bgp" not in json.loads(out)
