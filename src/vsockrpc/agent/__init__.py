"""The agent contract: everything both sides of the guest agent agree on.

The host side (:mod:`vsockrpc.sdk`, :mod:`vsockrpc.vm`) and the guest side
(:mod:`vsockrpc.services.agent`, :mod:`vsockrpc.guest`) import this package and never each
other, so a change to one side that breaks the other shows up here, in one place.

- :mod:`vsockrpc.agent.v1` — the wire protocol: ``agent.proto`` (protobuf package
  ``vsockrpc.agent.v1``: services Exec, Files, System) beside its generated stubs
  ``agent_pb2`` and ``agent_pb2_grpc`` (regenerate with ``python scripts/gen_protos.py``).
- :mod:`vsockrpc.agent.markers` — the console lines the guest prints and the launcher waits for.
- :mod:`vsockrpc.agent.checksum` — the end-to-end transfer checksums (CRC-32, SHA-256).
- :mod:`vsockrpc.agent.datachannel` — the raw data channel's ticket line, and the copy both
  ends run on it (socket against file and checksum, overlapped on two CPUs).
- this module — the default port, the guest's kernel command-line keys, the peer-policy
  variable, the metadata key that marks a call refused by that policy, the VM name rule
  (a clone's ``System.Refresh`` takes its VM name as the hostname) and the largest PTY window.

Importing this package, :mod:`~vsockrpc.agent.markers` or :mod:`~vsockrpc.agent.datachannel`
loads only the standard library (the guest's PID 1 imports the markers, and it never loads
protobuf or grpc); :mod:`~vsockrpc.agent.checksum` and :mod:`~vsockrpc.agent.v1` load protobuf.
"""

from __future__ import annotations

import re

__all__ = [
    "CMDLINE_ALLOWED_CIDS",
    "CMDLINE_LISTEN",
    "CMDLINE_PORT",
    "DEFAULT_PORT",
    "ENV_ALLOWED_CIDS",
    "REFUSED_PEER_KEY",
    "VM_NAME",
    "WINDOW_MAX",
]

DEFAULT_PORT = 9999
"""The vsock port the agent listens on unless told otherwise (the seed demo's port)."""

CMDLINE_PORT = "vsockrpc.port"
"""Guest kernel command-line key: ``vsockrpc.port=N`` makes the agent listen on ``vsock:-1:N``."""
CMDLINE_LISTEN = "vsockrpc.listen"
"""Guest kernel command-line key: ``vsockrpc.listen=ADDRESS`` (may repeat) replaces the port."""
CMDLINE_ALLOWED_CIDS = "vsockrpc.allowed_cids"
"""Guest kernel command-line key: the CIDs the agent admits (when the variable is unset)."""
ENV_ALLOWED_CIDS = "VSOCKRPC_AGENT_ALLOWED_CIDS"
"""The agent's environment: comma-separated CIDs it admits (``any`` for every CID); default 2."""

WINDOW_MAX = 65535
"""Rows or columns of a PTY window at most: the kernel's ``struct winsize`` (TIOCSWINSZ) holds
16-bit sizes. The SDK refuses more before sending; the agent answers INVALID_ARGUMENT."""

REFUSED_PEER_KEY = "vsockrpc-refused-peer"
"""Trailing-metadata key the agent sets (value: the peer) when its peer policy refused a call.

A refused call and a file the agent may not write both end in ``PERMISSION_DENIED``; this key
is how a client tells them apart (and hints at :data:`ENV_ALLOWED_CIDS` only for the first).
"""

VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
"""A VM name (``fullmatch``): one path component on the host (the run directory, the name lock,
QEMU's ``-name``), a letter or digit first, so no ".", "..", hidden file or option. The launcher
checks names with it, and ``System.Refresh`` accepts exactly these as a clone's hostname."""
