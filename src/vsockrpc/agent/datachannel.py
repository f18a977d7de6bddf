"""The raw data channel's ticket line, as both sides write and read it.

A large transfer can move its bytes outside gRPC: ``Files.OpenDataChannel`` returns a port (or
a Unix path) and a ticket; the client connects there over the transport it reached the agent
on, sends :func:`ticket_line` and then names the ticket in its ``UploadHeader`` /
``DownloadRequest`` (see ``Files`` in ``v1/agent.proto``). A ticket is :data:`TICKET_BYTES`
random bytes in lower-case hex, good for one connection within :data:`TICKET_TTL` seconds.

Both ends move the channel's bytes with :func:`pipelined_copy`: on a guest or host with a
second CPU, the socket on one thread and the file and the checksum on another, so that neither
waits for the other.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

__all__ = [
    "PIPELINE_BUFFERS",
    "PIPELINE_BUFFER_SIZE",
    "TICKET_BYTES",
    "TICKET_LINE_MAX",
    "TICKET_TTL",
    "new_ticket",
    "parse_ticket_line",
    "pipelined_copy",
    "ticket_line",
    "usable_cpus",
]

TICKET_BYTES = 16
"""Random bytes in a ticket (128 bits), sent as 32 hex digits."""
TICKET_TTL = 60.0
"""Seconds an issued ticket waits for its connection before it expires."""
TICKET_LINE_MAX = TICKET_BYTES * 2 + 1
"""Length of a ticket line: the hex digits and ``\\n``; the agent reads no more than this."""


def new_ticket() -> str:
    """A fresh ticket (unguessable, for one connection)."""
    # Imported on first use: secrets imports hmac and hashlib, whose OpenSSL load is start-up
    # time in a TCG guest's agent, and the agent issues no ticket before the first transfer.
    import secrets

    return secrets.token_hex(TICKET_BYTES)


def ticket_line(ticket: str) -> bytes:
    """What a client sends first on a data connection: the ticket and a newline."""
    return ticket.encode("ascii") + b"\n"


def parse_ticket_line(line: bytes) -> str:
    """The ticket a client sent (whitespace stripped; garbage stays garbage and matches none)."""
    return line.strip().decode("ascii", "replace")


PIPELINE_BUFFER_SIZE = 256 * 1024
"""Bytes per buffer of :func:`pipelined_copy` when it overlaps (one system call or checksum
update each): a vsock socket's default buffer."""
PIPELINE_BUFFERS = 4
"""Buffers in flight when it overlaps. On one CPU a single buffer holds as much: 1 MiB per
transfer either way, as before the overlap (the agent serves up to 256 calls at once)."""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def pipelined_copy(
    fill: Callable[[memoryview], int],
    drain: Callable[[memoryview], object],
    *,
    fill_in_thread: bool,
    buffer_size: int = PIPELINE_BUFFER_SIZE,
) -> int:
    """Copy a stream through reused buffers, ``fill`` and ``drain`` overlapping on two CPUs.

    ``fill(view)`` writes up to ``len(view)`` bytes into ``view`` and returns how many; 0 ends
    the stream. ``drain(view)`` consumes exactly the bytes it is given. One of them runs in a
    helper thread (``fill_in_thread`` says which), the other in the caller's; the caller's side
    is the one whose errors the caller handles (a socket's timeout). Returns the bytes moved.

    Why: a transfer reads, checksums and writes every byte, and CRC-32 alone runs at about the
    speed of a local stream socket. Done one after the other, each step waits for the others;
    overlapped, the slowest step sets the pace (zlib, hashlib, file and socket calls release
    the GIL). The standard library has no such pump; this one is a pair of queues. On one CPU
    nothing can overlap, so there the two alternate on the caller's thread in one buffer as
    large as all of them (a TCG guest with one vCPU: no thread hand-offs for nothing, and a
    system call per MiB).

    The first error on either side stops both: the other side finishes the call it is in (a
    blocked socket call ends with its own timeout), the helper thread is joined, and the error
    is raised in the caller. If both fail, the caller's own error wins.
    """
    if usable_cpus() < 2:
        view = memoryview(bytearray(buffer_size * PIPELINE_BUFFERS))
        moved = 0
        while n := fill(view):
            drain(view[:n])
            moved += n
        return moved
    free: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
    full: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
    for _ in range(PIPELINE_BUFFERS):
        free.put(memoryview(bytearray(buffer_size)))
    stop = threading.Event()
    failure: list[BaseException] = []
    moved = 0

    def fill_side() -> None:
        while not stop.is_set() and (view := free.get()) is not None:
            n = fill(view)
            full.put((view, n))
            if n == 0:
                return

    def drain_side() -> None:
        nonlocal moved
        while not stop.is_set() and (item := full.get()) is not None:
            view, n = item
            if n == 0:
                return
            drain(view[:n])
            moved += n
            free.put(view)

    def helper(side: Callable[[], None]) -> None:
        try:
            side()
        except BaseException as err:  # handed to the caller, which raises it
            failure.append(err)
            stop.set()
            (full if fill_in_thread else free).put(None)  # wake the caller's side

    thread = threading.Thread(
        target=helper,
        args=(fill_side if fill_in_thread else drain_side,),
        name="vsockrpc-datachannel",
        daemon=True,  # never outlives the call: joined below
    )
    thread.start()
    try:
        (drain_side if fill_in_thread else fill_side)()
    except BaseException:
        stop.set()
        (free if fill_in_thread else full).put(None)  # wake the helper's side
        thread.join()
        raise
    thread.join()
    if failure:
        raise failure[0]
    return moved
