"""Bootstrap of a ``vsockrpc bundle`` file (its ``__main__.py``): standard library only.

Picks the bundled wheels matching this interpreter, extracts them and the vsockrpc sources
once into a cache directory keyed by the bundle's content digest, then runs the manifest's
entry module, ``vsockrpc.guest`` (the init when PID 1, else the agent server; arguments are
passed on).
This module is copied into bundles verbatim and is not imported by the package itself.

Cache directory: the first writable of ``$VSOCKRPC_BUNDLE_CACHE``, ``$XDG_CACHE_HOME``,
``~/.cache``, ``/var/cache``, ``/run``, ``/tmp`` (each + ``/vsockrpc-bundle``); as PID 1 with
none writable (read-only root before anything is mounted), a tmpfs is mounted on ``/run``.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
import zipfile
from typing import NoReturn

MIN_PYTHON = (3, 11)


def _fail(message: str) -> NoReturn:
    print(f"vsockrpc-bundle: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _compatible(wheel: str, tag: str) -> bool:
    parts = wheel[: -len(".whl")].split("-")
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    if plat == "any":
        return abi == "none"
    if platform.machine() not in plat:
        return False
    return abi == tag or (abi == "abi3" and len(py) <= len(tag) and py <= tag)


def _cache_roots() -> list[str]:
    roots = []
    for env in ("VSOCKRPC_BUNDLE_CACHE",):
        if os.environ.get(env):
            roots.append(os.environ[env])
    if os.environ.get("XDG_CACHE_HOME"):
        roots.append(os.path.join(os.environ["XDG_CACHE_HOME"], "vsockrpc-bundle"))
    home = os.environ.get("HOME")
    if home and home != "/":
        roots.append(os.path.join(home, ".cache", "vsockrpc-bundle"))
    roots += ["/var/cache/vsockrpc-bundle", "/run/vsockrpc-bundle", "/tmp/vsockrpc-bundle"]
    return roots


def _writable_root() -> str:
    for root in _cache_roots():
        try:
            os.makedirs(root, mode=0o700, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=root)  # noqa: SIM115 - closed at once
            probe.close()
            return root
        except OSError:
            continue
    if os.getpid() == 1:  # nothing mounted yet: a tmpfs on /run (PID 1 mounts it anyway)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"tmpfs", b"/run", b"tmpfs", 0, b"mode=0755") == 0:
            os.makedirs("/run/vsockrpc-bundle", mode=0o700, exist_ok=True)
            return "/run/vsockrpc-bundle"
    _fail("no writable cache directory (set VSOCKRPC_BUNDLE_CACHE)")


def _extract(archive: str, manifest: dict[str, object], tag: str) -> str:
    digest = str(manifest["digest"])
    root = _writable_root()
    site = os.path.join(root, f"{digest[:16]}-{tag}")
    if os.path.exists(os.path.join(site, ".complete")):
        return site
    wheels = [str(w) for w in manifest["wheels"]]  # type: ignore[attr-defined]
    chosen = [w for w in wheels if _compatible(w, tag)]
    if not any(w.startswith("grpcio-") for w in chosen):
        have = ", ".join(str(p) for p in manifest["pythons"])  # type: ignore[attr-defined]
        _fail(
            f"this bundle carries no grpcio for Python {tag} ({platform.machine()}); it has: {have}"
        )
    tmp = tempfile.mkdtemp(dir=root, prefix=".extract-")
    try:
        with zipfile.ZipFile(archive) as bundle:
            for name in bundle.namelist():
                if name.startswith("payload/") and not name.endswith("/"):
                    target = os.path.join(tmp, name[len("payload/") :])
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with open(target, "wb") as out:
                        out.write(bundle.read(name))
            for wheel in chosen:
                with bundle.open(f"wheels/{wheel}") as raw, zipfile.ZipFile(raw) as whl:
                    whl.extractall(tmp)
        open(os.path.join(tmp, ".complete"), "w").close()
        try:
            os.rename(tmp, site)
        except OSError:  # another start won the race: use its copy
            if not os.path.exists(os.path.join(site, ".complete")):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return site


def main() -> None:
    if sys.version_info < MIN_PYTHON:
        needed = ".".join(map(str, MIN_PYTHON))
        _fail(f"Python {needed} or later is needed, this is {platform.python_version()}")
    archive = os.path.dirname(os.path.abspath(__file__))
    with zipfile.ZipFile(archive) as bundle:
        manifest = json.loads(bundle.read("BUNDLE.json"))
    args = sys.argv[1:]
    if args[:1] == ["--bundle-info"]:
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    site = _extract(archive, manifest, tag)
    sys.path.insert(0, site)
    sys.argv = [sys.argv[0], *args]
    entry = importlib.import_module(str(manifest["entry"]))  # the payload's entry module
    raise SystemExit(entry.main(args))


if __name__ == "__main__":
    main()
