"""Which peers may call the agent: a :class:`PeerPolicy` enforced around every handler.

Trust model (also in docs/agent.md): the agent runs commands as root for whoever it accepts, so
*being accepted is full control of the guest*. Over vsock the peer's CID is set by the
hypervisor/kernel and cannot be forged from inside another VM, so the policy admits CIDs: by
default only ``2`` (VMADDR_CID_HOST, the host). Which *host* users can reach the guest is decided
on the host: by the hybrid socket's file mode (our userspace device) or by who may open
``/dev/vhost-vsock``/create AF_VSOCK sockets (kernel vhost-vsock: any host user!). Unix-socket
peers are admitted by the socket's file mode and, when the server conveys their ``SO_PEERCRED``,
by uid (``allowed_uids``: root and the agent's own user by default; see :mod:`.credentials`);
TCP peers only when asked for
(``allow_tcp``), since anything that can reach the port would get in. A refused call gets
``PERMISSION_DENIED``, the trailing metadata :data:`~vsockrpc.agent.REFUSED_PEER_KEY` and one
WARNING log line naming the peer and the method.

Who is calling is not looked up here: a :data:`PeerResolver` is injected by whoever starts the
server (it knows the transport; :func:`vsockrpc.rpc.peer_address` sees through the relay), as
is a :data:`~.credentials.UidResolver` for Unix callers, and :class:`PeerGuard` pairs them with
the policy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from vsockrpc.addresses import Address, UnixAddress
from vsockrpc.agent import CMDLINE_ALLOWED_CIDS, ENV_ALLOWED_CIDS, REFUSED_PEER_KEY
from vsockrpc.errors import AddressError
from vsockrpc.services.agent.credentials import UidResolver, default_allowed_uids, uid_admitted
from vsockrpc.vsock_constants import VMADDR_CID_HOST

__all__ = [
    "PeerGuard",
    "PeerPolicy",
    "PeerPolicyInterceptor",
    "PeerResolver",
    "guard_handler",
    "guarded",
]

log = logging.getLogger("vsockrpc.agent.peers")


PeerResolver = Callable[[grpc.ServicerContext], Address | None]
"""The address of a call's peer (None when unknown), e.g. :func:`vsockrpc.rpc.peer_address`."""
Registrar = Callable[[grpc.Server], None]


@dataclass(frozen=True)
class PeerPolicy:
    """Admission rules. ``allowed_cids=None`` admits every vsock CID, ``allowed_uids=None``
    every Unix-socket user."""

    allowed_cids: frozenset[int] | None = frozenset({VMADDR_CID_HOST})
    allow_unix: bool = True
    allow_tcp: bool = False
    allowed_uids: frozenset[int] | None = field(default_factory=default_allowed_uids)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, cmdline: str | None = None
    ) -> PeerPolicy:
        """The policy set by ``$VSOCKRPC_AGENT_ALLOWED_CIDS``, else by
        ``vsockrpc.allowed_cids=`` on the kernel command line; default: the host only."""
        env = os.environ if environ is None else environ
        text = env.get(ENV_ALLOWED_CIDS, "").strip()
        if not text:
            if cmdline is None:
                try:
                    with open("/proc/cmdline", encoding="utf-8", errors="replace") as f:
                        cmdline = f.read()
                except OSError:
                    cmdline = ""
            for word in cmdline.split():
                key, _, value = word.partition("=")
                if key == CMDLINE_ALLOWED_CIDS:
                    text = value.strip()
        if not text:
            return cls()
        if text.lower() == "any":
            return cls(allowed_cids=None)
        try:
            cids = frozenset(int(part) for part in text.split(",") if part.strip())
        except ValueError as err:
            raise AddressError(f"{ENV_ALLOWED_CIDS}={text!r}: expected CIDs like 2,3") from err
        return cls(allowed_cids=cids)

    def admits(self, peer: Address | None, uid: int | None = None) -> bool:
        """Whether ``peer`` (a Unix peer: with ``uid``, when known) may call the agent."""
        if peer is None:
            return False  # unknown peer: refuse
        if peer.scheme == "vsock":
            return self.allowed_cids is None or peer.cid in self.allowed_cids
        if peer.scheme == "unix":
            return self.allow_unix and uid_admitted(self.allowed_uids, uid)
        return {"tcp": self.allow_tcp}.get(peer.scheme, False)


