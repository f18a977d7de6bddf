"""Debian's cloud kernel for the host architecture, fetched once into the cache.

``linux-image-cloud-<arch>`` (6.1 on bookworm) suits a small VM: ext4 is built in, while
virtio-pci/blk and the vsock transports are modules (GUEST-BOOT.md), so a guest needs only a
handful of ``.ko`` files next to the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vsockrpc.errors import ImageError
from vsockrpc.image import debs

__all__ = ["Kernel", "fetch_kernel"]


@dataclass(frozen=True, slots=True)
class Kernel:
    """An unpacked kernel package: ``vmlinuz``, its ``modules_dir`` (``lib/modules/<version>``)."""

    version: str  # uname -r, e.g. "6.1.0-56-cloud-amd64"
    package: debs.DebPackage
    vmlinuz: Path
    modules_dir: Path
    arch: str


def fetch_kernel(*, arch: str | None = None, cache_root: Path | None = None) -> Kernel:
    """Fetch (or reuse) the kernel ``linux-image-cloud-<arch>`` currently depends on."""
    arch = arch or debs.host_arch()
    meta = f"linux-image-cloud-{arch}"
    pkg = debs.resolve(debs.resolve_dependency(meta, "linux-image-"))
    root = debs.unpack(pkg, root=cache_root)
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise ImageError(f"{pkg.name} holds {len(images)} kernel images under /boot, expected 1")
    version = images[0].name.removeprefix("vmlinuz-")
    modules = root / "lib" / "modules" / version
    if not (modules / "modules.order").is_file():
        raise ImageError(f"{pkg.name}: no modules.order under {modules}")
    return Kernel(version, pkg, images[0], modules, arch)
