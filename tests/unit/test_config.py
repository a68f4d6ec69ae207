"""The config model: the example config is valid, and every bad config names key path and reason."""

import subprocess
import sys
from pathlib import Path

import pytest

from halb.config import ConfigError, Endpoint, load, loads, parse_duration, parse_endpoint

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]

BASE = """
[node]
name = "lb1"

[[pools]]
name = "web"
  [[pools.backends]]
  address = "127.0.0.1:9001"
  [[pools.backends]]
  address = "127.0.0.1:9002"

[[listeners]]
name = "www"
mode = "http"
bind = "127.0.0.1:8080"
pool = "web"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        loads(text)
    return [str(p) for p in ei.value.problems]


def test_example_config_is_valid_and_complete():
    cfg = load(ROOT / "examples" / "halb.toml")
    assert cfg.node.name == "lb1"
    web = cfg.pool("web")
    assert web.algorithm == "wrr"
    assert [b.name for b in web.backends] == ["web1", "web2", "web3"]
    assert web.backends[2].max_conns == 1000
    assert web.health.type == "http" and web.health.interval == 1.0 and web.health.timeout == 0.5
    assert web.health.rise == 2 and web.health.fall == 3
    assert web.sticky.mode == "cookie" and web.sticky.ttl == 1800
    assert web.slow_start == 5.0
    api = cfg.pool("api")
    assert api.algorithm == "maglev" and api.hash_key == "header:x-user"
    assert api.backends[1].backup is True
    www = cfg.listeners[0]
    assert www.bind == Endpoint("127.0.0.1", 8080)
    assert [r.pool for r in www.routes] == ["api", "api", "api"]
    assert www.routes[2].header.name == "x-canary"
    assert cfg.metrics.address == Endpoint("127.0.0.1", 9100)
    al = cfg.access_log
    assert (al.enabled, al.kind, al.path, al.format, al.sample, al.buffer) == \
        (True, "stderr", "", "text", 1.0, 16384)
    assert [lc.access_log for lc in cfg.listeners] == [True, False]


def test_halbd_check_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "halb.cli.halbd", "--check",
                         str(ROOT / "examples" / "halb.toml")], capture_output=True, text=True,
                        cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE.replace('address = "127.0.0.1:9002"', 'address = "127.0.0.1:99999"'))
    r = subprocess.run([sys.executable, "-m", "halb.cli.halbd", "--check", str(bad)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    assert "pools[0].backends[1].address: port 99999 out of range" in r.stderr
    missing = subprocess.run([sys.executable, "-m", "halb.cli.halbd", "--check",
                              str(tmp_path / "nope.toml")], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 1 and "cannot read" in missing.stderr


def test_minimal_config_defaults():
    cfg = loads(BASE)
    assert cfg.pools[0].algorithm == "roundrobin"
    assert cfg.pools[0].backends[0].name == "127.0.0.1:9001"
    assert cfg.listeners[0].limits.max_header_bytes == 16384
    assert cfg.listeners[0].relay == "auto"
    assert cfg.control_socket == "/run/halb/lb1.sock"
    assert cfg.vrrp == () and cfg.sync is None
    assert cfg.pools[0].health.expect_status == tuple(range(200, 400))  # HAProxy: 2xx and 3xx


# Each case: (id, edit of BASE or full text, exact expected problem lines)
BAD = [
    ("port-out-of-range",
     BASE.replace('address = "127.0.0.1:9002"', 'address = "127.0.0.1:99999"'),
     ["pools[0].backends[1].address: port 99999 out of range"]),
    ("missing-port",
     BASE.replace('address = "127.0.0.1:9001"', 'address = "127.0.0.1"'),
     ["pools[0].backends[0].address: missing port in '127.0.0.1' (expected \"host:port\")"]),
    ("unknown-top-key", BASE + '\n[nodes]\nname = "x"\n', ["nodes: unknown key"]),
    ("unknown-nested-key",
     BASE.replace('  [[pools.backends]]\n  address = "127.0.0.1:9001"',
                  '  [[pools.backends]]\n  address = "127.0.0.1:9001"\n  wieght = 3'),
     ["pools[0].backends[0].wieght: unknown key"]),
    ("duplicate-pool", BASE + '\n[[pools]]\nname = "web"\n  [[pools.backends]]\n  address = "127.0.0.1:9005"\n',
     ["pools[1].name: duplicate pool name 'web' (also at index 0)"]),
    ("duplicate-backend-name",
     BASE.replace('  [[pools.backends]]\n  address = "127.0.0.1:9001"',
                  '  [[pools.backends]]\n  name = "a"\n  address = "127.0.0.1:9001"')
         .replace('  [[pools.backends]]\n  address = "127.0.0.1:9002"',
                  '  [[pools.backends]]\n  name = "a"\n  address = "127.0.0.1:9002"'),
     ["pools[0].backends[1].name: duplicate backend name 'a' (also at index 0)"]),
    ("duplicate-listener",
     BASE + '\n[[listeners]]\nname = "www"\nmode = "tcp"\nbind = "127.0.0.1:8081"\npool = "web"\n',
     ["listeners[1].name: duplicate listener name 'www' (also at index 0)"]),
    ("unknown-algorithm", BASE.replace('name = "web"\n', 'name = "web"\nalgorithm = "fastest"\n', 1),
     ["pools[0].algorithm: unknown value 'fastest' (expected one of: roundrobin, wrr, leastconn, "
      "p2c, leasttime, source, maglev, resource)"]),
    ("unknown-pool-ref", BASE.replace('pool = "web"', 'pool = "wbe"'),
     ["listeners[0].pool: unknown pool 'wbe'"]),
    ("weight-range",
     BASE.replace('  [[pools.backends]]\n  address = "127.0.0.1:9001"',
                  '  [[pools.backends]]\n  address = "127.0.0.1:9001"\n  weight = 300'),
     ["pools[0].backends[0].weight: 300 out of range (0..256)"]),
    ("wrong-type",
     BASE.replace('  [[pools.backends]]\n  address = "127.0.0.1:9001"',
                  '  [[pools.backends]]\n  address = "127.0.0.1:9001"\n  backup = "yes"'),
     ["pools[0].backends[0].backup: expected a boolean, got string"]),
    ("bad-mode", BASE.replace('mode = "http"', 'mode = "sctp"'),
     ["listeners[0].mode: unknown value 'sctp' (expected one of: tcp, udp, http, nat)"]),
    ("bad-duration",
     BASE.replace('name = "web"\n', 'name = "web"\n  [pools.health]\n  type = "tcp"\n  interval = "fast"\n', 1),
     ["pools[0].health.interval: expected a duration such as 2, 0.5, \"100ms\" or \"2s\", got 'fast'"]),
    ("health-rise-range",
     BASE.replace('name = "web"\n', 'name = "web"\n  [pools.health]\n  type = "tcp"\n  rise = 0\n', 1),
     ["pools[0].health.rise: 0 out of range (1..100)"]),
    ("maglev-not-prime",
     BASE.replace('name = "web"\n', 'name = "web"\nalgorithm = "maglev"\nmaglev_table_size = 65536\n', 1),
     ["pools[0].maglev_table_size: 65536 is not a prime number"]),
    ("maglev-table-smaller-than-pool",
     BASE.replace('name = "web"\n', 'name = "web"\nalgorithm = "maglev"\nmaglev_table_size = 2\n', 1),
     ["pools[0].maglev_table_size: 2 out of range (7..10000019)"]),
    ("maglev-table-not-larger-than-backends",
     BASE.replace('name = "web"\n', 'name = "web"\nalgorithm = "maglev"\nmaglev_table_size = 7\n', 1)
         + "".join(f'  [[pools.backends]]\n  address = "127.0.0.1:{9100 + i}"\n' for i in range(6)),
     ["pools[0].maglev_table_size: 7 must be larger than the number of backends (8)"]),
    ("hash-key-needs-hash-algo",
     BASE.replace('name = "web"\n', 'name = "web"\nhash_key = "header:x-user"\n', 1),
     ["pools[0].hash_key: hash_key needs a hashing algorithm (source or maglev), not 'roundrobin'"]),
    ("bad-hash-key",
     BASE.replace('name = "web"\n', 'name = "web"\nalgorithm = "maglev"\nhash_key = "query:id"\n', 1),
     ["pools[0].hash_key: unknown hash key 'query:id' (expected client_ip, header:NAME or cookie:NAME)"]),
    ("all-backup",
     BASE.replace('address = "127.0.0.1:9001"', 'address = "127.0.0.1:9001"\n  backup = true')
         .replace('address = "127.0.0.1:9002"', 'address = "127.0.0.1:9002"\n  backup = true'),
     ["pools[0].backends: every backend is a backup; at least one must be a primary"]),
    ("duplicate-bind",
     BASE + '\n[[listeners]]\nname = "www2"\nmode = "tcp"\nbind = "127.0.0.1:8080"\npool = "web"\n',
     ["listeners[1].bind: 127.0.0.1:8080 is already bound by listeners[0]"]),
    ("route-unknown-pool",
     BASE + '  [[listeners.routes]]\n  pool = "api"\n  path_prefix = "/api"\n',
     ["listeners[0].routes[0].pool: unknown pool 'api'"]),
    ("route-empty", BASE + '  [[listeners.routes]]\n  pool = "web"\n',
     ["listeners[0].routes[0]: a route needs at least one of host, path_prefix, header"]),
    ("routes-on-tcp",
     BASE.replace('mode = "http"', 'mode = "tcp"') + '  [[listeners.routes]]\n  pool = "web"\n  path_prefix = "/a"\n',
     ["listeners[0].routes: routes need mode = \"http\" (mode is 'tcp')"]),
    ("relay-on-http", BASE.replace('mode = "http"', 'mode = "http"\nrelay = "splice"'),
     ["listeners[0].relay: relay needs mode = \"tcp\" (mode is 'http')"]),
    ("app-cookie-without-name",
     BASE.replace('[[listeners]]', '[pools.sticky]\nmode = "app_cookie"\n[[listeners]]', 1),
     ["pools[0].sticky.cookie: app_cookie needs the name of the application's session cookie "
      "(e.g. cookie = \"JSESSIONID\")"]),
    ("app-cookie-on-tcp",
     BASE.replace('[[listeners]]', '[pools.sticky]\nmode = "app_cookie"\ncookie = "SID"\n'
                  '[[listeners]]', 1).replace('mode = "http"', 'mode = "tcp"'),
     ["listeners[0].pool: pool 'web' sticks by an application cookie, which a tcp listener "
      "cannot read (use sticky mode \"source\", or mode = \"http\")"]),
    ("prefix-without-app-cookie",
     BASE.replace('[[listeners]]', '[pools.sticky]\nmode = "cookie"\nprefix = true\n[[listeners]]', 1),
     ["pools[0].sticky.prefix: prefix needs mode = \"app_cookie\" (mode is 'cookie')"]),
    ("prefix-backend-name",
     BASE.replace('[[listeners]]', '[pools.sticky]\nmode = "app_cookie"\ncookie = "SID"\nprefix = true\n'
                  '[[listeners]]', 1).replace('address = "127.0.0.1:9002"', 'address = "[2001:2::2]:9002"'),
     ["pools[0].backends[1].name: backend name '[2001:2::2]:9002' cannot prefix a cookie value "
      "([pools.sticky] prefix = true): letters, digits and . _ - : only"]),
    ("via-on-tcp", BASE.replace('mode = "http"', 'mode = "tcp"\nvia = "edge"'),
     ["listeners[0].via: via needs mode = \"http\" (mode is 'tcp')"]),
    ("bad-via", BASE.replace('mode = "http"', 'mode = "http"\nvia = "two words"'),
     ["listeners[0].via: must be a token (letters, digits, -._~ and the like, at most 64), "
      "or \"\" for no Via; got 'two words'"]),
    ("bad-relay", BASE.replace('mode = "http"', 'mode = "tcp"\nrelay = "sendfile"'),
     ["listeners[0].relay: unknown value 'sendfile' (expected one of: auto, splice, copy)"]),
    ("missing-node", BASE.replace('[node]\nname = "lb1"\n', ''), ["node: is required"]),
    ("bad-node-name", BASE.replace('name = "lb1"', 'name = "lb 1"'),
     ["node.name: invalid name 'lb 1' (letters, digits, '_', '.', '-'; at most 63)"]),
    ("vrrp-vrid-range",
     BASE + '\n[[vrrp]]\nname = "vi1"\ninterface = "eth0"\nvrid = 256\npriority = 100\nvips = ["198.18.0.100/24"]\n',
     ["vrrp[0].vrid: 256 out of range (1..255)"]),
    ("vrrp-bad-vip",
     BASE + '\n[[vrrp]]\nname = "vi1"\ninterface = "eth0"\nvrid = 5\npriority = 100\nvips = ["198.18.0.300/24"]\n',
     ["vrrp[0].vips[0]: invalid address '198.18.0.300/24'"]),
    ("vrrp-advert-too-fast",
     BASE + '\n[[vrrp]]\nname = "vi1"\ninterface = "eth0"\nvrid = 5\npriority = 100\n'
            'vips = ["198.18.0.100/24"]\nadvert_interval = "5ms"\n',
     ["vrrp[0].advert_interval: 5ms out of range (10ms..40.95s)"]),
    ("vrrp-bad-checksum",
     BASE + '\n[[vrrp]]\nname = "vi1"\ninterface = "eth0"\nvrid = 5\npriority = 100\n'
            'vips = ["198.18.0.100/24"]\nchecksum = "crc"\n',
     ["vrrp[0].checksum: unknown value 'crc' (expected one of: rfc9568, keepalived)"]),
    ("vrrp-duplicate-vrid",
     BASE + '\n[[vrrp]]\nname = "a"\ninterface = "eth0"\nvrid = 5\npriority = 100\nvips = ["198.18.0.100"]\n'
            '\n[[vrrp]]\nname = "b"\ninterface = "eth0"\nvrid = 5\npriority = 90\nvips = ["198.18.0.101"]\n',
     ["vrrp[1].vrid: vrid 5 on eth0 is already used by vrrp[0]"]),
    ("sync-self-peer",
     BASE + '\n[sync]\nlisten = "127.0.0.1:7400"\ninsecure = true\n  [[sync.peers]]\n  name = "lb1"\n  address = "127.0.0.1:7401"\n',
     ["sync.peers: lists this node ('lb1') as its own peer"]),
    ("sync-without-tls",
     BASE + '\n[sync]\nlisten = "127.0.0.1:7400"\n  [[sync.peers]]\n  name = "lb2"\n  address = "127.0.0.1:7401"\n',
     ["sync.tls: needs [sync.tls] (mutual TLS: ca, cert, key; `halbctl pki init` makes them), or "
      "insecure = true to replicate in plaintext with unauthenticated peers"]),
    ("sync-tls-missing-files",
     BASE + '\n[sync]\nlisten = "127.0.0.1:7400"\n  [sync.tls]\n  ca = "/nonexistent/ca.pem"\n'
            '  cert = "/nonexistent/lb1.pem"\n  key = "/nonexistent/lb1.key"\n',
     ["sync.tls.cert: no such file '/nonexistent/lb1.pem'",
      "sync.tls.key: no such file '/nonexistent/lb1.key'",
      "sync.tls.ca: no such file '/nonexistent/ca.pem'"]),
    ("listener-tls-missing-file",
     BASE + '\n[[listeners]]\nname = "w"\nmode = "http"\nbind = "127.0.0.1:8443"\npool = "web"\n'
            '  [listeners.tls]\n  [[listeners.tls.certificates]]\n  cert = "/nonexistent/w.pem"\n'
            '  key = "/nonexistent/w.key"\n',
     ["listeners[1].tls.certificates[0].cert: no such file '/nonexistent/w.pem'",
      "listeners[1].tls.certificates[0].key: no such file '/nonexistent/w.key'"]),
    ("control-tcp-needs-tls", BASE + '\n[control]\naddress = "127.0.0.1:7001"\n',
     ["control.address: a TCP control address needs [control.tls] (mutual TLS)"]),
    ("access-log-unknown-destination", BASE + '\n[access_log]\ndestination = "kafka"\n',
     ["access_log.destination: unknown destination 'kafka' (expected \"stderr\", \"stdout\", "
      "\"file:/PATH\", \"syslog\" (/dev/log) or \"syslog:HOST:PORT\" (UDP))"]),
    ("access-log-relative-file", BASE + '\n[access_log]\ndestination = "file:access.log"\n',
     ["access_log.destination: file: needs an absolute path (\"file:/var/log/halb/access.log\"), "
      "got 'access.log'"]),
    ("access-log-syslog-port", BASE + '\n[access_log]\ndestination = "syslog:127.0.0.1:99999"\n',
     ["access_log.destination: syslog:HOST:PORT: port 99999 out of range"]),
    ("access-log-syslog-no-port", BASE + '\n[access_log]\ndestination = "syslog:loghost"\n',
     ["access_log.destination: syslog:HOST:PORT: missing port in 'loghost' (expected "
      "\"host:port\")"]),
    ("access-log-template-field",
     BASE + '\n[access_log]\nformat = "%{client} %{stauts} %{bytes}"\n',
     ["access_log.format: unknown field 'stauts' in %{stauts} (known: time, client, listener, "
      "pool, backend, Tq, Tw, Tc, Tr, Ta, Tt, status, bytes, bytes_in, bytes_out, term, tsc, "
      "method, request, retries, mode, conns, backend_conns, cache)"]),
    ("access-log-template-unclosed", BASE + '\n[access_log]\nformat = "%{client} %{status"\n',
     ["access_log.format: unclosed %{ at character 11 of '%{client} %{status'"]),
    ("access-log-unknown-format", BASE + '\n[access_log]\nformat = "xml"\n',
     ["access_log.format: unknown format 'xml' (expected \"text\", \"json\" or a template with "
      "%{field} names such as \"%{client} %{status}\")"]),
    ("access-log-format-type", BASE + '\n[access_log]\nformat = 3\n',
     ["access_log.format: expected a string, got integer"]),
    ("access-log-sample-zero", BASE + '\n[access_log]\nsample = 0\n',
     ["access_log.sample: 0 out of range (a fraction: 0 < sample <= 1; 0.01 logs one request "
      "in 100)"]),
    ("access-log-sample-above-one", BASE + '\n[access_log]\nsample = 1.5\n',
     ["access_log.sample: 1.5 out of range (a fraction: 0 < sample <= 1; 0.01 logs one "
      "request in 100)"]),
    ("access-log-enabled-type", BASE + '\n[access_log]\nenabled = "yes"\n',
     ["access_log.enabled: expected a boolean, got string"]),
    ("access-log-unknown-key", BASE + '\n[access_log]\npath = "/var/log/x"\n',
     ["access_log.path: unknown key"]),
    ("access-log-facility-needs-syslog", BASE + '\n[access_log]\nfacility = "local3"\n',
     ["access_log.facility: facility needs a syslog destination (destination is 'stderr')"]),
    ("access-log-bad-facility",
     BASE + '\n[access_log]\ndestination = "syslog"\nfacility = "local9"\n',
     ["access_log.facility: unknown value 'local9' (expected one of: kern, user, daemon, auth, "
      "syslog, local0, local1, local2, local3, local4, local5, local6, local7)"]),
    ("access-log-buffer-range", BASE + '\n[access_log]\nbuffer = 10\n',
     ["access_log.buffer: 10 out of range (64..1000000)"]),
    ("listener-access-log-type", BASE.replace('mode = "http"', 'mode = "http"\naccess_log = "no"'),
     ["listeners[0].access_log: expected a boolean, got string"]),
    ("invalid-toml", BASE + "\n[[pools]\n", None),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in BAD], ids=[i for i, _, _ in BAD])
def test_bad_config_names_path_and_reason(text, expected):
    got = problems(text)
    if expected is None:
        assert len(got) == 1 and "invalid TOML" in got[0]
    else:
        assert got == expected


def test_access_log_section():
    d = loads(BASE).access_log
    assert (d.enabled, d.destination, d.kind, d.format, d.sample, d.buffer) == \
        (True, "stderr", "stderr", "text", 1.0, 16384)  # on by default, to stderr
    assert loads(BASE).listeners[0].access_log is True
    for dest, kind, path, addr in (
            ("stdout", "stdout", "", None), ("file:/var/log/halb/a.log", "file",
                                             "/var/log/halb/a.log", None),
            ("syslog", "syslog", "/dev/log", None),
            ("syslog:198.18.0.9:514", "syslog-udp", "", Endpoint("198.18.0.9", 514))):
        c = loads(BASE + f'\n[access_log]\ndestination = "{dest}"\n').access_log
        assert (c.destination, c.kind, c.path, c.address) == (dest, kind, path, addr)
    c = loads(BASE.replace('mode = "http"', 'mode = "http"\naccess_log = false')
              + '\n[access_log]\nenabled = false\nformat = "%{client} %{status}"\nsample = 0.05\n'
                'destination = "syslog"\nfacility = "local3"\nbuffer = 1000\n')
    assert c.listeners[0].access_log is False
    a = c.access_log
    assert (a.enabled, a.format, a.sample, a.facility, a.buffer) == \
        (False, "%{client} %{status}", 0.05, "local3", 1000)
    assert loads(BASE + '\n[access_log]\nformat = "json"\nsample = 1\n').access_log.format == "json"


def test_all_problems_reported_at_once():
    text = BASE.replace('address = "127.0.0.1:9002"', 'address = "127.0.0.1:99999"').replace(
        'mode = "http"', 'mode = "sctp"')
    assert problems(text) == ["pools[0].backends[1].address: port 99999 out of range",
                              "listeners[0].mode: unknown value 'sctp' (expected one of: tcp, udp, http, nat)"]


@pytest.mark.parametrize("text,seconds", [(2, 2.0), (0.5, 0.5), ("100ms", 0.1), ("2s", 2.0),
                                          ("5m", 300.0), ("1h", 3600.0), ("250us", 0.00025)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "2 days", "-1s", True, -3, "1.s"])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_endpoints():
    assert parse_endpoint("[::1]:80") == Endpoint("::1", 80)
    assert str(Endpoint("::1", 80)) == "[::1]:80"
    for bad in ("::1:80x", "host:", ":80", "a b:80", "h:0"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


@pytest.mark.parametrize("text, host", [
    ("[::1]:80", "::1"),
    ("[2001:2:0:0::10]:80", "2001:2::10"),  # canonical: compares equal however written
    ("[2001:DB8::A]:80", "2001:db8::a"),
    ("[::]:80", "::"),
    ("[::ffff:198.18.0.1]:80", "::ffff:198.18.0.1"),  # as the kernel writes a mapped address
])
def test_endpoint_ipv6(text, host):
    ep = parse_endpoint(text)
    assert ep.host == host and ep.port == 80 and str(ep) == f"[{host}]:80"


@pytest.mark.parametrize("text, needle", [
    ("::1:80", 'IPv6 address without brackets in \'::1:80\' (write "[ADDRESS]:PORT", e.g. "[::1]:80")'),
    ("2001:2::10:80", 'e.g. "[2001:2::10]:80"'),
    ("[198.18.0.1]:80", "is not an IPv6 address (brackets are for IPv6 addresses only)"),
    ("[lb1]:80", "is not an IPv6 address"),
    ("[2001:2::g]:80", "is not an IPv6 address"),
    ("[::1]80", 'expected "[address]:port"'),
    ("[::1]:", "port '' is not a number"),
])
def test_endpoint_ipv6_errors(text, needle):
    with pytest.raises(ValueError) as ei:
        parse_endpoint(text)
    assert needle in str(ei.value)


def test_ipv6_binds_and_a_bad_one_named_by_key_path(tmp_path):
    """Listeners, backends, sync, control and metrics take [v6]:port; two listeners on the
    same IPv6 address written two ways are one bind; an unbracketed one names its key."""
    for f in ("ca.pem", "lb1.pem", "lb1.key"):
        (tmp_path / f).write_text("x")
    base = f'''
[node]
name = "lb1"
[metrics]
address = "[::1]:9100"
[control]
address = "[2001:2::10]:7000"
[control.tls]
ca = "{tmp_path}/ca.pem"
cert = "{tmp_path}/lb1.pem"
key = "{tmp_path}/lb1.key"
[sync]
listen = "[2001:2::10]:7100"
insecure = true
[[sync.peers]]
name = "lb2"
address = "[2001:2::11]:7100"
[[pools]]
name = "web"
[[pools.backends]]
name = "w1"
address = "[2001:2::20]:8080"
[[listeners]]
name = "a"
mode = "http"
bind = "[2001:2::10]:80"
pool = "web"
'''
    cfg = loads(base)
    assert str(cfg.listeners[0].bind) == "[2001:2::10]:80"
    assert cfg.pools[0].backends[0].address == Endpoint("2001:2::20", 8080)
    assert cfg.sync.peers[0].address.host == "2001:2::11"
    assert str(cfg.control.address) == "[2001:2::10]:7000"
    assert str(cfg.metrics.address) == "[::1]:9100"
    dup = base + '[[listeners]]\nname = "b"\nmode = "http"\nbind = "[2001:2:0::10]:80"\npool = "web"\n'
    with pytest.raises(ConfigError) as ei:
        loads(dup)
    assert "listeners[1].bind: [2001:2::10]:80 is already bound by listeners[0]" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        loads(base.replace('"[2001:2::20]:8080"', '"2001:2::20:8080"'))
    assert "pools[0].backends[0].address: IPv6 address without brackets" in str(ei.value)


VRRP = '\n[[vrrp]]\nname = "vi1"\ninterface = "eth0"\nvrid = 51\npriority = 100\nvips = ["198.18.0.100/32"]\n'


def test_warnings_name_what_is_likely_to_split_brain():
    cfg = loads(BASE + VRRP)
    w = {p.path: p.reason for p in cfg.warnings}
    assert set(w) == {"vrrp[0].checksum"}
    assert "keepalived" in w["vrrp[0].checksum"] and "vrid 51" in w["vrrp[0].checksum"]
    assert cfg.vrrp[0].garp.refresh == 10.0  # periodic gratuitous ARP on by default
    # said explicitly: no warning (either way)
    for mode in ("rfc9568", "keepalived"):
        assert loads(BASE + VRRP + f'checksum = "{mode}"\n').warnings == ()
    off = loads(BASE + VRRP + 'checksum = "keepalived"\n  [vrrp.garp]\n  refresh = 0\n')
    assert [p.path for p in off.warnings] == ["vrrp[0].garp.refresh"]
    insecure = loads(BASE + '\n[sync]\nlisten = "127.0.0.1:7400"\ninsecure = true\n'
                            '  [[sync.peers]]\n  name = "lb2"\n  address = "127.0.0.1:7401"\n')
    assert [p.path for p in insecure.warnings] == ["sync.insecure"]
    assert insecure.sync.insecure and insecure.sync.tls is None


def test_halbd_check_prints_warnings_and_still_exits_0(tmp_path):
    f = tmp_path / "ka.toml"
    f.write_text(BASE + VRRP)
    r = subprocess.run([sys.executable, "-m", "halb.cli.halbd", "--check", str(f)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert f"halbd: {f}: warning: vrrp[0].checksum: not set" in r.stderr
    assert "ok" in r.stdout


NAT = """
[node]
name = "lb1"

