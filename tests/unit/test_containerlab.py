"""lab/halb.clab.yml: valid for containerlab's own schema, every bound file exists, and it
matches the netns lab's layout (same addresses, VIP, configs generated from lab.topology)."""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from halb.config import loads
from lab import clab

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TOPO_FILE = ROOT / "lab" / "halb.clab.yml"
# containerlab's own schema, beside the checkout (../shared), or under /work for a clone elsewhere
SCHEMA = next((p for p in (ROOT.parent / "shared/data/containerlab/clab.schema.json",
                           Path("/work/shared/data/containerlab/clab.schema.json")) if p.exists()),
              ROOT.parent / "shared/data/containerlab/clab.schema.json")


@pytest.fixture(scope="module")
def topo() -> dict:
    return yaml.safe_load(TOPO_FILE.read_text())


def test_valid_against_containerlab_schema(topo):
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(topo), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_schema_rejects_a_broken_topology(topo):
    """The schema check above has teeth: a wrong node kind and a bad link are caught."""
    schema = json.loads(SCHEMA.read_text())
    bad = yaml.safe_load(TOPO_FILE.read_text())
    bad["topology"]["nodes"]["lb1"]["kind"] = "no-such-kind"
    bad["topology"]["nodes"]["lb2"]["binds"] = []  # minItems 1
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(bad))
    assert len(errors) >= 2


def _nodes(topo):
    return topo["topology"]["nodes"]


def _bind_sources(node) -> list[Path]:
    return [TOPO_FILE.parent / b.split(":", 1)[0] for b in node.get("binds", [])]


def test_every_bound_file_exists(topo):
    binds = [(name, src) for name, node in _nodes(topo).items() for src in _bind_sources(node or {})]
    assert len(binds) == 8  # 2 per LB node, 1 per backend and client
    missing = [f"{name}: {src}" for name, src in binds if not src.exists()]
    assert not missing, "bound files missing: " + ", ".join(missing)


def test_lb_configs_are_generated_from_the_lab_topology_and_load(topo):
    for h in clab.TOPOLOGY.lb_hosts:
        node = _nodes(topo)[h.name]
        cfg_bind = [b for b in node["binds"] if b.endswith(":/etc/halb/halb.toml:ro")]
        assert len(cfg_bind) == 1, node["binds"]
        path = TOPO_FILE.parent / cfg_bind[0].split(":", 1)[0]
        assert path.read_text() == clab.config_text(h.name), \
            f"{path} is stale: run `python -m lab configs`"
        # the certificates the config names are inside the bound pki directory; the config
        # checks that they exist, so it is loaded with that directory where the host has it
        pki_bind = [b for b in node["binds"] if b.split(":")[1] == clab.PKI_DIR]
        assert len(pki_bind) == 1
        host_pki = TOPO_FILE.parent / pki_bind[0].split(":", 1)[0]
        text = path.read_text()
        assert f'"{clab.PKI_DIR}/ca.pem"' in text
        cfg = loads(text.replace(f'"{clab.PKI_DIR}/', f'"{host_pki}/'), str(path))
        assert cfg.node.name == h.name
        assert cfg.control_socket == clab.CONTROL_SOCKET  # what the image's HEALTHCHECK asks
        assert [v.interface for v in cfg.vrrp] == ["eth1"]
        assert [str(v.vips[0].ip) for v in cfg.vrrp] == clab.TOPOLOGY.vips
        for f in (cfg.sync.tls.cert, cfg.sync.tls.key, cfg.sync.tls.ca):
            assert f.startswith(f"{host_pki}/")
            assert (host_pki / Path(f).name).is_file(), f"{host_pki / Path(f).name} missing"


def test_addresses_and_links_match_the_netns_lab(topo):
    nodes = _nodes(topo)
    bridges = [n for n, v in nodes.items() if v and v.get("kind") == "bridge"]
    assert len(bridges) == 1
    hosts = {h.name: h for h in clab.TOPOLOGY.lb_hosts + clab.TOPOLOGY.backend_hosts}
    hosts["client"] = clab.TOPOLOGY.client_hosts[0]
    assert set(nodes) - set(bridges) == set(hosts)
    for name, h in hosts.items():
        argv = shlex.split(nodes[name]["cmd"])
        script = argv[argv.index("-c") + 1]
        m = re.search(r"ip addr add (\S+) dev eth1", script)
        assert m and ipaddress.ip_interface(m.group(1)) == h.address, (name, script)
    linked = set()
    for link in topo["topology"]["links"]:
        a, b = link["endpoints"]
        assert a.endswith(":eth1") and b.split(":")[0] == bridges[0], link
        linked.add(a.split(":")[0])
    assert linked == set(hosts)
    # every non-bridge node runs the image the Containerfile builds
    image = topo["topology"]["defaults"]["image"]
    assert f"-t {image}" in (ROOT / "Containerfile").read_text()
    assert topo["topology"]["defaults"]["kind"] == "linux"
    for name in hosts:
        assert "NET_ADMIN" in nodes[name]["cap-add"]


def test_lb_nodes_run_the_images_entrypoint_as_halb_with_the_capabilities(topo):
    """The LB nodes drop to `halb` and exec the very program the image's ENTRYPOINT names (an
    absolute path: its shebang interpreter is the file with the capabilities, see
    tests/integration/test_containerfile.py), not whatever `python`/`halbd` PATH finds; and
    nothing stops the file capabilities from applying."""
    m = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", (ROOT / "Containerfile").read_text(), re.M)
    assert m
    entry = json.loads(m.group(1))
    assert entry[0].startswith("/"), entry
    for h in clab.TOPOLOGY.lb_hosts:
        node = _nodes(topo)[h.name]
        assert {"NET_ADMIN", "NET_RAW"} <= set(node["cap-add"])
        script = shlex.split(node["cmd"])[shlex.split(node["cmd"]).index("-c") + 1]
        last = shlex.split(script.split("&&")[-1])
        assert last[:2] == ["exec", "setpriv"], script
        opts = [a for a in last[2:] if a.startswith("--")]
        argv = [a for a in last[2:] if not a.startswith("--")]
        assert "--reuid=halb" in opts and "--no-new-privs" not in opts, opts
        assert argv == [entry[0], "/etc/halb/halb.toml"], (h.name, argv)
