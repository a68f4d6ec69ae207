"""User-space instructions per proxied L7 request, counted by callgrind: a figure that does not
move with the machine's load (the wall-clock bench does), for comparing two builds of the L7
path on this machine or any other.

    python bench/l7_instructions.py [--requests 3000] [--no-extensions] [--close] [--keep DIR]

It starts two nginx backends and halbd (the bench's HTTP listener config: three routes,
forwarded headers on, metrics on) with halbd under ``valgrind --tool=callgrind`` and
instrumentation off, warms up with 200 requests, then counts the instructions halbd's process
executes (all threads, user space only: system calls are the kernel's and are not counted)
while 8 keep-alive clients send ``--requests`` GETs, and prints instructions per request.
``--no-extensions`` runs halbd with HALB_NO_EXTENSIONS=1 (the pure-Python modules). Needs
valgrind and nginx (``./dev bench`` installs both). About a minute.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.__main__ import (HALB_CONF, NGINX_CONF, PROXY_PORTS, PY, ROOT, free_port,  # noqa: E402
                            make_tls_cert, wait_port)


def load(port: int, n: int, conns: int = 8) -> None:
    """``n`` keep-alive GETs over ``conns`` connections, one in flight per connection."""
    req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: l7i\r\nAccept: */*\r\n\r\n" % port
    socks = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(conns)]
    done = 0
    while done < n:
        batch = socks[:min(conns, n - done)]
        for s in batch:
            s.sendall(req)
        for s in batch:
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError("halbd closed a connection")
                buf += chunk
                i = buf.find(b"\r\n\r\n")
                if i >= 0:
                    cl = int(buf[:i].lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    if len(buf) >= i + 4 + cl:
                        break
            if not buf.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected answer: {buf[:80]!r}")
            done += 1
    for s in socks:
        s.close()


def load_close(port: int, n: int, conns: int = 8) -> None:
    """``n`` GETs, each on a connection of its own (``Connection: close``), ``conns`` at a time:
    what wrk -H 'Connection: close' does, the bench's ``close`` case."""
    req = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: l7i\r\nAccept: */*\r\n"
           b"Connection: close\r\n\r\n" % port)
    done = 0
    while done < n:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=60)
                 for _ in range(min(conns, n - done))]
        for s in socks:
            s.sendall(req)
        for s in socks:
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            s.close()
            if not buf.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected answer: {buf[:80]!r}")
            done += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/l7_instructions.py")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--no-extensions", action="store_true")
    ap.add_argument("--close", action="store_true",
                    help="a connection per request (Connection: close), as the bench's close case")
    ap.add_argument("--keep", metavar="DIR", help="copy callgrind's output files into DIR "
                    "(for callgrind_annotate)")
    a = ap.parse_args(argv)
    a.requests = max(100, min(a.requests, 100_000))
    for tool in ("valgrind", "callgrind_control", "nginx"):
        if not shutil.which(tool):
            print(f"missing {tool} (./dev bench installs it)", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="halb-l7i-"))
    procs: list[subprocess.Popen] = []
    try:
        backends = {}
        for name in ("n1", "n2"):  # two, as in the bench (a pool's addresses must differ)
            port = backends[name] = free_port()
            conf = tmp / f"nginx-{name}.conf"
            conf.write_text(NGINX_CONF.format(dir=tmp, name=name, port=port))
            procs.append(subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_port(port, proc=procs[-1])
        ports = {k: free_port() for k in PROXY_PORTS + ("iperf", "g1")}  # (g1: not started)
        (tmp / "halb-state").mkdir()
        make_tls_cert(tmp)  # (the config's HTTPS listener needs one)
        conf = HALB_CONF.format(dir=tmp, **backends, **ports)
        (tmp / "halb.toml").write_text(conf)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if a.no_extensions:
            env["HALB_NO_EXTENSIONS"] = "1"
        out = tmp / "callgrind.out"
        vg = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                               f"--callgrind-out-file={out}", PY, "-m", "halb.cli.halbd",
                               str(tmp / "halb.toml")], env=env, cwd=str(ROOT),
                              stdout=subprocess.DEVNULL, stderr=open(tmp / "halbd.log", "wb"))
        procs.append(vg)
        try:
            wait_port(ports["http"], timeout=180, proc=vg)
        except RuntimeError:
            print((tmp / "halbd.log").read_text(errors="replace")[-2000:], file=sys.stderr)
            raise
        run = load_close if a.close else load
        run(ports["http"], 200)
        subprocess.run(["callgrind_control", "-i", "on", str(vg.pid)], check=True,
                       capture_output=True, timeout=60)
        t0 = time.monotonic()
        run(ports["http"], a.requests)
        took = time.monotonic() - t0
        subprocess.run(["callgrind_control", "-i", "off", str(vg.pid)], check=True,
                       capture_output=True, timeout=60)
        subprocess.run(["callgrind_control", "-d", str(vg.pid)], check=True,
                       capture_output=True, timeout=60)
        time.sleep(1)
        total = 0
        for f in tmp.glob("callgrind.out*"):
            for line in f.read_text(errors="replace").splitlines():
                if line.startswith("totals:"):
                    total += int(line.split()[1])
        if not total:
            print("callgrind counted nothing", file=sys.stderr)
            return 1
        if a.keep:
            Path(a.keep).mkdir(parents=True, exist_ok=True)
            for f in tmp.glob("callgrind.out*"):
                shutil.copy(f, Path(a.keep) / f.name)
        mode = ("HALB_NO_EXTENSIONS=1" if a.no_extensions else "as installed") + \
            (", a connection per request" if a.close else "")
        print(f"halbd ({mode}): {total / a.requests:,.0f} user-space instructions per request "
              f"({a.requests} requests, {took:.1f} s under callgrind)")
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
