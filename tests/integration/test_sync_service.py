"""State sync over real gRPC on loopback, nodes in this process (halb.sync.standalone.SyncNode):
resume after a broken stream, fast crash detection and the start-up preemption hold (with a
recording election), mutual TLS refusing wrong certificates, expiry replication, and
active-active writes converging."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

from halb import pki
from halb.config import Endpoint, SyncConfig, SyncPeer, TLSFiles
from halb.sync.standalone import SyncNode
from halb.tables import sticky_key
from tests.helpers import free_port, free_ports, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


class Election:
    """Records what sync tells the election, with monotonic timestamps."""

    def __init__(self):
        self.calls: list[tuple[float, str, object]] = []

    def set_preempt_hold(self, hold: bool) -> None:
        self.calls.append((time.monotonic(), "hold", hold))

    def sync_peer_lost(self, peer: str) -> None:
        self.calls.append((time.monotonic(), "lost", peer))

    def sync_peer_dead(self, peer: str) -> None:
        self.calls.append((time.monotonic(), "dead", peer))

    def sync_peer_seen(self, peer: str) -> None:
        self.calls.append((time.monotonic(), "seen", peer))

    def of(self, kind):
        return [(t, v) for t, k, v in self.calls if k == kind]


class Relay:
    """A TCP relay between a follower and a sender that the test can cut (RST both sides)."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.port = free_port()
        self.conns: list[asyncio.StreamWriter] = []

    async def start(self):
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", self.port)

    async def _conn(self, r, w):
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            w.close()
            return
        self.conns += [w, uw]

        async def pipe(a, b):
            try:
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                b.close()
        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    def cut(self):
        for w in self.conns:
            sock = w.get_extra_info("socket")
            try:  # linger 0: the close sends RST, as a crashed host's kernel would on next contact
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (OSError, AttributeError):
                pass  # that side is closed already
            w.transport.abort()
        self.conns.clear()

    def freeze(self):
        """Stops forwarding but keeps every socket open: a silent peer, as a frozen process or
        a cable cut looks."""
        for w in self.conns:
            w.transport.pause_reading()

    async def stop(self):
        self.cut()
        self.server.close()
        await self.server.wait_closed()


def cfg(port, peers, tls=None, **kw):
    return SyncConfig(listen=Endpoint("127.0.0.1", port),
                      peers=tuple(SyncPeer(n, Endpoint("127.0.0.1", p)) for n, p in peers),
                      tls=tls, **kw)


def view(node, table="sticky"):
    t = node.tables.by_name(table)
    return sorted((e.key, e.backend, e.origin, e.updated, e.expires) for e in t.entries())


def put_many(node, n, prefix="c", ttl=600.0, start=0):
    t = node.tables.sticky
    for i in range(start, start + n):
        t.put(sticky_key("cookie", "web", f"{prefix}{i:06d}"), f"web{i % 4}", ttl, pool="web")


def test_resume_from_acked_cursor_after_a_broken_stream():
    async def main():
        pa, pb = free_ports(2)
        relay = Relay(pa)
        await relay.start()
        a = SyncNode("a", cfg(pa, [("b", pb)], batch_size=256))
        b = SyncNode("b", cfg(pb, [("a", relay.port)], batch_size=256))
        put_many(a, 5000)
        await a.start()
        await b.start()
        try:
            await until(lambda: len(b.tables.sticky) == 5000, what="first snapshot")
            # every table's snapshot applied (the empty ones end after sticky's: a cut before
            # would make them snapshot again, not resume) and acknowledged
            await until(lambda: all(r.learned for r in b.sync.peers["a"].rx.values()),
                        what="every table learned")
            await until(lambda: a.sync.status()[0]["lag_entries"] == 0, what="acks")
            st = a.sync.status()[0]
            assert st["snapshots_sent"] == 3 and st["resumes"] == 0  # sticky, flow and nat
            relay.cut()
            # (it may reconnect faster than a poll of `connected`: count the disconnects)
            await until(lambda: b.sync.peers["a"].disconnects == 1, 5, "b notices the cut")
            put_many(a, 3000, start=5000)  # written while the link is down
            a.tables.sticky.delete(sticky_key("cookie", "web", "c000007"))
            await until(lambda: len(b.tables.sticky) == 7999, what="resumed stream")
            st = a.sync.status()[0]
            assert st["resumes"] == 3 and st["snapshots_sent"] == 3, st  # one per table
            assert view(a) == view(b)
            assert b.sync.status()[0]["connected"] and b.sync.peers["a"].connects == 2
            from prometheus_client import generate_latest
            await until(lambda: a.sync.status()[0]["lag_entries"] == 0, what="acks after resume")
            ma = generate_latest(a.registry).decode()
            mb = generate_latest(b.registry).decode()
            assert 'halb_sync_lag_entries{peer="b"} 0.0' in ma
            assert 'halb_sync_sent_entries_total{peer="b"} 8001.0' in ma  # 5000 + 3000 + 1 delete
            assert 'halb_sync_snapshots_sent_total{peer="b"} 3.0' in ma
            assert 'halb_sync_peer_connected{peer="a"} 1.0' in mb
            assert 'halb_sync_applied_entries_total{peer="a"} 8001.0' in mb
            assert 'halb_sync_refused_total{peer="(unknown)"} 0.0' in ma
        finally:
            await b.stop()
            await a.stop()
            await relay.stop()
    asyncio.run(main())


