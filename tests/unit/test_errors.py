"""The exception tree answers by subsystem and by meaning; the CLI alone maps errors to exits."""

from __future__ import annotations

import copy
import os
import pickle

import pytest

from vsockrpc import errors
from vsockrpc.cli import main as cli_main
from vsockrpc.cli.main import EXIT_FAILURE, EXIT_USAGE, exit_status
from vsockrpc.errors import (
    AddressError,
    AgentError,
    BadInputError,
    BundleError,
    ConnectError,
    DeviceError,
    GuestError,
    ImageError,
    NotReadyError,
    PayloadError,
    PeerError,
    ProtocolError,
    RpcError,
    SpecError,
    TransientError,
    TransportError,
    TransportTimeout,
    VmError,
    VsockRpcError,
)

# (error, retryable, peer_fault, bad_input): every concrete class of the tree, by meaning.
CASES: list[tuple[VsockRpcError, bool, bool, bool]] = [
    (AddressError("vsock:x:1: bad CID"), False, False, True),
    (TransportError("cannot listen on tcp:127.0.0.1:1"), False, False, False),
    (ConnectError("cannot connect to tcp:10.0.0.1:1: No route to host"), False, False, False),
    (NotReadyError("cannot connect: Connection refused"), True, False, False),
    (TransportTimeout("timed out connecting"), True, False, False),
    (DeviceError("--socket-fd 3 is not a socket"), False, False, False),
    (ProtocolError("descriptor chain loops"), False, True, False),
    (PayloadError("no pin for grpcio"), False, False, False),
    (SpecError("vsockrpc.toml:3: memory: not a number"), False, False, True),
    (ImageError("mmdebstrap failed"), False, False, False),
    (VmError("no QEMU system emulator"), False, False, False),
    (GuestError("kernel panic"), False, True, False),
    (BundleError("no grpcio wheel"), False, False, False),
    (AgentError("the exec stream ended without an exit status"), False, False, False),
    (AgentError("exec: UNAVAILABLE: connection refused", code="UNAVAILABLE"), True, False, False),
    (
        AgentError("exec: RESOURCE_EXHAUSTED: 64 running", code="RESOURCE_EXHAUSTED"),
        True,
        False,
        False,
    ),
    (AgentError("get: DATA_LOSS: checksum mismatch", code="DATA_LOSS"), False, True, False),
    (
        AgentError("exec: INVALID_ARGUMENT: argv is empty", code="INVALID_ARGUMENT"),
        False,
        False,
        True,
    ),
    (AgentError("exec: NOT_FOUND: no such file: /x", code="NOT_FOUND"), False, False, False),
    (AgentError("PERMISSION_DENIED: peer 7", code="PERMISSION_DENIED"), False, False, False),
    (RpcError("DEADLINE_EXCEEDED", code="DEADLINE_EXCEEDED"), True, False, False),
    (RpcError("INTERNAL: boom", code="INTERNAL"), False, True, False),
    (RpcError("OUT_OF_RANGE: too big", code="OUT_OF_RANGE"), False, False, True),
    (RpcError("UNIMPLEMENTED", code="UNIMPLEMENTED"), False, False, False),
    (BadInputError("--name must not contain '/'"), False, False, True),
]


@pytest.mark.parametrize(("err", "retryable", "peer_fault", "bad_input"), CASES, ids=repr)
def test_every_error_answers_the_three_questions_by_class_and_property(
    err: VsockRpcError, retryable: bool, peer_fault: bool, bad_input: bool
) -> None:
    assert (err.retryable, err.peer_fault, err.bad_input) == (retryable, peer_fault, bad_input)
    # The properties are the tree: `except` by meaning catches exactly the same errors.
    assert isinstance(err, TransientError) == retryable
    assert isinstance(err, PeerError) == peer_fault
    assert isinstance(err, BadInputError) == bad_input
    assert isinstance(err, VsockRpcError)


