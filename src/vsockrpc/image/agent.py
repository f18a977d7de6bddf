"""Installing vsockrpc itself (the agent) into the guest rootfs.

The guest-side part of the package is copied from wherever this process imports it (a checkout
or a wheel), minus bytecode caches: the top-level modules and the subpackages in
:data:`GUEST_SUBPACKAGES`. Host-only layers (cli, vm, image, vhost, sdk) stay out, so editing
them does not rebuild the image; the digest of what is copied is part of the image key.
The guest starts it through ``/usr/local/bin/vsockrpc-init`` (``init=`` on the kernel command
line, like the original's ``init=/opt/server``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import vsockrpc
from vsockrpc.image import cache

__all__ = [
    "GUEST_SUBPACKAGES",
    "INIT_PATH",
    "INIT_SCRIPT",
    "agent_digest",
    "install_agent",
    "package_dir",
]

# What runs in the guest (ARCHITECTURE.md: guest → services → rpc → transport, proto).
GUEST_SUBPACKAGES = ("guest", "services", "rpc", "transport", "proto")

INIT_PATH = "/usr/local/bin/vsockrpc-init"
# -u: the console gets every line at once; -I: ignore PYTHON* variables and the CWD; -S: no
# `site` (its import and .pth scan are slow under TCG), so the one directory it would
# add — where the agent and the wheels live — is put on sys.path here ({site}, from the base).
INIT_SCRIPT = """#!/usr/bin/python3 -uIS
import sys
sys.path.append({site!r})
from vsockrpc.guest.__main__ import main
sys.exit(main())
"""


def package_dir() -> Path:
    return Path(vsockrpc.__file__).resolve().parent


def _top_level_files() -> list[Path]:
    return sorted(
        p for p in package_dir().iterdir() if p.is_file() and p.suffix in (".py", ".typed")
    )


def agent_digest() -> str:
    base = package_dir()
    parts = {p.name: cache.file_digest(p) for p in _top_level_files()}
    parts.update({name: cache.tree_digest(base / name) for name in GUEST_SUBPACKAGES})
    return cache.digest({"package": parts, "init": INIT_SCRIPT})


def install_agent(root: Path, site_packages: Path) -> None:
    """Copy the guest side of vsockrpc into ``site_packages`` and write the init script."""
    dest = site_packages / "vsockrpc"
    dest.mkdir(parents=True)
    for path in _top_level_files():
        shutil.copy2(path, dest / path.name)
    for name in GUEST_SUBPACKAGES:
        shutil.copytree(
            package_dir() / name,
            dest / name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    init = root / INIT_PATH.lstrip("/")
    init.parent.mkdir(parents=True, exist_ok=True)
    init.write_text(INIT_SCRIPT.format(site="/" + site_packages.relative_to(root).as_posix()))
    init.chmod(0o755)