def test_closed_stream_is_reported_at_once_and_start_holds_preemption():
    async def main():
        pa, pb = free_ports(2)
        relay = Relay(pa)
        await relay.start()
        el = Election()
        a = SyncNode("a", cfg(pa, [("b", pb)]))
        b = SyncNode("b", cfg(pb, [("a", relay.port)]), election=el, advert_interval=0.1)
        put_many(a, 2000)
        await a.start()
        t0 = time.monotonic()
        await b.start()
        try:
            assert el.calls[0][1:] == ("hold", True)
            await until(lambda: b.sync.ready, 10, "ready")
            holds = el.of("hold")
            assert holds[-1][1] is False and len(b.tables.sticky) == 2000  # learned first
            assert holds[-1][0] - t0 < 2.3  # learned, not timed out
            assert el.of("seen")[0][1] == "127.0.0.1"
            t_cut = time.monotonic()
            relay.cut()
            await until(lambda: el.of("lost"), 2, "peer lost")
            lost_after = el.of("lost")[0][0] - t_cut
            assert lost_after < 0.1, lost_after  # no polling, no keepalive wait
            await until(lambda: len(el.of("seen")) == 2, 10, "seen again")
        finally:
            await b.stop()
            await a.stop()
            await relay.stop()

    asyncio.run(main())


def test_silent_peer_is_dropped_by_keepalive(caplog):
    """No FIN, no RST, nothing: HTTP/2 keepalive pings go unanswered and the link ends after
    about two keepalive periods (5 s + 5 s), reported to the election like a closed stream."""
    import logging

    from halb.sync.service import KEEPALIVE_MS
    caplog.set_level(logging.WARNING, logger="halb")

    async def main():
        pa, pb = free_ports(2)
        relay = Relay(pa)
        await relay.start()
        el = Election()
        a = SyncNode("a", cfg(pa, [("b", pb)]))
        b = SyncNode("b", cfg(pb, [("a", relay.port)]), election=el)
        await a.start()
        await b.start()
        try:
            await until(lambda: b.sync.peers["a"].connected, what="link up")
            t0 = time.monotonic()
            relay.freeze()
            k = KEEPALIVE_MS / 1000
            await until(lambda: b.sync.peers["a"].disconnects == 1, 3 * k + 5, "keepalive drop")
            took = time.monotonic() - t0
            assert k <= took <= 2 * k + 4, took
            # the reason as logged when the link dropped (last_error may already be cleared
            # again: the follower reconnects at once, and a new connection through the relay
            # can come up before this line runs)
            why = [getattr(r, "fields", {}).get("error", "") for r in caplog.records
                   if r.getMessage() == "sync_disconnected"]
            assert any("ping timeout" in w for w in why), why
            assert el.of("lost")
        finally:
            await b.stop()
            await a.stop()
            await relay.stop()
    asyncio.run(main())


def test_unreachable_peer_releases_the_hold_after_the_bounded_wait():
    async def main():
        el = Election()
        pb = free_port()
        b = SyncNode("b", cfg(pb, [("a", free_port())]), election=el, advert_interval=0.1)
        t0 = time.monotonic()
        await b.start()
        try:
            await until(lambda: b.sync.ready, 10, "ready")
            waited = el.of("hold")[-1][0] - t0
            assert 2.3 - 0.05 <= waited < 4.0, waited  # 3 x 0.1 s adverts + 2 s
            st = b.sync.status()[0]
            assert st["state"] in ("down", "connecting") and not st["connected"]
            assert "UNAVAILABLE" in st["last_error"]
        finally:
            await b.stop()
    asyncio.run(main())


