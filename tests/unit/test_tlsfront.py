"""halb.tlsfront's pure parts: remote addresses as halb and gRPC write them, IPv6 included, and
the bounded refusal log keyed by remote host."""

import pytest

from halb.tlsfront import MAX_REFUSAL_KEYS, RefusalLog, peer_address, remote_host

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("peer, address, host", [
    ("198.18.0.1:4711", "198.18.0.1:4711", "198.18.0.1"),
    ("[2001:2::1]:4711", "[2001:2::1]:4711", "2001:2::1"),
    ("ipv4:198.18.0.1:4711", "198.18.0.1:4711", "198.18.0.1"),
    ("ipv6:[2001:2::1]:4711", "[2001:2::1]:4711", "2001:2::1"),
    ("ipv6:%5B2001:2::1%5D:4711", "[2001:2::1]:4711", "2001:2::1"),  # gRPC's URI escaping
    ("ipv6:%5B::1%5D:80", "[::1]:80", "::1"),
    ("2001:2::1:4711", "[2001:2::1]:4711", "2001:2::1"),  # a bare v6 address and a port
    ("unix:/run/halb/lb1.sock", "unix:/run/halb/lb1.sock", "unix:/run/halb/lb1.sock"),
    ("?", "?", "?"),
])
def test_peer_address_and_host(peer, address, host):
    assert peer_address(peer) == address
    assert remote_host(peer) == host


def test_refusals_from_one_ipv6_host_share_one_key():
    """Every connection of a refusing IPv6 peer comes from another port: counted under its
    host, not one key per port (which would push out the other hosts' keys)."""
    log = RefusalLog()
    for port in range(40000, 40000 + 2 * MAX_REFUSAL_KEYS):
        log.add("in", "tls_bad_certificate", f"[2001:2::9]:{port}", "unknown CA")
    log.add("in", "tls_bad_certificate", "198.18.0.9:5000", "unknown CA")
    assert log.refused_in == 2 * MAX_REFUSAL_KEYS + 1
    assert log.by_reason() == {("in", "tls_bad_certificate"): 2 * MAX_REFUSAL_KEYS + 1}
    assert {h for (_d, _r, h) in log._by} == {"2001:2::9", "198.18.0.9"}
