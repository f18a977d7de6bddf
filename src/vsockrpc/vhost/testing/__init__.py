"""A test driver that plays QEMU *and* the guest against a :class:`~vsockrpc.vhost.VsockDevice`,
over the device's real vhost-user socket, with no VM.

Like httpcore's ``MockBackend``, this is real API, shipped so tests and ``bench/`` share it:

* guest memory is a memfd (``os.memfd_create``) shared with the back-end through
  SET_MEM_TABLE, laid out in two regions the way QEMU 7.2 does (a low region and the rest);
* kick/call/err notifiers are real eventfds;
* the split rings (virtio 2.7) are laid out and driven by this driver, like a guest kernel;
* the handshake follows the order QEMU 7.2 really sends (``GUEST-BOOT.md``);
* a small guest vsock stack (:class:`GuestStream`) speaks the stream protocol with credit, so
  tests can transfer data both ways; :meth:`GuestDriver.send_packet` /
  :attr:`GuestDriver.packets` give raw packet access, and :attr:`GuestDriver.mem` the raw guest
  memory, for hostile-guest tests.

Typical use::

    with VsockDevice(vhost_socket=vpath, uds_path=upath, guest_cid=3) as dev, \\
         serving(dev), GuestDriver(vpath, guest_cid=3) as guest:
        guest.boot()
        listener = guest.listen(1234)
        ...  # host: connect upath, send b"CONNECT 1234\\n"
        stream = guest.accept(listener, timeout=5)

The driver is single-threaded: call :meth:`GuestDriver.pump` (or a method that pumps, like
:meth:`GuestDriver.wait_for`) to move packets.
"""

from __future__ import annotations

from vsockrpc.vhost.testing.driver import (
    GuestDriver,
    pump_all,
    serving,
    serving_together,
    wait_all,
)
from vsockrpc.vhost.testing.rings import RxLayout
from vsockrpc.vhost.testing.stack import GuestListener, GuestStream, Packet

__all__ = [
    "GuestDriver",
    "GuestListener",
    "GuestStream",
    "Packet",
    "RxLayout",
    "pump_all",
    "serving",
    "serving_together",
    "wait_all",
]
