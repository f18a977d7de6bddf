"""One virtio-vsock stream connection between a guest socket and a host Unix socket (a host
client, or the device of a sibling guest; see :mod:`~vsockrpc.vhost.sibling`): its state
machine and credit accounting (virtio spec 1.2, 5.10.6.3 "Buffer Space Management").

Credit, both ways, all counters mod 2**32 (5.10.6.3):

* guest → host: we advertise ``buf_alloc`` and ``fwd_cnt`` (bytes we have written to the host
  socket). The guest may have at most ``buf_alloc - (rx_cnt - fwd_cnt)`` bytes in flight to us;
  what the host socket does not take at once waits in ``pending_out`` (so ``pending_out`` never
  exceeds ``buf_alloc``: a slow host reader stalls the guest, memory does not grow). A guest that
  overruns is reset.
* host → guest: the guest advertises ``peer_buf_alloc``/``peer_fwd_cnt`` in every packet; we may
  send ``peer_free = peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` more payload bytes.

The state machine follows Firecracker's ``csm/connection.rs`` in spirit (local-init → established
→ closing), written for this device.
"""

from __future__ import annotations

import contextlib
import enum
import socket
from collections import deque

from vsockrpc.vhost.link import Stream
from vsockrpc.vhost.packet import HOST_CID

__all__ = ["ConnState", "Connection"]

U32 = 0xFFFFFFFF


class ConnState(enum.Enum):
    LOCAL_INIT = "local-init"  # host client asked CONNECT; REQUEST sent, awaiting RESPONSE
    REMOTE_INIT = "remote-init"  # guest asked for a sibling; awaiting the other device's OK
    ESTABLISHED = "established"
    CLOSING = "closing"  # guest sent SHUTDOWN RCV|SEND: flushing pending_out, then RST
    CLOSED = "closed"


class Connection:
    """State of one stream. Owned by the muxer's loop; not thread-safe."""

    __slots__ = (
        "buf_alloc",
        "credit_requested",
        "credit_stall",
        "ctl",
        "deadline",
        "fd",
        "fwd_cnt",
        "host_eof",
        "host_hup",
        "host_readable",
        "key",
        "last_fwd_cnt_sent",
        "lifeline",
        "local_cid",
        "local_port",
        "out_pending_at",
        "out_watched",
        "peer_buf_alloc",
        "peer_fwd_cnt",
        "peer_port",
        "peer_shut_rcv",
        "peer_shut_send",
        "pending_bytes",
        "pending_out",
        "read_short",
        "rx_cnt",
        "sock",
        "state",
        "tx_cnt",
        "write_shut",
    )

    def __init__(
        self,
        sock: Stream,
        local_port: int,
        peer_port: int,
        state: ConnState,
        buf_alloc: int,
        *,
        local_cid: int = HOST_CID,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        # The device side's address as the guest sees it: CID 2 for host connections, the
        # sibling's CID for a connection to another guest of a shared group (src_cid of
        # every packet we write for this connection).
        self.local_cid = local_cid
        self.local_port = local_port  # device-side port
        self.peer_port = peer_port  # guest-side port
        self.key = (local_cid, local_port, peer_port)
        self.state = state
        # guest → host accounting (ours)
        self.buf_alloc = buf_alloc
        self.rx_cnt = 0  # payload bytes received from the guest
        self.fwd_cnt = 0  # ... of which written to the host socket
        self.last_fwd_cnt_sent = 0  # the fwd_cnt the guest last heard from us
        self.pending_out: deque[bytes] = deque()  # received but not yet written to the host
        self.pending_bytes = 0
        # host → guest accounting (the guest's)
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0  # payload bytes sent to the guest
        self.credit_requested = False
        self.credit_stall: float | None = None  # when to send CREDIT_REQUEST if still stalled
        # half-close
        self.peer_shut_rcv = False  # guest will not receive more: stop reading the host socket
        self.peer_shut_send = False  # guest will not send more: shut the host socket's write side
        self.host_eof = False  # host socket reached EOF: we sent SHUTDOWN SEND
        self.write_shut = False  # host socket's write side shut down
        self.host_readable = False  # epoll said readable and we have not drained it since
        self.host_hup = False  # epoll saw HUP/RDHUP: an EOF is queued behind any data
        self.out_watched = False  # the socket is registered for EPOLLOUT (table._sync_out)
        self.out_pending_at = 0.0  # when output last waited in pending_out (monotonic)
        # The last read from the host socket did not fill one rx buffer (a request/response
        # stream): read into one buffer, not a batch that mostly goes back unused.
        self.read_short = False
        self.ctl: list[tuple[int, int]] = []  # control packets (op, flags) waiting for rx buffers
        self.deadline: float | None = None  # LOCAL_INIT / CLOSING timeout (monotonic)
        # A host client that passed its stream (hybrid.py, "Passed streams"): its own
        # connection, answered there and held until the stream ends; its closing ends it.
        self.lifeline: socket.socket | None = None

    # ----------------------------------------------------------- credit
    def peer_free(self) -> int:
        """Bytes we may still send to the guest (5.10.6.3)."""
        return self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32)

    def update_peer_credit(self, buf_alloc: int, fwd_cnt: int) -> None:
        self.peer_buf_alloc = buf_alloc
        self.peer_fwd_cnt = fwd_cnt

    def in_flight(self) -> int:
        """Guest bytes we hold (received, not yet forwarded)."""
        return (self.rx_cnt - self.fwd_cnt) & U32

    def credit_window(self) -> int:
        """The bytes the guest keeps in flight to us at most: our ``buf_alloc``, capped by its own.

        Linux's sender limits itself to ``min(peer_buf_alloc, buf_alloc)``, its own buffer size
        included (``virtio_transport_tx_buf_size`` in net/vmw_vsock/virtio_transport_common.c,
        in Debian's 6.12 kernels), so a guest socket with a smaller buffer than ours stops
        sending before our own ``buf_alloc`` is used up."""
        return min(self.buf_alloc, self.peer_buf_alloc)

    def credit_update_due(self) -> bool:
        """The guest's view of our free space is stale by half its :meth:`credit_window`.

        Linux never sends CREDIT_REQUEST (5.10.6.3 lets it wait for an update), so an update
        that is due only after more bytes than the guest will send never comes: with half of
        our own ``buf_alloc`` here, a guest whose socket buffer was smaller stopped for good."""
        stale = (self.fwd_cnt - self.last_fwd_cnt_sent) & U32
        return stale >= max(1, self.credit_window() // 2)

    def wants_host_read(self) -> bool:
        return (
            self.state is ConnState.ESTABLISHED
            and self.host_readable
            and not self.host_eof
            and not self.peer_shut_rcv
        )

    def add_ctl(self, op: int, flags: int = 0) -> None:
        entry = (op, flags)
        if entry not in self.ctl:  # coalesce: a spamming guest cannot grow this list
            self.ctl.append(entry)

    def close_socket(self) -> None:
        self.state = ConnState.CLOSED
        self.pending_out.clear()
        self.pending_bytes = 0
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.lifeline is not None:
            self.lifeline.close()
            self.lifeline = None
