"""Userspace virtio-vsock device: a vhost-user-vsock back-end for QEMU with a Firecracker-style
hybrid Unix socket on the host side. Standard library only (no gRPC here).

Modules, one concept each: :mod:`~.protocol` (vhost-user messages), :mod:`~.session` (the
vhost-user session: one handler per request, with the session state it requires),
:mod:`~.memory` (guest memory regions), :mod:`~.virtqueue` (split rings), :mod:`~.packet`
(virtio-vsock header), :mod:`~.connection` (stream state and credit counters), the muxer that
maps guest streams to host Unix sockets — :mod:`~.muxer` (the pass), :mod:`~.table`
(connection table), :mod:`~.dispatch` (guest packets by op), :mod:`~.flow` (credit and the
guest → host path), :mod:`~.rxfill` (host → guest), :mod:`~.hybrid` (host clients and
``CONNECT``) — :mod:`~.reactor` (the event loop), :mod:`~.paths` (socket files we own),
:mod:`~.device` (the back-end), :mod:`~.command` (the entry point, ``python -m
vsockrpc.vhost``), :mod:`~.testing` (a driver that plays QEMU and the guest, for tests and
benchmarks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vsockrpc.vhost.device import SessionState, StateError, VsockDevice

__all__ = ["SessionState", "StateError", "VsockDevice"]


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): `python -m vsockrpc.vhost --help` and the CLI's parser import
    # vsockrpc.vhost.command without loading the device.
    if name in __all__:
        from vsockrpc.vhost import device

        return getattr(device, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
