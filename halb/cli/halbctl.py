"""halbctl: look at and steer one halb node through its control API.

    halbctl [--socket PATH | --config CONFIG | --address HOST:PORT --ca F --cert F --key F] CMD

    status [--json]                          node, election instances, peers, pools, tables
    backends [POOL] [--json]                 backends with state, weight and connections
    drain POOL BACKEND [--json]              no new connections or requests for the backend
    enable POOL BACKEND [--json]             end a drain
    weight POOL BACKEND N [--json]           set the admin weight (0..256; 0 drains)
    failover INSTANCE [--json]               hand a master instance over to a backup
    reload [--json]                          read the config file again, apply the changes
    upgrade [--drain S] [--json]             replace halbd by a new process, nothing dropped
    drain-node [--wait S] [--json]           [bgp]: withdraw every VIP, wait, then reply
    undrain-node [--json]                    [bgp]: announce the VIPs again
    backend add POOL NAME ADDRESS [--weight N] [--backup] [--max-conns N] [--json]
    backend del POOL NAME [--json]           remove: nothing new at once, connections finish
    backend maint|ready POOL NAME [--json]   maintenance on (no traffic at all) or off
    tables [sticky|flow|nat] [--prefix P] [--limit N] [--json]
    watch [--interval S] [--count N]         status, refreshed live
    pki init --out DIR NODE [NODE...] [--ip NODE=IP ...]   CA and node certificates for a lab

Which node: ``--socket PATH``; else the control socket named in ``--config CONFIG``; else the
only ``*.sock`` under /run/halb. ``--address`` talks TCP with mutual TLS instead.

Exit codes:
    0  done
    1  bad usage, or the node refused the request: unknown pool/backend/instance/table
       (NOT_FOUND), bad value (INVALID_ARGUMENT), not possible now (FAILED_PRECONDITION)
    2  node unreachable: no socket, connection refused, TLS failure or no answer in --timeout
    3  the node failed the call (INTERNAL) or another unexpected error
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # our own messages say what went wrong
import grpc  # noqa: E402

EXIT_OK, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_ERROR = 0, 1, 2, 3
DEFAULT_RUN_DIR = "/run/halb"
DEFAULT_TIMEOUT = 3.0
MAX_LIMIT = 1_000_000
PAGE = 1000

_REFUSED = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.OUT_OF_RANGE}
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class Fail(Exception):
    """Ends the command with a message on stderr and an exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # bad usage exits 1, not argparse's 2
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------
# Reaching the node


def resolve_target(args: argparse.Namespace) -> str:
    """The gRPC target: ``unix:PATH`` or ``host:port``; raises Fail when none can be found."""
    if args.address:
        if not (args.ca and args.cert and args.key):
            raise Fail(EXIT_USAGE, "--address needs --ca, --cert and --key (mutual TLS)")
        from ..config import parse_endpoint
        try:  # HOST:PORT, IPV4:PORT or [IPV6]:PORT, as in the config (and gRPC's target)
            return str(parse_endpoint(args.address))
        except ValueError as e:
            raise Fail(EXIT_USAGE, f"--address {args.address}: {e}") from None
    if args.socket:
        path = args.socket
    elif args.config:
        from ..config import ConfigError, load
        try:
            path = load(args.config).control_socket
        except ConfigError as e:
            raise Fail(EXIT_USAGE, f"{args.config}: " + "; ".join(str(p) for p in e.problems)) from None
    else:
        socks = sorted(Path(DEFAULT_RUN_DIR).glob("*.sock"))
        if not socks:
            raise Fail(EXIT_UNREACHABLE, f"no control socket under {DEFAULT_RUN_DIR} "
                       "(is halbd running? choose a node with --socket or --config)")
        if len(socks) > 1:
            raise Fail(EXIT_USAGE, f"several nodes under {DEFAULT_RUN_DIR} "
                       f"({', '.join(p.name for p in socks)}): choose one with --socket or --config")
        path = str(socks[0])
    p = Path(path)
    try:
        exists = p.exists()
    except PermissionError:
        exists = True  # a directory on the way is closed to us: said below
    if not exists:
        raise Fail(EXIT_UNREACHABLE, f"node unreachable: control socket {path} does not exist "
                   "(is halbd running?)")
    if not os.access(path, os.R_OK | os.W_OK):
        raise Fail(EXIT_UNREACHABLE, f"permission denied on control socket {path}: only its "
                   "owner may use it (run halbctl as the node's user, or use --address)")
    return f"unix:{path}"


