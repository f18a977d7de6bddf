"""Where running VMs keep their sockets, logs and state: one directory per VM.

``$VSOCKRPC_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/vsockrpc``, else ``/run/vsockrpc`` for root,
else ``/tmp/vsockrpc-<uid>``. Layout: ``vms/<name>/`` (qmp.sock, vhost-user.sock, vsock.sock,
console.log, state.json), ``cids/<cid>.lock`` and ``groups/<group>/`` (the devices of a group's
VMs listen there for each other). Paths stay short: Unix socket paths are
limited to 107 bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

from vsockrpc.errors import VmError

__all__ = ["groups_dir", "runtime_dir"]


def runtime_dir() -> Path:
    if os.environ.get("VSOCKRPC_RUNTIME_DIR"):
        path = Path(os.environ["VSOCKRPC_RUNTIME_DIR"])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "vsockrpc"
    elif os.geteuid() == 0:
        path = Path("/run/vsockrpc")
    else:
        path = Path(f"/tmp/vsockrpc-{os.getuid()}")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise VmError(f"runtime directory {path} is not writable: {err.strerror}") from err
    return path


def groups_dir(runtime: Path) -> Path:
    """Where the vsock devices of grouped VMs meet (each group a subdirectory, created by the
    devices with mode 0700)."""
    return runtime / "groups"
