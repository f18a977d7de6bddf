"""How a foreground child is made to die with its launcher, and exit statuses in messages."""

from __future__ import annotations

import os
import signal

from vsockrpc.vm.procs import dying_with_parent, exit_status


def test_the_child_is_wrapped_by_setpriv_and_checks_its_parent() -> None:
    argv, preexec = dying_with_parent(["/usr/bin/qemu", "-name", "vsockrpc-x"])
    assert preexec is None  # no preexec_fn: Popen can vfork, no at-fork handler runs
    assert argv[0].endswith("/setpriv")
    assert argv[1:3] == ["--pdeathsig=KILL", "--"]
    assert argv[3].endswith("/sh") and argv[4] == "-c"
    assert argv[6] == str(os.getpid())
    assert argv[7:] == ["/usr/bin/qemu", "-name", "vsockrpc-x"]


def test_other_signals_are_named_without_prefix() -> None:
    argv, _ = dying_with_parent(["x"], signal.SIGTERM)
    assert argv[1] == "--pdeathsig=TERM"


def test_exit_statuses_name_the_signal() -> None:
    assert exit_status(1) == "status 1"
    assert exit_status(-6) == "killed by SIGABRT"
    assert exit_status(-9) == "killed by SIGKILL"
