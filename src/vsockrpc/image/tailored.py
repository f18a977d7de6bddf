"""A guest kernel of our own: Debian's kernel source, configured for exactly this guest.

Debian's cloud kernel boots any cloud VM; under TCG it pays for that. Its first 1.5 s (guest
clock) patch 40 K ftrace sites and the alternatives of every driver, run ~1.7 s of initcalls
for hardware a vsockrpc guest never has, and leave virtio-blk and vsock as modules, so a
loader initramfs must insmod them before the root can be mounted. This kernel is built from
the same series' source package (``linux-source-<series>``, the cloud kernel's series, from the
same apt index) with the kernel's own tooling: ``make tinyconfig``, then
``scripts/kconfig/merge_config.sh`` with :data:`OPTIONS`, then ``olddefconfig``. Everything a
guest needs is built in, nothing is a module, and the kernel mounts the root itself
(``DEVTMPFS_MOUNT``), so the image needs no loader.

What it leaves out, a user's own guest may need (netfilter, overlayfs, FUSE, cgroups, USB, …):
the Debian kernel stays the default; this one is chosen with ``--kernel tailored``.

Measured (TCG, 1 vCPU, cold boots alternating, docs/system.md): the kernel runs ``init`` at
0.67 s of guest clock instead of 1.5 s plus 0.3 s of loader; a cold boot to the first answered
RPC took 2.95 s instead of 4.21 s.

Hand-rolled because Debian ships no minimal guest kernel and no tool builds one from a
fragment; the steps are the kernel's documented ones (Documentation/admin-guide/README.rst).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsockrpc.errors import ImageError
from vsockrpc.image import cache, debs, pvh
from vsockrpc.payload.spec import KERNELS

__all__ = ["KERNELS", "OPTIONS", "TailoredKernel", "build_tailored", "fragment", "missing_tools"]

FORMAT = 1  # bump when the build steps change in a way the inputs do not show
BUILD_TOOLS = {  # program → the Debian package that has it
    "make": "make",
    "gcc": "gcc",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "xz": "xz-utils",
}
LIBELF_HEADER = Path("/usr/include/gelf.h")  # objtool (x86-64) needs libelf-dev

# (option, value) merged over tinyconfig. A reason per group; olddefconfig adds what they select.
OPTIONS: tuple[tuple[str, str], ...] = (
    # -O2, not tinyconfig's -Os: at -Os gcc inlines memset/memcpy as `rep stosb`/`rep movsb`,
    # which TCG runs a byte at a time (hence -erms in vm/accel.py); poisoning the 820 KiB of
    # freed init memory alone took 0.25 s of every boot (the guest's RIP, sampled over QMP).
    ("CC_OPTIMIZE_FOR_PERFORMANCE", "y"),
    ("CC_OPTIMIZE_FOR_SIZE", "n"),
    # The machine: 64-bit, SMP for --cpus, entered at its PVH note (image/pvh.py, TCG and KVM).
    ("64BIT", "y"),
    ("SMP", "y"),
    ("NR_CPUS", "64"),
    ("HYPERVISOR_GUEST", "y"),
    ("PARAVIRT", "y"),
    ("PVH", "y"),
    ("HPET_TIMER", "y"),  # TSC calibration under TCG (the PIT one fails there)
    # q35: PCI(e) through ACPI (MMCONFIG, IRQ routing, power-off) and hot-plug for snapshots,
    # which unplug and re-plug the vsock device (vm/snapshot.py). QEMU's q35 offers hot-plug
    # through ACPI (its _OSC withholds native PCIe hot-plug), so HOTPLUG_PCI_ACPI does it;
    # native PCIe hot-plug too, for machines that grant it (that needs MSI, as does virtio's
    # own interrupt vectors).
    ("ACPI", "y"),
    ("PCI", "y"),
    ("PCI_MSI", "y"),
    ("PCIEPORTBUS", "y"),
    ("HOTPLUG_PCI", "y"),
    ("HOTPLUG_PCI_ACPI", "y"),
    ("HOTPLUG_PCI_PCIE", "y"),
    # The guest's devices, built in: root disk, vsock, serial console, wall clock.
    ("VIRTIO_MENU", "y"),
    ("VIRTIO", "y"),
    ("VIRTIO_PCI", "y"),
    ("BLOCK", "y"),
    ("BLK_DEV", "y"),
    ("VIRTIO_BLK", "y"),
    ("VSOCKETS", "y"),
    ("VIRTIO_VSOCKETS", "y"),
    ("TTY", "y"),
    ("SERIAL_8250", "y"),
    ("SERIAL_8250_CONSOLE", "y"),
    ("RTC_CLASS", "y"),
    ("RTC_HCTOSYS", "y"),
    ("RTC_DRV_CMOS", "y"),
    # Ctrl-Alt-Del from QMP (the launcher's graceful stop) arrives as keys: VT + AT keyboard.
    ("VT", "y"),
    ("INPUT", "y"),
    ("INPUT_KEYBOARD", "y"),
    ("KEYBOARD_ATKBD", "y"),
    ("SERIO", "y"),
    ("SERIO_I8042", "y"),
    # No mouse: probing the PS/2 mouse took 0.4 s of every TCG boot.
    ("INPUT_MOUSE", "n"),
    ("INPUT_MOUSEDEV", "n"),
    # The root: ext4, mounted by the kernel (no loader), devtmpfs on /dev for PID 1.
    ("EXT4_FS", "y"),
    ("DEVTMPFS", "y"),
    ("DEVTMPFS_MOUNT", "y"),
    ("BLK_DEV_INITRD", "y"),  # the launcher always passes an initrd (empty for this kernel)
    # What PID 1, the agent, Python and grpcio use: sockets (Unix, TCP for forwards, IPv6 for
    # users' servers), epoll/eventfd/timerfd/signalfd, futexes, shared memory and tmpfs, PTYs
    # for the shell, file locks, inotify, SysV and POSIX IPC for users' programs.
    ("NET", "y"),
    ("UNIX", "y"),
    ("INET", "y"),
    ("IPV6", "y"),
    ("MULTIUSER", "y"),
    ("FUTEX", "y"),
    ("EPOLL", "y"),
    ("SIGNALFD", "y"),
    ("TIMERFD", "y"),
    ("EVENTFD", "y"),
    ("SHMEM", "y"),
    ("TMPFS", "y"),
    ("AIO", "y"),
    ("ADVISE_SYSCALLS", "y"),
    ("MEMBARRIER", "y"),
    ("RSEQ", "y"),
    ("FILE_LOCKING", "y"),
    ("FHANDLE", "y"),
    ("INOTIFY_USER", "y"),
    ("SYSVIPC", "y"),
    ("POSIX_MQUEUE", "y"),
    ("PROC_FS", "y"),
    ("PROC_SYSCTL", "y"),
    ("SYSFS", "y"),
    ("BINFMT_ELF", "y"),
    ("BINFMT_SCRIPT", "y"),
    ("UNIX98_PTYS", "y"),
    ("LEGACY_PTYS", "n"),  # 256 BSD pty pairs: 48 ms of initcalls under TCG
    ("PRINTK", "y"),
    ("BUG", "y"),
    # Nothing loads modules into this kernel; nothing it lacks can be added at run time.
    ("MODULES", "n"),
)

Step = Callable[[str], AbstractContextManager[Any]]


@dataclass(frozen=True, slots=True)
class TailoredKernel:
    """A built kernel in the cache: the PVH ELF, the bzImage, and what they came from."""

    version: str  # uname -r, e.g. "6.12.118"
    source: str  # "linux-source-6.12 6.12.118-1~deb12u1"
    vmlinux: Path
    bzimage: Path
    config: Path


def fragment() -> str:
    """:data:`OPTIONS` as a Kconfig fragment (``n`` written as ``# CONFIG_X is not set``)."""
    lines = [
        f"# CONFIG_{name} is not set" if value == "n" else f"CONFIG_{name}={value}"
        for name, value in OPTIONS
    ]
    return "\n".join(lines) + "\n"


def not_taken(config: str) -> list[str]:
    """The options of :data:`OPTIONS` that the final ``.config`` does not hold as asked (a
    dependency Kconfig refused): the build stops on them rather than boot a guest without."""
    have: dict[str, str] = {}
    for line in config.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            have[name.removeprefix("CONFIG_")] = value
    return [f"CONFIG_{name}={value}" for name, value in OPTIONS if have.get(name, "n") != value]


def missing_tools() -> list[str]:
    """Debian packages the build needs and this machine lacks (empty: it can build)."""
    missing = sorted({pkg for prog, pkg in BUILD_TOOLS.items() if shutil.which(prog) is None})
    if not LIBELF_HEADER.is_file():
        missing.append("libelf-dev")
    return missing


def series_of(version: str) -> str:
    """``6.12`` from a kernel release such as ``6.12.95+deb12-cloud-amd64``."""
    parts = version.split(".")
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ImageError(f"cannot tell the series of kernel {version!r}")
    return f"{parts[0]}.{parts[1]}"


def _gcc_version() -> str:
    out = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def build_tailored(
    series: str,
    *,
    index: debs.AptIndex,
    step: Step,
    cache_root: Path | None = None,
) -> TailoredKernel:
    """The tailored kernel of ``series`` (``6.12``) from ``index``: cached, else built (about
    5 minutes on 2 cores; the source tree, ~1.5 GB, is removed afterwards)."""
    arch = debs.host_arch()
    if arch != "amd64":  # OPTIONS and the build's paths are x86-64's
        raise ImageError(f"the tailored kernel is built for amd64 guests only, not {arch}")
    missing = missing_tools()
    if missing:
        raise ImageError(
            f"building the tailored kernel needs {', '.join(missing)}",
            hint=f"apt-get install {' '.join(missing)} (scripts/setup does, as root)",
        )
    pkg = debs.resolve(f"linux-source-{series}", index)
    inputs = {
        "format": FORMAT,
        "source": pkg.sha256,
        "fragment": fragment(),
        "gcc": _gcc_version(),
    }
    key = cache.digest(inputs)
    entry = cache.entry("kernels", key, root=cache_root)
    with entry.lock():
        if not entry.exists:
            with step(f"tailored kernel from {pkg.name} {pkg.version} (minutes, once)"):
                src_root = debs.unpack(pkg, root=cache_root, index=index)
                with entry.build() as out:
                    tarball = src_root / "usr/src" / f"{pkg.name}.tar.xz"
                    _build(tarball, out)
                    meta = json.loads((out / "kernel.json").read_text())
                    meta["source"] = f"{pkg.name} {pkg.version}"
                    (out / "kernel.json").write_text(json.dumps(meta, sort_keys=True) + "\n")
        cache.touch(entry.path)
    meta = json.loads((entry.path / "kernel.json").read_text())
    return TailoredKernel(
        version=meta["version"],
        source=meta["source"],
        vmlinux=entry.path / "vmlinux",
        bzimage=entry.path / "bzImage",
        config=entry.path / "config",
    )


def _build(tarball: Path, out: Path) -> None:
    """Configure and build the kernel of ``tarball`` into ``out`` (vmlinux, bzImage, config,
    kernel.json, build.log). The tree lives in a temporary directory inside ``out`` (the cache
    entry being built), removed on return, on an error and on Ctrl-C (SIGTERM/SIGHUP too where
    the CLI turns them into that); after a SIGKILL the next build of the key removes it with
    the entry's leftover directory (:meth:`cache.Entry.build`). The build tools die with this
    process (``setpriv --pdeathsig``)."""
    if not tarball.is_file():
        raise ImageError(f"{tarball.name} is not in its package")
    log = out / "build.log"
    die_with_us = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
    with (
        tempfile.TemporaryDirectory(prefix="src-", dir=out) as tmp,
        log.open("wb") as log_f,
    ):
        src, obj = Path(tmp) / "src", Path(tmp) / "obj"
        src.mkdir()

        def run(argv: list[str], what: str) -> str:
            proc = subprocess.Popen(
                [*die_with_us, *argv],
                cwd=src,
                stdout=subprocess.PIPE,
                stderr=log_f,
                start_new_session=True,  # its own group: stopped as one (make and its jobs)
            )
            try:
                stdout, _ = proc.communicate()
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            log_f.write(stdout)
            if proc.returncode != 0:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise ImageError(f"tailored kernel: {what} failed: {tail[0]}")
            return stdout.decode(errors="replace")

        run(["tar", "-xf", str(tarball), "-C", str(src), "--strip-components=1"], "unpacking")
        (Path(tmp) / "vsockrpc.config").write_text(fragment())
        make = ["make", f"O={obj}", "ARCH=x86_64"]
        run([*make, "tinyconfig"], "make tinyconfig")
        merge = ["scripts/kconfig/merge_config.sh", "-m", "-O", str(obj)]
        run([*merge, str(obj / ".config"), str(Path(tmp) / "vsockrpc.config")], "merge_config")
        run([*make, "olddefconfig"], "make olddefconfig")
        refused = not_taken((obj / ".config").read_text())
        if refused:
            raise ImageError(f"tailored kernel: Kconfig refused {', '.join(refused)}")
        run([*make, f"-j{os.cpu_count() or 1}", "bzImage"], "make bzImage")
        version = run([*make, "-s", "kernelrelease"], "make kernelrelease").strip()
        if not pvh.has_pvh_note((obj / "vmlinux").read_bytes()):
            raise ImageError("tailored kernel: the built vmlinux has no PVH entry note")
        shutil.copyfile(obj / "vmlinux", out / "vmlinux")
        shutil.copyfile(obj / "arch/x86/boot/bzImage", out / "bzImage")
        shutil.copyfile(obj / ".config", out / "config")
        (out / "kernel.json").write_text(json.dumps({"version": version}) + "\n")
