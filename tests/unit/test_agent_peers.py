"""PeerPolicy admission rules and configuration from the environment."""

from __future__ import annotations

import pytest

from vsockrpc.addresses import TcpAddress, UnixAddress, VsockAddress
from vsockrpc.errors import AddressError
from vsockrpc.services.agent import PeerPolicy


def test_default_admits_only_the_host_cid_and_unix_peers() -> None:
    policy = PeerPolicy()
    assert policy.admits(VsockAddress(2, 1))
    assert not policy.admits(VsockAddress(1, 1))
    assert not policy.admits(VsockAddress(3, 1))
    assert policy.admits(UnixAddress(""))
    assert not policy.admits(TcpAddress("127.0.0.1", 5))
    assert not policy.admits(None)


def test_from_env() -> None:
    assert PeerPolicy.from_env({}, "").allowed_cids == frozenset({2})
    assert PeerPolicy.from_env({}, "quiet vsockrpc.allowed_cids=2,1").allowed_cids == {1, 2}
    env = {"VSOCKRPC_AGENT_ALLOWED_CIDS": "3"}
    assert PeerPolicy.from_env(env, "vsockrpc.allowed_cids=1").allowed_cids == {3}
    assert PeerPolicy.from_env({"VSOCKRPC_AGENT_ALLOWED_CIDS": "2, 7"}).allowed_cids == {2, 7}
    anyone = PeerPolicy.from_env({"VSOCKRPC_AGENT_ALLOWED_CIDS": "any"})
    assert anyone.admits(VsockAddress(123, 1))
    with pytest.raises(AddressError, match="VSOCKRPC_AGENT_ALLOWED_CIDS"):
        PeerPolicy.from_env({"VSOCKRPC_AGENT_ALLOWED_CIDS": "host"})


def test_tcp_only_when_asked() -> None:
    assert PeerPolicy(allow_tcp=True).admits(TcpAddress("127.0.0.1", 5))
