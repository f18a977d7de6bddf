"""``vsockrpc serve`` and ``vsockrpc add``: the seed system's server and client.

``serve`` runs Addition (with health and reflection) on one or more addresses until
SIGINT/SIGTERM/SIGHUP; ``--agent`` adds the guest agent's Exec, Files and System
(:func:`vsockrpc.services.served`), which give whoever is admitted the server's user:
on Unix sockets only root and the server's own user are admitted (``SO_PEERCRED``), more with
``--allow-uid``. Unix socket files get mode ``--mode`` (default 0600) whatever the umask.
``--access-log`` logs one line per call (off by default: nothing is spent per call on it).
``add A B --target ADDRESS`` calls Addition and prints
``Addition result: A + B = C``; a failed call prints one line with the gRPC status name and
exits 1 (the original printed -1 and exited 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pwd
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vsockrpc._checks import positive_int
from vsockrpc._fdlimit import raise_open_files_limit
from vsockrpc._stopsignals import StopSignals
from vsockrpc.addresses import Address, parse_address
from vsockrpc.cli._args import seconds, seconds_or_zero
from vsockrpc.errors import AddressError, RpcError, TransportTimeout
from vsockrpc.transport import unix as unix_transport

if TYPE_CHECKING:  # grpc and the services load when a command runs, not for every parser
    import grpc

__all__ = ["DEFAULT_LISTEN", "register"]

DEFAULT_LISTEN = "vsock:-1:9999"


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except AddressError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _int32(text: str) -> int:
    from vsockrpc.services import addition

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not addition.INT32_MIN <= value <= addition.INT32_MAX:
        raise argparse.ArgumentTypeError(f"{value} does not fit in an int32")
    return value


def _mode(text: str) -> int:
    try:
        value = int(text.lower().removeprefix("0o"), 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0600") from None
    try:
        return unix_transport.check_mode(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a permission mode (0 to 0777)") from None


def _uid(text: str) -> int | None:
    if text == "any":
        return None
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a uid nor a user name") from None


_SERVE_DESCRIPTION = (
    "Serve the Addition service (with gRPC health and reflection) on the given addresses. "
    "With --agent, also serve the guest agent (Exec, Files, System): whoever it admits can "
    "run commands, read and write files and power off the machine as the user running this "
    "server. Agent callers on a Unix socket are admitted by uid (SO_PEERCRED): root and this "
    "server's user, plus --allow-uid; vsock callers by CID (VSOCKRPC_AGENT_ALLOWED_CIDS, "
    "default 2: the host)."
)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``serve`` and ``add``."""
    serve = sub.add_parser(
        "serve",
        help="serve Addition (--agent: and the guest agent) on vsock, hybrid, Unix or TCP",
        description=_SERVE_DESCRIPTION,
    )
    serve.add_argument(
        "--listen",
        metavar="ADDRESS",
        type=_address,
        action="append",
        help=f"address to listen on; repeatable (default {DEFAULT_LISTEN})",
    )
    serve.add_argument(
        "--workers",
        type=positive_int,
        help="gRPC worker threads (default 16; with --agent 256, each running command holds one)",
    )
    serve.add_argument(
        "--agent",
        action="store_true",
        help="also serve the agent's Exec, Files and System (root-equivalent: see above)",
    )
    serve.add_argument(
        "--allow-uid",
        metavar="UID",
        type=_uid,
        action="append",
        help="with --agent: also admit this user (uid or name; 'any': every user) on Unix "
        "sockets; repeatable",
    )
    serve.add_argument(
        "--mode",
        type=_mode,
        default=unix_transport.DEFAULT_MODE,
        metavar="MODE",
        help="octal mode of the Unix socket files created (default 0600, whatever the umask)",
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per call on stderr (off by default)",
    )
    serve.set_defaults(func=_serve, parser=serve)

    add = sub.add_parser("add", help="call Addition", description="Call Addition(A, B).")
    add.add_argument("a", metavar="A", type=_int32)
    add.add_argument("b", metavar="B", type=_int32)
    add.add_argument(
        "--target",
        metavar="ADDRESS",
        type=_address,
        required=True,
        help="server address: vsock:CID:PORT, hvsock:PATH:PORT, unix:PATH or tcp:HOST:PORT",
    )
    add.add_argument(
        "--timeout", type=seconds, default=10.0, metavar="S", help="call deadline (default 10)"
    )
    add.add_argument(
        "--wait",
        type=seconds_or_zero,
        default=0.0,
        metavar="S",
        help="keep retrying for up to S seconds while the server is not up yet",
    )
    add.set_defaults(func=_add)


