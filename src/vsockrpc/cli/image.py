"""``vsockrpc image build``: build (or find in the cache) the guest image."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vsockrpc._stopsignals import interrupting
from vsockrpc.cli._args import KERNELS
from vsockrpc.cli._output import step


def register(sub: argparse._SubParsersAction[Any]) -> None:
    image = sub.add_parser("image", help="guest images", description="Build guest images.")
    image_sub = image.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    build = image_sub.add_parser(
        "build",
        help="build the guest image (cached by its inputs)",
        description=(
            "Build a Debian guest image: mmdebstrap rootfs with python3, grpcio/protobuf wheels "
            "and the vsockrpc agent as init, Debian's cloud kernel, a busybox loader initramfs. "
            "Same inputs reuse the cached image. Needs root, mmdebstrap and apt."
        ),
    )
    build.add_argument("--release", default="bookworm", help="Debian release (default bookworm)")
    build.add_argument(
        "--mirror", metavar="URI", help="Debian mirror (default: as /etc/apt/sources.list* say)"
    )
    build.add_argument("--out", metavar="DIR", type=Path, help="also place the image files here")
    build.add_argument("--cache", metavar="DIR", type=Path, help="cache root (or $VSOCKRPC_CACHE)")
    build.add_argument("--json", action="store_true", help="print the manifest as JSON")
    build.add_argument(
        "--spec",
        metavar="FILE",
        type=Path,
        help="image spec (vsockrpc.toml): your packages, files and services (docs/spec.md)",
    )
    build.add_argument("--name", help="name of the image (default: the spec's name)")
    build.add_argument(
        "--kernel",
        choices=KERNELS,
        help="debian (the default, unless the spec says kernel = ...): Debian's cloud kernel "
        "and a loader initramfs; tailored: a "
        "kernel built once from Debian's source with what a guest needs built in, no "
        "modules, no loader (~1 s faster boot under TCG; docs/system.md)",
    )
    build.set_defaults(func=_build)

    lst = image_sub.add_parser(
        "list",
        help="list images and cache disk use",
        description="Built images: name, "
        "spec, size, when built, which running VMs use them; then disk use per cache layer.",
    )
    lst.add_argument("--cache", metavar="DIR", type=Path, help="cache root (or $VSOCKRPC_CACHE)")
    lst.set_defaults(func=_list)
    rm = image_sub.add_parser("rm", help="remove a named image")
    rm.add_argument("name", metavar="NAME")
    rm.add_argument("--cache", metavar="DIR", type=Path, help="cache root (or $VSOCKRPC_CACHE)")
    rm.set_defaults(func=_rm)
    prune = image_sub.add_parser(
        "prune",
        help="remove unused images and layers",
        description="Remove images that are not named, not used by a running VM and not the "
        "most recently used unnamed one(s), then the layers no remaining image uses.",
    )
    prune.add_argument(
        "--keep", type=int, default=1, metavar="N", help="unnamed images to keep (1)"
    )
    prune.add_argument("--cache", metavar="DIR", type=Path, help="cache root (or $VSOCKRPC_CACHE)")
    prune.set_defaults(func=_prune)
    export = image_sub.add_parser(
        "export",
        help="write an image out for another hypervisor",
        description="Write NAME's kernel (bzImage and PVH vmlinux), loader initramfs, root "
        "filesystem (raw ext4, qcow2, or the cache's files as they are with dir), manifest "
        "and `cmdline` (the kernel command line the agent needs) into DIR.",
    )
    export.add_argument("name", metavar="NAME|DIR", help="a named image or an image directory")
    export.add_argument("--format", choices=("raw", "qcow2", "dir"), default="raw")
    export.add_argument("-o", "--out", type=Path, required=True, metavar="DIR")
    export.set_defaults(func=_export)


def load_spec_and_name(spec_file: Path | None, name: str | None) -> tuple[Any, str | None]:
    """The validated spec (or None) and the image name; SpecError (exit 2) before a build."""
    from vsockrpc.errors import SpecError
    from vsockrpc.payload import load_spec, require_spec_name

    if spec_file is None:
        if name is not None:
            raise SpecError("--name needs --spec (a plain image has no name)")
        return None, None
    spec = load_spec(spec_file)
    if name is None and spec.name is None:
        return spec, None  # built and cached, but not named
    return spec, require_spec_name(spec, name)


def _build(args: argparse.Namespace) -> int:
    from vsockrpc.image import build_image, export_image

    spec, name = load_spec_and_name(args.spec, args.name)
    with interrupting():  # SIGTERM/SIGHUP unwind the build: its tools and temporary trees go
        info = build_image(
            release=args.release,
            mirror_uri=args.mirror,
            step=step,
            cache_root=args.cache,
            spec=spec,
            name=name,
            kernel=args.kernel,
        )
    if args.out is not None:
        info = export_image(info, args.out)
    if args.json:
        print(json.dumps(info.manifest, indent=2, sort_keys=True))
        return 0
    kernel = info.manifest["kernel"]["version"]
    if info.manifest["kernel"].get("kind") == "tailored":
        kernel += ", tailored"
    how = "cached" if info.cache_hit else "built"
    label = f"image {name}" if name else "image"
    print(f"{label}: {info.path} ({how}; {info.size / 1e6:.0f} MB; kernel {kernel})")
    return 0


def _in_use() -> dict[Path, list[str]]:
    """Image directory → names of the VMs on this host running it."""
    from vsockrpc.vm.registry import list_vms

    users: dict[Path, list[str]] = {}
    for record in list_vms():
        if record.running and record.state.get("image"):
            users.setdefault(Path(str(record.state["image"])).resolve(), []).append(record.name)
    return users


def _mb(size: int) -> str:
    return f"{size / 1e6:.0f} MB"


def _list(args: argparse.Namespace) -> int:
    import time

    from vsockrpc.image import manage

    users = _in_use()
    rows = manage.list_images(args.cache)
    print(f"{'NAME':<20} {'SIZE':>8}  {'BUILT':<16}  {'KERNEL':<8}  {'IN USE BY':<12} SPEC")
    for row in rows:
        built = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.created))
        vms = ",".join(users.get(row.path.resolve(), [])) or "-"
        name = row.name or f"({row.path.name[:12]})"
        print(
            f"{name:<20} {_mb(row.size):>8}  {built:<16}  {row.kernel:<8}  {vms:<12} "
            f"{row.spec or '-'}"
        )
    usage = manage.disk_usage(args.cache)
    parts = ", ".join(f"{kind} {_mb(size)}" for kind, size in usage.items())
    print(f"cache: {_mb(sum(usage.values()))} ({parts})")
    return 0


def _rm(args: argparse.Namespace) -> int:
    from vsockrpc.image import manage

    removed = manage.remove(args.name, list(_in_use()), args.cache)
    print(f"image {args.name} removed" + ("" if removed else " (its files stay: still used)"))
    return 0


def _prune(args: argparse.Namespace) -> int:
    from vsockrpc.image import manage

    if args.keep < 0:
        from vsockrpc.errors import SpecError

        raise SpecError(f"--keep must be 0 or more, not {args.keep}")
    removed = manage.prune(list(_in_use()), keep_unnamed=args.keep, cache_root=args.cache)
    for kind, path, size in removed:
        print(f"removed {kind}/{path.name[:16]} ({_mb(size)})")
    print(f"freed {_mb(sum(size for _, _, size in removed))}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from vsockrpc.image import find_image, manage, names

    target = args.name
    source = (
        names.resolve(target)
        if names.valid_name(target) and not Path(target).exists()
        else Path(target)
    )
    info = find_image(source)
    written = manage.export(info, args.out, args.format)
    for path in written:
        print(path)
    return 0
