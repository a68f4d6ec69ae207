"""A single node restarted keeps its source-sticky clients on their backends (issue 16: tables
that outlive a restart). Thirty clients, each from its own loopback address, are balanced
round robin over three backends and stuck by source IP; halbd is stopped and started again
and the clients come back in the opposite order: with the tables saved every one lands on its
backend again; with save_tables = false (the control) round robin moves some of them."""

from __future__ import annotations

import http.client
import signal

import pytest

from tests.helpers import Backends, Halbd, free_port, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CLIENTS = [f"127.0.0.{i}" for i in range(2, 32)]


def ask(port: int, source: str) -> str:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        c.request("GET", "/")
        r = c.getresponse()
        r.read()
        assert r.status == 200
        return r.getheader("X-Backend")
    finally:
        c.close()


def run(tmp_path, save: bool) -> tuple[dict, dict, str]:
    port = free_port()
    with Backends(["b1", "b2", "b3"], logdir=tmp_path) as bk:
        backends = "".join(f'[[pools.backends]]\nname = "{n}"\naddress = "{bk.http[n]}"\n'
                           for n in ("b1", "b2", "b3"))
        cfg = write_config(tmp_path, f'''
[node]
name = "solo"
state_dir = "{tmp_path}"
save_tables = {str(save).lower()}
[[pools]]
name = "web"
algorithm = "roundrobin"
{backends}
[pools.sticky]
mode = "source"
ttl = "10m"
[[listeners]]
name = "www"
mode = "http"
bind = "127.0.0.1:{port}"
pool = "web"
''')
        with Halbd(cfg) as h:
            h.wait_port(port)
            before = {c: ask(port, c) for c in CLIENTS}
            h.signal(signal.SIGTERM)
            assert h.stop(10) == 0
            log1 = h.output()
        with Halbd(cfg, log=tmp_path / "second.log") as h:
            h.wait_port(port)
            after = {c: ask(port, c) for c in reversed(CLIENTS)}
            log2 = h.output()
    return before, after, log1 + log2


def test_a_restarted_node_keeps_every_source_sticky_client(tmp_path):
    before, after, log = run(tmp_path, True)
    assert len(set(before.values())) == 3  # round robin spread them
    moved = [c for c in CLIENTS if before[c] != after[c]]
    print(f"\nsource-sticky clients on their backend after a restart: "
          f"{len(CLIENTS) - len(moved)} of {len(CLIENTS)}")
    assert moved == []
    assert '"event":"tables_saved"' in log and '"event":"tables_loaded"' in log
    assert (tmp_path / "solo.tables.json").exists()


def test_without_saved_tables_round_robin_moves_clients(tmp_path):
    before, after, _ = run(tmp_path, False)
    moved = [c for c in CLIENTS if before[c] != after[c]]
    assert moved, "the control case should move clients; the test above would prove nothing"
    assert not (tmp_path / "solo.tables.json").exists()
