"""The L4 TCP proxy through a real halbd: byte-exact relay, half-close both ways, redispatch,
round robin, source stickiness, PROXY v2 towards backends, idle timeout and max_conns."""

from __future__ import annotations

import hashlib
import random
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from halb.proxy import proxyproto
from tests.helpers import Backends, Halbd, free_ports, http_get, wait_for, write_config

pytestmark = pytest.mark.integration

BACKENDS = ["t1", "t2", "t3"]


class ThreadServer:
    """A tiny threaded TCP server for behaviours lab.backend does not have."""

    def __init__(self, handler):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.results: list = []
        self._stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c):
        c.settimeout(10)
        try:
            self.results.append(self.handler(c))
        except Exception as e:  # noqa: BLE001 - recorded for the test to see
            self.results.append(e)
        finally:
            c.close()

    def close(self):
        self._stop = True
        self.t.join(2)
        self.sock.close()


def recv_all(s: socket.socket, limit: int = 1 << 20) -> bytes:
    out = b""
    while len(out) < limit:
        d = s.recv(65536)
        if not d:
            break
        out += d
    return out


def recv_line(s: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        d = s.recv(1)
        if not d:
            break
        out += d
    return out


def who(port: int, timeout: float = 5.0) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"WHO\n")
        return recv_line(s).decode().strip()


def greeter(c: socket.socket):
    """Says hello, half-closes, then reads what the client still sends until its EOF."""
    c.sendall(b"hello\n")
    c.shutdown(socket.SHUT_WR)
    return recv_all(c)


def slow_sink(c: socket.socket):
    """Reads nothing for a while (the proxy must stop reading its client), then everything."""
    time.sleep(1.5)
    h = hashlib.sha256()
    n = 0
    while True:
        d = c.recv(1 << 18)
        if not d:
            break
        h.update(d)
        n += len(d)
    return n, h.hexdigest()


def pp_reader(c: socket.socket):
    """Parses the PROXY v2 header, answers with the addresses it names, then echoes."""
    buf = b""
    while True:
        r = proxyproto.decode_v2(buf)
        if r is not None:
            break
        d = c.recv(4096)
        if not d:
            return "eof before header"
        buf += d
    hdr, n = r
    c.sendall(f"{hdr.src[0]}:{hdr.src[1]} {hdr.dst[0]}:{hdr.dst[1]}\n".encode())
    rest = buf[n:]
    if rest:
        c.sendall(rest)
    while True:
        d = c.recv(4096)
        if not d:
            break
        c.sendall(d)
    return hdr


@pytest.fixture(scope="module", params=["auto", "splice", "copy"])
def lb(request):
    """One halbd with a listener per behaviour; run once per relay method (config `relay`)."""
    state = Path(tempfile.mkdtemp(prefix="l4t"))
    bk = Backends(BACKENDS, http=False, tcp=True, logdir=state)
    greet = ThreadServer(greeter)
    ppsrv = ThreadServer(pp_reader)
    sink = ThreadServer(slow_sink)
    names = ("rr", "redis", "noretry", "sticky", "greet", "pp", "idle", "maxc", "big", "slow",
             "sink")
    # distinct: a "dead" port handed out again as a listener's would not be dead
    dead, mport, *lports = free_ports(len(names) + 2)
    # a "black hole": a listener whose accept queue is full, so SYNs to it go unanswered
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fill = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(hole.getsockname())
        fill.append(f)
    ports = dict(zip(names, lports))

    def backends(names):
        return "".join(f'[[pools.backends]]\nname = "{n}"\naddress = "{a}"\n' for n, a in names)

    tb = [(n, bk.tcp[n]) for n in BACKENDS]
    cfg = f'''
[node]
name = "l4t"
state_dir = "{state}"
[metrics]
address = "127.0.0.1:{mport}"

[[pools]]
name = "rr"
{backends(tb)}
[[pools]]
name = "redis"
retries = 2
{backends([("dead", f"127.0.0.1:{dead}")] + tb[:2])}
[[pools]]
name = "noretry"
retries = 0
{backends([("dead", f"127.0.0.1:{dead}"), tb[0]])}
[[pools]]
name = "sticky"
[pools.sticky]
mode = "source"
{backends(tb)}
[[pools]]
name = "greet"
{backends([("g", f"127.0.0.1:{greet.port}")])}
[[pools]]
name = "pp"
{backends([("p", f"127.0.0.1:{ppsrv.port}")])}
[[pools]]
name = "single"
{backends(tb[:1])}
[[pools]]
name = "sink"
{backends([("s", f"127.0.0.1:{sink.port}")])}
[[pools]]
name = "slow"
retries = 1
{backends([("hole", "127.0.0.1:%d" % hole.getsockname()[1]), tb[0]])}
''' + "".join(f'''
[[listeners]]
name = "{name}"
mode = "tcp"
bind = "127.0.0.1:{ports[name]}"
pool = "{pool}"
relay = "{request.param}"
{extra}
''' for name, pool, extra in [
        ("rr", "rr", ""), ("redis", "redis", ""), ("noretry", "noretry", ""),
        ("sticky", "sticky", ""), ("greet", "greet", ""), ("pp", "pp", "proxy_protocol = true"),
        ("idle", "single", '[listeners.timeouts]\ntunnel = "600ms"'),
        ("maxc", "single", "[listeners.limits]\nmax_conns = 2"), ("big", "single", ""),
        ("slow", "slow", '[listeners.timeouts]\nconnect = "300ms"'), ("sink", "sink", "")])
    path = write_config(state, cfg)
    node = Halbd(path)
    try:
        for p in ports.values():
            node.wait_port(p)
        node.wait_log(f'"relay":"{request.param}"')
        yield {"node": node, "ports": ports, "bk": bk, "greet": greet, "pp": ppsrv, "sink": sink,
               "metrics": f"http://127.0.0.1:{mport}/metrics"}
    finally:
        node.close()
        for f in fill + [hole]:
            f.close()
        greet.close()
        ppsrv.close()
        sink.close()
        bk.close()
        shutil.rmtree(state, ignore_errors=True)


