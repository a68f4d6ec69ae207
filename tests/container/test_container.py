"""The image, built and run for real: podman (Debian's, rootful, runc) builds the Containerfile,
starts the containerlab topology's nodes with exactly the settings lab/halb.clab.yml gives
them, wires them as containerlab would, and fails over with `podman kill -s KILL`.

- Base image: no registry is reachable, so ``docker.io/library/python:3.11-slim-bookworm`` is a
  stand-in made here once (kept in podman's storage): ``debootstrap --variant=minbase bookworm``
  from the Debian mirror the machine's apt uses, plus python3, python3-venv, python3-pip,
  python3-dev and ca-certificates, ``python``/``pip`` linked into /usr/local/bin, imported under
  the FROM line's name. It differs from the real image: Debian's Python 3.11.2 in /usr/bin
  instead of 3.11.x built in /usr/local, and Debian's pip. The Containerfile's own steps (apt,
  the wheel, the venv, setcap, the checks) run unchanged.
- Build: ``podman build --format docker --pull=never`` with the host network (the build's apt
  and pip reach the mirrors as the host does) and the host's CA bundle mounted (this machine's
  outbound TLS goes through a proxy CA that only the host trusts).
- Run: every linux node of lab/halb.clab.yml: its binds (relative to the topology file), cap-add,
  sysctls, user, entrypoint and cmd, healthcheck NONE as --no-healthcheck, network none; each
  link is a veth from a bridge in a namespace of the test's own (so no host interface or
  setting changes) to ``eth1`` in the container, which is what the nodes' commands wait for.
- Checks: halbctl status in lb1, the VIP on lb1, HTTP and TCP through it from the client;
  ``podman kill -s KILL clab-halb-lb1``; the VIP on lb2 and HTTP answered through it; the client
  outage measured by a probe in the client's network namespace.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import wait_for

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[2]
TOPO = ROOT / "lab" / "halb.clab.yml"
BASE = "docker.io/library/python:3.11-slim-bookworm"
IMAGE = "localhost/halb:containertest"
PODMAN = ["podman", "--runtime", "runc"]  # crun refuses this machine's cgroup layout
# podman's default nofile and nproc limits exceed what this machine lets runc set ("error
# setting rlimit ... operation not permitted"): the machine's 20000 open files, and 4096
# processes (per uid: plenty for halbd's threads)
ULIMIT = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
BRNS = "hcbr"  # the namespace holding the topology's bridge
PREFIX = "clab-halb-"
VIP = "198.18.0.100"
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else "python3"


def run(argv: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {r.returncode}\n{r.stdout[-2000:]}"
                             f"\n{r.stderr[-3000:]}")
    return r


def _mirror() -> str:
    src = Path("/etc/apt/sources.list.d/debian.sources")
    if src.exists():
        m = re.search(r"^URIs:\s*(\S+/debian)\s*$", src.read_text(), re.M)
        if m:
            return m.group(1)
    lst = Path("/etc/apt/sources.list")
    if lst.exists():
        m = re.search(r"^deb\s+(\S+/debian)\s+bookworm", lst.read_text(), re.M)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def ensure_base() -> None:
    if run(PODMAN + ["image", "exists", BASE], check=False).returncode == 0:
        return
    root = Path(tempfile.mkdtemp(prefix="halb-base-"))
    try:
        run(["debootstrap", "--variant=minbase",
             "--include=python3,python3-venv,python3-pip,python3-dev,ca-certificates",
             "bookworm", str(root), _mirror()], timeout=900)
        for name, target in (("python", "/usr/bin/python3"), ("pip", "/usr/bin/pip3")):
            os.symlink(target, root / "usr" / "local" / "bin" / name)
        shutil.rmtree(root / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(PODMAN + ["import", "--change", 'CMD ["python3"]', "--change",
                                       "ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                                       "-", BASE], stdin=tar.stdout, capture_output=True,
                             text=True, timeout=300)
        tar.wait(60)
        assert imp.returncode == 0, imp.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def image():
    for tool in ("podman", "runc", "debootstrap"):
        assert shutil.which(tool), f"{tool} is installed by ./dev test (APT_TEST)"
    t0 = time.monotonic()
    ensure_base()
    t1 = time.monotonic()
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    argv = PODMAN + ["build", "--format", "docker", "--pull=never", "--network", "host"] + \
        ULIMIT + (["-v", f"{bundle}:{bundle}:ro"] if os.path.exists(bundle) else []) + \
        ["-t", IMAGE, "-f", str(ROOT / "Containerfile"), str(ROOT)]
    r = run(argv, timeout=1200)
    run(PODMAN + ["image", "prune", "-f"], check=False)  # the build stage's dangling image
    t2 = time.monotonic()
    print(f"container image: base {t1 - t0:.0f} s, build {t2 - t1:.0f} s")
    insp = json.loads(run(PODMAN + ["image", "inspect", IMAGE]).stdout)[0]
    yield {"id": insp["Id"], "config": insp["Config"], "healthcheck": insp.get("Healthcheck"),
           "build_log": r.stdout}


def _cleanup() -> None:
    out = run(PODMAN + ["ps", "-a", "--format", "{{.Names}}"], check=False).stdout.split()
    names = [n for n in out if n.startswith(PREFIX)]
    if names:
        run(PODMAN + ["rm", "-f", "-t", "0"] + names, timeout=120, check=False)
    run(["ip", "netns", "del", BRNS], check=False)


def node_argv(name: str, node: dict, defaults: dict) -> list[str]:
    """`podman run` for one clab node, from its own settings only."""
    argv = PODMAN + ["run", "-d", "--name", PREFIX + name, "--network", "none"] + ULIMIT
    for b in node.get("binds", []):
        src, dst, *mode = b.split(":")
        src_path = (TOPO.parent / src).resolve()
        assert src_path.exists(), f"{name}: bind source {src_path} missing"
        argv += ["-v", f"{src_path}:{dst}" + (f":{mode[0]}" if mode else "")]
    for c in node.get("cap-add", []):
        argv += ["--cap-add", c]
    for k, v in (node.get("sysctls") or {}).items():
        argv += ["--sysctl", f"{k}={v}"]
    if "user" in node:
        argv += ["--user", str(node["user"])]
    if "entrypoint" in node:
        argv += ["--entrypoint", node["entrypoint"]]
    hc = node.get("healthcheck")
    if hc and hc.get("test") == ["NONE"]:
        argv += ["--no-healthcheck"]
    argv.append(IMAGE)
    if "cmd" in node:
        argv += shlex.split(node["cmd"])
    return argv


def pid_of(name: str) -> int:
    return int(run(PODMAN + ["inspect", "-f", "{{.State.Pid}}", PREFIX + name]).stdout.strip())


def in_node(name: str, argv: list[str], timeout: float = 30, check=True):
    return run(PODMAN + ["exec", PREFIX + name] + argv, timeout=timeout, check=check)


def vip_on(name: str) -> bool:
    r = in_node(name, ["ip", "-o", "-4", "addr", "show", "dev", "eth1"], check=False)
    return r.returncode == 0 and f" {VIP}/" in r.stdout


def in_client_ns(argv: list[str], timeout: float = 30, check=True):
    return run(["nsenter", "-t", str(pid_of("client")), "-n"] + argv, timeout=timeout,
               check=check)


@pytest.fixture(scope="module")
def topology(image):
    topo = yaml.safe_load(TOPO.read_text())
    nodes = topo["topology"]["nodes"]
    defaults = topo["topology"].get("defaults", {})
    assert defaults.get("image") == "halb:latest"  # the tag the README builds
    _cleanup()
    try:
        run(["ip", "netns", "add", BRNS])
        bridges = [n for n, v in nodes.items() if v.get("kind") == "bridge"]
        for br in bridges:
            run(["ip", "-n", BRNS, "link", "add", br, "type", "bridge"])
            run(["ip", "-n", BRNS, "link", "set", br, "up"])
        linux = [n for n, v in nodes.items() if v.get("kind", defaults.get("kind")) == "linux"]
        for n in linux:
            run(node_argv(n, nodes[n], defaults), timeout=120)
        for link in topo["topology"]["links"]:
            (a, a_if), (b, b_if) = (e.split(":") for e in link["endpoints"])
            if a in bridges:
                (a, a_if), (b, b_if) = (b, b_if), (a, a_if)
            assert b in bridges and a in linux, link
            # the bridge side in our namespace, the node side moved into the container as eth1
            run(["ip", "-n", BRNS, "link", "add", b_if, "type", "veth", "peer", "name", a_if,
                 "netns", str(pid_of(a))])
            run(["ip", "-n", BRNS, "link", "set", b_if, "master", b, "up"])
        yield {"nodes": nodes, "linux": linux}
    finally:
        logs = {}
        for n in ("lb1", "lb2"):
            logs[n] = run(PODMAN + ["logs", PREFIX + n], check=False).stdout[-3000:]
        _cleanup()
        print("\n".join(f"--- {n}\n{t}" for n, t in logs.items()))


PROBE = r"""
import socket, sys, time, json
host, port, dur, step = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
end = time.monotonic() + dur
while time.monotonic() < end:
    t = time.monotonic(); who = ""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.settimeout(0.5); s.sendall(b"WHO\n"); who = s.recv(64).decode().strip()
    except OSError:
        pass
    print(json.dumps({"t": t, "end": time.monotonic(), "who": who}), flush=True)
    time.sleep(max(0.0, step - (time.monotonic() - t)))
