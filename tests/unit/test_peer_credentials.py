"""Unix peers' uids: conveyed in relay client names (trusted directories only), checked by the
agent's PeerPolicy."""

from __future__ import annotations

import os

from vsockrpc.addresses import UnixAddress, VsockAddress
from vsockrpc.rpc import PeerCredentials, _peers
from vsockrpc.rpc._private import PrivateDir
from vsockrpc.services.agent import PeerPolicy


def test_credentials_names_decode_only_in_trusted_directories() -> None:
    creds = PeerCredentials(uid=65534, gid=65534, pid=4242)
    with PrivateDir() as private:
        name = _peers.client_name(private.path, None, creds)
        assert len(name.encode()) <= 107
        # Untrusted: anyone could have bound that name, so no credentials are believed.
        assert _peers.parse_peer_credentials(f"unix:{name}") is None
        assert _peers.parse_peer(f"unix:{name}") == UnixAddress(name)
        _peers.trust_directory(private.path)
        try:
            assert _peers.parse_peer_credentials(f"unix:{name}") == creds
            assert _peers.parse_peer(f"unix:{name}") == UnixAddress("")
            vsock = _peers.client_name(private.path, VsockAddress(2, 7))
            assert _peers.parse_peer_credentials(f"unix:{vsock}") is None
            assert _peers.parse_peer_credentials(f"unix:{private.path}/c1-unix-x-1-2") is None
        finally:
            _peers.untrust_directory(private.path)
    assert _peers.parse_peer_credentials("vsock:2:1") is None
    assert _peers.parse_peer_credentials("unix:") is None


def test_policy_admits_root_and_its_own_user_by_default() -> None:
    policy = PeerPolicy()
    me = os.geteuid()
    assert policy.admits(UnixAddress(""), uid=0)
    assert policy.admits(UnixAddress(""), uid=me)
    stranger = 54321 if me != 54321 else 54322
    assert not policy.admits(UnixAddress(""), uid=stranger)
    assert policy.admits(UnixAddress(""))  # uid unknown: grpcio's own listener, file mode rules
    assert PeerPolicy(allowed_uids=frozenset({stranger})).admits(UnixAddress(""), uid=stranger)
    assert PeerPolicy(allowed_uids=None).admits(UnixAddress(""), uid=stranger)
    assert not PeerPolicy(allow_unix=False).admits(UnixAddress(""), uid=0)
