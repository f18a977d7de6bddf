"""Snapshot and restore pieces that need no QEMU: the hot-pluggable layout, the restore
command line, the boot configuration read back from a command line, snapshot validation."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from vsockrpc.errors import VmError
from vsockrpc.vm.options import InvalidVmOption
from vsockrpc.vm.qemu import QemuConfig, qemu_argv
from vsockrpc.vm.restoring import load_snapshot
from vsockrpc.vm.snapshot import _prepare_out, device_add_args, file_sha256, guest_config

# the module, not the function of the same name that vsockrpc.vm exports
restore_mod = importlib.import_module("vsockrpc.vm.restoring")


def config(**kw: object) -> QemuConfig:
    base: dict[str, object] = dict(
        qemu="qemu-system-x86_64",
        kernel=Path("/i/vmlinux"),
        initrd=Path("/i/initrd.cpio"),
        rootfs=Path("/i/rootfs.ext4"),
        cmdline="console=ttyS0 quiet vsockrpc.port=9999",
        console_log=Path("/r/c"),
        qmp_socket=Path("/r/q"),
        guest_cid=7,
        memory_mib=256,
        cpus=2,
    )
    base.update(kw)
    return QemuConfig(**base)  # type: ignore[arg-type]


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_vsock_device_sits_alone_on_a_hotplug_root_port() -> None:
    argv = qemu_argv(config(vhost_user_socket=Path("/r/vhost.sock")))
    devices = option(argv, "-device")
    assert "pcie-root-port,id=vsock-port,bus=pcie.0,chassis=1" in devices
    assert [d for d in devices if "bus=vsock-port" in d] == [
        "vhost-user-vsock-pci,chardev=vhost-vsock,id=vsock,bus=vsock-port"
    ]
    assert "-incoming" not in argv


def test_userspace_restore_leaves_the_device_to_qmp_and_loads_deferred() -> None:
    argv = qemu_argv(config(vhost_user_socket=Path("/r/vhost.sock"), incoming="defer"))
    assert option(argv, "-incoming") == ["defer"]
    assert not option(argv, "-chardev") or all("vhost" not in c for c in option(argv, "-chardev"))
    assert not any("vsock-pci" in d for d in option(argv, "-device"))
    assert "pcie-root-port,id=vsock-port,bus=pcie.0,chassis=1" in option(argv, "-device")
    # same RAM backend as the saved guest: the state loads into shareable memory
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in option(argv, "-object")
    # what device_add plugs in afterwards is exactly the cold-boot device
    assert device_add_args() == {
        "driver": "vhost-user-vsock-pci",
        "chardev": "vhost-vsock",
        "id": "vsock",
        "bus": "vsock-port",
    }


def test_a_restore_from_a_ram_file_maps_it_shared_and_reads_back_as_the_same_guest() -> None:
    ram = Path("/proc/self/fd/9")
    argv = qemu_argv(config(vhost_user_socket=Path("/r/v.sock"), incoming="defer", ram_file=ram))
    # shared: the vhost-user device maps guest RAM through the fd QEMU sends it
    assert option(argv, "-object") == [
        "memory-backend-file,id=mem,size=256M,mem-path=/proc/self/fd/9,share=on"
    ]
    assert option(argv, "-machine") == ["q35,memory-backend=mem"]
    assert guest_config(argv) == guest_config(qemu_argv(config(vhost_user_socket=ram)))


def test_kernel_vhost_vsock_restore_is_plain_migration_with_the_new_cid() -> None:
    argv = qemu_argv(config(guest_cid=11, incoming="defer"))
    assert option(argv, "-incoming") == ["defer"]
    assert "vhost-vsock-pci,guest-cid=11,id=vsock,bus=vsock-port" in option(argv, "-device")
    assert option(argv, "-machine") == ["q35"]
    assert not option(argv, "-object")


def test_guest_config_reads_back_what_was_booted() -> None:
    argv = qemu_argv(config(vhost_user_socket=Path("/r/vhost.sock")))
    assert guest_config(argv) == {
        "memory_mib": 256,
        "cpus": 2,
        "accel": "tcg",
        "cpu": "max",
        "kernel": "/i/vmlinux",
        "cmdline": "console=ttyS0 quiet vsockrpc.port=9999",
        "vsock": "vhost-user-vsock-pci",
    }
    restored = qemu_argv(config(vhost_user_socket=Path("/r/v.sock"), incoming="defer"))
    assert guest_config(restored) == guest_config(argv)
    # the accelerator's name is recorded; its options follow from it and the vCPUs again
    assert option(argv, "-accel") == option(restored, "-accel") == ["tcg,thread=single"]
    old = [a.replace(",id=vsock,bus=vsock-port", "") for a in argv]
    with pytest.raises(VmError, match="not on a hot-pluggable root port"):
        guest_config(old)


def test_snapshot_refuses_a_non_empty_out_dir(tmp_path: Path) -> None:
    (tmp_path / "keep").write_text("x")
    with pytest.raises(VmError, match="already exists and is not an empty directory"):
        _prepare_out(tmp_path)
    assert (tmp_path / "keep").read_text() == "x"
    _prepare_out(tmp_path / "new")  # a new directory is fine


@pytest.fixture
def snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    image = tmp_path / "image"
    image.mkdir()
    (image / "manifest.json").write_text('{"key": "k"}')

    class FakeImage:
        path = image
        manifest = {"arch": "amd64"}

    monkeypatch.setattr(restore_mod, "find_image", lambda p: FakeImage())
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "state.bin").write_bytes(b"ram" * 1000)
    manifest = {
        "format": 1,
        "image": {"path": str(image), "digest": file_sha256(image / "manifest.json")},
        "qemu": {"version": "7.2.22", "machine": "pc-q35-7.2-machine"},
        "guest": {"memory_mib": 512},
        "files": {"state.bin": {"size": 3000, "sha256": file_sha256(snap / "state.bin")}},
    }
    (snap / "manifest.json").write_text(json.dumps(manifest))
    return snap


def test_a_good_snapshot_loads(snapshot: Path) -> None:
    assert load_snapshot(snapshot).state_file == snapshot / "state.bin"


def _edit(snapshot: Path, change: str) -> None:
    manifest = json.loads((snapshot / "manifest.json").read_text())
    if change == "other image":
        (Path(manifest["image"]["path"]) / "manifest.json").write_text('{"key": "other"}')
    elif change == "no manifest":
        (snapshot / "manifest.json").unlink()
    elif change == "no state":
        (snapshot / "state.bin").unlink()
    elif change == "flipped byte":
        (snapshot / "state.bin").write_bytes(b"ram" * 999 + b"raX")
    elif change == "truncated":
        (snapshot / "state.bin").write_bytes(b"ram" * 999)
    elif change == "garbage manifest":
        (snapshot / "manifest.json").write_text("{not json")
    elif change == "future format":
        manifest["format"] = 99
        (snapshot / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no manifest", "is incomplete: no manifest.json"),
        ("no state", "is incomplete: state.bin is missing"),
        ("flipped byte", "is corrupt: state.bin does not match its sha256"),
        ("truncated", "is corrupt: state.bin has 2997 bytes, manifest says 3000"),
        ("garbage manifest", "unreadable manifest.json"),
        ("future format", "format 99, expected 1"),
        ("other image", "was taken from another image"),
    ],
)
def test_a_bad_snapshot_is_one_line_and_nothing_is_deleted(
    snapshot: Path, change: str, message: str
) -> None:
    _edit(snapshot, change)
    before = sorted(p.name for p in snapshot.iterdir())
    with pytest.raises(VmError, match=message) as caught:
        load_snapshot(snapshot)
    assert "\n" not in str(caught.value)
    assert str(snapshot) in str(caught.value)
    assert sorted(p.name for p in snapshot.iterdir()) == before


def test_not_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VmError, match="no such directory"):
        load_snapshot(tmp_path / "nope")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--count", "2"], "--count needs --from"),
        (["--from", "S", "--count", "2", "--cid", "9"], "--cid cannot be used with --count"),
        (["--from", "S", "--count", "0"], "--count 0: expected 1 to 64"),
        (["--from", "S", "--memory", "256"], "--memory cannot be used with --from"),
        (["--from", "S", "--append", "x"], "--append cannot be used with --from"),
        (["--from", "S", "--kernel", "tailored"], "--kernel cannot be used with --from"),
        (["--image", "S", "--kernel", "tailored"], "--kernel chooses the kernel of an image"),
        (
            ["--from", "S", "--group", "g", "--trust-group"],
            "--trust-group cannot be used with --from",
        ),
        (["--from", "S", "--group", "../g"], "group name '../g' is invalid"),
        (["--from", "S", "--timeout", "nan"], "timeout nan s is invalid"),
        (["--from", "S", "--timeout", "-1"], "timeout -1.0 s is invalid"),
    ],
)
def test_restore_usage_errors_exit_2_before_anything(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from vsockrpc.cli.main import main

    argv = [str(tmp_path / "nothing") if a == "S" else a for a in argv]
    assert main(["vm", "run", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert message in err[0]


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan"), float("inf"), 1e9])
def test_the_api_checks_the_ready_timeout_before_reading_the_snapshot(
    timeout: float, tmp_path: Path
) -> None:
    # tmp_path/"nothing" does not exist: a timeout checked later would fail on the snapshot
    with pytest.raises(InvalidVmOption, match=r"timeout .* s is invalid"):
        restore_mod.restore_many(tmp_path / "nothing", 1, ready_timeout=timeout)