def metric(lb, name: str, **labels) -> float:
    _, _, body = http_get(lb["metrics"])
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in body.decode().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0 if want else float("nan")


def test_relay_100mib_byte_exact_both_directions(lb):
    port = lb["ports"]["big"]
    rnd = random.Random(3)
    block = rnd.randbytes(1 << 20)
    sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()
    total = 100 << 20
    got = [0]
    s = socket.create_connection(("127.0.0.1", port), timeout=30)

    def reader():
        while True:
            d = s.recv(1 << 18)
            if not d:
                break
            got_hash.update(d)
            got[0] += len(d)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(total >> 20):
            k = (i * 40_961) % len(block)
            chunk = block[k:] + block[:k]  # every MiB differs, so order errors show
            sent_hash.update(chunk)
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        t.join(60)
    finally:
        s.close()
    assert not t.is_alive()
    assert got[0] == total
    assert got_hash.hexdigest() == sent_hash.hexdigest()


def test_backpressure_stops_reading_a_client_the_backend_does_not_read(lb):
    sink = lb["sink"]
    s = socket.create_connection(("127.0.0.1", lb["ports"]["sink"]), timeout=5)
    s.setblocking(False)
    chunk = bytes(range(256)) * 1024  # 256 KiB
    h = hashlib.sha256()
    sent = 0
    stalled_since = None
    try:
        deadline = time.monotonic() + 1.2  # well before the sink starts reading (1.5 s)
        while time.monotonic() < deadline:
            try:
                k = s.send(chunk)
                h.update(chunk[:k])
                sent += k
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                time.sleep(0.01)
        # the proxy holds at most its pipe (256 KiB) or one read: what the client got rid of
        # fits in the kernel's socket buffers on the way (tcp_wmem/tcp_rmem maxima: ~20 MiB)
        assert stalled_since is not None, "the client could keep sending: no backpressure"
        assert sent < 40 << 20
        s.setblocking(True)
        s.settimeout(20)
        for _ in range(8):  # once the sink reads, the rest flows again
            s.sendall(chunk)
            h.update(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
        wait_for(lambda: any(r[0] == sent for r in sink.results if isinstance(r, tuple)), 20,
                 what="sink result")
    finally:
        s.close()
    # (the fixture's port probes also reached the sink, as empty connections: find ours)
    assert (sent, h.hexdigest()) in sink.results


def test_client_half_close_still_gets_the_answer(lb):
    with socket.create_connection(("127.0.0.1", lb["ports"]["rr"]), timeout=5) as s:
        s.sendall(b"WHO\nping-after-who")
        s.shutdown(socket.SHUT_WR)  # EOF towards the backend; its answer must still arrive
        data = recv_all(s)
    name, _, rest = data.partition(b"\n")
    assert name.decode() in BACKENDS
    assert rest == b"ping-after-who"


def test_backend_half_close_client_can_still_send(lb):
    greet = lb["greet"]
    with socket.create_connection(("127.0.0.1", lb["ports"]["greet"]), timeout=5) as s:
        assert recv_line(s) == b"hello\n"
        assert s.recv(10) == b""  # the backend's EOF reached us ...
        s.sendall(b"still talking")  # ... while our direction stays open
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""
    # (the fixture's port probe was an empty connection to the greeter too: find ours)
    wait_for(lambda: b"still talking" in greet.results, 5, what="greeter result")


def test_round_robin_spreads_evenly(lb):
    names = [who(lb["ports"]["rr"]) for _ in range(30)]
    assert {n: names.count(n) for n in BACKENDS} == {"t1": 10, "t2": 10, "t3": 10}
    assert len(set(names[:3])) == 3 and names == names[:3] * 10  # strict turns, not runs


def test_redispatch_when_a_backend_is_dead(lb):
    before = metric(lb, "halb_l4_events_total", listener="redis", event="redispatched")
    names = [who(lb["ports"]["redis"]) for _ in range(12)]
    assert set(names) == {"t1", "t2"}  # every connection served despite the dead backend
    after = metric(lb, "halb_l4_events_total", listener="redis", event="redispatched")
    assert after - before >= 3  # round robin reached the dead one at least every third time


def test_connect_timeout_then_redispatch(lb):
    before = metric(lb, "halb_l4_events_total", listener="slow", event="connect_failed")
    t0 = time.monotonic()
    # round robin turns back to the hole after each t1, so both connections normally meet it
    names = [who(lb["ports"]["slow"]) for _ in range(2)]
    took = time.monotonic() - t0
    assert names == ["t1", "t1"]
    failed = metric(lb, "halb_l4_events_total", listener="slow", event="connect_failed") - before
    assert 1 <= failed <= 2
    # at least one attempt waited out the 300ms connect timeout (the queue of a listener that
    # never accepts can, rarely, refuse a SYN at once instead of dropping it)
    assert 0.25 <= took < 5


def test_no_redispatch_when_retries_is_zero(lb):
    results = []
    for _ in range(6):
        with socket.create_connection(("127.0.0.1", lb["ports"]["noretry"]), timeout=5) as s:
            s.sendall(b"WHO\n")
            try:
                results.append(recv_line(s))
            except ConnectionResetError:  # closed with our unread request: RST
                results.append(b"")
    assert b"t1\n" in results
    assert b"" in results  # connections that hit the dead backend are closed, not retried


def test_source_stickiness_keeps_a_client_ip_on_one_backend(lb):
    names = {who(lb["ports"]["sticky"]) for _ in range(9)}
    assert len(names) == 1


def test_proxy_protocol_v2_names_the_client(lb):
    port = lb["ports"]["pp"]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        me = s.getsockname()
        s.sendall(b"payload")
        line = recv_line(s).decode().split()
        assert line == [f"{me[0]}:{me[1]}", f"127.0.0.1:{port}"]
        assert s.recv(7) == b"payload"


def test_idle_timeout_closes_quiet_connections(lb):
    with socket.create_connection(("127.0.0.1", lb["ports"]["idle"]), timeout=5) as s:
        s.sendall(b"WHO\n")
        assert recv_line(s) == b"t1\n"
        t0 = time.monotonic()
        s.settimeout(10)
        assert s.recv(10) == b""  # the proxy closed it
        waited = time.monotonic() - t0
    assert 0.4 <= waited < 5  # tunnel = 600ms, swept every 150ms; generous upper slack


def test_busy_connection_is_not_idle(lb):
    with socket.create_connection(("127.0.0.1", lb["ports"]["idle"]), timeout=5) as s:
        s.sendall(b"WHO\n")
        assert recv_line(s) == b"t1\n"
        for i in range(12):  # 12 x 150ms = 1.8s, three tunnel timeouts (600ms)
            time.sleep(0.15)
            s.sendall(b"x%d" % i)
            assert s.recv(10) == b"x%d" % i


def test_max_conns_holds_new_connections_until_a_slot_frees(lb):
    port = lb["ports"]["maxc"]
    a = socket.create_connection(("127.0.0.1", port), timeout=5)
    b = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        for s in (a, b):
            s.sendall(b"WHO\n")
            assert recv_line(s) == b"t1\n"
        c = socket.create_connection(("127.0.0.1", port), timeout=5)  # kernel backlog accepts
        c.sendall(b"WHO\n")
        c.settimeout(0.5)
        with pytest.raises(socket.timeout):
            c.recv(10)  # not served while two are open
        a.close()
        c.settimeout(5)
        assert recv_line(c) == b"t1\n"
        c.close()
    finally:
        a.close()
        b.close()
    assert metric(lb, "halb_l4_events_total", listener="maxc", event="max_conns") >= 1


def test_node_still_serves_and_metrics_count(lb):
    assert who(lb["ports"]["rr"]) in BACKENDS
    assert lb["node"].alive()
    assert metric(lb, "halb_l4_bytes_total", listener="big", direction="in") >= 100 << 20
    assert metric(lb, "halb_listener_connections_total", listener="rr") >= 31
