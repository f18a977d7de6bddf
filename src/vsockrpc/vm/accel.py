"""Choosing the accelerator: KVM only when it really boots a kernel, else TCG.

``/dev/kvm`` existing is not enough: on a nested host (GUEST-BOOT.md) a stock Debian kernel
hangs right after "Probing EDD". So the kernel about to be used is booted once under KVM with
no root filesystem: a working KVM reaches the "VFS: Unable to mount root fs" panic and QEMU
exits (``panic=-1 -no-reboot``) in well under a second; a broken one is killed at the
deadline. The verdict is cached per (kernel, QEMU, host kernel) in the cache directory, so the
probe costs its few seconds once. ``$VSOCKRPC_ACCEL=kvm|tcg`` overrides it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Accel", "choose_accel", "kvm_boots"]

log = logging.getLogger(__name__)
PROBE_DEADLINE = 6.0


@dataclass(frozen=True, slots=True)
class Accel:
    name: str  # "kvm" or "tcg"
    cpu: str  # "-cpu" value
    reason: str


TCG = "tcg"
KVM = "kvm"


def _kvm_device_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def kvm_boots(qemu: str, kernel: Path, *, deadline: float = PROBE_DEADLINE) -> bool:
    """Boot ``kernel`` under KVM without a root fs; True when it panics (exits) in time."""
    argv = [
        qemu,
        "-machine",
        "q35",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "256",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        str(kernel),
        "-append",
        "console=ttyS0 panic=-1 root=/dev/null",
    ]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=deadline, check=False)
    except subprocess.TimeoutExpired:
        log.info("KVM probe: kernel did not finish booting in %.0f s", deadline)
        return False
    booted = b"Kernel panic" in proc.stdout or b"VFS:" in proc.stdout
    log.info("KVM probe: exit %d, reached the root mount: %s", proc.returncode, booted)
    return booted


# TCG CPU model: ``max`` for RDRAND (GUEST-BOOT.md pitfall 1: without it the entropy pool takes
# ~5 s), minus ERMS/FSRM: with them the guest kernel copies with ``rep movsb``, which TCG
# emulates byte by byte; without them it uses ``rep movsq``/unrolled copies, 2-3x faster for
# every socket, pipe and file copy in the guest (measured with the agent's transfer bench).
# Minus CX16: under QEMU 7.2's TCG (Debian bookworm) a ``cmpxchg16b %gs:(…)`` now and then
# leaves EFLAGS garbage (the oops shows the low half of RAX there, one instruction after it),
# and Linux 6.12's SLUB fast path runs that instruction on every allocation: 11 boots in 99 of
# the 6.12 cloud kernel oopsed in the slab allocator, 0 in 90 without CX16 (docs/device.md).
# Without CX16 SLUB takes its locked path; x86-64 baseline code never needs the instruction.
TCG_CPU = "max,-erms,-fsrm,-cx16"


def choose_accel(qemu: str, kernel: Path, verdict_dir: Path | None) -> Accel:
    """KVM with ``-cpu host`` when it boots ``kernel``, else TCG with :data:`TCG_CPU`."""
    tcg = Accel(TCG, TCG_CPU, "")
    forced = os.environ.get("VSOCKRPC_ACCEL", "").lower()
    if forced == TCG:
        return Accel(TCG, TCG_CPU, "VSOCKRPC_ACCEL=tcg")
    if not _kvm_device_usable():
        return Accel(TCG, TCG_CPU, "/dev/kvm not usable")
    if forced == KVM:
        return Accel(KVM, "host", "VSOCKRPC_ACCEL=kvm")
    key = hashlib.sha256(
        f"{kernel.stat().st_size}:{kernel.stat().st_mtime_ns}:{qemu}:{os.uname().release}".encode()
    ).hexdigest()[:24]
    verdict_file = verdict_dir / f"kvm-{key}" if verdict_dir is not None else None
    if verdict_file is not None and verdict_file.is_file():
        works = verdict_file.read_text().strip() == "works"
    else:
        works = kvm_boots(qemu, kernel)
        if verdict_file is not None:
            verdict_file.parent.mkdir(parents=True, exist_ok=True)
            verdict_file.write_text("works\n" if works else "hangs\n")
    if works:
        return Accel(KVM, "host", "KVM boots the guest kernel")
    return Accel(tcg.name, tcg.cpu, "KVM present but the guest kernel hangs under it")
