"""The guest agent: Exec, Files and System services (``vsockrpc.agent.v1``), peer policy,
and the standard health and reflection services.

:func:`agent_services` returns ``serve()`` registrars; every agent call is checked against a
:class:`PeerPolicy` (default: only the host, CID 2, plus Unix-socket peers), with the caller
found by the ``peer_resolver`` the server's starter passes in. The PID-1 init hooks in with
:func:`install_power_control` and :func:`record_reaped`. What the host side must agree on
(proto, checksums, data-channel tickets) lives in the agent contract, :mod:`vsockrpc.agent`.

Modules: :mod:`.exec` (the Exec servicer) over :mod:`.exec_stream` (its stream protocol) over
the gRPC-free process manager :mod:`.spawn` + :mod:`.process`; :mod:`.files` with
:mod:`.datachannel`; :mod:`.system`; :mod:`.peers`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc

from vsockrpc.agent.v1 import agent_pb2 as pb
from vsockrpc.agent.v1 import agent_pb2_grpc as pb_grpc
from vsockrpc.services.agent.credentials import UidResolver
from vsockrpc.services.agent.datachannel import DataSockets
from vsockrpc.services.agent.exec import ExecServicer
from vsockrpc.services.agent.files import FilesServicer
from vsockrpc.services.agent.peers import (
    PeerGuard,
    PeerPolicy,
    PeerPolicyInterceptor,
    PeerResolver,
    guarded,
)
from vsockrpc.services.agent.process import is_agent_child, record_reaped
from vsockrpc.services.agent.spawn import ProcessSpec, ProcessTable
from vsockrpc.services.agent.system import (
    ClockSetter,
    IdentitySetter,
    PowerAction,
    PowerControl,
    SystemServicer,
    default_power_control,
    install_power_control,
    refresh_machine_identity,
    set_realtime_clock,
)

AGENT_WORKERS = 256
"""Server worker threads for an agent, and its cap on calls at once. Each Exec stream holds a
worker for its process's whole life: with 16 workers, 16 running commands left no worker for
anything else, and every later call (Ping included) waited until one ended. Past the cap a
call is refused at once (RESOURCE_EXHAUSTED) rather than queued. Threads start on demand."""

__all__ = [
    "AGENT_SERVICE_NAMES",
    "AGENT_WORKERS",
    "ClockSetter",
    "ExecServicer",
    "FilesServicer",
    "IdentitySetter",
    "PeerGuard",
    "PeerPolicy",
    "PeerPolicyInterceptor",
    "PeerResolver",
    "PowerAction",
    "PowerControl",
    "ProcessSpec",
    "ProcessTable",
    "SystemServicer",
    "UidResolver",
    "agent_services",
    "default_power_control",
    "guarded",
    "health_and_reflection",
    "install_power_control",
    "is_agent_child",
    "record_reaped",
]

Registrar = Callable[[grpc.Server], None]

AGENT_SERVICE_NAMES = tuple(
    pb.DESCRIPTOR.services_by_name[name].full_name for name in ("Exec", "Files", "System")
)


def agent_services(
    *,
    peer_resolver: PeerResolver,
    sockets: DataSockets | None,
    uid_resolver: UidResolver | None = None,
    policy: PeerPolicy | None = None,
    power_control: PowerControl | None = None,
    clock_setter: ClockSetter = set_realtime_clock,
    identity_setter: IdentitySetter = refresh_machine_identity,
    table: ProcessTable | None = None,
    files: FilesServicer | None = None,
) -> list[Registrar]:
    """Registrars for the Exec, Files and System services, each call checked by ``policy``
    (default :meth:`PeerPolicy.from_env`) against the caller ``peer_resolver`` finds (e.g.
    :func:`vsockrpc.rpc.peer_address`) and, for Unix callers, the uid ``uid_resolver`` finds
    (checked against ``policy.allowed_uids``). Pass ``table``/``files`` to keep handles for
    cleanup (``table.close()`` kills processes, ``files.close()`` closes data listeners).
    ``sockets`` (:mod:`vsockrpc.transport`, injected like the peer lookup) opens raw data
    channels; with None, transfers go in-band."""
    admitted = policy if policy is not None else PeerPolicy.from_env()
    guard = PeerGuard(admitted, peer_resolver, uid_resolver)
    exec_servicer = ExecServicer(table)
    files_servicer = files if files is not None else FilesServicer(guard, sockets)
    system_servicer = SystemServicer(
        power_control=power_control, clock_setter=clock_setter, identity_setter=identity_setter
    )

    def register_exec(server: grpc.Server) -> None:
        pb_grpc.add_ExecServicer_to_server(exec_servicer, server)  # type: ignore[no-untyped-call]

    def register_files(server: grpc.Server) -> None:
        pb_grpc.add_FilesServicer_to_server(files_servicer, server)  # type: ignore[no-untyped-call]

    def register_system(server: grpc.Server) -> None:
        pb_grpc.add_SystemServicer_to_server(system_servicer, server)  # type: ignore[no-untyped-call]

    return [guarded(r, guard) for r in (register_exec, register_files, register_system)]


def health_and_reflection(service_names: Sequence[str]) -> Registrar:
    """A registrar for ``grpc.health.v1.Health`` (every name SERVING) and server reflection."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

    def register(server: grpc.Server) -> None:
        servicer = health.HealthServicer()
        for name in ("", *service_names):
            servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        names = (
            *service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        # What enable_server_reflection does for a sync server, without its check for an
        # asyncio server, which would import grpc.aio (vsockrpc.guest.deferred).
        reflector = reflection.ReflectionServicer(names)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflector, server)

    return register
