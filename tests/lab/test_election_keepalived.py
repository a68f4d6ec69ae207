"""A mixed pair: halbd and keepalived (Debian's package) in one VRID, checksum = "keepalived".

One master at a time, and failover both ways (crash and graceful stop of either side).
"""

from __future__ import annotations

import shutil
import signal
import time

import pytest

from halb.vrrp.fsm import master_down_interval, skew_time
from tests.lab.conftest import VipWatch, config, events, state_of, wait_state
from tests.lab.measure_takeover import start_keepalived

pytestmark = pytest.mark.lab

VIP = "198.18.40.100"
ADV = 0.1
SLACK = 0.150


@pytest.fixture(autouse=True)
def _need_keepalived():
    assert shutil.which("keepalived"), "keepalived is installed by ./dev (APT_BASE)"


def ka_state(proc) -> str:
    state = "init"
    for line in proc.output().splitlines():
        if "Entering MASTER STATE" in line:
            state = "master"
        elif "Entering BACKUP STATE" in line:
            state = "backup"
        elif "Entering FAULT STATE" in line:
            state = "fault"
    return state


def wait_ka(proc, state, timeout=10.0):
    from tests.helpers import wait_for
    wait_for(lambda: ka_state(proc) == state, timeout, interval=0.01,
             what=f"keepalived {state}\n{proc.output()[-2000:]}")


def halb_cfg(name, prio):
    return config(name, priority=prio, checksum="keepalived", listen_vips=False)


def no_invalid(halbd) -> None:
    bad = [e for e in events(halbd, "invalid_advert:checksum")]
    assert not bad, bad


def test_halbd_master_keepalived_backup_failover_both_ways(lab):
    ka = start_keepalived(lab, "hvlb2", "lb2", 100, ADV)
    wait_ka(ka, "master")
    lab.wait_holder(VIP, "hvlb2")
    # halbd with the higher priority preempts keepalived
    h = lab.halbd("hvlb1", halb_cfg("lb1", 200), "lb1")
    wait_state(h, "master", timeout=15)
    wait_ka(ka, "backup", timeout=5)
    lab.wait_holder(VIP, "hvlb1")
    w = VipWatch(lab, VIP)
    time.sleep(1.0)  # ten adverts: both stay where they are
    assert state_of(h) == "master" and ka_state(ka) == "backup"
    # halbd crashes: keepalived takes over within its Master_Down_Interval
    t0 = time.monotonic()
    h.kill()
    wait_ka(ka, "master", timeout=5)
    took = time.monotonic() - t0
    assert took <= master_down_interval(100, ADV) + SLACK, took
    # halbd comes back: removes its leftover VIP, then preempts keepalived
    h2 = lab.halbd("hvlb1", halb_cfg("lb1", 200), "lb1b")
    wait_state(h2, "master", timeout=15)
    wait_ka(ka, "backup", timeout=5)
    lab.wait_holder(VIP, "hvlb1")
    w.both.clear()  # the crash left the VIP on lb1 until the restart; count from here
    time.sleep(0.5)
    # graceful stop of halbd: priority 0, keepalived takes over after its Skew_Time
    t0 = time.monotonic()
    h2.signal(signal.SIGTERM)
    wait_ka(ka, "master", timeout=5)
    took = time.monotonic() - t0
    assert took <= skew_time(100, ADV) + SLACK, took
    lab.wait_holder(VIP, "hvlb2")
    w.stop()
    # the watcher really watched (each look runs `ip` in two namespaces: slower under load, so
    # a floor on the count, and the longest gap goes in the message), and never saw two holders
    assert w.samples >= 20, (w.samples, w.max_gap)
    assert not w.both, f"both held the VIP at {w.both} (looks every <= {w.max_gap:.3f} s)"
    no_invalid(h)
    no_invalid(h2)


