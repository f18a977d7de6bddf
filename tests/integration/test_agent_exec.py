"""Exec against a real agent on a Unix socket: streams, exit statuses, PTY, attach, bad input."""

from __future__ import annotations

import array
import errno
import fcntl
import hashlib
import io
import logging
import os
import signal
import stat
import termios
import threading
import time

import grpc
import pytest

from tests.integration.agent_harness import AgentUnderTest, stty_sizes_across_resize
from vsockrpc.agent.v1 import agent_pb2 as pb
from vsockrpc.agent.v1 import agent_pb2_grpc as pb_grpc
from vsockrpc.errors import AgentError, BadInputError
from vsockrpc.sdk import Exited, Guest, Started, Stderr, Stdout

pytestmark = pytest.mark.timeout(60)


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_stdin_both_streams_and_exit_code(guest: Guest) -> None:
    script = "tr a-z A-Z; echo to-stderr >&2; exit 7"
    result = guest.run(["sh", "-c", script], input=b"hello agent\n")
    assert result.exit_code == 7
    assert result.signal is None
    assert result.stdout == b"HELLO AGENT\n"
    assert result.stderr == b"to-stderr\n"


def test_events_stream_before_exit(guest: Guest) -> None:
    """Output arrives while the process is still running (blocked on stdin), not at exit."""
    with guest.exec_stream(["sh", "-c", "echo first; read line; echo got:$line"]) as proc:
        events = iter(proc)
        started = next(events)
        assert isinstance(started, Started) and started.pid > 0
        first = next(events)
        assert first == Stdout(b"first\n")
        proc.send(b"later\n")
        rest = list(events)
    assert Stdout(b"got:later\n") in rest
    assert rest[-1] == Exited(exit_code=0, signal=None)


def test_killed_by_signal_and_signal_delivery(guest: Guest) -> None:
    result = guest.run(["sh", "-c", "kill -TERM $$"])
    assert (result.exit_code, result.signal, result.status) == (None, signal.SIGTERM, 143)
    with guest.exec_stream(["sleep", "60"]) as proc:
        proc.signal(signal.SIGINT)
        tail = list(proc)
    assert tail[-1] == Exited(exit_code=None, signal=signal.SIGINT)


def test_signal_rpc_by_process_id(guest: Guest) -> None:
    with guest.exec_stream(["sleep", "60"]) as proc:
        assert proc.process_id in {p.process_id for p in guest.processes()}
        guest.signal(proc.process_id, signal.SIGKILL)
        assert list(proc)[-1] == Exited(exit_code=None, signal=signal.SIGKILL)
    with pytest.raises(AgentError) as info:
        guest.signal("no-such-process", signal.SIGTERM)
    assert info.value.code == "NOT_FOUND"


@pytest.mark.timeout(30)
def test_a_timeout_months_away_runs_the_command(guest: Guest) -> None:
    # 30 days is past poll(2)'s C int of milliseconds: it used to kill the output pump
    result = guest.run(["sh", "-c", "echo out"], timeout=30 * 86400)
    assert (result.exit_code, result.stdout, result.timed_out) == (0, b"out\n", False)


def test_timeout_kills_the_process_group(guest: Guest) -> None:
    start = time.monotonic()
    result = guest.run(["sh", "-c", "sleep 30 & sleep 30"], timeout=0.5)
    assert result.timed_out
    assert result.signal == signal.SIGKILL
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("attempt", range(5))
def test_nothing_lost_when_process_exits_right_after_writing(guest: Guest, attempt: int) -> None:
    result = guest.run(["sh", "-c", "seq 1 200000; seq 1 1000 >&2; exit 0"])
    expected = "".join(f"{i}\n" for i in range(1, 200001)).encode()
    assert result.stdout == expected
    assert result.stderr == "".join(f"{i}\n" for i in range(1, 1001)).encode()
    assert result.exit_code == 0


