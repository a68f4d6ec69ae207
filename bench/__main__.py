"""halb side by side with HAProxy, on loopback, in one run: ``./dev bench`` (= ``python -m bench``).

Layout (2 cores): the proxy under test (halbd or haproxy ``nbthread 1``) is pinned to core 0;
the load generators (wrk, iperf3 client, this script's idle connections) and the backends
(two nginx ``worker_processes 1``, an iperf3 server) to core 1. Both proxies run over the same
backends, one after the other, and every figure is printed as halb / HAProxy:

    L7  requests/s and p99 latency   wrk -t1 -c64 -d<dur> --latency  (halb: routes, forwarded
                                     headers and metrics on; HAProxy: mode http, http-reuse
                                     always, option forwardfor and the two other forwarding
                                     headers halb adds, so both send the backends the same)
    L7  CPU microseconds per request from the proxy's utime+stime (/proc/PID/stat) deltas
    gRPC unary calls/s (grpc)        bench/grpc_load.py: 32 threads over one grpcio channel
                                     to a grpcio server (lab.grpc_backend, HAProxy: proto h2
                                     on the server line; halb: pool proto = "h2"), calls/s and
                                     CPU microseconds per call
    HTTP/2 (h2)                      h2load -c16 -m4 (64 streams over 16 connections, h2c
                                     with prior knowledge) against the same L7 frontends:
                                     HAProxy detects the HTTP/2 preface on its plain HTTP bind,
                                     halb's listener accepts h2c by default; both send HTTP/1.1
                                     to the nginx pair. req/s and CPU microseconds per request
    L7 with 1000 connections (l7many) the same with wrk -c1000 (keep-alive)
    L7 cache hits (cache)            a 4 KiB object fresh for 60 s from each proxy's HTTP
                                     cache (a third pair: HAProxy's cache section, halb's
                                     [listeners.cache]); reported beside the uncached l7 rate
    L7 with access logs (l7log)      the same, on a second pair of proxies whose access logs
                                     go to a file: HAProxy option httplog + "log stdout format
                                     raw" with its stdout in a file, halb [access_log] file:
                                     (the l7 case has them off on both sides)
    L4  Gbit/s                       iperf3 -t <dur> (HAProxy: mode tcp, option splice-auto;
                                     halb: relay = "auto"); for reference also with splicing
                                     forced in both (halb relay = "splice")
    L4  CPU seconds per GB relayed
    memory per idle client connection, L7 and L4: RSS delta / N with N connections held

Options: --duration S (per run, default 10), --idle N (default 5000), --only l7,l7log,l4,mem,
--no-profile (skip the py-spy record of halbd during an extra L7 and L4 run),
--rounds R (default 3: each measurement alternates between the two proxies R times, both
proxies running side by side, and the median run of each is reported; latency percentiles
are the medians of the runs' percentiles, taken apart from the rate's median run).
Results go to bench/out/ (latest.json, latest.md, profiles).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
PY = sys.executable
CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
PROXY_CORE, LOAD_CORE = "0", "1"
# Everything the bench starts runs at a raised priority (root only; --nice 0 turns it off) so
# that other work on a shared machine disturbs the comparison less. Set in main().
PRIO: list[str] = []
HAPROXY = ["haproxy"]  # the HAProxy binary (--haproxy)


# ---------------------------------------------------------------------------------------------
# Small helpers


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tls_cert(tmp: Path) -> None:
    """The TLS cases' certificate (ECDSA P-256, as most sites now) in ``tmp``: bench-tls.crt and
    .key for halb, the two in one bench-tls.pem for HAProxy."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=bench.test", "-keyout", str(tmp / "bench-tls.key"), "-out",
                    str(tmp / "bench-tls.crt")], check=True, capture_output=True)
    (tmp / "bench-tls.pem").write_bytes((tmp / "bench-tls.crt").read_bytes()
                                        + (tmp / "bench-tls.key").read_bytes())


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK, int(fields[12]) / CLK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def busy_elsewhere(seconds: float = 1.0) -> float:
    """CPU cores' worth of time used by everything on the machine over ``seconds``."""
    def total():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v) - idle, sum(v)
    b0, t0 = total()
    time.sleep(seconds)
    b1, t1 = total()
    ncpu = os.cpu_count() or 1
    return ncpu * (b1 - b0) / max(1, t1 - t0)


class Procs:
    """Every process started here, always killed at the end (their own process groups)."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], core: str, env: dict | None = None) -> subprocess.Popen:
        logf = open(self.logdir / f"{name}.log", "ab")
        e = dict(os.environ)
        e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
        e.update(env or {})
        p = subprocess.Popen(PRIO + ["taskset", "-c", core] + argv, stdout=logf, stderr=subprocess.STDOUT,
                             env=e, cwd=str(ROOT), start_new_session=True)
        logf.close()
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 5.0) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)

    def close(self) -> None:
        for p in reversed(self.procs):
            self.stop(p, 3)


def run(argv: list[str], timeout: float) -> str:
    r = subprocess.run(PRIO + ["taskset", "-c", LOAD_CORE] + argv, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r.stdout


# ---------------------------------------------------------------------------------------------
# Configs


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 19000;
error_log {dir}/nginx-{name}-error.log warn;
pid {dir}/nginx-{name}.pid;
events {{ worker_connections 9000; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_header_timeout 120s;
    client_body_temp_path {dir}/nginx-{name}-body;
    proxy_temp_path {dir}/nginx-{name}-proxy;
    fastcgi_temp_path {dir}/nginx-{name}-fcgi;
    uwsgi_temp_path {dir}/nginx-{name}-uwsgi;
    scgi_temp_path {dir}/nginx-{name}-scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ default_type text/plain; return 200 "hello from {name}\\n"; }}
        # the cache case's object: 4 KiB, fresh for 60 s (nginx adds ETag and Last-Modified)
        location /cached/ {{ root {dir}/www; default_type text/plain;
                             add_header Cache-Control "max-age=60"; }}
        # the big and dl cases: a 64 KiB body, a 200 MB download
        location /files/ {{ root {dir}/www; default_type application/octet-stream; }}
    }}
}}
"""

HAPROXY_CONF = """
global
    nbthread 1
    maxconn 7000
    tune.maxaccept 64
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-request 120s
    timeout http-keep-alive 120s
frontend fe_http
    bind 127.0.0.1:{http}
    option forwardfor
    # the two other headers halb's forwarded_headers adds (HAProxy 2.6 has no
    # "option forwarded"), byte for byte what halb sends for wrk's requests
    http-request set-header X-Forwarded-Proto http
    http-request set-header Forwarded 'for=%[src];proto=http;host="%[req.hdr(host)]"'
    default_backend be_web
backend be_web
    balance roundrobin
    http-reuse always
    server n1 127.0.0.1:{n1}
    server n2 127.0.0.1:{n2}
# the https, httpsnew and httpsresume cases: TLS terminated, the same work as fe_http
# (HAProxy's defaults: a 20,000-session cache and session tickets on)
frontend fe_https
    bind 127.0.0.1:{https} ssl crt {dir}/bench-tls.pem
    option forwardfor
    http-request set-header X-Forwarded-Proto https
    http-request set-header Forwarded 'for=%[src];proto=https;host="%[req.hdr(host)]"'
    default_backend be_web
frontend fe_tcp
    mode tcp
    bind 127.0.0.1:{tcp}
    option splice-auto
    default_backend be_iperf
backend be_iperf
    mode tcp
    option splice-auto
    server i1 127.0.0.1:{iperf}
frontend fe_tcp_forced_splice
    mode tcp
    bind 127.0.0.1:{tcpsplice}
    option splice-request
    option splice-response
    default_backend be_iperf_splice
backend be_iperf_splice
    mode tcp
    option splice-request
    option splice-response
    server i1 127.0.0.1:{iperf}
frontend fe_grpc
    bind 127.0.0.1:{grpc}
    default_backend be_grpc
backend be_grpc
    server g1 127.0.0.1:{g1} proto h2
frontend fe_tcp_idle
    mode tcp
    bind 127.0.0.1:{tcpidle}
    default_backend be_nginx_tcp
backend be_nginx_tcp
    mode tcp
    balance roundrobin
    server n1 127.0.0.1:{n1}
    server n2 127.0.0.1:{n2}
"""

BACKEND_PORTS = ("n1", "n2", "iperf", "g1")  # the fields of the config templates below
PROXY_PORTS = ("http", "tcp", "tcpidle", "tcpsplice", "metrics", "https", "grpc")

