"""halb.pki: a CA and node certificates usable for sync's mutual TLS."""

import ipaddress
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from halb import pki

pytestmark = pytest.mark.unit


def load(path):
    return x509.load_pem_x509_certificate(open(path, "rb").read())


def test_generates_ca_and_node_certificates(tmp_path):
    res = pki.generate(tmp_path, ["lb1", "lb2"], ips={"lb1": ["198.18.0.1", "::1"]})
    ca = load(res["ca"]["cert"])
    assert res["ca"]["created"] and ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for n in ("lb1", "lb2"):
        c = load(res["nodes"][n]["cert"])
        assert c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == n
        assert c.issuer == ca.subject
        ca.public_key().verify(c.signature, c.tbs_certificate_bytes, ec.ECDSA(c.signature_hash_algorithm))
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [n]
        eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
        assert stat.S_IMODE(os.stat(res["nodes"][n]["key"]).st_mode) == 0o600
    san1 = load(res["nodes"]["lb1"]["cert"]).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san1.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("198.18.0.1"),
                                                        ipaddress.ip_address("::1")]


def test_existing_ca_is_reused_for_new_nodes(tmp_path):
    first = pki.generate(tmp_path, ["lb1"])
    ca_bytes = open(first["ca"]["cert"], "rb").read()
    second = pki.generate(tmp_path, ["lb3"])
    assert not second["ca"]["created"] and open(second["ca"]["cert"], "rb").read() == ca_bytes
    assert load(second["nodes"]["lb3"]["cert"]).issuer == load(first["ca"]["cert"]).subject


@pytest.mark.parametrize("nodes,ips,msg", [
    (["bad name"], None, "invalid node name"),
    (["a", "a"], None, "repeat"),
    ([], None, "no node names"),
    (["a"], {"a": ["300.1.1.1"]}, "invalid IP address"),
    (["a"], {"b": ["1.1.1.1"]}, "not in the node list"),
])
def test_bad_input_is_named(tmp_path, nodes, ips, msg):
    with pytest.raises(ValueError, match=msg):
        pki.generate(tmp_path, nodes, ips=ips)
    assert not (tmp_path / "ca.key").exists()
