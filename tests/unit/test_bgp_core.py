"""[bgp]'s decisions (halb.bgp.core) with a fake clock, its config and the FRR output parsing."""

import pytest

from halb.bgp.core import Announce, BgpCore, Withdraw, prefix_of
from halb.bgp.frr import _docs, sessions_of
from halb.config import ConfigError, loads
from halb.node import bgp_vips

pytestmark = pytest.mark.unit

UP = {"web": True, "tcp": True}


def run(core, now, ready=True, healthy=UP, ok=True):
    cmds = core.step(now, ready=ready, healthy=healthy)
    for c in cmds:
        core.done(c, ok)
    return cmds


def test_prefixes():
    assert prefix_of("198.51.100.1") == "198.51.100.1/32"
    assert prefix_of("2001:db8::1") == "2001:db8::1/128"


def test_nothing_before_ready_then_announce():
    c = BgpCore({"198.51.100.1": ("web",), "2001:db8::1": ("web",)})
    assert run(c, 0.0, ready=False) == []
    assert "not ready" in c.reasons["198.51.100.1"]
    assert run(c, 1.0) == [Announce("198.51.100.1/32"), Announce("2001:db8::1/128")]
    assert c.reasons["198.51.100.1"] == ""
    assert run(c, 2.0) == []  # nothing to do
    assert c.counts["announcements"] == 2


def test_no_healthy_backend_withdraws_and_back():
    c = BgpCore({"198.51.100.1": ("web", "tcp"), "198.51.100.2": ("tcp",)})
    run(c, 0.0)
    # one of the VIP's pools healthy keeps it announced
    assert run(c, 1.0, healthy={"web": False, "tcp": True}) == []
    assert run(c, 2.0, healthy={"web": False, "tcp": False}) == [
        Withdraw("198.51.100.1/32"), Withdraw("198.51.100.2/32")]
    assert "no healthy backend in web, tcp" == c.reasons["198.51.100.1"]
    assert c.announced == set()
    assert run(c, 3.0, healthy={"web": True, "tcp": False}) == [Announce("198.51.100.1/32")]


def test_leave_withdraws_everything_until_join():
    c = BgpCore({"198.51.100.1": ("web",)})
    run(c, 0.0)
    c.leave()
    assert run(c, 1.0) == [Withdraw("198.51.100.1/32")]
    assert "leaving" in c.reasons["198.51.100.1"]
    assert run(c, 2.0) == []  # healthy and ready, but leaving
    c.join()
    assert run(c, 3.0) == [Announce("198.51.100.1/32")]


def test_announce_delay_and_immediate_withdrawal():
    c = BgpCore({"198.51.100.1": ("web",)}, announce_delay=5.0)
    assert run(c, 0.0) == []
    assert "announce delay" in c.reasons["198.51.100.1"]
    assert run(c, 4.9) == []
    assert run(c, 5.0) == [Announce("198.51.100.1/32")]
    assert run(c, 6.0, healthy={"web": False}) == [Withdraw("198.51.100.1/32")]
    # a flap restarts the delay
    assert run(c, 7.0) == []
    assert run(c, 11.9) == []
    assert run(c, 12.0) == [Announce("198.51.100.1/32")]


def test_failed_command_is_retried_and_not_duplicated_in_flight():
    c = BgpCore({"198.51.100.1": ("web",)})
    cmds = c.step(0.0, ready=True, healthy=UP)
    assert cmds == [Announce("198.51.100.1/32")]
    assert c.step(0.1, ready=True, healthy=UP) == []  # still in flight
    c.done(cmds[0], False)
    assert c.counts["failures"] == 1 and c.announced == set()
    assert run(c, 1.0) == [Announce("198.51.100.1/32")]
    assert c.announced == {"198.51.100.1/32"}


