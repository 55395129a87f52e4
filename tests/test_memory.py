"""memory_limit="auto": bytes from the memory the device has free, resolved at fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone

import sourcekit
from sourcekit import _memory
from sourcekit._memory import FALLBACK_BYTES, resolve_memory_limit
from tests import _cases

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_bytes_are_taken_as_given():
    assert resolve_memory_limit(12345, CPU) == 12345
    assert resolve_memory_limit(12345, CUDA) == 12345


def test_auto_takes_a_quarter_of_the_available_host_memory_up_to_one_gib(monkeypatch):
    monkeypatch.setattr(_memory, "_meminfo_available", lambda: 2 * 2**30)
    assert resolve_memory_limit("auto", CPU) == 2**29
    monkeypatch.setattr(_memory, "_meminfo_available", lambda: 64 * 2**30)
    assert resolve_memory_limit("auto", CPU) == 2**30


def test_auto_takes_half_of_the_free_device_memory(monkeypatch):
    def mem_get_info(device):  # free, total
        assert device == CUDA
        return 40 * 2**30, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert resolve_memory_limit("auto", CUDA) == 20 * 2**30


def test_auto_falls_back_to_one_gib_where_free_memory_cannot_be_read(monkeypatch):
    def unreadable(device):
        raise RuntimeError("no CUDA here")

    monkeypatch.setattr(torch.cuda, "mem_get_info", unreadable)
    assert resolve_memory_limit("auto", CUDA) == FALLBACK_BYTES
    assert resolve_memory_limit("auto", torch.device("meta")) == FALLBACK_BYTES


def test_available_host_memory_is_read_on_this_machine():
    free = _memory.available_bytes(CPU)
    assert free is None or free > 0


@pytest.mark.parametrize(
    "attributor",
    [
        sourcekit.SourceAttributor(n_segments=2, device="cpu", progress=False),
        sourcekit.InfluenceAttributor(device="cpu", progress=False),
        sourcekit.TracInAttributor(device="cpu", progress=False),
        sourcekit.TRAKAttributor(device="cpu", progress=False),
        sourcekit.GradientSimilarityAttributor(device="cpu", progress=False),
    ],
    ids=lambda a: type(a).__name__,
)
def test_fit_records_the_bytes_and_scores_do_not_depend_on_them(attributor, monkeypatch):
    monkeypatch.setattr(_memory, "_meminfo_available", lambda: 4 * 2**20)
    trajectory, queries = _cases.trajectory("mlp_sgd"), _cases.queries("mlp_sgd")
    auto = attributor.fit(trajectory)
    assert attributor.memory_limit == "auto"
    assert auto.memory_limit_ == 2**20
    scores = auto.transform(queries)
    explicit = clone(attributor).set_params(memory_limit=2**30).fit(trajectory)
    assert explicit.memory_limit_ == 2**30
    # The budget changes which factors are kept and how queries are blocked, so only the
    # order of float32 sums: agreement to a few float32 roundings of the largest score.
    other = explicit.transform(queries)
    assert np.abs(scores - other).max() <= 1e-5 * np.abs(other).max()


def test_an_invalid_memory_limit_names_the_choices():
    trajectory = _cases.trajectory("mlp_sgd")
    with pytest.raises(ValueError, match=r"'memory_limit'.*\[1, inf\).*'auto'"):
        sourcekit.SourceAttributor(memory_limit="lots").fit(trajectory)