def _services(args: argparse.Namespace) -> list[Callable[[grpc.Server], None]]:
    from vsockrpc import rpc, transport
    from vsockrpc.services import addition_services, served

    if not args.agent:
        if args.allow_uid:
            args.parser.error("--allow-uid needs --agent")
        return addition_services(access_log=args.access_log)
    from vsockrpc.services.agent import PeerPolicy

    policy = PeerPolicy.from_env()
    if args.allow_uid:
        extra = frozenset(uid for uid in args.allow_uid if uid is not None)
        anyone = None in args.allow_uid or policy.allowed_uids is None
        allowed = None if anyone else frozenset(policy.allowed_uids or ()) | extra
        policy = dataclasses.replace(policy, allowed_uids=allowed)
    return served(
        peer_address=rpc.peer_address,
        peer_credentials=rpc.peer_credentials,
        sockets=transport,
        access_log=args.access_log,
        policy=policy,
    )


def _serve(args: argparse.Namespace) -> int:
    from vsockrpc import rpc

    listen: list[Address] = args.listen or [parse_address(DEFAULT_LISTEN)]
    services = _services(args)
    workers: int = args.workers or 16
    if args.agent and args.workers is None:
        from vsockrpc.services.agent import AGENT_WORKERS

        workers = AGENT_WORKERS
    if args.access_log:
        logging.getLogger("vsockrpc.services").setLevel(logging.INFO)
    raise_open_files_limit()  # the relay holds a socket per client: 1024 is soon reached
    # SIGINT, SIGTERM, SIGHUP: stop serving (grace for calls in flight), remove Unix sockets.
    with (
        StopSignals(absorb_after=True) as stop,
        rpc.serve(
            services,
            listen,
            max_workers=workers,
            maximum_concurrent_rpcs=workers if args.agent else None,
            unix_mode=args.mode,
            peer_credentials=args.agent,  # agent callers on Unix sockets are checked by uid
        ) as server,
    ):
        for address in server.addresses:
            print(f"listening on {address}", flush=True)
        while not stop.event.wait(0.5):
            pass
        print("stopping", file=sys.stderr, flush=True)
        server.stop(grace=2.0)
    return 0


_RELAY_CONNECT_MARGIN = 1.0  # seconds


def _rpc_error(err: grpc.RpcError) -> RpcError:
    code: grpc.StatusCode = err.code()
    details = " ".join(str(err.details() or "").split())
    return RpcError(f"{code.name}: {details}" if details else code.name, code=code.name)


def _add(args: argparse.Namespace) -> int:
    import grpc

    from vsockrpc import rpc
    from vsockrpc.proto import vsock_service_pb2 as pb
    from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc

    target: Address = args.target
    options = rpc.RETRY_OPTIONS if args.wait else ()
    deadline = time.monotonic() + args.wait
    delay = 0.05
    # The relay's connect (and hybrid handshake) is bounded by the call's own deadline, plus a
    # margin so that the deadline the user set is what fires (DEADLINE_EXCEEDED) for a silent
    # peer, rather than racing the relay's own timeout (which grpc would report as UNAVAILABLE).
    connect_timeout = args.timeout + _RELAY_CONNECT_MARGIN
    with rpc.channel(target, options=options, connect_timeout=connect_timeout) as ch:
        stub = pb_grpc.VsockServiceStub(ch)  # type: ignore[no-untyped-call]
        request = pb.AdditionRequest(a=args.a, b=args.b)
        while True:
            try:
                if args.wait:
                    remaining = max(deadline - time.monotonic(), 0.0)
                    rpc.channel_ready(ch, timeout=remaining, what=str(target), address=target)
                reply: pb.AdditionResponse = stub.Addition(request, timeout=args.timeout)
                break
            except TransportTimeout as err:
                raise RpcError(f"UNAVAILABLE: {err}", code="UNAVAILABLE") from err
            except grpc.RpcError as err:
                retry = err.code() == grpc.StatusCode.UNAVAILABLE
                if not retry or time.monotonic() + delay >= deadline:
                    raise _rpc_error(err) from err
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
    print(f"Addition result: {args.a} + {args.b} = {reply.c}", flush=True)
    return 0
