"""The Election calls other parts use (status, handover, sync_peer_lost/seen, preempt hold),
driven in-process inside a lab namespace against a real halbd peer."""

from __future__ import annotations

import json
import signal

import pytest

from halb.vrrp.fsm import master_down_interval
from lab import netns as nx
from tests.helpers import ROOT
from tests.lab.conftest import LB1, LB2, PY, config, state_of, wait_state

pytestmark = pytest.mark.lab

VIP = "198.18.40.100"
ADV = 0.1
SLACK = 0.150

DRIVER = r"""
import asyncio, json, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from halb.clock import MonotonicClock
from halb.config import load
from halb.metrics import Metrics
from halb.vrrp.election import Election
from tests.helpers import until

cfg = load(sys.argv[2])
scenario = sys.argv[3]
peer_pid = int(sys.argv[4]) if len(sys.argv) > 4 else 0
metrics = Metrics(cfg.node.name)
out = {}


def st():
    return e.status()[0]


async def main():
    global e
    e = Election(cfg.vrrp, clock=MonotonicClock(), registry=metrics.registry, pools={},
                 fast_takeover=cfg.sync.fast_takeover if cfg.sync else True)
    if scenario == "hold":
        e.set_preempt_hold(True)
    await e.start()
    try:
        await run()
    finally:
        await e.stop()
        out["after_stop"] = st()["state"]


async def run():
    if scenario == "handover":
        assert await until(lambda: st()["state"] == "master", 10, interval=0.002)
        out["status"] = st()
        try:
            e.handover("nope")
        except KeyError:
            out["unknown"] = "KeyError"
        e.handover("vi")
        out["after_handover"] = st()["state"]
        await asyncio.sleep(1.5)  # fifteen adverts of the lower priority peer
        out["held"] = st()
        try:
            e.handover("vi")
        except ValueError as x:
            out["not_master"] = str(x)
    elif scenario == "fast":
        assert await until(lambda: st()["state"] == "backup" and st()["master"], 10, interval=0.002)
        master = st()["master"]
        e.sync_peer_lost(master)  # stream closed, adverts still arriving: nothing happens
        await asyncio.sleep(1.0)
        out["alive_master"] = st()["state"]
        e.sync_peer_lost(master)
        e.sync_peer_seen(master)  # reopened: cancelled
        os.kill(peer_pid, signal.SIGSTOP)  # the master freezes (no adverts, no FIN)
        try:
            t0 = time.monotonic()
            e.sync_peer_lost(master)
            t = await until(lambda: st()["state"] == "master", 5, interval=0.002)
            out["fast_takeover"] = t - t0 if t else None
            out["interval"] = st()["advert_interval"]
        finally:
            os.kill(peer_pid, signal.SIGCONT)
        # the old master wakes up with the higher priority: we step down again
        t = await until(lambda: st()["state"] == "backup", 5, interval=0.002)
        out["stepped_down"] = t is not None
    elif scenario == "hold":
        assert await until(lambda: st()["state"] == "backup" and st()["master"], 10, interval=0.002)
        await asyncio.sleep(1.0)
        out["held_state"] = st()["state"]
        t0 = time.monotonic()
        e.set_preempt_hold(False)
        t = await until(lambda: st()["state"] == "master", 5, interval=0.002)
        out["preempted_after"] = t - t0 if t else None


asyncio.run(main())
print(json.dumps(out))
"""


def drive(lab, name: str, prio: int, scenario: str, *args) -> dict:
    path = lab.tmp / f"{name}-driver.toml"
    path.write_text(config(name, priority=prio, listen_vips=False))
    ns = "hvlb1" if name == "lb1" else "hvlb2"
    r = nx.run_in(ns, [PY, "-c", DRIVER, str(ROOT), str(path), scenario, *map(str, args)],
                  timeout=60, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_status_and_handover_holds_the_node_back(lab):
    peer = lab.halbd("hvlb2", config("lb2", priority=100, listen_vips=False), "lb2")
    wait_state(peer, "master", timeout=15)
    out = drive(lab, "lb1", 200, "handover")
    s = out["status"]
    assert s["name"] == "vi" and s["vrid"] == 40 and s["interface"] == "eth0"
    assert s["state"] == "master" and s["priority"] == 200 and s["base_priority"] == 200
    assert s["vips"] == ["198.18.40.100/24"] and s["master"] == LB1
    assert s["advert_interval"] == pytest.approx(ADV) and s["preempt"] is True
    assert 0 <= s["since"] < 5
    assert out["unknown"] == "KeyError"
    assert out["after_handover"] == "backup"
    held = out["held"]
    assert held["state"] == "backup" and held["master"] == LB2  # higher priority, but holds
    assert "not master" in out["not_master"]
    assert out["after_stop"] == "init"
    assert state_of(peer) == "master"


def test_fast_takeover_when_the_sync_stream_closes(lab):
    peer = lab.halbd("hvlb1", config("lb1", priority=200, listen_vips=False), "lb1")
    wait_state(peer, "master", timeout=15)
    out = drive(lab, "lb2", 100, "fast", peer.pid)
    assert out["alive_master"] == "backup"  # a closed stream alone never takes over
    took = out["fast_takeover"]
    assert took is not None
    print(f"fast takeover after {took * 1000:.0f} ms (Master_Down_Interval "
          f"{master_down_interval(100, ADV) * 1000:.0f} ms)")
    assert took <= ADV + SLACK / 3 < master_down_interval(100, ADV)
    assert out["stepped_down"] is True
    assert peer.alive() and state_of(peer) == "master"
    peer.signal(signal.SIGTERM)


def test_preempt_hold_until_released(lab):
    peer = lab.halbd("hvlb2", config("lb2", priority=100, listen_vips=False), "lb2")
    wait_state(peer, "master", timeout=15)
    out = drive(lab, "lb1", 200, "hold")
    assert out["held_state"] == "backup"
    assert out["preempted_after"] is not None
    assert out["preempted_after"] <= master_down_interval(200, ADV) + SLACK
