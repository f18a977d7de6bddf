"""Debian's cloud kernel through the host's apt (cached), and the modules a guest needs."""

from __future__ import annotations

import pytest

from vsockrpc.image import fetch_kernel
from vsockrpc.image.modules import load_order, modinfo

pytestmark = pytest.mark.timeout(600)  # the first fetch downloads ~27 MB


def test_kernel_is_fetched_once_and_has_the_guest_modules() -> None:
    kernel = fetch_kernel()
    assert kernel.vmlinuz.is_file() and kernel.vmlinuz.stat().st_size > 1_000_000
    assert kernel.modules_dir.name == kernel.version
    assert "cloud" in kernel.version
    again = fetch_kernel()
    assert again == kernel  # same cache entry, no second download
    names = [p.name.removesuffix(".ko") for p in load_order(kernel.modules_dir)]
    # every module after all of its dependencies
    for i, name in enumerate(names):
        deps = modinfo(load_order(kernel.modules_dir)[i]).get("depends", "")
        for dep in filter(None, deps.split(",")):
            assert names.index(dep) < i, f"{name} loaded before its dependency {dep}"
    for needed in (
        "virtio_pci",
        "virtio_blk",
        "vsock",
        "vmw_vsock_virtio_transport",
        "vsock_loopback",
    ):
        assert needed in names
    assert "vmw_vsock_vmci_transport" not in names  # only what the guest needs
    assert len(names) == len(set(names)) == 11
