"""A VM's name and run directory: claimed atomically, removed only when provably ours.

The name is held like a CID lease: an ``flock`` on ``<runtime>/names/<name>.lock`` taken with
``LOCK_NB`` (two launchers racing for one name: exactly one wins) and kept for the VM's
lifetime. The lock fd is inherited by QEMU and the device, so the name stays taken while any
process of the VM lives, and is free again (the kernel drops the lock) once all are gone, even
after a crash.

Whoever claims the name creates ``<runtime>/vms/<name>/`` and writes a random token into both
the directory (``.owner``) and the name's lock file. A directory is removed only when it is a
real directory (not a symlink) directly under ``<runtime>/vms`` and its token matches the lock
file's: a directory vsockrpc did not create (or a path smuggled in as a name) is never deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import stat
from pathlib import Path

from vsockrpc.errors import VmError
from vsockrpc.vm.options import check_name

__all__ = ["NameClaim", "claim_name", "owned_run_dir", "remove_run_dir"]

OWNER_FILE = ".owner"


def _names(runtime: Path) -> Path:
    path = runtime / "names"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _vms(runtime: Path) -> Path:
    path = runtime / "vms"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _read_token(path: Path) -> str | None:
    """The token on the last line of ``path`` (lock file: ``pid\\ntoken``), if any."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(fd, 256).decode(errors="replace").split()
    finally:
        os.close(fd)
    return text[-1] if text and len(text[-1]) == 32 else None


def owned_run_dir(runtime: Path, name: str) -> Path | None:
    """``<runtime>/vms/<name>`` when vsockrpc created it for the current holder of the name's
    lock file, else None (never follows a symlink)."""
    try:
        check_name(name)
    except VmError:
        return None
    path = runtime / "vms" / name
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return None
    except OSError:
        return None
    want = _read_token(runtime / "names" / f"{name}.lock")
    have = _read_token(path / OWNER_FILE)
    return path if want is not None and want == have else None


def remove_run_dir(runtime: Path, name: str) -> bool:
    """Remove the run directory of ``name`` if :func:`owned_run_dir` proves it ours."""
    path = owned_run_dir(runtime, name)
    if path is None:
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def holder(runtime: Path, name: str) -> str:
    try:
        return (runtime / "names" / f"{name}.lock").read_text().split()[0]
    except (OSError, IndexError):
        return "?"


class NameClaim:
    """A held VM name and its fresh run directory; :meth:`close` releases the name (the
    directory is removed separately, by :meth:`remove`)."""

    def __init__(self, runtime: Path, name: str, fd: int, token: str) -> None:
        self.runtime = runtime
        self.name = name
        self.run_dir = runtime / "vms" / name
        self.token = token
        self._fd: int | None = fd

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("name released")
        return self._fd

    def remove(self) -> None:
        remove_run_dir(self.runtime, self.name)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def claim_name(runtime: Path, name: str) -> NameClaim:
    """Hold ``name`` and create its run directory; :class:`VmError` when another VM (running
    or starting) holds it, or a directory vsockrpc did not create is in the way."""
    check_name(name)
    lock = _names(runtime) / f"{name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:  # ELOOP: a symlink planted in its place is never followed
        raise VmError(
            f"cannot claim the VM name {name}: its lock file {lock} is unusable ({err.strerror})",
            hint="remove it yourself if no VM of that name runs",
        ) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise VmError(
            f"a VM named {name} is already running or starting (launcher pid "
            f"{holder(runtime, name)})",
            hint="pick another --name, or see: vsockrpc vm list",
        ) from None
    created = False
    try:
        run_dir = _vms(runtime) / name
        # We hold the name: a directory left here belongs to a VM that is gone. Remove it
        # only if it is provably one vsockrpc made (token match), never anything else.
        if os.path.lexists(run_dir) and not remove_run_dir(runtime, name):
            raise VmError(
                f"{run_dir} exists but was not created by vsockrpc for a VM named {name}: "
                "not touching it",
                hint="remove it yourself or pick another --name",
            )
        os.mkdir(run_dir, 0o700)
        created = True
        token = secrets.token_hex(16)
        owner = os.open(
            run_dir / OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        with contextlib.closing(os.fdopen(owner, "w")) as f:
            f.write(f"{token}\n")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{token}\n".encode(), 0)
    except BaseException:
        if created:  # made by this very call: provably ours
            shutil.rmtree(run_dir, ignore_errors=True)
        os.close(fd)
        raise
    return NameClaim(runtime, name, fd, token)
