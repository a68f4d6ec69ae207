"""TLS ticket keys (halb.tlstickets): rotation, expiry, peers' keys and the key file, with an
injected clock (no sockets, no sleeps)."""

from __future__ import annotations

import base64
import itertools

import pytest

from halb.config import ConfigError
from halb.config import loads as load_config_text
from halb.tlstickets import (MAX_ORIGINS, MAX_PEER_KEYS, TicketKey, TicketKeys, TicketRing,
                             parse_key_file)

pytestmark = pytest.mark.unit


def counting_rand():
    c = itertools.count(1)
    return lambda n: next(c).to_bytes(2, "big") * (n // 2)


def test_rotation_keeps_the_previous_keys_for_decryption_then_drops_them():
    r = TicketRing(100.0, 2, rand=counting_rand())
    assert r.encrypt_key() is None  # before the first tick: no ticket at all
    assert r.tick(1000.0)
    k1 = r.encrypt_key()
    assert k1 is not None and k1.expires == 1000.0 + 300.0
    assert r.lookup(k1.name, 1050.0) == (k1, False)  # current key: no renewal
    assert not r.tick(1099.9)  # not due yet
    assert r.encrypt_key() is k1
    assert r.tick(1100.0)  # due: a new key encrypts, the old one still decrypts (renewed)
    k2 = r.encrypt_key()
    assert k2 is not k1 and k2.name != k1.name
    assert r.lookup(k1.name, 1100.0) == (k1, True)
    r.tick(1200.0)
    k3 = r.encrypt_key()
    assert r.lookup(k1.name, 1299.0) == (k1, True)  # kept = 2 earlier keys
    assert len(r.own) == 3
    r.tick(1300.0)  # k1 is 300 old: expired, and 3 earlier keys would be one too many
    assert r.lookup(k1.name, 1300.0) is None
    assert [k.name for k in r.own] == [k2.name, k3.name, r.encrypt_key().name]
    # expiry is checked at lookup too, between ticks
    assert r.lookup(k2.name, 1400.0) is None


def test_a_version_bump_on_every_change_of_the_own_keys_only():
    r = TicketRing(100.0, 1, rand=counting_rand())
    r.tick(0.0)
    v = r.version
    r.tick(50.0)
    assert r.version == v
    r.learn("b", [TicketKey(b"B" * 16, b"a" * 32, b"h" * 32, 0.0, 500.0)], 50.0)
    assert r.version == v  # peers' keys are not re-exported
    r.tick(100.0)
    assert r.version == v + 1


def test_clock_going_back_starts_over_instead_of_keeping_a_key_from_the_future():
    r = TicketRing(100.0, 1, rand=counting_rand())
    r.tick(10_000.0)
    old = r.encrypt_key()
    r.tick(5_000.0)
    assert r.encrypt_key() is not old and r.encrypt_key().created == 5_000.0


def test_peer_keys_decrypt_until_their_expiry_and_are_renewed():
    a = TicketRing(100.0, 2, rand=counting_rand())
    b = TicketRing(100.0, 2, rand=lambda n: b"\xee" * n)
    a.tick(0.0)
    b.tick(0.0)
    b.learn("a", a.exportable(0.0), 0.0)
    ka = a.encrypt_key()
    got = b.lookup(ka.name, 10.0)
    assert got is not None and got[0].aes == ka.aes and got[1] is True  # renew under b's key
    b.tick(299.0)  # b rotated twice; a's key lives to its own expiry
    assert b.lookup(ka.name, 299.0) is not None
    b.tick(300.0)
    assert b.lookup(ka.name, 300.0) is None and "a" not in b.peers
    b.learn("a", [], 300.0)
    assert "a" not in b.peers


def test_a_restarted_peer_does_not_revoke_its_earlier_keys():
    b = TicketRing(100.0, 2, rand=lambda n: b"\xee" * n)
    b.tick(0.0)
    old = TicketKey(b"O" * 16, b"a" * 32, b"h" * 32, 0.0, 300.0)
    new = TicketKey(b"N" * 16, b"a" * 32, b"h" * 32, 50.0, 350.0)
    b.learn("a", [old], 0.0)
    b.learn("a", [new], 50.0)  # a restarted: only its new key in its export
    assert b.lookup(old.name, 60.0) is not None and b.lookup(new.name, 60.0) is not None
    b.tick(300.0)
    assert b.lookup(old.name, 300.0) is None and b.lookup(new.name, 300.0) is not None


def test_peer_keys_are_bounded_and_checked():
    r = TicketRing(100.0, 1)
    r.tick(0.0)
    many = [TicketKey(i.to_bytes(16, "big"), b"a" * 32, b"h" * 32, 0.0, 1e9) for i in range(50)]
    r.learn("p", many, 0.0)
    assert len(r.peers["p"]) == MAX_PEER_KEYS
    bad = [TicketKey(b"short", b"a" * 32, b"h" * 32, 0.0, 1e9),
           TicketKey(b"x" * 16, b"a" * 31, b"h" * 32, 0.0, 1e9),
           TicketKey(b"y" * 16, b"a" * 32, b"h" * 32, 0.0, 1.0)]  # expired
    r.learn("q", bad, 10.0)
    assert "q" not in r.peers
    for i in range(MAX_ORIGINS + 5):
        r.learn(f"o{i}", many[:1], 0.0)
    assert len(r.peers) == MAX_ORIGINS


def test_key_file_in_haproxys_format_the_penultimate_key_encrypts():
    k48 = bytes(range(48))
    k80 = bytes(range(100, 180))
    k80b = bytes(range(1, 81))
    text = "# keys\n" + "\n".join(base64.b64encode(k).decode() for k in (k48, k80, k80b)) + "\n"
    keys = parse_key_file(text)
    assert [len(k.aes) for k in keys] == [16, 32, 32]
    assert keys[1].name == k80[:16] and keys[1].aes == k80[16:48] and keys[1].hmac == k80[48:]
    r = TicketRing(100.0, 1, fixed=keys)
    r.tick(0.0)
    assert r.encrypt_key() is keys[1]
    assert r.exportable(0.0) == []  # file keys are never sent to peers
    for k in keys:
        assert r.lookup(k.name, 1e12) is not None  # file keys do not expire
    only = parse_key_file(base64.b64encode(k80).decode())
    r2 = TicketRing(100.0, 1, fixed=only)
    assert r2.encrypt_key() is only[0]


@pytest.mark.parametrize("text,msg", [
    ("", "no key in the file"),
    ("not base64!!\n", "line 1 is not base64"),
    ("\n" + base64.b64encode(b"x" * 40).decode(), "line 2 holds 40 bytes; a key is 48 or 80"),
    ("\n".join([base64.b64encode(b"x" * 80).decode()] * 2), "two keys share a name"),
])
def test_bad_key_files_are_refused_naming_the_line(text, msg):
    with pytest.raises(ValueError, match=msg) as e:
        parse_key_file(text, "f")
    assert base64.b64encode(b"x" * 80).decode() not in str(e.value)  # never a key in a message


def test_keys_never_appear_in_a_repr():
    k = TicketKey(b"N" * 16, b"A" * 32, b"H" * 32, 1.0, 2.0)
    assert "AAAA" not in repr(k) and "HHHH" not in repr(k) and "NNNN" not in repr(k)
    r = TicketRing(10.0, 1)
    r.tick(0.0)
    assert set(r.describe(0.0)) == {"source", "own_keys", "peer_keys", "current_age"}


def test_node_keys_export_shared_listeners_only_and_survive_a_reconfigure():
    tk = TicketKeys()
    seen = []
    tk.on_change.append(lambda: seen.append(1))
    ra = tk.ring("www", 100.0, 2, None, True, 0.0)
    tk.ring("private", 100.0, 2, None, False, 0.0)
    assert seen and [n for n, _ in tk.export(0.0)] == ["www"]
    k = ra.encrypt_key()
    again = tk.ring("www", 50.0, 3, None, True, 10.0)  # a reload: same ring, keys kept
    assert again is ra and ra.encrypt_key() is k and ra.rotate == 50.0
    other = TicketKeys()
    other.ring("www", 100.0, 2, None, True, 0.0)
    other.ring("private", 100.0, 2, None, False, 0.0)
    assert other.learn("a", tk.export(0.0) + [("private", k), ("gone", k)], 0.0) == 1
    assert other.rings["www"].lookup(k.name, 1.0) is not None
    assert other.rings["private"].lookup(k.name, 1.0) is None  # not shared: not taken
    n = len(seen)
    tk.tick(100.0)
    assert len(seen) == n + 1  # a rotation tells sync
    tk.drop(["www"])
    assert "private" not in tk.rings


BASE = """
[node]
name = "a"
[[pools]]
name = "p"
[[pools.backends]]
name = "b"
address = "127.0.0.1:8080"
[[listeners]]
name = "www"
mode = "http"
bind = "127.0.0.1:8443"
pool = "p"
[listeners.tls]
{extra}
[[listeners.tls.certificates]]
cert = "{cert}"
key = "{cert}"
"""


def _cfg(tmp_path, extra):
    cert = tmp_path / "c.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    return load_config_text(BASE.format(extra=extra, cert=cert))


def test_config_defaults_and_keys(tmp_path):
    t = _cfg(tmp_path, "").listeners[0].tls
    assert (t.session_cache, t.session_lifetime, t.tickets, t.ticket_rotate, t.ticket_keys_kept,
            t.ticket_keys, t.share_ticket_keys) == (20_000, 300.0, True, 3600.0, 2, "", True)
    t = _cfg(tmp_path, 'session_cache = 0\nsession_lifetime = "1h"\nticket_rotate = "30m"\n'
                       'ticket_keys_kept = 3\nshare_ticket_keys = false').listeners[0].tls
    assert (t.session_cache, t.session_lifetime, t.ticket_rotate, t.ticket_keys_kept,
            t.share_ticket_keys) == (0, 3600.0, 1800.0, 3, False)


@pytest.mark.parametrize("extra,msg", [
    ('session_lifetime = "3h"', "listeners[0].tls.session_lifetime: 10800s is longer than "
                                "ticket_rotate x ticket_keys_kept (7200s)"),
    ("ticket_keys_kept = 0", "listeners[0].tls.ticket_keys_kept: 0 out of range"),
    ('ticket_rotate = "1s"', "listeners[0].tls.ticket_rotate:"),
    ('ticket_keys = "/nonexistent/keys"', "listeners[0].tls.ticket_keys: no such file"),
    ("session_cache = -1", "listeners[0].tls.session_cache:"),
    ("tickets = 1", "listeners[0].tls.tickets:"),
])
def test_config_errors_name_the_key(tmp_path, extra, msg):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, extra)
    assert msg in str(e.value), str(e.value)


def test_config_bad_key_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text(base64.b64encode(b"x" * 47).decode() + "\n")
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, f'ticket_keys = "{f}"')
    assert "listeners[0].tls.ticket_keys: line 1 holds 47 bytes" in str(e.value), str(e.value)
    f.write_text(base64.b64encode(b"y" * 80).decode() + "\n")
    assert _cfg(tmp_path, f'ticket_keys = "{f}"').listeners[0].tls.ticket_keys == str(f)
