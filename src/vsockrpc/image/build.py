"""Building a bootable guest image, in two cached layers.

What goes into the guest is :mod:`vsockrpc.payload`'s decision; this module lays it out.

1. **base** (``<cache>/base/<key>``): the mmdebstrap rootfs with the payload's wheels installed
   and precompiled and the kernel modules the guest needs. Key: release, mirror lines,
   packages, the payload's pins and the arch, kernel package digest, module list, epoch.
   Slow (~40 s), rare.
2. **image** (``<cache>/images/<key>``): base + the payload's vsockrpc sources + init script as
   an ext4 file, the loader initramfs, the kernel, ``manifest.json``. Key: base key, agent
   digest (the payload's source digest), loader and busybox digests, kernel command line. A
   few seconds; redone when the guest-side source changes.

Both layers are published atomically (:mod:`vsockrpc.image.cache`). Times are pinned to
``SOURCE_DATE_EPOCH`` so the same inputs give the same bytes where the tools allow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vsockrpc.errors import ImageError
from vsockrpc.image import (
    agent,
    cache,
    debs,
    ext4,
    initramfs,
    mirror,
    modules,
    names,
    pvh,
    rootfs,
    spec_layers,
    tailored,
    wheels,
)
from vsockrpc.image.kernel import fetch_kernel, kernel_index
from vsockrpc.payload import ImageSpec, Payload, guest_payload

__all__ = ["DEFAULT_RELEASE", "FORMAT", "ImageInfo", "build_image", "export_image", "find_image"]

DEFAULT_RELEASE = "bookworm"
# Bump when the build steps change in a way the inputs do not show (base layer, image layer).
FORMAT = 4
IMAGE_FORMAT = 5  # 5: optional PVH kernel (vmlinux)
SPEC_MANIFEST_FORMAT = 2  # 2: paths in the spec's manifest are relative to the spec's directory
KEEP_IMAGES = 4  # most recently used entries kept when a new one is built (cache.prune)
KEEP_BASES = 2
NEED_BASE_BYTES = 1_000_000_000  # free space a cold base build needs (_require_space)
NEED_IMAGE_BYTES = 700_000_000  # ... and the image layer
DEFAULT_EPOCH = 1_700_000_000  # 2023-11-14; overridden by $SOURCE_DATE_EPOCH
MANIFEST = "manifest.json"
FILES = {"kernel": "vmlinuz", "initrd": "initrd.cpio", "rootfs": "rootfs.ext4"}
# Optional: the same kernel uncompressed with a PVH entry (image/pvh.py), booted when present.
PVH_KERNEL = "vmlinux"
# cryptomgr.notests: the kernel's boot-time self-tests of its crypto algorithms re-check the
# generic implementations on every boot; under TCG crypto_algapi_init alone took 0.42 s of
# the kernel's 1.7 s of initcalls (initcall_debug). With it /init starts ~0.5 s sooner (guest
# clock); the algorithms themselves are unchanged.
# initcall_blacklist=jent_mod_init: 6.12's jitter-entropy RNG times the CPU at boot to prove
# it jitters enough, 150 ms of initcalls under TCG (initcall_debug, 2 boots). Nothing in the
# guest uses it: /dev/urandom is the kernel's CRNG (trusted RDRAND above) and the crypto DRBG
# seeds from that when jitterentropy is absent. No effect on 6.1 (no such initcall).
CMDLINE = (
    "console=ttyS0 quiet panic=-1 root=/dev/vda rootfstype=ext4 random.trust_cpu=on "
    f"cryptomgr.notests initcall_blacklist=jent_mod_init init={agent.INIT_PATH}"
)

Step = Callable[[str], AbstractContextManager[Any]]


def _no_progress(_title: str) -> AbstractContextManager[None]:
    return nullcontext()


@dataclass(frozen=True)
class ImageInfo:
    """A built image directory and what its manifest says."""

    path: Path
    manifest: dict[str, Any] = field(repr=False)
    cache_hit: bool = False

    @property
    def kernel(self) -> Path:
        return self.path / FILES["kernel"]

    @property
    def pvh_kernel(self) -> Path | None:
        """The PVH-bootable ELF of the kernel (faster under TCG), if the image has one."""
        path = self.path / PVH_KERNEL
        return path if path.is_file() else None

    @property
    def initrd(self) -> Path:
        return self.path / FILES["initrd"]

    @property
    def rootfs(self) -> Path:
        return self.path / FILES["rootfs"]

    @property
    def cmdline(self) -> str:
        return str(self.manifest["cmdline"])

    @property
    def arch(self) -> str:
        return str(self.manifest["arch"])

    @property
    def size(self) -> int:
        return sum((self.path / name).stat().st_size for name in FILES.values())


def choose_kernel(given: str | None, spec: ImageSpec | None) -> str:
    """The image's kernel: ``given`` (``--kernel``), else the spec's, else ``debian``."""
    kernel = given or (spec.kernel if spec is not None else None) or "debian"
    if kernel not in tailored.KERNELS:
        raise ImageError(f"unknown kernel {kernel!r} (choose from {', '.join(tailored.KERNELS)})")
    return kernel


def _epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    return int(value) if value.isdigit() else DEFAULT_EPOCH


def _dpkg_versions(root: Path) -> dict[str, str]:
    versions: dict[str, str] = {}
    status = root / "var/lib/dpkg/status"
    for stanza in status.read_text(errors="replace").split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            versions[fields["Package"]] = fields.get("Version", "")
    return dict(sorted(versions.items()))


def _chroot_python(root: Path, args: list[str], epoch: int) -> None:
    """Run the guest's own python3 inside ``root`` (so .pyc match its exact version)."""
    env = {"PATH": "/usr/bin:/bin", "SOURCE_DATE_EPOCH": str(epoch), "LANG": "C.UTF-8"}

    def enter_root() -> None:  # runs in the child between fork and exec
        os.chroot(root)
        os.chdir("/")

    proc = subprocess.run(
        ["/usr/bin/python3", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        preexec_fn=enter_root,  # the builder starts no threads
    )
    if proc.returncode != 0:
        raise ImageError(f"python3 in the rootfs failed: {proc.stderr.strip()[-300:]}")


def _compile(root: Path, dirs: list[str], epoch: int) -> None:
    """Byte-compile ``dirs`` with the guest's python3 as unchecked-hash .pyc (PEP 552).

    The default (timestamp) .pyc compares the source's mtime with the one recorded at
    compile time; :func:`rootfs.clamp_mtimes` changes every mtime, which would make each
    .pyc stale and the read-only guest recompile the whole import chain at every boot.
    Unchecked-hash .pyc are valid regardless of mtimes and byte-identical across builds.
    """
    _chroot_python(
        root,
        ["-m", "compileall", "-q", "-f", "-j0", "--invalidation-mode", "unchecked-hash", *dirs],
        epoch,
    )


def _base_inputs(
    release: str,
    mirror_lines: list[str],
    payload: Payload,
    cache_root: Path,
    extra_packages: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Every input of the base layer (its key); ``extra_packages``: an image spec's apt."""
    kernel = fetch_kernel(cache_root=cache_root)
    mods = modules.load_order(kernel.modules_dir)
    extra = [p for p in extra_packages if p not in rootfs.PACKAGES]
    return {
        "format": FORMAT,
        "release": release,
        "mirrors": mirror_lines,
        "packages": [*rootfs.PACKAGES, *extra],
        "pins": dict(payload.pins),
        "arch": kernel.arch,
        "kernel": kernel.package.sha256,
        "modules": [modules.installed_path(m, kernel.modules_dir) for m in mods],
        "epoch": _epoch(),
    }


def _build_base(inputs: dict[str, Any], payload: Payload, step: Step, cache_root: Path) -> Path:
    kernel = fetch_kernel(cache_root=cache_root)
    mods = modules.load_order(kernel.modules_dir)
    pins = dict(payload.pins)
    epoch = int(inputs["epoch"])
    release = str(inputs["release"])
    entry = cache.entry("base", cache.digest(inputs), root=cache_root)
    with entry.lock():
        if entry.exists:
            cache.touch(entry.path)
            return entry.path
        rootfs.require_root("building the guest rootfs")
        with entry.build() as tmp:
            root = tmp / "root"
            extra = "".join(f", {p}" for p in inputs["packages"][len(rootfs.PACKAGES) :])
            with step(f"mmdebstrap {release} rootfs (variant essential + python3{extra})"):
                rootfs.build_rootfs(
                    root,
                    release=release,
                    mirrors=inputs["mirrors"],
                    packages=inputs["packages"],
                    epoch=epoch,
                    log=tmp / "mmdebstrap.log",
                )
                rootfs.prune(root)
            python = rootfs.guest_python(root)
            site = f"/usr/local/lib/python{python}/dist-packages"
            with step(
                f"guest wheels for CPython {python}: "
                + ", ".join(f"{k}=={v}" for k, v in sorted(pins.items()))
            ):
                wheel_set = payload.wheels(
                    wheels.target(kernel.arch, python), cache_root=cache_root
                )
                wheels.install(wheel_set, root / site.lstrip("/"))
            with step("byte-compiling the guest's Python (unchecked-hash .pyc)"):
                _compile(
                    root,
                    [f"/usr/lib/python{python}", "/usr/lib/python3/dist-packages", site],
                    epoch,
                )
            with step(f"kernel modules for {kernel.version}"):
                mod_root = root / "usr/lib/modules" / kernel.version
                load = []
                for ko in mods:
                    rel = modules.installed_path(ko, kernel.modules_dir)
                    dest = mod_root / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(modules.module_bytes(ko))
                    load.append(f"/usr/lib/modules/{kernel.version}/{rel}")
                (mod_root / "vsockrpc.load").write_text("\n".join(load) + "\n")
            base_manifest = {
                "inputs": inputs,
                "python": python,
                "site_packages": site,
                "kernel_version": kernel.version,
                "kernel_package": f"{kernel.package.name} {kernel.package.version}",
                "packages": _dpkg_versions(root),
                "wheels": wheel_set.hashes(),
            }
            (tmp / "base.json").write_text(json.dumps(base_manifest, indent=2, sort_keys=True))
    return entry.path


def build_image(
    *,
    release: str = DEFAULT_RELEASE,
    mirror_uri: str | None = None,
    step: Step = _no_progress,
    cache_root: Path | None = None,
    spec: ImageSpec | None = None,
    name: str | None = None,
    kernel: str | None = None,
) -> ImageInfo:
    """The image for these inputs: from the cache, or built (needs root for the base layer).

    ``spec``: an image spec's packages, files and services on top (:mod:`.spec_layers`);
    ``name``: the name :func:`vsockrpc.image.names.resolve` finds the image by afterwards.
    ``kernel``: ``debian`` (Debian's cloud kernel and the loader initramfs) or ``tailored``
    (:mod:`.tailored`: built from the same series' source, everything built in, no loader);
    None: the spec's ``kernel``, else ``debian``.
    Everything a spec names is checked (apt index, pip wheels) before a layer is built.
    """
    kernel = choose_kernel(kernel, spec)
    cache_root = cache.cache_root(cache_root)
    if mirror_uri:
        mirror_lines = [f"deb {mirror_uri} {release} main"]
    else:
        mirror_lines = mirror.mirror_lines(release, mirror.host_sources(), mirror.host_codename())
    payload = guest_payload()
    same_release = release == mirror.host_codename()
    if spec is not None and same_release:
        spec_layers.check_apt(spec.apt)
    user_set = None
    if spec is not None and spec.pip and same_release:
        # Resolved before any layer is built: a requirement without a wheel changes nothing.
        python = spec_layers.predicted_python()
        if python is not None:
            target = wheels.target(debs.host_arch(), python)
            user_set = spec_layers.resolve_pip(spec, payload, target, cache_root)
    base_inputs = _base_inputs(
        release, mirror_lines, payload, cache_root, spec.apt if spec is not None else ()
    )
    _require_space(cache_root, (cache_root / "base" / cache.digest(base_inputs)).is_dir())
    base = _build_base(base_inputs, payload, step, cache_root)
    base_manifest = json.loads((base / "base.json").read_text())
    python_dir = None
    if spec is not None and spec.pip:
        if user_set is None or user_set.target.python != base_manifest["python"]:
            target = wheels.target(debs.host_arch(), base_manifest["python"])
            user_set = spec_layers.resolve_pip(spec, payload, target, cache_root)
        with step(f"python layer: {', '.join(spec.pip)}"):
            python_dir = spec_layers.python_layer(base.name, user_set, cache_root)
    cmdline = f"{CMDLINE} {spec.kernel_cmdline}".strip() if spec is not None else CMDLINE
    cloud = fetch_kernel(cache_root=cache_root)
    own = None
    if kernel == "tailored":
        own = tailored.build_tailored(
            tailored.series_of(cloud.version),
            index=kernel_index(cache_root),
            step=step,
            cache_root=cache_root,
        )
        cmdline = cmdline.replace(f"init={agent.INIT_PATH}", f"init={agent.HANDOVER_PATH}")
    busybox_pkg = debs.resolve("busybox-static")
    busybox = debs.unpack(busybox_pkg, root=cache_root) / "bin" / "busybox"
    epoch = int(base_manifest["inputs"]["epoch"])
    inputs = {
        "format": IMAGE_FORMAT,
        "base": base.name,
        "agent": agent.agent_digest(payload),
        "loader": cache.digest(initramfs.LOADER_INIT),
        "busybox": busybox_pkg.sha256,
        "cmdline": cmdline,
    }
    if spec is not None:  # absent without a spec: the key of a plain image is unchanged
        inputs["spec"] = spec.top_digest()
        inputs["spec_manifest"] = SPEC_MANIFEST_FORMAT
        inputs["python_layer"] = python_dir.name if python_dir is not None else None
    if own is not None:  # absent for Debian's kernel: those keys are unchanged
        inputs["kernel"] = cache.file_digest(own.bzimage)
    key = cache.digest(inputs)
    entry = cache.entry("images", key, root=cache_root)
    with entry.lock():
        if entry.exists:
            cache.touch(entry.path)
            if name is not None:
                names.register(name, entry.path, spec.path if spec else None, cache_root)
            return find_image(entry.path, cache_hit=True)
        with entry.build() as tmp:
            with step("guest root filesystem: base + vsockrpc agent → ext4"):
                work = tmp / "root"
                rootfs.require_root("assembling the guest rootfs")
                subprocess.run(["cp", "-a", str(base / "root"), str(work)], check=True)
                site = base_manifest["site_packages"]
                agent.install_agent(payload, work, work / site.lstrip("/"))
                compiled = [f"{site}/vsockrpc"]
                if spec is not None:
                    spec_layers.install_top(spec, work, work / site.lstrip("/"), python_dir)
                    compiled += [
                        f"{site}/{n}" for n in spec_layers.top_level_names(spec, python_dir)
                    ]
                _compile(work, compiled, epoch)
                rootfs.clamp_mtimes(work, epoch)
                ext4.make_ext4(work, tmp / FILES["rootfs"], key=key, epoch=epoch)
                shutil.rmtree(work)
            if own is not None:
                # Everything is built in and the kernel mounts the root: an empty initrd (the
                # launcher always passes one), and the kernel files as built.
                (tmp / FILES["initrd"]).write_bytes(initramfs.write_newc([], mtime=epoch))
                shutil.copyfile(own.bzimage, tmp / FILES["kernel"])
                shutil.copyfile(own.vmlinux, tmp / PVH_KERNEL)
                kernel_info = {"version": own.version, "package": own.source, "kind": "tailored"}
            else:
                with step("loader initramfs (busybox + virtio/vsock modules)"):
                    mods = modules.load_order(cloud.modules_dir)
                    (tmp / FILES["initrd"]).write_bytes(
                        initramfs.build_loader(busybox, mods, cloud.modules_dir, mtime=epoch)
                    )
                    shutil.copyfile(cloud.vmlinuz, tmp / FILES["kernel"])
                with step("PVH kernel (uncompressed, skips the in-guest decompressor)"):
                    pvh.extract_pvh_kernel(cloud.vmlinuz, tmp / PVH_KERNEL)
                kernel_info = {"version": cloud.version, "package": base_manifest["kernel_package"]}
            manifest = {
                "format": FORMAT,
                "key": key,
                "arch": cloud.arch,
                "release": release,
                "cmdline": cmdline,
                "inputs": inputs,
                "kernel": kernel_info,
                "agent": {"version": _agent_version(), "digest": inputs["agent"]},
                "python": base_manifest["python"],
                "packages": base_manifest["packages"],
                "wheels": base_manifest["wheels"],
                "busybox": f"{busybox_pkg.name} {busybox_pkg.version}",
                "files": {
                    name: {
                        "sha256": cache.file_digest(tmp / name),
                        "size": (tmp / name).stat().st_size,
                    }
                    for name in (*FILES.values(), PVH_KERNEL)
                    if (tmp / name).is_file()
                },
            }
            if spec is not None:
                manifest["spec"] = spec_layers.spec_manifest(spec, user_set)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if name is not None:
        names.register(name, entry.path, spec.path if spec is not None else None, cache_root)
    keep = names.protected(cache_root)
    cache.prune("images", keep=KEEP_IMAGES, root=cache_root, protect=keep["images"])
    cache.prune("python", keep=KEEP_BASES, root=cache_root, protect=keep["python"])
    cache.prune("base", keep=KEEP_BASES, root=cache_root, protect=keep["base"])
    cache.prune("kernels", keep=KEEP_BASES, root=cache_root)  # images hold copies of theirs
    return find_image(entry.path)


def _require_space(cache_root: Path, base_cached: bool) -> None:
    """Fail before building when the cache's filesystem clearly cannot hold the build: the
    base needs its rootfs (≈400 MB with the package cache), the image layer a working copy
    of it plus the ext4 file (≈600 MB while it is built)."""
    need = NEED_IMAGE_BYTES + (0 if base_cached else NEED_BASE_BYTES)
    free = shutil.disk_usage(cache_root).free
    if free < need:
        raise ImageError(
            f"not enough free space for an image build in {cache_root}: about "
            f"{need / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free",
            hint="free some with: vsockrpc image prune (or set VSOCKRPC_CACHE elsewhere)",
        )


def _agent_version() -> str:
    from vsockrpc import __version__

    return __version__


def find_image(path: Path | str, *, cache_hit: bool = False) -> ImageInfo:
    """Validate an image directory (or its manifest.json) for booting on this host."""
    path = Path(path)
    if path.name == MANIFEST:
        path = path.parent
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ImageError(
            f"no guest image at {path} (no {MANIFEST})", hint="build one with: vsockrpc image build"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise ImageError(f"unreadable image manifest {manifest_path}: {err}") from err
    for name in FILES.values():
        if not (path / name).is_file():
            raise ImageError(
                f"guest image {path} is incomplete: {name} is missing",
                hint="rebuild it with: vsockrpc image build",
            )
    host = debs.host_arch()
    if manifest.get("arch") != host:
        raise ImageError(
            f"guest image {path} was built for {manifest.get('arch')}, this host is {host}"
        )
    return ImageInfo(path, manifest, cache_hit)


def export_image(info: ImageInfo, out: Path) -> ImageInfo:
    """Copy the image's files into ``out`` (manifest last, each file renamed into place).

    Copies, not hard links: a user editing the exported files must not alter the cache.
    """
    out.mkdir(parents=True, exist_ok=True)
    names = [*FILES.values(), *([PVH_KERNEL] if info.pvh_kernel else []), MANIFEST]
    for name in names:
        tmp = out / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            subprocess.run(
                ["cp", "--sparse=always", "--reflink=auto", str(info.path / name), str(tmp)],
                check=True,
                capture_output=True,
            )
            os.replace(tmp, out / name)
        except (OSError, subprocess.CalledProcessError) as err:
            tmp.unlink(missing_ok=True)
            raise ImageError(f"cannot write {out / name}: {err}") from err
    return find_image(out, cache_hit=info.cache_hit)