[[pools]]
name = "p"
algorithm = "maglev"
  [[pools.backends]]
  address = "198.18.1.21:8080"

[[listeners]]
name = "n"
mode = "nat"
bind = "198.18.0.100:80"
pool = "p"
"""


def test_nat_listener_and_section():
    cfg = loads(NAT + 'protocol = "udp"\nhash = "client_ip_port"\n'
                '[nat]\nreplicate = false\nhash_slots = 251\nreconcile_interval = "10s"\n')
    lc = cfg.listeners[0]
    assert (lc.mode, lc.protocol, lc.hash) == ("nat", "udp", "client_ip_port")
    assert cfg.nat.replicate is False and cfg.nat.hash_slots == 251
    assert cfg.nat.reconcile_interval == 10.0 and cfg.nat.table == "halb"
    assert loads(NAT).listeners[0].protocol == "tcp" and loads(NAT).nat.hash_slots == 4093


def test_nat_listener_over_ipv6():
    cfg = loads(NAT.replace('bind = "198.18.0.100:80"', 'bind = "[2001:2::100]:80"')
                .replace('address = "198.18.1.21:8080"', 'address = "[2001:2:1::21]:8080"'))
    lc = cfg.listeners[0]
    assert (lc.mode, lc.bind.host, lc.bind.port) == ("nat", "2001:2::100", 80)
    assert cfg.pools[0].backends[0].address.host == "2001:2:1::21"


@pytest.mark.parametrize("text,expected", [
    (NAT.replace('algorithm = "maglev"', 'algorithm = "leastconn"'),
     "listeners[0].pool: pool 'p' has algorithm = 'leastconn': a nat listener balances in the "
     "kernel by consistent hash, so its pool needs algorithm = \"maglev\""),
    (NAT.replace('algorithm = "maglev"', 'algorithm = "maglev"\n  [pools.sticky]\n  mode = "source"'),
     "listeners[0].pool: pool 'p' has sticky.mode = 'source'"),
    (NAT.replace('bind = "198.18.0.100:80"', 'bind = "0.0.0.0:80"'),
     "listeners[0].bind: a nat listener binds one IPv4 or IPv6 address (its VIP), not "
     "'0.0.0.0'"),
    (NAT.replace('bind = "198.18.0.100:80"', 'bind = "[::]:80"'),
     "listeners[0].bind: a nat listener binds one IPv4 or IPv6 address (its VIP), not '::'"),
    (NAT.replace('bind = "198.18.0.100:80"', 'bind = "lb.example:80"'),
     "listeners[0].bind: a nat listener binds one IPv4 or IPv6 address"),
    # NAT64 / NAT46: the VIP's family and the backends' must agree
    (NAT.replace('bind = "198.18.0.100:80"', 'bind = "[2001:2::100]:80"'),
     "pools[0].backends[0].address: 198.18.1.21 is IPv4 but nat listener 'n' binds the IPv6 "
     "VIP 2001:2::100: that would be NAT64 (translating between families), which the kernel "
     "NAT mode does not do; give pool 'p' IPv6 backends, or bind the listener to an IPv4 VIP"),
    (NAT.replace('address = "198.18.1.21:8080"', 'address = "[2001:2:1::21]:8080"'),
     "pools[0].backends[0].address: 2001:2:1::21 is IPv6 but nat listener 'n' binds the IPv4 "
     "VIP 198.18.0.100: that would be NAT46"),
    (NAT.replace('address = "198.18.1.21:8080"', 'address = "be1.example:8080"'),
     "pools[0].backends[0].address: 'be1.example' is not an IP address: nat listener 'n'"),
    (NAT.replace('mode = "nat"', 'mode = "tcp"\nprotocol = "udp"'),
     "listeners[0].protocol: protocol needs mode = \"nat\" (mode is 'tcp')"),
    (NAT + 'protocol = "sctp"\n', "listeners[0].protocol: unknown value 'sctp'"),
    (NAT + '[nat]\nhash_slots = 4096\n', "nat.hash_slots: 4096 is not a prime"),
    (NAT + '[nat]\ntable = "my table"\n', "nat.table: invalid nftables table name 'my table'"),
    (NAT + '[nat]\nentry_ttl = "60s"\n', "nat.entry_ttl: must be at least 4 x reconcile_interval"),
    (NAT + '[nat]\nreplicat = true\n', "nat.replicat: unknown key"),
    (NAT + 'access_log = false\n',
     "listeners[0].access_log: access_log needs mode = \"tcp\", \"udp\" or \"http\" (a nat "
     "listener's connections are forwarded by the kernel: halb sees none to log)"),
])
def test_bad_nat_config_names_the_key(text, expected):
    got = problems(text)
    assert any(g.startswith(expected) for g in got), got


def test_excluded_vips():
    base = NAT + """
