"""Guest-agent subcommands: ``exec``, ``shell``, ``cp``, ``info``, ``shutdown``.

Each takes the agent's ADDRESS first (``hvsock:/run/vm.vsock:9999``, ``vsock:3:9999``,
``unix:/path``…). Thin wrappers over :class:`vsockrpc.sdk.Guest`: failures arrive as
``AgentError`` and become one line and exit status 1 in ``main``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import termios
import threading
import time
import tty
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from vsockrpc.addresses import Address, parse_address
from vsockrpc.cli._args import seconds, seconds_or_zero
from vsockrpc.errors import AddressError, AgentError, BadInputError

if TYPE_CHECKING:  # the SDK (and grpc) load when a command runs, not for every command's parser
    from vsockrpc.sdk import Exited, Guest, Process

GUEST_PREFIX = "guest:"
DEFAULT_SHELL = ["/bin/sh", "-c", 'exec "$(command -v bash || echo /bin/sh)" -l']


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except AddressError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _env(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDRESS", type=_address, help="the agent's address")
    parser.add_argument(
        "--wait",
        type=seconds_or_zero,
        default=10.0,
        metavar="SECONDS",
        help="wait this long for the agent to answer (default 10)",
    )


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``exec``, ``shell``, ``cp``, ``info`` and ``shutdown``."""
    ex = sub.add_parser(
        "exec",
        help="run a command in the guest",
        description="Run CMD in the guest: output streamed, stdin forwarded, its exit status "
        "becomes ours (128+N when killed by signal N).",
    )
    _common(ex)
    ex.add_argument("-e", "--env", type=_env, action="append", default=[], metavar="NAME=VALUE")
    ex.add_argument("--cwd", help="working directory in the guest (absolute)")
    ex.add_argument("-u", "--user", help="run as this guest user (name or uid)")
    ex.add_argument(
        "--timeout", type=seconds, help="kill the command after SECONDS (it then exits 137)"
    )
    ex.add_argument("-t", "--tty", action="store_true", help="run on a pseudo-terminal")
    ex.add_argument("-n", "--no-stdin", action="store_true", help="do not forward stdin")
    ex.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD")
    ex.set_defaults(func=_exec, usage_error=ex.error)

    sh = sub.add_parser(
        "shell",
        help="interactive shell in the guest",
        description="An interactive login shell (or CMD) on a guest PTY; the terminal is put "
        "in raw mode and window size changes are forwarded.",
    )
    _common(sh)
    sh.add_argument("-u", "--user", help="run as this guest user (name or uid)")
    sh.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD")
    sh.set_defaults(func=_shell, usage_error=sh.error)

    cp = sub.add_parser(
        "cp",
        help="copy files and directories to or from the guest",
        description=f"Copy between host and guest; the guest side is written {GUEST_PREFIX}PATH "
        f"(e.g. `vsockrpc cp ADDR ./dir {GUEST_PREFIX}/srv/`). Directories are copied "
        "recursively; a destination that is an existing directory receives SRC inside it. "
        "Transfers are checksummed and never leave partial files.",
    )
    _common(cp)
    cp.add_argument("source", metavar="SRC")
    cp.add_argument("destination", metavar="DST")
    cp.add_argument(
        "--no-preserve", action="store_true", help="do not keep permission bits and mtimes"
    )
    cp.set_defaults(func=_cp)

    info = sub.add_parser("info", help="show guest information", description="Guest facts.")
    _common(info)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--sync-time", action="store_true", help="also set the guest clock")
    info.set_defaults(func=_info)

    down = sub.add_parser("shutdown", help="power the guest off", description="Power off.")
    _common(down)
    down.add_argument("--reboot", action="store_true", help="reboot instead")
    down.set_defaults(func=_shutdown)


def _command(args: argparse.Namespace, default: list[str] | None = None) -> list[str]:
    command = list(args.command)
    if "--" in command and command.index("--") > 0:
        misplaced = command[: command.index("--")]
        raise AgentError(
            f"unexpected {' '.join(misplaced)!r} between ADDRESS and --",
            hint="options go before ADDRESS: vsockrpc exec [OPTIONS] ADDRESS -- CMD [ARG...]",
        )
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        if default is None:
            raise AgentError("no command given", hint="vsockrpc exec ADDRESS -- CMD [ARG...]")
        return default
    if not command[0]:
        args.usage_error("the program name (the first word after --) is empty")  # exits 2
    return command


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _guest(args: argparse.Namespace) -> Guest:
    from vsockrpc.sdk import Guest

    return Guest(args.address, wait=args.wait)


def _forward_stdin(proc: Process) -> threading.Thread:
    def pump() -> None:
        try:
            while data := os.read(0, 65536):
                proc.send(data)
        except OSError:
            pass
        proc.close_stdin()

    thread = threading.Thread(target=pump, name="stdin", daemon=True)  # blocked in read at exit
    thread.start()
    return thread


def _stream(proc: Process) -> Exited:
    from vsockrpc.sdk import Exited, Stderr, Stdout

    for event in proc:
        if isinstance(event, Stdout):
            _write_all(1, event.data)
        elif isinstance(event, Stderr):
            _write_all(2, event.data)
        elif isinstance(event, Exited):
            return event
    raise AgentError("the exec stream ended without an exit status")


