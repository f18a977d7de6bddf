"""Guest CIDs: allocation of a free one and detection of a busy one.

A CID must be unique per host for kernel vhost-vsock (the kernel refuses a duplicate with
EADDRINUSE); with our userspace device each VM has its own namespace, but ``vm list`` and
scripts address VMs by CID, so vsockrpc keeps them unique either way. A CID is held with an
``flock`` on ``<runtime>/cids/<cid>.lock`` for the VM's lifetime (the lock dies with the
process holding it, so a crash cannot leak it). The host's own CID (this machine may itself be
a guest: IOCTL_VM_SOCKETS_GET_LOCAL_CID on /dev/vsock) and the reserved 0-2 are never given out.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

from vsockrpc.errors import VmError
from vsockrpc.vm.options import check_cid

__all__ = ["FIRST_GUEST_CID", "CidLease", "host_local_cid", "lease"]

FIRST_GUEST_CID = 3  # 0 hypervisor, 1 local loopback, 2 host (include/uapi/linux/vm_sockets.h)
MAX_GUEST_CID = 0xFFFFFFFE  # 0xFFFFFFFF is VMADDR_CID_ANY
IOCTL_VM_SOCKETS_GET_LOCAL_CID = 0x7B9
_SEARCH = 4096


def host_local_cid() -> int | None:
    """This machine's own vsock CID, when it has a vsock transport (an ioctl, no connect)."""
    try:
        fd = os.open("/dev/vsock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        buf = fcntl.ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, b"\0" * 4)
        (cid,) = struct.unpack("I", buf)
        return int(cid)
    except OSError:
        return None
    finally:
        os.close(fd)


class CidLease:
    """A held CID; release with :meth:`close` (or by exiting the process)."""

    def __init__(self, cid: int, fd: int, path: Path) -> None:
        self.cid = cid
        self._fd: int | None = fd
        self.path = path

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("lease released")
        return self._fd

    def __enter__(self) -> CidLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _try_lock(directory: Path, cid: int) -> CidLease | None:
    path = directory / f"{cid}.lock"
    try:
        # O_NOFOLLOW: a symlink planted in the lock's place is never followed (and its target
        # never truncated below).
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise VmError(
            f"cannot lease guest CID {cid}: its lock file {path} is unusable ({err.strerror})",
            hint="remove it yourself if no VM uses that CID",
        ) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return CidLease(cid, fd, path)


def holder(directory: Path, cid: int) -> str:
    try:
        return (directory / f"{cid}.lock").read_text().strip() or "?"
    except OSError:
        return "?"


def lease(runtime: Path, cid: int | None = None) -> CidLease:
    """Hold ``cid`` (VmError when busy or invalid) or the lowest free CID when None."""
    directory = runtime / "cids"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    own = host_local_cid()
    if cid is not None:
        check_cid(cid)
        if cid == own:
            raise VmError(f"CID {cid} is busy: it is this host's own vsock CID")
        got = _try_lock(directory, cid)
        if got is None:
            raise VmError(
                f"CID {cid} is busy: a running VM (launcher pid {holder(directory, cid)}) has it",
                hint="omit --cid to get a free one",
            )
        return got
    for candidate in range(FIRST_GUEST_CID, FIRST_GUEST_CID + _SEARCH):
        if candidate == own:
            continue
        got = _try_lock(directory, candidate)
        if got is not None:
            return got
    raise VmError(f"no free CID among the first {_SEARCH}")
