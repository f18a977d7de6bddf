"""The device's own entry point, ``python -m vsockrpc.vhost``: serve QEMU's
``vhost-user-vsock-pci`` until SIGTERM/SIGINT/SIGHUP, or until its QEMU goes away.

The VM launcher and ``vsockrpc device`` both run this (the CLI reuses :func:`add_arguments` and
:func:`run`); nothing here depends on the CLI. Exit status: 0 after a stop (signal, front-end
gone, watched process gone), 1 when the device cannot run (one line on stderr, a traceback only
with ``--debug``), 2 on a usage error.

Groups (sibling routing, docs/device.md): ``--group NAME`` (repeatable) with ``--groups-dir DIR``
makes the guest a member of each group; guests of a shared group connect to each other by CID.

Several VMs in one process: ``--vm guest-cid=N,socket=PATH,uds-path=PATH[,groups=A+B]``
(repeatable, vhost-device-vsock's syntax) instead of ``--socket``/``--uds``/``--cid``; guests of
a shared group served together are linked in-process. ``--host GROUP`` runs the group's device
host, which VM launchers bring their VMs to (:mod:`~vsockrpc.vhost.hosting`): with
``--fork-when-ready`` its first process exits 0 once it listens, and it exits by itself
``--idle-exit`` seconds after its last VM has left. The lifetime flags below apply to each VM.

Lifetime flags, for a device that must never outlive its VM:

* ``--exit-on-disconnect``: exit when the vhost-user front-end (QEMU) disconnects — QEMU
  dying closes the socket, so this covers ``kill -9`` of QEMU once it has connected.
* ``--exit-with-pid PID``: exit when process PID exits (a pidfd in the event loop; no polling,
  no race with PID reuse once the device runs). The launcher passes its own pid.
* ``--exit-with-parent``: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, plus an immediate exit if the
  parent is already gone. Linux delivers it when the parent *thread* that forked us exits, so
  prefer ``--exit-with-pid`` when the parent may start the device from a short-lived thread.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

from vsockrpc._checks import positive_int
from vsockrpc._fdlimit import raise_open_files_limit
from vsockrpc.errors import BadInputError, DeviceError
from vsockrpc.vhost.paths import DEFAULT_MODE

__all__ = ["add_arguments", "main", "run"]

log = logging.getLogger(__name__)

PROG = "python -m vsockrpc.vhost"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
DESCRIPTION = (
    "Serve QEMU's vhost-user-vsock-pci on a Unix socket and map guest vsock streams to host "
    "Unix sockets (Firecracker-style hybrid vsock): host clients connect to --uds and send "
    "'CONNECT <port>\\n'; guest connections to CID 2 port P reach '<uds>_P'."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The device's options (shared with ``vsockrpc device``)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="vhost-user socket to listen on")
    where.add_argument(
        "--socket-fd", metavar="N", type=_fd, help="an inherited, listening vhost-user socket"
    )
    where.add_argument(
        "--vm",
        metavar="SPEC",
        action="append",
        type=_vm_spec,
        help="serve this VM too, in this one process (repeatable; instead of --socket, --uds and "
        "--cid): 'guest-cid=N,socket=PATH,uds-path=PATH[,groups=A+B]', as vhost-device-vsock. "
        "Guests of a shared group served by one process reach each other without a socket",
    )
    where.add_argument(
        "--host",
        metavar="GROUP",
        type=_group,
        help="run as GROUP's device host (with --groups-dir): serve the VMs that VM launchers "
        "bring over DIR/GROUP/host.sock, exit once none is left (docs/device.md)",
    )
    parser.add_argument("--uds", metavar="PATH", help="hybrid vsock Unix socket")
    parser.add_argument(
        "--uds-fd",
        metavar="N",
        type=_fd,
        help="an inherited socket already listening on --uds (the caller owns the path)",
    )
    parser.add_argument("--cid", metavar="N", type=int, help="guest CID (>= 3)")
    parser.add_argument(
        "--mode",
        metavar="OCTAL",
        type=_mode,
        default=DEFAULT_MODE,
        help="permissions of the socket files the device creates (default 0600)",
    )
    parser.add_argument(
        "--buf-alloc",
        metavar="BYTES",
        type=positive_int,
        help="per-connection guest→host buffer (default 256 KiB)",
    )
    parser.add_argument(
        "--max-connections",
        metavar="N",
        type=positive_int,
        help="connection cap (default 1023, as Firecracker)",
    )
    parser.add_argument(
        "--group",
        metavar="NAME",
        action="append",
        type=_group,
        default=[],
        help="make the guest a member of group NAME (repeatable): guests of a shared group reach "
        "each other by CID; without --group the guest reaches the host only",
    )
    parser.add_argument(
        "--groups-dir",
        metavar="DIR",
        help="directory of the groups' rendezvous sockets (required with --group; one "
        "subdirectory per group, mode 0700)",
    )
    parser.add_argument(
        "--fork-when-ready",
        action="store_true",
        help="with --host: once listening, go on in a child process and exit 0, so the "
        "caller knows the host is ready (exit 1: it could not start) and need not reap it",
    )
    parser.add_argument(
        "--idle-exit",
        metavar="SECONDS",
        type=_idle_seconds,
        help="with --host: exit after serving no VM for this long (default 1)",
    )
    parser.add_argument(
        "--exit-on-disconnect",
        action="store_true",
        help="exit when the vhost-user front-end (QEMU) disconnects instead of accepting another",
    )
    parser.add_argument(
        "--exit-with-pid",
        metavar="PID",
        type=positive_int,
        help="exit when process PID exits (e.g. the VM launcher or QEMU)",
    )
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="exit when the parent process dies (PR_SET_PDEATHSIG)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the device until it is stopped; raises DeviceError when it cannot run."""
    # Imported here: `vsockrpc device --help` and the CLI's other commands need none of it.
    from vsockrpc.vhost.device import (
        DEFAULT_BUF_ALLOC,
        DEFAULT_MAX_CONNECTIONS,
        DeviceLoop,
        VsockDevice,
    )
    from vsockrpc.vhost.reactor import Reactor
    from vsockrpc.vhost.sibling import CoHosted

    # Each connection holds a host socket (and a passed one its client's lifeline too), up to
    # --max-connections (1023) per VM: the default soft limit of 1024 files is soon reached.
    raise_open_files_limit()
    if args.host is not None:
        return _run_host(args)
    if args.idle_exit is not None or args.fork_when_ready:
        raise BadInputError("--idle-exit and --fork-when-ready go with --host only")
    specs = _vm_specs(args)
    if any(spec.groups for spec in specs) and not args.groups_dir:
        raise BadInputError("--group needs --groups-dir DIR (where group members meet)")
    if args.exit_with_parent:
        _die_with_parent()
    uds_socket = _inherited(args.uds_fd, "--uds-fd") if args.uds_fd is not None else None
    reactor = Reactor()
    cohosted = CoHosted()
    with contextlib.ExitStack() as stack:
        stack.callback(reactor.close)
        devices: list[VsockDevice] = []
        for spec in specs:
            devices.append(
                stack.enter_context(
                    VsockDevice(
                        vhost_socket=spec.socket,
                        uds_path=spec.uds,
                        guest_cid=spec.cid,
                        buf_alloc=args.buf_alloc or DEFAULT_BUF_ALLOC,
                        max_connections=args.max_connections or DEFAULT_MAX_CONNECTIONS,
                        uds_socket=uds_socket,
                        socket_mode=args.mode,
                        exit_on_disconnect=args.exit_on_disconnect,
                        exit_with_pid=args.exit_with_pid,
                        groups=spec.groups,
                        groups_dir=args.groups_dir,
                        reactor=reactor,
                        cohosted=cohosted,
                    )
                )
            )
        # A VM whose device stopped (its QEMU gone) releases its sockets and group files at
        # once; the process goes on serving the others and exits after the last.
        loop = DeviceLoop(reactor, on_leave=VsockDevice.close)

        def serve() -> None:
            for spec in specs:
                log.info(
                    "vsock device: vhost-user %s, hybrid %s, guest CID %d, groups %s",
                    spec.socket if isinstance(spec.socket, str) else f"fd {args.socket_fd}",
                    spec.uds,
                    spec.cid,
                    ",".join(spec.groups) or "none",
                )
            for device in devices:
                loop.add(device)
            loop.run()

        signum = _serve_until_signalled(serve, loop.stop)
        if signum is not None:
            log.info("signal %d: stopped", signum)
    return 0


