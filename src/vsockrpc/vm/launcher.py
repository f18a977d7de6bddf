"""Launching a guest: everything a running VM is made of, composed with an ExitStack.

:func:`launch` leases a CID, picks the accelerator and vsock device, starts the device (when
userspace) and QEMU, follows the console, and waits until the agent answers. Whatever fails
or is interrupted on the way, everything started so far is stopped and removed again.

Stopping (:meth:`Vm.stop`) asks the guest first: Ctrl-Alt-Del over QMP (PID 1 turns it into a
graceful agent stop and a power-off), then QMP ``quit``, then SIGKILL, each after a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from vsockrpc.addresses import Address, HybridAddress, VsockAddress
from vsockrpc.agent import CMDLINE_ALLOWED_CIDS, DEFAULT_PORT, markers
from vsockrpc.errors import GuestError, ImageError, TransportError, VmError
from vsockrpc.image import ImageInfo, find_image
from vsockrpc.image.cache import cache_root
from vsockrpc.image.initramfs import HANDOVER
from vsockrpc.vm import accel as accel_mod
from vsockrpc.vm import readiness, signals
from vsockrpc.vm.console import ConsoleFollower
from vsockrpc.vm.options import check_launch
from vsockrpc.vm.procs import start_qemu
from vsockrpc.vm.qemu import QemuConfig, find_qemu, qemu_argv
from vsockrpc.vm.qmp import CTRL_ALT_DEL, qmp_command
from vsockrpc.vm.startup import pause, reap, state_record, take_slot, wait_qemu_up
from vsockrpc.vm.vsockdev import VmDevice, wants_userspace

__all__ = ["DEFAULT_PORT", "Vm", "launch"]

READY_TIMEOUT = 120.0
POWEROFF_TIMEOUT = 20.0
TAIL_LINES = 12  # console lines a GuestError carries (console_tail)
QUIT_TIMEOUT = 5.0


@dataclass
class Timings:
    """Monotonic timestamps of the boot phases (None until seen)."""

    launched: float = 0.0
    qemu_started: float | None = None  # QEMU process running, QMP socket up
    firmware: float | None = None  # first console byte (SeaBIOS)
    kernel_done: float | None = None  # loader hands over to init (kernel + loader done)
    init_started: float | None = None  # PID 1 set up
    agent_ready: float | None = None  # agent printed READY
    rpc_ready: float | None = None  # a gRPC connection through vsock succeeded

    def phases(self) -> dict[str, float]:
        """Seconds per phase, in boot order, for the phases that were reached."""
        points = [
            ("qemu start", self.qemu_started),
            ("firmware+kernel", self.kernel_done),
            ("init", self.init_started),
            ("agent start", self.agent_ready),
            ("first rpc", self.rpc_ready),
        ]
        out: dict[str, float] = {}
        last = self.launched
        for name, when in points:
            if when is None:
                break
            out[name] = when - last
            last = when
        return out


@dataclass
class Vm:
    """A running guest. Use as a context manager (or call :meth:`stop`)."""

    name: str
    cid: int
    port: int
    image: ImageInfo
    run_dir: Path
    accel: accel_mod.Accel
    qemu: subprocess.Popen[bytes]
    console: ConsoleFollower
    device: VmDevice | None
    groups: tuple[str, ...] = ()  # VM↔VM: the groups whose members this guest can reach
    timings: Timings = field(default_factory=Timings)
    qemu_last_words: str = ""  # QEMU's last stderr line, kept when it exits (stop/failure)
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    @property
    def hybrid_socket(self) -> Path | None:
        """The hybrid-vsock Unix socket of the userspace device (None with kernel vhost)."""
        return self.device.hybrid_socket if self.device is not None else None

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    def address(self, port: int | None = None) -> Address:
        """The host-side address of a guest port (the agent's by default)."""
        port = self.port if port is None else port
        if self.hybrid_socket is not None:
            return HybridAddress(str(self.hybrid_socket), port)
        return VsockAddress(self.cid, port)

    def console_text(self) -> str:
        return self.console.text()

    def running(self) -> bool:
        return self.qemu.poll() is None

    def qemu_log_tail(self) -> str:
        """QEMU's own last line on stderr (``qemu.log``), read while the run dir exists."""
        try:
            text = (self.run_dir / "qemu.log").read_text(errors="replace")
        except OSError:
            return self.qemu_last_words
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if lines:
            self.qemu_last_words = lines[-1]
        return self.qemu_last_words

    def _guest_failure(self) -> GuestError | None:
        lines = self.console.lines()
        exited = next((ln for ln in lines if markers.AGENT_EXITED in ln), None)
        if exited is None and self.running():
            return None
        # The last informative line before the exit marker: usually the exception.
        cut = lines.index(exited) if exited is not None else len(lines)
        detail = next(
            (
                ln.strip()
                for ln in reversed(lines[:cut])
                if ln.strip() and not ln.startswith(markers.PREFIX) and "reboot:" not in ln
            ),
            "",
        )
        if exited is not None:
            what = exited.removeprefix(markers.PREFIX).strip()
            msg = f"guest agent crashed before it was ready ({what})"
        else:
            msg = f"guest stopped before the agent was ready (QEMU exit {self.qemu.returncode})"
            detail = self.qemu_log_tail() or detail  # QEMU's own reason, when it gave one
        error = GuestError(
            f"{msg}: {detail}" if detail else msg,
            hint=f"guest console: {self._keep_console()}",
        )
        # The traceback (e.g. of a user service that failed to import), for callers to show.
        start = max((i for i, ln in enumerate(lines[:cut]) if "Traceback (most" in ln), default=cut)
        error.console_tail = tuple(ln.rstrip() for ln in lines[start:cut][-TAIL_LINES:])
        return error

    def _keep_console(self) -> Path:
        """Copy the console log out of the run dir (removed at cleanup) for the user to read."""
        kept = self.run_dir.parent.parent / f"{self.name}-failed-console.log"
        with contextlib.suppress(OSError):
            shutil.copyfile(self.run_dir / "console.log", kept)
        return kept

    def wait_ready(
        self, timeout: float = READY_TIMEOUT, *, cancel: threading.Event | None = None
    ) -> None:
        """Block until the agent answers on vsock; GuestError when it crashes or times out.
        KeyboardInterrupt as soon as ``cancel`` is set."""
        deadline = time.monotonic() + timeout
        while True:
            signals.check(cancel)
            self._update_timings()
            failure = self._guest_failure()
            if failure is not None:
                raise failure
            if self.device is not None:
                self.device.check()
            if self.timings.agent_ready is not None:
                break
            if time.monotonic() > deadline:
                raise GuestError(
                    f"guest agent not ready after {timeout:g} s",
                    hint=f"guest console: {self._keep_console()}",
                )
            pause(cancel, 0.05)
        # The agent says it listens; now prove a gRPC connection crosses the vsock device,
        # noticing a stop request or a dying guest within a fraction of a second.
        deadline = max(deadline, time.monotonic() + 1.0)
        try:
            readiness.wait_answer(self.address(), deadline, cancel=cancel, check=self._check_alive)
        except TransportError as err:
            self._raise_guest_failure()
            raise GuestError(f"guest agent announced readiness but does not answer: {err}") from err
        self.timings.rpc_ready = time.monotonic()
        self._wait_commands_ready(deadline, timeout, cancel)

    def _raise_guest_failure(self) -> None:
        failure = self._guest_failure()
        if failure is not None:
            raise failure

    def _check_alive(self) -> None:
        self._raise_guest_failure()
        if self.device is not None:
            self.device.check()

    def _wait_commands_ready(
        self, deadline: float, timeout: float, cancel: threading.Event | None
    ) -> None:
        """An image spec's supervised commands with a readiness condition: until each one's
        ``command NAME ready`` console line (its port accepts inside the guest)."""
        spec = self.image.manifest.get("spec") or {}
        waiting = [c["name"] for c in spec.get("commands", []) if c.get("ready")]
        while waiting:
            signals.check(cancel)
            waiting = [n for n in waiting if not self.console.seen(f"command {n} ready")]
            failure = self._guest_failure()
            if failure is not None:
                raise failure
            if waiting and time.monotonic() > deadline:
                raise GuestError(
                    f"supervised command {waiting[0]} not ready after {timeout:g} s",
                    hint=f"guest console: {self._keep_console()}",
                )
            pause(cancel, 0.05)

    def _update_timings(self) -> None:
        t = self.timings
        t.firmware = t.firmware or self.console.first_byte
        t.kernel_done = t.kernel_done or self.console.seen(HANDOVER)
        t.init_started = t.init_started or self.console.seen(markers.INIT_STARTED)
        t.agent_ready = t.agent_ready or self.console.seen(markers.READY)

    def stop(self, timeout: float = POWEROFF_TIMEOUT) -> int | None:
        """Power the guest off (gracefully if it can), stop everything, remove the run dir.

        Returns QEMU's exit status. Safe to call twice.
        """
        if self.running():
            with contextlib.suppress(VmError):
                qmp_command(self.qmp_socket, "send-key", CTRL_ALT_DEL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.qemu.wait(timeout)
        if self.running():
            with contextlib.suppress(VmError):
                qmp_command(self.qmp_socket, "quit")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.qemu.wait(QUIT_TIMEOUT)
        if self.running():
            self.qemu.kill()
        code = self.qemu.wait()
        self.qemu_log_tail()  # keep QEMU's last words: the run dir goes with the stack
        self._stack.close()
        return code

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launch(
    image: ImageInfo | Path | str,
    *,
    cid: int | None = None,
    memory_mib: int = 512,
    cpus: int = 1,
    port: int = DEFAULT_PORT,
    append: str = "",
    name: str | None = None,
    wait: bool = True,
    ready_timeout: float = READY_TIMEOUT,
    echo: TextIO | None = None,
    detach: bool = False,
    cancel: threading.Event | None = None,
    groups: Sequence[str] = (),
    trust_group: bool = False,
) -> Vm:
    """Boot ``image`` and return the running :class:`Vm` (stop it, or use it in ``with``).

    Options are validated before anything is created (:class:`~vsockrpc.vm.options.
    InvalidVmOption`). The name is claimed atomically: a second launch with the same name
    fails with :class:`VmError` while the first VM lives.

    ``detach``: QEMU and the device run in their own sessions and survive this process; the
    VM is then stopped with ``vsockrpc vm stop`` (the returned object must not be stopped).
    Otherwise QEMU dies with this process, even if it is SIGKILLed.

    ``cancel``: set it (e.g. from a signal handler) to abort the boot: everything started is
    stopped and removed and KeyboardInterrupt is raised. Without it, on the main thread, a
    SIGINT during the launch is deferred the same way (a second one cannot cut the cleanup).

    ``groups``: VM↔VM. The guest can connect to ``vsock:CID:PORT`` of any running VM that
    shares a group with it (and they to it); VMs sharing no group cannot reach each other. The
    agent still admits only the host unless ``trust_group`` is given: then it admits every
    CID the device routes to it, i.e. the host and the members of its groups.
    """
    check_launch(
        name=name,
        cid=cid,
        port=port,
        memory_mib=memory_mib,
        cpus=cpus,
        ready_timeout=ready_timeout,
        groups=groups,
        trust_group=trust_group,
    )
    groups = tuple(dict.fromkeys(groups))
    if trust_group:
        # Safe only because the VM has our device: it routes nothing but the host and members.
        append = f"{CMDLINE_ALLOWED_CIDS}=any {append}".strip()
    info = image if isinstance(image, ImageInfo) else find_image(image)
    qemu_bin = find_qemu(info.arch)
    launched = time.monotonic()
    with ExitStack() as outer:
        if cancel is None:
            cancel = outer.enter_context(signals.StopSignals((signal.SIGINT,))).event
        return _launch(
            info,
            qemu_bin,
            launched,
            cancel,
            cid=cid,
            memory_mib=memory_mib,
            cpus=cpus,
            port=port,
            append=append,
            name=name,
            wait=wait,
            ready_timeout=ready_timeout,
            echo=echo,
            detach=detach,
            groups=groups,
        )
    raise AssertionError("unreachable")


def _launch(
    info: ImageInfo,
    qemu_bin: str,
    launched: float,
    cancel: threading.Event,
    *,
    cid: int | None,
    memory_mib: int,
    cpus: int,
    port: int,
    append: str,
    name: str | None,
    wait: bool,
    ready_timeout: float,
    echo: TextIO | None,
    detach: bool,
    groups: tuple[str, ...],
) -> Vm:
    with ExitStack() as stack:
        slot = take_slot(stack, cid, name)
        lease, claim, held = slot.lease, slot.claim, slot.held
        vm_name, run_dir = claim.name, claim.run_dir
        signals.check(cancel)
        chosen = accel_mod.choose_accel(qemu_bin, info.kernel, _verdict_dir())
        device: VmDevice | None = None
        vhost_user = None
        if wants_userspace(groups):
            device = stack.enter_context(slot.device(detach=detach, groups=groups))
            vhost_user = device.vhost_socket
        signals.check(cancel)
        config = QemuConfig(
            qemu=qemu_bin,
            kernel=_boot_kernel(info),
            initrd=info.initrd,
            rootfs=info.rootfs,
            cmdline=f"{info.cmdline} vsockrpc.port={port} {append}".strip(),
            console_log=run_dir / "console.log",
            qmp_socket=run_dir / "qmp.sock",
            accel=chosen.name,
            cpu=chosen.cpu,
            memory_mib=memory_mib,
            cpus=cpus,
            guest_cid=lease.cid,
            vhost_user_socket=vhost_user,
            name=f"vsockrpc-{vm_name}",
        )
        qemu = start_qemu(qemu_argv(config), run_dir, held, detach)
        stack.callback(reap, qemu)
        if device is not None:
            device.watch(qemu.pid)
        console = stack.enter_context(ConsoleFollower(run_dir / "console.log", echo=echo).start())
        vm = Vm(vm_name, lease.cid, port, info, run_dir, chosen, qemu, console, device, groups)
        vm.timings.launched = launched
        wait_qemu_up(vm, cancel)
        vm.timings.qemu_started = time.monotonic()
        (run_dir / "state.json").write_text(json.dumps(state_record(vm, detach), indent=2))
        if wait:
            vm.wait_ready(ready_timeout, cancel=cancel)
        signals.check(cancel)
        if detach:
            stack.pop_all()  # the VM outlives us; `vm stop` cleans up
            if device is not None:
                device.release()
            console.close()
            lease.close()  # QEMU and the device hold the locks through their inherited fds
            claim.close()
            return vm
        vm._stack = stack.pop_all()
        return vm
    raise AssertionError("unreachable")


def _boot_kernel(info: ImageInfo) -> Path:
    """The PVH ELF when the image has one (no in-guest decompression: ~0.6 s less under TCG,
    docs/system.md), else the bzImage. ``VSOCKRPC_KERNEL=bzimage`` forces the bzImage (for
    comparisons, bench/bench_boot.py). The KVM probe keeps using the bzImage either way."""
    choice = os.environ.get("VSOCKRPC_KERNEL", "")
    if choice not in ("", "pvh", "bzimage"):
        raise VmError(f"VSOCKRPC_KERNEL={choice!r}: expected pvh or bzimage")
    if choice != "bzimage" and info.pvh_kernel is not None:
        return info.pvh_kernel
    return info.kernel


def _verdict_dir() -> Path | None:
    try:
        return cache_root() / "probes"
    except ImageError:  # an unwritable cache must not stop a boot: probe every time
        return None
