"""halbd: the node daemon.

    halbd CONFIG            run the node (SIGTERM: graceful handover and stop)
    halbd --check CONFIG    validate the config; exit 0 if good, 1 with one line per problem
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from .. import __version__, _ext
from ..config import ConfigError, load


class _Version(argparse.Action):
    """`halbd 0.1.0 (L7 hot path: compiled)`; looked up only when asked, so that a normal start
    decides (and warns about) the compiled modules after the JSON logging is set up."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"halbd {__version__} ({_ext.summary()})")
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="halbd", description="halb node daemon")
    ap.add_argument("config", help="path to the node's TOML config")
    ap.add_argument("--check", action="store_true", help="validate the config and exit")
    ap.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                    help="override node.log_level")
    ap.add_argument("--upgrade-from", metavar="SOCKET", default="",
                    help=argparse.SUPPRESS)  # started by the running halbd (halbctl upgrade)
    ap.add_argument("--version", action=_Version, help="show the version, and whether the L7 hot "
                    "path runs compiled, and exit")
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as e:
        for p in e.problems:
            print(f"halbd: {args.config}: {p}", file=sys.stderr)
        return 1
    for w in cfg.warnings:
        print(f"halbd: {args.config}: warning: {w}", file=sys.stderr)
    if args.check:
        print(f"{args.config}: ok (node {cfg.node.name!r}, {len(cfg.listeners)} listeners, "
              f"{len(cfg.pools)} pools, {len(cfg.vrrp)} vrrp instances)")
        return 0
    from .. import log
    from ..node import Node

    log.setup(cfg.node.name, args.log_level or cfg.node.log_level)
    log.capture_native_stderr()  # gRPC's C core logs to fd 2: into halb's JSON lines too
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        pass
    try:
        asyncio.run(Node(cfg).run(upgrade_from=args.upgrade_from))
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        print(f"halbd: cannot start: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a clear line for the operator; the traceback goes to the log
        logging.getLogger("halb").exception("halbd_failed")
        print(f"halbd: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