def _exec(args: argparse.Namespace) -> int:
    command = _command(args)
    with _guest(args) as guest:
        window = None
        if args.tty:
            with contextlib.suppress(OSError):
                size = os.get_terminal_size(0)
                window = (size.lines, size.columns)
        with guest.exec_stream(
            command,
            env=dict(args.env),
            cwd=args.cwd,
            user=args.user,
            timeout=args.timeout,
            pty=args.tty,
            window=window,
            term=os.environ.get("TERM") if args.tty else None,
            stdin=b"" if args.no_stdin else None,
        ) as proc:
            if not args.no_stdin:
                _forward_stdin(proc)
            exited = _stream(proc)
    if exited.timed_out:
        print(
            f"vsockrpc: error: {command[0]!r} timed out after {args.timeout:g} s and was killed "
            f"(exit status {exited.status})",
            file=sys.stderr,
        )
    return exited.status


def _shell(args: argparse.Namespace) -> int:
    command = _command(args, DEFAULT_SHELL)
    interactive = os.isatty(0)
    window = None
    if interactive:
        size = os.get_terminal_size(0)
        window = (size.lines, size.columns)
    with (
        _guest(args) as guest,
        guest.exec_stream(
            command,
            user=args.user,
            pty=True,
            window=window,
            term=os.environ.get("TERM", "xterm-256color"),
        ) as proc,
    ):
        saved = termios.tcgetattr(0) if interactive else None
        previous = None
        if interactive:

            def on_winch(_signum: int, _frame: object) -> None:
                with contextlib.suppress(OSError):
                    size = os.get_terminal_size(0)
                    if size.lines and size.columns:  # 0x0: a terminal that does not know
                        proc.resize(size.lines, size.columns)

            previous = signal.signal(signal.SIGWINCH, on_winch)
            tty.setraw(0, termios.TCSANOW)  # keep type-ahead
        try:
            _forward_stdin(proc)
            return _stream(proc).status
        finally:
            if saved is not None:
                termios.tcsetattr(0, termios.TCSADRAIN, saved)
            if previous is not None:
                signal.signal(signal.SIGWINCH, previous)


def _split(path: str) -> tuple[bool, str]:
    if path.startswith(GUEST_PREFIX):
        return True, path[len(GUEST_PREFIX) :]
    return False, path


def _cp(args: argparse.Namespace) -> int:
    src_guest, src = _split(args.source)
    dst_guest, dst = _split(args.destination)
    if src_guest == dst_guest:
        raise BadInputError(
            "exactly one side must be in the guest",
            hint=f"prefix the guest path with {GUEST_PREFIX!r}, e.g. {GUEST_PREFIX}/tmp/file",
        )
    preserve = not args.no_preserve
    start = time.monotonic()
    with _guest(args) as guest:
        name = os.path.basename(src.rstrip("/")) or src
        if dst_guest:
            if not os.path.lexists(src):
                raise AgentError(f"{src}: no such file or directory")
            if guest.exists(dst) and guest.stat(dst, follow_symlinks=True).is_dir:
                dst = os.path.join(dst, name)
            stats = guest.put(src, dst, preserve=preserve)
        else:
            if os.path.isdir(dst):
                dst = os.path.join(dst, name)
            stats = guest.get(src, dst, preserve=preserve)
    elapsed = time.monotonic() - start
    mib = stats.bytes / (1024 * 1024)
    print(
        f"copied {stats.files} file(s), {mib:.1f} MiB in {elapsed:.2f} s "
        f"({mib / max(elapsed, 1e-9):.1f} MiB/s)",
        file=sys.stderr,
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    with _guest(args) as guest:
        offset = guest.sync_time() if args.sync_time else None
        rtt = guest.ping()
        info = guest.info()
    if args.json:
        data = asdict(info)
        data["ping_seconds"] = rtt
        if offset is not None:
            data["clock_offset_seconds"] = offset
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    rows = [
        ("os", info.os_pretty_name or "?"),
        ("kernel", f"{info.kernel_release} ({info.machine})"),
        ("hostname", info.hostname),
        ("cpus", str(info.cpus)),
        (
            "memory",
            f"{info.memory_available_bytes / 2**20:.0f} MiB available of "
            f"{info.memory_total_bytes / 2**20:.0f} MiB",
        ),
        ("uptime", f"{info.uptime_seconds:.1f} s"),
        (
            "agent",
            f"vsockrpc {info.agent_version}, Python {info.python_version}, pid {info.agent_pid}",
        ),
        ("ping", f"{rtt * 1000:.2f} ms"),
    ]
    if offset is not None:
        rows.append(("clock", f"set from the host (was {offset:+.3f} s off)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _shutdown(args: argparse.Namespace) -> int:
    with _guest(args) as guest:
        guest.shutdown(reboot=args.reboot)
    print(f"guest acknowledged {'reboot' if args.reboot else 'power-off'}", file=sys.stderr)
    return 0
