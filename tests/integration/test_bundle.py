"""`vsockrpc bundle`: the single-file agent runs on a bare Python and serves the agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vsockrpc.bundle import build_bundle
from vsockrpc.sdk import Guest

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

HOST_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
# The interpreter under the virtualenv, run with -I -S: no site-packages, so only what the
# bundle carries can be imported.
BARE_PYTHON = getattr(sys, "_base_executable", sys.executable)


@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "vsockrpc-agent"
    info = build_bundle(out, pythons=(HOST_PYTHON,))
    assert info.size > 1_000_000 and os.access(out, os.X_OK)
    return out


@pytest.fixture
def short_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="bundle-", dir="/tmp") as d:
        yield d


def _bare(bundle: Path, *args: str) -> list[str]:
    return [BARE_PYTHON, "-I", "-S", str(bundle), *args]


def test_bundle_serves_the_agent_on_a_bare_python(bundle_file: Path, short_dir: str) -> None:
    address = f"unix:{short_dir}/agent.sock"
    env = {"PATH": os.environ["PATH"], "VSOCKRPC_BUNDLE_CACHE": f"{short_dir}/cache"}
    proc = subprocess.Popen(
        _bare(bundle_file, "--listen", address),
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        with Guest(address, wait=60) as g:
            result = g.run(["sh", "-c", "echo from-bundle; exit 3"])
            assert (result.exit_code, result.stdout) == (3, b"from-bundle\n")
            info = g.info()
            assert info.agent_pid == proc.pid
            assert info.python_version.startswith(HOST_PYTHON)
        extracted = os.listdir(f"{short_dir}/cache")
        assert len(extracted) == 1 and extracted[0].endswith(f"-cp3{sys.version_info[1]}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_bundle_info_and_missing_python(bundle_file: Path, tmp_path: Path) -> None:
    shown = subprocess.run(
        _bare(bundle_file, "--bundle-info"),
        capture_output=True,
        timeout=60,
        check=True,
    )
    manifest = json.loads(shown.stdout)
    assert manifest["pythons"] == [HOST_PYTHON]
    assert any(w.startswith("grpcio-") for w in manifest["wheels"])
    other = "3.12" if HOST_PYTHON != "3.12" else "3.13"
    wrong = build_bundle(tmp_path / "wrong", pythons=(other,))
    done = subprocess.run(
        _bare(wrong.path, "--listen", f"unix:{tmp_path}/x.sock"),
        env={"VSOCKRPC_BUNDLE_CACHE": str(tmp_path / "cache")},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert b"no grpcio for Python" in done.stderr and other.encode() in done.stderr


def test_bundle_build_is_reproducible(bundle_file: Path, tmp_path: Path) -> None:
    again = build_bundle(tmp_path / "again", pythons=(HOST_PYTHON,))
    assert again.path.read_bytes() == bundle_file.read_bytes()


def test_bundle_cli_offline_without_wheels_fails_cleanly(tmp_path: Path) -> None:
    empty = tmp_path / "wheels"
    empty.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vsockrpc.cli.main",
            "bundle",
            "-o",
            str(tmp_path / "b"),
            "--wheel-dir",
            str(empty),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert b"no manylinux x86_64 wheel of grpcio" in done.stderr
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["wheels"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--python", "2.7"],
            "--python 2.7: unsupported Python version '2.7': expected 3.11 or later",
        ),
        (["-o", "{tmp}"], "is a directory"),
        (["-o", "/proc/vsockrpc-bundle.pyz"], "cannot write there: No such file or directory"),
        (["-o", "{tmp}/file/b.pyz"], "{tmp}/file is not a directory"),
    ],
)
def test_bundle_cli_bad_input_is_one_line_before_any_download(
    tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "file").write_text("a file, not a directory")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "b.pyz")]
    # --offline: had the checks passed, the build would fail differently (no cached wheels) or run
    done = subprocess.run(
        [sys.executable, "-m", "vsockrpc.cli.main", "bundle", "--offline", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].endswith(message.replace("{tmp}", str(tmp_path)))
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
