"""Zero-downtime upgrade of the master in a two-node lab with state sync (issue 16):
``halbctl upgrade`` on lb1 while a client in its own namespace opens a connection to the VIP
every 5 ms and keeps a long-lived one echoing every 20 ms, and a sniffer timestamps every
advert. What must hold, measured by the client: every connection answered, the long-lived one
unbroken, the VIP never moves (lb2 stays backup: the old process says goodbye on the sync
stream, so lb2 arms no fast takeover when that stream closes), no advert missed, the sticky
table intact in the new process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import pytest

from tests.helpers import wait_for
from tests.integration.test_halbctl import halbctl
from tests.lab.conftest import LB1, LB2, config, events, wait_state
from tests.lab.test_reload_lab import VIP, ClientView

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]


def sync(me: str, peer: str, peer_ip: str, my_ip: str) -> str:
    return f"""
[sync]
listen = "{my_ip}:7400"
insecure = true
  [[sync.peers]]
  name = "{peer}"
  address = "{peer_ip}:7400"
"""


def sticky(text: str) -> str:
    return text.replace('[[pools]]\nname = "p"\n',
                        '[[pools]]\nname = "p"\n[pools.sticky]\nmode = "source"\nttl = "10m"\n')


def test_upgrade_of_the_master_moves_nothing(lab):
    b = lab.halbd("hvlb2", sticky(config("lb2", priority=100, extra=sync("lb2", "lb1", LB1, LB2))),
                  "lb2")
    a = lab.halbd("hvlb1", sticky(config("lb1", priority=200, extra=sync("lb1", "lb2", LB2, LB1))),
                  "lb1")
    wait_state(a, "master", timeout=15)
    wait_state(b, "backup", timeout=10)
    lab.wait_holder(VIP + "/24", "hvlb1")
    sock = "/tmp/halb-lab-lb1-40.sock"
    view = ClientView(lab, 8.0)
    time.sleep(1.5)
    lb2_states = len(events(b, "vrrp_state"))
    st = json.loads(halbctl("--socket", sock, "status", "--json")[1])
    old_pid = st["node"]["pid"]
    sticky_before = {x["name"]: x["size"] for x in st["tables"]}["sticky"]
    t_up = time.monotonic()
    code, out, err = halbctl("--socket", sock, "upgrade", "--drain", "30", "--json")
    took = time.monotonic() - t_up
    assert code == 0, err
    new_pid = json.loads(out)["pid"]
    assert new_pid != old_pid
    try:
        check(a, b, sock, t_up, took, view, lb2_states, sticky_before)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(new_pid, signal.SIGKILL)


def check(a, b, sock, t_up, took, view, lb2_states, sticky_before):
    wait_for(lambda: json.loads(halbctl("--socket", sock, "status", "--json")[1])["node"]["pid"]
             != a.pid, 10, what="the new process answers halbctl")
    st = json.loads(halbctl("--socket", sock, "status", "--json")[1])
    inst = st["instances"][0]
    sticky_after = {x["name"]: x["size"] for x in st["tables"]}["sticky"]
    view.finish()
    v = view.summary(t_up - 0.5, t_up + 3.5)
    print(f"\nupgrade of the master took {took * 1000:.0f} ms: " + ClientView.line(v)
          + f"; sticky entries {sticky_before} -> {sticky_after}")
    assert inst["state"] == "master"
    ClientView.check(v)
    assert len(events(b, "vrrp_state")) == lb2_states, "lb2 changed state during the upgrade"
    assert not events(b, "fast_takeover_armed")
    assert events(b, "sync_peer_upgrading")
    assert sticky_after >= sticky_before > 0
    # the old process is gone once its connections ended; the new one is master
    wait_for(lambda: not a.alive(), 10, what="the old process exited")
