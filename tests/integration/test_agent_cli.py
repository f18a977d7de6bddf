"""The agent CLI (`vsockrpc exec|shell|cp|info|shutdown`) run as a subprocess against an agent."""

from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.agent_harness import AgentUnderTest, running_agent
from vsockrpc.services.agent import PowerAction

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def agent() -> Iterator[AgentUnderTest]:
    with running_agent() as a:
        yield a


def vsockrpc(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "vsockrpc.cli.main", *args],
        input=stdin,
        capture_output=True,
        timeout=45,
        check=False,
    )


def test_exec_streams_forwards_stdin_and_propagates_status(agent: AgentUnderTest) -> None:
    done = vsockrpc(
        "exec", agent.address, "--", "sh", "-c", "cat; echo oops >&2; exit 42", stdin=b"piped\n"
    )
    assert done.returncode == 42
    assert done.stdout == b"piped\n"
    assert done.stderr == b"oops\n"


def test_exec_signal_status_and_errors(agent: AgentUnderTest) -> None:
    assert vsockrpc("exec", "-n", agent.address, "--", "sh", "-c", "kill -9 $$").returncode == 137
    missing = vsockrpc("exec", agent.address, "--", "/no/such/thing")
    assert missing.returncode == 1
    assert b"NOT_FOUND" in missing.stderr and len(missing.stderr.splitlines()) <= 2
    usage = vsockrpc("exec", "nonsense:addr", "--", "true")
    assert usage.returncode == 2
    misplaced = vsockrpc("exec", agent.address, "-n", "--", "true")
    assert misplaced.returncode == 1 and b"options go before ADDRESS" in misplaced.stderr


def test_exec_env_cwd(agent: AgentUnderTest) -> None:
    done = vsockrpc(
        "exec", "-e", "X=1", "--cwd", "/tmp", agent.address, "--", "sh", "-c", "echo $X; pwd"
    )
    assert (done.returncode, done.stdout) == (0, b"1\n/tmp\n")


def test_cp_files_and_directories_both_ways(agent: AgentUnderTest, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.bin").write_bytes(os.urandom(100_000))
    guest_dir = tmp_path / "guest"
    guest_dir.mkdir()
    up = vsockrpc("cp", agent.address, str(src), f"guest:{guest_dir}")
    assert up.returncode == 0, up.stderr
    assert (guest_dir / "src" / "sub" / "b.bin").read_bytes() == (
        src / "sub" / "b.bin"
    ).read_bytes()
    down_dir = tmp_path / "down"
    down_dir.mkdir()
    down = vsockrpc("cp", agent.address, f"guest:{guest_dir / 'src'}", str(down_dir))
    assert down.returncode == 0, down.stderr
    assert (down_dir / "src" / "a.txt").read_text() == "A"
    single = vsockrpc(
        "cp", agent.address, f"guest:{guest_dir / 'src' / 'a.txt'}", str(tmp_path / "one.txt")
    )
    assert single.returncode == 0 and (tmp_path / "one.txt").read_text() == "A"
    both = vsockrpc("cp", agent.address, str(src), str(tmp_path / "x"))
    assert both.returncode == 2 and b"guest:" in both.stderr  # a usage error


def test_info_json_and_shutdown(agent: AgentUnderTest) -> None:
    info = vsockrpc("info", agent.address, "--json", "--sync-time")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["kernel_release"] == os.uname().release and "clock_offset_seconds" in data
    assert len(agent.clock_calls) == 1
    assert vsockrpc("info", agent.address).returncode == 0
    down = vsockrpc("shutdown", agent.address)
    assert down.returncode == 0
    deadline = time.monotonic() + 5
    while not agent.power_calls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.power_calls == [PowerAction.POWEROFF]


def test_shell_on_a_terminal_raw_mode_and_resize(agent: AgentUnderTest) -> None:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vsockrpc.cli.main", "shell", agent.address, "--", "sh"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    output = b""

    def read_until(marker: bytes, timeout: float = 20) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while marker not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    output += os.read(master, 4096)
                except OSError:
                    break
        assert marker in output, output

    try:
        os.write(master, b"stty size; echo mark1\n")
        read_until(b"33 111")
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 44, 122, 0, 0))
        os.kill(proc.pid, 28)  # SIGWINCH: the terminal emulator's job after a resize
        time.sleep(0.5)
        os.write(master, b"stty size; exit 5\n")
        read_until(b"44 122")
        assert proc.wait(timeout=20) == 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_cp_to_a_path_the_agent_may_not_write_blames_the_path_not_the_peer_policy(
    agent: AgentUnderTest, tmp_path: Path
) -> None:
    # Permission denied by the filesystem (sysfs refuses new files, even to root): the peer
    # was admitted, so the VSOCKRPC_AGENT_ALLOWED_CIDS hint would send the user astray.
    source = tmp_path / "f.txt"
    source.write_text("x")
    done = vsockrpc("cp", agent.address, str(source), "guest:/sys/vsockrpc-test-f.txt")
    assert done.returncode == 1
    assert b"PERMISSION_DENIED" in done.stderr
    assert b"ALLOWED_CIDS" not in done.stderr, done.stderr


def test_cp_through_a_missing_directory_and_dotdot_creates_nothing_extra(
    agent: AgentUnderTest, tmp_path: Path
) -> None:
    source = tmp_path / "f.txt"
    source.write_text("content")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "g.txt").write_text("g")
    guest_dir = tmp_path / "guest"
    guest_dir.mkdir()
    done = vsockrpc("cp", agent.address, str(source), f"guest:{guest_dir}/a/../b")
    assert done.returncode == 0, done.stderr
    assert (guest_dir / "b").read_text() == "content"
    done = vsockrpc("cp", agent.address, str(tree), f"guest:{guest_dir}/c/d/../../t")
    assert done.returncode == 0, done.stderr
    assert (guest_dir / "t" / "sub" / "g.txt").read_text() == "g"
    assert sorted(p.name for p in guest_dir.iterdir()) == ["b", "t"]  # no empty a/, c/, c/d/


def test_exec_of_an_empty_program_name_is_a_usage_error(agent: AgentUnderTest) -> None:
    done = vsockrpc("exec", agent.address, "--", "")
    assert done.returncode == 2
    lines = done.stderr.decode().splitlines()
    assert "program name" in lines[-1] and "empty" in lines[-1], lines
    assert "argv is empty" not in done.stderr.decode()


@pytest.mark.parametrize(
    ("flag", "value", "least"),
    [
        ("--wait", "nan", "0 or more"),
        ("--wait", "-1", "0 or more"),
        ("--timeout", "0", "more than 0"),
    ],
)
def test_bad_seconds_are_usage_errors_that_name_the_flag(
    agent: AgentUnderTest, flag: str, value: str, least: str
) -> None:
    done = vsockrpc("exec", flag, value, agent.address, "--", "true")
    assert done.returncode == 2
    line = f"argument {flag}: {value!r} is not a number of seconds ({least})"
    assert done.stderr.decode().splitlines()[-1].endswith(line), done.stderr
    assert agent.table.list() == []  # nothing was started


def test_exec_timeout_says_it_timed_out(agent: AgentUnderTest) -> None:
    started = time.monotonic()
    done = vsockrpc("exec", "--timeout", "0.5", agent.address, "--", "sleep", "30")
    assert time.monotonic() - started < 20
    assert done.returncode == 137
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and "timed out" in lines[0] and "'sleep'" in lines[0], lines