# the nginx pair as a halb pool: the same in every halb config below
_HALB_WEB_POOL = """[[pools]]
name = "web"
[[pools.backends]]
name = "n1"
address = "127.0.0.1:{n1}"
[[pools.backends]]
name = "n2"
address = "127.0.0.1:{n2}"
"""

HALB_CONF = """
[node]
name = "bench"
log_level = "warning"
state_dir = "{dir}/halb-state"

[metrics]
address = "127.0.0.1:{metrics}"

# off here, as in HAProxy's config above (no "log"): the l7log case runs a second pair of
# proxies with their access logs on (HALB_LOG_CONF, HAPROXY_LOG_CONF)
[access_log]
enabled = false

""" + _HALB_WEB_POOL + """
[[pools]]
name = "api"
[[pools.backends]]
name = "a1"
address = "127.0.0.1:{n1}"

[[pools]]
name = "iperf"
[[pools.backends]]
name = "i1"
address = "127.0.0.1:{iperf}"

[[pools]]
name = "nginx-tcp"
[[pools.backends]]
name = "t1"
address = "127.0.0.1:{n1}"
[[pools.backends]]
name = "t2"
address = "127.0.0.1:{n2}"

[[listeners]]
name = "http"
mode = "http"
bind = "127.0.0.1:{http}"
pool = "web"
forwarded_headers = true
[[listeners.routes]]
host = "api.bench.test"
pool = "api"
[[listeners.routes]]
path_prefix = "/api/"
pool = "api"
[[listeners.routes]]
pool = "api"
[listeners.routes.header]
name = "X-Bench-Api"
[listeners.timeouts]
client_idle = "120s"
header = "120s"

[[listeners]]
name = "https"
mode = "http"
bind = "127.0.0.1:{https}"
pool = "web"
forwarded_headers = true
[listeners.tls]
[[listeners.tls.certificates]]
cert = "{dir}/bench-tls.crt"
key = "{dir}/bench-tls.key"
[listeners.timeouts]
client_idle = "120s"
header = "120s"

[[listeners]]
name = "tcp"
mode = "tcp"
bind = "127.0.0.1:{tcp}"
pool = "iperf"

[[listeners]]
name = "tcpsplice"
mode = "tcp"
bind = "127.0.0.1:{tcpsplice}"
pool = "iperf"
relay = "splice"

[[listeners]]
name = "udp"
mode = "udp"
bind = "127.0.0.1:{tcp}"
pool = "iperf"

[[listeners]]
name = "tcpidle"
mode = "tcp"
bind = "127.0.0.1:{tcpidle}"
pool = "nginx-tcp"

# the grpc case: a grpcio server (lab.grpc_backend), HTTP/2 end to end
[[pools]]
name = "grpc"
proto = "h2"
[[pools.backends]]
name = "g1"
address = "127.0.0.1:{g1}"

[[listeners]]
name = "grpc"
mode = "http"
bind = "127.0.0.1:{grpc}"
pool = "grpc"
"""

# The l7log case: the L7 frontend alone, the same work as above plus one access log line per
# request to a file. HAProxy: option httplog, "log stdout format raw" (its stdout is the file,
# one write(2) per line); halb: [access_log] to a file (its writer thread, batched writes).
HAPROXY_LOG_CONF = """
global
    nbthread 1
    maxconn 7000
    tune.maxaccept 64
    log stdout format raw local0
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-request 120s
    timeout http-keep-alive 120s
frontend fe_http
    bind 127.0.0.1:{http}
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header Forwarded 'for=%[src];proto=http;host="%[req.hdr(host)]"'
    default_backend be_web
backend be_web
    balance roundrobin
    http-reuse always
    server n1 127.0.0.1:{n1}
    server n2 127.0.0.1:{n2}
"""

# The cache case: a third pair whose only frontend answers a 4 KiB object from its cache
# (the same object, the same max-age on both sides: HAProxy's "cache" section as its users
# configure it, halb's [listeners.cache]); the uncached path is the l7 case.
HAPROXY_CACHE_CONF = """
global
    nbthread 1
    maxconn 7000
    tune.maxaccept 64
cache objects
    total-max-size 64
    max-object-size 1048576
    max-age 3600
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-request 120s
    timeout http-keep-alive 120s
frontend fe_http
    bind 127.0.0.1:{http}
    http-request cache-use objects
    http-response cache-store objects
    default_backend be_web
backend be_web
    balance roundrobin
    http-reuse always
    server n1 127.0.0.1:{n1}
    server n2 127.0.0.1:{n2}
"""

HALB_CACHE_CONF = """
[node]
name = "bench-cache"
log_level = "warning"
state_dir = "{dir}/halb-cache-state"

[metrics]
address = "127.0.0.1:{metrics}"

[access_log]
enabled = false

""" + _HALB_WEB_POOL + """
[[listeners]]
name = "http"
mode = "http"
bind = "127.0.0.1:{http}"
pool = "web"
[listeners.cache]
max_size = "64MiB"
max_object = "1MiB"
max_age = "1h"
[listeners.timeouts]
client_idle = "120s"
header = "120s"
"""

MANY = 1000  # keep-alive client connections of the l7many case
BIG_PATH, BIG_SIZE = "/files/64k", 64 << 10  # the big case's body
DL_PATH, DL_SIZE = "/files/200m", 200 * 10**6  # the dl case's download
CLOSE_CONNS = 32  # the close case: a new client connection per request
HTTPS_CONNS = 64  # the https case: keep-alive
HANDSHAKE_CONNS = 16  # the httpsnew (wrk) and httpsresume (openssl s_time) cases
CACHED_PATH = "/cached/obj"
CACHED_SIZE = 4096

HALB_LOG_CONF = """
[node]
name = "bench-log"
log_level = "warning"
state_dir = "{dir}/halb-log-state"

[metrics]
address = "127.0.0.1:{metrics}"

[access_log]
destination = "file:{dir}/halb-access.log"
format = "text"

""" + _HALB_WEB_POOL + """
[[pools]]
name = "api"
[[pools.backends]]
name = "a1"
address = "127.0.0.1:{n1}"

[[listeners]]
name = "http"
mode = "http"
bind = "127.0.0.1:{http}"
pool = "web"
forwarded_headers = true
[[listeners.routes]]
host = "api.bench.test"
pool = "api"
[[listeners.routes]]
path_prefix = "/api/"
pool = "api"
[[listeners.routes]]
pool = "api"
[listeners.routes.header]
name = "X-Bench-Api"
[listeners.timeouts]
client_idle = "120s"
header = "120s"
"""