@dataclass(frozen=True)
class PeerGuard:
    """A :class:`PeerPolicy` applied to calls, whose peer ``resolver`` tells apart (and
    ``uid_resolver`` the user of a Unix caller, when the server conveys it)."""

    policy: PeerPolicy
    resolver: PeerResolver
    uid_resolver: UidResolver | None = None

    def caller(self, context: grpc.ServicerContext) -> Address | None:
        """The address of the call's peer."""
        peer = self.resolver(context)
        if peer is None and context.peer() == "unix:":
            # An unnamed local Unix-socket client (the relay's inner sockets are always bound to
            # a name, so they never look like this): access was decided by the socket's mode.
            return UnixAddress("")
        return peer

    def admits(self, peer: Address | None) -> bool:
        return self.policy.admits(peer)

    def check(self, context: grpc.ServicerContext, method: str) -> None:
        """Abort the call with PERMISSION_DENIED unless the peer is admitted."""
        peer = self.caller(context)
        uid = self.uid_resolver(context) if self.uid_resolver is not None else None
        if self.policy.admits(peer, uid):
            return
        who = f"{peer} (uid {uid})" if uid is not None else str(peer)
        log.warning("refused %s from peer %s (%s)", method, who, context.peer())
        shown = who.encode("ascii", "backslashreplace").decode("ascii")
        context.set_trailing_metadata(((REFUSED_PEER_KEY, shown),))
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"peer {who} is not allowed")


def guard_handler(handler: Any, guard: PeerGuard, method: str) -> Any:
    """``handler`` (a grpc.RpcMethodHandler) with ``guard`` checked before the behaviour runs."""
    if handler is None:
        return None
    replaced: dict[str, Any] = {}
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behaviour = getattr(handler, kind)
        if behaviour is None:
            continue

        def guarded(request: Any, context: grpc.ServicerContext, _b: Any = behaviour) -> Any:
            guard.check(context, method)
            return _b(request, context)

        replaced[kind] = guarded
    return handler._replace(**replaced)  # grpc's handlers are namedtuples


class _GuardedGenericHandler(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, inner: Any, guard: PeerGuard) -> None:
        self._inner = inner
        self._guard = guard

    def service(self, handler_call_details: Any) -> Any:
        handler = self._inner.service(handler_call_details)
        return guard_handler(handler, self._guard, handler_call_details.method)


class _GuardedServer:
    """Stands in for grpc.Server while a generated ``add_*_to_server`` registers handlers."""

    def __init__(self, server: grpc.Server, guard: PeerGuard) -> None:
        self._server = server
        self._guard = guard

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_GuardedGenericHandler(h, self._guard) for h in handlers)
        )

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self._server.add_registered_method_handlers(
            service,
            {
                name: guard_handler(h, self._guard, f"/{service}/{name}")
                for name, h in handlers.items()
            },
        )


def guarded(register: Registrar, guard: PeerGuard) -> Registrar:
    """A registrar registering the same services with every call checked by ``guard``."""

    def register_guarded(server: grpc.Server) -> None:
        register(_GuardedServer(server, guard))

    return register_guarded


class PeerPolicyInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """The same check for a whole server:
    ``serve(..., interceptors=[PeerPolicyInterceptor(rpc.peer_address)])``."""

    def __init__(self, resolver: PeerResolver, policy: PeerPolicy | None = None) -> None:
        self._guard = PeerGuard(policy if policy is not None else PeerPolicy.from_env(), resolver)

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        return guard_handler(handler, self._guard, handler_call_details.method)
