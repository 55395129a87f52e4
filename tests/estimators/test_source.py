"""SourceAttributor and InfluenceAttributor as estimators: parameters, state and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sourcekit
from sourcekit import Examples, InfluenceAttributor, OptimizerSpec, SourceAttributor, TrainingStage
from sourcekit.base import state_cache_info
from sourcekit.curvature import Carried, EigenbasisCurvature, Residual
from sourcekit.exceptions import (
    NonFiniteError,
    TrajectoryError,
    UnsupportedLayersWarning,
    UnsupportedModuleError,
)

from .. import _cases

CPU = {"device": "cpu"}


def make_layernorm_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))


@pytest.fixture(scope="module")
def run():
    return _cases.trajectory("mlp_momentum")


@pytest.mark.parametrize("cls", [SourceAttributor, InfluenceAttributor])
def test_damping_is_read_at_transform_without_refitting(run, cls):
    queries = _cases.queries("mlp_momentum")
    attributor = cls(damping=1e-3, **CPU).fit(run)
    misses = state_cache_info()["misses"]
    changed = attributor.set_params(damping=0.1).transform(queries)
    assert state_cache_info()["misses"] == misses  # nothing was recomputed
    fresh = cls(damping=0.1, **CPU).fit(run).transform(queries)
    np.testing.assert_array_equal(changed, fresh)
    assert not np.allclose(changed, cls(damping=1e-3, **CPU).fit(run).transform(queries))


def test_the_expensive_state_is_computed_once_per_setting(run):
    SourceAttributor(damping=1e-3, **CPU).fit(run)
    SourceAttributor(damping=0.5, **CPU).fit(run)  # damping does not shape the state
    assert state_cache_info()["misses"] == 1
    SourceAttributor(damping=1e-3, n_segments=2, **CPU).fit(run)
    assert state_cache_info()["misses"] == 2


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (
            {"damping": -1.0},
            r"'damping' parameter of SourceAttributor must be a float in \[0, inf\) or one of 'auto'; "
            r"got -1.0",
        ),
        ({"n_segments": 0}, r"'n_segments' parameter .* must be None or an int in \[1, inf\)"),
        ({"curvature": "full"}, r"'curvature' .* one of 'ekfac', 'kfac'"),
        ({"matrix_function": "taylor"}, r"'matrix_function' .* one of 'exp', 'discrete'"),
        ({"fisher": "sampled"}, r"'fisher' .* one of 'true', 'empirical', 'expected'"),
        ({"modules": "0"}, r"'modules' .* None or a list of module names"),
    ],
)
def test_bad_parameters_name_the_parameter_the_value_and_what_is_allowed(run, params, match):
    with pytest.raises(ValueError, match=match):
        SourceAttributor(**params, **CPU).fit(run)


def test_negative_damping_is_refused_by_influence_too(run):
    with pytest.raises(ValueError, match=r"'damping' parameter of InfluenceAttributor"):
        InfluenceAttributor(damping=-0.1, **CPU).fit(run)


def test_more_segments_than_checkpoints_is_a_clear_error(run):
    with pytest.raises(
        ValueError,
        match=r"n_segments' parameter is 4, but the trajectory has only 3 attribution checkpoints",
    ):
        SourceAttributor(n_segments=4, **CPU).fit(run)


def test_fewer_segments_than_stages_is_a_clear_error():
    two_stage = _cases.trajectory("mlp_two_stage")
    with pytest.raises(ValueError, match=r"has 2 stages .* Use n_segments >= 2"):
        SourceAttributor(n_segments=1, **CPU).fit(two_stage)


def test_explicit_boundaries_define_the_segments(run):
    attributor = SourceAttributor(boundaries=[5], **CPU).fit(run)
    assert [(s.start, s.end, s.checkpoints) for s in attributor.segments_] == [
        (0, 5, (1, 4)),
        (5, 9, (7,)),
    ]
    with pytest.raises(ValueError, match=r"holds no checkpoint"):
        SourceAttributor(boundaries=[2, 3], **CPU).fit(run)


def test_segments_never_cross_stages():
    two_stage = _cases.trajectory("mlp_two_stage")
    segments = SourceAttributor(n_segments=3, **CPU).fit(two_stage).segments_
    stage_ends = {s.end for s in two_stage.stages}
    for segment in segments:
        stage = two_stage.stages[segment.stage]
        assert stage.start <= segment.start < segment.end <= stage.end
    assert {s.end for s in segments} >= stage_ends


def test_momentum_scales_the_learning_rate_sum(run):
    attributor = SourceAttributor(n_segments=3, **CPU).fit(run)
    beta = run.stages[0].optimizer.momentum
    for model in attributor.state_.segments:
        recorded = run.learning_rates[model.segment.start : model.segment.end].sum()
        assert model.lr_sum == pytest.approx(recorded / (1 - beta), rel=1e-12)
        assert model.weight_decay == run.stages[0].optimizer.weight_decay


def test_adam_preconditioner_comes_from_the_recorded_second_moments():
    adam = _cases.trajectory("mlp_adam")
    attributor = SourceAttributor(n_segments=3, **CPU).fit(adam)
    beta2, eps = adam.stages[0].optimizer.betas[1], adam.stages[0].optimizer.eps
    for model in attributor.state_.segments:
        (step,) = model.segment.checkpoints
        state = adam.checkpoint(step).optimizer
        v = state["exp_avg_sq"]["0.weight"].double() / (1 - beta2 ** state["step"])
        expected = 1.0 / (v.sqrt() + eps)
        np.testing.assert_allclose(
            model.preconditioner["0"][:, :-1].numpy(), expected.numpy(), rtol=1e-12
        )


def test_adamw_separates_decoupled_decay():
    adamw = _cases.trajectory("mlp_adamw")
    attributor = SourceAttributor(n_segments=3, **CPU).fit(adamw)
    for model in attributor.state_.segments:
        assert model.weight_decay == 0.0
        assert model.decoupled_decay == adamw.stages[0].optimizer.weight_decay


def test_adam_without_second_moments_in_a_segment_is_a_clear_error():
    adam = _cases.trajectory("mlp_adam")
    # a single checkpoint at the stage's first step carries no second moments of the stage
    early = _cases.rebuild(adam, checkpoint_steps=[0])
    with pytest.raises(
        TrajectoryError, match=r"none of its checkpoints \[0\] holds second moments"
    ):
        SourceAttributor(n_segments=1, **CPU).fit(early)


def test_unsupported_layers_are_named_and_can_be_excluded():
    data = _cases.classification_data(12, 0)
    stage = TrainingStage(OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=4, n_checkpoints=2)
    run = sourcekit.train(make_layernorm_mlp, data, [stage], progress=False)
    # without modules=..., the LayerNorm is left out with one warning that names it
    with pytest.warns(
        UnsupportedLayersWarning, match=r"'1' \(LayerNorm, not a layer type"
    ) as seen:
        default = SourceAttributor(n_segments=2, **CPU).fit(run)
    assert len([w for w in seen if w.category is UnsupportedLayersWarning]) == 1
    assert [b.name for b in default.state_.blocks] == ["0", "3"]
    # naming it is an error
    with pytest.raises(
        UnsupportedModuleError, match=r"'1' \(LayerNorm\) has parameters .* modules=\[\.\.\.\]"
    ):
        SourceAttributor(n_segments=2, modules=["0", "1", "3"], **CPU).fit(run)
    chosen = SourceAttributor(n_segments=2, modules=["0", "3"], **CPU).fit(run)
    scores = chosen.transform(_cases.queries("mlp_sgd"))
    assert scores.shape == (4, 12) and np.isfinite(scores).all()
    np.testing.assert_array_equal(scores, default.transform(_cases.queries("mlp_sgd")))
    with pytest.raises(ValueError, match=r"names \['9'\], which the model does not have"):
        InfluenceAttributor(modules=["9"], **CPU).fit(run)


def test_nan_in_a_checkpoint_raises_non_finite_error(run):
    checkpoints = {s: run.checkpoint(s) for s in run.stored_steps}
    broken = checkpoints[4]
    poisoned = {k: v.clone() for k, v in broken.params.items()}
    poisoned["0.weight"][0, 0] = float("nan")
    checkpoints[4] = type(broken)(4, poisoned, broken.buffers, broken.optimizer)
    bad = _cases.rebuild(run, checkpoints=checkpoints)
    with pytest.raises(NonFiniteError, match=r"checkpoint step 4"):
        SourceAttributor(n_segments=3, **CPU).fit(bad)


def test_queries_of_the_wrong_shape_are_refused(run):
    attributor = SourceAttributor(**CPU).fit(run)
    with pytest.raises(
        ValueError,
        match=r"query inputs have shape \(n, 4\) per example but the training inputs have \(n, 3\)",
    ):
        attributor.transform(Examples(torch.randn(2, 4), torch.tensor([0, 1])))
    with pytest.raises(TypeError, match=r"Queries must be an Examples object; got tuple"):
        attributor.transform((torch.randn(2, 3), torch.tensor([0, 1])))


def test_true_fisher_needs_a_sampler(run):
    def plain_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    custom = _cases.rebuild(run, loss=plain_loss)
    with pytest.raises(
        ValueError, match=r"fisher='true' samples targets .* Use fisher='empirical'"
    ):
        SourceAttributor(**CPU).fit(custom)
    scores = (
        SourceAttributor(fisher="empirical", **CPU)
        .fit(custom)
        .transform(_cases.queries("mlp_momentum"))
    )
    assert np.isfinite(scores).all()


def test_influence_default_damping_is_a_tenth_of_the_mean_eigenvalue(run):
    attributor = InfluenceAttributor(damping=None, **CPU).fit(run)
    means = attributor.state_.curvature.mean_eigenvalues()
    wd = run.stages[-1].optimizer.weight_decay
    assert attributor.damping_ == pytest.approx({k: 0.1 * (v + wd) for k, v in means.items()})
    assert InfluenceAttributor(damping=0.3, **CPU).fit(run).damping_ == 0.3


def test_influence_equals_the_closed_form_for_linear_regression():
    run = _cases.trajectory("linear_gd")
    queries = _cases.queries("linear_gd")
    scores = (
        InfluenceAttributor(damping=0.05, curvature="exact", dtype="float64", **CPU)
        .fit(run)
        .transform(queries)
    )
    final = run.checkpoint(run.n_steps).params
    w = torch.cat([final["weight"].reshape(-1), final["bias"].reshape(-1)]).double()
    x = torch.cat([run.train.inputs, torch.ones(run.n_train, 1)], dim=1).double()
    xq = torch.cat([queries.inputs, torch.ones(len(queries), 1)], dim=1).double()
    grads = (x @ w - run.train.targets[:, 0].double())[:, None] * x  # ∇ ½(θᵀx̃ − y)²
    h = x.T @ x / run.n_train + 0.05 * torch.eye(x.shape[1], dtype=torch.float64)
    expected = -(xq @ torch.linalg.solve(h, grads.T)) / run.n_train
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-10, atol=1e-14)


def test_random_state_fixes_the_sampled_fisher_and_none_draws_afresh(run):
    queries = _cases.queries("mlp_momentum")
    first = SourceAttributor(random_state=3, **CPU).fit(run).transform(queries)
    again = SourceAttributor(random_state=3, **CPU).fit(run).transform(queries)
    np.testing.assert_array_equal(first, again)
    other = SourceAttributor(random_state=4, **CPU).fit(run).transform(queries)
    assert not np.array_equal(first, other)
    fresh = [
        SourceAttributor(random_state=None, **CPU).fit(run).transform(queries) for _ in range(2)
    ]
    assert not np.array_equal(fresh[0], fresh[1])  # no cache hides the second draw


@pytest.mark.parametrize("curvature", ["ekfac", "kfac", "diagonal"])
@pytest.mark.parametrize("case", ["mlp_momentum", "mlp_two_stage"])
def test_the_query_chain_changes_basis_between_segments_without_changing_scores(
    case, curvature, monkeypatch
):
    # Carrying v from one segment's eigenbasis to the previous one's in one rotation,
    # Q'ᵀ Q ṽ Qᵀ Q', is the same linear map as rotating back to parameter coordinates and
    # forward again: in float64 the scores agree to rounding (eps64 times a few rotations
    # of the chain's scale). mlp_two_stage ends in an Adam stage, whose segments carry v
    # in parameter coordinates: there only the SGD segments change basis directly.
    trajectory, queries = _cases.trajectory(case), _cases.queries(case)
    params = {"n_segments": 3, "curvature": curvature, "fisher": "expected", "dtype": "float64"}
    changes: list[str] = []
    change_basis = EigenbasisCurvature.change_basis

    def counted(self, rotated, target):  # type: ignore[no-untyped-def]
        changes.append(self.kind)
        return change_basis(self, rotated, target)

    monkeypatch.setattr(EigenbasisCurvature, "change_basis", counted)
    chained = SourceAttributor(**params, device="cpu").fit(trajectory).transform(queries)
    assert changes  # the chained run did change basis somewhere

    def via_parameters(self, target, dtype=None):  # type: ignore[no-untyped-def]
        return target.rotate(self.in_parameters(), dtype)

    monkeypatch.setattr(Carried, "in_basis", via_parameters)
    changes.clear()
    plain = SourceAttributor(**params, device="cpu").fit(trajectory).transform(queries)
    assert not changes  # back to parameter coordinates between every pair of segments
    scale = np.abs(plain).max()
    np.testing.assert_allclose(chained, plain, rtol=0, atol=1e-12 * scale)


def test_a_curvature_without_an_eigenbasis_takes_part_in_parameter_coordinates():
    # A dense curvature has no eigenbasis independent of the shift: handed vectors written
    # in another curvature's eigenbasis, it brings them to parameter coordinates and
    # returns its results there (equal to apply on the same vectors, up to the rounding of
    # one rotation there and back, ~eps64 √P of the vectors' scale).
    trajectory = _cases.trajectory("mlp_momentum")
    options = {"n_segments": 2, "device": "cpu", "dtype": "float64"}
    exact = SourceAttributor(curvature="exact", **options).fit(trajectory)
    ekfac = SourceAttributor(curvature="ekfac", **options).fit(trajectory)
    dense = exact.state_.segments[0].curvature
    basis = ekfac.state_.segments[0].curvature
    g = torch.Generator().manual_seed(0)
    v = {
        b.name: torch.randn(2, b.d_out, b.d_in, generator=g, dtype=torch.float64)
        for b in basis.blocks
    }
    residual = Residual(0.5)
    (out,) = dense.apply_carried([residual], Carried(basis.rotate(v), basis), 1e-3)
    assert out.basis is None  # parameter coordinates
    want = dense.apply(residual, v, 1e-3)
    for name, w in want.items():
        torch.testing.assert_close(out.values[name], w, rtol=0, atol=1e-13 * float(w.abs().max()))


def test_boundaries_must_increase(run):
    with pytest.raises(
        ValueError,
        match=r"'boundaries' parameter .* strictly increasing list of int steps; got \[5, 2\]",
    ):
        SourceAttributor(boundaries=[5, 2], **CPU).fit(run)


def test_boundaries_and_n_segments_together_are_refused(run):
    with pytest.raises(
        ValueError,
        match=r"both n_segments=5 and boundaries=\[5\]; the boundaries define the segments",
    ):
        SourceAttributor(boundaries=[5], n_segments=5, **CPU).fit(run)
    assert SourceAttributor(**CPU).get_params()["n_segments"] is None  # 3 unless boundaries
    assert len(SourceAttributor(**CPU).fit(run).segments_) == 3


def make_dead_relu_mlp() -> nn.Sequential:
    """An MLP whose hidden units are all inactive: the first layer has no curvature."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    return model


