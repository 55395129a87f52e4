"""``OptimizerSpec`` and the functional ``optimizer_step`` against ``torch.optim``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sourcekit import OptimizerSpec
from sourcekit.exceptions import TrajectoryError
from sourcekit.trajectory._optimizer import initial_state, optimizer_step


@st.composite
def specs(draw: st.DrawFn) -> OptimizerSpec:
    kind = draw(st.sampled_from(["sgd", "adam", "adamw"]))
    lr = draw(st.floats(1e-3, 0.5))
    weight_decay = draw(st.sampled_from([0.0, 1e-2, 0.3]))
    if kind == "sgd":
        momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
        nesterov = momentum > 0 and draw(st.booleans())
        dampening = 0.0 if nesterov else draw(st.sampled_from([0.0, 0.1]))
        return OptimizerSpec(
            "sgd",
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
        )
    betas = (draw(st.sampled_from([0.0, 0.8, 0.9])), draw(st.sampled_from([0.9, 0.999])))
    eps = draw(st.sampled_from([1e-8, 1e-3]))
    return OptimizerSpec(kind, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


@given(specs())
def test_dict_round_trip(spec: OptimizerSpec) -> None:
    assert OptimizerSpec.from_dict(spec.to_dict()) == spec


@given(specs())
def test_torch_round_trip(spec: OptimizerSpec) -> None:
    optimizer = spec.build(torch.nn.Linear(2, 1).parameters())
    assert OptimizerSpec.from_torch(optimizer) == spec


@given(specs(), st.integers(0, 2**16))
def test_functional_step_matches_torch(spec: OptimizerSpec, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (3, 2), "b": (2,)}
    params = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    torch_params = [torch.nn.Parameter(p.clone()) for p in params.values()]
    optimizer = spec.build(torch_params)
    state = initial_state(spec)
    lrs = [spec.lr, 0.5 * spec.lr, spec.lr]
    for lr in lrs:
        grads = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
        for p, grad in zip(torch_params, grads.values(), strict=True):
            p.grad = grad.clone()
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        params, state = optimizer_step(spec, params, grads, state, lr)
    for p, mine in zip(torch_params, params.values(), strict=True):
        # Both are float64 evaluations of the same update in a different operation order:
        # a few roundings of relative size 2.2e-16 per step, over 3 steps.
        np.testing.assert_allclose(mine.numpy(), p.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_functional_step_does_not_modify_its_inputs() -> None:
    spec = OptimizerSpec("adamw", lr=0.1, weight_decay=0.1)
    params = {"w": torch.ones(2)}
    grads = {"w": torch.full((2,), 0.5)}
    state = initial_state(spec)
    new, new_state = optimizer_step(spec, params, grads, state, 0.1)
    assert torch.equal(params["w"], torch.ones(2)) and torch.equal(
        grads["w"], torch.full((2,), 0.5)
    )
    assert state == {"step": 0, "buffers": {}}
    assert new_state["step"] == 1 and not torch.equal(new["w"], params["w"])


def test_zero_second_moment_has_a_finite_derivative() -> None:
    # A parameter that never receives a gradient: sqrt(v) at v = 0 has an infinite
    # derivative, which the update must not propagate.
    spec = OptimizerSpec("adam", lr=0.1)
    theta = torch.ones(2, dtype=torch.float64, requires_grad=True)
    grad = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    new, _ = optimizer_step(spec, {"w": theta}, {"w": grad * theta}, initial_state(spec), 0.1)
    (d_theta,) = torch.autograd.grad(new["w"].sum(), theta)
    assert torch.isfinite(d_theta).all()


def test_effective_learning_rate_factor() -> None:
    # Heavy ball with momentum β and dampening d sums (1 − d)/(1 − β) times a constant gradient.
    assert OptimizerSpec("sgd", momentum=0.9).effective_lr_factor == pytest.approx(10.0)
    assert OptimizerSpec("sgd", momentum=0.5, dampening=0.5).effective_lr_factor == 1.0
    assert OptimizerSpec("sgd").effective_lr_factor == 1.0
    assert OptimizerSpec("adam").effective_lr_factor == 1.0
    assert OptimizerSpec("adamw").is_adaptive and not OptimizerSpec("sgd").is_adaptive


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"kind": "rmsprop"},
            r"'kind' parameter of OptimizerSpec must be one of \('sgd', 'adam', 'adamw'\); got 'rmsprop'",
        ),
        ({"lr": 0.0}, r"'lr' parameter of OptimizerSpec must be a float > 0; got 0\.0"),
        (
            {"momentum": 1.0},
            r"'momentum' parameter of OptimizerSpec must be a float in \[0, 1\); got 1\.0",
        ),
        (
            {"weight_decay": -1e-3},
            r"'weight_decay' parameter of OptimizerSpec must be a float >= 0; got -0\.001",
        ),
        (
            {"kind": "adam", "betas": (0.9, 1.0)},
            r"'betas' parameter of OptimizerSpec must be two floats in \[0, 1\); got \(0\.9, 1\.0\)",
        ),
        (
            {"kind": "adam", "eps": -1.0},
            r"'eps' parameter of OptimizerSpec must be a float >= 0; got -1\.0",
        ),
        (
            {"nesterov": True},
            r"OptimizerSpec\(nesterov=True\) needs momentum > 0 and dampening == 0, as in torch\.optim\.SGD; got momentum=0\.0",
        ),
    ],
)
def test_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OptimizerSpec(**kwargs)


def test_adam_with_decoupled_weight_decay_is_adamw() -> None:
    params = torch.nn.Linear(2, 1).parameters()
    optimizer = torch.optim.Adam(params, lr=0.1, weight_decay=0.1, decoupled_weight_decay=True)
    assert OptimizerSpec.from_torch(optimizer).kind == "adamw"


def test_unsupported_optimizer() -> None:
    optimizer = torch.optim.Adagrad(torch.nn.Linear(2, 1).parameters())
    with pytest.raises(
        TrajectoryError,
        match=r"optimizer is a Adagrad; sourcekit records torch\.optim\.SGD, Adam and AdamW",
    ):
        OptimizerSpec.from_torch(optimizer)
