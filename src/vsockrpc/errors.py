"""The one exception tree of vsockrpc.

Every error the library raises on purpose derives from :class:`VsockRpcError`, so a caller can
catch that one class. Library code never exits the process and knows nothing of exit codes: the
CLI (:mod:`vsockrpc.cli.main`) maps errors to exit statuses. ``OSError`` and timeouts are mapped
to this tree at the transport edge and chained with ``raise ... from``.

The tree answers two questions. By *subsystem*: what failed (an address, a socket, the device,
an image, a VM, the agent...). By *meaning*: what a caller can do about it, the three questions
a retry loop or a user interface asks. Each meaning is a class (so ``except TransientError:``
works) and a property on every error (``err.retryable``, ``err.peer_fault``, ``err.bad_input``,
derived from the class, so the two never disagree):

- :class:`TransientError` (``retryable``): the same call may succeed later, e.g. the peer is not
  listening yet or a deadline passed. Retry with backoff.
- :class:`PeerError` (``peer_fault``): the other side (QEMU, the guest, the agent, a server, a
  hybrid client) broke a protocol, crashed or sent corrupt data. Retrying the same peer rarely
  helps; report it.
- :class:`BadInputError` (``bad_input``): the caller's own input is invalid regardless of any
  peer's state (a malformed address, an argument out of range). Fix the input; never retry.

An error with none of the three is a failure of this machine or of the operation as such
(address in use, QEMU missing, no such file in the guest): read its message. The CLI exits 2
for bad input it found before anything ran, and 1 for everything else.

::

    VsockRpcError                                            meaning
    ├── AddressError            malformed address            BadInputError (also a ValueError)
    ├── TransportError          a socket operation failed
    │   ├── ConnectError        could not reach the peer
    │   │   └── NotReadyError   peer not listening yet       TransientError
    │   └── TransportTimeout    a deadline passed            TransientError (also a TimeoutError)
    ├── RpcError                a gRPC call failed           from .code (table below)
    ├── DeviceError             the userspace vhost-user-vsock device
    │   └── ProtocolError       a peer broke a protocol      PeerError
    ├── PayloadError            assembling what goes into a guest (pins, wheels, sources)
    │   └── SpecError           an image spec (vsockrpc.toml) is invalid    BadInputError
    ├── ImageError              building or finding a guest image
    ├── VmError                 launching or controlling a VM
    │   └── GuestError          the guest (kernel or agent)  PeerError
    ├── AgentError              a guest-agent operation      from .code (table below)
    ├── BundleError             building or starting a single-file agent bundle
    ├── TransientError  ┐
    ├── PeerError       ├       the meanings themselves: mixed into the classes above
    └── BadInputError   ┘

:class:`RpcError` and :class:`AgentError` carry the gRPC status name the peer returned in
``code``; constructing one picks its meaning from that status, following the gRPC status-code
guide (https://grpc.github.io/grpc/core/md_doc_statuscodes.html):

- ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``RESOURCE_EXHAUSTED``, ``ABORTED``: TransientError;
- ``INTERNAL``, ``DATA_LOSS``, ``UNKNOWN``: PeerError;
- ``INVALID_ARGUMENT``, ``OUT_OF_RANGE`` (wrong whatever the state): BadInputError;
- any other code (``NOT_FOUND``, ``PERMISSION_DENIED``, ``FAILED_PRECONDITION``...) or none:
  none of the three.

The instance is then of a subclass named like its base (``type(err).__name__ == "AgentError"``)
that also derives from the meaning, so ``except AgentError`` and ``except TransientError`` both
catch an ``AgentError(..., code="UNAVAILABLE")``.

A subsystem that needs a class with a fixed meaning derives from both, e.g.
``class VmNameError(VmError, BadInputError)``; :class:`BadInputError` can also be raised as is.
"""

from __future__ import annotations

from typing import Self, TypeVar, cast

__all__ = [
    "AddressError",
    "AgentError",
    "BadInputError",
    "BundleError",
    "ConnectError",
    "DeviceError",
    "GuestError",
    "ImageError",
    "NotReadyError",
    "PayloadError",
    "PeerError",
    "ProtocolError",
    "RpcError",
    "SpecError",
    "TransientError",
    "TransportError",
    "TransportTimeout",
    "VmError",
    "VsockRpcError",
]


