"""``vsockrpc device``: run the userspace vhost-user-vsock device until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import stat
from types import FrameType
from typing import Any

from vsockrpc.errors import DeviceError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``device`` subcommand to ``sub``."""
    parser = sub.add_parser(
        "device",
        help="run the userspace vsock device (vhost-user back-end for QEMU)",
        description=(
            "Serve QEMU's vhost-user-vsock-pci on a Unix socket and map guest vsock streams to "
            "host Unix sockets (Firecracker-style hybrid vsock): host clients connect to --uds "
            "and send 'CONNECT <port>\\n'; guest connections to CID 2 port P reach '<uds>_P'."
        ),
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="vhost-user socket to listen on")
    where.add_argument(
        "--socket-fd",
        metavar="N",
        type=int,
        help="an inherited, already listening vhost-user socket",
    )
    parser.add_argument("--uds", metavar="PATH", required=True, help="hybrid vsock Unix socket")
    parser.add_argument("--cid", metavar="N", type=int, required=True, help="guest CID (>= 3)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vsockrpc.vhost import VsockDevice

    vhost: str | socket.socket
    if args.socket_fd is not None:
        try:
            if not stat.S_ISSOCK(os.fstat(args.socket_fd).st_mode):
                raise DeviceError(f"--socket-fd {args.socket_fd} is not a socket")
            vhost = socket.socket(fileno=args.socket_fd)
        except OSError as err:
            raise DeviceError(f"--socket-fd {args.socket_fd}: {err}") from err
    else:
        vhost = args.socket
    with VsockDevice(vhost_socket=vhost, uds_path=args.uds, guest_cid=args.cid) as device:

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: stopping", signum)
            device.stop()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info(
                "vsock device: vhost-user %s, hybrid %s, guest CID %d",
                args.socket or f"fd {args.socket_fd}",
                args.uds,
                args.cid,
            )
            device.serve_forever()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return 0