# ---------------------------------------------------------------------------------------------
# Measurements


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def parse_wrk(out: str) -> dict:
    r: dict = {}
    m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    r["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"^\s*99%\s+([0-9.]+)(us|ms|s|m)\s*$", out, re.M)
    r["p99_ms"] = float(m.group(1)) * _UNITS[m.group(2)] * 1000 if m else float("nan")
    m = re.search(r"^\s*50%\s+([0-9.]+)(us|ms|s|m)\s*$", out, re.M)
    r["p50_ms"] = float(m.group(1)) * _UNITS[m.group(2)] * 1000 if m else float("nan")
    m = re.search(r"(\d+) requests in ([0-9.]+)(us|ms|s|m)", out)
    r["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return r


def l7(pid: int, port: int, duration: int, conns: int, path: str = "/", *,
       scheme: str = "http", headers: tuple[str, ...] = ()) -> dict:
    url = f"{scheme}://127.0.0.1:{port}{path}"
    hdr = [x for h in headers for x in ("-H", h)]
    # warm up (backend connections, caches)
    warm = parse_wrk(run(["wrk", "-t1", "-c8", "-d1s"] + hdr + [url], 30))
    u0, s0 = cpu_split(pid)
    out = run(["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency"] + hdr + [url],
              duration + 60)
    u1, s1 = cpu_split(pid)
    r = parse_wrk(out)
    r["warmup_requests"] = warm["requests"]
    n = r["requests"]
    r["cpu_s"] = (u1 - u0) + (s1 - s0)
    r["cpu_us_per_req"] = r["cpu_s"] * 1e6 / n if n else float("nan")
    # the user-space and kernel shares: where the proxies differ
    r["user_us_per_req"] = (u1 - u0) * 1e6 / n if n else float("nan")
    r["sys_us_per_req"] = (s1 - s0) * 1e6 / n if n else float("nan")
    return r


def s_time(pid: int, port: int, duration: int, procs: int, reuse: bool,
           tls12: bool = False) -> dict:
    """``procs`` openssl s_time processes side by side, each one connection at a time (a TLS
    handshake, ``GET /`` in HTTP/1.0, the close): with ``reuse``, every connection after each
    process's first resumes that first session (the ticket or the session ID), else each is a
    full handshake. Connections/s in all and the proxy's CPU per connection. TLS 1.3 (the
    default) resumes with a new key exchange (psk_dhe_ke: X25519 on both sides, no signature);
    ``tls12``: TLS 1.2's abbreviated handshake (no key exchange at all)."""
    argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-www", "/", "-time",
            str(duration), "-reuse" if reuse else "-new"] + (["-tls1_2"] if tls12 else [])
    u0, s0 = cpu_split(pid)
    t0 = time.monotonic()
    ps = [subprocess.Popen(PRIO + ["taskset", "-c", LOAD_CORE] + argv, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for _ in range(procs)]
    outs = []
    for p in ps:
        try:
            outs.append(p.communicate(timeout=duration + 60)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate()[0])
    u1, s1 = cpu_split(pid)
    wall = time.monotonic() - t0
    n = 0
    for o in outs:
        # "1234 connections in 1.01s; 1221.78 connections/user sec, bytes read 0" (the time
        # is s_time's own user CPU time, not the wall clock's); with -reuse, the line after
        # "Now timing with session id reuse."
        m = re.findall(r"(\d+) connections in ([0-9.]+)s;", o)
        if m:
            n += int(m[-1][0])
    return {"rps": n / wall if wall else 0.0, "requests": n, "cpu_s": (u1 - u0) + (s1 - s0),
            "cpu_us_per_req": ((u1 - u0) + (s1 - s0)) * 1e6 / n if n else float("nan"),
            "user_us_per_req": (u1 - u0) * 1e6 / n if n else float("nan"),
            "sys_us_per_req": (s1 - s0) * 1e6 / n if n else float("nan"),
            "p99_ms": float("nan"), "p50_ms": float("nan"), "socket_errors": 0, "non2xx": 0}


def _vm_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def download(pid: int, port: int) -> dict:
    """One 200 MB download through the proxy with curl: MB/s, the proxy's CPU per MB and its
    peak RSS during the download (VmHWM, reset just before through /proc/PID/clear_refs)."""
    rss0 = _vm_kib(pid, "VmRSS")
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    u0, s0 = cpu_split(pid)
    out = run(["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}",
               f"http://127.0.0.1:{port}{DL_PATH}"], 300)
    u1, s1 = cpu_split(pid)
    size, secs = out.split()
    size_b, secs_f = int(size), float(secs)
    if size_b != DL_SIZE:
        raise RuntimeError(f"download: {size_b} bytes, expected {DL_SIZE}")
    peak = _vm_kib(pid, "VmHWM")
    mb = size_b / 1e6
    return {"mb_per_s": mb / secs_f if secs_f else 0.0, "seconds": secs_f,
            "cpu_s": (u1 - u0) + (s1 - s0), "cpu_ms_per_mb": ((u1 - u0) + (s1 - s0)) * 1e3 / mb,
            "rss_before_kib": rss0, "peak_rss_kib": peak, "peak_growth_kib": peak - rss0}


H2_CONNS, H2_STREAMS = 16, 4  # h2load -c16 -m4: 64 streams in flight over 16 connections


def parse_h2load(out: str) -> dict:
    r: dict = {}
    m = re.search(r"finished in ([0-9.]+)(us|ms|s|m), ([0-9.]+) req/s", out)
    r["rps"] = float(m.group(3)) if m else 0.0
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    if m:
        r["requests"] = int(m.group(3))
        r["succeeded"] = int(m.group(4))
        r["failed"] = int(m.group(5)) + int(m.group(6)) + int(m.group(7))
    else:
        r["requests"] = r["succeeded"] = r["failed"] = 0
    m = re.search(r"status codes: (\d+) 2xx", out)
    r["ok_2xx"] = int(m.group(1)) if m else 0
    return r


def h2(pid: int, port: int, duration: int) -> dict:
    """HTTP/2 requests through the proxy: h2load, 64 streams over 16 connections."""
    url = f"http://127.0.0.1:{port}/"
    run(["h2load", "-c4", "-m4", "-n2000", url], 60)  # warm up
    u0, s0 = cpu_split(pid)
    out = run(["h2load", "-t1", f"-c{H2_CONNS}", f"-m{H2_STREAMS}", "-D", str(duration),
               url], duration + 60)
    u1, s1 = cpu_split(pid)
    r = parse_h2load(out)
    n = r["requests"]
    r["cpu_s"] = (u1 - u0) + (s1 - s0)
    r["cpu_us_per_req"] = r["cpu_s"] * 1e6 / n if n else float("nan")
    r["user_us_per_req"] = (u1 - u0) * 1e6 / n if n else float("nan")
    r["sys_us_per_req"] = (s1 - s0) * 1e6 / n if n else float("nan")
    return r


def grpc_calls(pid: int, port: int, duration: int) -> dict:
    """gRPC unary calls through the proxy (bench/grpc_load.py on the load core)."""
    load = [PY, str(ROOT / "bench" / "grpc_load.py"), "--target", f"127.0.0.1:{port}",
            "--threads", "32"]
    run(load + ["--duration", "1"], 60)  # warm up
    u0, s0 = cpu_split(pid)
    r = json.loads(run(load + ["--duration", str(duration)], duration + 60).strip()
                   .splitlines()[-1])
    u1, s1 = cpu_split(pid)
    n = r["calls"]
    r["rps"] = r["calls_per_s"]
    r["cpu_us_per_req"] = ((u1 - u0) + (s1 - s0)) * 1e6 / n if n else float("nan")
    r["user_us_per_req"] = (u1 - u0) * 1e6 / n if n else float("nan")
    r["sys_us_per_req"] = (s1 - s0) * 1e6 / n if n else float("nan")
    return r


def _count_lines(path: Path, needle: str) -> int:
    try:
        with open(path, "rb") as f:
            nb = needle.encode()
            return sum(1 for line in f if nb in line)
    except OSError:
        return -1


def _scrape(port: int, name: str) -> float:
    import urllib.request
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return float("nan")
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def _check_cached(port: int, who: str) -> None:
    """The cache case measures hits: the object must come back whole and, the second time,
    from the cache (HAProxy and halb both send Age then)."""
    import urllib.request
    url = f"http://127.0.0.1:{port}{CACHED_PATH}"
    for i in range(2):
        with urllib.request.urlopen(url, timeout=5) as r:
            body = r.read()
            if len(body) != CACHED_SIZE:
                raise RuntimeError(f"{who}: {len(body)} bytes from {url}")
            if i == 1 and r.headers.get("Age") is None:
                raise RuntimeError(f"{who}: the second answer has no Age: not from a cache")


def l4conn(pid: int, port: int, duration: int, conns: int) -> dict:
    """New TCP connections per second through the L4 listener: wrk with Connection: close, so
    each request is one client connection and one backend connection (nginx answers)."""
    url = f"http://127.0.0.1:{port}/"
    c0 = cpu_seconds(pid)
    out = run(["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "-H",
               "Connection: close", url], duration + 60)
    c1 = cpu_seconds(pid)
    r = parse_wrk(out)
    r["cpu_s"] = c1 - c0
    r["cpu_us_per_conn"] = (c1 - c0) * 1e6 / r["requests"] if r["requests"] else float("nan")
    return r


def udp(pid: int, port: int, duration: int, rate: str) -> dict:
    """iperf3 -u through the UDP listener (its TCP control connection through the TCP listener
    on the same port): received Gbit/s, datagrams/s and loss at send rate ``rate`` (0: as fast
    as the sender can)."""
    c0 = cpu_seconds(pid)
    out = run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-u", "-b", rate, "-l", "1400",
               "-t", str(duration), "-J"], duration + 60)
    c1 = cpu_seconds(pid)
    j = json.loads(out)
    sm = j["end"]["sum"]
    pkts, lost = sm.get("packets", 0), sm.get("lost_packets", 0)
    secs = sm.get("seconds", duration) or duration
    got = max(0, pkts - lost)
    return {"gbps": got * 1400 * 8 / secs / 1e9, "dgrams_per_s": got / secs,
            "lost_percent": sm.get("lost_percent", 0.0), "cpu_s": c1 - c0,
            "cpu_us_per_dgram": (c1 - c0) * 1e6 / got if got else float("nan")}


def l4(pid: int, port: int, duration: int) -> dict:
    c0 = cpu_seconds(pid)
    out = run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(duration), "-J"],
              duration + 60)
    c1 = cpu_seconds(pid)
    j = json.loads(out)
    end = j["end"]
    bps = end["sum_received"]["bits_per_second"]
    nbytes = end["sum_received"]["bytes"]
    return {"gbps": bps / 1e9, "bytes": nbytes, "cpu_s": c1 - c0,
            "cpu_s_per_gb": (c1 - c0) / (nbytes / 1e9) if nbytes else float("nan")}


