"""Runtime backend changes laid over the config file (halb.runtime): HAProxy's
server-state-file rule, the file round trip."""

from __future__ import annotations

import pytest

from halb import runtime
from halb.config import BackendConfig, loads, parse_endpoint

pytestmark = pytest.mark.unit

BASE = '''
[node]
name = "n"
[[pools]]
name = "web"
[[pools.backends]]
name = "w1"
address = "198.18.0.11:80"
[[pools.backends]]
name = "w2"
address = "198.18.0.12:80"
'''


def names(cfg):
    return [b.name for b in cfg.pool("web").backends]


def test_added_and_deleted_backends_apply_until_the_file_changes_them(tmp_path):
    cfg = loads(BASE)
    ov: runtime.Overlay = {}
    runtime.add(ov, cfg.pool("web"), BackendConfig("w3", parse_endpoint("198.18.0.13:80")))
    runtime.delete(ov, cfg.pool("web"), cfg.pool("web"), "w1")
    runtime.set_maint(ov, "web", "w2", True)
    eff = runtime.effective(cfg, ov)
    assert names(eff) == ["w2", "w3"]
    # round trip through the file
    path = runtime.path_for(str(tmp_path), "n")
    runtime.save(path, ov)
    ov2 = runtime.load(path)
    assert names(runtime.effective(cfg, ov2)) == ["w2", "w3"] and ov2["web"].maint == {"w2"}
    # the file now defines w3 itself and changed w1: both entries are dropped, the file wins
    new = loads(BASE.replace('address = "198.18.0.11:80"', 'address = "198.18.0.11:80"\nweight = 5')
                + '[[pools.backends]]\nname = "w3"\naddress = "198.18.0.99:80"\n')
    eff = runtime.effective(new, ov2)
    assert names(eff) == ["w1", "w2", "w3"]
    assert eff.pool("web").backends[2].address.host == "198.18.0.99"
    assert ov2["web"].added == {} and ov2["web"].deleted == {} and ov2["web"].maint == {"w2"}


def test_deleting_a_runtime_backend_forgets_it_and_empty_overlays_are_pruned():
    cfg = loads(BASE)
    ov: runtime.Overlay = {}
    runtime.add(ov, cfg.pool("web"), BackendConfig("w3", parse_endpoint("198.18.0.13:80")))
    runtime.delete(ov, cfg.pool("web"), cfg.pool("web"), "w3")
    assert names(runtime.effective(cfg, ov)) == ["w1", "w2"]
    assert ov == {}


@pytest.mark.parametrize("data", [b"{", b'{"version": 2}',
                                  b'{"version": 1, "pools": {"web": {"added": {"x": {}}}}}'])
def test_a_bad_state_file_is_refused(tmp_path, data):
    p = tmp_path / "n.runtime.json"
    p.write_bytes(data)
    with pytest.raises(ValueError, match="runtime state file"):
        runtime.load(p)
