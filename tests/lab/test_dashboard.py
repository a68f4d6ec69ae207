"""The Grafana dashboard (examples/grafana/halb-dashboard.json) asks only for what halbd
exports: a node with every part (election, state sync, TCP/HTTP/NAT listeners, health checks,
control, metrics) runs in a namespace, serves traffic, and its /metrics scrape must declare every
metric family the dashboard's queries name, with the sample suffix its type gives (_total for
counters, _bucket for histograms), and every label the queries group by."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from lab.lab import ns_call
from tests.helpers import wait_for
from tests.lab.conftest import CLIENT, LB1, config, wait_state

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
DASH = ROOT / "examples" / "grafana" / "halb-dashboard.json"
# labels Prometheus adds or renames at scrape time, and PromQL's own
SCRAPE_LABELS = {"instance", "job", "exported_instance", "le"}

EXTRA = f"""
[metrics]
address = "127.0.0.1:9464"

[[pools]]
name = "nat"
algorithm = "maglev"
  [[pools.backends]]
  name = "n1"
  address = "{CLIENT}:7001"

[[listeners]]
name = "web"
mode = "http"
bind = "{LB1}:8081"
pool = "p"

[[listeners]]
name = "natl"
mode = "nat"
protocol = "tcp"
bind = "198.18.40.100:9000"
pool = "nat"

[nat]
table = "halb_dash"

[sync]
listen = "{LB1}:7400"
insecure = true
  [[sync.peers]]
  name = "lb2"
  address = "198.18.40.12:7400"
"""


def queries() -> list[str]:
    d = json.loads(DASH.read_text())
    out = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    out += [a["expr"] for a in d.get("annotations", {}).get("list", []) if a.get("expr")]
    out += [v["query"] for v in d["templating"]["list"] if v.get("type") == "query"]
    return out


def families(text: str) -> dict[str, tuple[str, set[str]]]:
    """family -> (type, label names seen on its samples)."""
    fam: dict[str, tuple[str, set[str]]] = {}
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            fam[m.group(1)] = (m.group(2), set())
    for line in text.splitlines():
        m = re.match(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", line)
        if not m:
            continue
        name = m.group(1)
        base = re.sub(r"_(total|bucket|count|sum|created)$", "", name)
        for f in (name, base):
            if f in fam:
                fam[f][1].update(re.findall(r'(\w+)="', m.group(2)))
                break
    return fam


def sample_ok(name: str, fam: dict) -> str | None:
    """None if ``name`` (as a query writes it) is a sample of a declared family; else why."""
    for suffix, kind in (("_total", "counter"), ("_bucket", "histogram"), ("_count", None),
                         ("_sum", None)):
        if name.endswith(suffix) and name[:-len(suffix)] in fam:
            t = fam[name[:-len(suffix)]][0]
            if kind and t != kind:
                return f"{name}: the family is a {t}, not a {kind}"
            return None
    if name in fam:  # the text format declares a counter by its sample name (..._total)
        t = fam[name][0]
        ok = t in ("gauge", "untyped", "unknown") or (t == "counter" and name.endswith("_total"))
        return None if ok else f"{name}: a {t} family queried by that name"
    return f"{name}: not in the scrape"


def test_every_metric_the_dashboard_queries_is_in_a_live_scrape(lab):
    import subprocess

    from tests.lab.conftest import PY
    pki = lab.tmp / "pki"
    subprocess.run([PY, "-m", "halb.cli.halbctl", "pki", "init", "--out", str(pki), "lb1",
                    "--ip", f"lb1={LB1}"], check=True, capture_output=True, timeout=60)
    text = config("lb1", priority=200, checksum="keepalived", extra=EXTRA + f"""
[control.tls]
cert = "{pki / 'lb1.pem'}"
key = "{pki / 'lb1.key'}"
ca = "{pki / 'ca.pem'}"
""")
    sock = "/tmp/halb-lab-lb1-40.sock"
    text = text.replace(f'socket = "{sock}"', f'socket = "{sock}"\naddress = "{LB1}:7500"')
    h = lab.halbd("hvlb1", text, "lb1-dash")
    wait_state(h, "master", timeout=15)

    def get(url: str) -> bytes:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read()

    def scrape() -> str:
        return ns_call("hvlb1", get, "http://127.0.0.1:9464/metrics", timeout=10).decode()

    # traffic through the HTTP listener (the backend is a line echo: errors count too) and the
    # TCP listener on the VIP, so the per-backend families have children
    def poke():
        import socket
        for port in (8081,):
            try:
                with socket.create_connection((LB1, port), timeout=2) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    s.recv(4096)
            except OSError:
                pass
        with socket.create_connection(("198.18.40.100", 8000), timeout=2) as s:
            s.sendall(b"WHO\n")
            s.recv(64)
    for _ in range(3):
        ns_call("hvcl", poke, timeout=15)
    wait_for(lambda: "halb_backend_requests_total{" in scrape(), 10, what="backend samples")
    body = scrape()
    fam = families(body)
    qs = queries()
    assert len(qs) >= 30, len(qs)
    problems = []
    names = set()
    for q in qs:
        for name in re.findall(r"\b(halb_[a-z0-9_]+)", q):
            names.add(name)
            why = sample_ok(name, fam)
            if why:
                problems.append(f"{why}   [{q}]")
        # the labels a query groups by must be labels of the families it reads
        for grp in re.findall(r"by \(([^)]*)\)", q):
            labels = {x.strip() for x in grp.split(",")} - SCRAPE_LABELS
            for name in re.findall(r"\b(halb_[a-z0-9_]+)", q):
                base = re.sub(r"_(bucket|count|sum)$", "", name)
                seen = fam.get(name, fam.get(base, ("", set())))[1]
                if seen and not labels <= seen:
                    problems.append(f"{name}: no label {sorted(labels - seen)} (has {sorted(seen)})")
    # halb's own "instance" label (the VRRP instance) is what the dashboard calls
    # exported_instance (Prometheus renames it at scrape time)
    assert "instance" in fam["halb_vrrp_state"][1]
    assert not problems, "\n".join(problems)
    # the dashboard covers every part: election, sync, backends, L4, NAT
    for prefix in ("halb_vrrp_", "halb_sync_", "halb_backend_", "halb_l4_", "halb_nat_",
                   "halb_table_", "halb_listener_"):
        assert any(n.startswith(prefix) for n in names), prefix
