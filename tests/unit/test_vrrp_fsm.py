"""Every rule of the VRRPv3 state machine, walked with an injected time: no sockets, no sleeps."""

from __future__ import annotations

import pytest

from halb.vrrp.fsm import (BACKUP, FAST_MARGIN, FAULT, INIT, MASTER, AddVips, Fsm, Garp, Notify,
                           Params, RemoveVips, SendAdvert, StateChange, master_down_interval,
                           skew_time)

pytestmark = pytest.mark.unit

ME = "198.18.40.11"
PEER_LOW = "198.18.40.10"  # lower address than ME
PEER_HIGH = "198.18.40.12"  # higher address than ME
T0 = 1000.0


def fsm(priority=100, interval=1.0, **kw) -> Fsm:
    return Fsm(Params(vrid=40, priority=priority, interval=interval, address=ME, **kw))


def kinds(acts) -> list[type]:
    return [type(a) for a in acts]


def run_until(f: Fsm, until: float) -> tuple[list, float]:
    """Fires every timer due up to ``until``; returns (actions, time of the last firing)."""
    acts, t = [], None
    while (d := f.deadline()) is not None and d <= until:
        t = d
        acts += f.on_timer(d)
    return acts, t


def master_at(f: Fsm, now: float = T0) -> Fsm:
    """Brings ``f`` to Master through the Master_Down_Timer."""
    f.start(now)
    acts, _ = run_until(f, now + f.mdi)
    assert f.state == MASTER, acts
    return f


# -- timers, RFC 9568 6.1 -------------------------------------------------------------------------


@pytest.mark.parametrize("prio,mai,skew", [
    (100, 1.0, 156 / 256), (254, 1.0, 2 / 256), (1, 1.0, 255 / 256), (100, 0.1, 15.6 / 256),
    (200, 0.01, 0.56 / 256),
])
def test_skew_and_master_down_interval(prio, mai, skew):
    assert skew_time(prio, mai) == pytest.approx(skew)
    assert master_down_interval(prio, mai) == pytest.approx(3 * mai + skew)


# -- Initialize -----------------------------------------------------------------------------------


def test_start_backup_removes_leftover_vips_and_arms_master_down_timer():
    f = fsm(100, 1.0)
    acts = f.start(T0)
    assert f.state == BACKUP
    assert RemoveVips() in acts
    assert StateChange(INIT, BACKUP, "start") in acts
    assert Notify("BACKUP", 100) in acts
    assert SendAdvert not in kinds(acts)
    assert f.down_at == pytest.approx(T0 + 3 + (256 - 100) / 256)


def test_start_owner_becomes_master_at_once():
    f = fsm(255, 1.0)
    acts = f.start(T0)
    assert f.state == MASTER
    assert kinds(acts)[:4] == [RemoveVips, SendAdvert, AddVips, Garp]
    assert acts[1] == SendAdvert(255, 1.0)
    assert f.advert_at == T0 + 1.0
    assert f.master == ME


def test_start_with_failed_tracking_goes_to_fault():
    f = fsm(100)
    f.set_tracking(T0, True, 0)
    acts = f.start(T0)
    assert f.state == FAULT and RemoveVips() in acts and Notify("FAULT", 100) in acts


# -- Backup ---------------------------------------------------------------------------------------


def test_backup_master_down_timer_fires_becomes_master():
    f = fsm(100, 1.0)
    f.start(T0)
    mdi = f.mdi
    assert f.on_timer(T0 + mdi - 0.001) == []
    acts = f.on_timer(T0 + mdi)
    assert f.state == MASTER
    assert kinds(acts)[:3] == [SendAdvert, AddVips, Garp]
    assert StateChange(BACKUP, MASTER, "master down") in acts
    assert Notify("MASTER", 100) in acts
    assert f.advert_at == pytest.approx(T0 + mdi + 1.0)


