"""Bad input to ``image build`` / ``vm run``: one clear line, non-zero exit, nothing left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vsockrpc.image.debs import host_arch
from vsockrpc.vm import cid

CLI = [sys.executable, "-m", "vsockrpc.cli.main"]
pytestmark = pytest.mark.timeout(60)


def vsockrpc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
        env={**os.environ, **(env or {})},
    )


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("hint:")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vsockrpc: error: ")
    return lines[0]


def fake_image(root: Path, arch: str) -> Path:
    root.mkdir()
    for name in ("vmlinuz", "initrd.cpio", "rootfs.ext4"):
        (root / name).write_bytes(b"not really")
    (root / "manifest.json").write_text(json.dumps({"arch": arch, "cmdline": "quiet"}))
    return root


def test_missing_image(tmp_path: Path) -> None:
    line = one_error_line(vsockrpc("vm", "run", "--image", str(tmp_path / "nope")))
    assert "no guest image at" in line


def test_incomplete_image(tmp_path: Path) -> None:
    image = fake_image(tmp_path / "img", host_arch())
    (image / "vmlinuz").unlink()
    line = one_error_line(vsockrpc("vm", "run", "--image", str(image)))
    assert "vmlinuz is missing" in line


def test_image_for_another_arch(tmp_path: Path) -> None:
    other = "arm64" if host_arch() != "arm64" else "amd64"
    line = one_error_line(vsockrpc("vm", "run", "--image", str(fake_image(tmp_path / "i", other))))
    assert f"built for {other}" in line


def test_busy_cid(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir()
    held = cid.lease(runtime)  # another "VM" holds this CID
    try:
        image = fake_image(tmp_path / "img", host_arch())
        proc = vsockrpc(
            "vm",
            "run",
            "--image",
            str(image),
            "--cid",
            str(held.cid),
            env={"VSOCKRPC_RUNTIME_DIR": str(runtime)},
        )
        line = one_error_line(proc)
        assert f"CID {held.cid} is busy" in line
        assert not list((runtime / "vms").glob("*")) if (runtime / "vms").exists() else True
    finally:
        held.close()


def test_qemu_not_installed(tmp_path: Path) -> None:
    image = fake_image(tmp_path / "img", host_arch())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dpkg",):  # what runs before QEMU is looked up
        (bin_dir / tool).symlink_to(f"/usr/bin/{tool}")
    line = one_error_line(vsockrpc("vm", "run", "--image", str(image), env={"PATH": str(bin_dir)}))
    assert "QEMU is not installed" in line


def test_unwritable_cache_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = one_error_line(vsockrpc("image", "build", env={"VSOCKRPC_CACHE": str(blocker / "c")}))
    assert "is not writable" in line
    assert blocker.read_text() == ""


def test_not_root_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty cache forces a base build, which needs root; pretend to be an ordinary user.
    from vsockrpc.errors import ImageError
    from vsockrpc.image import build_image, rootfs
    from vsockrpc.image.cache import cache_root

    monkeypatch.setattr(rootfs.os, "geteuid", lambda: 1000)
    cache = tmp_path / "cache"
    cache.mkdir()
    for shared in ("debs", "apt"):  # reuse downloaded packages; the base layer is what's new
        (cache_root() / shared).mkdir(exist_ok=True)
        (cache / shared).symlink_to(cache_root() / shared)
    with pytest.raises(ImageError, match="needs root") as info:
        build_image(cache_root=cache)
    assert info.value.hint is not None and "root" in info.value.hint
    assert not [p for p in cache.rglob("*") if p.name.startswith(".tmp-")]
    assert not [p for p in (cache / "base").iterdir() if not p.name.endswith(".lock")]


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--port", "4294967296", "agent port 4294967296 is invalid"),
        ("--port", "0", "agent port 0 is invalid"),
        ("--timeout", "-1", "timeout -1.0 s is invalid"),
        ("--timeout", "nan", "timeout nan s is invalid"),
        ("--timeout", "inf", "timeout inf s is invalid"),
        ("--cpus", "1000", "1000 CPUs is invalid"),
        ("--cpus", "0", "0 CPUs is invalid"),
        ("--memory", "1", "memory 1 MiB is invalid"),
        ("--memory", "16", "memory 16 MiB is invalid"),
        ("--cid", "0", "guest CID 0 is invalid"),
        ("--cid", "1", "guest CID 1 is invalid"),
        ("--cid", "2", "guest CID 2 is invalid"),
        ("--cid", "4294967295", "guest CID 4294967295 is invalid"),
        ("--name", "..", "VM name '..' is invalid"),
        ("--group", "../vms", "group name '../vms' is invalid"),
        ("--group", "", "group name '' is invalid"),
        ("--trust-group", None, "--trust-group needs --group"),
    ],
)
def test_bad_boot_option_is_a_usage_error(
    tmp_path: Path, option: str, value: str | None, says: str
) -> None:
    runtime = tmp_path / "run"
    image = fake_image(tmp_path / "img", host_arch())
    start = time.monotonic()
    proc = vsockrpc(
        "vm",
        "run",
        "--image",
        str(image),
        *([option] if value is None else [option, value]),
        env={"VSOCKRPC_RUNTIME_DIR": str(runtime)},
    )
    assert proc.returncode == 2, proc.stderr
    assert says in one_error_line(proc)
    assert time.monotonic() - start < 20  # refused up front, not after a boot attempt
    assert not runtime.exists()  # nothing created, not even the runtime dir


def test_demo_validates_before_building_an_image(tmp_path: Path) -> None:
    blocker = tmp_path / "file"  # an image build would fail on this cache; validation is first
    blocker.write_text("")
    proc = vsockrpc("demo", "--memory", "16", env={"VSOCKRPC_CACHE": str(blocker / "c")})
    assert proc.returncode == 2, proc.stderr
    assert "memory 16 MiB is invalid" in one_error_line(proc)


@pytest.mark.parametrize("name", ["..", ".", "../vms", "a/b", "-x", ".hidden", "x" * 64, "a b"])
def test_name_that_is_a_path_deletes_nothing(tmp_path: Path, name: str) -> None:
    runtime = tmp_path / "run"
    for kept in (runtime / "vms" / "other" / "console.log", runtime / "cids" / "3.lock"):
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text("keep me")
    image = fake_image(tmp_path / "img", host_arch())
    env = {"VSOCKRPC_RUNTIME_DIR": str(runtime)}
    proc = vsockrpc("vm", "run", "--image", str(image), f"--name={name}", env=env)
    assert proc.returncode == 2, proc.stderr
    assert "VM name" in one_error_line(proc)
    assert (runtime / "vms" / "other" / "console.log").read_text() == "keep me"
    assert (runtime / "cids" / "3.lock").read_text() == "keep me"
    for command in (("vm", "stop", "--", name),):
        proc = vsockrpc(*command, env=env)
        assert proc.returncode == 2, proc.stderr
        assert "VM name" in one_error_line(proc)


def test_absolute_name_does_not_empty_that_directory(tmp_path: Path) -> None:
    # Only ever a directory under tmp_path: code without the name check empties whatever
    # directory such a name points at (as root, a system directory would be destroyed).
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "data").write_text("keep me")
    image = fake_image(tmp_path / "img", host_arch())
    proc = vsockrpc(
        "vm",
        "run",
        "--image",
        str(image),
        "--name",
        str(victim),
        env={"VSOCKRPC_RUNTIME_DIR": str(tmp_path / "run")},
    )
    assert proc.returncode == 2, proc.stderr
    assert (victim / "data").read_text() == "keep me"


def test_foreign_directory_in_the_way_is_not_removed(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    foreign = runtime / "vms" / "mine"
    foreign.mkdir(parents=True)
    (foreign / "notes").write_text("keep me")
    image = fake_image(tmp_path / "img", host_arch())
    proc = vsockrpc(
        "vm",
        "run",
        "--image",
        str(image),
        "--name",
        "mine",
        env={"VSOCKRPC_RUNTIME_DIR": str(runtime)},
    )
    assert proc.returncode == 1
    assert "was not created by vsockrpc" in one_error_line(proc)
    assert (foreign / "notes").read_text() == "keep me"


@pytest.mark.parametrize("lock", ["names/mine.lock", "cids/7.lock"])
def test_planted_lock_symlink_is_not_followed(tmp_path: Path, lock: str) -> None:
    # Without O_NOFOLLOW the launcher opened the link's target read-write and truncated it.
    runtime = tmp_path / "run"
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (runtime / lock).parent.mkdir(parents=True)
    (runtime / lock).symlink_to(victim)
    image = fake_image(tmp_path / "img", host_arch())
    proc = vsockrpc(
        "vm",
        "run",
        "--image",
        str(image),
        "--name",
        "mine",
        "--cid",
        "7",
        env={"VSOCKRPC_RUNTIME_DIR": str(runtime)},
    )
    assert proc.returncode == 1, proc.stderr
    assert "lock file" in one_error_line(proc)
    assert victim.read_text() == "keep me"
    assert not (runtime / "vms" / "mine").exists()
