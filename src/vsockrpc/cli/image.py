"""``vsockrpc image build``: build (or find in the cache) the guest image."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

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
    build.set_defaults(func=_build)


def load_spec_and_name(spec_file: Path | None, name: str | None) -> tuple[Any, str | None]:
    """The validated spec (or None) and the image name; SpecError (exit 2) before a build."""
    from vsockrpc.errors import SpecError
    from vsockrpc.payload import load_spec, require_spec_name

    if spec_file is None:
        if name is not None:
            raise SpecError("--name needs --spec (a plain image has no name)")
        return None, None
    spec = load_spec(spec_file)
    return spec, require_spec_name(spec, name)


def _build(args: argparse.Namespace) -> int:
    from vsockrpc.image import build_image, export_image

    spec, name = load_spec_and_name(args.spec, args.name)
    info = build_image(
        release=args.release,
        mirror_uri=args.mirror,
        step=step,
        cache_root=args.cache,
        spec=spec,
        name=name,
    )
    if args.out is not None:
        info = export_image(info, args.out)
    if args.json:
        print(json.dumps(info.manifest, indent=2, sort_keys=True))
        return 0
    kernel = info.manifest["kernel"]["version"]
    how = "cached" if info.cache_hit else "built"
    label = f"image {name}" if name else "image"
    print(f"{label}: {info.path} ({how}; {info.size / 1e6:.0f} MB; kernel {kernel})")
    return 0
