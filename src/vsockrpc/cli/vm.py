"""``vsockrpc vm run|stop|list|snapshot`` and ``vsockrpc demo``.

Exit codes beyond main's: a bad option (name, CID, port, size, timeout) is a usage error,
exit 2, reported before any image is built; a name or CID another VM holds is a failed
operation, exit 1 (the input is well-formed, the machine's state refuses it). A foreground
``vm run``/``demo`` treats SIGINT, SIGTERM and SIGHUP alike: during the boot everything is
stopped and removed (exit 130), once running the guest is powered off (exit 0 when it was).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from vsockrpc._stopsignals import interrupting
from vsockrpc.cli._args import KERNELS
from vsockrpc.cli._output import step
from vsockrpc.cli.forward import exposure
from vsockrpc.errors import GuestError, VmError


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _boot_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cid", type=_integer, help="guest CID (default: the lowest free one)")
    parser.add_argument(
        "--memory", type=_integer, metavar="MIB", help="RAM (the image spec's, else 512)"
    )
    parser.add_argument(
        "--cpus",
        type=_integer,
        help="virtual CPUs (the image spec's, else 1; without KVM they share one host thread)",
    )
    parser.add_argument("--port", type=_integer, default=9999, help="agent vsock port (9999)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds to wait for the agent (120)",
    )
    parser.add_argument(
        "--kernel",
        choices=KERNELS,
        help="kernel of the image it builds: debian (Debian's cloud kernel; the default, "
        "unless the image spec says kernel = ...) or tailored (built once from Debian's "
        "source for this guest; boots ~1 s faster under TCG, has no modules: docs/system.md)",
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
    which.add_argument(
        "--from",
        dest="from_snapshot",
        metavar="DIR",
        type=Path,
        help="restore a snapshot (vsockrpc vm snapshot) as a new VM with its own CID",
    )
    _boot_options(run)
    run.add_argument(
        "--count",
        type=_integer,
        default=1,
        metavar="N",
        help="with --from: restore N clones at once, each with its own CID (names NAME-1…)",
    )
    run.add_argument("--name", help="VM name (default vm<CID>)")
    run.add_argument("--append", default="", help="extra kernel command line")
    run.add_argument("--detach", action="store_true", help="boot, print the address, return")
    run.add_argument("--no-wait", action="store_true", help="do not wait for the agent")
    run.add_argument("--quiet", action="store_true", help="do not stream the guest console")
    run.add_argument(
        "--expose",
        metavar="ADDRESS:PORT",
        type=exposure,
        action="append",
        default=[],
        help="let the guest reach this host socket at CID 2 port PORT, e.g. "
        "unix:/run/app.sock:5000 (repeatable; foreground runs; see vsockrpc forward)",
    )
    run.add_argument(
        "--group",
        dest="groups",
        metavar="NAME",
        action="append",
        default=[],
        help="VM↔VM: join group NAME; the guest reaches other members at vsock:CID:PORT and "
        "they reach it (repeatable; default: isolated)",
    )
    run.add_argument(
        "--trust-group",
        action="store_true",
        help="let group members call the guest's agent (default: the host only)",
    )
    run.set_defaults(func=_run)

    snap = vm_sub.add_parser(
        "snapshot",
        help="save a running guest to a snapshot directory",
        description=(
            "Save a running guest whose agent is ready (RAM and device state) to a new "
            "directory, then resume it (or stop it with --stop). Restore it with "
            "vsockrpc vm run --from DIR."
        ),
    )
    snap.add_argument("which", metavar="NAME|CID")
    snap.add_argument("--out", type=Path, required=True, metavar="DIR", help="new directory")
    snap.add_argument("--stop", action="store_true", help="power the guest off once saved")
    snap.add_argument(
        "--compress",
        action="store_true",
        help="store the RAM compressed with zstd (about a third of the size on disk; each "
        "restore then spends a few tenths of a second decompressing it)",
    )
    snap.set_defaults(func=_snapshot)

    stop = vm_sub.add_parser("stop", help="power off a detached guest")
    stop.add_argument("which", metavar="NAME|CID")
    stop.set_defaults(func=_stop)

    lst = vm_sub.add_parser("list", help="list guests (name, CID, state, groups, address)")
    lst.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    lst.set_defaults(func=_list)

    demo = sub.add_parser(
        "demo",
        help="build, boot, call Addition(5, 7) over vsock, shut down",
        description="The whole flow with timings per phase.",
    )
    _boot_options(demo)
    demo.set_defaults(func=_demo)


def _check(args: argparse.Namespace) -> None:
    """Validate the boot options before anything (an image build takes minutes). Sizes left
    to the image spec are checked again by the launcher once the image is known."""
    from vsockrpc.vm.options import check_launch

    check_launch(
        name=getattr(args, "name", None),
        cid=args.cid,
        port=args.port,
        memory_mib=512 if args.memory is None else args.memory,
        cpus=1 if args.cpus is None else args.cpus,
        ready_timeout=args.timeout,
        groups=getattr(args, "groups", ()),
        trust_group=getattr(args, "trust_group", False),
    )


def _image(
    path: Path | str | None, spec_file: Path | None = None, kernel: str | None = None
) -> Any:
    with interrupting():
        return _find_or_build_image(path, spec_file, kernel)


def _find_or_build_image(
    path: Path | str | None, spec_file: Path | None, kernel: str | None
) -> Any:
    from vsockrpc.image import build_image, find_image, names

    if spec_file is not None:
        from vsockrpc.payload import load_spec

        spec = load_spec(spec_file)  # SpecError (exit 2) before anything is built
        with step("guest image (image spec)"):
            return build_image(step=step, spec=spec, name=spec.name, kernel=kernel)
    if path is not None:
        return find_image(names.locate(str(path)))
    with step("guest image"):
        return build_image(step=step, kernel=kernel)


def _spec_default(info: Any, key: str, given: int | None, fallback: int) -> int:
    """``given`` (a command-line option), else the image spec's value, else ``fallback``."""
    if given is not None:
        return given
    value = (info.manifest.get("spec") or {}).get(key)
    return int(value) if value else fallback


