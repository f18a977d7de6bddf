"""What an image spec (:mod:`vsockrpc.payload.spec`) adds to each layer of the image.

The layers, bottom to top, each content-addressed (:mod:`vsockrpc.image.cache`):

1. **base**: the Debian rootfs; the spec's ``apt`` packages join mmdebstrap's ``--include``
   (and the base key). Checked against the apt index before anything is built.
2. **python** (``<cache>/python/<key>/site``): the spec's ``pip`` requirements and their
   dependencies, resolved with vsockrpc's own pins for the guest's CPython and unpacked into a
   directory that overlays the guest's site-packages. Key: the base key and the wheels' hashes.
3. **image** (top): copied files, the services' sources, the guest config
   (:data:`~vsockrpc.payload.GUEST_CONFIG_PATH`) and the extra kernel command line; its key
   takes :meth:`ImageSpec.top_digest`, so editing a service rebuilds only this layer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from vsockrpc.errors import ImageError, PayloadError
from vsockrpc.image import cache, debs, wheels
from vsockrpc.payload import (
    GUEST_CONFIG_PATH,
    ImageSpec,
    Payload,
    Target,
    WheelSet,
    user_wheels,
)

__all__ = [
    "check_apt",
    "install_top",
    "predicted_python",
    "python_layer",
    "resolve_pip",
    "spec_manifest",
    "top_level_names",
]


def check_apt(names: tuple[str, ...]) -> None:
    """Every package exists in the host's apt index (same release as the guest), or one
    line naming the first that does not; nothing is built before this passes."""
    for name in names:
        try:
            debs.resolve(name)
        except ImageError as err:
            raise ImageError(
                f"apt package {name!r} (image spec) is not in the apt index: {err}",
                hint="check its name with: apt-cache policy " + name,
            ) from err


def predicted_python() -> str | None:
    """The guest's CPython ``major.minor`` before the base is built: the candidate
    ``python3`` of the host's apt index (callers ask only when the guest's release is the
    host's); None when the index does not say."""
    try:
        version = debs.resolve("python3").version
    except ImageError:
        return None
    major_minor = ".".join(version.split(":")[-1].split(".")[:2])
    return major_minor if major_minor.startswith("3.") else None


def resolve_pip(spec: ImageSpec, payload: Payload, target: Target, cache_root: Path) -> WheelSet:
    """The spec's extra wheels; :class:`ImageError` naming the package when pip cannot."""
    try:
        return user_wheels(spec, payload, target, cache_root=cache_root)
    except PayloadError as err:
        raise ImageError(f"pip requirements of {spec.path.name}: {err}", hint=err.hint) from err


def python_layer(base_key: str, wheel_set: WheelSet, cache_root: Path) -> Path | None:
    """``<cache>/python/<key>`` holding ``site/`` (the unpacked wheels), built if missing."""
    if not wheel_set.wheels:
        return None
    hashes = wheel_set.hashes()
    key = cache.digest({"base": base_key, "wheels": hashes, "python": wheel_set.target.python})
    entry = cache.entry("python", key, root=cache_root)
    with entry.lock():
        if entry.exists:
            cache.touch(entry.path)
            return entry.path
        with entry.build() as tmp:
            wheels.install(wheel_set, tmp / "site")
            (tmp / "python.json").write_text(json.dumps({"wheels": hashes}, indent=2) + "\n")
    return entry.path


def top_level_names(spec: ImageSpec, python_dir: Path | None) -> list[str]:
    """The site-packages entries the spec adds (to byte-compile in the top layer)."""
    names = {f.dest.split("/")[0] for f in spec.service_sources()}
    if python_dir is not None:
        site = python_dir / "site"
        names |= {p.name for p in site.iterdir() if p.is_dir() or p.suffix == ".py"}
    return sorted(n for n in names if not n.endswith((".dist-info", ".data")))


def install_top(spec: ImageSpec, root: Path, site: Path, python_dir: Path | None) -> None:
    """Lay the spec's python layer, services, files and guest config into ``root``."""
    if python_dir is not None:
        subprocess.run(["cp", "-a", f"{python_dir / 'site'}/.", str(site)], check=True)
    Payload(pins={}, sources=spec.service_sources()).write_sources(site)
    for item in spec.copy:
        _copy(item.source, root / item.dest.lstrip("/"), item.mode)
    config = root / GUEST_CONFIG_PATH.lstrip("/")
    _mkdirs(config.parent)
    config.write_text(json.dumps(spec.guest_config(), indent=2, sort_keys=True) + "\n")
    os.chmod(config, 0o644)


def _mkdirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each 0755 whatever the umask."""
    for parent in reversed([directory, *directory.parents]):
        if not parent.exists():
            parent.mkdir()
            os.chmod(parent, 0o755)


def _copy(source: Path, dest: Path, mode: int | None) -> None:
    """A file, or a tree (directories 0755); ``mode`` if given, else 0755/0644 by the
    source's executable bit. Root-owned (the builder runs as root)."""
    if dest.is_symlink() or (dest.exists() and dest.is_dir() != source.is_dir()):
        raise ImageError(f"cannot copy {source} to {dest.name}: the guest has another kind there")
    files = [(source, dest)] if source.is_file() else []
    if source.is_dir():
        _mkdirs(dest)
        for path in sorted(source.rglob("*")):
            target = dest / path.relative_to(source)
            if path.is_dir() and not path.is_symlink():
                _mkdirs(target)
            elif path.is_file() and not path.is_symlink():
                files.append((path, target))
    else:
        _mkdirs(dest.parent)
    for src, dst in files:
        shutil.copyfile(src, dst)
        default = 0o755 if src.stat().st_mode & 0o111 else 0o644
        os.chmod(dst, default if mode is None else mode)
        os.chown(dst, 0, 0)


def spec_manifest(spec: ImageSpec, wheel_set: WheelSet | None) -> dict[str, Any]:
    """The spec's part of the image manifest (what a user sees in ``image build --json``).

    Paths are relative to the spec's directory: the manifest is part of the image, and two
    checkouts of one project in different places build the same bytes."""
    return {
        "path": spec.path.name,
        "digest": spec.top_digest(),
        "apt": list(spec.apt),
        "pip": list(spec.pip),
        "wheels": wheel_set.hashes() if wheel_set is not None else {},
        "copy": [
            {"source": _relative(c.source, spec.path.parent), "dest": c.dest, "mode": c.mode}
            for c in spec.copy
        ],
        "memory": spec.memory,
        "cpus": spec.cpus,
        **spec.guest_config(),
    }


def _relative(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)