@pytest.mark.parametrize("preempt,adv_prio,accepted", [
    (True, 150, True),    # higher: accepted, timer reset
    (True, 100, True),    # equal: accepted (RFC: >= local priority)
    (True, 50, False),    # lower with preempt: discarded, we will take over
    (False, 50, True),    # lower without preempt: accepted
    (False, 150, True),
])
def test_backup_advert_rules(preempt, adv_prio, accepted):
    f = fsm(100, 1.0, preempt=preempt)
    f.start(T0)
    before = f.down_at
    f.on_advert(T0 + 2.0, PEER_LOW, adv_prio, 0.5)
    if accepted:
        assert f.mai == 0.5  # the backup adopts the master's interval
        assert f.down_at == pytest.approx(T0 + 2.0 + 3 * 0.5 + (256 - 100) * 0.5 / 256)
        assert f.master == PEER_LOW
    else:
        assert f.down_at == before and f.mai == 1.0 and f.master == ""
        acts, _ = run_until(f, before)
        assert f.state == MASTER


def test_backup_adverts_keep_it_backup_forever():
    f = fsm(100, 0.1)
    f.start(T0)
    t = T0
    for _ in range(200):
        t += 0.1
        assert f.on_timer(t) == []
        f.on_advert(t, PEER_HIGH, 200, 0.1)
    assert f.state == BACKUP and f.master == PEER_HIGH


def test_backup_priority_zero_takes_over_after_skew_time():
    f = fsm(100, 1.0)
    f.start(T0)
    f.on_advert(T0 + 1, PEER_HIGH, 200, 1.0)
    acts = f.on_advert(T0 + 2, PEER_HIGH, 0, 1.0)
    assert acts == []
    assert f.down_at == pytest.approx(T0 + 2 + (256 - 100) / 256)
    assert f.on_timer(T0 + 2 + f.skew - 0.001) == []
    acts = f.on_timer(T0 + 2 + f.skew)
    assert f.state == MASTER


def test_higher_priority_backup_takes_over_first_after_resign():
    hi, lo = fsm(200, 1.0), fsm(100, 1.0)
    for f in (hi, lo):
        f.start(T0)
        f.on_advert(T0 + 1, PEER_HIGH, 250, 1.0)
        f.on_advert(T0 + 2, PEER_HIGH, 0, 1.0)
    assert hi.down_at < lo.down_at


@pytest.mark.parametrize("interval", [0.01, 0.1, 1.0, 40.95])
def test_intervals_down_to_ten_ms(interval):
    f = fsm(100, interval)
    f.start(T0)
    assert f.down_at == pytest.approx(T0 + master_down_interval(100, interval))
    master_at(fsm(100, interval))
    g = master_at(fsm(100, interval))
    acts = g.on_timer(g.advert_at)
    assert acts == [SendAdvert(100, interval)]


def test_backup_shutdown_goes_to_init_without_advert():
    f = fsm(100)
    f.start(T0)
    acts = f.shutdown(T0 + 1)
    assert f.state == INIT and SendAdvert not in kinds(acts) and f.deadline() is None


# -- Master ---------------------------------------------------------------------------------------


def test_master_sends_adverts_every_interval():
    f = master_at(fsm(100, 0.1))
    t0 = f.advert_at
    sent, last = run_until(f, t0 + 0.95)
    assert sent == [SendAdvert(100, 0.1)] * 10
    assert last == pytest.approx(t0 + 0.9)


def test_master_stalled_sends_one_advert_not_a_burst():
    f = master_at(fsm(100, 0.1))
    acts = f.on_timer(f.advert_at + 5.0)
    assert acts == [SendAdvert(100, 0.1)]
    assert f.advert_at > f.since