def test_expiry_replicates():
    async def main():
        pa, pb = free_ports(2)
        a = SyncNode("a", cfg(pa, [("b", pb)]))
        b = SyncNode("b", cfg(pb, [("a", pa)]))
        await a.start()
        await b.start()
        try:
            put_many(a, 50, prefix="short", ttl=1.0)
            put_many(a, 50, prefix="long", ttl=600.0)
            await until(lambda: len(b.tables.sticky._entries) == 100, what="replication")
            await asyncio.sleep(1.05)
            assert a.tables.sticky.expire() == 50
            # b never runs its own expiry here: the entries leave its map through replication
            await until(lambda: len(b.tables.sticky._entries) == 50, 5, "expiry replicated")
            assert all(k.startswith("cookie/web/long") for k in b.tables.sticky._entries)
            assert view(a) == view(b)
        finally:
            await b.stop()
            await a.stop()
    asyncio.run(main())


def test_active_active_writes_converge():
    """Two writers on overlapping keys (creates, backend changes, deletes) at the same time,
    plus a third node following both: all three converge on the same table."""
    async def main():
        pa, pb, pc = free_ports(3)
        a = SyncNode("a", cfg(pa, [("b", pb), ("c", pc)], batch_size=64))
        b = SyncNode("b", cfg(pb, [("a", pa), ("c", pc)], batch_size=64))
        c = SyncNode("c", cfg(pc, [("a", pa), ("b", pb)], batch_size=64))
        for n in (a, b, c):
            await n.start()
        try:
            for rnd in range(20):
                for i in range(100):
                    k = sticky_key("cookie", "web", f"k{(i * 7 + rnd) % 150}")
                    a.tables.sticky.put(k, f"a{rnd}", 600, pool="web")
                    k2 = sticky_key("cookie", "web", f"k{(i * 11 + rnd * 3) % 150}")
                    b.tables.sticky.put(k2, f"b{rnd}", 600, pool="web")
                    if i % 10 == 0:
                        a.tables.sticky.delete(sticky_key("cookie", "web", f"k{(i + rnd) % 150}"))
                        b.tables.sticky.delete(sticky_key("cookie", "web", f"k{(i * 3 + rnd) % 150}"))
                    a.tables.flow.put(f"l4/tcp/10.0.0.{i}:{rnd}", "t1", 60, pool="web")
                await asyncio.sleep(0.01)

            def same():
                return view(a) == view(b) == view(c) and \
                    view(a, "flow") == view(b, "flow") == view(c, "flow")
            await until(lambda: same() and all(
                s["lag_entries"] == 0 for n in (a, b, c) for s in n.sync.status()), 20, "convergence")
            assert len(a.tables.sticky) > 50 and len(c.tables.flow) == 2000
            origins = {o for _, _, o, _, _ in view(c)}
            assert origins == {"a", "b"}

            def received(n, frm):
                return n.sync.peers[frm].received_entries
            # no echo: a's new writes reach b and c once each, and neither passes them on
            before = {(n.name, f): received(n, f) for n in (a, b, c) for f in n.sync.peers}
            put_many(a, 200, prefix="late")
            await until(lambda: same() and len(c.tables.sticky) == len(a.tables.sticky), 10, "late")
            await asyncio.sleep(0.3)
            after = {(n.name, f): received(n, f) for n in (a, b, c) for f in n.sync.peers}
            delta = {k: after[k] - before[k] for k in after}
            assert delta == {("a", "b"): 0, ("a", "c"): 0, ("b", "a"): 200, ("b", "c"): 0,
                             ("c", "a"): 200, ("c", "b"): 0}, delta
        finally:
            for n in (c, b, a):
                await n.stop()
    asyncio.run(main())


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    good = pki.generate(d / "good", ["a", "b", "mallory"], ips={"a": ["127.0.0.1"]})
    other = pki.generate(d / "other", ["b"])
    return good, other


def tls(res, name):
    return TLSFiles(cert=res["nodes"][name]["cert"], key=res["nodes"][name]["key"],
                    ca=res["ca"]["cert"])


def test_mutual_tls_replicates_between_named_peers(certs):
    good, _ = certs

    async def main():
        pa, pb = free_ports(2)
        a = SyncNode("a", cfg(pa, [("b", pb)], tls=tls(good, "a")))
        b = SyncNode("b", cfg(pb, [("a", pa)], tls=tls(good, "b")))
        put_many(a, 300)
        put_many(b, 200, prefix="bb")
        await a.start()
        await b.start()
        try:
            await until(lambda: len(a.tables.sticky) == len(b.tables.sticky) == 500, what="mTLS sync")
            assert view(a) == view(b)
            assert a.sync.status()[0]["refused"] == 0
        finally:
            await b.stop()
            await a.stop()
    asyncio.run(main())