@pytest.mark.timeout(120)
def test_huge_output_streams_with_bounded_memory(guest: Guest) -> None:
    """512 MiB through the agent (in this process): RSS grows by far less than the output."""
    total = 512 * 1024 * 1024
    baseline = _rss_bytes()
    peak = baseline
    received = 0
    digest = hashlib.sha256()
    with guest.exec_stream(["head", "-c", str(total), "/dev/zero"]) as proc:
        for event in proc:
            if isinstance(event, Stdout):
                received += len(event.data)
                digest.update(event.data)
                if received % (16 * 1024 * 1024) < len(event.data):
                    peak = max(peak, _rss_bytes())
    assert received == total
    assert digest.digest() == hashlib.sha256(bytes(total)).digest()
    assert proc.exited == Exited(exit_code=0, signal=None)
    assert peak - baseline < 64 * 1024 * 1024, f"RSS grew by {(peak - baseline) >> 20} MiB"


def test_slow_reader_back_pressures_the_process(guest: Guest, agent: AgentUnderTest) -> None:
    """With nobody reading, the writer blocks instead of the agent buffering its output."""
    with guest.exec_stream(["head", "-c", str(200 * 1024 * 1024), "/dev/zero"]) as proc:
        events = iter(proc)
        next(events)  # started
        next(events)  # first chunk
        time.sleep(1.5)  # unthrottled, head would finish 200 MiB well within this
        (summary,) = [p for p in agent.table.list() if p.process_id == proc.process_id]
        assert summary.running
        with open(f"/proc/{proc.pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        assert state == "S"  # sleeping in pipe_write


def test_pty_stty_size_after_resize(guest: Guest) -> None:
    output, proc = stty_sizes_across_resize(guest, (30, 100), (40, 120), settle=0.2, tail="; tty")
    assert b"30 100" in output
    assert b"40 120" in output
    assert b"/dev/pts/" in output
    assert proc.exited == Exited(exit_code=0, signal=None)


def test_pty_has_controlling_terminal_and_sigint(guest: Guest) -> None:
    with guest.exec_stream(["sh", "-c", "echo ready; sleep 20; echo late"], pty=True) as proc:
        events = iter(proc)
        for event in events:
            if isinstance(event, Stdout) and b"ready" in event.data:
                break
        # ^C through the line discipline: SIGINT needs a controlling terminal. Repeated in
        # case the first byte lands while the shell is still between commands.
        stop = threading.Event()

        def interrupt() -> None:
            while not stop.wait(0.0):
                proc.send(b"\x03")
                stop.wait(1.0)

        sender = threading.Thread(target=interrupt, daemon=True)
        sender.start()
        try:
            tail = list(events)
        finally:
            stop.set()
            sender.join()
    assert tail[-1] == Exited(exit_code=None, signal=signal.SIGINT)
    assert not any(isinstance(e, Stdout) and b"late" in e.data for e in tail)


def test_reattach_keep_alive_process(guest: Guest, agent: AgentUnderTest) -> None:
    proc = guest.exec_stream(["sh", "-c", "echo one; read x; echo two:$x"], keep_alive=True)
    events = iter(proc)
    next(events)
    assert next(events) == Stdout(b"one\n")
    proc.close()
    time.sleep(0.3)
    (summary,) = [p for p in guest.processes() if p.process_id == proc.process_id]
    assert summary.running and not summary.attached
    with guest.attach(proc.process_id) as again:
        assert again.started.attached and again.pid == proc.pid
        again.send(b"hi\n")
        rest = list(again)
    assert Stdout(b"two:hi\n") in rest
    assert rest[-1] == Exited(exit_code=0, signal=None)
    assert proc.process_id not in {p.process_id for p in guest.processes()}


def test_stream_end_kills_process_without_keep_alive(guest: Guest) -> None:
    proc = guest.exec_stream(["sleep", "60"])
    pid = proc.pid
    proc.close()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")
    with pytest.raises(AgentError) as info:
        guest.attach(proc.process_id)
    assert info.value.code == "NOT_FOUND"


def test_a_descendant_holding_stdin_unread_does_not_hold_the_agent(
    guest: Guest, agent: AgentUnderTest, tmp_path: os.PathLike[str]
) -> None:
    """A background child keeps the command's stdin pipe open and never reads it; the client
    sends more than the pipe holds, then the command exits. The agent's feeder thread (blocked
    writing that input) and pump thread, and the process's fds, must go once the process is
    finished, not when that child exits."""
    from tests.integration._relay_helpers import count_fds, wait_for

    fds_before = count_fds()
    go = os.path.join(tmp_path, "go")
    script = (
        "exec 3<&0; sleep 60 <&3 >/dev/null 2>&1 & echo $!; "
        f"while [ ! -e {go} ]; do sleep 0.05; done"
    )
    with guest.exec_stream(["sh", "-c", script]) as proc:
        for _ in range(16):
            proc.send(b"x" * 64 * 1024)  # 1 MiB
        managed = agent.table.get(proc.process_id)
        assert managed.popen.stdin is not None
        stdin = managed.popen.stdin.fileno()
        capacity = fcntl.fcntl(stdin, fcntl.F_GETPIPE_SZ)
        unread = array.array("i", [0])

        def pipe_full() -> bool:
            fcntl.ioctl(stdin, termios.FIONREAD, unread)
            return unread[0] >= capacity

        assert wait_for(pipe_full, timeout=20)  # the feeder now waits with input left to write
        open(go, "w").close()  # the command exits
        events = list(proc)
    sleeper = int(b"".join(e.data for e in events if isinstance(e, Stdout)))
    try:
        assert events[-1] == Exited(exit_code=0, signal=None)
        assert os.path.exists(f"/proc/{sleeper}")  # still holding the pipe
        prefix = proc.process_id[:8]
        assert wait_for(
            lambda: (
                not any(
                    t.name in (f"exec-pump-{prefix}", f"exec-feed-{prefix}")
                    for t in threading.enumerate()
                )
            ),
            timeout=10,
        ), [t.name for t in threading.enumerate()]
        assert wait_for(lambda: count_fds() <= fds_before, timeout=10), (count_fds(), fds_before)
        assert proc.process_id not in {p.process_id for p in agent.table.list()}
        assert guest.run(["true"]).exit_code == 0  # the agent still serves
    finally:
        os.kill(sleeper, signal.SIGKILL)


def test_attach_twice_is_refused(guest: Guest) -> None:
    with guest.exec_stream(["sleep", "60"], keep_alive=True) as proc:
        with pytest.raises(AgentError) as info:
            guest.attach(proc.process_id)
        assert info.value.code == "FAILED_PRECONDITION"
        proc.signal(signal.SIGKILL)
        list(proc)


def test_env_cwd_and_non_utf8_bytes(guest: Guest, tmp_path: os.PathLike[str]) -> None:
    odd = b"\xff\xfe-not-utf8"
    result = guest.run(
        [b"sh", b"-c", b'printf "%s|%s|" "$1" "$GREETING"; pwd', b"sh", odd],
        env={"GREETING": "hi"},
        cwd="/tmp",
    )
    assert result.stdout == odd + b"|hi|/tmp\n"
    assert guest.run(["printf", "\\377\\000\\376"]).stdout == b"\xff\x00\xfe"


def _code(guest: Guest, argv: list[str | bytes], **kwargs: object) -> str | None:
    with pytest.raises(AgentError) as info:
        guest.run(argv, **kwargs)  # type: ignore[arg-type]
    return info.value.code


def test_bad_input_gets_clear_statuses_and_agent_keeps_serving(
    guest: Guest, tmp_path: os.PathLike[str]
) -> None:
    plain = os.path.join(tmp_path, "plain.txt")
    with open(plain, "w") as f:
        f.write("not a program\n")
    os.chmod(plain, 0o644)
    script = os.path.join(tmp_path, "script")
    with open(script, "w") as f:
        f.write("#!/nonexistent/interpreter\n")
    os.chmod(script, 0o755)
    assert _code(guest, ["/nonexistent/binary"]) == "NOT_FOUND"
    assert _code(guest, ["no-such-command-xyz"]) == "NOT_FOUND"
    assert _code(guest, [script]) == "NOT_FOUND"  # missing interpreter: ENOENT from execve
    assert _code(guest, ["/tmp"]) == "PERMISSION_DENIED"  # a directory
    if os.geteuid() != 0 or not (os.stat(plain).st_mode & stat.S_IXUSR):
        assert _code(guest, [plain]) == "PERMISSION_DENIED"
    assert _code(guest, ["true"], cwd="/nonexistent-dir") == "NOT_FOUND"
    assert _code(guest, ["true"], cwd=plain) == "INVALID_ARGUMENT"
    assert _code(guest, ["true"], cwd="relative/dir") == "INVALID_ARGUMENT"
    assert _code(guest, ["true", "a" * (200 * 1024)]) == "INVALID_ARGUMENT"  # > MAX_ARG_STRLEN
    assert _code(guest, ["true", b"nul\0byte"]) == "INVALID_ARGUMENT"
    assert _code(guest, []) == "INVALID_ARGUMENT"
    assert _code(guest, ["true"], user="no-such-user-xyz") == "INVALID_ARGUMENT"
    for timeout in (-1.0, float("nan"), float("inf")):  # NaN used to mean "no timeout"
        assert _code(guest, ["true"], timeout=timeout) == "INVALID_ARGUMENT"
    # str.isdigit() digits that are not ASCII: "\uff10" (fullwidth zero) used to run as uid 0
    for user in ("\u00b2", "\uff10", "a\0b", "9" * 30):
        assert _code(guest, ["true"], user=user) == "INVALID_ARGUMENT"
    assert guest.run(["true"]).exit_code == 0
    assert guest.ping() < 5


def test_huge_argv_over_message_limit_is_refused(guest: Guest) -> None:
    assert _code(guest, ["true", "x" * (5 * 1024 * 1024)]) == "RESOURCE_EXHAUSTED"
    assert guest.run(["true"]).exit_code == 0


def test_a_window_past_16_bits_is_invalid_argument(agent: AgentUnderTest) -> None:
    start = pb.ExecStart(argv=[b"true"], pty=True, window=pb.WindowSize(rows=70000, cols=80))
    with grpc.insecure_channel(agent.address) as channel:
        call = pb_grpc.ExecStub(channel).Exec(iter([pb.ExecRequest(start=start)]), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "invalid window size 70000x80"


@pytest.mark.parametrize("entry", [b"=x", b"NOEQUALS", b""])
def test_a_bad_environment_entry_is_invalid_argument(agent: AgentUnderTest, entry: bytes) -> None:
    # (the SDK refuses such names itself: this is what another client meets)
    start = pb.ExecStart(argv=[b"true"], env=[entry])
    with grpc.insecure_channel(agent.address) as channel:
        call = pb_grpc.ExecStub(channel).Exec(iter([pb.ExecRequest(start=start)]), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_first_message_must_start_or_attach(agent: AgentUnderTest) -> None:
    with grpc.insecure_channel(agent.address) as channel:
        stub = pb_grpc.ExecStub(channel)
        call = stub.Exec(iter([pb.ExecRequest(stdin=b"x")]))
        with pytest.raises(grpc.RpcError) as info:
            list(call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_run_as_user(guest: Guest) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    result = guest.run(["id", "-u"], user="nobody")
    assert result.stdout.strip() == b"65534"
    assert guest.run(["sh", "-c", "echo $HOME"], user="nobody").stdout.strip() != b""


def test_stderr_event_type(guest: Guest) -> None:
    with guest.exec_stream(["sh", "-c", "echo e >&2"]) as proc:
        events = list(proc)
    assert Stderr(b"e\n") in events


@pytest.mark.parametrize("attempt", range(3))
def test_signal_right_after_start_reaches_a_pty_process(guest: Guest, attempt: int) -> None:
    with guest.exec_stream(["sleep", "30"], pty=True) as proc:
        proc.signal(signal.SIGTERM)
        assert list(proc)[-1] == Exited(exit_code=None, signal=signal.SIGTERM)


def test_empty_program_name_and_empty_argv_are_told_apart(guest: Guest) -> None:
    with pytest.raises(AgentError) as empty_name:
        guest.run([""])
    assert empty_name.value.code == "INVALID_ARGUMENT"
    assert "program name" in str(empty_name.value) and "argv is empty" not in str(empty_name.value)
    with pytest.raises(AgentError) as empty_argv:
        guest.run([])
    assert empty_argv.value.code == "INVALID_ARGUMENT" and "argv is empty" in str(empty_argv.value)


class _BrokenStdin(io.RawIOBase):
    """Gives one chunk, then fails like a disk error."""

    def __init__(self) -> None:
        self.reads = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        if self.reads > 1:
            raise OSError(errno.EIO, "Input/output error")
        return b"first chunk\n"


def test_failing_stdin_source_ends_the_call_with_one_error_and_no_grpc_traceback(
    guest: Guest, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    with (
        pytest.raises(AgentError) as info,
        guest.exec_stream(["cat"], stdin=_BrokenStdin()) as proc,
    ):
        proc.wait()
    message = str(info.value)
    assert "stdin" in message and "Input/output error" in message and "\n" not in message
    time.sleep(0.2)  # a late log line from grpc's request thread would land here
    assert "Exception iterating requests" not in caplog.text
    assert "Traceback" not in capfd.readouterr().err
    deadline = time.monotonic() + 10
    while guest.processes() and time.monotonic() < deadline:  # the agent killed `cat`
        time.sleep(0.05)
    assert guest.processes() == []


@pytest.mark.timeout(120)
def test_many_running_commands_leave_the_agent_answering(guest: Guest) -> None:
    # Each Exec stream holds a server worker while its process runs: with 16 workers, 16
    # running commands made every other call (Ping too) wait for one of them to end.
    started = time.monotonic()
    procs = [guest.exec_stream(["sleep", "60"]) for _ in range(24)]
    try:
        guest.ping()
        assert guest.run(["echo", "still here"]).stdout == b"still here\n"
        assert time.monotonic() - started < 20  # not after the sleeps end
    finally:
        for proc in procs:
            proc.close()


def test_sdk_argument_mistakes_are_caught_before_sending(guest: Guest) -> None:
    for call, message in (
        (lambda: guest.run("true"), "argv must be a list of arguments"),  # type: ignore[arg-type]
        (lambda: guest.run(["env"], env={"A=B": "c"}), "'A=B' is empty or has '='"),
        (lambda: guest.run(["env"], env={"": "c"}), "'' is empty or has '='"),
        (lambda: guest.signal("some-id", 0), "not a signal number: 0"),
        (lambda: guest.signal("some-id", 65), "not a signal number: 65"),
    ):
        with pytest.raises(BadInputError, match=message):
            call()
    assert guest.run(["true"]).exit_code == 0


def test_a_bad_signal_or_window_on_a_stream_is_refused_at_the_call(guest: Guest) -> None:
    """Stream messages get no answer of their own (the agent could only log a bad one): the
    SDK refuses them when called, and the process and its stream carry on."""
    with guest.exec_stream(["sh", "-c", "read line; echo got:$line"], pty=True) as proc:
        for bad, message in (
            (lambda: proc.signal(0), "not a signal number: 0"),
            (lambda: proc.signal(signal.NSIG), f"not a signal number: {signal.NSIG}"),
            (lambda: proc.signal("TERM"), "not a signal number: 'TERM'"),  # type: ignore[arg-type]
            (lambda: proc.signal(True), "not a signal number: True"),
            (lambda: proc.resize(0, 80), "window size 0x80"),
            (lambda: proc.resize(24, 65536), "window size 24x65536"),
            (lambda: proc.resize(24.5, 80), "window size 24.5x80"),  # type: ignore[arg-type]
        ):
            with pytest.raises(BadInputError, match=message):
                bad()
        proc.resize(30, 100)
        proc.send(b"still-here\n")
        out = b"".join(e.data for e in proc if isinstance(e, Stdout))
    assert b"got:still-here" in out
    assert proc.exited == Exited(exit_code=0, signal=None)
