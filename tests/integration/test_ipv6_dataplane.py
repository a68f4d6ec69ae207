"""IPv6 end to end (issue 20, item 2): the data plane, sync and control over IPv6, through real
halbd processes on the loopback (``::1`` and ``127.0.0.1``).

One node (module fixture) with lab.backend processes on ``[::1]`` (a1, a2) and on
``127.0.0.1`` (f1):

- TCP (copy and splice relays), UDP, HTTP and HTTPS listeners on ``[::1]`` in front of IPv6
  backends; mixed listeners (an IPv4 listener in front of IPv6 backends and the other way
  round);
- a listener on ``[::]`` and one on ``0.0.0.0`` with the same port: ``[::]`` is IPv6 only
  (IPV6_V6ONLY), so the two coexist and each family reaches its own pool; a UDP ``[::]``
  listener answers from the address the client sent to (IPV6_PKTINFO);
- X-Forwarded-For with the bare IPv6 address, RFC 7239 ``Forwarded: for="[::1]"``, PROXY v2
  with AF_INET6 towards a backend, source stickiness keyed by the IPv6 client, the access log;
- tcp and http health checks and an agent check against IPv6 backends;
- the control API on ``[::1]`` (mutual TLS) reached by ``halbctl --address [::1]:PORT``, and
  the metrics endpoint on ``[::1]``.

Two more nodes: two replicating their tables over ``[::1]`` with mutual TLS, and one sending
its access log to syslog over UDP/IPv6.

Not here: halb sends PROXY v2 only (no v1 ``TCP6``) and accepts no PROXY header on its
listeners, so neither has an IPv6 case to test.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl

import pytest

from halb.proxy import proxyproto
from tests.helpers import (Backends, Halbd, free_port, free_ports, hostport, http_get, wait_for,
                           write_config)
from tests.integration.test_agent_check import Agent
from tests.integration.test_halbctl import halbctl, status_json
from tests.integration.test_tcp_proxy import recv_line
from tests.integration.test_udp_tables import udp_ready

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

V6 = "::1"
V4 = "127.0.0.1"


class N:
    pass


def _backends(names, addrs) -> str:
    return "".join(f'[[pools.backends]]\nname = "{n}"\naddress = "{addrs[n]}"\n' for n in names)


@pytest.fixture(scope="module")
def v6(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v6")
    pki = tmp / "pki"
    code, _, err = halbctl("pki", "init", "--out", str(pki), "lb1", "admin", "--ip", f"lb1={V6}")
    assert code == 0, err
    n = N()
    n.tmp, n.pki = tmp, pki
    n.sock = str(tmp / "lb1.sock")
    n.alog = tmp / "access.log"
    (n.tcp6, n.splice6, n.tcp64, n.udp6, n.udp64, n.http6, n.http64, n.https6, n.pp6, n.ctl,
     n.metrics, n.dead, n.aport) = free_ports(13, host=V6)
    n.tcp46, n.udp46, n.http46 = free_ports(3, host=V4)
    # a port free on both families, for the [::] and 0.0.0.0 listeners
    n.wild = next(p for p in free_ports(20, host=V6) if p == free_port_check(p))
    n.uwild = next(p for p in free_ports(20, host=V6) if p == free_port_check(p, socket.SOCK_DGRAM))
    # the PROXY v2 backend: a socket of this test (accepted in the test)
    n.pp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    n.pp.bind((V6, 0))
    n.pp.listen(8)
    n.pp_port = n.pp.getsockname()[1]
    agent = Agent(V6, n.aport, "50%")
    with Backends(["a1", "a2"], http=True, tcp=True, udp=True, host=V6, logdir=tmp) as b6, \
            Backends(["f1"], http=True, tcp=True, udp=True, host=V4, logdir=tmp) as b4:
        n.b6, n.b4 = b6, b4
        for a in list(b6.udp.values()) + list(b4.udp.values()):
            udp_ready(a)
        A = ["a1", "a2"]
        cfg = write_config(tmp, f'''
[node]
name = "lb1"
state_dir = "{tmp}"

[metrics]
address = "[::1]:{n.metrics}"

[control]
socket = "{n.sock}"
address = "[::1]:{n.ctl}"
[control.tls]
cert = "{pki / 'lb1.pem'}"
key = "{pki / 'lb1.key'}"
ca = "{pki / 'ca.pem'}"

[access_log]
destination = "file:{n.alog}"
format = "json"

[[pools]]
name = "t6"
{_backends(A, b6.tcp)}
[pools.sticky]
mode = "source"
ttl = "10m"

[[pools]]
name = "t4"
{_backends(["f1"], b4.tcp)}

[[pools]]
name = "u6"
{_backends(A, b6.udp)}
[pools.sticky]
mode = "source"
ttl = "10m"

[[pools]]
name = "u4"
{_backends(["f1"], b4.udp)}

[[pools]]
name = "h6"
{_backends(A, b6.http)}
[pools.health]
type = "http"
path = "/healthz"
interval = "200ms"
timeout = "500ms"
rise = 1
fall = 1

[[pools]]
name = "h4"
{_backends(["f1"], b4.http)}

[[pools]]
name = "pp"
[[pools.backends]]
name = "pp1"
address = "[::1]:{n.pp_port}"

[[pools]]
name = "chk"
[[pools.backends]]
name = "live"
weight = 100
address = "{b6.tcp['a1']}"
[[pools.backends]]
name = "dead"
weight = 100
address = "[::1]:{n.dead}"
[pools.health]
type = "tcp"
interval = "200ms"
timeout = "500ms"
rise = 1
fall = 1
[pools.agent]
port = {n.aport}
interval = "200ms"
timeout = "500ms"

[[listeners]]
name = "tcp6"
mode = "tcp"
bind = "[::1]:{n.tcp6}"
pool = "t6"
relay = "copy"

[[listeners]]
name = "splice6"
mode = "tcp"
bind = "[::1]:{n.splice6}"
pool = "t6"
relay = "splice"

[[listeners]]
name = "tcp46"
mode = "tcp"
bind = "127.0.0.1:{n.tcp46}"
pool = "t6"

[[listeners]]
name = "tcp64"
mode = "tcp"
bind = "[::1]:{n.tcp64}"
pool = "t4"

[[listeners]]
name = "wild6"
mode = "tcp"
bind = "[::]:{n.wild}"
pool = "t6"

[[listeners]]
name = "wild4"
mode = "tcp"
bind = "0.0.0.0:{n.wild}"
pool = "t4"

[[listeners]]
name = "pp6"
mode = "tcp"
bind = "[::1]:{n.pp6}"
pool = "pp"
proxy_protocol = true

[[listeners]]
name = "udp6"
mode = "udp"
bind = "[::1]:{n.udp6}"
pool = "u6"

[[listeners]]
name = "udp46"
mode = "udp"
bind = "127.0.0.1:{n.udp46}"
pool = "u6"

[[listeners]]
name = "udp64"
mode = "udp"
bind = "[::1]:{n.udp64}"
pool = "u4"

[[listeners]]
name = "uwild6"
mode = "udp"
bind = "[::]:{n.uwild}"
pool = "u6"

[[listeners]]
name = "http6"
mode = "http"
bind = "[::1]:{n.http6}"
pool = "h6"

[[listeners]]
name = "http46"
mode = "http"
bind = "127.0.0.1:{n.http46}"
pool = "h6"

[[listeners]]
name = "http64"
mode = "http"
bind = "[::1]:{n.http64}"
pool = "h4"

[[listeners]]
name = "https6"
mode = "http"
bind = "[::1]:{n.https6}"
pool = "h6"
[[listeners.tls.certificates]]
cert = "{pki / 'lb1.pem'}"
key = "{pki / 'lb1.key'}"
''')
        try:
            with Halbd(cfg) as h:
                n.h = h
                for p in (n.tcp6, n.splice6, n.tcp64, n.pp6, n.http6, n.http64, n.https6,
                          n.wild):
                    h.wait_port(p, host=V6)
                for p in (n.tcp46, n.http46, n.wild):
                    h.wait_port(p, host=V4)
                wait_for(lambda: os.path.exists(n.sock), 10, what="control socket")
                # the connections of wait_port() done (each may make a source-sticky entry;
                # the PROXY backend's wait in its backlog, accepted by the test)
                wait_for(lambda: all(b["active"] == 0 for (pool, _), b in backends_json(n).items()
                                     if pool != "pp"), 10,
                         interval=0.05, what="wait_port's connections closed")
                yield n
        finally:
            agent.close()
            n.pp.close()


def free_port_check(port: int, kind: int = socket.SOCK_STREAM) -> int:
    """``port`` if it is free on 127.0.0.1 too (TCP or UDP), else 0."""
    try:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((V4, port))
    except OSError:
        return 0
    return port


def who(host: str, port: int) -> tuple[str, bytes]:
    """(backend name, echo) through the TCP listener at ``host:port``."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"WHO\nping6\n")
        name = recv_line(s).decode().strip()
        return name, recv_line(s)