def idle_memory(pid: int, port: int, n: int, check_backend: bool) -> dict:
    """Opens n idle client connections, measures the RSS growth per connection."""
    time.sleep(0.5)
    before = rss_bytes(pid)
    socks = []
    try:
        for i in range(n):
            s = socket.socket()
            s.connect(("127.0.0.1", port))
            socks.append(s)
            if i % 500 == 499:
                time.sleep(0.02)  # let the proxy accept (and connect backends) as we go
        time.sleep(2.0)
        if check_backend:  # L4: the last connection really reaches a backend through the proxy
            s = socks[-1]
            s.settimeout(5)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            if b"hello from" not in s.recv(4096):
                raise RuntimeError("idle L4 connection does not reach a backend")
        time.sleep(0.5)
        after = rss_bytes(pid)
        alive = 0
        for s in socks[:50]:  # are they still held open?
            s.setblocking(False)
            try:
                alive += s.recv(1) != b""
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
    finally:
        for s in socks:
            s.close()
    time.sleep(1.0)
    return {"conns": n, "rss_before": before, "rss_after": after,
            "bytes_per_conn": (after - before) / n, "sample_alive": f"{alive}/50"}


def profile(procs: Procs, pid: int, seconds: int, out: Path, load: list[str]) -> dict:
    """py-spy samples halbd while ``load`` runs; returns the top leaf functions by share."""
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists():
        return {"error": "py-spy not installed (./dev bench installs it)"}
    rec = subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "250",
                            "-f", "raw", "-o", str(out), "--native"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True)
    time.sleep(0.5)
    try:
        run(load, seconds + 60)
    finally:
        try:
            rec.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            os.killpg(rec.pid, signal.SIGKILL)
    if not out.exists():
        return {"error": (rec.stderr.read() or b"").decode()[-300:]}
    return summarize_profile(out)


