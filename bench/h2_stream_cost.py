"""The HTTP/2 protocol core's cost per stream, server side, without I/O (no sockets, no halb):
the time ``h2`` (python-hyper) takes to parse a request's HEADERS frame (HPACK), answer with
HEADERS + DATA and serialize the frames, measured over many streams on one connection.

    python bench/h2_stream_cost.py [--streams 20000]

This is the floor under every HTTP/2 stream halb serves (halb.proxy.h2front): compare it with
the CPU per request of an HTTP/1.1 request through halb (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import time

import h2.config
import h2.connection
import h2.events


def run(n: int) -> float:
    cli = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                               header_encoding=None))
    srv = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                               header_encoding=None))
    cli.initiate_connection()
    srv.initiate_connection()
    srv.receive_data(cli.data_to_send())
    cli.receive_data(srv.data_to_send())
    srv.receive_data(cli.data_to_send())
    hdrs = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"bench.test"),
            (b":path", b"/index.html"), (b"user-agent", b"h2load nghttp2/1.52.0"),
            (b"accept", b"*/*")]
    body = b"x" * 64
    resp = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"64")]
    # client frames prepared up front: only the server's side is timed
    batches = []
    for _ in range(n):
        sid = cli.get_next_available_stream_id()
        cli.send_headers(sid, hdrs, end_stream=True)
        batches.append(cli.data_to_send())
        cli.streams.pop(sid, None)  # (client bookkeeping off the clock)
    srv.local_settings.max_concurrent_streams = n + 10
    # the connection's window, opened as far as it goes (each stream's answer is 64 bytes)
    cli.increment_flow_control_window(2 ** 31 - 1 - 65535)
    srv.receive_data(cli.data_to_send())
    t = time.process_time()
    for data in batches:
        for ev in srv.receive_data(data):
            if type(ev) is h2.events.RequestReceived:
                srv.send_headers(ev.stream_id, resp)
                srv.send_data(ev.stream_id, body, end_stream=True)
        srv.data_to_send()
    return (time.process_time() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    import h2 as _h2
    res = sorted(run(a.streams) for _ in range(a.rounds))
    print(f"h2 {_h2.__version__}: {res[len(res) // 2] * 1e6:.1f} us of CPU per stream, server "
          f"side, no I/O (median of {a.rounds} rounds of {a.streams} streams; "
          f"{', '.join(f'{r * 1e6:.1f}' for r in res)})")


if __name__ == "__main__":
    main()