@pytest.mark.parametrize("adv_prio,src,steps_down", [
    (150, PEER_LOW, True),     # higher priority
    (100, PEER_HIGH, True),    # equal priority, higher address
    (100, PEER_LOW, False),    # equal priority, lower address: we stay and re-announce
    (50, PEER_HIGH, False),    # lower priority: we stay and re-announce
])
def test_master_advert_rules(adv_prio, src, steps_down):
    f = master_at(fsm(100, 1.0))
    now = f.since + 0.3
    acts = f.on_advert(now, src, adv_prio, 0.5)
    if steps_down:
        assert f.state == BACKUP
        assert RemoveVips() in acts and Notify("BACKUP", 100) in acts
        assert f.advert_at is None
        assert f.mai == 0.5 and f.master == src
        assert f.down_at == pytest.approx(now + master_down_interval(100, 0.5))
        # the last word, at our own priority, before the VIPs go: the winner re-announces
        assert acts[0] == SendAdvert(100, 1.0)
        assert acts.index(SendAdvert(100, 1.0)) < acts.index(RemoveVips())
    else:
        assert f.state == MASTER
        assert acts == [SendAdvert(100, 1.0), Garp(True)]
        assert f.advert_at == now + 1.0


def test_split_brain_heal_either_order_leaves_clients_pointed_at_the_winner():
    """Two masters meet again (partition healed, a frozen master resumed). Whichever advert
    crosses first, the winner ends with a gratuitous ARP burst after the loser's last advert,
    so clients that followed the loser's ARPs come back within one exchange."""
    for first in ("winner", "loser"):
        win = Fsm(Params(vrid=40, priority=200, interval=0.1, address=PEER_HIGH))
        lose = Fsm(Params(vrid=40, priority=100, interval=0.1, address=ME))
        master_at(win)
        master_at(lose)
        now = max(win.since, lose.since) + 1.0
        wire = []  # (to, src, priority) adverts in flight
        if first == "winner":
            wire.append((lose, PEER_HIGH, 200))
        else:
            wire.append((win, ME, 100))
        garps = []
        for _ in range(10):
            if not wire:
                break
            to, src, prio = wire.pop(0)
            acts = to.on_advert(now, src, prio, 0.1)
            for a in acts:
                if isinstance(a, SendAdvert) and a.priority:
                    other = lose if to is win else win
                    wire.append((other, to.p.address, a.priority))
                if isinstance(a, Garp):
                    garps.append(to)
            now += 0.001
        assert win.state == MASTER and lose.state == BACKUP, first
        assert garps and garps[-1] is win, first
        assert lose not in garps


def test_lower_master_garp_bursts_are_rate_limited_but_adverts_are_not():
    f = master_at(fsm(200, 0.1))
    t = f.since + 1.0
    assert Garp(True) in f.on_advert(t, PEER_LOW, 100, 0.1)
    # the same lower master keeps talking (it cannot hear us): adverts, no burst every time
    for i in range(1, 9):
        acts = f.on_advert(t + i * 0.1, PEER_LOW, 100, 0.1)
        assert acts == [SendAdvert(200, 0.1)], i
    assert Garp(True) in f.on_advert(t + 1.0, PEER_LOW, 100, 0.1)  # a second later: again
    # a new episode (no lower advert for over 3 intervals) bursts at once
    assert Garp(True) in f.on_advert(t + 1.5, PEER_LOW, 100, 0.1)


def test_master_hearing_priority_zero_sends_advert_at_once():
    f = master_at(fsm(100, 1.0))
    now = f.since + 0.3
    acts = f.on_advert(now, PEER_HIGH, 0, 1.0)
    assert acts == [SendAdvert(100, 1.0)] and f.advert_at == now + 1.0


def test_master_shutdown_resigns_with_priority_zero_and_removes_vips():
    f = master_at(fsm(100, 1.0))
    acts = f.shutdown(f.since + 0.5)
    assert acts[0] == SendAdvert(0, 1.0)
    assert RemoveVips() in acts and f.state == INIT and f.deadline() is None


