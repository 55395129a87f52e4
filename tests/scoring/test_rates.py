"""SOURCE and TracIn when parameters train at their own rates: groups and frozen layers.

The exactness tests follow tests/scoring/test_source.py: full-batch gradient descent with
a checkpoint at every step and one step per segment, where SOURCE's finite-product form
with the Hessian equals exact unrolling up to float64 rounding, here with parameter
groups of their own learning rates and weight decays, and with a layer frozen in the
second stage.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sourcekit import (
    Examples,
    SourceAttributor,
    TracInAttributor,
    TrajectoryRecorder,
    UnrolledAttributor,
)
from sourcekit.trajectory import effective_learning_rates

from .. import _cases

EPS64 = float(np.finfo(np.float64).eps)


def make_mlp64() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _data(n: int = 10, seed: int = 3) -> Examples:
    data = _cases.classification_data(n, seed)
    return Examples(data.inputs.double(), data.targets)


def _full_batch(stages, steps: int = 3):  # type: ignore[no-untyped-def]
    """Full-batch gradient descent of make_mlp64, a checkpoint at every step.

    ``stages`` is a list of functions model -> optimizer, one per stage.
    """
    data = _data()
    torch.manual_seed(0)
    model = make_mlp64()
    recorder = TrajectoryRecorder(
        model, data, architecture=make_mlp64, checkpoint_every=1, measurement="margin"
    )
    everything = np.arange(len(data))
    for make in stages:
        optimizer = make(model)
        with recorder.stage(optimizer):
            for _ in range(steps):
                optimizer.zero_grad()
                F.cross_entropy(model(data.inputs), data.targets).backward()
                optimizer.step()
                recorder.step(everything)
    return recorder.finish()


def _groups(model: nn.Module) -> torch.optim.Optimizer:
    # Faster head without decay; the body with coupled decay on its weight only.
    return torch.optim.SGD(
        [
            {"params": [model[0].weight], "lr": 0.3, "weight_decay": 0.2},
            {"params": [model[0].bias], "lr": 0.3},
            {"params": model[2].parameters(), "lr": 0.6},
        ]
    )


def _head_only(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model[2].parameters(), lr=0.4)


def _all(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.4)


def _exact_source(run, queries):  # type: ignore[no-untyped-def]
    return (
        SourceAttributor(
            n_segments=run.n_steps,
            damping=0.0,
            curvature="hessian",
            matrix_function="discrete",
            dtype="float64",
            device="cpu",
        )
        .fit(run)
        .transform(queries)
    )


@pytest.mark.parametrize(
    "stages",
    [[_groups], [_all, _head_only], [_head_only, _groups]],
    ids=["groups", "frozen body in stage 2", "frozen body then groups"],
)
def test_discrete_source_with_rates_equals_unrolling(stages) -> None:  # type: ignore[no-untyped-def]
    run = _full_batch(stages)
    queries = _data(4, seed=4)
    exact = UnrolledAttributor(device="cpu").fit(run).transform(queries)
    approx = _exact_source(run, queries)
    # As in tests/scoring/test_source.py: T chained products of 31-dimensional matrices
    # with 10-term sums in float64.
    tol = 16 * (31 + 10) * run.n_steps * EPS64 * max(1.0, np.abs(exact).max())
    np.testing.assert_allclose(approx, exact, rtol=0, atol=tol)
    assert np.abs(exact).max() > 1e-3


def test_the_rates_change_the_scores() -> None:
    # The test above can fail: the same run read as one group at the first group's rate
    # and decay (the plain form) is not exact unrolling.
    run = _full_batch([_groups])
    queries = _data(4, seed=4)
    exact = UnrolledAttributor(device="cpu").fit(run).transform(queries)
    plain = _cases.rebuild(
        run, stages=[_one_group(run.stages[0])], learning_rates=run.learning_rates
    )
    wrong = _exact_source(plain, queries)
    assert np.abs(wrong - exact).max() > 1e-3 * np.abs(exact).max()


def _one_group(stage):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    return replace(stage, groups=None, examples=stage.examples.copy())


def test_a_frozen_body_is_left_out_of_the_blocks() -> None:
    run = _full_batch([_head_only])
    assert run.trained_parameters == ("2.weight", "2.bias")
    source = SourceAttributor(n_segments=2, damping=1e-3, device="cpu").fit(run)
    assert [b.name for b in source.state_.blocks] == ["2"]
    tracin = TracInAttributor(device="cpu").fit(run)
    assert [b.name for b in tracin.state_.blocks] == ["2"]


def test_tracin_uses_each_blocks_own_rate() -> None:
    run = _full_batch([_groups])
    queries = _data(4, seed=4)
    tracin = TracInAttributor(device="cpu", dtype="float64").fit(run)
    terms = tracin.checkpoints_
    assert terms[0].block_rates == {"0": 0.3, "2": 0.6}
    # TracIn is linear in the rates: the sum of its scores with the head's rate alone and
    # with the body's rate alone.
    scores = tracin.transform(queries)
    blocks = tracin.state_.blocks
    parts = []
    for keep in ("0", "2"):
        only = TracInAttributor(device="cpu", dtype="float64", modules=[keep]).fit(run)
        parts.append(only.transform(queries))
    np.testing.assert_allclose(scores, parts[0] + parts[1], rtol=1e-10, atol=1e-14)
    assert {b.name for b in blocks} == {"0", "2"}


def test_clipping_enters_the_effective_step() -> None:
    data = _data()
    torch.manual_seed(0)
    model = make_mlp64()
    recorder = TrajectoryRecorder(model, data, architecture=make_mlp64, checkpoint_every=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.4)
    everything = np.arange(len(data))
    with recorder.stage(optimizer):
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(data.inputs), data.targets).backward()
            recorder.clip_grad_norm_(0.05)
            optimizer.step()
            recorder.step(everything)
    run = recorder.finish()
    coefficient = run.clipping.coefficient
    assert np.all(coefficient < 1)
    rates = effective_learning_rates(run, 0, 3)["0.weight"]
    np.testing.assert_allclose(rates, 0.4 * coefficient)
    tracin = TracInAttributor(device="cpu").fit(run)
    np.testing.assert_allclose([t.learning_rate for t in tracin.checkpoints_], 0.4 * coefficient)
    source = SourceAttributor(n_segments=3, device="cpu").fit(run)
    np.testing.assert_allclose(
        [m.learning_rates[0] for m in source.state_.segments], 0.4 * coefficient
    )


@pytest.mark.parametrize("name", ["mlp_momentum", "mlp_adam", "mlp_adamw"])
@pytest.mark.parametrize("matrix_function", ["exp", "discrete"])
@pytest.mark.parametrize("curvature", ["ekfac", "diagonal", "exact"])
def test_rates_that_every_parameter_shares_give_the_plain_segment(
    name: str, matrix_function: str, curvature: str
) -> None:
    # The per-parameter path (Curvature.apply_rates, and Adam's diagonal decay and
    # inverse with each entry's own sums and decays) with one sequence and one decay for
    # every block is the plain path of METHOD.md: the same functions, the decays added to
    # σ in another order (a few roundoffs of the results' scale).
    from dataclasses import replace

    from sourcekit.curvature import Carried
    from sourcekit.curvature._rates import BlockRates
    from sourcekit.scoring._source import precondition

    source = SourceAttributor(
        n_segments=2, curvature=curvature, device="cpu", dtype="float64"
    ).fit(_cases.trajectory(name))
    g = torch.Generator().manual_seed(0)
    for model in source.state_.segments:
        assert model.rates is None  # one group: the plain form
        shared = BlockRates(
            [(None, model.learning_rates)], model.weight_decay, model.decoupled_decay
        )
        with_rates = replace(model, rates={b.name: shared for b in source.state_.blocks})
        v = {
            b.name: torch.randn(3, b.d_out, b.d_in, generator=g, dtype=torch.float64)
            for b in source.state_.blocks
        }
        plain = precondition(model, Carried(v), 1e-3, matrix_function)
        rates = precondition(with_rates, Carried(v), 1e-3, matrix_function)
        for want, got in (
            (plain[0], rates[0]),
            (plain[1].in_parameters(), rates[1].in_parameters()),
        ):
            for block, w in want.items():
                tol = 64 * EPS64 * max(1.0, float(w.abs().max()))
                torch.testing.assert_close(got[block], w, rtol=0, atol=tol)
