"""The tailored guest kernel's recipe: the Kconfig fragment, the check that Kconfig kept every
option, what the build needs and the series it builds (the build itself: the vm tier,
tests/vm/test_tailored_kernel.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsockrpc.cli._args import KERNELS as CLI_KERNELS
from vsockrpc.errors import ImageError
from vsockrpc.image import build, tailored
from vsockrpc.payload import ImageSpec, load_spec


def full_config() -> str:
    """A .config holding every option as the fragment asks (``n`` ones simply absent)."""
    lines = [f"CONFIG_{name}={value}" for name, value in tailored.OPTIONS if value != "n"]
    return "\n".join(["# generated", "CONFIG_OTHER=y", *lines]) + "\n"


def test_the_fragment_names_each_option_once_as_kconfig_writes_it() -> None:
    names = [name for name, _ in tailored.OPTIONS]
    assert len(names) == len(set(names))
    text = tailored.fragment().splitlines()
    assert "CONFIG_VIRTIO_VSOCKETS=y" in text
    assert "CONFIG_NR_CPUS=64" in text
    assert "# CONFIG_MODULES is not set" in text
    assert not any(line.endswith("=n") for line in text)


def test_a_config_with_every_option_passes_the_check() -> None:
    assert tailored.not_taken(full_config()) == []


@pytest.mark.parametrize(
    ("edit", "refused"),
    [
        (("CONFIG_VIRTIO_VSOCKETS=y\n", ""), "CONFIG_VIRTIO_VSOCKETS=y"),
        (("CONFIG_HOTPLUG_PCI_PCIE=y", "CONFIG_HOTPLUG_PCI_PCIE=m"), "CONFIG_HOTPLUG_PCI_PCIE=y"),
        (("CONFIG_OTHER=y", "CONFIG_MODULES=y"), "CONFIG_MODULES=n"),
        (("CONFIG_NR_CPUS=64", "CONFIG_NR_CPUS=8"), "CONFIG_NR_CPUS=64"),
    ],
)
def test_an_option_kconfig_dropped_or_changed_is_named(edit: tuple[str, str], refused: str) -> None:
    config = full_config().replace(*edit)
    assert tailored.not_taken(config) == [refused]


@pytest.mark.parametrize(
    ("version", "series"),
    [("6.12.95+deb12-cloud-amd64", "6.12"), ("6.1.0-28-cloud-amd64", "6.1"), ("7.0", "7.0")],
)
def test_the_series_comes_from_the_cloud_kernel_release(version: str, series: str) -> None:
    assert tailored.series_of(version) == series


@pytest.mark.parametrize("version", ["", "6", "x.y.z", "6.-1"])
def test_a_release_without_a_series_is_an_error(version: str) -> None:
    with pytest.raises(ImageError, match="series of kernel"):
        tailored.series_of(version)


def test_missing_build_tools_are_named_by_their_packages(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tailored.shutil, "which", lambda prog: None if prog == "flex" else "/x")
    monkeypatch.setattr(tailored, "LIBELF_HEADER", tmp_path / "gelf.h")
    assert tailored.missing_tools() == ["flex", "libelf-dev"]
    (tmp_path / "gelf.h").write_text("")
    monkeypatch.setattr(tailored.shutil, "which", lambda prog: "/usr/bin/" + prog)
    assert tailored.missing_tools() == []


def test_other_architectures_are_refused_before_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tailored.debs, "host_arch", lambda: "arm64")
    with pytest.raises(ImageError, match="amd64 guests only, not arm64"):
        tailored.build_tailored(
            "6.12", index=tailored.debs.HOST_INDEX, step=build._no_progress, cache_root=tmp_path
        )
    assert list(tmp_path.iterdir()) == []


def test_the_build_stops_before_any_download_without_its_tools(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tailored.debs, "host_arch", lambda: "amd64")
    monkeypatch.setattr(tailored, "missing_tools", lambda: ["bison", "flex"])

    def no_apt(*_a: object, **_k: object) -> None:
        raise AssertionError("apt was asked")

    monkeypatch.setattr(tailored.debs, "resolve", no_apt)
    with pytest.raises(ImageError, match="needs bison, flex") as caught:
        tailored.build_tailored(
            "6.12", index=tailored.debs.HOST_INDEX, step=build._no_progress, cache_root=tmp_path
        )
    assert caught.value.hint is not None and "apt-get install bison flex" in caught.value.hint
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_kernel_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="unknown kernel 'mine'"):
        build.build_image(kernel="mine", cache_root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_offers_the_kernels_the_builder_knows() -> None:
    assert CLI_KERNELS == tailored.KERNELS


def spec_with(tmp_path: Path, text: str) -> ImageSpec:
    (tmp_path / "vsockrpc.toml").write_text(text)
    return load_spec(tmp_path / "vsockrpc.toml")


def test_the_kernel_is_the_option_else_the_spec_else_debian(tmp_path: Path) -> None:
    tailored_spec = spec_with(tmp_path, 'kernel = "tailored"\n')
    assert tailored_spec.kernel == "tailored"
    assert build.choose_kernel(None, tailored_spec) == "tailored"
    assert build.choose_kernel("debian", tailored_spec) == "debian"  # --kernel wins
    assert build.choose_kernel(None, spec_with(tmp_path, 'name = "x"\n')) == "debian"
    assert build.choose_kernel(None, None) == "debian"
    assert build.choose_kernel("tailored", None) == "tailored"