def _read(path: str, what: str) -> bytes:
    """A PEM file's bytes, checked to hold what ``what`` names (certificate or key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise Fail(EXIT_USAGE, f"cannot read {what} {path}: {e.strerror}") from None
    try:
        if what == "--key":
            load_pem_private_key(data, password=None)
        else:
            x509.load_pem_x509_certificates(data)
    except (ValueError, TypeError):
        kind = "an unencrypted PEM private key" if what == "--key" else "PEM certificates"
        raise Fail(EXIT_USAGE, f"{what} {path}: not {kind}") from None
    return data


def open_channel(args: argparse.Namespace) -> tuple[grpc.Channel, str]:
    target = resolve_target(args)
    if target.startswith("unix:"):
        return grpc.insecure_channel(target), target
    creds = grpc.ssl_channel_credentials(root_certificates=_read(args.ca, "--ca"),
                                         private_key=_read(args.key, "--key"),
                                         certificate_chain=_read(args.cert, "--cert"))
    opts = []
    if args.server_name:
        opts.append(("grpc.ssl_target_name_override", args.server_name))
    return grpc.secure_channel(target, creds, options=opts), target


class Client:
    """Blocking calls to one node, each with a deadline; gRPC errors become Fail."""

    def __init__(self, args: argparse.Namespace):
        from ..v1 import control_pb2 as pb
        from ..v1 import control_pb2_grpc as pb_grpc

        self.pb = pb
        self.timeout = args.timeout
        self.channel, self.target = open_channel(args)
        self.stub = pb_grpc.ControlStub(self.channel)

    def call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
            if code in _UNREACHABLE:
                why = "no answer within %gs" % self.timeout if code == grpc.StatusCode.DEADLINE_EXCEEDED \
                    else details
                raise Fail(EXIT_UNREACHABLE, f"node unreachable at {self.target}: {why}") from None
            if code in _REFUSED:
                raise Fail(EXIT_USAGE, details or code.name) from None
            raise Fail(EXIT_ERROR, f"{method} failed on the node: {code.name}: {details}") from None

    def status(self):
        return self.call("Status", self.pb.StatusRequest())

    def close(self) -> None:
        self.channel.close()


# ---------------------------------------------------------------------------------------------
# Output


def to_dict(msg: Any) -> dict:
    from google.protobuf import json_format
    return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True,
                                     unquote_int64_if_possible=True)


def _console(file=None):
    from rich.console import Console
    f = file or sys.stdout
    tty = hasattr(f, "isatty") and f.isatty()
    return Console(file=f, width=None if tty else 160, highlight=False, soft_wrap=False)


_STATE_STYLE = {"up": "green", "master": "bold green", "backup": "cyan", "connected": "green",
                "down": "red", "fault": "red", "ejected": "yellow", "drain": "yellow",
                "init": "dim", "disconnected": "red"}


def _styled(s: str) -> str:
    st = _STATE_STYLE.get(s)
    return f"[{st}]{s}[/]" if st and s else (s or "-")


def _dur(s: float) -> str:
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h}h{m}m"
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def backends_table(pools, title: str = "pools"):
    from rich.table import Table
    t = Table(title=title, title_justify="left", expand=False)
    resource = any(p.algorithm == "resource" for p in pools)
    cols = ["pool", "backend", "address", "state", "healthy", "weight", "eff", "active",
            "total", "failures", "rt ms", "role", "agent"]
    if resource:  # algorithm = "resource": the reported load that sets eff
        cols.insert(7, "load")
    for col in cols:
        t.add_column(col, justify="right" if col in ("weight", "eff", "load", "active", "total",
                                                     "failures", "rt ms") else "left")
    for p in pools:
        for b in p.backends:
            row = [p.name, b.name, b.address, _styled(b.state), "yes" if b.healthy else "no",
                   str(b.weight), _eff(p, b), str(b.active), str(b.total),
                   str(b.failures), f"{b.ewma_rt_seconds * 1000:.1f}",
                   ("backup" + (" (serving)" if p.backup_active else "")) if b.backup else "primary",
                   b.agent_state or ("-" if not b.agent else "ok")]
            if resource:
                row.insert(7, _load(p, b))
            t.add_row(*row)
    return t


def _eff(p, b) -> str:
    """The effective weight; in a resource pool it is kept in hundredths of the weight."""
    if p.algorithm == "resource":
        return f"{b.effective_weight / 100:.2f}"
    return str(b.effective_weight)


def _load(p, b) -> str:
    """The smoothed load that sets a resource pool's weights (the last report after it)."""
    if p.algorithm != "resource" or b.load < 0:
        return "-"
    out = f"{b.load * 100:.0f}%"
    if b.load_reported >= 0 and round(b.load_reported * 100) != round(b.load * 100):
        out += f" (now {b.load_reported * 100:.0f}%)"
    return out


