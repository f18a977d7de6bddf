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

This layer imports only :mod:`vsockrpc.errors`. User packages and services (an image spec,
:mod:`.spec`) extend a payload: more requirements (:func:`user_wheels`, resolved with their
dependencies against the guest's own pins), more sources, more entry points, same two outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
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
from vsockrpc.payload.spec import (
    GUEST_CONFIG_PATH,
    Command,
    CopyItem,
    ImageSpec,
    PythonService,
    load_spec,
    require_spec_name,
)

__all__ = [
    "ENTRY_MODULE",
    "GUEST_CONFIG_PATH",
    "GUEST_DISTRIBUTIONS",
    "GUEST_PARTS",
    "Command",
    "CopyItem",
    "ImageSpec",
    "Payload",
    "PythonService",
    "SourceFile",
    "Target",
    "WheelSet",
    "constraints_file",
    "default_cache_root",
    "guest_payload",
    "load_spec",
    "normalize",
    "package_dir",
    "pinned_versions",
    "require_spec_name",
    "resolve_wheels",
    "run_pip",
    "source_files",
    "user_wheels",
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


def user_wheels(
    spec: ImageSpec, payload: Payload, target: Target, *, cache_root: Path | None = None
) -> WheelSet:
    """The wheels of ``spec``'s pip requirements and their dependencies for ``target``,
    resolved together with ``payload``'s pins (so a conflicting pin fails here, naming the
    packages) and with the payload's own wheels left out (the guest has them already).

    The payload's wheels come from its cached set; the rest from the index pip is configured
    with, or only from the spec's ``pip_find_links`` directory when it names one (offline).
    """
    if not spec.pip:
        return WheelSet(target, ())
    own_set = payload.wheels(target, cache_root=cache_root)
    own_dirs = sorted({w.parent for w in own_set.wheels})
    requirements = [*spec.pip, *payload.requirements]
    if spec.pip_find_links is not None:
        root = cache_root if cache_root is not None else default_cache_root()
        resolved = _resolve_links_memo(requirements, target, spec.pip_find_links, own_dirs, root)
    else:
        resolved = resolve_wheels(
            requirements, target, cache_root=cache_root, deps=True, also_from=own_dirs
        )
    own = {w.name for w in own_set.wheels}
    return WheelSet(target, tuple(w for w in resolved.wheels if w.name not in own))


def _resolve_links_memo(
    requirements: list[str], target: Target, links: Path, also_from: list[Path], root: Path
) -> WheelSet:
    """``resolve_wheels`` from the ``links`` directory only, remembered (``<root>/wheels/
    links-<key>.json``) until the requirements or the directory's wheels change: a pip run
    takes seconds, and a cache hit of an image must not pay it."""
    listing = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in links.glob("*.whl"))
    key = hashlib.sha256(
        json.dumps(
            [requirements, target.python, list(target.platforms), str(links), listing],
            sort_keys=True,
        ).encode()
    ).hexdigest()
    memo = root / "wheels" / f"links-{key}.json"
    try:
        paths = [Path(p) for p in json.loads(memo.read_text())]
        if all(p.is_file() for p in paths):
            return WheelSet(target, tuple(paths))
    except (OSError, ValueError, TypeError):
        pass
    resolved = resolve_wheels(
        requirements, target, find_links=links, deps=True, also_from=also_from
    )
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps([str(w) for w in resolved.wheels]))
        os.replace(tmp, memo)
    return resolved
