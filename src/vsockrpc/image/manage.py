"""Managing built images: list them, remove one, prune unused layers, export one.

Every function works on the content-addressed cache (:mod:`vsockrpc.image.cache`) and deletes
only its own entries, each under the entry's lock. What a running VM uses is passed in by the
caller (``in_use``: image directories; the VM registry lives above this layer), and is never
removed.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from vsockrpc.errors import ImageError
from vsockrpc.image import cache, names
from vsockrpc.image.build import FILES, MANIFEST, PVH_KERNEL, ImageInfo

__all__ = ["ImageRow", "disk_usage", "export", "list_images", "prune", "remove"]

FORMATS = ("raw", "qcow2", "dir")
KINDS = ("images", "python", "base")


@dataclass(frozen=True, slots=True)
class ImageRow:
    name: str | None  # None: an unnamed (plain or superseded) image
    path: Path
    spec: str | None
    size: int
    created: float
    kernel: str = "-"  # debian or tailored (image/tailored.py); "-" without a manifest


def _kernel_kind(manifest: dict[str, object]) -> str:
    kernel = manifest.get("kernel")
    return str(kernel.get("kind", "debian")) if isinstance(kernel, dict) else "-"


def _size(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (sparse files count what they use)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total


def _entries(root: Path, kind: str) -> list[Path]:
    directory = root / kind
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(cache_root: Path | None = None) -> list[ImageRow]:
    """Named images (by name), then the unnamed ones (most recently used first)."""
    root = cache.cache_root(cache_root)
    rows = []
    named_paths = set()
    for named in names.entries(root):
        size = _size(named.image) if named.image.is_dir() else 0
        kind = _kernel_kind(_manifest(named.image))
        rows.append(ImageRow(named.name, named.image, named.spec, size, named.created, kind))
        named_paths.add(named.image)
    others = [p for p in _entries(root, "images") if p not in named_paths]
    for path in sorted(others, key=lambda p: p.stat().st_mtime, reverse=True):
        manifest = _manifest(path)
        spec = manifest.get("spec")
        spec_path = str(spec["path"]) if isinstance(spec, dict) and "path" in spec else None
        kind = _kernel_kind(manifest)
        rows.append(ImageRow(None, path, spec_path, _size(path), path.stat().st_mtime, kind))
    return rows


def disk_usage(cache_root: Path | None = None) -> dict[str, int]:
    """Bytes on disk per cache kind (images, python, base, wheels, debs, kernels)."""
    root = cache.cache_root(cache_root)
    kinds = (*KINDS, "wheels", "debs", "kernels")
    return {kind: _size(root / kind) for kind in kinds if (root / kind).is_dir()}


def _manifest(path: Path) -> dict[str, object]:
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remove_entry(path: Path) -> bool:
    """Remove one cache entry under its lock; False when someone holds the lock."""
    lock = path.parent / f"{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        shutil.rmtree(path)
        lock.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def remove(name: str, in_use: Collection[Path], cache_root: Path | None = None) -> bool:
    """Forget ``name``; its image goes too unless another name or a running VM uses it
    (returns whether the image directory was removed)."""
    names.check_name(name)
    root = cache.cache_root(cache_root)
    target = next((n for n in names.entries(root) if n.name == name), None)
    if target is None:
        raise ImageError(f"no image named {name!r}", hint="vsockrpc image list shows the names")
    if target.image.resolve() in {p.resolve() for p in in_use}:
        raise ImageError(
            f"image {name!r} is in use by a running VM", hint="stop it first (vsockrpc vm stop)"
        )
    names.remove(name, root)
    still_named = any(n.image == target.image for n in names.entries(root))
    if still_named or not target.image.is_dir():
        return False
    return _remove_entry(target.image)


def prune(
    in_use: Collection[Path], *, keep_unnamed: int = 1, cache_root: Path | None = None
) -> list[tuple[str, Path, int]]:
    """Remove images neither named, nor in use, nor among the ``keep_unnamed`` most recently
    used unnamed ones; then python and base layers no remaining image uses. Returns
    ``(kind, path, bytes)`` of what was removed."""
    root = cache.cache_root(cache_root)
    used = {p.resolve() for p in in_use}
    named = {n.image for n in names.entries(root)}
    unnamed = sorted(
        (p for p in _entries(root, "images") if p not in named),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    removed: list[tuple[str, Path, int]] = []
    for path in unnamed[keep_unnamed:]:
        if path.resolve() in used:
            continue
        size = _size(path)
        if _remove_entry(path):
            removed.append(("images", path, size))
    keep: dict[str, set[str]] = {"base": set(), "python": set()}
    for path in _entries(root, "images"):
        inputs = _manifest(path).get("inputs", {})
        if isinstance(inputs, dict):
            keep["base"].add(str(inputs.get("base")))
            keep["python"].add(str(inputs.get("python_layer")))
    for kind in ("python", "base"):
        for path in _entries(root, kind):
            if path.name not in keep[kind]:
                size = _size(path)
                if _remove_entry(path):
                    removed.append((kind, path, size))
    return removed


def export(info: ImageInfo, out: Path, fmt: str) -> list[Path]:
    """Write the image to the directory ``out`` for booting elsewhere: the kernel (bzImage and
    PVH ELF), the loader initramfs, the root filesystem (``rootfs.ext4`` for ``dir``,
    ``rootfs.raw`` for ``raw``, ``rootfs.qcow2`` for ``qcow2``), the manifest, and
    ``cmdline`` (the kernel command line the agent needs). Files appear atomically."""
    if fmt not in FORMATS:
        raise ImageError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    out.mkdir(parents=True, exist_ok=True)
    rootfs = {"dir": "rootfs.ext4", "raw": "rootfs.raw", "qcow2": "rootfs.qcow2"}[fmt]
    plan = [
        (info.path / FILES["kernel"], FILES["kernel"]),
        (info.path / FILES["initrd"], FILES["initrd"]),
        *([(info.pvh_kernel, PVH_KERNEL)] if info.pvh_kernel else []),
        (info.rootfs, rootfs),
        (info.path / MANIFEST, MANIFEST),
    ]
    written = []
    for source, name in plan:
        tmp = out / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        if name == "rootfs.qcow2":
            argv = ["qemu-img", "convert", "-O", "qcow2", str(source), str(tmp)]
        else:
            argv = ["cp", "--sparse=always", "--reflink=auto", str(source), str(tmp)]
        try:
            subprocess.run(argv, check=True, capture_output=True, timeout=600)
            os.replace(tmp, out / name)
        except (OSError, subprocess.SubprocessError) as err:
            tmp.unlink(missing_ok=True)
            raise ImageError(f"cannot write {out / name}: {err}") from err
        written.append(out / name)
    cmdline = out / "cmdline"
    cmdline.write_text(info.cmdline + "\n")
    os.chmod(cmdline, 0o644)
    os.utime(cmdline, (time.time(), time.time()))
    return [*written, cmdline]
