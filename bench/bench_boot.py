"""Boot benchmark: time from ``vm run`` (launch) to the first answered RPC, split into phases.

Phases (monotonic clock on the host; console lines are stamped when the launcher reads them):
  qemu start       launch() called → QEMU's QMP socket is up (CID lease, accel, device, exec)
  firmware+kernel  → the loader hands over to init (SeaBIOS, kernel, loader's insmods, mount)
  init             → PID 1 has mounted /proc… and loaded what was missing (Python start-up)
  agent start      → the agent prints READY (fork, ``import grpc``, bind vsock)
  first rpc        → a gRPC connection through the vsock device succeeds (host side)
  Addition         → Addition(5, 7) answered
and, after the table, the clean power-off time.

Wall-clock phases swing with whatever else runs on the host, so QEMU's own CPU time (user +
system, sampled from /proc every 20 ms; under TCG that is the guest's emulated work) is
reported per phase too ("cpu …" rows): it moves far less with load.

Runs the same boot in each configuration side by side, interleaved (median of --runs each,
default 5): 1 and 2 vCPUs by default; ``--kernel pvh bzimage`` compares the PVH kernel with the
bzImage path (``VSOCKRPC_KERNEL``, see vm/launcher.py). ``--json FILE`` also writes every run's
phases (to combine runs of two source trees, e.g. before/after a guest-side change). Prints the
image size. Safe: the host only reaches the guest through the hybrid Unix socket.

    .venv/bin/python bench/bench_boot.py [--runs 5] [--cpus 1 2] [--kernel pvh bzimage]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

from vsockrpc import rpc
from vsockrpc.image import build_image
from vsockrpc.image.build import ImageInfo
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc
from vsockrpc.vm import launch

PHASES = ("qemu start", "firmware+kernel", "init", "agent start", "first rpc", "Addition")


class CpuSampler:
    """(monotonic, CPU seconds of ``pid``) every 20 ms, until stopped."""

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

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, when: float) -> float:
        """CPU seconds at ``when`` (the last sample not after it)."""
        before = [cpu for t, cpu in self.samples if t <= when]
        return before[-1] if before else 0.0


def one_boot(info: ImageInfo, cpus: int, kernel: str) -> tuple[dict[str, float], float, str]:
    os.environ["VSOCKRPC_KERNEL"] = kernel
    vm = launch(info, cpus=cpus, wait=False)
    with vm:
        with CpuSampler(vm.qemu.pid) as sampler:
            vm.wait_ready()
        phases = vm.timings.phases()
        tm = vm.timings
        points = [
            ("firmware+kernel", tm.kernel_done),
            ("init", tm.init_started),
            ("agent start", tm.agent_ready),
            ("first rpc", tm.rpc_ready),
        ]
        last = sampler.at(tm.qemu_started or 0.0)
        for name, when in points:
            now = sampler.at(when or 0.0)
            phases[f"cpu {name}"] = now - last
            last = now
        phases["cpu total"] = sum(phases[f"cpu {name}"] for name, _ in points)
        t = time.monotonic()
        with rpc.channel(vm.address()) as ch:
            stub = pb_grpc.VsockServiceStub(ch)  # type: ignore[no-untyped-call]
            assert stub.Addition(pb.AdditionRequest(a=5, b=7), timeout=30).c == 12
        phases["Addition"] = time.monotonic() - t
        t = time.monotonic()
        code = vm.stop()
        shutdown = time.monotonic() - t
        assert code == 0, f"QEMU exit {code}"
    return phases, shutdown, vm.accel.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--kernel", nargs="+", choices=("pvh", "bzimage"), default=["pvh"])
    parser.add_argument("--json", help="write every run's phases to this file")
    args = parser.parse_args()
    configs = [(c, k) for c in args.cpus for k in args.kernel]

    def label(config: tuple[int, str]) -> str:
        cpus, kernel = config
        return f"{cpus} vCPU" if len(args.kernel) == 1 else f"{cpus}cpu {kernel}"

    t = time.monotonic()
    info = build_image()
    print(
        f"image: {info.path} ({'cache hit' if info.cache_hit else 'built'} in "
        f"{time.monotonic() - t:.1f} s)"
    )
    sizes = {name: (info.path / name).stat() for name in ("vmlinuz", "initrd.cpio", "rootfs.ext4")}
    for name, st in sizes.items():
        print(
            f"  {name:<12} {st.st_size / 1e6:7.1f} MB apparent, "
            f"{st.st_blocks * 512 / 1e6:7.1f} MB on disk"
        )

    results: dict[tuple[int, str], list[dict[str, float]]] = {c: [] for c in configs}
    accel = "?"
    for run in range(args.runs):  # interleave configurations so load drifts hit both alike
        for config in configs:
            phases, shutdown, accel = one_boot(info, *config)
            phases["total"] = sum(phases[p] for p in PHASES)
            phases["power-off"] = shutdown
            results[config].append(phases)
            print(f"  run {run + 1} {label(config)}: total {phases['total']:.2f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({label(c): r for c, r in results.items()}, f, indent=1)

    print(f"\nmedian of {args.runs} boots, accelerator {accel} (seconds)")
    header = f"{'phase':<17}" + "".join(f"{label(c):>14}" for c in configs)
    if len(configs) == 2:
        header += f"{'ratio':>8}"
    print(header)
    cpu_rows = [f"cpu {p}" for p in PHASES[1:5]]
    for phase in (*PHASES, "total", "power-off", *cpu_rows, "cpu total"):
        meds = [statistics.median(r[phase] for r in results[c]) for c in configs]
        row = f"{phase:<17}" + "".join(f"{m:14.2f}" for m in meds)
        if len(meds) == 2 and meds[0] > 0:
            row += f"{meds[1] / meds[0]:8.2f}"
        print(row)


if __name__ == "__main__":
    main()
