"""Group membership on the filesystem: the rendezvous of cooperating devices (docs/device.md,
"Sibling routing").

Each group is a directory ``<groups_dir>/<name>/`` (mode 0700, owned by the user running the
devices). A device whose guest has CID ``N`` and belongs to the group listens on
``<name>/N.sock`` (mode 0600) and writes its pid to ``<name>/N.pid``. Another member's device
finds it by that path; the pid file lets the receiving device check, with ``SO_PEERCRED``, that
whoever claims CID ``N`` in a handshake is the process that holds that CID in the group.

The pid file is also the membership lock: the device holds an exclusive ``flock`` on it for its
whole life. A second device with the same CID cannot take the lock (a CID collision, refused at
start); the kernel drops the lock when its holder dies, however it dies, so a file left by a
crashed device is simply taken over, and a recycled pid number is never mistaken for a live
member. The pid is written before the group socket exists, so no peer reads it half-written.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import stat

from vsockrpc.errors import DeviceError
from vsockrpc.vhost.paths import BoundPath, listen_unix

__all__ = [
    "GROUP_NAME",
    "GroupMember",
    "check_group_name",
    "ensure_private_dir",
    "lock_pid_file",
    "read_member_pid",
    "read_pid_file",
    "release_pid_file",
]

log = logging.getLogger(__name__)

#: A group name: a path component that is never ``.``/``..`` or hidden, at most 64 bytes.
GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
SOCKET_MODE = 0o600
DIR_MODE = 0o700
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL
MAX_PID_FILE = 32  # "4194304\n" is 8 bytes


def check_group_name(name: str) -> str:
    """``name`` if it is a valid group name, else ValueError saying why."""
    if not GROUP_NAME.match(name):
        raise ValueError(
            f"{name!r} is not a group name (1-64 of A-Z a-z 0-9 _ . -, starting with a letter "
            "or digit)"
        )
    return name


def member_path(groups_dir: str, group: str, cid: int, suffix: str) -> str:
    return os.path.join(groups_dir, group, f"{cid}.{suffix}")


def read_member_pid(groups_dir: str, group: str, cid: int) -> int | None:
    """The pid in ``<group>/<cid>.pid`` (see :func:`read_pid_file`)."""
    return read_pid_file(member_path(groups_dir, group, cid, "pid"))


def read_pid_file(path: str) -> int | None:
    """The pid in the pid file ``path``, or None if there is no such regular file or it does not
    hold a pid (a symlink planted there is not followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, MAX_PID_FILE)
    except OSError:
        return None
    finally:
        os.close(fd)
    text = text.strip()
    return int(text) if text.isdigit() and len(text) < 16 else None


def ensure_private_dir(path: str) -> None:
    """Create ``path`` and its missing parents with mode 0700 (whatever the umask). An existing
    ``path`` must be a real directory (not a symlink) owned by us and not writable by others."""
    missing: list[str] = []
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            continue  # made by someone else meanwhile: checked below if it is the group dir
        except OSError as err:
            raise DeviceError(f"cannot create {directory}: {err.strerror or err}") from err
        os.chmod(directory, DIR_MODE)  # mkdir's mode went through the umask
    try:
        st = os.lstat(path)
    except OSError as err:
        raise DeviceError(f"cannot use {path}: {err.strerror or err}") from err
    if stat.S_ISLNK(st.st_mode):
        raise DeviceError(f"{path} is a symlink, not a group directory")
    if not stat.S_ISDIR(st.st_mode):
        raise DeviceError(f"{path} exists and is not a directory")
    if st.st_uid != os.getuid():
        raise DeviceError(f"{path} is owned by uid {st.st_uid}, not by us ({os.getuid()})")
    if st.st_mode & 0o022:
        raise DeviceError(f"{path} is writable by other users (mode {st.st_mode & 0o777:04o})")


def lock_pid_file(path: str, what: str, *, busy: str) -> int:
    """Open ``path`` (created 0600, never through a symlink), take its exclusive ``flock`` and
    write our pid into it: the fd, which holds the lock until closed. DeviceError ``busy`` when
    another process holds it; ``what`` names the file's owner in other errors."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as err:
        raise DeviceError(f"{what}: cannot open the pid file: {err.strerror or err}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise DeviceError(f"{what}: {path} is not our regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeviceError(busy) from None
        # Ours now (a file left by a dead process is taken over). Written before any socket is
        # bound: no peer reads it until the socket exists.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def release_pid_file(fd: int, path: str, pid: int) -> bool:
    """Remove the pid file locked by ``fd`` (:func:`lock_pid_file`) if ``path`` is still that
    file and holds ``pid``, then close ``fd``, which releases the lock after the file is gone.
    True if the file was removed."""
    removed = False
    with contextlib.suppress(OSError):
        held, now = os.fstat(fd), os.lstat(path)
        if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino) and read_pid_file(path) == pid:
            os.unlink(path)
            removed = True
    os.close(fd)
    return removed


class GroupMember:
    """This device's membership of one group: its lock, pid file and listening socket.

    Raises DeviceError when the membership cannot be taken (CID collision, unusable directory,
    path too long); :meth:`close` removes the two files, each only if it is still ours."""

    def __init__(self, groups_dir: str, name: str, guest_cid: int) -> None:
        self.groups_dir = groups_dir
        self.name = name
        self.guest_cid = guest_cid
        self.directory = os.path.join(groups_dir, name)
        self.socket_path = member_path(groups_dir, name, guest_cid, "sock")
        self.pid_path = member_path(groups_dir, name, guest_cid, "pid")
        self.listener: socket.socket | None = None
        self._bound: BoundPath | None = None
        self._pid_fd: int | None = None
        self._pid = os.getpid()
        if len(self.socket_path.encode()) > SUN_PATH_MAX:
            raise DeviceError(
                f"--groups-dir {groups_dir}: too long for a group socket path "
                f"({len(self.socket_path.encode())} bytes, at most {SUN_PATH_MAX})"
            )
        try:
            ensure_private_dir(self.directory)
            self._lock_pid_file()
            self.listener, self._bound = listen_unix(self.socket_path, mode=SOCKET_MODE)
            self.listener.setblocking(False)
        except BaseException:
            self.close()
            raise

    def _lock_pid_file(self) -> None:
        self._pid_fd = lock_pid_file(
            self.pid_path,
            f"group {self.name}",
            busy=f"CID {self.guest_cid} is already a member of group {self.name}",
        )

    def close(self) -> None:
        """Stop listening; remove the socket and pid files if they are still this device's."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self._bound is not None:
            with contextlib.suppress(OSError):
                if not self._bound.unlink():
                    log.info("group %s: not removing a socket that is no longer ours", self.name)
            self._bound = None
        fd, self._pid_fd = self._pid_fd, None
        if fd is not None:
            release_pid_file(fd, self.pid_path, self._pid)
