"""``vsockrpc`` entry point: builds the parser from the subcommand modules, maps errors to exits.

The library never exits and knows no exit codes; this module alone maps what a command returns
or raises to the process's exit status:

======  =====================================================================================
0       success
1..255  ``exec``/``shell``: the guest command's own status (128 + N when signal N killed it,
        e.g. 137 for SIGKILL, which is also what ``exec --timeout`` reports)
1       an operation failed (:class:`~vsockrpc.errors.VsockRpcError`): one line on stderr, plus
        a ``hint:`` line when there is one; ``--debug`` adds the traceback. A gRPC status the
        peer returned is a failed call (1) even when it says ``INVALID_ARGUMENT``
2       usage error: argparse's own, or bad input found before anything ran
        (:class:`~vsockrpc.errors.BadInputError` without a peer's status, e.g. a malformed
        address)
130     interrupted (Ctrl-C), 128 + SIGINT
141     stdout (or stderr) is a pipe whose reader went away, e.g. ``vsockrpc exec ... | head``:
        quiet, no traceback. 128 + SIGPIPE is what the shell reports for a process SIGPIPE kills
        (``yes | head``), so ``set -o pipefail`` scripts see vsockrpc like any other filter
======  =====================================================================================

SIGPIPE itself stays ignored (Python's default): restoring ``SIG_DFL`` would also kill the
process on a write to a closed *socket*, which the transports handle as errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from vsockrpc import __version__
from vsockrpc.cli import agent, bench, bundle, device, forward, image, rpc, vm
from vsockrpc.cli._output import closed_output_pipe, detach_closed_output
from vsockrpc.errors import AgentError, RpcError, VsockRpcError

_MODULES = (rpc, device, image, vm, agent, bundle, bench, forward)

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


def exit_status(err: VsockRpcError) -> int:
    """The exit status for an error a command raised (see the table in the module docstring)."""
    peer_status = isinstance(err, (RpcError, AgentError)) and err.code is not None
    if err.bad_input and not peer_status:
        return EXIT_USAGE
    return EXIT_FAILURE


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


def _run(argv: Sequence[str] | None) -> int:
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
        return exit_status(err)
    except KeyboardInterrupt:
        print("vsockrpc: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            # Surface a closed pipe here rather than in the interpreter's exit-time flush
            # (which prints "Exception ignored ... BrokenPipeError" and exits 120).
            sys.stdout.flush()
    except BrokenPipeError:
        if not closed_output_pipe():
            raise  # a socket, not our output: a real error
        detach_closed_output()
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
