"""Shared pytest configuration: hypothesis profiles and expensive fixtures.

Hypothesis runs derandomised everywhere (the suite is deterministic): the ``ci``
profile is loaded when the ``CI`` environment variable is set, ``dev`` otherwise.
Select another with ``pytest --hypothesis-profile=NAME``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import sourcekit
from sourcekit.base import clear_state_cache

from . import _cases

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    print_blob=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    derandomize=True,
    deadline=None,
    max_examples=50,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# The test models are tiny: intra-op threads only add synchronisation, and on a busy
# 2-core machine their spinning slows the suite down a hundredfold.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA: skip them without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_state() -> None:
    """Every test starts with an empty attributor cache and the same torch seed."""
    clear_state_cache()
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_task() -> sourcekit.datasets.DigitsTask:
    """The embedded digits task with its default split."""
    return sourcekit.datasets.load_digits_task()


@pytest.fixture(scope="session")
def digits_early(digits_task: sourcekit.datasets.DigitsTask) -> sourcekit.Trajectory:
    """The ``early`` digits recipe (184 steps), recorded once per session: do not modify."""
    return digits_task.record("early", progress=False)


@pytest.fixture(params=_cases.CASE_NAMES)
def case_name(request: pytest.FixtureRequest) -> str:
    """Every tiny case of the registry."""
    return request.param