def ask_udp(host: str, port: int, msg: bytes, src: socket.socket | None = None):
    """(backend name, payload, reply source) from the UDP listener at ``host:port``."""
    s = src or socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(3)
        for _ in range(3):  # a datagram may be lost while the listener starts
            s.sendto(msg, (host, port))
            try:
                data, addr = s.recvfrom(70000)
            except socket.timeout:
                continue
            name, _, payload = data.partition(b"|")
            return name.decode(), payload, addr
        raise AssertionError(f"no UDP answer from {hostport(host, port)}")
    finally:
        if src is None:
            s.close()


def echo_json(host: str, port: int, path: str = "/echo", headers: dict | None = None,
              tls: ssl.SSLContext | None = None) -> tuple[str, dict]:
    """(X-Backend, {lower-case header: value} as the backend received them) for one request."""
    if tls is not None:
        c = http.client.HTTPSConnection(host, port, timeout=5, context=tls)
    else:
        c = http.client.HTTPConnection(host, port, timeout=5)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        body = r.read()
        assert r.status == 200, (r.status, body)
        j = json.loads(body)
        return r.getheader("X-Backend"), {k.lower(): v for k, v in j["headers"]}
    finally:
        c.close()


def backends_json(n) -> dict:
    code, out, err = halbctl("--socket", n.sock, "backends", "--json")
    assert code == 0, err
    return {(b["pool"], b["name"]): b for b in json.loads(out)}


