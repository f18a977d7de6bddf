"""Which wheels the payload resolves for a target (pip with ``--no-index --find-links``: no
network). The same wheel names as the bootstrap's test in tests/unit/test_bundle_wheels.py."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tests.unit.test_bundle_wheels import ARM, GRPC311, GRPC312, HEALTH, PROTOBUF
from vsockrpc.errors import PayloadError
from vsockrpc.payload import Target, resolve_wheels

pytestmark = pytest.mark.timeout(180)


def _fake_wheel(directory: Path, filename: str) -> None:
    """A minimal valid wheel (metadata only): enough for pip to resolve and copy it."""
    dist, version, *_ = filename[: -len(".whl")].split("-")
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(directory / filename, "w") as zf:
        zf.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
        )
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: false\n")
        zf.writestr(f"{info}/RECORD", "")


@pytest.fixture
def links(tmp_path: Path) -> Path:
    directory = tmp_path / "links"
    directory.mkdir()
    for name in (GRPC311, GRPC312, PROTOBUF, HEALTH, ARM):
        _fake_wheel(directory, name)
    return directory


def test_resolution_picks_the_cpython_abi3_and_pure_wheels(links: Path) -> None:
    reqs = ["grpcio==1.85.3", "protobuf==7.36.2", "grpcio-health-checking==1.85.1"]
    got = resolve_wheels(reqs, Target("3.12"), find_links=links)
    assert [w.name for w in got.wheels] == sorted([GRPC312, PROTOBUF, HEALTH])
    assert all(w.parent == links for w in got.wheels)
    newer = resolve_wheels(reqs[1:], Target("3.14"), find_links=links)
    assert [w.name for w in newer.wheels] == sorted([PROTOBUF, HEALTH])
    assert sorted(p.name for p in links.iterdir()) == sorted(
        [GRPC311, GRPC312, PROTOBUF, HEALTH, ARM]
    )


def test_no_wheel_for_that_python_or_version_is_one_clear_error(links: Path) -> None:
    with pytest.raises(PayloadError, match=r"no manylinux x86_64 wheel of grpcio==1\.85\.3 for "):
        resolve_wheels(["grpcio==1.85.3"], Target("3.13"), find_links=links)
    with pytest.raises(PayloadError, match=r"of grpcio==1\.85\.2 for Python 3\.11"):
        resolve_wheels(["grpcio==1.85.2"], Target("3.11"), find_links=links)
    with pytest.raises(PayloadError, match="unsupported Python"):
        resolve_wheels(["grpcio==1.85.3"], Target("3.9"), find_links=links)


def test_offline_without_a_cached_set_fails_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(PayloadError, match=r"no cached guest wheels for Python 3\.12"):
        resolve_wheels(["grpcio==1.85.3"], Target("3.12"), cache_root=tmp_path, offline=True)
    assert list(tmp_path.iterdir()) == []