[[vrrp]]
name = "v"
interface = "eth0"
vrid = 7
priority = 100
checksum = "rfc9568"
vips = ["198.18.0.100/24"]
"""
    cfg = loads(base + 'excluded_vips = ["198.18.1.1/24 dev eth1", "198.18.0.7", "198.18.2.1/24 dev eth0"]\n')
    ex = [(str(v), d) for v, d in cfg.vrrp[0].excluded_vips]
    assert ex == [("198.18.1.1/24", "eth1"), ("198.18.0.7/32", ""), ("198.18.2.1/24", "")]
    assert not cfg.warnings
    bad = problems(base + 'excluded_vips = ["198.18.1.1/24 dev", "198.18.1.x", "198.18.1.1 dev a b"]\n')
    assert bad[0].startswith("vrrp[0].excluded_vips[0]: expected \"ADDRESS/LEN\" or")
    assert bad[1] == "vrrp[0].excluded_vips[1]: invalid address '198.18.1.x'"
    assert bad[2].startswith("vrrp[0].excluded_vips[2]: expected")
    # a nat listener on an address no instance moves: a warning, not an error
    cfg = loads(base.replace('vips = ["198.18.0.100/24"]', 'vips = ["198.18.0.101/24"]'))
    assert [w.path for w in cfg.warnings] == ["listeners[0].bind"]


V6 = NAT + """
[[vrrp]]
name = "v6"
interface = "eth0"
vrid = 7
priority = 100
"""


def test_ipv6_instance():
    cfg = loads(V6 + 'vips = ["2001:2::100/64", "fe80::7/64"]\n'
                'unicast_peers = ["fe80::12"]\nsource_address = "fe80::11"\n'
                'excluded_vips = ["2001:2:0:1::100/64 dev eth1", "198.18.9.1/24"]\n')
    v = cfg.vrrp[0]
    assert [str(a) for a in v.vips] == ["2001:2::100/64", "fe80::7/64"]
    assert [str(a) for a, _ in v.excluded_vips] == ["2001:2:0:1::100/64", "198.18.9.1/24"]
    # the IPv4 checksum setting means nothing over IPv6: no warning about it
    assert not any(w.path.endswith("checksum") for w in cfg.warnings)
    # the same vrid may serve IPv4 and IPv6 on one interface (separate spaces, RFC 9568)
    both = loads(V6 + 'vips = ["fe80::7/64"]\n' + V6.split(NAT)[1].replace('"v6"', '"v4"')
                 + 'vips = ["198.18.0.100/24"]\nchecksum = "rfc9568"\n')
    assert len(both.vrrp) == 2


@pytest.mark.parametrize("extra,expected", [
    ('vips = ["2001:2::100/64"]\n',
     'vrrp[0].vips: an IPv6 instance needs a virtual link-local address among its vips'),
    ('vips = ["fe80::7/64", "198.18.0.100/24"]\n',
     "vrrp[0].vips: IPv4 and IPv6 addresses cannot share one instance"),
    ('vips = ["fe80::7/64"]\nunicast_peers = ["198.18.0.12"]\n',
     "vrrp[0].unicast_peers[0]: 198.18.0.12 is IPv4, the instance's vips are IPv6"),
    ('vips = ["fe80::7/64"]\nsource_address = "198.18.0.11"\n',
     "vrrp[0].source_address: 198.18.0.11 is IPv4, the instance's vips are IPv6"),
    ('vips = ["198.18.0.100/24"]\nunicast_peers = ["2001:2::12"]\n',
     "vrrp[0].unicast_peers[0]: 2001:2::12 is IPv6, the instance's vips are IPv4"),
])
def test_bad_ipv6_instance_names_the_key(extra, expected):
    got = problems(V6 + extra)
    assert any(g.startswith(expected) for g in got), got


def test_listener_cache():
    cfg = loads(BASE + '[listeners.cache]\nmax_size = "8MiB"\nmax_object = "512KiB"\n'
                       'max_age = "10m"\ndefault_ttl = "30s"\npools = ["web"]\n')
    c = cfg.listeners[0].cache
    assert (c.max_size, c.max_object, c.max_age, c.default_ttl, c.pools) == (
        8 << 20, 512 << 10, 600.0, 30.0, ("web",))
    assert loads(BASE + "[listeners.cache]\n").listeners[0].cache.max_size == 64 << 20
    assert loads(BASE).listeners[0].cache is None


@pytest.mark.parametrize("extra,expected", [
    ('[listeners.cache]\nmax_size = "lots"\n',
     "listeners[0].cache.max_size: invalid size 'lots'"),
    ('[listeners.cache]\nmax_size = "1MiB"\nmax_object = "2MiB"\n',
     "listeners[0].cache.max_object: max_object (2097152) is larger than max_size (1048576)"),
    ('[listeners.cache]\nmax_size = 100\n',
     "listeners[0].cache.max_size: 100 bytes out of range"),
    ('[listeners.cache]\npools = ["api"]\n',
     "listeners[0].cache.pools[0]: 'api' is not a pool this listener routes to (web)"),
    ('[listeners.cache]\nmax_entrys = 5\n', "listeners[0].cache.max_entrys: unknown key"),
])
def test_bad_listener_cache_names_the_key(extra, expected):
    got = problems(BASE + extra)
    assert any(g.startswith(expected) for g in got), got


def test_cache_needs_an_http_listener():
    text = BASE.replace('mode = "http"', 'mode = "tcp"') + "[listeners.cache]\n"
    assert any(p.startswith('listeners[0].cache: cache needs mode = "http"')
               for p in problems(text))


def test_vrrp_addresses_are_kept_canonical():
    cfg = loads(V6 + 'vips = ["fe80::7/64"]\nunicast_peers = ["FE80::0012%eth0", "2001:DB8:0::2"]\n'
                'source_address = "FE80::11"\n')
    v = cfg.vrrp[0]
    assert v.unicast_peers == ("fe80::12", "2001:db8::2") and v.source_address == "fe80::11"
