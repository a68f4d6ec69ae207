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


class ClientView:
    """What a client in its own namespace sees of the VIP while something happens to the
    master: a new connection every 5 ms (``Probe``), one long-lived connection echoing every
    20 ms, every advert on the LAN timestamped, the VIP's holder sampled every 20 ms.
    ``summary(t0, t1)`` takes the figures of the window [t0, t1] once ``finish`` ran."""

    def __init__(self, lab, duration: float):
        self.lab = lab
        self.sniff = lab.proc([PY, "-c", SNIFF, str(duration + 1), CLIENT], "hvcl", "sniff")
        self.echo = lab.proc([PY, "-c", ECHO, VIP, str(VIP_PORT), str(duration)], "hvcl", "echo")
        self.probe = Probe(lab, VIP, duration=duration)
        self.duration = duration
        self.holders: list[tuple[float, list[str]]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.holders.append((time.monotonic(), self.lab.holder(VIP)))
            time.sleep(0.02)

    def finish(self) -> None:
        """Waits for the echo client's end, then stops the rest."""
        wait_for(lambda: not self.echo.alive(), self.duration + 10,
                 what="the echo client finished")
        self._stop.set()
        self._t.join(5)
        self.probe.stop()
        time.sleep(1.2)
        self.sniff.close()

    def summary(self, t0: float, t1: float) -> dict:
        results = [r for r in self.probe.results() if t0 - 0.5 <= r["t"] <= t1 + 0.5]
        adverts = [json.loads(x)["t"] for x in self.sniff.output().splitlines()
                   if x.startswith("{") and json.loads(x)["src"] == LB1]
        window = [x for x in adverts if t0 - 1 <= x <= t1 + 1]
        return {
            "results": results,
            "failed": [r for r in results if r["who"] not in ("be1", "be2")],
            "echo": [json.loads(x) for x in self.echo.output().splitlines() if x.startswith("{")],
            "adverts": window,
            "gaps": [y - x for x, y in zip(window, window[1:])],
            "moved": [h for _, h in self.holders if h != ["hvlb1"]],
        }

    @staticmethod
    def line(v: dict) -> str:
        echo, gaps = v["echo"], v["gaps"]
        return (f"{len(v['results'])} new connections through the VIP, {len(v['failed'])} "
                f"failed; long-lived echo {echo[-1] if echo else None}; VIP not on lb1 alone in "
                f"{len(v['moved'])} samples; adverts {len(v['adverts'])}, longest gap "
                f"{max(gaps) * 1000 if gaps else -1:.0f} ms")

    @staticmethod
    def check(v: dict) -> None:
        """Every connection answered, the echo unbroken, the VIP never moved, no advert
        missed (no gap of two intervals)."""
        assert len(v["results"]) > 100 and v["failed"] == []
        echo = v["echo"]
        assert echo and "error" not in echo[0] and echo[-1]["done"] > 100, echo
        assert v["moved"] == []
        assert len(v["adverts"]) > 20, "the sniffer saw too few adverts"
        assert max(v["gaps"]) < 2 * INTERVAL, f"an advert was missed: gap {max(v['gaps']):.3f} s"


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
    view = ClientView(lab, RELOADS * 0.4 + 4)
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
    view.finish()
    v = view.summary(t_first, t_last)
    print(f"\n{RELOADS} reloads of the master in {t_last - t_first:.1f} s: "
          + ClientView.line(v))
    ClientView.check(v)
    assert len(events(b, "vrrp_state")) == lb2_states, "lb2 changed state during the reloads"
    assert a.alive() and b.alive()