def render_status(st) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    n = st.node
    parts: list[Any] = [Text.from_markup(
        f"[bold]node {n.name}[/]  version {n.version}  up {_dur(n.uptime_seconds)}  "
        f"pid {n.pid}  config {n.config or '-'}")]
    if st.election_enabled:
        t = Table(title="election", title_justify="left")
        for col in ("instance", "vrid", "interface", "state", "for", "priority", "base",
                    "vips", "master", "advert", "auth", "refused adverts"):
            t.add_column(col)
        for i in st.instances:
            refused = ", ".join(f"{k} {v}" for k, v in sorted(i.invalid_adverts.items(),
                                                              key=lambda kv: -kv[1]) if v)
            t.add_row(i.name, str(i.vrid), i.interface, _styled(i.state), _dur(i.state_seconds),
                      str(i.priority), str(i.base_priority), " ".join(i.vips), i.master or "-",
                      f"{i.advert_interval:g}s", i.auth or "-", refused or "-")
        parts.append(t)
    else:
        parts.append(Text("election: not configured"))
    if st.sync_enabled:
        t = Table(title="peers (state sync, as this node sees them; tables "
                  + ("learned)" if st.sync_ready else "[yellow]still being learned[/])"),
                  title_justify="left")
        for col in ("peer", "address", "link", "state", "lag entries", "lag s", "acked seq",
                    "sent", "received", "refused", "last error"):
            t.add_column(col)
        for p in st.peers:
            t.add_row(p.name, p.address, _styled("connected" if p.connected else "disconnected"),
                      p.state or "-", str(p.lag_entries), f"{p.lag_seconds:.3f}",
                      str(p.acked_seq), str(p.sent_entries), str(p.received_entries),
                      str(p.refused), p.last_error or "-")
        parts.append(t)
    else:
        parts.append(Text("peers: state sync not configured"))
    parts.append(backends_table(st.pools))
    t = Table(title="tables", title_justify="left")
    for col in ("table", "entries", "max", "seq"):
        t.add_column(col)
    for tb in st.tables:
        t.add_row(tb.name, str(tb.size), str(tb.max_entries), str(tb.seq))
    parts.append(t)
    if st.HasField("nat"):
        n = st.nat
        errs = ", ".join(f"{k} {v}" for k, v in sorted(n.inject_errors.items())) or "none"
        t = Table(title=f"kernel NAT (nftables table {n.table}; replication "
                  f"{'on' if n.replicate else '[yellow]off[/]'}; injected {n.injected}, "
                  f"refreshed {n.refreshed}, removed {n.removed}, refused: {errs}; events lost "
                  f"{n.events_lost})", title_justify="left")
        for col in ("listener", "protocol", "vip", "pool", "held here", "backends in map"):
            t.add_column(col)
        for x in n.listeners:
            vip = f"[{x.vip}]" if ":" in x.vip else x.vip
            t.add_row(x.name, x.protocol, f"{vip}:{x.port}", x.pool,
                      "[green]yes[/]" if x.held else "no", str(x.backends_in_map))
        parts.append(t)
    if st.HasField("bgp"):
        b = st.bgp
        t = Table(title=f"BGP ({b.speaker}, AS {b.asn}{'; [yellow]leaving (drain-node)[/]' if b.leaving else ''}"
                  f"{'; [red]speaker: ' + b.speaker_error + '[/]' if b.speaker_error else ''}; "
                  f"announcements {b.announcements}, withdrawals {b.withdrawals})",
                  title_justify="left")
        for col in ("vip", "prefix", "announced", "why not", "pools"):
            t.add_column(col)
        for v in b.vips:
            t.add_row(v.vip, v.prefix, "[green]yes[/]" if v.announced else "[yellow]no[/]",
                      v.reason or "-", ", ".join(v.pools))
        parts.append(t)
        t = Table(title="BGP sessions", title_justify="left")
        for col in ("peer", "remote AS", "state", "up", "prefixes sent", "BFD"):
            t.add_column(col)
        for r in b.sessions:
            t.add_row(r.peer, str(r.remote_as),
                      f"[green]{r.state}[/]" if r.state == "Established" else f"[red]{r.state}[/]",
                      f"{r.uptime_seconds:.0f} s", str(r.prefixes_sent), r.bfd or "-")
        parts.append(t)
    return Group(*parts)


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_status(args, client: Client) -> int:
    st = client.status()
    if args.json:
        _print_json(to_dict(st))
    else:
        _console().print(render_status(st))
    return EXIT_OK