def _run(args: argparse.Namespace) -> int:
    from vsockrpc._stopsignals import StopSignals
    from vsockrpc.vm import launch
    from vsockrpc.vm.options import InvalidVmOption

    _check(args)
    if args.expose and (args.detach or args.from_snapshot is not None):
        from vsockrpc.vm.options import InvalidVmOption

        with_what = "--detach" if args.detach else "--from"
        raise InvalidVmOption(
            f"--expose cannot be used with {with_what}: it needs a foreground "
            "run of a fresh boot (this process forwards)"
        )
    if args.from_snapshot is not None:
        return _run_from(args)
    if args.count != 1:
        raise InvalidVmOption("--count needs --from (clones of a snapshot)")
    if args.kernel is not None and args.image is not None:
        raise InvalidVmOption(
            f"--kernel chooses the kernel of an image vm run builds; {args.image} is built "
            "already (image build --kernel)"
        )
    info = _image(args.image, args.spec, args.kernel)
    echo = None if (args.quiet or args.detach) else sys.stdout
    # From here on a stop signal only sets a flag: the launcher unwinds where it is safe and
    # a second signal cannot cut the cleanup short.
    with StopSignals(absorb_after=True) as stop:
        try:
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
                cancel=stop.event,
                groups=args.groups,
                trust_group=args.trust_group,
            )
        except GuestError as err:
            if echo is None and err.console_tail:  # e.g. a user service's traceback
                print("\n".join(f"guest: {ln}" for ln in err.console_tail), file=sys.stderr)
            raise
        summary = f"vm {vm.name}: CID {vm.cid}, agent at {vm.address()}, accel {vm.accel.name}"
        if vm.groups:
            summary += f", groups {','.join(vm.groups)}"
        if args.detach:
            print(summary, flush=True)
            print(f"stop it with: vsockrpc vm stop {vm.name}", file=sys.stderr)
            return 0
        with vm, contextlib.ExitStack() as exposed:
            print(f"==> {summary}", file=sys.stderr, flush=True)
            for target, port in args.expose:
                from vsockrpc.forward import expose

                forwarder = exposed.enter_context(expose(vm.address(), target, port=port))
                print(f"==> exposing {forwarder.description}", file=sys.stderr, flush=True)
            while vm.running() and not stop.event.is_set():
                stop.event.wait(0.2)
            if stop.received is not None:
                print(
                    f"==> {stop.received.name}: powering the guest off", file=sys.stderr, flush=True
                )
            code = vm.stop()
    if stop.received is None and code != 0:
        raise VmError(f"QEMU exited with status {code}: {vm.qemu_last_words or 'no message'}")
    return 0 if code == 0 else 1


