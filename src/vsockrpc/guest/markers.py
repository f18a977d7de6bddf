"""Lines the guest prints on its console, which the host-side launcher watches for.

Shared by both sides so they cannot drift apart; plain constants, nothing to import.
"""

from __future__ import annotations

PREFIX = "vsockrpc-guest:"
INIT_STARTED = f"{PREFIX} init started"
READY = f"{PREFIX} ready"  # followed by " on <address>"
AGENT_EXITED = f"{PREFIX} agent exited"  # followed by " with status N"
POWERING_OFF = f"{PREFIX} powering off"
