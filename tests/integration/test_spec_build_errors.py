"""An image spec that cannot be built stops before anything is built: a bad spec is exit 2
with one line; an apt package Debian does not have, a pip requirement with no wheel and a pin
that conflicts with the guest's own are one line naming the package, the cache untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vsockrpc.errors import ImageError
from vsockrpc.image import build_image
from vsockrpc.image.cache import cache_root
from vsockrpc.payload import load_spec

pytestmark = pytest.mark.timeout(300)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vsockrpc.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        check=False,
    )


@pytest.mark.parametrize("command", [["image", "build"], ["vm", "run"]])
def test_a_bad_spec_is_exit_2_one_line_and_nothing_built(
    tmp_path: Path, command: list[str]
) -> None:
    spec = tmp_path / "vsockrpc.toml"
    spec.write_text('name = "x"\n\n[[copy]]\nsource = "absent.txt"\ndest = "/etc/absent"\n')
    cache = tmp_path / "cache"
    done = _cli(*command, "--spec", str(spec), env={"VSOCKRPC_CACHE": str(cache)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"vsockrpc: error: {spec}:4: copy[0].source: no such file or directory: absent.txt"
    ]
    assert not cache.exists()


def _layers() -> dict[str, list[str]]:
    root = cache_root()
    return {
        kind: sorted(p.name for p in (root / kind).glob("*")) if (root / kind).is_dir() else []
        for kind in ("base", "python", "images", "names")
    }


def _spec(tmp_path: Path, body: str) -> Path:
    (tmp_path / "wheels").mkdir(exist_ok=True)
    spec = tmp_path / "vsockrpc.toml"
    spec.write_text(f'name = "bad"\npip_find_links = "wheels"\n{body}')
    return spec


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            'apt = ["tree", "no-such-package-vsockrpc"]\n',
            "apt package 'no-such-package-vsockrpc' (image spec) is not in the apt index",
        ),
        ('pip = ["no-such-dist-vsockrpc==1.0"]\n', "no-such-dist-vsockrpc==1.0"),
        ('pip = ["protobuf==3.20.0"]\n', "protobuf==3.20.0"),
    ],
)
def test_a_package_that_cannot_be_had_is_named_and_the_cache_is_untouched(
    tmp_path: Path, body: str, expected: str
) -> None:
    spec = load_spec(_spec(tmp_path, body))
    before = _layers()
    with pytest.raises(ImageError) as info:
        build_image(spec=spec, name="bad")
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
    assert _layers() == before
