"""``boot`` part: a cold ``vm run`` to the first answered RPC, phase by phase (TCG here), and
next to it, in the same run, a restore of a snapshot of a ready guest (:mod:`._restore`).

Phases (host monotonic clock; console lines are stamped when the launcher reads them):
``qemu start`` (launch() → QMP socket up), ``firmware+kernel`` (→ the loader hands over to init),
``init`` (→ PID 1 set up), ``agent start`` (→ the agent prints READY), ``first rpc`` (→ a gRPC
connection through the vsock device succeeds), ``Addition`` (→ Addition(5, 7) answered).

Wall-clock phases swing with other load on the host, so QEMU's own CPU time per phase (user +
system, sampled from /proc every 20 ms; under TCG that is the guest's emulated work) is a second
figure: it moves far less with load. Configurations (1 and 2 vCPUs, restore) are interleaved.

The tailored kernel (:mod:`vsockrpc.image.tailored`), where this machine can build it: the same
image with that kernel and no loader, 1 vCPU, interleaved with the others (``boot.phases``, and
``boot.first_rpc`` against the Debian kernel's cold boot).

The floor: the same image booted with a bare grpcio Addition server as PID 1
(:mod:`vsockrpc.guest.floor`, nothing of vsockrpc imported), timed from the loader's hand-over to
its listening socket, next to the agent's ``init`` + ``agent start`` of the 1-vCPU boots. The
ratio is what vsockrpc's own start-up costs above any Python gRPC server in this guest.
"""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType
from typing import Any

from vsockrpc import rpc
from vsockrpc.bench import _model, _restore
from vsockrpc.bench._context import Context
from vsockrpc.errors import VsockRpcError
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc

NAME = "boot"
TITLE = "cold `vm run` and snapshot restore → first answered RPC, by phase"
PHASES = ["qemu start", "firmware+kernel", "init", "agent start", "first rpc", "Addition"]
CPU_PHASES = PHASES[1:5]
PYTHON_PHASES = ("init", "agent start")  # the loader's hand-over → the agent listens
FLOOR_TIMEOUT = 120.0
FLOOR = "bare grpcio as PID 1"
TAILORED = "1 vCPU, tailored kernel"  # image/tailored.py; measured where it can be built
AGENT = "vsockrpc agent as PID 1"


class CpuSampler:
    """(monotonic, CPU seconds of ``pid``) every 20 ms, until the block ends."""

    def __init__(self, pid: int) -> None:
        self._stat = f"/proc/{pid}/stat"
        self._tick = os.sysconf("SC_CLK_TCK")
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> float | None:
        try:
            with open(self._stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / self._tick  # utime, stime (proc(5))

    def _run(self) -> None:
        while not self._stop.is_set():
            cpu = self._read()
            if cpu is not None:
                self.samples.append((time.monotonic(), cpu))
            self._stop.wait(0.02)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, when: float) -> float:
        """CPU seconds at ``when`` (the last sample not after it)."""
        before = [cpu for t, cpu in self.samples if t <= when]
        return before[-1] if before else 0.0