def test_wrong_certificates_are_refused_and_counted(certs):
    good, other = certs

    async def main():
        pa, pb, pm, pr = free_ports(4)
        # a expects peer b at pr, where a rogue "b" with a certificate from another CA listens
        a = SyncNode("a", cfg(pa, [("b", pr)], tls=tls(good, "a")))
        rogue = SyncNode("b", cfg(pr, [("a", pa)], tls=tls(other, "b")))
        # mallory: a good certificate, but not a peer of a's
        mallory = SyncNode("mallory", cfg(pm, [("a", pa)], tls=tls(good, "mallory")))
        # b: a good certificate for "b", but this process claims to be mallory in its hello
        liar = SyncNode("mallory", cfg(pb, [("a", pa)], tls=tls(good, "b")))
        put_many(a, 100)
        put_many(rogue, 10, prefix="evil")
        for n in (a, rogue, mallory, liar):
            await n.start()
        try:
            await until(lambda: a.sync.refused_unknown >= 1, 10, "mallory refused")
            await until(lambda: a.sync.peers["b"].refused >= 1, 10, "rogue b refused")
            await asyncio.sleep(0.5)
            st = {s["name"]: s for s in a.sync.status()}
            assert st["(unknown)"]["refused"] >= 2  # mallory, and the liar's hello name
            assert "CERTIFICATE_VERIFY_FAILED" in st["b"]["last_error"] or \
                "handshake" in st["b"]["last_error"].lower(), st["b"]["last_error"]
            assert not st["b"]["connected"]
            for n in (rogue, mallory, liar):
                assert len(n.tables.sticky) == (10 if n is rogue else 0)
                assert not n.sync.peers["a"].connected
            assert mallory.sync.peers["a"].last_error.startswith("PERMISSION_DENIED")
            assert len(a.tables.sticky) == 100  # nothing of the rogue's got in
        finally:
            for n in (liar, mallory, rogue, a):
                await n.stop()
    asyncio.run(main())


def test_bad_followers_are_refused_and_the_server_keeps_serving():
    """Garbage bytes, no hello, an ack before the hello, an ack for a batch never sent, an
    unknown node: each stream ends with an error; a good peer is served all along."""
    from grpc import StatusCode, aio

    from halb.v1 import sync_pb2 as pb

    async def main():
        pa, pb_port = free_ports(2)
        a = SyncNode("a", cfg(pa, [("b", pb_port)]))
        b = SyncNode("b", cfg(pb_port, [("a", pa)]))
        put_many(a, 100)
        await a.start()
        await b.start()
        ch = aio.insecure_channel(f"127.0.0.1:{pa}")
        try:
            await until(lambda: len(b.tables.sticky) == 100, what="good peer served")

            async def follow(msgs, raw=False):
                call = ch.stream_stream(
                    "/halb.v1.Sync/Follow",
                    request_serializer=(lambda x: x) if raw else pb.FollowRequest.SerializeToString,
                    response_deserializer=pb.SyncBatch.FromString)(timeout=10)
                for m in msgs:
                    await call.write(m)
                await call.done_writing()
                got = []
                try:
                    async for x in call:
                        got.append(x)
                except aio.AioRpcError as e:
                    return got, e.code()
                return got, StatusCode.OK

            _, code = await follow([b"\xff\xff\xff\xff"], raw=True)
            assert code != StatusCode.OK
            _, code = await follow([])
            assert code == StatusCode.INVALID_ARGUMENT
            _, code = await follow([pb.FollowRequest(ack=pb.SyncAck(batch=1))])
            assert code == StatusCode.INVALID_ARGUMENT
            _, code = await follow([pb.FollowRequest(hello=pb.SyncHello(node="nobody"))])
            assert code == StatusCode.PERMISSION_DENIED
            got, code = await follow([pb.FollowRequest(hello=pb.SyncHello(node="b")),
                                      pb.FollowRequest(ack=pb.SyncAck(batch=10**6))])
            assert got and got[0].node == "a"  # welcome, then the stream is dropped
            assert a.sync.refused_unknown == 1
            put_many(a, 50, prefix="after")
            await until(lambda: len(b.tables.sticky) == 150, what="still serving the good peer")
            assert b.sync.peers["a"].connects == 1
        finally:
            await ch.close()
            await b.stop()
            await a.stop()
    asyncio.run(main())


