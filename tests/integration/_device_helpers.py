"""The in-process device the device tests drive: short socket paths and a served device."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from vsockrpc.vhost import VsockDevice
from vsockrpc.vhost.testing import serving


@contextlib.contextmanager
def short_paths(prefix: str) -> Iterator[tuple[str, str]]:
    """A vhost-user and a hybrid socket path in a fresh directory under /tmp, removed after:
    short, because ``<uds>_<port>`` must fit sun_path (108 bytes)."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        yield os.path.join(d, "vhost.sock"), os.path.join(d, "vm.vsock")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def served_device(paths: tuple[str, str], cid: int) -> Iterator[VsockDevice]:
    """A device for guest ``cid`` on ``paths``, served in a thread until the block ends."""
    vpath, upath = paths
    with VsockDevice(vhost_socket=vpath, uds_path=upath, guest_cid=cid) as dev, serving(dev):
        yield dev
