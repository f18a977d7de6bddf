"""Debian's cloud kernel for the host architecture, fetched once into the cache.

``linux-image-cloud-<arch>`` suits a small VM: ext4 and virtio-pci are built in, while
virtio-blk and the vsock transports are modules (GUEST-BOOT.md), so a guest needs only a
handful of modules next to the kernel.

It comes from the host release's backports (``<codename>-backports``: 6.12 for bookworm) when
that suite has it, else from the host's own index (6.1 on bookworm). Linux 6.11 made the guest
send a vsock packet from the caller when nothing is queued instead of waking a worker
("vsock/virtio: avoid queuing packets when intermediate queue is empty"); the 64-byte round
trip through our device took 0.68 of 6.1's time (docs/device.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vsockrpc.errors import ImageError
from vsockrpc.image import debs, mirror

__all__ = ["Kernel", "fetch_kernel", "kernel_index"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Kernel:
    """An unpacked kernel package: ``vmlinuz`` and its ``modules_dir`` (``lib/modules/<ver>``)."""

    version: str  # uname -r, e.g. "6.12.95+deb12-cloud-amd64"
    package: debs.DebPackage
    vmlinuz: Path
    modules_dir: Path
    arch: str


def kernel_index(cache_root: Path | None = None) -> debs.AptIndex:
    """The index of the host release's backports, or the host's own when it has none.

    A host whose apt names no Debian mirror for its codename (a derivative), or whose backports
    cannot be fetched and were never fetched before, keeps its own kernel; a log line says so.
    """
    codename = mirror.host_codename()
    line = mirror.backports_line(mirror.host_sources(), codename)
    if line is None:
        log.info(
            "guest kernel: no Debian mirror for %s-backports; using the host's index", codename
        )
        return debs.HOST_INDEX
    try:
        return debs.private_index(line, root=cache_root)
    except ImageError as err:
        log.warning("guest kernel: %s; using the host's index", err)
        return debs.HOST_INDEX


def fetch_kernel(*, arch: str | None = None, cache_root: Path | None = None) -> Kernel:
    """Fetch (or reuse) the kernel ``linux-image-cloud-<arch>`` currently depends on."""
    arch = arch or debs.host_arch()
    meta = f"linux-image-cloud-{arch}"
    index = kernel_index(cache_root)
    try:
        pkg = debs.resolve(debs.resolve_dependency(meta, "linux-image-", index), index)
    except ImageError:
        if index == debs.HOST_INDEX:
            raise
        log.warning("guest kernel: backports have no %s; using the host's index", meta)
        index = debs.HOST_INDEX
        pkg = debs.resolve(debs.resolve_dependency(meta, "linux-image-", index), index)
    root = debs.unpack(pkg, root=cache_root, index=index)
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise ImageError(f"{pkg.name} holds {len(images)} kernel images under /boot, expected 1")
    version = images[0].name.removeprefix("vmlinuz-")
    # Debian ships modules under /lib before the merged-/usr move (6.1) and /usr/lib after.
    modules = next(
        (
            d
            for d in (root / "usr/lib/modules" / version, root / "lib/modules" / version)
            if d.is_dir()
        ),
        root / "lib/modules" / version,
    )
    if not (modules / "modules.order").is_file():
        raise ImageError(f"{pkg.name}: no modules.order under {modules}")
    return Kernel(version, pkg, images[0], modules, arch)
