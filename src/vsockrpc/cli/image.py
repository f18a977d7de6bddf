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
    build.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    from vsockrpc.image import build_image, export_image

    info = build_image(
        release=args.release, mirror_uri=args.mirror, step=step, cache_root=args.cache
    )
    if args.out is not None:
        info = export_image(info, args.out)
    if args.json:
        print(json.dumps(info.manifest, indent=2, sort_keys=True))
        return 0
    kernel = info.manifest["kernel"]["version"]
    how = "cached" if info.cache_hit else "built"
    print(f"image: {info.path} ({how}; {info.size / 1e6:.0f} MB; kernel {kernel})")
    return 0