def cmd_backends(args, client: Client) -> int:
    st = client.status()
    pools = list(st.pools)
    if args.pool:
        pools = [p for p in pools if p.name == args.pool]
        if not pools:
            names = ", ".join(p.name for p in st.pools) or "none"
            raise Fail(EXIT_USAGE, f"no such pool {args.pool!r} (pools: {names})")
    if args.json:
        _print_json([to_dict(b) for p in pools for b in p.backends])
    else:
        _console().print(backends_table(pools, title="backends"))
    return EXIT_OK


def _backend_line(b) -> str:
    return (f"{b.pool}/{b.name}: {b.state} (weight {b.weight}, effective {b.effective_weight}, "
            f"active {b.active})")


def _print_backend(args, b) -> None:
    if args.json:
        _print_json(to_dict(b))
    else:
        print(_backend_line(b))


def cmd_backend(args, client: Client) -> int:
    pb = client.pb
    if args.action == "add":
        req = pb.AddBackendRequest(pool=args.pool, name=args.name, address=args.backend_address,
                                   backup=args.backup, max_conns=args.max_conns)
        if args.weight is not None:
            if not 0 <= args.weight <= 256:
                raise Fail(EXIT_USAGE, f"weight {args.weight} out of range (0..256)")
            req.weight = args.weight
        r = client.call("AddBackend", req)
    elif args.action == "del":
        r = client.call("DeleteBackend", pb.BackendRef(pool=args.pool, backend=args.name))
    else:
        r = client.call("SetMaintenance", pb.SetMaintenanceRequest(
            pool=args.pool, backend=args.name, maint=args.action == "maint"))
    _print_backend(args, r.backend)
    return EXIT_OK


def cmd_drain(args, client: Client) -> int:
    r = client.call("Drain", client.pb.BackendRef(pool=args.pool, backend=args.backend))
    _print_backend(args, r.backend)
    return EXIT_OK


def cmd_enable(args, client: Client) -> int:
    r = client.call("Enable", client.pb.BackendRef(pool=args.pool, backend=args.backend))
    _print_backend(args, r.backend)
    return EXIT_OK