def test_tls_refusals_are_counted_by_direction_and_reason(certs, tmp_path):
    """A follower with a certificate from a foreign CA (it trusts ours) is refused in the
    handshake on our port: counted as an inbound refusal for the peer it comes from, with
    the reason, in status and metrics. A sync server with a certificate of the right CA but
    the wrong name is an outbound refusal. A port probe that sends nothing is no refusal."""
    from prometheus_client import generate_latest

    good, other = certs
    both = tmp_path / "both-ca.pem"  # the foreign follower trusts our CA too
    both.write_bytes(open(good["ca"]["cert"], "rb").read() + open(other["ca"]["cert"], "rb").read())

    async def main():
        pa, pf, pw = free_ports(3)
        a = SyncNode("a", cfg(pa, [("b", pw)], tls=tls(good, "a")))
        foreign = SyncNode("b", cfg(pf, [("a", pa)], tls=TLSFiles(
            cert=other["nodes"]["b"]["cert"], key=other["nodes"]["b"]["key"], ca=str(both))))
        # listens where a expects b, with a good certificate that names mallory
        wrong = SyncNode("mallory", cfg(pw, [("x", free_port())], tls=tls(good, "mallory")))
        for n in (a, foreign, wrong):
            await n.start()
        try:
            def refusals(direction):
                st = {s["name"]: s for s in a.sync.status()}
                return {x["reason"]: x["count"] for x in st["b"]["refusals"]
                        if x["direction"] == direction}
            await until(lambda: refusals("in").get("tls_unknown_ca", 0) >= 1, 10, "inbound")
            await until(lambda: refusals("out").get("tls_name_mismatch", 0) >= 1, 10, "outbound")
            st = {s["name"]: s for s in a.sync.status()}["b"]
            assert st["refused_in"] >= 1 and st["refused_out"] >= 1
            assert st["refused"] == st["refused_in"] + st["refused_out"]
            assert set(refusals("in")) <= {"tls_unknown_ca", "tls_aborted_by_client"}
            x = next(x for x in st["refusals"] if x["reason"] == "tls_unknown_ca")
            assert x["remote"] == "127.0.0.1" and "sync.tls.ca" in x["detail"]
            assert not foreign.sync.peers["a"].connected and len(foreign.tables.sticky) == 0
            # a port probe (what a peer's crash detection does) sends nothing: no refusal
            z = SyncNode("z", cfg(free_port(), [("q", free_port())], tls=tls(good, "a")))
            await z.start()
            try:
                _, w = await asyncio.open_connection("127.0.0.1", z.sync.port)
                w.close()
                await asyncio.sleep(0.3)
                assert z.sync.peers["q"].refused == 0 and z.sync.refused_unknown == 0, \
                    z.sync.peers["q"].refusals.as_list()
            finally:
                await z.stop()
            text = generate_latest(a.registry).decode()
            assert 'halb_sync_refusals_total{direction="in",peer="b",reason="tls_unknown_ca"}' in text
            assert 'halb_sync_refusals_total{direction="out",peer="b",reason="tls_name_mismatch"}' in text
        finally:
            for n in (wrong, foreign, a):
                await n.stop()
    asyncio.run(main())


def test_link_to_a_restarted_peer_is_back_promptly():
    """While a peer's port refuses connections (its host is up, halbd is restarting) the
    follower retries every REFUSED_BACKOFF, not after the growing backoff (up to MAX_BACKOFF
    = 2 s): the link is back within a fraction of a second of the restarted listener, every
    time. Three restarts after 3 s of refusals each (long enough for the exponential backoff
    to reach its cap)."""
    from halb.sync.service import MAX_BACKOFF, REFUSED_BACKOFF

    async def main():
        pa, pb = free_ports(2)
        b = SyncNode("b", cfg(pb, [("a", pa)]))
        await b.start()
        delays = []
        try:
            for i in range(3):
                await asyncio.sleep(3.0)  # refused all along: attempts pile up
                assert not b.sync.status()[0]["connected"]
                a = SyncNode("a", cfg(pa, [("b", pb)]))
                await a.start()
                t0 = time.monotonic()
                await until(lambda: b.sync.status()[0]["connected"], 5, "link to a")
                delays.append(time.monotonic() - t0)
                await a.stop()
                await until(lambda: not b.sync.status()[0]["connected"], 5, "link down")
        finally:
            await b.stop()
        print(f"link back after {[round(d * 1000) for d in delays]} ms")
        assert max(delays) < REFUSED_BACKOFF + 0.4 < MAX_BACKOFF, delays

    asyncio.run(main())
