"""Making a restored clone its own machine: fresh RNG state, the host's time, its own identity.

Clones of one snapshot start with the same RAM, so the same kernel CRNG state: without a
reseed their ``/dev/urandom`` outputs would be identical. The guest kernel here has no
``vmgenid`` driver (Debian's cloud kernel, ``CONFIG_VMGENID`` unset), so the entropy is pushed
through the agent instead, with one ``System.Refresh`` call: it mixes 64 random host bytes into
the guest's RNG and reseeds it, sets the hostname to the VM's name, binds a fresh machine-id
over ``/etc/machine-id`` when the image has one, and sets the clock from the host's (the
guest's clock stood still while it was saved); see
``vsockrpc.services.agent.system.refresh_machine_identity``. (It used to be a ``python3``
started in the guest through ``Exec``: 1.2-1.9 s of a TCG clone's restore.)

Only the agent contract and grpcio are used (``vm/`` sits below the SDK).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import grpc

from vsockrpc.agent.v1 import agent_pb2 as pb
from vsockrpc.agent.v1 import agent_pb2_grpc as pb_grpc
from vsockrpc.errors import VmError

__all__ = ["SEED_BYTES", "refresh_identity"]

SEED_BYTES = 64
CALL_TIMEOUT = 60.0


def refresh_identity(channel: grpc.Channel, hostname: str) -> float:
    """Reseed, rename and set the clock of the guest behind ``channel``; returns how far its
    clock was off (guest - host, seconds) before it was set."""
    try:
        system: Any = pb_grpc.SystemStub(channel)  # type: ignore[no-untyped-call]
        # The first call also connects (relay, hybrid CONNECT: seconds on a loaded TCG host);
        # a second Ping measures the round trip, and the clock is set to the host's time plus
        # half of it, when the request reaches the guest (NTP's estimate of one-way delay).
        system.Ping(pb.PingRequest(), timeout=CALL_TIMEOUT, wait_for_ready=True)
        sent = time.time_ns()
        system.Ping(pb.PingRequest(), timeout=CALL_TIMEOUT)
        now = time.time_ns()
        now += (now - sent) // 2
        request = pb.RefreshRequest(
            seed=os.urandom(SEED_BYTES),
            hostname=hostname,
            machine_id=uuid.uuid4().hex,
            time_ns=now,
        )
        reply = system.Refresh(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        if err.code() is grpc.StatusCode.UNIMPLEMENTED:
            raise VmError(
                "the snapshot's guest agent predates System.Refresh: take the snapshot again "
                "with this version of vsockrpc"
            ) from None
        detail = err.details()
        raise VmError(f"cannot refresh the clone's identity through its agent: {detail}") from None
    except Exception as err:  # transport errors
        raise VmError(f"cannot refresh the clone's identity through its agent: {err}") from err
    return float((reply.previous_time_ns - now) / 1e9)
