"""The content-addressed cache every built artefact lives in.

Layout: ``<root>/<kind>/<key>/`` where ``key`` is a digest of every input that shapes the
artefact. A finished entry appears atomically: it is built in a temporary sibling directory and
renamed into place (``rename(2)`` of a directory is atomic on one filesystem), so a reader never
sees a half-written entry, and a failed or interrupted build leaves nothing under the final name.
Concurrent builders of the same key are serialised with an ``flock`` on ``<key>.lock``.

The root is ``$VSOCKRPC_CACHE``, else ``$XDG_CACHE_HOME/vsockrpc``, else ``~/.cache/vsockrpc``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vsockrpc.errors import ImageError
from vsockrpc.payload import default_cache_root

__all__ = ["cache_root", "digest", "entry", "file_digest", "prune", "touch", "tree_digest"]


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache root, created if needed; :class:`ImageError` when it cannot be written."""
    # The default is the payload's: its wheels live under the same root.
    root = Path(override) if override is not None else default_cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".probe-")  # noqa: SIM115
        probe.close()
    except OSError as err:
        raise ImageError(
            f"cache directory {root} is not writable: {err.strerror or err}",
            hint="set VSOCKRPC_CACHE to a writable directory",
        ) from err
    return root.resolve()


def digest(inputs: Any) -> str:
    """A stable hex key for JSON-serialisable ``inputs`` (dict order does not matter)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tree_digest(root: Path, *, exclude_dirs: frozenset[str] = frozenset({"__pycache__"})) -> str:
    """Digest of the relative paths, modes and contents of the regular files under ``root``."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in exclude_dirs for part in rel.parts) or not path.is_file():
            continue
        h.update(f"{rel.as_posix()}\0{path.stat().st_mode & 0o111:o}\0".encode())
        h.update(file_digest(path).encode())
    return h.hexdigest()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


class Entry:
    """One cache entry: ``path`` is the final directory; :meth:`build` publishes it."""

    def __init__(self, kind_dir: Path, key: str) -> None:
        self.path = kind_dir / key
        self._lock = kind_dir / f"{key}.lock"

    @property
    def exists(self) -> bool:
        return self.path.is_dir()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with _locked(self._lock):
            yield

    @contextlib.contextmanager
    def build(self) -> Iterator[Path]:
        """Yield an empty temporary directory; on success it becomes :attr:`path` atomically.

        On any exception (Ctrl-C included) the temporary directory is removed and nothing
        appears under the final name. Call inside :meth:`lock`.
        """
        prefix = f".tmp-{self.path.name[:16]}-"
        # Under the lock, another directory of this key is a build that was killed outright.
        for stale in self.path.parent.glob(f"{prefix}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=self.path.parent))
        try:
            yield tmp
            os.chmod(tmp, 0o755)
            os.rename(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def entry(kind: str, key: str, *, root: Path | None = None) -> Entry:
    """The cache entry ``<root>/<kind>/<key>`` (not necessarily built yet)."""
    kind_dir = (root if root is not None else cache_root()) / kind
    try:
        kind_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ImageError(
            f"cache directory {kind_dir} is not writable: {err.strerror or err}",
            hint="set VSOCKRPC_CACHE to a writable directory",
        ) from err
    return Entry(kind_dir, key)


def prune(
    kind: str,
    *,
    keep: int,
    min_age: float = 3600.0,
    root: Path | None = None,
    protect: frozenset[str] = frozenset(),
) -> int:
    """Remove all but the ``keep`` most recently used entries of ``kind`` older than
    ``min_age`` seconds (never a key in ``protect``: named images and their layers);
    returns how many were removed.

    Every guest-side code change makes a new image (~140 MB), so without this the cache only
    grows. Entries are taken under their lock (one being built or read is skipped); a VM
    already running from a removed image keeps working, its open files stay readable.
    """
    kind_dir = (root if root is not None else cache_root()) / kind
    if not kind_dir.is_dir():
        return 0
    entries = sorted(
        (p for p in kind_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    removed = 0
    now = time.time()
    for path in entries[keep:]:
        if path.name in protect or now - path.stat().st_mtime < min_age:
            continue
        lock = kind_dir / f"{path.name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(path, ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed += 1
        finally:
            os.close(fd)
    return removed


def touch(path: Path) -> None:
    """Mark an entry as recently used (its mtime orders :func:`prune`)."""
    with contextlib.suppress(OSError):
        os.utime(path)
