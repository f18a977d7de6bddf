"""``vsockrpc forward ADDRESS``: forward host sockets to guest ports and expose host sockets.

::

    vsockrpc forward hvsock:/run/vm.vsock:9999 --listen tcp:127.0.0.1:8080 --to 80
    vsockrpc forward hvsock:/run/vm.vsock:9999 --expose unix:/run/app.sock --as 5000

``ADDRESS`` is the guest's agent address; the forwards reach the same device. ``--listen`` and
``--expose`` may be given several times (each ``--listen`` with its ``--to``, each ``--expose``
with its ``--as``, in order). Runs until SIGINT/SIGTERM/SIGHUP. Exit codes: 2 for bad input (an
address, a port, a mode, an exposed socket that does not exist), 1 when a listener can't be
created (a port in use), 0 after a signal.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from vsockrpc._stopsignals import StopSignals
from vsockrpc.addresses import Address, parse_address
from vsockrpc.cli._args import seconds
from vsockrpc.errors import AddressError, TransportError
from vsockrpc.transport.unix import DEFAULT_MODE
from vsockrpc.vsock_constants import MAX_PORT

if TYPE_CHECKING:  # the forwarder (and grpc) load when the command runs, not for every parser
    from vsockrpc.forward import Forwarder

__all__ = ["exposure", "register"]


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except AddressError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _exposed(text: str) -> Address:
    address = _address(text)
    path = getattr(address, "path", None)  # a Unix socket to expose must exist already
    if isinstance(path, str) and not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"{text}: no such socket file")
    return address


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"bad port {text!r}: expected 1 to {MAX_PORT}")
    return int(text)


def exposure(text: str) -> tuple[Address, int]:
    """``ADDRESS:PORT`` (``unix:/run/app.sock:5000``): a host socket to expose at a port."""
    address, sep, port = text.rpartition(":")
    if not sep or not address or not (port.isascii() and port.isdigit()):
        raise argparse.ArgumentTypeError(
            f"bad exposure {text!r}: expected ADDRESS:PORT, e.g. unix:/run/app.sock:5000"
        )
    return _exposed(address), _port(port)


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad mode {text!r}: expected octal, e.g. 600") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"bad mode {text!r}: expected 000 to 777")
    return mode


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "forward",
        help="forward host sockets to guest ports, expose host sockets to the guest",
        description=(
            "Forward connections between host sockets and the ports of the guest whose agent "
            "is at ADDRESS (hvsock:PATH:PORT or vsock:CID:PORT), until a stop signal. Each "
            "connection is opened afresh: one failing, or the guest rebooting, never stops "
            "the forwarder."
        ),
    )
    parser.add_argument("address", metavar="ADDRESS", type=_address, help="the guest's agent")
    parser.add_argument(
        "--listen",
        metavar="ADDRESS",
        type=_address,
        action="append",
        default=[],
        help="host → guest: accept here (tcp:HOST:PORT or unix:PATH); repeatable, with --to",
    )
    parser.add_argument(
        "--to", metavar="PORT", type=_port, action="append", default=[], help="guest port"
    )
    parser.add_argument(
        "--expose",
        metavar="ADDRESS",
        type=_exposed,
        action="append",
        default=[],
        help="guest → host: this host socket (unix:PATH or tcp:HOST:PORT); repeatable, with --as",
    )
    parser.add_argument(
        "--as",
        dest="as_port",
        metavar="PORT",
        type=_port,
        action="append",
        default=[],
        help="the port the guest connects to (CID 2) to reach the matching --expose",
    )
    parser.add_argument(
        "--mode",
        type=_mode,
        default=DEFAULT_MODE,
        help=f"mode of the Unix sockets created (octal, default {DEFAULT_MODE:o})",
    )
    parser.add_argument(
        "--connect-timeout",
        type=seconds,
        default=10.0,
        metavar="S",
        help="seconds each connection may take to reach its destination (10)",
    )
    parser.set_defaults(func=_run, parser=parser)


def _check(args: argparse.Namespace) -> None:
    parser: argparse.ArgumentParser = args.parser
    if len(args.listen) != len(args.to):
        parser.error("give one --to PORT for each --listen ADDRESS")
    if len(args.expose) != len(args.as_port):
        parser.error("give one --as PORT for each --expose ADDRESS")
    if not args.listen and not args.expose:
        parser.error("nothing to forward: give --listen ADDRESS --to PORT or --expose/--as")


def _start(args: argparse.Namespace, stack: contextlib.ExitStack) -> list[Forwarder]:
    from vsockrpc.forward import expose, forward

    started: list[Forwarder] = []
    common = {"mode": args.mode, "connect_timeout": args.connect_timeout}
    try:
        for listen, port in zip(args.listen, args.to, strict=True):
            started.append(
                stack.enter_context(forward(args.address, listen=listen, to=port, **common))
            )
        for target, port in zip(args.expose, args.as_port, strict=True):
            started.append(stack.enter_context(expose(args.address, target, port=port, **common)))
    except AddressError as err:
        args.parser.error(str(err))
    except TransportError as err:  # e.g. the port is in use: one line, exit 1
        raise TransportError(str(err)) from err
    return started


def _run(args: argparse.Namespace) -> int:
    _check(args)
    logging.getLogger("vsockrpc.forward").setLevel(logging.INFO)
    # Each stop signal: close, remove the sockets, exit 0 (later ones are ignored meanwhile).
    with StopSignals(absorb_after=True) as stop, contextlib.ExitStack() as stack:
        for forwarder in _start(args, stack):
            print(f"forwarding {forwarder.description}", flush=True)
        while not stop.event.wait(0.5):
            pass
        print("stopping", file=sys.stderr, flush=True)
    return 0
