"""Rootfs helpers that need no mmdebstrap run: prerequisites, pruning, Python detection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vsockrpc.errors import ImageError
from vsockrpc.image import rootfs


def test_not_root_and_missing_mmdebstrap_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rootfs.os, "geteuid", lambda: 1000)
    with pytest.raises(ImageError, match="needs root"):
        rootfs.require_root("building")
    monkeypatch.setattr(rootfs.os, "geteuid", lambda: 0)
    monkeypatch.setattr(rootfs.shutil, "which", lambda _name: None)
    with pytest.raises(ImageError, match="mmdebstrap not found") as info:
        rootfs.require_root("building")
    assert info.value.hint is not None and "apt-get install mmdebstrap" in info.value.hint


def test_prune_keeps_what_the_agent_needs(tmp_path: Path) -> None:
    for rel in (
        "usr/lib/python3.11/test/t.py",
        "usr/lib/python3.11/os.py",
        "usr/lib/x86_64-linux-gnu/perl/5.36/x.pm",
        "usr/lib/x86_64-linux-gnu/perl-base/strict.pm",
        "usr/lib/x86_64-linux-gnu/gconv/UTF-16.so",
        "var/cache/apt/archives/a.deb",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    rootfs.prune(tmp_path)
    assert (tmp_path / "usr/lib/python3.11/os.py").exists()
    assert (tmp_path / "usr/lib/x86_64-linux-gnu/perl-base/strict.pm").exists()
    assert not (tmp_path / "usr/lib/python3.11/test").exists()
    assert not (tmp_path / "usr/lib/x86_64-linux-gnu/perl").exists()
    assert not (tmp_path / "usr/lib/x86_64-linux-gnu/gconv").exists()
    assert not (tmp_path / "var/cache/apt/archives/a.deb").exists()


def test_guest_python_and_clamped_times(tmp_path: Path) -> None:
    (tmp_path / "usr/lib/python3.11").mkdir(parents=True)
    (tmp_path / "usr/lib/python3.11/os.py").write_text("")
    (tmp_path / "usr/lib/python3").mkdir()  # Debian's dist-packages parent: not a stdlib
    assert rootfs.guest_python(tmp_path) == "3.11"
    (tmp_path / "link").symlink_to("usr/missing")
    rootfs.clamp_mtimes(tmp_path, 1_700_000_000)
    for path in (tmp_path, tmp_path / "usr/lib/python3.11/os.py"):
        assert path.stat().st_mtime == 1_700_000_000
    assert os.lstat(tmp_path / "link").st_mtime == 1_700_000_000
    (tmp_path / "usr/lib/python3.12").mkdir()
    (tmp_path / "usr/lib/python3.12/os.py").write_text("")
    with pytest.raises(ImageError, match="expected one Python 3"):
        rootfs.guest_python(tmp_path)
