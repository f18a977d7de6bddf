"""The agent process: serve ``vsockrpc.services.served()`` until told to stop.

Runs as PID 1's only child in a guest (see :mod:`vsockrpc.guest.init`), or directly with
``python -m vsockrpc.guest --listen ADDRESS`` anywhere (tests use a Unix socket). SIGTERM,
SIGINT and SIGHUP stop it gracefully (:mod:`vsockrpc._stopsignals`): in-flight calls get
``GRACE`` seconds, then the process exits 0.

The access log is on here (the console shows ``Addition: 5 + 7 = 12`` for each call, which
docs/system.md and the vm tier rely on); Unix listen addresses are relayed so the agent learns
each caller's uid (``SO_PEERCRED``); the open-files limit is raised to the hard limit (PID 1
has raised that already), and the relay's default :class:`~vsockrpc.rpc.ConnectionLimits` apply.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Sequence

from vsockrpc._stopsignals import StopSignals
from vsockrpc.agent import markers
from vsockrpc.guest.deferred import deferring

__all__ = ["GRACE", "run_server"]

GRACE = 3.0
log = logging.getLogger("vsockrpc.guest")


def run_server(listen: Sequence[str]) -> int:
    """Serve until SIGTERM, SIGINT or SIGHUP; returns the exit status (0 after a stop)."""
    with contextlib.ExitStack() as stack:
        # grpcio and its health and reflection packages import asyncio, which this threaded
        # server never uses: it loads only if something does (.deferred), not at start-up.
        with deferring():
            from vsockrpc import rpc  # grpc import (~1 s in a TCG guest) after the fork
            from vsockrpc._fdlimit import raise_open_files_limit
            from vsockrpc.guest import user_services, userconfig
            from vsockrpc.services.agent import AGENT_WORKERS

            raise_open_files_limit()
            stop = stack.enter_context(StopSignals(absorb_after=True))  # a signal now stops it
            # An image spec's services join vsockrpc's own (the default services without one).
            registrars = user_services.registrars(userconfig.load(), access_log=True)
            server = stack.enter_context(
                rpc.serve(
                    registrars,
                    listen=list(listen),
                    peer_credentials=True,
                    max_workers=AGENT_WORKERS,
                    maximum_concurrent_rpcs=AGENT_WORKERS,
                )
            )
        bound = " ".join(str(a) for a in server.addresses)
        print(f"{markers.READY} on {bound}", file=sys.stderr, flush=True)
        while not stop.event.wait(0.5):
            if not server.wait_for_termination(timeout=0):  # False: terminated
                log.error("server terminated on its own")
                return 1
        log.info("signal %s: stopping", stop.received.name if stop.received else "?")
        server.stop(grace=GRACE)
    return 0