def _serve_until_signalled(serve: Callable[[], None], stop: Callable[[], None]) -> int | None:
    """Run ``serve`` with SIGTERM, SIGINT and SIGHUP calling ``stop`` (which only sets flags
    and writes eventfds: safe in a handler); the first signal received, if any."""
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop()

    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in stop_signals}
    try:
        serve()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return received[0] if received else None


def _run_host(args: argparse.Namespace) -> int:
    from vsockrpc.vhost.device import DEFAULT_BUF_ALLOC, DEFAULT_MAX_CONNECTIONS
    from vsockrpc.vhost.hosting import IDLE_EXIT, GroupHost

    if not args.groups_dir:
        raise BadInputError("--host needs --groups-dir DIR")
    for flag, value in (("--uds", args.uds), ("--uds-fd", args.uds_fd), ("--cid", args.cid)):
        if value is not None:
            raise BadInputError(f"{flag} does not go with --host (launchers bring the VMs)")
    if args.group or args.exit_on_disconnect or args.exit_with_pid:
        raise BadInputError("--host takes no --group, --exit-on-disconnect or --exit-with-pid")
    if args.exit_with_parent:
        _die_with_parent()
    # Joins and leaves are the host's own few lines: logged whatever the level (not the
    # per-connection INFO lines of the devices in it).
    hosting_log = logging.getLogger(GroupHost.__module__)
    hosting_log.setLevel(min(hosting_log.getEffectiveLevel(), logging.INFO))
    host = GroupHost(
        args.groups_dir,
        args.host,
        buf_alloc=args.buf_alloc or DEFAULT_BUF_ALLOC,
        max_connections=args.max_connections or DEFAULT_MAX_CONNECTIONS,
        idle_exit=args.idle_exit if args.idle_exit is not None else IDLE_EXIT,
    )
    if args.fork_when_ready:
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork():
            os._exit(0)  # ready: the child holds the same locked pid file and listening socket
        host.forked()
    try:
        _serve_until_signalled(host.serve, host.stop)
    finally:
        host.close()
    return 0