def test_garp_refresh_is_periodic_while_master():
    f = fsm(100, 1.0, garp_refresh=5.0)
    master_at(f)
    start = f.since
    acts, _ = run_until(f, start + 16.0)
    assert acts.count(Garp(False)) == 3
    f.on_advert(start + 16.5, PEER_HIGH, 200, 1.0)
    assert f.garp_at is None


def test_no_garp_refresh_when_off():
    f = master_at(fsm(100, 1.0))
    acts, _ = run_until(f, f.since + 30)
    assert Garp(False) not in acts


# -- owner, priorities ----------------------------------------------------------------------------


def test_owner_always_preempts_and_keeps_255_under_tracking():
    f = fsm(255, 1.0)
    f.start(T0)
    f.set_tracking(T0 + 1, False, -100)
    assert f.priority == 255
    f.shutdown(T0 + 2)
    f2 = fsm(255, 1.0)
    f2.set_preempt_hold(T0, True)
    f2.start(T0)
    assert f2.state == BACKUP  # held: waits for a master before taking over
    f2.set_preempt_hold(T0 + 0.5, False)
    f2.on_advert(T0 + 1, PEER_HIGH, 254, 1.0)  # lower than 255: owner preempts
    assert f2.master == ""
    run_until(f2, f2.down_at)
    assert f2.state == MASTER


@pytest.mark.parametrize("base,delta,eff", [
    (100, -30, 70), (100, 30, 130), (100, -150, 1), (200, 100, 254), (254, 10, 254), (1, -5, 1),
])
def test_tracking_delta_clamped(base, delta, eff):
    f = fsm(base)
    f.start(T0)
    acts = f.set_tracking(T0 + 1, False, delta)
    assert f.priority == eff
    if eff != base:
        assert Notify("BACKUP", eff) in acts


def test_tracking_lower_priority_master_advertises_new_priority_at_once():
    f = master_at(fsm(150, 1.0))
    acts = f.set_tracking(f.since + 0.2, False, -100)
    assert SendAdvert(50, 1.0) in acts and f.state == MASTER


def test_tracking_fault_master_resigns_and_recovers_to_backup():
    f = master_at(fsm(100, 1.0))
    now = f.since + 0.2
    acts = f.set_tracking(now, True, 0)
    assert f.state == FAULT
    assert acts[0] == SendAdvert(0, 1.0) and RemoveVips() in acts and Notify("FAULT", 100) in acts
    assert f.deadline() is None
    assert f.on_advert(now + 1, PEER_LOW, 50, 1.0) == []  # fault ignores adverts
    acts = f.set_tracking(now + 2, False, 0)
    assert f.state == BACKUP and f.down_at == pytest.approx(now + 2 + f.mdi)


# -- preempt, preempt_delay, holds ----------------------------------------------------------------


def test_preempt_delay_waits_before_preempting_a_lower_master():
    f = fsm(200, 1.0, preempt_delay=5.0)
    f.start(T0)
    t = T0
    while t < T0 + 4.5:  # a live lower master, within the delay: accepted
        t += 1.0
        f.on_advert(t, PEER_LOW, 100, 1.0)
        assert f.master == PEER_LOW and f.state == BACKUP
    t += 1.0  # past the delay: discarded, the timer runs out
    f.on_advert(t, PEER_LOW, 100, 1.0)
    down = f.down_at
    f.on_advert(t + 1.0, PEER_LOW, 100, 1.0)
    assert f.down_at == down
    run_until(f, down)
    assert f.state == MASTER


def test_nopreempt_never_takes_over_from_a_live_lower_master():
    f = fsm(200, 0.1, preempt=False)
    f.start(T0)
    t = T0
    for _ in range(100):
        t += 0.1
        f.on_timer(t)
        f.on_advert(t, PEER_LOW, 50, 0.1)
    assert f.state == BACKUP


