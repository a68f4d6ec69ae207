"""``python -m lab demo --mode ecmp`` (lab.ecmpdemo): the NAT connections go on through a
node's death, its rejoin and a graceful leave; the timeline and the picture are written.
Its own lab, prefix "hge"."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from lab import netns as nx
from lab.ecmpdemo import CONNS, PREFIX, run_ecmp_demo

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]


@pytest.fixture
def out_dir(request):
    d = Path(tempfile.mkdtemp(prefix="halb-demo-ecmp-"))
    yield d
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"demo files kept in {d}")
    else:
        shutil.rmtree(d, ignore_errors=True)


def test_ecmp_demo(out_dir, capsys):
    rc = run_ecmp_demo(str(out_dir))
    printed = capsys.readouterr().out
    with capsys.disabled():
        print(printed)
    res = json.loads((out_dir / "ecmp.json").read_text())
    assert rc == 0
    assert res["nat_conns"] == CONNS and res["nat_broken"] == 0 and res["nat_moved_backend"] == 0
    assert res["http_requests"] > 800
    # the FIB went 4 -> 3 (n4 dead) -> 4 (n4 back) -> 3 (n2 left)
    sets = [tuple(n) for _, n in res["fib"]]
    assert ("n1", "n2", "n3") in sets and ("n1", "n3", "n4") in sets, sets
    assert "the router's FIB drops n4 (BFD)" in printed and "n4 announces" in printed
    assert (out_dir / "ecmp.png").stat().st_size > 10_000
    assert not [n for n in nx.list_ns() if n.startswith(PREFIX)]  # removed
