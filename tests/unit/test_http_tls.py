"""SNI certificate choice: exact names, then wildcards, else the first certificate."""

from __future__ import annotations

import pytest

from halb.config import TLSCertificate
from halb.proxy.tls import choose_certificate

pytestmark = pytest.mark.unit

CERTS = (
    TLSCertificate("d.pem", "d.key", ("default.test",)),
    TLSCertificate("w.pem", "w.key", ("*.example.com",)),
    TLSCertificate("a.pem", "a.key", ("api.example.com", "api2.test")),
)


@pytest.mark.parametrize("name,idx", [
    (None, 0), ("", 0), ("unknown.test", 0), ("default.test", 0),
    ("api.example.com", 2),  # exact beats wildcard even though the wildcard comes first
    ("API.Example.com.", 2),
    ("www.example.com", 1),
    ("a.b.example.com", 0),  # a wildcard covers one label only
    ("example.com", 0),
    ("api2.test", 2),
])
def test_choose_certificate(name, idx):
    assert choose_certificate(CERTS, name) == idx


def test_unloadable_certificate_is_a_clear_error(tmp_path):
    from halb.config import ListenerTLS
    from halb.proxy.tls import server_context

    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(OSError) as ei:
        server_context(ListenerTLS((TLSCertificate(str(bad), str(bad)),)), "listener 'w' tls")
    assert "listener 'w' tls.certificates[0]" in str(ei.value) and "bad.pem" in str(ei.value)
    with pytest.raises(OSError) as ei:
        server_context(ListenerTLS((TLSCertificate(str(tmp_path / "missing.pem"), "k"),)))
    assert "missing.pem" in str(ei.value) and "No such file" in str(ei.value)
