"""Userspace virtio-vsock device: a vhost-user-vsock back-end for QEMU with a Firecracker-style
hybrid Unix socket on the host side. Standard library only (no gRPC here).

Modules, one concept each: :mod:`~vsockrpc.vhost.protocol` (vhost-user messages),
:mod:`~vsockrpc.vhost.memory` (guest memory regions), :mod:`~vsockrpc.vhost.virtqueue` (split
rings), :mod:`~vsockrpc.vhost.packet` (virtio-vsock header), :mod:`~vsockrpc.vhost.connection`
(stream state and credit), :mod:`~vsockrpc.vhost.muxer` (guest streams ↔ host Unix sockets),
:mod:`~vsockrpc.vhost.reactor` (the event loop), :mod:`~vsockrpc.vhost.device` (the back-end),
:mod:`~vsockrpc.vhost.testing` (a driver that plays QEMU and the guest, for tests and benchmarks).
"""

from __future__ import annotations

from vsockrpc.vhost.device import SessionState, StateError, VsockDevice

__all__ = ["SessionState", "StateError", "VsockDevice"]
