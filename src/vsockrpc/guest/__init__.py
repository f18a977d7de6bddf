"""What runs inside the VM: the agent as PID 1.

- :mod:`vsockrpc.guest.init` — PID 1: mounts, modules, reaping, power-off; forks the agent.
- :mod:`vsockrpc.guest.server` — the agent process serving ``services.served()``.
- :mod:`vsockrpc.guest.pid1` — the few system calls (mount, finit_module, reboot) via ctypes.

Only the standard library, grpcio and protobuf are used on this side. What the host side must
agree on (console markers, port, command-line keys) is in the agent contract, :mod:`vsockrpc.agent`.
"""

from __future__ import annotations

from vsockrpc.guest.init import request_poweroff

__all__ = ["request_poweroff"]
