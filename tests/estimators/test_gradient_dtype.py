"""``gradient_dtype``: per-example gradients from low-precision passes, curvature and scores
in the working precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sourcekit
from sourcekit import (
    GradientSimilarityAttributor,
    InfluenceAttributor,
    SourceAttributor,
    TracInAttributor,
    TRAKAttributor,
)
from sourcekit.gradients._per_example import _forward

from .. import _cases

CPU = {"device": "cpu"}
GRADIENT_ATTRIBUTORS = [
    SourceAttributor,
    InfluenceAttributor,
    TracInAttributor,
    TRAKAttributor,
    GradientSimilarityAttributor,
]

# Agreement threshold with float64 scores. bfloat16 keeps 8 significant bits, a relative
# rounding of 2⁻⁹ ≈ 0.2 % per stored number; through the forward and backward passes of
# a small network (a few rounding steps per layer) a per-example gradient is off by a few
# tenths of a percent, and a score, a sum of such products, by about as much (observed
# on the digits MLP: at most 2 % of the largest score, for SOURCE). If every score carries
# independent noise of standard deviation r times the spread of the scores, their Pearson
# correlation with the exact ones is 1/√(1 + r²); allowing r = 10 %, five times the
# worst error seen, gives 0.995. A real defect (a dropped factor, gradients taken in the
# wrong model) gives correlations far below that.
PEARSON_BF16 = 0.995


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture(scope="module")
def queries(digits_task):
    return digits_task.test[:20]


@pytest.mark.parametrize("cls", [SourceAttributor, InfluenceAttributor])
def test_bfloat16_gradients_agree_with_float64(digits_early, queries, cls):
    exact = cls(dtype="float64", **CPU).fit(digits_early).transform(queries)
    fast = cls(gradient_dtype="bfloat16", **CPU).fit(digits_early).transform(queries)
    assert fast.dtype == np.float32  # scores stay in ``dtype``
    assert _pearson(fast, exact) > PEARSON_BF16


@pytest.mark.parametrize("cls", [TracInAttributor, TRAKAttributor, GradientSimilarityAttributor])
def test_the_other_gradient_attributors_take_it_too(cls):
    trajectory, queries = _cases.trajectory("mlp_momentum"), _cases.queries("mlp_momentum")
    exact = cls(dtype="float64", **CPU).fit(trajectory).transform(queries)
    fast = cls(gradient_dtype="bfloat16", **CPU).fit(trajectory).transform(queries)
    assert _pearson(fast, exact) > PEARSON_BF16


def test_float16_works_on_this_cpu_or_says_what_to_use(digits_early, queries):
    # CPU float16 kernels depend on the torch version: either the scores are as good as
    # bfloat16's (float16 keeps 3 more bits), or the error names the parameter and a fix.
    exact = SourceAttributor(dtype="float64", **CPU).fit(digits_early).transform(queries)
    try:
        half = SourceAttributor(gradient_dtype="float16", **CPU).fit(digits_early)
    except ValueError as err:
        assert "gradient_dtype" in str(err) and "bfloat16" in str(err)
    else:
        assert _pearson(half.transform(queries), exact) > PEARSON_BF16


class _NoHalfKernel(nn.Linear):
    """A layer whose half-precision kernel is missing, as on older CPU builds of torch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return super().forward(x)


def test_a_missing_half_kernel_gives_a_clear_error():
    model = _NoHalfKernel(3, 2).to(torch.float16)
    with pytest.raises(ValueError, match=r"'gradient_dtype' parameter is 'float16'.*'bfloat16'"):
        _forward(model, torch.zeros(1, 3, dtype=torch.float16))
    other = _NoHalfKernel(3, 2)  # in float32 the original error is not rewritten
    with pytest.raises(RuntimeError, match=r"size mismatch|shapes cannot be multiplied"):
        _forward(other, torch.zeros(1, 4))


@pytest.mark.parametrize("cls", GRADIENT_ATTRIBUTORS)
def test_bad_values_are_refused(cls):
    with pytest.raises(
        ValueError, match=r"'gradient_dtype' parameter of \w+ must be None or one of"
    ):
        cls(gradient_dtype="float8", **CPU).fit(_cases.trajectory("mlp_momentum"))


def test_none_is_the_working_precision():
    trajectory, queries = _cases.trajectory("mlp_momentum"), _cases.queries("mlp_momentum")
    default = SourceAttributor(dtype="float64", **CPU).fit(trajectory).transform(queries)
    same = SourceAttributor(dtype="float64", gradient_dtype="float64", **CPU)
    np.testing.assert_array_equal(same.fit(trajectory).transform(queries), default)


def test_the_factor_cache_is_kept_in_the_low_precision(digits_early):
    source = SourceAttributor(gradient_dtype="bfloat16", **CPU).fit(digits_early)
    cached = [b for batches in source.state_.cache.values() for b in batches]
    assert cached and all(
        t.dtype == torch.bfloat16 for b in cached for t in [*b.a.values(), *b.loss.values()]
    )
    # ... while the curvature stays float64
    for model in source.state_.segments:
        for factors in model.curvature.factors.values():
            assert factors.eigenvalues.dtype == torch.float64


def test_the_dense_curvatures_ignore_it():
    # "exact" and "hessian" build their matrices in float64 whatever the passes' precision.
    trajectory, queries = _cases.trajectory("mlp_momentum"), _cases.queries("mlp_momentum")
    exact = SourceAttributor(curvature="exact", dtype="float64", **CPU).fit(trajectory)
    low = SourceAttributor(curvature="exact", dtype="float64", gradient_dtype="bfloat16", **CPU)
    low.fit(trajectory)
    a = exact.state_.segments[0].curvature.matrix
    b = low.state_.segments[0].curvature.matrix
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert _pearson(low.transform(queries), exact.transform(queries)) > PEARSON_BF16


def test_sourcekit_examples_work_in_bfloat16():
    data = sourcekit.Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    trajectory = sourcekit.train(nn.Linear(3, 2), data, [stage], progress=False)
    scores = SourceAttributor(n_segments=2, gradient_dtype="bfloat16", **CPU).fit(trajectory)
    assert np.isfinite(scores.transform(data[:3])).all()
