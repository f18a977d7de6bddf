"""Launcher pieces that need no QEMU: command line, CID leases, accelerator choice, groups."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from vsockrpc.errors import VmError
from vsockrpc.vm import accel, cid, launch, vsockdev
from vsockrpc.vm.options import InvalidVmOption, check_groups
from vsockrpc.vm.qemu import QemuConfig, qemu_argv
from vsockrpc.vm.vsockdev import device_argv, host_argv


def config(**kw: object) -> QemuConfig:
    base: dict[str, object] = dict(
        qemu="qemu-system-x86_64",
        kernel=Path("/i/vmlinuz"),
        initrd=Path("/i/initrd.cpio"),
        rootfs=Path("/i/rootfs.ext4"),
        cmdline="console=ttyS0 quiet",
        console_log=Path("/r/c"),
        qmp_socket=Path("/r/q"),
        guest_cid=7,
        memory_mib=256,
    )
    base.update(kw)
    return QemuConfig(**base)  # type: ignore[arg-type]


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_userspace_device_gets_shared_memfd_memory() -> None:
    argv = qemu_argv(config(vhost_user_socket=Path("/r/vhost.sock")))
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in option(argv, "-object")
    assert option(argv, "-machine") == ["q35,memory-backend=mem"]
    assert "vhost-user-vsock-pci,chardev=vhost-vsock,id=vsock,bus=vsock-port" in option(
        argv, "-device"
    )
    assert "socket,id=vhost-vsock,path=/r/vhost.sock" in option(argv, "-chardev")
    assert not any("vhost-vsock-pci,guest-cid" in d for d in option(argv, "-device"))


def test_kernel_vhost_vsock_gets_the_cid_and_no_memfd() -> None:
    argv = qemu_argv(config())
    assert "vhost-vsock-pci,guest-cid=7,id=vsock,bus=vsock-port" in option(argv, "-device")
    assert option(argv, "-machine") == ["q35"]
    assert not option(argv, "-object")


def test_tcg_runs_several_vcpus_on_one_thread() -> None:
    # QEMU 7.2's multi-threaded TCG let a vCPU run a finished static-key patch's int3 (Oops)
    assert option(qemu_argv(config(accel="tcg", cpus=1)), "-accel") == ["tcg"]
    assert option(qemu_argv(config(accel="tcg", cpus=2)), "-accel") == ["tcg,thread=single"]
    assert option(qemu_argv(config(accel="kvm", cpus=4)), "-accel") == ["kvm"]


def test_boot_essentials() -> None:
    argv = qemu_argv(config(accel="tcg", cpu="max"))
    assert option(argv, "-cpu") == ["max"]  # RDRAND under TCG: entropy at once
    assert option(argv, "-append") == ["console=ttyS0 quiet"]
    assert "-no-reboot" in argv
    assert option(argv, "-qmp") == ["unix:/r/q,server=on,wait=off"]
    assert "file=/i/rootfs.ext4,format=raw,if=none,id=root,readonly=on" in option(argv, "-drive")


def test_cid_lease_lowest_free_busy_and_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cid, "host_local_cid", lambda: 3)
    first = cid.lease(tmp_path)
    assert first.cid == 4  # 3 is this host's own CID
    second = cid.lease(tmp_path)
    assert second.cid == 5
    with pytest.raises(VmError, match="CID 4 is busy"):
        cid.lease(tmp_path, 4)
    with pytest.raises(VmError, match="CID 3 is busy: it is this host's own"):
        cid.lease(tmp_path, 3)
    with pytest.raises(VmError, match="invalid"):
        cid.lease(tmp_path, 2)
    first.close()
    again = cid.lease(tmp_path, 4)
    assert again.cid == 4
    again.close()
    second.close()


def test_accel_forced_tcg_and_cached_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    monkeypatch.setenv("VSOCKRPC_ACCEL", "tcg")
    assert accel.choose_accel("qemu", kernel, tmp_path).name == "tcg"
    monkeypatch.delenv("VSOCKRPC_ACCEL")
    monkeypatch.setattr(accel, "_kvm_device_usable", lambda: True)
    probes: list[Path] = []

    def fake_probe(qemu: str, k: Path, **_: object) -> bool:
        probes.append(k)
        return False

    monkeypatch.setattr(accel, "kvm_boots", fake_probe)
    first = accel.choose_accel("qemu", kernel, tmp_path)
    second = accel.choose_accel("qemu", kernel, tmp_path)
    assert (first.name, first.cpu) == ("tcg", accel.TCG_CPU)
    assert accel.TCG_CPU.startswith("max")  # RDRAND: entropy at once
    assert "-cx16" in accel.TCG_CPU.split(",")  # QEMU 7.2 TCG's cmpxchg16b oopses 6.12 guests
    assert second == first
    assert probes == [kernel]  # probed once, then the cached verdict
    monkeypatch.setattr(accel, "_kvm_device_usable", lambda: False)
    assert "not usable" in accel.choose_accel("qemu", kernel, tmp_path).reason


def test_boot_kernel_prefers_pvh_unless_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vsockrpc.image.build import ImageInfo
    from vsockrpc.vm.launcher import _boot_kernel

    info = ImageInfo(tmp_path, {})
    (tmp_path / "vmlinuz").write_bytes(b"bz")
    monkeypatch.delenv("VSOCKRPC_KERNEL", raising=False)
    assert _boot_kernel(info) == tmp_path / "vmlinuz"  # no PVH kernel in this image
    (tmp_path / "vmlinux").write_bytes(b"elf")
    assert _boot_kernel(info) == tmp_path / "vmlinux"
    monkeypatch.setenv("VSOCKRPC_KERNEL", "bzimage")
    assert _boot_kernel(info) == tmp_path / "vmlinuz"
    monkeypatch.setenv("VSOCKRPC_KERNEL", "elf")
    with pytest.raises(VmError, match="VSOCKRPC_KERNEL"):
        _boot_kernel(info)


# ---------------------------------------------------------------- VM↔VM groups
@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "-opt", "x" * 65, "sp ace"])
def test_group_names_are_never_paths(bad: str) -> None:
    with pytest.raises(InvalidVmOption, match="group name"):
        check_groups([bad])


def test_groups_keep_order_once_and_trust_needs_a_group() -> None:
    assert check_groups(["b", "a", "b"]) == ("b", "a")
    assert check_groups(["x" * 64]) == ("x" * 64,)
    with pytest.raises(InvalidVmOption, match="--trust-group needs --group"):
        check_groups([], trust_group=True)
    assert check_groups(["g"], trust_group=True) == ("g",)


def test_a_grouped_vm_is_served_by_its_first_groups_host() -> None:
    """A device of its own never joins groups; the host of the VM's first group does, started
    so that the launcher learns when it listens and has nothing to reap."""
    argv = device_argv(
        vhost_fd=5, hybrid_socket=Path("/s"), hybrid_fd=6, guest_cid=9, exit_with_pid=None
    )
    assert "--group" not in argv and "--groups-dir" not in argv
    host = host_argv(Path("/r/groups"), "g1")
    assert option(host, "--host") == ["g1"] and option(host, "--groups-dir") == ["/r/groups"]
    assert "--fork-when-ready" in host


def test_a_grouped_vm_gets_the_userspace_device_even_with_kernel_vhost(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel's vhost-vsock cannot route between guests: a group overrides it, once said."""
    monkeypatch.setattr(vsockdev, "kernel_vhost_vsock_usable", lambda: True)
    with caplog.at_level(logging.WARNING, logger=vsockdev.__name__):
        assert not vsockdev.wants_userspace(())
        assert not caplog.records
        assert vsockdev.wants_userspace(("g",))
    assert len(caplog.records) == 1 and "only it routes between VMs" in caplog.text
    monkeypatch.setattr(vsockdev, "kernel_vhost_vsock_usable", lambda: False)
    assert vsockdev.wants_userspace(())


def test_launch_refuses_bad_groups_before_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VSOCKRPC_RUNTIME_DIR", str(tmp_path / "rt"))
    with pytest.raises(InvalidVmOption, match=re.escape("'../g'")):
        launch(tmp_path / "no-image", groups=["../g"])
    with pytest.raises(InvalidVmOption, match="--trust-group"):
        launch(tmp_path / "no-image", trust_group=True)
    assert not (tmp_path / "rt").exists()
