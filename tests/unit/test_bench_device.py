"""The device-alone CPU bound: what the CPU time of the processes moving the bytes allows."""

from __future__ import annotations

import pytest

from vsockrpc.bench._device_alone import cpu_bound


def test_the_cores_time_is_shared_by_every_process() -> None:
    # 0.5 + 0.5 + 0.25 ms of CPU per MB on 2 cores: 1600 MB/s.
    assert cpu_bound([2000, 2000, 4000], cores=2) == pytest.approx(1600)


def test_no_process_goes_faster_than_one_core() -> None:
    assert cpu_bound([1000, 8000, 8000], cores=8) == pytest.approx(1000)


def test_one_core_runs_them_in_turn() -> None:
    assert cpu_bound([3000, 6000], cores=1) == pytest.approx(2000)
