"""Subnormal numbers are flushed to zero while sourcekit computes, and only then."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch

import sourcekit
from sourcekit._denormals import flushes_denormals, flushing_denormals
from sourcekit.scoring._contraction import gradient_dot
from tests import _cases

TINY32 = torch.finfo(torch.float32).tiny


def _supported() -> bool:
    if flushes_denormals():
        return True
    supported = torch.set_flush_denormal(True)
    torch.set_flush_denormal(False)
    return supported


pytestmark = pytest.mark.skipif(
    not _supported(), reason="this CPU has no flush-to-zero mode (torch.set_flush_denormal)"
)


@pytest.fixture(autouse=True)
def _normal_mode():
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)


def test_the_mode_holds_inside_the_block_and_is_restored_after():
    assert not flushes_denormals()
    with flushing_denormals():
        assert flushes_denormals()
        assert float(torch.tensor(1e-40, dtype=torch.float32) * 1.0) == 0.0
    assert not flushes_denormals()
    assert float(torch.tensor(1e-40, dtype=torch.float32) * 1.0) > 0.0


def test_the_mode_is_restored_on_error():
    with pytest.raises(RuntimeError, match="inside"), flushing_denormals():
        raise RuntimeError("inside")
    assert not flushes_denormals()


def test_a_mode_set_by_the_user_is_left_on():
    torch.set_flush_denormal(True)
    with flushing_denormals():
        assert flushes_denormals()
    assert flushes_denormals()


def test_flushing_zeroes_subnormal_terms_and_moves_a_score_by_at_most_their_bound():
    # A score is a sum of d_out x d_in x T products u s a. Example 0's output gradients
    # are all subnormal, so each of its products is below tiny x max|u| max|a| in
    # magnitude: flushed, its score is exactly 0; unflushed, it is nonzero and within
    # terms x tiny x max|u| max|a|. The other examples' scores are sums of normal
    # numbers, which the mode leaves as they are.
    from sourcekit.gradients._layers import FactoredGradients, LayerBlock

    g = torch.Generator().manual_seed(0)
    n, t, d_out, d_in, q = 6, 5, 4, 3, 2
    a = torch.randn(n, t, d_in, generator=g)
    s = torch.randn(n, t, d_out, generator=g)
    s[0] = 3e-39 * torch.rand(t, d_out, generator=g)
    u = torch.randn(q, d_out, d_in, generator=g)
    block = LayerBlock("fc", "linear", "fc.weight", None, d_out=d_out, d_in=d_in)
    grads = FactoredGradients([block], {"fc": a}, {"fc": s})
    plain = gradient_dot({"fc": u}, grads, torch.float32)
    with flushing_denormals():
        flushed = gradient_dot({"fc": u}, grads, torch.float32)
    bound = d_out * d_in * t * TINY32 * float(u.abs().max() * a.abs().max())
    assert bool((plain[:, 0] != 0).all())
    assert bool((plain[:, 0].abs() <= bound).all())
    assert bool((flushed[:, 0] == 0).all())
    assert torch.equal(flushed[:, 1:], plain[:, 1:])


class _Probe(sourcekit.GradientSimilarityAttributor):
    """Records the mode seen while fitting and scoring."""

    seen: ClassVar[list[bool]] = []

    def _fit_state(self, trajectory):  # type: ignore[no-untyped-def]
        _Probe.seen.append(flushes_denormals())
        return super()._fit_state(trajectory)

    def _scores(self, queries):  # type: ignore[no-untyped-def]
        _Probe.seen.append(flushes_denormals())
        return super()._scores(queries)


def test_attributors_flush_while_they_compute_and_restore_the_mode():
    _Probe.seen = []
    trajectory, queries = _cases.trajectory("mlp_sgd"), _cases.queries("mlp_sgd")
    scores = _Probe(device="cpu").fit(trajectory).transform(queries)
    assert _Probe.seen == [True, True]
    assert not flushes_denormals()
    assert np.isfinite(scores).all()