def test_except_by_meaning_and_by_subsystem_both_catch() -> None:
    with pytest.raises(TransientError) as by_meaning:
        raise AgentError("exec: UNAVAILABLE: refused", code="UNAVAILABLE", hint="is the VM up?")
    with pytest.raises(AgentError) as by_subsystem:
        raise by_meaning.value
    err = by_subsystem.value
    assert type(err).__name__ == "AgentError"  # tracebacks show the subsystem class
    assert (err.code, err.hint, str(err)) == (
        "UNAVAILABLE",
        "is the VM up?",
        "exec: UNAVAILABLE: refused",
    )
    assert type(AgentError("x", code="ABORTED")) is type(AgentError("y", code="UNAVAILABLE"))
    assert type(AgentError("no code")) is AgentError


def test_meaning_classes_keep_the_builtin_bases() -> None:
    assert issubclass(AddressError, ValueError)
    assert issubclass(TransportTimeout, TimeoutError)
    assert issubclass(NotReadyError, ConnectError) and issubclass(ConnectError, TransportError)
    assert issubclass(ProtocolError, DeviceError) and issubclass(GuestError, VmError)


@pytest.mark.parametrize(
    "err",
    [
        AgentError("x", code="UNAVAILABLE", hint="h"),
        AgentError("plain"),
        RpcError("DATA_LOSS: y", code="DATA_LOSS"),
        RpcError("NOT_FOUND", code="NOT_FOUND"),
    ],
    ids=repr,
)
def test_status_errors_survive_pickle_and_copy(err: RpcError | AgentError) -> None:
    for again in (pickle.loads(pickle.dumps(err)), copy.deepcopy(err)):
        assert type(again) is type(err)
        assert (str(again), again.code, again.hint) == (str(err), err.code, err.hint)


def test_every_public_error_is_in_the_docstring_tree() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        assert name in doc, name


def test_the_core_has_no_exit_codes() -> None:
    for name in errors.__all__:
        assert not hasattr(getattr(errors, name), "exit_code"), name


@pytest.mark.parametrize(
    ("err", "status"),
    [
        (AddressError("bogus:1: unknown address scheme"), EXIT_USAGE),
        (BadInputError("--cpus must be at least 1"), EXIT_USAGE),
        (SpecError("vsockrpc.toml:3: memory: not a number"), EXIT_USAGE),
        (NotReadyError("refused"), EXIT_FAILURE),
        (GuestError("kernel panic"), EXIT_FAILURE),
        (AgentError("no command given"), EXIT_FAILURE),
        (AgentError("exec: NOT_FOUND: /no/such", code="NOT_FOUND"), EXIT_FAILURE),
        # A peer's INVALID_ARGUMENT is a failed call, as docs/foundation.md documents for `add`.
        (RpcError("INVALID_ARGUMENT: 2147483647 + 1", code="INVALID_ARGUMENT"), EXIT_FAILURE),
        (AgentError("INVALID_ARGUMENT: argv is empty", code="INVALID_ARGUMENT"), EXIT_FAILURE),
    ],
    ids=repr,
)
def test_cli_exit_status(err: VsockRpcError, status: int) -> None:
    assert exit_status(err) == status


def test_a_broken_pipe_elsewhere_than_our_output_stays_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # stdout and stderr are fine (pytest's capture files): a BrokenPipeError from a socket is a
    # real failure and keeps its traceback; only a closed output pipe means a quiet 141.
    def broken_socket(_argv: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli_main, "_run", broken_socket)
    with pytest.raises(BrokenPipeError):
        cli_main.main([])


def test_invalid_vm_options_are_usage_errors() -> None:
    from vsockrpc.vm.options import InvalidVmOption

    err = InvalidVmOption("VM name '..' is invalid")
    assert isinstance(err, VmError) and isinstance(err, ValueError) and err.bad_input
    assert exit_status(err) == EXIT_USAGE


def test_a_path_that_is_not_utf8_leaves_the_message_encodable() -> None:
    name = os.fsdecode(b"/tmp/\xff-odd")  # a lone surrogate, as every fsdecode'd path gives
    err = AgentError(f"stat {name}: NOT_FOUND: no such file", code="NOT_FOUND", hint=name)
    assert str(err).encode() == b"stat /tmp/\\udcff-odd: NOT_FOUND: no such file"
    assert err.hint is not None and err.hint.encode() == b"/tmp/\\udcff-odd"
    assert err.code == "NOT_FOUND"
    plain = VmError("vm 'a' is not running")
    assert str(plain) == "vm 'a' is not running"  # what needs no escaping is left as it was
