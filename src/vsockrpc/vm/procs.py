"""The processes of a VM: is one still alive (and still the one we started), and making a
child die with its launcher.

PIDs are recycled, so "alive" for a recorded PID means: the process exists, is not a zombie,
and its command line still holds a marker of the VM (QEMU's ``-name vsockrpc-<name>``, the
device's socket path) — never signal or trust a PID without that check.

A child is made to die with its launcher by util-linux ``setpriv --pdeathsig`` in the child
(:func:`dying_with_parent`), not by a ``preexec_fn``: a ``preexec_fn`` makes CPython fork()
instead of vfork(), so the at-fork handlers of every library run in the child, and grpcio's
abort it (SIGABRT before exec, not a word on stderr) when gRPC threads are busy — about one
start in 40 of a launcher that has just used a gRPC channel.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vsockrpc.errors import VmError

__all__ = [
    "alive",
    "die_with_parent",
    "dying_with_parent",
    "exit_status",
    "is_vm_process",
    "kill_vm_process",
    "popen_dying_with_parent",
]

_PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h
# Run by sh between setpriv (PDEATHSIG set) and the real program: a launcher that died before
# setpriv's prctl has left the child to another parent; then start nothing. $0: launcher pid.
_PARENT_CHECK = '[ "$PPID" = "$0" ] || exit 1; exec "$@"'


def alive(pid: int | None) -> bool:
    """``pid`` exists and is not a zombie."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def is_vm_process(pid: int | None, marker: str) -> bool:
    """``pid`` is alive and its command line contains ``marker``."""
    if not alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except OSError:
        return False


def kill_vm_process(pid: int | None, marker: str, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` to ``pid`` only if it is still the VM's process; True when sent."""
    if pid is None or not is_vm_process(pid, marker):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` making the child receive ``sig`` when this process dies (even by
    SIGKILL): ``PR_SET_PDEATHSIG``, then a ``getppid`` check for a parent that died between
    fork and prctl. None off the main thread: the kernel fires PDEATHSIG when the *thread*
    that forked exits, which would kill the VM with a short-lived worker thread."""
    if threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # libc is in the process already
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: keep it minimal
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def dying_with_parent(
    argv: list[str], sig: signal.Signals = signal.SIGKILL
) -> tuple[list[str], Callable[[], None] | None]:
    """``argv`` made to receive ``sig`` when this process dies, and the ``preexec_fn`` to pass.

    With ``setpriv`` (util-linux) the signal is set in the child and the ``preexec_fn`` is None,
    so Popen can vfork: no at-fork handler runs in the child (see the module docstring).
    Without it, :func:`die_with_parent` as before. Off the main thread: ``argv`` unchanged (as
    :func:`die_with_parent`). The program's own argv is what ends up exec'ed, so its
    ``/proc/<pid>/cmdline`` is unchanged."""
    if threading.current_thread() is not threading.main_thread():
        return argv, None
    setpriv, sh = shutil.which("setpriv"), shutil.which("sh")
    if setpriv is None or sh is None:
        return argv, die_with_parent(sig)
    name = sig.name.removeprefix("SIG")
    wrapped = [setpriv, f"--pdeathsig={name}", "--", sh, "-c", _PARENT_CHECK, str(os.getpid())]
    return [*wrapped, *argv], None


def popen_dying_with_parent(argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(argv, **kwargs)`` whose child gets SIGKILL when this process dies
    (:func:`dying_with_parent`): for helpers (benchmark guests and servers) that must not
    outlive a run killed before its own cleanup."""
    args, preexec = dying_with_parent(argv)
    # preexec is None whenever setpriv exists (dying_with_parent): Popen then vforks.
    return subprocess.Popen(args, preexec_fn=preexec, **kwargs)  # noqa: PLW1509


def exit_status(returncode: int) -> str:
    """``status 1`` or ``killed by SIGABRT`` for a Popen return code."""
    if returncode >= 0:
        return f"status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


def detached_or_own_group(argv: list[str], detach: bool) -> dict[str, Any]:
    """Popen's ``args`` and process options. Children never share our process group: a
    terminal's Ctrl-C reaches the launcher only, which then powers the guest off in order
    instead of QEMU and the device dying mid-flight. Detached VMs get their own session (no
    controlling terminal); a foreground QEMU gets PDEATHSIG (:func:`dying_with_parent`),
    so it dies with the launcher even when that is SIGKILLed. glibc's fatal errors (a
    fortify or heap check's abort) go to stderr, i.e. ``qemu.log``, not to a terminal."""
    env = {**os.environ, "LIBC_FATAL_STDERR_": "1"}
    if detach:
        return {"args": argv, "env": env, "start_new_session": True}
    args, preexec = dying_with_parent(argv)
    return {"args": args, "env": env, "process_group": 0, "preexec_fn": preexec}


def start_qemu(
    argv: list[str], run_dir: Path, held: tuple[int, ...], detach: bool
) -> subprocess.Popen[bytes]:
    """QEMU started by ``argv``, its output in ``run_dir/qemu.log``, holding the ``held`` fds
    (CID and name leases), in its own group or session (:func:`detached_or_own_group`)."""
    with (run_dir / "qemu.log").open("ab") as qemu_log:
        try:
            return subprocess.Popen(
                stdin=subprocess.DEVNULL,
                stdout=qemu_log,
                stderr=subprocess.STDOUT,
                pass_fds=held,
                **detached_or_own_group(argv, detach),
            )
        except OSError as err:
            raise VmError(f"cannot start QEMU: {err}") from err