def one_boot(
    info: Any, cpus: int
) -> tuple[dict[str, float], dict[str, float], float, dict[str, str]]:
    """(wall phases, QEMU CPU phases, power-off seconds, the path it took) of one boot."""
    from vsockrpc.vm import launch
    from vsockrpc.vm.qemu import accel_option

    vm = launch(info, cpus=cpus, wait=False)
    with vm:
        with CpuSampler(vm.qemu.pid) as sampler:
            vm.wait_ready()
        tm = vm.timings
        phases = tm.phases()
        points = [
            ("firmware+kernel", tm.kernel_done),
            ("init", tm.init_started),
            ("agent start", tm.agent_ready),
            ("first rpc", tm.rpc_ready),
        ]
        cpu: dict[str, float] = {}
        last = sampler.at(tm.qemu_started or 0.0)
        for name, when in points:
            now = sampler.at(when or 0.0)
            cpu[name] = now - last
            last = now
        t = time.monotonic()
        with rpc.channel(vm.address()) as ch:
            stub = pb_grpc.VsockServiceStub(ch)  # type: ignore[no-untyped-call]
            if stub.Addition(pb.AdditionRequest(a=5, b=7), timeout=60).c != 12:
                raise VsockRpcError("boot bench: Addition(5, 7) gave a wrong answer")
        phases["Addition"] = time.monotonic() - t
        t = time.monotonic()
        code = vm.stop()
        shutdown = time.monotonic() - t
        if code != 0:
            raise VsockRpcError(f"boot bench: QEMU exited with status {code}")
    path = {
        "guest": f"{vm.accel.name.upper()}, the project's image, agent as PID 1",
        "guest kernel": str(info.manifest["kernel"]["version"]),
        "QEMU -accel, 1 / 2 vCPUs": f"{accel_option(vm.accel.name, 1)} / "
        f"{accel_option(vm.accel.name, 2)}",
        "vsock device": (
            "userspace (vsockrpc device), hybrid socket"
            if vm.hybrid_socket is not None
            else "kernel vhost-vsock"
        ),
    }
    return phases, cpu, shutdown, path


def floor_boot(info: Any) -> tuple[float, float]:
    """One cold boot (1 vCPU) with the bare grpcio floor as PID 1 (:mod:`vsockrpc.guest.floor`):
    (seconds, QEMU CPU seconds) from the loader's hand-over to the floor's listening socket."""
    from vsockrpc.agent import markers
    from vsockrpc.image.agent import FLOOR_INIT_PATH
    from vsockrpc.image.initramfs import HANDOVER
    from vsockrpc.vm import launch

    vm = launch(info, append=f"init={FLOOR_INIT_PATH}", wait=False)
    with vm:
        deadline = time.monotonic() + FLOOR_TIMEOUT
        with CpuSampler(vm.qemu.pid) as sampler:
            while (ready := vm.console.seen(markers.READY)) is None:
                if not vm.running() or time.monotonic() > deadline:
                    tail = vm.console_text().strip().splitlines()[-1:] or ["no console output"]
                    raise VsockRpcError(f"boot bench: the floor guest did not listen: {tail[0]}")
                time.sleep(0.02)
        handover = vm.console.seen(HANDOVER) or vm.timings.launched
        vm.stop()
    return ready - handover, sampler.at(ready) - sampler.at(handover)


def to_first_rpc(phases: dict[str, float]) -> float:
    """Seconds from the start to the first answered RPC: every phase but the timed Addition."""
    return sum(v for k, v in phases.items() if k != "Addition")


