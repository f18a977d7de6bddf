"""Image names: ``<cache>/names/<name>.json`` points at a content-addressed image.

A name (from an image spec's ``name`` or ``image build --name``) is what ``vm run --image
NAME`` and ``image list/rm/export`` take. Building again under the same name repoints it; the
images and layers a name points at are never pruned (:func:`protected`).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from vsockrpc.errors import BadInputError, ImageError
from vsockrpc.image import cache

__all__ = [
    "InvalidImageName",
    "NamedImage",
    "check_name",
    "entries",
    "locate",
    "protected",
    "register",
    "remove",
    "resolve",
    "valid_name",
]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


@dataclass(frozen=True, slots=True)
class NamedImage:
    name: str
    image: Path  # the image directory in the cache
    spec: str | None
    created: float


class InvalidImageName(ImageError, BadInputError):
    """An image name outside the name rule: the caller's input (usage error, exit 2)."""


def valid_name(text: str) -> bool:
    return bool(_NAME.match(text))


def check_name(text: str) -> str:
    """``text`` if it is a valid image name (never a path), else :class:`InvalidImageName`."""
    if not valid_name(text):
        raise InvalidImageName(f"{text!r} is not a valid image name (a-z 0-9 . _ -, at most 63)")
    return text


def _dir(cache_root: Path | None) -> Path:
    return cache.cache_root(cache_root) / "names"


def register(name: str, image: Path, spec: Path | None, cache_root: Path | None = None) -> None:
    """Point ``name`` at the image directory ``image`` (atomically)."""
    check_name(name)
    directory = _dir(cache_root)
    directory.mkdir(mode=0o755, exist_ok=True)
    record = {
        "name": name,
        "image": image.name,
        "spec": str(spec) if spec else None,
        "created": time.time(),
    }
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, directory / f"{name}.json")


def _load(path: Path, images: Path) -> NamedImage | None:
    try:
        record = json.loads(path.read_text())
        return NamedImage(
            str(record["name"]),
            images / str(record["image"]),
            record.get("spec"),
            float(record["created"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def entries(cache_root: Path | None = None) -> list[NamedImage]:
    """Every named image, by name (unreadable records are skipped)."""
    root = cache.cache_root(cache_root)
    directory = root / "names"
    if not directory.is_dir():
        return []
    found = (_load(p, root / "images") for p in sorted(directory.glob("*.json")))
    return [n for n in found if n is not None]


def resolve(name: str, cache_root: Path | None = None) -> Path:
    """The image directory named ``name``; :class:`ImageError` when there is none."""
    for named in entries(cache_root):
        if named.name == name:
            if not named.image.is_dir():
                raise ImageError(
                    f"image {name!r} points at a removed cache entry",
                    hint="build it again (vsockrpc image build --spec ...)",
                )
            return named.image
    raise ImageError(
        f"no image named {name!r}", hint="vsockrpc image list shows the names; build one first"
    )


def locate(text: str, cache_root: Path | None = None) -> Path:
    """What a user's ``--image NAME|DIR`` means: an existing path as given, else a name."""
    if Path(text).exists() or not valid_name(text):
        return Path(text)
    return resolve(text, cache_root)


def remove(name: str, cache_root: Path | None = None) -> NamedImage:
    """Forget the name (the image itself goes with the next prune)."""
    check_name(name)
    for named in entries(cache_root):
        if named.name == name:
            (_dir(cache_root) / f"{name}.json").unlink(missing_ok=True)
            return named
    raise ImageError(f"no image named {name!r}", hint="vsockrpc image list shows the names")


def protected(cache_root: Path | None = None) -> dict[str, frozenset[str]]:
    """The cache keys named images use, per kind (``images``, ``base``, ``python``)."""
    keep: dict[str, set[str]] = {"images": set(), "base": set(), "python": set()}
    for named in entries(cache_root):
        keep["images"].add(named.image.name)
        try:
            inputs = json.loads((named.image / "manifest.json").read_text())["inputs"]
        except (OSError, ValueError, KeyError):
            continue
        keep["base"].add(str(inputs.get("base")))
        if inputs.get("python_layer"):
            keep["python"].add(str(inputs["python_layer"]))
    return {kind: frozenset(keys) for kind, keys in keep.items()}