def test_unknown_state_at_start_is_told_either_way_and_forget_resends():
    c = BgpCore({"198.51.100.1": ("web",), "198.51.100.2": ("tcp",)})
    c.forget()  # start: a killed halbd may have left announcements in the speaker
    assert run(c, 0.0, ready=False) == [Withdraw("198.51.100.1/32"), Withdraw("198.51.100.2/32")]
    assert run(c, 0.5, ready=False) == []  # known now
    c.forget()
    # ready at once: announced (the speaker may or may not have had them)
    assert run(c, 1.0, healthy={"web": True, "tcp": False}) == [
        Withdraw("198.51.100.2/32"), Announce("198.51.100.1/32")]
    assert run(c, 2.0, healthy={"web": True, "tcp": False}) == []
    c.forget()  # the resync: told again, nothing else changes
    assert run(c, 3.0, healthy={"web": True, "tcp": False}) == [
        Withdraw("198.51.100.2/32"), Announce("198.51.100.1/32")]
    assert c.announced == {"198.51.100.1/32"}


BASE = """
[node]
name = "n1"
[[pools]]
name = "web"
backends = [{name = "a", address = "198.51.100.50:80"}]
[[listeners]]
name = "web"
mode = "http"
bind = "198.51.100.10:80"
pool = "web"
"""


def test_config_defaults_and_vips():
    cfg = loads(BASE + '[bgp]\nasn = 65001\npathspace = "n1"\nwithdraw_wait = "2s"\n')
    b = cfg.bgp
    assert (b.asn, b.speaker, b.pathspace, b.withdraw_wait, b.interval) == (65001, "frr", "n1", 2.0, 1.0)
    assert bgp_vips(cfg) == {"198.51.100.10": ("web",)}
    # behind ECMP the pools' default algorithm is Maglev (the same backend on every node)
    assert cfg.pool("web").algorithm == "maglev"
    assert loads(BASE).pool("web").algorithm == "roundrobin"
    assert loads(BASE.replace('name = "web"\nbackends', 'name = "web"\nalgorithm = "leastconn"\nbackends')
                 + "[bgp]\nasn = 1\n").pool("web").algorithm == "leastconn"


@pytest.mark.parametrize("extra, path, words", [
    ("[bgp]\n", "bgp.asn", "required"),
    ("[bgp]\nasn = 0\n", "bgp.asn", "out of range"),
    ('[bgp]\nasn = 1\nspeaker = "bird"\n', "bgp.speaker", "frr"),
    ('[bgp]\nasn = 1\nvips = ["nope"]\n', "bgp.vips[0]", "not an IP"),
    ('[bgp]\nasn = 1\nvips = ["198.51.100.99"]\n', "bgp.vips[0]", "no listener binds"),
    ('[bgp]\nasn = 1\ninterval = "0s"\n', "bgp.interval", "out of range"),
    ('[bgp]\nasn = 1\nfoo = 1\n', "bgp.foo", "unknown key"),
])
def test_config_errors(extra, path, words):
    with pytest.raises(ConfigError) as ei:
        loads(BASE + extra)
    assert any(p.path == path and words in p.reason for p in ei.value.problems), ei.value.problems


SUMMARY = """{
"ipv4Unicast":{"peers":{"198.19.88.1":{"remoteAs":65000,"state":"Established",
 "peerUptimeMsec":8000,"pfxSnt":1}}},
"ipv6Unicast":{"peers":{"198.19.88.1":{"remoteAs":65000,"state":"Established","pfxSnt":2}}}
}
[{"peer":"198.19.88.1","status":"up"}]
% Can't open configuration file /etc/frr/x/vtysh.conf due to 'No such file or directory'."""


def test_frr_output_parsing():
    docs = _docs(SUMMARY)
    assert len(docs) == 2
    rows = sessions_of(docs[0], docs[1])
    assert rows == [{"peer": "198.19.88.1", "remote_as": 65000, "state": "Established",
                     "uptime_ms": 8000, "prefixes_sent": 3, "bfd": "up"}]
    assert sessions_of({}, []) == []


