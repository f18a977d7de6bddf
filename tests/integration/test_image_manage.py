"""Image management on a cache of stand-in entries: names, list, rm, prune (never what is
named or in use), export (raw, qcow2, dir) with the kernel command line next to it, and the
CLI's one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vsockrpc.errors import ImageError
from vsockrpc.image import manage, names
from vsockrpc.image.build import ImageInfo

pytestmark = pytest.mark.timeout(120)


def _entry(root: Path, kind: str, key: str, inputs: dict[str, str] | None = None) -> Path:
    path = root / kind / key
    path.mkdir(parents=True)
    if kind == "images":
        for name in ("vmlinuz", "initrd.cpio", "rootfs.ext4", "vmlinux"):
            (path / name).write_bytes(name.encode() * 1000)
        manifest = {"cmdline": f"console=ttyS0 init=/x key={key}", "arch": "amd64"}
        manifest["inputs"] = inputs or {}  # type: ignore[assignment]
        kernel = {"version": "6.12", **({"kind": "tailored"} if key == "recent" else {})}
        manifest["kernel"] = kernel  # type: ignore[assignment]
        (path / "manifest.json").write_text(json.dumps(manifest))
    else:
        (path / "data").write_bytes(b"x" * 5000)
    old = time.time() - 7200
    os.utime(path, (old, old))
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    for key in ("b1", "b2"):
        _entry(root, "base", key)
    _entry(root, "python", "p1")
    _entry(root, "images", "named", {"base": "b1", "python_layer": "p1"})
    _entry(root, "images", "running", {"base": "b2"})
    _entry(root, "images", "old", {"base": "b2"})
    recent = _entry(root, "images", "recent", {"base": "b2"})
    os.utime(recent)
    names.register("kv", root / "images" / "named", Path("/src/kv/vsockrpc.toml"), root)
    return root


def test_names_resolve_list_and_protect_their_layers(cache: Path) -> None:
    assert names.resolve("kv", cache) == cache / "images" / "named"
    assert names.locate("kv", cache) == cache / "images" / "named"
    with pytest.raises(ImageError, match="no image named 'nope'"):
        names.resolve("nope", cache)
    assert names.protected(cache) == {
        "images": frozenset({"named"}),
        "base": frozenset({"b1"}),
        "python": frozenset({"p1"}),
    }
    rows = manage.list_images(cache)
    assert [(r.name, r.path.name) for r in rows][:2] == [("kv", "named"), (None, "recent")]
    assert rows[0].spec == "/src/kv/vsockrpc.toml" and rows[0].size > 0
    assert [r.kernel for r in rows[:2]] == ["debian", "tailored"]
    assert set(manage.disk_usage(cache)) == {"images", "python", "base"}
    _entry(cache, "kernels", "k1")
    assert manage.disk_usage(cache)["kernels"] > 0


def test_prune_keeps_named_in_use_and_the_latest_unnamed_then_unused_layers(
    cache: Path,
) -> None:
    removed = manage.prune([cache / "images" / "running"], keep_unnamed=1, cache_root=cache)
    assert sorted((kind, path.name) for kind, path, _ in removed) == [("images", "old")]
    left = sorted(p.name for p in (cache / "images").iterdir() if p.is_dir())
    assert left == ["named", "recent", "running"]
    names.remove("kv", cache)
    removed = manage.prune([], keep_unnamed=0, cache_root=cache)
    assert sorted((kind, path.name) for kind, path, _ in removed) == [
        ("base", "b1"),
        ("base", "b2"),
        ("images", "named"),
        ("images", "recent"),
        ("images", "running"),
        ("python", "p1"),
    ]


def test_rm_refuses_an_image_in_use_and_removes_an_unused_one(cache: Path) -> None:
    image = cache / "images" / "named"
    with pytest.raises(ImageError, match="in use by a running VM"):
        manage.remove("kv", [image], cache)
    assert image.is_dir()
    assert manage.remove("kv", [], cache) is True
    assert not image.exists() and names.entries(cache) == []


@pytest.mark.parametrize(
    ("fmt", "rootfs"), [("raw", "rootfs.raw"), ("dir", "rootfs.ext4"), ("qcow2", "rootfs.qcow2")]
)
def test_export_writes_kernel_rootfs_manifest_and_cmdline(
    cache: Path, tmp_path: Path, fmt: str, rootfs: str
) -> None:
    path = cache / "images" / "named"
    info = ImageInfo(path, json.loads((path / "manifest.json").read_text()))
    if fmt == "qcow2":  # qemu-img needs a real disk image: a small ext4-sized file
        with (path / "rootfs.ext4").open("wb") as f:
            f.truncate(1 << 20)
    out = tmp_path / "out"
    written = manage.export(info, out, fmt)
    assert sorted(p.name for p in written) == sorted(
        ["vmlinuz", "initrd.cpio", "vmlinux", rootfs, "manifest.json", "cmdline"]
    )
    assert (out / "cmdline").read_text() == "console=ttyS0 init=/x key=named\n"
    if fmt != "qcow2":
        assert (out / rootfs).read_bytes() == (path / "rootfs.ext4").read_bytes()
    else:
        assert (out / rootfs).read_bytes()[:4] == b"QFI\xfb"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_cli_list_rm_and_bad_names(cache: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vsockrpc.cli.main", "image", *args, "--cache", str(cache)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    listed = cli("list")
    assert listed.returncode == 0, listed.stderr
    header, first = (line.split() for line in listed.stdout.splitlines()[:2])
    assert header[header.index("KERNEL") - 1 :][:2] == ["BUILT", "KERNEL"]
    assert first[0] == "kv" and first[-1] == "/src/kv/vsockrpc.toml" and "debian" in first
    assert listed.stdout.splitlines()[-1].startswith("cache: ")
    missing = cli("rm", "nope")
    assert missing.returncode == 1
    assert missing.stderr.splitlines()[0] == "vsockrpc: error: no image named 'nope'"
    for bad in ("../kv", "kv/..", "", "KV"):  # a name is never a path: usage error, nothing read
        refused = cli("rm", bad)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.splitlines() == [
            f"vsockrpc: error: {bad!r} is not a valid image name (a-z 0-9 . _ -, at most 63)"
        ]
    assert cli("rm", "kv").returncode == 0
    assert not (cache / "images" / "named").exists()
