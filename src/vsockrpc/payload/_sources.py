"""Which parts of vsockrpc go into a guest.

One declared list, :data:`GUEST_PARTS`, names the top-level subpackages and modules of
``vsockrpc`` that run in the guest; every ``.py`` file under them (and the package's own
``__init__.py``) ships, nothing else. Host-only layers (cli, vm, image, vhost, sdk, payload,
bundle) stay out, so editing them changes neither the image key nor the bundle.
``tests/unit/test_payload_closure.py`` computes what :data:`ENTRY_MODULE` imports,
transitively, and fails when that leaves the list.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from vsockrpc.errors import PayloadError

__all__ = ["ENTRY_MODULE", "GUEST_PARTS", "SourceFile", "package_dir", "source_files"]

PACKAGE = "vsockrpc"
# What runs in the guest (ARCHITECTURE.md: guest → services → the agent contract, rpc → transport,
# proto, plus the shared leaves). A module moved into a new top-level package is added here, and
# only here.
GUEST_PARTS = (
    "addresses",
    "vsock_constants",
    "errors",
    "_fdlimit",
    "_stopsignals",
    "agent",
    "guest",
    "services",
    "rpc",
    "transport",
    "proto",
)
# The module the guest runs: PID 1 (``init=``) or the agent alone (``--listen``); its ``main``
# is what the image's init script and the bundle's bootstrap call.
ENTRY_MODULE = "vsockrpc.guest.__main__"


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file of the payload: ``dest`` relative to site-packages (``vsockrpc/rpc/x.py``)."""

    dest: str
    source: Path

    def read(self) -> bytes:
        return self.source.read_bytes()

    def digest(self) -> str:
        return hashlib.sha256(self.read()).hexdigest()


def package_dir() -> Path:
    """The directory this ``vsockrpc`` is imported from (a checkout or an installed wheel)."""
    return Path(__file__).resolve().parents[1]


def _part_files(base: Path, part: str) -> list[Path]:
    directory = base / part
    if (directory / "__init__.py").is_file():
        return sorted(
            p
            for p in directory.rglob("*.py")
            if "__pycache__" not in p.relative_to(directory).parts
        )
    module = base / f"{part}.py"
    if module.is_file():
        return [module]
    raise PayloadError(f"guest part {PACKAGE}.{part} does not exist in {base}")


def source_files(parts: tuple[str, ...] = GUEST_PARTS) -> tuple[SourceFile, ...]:
    """The package's ``__init__.py`` and every ``.py`` file of ``parts``, sorted by ``dest``."""
    base = package_dir()
    paths = [base / "__init__.py"]
    for part in parts:
        paths += _part_files(base, part)
    files = {f"{PACKAGE}/{p.relative_to(base).as_posix()}": p for p in paths}
    return tuple(SourceFile(dest, files[dest]) for dest in sorted(files))