def test_preempt_hold_blocks_preemption_but_not_takeover():
    f = fsm(200, 0.1)
    f.set_preempt_hold(T0, True)
    f.start(T0)
    t = T0
    for _ in range(50):
        t += 0.1
        f.on_timer(t)
        f.on_advert(t, PEER_LOW, 50, 0.1)
    assert f.state == BACKUP and f.master == PEER_LOW
    # the master dies: no master at all is still taken over while held
    acts, fired = run_until(f, t + 1.0)
    assert f.state == MASTER and f.since == pytest.approx(t + f.mdi)


def test_preempt_hold_released_preempts_lower_master():
    f = fsm(200, 0.1)
    f.set_preempt_hold(T0, True)
    f.start(T0)
    f.on_advert(T0 + 0.1, PEER_LOW, 50, 0.1)
    f.set_preempt_hold(T0 + 0.15, False)
    f.on_advert(T0 + 0.2, PEER_LOW, 50, 0.1)  # discarded now
    run_until(f, T0 + 0.1 + f.mdi)
    assert f.state == MASTER


def test_handover_resigns_and_holds_until_no_master_is_left():
    f = master_at(fsm(200, 0.1))
    now = f.since + 0.05
    acts = f.handover(now)
    assert acts[0] == SendAdvert(0, 0.1) and RemoveVips() in acts
    assert f.state == BACKUP and StateChange(MASTER, BACKUP, "handover") in acts
    t = now
    for _ in range(50):  # the lower peer took over: we do not preempt it back
        t += 0.1
        f.on_timer(t)
        f.on_advert(t, PEER_LOW, 100, 0.1)
    assert f.state == BACKUP
    run_until(f, t + 1)  # the peer dies: we take over and the hold ends
    assert f.state == MASTER and not f.hold_handover


def test_handover_when_not_master_raises():
    f = fsm(100)
    f.start(T0)
    with pytest.raises(ValueError):
        f.handover(T0)


# -- fast takeover (state-sync stream loss) -------------------------------------------------------


def backup_of(master: str, prio=200, interval=0.1) -> Fsm:
    f = fsm(100, interval)
    f.start(T0)
    f.on_advert(T0 + 0.1, master, prio, interval)
    return f


@pytest.mark.parametrize("lost_after", [0.0, 0.02, 0.05, 0.099, 0.13])
def test_fast_takeover_when_the_next_advert_is_overdue(lost_after):
    f = backup_of(PEER_HIGH)  # last advert at T0 + 0.1
    last = T0 + 0.1
    lost = last + lost_after
    f.sync_peer_lost(lost, PEER_HIGH)
    # due one interval after the last advert (or now, if already overdue), plus the margin
    due = max(lost, last + 0.1) + FAST_MARGIN * 0.1
    assert f.deadline() == pytest.approx(due)
    assert due - last < f.mdi  # well before Master_Down_Interval
    assert f.on_timer(due - 0.001) == []
    acts = f.on_timer(due)
    assert f.state == MASTER and AddVips() in acts
    assert any(isinstance(a, StateChange) and a.reason.startswith("fast takeover") for a in acts)


def test_stream_closing_just_after_an_advert_tolerates_a_late_advert():
    f = backup_of(PEER_HIGH)
    f.sync_peer_lost(T0 + 0.101, PEER_HIGH)  # 1 ms after the last advert
    late = T0 + 0.1 + 0.1 + 0.02  # the next advert arrives 20 ms late
    assert f.on_timer(late - 0.001) == []
    f.on_advert(late, PEER_HIGH, 200, 0.1)
    assert f.state == BACKUP and f.fast_at is None


def test_fast_takeover_cancelled_by_an_advert():
    f = backup_of(PEER_HIGH)
    f.sync_peer_lost(T0 + 0.15, PEER_HIGH)
    f.on_advert(T0 + 0.2, PEER_HIGH, 200, 0.1)
    assert f.fast_at is None
    acts, _ = run_until(f, T0 + 0.2 + 0.1 + 0.01)
    assert f.state == BACKUP


