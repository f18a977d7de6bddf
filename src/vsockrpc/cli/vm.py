"""``vsockrpc vm run|stop|list`` and ``vsockrpc demo``."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from vsockrpc.cli._output import step
from vsockrpc.errors import VmError


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def _boot_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cid", type=_positive, help="guest CID (default: the lowest free one)")
    parser.add_argument(
        "--memory", type=_positive, metavar="MIB", help="RAM (the image spec's, else 512)"
    )
    parser.add_argument("--cpus", type=_positive, help="virtual CPUs (the image spec's, else 1)")
    parser.add_argument("--port", type=_positive, default=9999, help="agent vsock port (9999)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds to wait for the agent (120)",
    )


def register(sub: argparse._SubParsersAction[Any]) -> None:
    vm = sub.add_parser("vm", help="run and manage guests", description="Run and manage guests.")
    vm_sub = vm.add_subparsers(dest="vm_command", metavar="ACTION", required=True)

    run = vm_sub.add_parser(
        "run",
        help="boot a guest",
        description=(
            "Boot a guest image in QEMU (KVM when it works, else TCG) with a vsock device "
            "(kernel vhost-vsock, else the built-in userspace device) and wait until its agent "
            "answers. Foreground by default (console streamed; Ctrl-C powers it off)."
        ),
    )
    which = run.add_mutually_exclusive_group()
    which.add_argument(
        "--image",
        metavar="NAME|DIR",
        help="a named image (vsockrpc image list) or an image directory "
        "(default: build/find the cached one)",
    )
    which.add_argument(
        "--spec",
        metavar="FILE",
        type=Path,
        help="image spec (vsockrpc.toml): build its image, or reuse the cached build",
    )
    _boot_options(run)
    run.add_argument("--name", help="VM name (default vm<CID>)")
    run.add_argument("--append", default="", help="extra kernel command line")
    run.add_argument("--detach", action="store_true", help="boot, print the address, return")
    run.add_argument("--no-wait", action="store_true", help="do not wait for the agent")
    run.add_argument("--quiet", action="store_true", help="do not stream the guest console")
    run.set_defaults(func=_run)

    stop = vm_sub.add_parser("stop", help="power off a detached guest")
    stop.add_argument("which", metavar="NAME|CID")
    stop.set_defaults(func=_stop)

    lst = vm_sub.add_parser("list", help="list detached guests")
    lst.set_defaults(func=_list)

    demo = sub.add_parser(
        "demo",
        help="build, boot, call Addition(5, 7) over vsock, shut down",
        description="The whole flow with timings per phase.",
    )
    _boot_options(demo)
    demo.set_defaults(func=_demo)


def _image(path: Path | str | None, spec_file: Path | None = None) -> Any:
    from vsockrpc.image import build_image, find_image, names

    if spec_file is not None:
        from vsockrpc.payload import load_spec

        spec = load_spec(spec_file)  # SpecError (exit 2) before anything is built
        with step("guest image (image spec)"):
            return build_image(step=step, spec=spec, name=spec.name)
    if path is not None:
        text = str(path)
        if names.valid_name(text) and not Path(text).exists():
            return find_image(names.resolve(text))
        return find_image(Path(text))
    with step("guest image"):
        return build_image(step=step)


def _spec_default(info: Any, key: str, given: int | None, fallback: int) -> int:
    """``given`` (a command-line option), else the image spec's value, else ``fallback``."""
    if given is not None:
        return given
    value = (info.manifest.get("spec") or {}).get(key)
    return int(value) if value else fallback


def _run(args: argparse.Namespace) -> int:
    from vsockrpc.vm import launch

    info = _image(args.image, args.spec)
    echo = None if (args.quiet or args.detach) else sys.stdout
    vm = launch(
        info,
        cid=args.cid,
        memory_mib=_spec_default(info, "memory", args.memory, 512),
        cpus=_spec_default(info, "cpus", args.cpus, 1),
        port=args.port,
        append=args.append,
        name=args.name,
        wait=not args.no_wait,
        ready_timeout=args.timeout,
        echo=echo,
        detach=args.detach,
    )
    summary = f"vm {vm.name}: CID {vm.cid}, agent at {vm.address()}, accel {vm.accel.name}"
    if args.detach:
        print(summary, flush=True)
        print(f"stop it with: vsockrpc vm stop {vm.name}", file=sys.stderr)
        return 0
    with vm:
        print(f"==> {summary}", file=sys.stderr, flush=True)

        def on_term(_signum: int, _frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            while vm.running():
                time.sleep(0.2)
        except KeyboardInterrupt:
            print("==> powering the guest off", file=sys.stderr, flush=True)
        finally:
            signal.signal(signal.SIGTERM, previous)
        code = vm.stop()
    return 0 if code == 0 else 1


def _stop(args: argparse.Namespace) -> int:
    from vsockrpc.vm.registry import stop_vm

    stopped = stop_vm(args.which)
    how = "powered off" if stopped.graceful else "killed (the guest did not power off)"
    print(f"vm {stopped.record.name} (CID {stopped.record.cid}) {how}")
    return 0


def _list(_args: argparse.Namespace) -> int:
    from vsockrpc.vm.registry import list_vms

    records = list_vms()
    if not records:
        print("no VMs")
        return 0
    print(f"{'NAME':<12} {'CID':>6} {'STATE':<8} {'PID':>8}  ADDRESS")
    for r in records:
        state = "running" if r.running else "dead"
        print(f"{r.name:<12} {r.cid:>6} {state:<8} {r.qemu_pid:>8}  {r.state.get('address')}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vsockrpc import rpc
    from vsockrpc.proto import vsock_service_pb2 as pb
    from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc
    from vsockrpc.vm import launch

    phases: dict[str, float] = {}
    t = time.monotonic()
    info = _image(None)
    phases["image (build or cache)"] = time.monotonic() - t
    with step("boot the guest and wait for its agent"):
        vm = launch(
            info,
            cid=args.cid,
            memory_mib=args.memory or 512,
            cpus=args.cpus or 1,
            port=args.port,
            ready_timeout=args.timeout,
        )
    with vm:
        for name, seconds in vm.timings.phases().items():
            phases[f"boot: {name}"] = seconds
        print(
            f"==> guest {vm.name}: CID {vm.cid}, agent at {vm.address()} ({vm.accel.name})",
            file=sys.stderr,
        )
        t = time.monotonic()
        with rpc.channel(vm.address()) as ch:
            stub = pb_grpc.VsockServiceStub(ch)  # type: ignore[no-untyped-call]
            reply = stub.Addition(pb.AdditionRequest(a=5, b=7), timeout=30)
        phases["Addition(5, 7) call"] = time.monotonic() - t
        print(f"Addition result: 5 + 7 = {reply.c}", flush=True)
        deadline = time.monotonic() + 5
        guest_line = None
        while guest_line is None and time.monotonic() < deadline:
            guest_line = next((ln for ln in vm.console.lines() if "Addition: 5 + 7 = " in ln), None)
            time.sleep(0.05)
        if guest_line is None:
            raise VmError("the guest console does not show the Addition call")
        print(f"guest console: {guest_line.strip()}", flush=True)
        t = time.monotonic()
        code = vm.stop()
        phases["shutdown"] = time.monotonic() - t
    print("timings:", file=sys.stderr)
    for name, seconds in phases.items():
        print(f"  {name:<26} {seconds:6.2f} s", file=sys.stderr)
    print(f"  {'total':<26} {sum(phases.values()):6.2f} s", file=sys.stderr)
    if code != 0:
        raise VmError(f"QEMU exited with status {code} at shutdown")
    return 0 if reply.c == 12 else 1
