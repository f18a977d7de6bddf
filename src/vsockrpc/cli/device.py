"""``vsockrpc device``: the userspace vsock device's own entry point (``python -m
vsockrpc.vhost``, :mod:`vsockrpc.vhost.command`) as a subcommand: same options, same code."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``device`` subcommand to ``sub``."""
    from vsockrpc.vhost import command

    parser = sub.add_parser(
        "device",
        help="run the userspace vsock device (vhost-user back-end for QEMU)",
        description=command.DESCRIPTION,
    )
    command.add_arguments(parser)
    parser.set_defaults(func=command.run)