def test_closed_stream_with_adverts_arriving_never_takes_over():
    f = backup_of(PEER_HIGH)
    t = T0 + 0.1
    for i in range(40):
        if i % 4 == 0:
            f.sync_peer_lost(t + 0.01, PEER_HIGH)
        t += 0.1
        f.on_timer(t)
        f.on_advert(t, PEER_HIGH, 200, 0.1)
    assert f.state == BACKUP


def test_fast_takeover_cancelled_by_stream_reopening():
    f = backup_of(PEER_HIGH)
    f.sync_peer_lost(T0 + 0.15, PEER_HIGH)
    f.sync_peer_seen(T0 + 0.18, PEER_HIGH)
    assert f.fast_at is None


@pytest.mark.parametrize("peer", [PEER_LOW, ""])
def test_stream_loss_of_another_peer_is_ignored(peer):
    f = backup_of(PEER_HIGH)
    f.sync_peer_lost(T0 + 0.15, peer)
    assert f.fast_at is None


def test_stream_loss_ignored_by_a_master():
    f = master_at(fsm(100, 0.1))
    f.sync_peer_lost(f.since, PEER_HIGH)
    assert f.fast_at is None


def test_refused_sync_port_after_stream_loss_takes_over_at_once():
    f = backup_of(PEER_HIGH)
    lost = T0 + 0.11  # 10 ms after the last advert
    f.sync_peer_lost(lost, PEER_HIGH)
    acts = f.sync_peer_dead(lost + 0.002, PEER_HIGH)
    assert f.state == MASTER and AddVips() in acts
    assert any(isinstance(a, StateChange) and "refuses connections" in a.reason for a in acts)


def test_refused_sync_port_is_ignored_once_an_advert_proved_the_master_alive():
    f = backup_of(PEER_HIGH)
    f.sync_peer_lost(T0 + 0.15, PEER_HIGH)
    f.on_advert(T0 + 0.2, PEER_HIGH, 200, 0.1)  # alive after all (a restarted process?)
    assert f.sync_peer_dead(T0 + 0.21, PEER_HIGH) == [] and f.state == BACKUP


@pytest.mark.parametrize("peer", [PEER_LOW, ""])
def test_refused_sync_port_of_another_peer_or_without_stream_loss_is_ignored(peer):
    f = backup_of(PEER_HIGH)
    assert f.sync_peer_dead(T0 + 0.15, PEER_HIGH) == []  # no stream loss reported first
    f.sync_peer_lost(T0 + 0.15, PEER_HIGH)
    assert f.sync_peer_dead(T0 + 0.16, peer) == [] and f.state == BACKUP


# -- upgrade: adopt and release (halbctl upgrade) -----------------------------------------------


def test_adopt_is_master_at_once_without_removing_or_sweeping_the_vips():
    f = fsm(priority=150)
    acts = f.adopt(10.0)
    assert f.state == MASTER
    assert not [a for a in acts if isinstance(a, RemoveVips)]
    adds = [a for a in acts if isinstance(a, AddVips)]
    assert adds == [AddVips(adopt=True)]  # idempotent add, no stale-socket sweep
    assert [a for a in acts if isinstance(a, SendAdvert)][0].priority == 150
    assert any(isinstance(a, Garp) for a in acts)
    assert f.deadline() == pytest.approx(11.0)  # the next advert one interval on


def test_adopt_with_failed_tracking_goes_to_fault():
    f = fsm()
    f.set_tracking(0.0, True, 0)
    f.adopt(1.0)
    assert f.state == FAULT


def test_release_says_nothing_and_keeps_the_vips():
    f = fsm(priority=150)
    f.adopt(10.0)
    assert f.release(11.0) == []  # no priority-0 advert, no VIP removal, no state change
    assert f.stopped and f.deadline() is None
    g = fsm(priority=150)
    g.adopt(10.0)
    assert any(isinstance(a, RemoveVips) for a in g.shutdown(11.0))  # unlike a shutdown
