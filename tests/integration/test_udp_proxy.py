"""The L4 UDP proxy through a real halbd: per-client flows stay on one backend and answer from
the listener's address, idle flows expire, max_flows bounds them, and a flow moves when its
backend dies."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import Backends, Halbd, free_port, http_get, write_config
from tests.integration.test_udp_tables import udp_ready

pytestmark = pytest.mark.integration

NAMES = ["u1", "u2", "u3"]


@pytest.fixture(scope="module")
def lb():
    state = Path(tempfile.mkdtemp(prefix="l4u"))
    bk = Backends(NAMES, http=False, udp=True, logdir=state)
    kb = Backends(["k1", "k2"], http=False, udp=True, logdir=state)
    for a in list(bk.udp.values()) + list(kb.udp.values()):
        udp_ready(a)
    ports = {n: free_port(socket.SOCK_DGRAM) for n in ("spread", "expire", "maxf", "kill")}
    mport = free_port()

    def pool(name, b, names):
        return f'[[pools]]\nname = "{name}"\n' + "".join(
            f'[[pools.backends]]\nname = "{n}"\naddress = "{b.udp[n]}"\n' for n in names)

    def listener(name, pool, extra=""):
        return (f'[[listeners]]\nname = "{name}"\nmode = "udp"\nbind = "127.0.0.1:{ports[name]}"\n'
                f'pool = "{pool}"\n{extra}\n')

    cfg = f'''
[node]
name = "l4u"
state_dir = "{state}"
[metrics]
address = "127.0.0.1:{mport}"
{pool("us", bk, NAMES)}
{pool("ue", bk, NAMES)}
{pool("um", bk, NAMES)}
{pool("k", kb, ["k1", "k2"])}
{listener("spread", "us", 'udp_flow_timeout = "30s"')}
{listener("expire", "ue", 'udp_flow_timeout = "1s"')}
{listener("maxf", "um", 'udp_flow_timeout = "2s"' + chr(10) + "[listeners.limits]" + chr(10) + "max_flows = 2")}
{listener("kill", "k", 'udp_flow_timeout = "30s"')}
'''
    path = write_config(state, cfg)
    node = Halbd(path)
    try:
        node.wait_log('"listener":"kill"')
        node.wait_port(mport)
        yield {"node": node, "ports": ports, "bk": bk, "kb": kb,
               "metrics": f"http://127.0.0.1:{mport}/metrics"}
    finally:
        node.close()
        bk.close()
        kb.close()
        shutil.rmtree(state, ignore_errors=True)


def metric(lb, name: str, **labels) -> float:
    _, _, body = http_get(lb["metrics"])
    for line in body.decode().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def client() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def ask(s: socket.socket, port: int, msg: bytes, timeout: float = 2.0):
    """Sends ``msg``; returns (backend name, payload, reply source) or None on timeout."""
    s.settimeout(timeout)
    s.sendto(msg, ("127.0.0.1", port))
    try:
        data, src = s.recvfrom(70000)
    except socket.timeout:
        return None
    name, _, payload = data.partition(b"|")
    return name.decode(), payload, src


def test_each_client_stays_on_one_backend(lb):
    port = lb["ports"]["spread"]
    clients = [client() for _ in range(6)]
    try:
        seen = {}
        for rnd in range(5):
            for i, c in enumerate(clients):
                r = ask(c, port, b"m%d-%d" % (i, rnd))
                assert r is not None
                name, payload, src = r
                assert payload == b"m%d-%d" % (i, rnd)
                assert src == ("127.0.0.1", port)  # answers come from the listener's address
                assert seen.setdefault(i, name) == name
        assert sorted(seen.values()) == sorted(NAMES * 2)  # round robin over new flows
        assert metric(lb, "halb_listener_active_connections", listener="spread") == 6
    finally:
        for c in clients:
            c.close()


def test_large_datagram_relays_intact(lb):
    c = client()
    try:
        payload = bytes(range(256)) * 250  # 64000 bytes
        r = ask(c, lb["ports"]["spread"], payload)
        assert r is not None and r[1] == payload
    finally:
        c.close()


def test_idle_flow_expires(lb):
    port = lb["ports"]["expire"]
    c = client()
    try:
        first = ask(c, port, b"a")[0]
        time.sleep(0.1)
        assert ask(c, port, b"b")[0] == first  # within the timeout: same flow
        time.sleep(2.0)  # timeout 1s, swept every 250ms
        assert metric(lb, "halb_listener_active_connections", listener="expire") == 0
        assert metric(lb, "halb_l4_events_total", listener="expire", event="flow_expired") >= 1
        # a new flow: round robin moves on, so the client lands elsewhere
        assert ask(c, port, b"c")[0] != first
    finally:
        c.close()


def test_max_flows_bounds_new_clients(lb):
    port = lb["ports"]["maxf"]
    a, b, c = client(), client(), client()
    try:
        assert ask(a, port, b"a") is not None
        assert ask(b, port, b"b") is not None
        assert ask(c, port, b"c", timeout=0.5) is None  # a third flow is refused
        assert metric(lb, "halb_l4_events_total", listener="maxf", event="flows_dropped") >= 1
        assert ask(a, port, b"a2")[1] == b"a2"  # existing flows unaffected
        time.sleep(3.0)  # let a and b expire (2s, swept every 500ms)
        assert ask(c, port, b"c2")[1] == b"c2"
    finally:
        for s in (a, b, c):
            s.close()


def test_flow_moves_when_its_backend_dies(lb):
    port = lb["ports"]["kill"]
    c = client()
    try:
        first = ask(c, port, b"x")[0]
        assert ask(c, port, b"y")[0] == first
        lb["kb"].kill(first)
        answers = []
        for i in range(6):  # the first datagram after the kill draws an ICMP unreachable
            r = ask(c, port, b"z%d" % i, timeout=0.5)
            if r is not None:
                answers.append(r[0])
        assert answers and set(answers) == {"k1", "k2"} - {first}
        assert len(answers) >= 4  # only the datagram that met the dead backend is lost
        assert metric(lb, "halb_l4_events_total", listener="kill", event="flow_moved") >= 1
        assert lb["node"].alive()
    finally:
        c.close()
