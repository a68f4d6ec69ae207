"""gRPC through a takeover, with real halbd processes in namespaces (the ``hs`` LAN of
test_fast_takeover: hslb1 master, hslb2 backup, state sync between them, hscl the clients and
four real grpcio servers). The pool speaks HTTP/2 to the servers (``proto = "h2"``) with
source-IP stickiness; thirty clients, each from its own address, make a gRPC unary call
through the VIP, are pinned to a server, and after a kill -9 of the master reconnect through
hslb2 to the same server (the sticky table came over sync), their calls answered with
grpc-status 0 and the server's trailing metadata."""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest

from lab import netns as nx
from tests.helpers import Proc, wait_for
from tests.lab.test_fast_takeover import CLIENT, VIP, became, pair  # noqa: F401 - fixture

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]

SERVERS = ["g1", "g2", "g3", "g4"]
GRPC_PORT = 8090
SOURCES = [f"198.18.50.{i}" for i in range(150, 180)]  # one sticky client each

GRPC_POOL = "\n".join([
    "[[pools]]", 'name = "g"', 'proto = "h2"', "[pools.sticky]", 'mode = "source"',
    'ttl = "10m"', "[pools.health]", 'type = "grpc"', 'interval = "500ms"'] + [
    f'[[pools.backends]]\nname = "{n}"\naddress = "{CLIENT}:{9101 + i}"'
    for i, n in enumerate(SERVERS)] + [
    "[[listeners]]", 'name = "grpc"', 'mode = "http"', f'bind = "{VIP}:{GRPC_PORT}"',
    'pool = "g"', ""])

# one gRPC unary call per source address, by hand over h2c (h2 library): grpcio's client
# cannot choose its source address
ASK = r"""
import json, socket, sys
import h2.config, h2.connection, h2.events
vip, port = sys.argv[1], int(sys.argv[2])
out = {}
for src in sys.argv[3:]:
    try:
        s = socket.create_connection((vip, port), timeout=3, source_address=(src, 0))
    except OSError as e:
        out[src] = f"error {e}"
        continue
    try:
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                 header_encoding=None))
        c.initiate_connection()
        c.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"),
                           (b":authority", b"grpc.test"), (b":path", b"/test.Echo/Unary"),
                           (b"content-type", b"application/grpc"), (b"te", b"trailers")])
        msg = src.encode()
        c.send_data(1, b"\0" + len(msg).to_bytes(4, "big") + msg, end_stream=True)
        s.sendall(c.data_to_send())
        fields, body, done = {}, b"", False
        while not done:
            data = s.recv(65536)
            if not data:
                break
            for ev in c.receive_data(data):
                if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    fields.update(dict(ev.headers))
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    done = True
            s.sendall(c.data_to_send())
        ok = fields.get(b"grpc-status") == b"0" and body[5:] == fields.get(
            b"x-backend", b"?") + b":" + msg
        out[src] = fields[b"x-backend"].decode() if ok else f"bad {fields!r} {body!r}"
    except Exception as e:
        out[src] = f"error {e!r}"
    finally:
        s.close()
print(json.dumps(out))
"""


def ask(sources) -> dict:
    r = nx.run_in("hscl", [sys.executable, "-c", ASK, VIP, str(GRPC_PORT), *sources],
                  timeout=60)
    return json.loads(r.stdout)


def test_grpc_sticky_clients_keep_servers_through_failover(pair):  # noqa: F811
    for i, n in enumerate(SERVERS):
        pair.procs.append(Proc([sys.executable, "-m", "lab.grpc_backend", "--name", n,
                                "--listen", f"{CLIENT}:{9101 + i}"], netns="hscl",
                               log=pair.tmp / f"grpc-{n}.log"))
    for src in SOURCES:
        nx.add_addr("eth0", f"{src}/24", ns="hscl")
    a, b = pair(adv=0.5, extra=GRPC_POOL)
    wait_for(lambda: not any(v.startswith(("error", "bad")) for v in ask(SOURCES[:1]).values()),
             15, what="gRPC through the VIP")
    first = ask(SOURCES)
    assert set(first.values()) == set(SERVERS), first  # spread over every server
    time.sleep(0.5)  # the last sticky entries travel to hslb2
    a.signal(signal.SIGKILL)
    wait_for(lambda: became(b, "master"), 5, interval=0.01, what="hslb2 master")
    after = ask(SOURCES)
    moved = {k: (first[k], v) for k, v in after.items() if v != first[k]}
    assert not moved, moved