def test_influence_default_damping_is_floored_for_a_layer_without_curvature():
    data = _cases.classification_data(12, seed=0)
    stage = TrainingStage(OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=4)
    run = sourcekit.train(make_dead_relu_mlp, data, [stage], progress=False)
    influence = InfluenceAttributor(**CPU).fit(run)
    means = influence.state_.curvature.mean_eigenvalues()
    assert means["0"] == 0.0 and means["2"] > 0  # dead ReLUs: no curvature in layer 0
    with pytest.warns(UserWarning, match=r"The curvature of layer\(s\) \['0'\] is zero"):
        damping = influence.damping_
    assert damping["0"] == pytest.approx(1e-3 * damping["2"])
    with pytest.warns(UserWarning, match=r"layer\(s\) \['0'\]"):
        scores = influence.transform(_cases.classification_data(4, seed=1))
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("case", ["mlp_momentum", "mlp_adamw"])
def test_auto_damping_is_a_hundredth_of_each_segments_learning_rate_sum(case: str) -> None:
    run, queries = _cases.trajectory(case), _cases.queries(case)
    source = SourceAttributor(n_segments=3, device="cpu", dtype="float64").fit(run)
    assert source.damping == "auto"
    sums = [float(m.learning_rates.sum()) for m in source.state_.segments]
    assert source.damping_ == pytest.approx([0.01 / s for s in sums], rel=1e-12)
    automatic = source.transform(queries)
    # the same scores as those dampings given per segment to the kernel, and a float
    # damping is one value for every segment
    assert source.set_params(damping=0.5).damping_ == [0.5, 0.5, 0.5]
    np.testing.assert_array_equal(source.set_params(damping="auto").transform(queries), automatic)
    assert not np.allclose(source.set_params(damping=0.0).transform(queries), automatic)


