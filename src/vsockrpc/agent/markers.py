"""Lines the guest prints on its console, which the host-side launcher watches for.

Written by the guest's PID 1 and agent (:mod:`vsockrpc.guest`), read by the launcher
(:mod:`vsockrpc.vm`). Plain constants: importing this loads nothing else.
"""

from __future__ import annotations

__all__ = ["AGENT_EXITED", "INIT_STARTED", "POWERING_OFF", "PREFIX", "READY"]

PREFIX = "vsockrpc-guest:"
INIT_STARTED = f"{PREFIX} init started"
READY = f"{PREFIX} ready"  # followed by " on <address>"
AGENT_EXITED = f"{PREFIX} agent exited"  # followed by " with status N"
POWERING_OFF = f"{PREFIX} powering off"
