"""The raw data channel's ticket line, as both sides write and read it.

A large transfer can move its bytes outside gRPC: ``Files.OpenDataChannel`` returns a port (or
a Unix path) and a ticket; the client connects there over the transport it reached the agent
on, sends :func:`ticket_line` and then names the ticket in its ``UploadHeader`` /
``DownloadRequest`` (see ``Files`` in ``v1/agent.proto``). A ticket is :data:`TICKET_BYTES`
random bytes in lower-case hex, good for one connection within :data:`TICKET_TTL` seconds.
"""

from __future__ import annotations

__all__ = [
    "TICKET_BYTES",
    "TICKET_LINE_MAX",
    "TICKET_TTL",
    "new_ticket",
    "parse_ticket_line",
    "ticket_line",
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
