"""Guest images: Debian rootfs, cloud kernel + the few modules a guest needs, a loader
initramfs, the agent, all in a content-addressed cache.

Public surface::

    fetch_kernel() -> Kernel            # Debian's cloud kernel for the host arch (cached)
    build_image(...) -> ImageInfo       # the whole bootable image (cached)
    find_image(path) -> ImageInfo       # an already built image directory, validated
"""

from __future__ import annotations

from vsockrpc.image.build import ImageInfo, build_image, export_image, find_image
from vsockrpc.image.kernel import Kernel, fetch_kernel

__all__ = ["ImageInfo", "Kernel", "build_image", "export_image", "fetch_kernel", "find_image"]