def cmd_weight(args, client: Client) -> int:
    if not -(2 ** 31) <= args.weight < 2 ** 31:
        raise Fail(EXIT_USAGE, f"weight {args.weight} out of range (0..256)")
    r = client.call("SetWeight", client.pb.SetWeightRequest(pool=args.pool, backend=args.backend,
                                                            weight=args.weight))
    _print_backend(args, r.backend)
    return EXIT_OK


def cmd_failover(args, client: Client) -> int:
    r = client.call("Failover", client.pb.FailoverRequest(instance=args.instance))
    i = r.instance
    if args.json:
        _print_json(to_dict(i))
        return EXIT_OK
    print(f"instance {i.name}: handover started; now {i.state or 'unknown'} "
          f"(priority {i.priority})")
    return EXIT_OK


def cmd_upgrade(args, client: Client) -> int:
    req = client.pb.UpgradeRequest()
    if args.drain is not None:
        req.drain_seconds = args.drain
    # the new process must start and take over: allow for that unless --timeout says more
    client.timeout = max(client.timeout, 60.0)
    r = client.call("Upgrade", req)
    if args.json:
        _print_json(to_dict(r))
    elif r.ok:
        print(f"upgraded: the new halbd (pid {r.pid}) serves; the old one drains and exits")
    else:
        print(f"upgrade failed, the running halbd carries on: {r.error}", file=sys.stderr)
    return EXIT_OK if r.ok else EXIT_ERROR