@dataclass(frozen=True)
class VmSpec:
    """One VM the process serves: its vhost-user socket (a path, or inherited), hybrid socket
    path, guest CID and groups."""

    socket: str | socket.socket
    uds: str
    cid: int
    groups: tuple[str, ...]


_SPEC_FIELDS = {"guest-cid": "cid", "socket": "socket", "uds-path": "uds"}


def _vm_specs(args: argparse.Namespace) -> list[VmSpec]:
    """The VMs to serve: one from --socket/--socket-fd, --uds, --cid, --group; or the --vm
    list (where those options have no place). BadInputError names what is wrong."""
    if args.vm:
        for flag, value in (("--uds", args.uds), ("--uds-fd", args.uds_fd), ("--cid", args.cid)):
            if value is not None:
                raise BadInputError(f"{flag} does not go with --vm (each --vm names its own)")
        if args.group:
            raise BadInputError("--group does not go with --vm (use groups=A+B in each --vm)")
        specs: list[VmSpec] = args.vm
        for field in ("guest-cid", "socket", "uds-path"):
            seen = [str(getattr(spec, _SPEC_FIELDS[field])) for spec in specs]
            twice = next((v for v in seen if seen.count(v) > 1), None)
            if twice is not None:
                raise BadInputError(f"two --vm give the same {field} {twice}")
        return specs
    if args.socket is None and args.socket_fd is None:
        raise BadInputError("one of --socket, --socket-fd, --vm or --host is required")
    if args.uds is None or args.cid is None:
        raise BadInputError("--uds and --cid are required (or use --vm)")
    vhost: str | socket.socket = (
        _inherited(args.socket_fd, "--socket-fd") if args.socket_fd is not None else args.socket
    )
    return [VmSpec(vhost, args.uds, args.cid, tuple(args.group))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=max(logging.WARNING - 10 * args.verbose, logging.DEBUG),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return run(args)
    except BadInputError as err:
        parser.error(str(err))  # exit 2, like argparse's own usage errors
    except DeviceError as err:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------- helpers
def _die_with_parent() -> None:
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise DeviceError(f"--exit-with-parent: prctl failed: {os.strerror(err)}")
    # The parent may have died before prctl: then we were re-parented and no signal comes.
    if parent == 1 or os.getppid() != parent:
        raise DeviceError("--exit-with-parent: the parent process is already gone")


def _inherited(fd: int, flag: str) -> socket.socket:
    from vsockrpc.vhost.paths import unix_stream_from_fd

    return unix_stream_from_fd(fd, f"{flag} {fd}", listening=False, owned=False)


def _fd(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor number") from None
    if value < 3:
        raise argparse.ArgumentTypeError(f"{text!r} is stdin/stdout/stderr, not a socket")
    return value


def _group(text: str) -> str:
    from vsockrpc.vhost.groups import check_group_name

    try:
        return check_group_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _vm_spec(text: str) -> VmSpec:
    """``guest-cid=N,socket=PATH,uds-path=PATH[,groups=A+B]`` (vhost-device-vsock's --vm)."""
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ("guest-cid", "socket", "uds-path", "groups"):
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected guest-cid=N, socket=PATH, uds-path=PATH or groups=A+B"
            )
        if key in fields:
            raise argparse.ArgumentTypeError(f"{key} given twice")
        fields[key] = value
    missing = [k for k in ("guest-cid", "socket", "uds-path") if not fields.get(k)]
    if missing:
        raise argparse.ArgumentTypeError(f"missing {', '.join(missing)}")
    try:
        cid = int(fields["guest-cid"])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"guest-cid {fields['guest-cid']!r} is not a number"
        ) from None
    groups = tuple(_group(g) for g in fields["groups"].split("+")) if fields.get("groups") else ()
    return VmSpec(fields["socket"], fields["uds-path"], cid, groups)


def _idle_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86400:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds in (0, 86400]")
    return value


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0600") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a permission mode (0000-0777)")
    return value
