"""The guest's settings, read from the kernel command line (``/proc/cmdline``).

``vsockrpc.port=N``   the agent's vsock port (default 9999)
``vsockrpc.listen=A`` a full listen address instead (e.g. ``vsock:-1:5000``), may repeat
"""

from __future__ import annotations

from dataclasses import dataclass

from vsockrpc.agent import CMDLINE_LISTEN, CMDLINE_PORT, DEFAULT_PORT

__all__ = ["DEFAULT_PORT", "GuestConfig", "parse_cmdline"]


@dataclass(frozen=True, slots=True)
class GuestConfig:
    listen: tuple[str, ...]


def parse_cmdline(text: str) -> GuestConfig:
    """Raises ValueError on a malformed ``vsockrpc.*`` parameter."""
    port = DEFAULT_PORT
    listen: list[str] = []
    for word in text.split():
        key, _, value = word.partition("=")
        if key == CMDLINE_PORT:
            if not value.isdigit() or not 0 < int(value) < 2**32:
                raise ValueError(f"bad {CMDLINE_PORT}={value!r} on the kernel command line")
            port = int(value)
        elif key == CMDLINE_LISTEN:
            listen.append(value)
    return GuestConfig(tuple(listen) or (f"vsock:-1:{port}",))
