"""Fixtures shared by the integration tests: a real agent on a Unix socket and an SDK client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.agent_harness import AgentUnderTest, running_agent
from vsockrpc.sdk import Guest


@pytest.fixture
def agent() -> Iterator[AgentUnderTest]:
    with running_agent() as a:
        yield a


@pytest.fixture
def guest(agent: AgentUnderTest) -> Iterator[Guest]:
    with Guest(agent.address, wait=10) as g:
        yield g
