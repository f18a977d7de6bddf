"""Admission of the connections a server-side relay accepts: caps, idle time and a reserve.

The relay of :func:`vsockrpc.rpc.serve` (vsock, hybrid vsock, and Unix addresses whose peer
credentials are wanted) accepts every connection itself, so it can keep a careless or hostile
client from holding them all (issue: ~150 idle connections used to deny the guest agent to
everyone). A new connection *waits* in the relay's accept loop (one fd, no thread, nothing
dialled) until its first byte arrives; only then is it relayed to grpcio. Under
:class:`ConnectionLimits`:

- a connection that sends nothing for ``idle_timeout`` seconds is closed;
- one peer (a vsock CID, a Unix uid) holds at most ``max_per_peer`` connections: past that its
  oldest waiting connection is closed to make room, or, when none waits, the new one is refused;
- all peers together hold at most ``max_connections``, with the same rule (oldest waiting one
  first). ``reserve`` more slots are kept for ``reserved_peers`` (by default the host, CID 2,
  and, for Unix peers, root and this process's user), which are also exempt from the per-peer
  cap: the host's control calls always get in.

A client that sends its first byte at once (every gRPC client sends the HTTP/2 preface right
after connecting) is never the one evicted by a flood of silent connections.
:class:`Gate` is the bookkeeping (no sockets, no threads), so the rules are tested as logic.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from vsockrpc.rpc._creds import read_peer_credentials
from vsockrpc.vsock_constants import VMADDR_CID_HOST

__all__ = ["ConnectionLimits", "Gate", "PeerKey", "peer_key"]

PeerKey = tuple[str, Hashable]
"""Who a connection counts against: ``("cid", 2)``, ``("uid", 1000)``, ``("host", ip)``."""


def _default_reserved() -> frozenset[PeerKey]:
    return frozenset({("cid", VMADDR_CID_HOST), ("uid", 0), ("uid", os.geteuid())})


@dataclass(frozen=True)
class ConnectionLimits:
    """Limits for one relayed listener (see the module docstring)."""

    max_connections: int = 1024
    max_per_peer: int = 256
    idle_timeout: float | None = 10.0
    reserve: int = 64
    reserved_peers: frozenset[PeerKey] = field(default_factory=_default_reserved)

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_per_peer < 1 or self.reserve < 0:
            raise ValueError(f"connection limits must be positive: {self}")
        if self.idle_timeout is not None and not self.idle_timeout > 0:
            raise ValueError(f"idle_timeout must be a positive number of seconds: {self}")


def peer_key(conn: socket.socket, peer: object) -> PeerKey:
    """The key ``conn`` (as ``accept()`` returned it with ``peer``) counts against."""
    if conn.family == socket.AF_UNIX:
        try:
            creds = read_peer_credentials(conn)
        except OSError:
            creds = None
        return ("uid", creds.uid) if creds is not None else ("unix", None)
    if conn.family == getattr(socket, "AF_VSOCK", None) and isinstance(peer, tuple):
        return ("cid", int(peer[0]))
    if isinstance(peer, tuple) and peer:
        return ("host", peer[0])
    return ("unknown", None)


class Gate:
    """Counts of admitted connections and the queue of waiting ones, under ``limits``.

    Items are opaque (the relay uses its accepted sockets). ``admit`` and the waiting-queue
    methods are called by the accept loop; ``release`` from any thread.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._per_peer: Counter[PeerKey] = Counter()
        self._total = 0
        self._waiting: dict[object, tuple[PeerKey, float]] = {}  # insertion order: oldest first

    @property
    def total(self) -> int:
        with self._lock:
            return self._total

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def admit(self, item: object, key: PeerKey, now: float) -> tuple[bool, list[object]]:
        """Count ``item`` as waiting, if the limits allow it after evicting waiting items.

        Returns (admitted, evicted): the caller closes the evicted items (already uncounted)
        and, when not admitted, ``item`` itself (nothing changed then).
        """
        limits = self.limits
        reserved = key in limits.reserved_peers
        with self._lock:
            victims: list[object] = []
            if not reserved and self._per_peer[key] >= limits.max_per_peer:
                victim = self._oldest_waiting(lambda k: k == key, victims)
                if victim is None:
                    return False, []
                victims.append(victim)
            cap = limits.max_connections + (limits.reserve if reserved else 0)
            if self._total - len(victims) >= cap:
                victim = self._oldest_waiting(
                    lambda k: reserved or k not in limits.reserved_peers, victims
                )
                if victim is None:
                    return False, []
                victims.append(victim)
            for victim in victims:
                victim_key, _ = self._waiting.pop(victim)
                self._release_locked(victim_key)
            self._per_peer[key] += 1
            self._total += 1
            deadline = float("inf") if limits.idle_timeout is None else now + limits.idle_timeout
            self._waiting[item] = (key, deadline)
        return True, victims

    def _oldest_waiting(
        self, eligible: Callable[[PeerKey], bool], taken: list[object]
    ) -> object | None:
        for item, (key, _) in self._waiting.items():
            if eligible(key) and item not in taken:
                return item
        return None

    def evict_oldest(self) -> object | None:
        """Uncount and return the oldest waiting item (to free its fd), None if none waits."""
        with self._lock:
            for item in self._waiting:
                key, _ = self._waiting.pop(item)
                self._release_locked(key)
                return item
            return None

    def activate(self, item: object) -> PeerKey:
        """``item`` sent its first byte: no longer waiting, still counted (until ``release``)."""
        with self._lock:
            key, _ = self._waiting.pop(item)
            return key

    def drop_waiting(self, item: object) -> None:
        """A waiting ``item`` closed (EOF, error): uncount it."""
        with self._lock:
            if item in self._waiting:
                key, _ = self._waiting.pop(item)
                self._release_locked(key)

    def release(self, key: PeerKey) -> None:
        """An active connection of ``key`` ended."""
        with self._lock:
            self._release_locked(key)

    def _release_locked(self, key: PeerKey) -> None:
        self._per_peer[key] -= 1
        if self._per_peer[key] <= 0:
            del self._per_peer[key]
        self._total -= 1

    def expired(self, now: float) -> list[object]:
        """Waiting items past their idle deadline, uncounted; the caller closes them."""
        with self._lock:
            late = [item for item, (_, deadline) in self._waiting.items() if deadline <= now]
            for item in late:
                key, _ = self._waiting.pop(item)
                self._release_locked(key)
            return late

    def next_deadline(self) -> float | None:
        with self._lock:
            for _, deadline in self._waiting.values():  # oldest first: the earliest deadline
                return deadline if deadline != float("inf") else None
            return None

    def waiting_items(self) -> Iterable[object]:
        with self._lock:
            return list(self._waiting)