def test_keepalived_master_halbd_backup_failover_both_ways(lab):
    h = lab.halbd("hvlb2", halb_cfg("lb2", 100), "lb2")
    wait_state(h, "master", timeout=15)
    ka = start_keepalived(lab, "hvlb1", "lb1", 200, ADV)
    wait_ka(ka, "master", timeout=10)
    wait_state(h, "backup", timeout=5)
    lab.wait_holder(VIP, "hvlb1")
    w = VipWatch(lab, VIP)
    time.sleep(1.0)
    assert state_of(h) == "backup" and h.alive()
    # keepalived stops gracefully: halbd takes over after Skew_Time
    t0 = time.monotonic()
    ka.signal(signal.SIGTERM)
    wait_state(h, "master", timeout=5)
    took = time.monotonic() - t0
    assert took <= skew_time(100, ADV) + SLACK, took
    lab.wait_holder(VIP, "hvlb2")
    ka.p.wait(timeout=10)
    # keepalived returns and preempts; then crashes: halbd takes over
    ka2 = start_keepalived(lab, "hvlb1", "lb1", 200, ADV)
    wait_ka(ka2, "master", timeout=10)
    wait_state(h, "backup", timeout=5)
    lab.wait_holder(VIP, "hvlb1")
    t0 = time.monotonic()
    ka2.kill()
    w.stop()
    wait_state(h, "master", timeout=5)
    took = time.monotonic() - t0
    assert took <= master_down_interval(100, ADV) + SLACK, took
    assert VIP in lab.vips("hvlb2")
    assert not w.both, f"both held the VIP at {w.both}"
    no_invalid(h)


def test_mismatched_checksum_with_keepalived_is_counted_logged_and_warned(lab):
    """The trap the default invites: halbd left at checksum = "rfc9568" (not set) beside a
    keepalived in the same VRID. Each side drops the other's adverts, so both hold the VIP;
    halb must say so: `halbd --check` warns before the start, and the running node counts the
    keepalived adverts as `checksum_mode` per source (status --json, metrics) and logs
    `vrrp_checksum_mismatch` naming the setting to change."""
    import json
    import subprocess

    from lab import netns as nx
    from tests.lab.conftest import LB2, PY

    text = "\n".join(line for line in halb_cfg("lb1", 200).splitlines()
                     if not line.startswith("checksum"))
    path = lab.tmp / "mismatch.toml"
    path.write_text(text)
    chk = subprocess.run([PY, "-m", "halb.cli.halbd", "--check", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert chk.returncode == 0, chk.stderr
    assert "warning: vrrp[0].checksum" in chk.stderr and "keepalived" in chk.stderr, chk.stderr

    ka = start_keepalived(lab, "hvlb2", "lb2", 100, ADV)
    wait_ka(ka, "master")
    h = lab.halbd("hvlb1", text, "lb1-mismatch")
    wait_state(h, "master", timeout=15)
    from tests.helpers import wait_for
    logged = wait_for(lambda: events(h, "vrrp_checksum_mismatch"), 5, what="mismatch logged")
    rec = logged[0]
    assert rec["source"] == LB2 and rec["ours"] == "rfc9568" and rec["theirs"] == "keepalived"
    assert 'checksum = \\"keepalived\\"' in json.dumps(rec["hint"]), rec
    def status():
        out = nx.run_in("hvlb1", [PY, "-m", "halb.cli.halbctl", "--socket",
                                  "/tmp/halb-lab-lb1-40.sock", "status", "--json"],
                        timeout=30).stdout
        return json.loads(out)["instances"][0]
    seen: list = []

    def counted():
        seen[:] = [status()]
        return seen[0]["invalid_adverts"].get("checksum_mode", 0) >= 5
    try:
        wait_for(counted, 20, interval=0.2, what="five keepalived adverts counted as checksum_mode")
    except TimeoutError as e:  # say what was seen: the status and both sides' view
        raise AssertionError(f"{e}\nlast status: {seen[:1]}\nkeepalived: {ka_state(ka)}, "
                             f"halbd: {state_of(h)}\nkeepalived log:\n{ka.output()[-3000:]}"
                             f"\nhalbd log:\n{h.output()[-3000:]}") from None
    inst = status()
    src = [s for s in inst["invalid_sources"] if s["source"] == LB2]
    assert src and src[0]["reason"] == "checksum_mode" and src[0]["count"] >= 5, inst
    # what the mismatch does (why it is worth the warning): both think they are master
    assert ka_state(ka) == "master" and state_of(h) == "master"
    assert sorted(lab.holder(VIP)) == ["hvlb1", "hvlb2"]
    # once per 10 s per source, no flood (ten adverts a second arrive): as many lines as 10 s
    # periods began since the first one (the halbctl calls above can take seconds when the
    # machine is loaded)
    import datetime as dt
    first = dt.datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=dt.timezone.utc).timestamp()
    lines = len(events(h, "vrrp_checksum_mismatch"))
    assert 1 <= lines <= 1 + int((time.time() - first) // 10), lines