def summarize_profile(out: Path) -> dict:
    """Self and inclusive shares of the event-loop thread's busy samples in a raw py-spy file."""
    leaf: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = idle = 0
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit() or "Runner.run" not in stack:
            continue  # only the event-loop thread (metrics/gRPC threads sit idle)
        k = int(n)
        frames = [_short(x) for x in stack.split(";")]
        if frames[-1].startswith(("epoll_wait", "epoll_pwait")):
            idle += k  # the loop waiting for readiness: not work
            continue
        total += k
        leaf[frames[-1]] += k
        for f in set(frames):
            if ".py)" in f and not f.endswith(("(runners.py)", "(halbd.py)")):
                incl[f] += k
    top = [(f, round(100 * c / total, 1)) for f, c in leaf.most_common(15)] if total else []
    topi = [(f, round(100 * c / total, 1)) for f, c in incl.most_common(20)] if total else []
    return {"samples": total, "idle_samples": idle, "self": top, "inclusive": topi,
            "file": str(out)}


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    m = re.match(r"(.*) \((.*?):?\d*\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({Path(m.group(2)).name})"


# ---------------------------------------------------------------------------------------------
# The run


def machine() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ver = lambda argv: (subprocess.run(argv, capture_output=True, text=True).stdout  # noqa: E731
                        + subprocess.run(argv, capture_output=True, text=True).stderr).strip()
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(),
            "haproxy": ver([HAPROXY[0], "-v"]).splitlines()[0] if shutil.which(HAPROXY[0]) else "",
            "nginx": ver(["nginx", "-v"]).strip() if shutil.which("nginx") else "",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def median_run(runs: list[dict], metric: str) -> dict:
    """The run whose ``metric`` is the median (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda x: x[metric])
    return dict(ordered[(len(ordered) - 1) // 2])


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds per run (1..120)")
    ap.add_argument("--conns", type=int, default=64, help="wrk connections")
    ap.add_argument("--idle", type=int, default=5000, help="idle connections held (memory)")
    ap.add_argument("--only", default="l7,l7many,l7log,cache,big,close,https,httpsnew,"
                    "httpsresume,httpsresume12,dl,h2,grpc,l4,l4conn,udp,mem",
                    help="comma list of l7, l7many (L7 with 1000 keep-alive connections), "
                    "h2 (HTTP/2: h2load, 64 streams over 16 connections), grpc (gRPC unary "
                    "calls), "
                    "l7log (L7 with access logs to a file on both sides), cache (a 4 KiB object "
                    "from each proxy's HTTP cache), big (a 64 KiB body), close (Connection: "
                    "close, 32 connections), https (TLS keep-alive, 64 connections), httpsnew "
                    "(a full TLS handshake per request, wrk -c16 Connection: close), "
                    "httpsresume (a resumed TLS 1.3 session per request, 16 openssl s_time "
                    "-reuse), httpsresume12 (the same in TLS 1.2), "
                    "dl (a 200 MB download: MB/s, peak RSS), l4, l4conn, udp, mem")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating runs per proxy and measurement; the median is kept (1..7)")
    ap.add_argument("--nice", type=int, default=-10,
                    help="niceness of everything the bench starts (default -10; needs root)")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                    help="py-spy profile of halbd during extra L7 and L4 runs (default on)")
    ap.add_argument("--haproxy", default="haproxy",
                    help="the HAProxy binary to compare with (default: haproxy on PATH, "
                    "Debian's 2.6; e.g. ../shared/tools/haproxy-3.5)")
    a = ap.parse_args(argv)
    HAPROXY[0] = a.haproxy
    a.duration = max(1, min(a.duration, 120))
    a.rounds = max(1, min(a.rounds, 7))
    a.idle = max(100, min(a.idle, 8000))
    only = set(a.only.split(","))
    for tool in (HAPROXY[0], "nginx", "wrk", "iperf3", "taskset") + (
            ("h2load",) if "h2" in only else ()):
        if not shutil.which(tool):
            log(f"missing {tool} (./dev bench installs it)")
            return 2
    if (os.cpu_count() or 1) < 2:
        log("needs 2 cores (proxy on core 0, load and backends on core 1)")
        return 2
    from halb.proxy.sockets import raise_nofile
    raise_nofile(2 * a.idle + 1024)
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # this script holds idle connections: core 1
    if a.nice and (a.nice > 0 or os.geteuid() == 0):
        PRIO[:] = ["nice", "-n", str(max(-20, min(19, a.nice)))]

    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="halb-bench-"))
    procs = Procs(tmp)
    P = {k: free_port() for k in BACKEND_PORTS}
    ports = {w: {k: free_port() for k in PROXY_PORTS}
             for w in ("haproxy", "halb", "haproxy-log", "halb-log", "haproxy-cache",
                       "halb-cache")}
    results: dict = {"machine": machine(), "args": vars(a), "load_before": loadavg(),
                     "haproxy": {}, "halb": {}}
    log(f"machine: {results['machine']['nproc']} x {results['machine']['cpu']}; "
        f"load {results['load_before']}; work dir {tmp}")
    results["busy_cores_before"] = round(busy_elsewhere(), 2)
    running: dict[str, subprocess.Popen] = {}
    try:
        def start_backend(name: str, argv_for) -> None:
            for attempt in range(3):  # a port found free a moment ago can be taken meanwhile
                p = procs.start(name, argv_for(P[key_of[name]]), LOAD_CORE)
                try:
                    wait_port(P[key_of[name]], proc=p)
                    return
                except RuntimeError:
                    if attempt == 2:
                        raise
                    P[key_of[name]] = free_port()

        key_of = {"nginx-n1": "n1", "nginx-n2": "n2", "iperf3-server": "iperf",
                  "grpc-g1": "g1"}
        (tmp / "www" / "cached").mkdir(parents=True)
        (tmp / "www" / "cached" / "obj").write_bytes(b"c" * (CACHED_SIZE - 1) + b"\n")
        (tmp / "www" / "files").mkdir()
        (tmp / "www" / "files" / "64k").write_bytes(os.urandom(BIG_SIZE))
        with open(tmp / "www" / "files" / "200m", "wb") as f:  # sparse: read from the page
            f.truncate(DL_SIZE)  # cache as zeros, no disk in the way
        make_tls_cert(tmp)
        for name in ("n1", "n2"):
            conf = tmp / f"nginx-{name}.conf"

            def nginx_argv(port, conf=conf, name=name):
                conf.write_text(NGINX_CONF.format(dir=tmp, name=name, port=port))
                return ["nginx", "-c", str(conf), "-p", str(tmp)]
            start_backend(f"nginx-{name}", nginx_argv)
        start_backend("iperf3-server", lambda port: ["iperf3", "-s", "-p", str(port)])
        if "grpc" in only:
            start_backend("grpc-g1", lambda port: [PY, "-m", "lab.grpc_backend", "--name", "g1",
                                                    "--listen", f"127.0.0.1:{port}"])

        hconf = tmp / "haproxy.cfg"
        hconf.write_text(HAPROXY_CONF.format(dir=tmp, **P, **ports["haproxy"]))
        lconf = tmp / "halb.toml"
        (tmp / "halb-state").mkdir()
        lconf.write_text(HALB_CONF.format(dir=tmp, **P, **ports["halb"]))
        # the l7log pair: HAProxy's stdout (its log) goes to haproxy-access.log (Procs.start)
        hlconf = tmp / "haproxy-log.cfg"
        hlconf.write_text(HAPROXY_LOG_CONF.format(**P, **ports["haproxy-log"]))
        llconf = tmp / "halb-log.toml"
        (tmp / "halb-log-state").mkdir()
        llconf.write_text(HALB_LOG_CONF.format(dir=tmp, **P, **ports["halb-log"]))
        hcconf = tmp / "haproxy-cache.cfg"
        hcconf.write_text(HAPROXY_CACHE_CONF.format(**P, **ports["haproxy-cache"]))
        lcconf = tmp / "halb-cache.toml"
        (tmp / "halb-cache-state").mkdir()
        lcconf.write_text(HALB_CACHE_CONF.format(dir=tmp, **P, **ports["halb-cache"]))

        def start_proxy(which: str) -> subprocess.Popen:
            if which == "haproxy":
                p = procs.start("haproxy", [HAPROXY[0], "-db", "-f", str(hconf)], PROXY_CORE)
            elif which == "halb":
                p = procs.start("halbd", [PY, "-m", "halb.cli.halbd", str(lconf)], PROXY_CORE)
            elif which == "haproxy-log":
                p = procs.start("haproxy-access", [HAPROXY[0], "-db", "-f", str(hlconf)],
                                PROXY_CORE)
            elif which == "haproxy-cache":
                p = procs.start("haproxy-cache", [HAPROXY[0], "-db", "-f", str(hcconf)],
                                PROXY_CORE)
            elif which == "halb-cache":
                p = procs.start("halbd-cache", [PY, "-m", "halb.cli.halbd", str(lcconf)],
                                PROXY_CORE)
            else:
                p = procs.start("halbd-log", [PY, "-m", "halb.cli.halbd", str(llconf)],
                                PROXY_CORE)
            for k in ("http", "tcp", "tcpidle", "https") if which in ("haproxy", "halb") \
                    else ("http",):
                wait_port(ports[which][k], proc=p)
            time.sleep(0.5)
            return p

        def record(which: str, key: str, x: dict) -> None:
            results[which].setdefault(key + "_runs", []).append(x)

        # Both proxies run side by side (the idle one costs nothing); every measurement
        # alternates between them, the order flipping each round, so that drifting load on a
        # shared machine hits both alike. The summary takes each measurement's median run.
        for w in ("haproxy", "halb"):
            running[w] = start_proxy(w)
        if "l7log" in only:
            for w in ("haproxy-log", "halb-log"):
                running[w] = start_proxy(w)
        if "cache" in only:
            for w in ("haproxy-cache", "halb-cache"):
                running[w] = start_proxy(w)
                _check_cached(ports[w]["http"], w)
        served_log = {"haproxy": 0, "halb": 0}  # requests the l7log proxies answered
        for rnd in range(a.rounds):
            order = ("haproxy", "halb") if rnd % 2 == 0 else ("halb", "haproxy")
            log(f"round {rnd + 1}/{a.rounds}")
            for w in order if "l7" in only else ():
                x = l7(running[w].pid, ports[w]["http"], a.duration, a.conns)
                log(f"  {w:7s} L7 {x['rps']:.0f} req/s p99 {x['p99_ms']:.2f} ms "
                    f"{x['cpu_us_per_req']:.1f} us CPU/req = {x['user_us_per_req']:.1f} user + "
                    f"{x['sys_us_per_req']:.1f} sys (errors {x['socket_errors']}, "
                    f"non-2xx {x['non2xx']})")
                record(w, "l7", x)
            for w in order if "h2" in only else ():
                x = h2(running[w].pid, ports[w]["http"], a.duration)
                log(f"  {w:7s} HTTP/2 {x['rps']:.0f} req/s {x['cpu_us_per_req']:.1f} us CPU/req "
                    f"= {x['user_us_per_req']:.1f} user + {x['sys_us_per_req']:.1f} sys "
                    f"({x['succeeded']} ok, {x['failed']} failed)")
                record(w, "h2", x)
            for w in order if "grpc" in only else ():
                x = grpc_calls(running[w].pid, ports[w]["grpc"], a.duration)
                log(f"  {w:7s} gRPC {x['rps']:.0f} unary calls/s {x['cpu_us_per_req']:.1f} us "
                    f"CPU/call = {x['user_us_per_req']:.1f} user + {x['sys_us_per_req']:.1f} sys "
                    f"({x['errors']} errors)")
                record(w, "grpc", x)
            for w in order if "l7many" in only else ():
                x = l7(running[w].pid, ports[w]["http"], a.duration, MANY)
                log(f"  {w:7s} L7 {MANY} connections: {x['rps']:.0f} req/s p99 "
                    f"{x['p99_ms']:.2f} ms {x['cpu_us_per_req']:.1f} us CPU/req "
                    f"(errors {x['socket_errors']}, non-2xx {x['non2xx']})")
                record(w, "l7many", x)
            for w in order if "l7log" in only else ():
                x = l7(running[w + "-log"].pid, ports[w + "-log"]["http"], a.duration, a.conns)
                served_log[w] += x["requests"] + x.get("warmup_requests", 0)
                log(f"  {w:7s} L7 access log to a file: {x['rps']:.0f} req/s p99 "
                    f"{x['p99_ms']:.2f} ms {x['cpu_us_per_req']:.1f} us CPU/req = "
                    f"{x['user_us_per_req']:.1f} user + {x['sys_us_per_req']:.1f} sys "
                    f"(errors {x['socket_errors']}, non-2xx {x['non2xx']})")
                record(w, "l7log", x)
            for w in order if "cache" in only else ():
                x = l7(running[w + "-cache"].pid, ports[w + "-cache"]["http"], a.duration,
                       a.conns, CACHED_PATH)
                log(f"  {w:7s} L7 cache hits (4 KiB): {x['rps']:.0f} req/s p99 "
                    f"{x['p99_ms']:.2f} ms {x['cpu_us_per_req']:.1f} us CPU/req "
                    f"(errors {x['socket_errors']}, non-2xx {x['non2xx']})")
                record(w, "cache", x)
            for w in order if "big" in only else ():
                x = l7(running[w].pid, ports[w]["http"], a.duration, a.conns, BIG_PATH)
                log(f"  {w:7s} L7 64 KiB bodies: {x['rps']:.0f} req/s p99 {x['p99_ms']:.2f} ms "
                    f"{x['cpu_us_per_req']:.1f} us CPU/req (errors {x['socket_errors']}, "
                    f"non-2xx {x['non2xx']})")
                record(w, "big", x)
            for w in order if "close" in only else ():
                x = l7(running[w].pid, ports[w]["http"], a.duration, CLOSE_CONNS,
                       headers=("Connection: close",))
                log(f"  {w:7s} L7 Connection: close: {x['rps']:.0f} req/s p99 "
                    f"{x['p99_ms']:.2f} ms {x['cpu_us_per_req']:.1f} us CPU/req (errors "
                    f"{x['socket_errors']}, non-2xx {x['non2xx']})")
                record(w, "close", x)
            for w in order if "https" in only else ():
                x = l7(running[w].pid, ports[w]["https"], a.duration, HTTPS_CONNS,
                       scheme="https")
                log(f"  {w:7s} HTTPS keep-alive: {x['rps']:.0f} req/s p99 {x['p99_ms']:.2f} ms "
                    f"{x['cpu_us_per_req']:.1f} us CPU/req (errors {x['socket_errors']}, "
                    f"non-2xx {x['non2xx']})")
                record(w, "https", x)
            for w in order if "httpsnew" in only else ():
                x = l7(running[w].pid, ports[w]["https"], a.duration, HANDSHAKE_CONNS,
                       scheme="https", headers=("Connection: close",))
                log(f"  {w:7s} HTTPS full handshake per request: {x['rps']:.0f} req/s p99 "
                    f"{x['p99_ms']:.2f} ms {x['cpu_us_per_req']:.1f} us CPU/req (errors "
                    f"{x['socket_errors']}, non-2xx {x['non2xx']})")
                record(w, "httpsnew", x)
            for w in order if "httpsresume" in only else ():
                x = s_time(running[w].pid, ports[w]["https"], a.duration, HANDSHAKE_CONNS, True)
                log(f"  {w:7s} HTTPS resumed session per request (s_time -reuse): "
                    f"{x['rps']:.0f} conn/s {x['cpu_us_per_req']:.1f} us CPU/conn")
                record(w, "httpsresume", x)
            for w in order if "httpsresume12" in only else ():
                x = s_time(running[w].pid, ports[w]["https"], a.duration, HANDSHAKE_CONNS, True,
                           tls12=True)
                log(f"  {w:7s} HTTPS TLS 1.2 resumed session per request (s_time -reuse "
                    f"-tls1_2): {x['rps']:.0f} conn/s {x['cpu_us_per_req']:.1f} us CPU/conn")
                record(w, "httpsresume12", x)
            for w in order if "dl" in only else ():
                x = download(running[w].pid, ports[w]["http"])
                log(f"  {w:7s} 200 MB download: {x['mb_per_s']:.0f} MB/s "
                    f"{x['cpu_ms_per_mb']:.2f} ms CPU/MB, peak RSS {x['peak_rss_kib'] / 1024:.1f} "
                    f"MiB (+{x['peak_growth_kib'] / 1024:.1f})")
                record(w, "dl", x)
            for w in order if "l4" in only else ():
                x = l4(running[w].pid, ports[w]["tcp"], a.duration)
                log(f"  {w:7s} L4 {x['gbps']:.2f} Gbit/s {x['cpu_s_per_gb']:.3f} CPU s/GB")
                record(w, "l4", x)
                # for reference: splicing forced on (HAProxy splice-request/-response, halb
                # relay = "splice")
                x = l4(running[w].pid, ports[w]["tcpsplice"], a.duration)
                log(f"  {w:7s} L4 (forced splice) {x['gbps']:.2f} Gbit/s "
                    f"{x['cpu_s_per_gb']:.3f} CPU s/GB")
                record(w, "l4_forced", x)
            for w in order if "l4conn" in only else ():
                x = l4conn(running[w].pid, ports[w]["tcpidle"], a.duration, a.conns)
                log(f"  {w:7s} L4 {x['rps']:.0f} new conn/s p99 {x['p99_ms']:.2f} ms "
                    f"{x['cpu_us_per_conn']:.1f} us CPU/conn (errors {x['socket_errors']})")
                record(w, "l4conn", x)
            if "udp" in only:  # halb only: HAProxy does not proxy UDP
                for key, rate in (("udp", "0"), ("udp_paced", "100M")):
                    x = udp(running["halb"].pid, ports["halb"]["tcp"], a.duration, rate)
                    log(f"  halb    UDP -b {rate}: {x['gbps']:.2f} Gbit/s "
                        f"{x['dgrams_per_s']:.0f} datagrams/s lost {x['lost_percent']:.1f}% "
                        f"{x['cpu_us_per_dgram']:.2f} us CPU/dgram")
                    record("halb", key, x)
        if "l7log" in only:  # the same work on both sides: a line per request, in a file
            time.sleep(0.5)  # (halb's writer flushes every 100 ms)
            results["l7log_files"] = logged = {
                "haproxy": _count_lines(tmp / "haproxy-access.log", " fe_http be_web/"),
                "halb": _count_lines(tmp / "halb-access.log", " http web/"),
                "halb_dropped": _scrape(ports["halb-log"]["metrics"],
                                        "halb_access_log_dropped_total"),
                "served": served_log}
            log(f"  access log lines: halb {logged['halb']} (dropped "
                f"{logged['halb_dropped']}), HAProxy {logged['haproxy']}; requests answered "
                f"(wrk's count, without those in flight at the end): halb "
                f"{served_log['halb']}, HAProxy {served_log['haproxy']}")
        if a.profile:
            pid, hp = running["halb"].pid, ports["halb"]
            d = min(a.duration, 10)
            r = results["halb"]
            if "l7" in only:
                r["profile_l7"] = profile(procs, pid, d, OUT / "profile-l7.txt",
                                          ["wrk", "-t1", f"-c{a.conns}", f"-d{d}s",
                                           f"http://127.0.0.1:{hp['http']}/"])
            if "l4" in only:
                r["profile_l4"] = profile(procs, pid, d, OUT / "profile-l4.txt",
                                          ["iperf3", "-c", "127.0.0.1", "-p", str(hp["tcp"]),
                                           "-t", str(d)])
            if "l4conn" in only:
                r["profile_l4conn"] = profile(procs, pid, d, OUT / "profile-l4conn.txt",
                                              ["wrk", "-t1", f"-c{a.conns}", f"-d{d}s", "-H",
                                               "Connection: close",
                                               f"http://127.0.0.1:{hp['tcpidle']}/"])
        if "mem" in only:
            # each on a freshly started proxy: memory freed by one test and reused by the
            # next would hide the second one's cost
            for w in ("haproxy", "halb"):
                for key, port, l4check in (("mem_l4", "tcpidle", True), ("mem_l7", "http", False)):
                    procs.stop(running[w])
                    time.sleep(0.5)
                    running[w] = start_proxy(w)
                    x = idle_memory(running[w].pid, ports[w][port], a.idle, l4check)
                    log(f"  {w:7s} idle {key[-2:].upper()} {x['bytes_per_conn']:.0f} B/conn "
                        f"({x['sample_alive']} alive)")
                    results[w][key] = x
    finally:
        for p in running.values():
            procs.stop(p)
        procs.close()
        results["load_after"] = loadavg()
        if sys.exc_info()[0] is not None:  # keep the logs of a failed run for a look
            log(f"failed; logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    for w in ("haproxy", "halb"):
        r = results[w]
        for key, metric in (("l7", "rps"), ("l7many", "rps"), ("l7log", "rps"), ("cache", "rps"),
                            ("big", "rps"), ("close", "rps"), ("https", "rps"),
                            ("httpsnew", "rps"), ("httpsresume", "rps"),
                            ("httpsresume12", "rps"), ("dl", "mb_per_s"),
                            ("h2", "rps"), ("grpc", "rps"),
                            ("l4", "gbps"),
                            ("l4_forced", "gbps"), ("l4conn", "rps"), ("udp", "dgrams_per_s"),
                            ("udp_paced", "dgrams_per_s")):
            runs = r.get(key + "_runs")
            if runs:
                r[key] = median_run(runs, metric)
                r[key]["range"] = (min(x[metric] for x in runs), max(x[metric] for x in runs))
                if key in ("l7", "l7many", "l7log", "cache", "big", "close", "https",
                           "httpsnew"):  # each percentile's own median over the runs: on a shared
                    # machine p99 varies far more from run to run than the rate does
                    for pk in ("p50_ms", "p99_ms"):
                        r[key][pk + "_of_median_run"] = r[key][pk]
                        r[key][pk] = statistics.median(x[pk] for x in runs)

    md = report(results)
    (OUT / "latest.json").write_text(json.dumps(results, indent=2))
    (OUT / "latest.md").write_text(md)
    print(md)
    return 0


def report(res: dict) -> str:
    m, h, l = res["machine"], res["haproxy"], res["halb"]
    rows = []
    if "l7" in h and "l7" in l:
        rows += [
            ("L7 requests/s (wrk -c%d)" % res["args"]["conns"], f"{l['l7']['rps']:.0f}",
             f"{h['l7']['rps']:.0f}", ratio(l["l7"]["rps"], h["l7"]["rps"]), ">= 0.9x"),
            ("L7 p50 latency ms", f"{l['l7']['p50_ms']:.2f}", f"{h['l7']['p50_ms']:.2f}",
             ratio(l["l7"]["p50_ms"], h["l7"]["p50_ms"]), ""),
            ("L7 p99 latency ms", f"{l['l7']['p99_ms']:.2f}", f"{h['l7']['p99_ms']:.2f}",
             ratio(l["l7"]["p99_ms"], h["l7"]["p99_ms"]), "<= 1.0x"),
            ("L7 CPU us/request", f"{l['l7']['cpu_us_per_req']:.1f}",
             f"{h['l7']['cpu_us_per_req']:.1f}",
             ratio(l["l7"]["cpu_us_per_req"], h["l7"]["cpu_us_per_req"]), ""),
            ("L7 CPU us/request in user space / in the kernel",
             f"{l['l7'].get('user_us_per_req', float('nan')):.1f} / "
             f"{l['l7'].get('sys_us_per_req', float('nan')):.1f}",
             f"{h['l7'].get('user_us_per_req', float('nan')):.1f} / "
             f"{h['l7'].get('sys_us_per_req', float('nan')):.1f}",
             ratio(l["l7"].get("user_us_per_req", float("nan")),
                   h["l7"].get("user_us_per_req", float("nan"))) + " / "
             + ratio(l["l7"].get("sys_us_per_req", float("nan")),
                     h["l7"].get("sys_us_per_req", float("nan"))), ""),
            ("L7 requests per proxy CPU-second (1e6 / CPU us per request)",
             f"{1e6 / l['l7']['cpu_us_per_req']:.0f}", f"{1e6 / h['l7']['cpu_us_per_req']:.0f}",
             ratio(h["l7"]["cpu_us_per_req"], l["l7"]["cpu_us_per_req"]), ""),
            ("L7 errors (socket / non-2xx)", f"{l['l7']['socket_errors']} / {l['l7']['non2xx']}",
             f"{h['l7']['socket_errors']} / {h['l7']['non2xx']}", "", ""),
        ]
    if "h2" in h and "h2" in l:
        hh, lh = h["h2"], l["h2"]
        rows += [
            ("HTTP/2 requests/s (h2load -c%d -m%d, h2c to the proxy, HTTP/1.1 behind)"
             % (H2_CONNS, H2_STREAMS), f"{lh['rps']:.0f}", f"{hh['rps']:.0f}",
             ratio(lh["rps"], hh["rps"]), ">= 0.8x"),
            ("HTTP/2 CPU us/request (user / kernel)",
             f"{lh['cpu_us_per_req']:.1f} ({lh['user_us_per_req']:.1f} / "
             f"{lh['sys_us_per_req']:.1f})",
             f"{hh['cpu_us_per_req']:.1f} ({hh['user_us_per_req']:.1f} / "
             f"{hh['sys_us_per_req']:.1f})",
             ratio(lh["cpu_us_per_req"], hh["cpu_us_per_req"]), ""),
            ("HTTP/2 failed requests", str(lh["failed"]), str(hh["failed"]), "", ""),
        ]
    if "grpc" in h and "grpc" in l:
        hg, lg = h["grpc"], l["grpc"]
        rows += [
            ("gRPC unary calls/s (bench/grpc_load.py, 32 threads, one channel; grpcio server)",
             f"{lg['rps']:.0f}", f"{hg['rps']:.0f}", ratio(lg["rps"], hg["rps"]), ""),
            ("gRPC CPU us/call (user / kernel)",
             f"{lg['cpu_us_per_req']:.1f} ({lg['user_us_per_req']:.1f} / "
             f"{lg['sys_us_per_req']:.1f})",
             f"{hg['cpu_us_per_req']:.1f} ({hg['user_us_per_req']:.1f} / "
             f"{hg['sys_us_per_req']:.1f})",
             ratio(lg["cpu_us_per_req"], hg["cpu_us_per_req"]), ""),
            ("gRPC errors", str(lg["errors"]), str(hg["errors"]), "", ""),
        ]
    if "l7log" in h and "l7log" in l:
        hl, ll = h["l7log"], l["l7log"]
        files = res.get("l7log_files") or {}
        rows += [
            ("L7 requests/s, access log on to a file (halb [access_log] file:, HAProxy "
             "option httplog, log stdout > file)", f"{ll['rps']:.0f}", f"{hl['rps']:.0f}",
             ratio(ll["rps"], hl["rps"]), ">= 0.9x"),
            ("L7 with access log: p99 latency ms", f"{ll['p99_ms']:.2f}", f"{hl['p99_ms']:.2f}",
             ratio(ll["p99_ms"], hl["p99_ms"]), ""),
            ("L7 with access log: CPU us/request (user / kernel)",
             f"{ll['cpu_us_per_req']:.1f} ({ll['user_us_per_req']:.1f} / "
             f"{ll['sys_us_per_req']:.1f})",
             f"{hl['cpu_us_per_req']:.1f} ({hl['user_us_per_req']:.1f} / "
             f"{hl['sys_us_per_req']:.1f})",
             ratio(ll["cpu_us_per_req"], hl["cpu_us_per_req"]), ""),
            ("L7 with access log: lines in the file / requests answered (wrk's count; "
             "dropped)", f"{files.get('halb', '?')} / {files.get('served', {}).get('halb', '?')}"
             f" (dropped {files.get('halb_dropped', '?')})",
             f"{files.get('haproxy', '?')} / {files.get('served', {}).get('haproxy', '?')}",
             "", ""),
        ]
        if "l7" in h and "l7" in l:
            rows.append(("L7 requests/s with the log / without it (the cost of logging)",
                         ratio(ll["rps"], l["l7"]["rps"]), ratio(hl["rps"], h["l7"]["rps"]),
                         "", ""))
    if "l7many" in h and "l7many" in l:
        hm, lm = h["l7many"], l["l7many"]
        rows += [
            (f"L7 requests/s, {MANY} keep-alive connections", f"{lm['rps']:.0f}",
             f"{hm['rps']:.0f}", ratio(lm["rps"], hm["rps"]), ">= 1.0x"),
            (f"L7 {MANY} connections: p99 latency ms", f"{lm['p99_ms']:.2f}",
             f"{hm['p99_ms']:.2f}", ratio(lm["p99_ms"], hm["p99_ms"]), ""),
            (f"L7 {MANY} connections: CPU us/request", f"{lm['cpu_us_per_req']:.1f}",
             f"{hm['cpu_us_per_req']:.1f}", ratio(lm["cpu_us_per_req"], hm["cpu_us_per_req"]),
             ""),
            (f"L7 {MANY} connections: errors (socket / non-2xx)",
             f"{lm['socket_errors']} / {lm['non2xx']}", f"{hm['socket_errors']} / {hm['non2xx']}",
             "", ""),
        ]
    if "cache" in h and "cache" in l:
        hc, lc = h["cache"], l["cache"]
        rows += [
            ("L7 cache hits/s, a 4 KiB object fresh for 60 s (halb [listeners.cache], "
             "HAProxy cache section)", f"{lc['rps']:.0f}", f"{hc['rps']:.0f}",
             ratio(lc["rps"], hc["rps"]), ">= 1.0x"),
            ("L7 cache hits: p99 latency ms", f"{lc['p99_ms']:.2f}", f"{hc['p99_ms']:.2f}",
             ratio(lc["p99_ms"], hc["p99_ms"]), ""),
            ("L7 cache hits: CPU us/request", f"{lc['cpu_us_per_req']:.1f}",
             f"{hc['cpu_us_per_req']:.1f}", ratio(lc["cpu_us_per_req"], hc["cpu_us_per_req"]),
             ""),
            ("L7 cache hits: errors (socket / non-2xx)",
             f"{lc['socket_errors']} / {lc['non2xx']}", f"{hc['socket_errors']} / {hc['non2xx']}",
             "", ""),
        ]
        if "l7" in h and "l7" in l:
            rows.append(("L7 requests/s from the cache / through to nginx (l7 case)",
                         ratio(lc["rps"], l["l7"]["rps"]), ratio(hc["rps"], h["l7"]["rps"]),
                         "", ""))
    for key, label in (("big", "L7 64 KiB bodies (wrk -c%d)" % res["args"]["conns"]),
                       ("close", f"L7 Connection: close, a new connection per request "
                                 f"(wrk -c{CLOSE_CONNS})"),
                       ("https", f"HTTPS keep-alive (wrk -c{HTTPS_CONNS})"),
                       ("httpsnew", f"HTTPS, a full TLS handshake per request (wrk "
                                    f"-c{HANDSHAKE_CONNS}, Connection: close)"),
                       ("httpsresume", f"HTTPS, a resumed TLS 1.3 session per connection "
                                       f"({HANDSHAKE_CONNS} x openssl s_time -reuse)"),
                       ("httpsresume12", f"HTTPS, a resumed TLS 1.2 session per connection "
                                         f"({HANDSHAKE_CONNS} x openssl s_time -reuse "
                                         f"-tls1_2)")):
        if key in h and key in l:
            hk, lk = h[key], l[key]
            rows += [
                (f"{label}: requests/s", f"{lk['rps']:.0f}", f"{hk['rps']:.0f}",
                 ratio(lk["rps"], hk["rps"]), ">= 1.0x"),
                (f"{label}: CPU us/request (user / kernel)",
                 f"{lk['cpu_us_per_req']:.1f} ({lk['user_us_per_req']:.1f} / "
                 f"{lk['sys_us_per_req']:.1f})",
                 f"{hk['cpu_us_per_req']:.1f} ({hk['user_us_per_req']:.1f} / "
                 f"{hk['sys_us_per_req']:.1f})",
                 ratio(lk["cpu_us_per_req"], hk["cpu_us_per_req"]), ""),
            ]
            if key not in ("httpsresume", "httpsresume12"):
                rows += [(f"{label}: p99 latency ms", f"{lk['p99_ms']:.2f}", f"{hk['p99_ms']:.2f}",
                          ratio(lk["p99_ms"], hk["p99_ms"]), ""),
                         (f"{label}: errors (socket / non-2xx)",
                          f"{lk['socket_errors']} / {lk['non2xx']}",
                          f"{hk['socket_errors']} / {hk['non2xx']}", "", "")]
    if "dl" in h and "dl" in l:
        hd, ld = h["dl"], l["dl"]
        rows += [
            ("200 MB download (curl, one connection): MB/s", f"{ld['mb_per_s']:.0f}",
             f"{hd['mb_per_s']:.0f}", ratio(ld["mb_per_s"], hd["mb_per_s"]), ">= 1.0x"),
            ("200 MB download: CPU ms per MB", f"{ld['cpu_ms_per_mb']:.2f}",
             f"{hd['cpu_ms_per_mb']:.2f}", ratio(ld["cpu_ms_per_mb"], hd["cpu_ms_per_mb"]), ""),
            ("200 MB download: peak RSS MiB (growth during it)",
             f"{ld['peak_rss_kib'] / 1024:.1f} (+{ld['peak_growth_kib'] / 1024:.1f})",
             f"{hd['peak_rss_kib'] / 1024:.1f} (+{hd['peak_growth_kib'] / 1024:.1f})",
             ratio(ld["peak_rss_kib"], hd["peak_rss_kib"]), "<= 2.0x"),
        ]
    if "l4" in h and "l4" in l:
        rows += [
            ("L4 Gbit/s (iperf3)", f"{l['l4']['gbps']:.2f}", f"{h['l4']['gbps']:.2f}",
             ratio(l["l4"]["gbps"], h["l4"]["gbps"]), ">= 1.0x"),
            ("L4 proxy CPU s per GB", f"{l['l4']['cpu_s_per_gb']:.3f}",
             f"{h['l4']['cpu_s_per_gb']:.3f}",
             ratio(l["l4"]["cpu_s_per_gb"], h["l4"]["cpu_s_per_gb"]), ""),
            ("L4 Gbit/s per proxy CPU core (8 / CPU s per GB)",
             f"{8 / l['l4']['cpu_s_per_gb']:.1f}", f"{8 / h['l4']['cpu_s_per_gb']:.1f}",
             ratio(h["l4"]["cpu_s_per_gb"], l["l4"]["cpu_s_per_gb"]), ""),
        ]
        f, lf = h.get("l4_forced"), l.get("l4_forced")
        if f and lf:
            rows += [
                ("(reference) L4 Gbit/s, splice forced (halb relay = \"splice\", HAProxy "
                 "splice-request/-response)",
                 f"{lf['gbps']:.2f}", f"{f['gbps']:.2f}", ratio(lf["gbps"], f["gbps"]), ""),
                ("(reference) L4 CPU s per GB, splice forced",
                 f"{lf['cpu_s_per_gb']:.3f}", f"{f['cpu_s_per_gb']:.3f}",
                 ratio(lf["cpu_s_per_gb"], f["cpu_s_per_gb"]), ""),
            ]
    if "l4conn" in h and "l4conn" in l:
        rows += [
            ("L4 new connections/s (wrk, Connection: close)", f"{l['l4conn']['rps']:.0f}",
             f"{h['l4conn']['rps']:.0f}", ratio(l["l4conn"]["rps"], h["l4conn"]["rps"]), ""),
            ("L4 CPU us per connection", f"{l['l4conn']['cpu_us_per_conn']:.1f}",
             f"{h['l4conn']['cpu_us_per_conn']:.1f}",
             ratio(l["l4conn"]["cpu_us_per_conn"], h["l4conn"]["cpu_us_per_conn"]), ""),
            ("L4 connection errors (socket / non-2xx)",
             f"{l['l4conn']['socket_errors']} / {l['l4conn']['non2xx']}",
             f"{h['l4conn']['socket_errors']} / {h['l4conn']['non2xx']}", "", ""),
        ]
    for key, rate in (("udp", "0 (flat out)"), ("udp_paced", "100M")):
        if key in l:
            u = l[key]
            rows.append((f"UDP through halb, iperf3 -u -l 1400 -b {rate}: received Gbit/s, "
                         "datagrams/s, loss, CPU us/datagram",
                         f"{u['gbps']:.2f}, {u['dgrams_per_s']:.0f}/s, {u['lost_percent']:.1f}%, "
                         f"{u['cpu_us_per_dgram']:.2f}", "(no UDP proxying)", "", ""))
    for k, label in (("mem_l7", "L7"), ("mem_l4", "L4")):
        if k in h and k in l:
            rows.append((f"{label} memory per idle conn, bytes ({l[k]['conns']} held)",
                         f"{l[k]['bytes_per_conn']:.0f}", f"{h[k]['bytes_per_conn']:.0f}",
                         ratio(l[k]["bytes_per_conn"], h[k]["bytes_per_conn"]), ""))
    out = [f"Run {m['date']} on {m['nproc']} x {m['cpu']} (kernel {m['kernel']}, "
           f"Python {m['python']}, {m['haproxy']}, {m['nginx']}).",
           f"Load average before / after: {res['load_before']} / {res.get('load_after', '?')}; "
           f"cores busy just before the run: {res.get('busy_cores_before', '?')}.",
           f"Command: python -m bench --duration {res['args']['duration']} --idle "
           f"{res['args']['idle']} --rounds {res['args']['rounds']} --nice {res['args']['nice']}"
           + (" --profile" if res["args"]["profile"] else ""), "",
           "| measure | halb | HAProxy | halb / HAProxy | target |",
           "| --- | --- | --- | --- | --- |"]
    out += [f"| {' | '.join(r)} |" for r in rows]
    out += ["", "Every run (median in the table; for L7 latency, the median of the runs' "
            "percentiles):", ""]
    for key, metric, unit in (("l7", "rps", "req/s"), ("l7many", "rps", "req/s"),
                              ("l7log", "rps", "req/s"), ("cache", "rps", "req/s"),
                              ("big", "rps", "req/s"), ("close", "rps", "req/s"),
                              ("https", "rps", "req/s"), ("httpsnew", "rps", "req/s"),
                              ("httpsresume", "rps", "conn/s"),
                              ("httpsresume12", "rps", "conn/s"), ("dl", "mb_per_s", "MB/s"),
                              ("l4", "gbps", "Gbit/s"),
                              ("l4_forced", "gbps", "Gbit/s"), ("l4conn", "rps", "conn/s"),
                              ("udp", "dgrams_per_s", "datagrams/s")):
        for w in ("halb", "haproxy"):
            runs = res[w].get(key + "_runs")
            if runs:
                vals = ", ".join(f"{x[metric]:.2f}" if metric == "gbps" else f"{x[metric]:.0f}"
                                 for x in runs)
                cpu = ", ".join(f"{x.get('cpu_us_per_req') or x.get('cpu_s_per_gb') or x.get('cpu_us_per_conn') or x.get('cpu_us_per_dgram') or x.get('cpu_ms_per_mb'):.3g}"
                                for x in runs)
                out.append(f"- {key} {w}: {vals} {unit} (CPU per unit: {cpu})")
                if key in ("l7", "l7log"):
                    out.append(f"- {key} {w} p99 ms: "
                               + ", ".join(f"{x['p99_ms']:.2f}" for x in runs))
    for k in ("profile_l7", "profile_l4", "profile_l4conn"):
        p = l.get(k)
        if p and "self" in p:
            out += ["", f"py-spy --native {k[8:].upper()} profile of halbd's event-loop thread: "
                    f"{p['samples']} busy samples ({p['idle_samples']} more idle in epoll_wait). "
                    "Self time by function (C and Python):", ""]
            out += [f"    {pct:5.1f}%  {f}" for f, pct in p["self"]]
            out += ["", "Inclusive time by Python function:", ""]
            out += [f"    {pct:5.1f}%  {f}" for f, pct in p["inclusive"]]
        elif p:
            out += ["", f"{k}: {p.get('error')}"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
