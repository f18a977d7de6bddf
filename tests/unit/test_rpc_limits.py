"""The server-side relay's admission rules (rpc._limits.Gate), as bookkeeping without sockets."""

from __future__ import annotations

import pytest

from vsockrpc.rpc import ConnectionLimits
from vsockrpc.rpc._limits import Gate

HOST = ("cid", 2)
OTHER_VM = ("cid", 5)
THIRD_VM = ("cid", 6)


def limits(**kwargs: object) -> ConnectionLimits:
    base: dict[str, object] = {
        "max_connections": 10,
        "max_per_peer": 3,
        "idle_timeout": 5.0,
        "reserve": 2,
        "reserved_peers": frozenset({HOST}),
    }
    base.update(kwargs)
    return ConnectionLimits(**base)  # type: ignore[arg-type]


def test_a_peer_at_its_cap_loses_its_oldest_silent_connection() -> None:
    gate = Gate(limits())
    for n in range(3):
        assert gate.admit(f"vm5-{n}", OTHER_VM, now=n) == (True, [])
    assert gate.admit("vm5-3", OTHER_VM, now=3) == (True, ["vm5-0"])
    assert gate.total == 3 and gate.waiting == 3


def test_a_peer_whose_connections_all_talk_is_refused_past_its_cap() -> None:
    gate = Gate(limits())
    for n in range(3):
        gate.admit(n, OTHER_VM, now=0)
        gate.activate(n)
    assert gate.admit("new", OTHER_VM, now=1) == (False, [])
    assert gate.total == 3
    gate.release(OTHER_VM)  # one of them ended
    assert gate.admit("new", OTHER_VM, now=2) == (True, [])


def test_reserved_peers_skip_the_per_peer_cap_and_get_the_reserve() -> None:
    gate = Gate(limits())
    for n in range(10):
        assert gate.admit(f"host-{n}", HOST, now=0) == (True, [])
        gate.activate(f"host-{n}")
    assert gate.admit("vm", OTHER_VM, now=1) == (False, [])  # full for everyone else
    assert gate.admit("host-10", HOST, now=1) == (True, [])  # the reserve
    gate.activate("host-10")
    assert gate.admit("host-11", HOST, now=1) == (True, [])
    gate.activate("host-11")
    assert gate.admit("host-12", HOST, now=1) == (False, [])  # reserve used up, all active


def test_at_the_global_cap_the_oldest_silent_connection_of_others_goes_first() -> None:
    gate = Gate(limits(max_per_peer=10))
    gate.admit("host-silent", HOST, now=0)
    for n in range(9):
        gate.admit(f"vm5-{n}", OTHER_VM, now=1 + n)
    # Full (10). A non-reserved newcomer never evicts the host's waiting connection.
    assert gate.admit("vm6", THIRD_VM, now=20) == (True, ["vm5-0"])
    # The host may evict anyone's, oldest first; here it has the reserve anyway.
    assert gate.admit("host-2", HOST, now=21) == (True, [])
    assert gate.total == 11


def test_silent_connections_expire_after_the_idle_timeout() -> None:
    gate = Gate(limits(idle_timeout=5.0))
    gate.admit("a", OTHER_VM, now=0)
    gate.admit("b", THIRD_VM, now=3)
    gate.admit("c", HOST, now=4)
    gate.activate("c")  # it talked: no deadline any more
    assert gate.next_deadline() == 5.0
    assert gate.expired(now=4.9) == []
    assert gate.expired(now=5.0) == ["a"]
    assert gate.next_deadline() == 8.0
    assert gate.expired(now=100) == ["b"]
    assert gate.next_deadline() is None
    assert gate.total == 1  # "c", until released
    gate.release(HOST)
    assert gate.total == 0


def test_no_idle_timeout_means_no_deadline() -> None:
    gate = Gate(limits(idle_timeout=None))
    gate.admit("a", OTHER_VM, now=0)
    assert gate.next_deadline() is None
    assert gate.expired(now=1e9) == []


def test_eviction_to_free_an_fd_and_dropping_a_closed_one() -> None:
    gate = Gate(limits())
    gate.admit("a", OTHER_VM, now=0)
    gate.admit("b", HOST, now=1)
    assert gate.evict_oldest() == "a"
    gate.drop_waiting("b")
    assert (gate.total, gate.waiting, gate.evict_oldest()) == (0, 0, None)


@pytest.mark.parametrize(
    "bad",
    [{"max_connections": 0}, {"max_per_peer": 0}, {"reserve": -1}, {"idle_timeout": 0}],
)
def test_limits_are_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"connection limits|idle_timeout"):
        limits(**bad)


def test_default_reserve_is_for_the_host_root_and_this_user() -> None:
    import os

    reserved = ConnectionLimits().reserved_peers
    assert {("cid", 2), ("uid", 0), ("uid", os.geteuid())} == reserved
