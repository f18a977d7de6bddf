"""The content-addressed cache: stable keys, atomic publication, clear errors."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from vsockrpc.errors import ImageError
from vsockrpc.image import cache


def test_digest_ignores_dict_order_but_not_values() -> None:
    assert cache.digest({"a": 1, "b": [1, 2]}) == cache.digest({"b": [1, 2], "a": 1})
    assert cache.digest({"a": 1}) != cache.digest({"a": 2})


def test_tree_digest_sees_content_names_and_exec_bits_not_pycache(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    f = tmp_path / "pkg" / "m.py"
    f.write_text("x = 1\n")
    first = cache.tree_digest(tmp_path)
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "m.pyc").write_bytes(b"junk")
    assert cache.tree_digest(tmp_path) == first
    f.chmod(0o755)
    assert cache.tree_digest(tmp_path) != first
    f.chmod(0o644)
    f.write_text("x = 2\n")
    assert cache.tree_digest(tmp_path) != first


def test_entry_appears_only_when_the_build_succeeds(tmp_path: Path) -> None:
    entry = cache.entry("things", "k1", root=tmp_path)
    with pytest.raises(RuntimeError), entry.lock(), entry.build() as tmp:
        (tmp / "half").write_text("half-written")
        raise RuntimeError("build failed")
    assert not entry.exists
    assert list((tmp_path / "things").iterdir()) == [tmp_path / "things" / "k1.lock"]
    with entry.lock(), entry.build() as tmp:
        (tmp / "whole").write_text("done")
    assert entry.exists
    assert (entry.path / "whole").read_text() == "done"


def test_interrupt_leaves_nothing_half_written(tmp_path: Path) -> None:
    entry = cache.entry("things", "k2", root=tmp_path)
    with pytest.raises(KeyboardInterrupt), entry.build() as tmp:
        (tmp / "part").write_bytes(b"x")
        raise KeyboardInterrupt
    assert [p.name for p in (tmp_path / "things").iterdir()] == []


def test_a_build_killed_outright_is_cleared_by_the_next_build_of_its_key(tmp_path: Path) -> None:
    entry = cache.entry("things", "k3", root=tmp_path)
    killed = tmp_path / "things" / ".tmp-k3-dead1234"  # SIGKILL: no finally ran
    (killed / "part").parent.mkdir(parents=True)
    (killed / "part").write_bytes(b"x" * 100)
    other = tmp_path / "things" / ".tmp-k4-alive567"  # another key's build, maybe running
    other.mkdir()
    with entry.lock(), entry.build() as tmp:
        assert not killed.exists()
        (tmp / "whole").write_text("done")
    assert entry.exists and other.is_dir()


def test_unwritable_cache_root_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ImageError, match="not writable") as info:
        cache.cache_root(blocker / "cache")
    assert info.value.hint is not None and "VSOCKRPC_CACHE" in info.value.hint


def test_cache_root_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VSOCKRPC_CACHE", str(tmp_path / "c"))
    assert cache.cache_root() == (tmp_path / "c").resolve()
    assert (tmp_path / "c").is_dir()


def test_prune_keeps_recent_and_locked_entries(tmp_path: Path) -> None:
    now = time.time()
    for i in range(6):
        e = cache.entry("images", f"k{i}", root=tmp_path)
        with e.lock(), e.build() as tmp:
            (tmp / "f").write_text(str(i))
        os.utime(e.path, (now - 7200 - i * 60, now - 7200 - i * 60))  # k0 newest
    young = cache.entry("images", "young", root=tmp_path)
    with young.lock(), young.build() as tmp:
        (tmp / "f").write_text("y")
    os.utime(young.path, (now - 7200 - 9999, now))  # recently used, though oldest atime
    busy = cache.entry("images", "k5", root=tmp_path)
    with busy.lock():  # being read by someone: must survive
        removed = cache.prune("images", keep=2, min_age=3600, root=tmp_path)
    left = sorted(p.name for p in (tmp_path / "images").iterdir() if p.is_dir())
    # kept: the 2 most recently used (young, k0) and the locked k5; k1..k4 removed
    assert left == ["k0", "k5", "young"]
    assert removed == 4
    cache.touch(tmp_path / "images" / "k5")
    assert (tmp_path / "images" / "k5").stat().st_mtime >= now
    # keep=0: only entries used within min_age survive
    assert cache.prune("images", keep=0, min_age=3600, root=tmp_path) == 1
    left = sorted(p.name for p in (tmp_path / "images").iterdir() if p.is_dir())
    assert left == ["k5", "young"]
