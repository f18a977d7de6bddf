"""Group membership files and the sibling handshake line, without a running device."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from vsockrpc.errors import DeviceError
from vsockrpc.vhost.groups import GroupMember, check_group_name, read_member_pid
from vsockrpc.vhost.sibling import RateLimitedLog, parse_handshake


@pytest.mark.parametrize("name", ["g", "lab-1", "A.b_c", "0", "x" * 64])
def test_good_group_names(name: str) -> None:
    assert check_group_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "-x", "a/b", "x" * 65, "é", "a b"])
def test_bad_group_names(name: str) -> None:
    with pytest.raises(ValueError, match="is not a group name"):
        check_group_name(name)


def test_handshake_line_parsing() -> None:
    assert parse_handshake(b"SIBLING g 5 1234 9000\n") == ("g", 5, 1234, 9000)
    for bad in (
        b"SIBLING g 5 1234\n",
        b"SIBLING g 5 1234 9000 1\n",
        b"SIBLING g -5 1234 9000\n",
        b"SIBLING g 5 4294967296 9000\n",
        b"SIBLING g 5 1234 99999999999\n",
        b"sibling g 5 1234 9000\n",
        b"SIBLING  g 5 1234 9000\n",
        b"SIBLING \xff 5 1 2\n",
    ):
        assert parse_handshake(bad) is None, bad


@pytest.mark.parametrize("kind", ["symlink", "file", "lax"])
def test_unusable_group_directories(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "g"
    if kind == "symlink":
        (tmp_path / "real").mkdir(mode=0o700)
        target.symlink_to(tmp_path / "real")
    elif kind == "file":
        target.write_text("")
    else:
        target.mkdir()
        target.chmod(0o777)
    with pytest.raises(DeviceError):
        GroupMember(str(tmp_path), "g", 5)
    assert not (tmp_path / "real" / "5.pid").exists()


def test_pid_file_symlink_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "g").mkdir(mode=0o700)
    (tmp_path / "elsewhere").write_text("42\n")
    (tmp_path / "g" / "5.pid").symlink_to(tmp_path / "elsewhere")
    assert read_member_pid(str(tmp_path), "g", 5) is None
    with pytest.raises(DeviceError):
        GroupMember(str(tmp_path), "g", 5)
    assert (tmp_path / "elsewhere").read_text() == "42\n"


def test_refusal_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    limited = RateLimitedLog(logging.INFO, burst=3, interval=0.05)
    with caplog.at_level(logging.INFO, logger="vsockrpc.vhost.sibling"):
        for i in range(100):
            limited("refused %d", i)
        assert len(caplog.records) == 3
        time.sleep(0.06)
        limited("refused again")
    assert "(97 similar lines suppressed)" in caplog.text
    assert caplog.records[-1].getMessage() == "refused again"
