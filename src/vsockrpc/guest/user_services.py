"""The registrars the agent serves: vsockrpc's own and the image spec's user services.

A user service is a registrar ``package.module:function`` — a callable taking the
``grpc.Server``, the same shape as vsockrpc's own services. Each is imported and called with a
recording view of the server, so the names of the services it adds go into health and
reflection next to Addition and the agent's. With ``agent = false`` in the spec only the user
services (plus health and reflection) are served.

A registrar that fails to import or raises is fatal: :class:`UserServiceError` names it, the
agent prints the traceback and exits, and the host's ``vm run`` fails with that tail at once.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from vsockrpc.guest.userconfig import GuestConfig

__all__ = ["UserServiceError", "registrars"]

Registrar = Callable[[grpc.Server], None]
log = logging.getLogger("vsockrpc.guest")


class UserServiceError(Exception):
    """A user service registrar failed to import or to register (names the entry point)."""


class _Recording:
    """A ``grpc.Server`` stand-in for a registrar: forwards every call, records the names of
    the services added (``add_generic_rpc_handlers``/``add_registered_method_handlers``)."""

    def __init__(self, server: grpc.Server, names: list[str]) -> None:
        self._server = server
        self._names = names

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        for handler in handlers:
            name = getattr(handler, "service_name", None)
            if callable(name) and name() is not None and str(name()) not in self._names:
                self._names.append(str(name()))
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, handlers: Any) -> None:
        if service_name not in self._names:
            self._names.append(service_name)
        self._server.add_registered_method_handlers(service_name, handlers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def _load(entry: str) -> Registrar:
    module_name, _, attr = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
        function = getattr(module, attr)
    except Exception as err:
        raise UserServiceError(
            f"user service {entry} failed to import: {type(err).__name__}: {err}"
        ) from err
    if not callable(function):
        raise UserServiceError(f"user service {entry} is not callable")
    registrar: Registrar = function
    return registrar


def _user_registrar(entries: Sequence[str], names: list[str]) -> Registrar:
    loaded = [(entry, _load(entry)) for entry in entries]  # import errors before serving

    def register(server: grpc.Server) -> None:
        for entry, function in loaded:
            before = len(names)
            try:
                function(_Recording(server, names))
            except Exception as err:
                raise UserServiceError(
                    f"user service {entry} raised in register: {type(err).__name__}: {err}"
                ) from err
            log.info("user service %s: %s", entry, " ".join(names[before:]) or "no services")

    return register


def registrars(config: GuestConfig, *, access_log: bool = False) -> list[Registrar]:
    """What the agent serves for ``config`` (a plain image: vsockrpc's own services, see
    :func:`vsockrpc.services.served`); ``access_log`` logs a line per Addition call."""
    from vsockrpc import rpc, transport
    from vsockrpc.services import served

    user: list[Registrar] = []
    user_names: list[str] = []  # filled as ``user`` registers: health names them too
    if config.services or not config.agent:
        os.environ.update(dict(config.env))
        user = [_user_registrar(config.services, user_names)]
    return served(
        peer_address=rpc.peer_address,
        peer_credentials=rpc.peer_credentials,
        sockets=transport,
        agent=config.agent,
        extra=user,
        extra_names=user_names,
        access_log=access_log,
    )
