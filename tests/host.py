"""What this host offers the tests, probed without touching the code under test.

A test that needs a kernel feature skips only when the feature is missing here, never on an
error of the code it tests (that error is the regression the test exists to catch).
"""

from __future__ import annotations

import socket


def _kernel_af_vsock() -> bool:
    if not hasattr(socket, "AF_VSOCK"):
        return False
    try:
        # Creating the socket only: it is neither bound nor connected (the safety rule).
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError:  # EAFNOSUPPORT: no vsock core in this kernel
        return False
    return True


AF_VSOCK = _kernel_af_vsock()
AF_VSOCK_MISSING = "no AF_VSOCK in this Python or kernel"
