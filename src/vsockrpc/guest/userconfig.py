"""The image spec's part the guest reads at boot (``/etc/vsockrpc/guest.json``).

Written by the image build from an image spec (``vsockrpc.payload.spec``); absent in a plain
image, which then runs exactly vsockrpc's own services. ``$VSOCKRPC_GUEST_CONFIG`` names
another file (the single-file bundle and tests use it). Standard library only: PID 1 reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["BUNDLE_CONFIG", "CONFIG_PATH", "CommandConfig", "GuestConfig", "load"]

CONFIG_PATH = "/etc/vsockrpc/guest.json"
# A bundle built with a spec carries its config next to the vsockrpc package it extracts.
BUNDLE_CONFIG = "vsockrpc-guest.json"


@dataclass(frozen=True, slots=True)
class CommandConfig:
    name: str
    argv: tuple[str, ...]
    restart: str  # always | on-failure | never
    ready: str | None  # "vsock:PORT" | "tcp:PORT"


@dataclass(frozen=True, slots=True)
class GuestConfig:
    agent: bool = True
    env: tuple[tuple[str, str], ...] = ()
    services: tuple[str, ...] = ()  # "package.module:function"
    commands: tuple[CommandConfig, ...] = ()


def load(path: str | None = None) -> GuestConfig:
    """The guest config at ``path`` (default ``$VSOCKRPC_GUEST_CONFIG``, else a bundle's
    :data:`BUNDLE_CONFIG`, else :data:`CONFIG_PATH`); the default config when there is none."""
    site = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    bundled = os.path.join(site, BUNDLE_CONFIG)
    path = (
        path
        or os.environ.get("VSOCKRPC_GUEST_CONFIG")
        or (bundled if os.path.exists(bundled) else CONFIG_PATH)
    )
    if not os.path.exists(path):  # a plain image: no json import for PID 1 (boot time)
        return GuestConfig()
    import json

    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return GuestConfig()
    return GuestConfig(
        agent=bool(data.get("agent", True)),
        env=tuple(sorted((str(k), str(v)) for k, v in data.get("env", {}).items())),
        services=tuple(str(s) for s in data.get("services", [])),
        commands=tuple(
            CommandConfig(
                str(c["name"]),
                tuple(str(a) for a in c["argv"]),
                str(c.get("restart", "on-failure")),
                c.get("ready"),
            )
            for c in data.get("commands", [])
        ),
    )