# ---------------------------------------------------------------------------------------------
# TCP


def test_tcp_over_ipv6_both_relays_and_mixed_families(v6):
    for port in (v6.tcp6, v6.splice6):  # both listeners share the pool and its entries
        seen = {who(V6, port) for _ in range(4)}
        assert len(seen) == 1, (port, seen)  # source-sticky: one client address, one backend
        name, echo = seen.pop()
        assert name in {"a1", "a2"} and echo == b"ping6\n"
    # a byte-exact relay of a larger stream over IPv6 both ways
    blob = os.urandom(1 << 20)
    with socket.create_connection((V6, v6.splice6), timeout=10) as s:
        s.sendall(blob)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < len(blob):
            d = s.recv(1 << 16)
            if not d:
                break
            got += d
    assert got == blob
    # IPv4 client -> IPv6 backend, IPv6 client -> IPv4 backend
    assert who(V4, v6.tcp46)[0] in {"a1", "a2"}
    assert who(V6, v6.tcp64) == ("f1", b"ping6\n")


def test_wildcard_v6_listener_is_v6_only_beside_a_v4_one_on_the_same_port(v6):
    """``[::]:P`` serves IPv6 only (IPV6_V6ONLY): ``0.0.0.0:P`` can be bound beside it, and
    each family reaches its own listener's pool."""
    assert who(V6, v6.wild)[0] in {"a1", "a2"}
    assert who(V4, v6.wild)[0] == "f1"


def read_proxy_v2(b: socket.socket) -> tuple[proxyproto.ProxyHeader, bytes]:
    """The PROXY v2 header at the start of what ``b`` receives, and the bytes after it."""
    b.settimeout(5)
    buf = b""
    while (got := proxyproto.decode_v2(buf)) is None:
        d = b.recv(4096)
        assert d, f"backend connection closed after {buf!r}"
        buf += d
    hdr, used = got
    return hdr, buf[used:]


def test_proxy_v2_towards_backend_carries_af_inet6(v6):
    with socket.create_connection((V6, v6.pp6), timeout=5) as c:
        c.sendall(b"hello")
        me = c.getsockname()[:2]  # the client: ("::1", its port)
        v6.pp.settimeout(5)
        for _ in range(5):  # connections of wait_port() may wait in the backlog before ours
            b, _ = v6.pp.accept()
            with b:
                hdr, rest = read_proxy_v2(b)
                if hdr.src != me:
                    continue
                assert hdr.command == proxyproto.CMD_PROXY
                assert hdr.family == proxyproto.AF_INET6 and hdr.transport == proxyproto.T_STREAM
                assert hdr.dst == (V6, v6.pp6)  # the listener's address
                while len(rest) < 5:
                    rest += b.recv(64)
                assert rest == b"hello"
                break
        else:
            raise AssertionError(f"no backend connection with the PROXY source {me}")


