"""Making a restored clone its own machine: fresh RNG state, the host's time, its own identity.

Clones of one snapshot start with the same RAM, so the same kernel CRNG state: without a
reseed their ``/dev/urandom`` outputs would be identical. The guest kernel here has no
``vmgenid`` driver (Debian's cloud kernel, ``CONFIG_VMGENID`` unset), so the entropy is pushed
through the agent instead: one short ``python3`` in the guest (through the ``Exec`` service)
writes 64 random host bytes to ``/dev/urandom`` (mixed into the input pool) and forces a
reseed of the CRNG with the ``RNDRESEEDCRNG`` ioctl (``drivers/char/random.c``: the base key
is rekeyed from the input pool and every per-CPU key follows on next use). The same process
sets the hostname to the VM's name and, when the image has an ``/etc/machine-id``, binds a
freshly generated one over it (the root file system is read-only). The clock is set from the
host's with the ``System.SetTime`` RPC (the guest's clock stood still while it was saved).

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
from vsockrpc.vm.guestexec import guest_python

__all__ = ["SEED_BYTES", "refresh_identity"]

SEED_BYTES = 64
CALL_TIMEOUT = 60.0

# Runs in the guest as `python3 -IS -c`: stdin is the seed, then the hostname and machine-id
# lines. RNDRESEEDCRNG = _IO('R', 0x07) (include/uapi/linux/random.h); MS_BIND = 4096.
GUEST_SCRIPT = f"""
import ctypes, fcntl, os, socket, sys
data = sys.stdin.buffer.read()
seed, rest = data[:{SEED_BYTES}], data[{SEED_BYTES}:].decode().split()
fd = os.open("/dev/urandom", os.O_WRONLY)
os.write(fd, seed)
fcntl.ioctl(fd, 0x5207)
os.close(fd)
socket.sethostname(rest[0])
if os.path.exists("/etc/machine-id"):
    with open("/run/machine-id", "w") as f:
        f.write(rest[1] + "\\n")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"/run/machine-id", b"/etc/machine-id", None, 4096, None) != 0:
        raise OSError(ctypes.get_errno(), "bind mount of /etc/machine-id")
"""


def refresh_identity(channel: grpc.Channel, hostname: str) -> float:
    """Reseed, rename and set the clock of the guest behind ``channel``; returns how far its
    clock was off (guest - host, seconds) before it was set."""
    seed = os.urandom(SEED_BYTES) + f"{hostname}\n{uuid.uuid4().hex}\n".encode()
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
        reply = system.SetTime(pb.SetTimeRequest(time_ns=now), timeout=CALL_TIMEOUT)
        offset = float((reply.previous_time_ns - now) / 1e9)
        guest_python(
            channel, GUEST_SCRIPT, stdin=seed, what="reseeding the clone", timeout=CALL_TIMEOUT
        )
    except VmError:
        raise
    except Exception as err:  # grpc.RpcError and transport errors alike
        raise VmError(f"cannot refresh the clone's identity through its agent: {err}") from err
    return float(offset)
