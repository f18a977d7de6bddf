"""Debian's cloud kernel from the host release's backports through apt (cached), and the
modules a guest needs."""

from __future__ import annotations

import pytest

from vsockrpc.image import fetch_kernel, mirror
from vsockrpc.image.modules import installed_path, load_order, modinfo, module_bytes

pytestmark = pytest.mark.timeout(600)  # the first fetch downloads ~27 MB


def test_kernel_is_fetched_once_and_has_the_guest_modules() -> None:
    kernel = fetch_kernel()
    assert kernel.vmlinuz.is_file() and kernel.vmlinuz.stat().st_size > 1_000_000
    assert kernel.modules_dir.name == kernel.version
    assert "cloud" in kernel.version
    again = fetch_kernel()
    assert again == kernel  # same cache entry, no second download
    if mirror.backports_line(mirror.host_sources(), mirror.host_codename()) is not None:
        assert "~bpo" in kernel.package.version  # backports: vsock sends without a worker hop
    order = load_order(kernel.modules_dir)
    names = [installed_path(p, kernel.modules_dir).rsplit("/", 1)[-1][:-3] for p in order]
    # every module after all of its dependencies
    for i, name in enumerate(names):
        deps = modinfo(order[i]).get("depends", "")
        for dep in filter(None, deps.split(",")):
            assert names.index(dep) < i, f"{name} loaded before its dependency {dep}"
        assert module_bytes(order[i]).startswith(b"\x7fELF")
    builtin = (kernel.modules_dir / "modules.builtin").read_text()
    for needed in (
        "virtio_pci",
        "virtio_blk",
        "vsock",
        "vmw_vsock_virtio_transport",
        "vsock_loopback",
    ):
        assert needed in names or f"/{needed}.ko" in builtin
    assert "vmw_vsock_vmci_transport" not in names  # only what the guest needs
    assert len(names) == len(set(names)) <= 11
