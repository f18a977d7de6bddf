"""The one exception tree of vsockrpc.

Every error the library raises on purpose derives from :class:`VsockRpcError`, so a caller can
catch that one class. Library code never exits the process; the CLI catches the root class,
prints one line (``str(err)``, plus ``err.hint`` when there is one) and exits non-zero.
``OSError`` and timeouts are mapped to this tree at the transport edge and chained with
``raise ... from``.

::

    VsockRpcError
    ├── AddressError            malformed address (also a ValueError)       exit 2
    ├── TransportError          a socket operation failed
    │   ├── ConnectError        could not reach the peer
    │   │   └── NotReadyError   peer not listening yet (retry with backoff)
    │   └── TransportTimeout    a deadline passed
    ├── RpcError                a gRPC call failed; carries the status code
    ├── DeviceError             the userspace vhost-user-vsock device
    │   └── ProtocolError       a peer (QEMU, guest, hybrid client) broke a protocol
    ├── PayloadError            assembling what goes into a guest (pins, wheels, sources)
    │   └── SpecError           an image spec (vsockrpc.toml) is invalid              exit 2
    ├── ImageError              building or finding a guest image
    ├── VmError                 launching or controlling a VM
    │   └── GuestError          the guest (kernel or agent) failed
    ├── AgentError              a guest-agent operation failed (SDK side)
    └── BundleError             building or starting a single-file agent bundle
"""

from __future__ import annotations

__all__ = [
    "AddressError",
    "AgentError",
    "BundleError",
    "ConnectError",
    "DeviceError",
    "GuestError",
    "ImageError",
    "NotReadyError",
    "PayloadError",
    "ProtocolError",
    "RpcError",
    "SpecError",
    "TransportError",
    "TransportTimeout",
    "VmError",
    "VsockRpcError",
]


class VsockRpcError(Exception):
    """Root of every error vsockrpc raises on purpose.

    ``hint`` is an optional one-line suggestion the CLI prints after the message.
    """

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class AddressError(VsockRpcError, ValueError):
    """An address string does not follow the grammar in :mod:`vsockrpc.addresses`."""

    exit_code = 2


class TransportError(VsockRpcError):
    """A socket-level operation failed."""


class ConnectError(TransportError):
    """The peer could not be reached."""


class NotReadyError(ConnectError):
    """The peer exists but is not accepting yet (refused, EOF before ``OK``): retry later."""


class TransportTimeout(TransportError, TimeoutError):
    """A transport deadline passed."""


class RpcError(VsockRpcError):
    """A gRPC call failed. ``code`` is the ``grpc.StatusCode`` name, e.g. ``"UNAVAILABLE"``."""

    def __init__(self, message: str, *, code: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class DeviceError(VsockRpcError):
    """The userspace vsock device failed or was misused."""


class ProtocolError(DeviceError):
    """A peer (QEMU, the guest driver or a hybrid client) violated a protocol."""


class PayloadError(VsockRpcError):
    """What goes into a guest could not be assembled: no pin, no wheel, pip failed."""


class SpecError(PayloadError):
    """An image spec is invalid: the message names the file, the line and the key."""

    exit_code = 2


class ImageError(VsockRpcError):
    """A guest image could not be built, found or used."""


class VmError(VsockRpcError):
    """A VM could not be launched or controlled."""


class GuestError(VmError):
    """The guest failed: kernel panic, agent crashed, never became ready.

    ``console_tail``: the guest's last console lines up to the failure (e.g. the traceback of
    a user service that failed to import), when the launcher saw them.
    """

    console_tail: tuple[str, ...] = ()


class AgentError(VsockRpcError):
    """A guest-agent operation failed; ``code`` is the gRPC status name when there is one."""

    def __init__(self, message: str, *, code: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class BundleError(VsockRpcError):
    """A single-file agent bundle could not be built (missing wheels, pip failed...)."""
