"""Reload on the master of a two-node lab (issue 16): 20 reloads of lb1 (SIGHUP) that add and
remove a backend, change a weight and add and remove a listener, while a client in its own
namespace opens a connection to the VIP every 5 ms and keeps a long-lived one echoing every
20 ms, and a sniffer on the LAN timestamps every advert. What must hold, measured by the
client: every connection answered, the long-lived one never broken, the VIP never moves (lb2
stays backup, lb1 alone holds it), and no advert is missed (no gap of two intervals)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.helpers import wait_for

from tests.lab.conftest import CLIENT, LB1, PY, VIP_PORT, Probe, config, events, wait_state

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]

VIP = "198.18.40.100"
RELOADS = 20
INTERVAL = 0.1  # advert interval

# adverts seen on the LAN from the client's namespace: one line per VRRP packet (time, source)
SNIFF = r"""
import socket, sys, time, json
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 112)
# the kernel hands a raw socket multicast only for groups joined on the interface
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             socket.inet_aton("224.0.0.18") + socket.inet_aton(sys.argv[2]))
s.settimeout(0.5)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        data, addr = s.recvfrom(2048)
    except socket.timeout:
        continue
    print(json.dumps({"t": time.monotonic(), "src": addr[0]}), flush=True)
"""

# one long-lived connection through the VIP, echoing every 20 ms; prints a line per failure
ECHO = r"""
import socket, sys, time, json
host, port, dur = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((host, port), timeout=5)
n = ok = 0
end = time.monotonic() + dur
while time.monotonic() < end:
    n += 1
    msg = b"echo %d\n" % n
    try:
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            c = s.recv(len(msg) - len(got))
            if not c:
                raise ConnectionError("closed")
            got += c
        assert got == msg, got
        ok += 1
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        break
    time.sleep(0.02)
print(json.dumps({"done": ok, "sent": n}), flush=True)
"""


def lb1_config(step: int) -> str:
    """lb1's config at reload ``step``: be2 comes and goes from the pool, weights change, a
    second listener (VIP:8001) comes and goes."""
    extra_backend = (f'\n  [[pools.backends]]\n  name = "b2"\n  address = "{CLIENT}:7002"\n'
                     f'  weight = {1 + step % 3}\n') if step % 2 else ""
    text = config("lb1", priority=200, interval="100ms")
    text = text.replace(f'  address = "{CLIENT}:7001"\n',
                        f'  address = "{CLIENT}:7001"\n  weight = {1 + step % 4}\n'
                        + extra_backend)
    if step % 4 in (1, 2):
        text += (f'\n[[listeners]]\nname = "second"\nmode = "tcp"\nbind = "{VIP}:{VIP_PORT + 1}"'
                 f'\npool = "p"\n')
    return text


def test_twenty_reloads_of_the_master_move_nothing(lab):
    b = lab.halbd("hvlb2", config("lb2", priority=100), "lb2")
    a = lab.halbd("hvlb1", lb1_config(0), "lb1")
    wait_state(a, "master", timeout=15)
    wait_state(b, "backup", timeout=10)
    lab.wait_holder(VIP + "/24", "hvlb1")
    duration = RELOADS * 0.4 + 4
    sniff = lab.proc([PY, "-c", SNIFF, str(duration + 1), CLIENT], "hvcl", "sniff")
    echo = lab.proc([PY, "-c", ECHO, VIP, str(VIP_PORT), str(duration)], "hvcl", "echo")
    probe = Probe(lab, VIP, duration=duration)
    holders: list[tuple[float, list[str]]] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            holders.append((time.monotonic(), lab.holder(VIP)))
            time.sleep(0.02)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    time.sleep(1.0)
    lb2_states = len(events(b, "vrrp_state"))
    t_first = time.monotonic()
    cfg = lab.tmp / "lb1.toml"
    for step in range(1, RELOADS + 1):
        cfg.write_text(lb1_config(step))
        n = len(events(a, "reload_done"))
        a.signal(1)  # SIGHUP
        wait_for(lambda: len(events(a, "reload_done")) > n, 10, what=f"reload {step} done")
        time.sleep(0.35)
    t_last = time.monotonic()
    time.sleep(1.0)
    stop.set()
    t.join(5)
    wait_for(lambda: not echo.alive(), duration + 10, what="the echo client finished")
    probe.stop()
    time.sleep(1.2)
    sniff.close()

    results = [r for r in probe.results() if t_first - 0.5 <= r["t"] <= t_last + 0.5]
    failed = [r for r in results if r["who"] not in ("be1", "be2")]
    echo_out = [json.loads(x) for x in echo.output().splitlines() if x.startswith("{")]
    adverts = [json.loads(x)["t"] for x in sniff.output().splitlines()
               if x.startswith("{") and json.loads(x)["src"] == LB1]
    window = [x for x in adverts if t_first - 1 <= x <= t_last + 1]
    gaps = [b2 - b1 for b1, b2 in zip(window, window[1:])]
    moved = [h for _, h in holders if h != ["hvlb1"]]
    print(f"\n{RELOADS} reloads of the master in {t_last - t_first:.1f} s: "
          f"{len(results)} new connections through the VIP, {len(failed)} failed; long-lived "
          f"echo {echo_out[-1] if echo_out else None}; VIP holder samples {len(holders)}, "
          f"not lb1 alone {len(moved)}; adverts {len(window)}, longest gap "
          f"{max(gaps) * 1000 if gaps else -1:.0f} ms")
    assert len(results) > 100
    assert failed == []
    assert echo_out and "error" not in echo_out[0] and echo_out[-1]["done"] > 100, echo_out
    assert moved == []
    assert len(events(b, "vrrp_state")) == lb2_states, "lb2 changed state during the reloads"
    assert len(window) > 50, "the sniffer saw too few adverts"
    assert max(gaps) < 2 * INTERVAL, f"an advert was missed: gap {max(gaps):.3f} s"
    assert a.alive() and b.alive()