def test_auto_damping_of_the_dense_gauss_newton_is_its_mean_eigenvalue_with_the_decay():
    # Linear regression with the squared error: every checkpoint's Gauss-Newton matrix is
    # the mean over examples of [x; 1][x; 1]ᵀ, so the mean eigenvalue of H̄ + λ_c is
    # (mean ‖x‖² + 1) / (d + 1) + λ_c, whatever the parameters (docs/source.md, "Damping").
    data = _cases.regression_data(10, seed=0)
    sgd = OptimizerSpec("sgd", lr=0.1, weight_decay=0.05)
    stage = TrainingStage(sgd, epochs=3, batch_size=5, n_checkpoints=3)
    run = sourcekit.train(
        _cases.make_linear,
        data,
        [stage],
        loss="squared_error",
        measurement="output",
        progress=False,
    )
    source = SourceAttributor(n_segments=3, curvature="exact", device="cpu", dtype="float64")
    source.fit(run)
    x = data.inputs.double()
    mean = (x.pow(2).sum(dim=1).mean() + 1.0) / (x.shape[1] + 1) + 0.05
    floors = [0.01 / m.lr_sum for m in source.state_.segments]
    assert all(float(mean) > floor for floor in floors)  # the mean, not the floor, is taken
    # float32 inputs multiplied in float64: the sums round at eps64 of ‖x‖², far below 1e-12
    assert source.damping_ == pytest.approx([float(mean)] * 3, rel=1e-12)
    # the EK-FAC fit of the same run keeps 0.01/s
    ekfac = SourceAttributor(n_segments=3, device="cpu", dtype="float64").fit(run)
    assert ekfac.damping_ == pytest.approx(floors, rel=1e-12)


def test_auto_damping_of_the_dense_curvature_under_adamw_is_the_mean_of_the_preconditioned():
    # K̄ = p^½ (H̄ + λ_c) p^½ + λ_w: its mean eigenvalue is its trace over P, the mean of
    # p (diag H̄ + λ_c) + λ_w, formed here from the fitted P̄ and H̄'s diagonal.
    run = _cases.trajectory("mlp_adamw")
    source = SourceAttributor(n_segments=3, curvature="exact", device="cpu", dtype="float64")
    source.fit(run)
    expected = []
    for model in source.state_.segments:
        assert model.preconditioner is not None and model.decoupled_decay > 0
        diagonal = model.curvature.diagonal()
        entries = torch.cat(
            [
                (model.preconditioner[name].double() * (h + model.weight_decay)).reshape(-1)
                for name, h in diagonal.items()
            ]
        )
        mean = float(entries.mean()) + model.decoupled_decay
        expected.append(max(mean, 0.01 / model.lr_sum))
    assert source.damping_ == pytest.approx(expected, rel=1e-10)
    # a float applies to every segment, as before
    assert source.set_params(damping=0.25).damping_ == [0.25] * 3
