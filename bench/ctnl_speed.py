"""Speed of the ctnetlink codec (halb/nat/ctnl.py): ``python bench/ctnl_speed.py``.

Prints microseconds per event for ``parse`` of 1,000 kernel-shaped conntrack events (one per
datagram, as the event groups deliver them; and all in one buffer, as a dump part holds
them), for a message captured from kernel 6.18 (a DNAT'ed TCP entry's "new" event, with the
TCP window-scale and flag attributes and CTA_SYNPROXY the kernel adds), and microseconds per
message for ``encode_create``. Best of 5 rounds; pure CPU, no sockets. Bounded: a few
seconds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from halb.nat import ctnl  # noqa: E402
from halb.nat.ctnl import Flow  # noqa: E402

N = 1000
ROUNDS = 5

# the "new" event of an entry created through ctnetlink with CTA_NAT_DST (kernel 6.18)
KERNEL_NEW_EVENT = bytes.fromhex(
    "e80000000001000600000000793ced9c02000000340001801400018008000100c612320108000200c6123c64"
    "1c00028005000100060000000600020004d200000600030000500000340002801400018008000100c6124601"
    "08000200c61232011c0002800500010006000000060002001f9000000600030004d2000008000c0020488b8d"
    "08000300000001ae0800070000000064300004802c0001800500010003000000050002000000000005000300"
    "00000000060004000800000006000500080000001c0018800800010000000000080002000000000008000300"
    "000000000800080000000007")


def flows(n: int) -> list[Flow]:
    return [Flow(6 if i % 4 else 17, f"198.18.{50 + i // 60000}.{(i // 250) % 250 + 1}",
                 1024 + i % 60000, "198.18.60.100", 80, f"198.18.70.{i % 2 + 1}", 8080)
            for i in range(n)]


def best(fn) -> float:
    times = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    fl = flows(N)
    events = [ctnl.encode_event("new", f, portid=0, ct_id=i, seq=0) for i, f in enumerate(fl)]
    batch = b"".join(events)
    kernel = [KERNEL_NEW_EVENT] * N
    parse = ctnl.parse
    assert all(len(parse(e)) == 1 and parse(e)[0].flow is not None for e in events[:10])
    assert len(parse(batch)) == N
    assert parse(KERNEL_NEW_EVENT)[0].flow is not None

    t_each = best(lambda: [parse(e) for e in events])
    t_batch = best(lambda: parse(batch))
    t_kernel = best(lambda: [parse(e) for e in kernel])
    enc = ctnl.encode_create
    t_enc = best(lambda: [enc(f, seq=i, timeout=300) for i, f in enumerate(fl)])
    t_enc_mark = best(lambda: [enc(f, seq=i, timeout=300, mark=7) for i, f in enumerate(fl)])

    us = 1e6 / N
    print(f"parse, one event per datagram:     {t_each * us:6.2f} us/event")
    print(f"parse, {N} events in one buffer:  {t_batch * us:6.2f} us/event")
    print(f"parse, kernel 6.18 'new' event:    {t_kernel * us:6.2f} us/event")
    print(f"encode_create:                     {t_enc * us:6.2f} us/message")
    print(f"encode_create with mark:           {t_enc_mark * us:6.2f} us/message")


if __name__ == "__main__":
    main()
