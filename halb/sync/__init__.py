"""State sync: gRPC replication of the sticky-session and flow/NAT tables between nodes.

Pieces
    ``service.SyncService``   the node part (Sync server + one follower link per peer), built by
                              ``halb.node``; ``status()`` and ``ready`` for the control API
    ``hooks.ElectionHooks``   what it calls on the election (preempt hold, peer lost/dead/seen)
    ``core``                  the pure sender/receiver logic (snapshot or resume, batches, acks)
    ``security``              mutual TLS from ``[sync.tls]`` and the peer-name check
    ``client.fetch_tables``   a one-shot snapshot read of a node (tests, benchmarks)
    ``standalone.SyncNode``   tables + SyncService without the rest of a node
    ``halb.pki.generate``     CA and node certificates (``halbctl pki``)

The wire protocol is described in ``proto/halb/v1/sync.proto``. In short: every node dials
every peer (a full mesh) and follows its tables over one long-lived stream: a snapshot on
first contact (or when too far behind, or after the peer restarted: a new epoch), then its
changes in batches, acknowledged, resumed from the last acknowledged position after a
broken stream. A node ships only the changes it made itself; conflicting writes resolve on
the receiver (newer ``updated`` wins, then the greater node name), so all nodes converge.

What a takeover keeps
    - every sticky entry (cookie and source-IP stickiness) and every flow entry (UDP flows,
      TCP connections' client -> backend mapping) that reached the standby before the master
      died: clients keep their backend. Replication lag is about 0.6 ms at the median (see
      bench/RESULTS.md; garbage-collector pauses of the Python process add up to 100-200 ms
      now and then), so what is lost is the entries of the last moments.
    - a node that starts (or restarts) learns the tables from its peers before it may
      preempt a VIP back (``election.set_preempt_hold``), so preemption loses nothing either.

What it cannot keep
    - TCP connections terminated in the failed node's process (the proxy's own sockets) are
      gone: clients see a reset and reconnect; the replicated entry sends the new connection
      to the same backend. HTTP keep-alive connections likewise; requests in flight fail.
    - entries created in the last moments before a crash that were not yet sent.
    - deletions are carried by bounded tombstones (as many as the table's max entries, kept
      until the deleted entry would have expired); past that bound a deleted entry on a node
      that missed the deletion lives on until its TTL ends.

Fast crash detection: when the stream from a peer closes (its kernel sends FIN/RST when the
process dies), ``election.sync_peer_lost(peer_host)`` is called at once; the election takes
over if no advert follows within one advert interval. A silent peer (frozen, cable cut) keeps
the stream open and falls back to the VRRP timers; the stream's HTTP/2 keepalive drops it
after about 10 s. The host of a peer's ``sync.peers[].address`` must be the address its VRRP
adverts come from for this to match.

Clocks: conflicts and expiry use wall-clock times written by the nodes (``updated``,
``expires``), so the nodes' clocks must agree (NTP); a node whose clock runs ahead wins
conflicting writes and makes entries outlive their TTL on its peers by the difference.

Security: with ``[sync.tls]`` (ca, cert, key) both ends use mutual TLS; a peer is accepted only
if the CA signed its certificate and the certificate names (CN or SAN) a ``sync.peers`` entry,
the one its hello names. Without ``[sync.tls]`` the node logs a warning and accepts any
follower that names a configured peer: use that only on a trusted link.
"""