def test_config_warns_nat_behind_ecmp_without_sync():
    text = BASE + """
[[listeners]]
name = "n"
mode = "nat"
bind = "198.51.100.10:81"
pool = "m"
[[pools]]
name = "m"
algorithm = "maglev"
backends = [{name = "a", address = "198.51.100.50:81"}]
[bgp]
asn = 65001
"""
    cfg = loads(text)
    assert any(w.path == "bgp" and "full mesh" in w.reason for w in cfg.warnings), cfg.warnings
    assert bgp_vips(cfg) == {"198.51.100.10": ("web", "m")}


def test_a_resync_tells_the_speaker_again_without_counting_a_change():
    c = BgpCore({"198.51.100.1": ("web",), "198.51.100.2": ("tcp",)})
    run(c, 0.0, healthy={"web": True, "tcp": False})
    assert c.counts == {"announcements": 1, "withdrawals": 0, "failures": 0}
    c.forget()  # every resync_interval: the speaker may have restarted
    cmds = c.step(1.0, ready=True, healthy={"web": True, "tcp": False})
    assert cmds == [Withdraw("198.51.100.2/32"), Announce("198.51.100.1/32")]
    assert [c.done(x, True) for x in cmds] == [False, False]  # no change: not logged, not counted
    assert c.counts == {"announcements": 1, "withdrawals": 0, "failures": 0}
    assert c.announced == {"198.51.100.1/32"} and not c.unknown


def test_a_reload_that_changes_the_vips_or_their_pools():
    c = BgpCore({"198.51.100.1": ("web",), "198.51.100.2": ("tcp",)})
    run(c, 0.0, healthy={"web": True, "tcp": True})
    # the listener on .1 moves to pool web2, .2 is gone, .3 is new
    c.set_vips({"198.51.100.1": ("web2",), "198.51.100.3": ("tcp",)})
    cmds = run(c, 1.0, healthy={"web2": True, "tcp": True})
    assert cmds == [Withdraw("198.51.100.2/32"), Announce("198.51.100.3/32")]
    assert c.announced == {"198.51.100.1/32", "198.51.100.3/32"}
    assert "198.51.100.2" not in c.reasons


def test_a_command_that_never_reported_back_is_sent_again():
    """The edge reports a cancelled command as failed (BgpService.step): it is not left in
    flight, where no later step would send it again."""
    c = BgpCore({"198.51.100.1": ("web",)})
    run(c, 0.0)
    c.leave()
    cmds = c.step(1.0, ready=True, healthy=UP)
    assert cmds == [Withdraw("198.51.100.1/32")]
    assert c.step(1.1, ready=True, healthy=UP) == []  # in flight: not twice at once
    c.done(cmds[0], False)  # (cancelled)
    assert c.step(1.2, ready=True, healthy=UP) == [Withdraw("198.51.100.1/32")]


def test_a_cancelled_drain_leaves_nothing_in_flight():
    """drain-node's caller goes away (Ctrl-C, deadline) while vtysh hangs: the withdrawal is
    cancelled mid-command; the service must send it again on the next step, or a later stop
    would withdraw nothing and leave the VIP announced."""
    import asyncio
    from types import SimpleNamespace

    from halb.bgp.service import BgpService
    from halb.clock import FakeClock
    from halb.config import BgpConfig

    class Speaker:
        def __init__(self):
            self.calls, self.hang = [], False

        async def announce(self, p):
            self.calls.append(("a", p))

        async def withdraw(self, p):
            self.calls.append(("w", p))
            if self.hang:
                await asyncio.sleep(3600)

    async def main():
        sp = Speaker()
        pools = {"web": SimpleNamespace(view=[1])}
        svc = BgpService(BgpConfig(asn=65001), vips={"198.51.100.1": ("web",)}, pools=pools,
                         ready=lambda: True, clock=FakeClock(), speaker=sp)
        await svc.step()
        assert svc.core.announced == {"198.51.100.1/32"}
        sp.hang = True
        svc.core.leave()
        t = asyncio.ensure_future(svc.step())
        await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        sp.hang = False
        await svc.step()
        return sp.calls, svc.core.announced

    calls, announced = asyncio.run(main())
    assert calls == [("a", "198.51.100.1/32"), ("w", "198.51.100.1/32"), ("w", "198.51.100.1/32")]
    assert announced == set()
