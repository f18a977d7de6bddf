"""Group membership files (:mod:`vsockrpc.vhost.groups`): modes, the membership lock, and
removing only what is still ours."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vsockrpc.errors import DeviceError
from vsockrpc.vhost.groups import GroupMember, read_member_pid

pytestmark = pytest.mark.timeout(30)


def test_member_files_modes_lock_and_cleanup(tmp_path: Path) -> None:
    groups = str(tmp_path / "deep" / "groups")
    old = os.umask(0)
    try:
        member = GroupMember(groups, "g", 5)
    finally:
        os.umask(old)
    try:
        deep = tmp_path / "deep"
        for d in (deep, deep / "groups", deep / "groups" / "g"):
            assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(member.socket_path).st_mode) == 0o600
        assert read_member_pid(groups, "g", 5) == os.getpid()
        with pytest.raises(DeviceError, match="CID 5 is already a member of group g"):
            GroupMember(groups, "g", 5)
        assert os.path.exists(member.socket_path)  # the loser removed nothing
    finally:
        member.close()
    assert not os.path.exists(member.socket_path) and not os.path.exists(member.pid_path)
    GroupMember(groups, "g", 5).close()  # free again


def test_close_leaves_files_that_are_no_longer_ours(tmp_path: Path) -> None:
    member = GroupMember(str(tmp_path), "g", 5)
    os.unlink(member.pid_path)
    os.unlink(member.socket_path)
    Path(member.pid_path).write_text("1\n")
    Path(member.socket_path).write_text("")
    member.close()
    assert Path(member.pid_path).read_text() == "1\n" and os.path.exists(member.socket_path)