def _run_from(args: argparse.Namespace) -> int:
    from vsockrpc._stopsignals import StopSignals
    from vsockrpc.vm.options import InvalidVmOption
    from vsockrpc.vm.restoring import restore_many

    fixed = {"--memory": args.memory, "--cpus": args.cpus, "--append": args.append or None}
    fixed["--kernel"] = args.kernel
    fixed["--no-wait"] = args.no_wait or None
    fixed["--trust-group"] = args.trust_group or None  # the clone's agent has its policy
    given = [flag for flag, value in fixed.items() if value is not None]
    if given:
        raise InvalidVmOption(f"{given[0]} cannot be used with --from (the snapshot fixes it)")
    if args.count < 1 or args.count > 64:
        raise InvalidVmOption(f"--count {args.count}: expected 1 to 64")
    if args.count > 1 and args.cid is not None:
        raise InvalidVmOption("--cid cannot be used with --count above 1 (each clone needs one)")
    echo = None if (args.quiet or args.detach or args.count > 1) else sys.stdout
    with StopSignals(absorb_after=True) as stop:
        vms = restore_many(
            args.from_snapshot,
            args.count,
            cid=args.cid,
            name=args.name,
            ready_timeout=args.timeout,
            echo=echo,
            detach=args.detach,
            cancel=stop.event,
            groups=args.groups,
        )
        for vm in vms:
            took = vm.timings.rpc_ready - vm.timings.launched if vm.timings.rpc_ready else 0.0
            line = f"vm {vm.name}: CID {vm.cid}, agent at {vm.address()}, restored in {took:.2f} s"
            if vm.groups:
                line += f", groups {','.join(vm.groups)}"
            print(line if args.detach else f"==> {line}", flush=True)
        if args.detach:
            names = " ".join(vm.name for vm in vms)
            print(f"stop with: vsockrpc vm stop NAME ({names})", file=sys.stderr)
            return 0
        with contextlib.ExitStack() as all_vms:
            for vm in vms:
                all_vms.enter_context(vm)
            while all(vm.running() for vm in vms) and not stop.event.is_set():
                stop.event.wait(0.2)
            codes = [vm.stop() for vm in vms]
    return 0 if all(c == 0 for c in codes) or stop.received is not None else 1


def _snapshot(args: argparse.Namespace) -> int:
    from vsockrpc.vm.options import check_which
    from vsockrpc.vm.snapshot import snapshot_vm

    check_which(args.which)
    with step(f"snapshot of {args.which}"):
        info = snapshot_vm(args.which, args.out, stop=args.stop, compressed=args.compress)
    after = "stopped" if args.stop else "resumed"
    print(
        f"snapshot {info.path}: {info.disk_bytes / 2**20:.0f} MiB on disk, guest paused "
        f"{info.seconds:.2f} s, {after}"
    )
    return 0


def _stop(args: argparse.Namespace) -> int:
    from vsockrpc.vm.registry import stop_vm

    stopped = stop_vm(args.which)
    what = f"vm {stopped.record.name} (CID {stopped.record.cid})"
    if not stopped.was_running:
        print(f"{what} was already dead (QEMU had exited); removed what it left")
    elif stopped.graceful:
        print(f"{what} powered off")
    else:
        print(f"{what} killed (the guest did not power off)")
    return 0


def _list(args: argparse.Namespace) -> int:
    from vsockrpc.vm.registry import list_vms

    records = list_vms()
    if args.json:
        rows = [
            {
                "name": r.name,
                "cid": r.cid,
                "state": r.status,
                "qemu_pid": r.qemu_pid,
                "groups": list(r.groups),
                "address": r.state.get("address"),
            }
            for r in records
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not records:
        print("no VMs")
        return 0
    print(f"{'NAME':<12} {'CID':>6} {'STATE':<20} {'PID':>8}  {'GROUPS':<16} ADDRESS")
    for r in records:
        groups = ",".join(r.groups) or "-"
        print(
            f"{r.name:<12} {r.cid:>6} {r.status:<20} {r.qemu_pid:>8}  {groups:<16} "
            f"{r.state.get('address')}"
        )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vsockrpc._stopsignals import StopSignals
    from vsockrpc.vm import launch

    _check(args)
    phases: dict[str, float] = {}
    t = time.monotonic()
    info = _image(None, kernel=args.kernel)
    phases["image (build or cache)"] = time.monotonic() - t
    with StopSignals(absorb_after=True) as stop:
        with step("boot the guest and wait for its agent"):
            vm = launch(
                info,
                cid=args.cid,
                memory_mib=args.memory or 512,
                cpus=args.cpus or 1,
                port=args.port,
                ready_timeout=args.timeout,
                cancel=stop.event,
            )
        code, reply_c, phase_more = _demo_call(vm, stop.event)
        phases.update(phase_more)
    if stop.received is not None:
        raise KeyboardInterrupt
    print("timings:", file=sys.stderr)
    for name, seconds in phases.items():
        print(f"  {name:<26} {seconds:6.2f} s", file=sys.stderr)
    print(f"  {'total':<26} {sum(phases.values()):6.2f} s", file=sys.stderr)
    if code != 0:
        raise VmError(f"QEMU exited with status {code} at shutdown: {vm.qemu_last_words}")
    return 0 if reply_c == 12 else 1


def _demo_call(vm: Any, stop: Any) -> tuple[int | None, int, dict[str, float]]:
    """Addition(5, 7) on the booted guest, then power it off (at once when ``stop`` is set)."""
    from vsockrpc import rpc
    from vsockrpc.proto import vsock_service_pb2 as pb
    from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc

    phases: dict[str, float] = {}
    with vm:
        if stop.is_set():
            return vm.stop(), 0, phases
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
    return code, reply.c, phases
