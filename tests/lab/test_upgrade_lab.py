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
import threading
import time

import pytest

from tests.helpers import wait_for
from tests.integration.test_halbctl import halbctl
from tests.lab.conftest import CLIENT, LB1, LB2, PY, VIP_PORT, Probe, config, events, wait_state
from tests.lab.test_reload_lab import ECHO, INTERVAL, SNIFF, VIP

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
    duration = 8.0
    sniff = lab.proc([PY, "-c", SNIFF, str(duration + 1), CLIENT], "hvcl", "sniff")
    echo = lab.proc([PY, "-c", ECHO, VIP, str(VIP_PORT), str(duration)], "hvcl", "echo")
    probe = Probe(lab, VIP, duration=duration)
    holders: list = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            holders.append((time.monotonic(), lab.holder(VIP)))
            time.sleep(0.02)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
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
        check(lab, a, b, sock, t_up, took, echo, probe, sniff, holders, stop, t, lb2_states,
              sticky_before, duration)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(new_pid, signal.SIGKILL)


def check(lab, a, b, sock, t_up, took, echo, probe, sniff, holders, stop, t, lb2_states,
          sticky_before, duration):
    wait_for(lambda: json.loads(halbctl("--socket", sock, "status", "--json")[1])["node"]["pid"]
             != a.pid, 10, what="the new process answers halbctl")
    st = json.loads(halbctl("--socket", sock, "status", "--json")[1])
    inst = st["instances"][0]
    sticky_after = {x["name"]: x["size"] for x in st["tables"]}["sticky"]
    wait_for(lambda: not echo.alive(), duration + 10, what="the echo client finished")
    stop.set()
    t.join(5)
    probe.stop()
    time.sleep(1.2)
    sniff.close()
    results = [r for r in probe.results() if t_up - 1.0 <= r["t"] <= t_up + 4.0]
    failed = [r for r in results if r["who"] not in ("be1", "be2")]
    echo_out = [json.loads(x) for x in echo.output().splitlines() if x.startswith("{")]
    adverts = [json.loads(x)["t"] for x in sniff.output().splitlines()
               if x.startswith("{") and json.loads(x)["src"] == LB1]
    window = [x for x in adverts if t_up - 1 <= x <= t_up + 4]
    gaps = [y - x for x, y in zip(window, window[1:])]
    moved = [h for _, h in holders if h != ["hvlb1"]]
    print(f"\nupgrade of the master took {took * 1000:.0f} ms: {len(results)} new connections "
          f"through the VIP around it, {len(failed)} failed; long-lived echo "
          f"{echo_out[-1] if echo_out else None}; VIP not on lb1 alone in {len(moved)} of "
          f"{len(holders)} samples; adverts {len(window)}, longest gap "
          f"{max(gaps) * 1000 if gaps else -1:.0f} ms; sticky entries {sticky_before} -> "
          f"{sticky_after}")
    assert inst["state"] == "master"
    assert len(results) > 100 and failed == []
    assert echo_out and "error" not in echo_out[0] and echo_out[-1]["done"] > 100, echo_out
    assert moved == []
    assert len(events(b, "vrrp_state")) == lb2_states, "lb2 changed state during the upgrade"
    assert not events(b, "fast_takeover_armed")
    assert events(b, "sync_peer_upgrading")
    assert len(window) > 20 and max(gaps) < 2 * INTERVAL, f"advert gap {max(gaps):.3f} s"
    assert sticky_after >= sticky_before > 0
    # the old process is gone once its connections ended; the new one is master
    wait_for(lambda: not a.alive(), 10, what="the old process exited")
