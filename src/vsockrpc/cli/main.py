"""``vsockrpc`` entry point: builds the parser from the subcommand modules, maps errors to exits.

Exit codes: 0 success; 1 an operation failed (one line on stderr, ``--debug`` for a traceback);
2 usage error (argparse, malformed address); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from vsockrpc import __version__
from vsockrpc.cli import agent, bench, bundle, device, forward, image, rpc, vm
from vsockrpc.errors import VsockRpcError

_MODULES = (rpc, device, image, vm, agent, bundle, bench, forward)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vsockrpc",
        description="gRPC between a host and its VMs over vsock.",
    )
    parser.add_argument("--version", action="version", version=f"vsockrpc {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args.func(args)
    except VsockRpcError as err:
        if args.debug:
            traceback.print_exc()
        print(f"vsockrpc: error: {err}", file=sys.stderr)
        if err.hint:
            print(f"hint: {err.hint}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("vsockrpc: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