"""


def test_image_metadata(image):
    cfg = image["config"]
    assert cfg["User"] == "halb"
    assert cfg["Entrypoint"] == ["/opt/halb/bin/halbd"]
    hc = image["healthcheck"] or cfg.get("Healthcheck") or {}
    assert hc.get("Test", [])[:2] == ["CMD", "/opt/halb/bin/halbctl"], \
        "the HEALTHCHECK is kept (--format docker)"


def test_topology_runs_and_fails_over_with_podman_kill(topology):
    # every node came up with the topology's own command: the LBs elect, the backends answer
    def lb_master():
        r = in_node("lb1", ["/opt/halb/bin/halbctl", "--socket", "/run/halb/halb.sock",
                            "status", "--json"], check=False)
        return r.returncode == 0 and json.loads(r.stdout)["instances"][0]["state"] == "master"
    wait_for(lb_master, 60, interval=0.5, what="lb1 master (halbctl status in the container)")
    st = in_node("lb1", ["/opt/halb/bin/halbctl", "--socket", "/run/halb/halb.sock", "status"])
    assert "master" in st.stdout, st.stdout
    # the image's HEALTHCHECK passes on an LB (podman runs it on demand here: its timers need
    # systemd as PID 1, which these machines do not have)
    hc = run(PODMAN + ["healthcheck", "run", PREFIX + "lb1"], check=False)
    assert hc.returncode == 0, hc.stdout + hc.stderr
    assert vip_on("lb1") and not vip_on("lb2")
    # halbd runs as halb, not root, and holds its three capabilities
    ps = in_node("lb1", ["sh", "-c", "for p in /proc/[0-9]*; do grep -q halbd $p/cmdline 2>/dev/null"
                                     " && grep -E '^(Uid|CapEff)' $p/status; done"])
    assert re.search(r"^Uid:\s+(\d+)", ps.stdout, re.M).group(1) != "0", ps.stdout
    wait_for(lambda: in_client_ns(["curl", "-sf", "-m", "2", f"http://{VIP}/"],
                                  check=False).returncode == 0, 60, interval=0.5,
             what="HTTP through the VIP from the client")
    body = in_client_ns(["curl", "-sf", "-m", "2", f"http://{VIP}/"]).stdout
    assert re.search(r"web[123]", body), body
    # a probe in the client's namespace: a TCP connect to VIP:9000 every 10 ms
    probe = subprocess.Popen(["nsenter", "-t", str(pid_of("client")), "-n", PY, "-c", PROBE,
                              VIP, "9000", "8", "0.01"], stdout=subprocess.PIPE, text=True)
    time.sleep(2.0)
    t_kill = time.monotonic()
    run(PODMAN + ["kill", "-s", "KILL", PREFIX + "lb1"], timeout=30)
    t_killed = time.monotonic()
    wait_for(lambda: vip_on("lb2"), 10, interval=0.05, what="the VIP on lb2")
    t_vip = time.monotonic()
    out, _ = probe.communicate(timeout=30)
    res = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    before = [r for r in res if r["t"] < t_kill]
    assert before and all(r["who"] for r in before[-20:]), before[-20:]
    after = [r for r in res if r["t"] >= t_kill]
    assert any(r["who"] for r in after if r["t"] > t_vip), "no answer once lb2 held the VIP"
    # the client's outage: the longest time without an answer across the kill (the first
    # probes after t_kill may still reach lb1 while podman kill is under way)
    ends = [r["end"] for r in res if r["who"] and r["end"] >= t_kill - 0.5]
    outage = max(b - a for a, b in zip(ends, ends[1:]))
    failed = sum(1 for r in after if not r["who"])
    st2 = in_node("lb2", ["/opt/halb/bin/halbctl", "--socket", "/run/halb/halb.sock", "status",
                          "--json"])
    assert json.loads(st2.stdout)["instances"][0]["state"] == "master"
    body = in_client_ns(["curl", "-sf", "-m", "2", f"http://{VIP}/"]).stdout
    assert re.search(r"web[123]", body), body
    print(f"podman kill -s KILL lb1: command returned after {t_killed - t_kill:.3f} s, VIP on "
          f"lb2 after {t_vip - t_kill:.3f} s, client outage (longest time without an answer) "
          f"{outage * 1000:.0f} ms, {failed} failed connects, HTTP answered through lb2")
    # 100 ms adverts: Master_Down_Interval ~0.34 s, plus the kill itself and ARP
    assert outage < 2.0, outage