def _encodable(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udcXX``: a path that is not UTF-8 reaches
    a message through ``os.fsdecode``, and such a message could not be encoded (printed to a
    strict stream, logged to a file, sent as a gRPC status) without failing."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class VsockRpcError(Exception):
    """Root of every error vsockrpc raises on purpose.

    ``hint`` is an optional one-line suggestion the CLI prints after the message.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(_encodable(message))
        self.hint = None if hint is None else _encodable(hint)

    @property
    def retryable(self) -> bool:
        """Whether the same call may succeed later (a :class:`TransientError`)."""
        return isinstance(self, TransientError)

    @property
    def peer_fault(self) -> bool:
        """Whether the other side failed or broke a protocol (a :class:`PeerError`)."""
        return isinstance(self, PeerError)

    @property
    def bad_input(self) -> bool:
        """Whether the caller's own input is invalid (a :class:`BadInputError`)."""
        return isinstance(self, BadInputError)


# --- meanings -------------------------------------------------------------------------------


class TransientError(VsockRpcError):
    """Worth retrying with backoff: the peer is not there yet, busy, or a deadline passed."""


class PeerError(VsockRpcError):
    """The peer's fault: it broke a protocol, crashed, or answered with corrupt data."""


class BadInputError(VsockRpcError):
    """The caller's input is invalid whatever the state of any peer: fix it, do not retry."""


# --- subsystems -----------------------------------------------------------------------------


class AddressError(BadInputError, ValueError):
    """An address string does not follow the grammar in :mod:`vsockrpc.addresses`."""


class TransportError(VsockRpcError):
    """A socket-level operation failed."""


class ConnectError(TransportError):
    """The peer could not be reached."""


class NotReadyError(ConnectError, TransientError):
    """The peer exists but is not accepting yet (refused, EOF before ``OK``): retry later."""


class TransportTimeout(TransportError, TransientError, TimeoutError):
    """A transport deadline passed."""


# gRPC status name -> meaning; see the module docstring for the reasoning.
_STATUS_MEANINGS: dict[str, type[VsockRpcError]] = {
    "UNAVAILABLE": TransientError,
    "DEADLINE_EXCEEDED": TransientError,
    "RESOURCE_EXHAUSTED": TransientError,
    "ABORTED": TransientError,
    "INTERNAL": PeerError,
    "DATA_LOSS": PeerError,
    "UNKNOWN": PeerError,
    "INVALID_ARGUMENT": BadInputError,
    "OUT_OF_RANGE": BadInputError,
}
_E = TypeVar("_E", bound=VsockRpcError)
_WITH_MEANING: dict[tuple[type[VsockRpcError], type[VsockRpcError]], type[VsockRpcError]] = {}


def _with_meaning(cls: type[_E], code: str | None) -> type[_E]:
    """``cls``, or its subclass that also derives from the meaning of gRPC status ``code``."""
    meaning = _STATUS_MEANINGS.get(code or "")
    if meaning is None or issubclass(cls, meaning):
        return cls
    sub = _WITH_MEANING.get((cls, meaning))
    if sub is None:
        # Named like its base: messages and tracebacks show "AgentError", not a helper name.
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        sub = _WITH_MEANING[(cls, meaning)] = type(cls.__name__, (cls, meaning), namespace)
    return cast("type[_E]", sub)


class _StatusError(VsockRpcError):
    """An error that may carry the gRPC status name a peer returned (``code``)."""

    code: str | None

    def __new__(cls, message: str, *, code: str | None = None, hint: str | None = None) -> Self:
        del hint
        target = _with_meaning(cls, code)
        return super().__new__(target, message)

    def __reduce__(self) -> tuple[object, ...]:
        # Pickle as the named base class: the meaning subclass is rebuilt from ``code``.
        base = next(c for c in type(self).__mro__ if c not in _WITH_MEANING.values())
        return (_rebuild_status_error, (base, str(self), self.code, self.__dict__))


def _rebuild_status_error(
    cls: type[_StatusError], message: str, code: str | None, state: dict[str, object]
) -> _StatusError:
    err = cls(message, code=code)
    err.__dict__.update(state)
    return err


class RpcError(_StatusError):
    """A gRPC call failed. ``code`` is the ``grpc.StatusCode`` name, e.g. ``"UNAVAILABLE"``."""

    code: str

    def __new__(cls, message: str, *, code: str, hint: str | None = None) -> Self:
        return super().__new__(cls, message, code=code, hint=hint)

    def __init__(self, message: str, *, code: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class DeviceError(VsockRpcError):
    """The userspace vsock device failed or was misused."""


class ProtocolError(DeviceError, PeerError):
    """A peer (QEMU, the guest driver or a hybrid client) violated a protocol."""


class PayloadError(VsockRpcError):
    """What goes into a guest could not be assembled: no pin, no wheel, pip failed."""


class SpecError(PayloadError, BadInputError):
    """An image spec is invalid: the message names the file, the line and the key."""


class ImageError(VsockRpcError):
    """A guest image could not be built, found or used."""


class VmError(VsockRpcError):
    """A VM could not be launched or controlled."""


class GuestError(VmError, PeerError):
    """The guest failed: kernel panic, agent crashed, never became ready.

    ``console_tail``: the guest's last console lines up to the failure (e.g. the traceback of
    a user service that failed to import), when the launcher saw them.
    """

    console_tail: tuple[str, ...] = ()


class AgentError(_StatusError):
    """A guest-agent operation failed; ``code`` is the gRPC status name when there is one."""

    def __init__(self, message: str, *, code: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class BundleError(VsockRpcError):
    """A single-file agent bundle could not be built (missing wheels, pip failed...)."""
