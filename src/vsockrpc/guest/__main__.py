"""``python3 -m vsockrpc.guest``: the guest init when PID 1, else just the agent server.

As PID 1 (``init=/usr/local/bin/vsockrpc-init`` on the kernel command line) it runs
:func:`vsockrpc.guest.init.main`. Otherwise ``--listen ADDRESS`` (repeatable; default
``vsock:-1:9999``) serves the default services until SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import os
import sys

from vsockrpc.guest.cmdline import DEFAULT_PORT


def main(argv: list[str] | None = None) -> int:
    if os.getpid() == 1:
        from vsockrpc.guest.init import main as init_main

        init_main()  # never returns
    import argparse  # not at the top: PID 1 never needs it (boot time under TCG)

    parser = argparse.ArgumentParser(prog="python3 -m vsockrpc.guest")
    parser.add_argument("--listen", action="append", help=f"default vsock:-1:{DEFAULT_PORT}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="vsockrpc-guest: %(message)s")
    from vsockrpc.guest.server import run_server

    return run_server(args.listen or [f"vsock:-1:{DEFAULT_PORT}"])


if __name__ == "__main__":
    sys.exit(main())
