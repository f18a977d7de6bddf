"""System service, health/reflection and the peer policy, against a real agent."""

from __future__ import annotations

import logging
import os
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.integration.agent_harness import AgentUnderTest, running_agent
from vsockrpc.addresses import VsockAddress
from vsockrpc.errors import AgentError
from vsockrpc.sdk import Guest
from vsockrpc.services.agent import PeerPolicy, PowerAction

pytestmark = pytest.mark.timeout(60)


def test_ping_and_info(guest: Guest) -> None:
    assert guest.ping(b"\xffpayload") < 5
    info = guest.info()
    assert info.kernel_release == os.uname().release
    assert info.machine == os.uname().machine
    assert info.cpus == os.cpu_count()
    assert 0 < info.memory_available_bytes <= info.memory_total_bytes
    assert info.uptime_seconds > 0
    assert info.agent_pid == os.getpid()
    assert abs(info.time_ns - time.time_ns()) < 5e9
    assert info.agent_version


# The wall clock is not monotonic: a full run saw it step back 0.2 ms between the test's
# reading and the client's, so "set to the host's time" is checked to within 50 ms.
CLOCK_SLACK_NS = 50_000_000


def test_time_sync_sets_the_clock_from_the_host(guest: Guest, agent: AgentUnderTest) -> None:
    before = time.time_ns()
    offset = guest.sync_time()
    after = time.time_ns()
    (set_to,) = agent.clock_calls
    assert before - CLOCK_SLACK_NS <= set_to <= after + CLOCK_SLACK_NS
    assert abs(offset) < 5


def test_refresh_gives_a_clone_its_identity_and_the_host_clock(agent: AgentUnderTest) -> None:
    from vsockrpc.rpc import channel
    from vsockrpc.vm.identity import SEED_BYTES, refresh_identity

    with channel(agent.address) as ch:
        before = time.time_ns()
        offset = refresh_identity(ch, "clone-7")
        after = time.time_ns()
    ((seed, hostname, machine_id),) = agent.identity_calls
    assert (len(seed), hostname) == (SEED_BYTES, "clone-7")
    assert len(machine_id) == 32 and int(machine_id, 16) >= 0
    (set_to,) = agent.clock_calls
    assert before - CLOCK_SLACK_NS <= set_to <= after + CLOCK_SLACK_NS
    assert abs(offset) < 5


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"seed": b"short"}, "seed must be 16 to 4096 bytes"),
        ({"seed": bytes(4097)}, "seed must be 16 to 4096 bytes"),
        ({"hostname": "../etc"}, "bad hostname"),
        ({"hostname": "a" * 64}, "bad hostname"),
        ({"hostname": ""}, "bad hostname"),
        ({"machine_id": "F" * 32}, "machine_id must be 32 lowercase hex digits"),
        ({"time_ns": 0}, "time_ns must be positive"),
    ],
)
def test_refresh_refuses_bad_input_and_changes_nothing(
    agent: AgentUnderTest, change: dict[str, object], complaint: str
) -> None:
    from vsockrpc.agent.v1 import agent_pb2 as pb
    from vsockrpc.agent.v1 import agent_pb2_grpc as pb_grpc
    from vsockrpc.rpc import channel

    fields: dict[str, object] = {
        "seed": bytes(64),
        "hostname": "clone",
        "machine_id": "0" * 32,
        "time_ns": time.time_ns(),
    }
    with channel(agent.address) as ch:
        stub = pb_grpc.SystemStub(ch)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as err:
            stub.Refresh(pb.RefreshRequest(**(fields | change)), timeout=10)  # type: ignore[arg-type]
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert complaint in (err.value.details() or "")
    assert agent.identity_calls == [] and agent.clock_calls == []


def test_an_unknown_power_action_is_refused_and_changes_nothing(agent: AgentUnderTest) -> None:
    from vsockrpc.agent.v1 import agent_pb2 as pb
    from vsockrpc.agent.v1 import agent_pb2_grpc as pb_grpc

    with grpc.insecure_channel(agent.address) as ch:
        stub = pb_grpc.SystemStub(ch)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as err:
            stub.Shutdown(pb.ShutdownRequest(action=7), timeout=10)  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "unknown power action 7"
    time.sleep(0.5)  # the power hook runs 0.2 s after a reply: nothing may come
    assert agent.power_calls == []


def test_shutdown_and_reboot_call_the_power_hook_after_replying(
    guest: Guest, agent: AgentUnderTest
) -> None:
    guest.shutdown()
    deadline = time.monotonic() + 5
    while not agent.power_calls and time.monotonic() < deadline:
        time.sleep(0.02)
    assert agent.power_calls == [PowerAction.POWEROFF]


def test_reboot_action(agent: AgentUnderTest) -> None:
    with Guest(agent.address) as g:
        g.shutdown(reboot=True)
    deadline = time.monotonic() + 5
    while not agent.power_calls and time.monotonic() < deadline:
        time.sleep(0.02)
    assert agent.power_calls == [PowerAction.REBOOT]


def test_health_and_reflection(agent: AgentUnderTest) -> None:
    with grpc.insecure_channel(agent.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "vsockrpc.agent.v1.Exec", "vsockrpc.agent.v1.Files"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
    assert {"vsockrpc.agent.v1.Exec", "vsockrpc.agent.v1.Files", "vsockrpc.agent.v1.System"} <= (
        names
    )


@pytest.mark.parametrize("cid", [1, 3, 5])
def test_peer_outside_allow_list_is_refused_and_logged(
    cid: int, caplog: pytest.LogCaptureFixture
) -> None:
    def pretend(_context: object) -> VsockAddress:
        return VsockAddress(cid, 1234)

    with running_agent(PeerPolicy(), pretend) as agent, Guest(agent.address) as g:
        caplog.set_level(logging.WARNING, logger="vsockrpc.agent.peers")
        for call in (g.ping, g.info, lambda: g.run(["true"]), lambda: g.stat("/")):
            with pytest.raises(AgentError) as err:
                call()
            assert err.value.code == "PERMISSION_DENIED"
            assert err.value.hint and "VSOCKRPC_AGENT_ALLOWED_CIDS" in err.value.hint
        assert agent.table.list() == []  # nothing was started
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert refusals and f"vsock:{cid}:1234" in refusals[0].getMessage()


def test_host_cid_is_admitted() -> None:
    def host(_context: object) -> VsockAddress:
        return VsockAddress(2, 1234)

    with running_agent(PeerPolicy(), host) as agent, Guest(agent.address) as g:
        assert g.run(["true"]).exit_code == 0


def test_unix_peers_can_be_refused() -> None:
    with running_agent(PeerPolicy(allow_unix=False)) as agent, Guest(agent.address) as g:
        with pytest.raises(AgentError) as err:
            g.ping()
        assert err.value.code == "PERMISSION_DENIED"
