"""lab.topology: the IPv6 layout (``family=6``) derived from the IPv4 one, and the halbd
configs it writes (loaded with halb.config, as halbd would); the IPv4 output is unchanged."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from halb.config import loads
from lab import clab
from lab.topology import DEFAULT, DEFAULT6, NET6, Topology

pytestmark = pytest.mark.unit

CHAOS6 = Topology(prefix="hc", subnet="198.18.70.0/24", family=6)


def test_ipv4_is_the_default_and_has_no_ipv6():
    assert DEFAULT.family == 4 and replace(DEFAULT6, family=4) == DEFAULT
    assert all(h.address6 is None and h.ip == str(h.address.ip) for h in DEFAULT.hosts)
    assert DEFAULT.vips == ["198.18.0.100"] and DEFAULT.instances[0].vips == ["198.18.0.100/32"]
    assert DEFAULT.source_block(1) == "198.18.0.160/27"
    text = DEFAULT.node_config("lb1", state_dir="/s", pki_dir=None)
    assert "2001:" not in text and "fe80:" not in text and '"[' not in text
    assert 'bind = "198.18.0.100:80"' in text and 'address = "198.18.0.21:8080"' in text
    # the containerlab configs are the IPv4 output, committed: still byte for byte the same
    for h in clab.TOPOLOGY.lb_hosts:
        assert (clab.CLAB_DIR / f"{h.name}.toml").read_text() == clab.config_text(h.name)


@pytest.mark.parametrize("subnet, net6", [
    ("198.18.0.0/24", "2001:2::/64"),
    ("198.18.70.0/24", "2001:2:0:70::/64"),
    ("198.18.60.0/24", "2001:2:0:60::/64"),
    ("198.18.255.0/24", "2001:2:0:255::/64"),
    ("198.19.1.0/24", "2001:2:0:257::/64"),  # 256 + 1
    ("198.19.255.0/24", "2001:2:0:511::/64"),
])
def test_the_ipv6_subnet_is_derived_from_the_ipv4_one(subnet, net6):
    t = Topology(subnet=subnet, family=6)
    assert str(t.network6) == net6
    assert NET6.supernet_of(t.network6)  # 2001:2::/48, the IPv6 benchmarking range


def test_ipv6_hosts_vips_and_client_sources():
    t = CHAOS6
    assert [(h.name, str(h.address), str(h.address6)) for h in t.hosts] == [
        ("lb1", "198.18.70.11/24", "2001:2:0:70::11/64"),
        ("lb2", "198.18.70.12/24", "2001:2:0:70::12/64"),
        ("web1", "198.18.70.21/24", "2001:2:0:70::21/64"),
        ("web2", "198.18.70.22/24", "2001:2:0:70::22/64"),
        ("web3", "198.18.70.23/24", "2001:2:0:70::23/64"),
        ("c1", "198.18.70.31/24", "2001:2:0:70::31/64")]
    assert [h.ip for h in t.lb_hosts] == ["2001:2:0:70::11", "2001:2:0:70::12"]
    assert t.vips == ["2001:2:0:70::100"]
    (inst,) = t.instances
    assert inst.vips == ["fe80::33/64", "2001:2:0:70::100/64"]  # VRID 51, link-local first
    src = t.source_addresses()
    assert len(src) == 64 and len({a.ip for a in src}) == 64
    assert str(src[0]) == "2001:2:0:70::128:0/64" and str(src[-1]) == "2001:2:0:70::128:3f/64"
    assert all(a.ip in t.network6 for a in src)
    # each block of 32 is a CIDR holding exactly its 32 addresses
    for k in (0, 1):
        block = ipaddress.ip_network(t.source_block(k))
        assert block.num_addresses == 32
        assert [a.ip for a in src[32 * k:32 * (k + 1)]] == list(block)
    assert t.source_block(1) == "2001:2:0:70::128:20/123"
    with pytest.raises(ValueError, match="needs 96"):
        t.source_block(2)
    aa = replace(t, mode="active-active")
    assert [i.vips for i in aa.instances] == [["fe80::33/64", "2001:2:0:70::100/64"],
                                              ["fe80::34/64", "2001:2:0:70::101/64"]]
    assert [i.owner() for i in aa.instances] == ["lb1", "lb2"]


def test_family_is_validated():
    with pytest.raises(ValueError, match="family=5"):
        Topology(family=5)


@pytest.mark.parametrize("mode", ["active-passive", "active-active"])
def test_ipv6_configs_load_and_are_ipv6_end_to_end(mode):
    t = replace(CHAOS6, mode=mode)
    for h in t.lb_hosts:
        text = t.node_config(h.name, state_dir="/run/x", pki_dir=None)
        cfg = loads(text, f"{h.name}.toml")
        assert cfg.node.name == h.name
        assert cfg.metrics.address.host == h.ip
        assert [[str(v) for v in c.vips] for c in cfg.vrrp] == [i.vips for i in t.instances]
        assert [c.priority for c in cfg.vrrp] == [i.priorities[h.name] for i in t.instances]
        assert cfg.sync.listen.host == h.ip and cfg.sync.insecure
        assert [(p.name, p.address.host) for p in cfg.sync.peers] == [
            (p.name, p.ip) for p in t.lb_hosts if p.name != h.name]
        assert {(b.name, b.address.host) for p in cfg.pools for b in p.backends} == {
            (b.name, b.ip) for b in t.backend_hosts}
        assert {(lst.bind.host, lst.bind.port) for lst in cfg.listeners} == {
            (v, port) for v in t.vips for port in (80, 9000, 9001)}
        assert f'bind = "[{t.vips[0]}]:80"' in text
        # nothing IPv4 is left in the config (the LAN is dual stack, the lab is not)
        assert "198.18." not in text


def test_ipv6_config_with_sync_tls_loads(tmp_path):
    """With certificates for the nodes' IPv6 addresses (what Lab.up generates)."""
    from halb import pki
    t = CHAOS6
    pki.generate(tmp_path, [h.name for h in t.lb_hosts],
                 ips={h.name: [str(h.address.ip), h.ip] for h in t.lb_hosts})
    for h in t.lb_hosts:
        cfg = loads(t.node_config(h.name, state_dir="/run/x", pki_dir=str(tmp_path)))
        assert cfg.sync.tls is not None and cfg.sync.tls.cert == f"{tmp_path}/{h.name}.pem"