# ---------------------------------------------------------------------------------------------
# UDP


def test_udp_over_ipv6_sticky_and_mixed_families(v6):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s2 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        name, payload, src = ask_udp(V6, v6.udp6, b"x1", s)
        assert name in {"a1", "a2"} and payload == b"x1" and src[:2] == (V6, v6.udp6)
        # another client port of the same IPv6 address: the source-sticky entry holds
        assert ask_udp(V6, v6.udp6, b"x2", s2)[0] == name
        big = os.urandom(60000)
        assert ask_udp(V6, v6.udp6, big, s)[1] == big
    finally:
        s.close()
        s2.close()
    assert ask_udp(V4, v6.udp46, b"y")[0] in {"a1", "a2"}
    assert ask_udp(V6, v6.udp64, b"z")[:2] == ("f1", b"z")


def test_udp_wildcard_v6_listener_replies_from_the_address_asked(v6):
    name, payload, src = ask_udp(V6, v6.uwild, b"w")
    assert name in {"a1", "a2"} and payload == b"w"
    assert src[:2] == (V6, v6.uwild)  # not from [::] or another address: IPV6_PKTINFO


# ---------------------------------------------------------------------------------------------
# HTTP and HTTPS


def test_http_over_ipv6_forwarded_headers(v6):
    backend, h = echo_json(V6, v6.http6)
    assert backend in {"a1", "a2"}
    assert h["x-forwarded-for"] == "::1"  # bare, as the de facto X-Forwarded-For has it
    assert h["x-forwarded-proto"] == "http"
    # RFC 7239 section 6: an IPv6 node is bracketed, and then quoted (":" and "[" are not
    # token characters)
    assert h["forwarded"] == f'for="[::1]";proto=http;host="[::1]:{v6.http6}"'
    # a chain: what came in is kept, the IPv6 client appended
    _, h = echo_json(V6, v6.http6, headers={"X-Forwarded-For": "2001:2::9",
                                             "Forwarded": 'for="[2001:2::9]:4711"'})
    assert h["x-forwarded-for"] == "2001:2::9, ::1"
    assert h["forwarded"] == f'for="[2001:2::9]:4711", for="[::1]";proto=http;host="[::1]:{v6.http6}"'


def test_http_mixed_families(v6):
    backend, h = echo_json(V4, v6.http46)  # IPv4 client -> IPv6 backends
    assert backend in {"a1", "a2"} and h["x-forwarded-for"] == V4
    assert h["forwarded"].startswith("for=127.0.0.1;proto=http")
    backend, h = echo_json(V6, v6.http64)  # IPv6 client -> IPv4 backend
    assert backend == "f1" and h["x-forwarded-for"] == V6


