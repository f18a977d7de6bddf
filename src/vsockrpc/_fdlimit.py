"""Raise the open-files limit (``RLIMIT_NOFILE``) of this process; standard library only.

Linux starts processes with a soft limit of 1024 open files (and PID 1 with a hard limit of
4096). A server whose relay holds a socket per client, and a few more per relayed connection,
runs out long before the machine does: the guest agent stopped answering at ~150 idle
connections. Servers raise the soft limit to the hard one at start (as the Go runtime does for
every program); PID 1, which may raise the hard limit too (CAP_SYS_RESOURCE), sets both.
Children inherit the result.
"""

from __future__ import annotations

import resource

__all__ = ["raise_open_files_limit"]


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:  # the kernel's ceiling for RLIMIT_NOFILE
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def raise_open_files_limit(target: int | None = None) -> int:
    """Raise the soft limit to ``target`` (capped by the hard limit), or to the hard limit.

    With a ``target`` above the hard limit, the hard limit is raised too where the process may
    (root; capped by ``fs.nr_open``). Never lowers a limit; returns the soft limit now in force.
    """
    # Linux caps RLIMIT_NOFILE at fs.nr_open: it is never RLIM_INFINITY.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if target is not None and target > hard:
        wanted_hard = min(target, _nr_open())
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, wanted_hard))
            hard = wanted_hard
        except (OSError, ValueError):
            pass  # not privileged: stay within the hard limit
    new_soft = hard if target is None else min(target, hard)
    if new_soft <= soft:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
    except (OSError, ValueError):
        return soft
    return new_soft
