"""Guest RAM as a file of its own in a snapshot, so a clone's RAM is copied, not parsed.

A guest on the userspace vsock device has its RAM in a shared memfd (``memory-backend-memfd,
share=on``: the device process maps it). With QEMU's ``x-ignore-shared`` migration capability
that RAM is left out of the migration stream: the snapshot copies it itself, while the guest
is stopped, from QEMU's memfd (``/proc/PID/fd``) into ``ram.bin``, a sparse file holding
only the pages that are not zero. A clone gets a fresh memfd filled from ``ram.bin`` by the
kernel (``sendfile``, data extents only: ``SEEK_DATA``/``SEEK_HOLE``), handed to its QEMU as
``memory-backend-file,mem-path=/proc/self/fd/N,share=on``; the migration stream then loads
only device state. A private mapping of ``ram.bin`` (Kata's VM templating) would copy pages
lazily, but a vhost-user device maps guest RAM through the fd QEMU sends it and would then
see the file, not the guest's writes: with this device every clone needs its own copy.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from vsockrpc.errors import VmError

__all__ = [
    "RamFill",
    "compress",
    "fill",
    "fill_memfd",
    "find_guest_ram",
    "new_memfd",
    "save_sparse",
]

ZSTD_SUFFIX = ".zst"

PAGE = 4096
CHUNK = 1 << 20
_ZERO_PAGE = bytes(PAGE)
_ZERO_CHUNK = bytes(CHUNK)


def find_guest_ram(qemu_pid: int, size: int) -> Path:
    """The ``/proc`` path of QEMU's memfd of ``size`` bytes (the guest's RAM)."""
    fds = Path(f"/proc/{qemu_pid}/fd")
    try:
        entries = list(fds.iterdir())
    except OSError as err:
        raise VmError(f"cannot list QEMU's open files: {err}") from err
    for entry in entries:
        with contextlib.suppress(OSError):
            if os.readlink(entry).startswith("/memfd:") and entry.stat().st_size == size:
                return entry
    raise VmError(f"QEMU (pid {qemu_pid}) holds no memfd of {size} bytes (its guest RAM)")


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the data in a file with holes (all of it where SEEK_DATA is not
    supported)."""
    extents: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # no data after offset
                break
            if err.errno == errno.EINVAL:
                return [(0, size)]
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end - start))
        offset = end
    return extents


def save_sparse(source: Path, target: Path, size: int) -> int:
    """Copy ``size`` bytes of ``source`` to a new file ``target``, writing only the pages that
    are not zero (the others stay holes); bytes of data written. VmError when it cannot
    (disk full): the saving of RAM is the migration's, so it is reported as its failure."""
    try:
        return _save_sparse(source, target, size)
    except OSError as err:
        raise VmError(
            f"migration failed: guest RAM not saved to {target}: {err.strerror or err}"
        ) from err


def _save_sparse(source: Path, target: Path, size: int) -> int:
    written = 0
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            for start, length in _data_extents(src, size):
                offset, end = start, start + length
                while offset < end:
                    chunk = os.pread(src, min(CHUNK, end - offset), offset)
                    if not chunk:
                        raise VmError(f"guest RAM ends early at {offset} of {size} bytes")
                    if chunk != _ZERO_CHUNK[: len(chunk)]:
                        for i in range(0, len(chunk), PAGE):
                            page = chunk[i : i + PAGE]
                            if page != _ZERO_PAGE[: len(page)]:
                                os.pwrite(dst, page, offset + i)
                                written += len(page)
                    offset += len(chunk)
            os.ftruncate(dst, size)
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return written


def _zstd() -> str:
    path = shutil.which("zstd")
    if path is None:
        raise VmError(
            "zstd is not installed (a compressed snapshot needs it): apt-get install zstd"
        )
    return path


def compress(ram_file: Path) -> Path:
    """``ram_file`` compressed with zstd (fast level) to ``ram_file.zst``, then removed."""
    target = ram_file.with_name(ram_file.name + ZSTD_SUFFIX)
    done = subprocess.run(
        [_zstd(), "-1", "-q", "-T0", "-o", str(target), str(ram_file)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        target.unlink(missing_ok=True)
        last = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise VmError(f"compressing the guest RAM failed: {last[0]}")
    ram_file.unlink()
    return target


def _decompress_into(ram_file: Path, fd: int) -> None:
    """zstd writes the RAM into ``fd``, seeking over zero runs (``--sparse``)."""
    done = subprocess.run(
        [_zstd(), "-d", "-q", "--sparse", "-c", str(ram_file)],
        stdin=subprocess.DEVNULL,
        stdout=fd,
        stderr=subprocess.PIPE,
        check=False,
    )
    if done.returncode != 0:
        last = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise VmError(f"{ram_file}: cannot decompress: {last[0]}")


def new_memfd(size: int, name: str) -> int:
    """A new, empty memfd of ``size`` bytes; the caller owns the fd (it is inheritable: QEMU
    opens it by /proc path)."""
    fd = os.memfd_create(name, 0)  # no MFD_CLOEXEC: handed to QEMU with pass_fds
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fill(ram_file: Path, fd: int, size: int) -> None:
    """Write ``ram_file`` into the empty file ``fd`` (copied by the kernel, holes left as
    holes; a ``.zst`` file is decompressed by zstd)."""
    if ram_file.name.endswith(ZSTD_SUFFIX):
        _decompress_into(ram_file, fd)
        return
    src = os.open(ram_file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start, length in _data_extents(src, size):
            os.lseek(fd, start, os.SEEK_SET)
            offset, end = start, start + length
            while offset < end:
                sent = os.sendfile(fd, src, offset, end - offset)
                if sent == 0:
                    raise VmError(f"{ram_file} ends early at {offset} of {size} bytes")
                offset += sent
    finally:
        os.close(src)


def fill_memfd(ram_file: Path, size: int, name: str) -> int:
    """A new memfd of ``size`` bytes holding ``ram_file`` (:func:`new_memfd` + :func:`fill`)."""
    fd = new_memfd(size, name)
    try:
        fill(ram_file, fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class RamFill:
    """A clone's RAM memfd, filled from a snapshot's RAM file in a thread while its QEMU
    starts (QEMU does not touch guest RAM before the state is loaded: an empty memfd stays
    empty until then); :meth:`close` once QEMU has mapped it (our copy of the fd)."""

    fd: int | None = None
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def start_fill(self, ram_file: Path, size: int, name: str) -> None:
        """Create the memfd (``fd``, for QEMU) and start filling it."""
        fd = self.fd = new_memfd(size, name)

        def run() -> None:
            try:
                fill(ram_file, fd, size)
            except BaseException as err:  # raised by wait_filled(), on the restoring thread
                self._error = err

        self._thread = threading.Thread(target=run, name=f"vsockrpc-{name}", daemon=True)
        self._thread.start()

    def wait_filled(self) -> None:
        """Until it is filled; VmError when that failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, VmError):
                raise error
            raise VmError(f"cannot copy the snapshot's guest RAM: {error!r}") from error

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()  # never close the fd under the filling thread
            self._thread = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
