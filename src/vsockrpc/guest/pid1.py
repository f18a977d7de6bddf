"""What PID 1 must do that no library does for us: system calls through libc (ctypes, stdlib).

mount(2), finit_module(2) and reboot(2) have no wrapper in Python's standard library; the
guest side may use only the stdlib, grpcio and protobuf (ARCHITECTURE.md), so they are called
through ctypes here, one small function each.
"""

from __future__ import annotations

import ctypes
import errno
import os

__all__ = [
    "MOUNTS",
    "disable_ctrl_alt_del",
    "load_modules",
    "mount",
    "mount_essentials",
    "power_off",
]

# include/uapi/linux/reboot.h
LINUX_REBOOT_MAGIC1 = 0xFEE1DEAD
LINUX_REBOOT_MAGIC2 = 672274793
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
LINUX_REBOOT_CMD_CAD_OFF = 0x00000000
# include/uapi/linux/mount.h
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
# arch/x86/entry/syscalls/syscall_64.tbl (x86_64); arm64 uses the generic table (273).
_SYS_FINIT_MODULE = {"x86_64": 313, "aarch64": 273}


def _open_libc() -> ctypes.CDLL:
    # By soname first: ctypes.util.find_library runs `ldconfig -p` in a subprocess (and imports
    # subprocess, tempfile, shutil), all slow for PID 1 under TCG.
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc
        from ctypes.util import find_library

        return ctypes.CDLL(find_library("c") or "libc.so", use_errno=True)


_libc = _open_libc()

# (source, target, fstype, flags, data)
MOUNTS: tuple[tuple[str, str, str, int, str], ...] = (
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),
    ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    _check(
        _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()),
        f"mount {fstype} on {target}",
    )


def mount_essentials(log: list[str]) -> None:
    """Mount /proc, /sys, /dev (+pts, shm), /run and /tmp; already mounted ones are kept."""
    for source, target, fstype, flags, data in MOUNTS:
        try:
            os.makedirs(target, exist_ok=True)
            mount(source, target, fstype, flags, data)
        except OSError as err:
            if err.errno != errno.EBUSY:  # the loader moved /dev here already
                log.append(f"cannot mount {target}: {err.strerror}")
    if not os.path.exists("/dev/ptmx") and os.path.exists("/dev/pts/ptmx"):
        try:
            os.symlink("pts/ptmx", "/dev/ptmx")
        except OSError as err:
            log.append(f"cannot link /dev/ptmx: {err.strerror}")


def load_modules(load_list: str | os.PathLike[str], log: list[str]) -> int:
    """finit_module(2) each module in ``load_list`` (paths, dependency order) not yet loaded.

    Returns how many were loaded; EEXIST (already loaded or built in) is fine.
    """
    number = _SYS_FINIT_MODULE.get(os.uname().machine)
    if number is None or not os.path.isfile(load_list):
        return 0
    with open(load_list) as f:
        lines = f.read().split()
    loaded = 0
    for path in lines:  # no pathlib here: PID 1 imports as little as it can (boot time)
        name = os.path.basename(path).removesuffix(".ko").replace("-", "_")
        if os.path.exists(f"/sys/module/{name}"):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            log.append(f"cannot open module {path}: {err.strerror}")
            continue
        try:
            if _libc.syscall(number, fd, b"", 0) != 0:
                err_no = ctypes.get_errno()
                if err_no != errno.EEXIST:
                    log.append(f"finit_module {os.path.basename(path)}: {os.strerror(err_no)}")
                    continue
            loaded += 1
        finally:
            os.close(fd)
    return loaded


def disable_ctrl_alt_del() -> None:
    """Make Ctrl-Alt-Del send SIGINT to PID 1 instead of rebooting at once (reboot(2)).

    The VM launcher presses it over QMP (``send-key``) to ask for a clean power-off: the
    cloud kernel has i8042/atkbd built in, so this needs no module and no ACPI daemon.
    """
    _check(
        _libc.reboot(ctypes.c_int(LINUX_REBOOT_CMD_CAD_OFF)),
        "reboot(CAD_OFF)",
    )


def power_off() -> None:
    """sync(2), then reboot(LINUX_REBOOT_CMD_POWER_OFF): QEMU exits. Returns only on error."""
    os.sync()
    _check(_libc.reboot(ctypes.c_int(LINUX_REBOOT_CMD_POWER_OFF)), "reboot(POWER_OFF)")
