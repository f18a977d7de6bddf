"""What goes into a guest: one builder, two output formats.

A :class:`Payload` is the complete list of what a guest needs from the host's build: the
distributions with their pins (:mod:`._pins`: constraints.txt, else the installed versions),
their wheels for the guest's interpreter (:mod:`._wheels`: pip, one content-addressed cache),
and the parts of vsockrpc that run there (:mod:`._sources`: one declared list). The two output
formats take it as it is:

* the guest image (:mod:`vsockrpc.image`) installs :meth:`Payload.wheels` into the rootfs and
  lays :meth:`Payload.write_sources` into its site-packages, keyed by :attr:`Payload.pins` and
  :meth:`Payload.source_digest`;
* the single-file bundle (:mod:`vsockrpc.bundle`) zips the same sources and the wheel sets of
  several Pythons.

Public surface::

    guest_payload() -> Payload            # what vsockrpc's own guest side needs
    Payload.requirements                  # ["grpcio==1.85.3", ...]
    Payload.wheels(Target(python, machine), cache_root=, find_links=, offline=) -> WheelSet
    Payload.sources / source_digest() / write_sources(site_packages)
    run_pip(args, what)                   # the one pip wrapper (the image's install uses it)

This layer imports only :mod:`vsockrpc.errors`. User packages and services (an image spec)
extend a payload: more requirements, more sources, more entry points, same two outputs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vsockrpc.payload._pins import (
    GUEST_DISTRIBUTIONS,
    constraints_file,
    normalize,
    pinned_versions,
)
from vsockrpc.payload._sources import (
    ENTRY_MODULE,
    GUEST_PARTS,
    SourceFile,
    package_dir,
    source_files,
)
from vsockrpc.payload._wheels import (
    Target,
    WheelSet,
    default_cache_root,
    resolve_wheels,
    run_pip,
)

__all__ = [
    "ENTRY_MODULE",
    "GUEST_DISTRIBUTIONS",
    "GUEST_PARTS",
    "Payload",
    "SourceFile",
    "Target",
    "WheelSet",
    "constraints_file",
    "default_cache_root",
    "guest_payload",
    "normalize",
    "package_dir",
    "pinned_versions",
    "resolve_wheels",
    "run_pip",
    "source_files",
]


@dataclass(frozen=True)
class Payload:
    """What goes into a guest: pinned distributions, source files, the module it runs."""

    pins: Mapping[str, str]
    sources: tuple[SourceFile, ...] = field(repr=False)
    entry_module: str = ENTRY_MODULE

    @property
    def requirements(self) -> list[str]:
        """``name==version`` for every pin, in declaration order."""
        return [f"{name}=={version}" for name, version in self.pins.items()]

    def wheels(
        self,
        target: Target,
        *,
        cache_root: Path | None = None,
        find_links: Path | None = None,
        offline: bool = False,
    ) -> WheelSet:
        """The wheels of :attr:`requirements` for ``target`` (see :func:`resolve_wheels`)."""
        return resolve_wheels(
            self.requirements,
            target,
            cache_root=cache_root,
            find_links=find_links,
            offline=offline,
        )

    def source_digest(self) -> str:
        """A digest of every source file's destination and content (part of the image key)."""
        h = hashlib.sha256()
        for f in self.sources:
            h.update(f"{f.dest}\0{f.digest()}\0".encode())
        h.update(f"entry\0{self.entry_module}".encode())
        return h.hexdigest()

    def write_sources(self, site_packages: Path) -> None:
        """Lay the source files under ``site_packages`` (files 0644, directories 0755,
        whatever the umask or the checkout's modes)."""
        site_packages.mkdir(parents=True, exist_ok=True)
        for f in self.sources:
            dest = site_packages / f.dest
            for parent in reversed(dest.relative_to(site_packages).parents[:-1]):
                directory = site_packages / parent
                if not directory.is_dir():
                    directory.mkdir()
                    os.chmod(directory, 0o755)
            dest.write_bytes(f.read())
            os.chmod(dest, 0o644)


def guest_payload() -> Payload:
    """vsockrpc's own guest side: :data:`GUEST_DISTRIBUTIONS` pinned, :data:`GUEST_PARTS`."""
    return Payload(pins=pinned_versions(GUEST_DISTRIBUTIONS), sources=source_files(GUEST_PARTS))