def run(ctx: Context) -> _model.PartResult:
    if ctx.quick:
        return _model.skipped(NAME, TITLE, "--quick does not boot guests")
    from pathlib import Path

    from vsockrpc.image import build_image
    from vsockrpc.vm import load_snapshot

    runs = 5
    ctx.step(NAME, "building or finding the guest image")
    info = build_image()
    configs = {"1 vCPU": (info, 1), "2 vCPUs": (info, 2)}
    notes: list[str] = []
    ctx.step(NAME, "building or finding the image with the tailored kernel (minutes, once)")
    try:
        configs[TAILORED] = (build_image(kernel="tailored"), 1)
    except VsockRpcError as err:  # e.g. no build tools here: the rest of the part stands
        notes.append(f"tailored kernel: not measured: {err}")
    wall: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    cpu: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    off: dict[str, list[float]] = {c: [] for c in configs}
    restored: list[dict[str, float]] = []
    first_rpc: dict[str, list[float]] = {"cold boot, 1 vCPU": [], "restore, 1 vCPU": []}
    if TAILORED in configs:
        first_rpc[f"cold boot, {TAILORED}"] = []
    identity: list[float] = []
    python: dict[str, list[float]] = {FLOOR: [], AGENT: []}  # the floor first: the baseline
    python_cpu: dict[str, list[float]] = {FLOOR: [], AGENT: []}
    path: dict[str, str] = {}
    with _restore.temp_dir() as tmp:
        ctx.step(NAME, "snapshot of a ready 1-vCPU guest")
        snap_dir, facts = _restore.take_snapshot(info, Path(tmp))
        snapshot = load_snapshot(snap_dir)  # verified once; restores skip the sha256
        for n in range(runs):
            for label, (image, cpus) in configs.items():
                ctx.step(NAME, f"boot {n + 1} of {runs}, {label}")
                phases, used, shutdown, took = one_boot(image, cpus)
                wall[label].append(phases)
                cpu[label].append(used)
                off[label].append(shutdown)
                if label == TAILORED:
                    path["guest kernel, tailored"] = took["guest kernel"]
                    first_rpc[f"cold boot, {TAILORED}"].append(to_first_rpc(phases))
                    continue
                path.update(took)
                if cpus == 1:
                    first_rpc["cold boot, 1 vCPU"].append(to_first_rpc(phases))
                    python[AGENT].append(sum(phases[k] for k in PYTHON_PHASES))
                    python_cpu[AGENT].append(sum(used[k] for k in PYTHON_PHASES))
            ctx.step(NAME, f"floor boot {n + 1} of {runs}: bare grpcio as PID 1")
            wall_s, cpu_s = floor_boot(info)
            python[FLOOR].append(wall_s)
            python_cpu[FLOOR].append(cpu_s)
            ctx.step(NAME, f"restore {n + 1} of {runs}")
            steps, fresh = _restore.one_restore(snapshot)
            restored.append(steps)
            identity.append(fresh)
            first_rpc["restore, 1 vCPU"].append(to_first_rpc(steps))
        ctx.step(NAME, "10 clones restored at once")
        ten = _restore.clones_at_once(snapshot, 10)
    sizes = {
        name: (info.path / name).stat().st_size / 1e6
        for name in ("vmlinuz", "initrd.cpio", "rootfs.ext4")
        if (info.path / name).exists()
    }
    figures = [
        _model.figure(f"{NAME}.phases", "boot phases, wall clock", "phases", wall, phases=PHASES),
        _model.figure(
            f"{NAME}.cpu", "QEMU CPU seconds per phase", "phases", cpu, phases=CPU_PHASES
        ),
        _model.figure(f"{NAME}.poweroff", "clean power-off", "time", off, unit="s"),
        _model.figure(
            f"{NAME}.first_rpc", "to the first answered RPC", "time", first_rpc, unit="s"
        ),
        _model.figure(
            f"{NAME}.floor",
            "loader hand-over → server listening, 1 vCPU (interpreter, imports, server start)",
            "time",
            python,
            unit="s",
        ),
        _model.figure(
            f"{NAME}.floor_cpu",
            "the same, QEMU CPU seconds",
            "time",
            python_cpu,
            unit="s",
        ),
        _model.figure(
            f"{NAME}.restore",
            "restore phases, wall clock",
            "phases",
            {"restore, 1 vCPU": restored},
            phases=_restore.RESTORE_PHASES,
        ),
        _model.figure(
            f"{NAME}.identity",
            "clone identity after restore (clock, reseed, hostname through the agent)",
            "time",
            {"restore, 1 vCPU": identity},
            unit="s",
        ),
    ]
    notes += [
        "image sizes (apparent): " + ", ".join(f"{name} {mb:.1f} MB" for name, mb in sizes.items()),
        f"snapshot: {facts['snapshot bytes'] / 1e6:.1f} MB on disk for "
        f"{facts['guest used RAM bytes'] / 1e6:.1f} MB of guest RAM in use (MemTotal - "
        f"MemAvailable) of a 512 MiB guest; guest paused {facts['guest paused s']:.2f} s to save",
        ten,
    ]
    return _model.part_result(NAME, TITLE, path, figures, notes=notes)
