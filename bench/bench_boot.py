"""Boot benchmark: time from ``vm run`` (launch) to the first answered RPC, split into phases.

Phases (monotonic clock on the host; console lines are stamped when the launcher reads them):
  qemu start       launch() called → QEMU's QMP socket is up (CID lease, accel, device, exec)
  firmware+kernel  → the loader hands over to init (SeaBIOS, kernel, loader's insmods, mount)
  init             → PID 1 has mounted /proc… and loaded what was missing (Python start-up)
  agent start      → the agent prints READY (fork, ``import grpc``, bind vsock)
  first rpc        → a gRPC connection through the vsock device succeeds (host side)
  Addition         → Addition(5, 7) answered
and, after the table, the clean power-off time.

Runs the same boot with 1 and 2 vCPUs side by side (median of --runs each, default 5) and
prints the image size. Safe: the host only reaches the guest through the hybrid Unix socket.

    .venv/bin/python bench/bench_boot.py [--runs 5] [--cpus 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

from vsockrpc import rpc
from vsockrpc.image import build_image
from vsockrpc.image.build import ImageInfo
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc
from vsockrpc.vm import launch

PHASES = ("qemu start", "firmware+kernel", "init", "agent start", "first rpc", "Addition")


def one_boot(info: ImageInfo, cpus: int) -> tuple[dict[str, float], float, str]:
    vm = launch(info, cpus=cpus)
    with vm:
        phases = vm.timings.phases()
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
    args = parser.parse_args()

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

    results: dict[int, list[dict[str, float]]] = {}
    shutdowns: dict[int, list[float]] = {}
    accel = "?"
    for run in range(args.runs):  # interleave configurations so load drifts hit both alike
        for cpus in args.cpus:
            phases, shutdown, accel = one_boot(info, cpus)
            phases["total"] = sum(phases[p] for p in PHASES)
            results.setdefault(cpus, []).append(phases)
            shutdowns.setdefault(cpus, []).append(shutdown)
            print(f"  run {run + 1} cpus={cpus}: total {phases['total']:.2f} s", flush=True)

    print(f"\nmedian of {args.runs} boots, accelerator {accel} (seconds)")
    header = f"{'phase':<17}" + "".join(f"{f'{c} vCPU':>10}" for c in args.cpus)
    if len(args.cpus) == 2:
        header += f"{'ratio':>8}"
    print(header)
    for phase in (*PHASES, "total"):
        meds = [statistics.median(r[phase] for r in results[c]) for c in args.cpus]
        row = f"{phase:<17}" + "".join(f"{m:10.2f}" for m in meds)
        if len(meds) == 2 and meds[0] > 0:
            row += f"{meds[1] / meds[0]:8.2f}"
        print(row)
    meds = [statistics.median(shutdowns[c]) for c in args.cpus]
    print(f"{'power-off':<17}" + "".join(f"{m:10.2f}" for m in meds))


if __name__ == "__main__":
    main()