def cmd_drain_node(args, client: Client) -> int:
    req = client.pb.LeaveNodeRequest()
    if args.wait is not None:
        req.wait_seconds = args.wait
    client.timeout = max(client.timeout, (args.wait or 0.0) + 70.0)
    r = client.call("LeaveNode", req)
    if args.json:
        _print_json(to_dict(r))
    else:
        print(f"withdrawn: {', '.join(r.withdrawn) or 'nothing was announced'}; waited "
              f"{r.waited_seconds:.1f} s for the router to move the flows")
    if r.announced:  # the speaker refused or failed: say so, halbd goes on trying
        print(f"still announced (the speaker failed; halbd retries every interval): "
              f"{', '.join(r.announced)}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def cmd_undrain_node(args, client: Client) -> int:
    r = client.call("JoinNode", client.pb.JoinNodeRequest())
    if args.json:
        _print_json(to_dict(r))
    else:
        print(f"joined: announced now: {', '.join(r.announced) or 'nothing yet (not ready)'}")
    return EXIT_OK


def cmd_cache(args, client: Client) -> int:
    r = client.call("CachePurge", client.pb.CachePurgeRequest(
        prefix=args.prefix or "", host=args.host or "", listener=args.listener or ""))
    if args.json:
        _print_json(to_dict(r))
    else:
        what = f"starting with {args.prefix!r}" if args.prefix else "(all)"
        print(f"purged {r.purged} entries {what} from the cache of "
              f"{', '.join(r.listeners)}; {r.entries} entries ({r.bytes} bytes) left")
    return EXIT_OK


def cmd_reload(args, client: Client) -> int:
    r = client.call("Reload", client.pb.ReloadRequest())
    if args.json:
        _print_json(to_dict(r))
    elif r.ok:
        print(f"reloaded {r.config}: " + (f"{len(r.changes)} changes" if r.changes
                                          else "nothing changed"))
        for line in r.changes:
            print(f"  {line}")
    else:
        print(f"reload of {r.config} refused; nothing changed:", file=sys.stderr)
        for line in r.errors:
            print(f"  {line}", file=sys.stderr)
    return EXIT_OK if r.ok else EXIT_USAGE


def dump_table(client: Client, table: str, prefix: str, limit: int) -> tuple[list, int]:
    """Up to ``limit`` entries of one table (paged, PAGE at a time) and the total matching."""
    entries: list = []
    token = ""
    total = 0
    while len(entries) < limit:
        size = min(PAGE, limit - len(entries))
        r = client.call("DumpTable", client.pb.DumpTableRequest(
            table=table, prefix=prefix, page_size=size, page_token=token))
        total = r.total
        entries.extend(r.entries)
        token = r.next_page_token
        if not token or not r.entries:
            break
    return entries, total


def cmd_tables(args, client: Client) -> int:
    from rich.table import Table
    names = [args.table] if args.table else ["sticky", "flow", "nat"]
    out: dict[str, Any] = {}
    for name in names:
        entries, total = dump_table(client, name, args.prefix, args.limit)
        out[name] = (entries, total)
    if args.json:
        _print_json({name: {"total": total, "entries": [to_dict(e) for e in entries]}
                     for name, (entries, total) in out.items()})
        return EXIT_OK
    con = _console()
    now = time.time()
    for name, (entries, total) in out.items():
        t = Table(title=f"{name}: {len(entries)} of {total} entries"
                  + (f" with prefix {args.prefix!r}" if args.prefix else ""), title_justify="left")
        for col in ("key", "pool", "backend", "origin", "expires in", "client"):
            t.add_column(col)
        for e in entries:
            t.add_row(e.key, e.pool, e.backend, e.origin, f"{max(0.0, e.expires - now):.0f}s",
                      e.client or "-")
        con.print(t)
    return EXIT_OK


def cmd_watch(args, client: Client) -> int:
    from rich.text import Text

    con = _console()
    n = 0
    last_ok = True

    def frame():
        nonlocal last_ok
        try:
            r = render_status(client.status())
            last_ok = True
            if con.is_terminal:
                from rich.console import Group
                r = Group(Text(f"halbctl watch: every {args.interval:g}s, last at "
                               + time.strftime("%H:%M:%S") + " (Ctrl-C ends)", style="dim"), r)
            return r
        except Fail as f:
            if f.code != EXIT_UNREACHABLE:
                raise
            last_ok = False
            return Text(f"halbctl: {f.message}", style="red")

    def more() -> bool:
        return args.count is None or n < args.count

    try:
        if con.is_terminal:
            from rich.live import Live
            with Live(frame(), console=con, auto_refresh=False) as live:
                n = 1
                while more():
                    time.sleep(args.interval)
                    live.update(frame(), refresh=True)
                    n += 1
        else:  # a pipe or a file: print each refresh, one after another
            while more():
                if n:
                    time.sleep(args.interval)
                n += 1
                con.rule(f"refresh {n}" + (f"/{args.count}" if args.count else "")
                         + time.strftime(" at %H:%M:%S"))
                con.print(frame())
                sys.stdout.flush()
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK if last_ok else EXIT_UNREACHABLE


def _ip_map(nodes: list[str], pairs: list[str]) -> dict[str, list[str]]:
    ips: dict[str, list[str]] = {}
    for item in pairs:
        node, sep, ip = item.partition("=")
        if not sep or not node or not ip:
            raise Fail(EXIT_USAGE, f"--ip {item!r}: expected NODE=IP")
        if node not in nodes:
            raise Fail(EXIT_USAGE, f"--ip {item!r}: unknown node {node!r} (nodes: {', '.join(nodes)})")
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise Fail(EXIT_USAGE, f"--ip {item!r}: invalid IP address {ip!r}") from None
        ips.setdefault(node, []).append(ip)
    return ips


def cmd_pki_init(args) -> int:
    from ..config import NAME_RE
    for n in args.nodes:
        if not NAME_RE.match(n):
            raise Fail(EXIT_USAGE, f"invalid node name {n!r} (letters, digits, '_', '.', '-')")
    if len(set(args.nodes)) != len(args.nodes):
        raise Fail(EXIT_USAGE, "a node is named twice")
    ips = _ip_map(args.nodes, args.ip or [])
    try:
        from .. import pki
    except ImportError as e:
        raise Fail(EXIT_ERROR, f"pki support is not available: {e}") from None
    try:
        made = pki.generate(Path(args.out), list(args.nodes), ips or None)
    except (OSError, ValueError) as e:
        raise Fail(EXIT_USAGE, f"pki init: {e}") from None
    ca = made.get("ca", {}) if isinstance(made, dict) else {}
    print(f"CA: {ca.get('cert', '?')} (key {ca.get('key', '?')}; "
          f"{'new' if ca.get('created') else 'existing CA reused'})")
    for name, files in (made.get("nodes", {}) if isinstance(made, dict) else {}).items():
        print(f"{name}: {files.get('cert')} (key {files.get('key')})")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Command line


def _positive_float(v: str) -> float:
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {v!r}") from None
    if not 0.05 <= f <= 3600:
        raise argparse.ArgumentTypeError(f"{v} out of range (0.05..3600)")
    return f


def _count(lo: int, hi: int):
    def conv(v: str) -> int:
        try:
            i = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {v!r}") from None
        if not lo <= i <= hi:
            raise argparse.ArgumentTypeError(f"{i} out of range ({lo}..{hi})")
        return i
    return conv


def _int(v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {v!r}") from None


def _node_options(ap: argparse.ArgumentParser, suppress: str, *, main: bool) -> None:
    def d(value):  # defaults live on the main parser only, so a command's copy cannot reset them
        return value if main else suppress
    g = ap.add_argument_group("which node")
    g.add_argument("--socket", metavar="PATH", default=d(None), help="the node's control socket")
    g.add_argument("--config", metavar="CONFIG", default=d(None),
                   help="take the control socket from this node config")
    g.add_argument("--address", metavar="HOST:PORT", default=d(None),
                   help="TCP control address (mutual TLS); IPv6: [ADDRESS]:PORT")
    g.add_argument("--ca", metavar="FILE", default=d(None), help="CA certificate (with --address)")
    g.add_argument("--cert", metavar="FILE", default=d(None),
                   help="client certificate (with --address)")
    g.add_argument("--key", metavar="FILE", default=d(None), help="client key (with --address)")
    g.add_argument("--server-name", metavar="NAME", default=d(None),
                   help="name the node's certificate is issued to, if not the host of --address")
    g.add_argument("--timeout", type=_positive_float, default=d(DEFAULT_TIMEOUT), metavar="S",
                   help=f"deadline of every call (default {DEFAULT_TIMEOUT:g}s)")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    ap = _Parser(prog="halbctl", description="Look at and steer one halb node.",
                 epilog="exit codes: 0 done; 1 bad usage or request refused (unknown name, bad "
                        "value); 2 node unreachable; 3 the node failed the call")
    ap.add_argument("--version", action="version", version=f"halbctl {__version__}")
    _node_options(ap, argparse.SUPPRESS, main=True)
    # the same options are accepted after the command too ("halbctl status --socket X")
    common = argparse.ArgumentParser(add_help=False)
    _node_options(common, argparse.SUPPRESS, main=False)
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("status", parents=[common], help="node, instances, peers, pools and tables")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("backends", parents=[common], help="backends with state, weight and connections")
    p.add_argument("pool", nargs="?", help="only this pool")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_backends)

    for name, fn, hlp in (("drain", cmd_drain, "stop sending new connections to a backend"),
                          ("enable", cmd_enable, "end a drain")):
        p = sub.add_parser(name, parents=[common], help=hlp)
        p.add_argument("pool")
        p.add_argument("backend")
        p.add_argument("--json", action="store_true", help="the backend afterwards, as JSON")
        p.set_defaults(fn=fn)

    p = sub.add_parser("weight", parents=[common], help="set a backend's weight (0..256; 0 drains)")
    p.add_argument("pool")
    p.add_argument("backend")
    p.add_argument("weight", type=_int)
    p.add_argument("--json", action="store_true", help="the backend afterwards, as JSON")
    p.set_defaults(fn=cmd_weight)

    p = sub.add_parser("failover", parents=[common], help="hand a master instance over to a backup")
    p.add_argument("instance")
    p.add_argument("--json", action="store_true", help="the instance afterwards, as JSON")
    p.set_defaults(fn=cmd_failover)

    p = sub.add_parser("backend", parents=[common],
                       help="add, delete or put in maintenance a backend at run time")
    bsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = bsub.add_parser("add", parents=[common], help="add a backend to a pool (kept across "
                        "reloads and restarts unless the config defines it)")
    q.add_argument("pool")
    q.add_argument("name")
    q.add_argument("backend_address", metavar="ADDRESS", help="host:port")
    q.add_argument("--weight", type=_int, default=None, help="0..256 (default 1)")
    q.add_argument("--backup", action="store_true")
    q.add_argument("--max-conns", type=_count(0, 1_000_000), default=0)
    for name, hlp in (("del", "remove a backend: nothing new at once, its connections finish"),
                      ("maint", "maintenance: no traffic at all, sticky clients included"),
                      ("ready", "end maintenance")):
        q2 = bsub.add_parser(name, parents=[common], help=hlp)
        q2.add_argument("pool")
        q2.add_argument("name")
    for q3 in bsub.choices.values():
        q3.add_argument("--json", action="store_true", help="the backend afterwards, as JSON")
        q3.set_defaults(fn=cmd_backend)

    p = sub.add_parser("drain-node", parents=[common],
                       help="[bgp]: withdraw every VIP, wait for the router to move the flows")
    p.add_argument("--wait", type=float, default=None,
                   help="seconds to wait after the withdrawal (default bgp.withdraw_wait)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_drain_node)
    p = sub.add_parser("undrain-node", parents=[common],
                       help="[bgp]: end drain-node; VIPs announced again once servable")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_undrain_node)

    p = sub.add_parser("upgrade", parents=[common],
                       help="replace the running halbd by a new process (sockets, VIPs and "
                            "tables handed over)")
    p.add_argument("--drain", type=float, default=None,
                   help="seconds the old process's connections get to finish (default 30)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_upgrade)

    p = sub.add_parser("cache", parents=[common], help="the HTTP caches ([listeners.cache])")
    csub = p.add_subparsers(dest="cache_cmd", required=True)
    q = csub.add_parser("purge", parents=[common], help="remove stored responses whose request "
                        "target starts with PREFIX (all without one)")
    q.add_argument("prefix", nargs="?", default="", help="e.g. /static/ (default: everything)")
    q.add_argument("--host", help="only responses for this Host")
    q.add_argument("--listener", help="only this listener's cache")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_cache)

    p = sub.add_parser("reload", parents=[common],
                       help="read the node's config file again and apply the changes")
    p.add_argument("--json", action="store_true", help="the changes (or errors) as JSON")
    p.set_defaults(fn=cmd_reload)

    p = sub.add_parser("tables", parents=[common], help="entries of the sticky and flow tables")
    p.add_argument("table", nargs="?", choices=("sticky", "flow", "nat"))
    p.add_argument("--prefix", default="", help="only keys starting with this")
    p.add_argument("--limit", type=_count(1, MAX_LIMIT), default=100,
                   help="at most this many entries per table (default 100)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_tables)

    p = sub.add_parser("watch", parents=[common], help="status, refreshed live")
    p.add_argument("--interval", type=_positive_float, default=1.0, help="seconds between refreshes")
    p.add_argument("--count", type=_count(1, 1_000_000), default=None,
                   help="stop after this many refreshes")
    p.set_defaults(fn=cmd_watch)

    p = sub.add_parser("pki", help="certificates for state sync and the TCP control API")
    psub = p.add_subparsers(dest="pki_cmd", metavar="ACTION", parser_class=_Parser)
    psub.required = True
    pi = psub.add_parser("init", help="make a CA and one certificate per node")
    pi.add_argument("--out", required=True, metavar="DIR", help="directory to write into")
    pi.add_argument("nodes", nargs="+", metavar="NODE")
    pi.add_argument("--ip", action="append", metavar="NODE=IP",
                    help="an IP address for NODE's certificate (repeatable)")
    pi.set_defaults(fn=None, local=cmd_pki_init)
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, bad usage: argparse has printed why
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    client = None
    try:
        if getattr(args, "local", None):
            return args.local(args)
        client = Client(args)
        return args.fn(args, client)
    except Fail as f:
        print(f"halbctl: {f.message}", file=sys.stderr)
        return f.code
    except BrokenPipeError:  # e.g. halbctl status | head
        return EXIT_OK
    finally:
        if client is not None:
            client.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