def test_http10_without_host_to_an_ipv6_backend_gets_a_bracketed_host(v6):
    """An HTTP/1.0 request without Host gets the backend's address as Host; an IPv6 literal
    must be bracketed there (RFC 9110 7.2, RFC 3986 3.2.2)."""
    with socket.create_connection((V6, v6.http6), timeout=5) as s:
        s.sendall(b"GET /echo HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    j = json.loads(body)
    host = {k.lower(): v for k, v in j["headers"]}["host"]
    assert host in {v6.b6.http["a1"], v6.b6.http["a2"]}, host  # "[::1]:PORT"


def test_https_over_ipv6(v6):
    ctx = ssl.create_default_context(cafile=str(v6.pki / "ca.pem"))  # the cert names IP ::1
    backend, h = echo_json(V6, v6.https6, tls=ctx)
    assert backend in {"a1", "a2"}
    assert h["x-forwarded-for"] == V6 and h["x-forwarded-proto"] == "https"
    assert h["forwarded"].startswith('for="[::1]";proto=https')


def test_http_health_check_reaches_ipv6_backends(v6):
    """a1 turns sick (its /healthz answers 503): the http check marks it down and traffic
    goes to a2 only; healed, it comes back."""
    wait_for(lambda: all(backends_json(v6)[("h6", b)]["healthy"] for b in ("a1", "a2")), 10,
             interval=0.1, what="both IPv6 backends healthy")
    host, port = v6.b6.http["a1"].rsplit(":", 1)
    admin = http.client.HTTPConnection(V6, int(port), timeout=5)
    try:
        admin.request("POST", "/admin/sick")
        admin.getresponse().read()
        wait_for(lambda: not backends_json(v6)[("h6", "a1")]["healthy"], 10, interval=0.1,
                 what="a1 marked down by the http check")
        assert {echo_json(V6, v6.http6)[0] for _ in range(6)} == {"a2"}
    finally:
        admin.request("POST", "/admin/well")
        admin.getresponse().read()
        admin.close()
    wait_for(lambda: backends_json(v6)[("h6", "a1")]["healthy"], 10, interval=0.1,
             what="a1 up again")
    assert {echo_json(V6, v6.http6)[0] for _ in range(6)} == {"a1", "a2"}


def test_tcp_health_and_agent_checks_reach_ipv6_backends(v6):
    wait_for(lambda: not backends_json(v6)[("chk", "dead")]["healthy"], 10, interval=0.1,
             what="the dead IPv6 backend marked down")
    b = wait_for(lambda: (x := backends_json(v6)[("chk", "live")]) and x["effective_weight"] == 50
                 and x, 10, interval=0.1, what="the agent's 50% applied")
    assert b["healthy"] and b["agent"] == "50%"
    assert b["address"] == v6.b6.tcp["a1"]  # "[::1]:PORT" in halbctl backends
    code, out, _ = halbctl("--socket", v6.sock, "backends", "chk")
    assert code == 0 and f"[::1]:{v6.dead}" in out


# ---------------------------------------------------------------------------------------------
# Tables, access log, control, metrics


def test_sticky_table_keyed_by_ipv6_client_and_access_log(v6):
    name = who(V6, v6.tcp6)[0]
    uname = ask_udp(V6, v6.udp6, b"t")[0]
    code, out, err = halbctl("--socket", v6.sock, "tables", "sticky", "--json")
    assert code == 0, err
    e = {x["key"]: x for x in json.loads(out)["sticky"]["entries"]}
    assert e["src/t6/::1"]["backend"] == name and e["src/t6/::1"]["pool"] == "t6"
    assert e["src/u6/::1"]["backend"] == uname  # the UDP listener's pool
    held = socket.create_connection((V6, v6.tcp6), timeout=5)
    try:
        client = "[%s]:%d" % held.getsockname()[:2]
        wait_for(lambda: any(f["client"] == client for f in json.loads(
            halbctl("--socket", v6.sock, "tables", "flow", "--prefix", "tcp6/", "--json")[1])
            ["flow"]["entries"]), 10, interval=0.1, what="the IPv6 connection's flow entry")
    finally:
        held.close()
    echo_json(V6, v6.http6)  # one HTTP line
    wait_for(lambda: v6.alog.exists() and '"mode":"http"' in v6.alog.read_text(), 10,
             what="an http access log line")

    def lines():
        return [json.loads(x) for x in v6.alog.read_text().splitlines() if x.strip()]
    wait_for(lambda: any(x["listener"] == "tcp6" for x in lines()), 10, what="a tcp line")
    wait_for(lambda: any(x["client"] == client and x["listener"] == "tcp6" for x in lines()),
             10, what=f"the access log line of {client}")
    for x in lines():
        if x["listener"] in ("tcp6", "http6", "splice6"):
            assert x["client"].startswith("[::1]:"), x
            int(x["client"].rsplit(":", 1)[1])


def test_halbctl_reaches_the_control_api_on_ipv6(v6):
    p = v6.pki
    tls = ["--ca", str(p / "ca.pem"), "--cert", str(p / "admin.pem"), "--key", str(p / "admin.key")]
    code, out, err = halbctl("--address", f"[::1]:{v6.ctl}", *tls, "status", "--json")
    assert code == 0, err
    assert json.loads(out)["node"]["name"] == "lb1"
    # an unbracketed IPv6 literal is ambiguous: refused, naming the problem
    code, _, err = halbctl("--address", f"::1:{v6.ctl}", *tls, "status")
    assert code == 1 and "brackets" in err and "[::1]" in err, err


def test_metrics_endpoint_on_ipv6(v6):
    st, _, body = http_get(f"http://[::1]:{v6.metrics}/metrics")
    assert st == 200 and b"halb_" in body


# ---------------------------------------------------------------------------------------------
# Sync over IPv6


def test_two_nodes_replicate_over_ipv6_with_mutual_tls(tmp_path):
    """lb1 and lb2 sync over ``[::1]`` (mutual TLS, certificates naming ::1): a source-sticky
    entry an IPv6 client makes on lb1 reaches lb2 with the same key and backend."""
    code, _, err = halbctl("pki", "init", "--out", str(tmp_path / "pki"), "lb1", "lb2",
                           "--ip", "lb1=::1", "--ip", "lb2=::1")
    assert code == 0, err
    sync = {n: free_port(host=V6) for n in ("lb1", "lb2")}
    front = {n: free_port(host=V6) for n in ("lb1", "lb2")}
    socks = {n: str(tmp_path / f"{n}.sock") for n in sync}
    with Backends(["b1", "b2"], http=False, tcp=True, host=V6, logdir=tmp_path) as bk:
        cfgs = {}
        for n, other in (("lb1", "lb2"), ("lb2", "lb1")):
            cfgs[n] = write_config(tmp_path, f"""
[node]
name = "{n}"
state_dir = "{tmp_path / n}"
[control]
socket = "{socks[n]}"
[access_log]
enabled = false
[[listeners]]
name = "front"
mode = "tcp"
bind = "[::1]:{front[n]}"
pool = "stick"
[[pools]]
name = "stick"
[pools.sticky]
mode = "source"
{_backends(["b1", "b2"], bk.tcp)}
[sync]
listen = "[::1]:{sync[n]}"
[[sync.peers]]
name = "{other}"
address = "[::1]:{sync[other]}"
[sync.tls]
cert = "{tmp_path / 'pki' / f'{n}.pem'}"
key = "{tmp_path / 'pki' / f'{n}.key'}"
ca = "{tmp_path / 'pki' / 'ca.pem'}"
""", name=f"{n}.toml")
            (tmp_path / n).mkdir()
        with Halbd(cfgs["lb1"]) as a, Halbd(cfgs["lb2"]) as b:
            # (no wait_port on lb2: its connection would make lb2 an entry of its own)
            a.wait_port(front["lb1"], host=V6)

            def peer(sock, name):
                d = status_json(sock)
                return d and next((p for p in d["peers"] if p["name"] == name), None)

            p = wait_for(lambda: (x := peer(socks["lb1"], "lb2")) and x["connected"] and x, 20,
                         interval=0.2, what="lb1 to see lb2 connected over [::1]")
            assert p["address"] == f"[::1]:{sync['lb2']}"
            first = who(V6, front["lb1"])[0]

            def on_lb2():
                code, out, _ = halbctl("--socket", socks["lb2"], "tables", "sticky", "--json")
                return code == 0 and next((e for e in json.loads(out)["sticky"]["entries"]
                                           if e["key"] == "src/stick/::1"), None)
            e = wait_for(on_lb2, 20, interval=0.2, what="the IPv6 client's entry on lb2")
            assert e["backend"] == first and e["origin"] == "lb1"
            # lb2 keeps the IPv6 client where lb1 put it
            assert all(who(V6, front["lb2"])[0] == first for _ in range(3))


def test_access_log_to_syslog_over_ipv6(v6, tmp_path):
    """``destination = "syslog:[::1]:PORT"``: the lines go out over UDP/IPv6, with the IPv6
    client in them."""
    rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    rx.bind((V6, 0))
    rx.settimeout(5)
    port = free_port(host=V6)
    cfg = write_config(tmp_path, f'''
[node]
name = "lg"
state_dir = "{tmp_path}"
[control]
socket = "{tmp_path}/lg.sock"
[access_log]
destination = "syslog:[::1]:{rx.getsockname()[1]}"
[[pools]]
name = "t"
{_backends(["a1"], v6.b6.tcp)}
[[listeners]]
name = "t6"
mode = "tcp"
bind = "[::1]:{port}"
pool = "t"
''')
    try:
        with Halbd(cfg) as h:
            h.wait_port(port, host=V6)
            with socket.create_connection((V6, port), timeout=5) as c:
                client = "[%s]:%d" % c.getsockname()[:2]
                c.sendall(b"WHO\n")
                assert recv_line(c) == b"a1\n"
            for _ in range(5):  # wait_port's connection logs a line too
                msg = rx.recv(65536).decode()
                if client in msg:
                    break
            else:
                raise AssertionError(f"no syslog line for {client}")
            assert msg.startswith("<") and " t6 t/a1 " in msg, msg
    finally:
        rx.close()
