"""HAProxy's agent-check protocol (halb.agent): the words, what they change, how they combine
with health checks and an operator's drain, and the traffic shares that follow."""

from __future__ import annotations

from collections import Counter

import pytest

from halb.agent import AgentReply, apply, parse
from halb.config import loads
from halb.model import Pool

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("line,want", [
    ("75%", AgentReply(weight_pct=75)),
    ("weight:40%", AgentReply(weight_pct=40)),
    ("weight:3", AgentReply(weight_abs=3)),
    ("maxconn:30", AgentReply(maxconn=30)),
    ("ready, 50%", AgentReply(weight_pct=50, admin="ready")),
    ("drain", AgentReply(admin="drain")),
    ("maint\n", AgentReply(admin="maint")),
    ("down #disk full", AgentReply(down=True, reason="disk full")),
    ("stopped", AgentReply(down=True)),
    ("fail\tmaxconn:0", AgentReply(maxconn=0, down=True)),
    ("up 100%", AgentReply(weight_pct=100, down=False)),
    ("", AgentReply()),
    ("bogus 10%", AgentReply(weight_pct=10, unknown=("bogus",))),
])
def test_parse(line, want):
    assert parse(line) == want


def pool(weights=(10, 10, 10)) -> Pool:
    cfg = loads('[node]\nname = "n"\n[[pools]]\nname = "p"\nalgorithm = "wrr"\n' + "".join(
        f'[[pools.backends]]\nname = "b{i}"\naddress = "198.18.0.{i + 10}:80"\nweight = {w}\n'
        for i, w in enumerate(weights)))
    return Pool(cfg.pool("p"))


def shares(p: Pool, n: int = 100_000) -> dict[str, float]:
    c = Counter(p.pick().name for _ in range(n))
    return {k: v / n for k, v in c.items()}


def test_percentages_set_the_traffic_shares_within_two_percent():
    p = pool()
    for b, pct in zip(p.backends, (20, 30, 50)):
        assert apply(b, parse(f"{pct}%")) == [f"weight {10 * pct // 100} ({pct}%)"]
    p.refresh(0.0)
    got = shares(p)
    for name, want in (("b0", 0.2), ("b1", 0.3), ("b2", 0.5)):
        assert abs(got[name] - want) <= 0.02, got
    # words not sent leave the weight as it is
    assert apply(p.backends[0], parse("ready")) == []
    assert p.backends[0].agent_weight == 2


def test_drain_maint_down_are_the_agents_own_and_combine_with_the_rest():
    p = pool()
    b0, b1, b2 = p.backends
    apply(b0, parse("drain"))
    apply(b1, parse("down #overloaded"))
    p.refresh(0.0)
    assert [b.name for b in p.view.backends] == ["b2"]
    assert (b0.state(0.0), b1.state(0.0)) == ("drain", "down")
    # an operator's enable does not end the agent's drain; the agent's ready does
    p.set_drain(b0, False, 0.0)
    assert b0 not in p.view.backends
    apply(b0, parse("ready"))
    p.refresh(0.0)
    assert b0 in p.view.backends
    # the agent's up does not bring back a backend its health check holds down
    p.set_health(b1, False, 0.0)
    apply(b1, parse("up"))
    p.refresh(0.0)
    assert b1 not in p.view.backends and b1.state(0.0) == "down"
    p.set_health(b1, True, 0.0)
    assert b1 in p.view.backends
    # maint: out entirely; an operator's drain wins over the agent's weight
    apply(b2, parse("maint"))
    p.refresh(0.0)
    assert b2.state(0.0) == "maint" and b2 not in p.view.backends
    apply(b2, parse("ready 100%"))
    p.set_weight(b2, 0, 0.0)
    assert b2 not in p.view.backends
