"""Every attributor gives the same scores on CUDA as on the CPU (``gpu`` tests skip without CUDA).

The attributors are discovered as in ``test_common``; each is fitted twice on the same
tiny case, once with ``device="cpu"`` and once with ``device="cuda"``, in float64.
Everything random (sampled Fisher targets, TRAK's projection) is generated on the CPU
from the seed and moved, so both runs compute the same quantities and differ only by
rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone

from sourcekit import BaseAttributor

from . import _cases
from .test_common import ATTRIBUTORS, CASE, _params

# The tolerance, relative to the largest score. In float64 (eps = 1.1e-16) a reduction
# of at most a few hundred terms (the case has 38 parameters, 12 examples, 9 steps)
# rounds differently on another device by at most ~100 eps of its magnitude. An
# eigendecomposition moves its eigenvectors by eps over the relative gap between
# eigenvalues; the smallest gap of the case's covariances is 2.7e-4 (measured), so by at
# most ~4e3 eps. Damped inverses (influence functions) amplify relative errors by their
# condition number, at most ~50 here (damping 0.1 x the mean eigenvalue). Adding up a
# dozen such steps: 12 x 4e3 x 50 eps ≈ 3e-10. 1e-8 leaves a thirtyfold margin and
# still catches a real discrepancy (a tensor on the wrong device, other random draws),
# which moves scores by O(1) of their scale.
RELATIVE_TOLERANCE = 1e-8


def _on(cls: type[BaseAttributor], device: str) -> BaseAttributor:
    params = _params(cls)
    if "estimator" in params:
        # A meta-estimator (EnsembleAttributor) computes on its estimator's device.
        params["estimator"] = _with_device(params["estimator"], device)
        return cls(**params)
    return _with_device(cls(**params), device)


def _with_device(estimator: BaseAttributor, device: str) -> BaseAttributor:
    names = estimator.get_params(deep=False)
    settings = {"device": device, **({"dtype": "float64"} if "dtype" in names else {})}
    return clone(estimator).set_params(**settings)


@pytest.mark.gpu
@pytest.mark.parametrize("cls", ATTRIBUTORS, ids=lambda c: c.__name__)
def test_cuda_scores_equal_cpu_scores(cls: type[BaseAttributor]) -> None:
    trajectory, queries = _cases.trajectory(CASE), _cases.queries(CASE, 6)
    cpu = _on(cls, "cpu").fit(trajectory).transform(queries)
    cuda = _on(cls, "cuda").fit(trajectory).transform(queries)
    assert cuda.dtype == cpu.dtype == np.float64
    np.testing.assert_allclose(
        cuda, cpu, rtol=0, atol=RELATIVE_TOLERANCE * float(np.abs(cpu).max())
    )


@pytest.mark.gpu
def test_the_fitted_state_lives_on_the_device() -> None:
    from sourcekit import SourceAttributor

    source = SourceAttributor(device="cuda").fit(_cases.trajectory(CASE))
    for model in source.state_.segments:
        for factors in model.curvature.factors.values():
            assert factors.eigenvalues.device.type == "cuda"
            assert factors.eigenvalues.dtype == torch.float64  # eigendecomposed in float64
    for batches in source.state_.cache.values():
        for batch in batches:
            assert all(t.device.type == "cuda" for t in batch.a.values())


@pytest.mark.gpu
def test_bfloat16_gradients_on_cuda_agree_with_cpu_float64() -> None:
    from sourcekit import SourceAttributor

    from .estimators.test_gradient_dtype import PEARSON_BF16

    trajectory, queries = _cases.trajectory(CASE), _cases.queries(CASE, 6)
    exact = SourceAttributor(device="cpu", dtype="float64").fit(trajectory).transform(queries)
    fast = SourceAttributor(device="cuda", gradient_dtype="bfloat16").fit(trajectory)
    pearson = np.corrcoef(fast.transform(queries).ravel(), exact.ravel())[0, 1]
    assert pearson > PEARSON_BF16


@pytest.mark.gpu
@pytest.mark.parametrize("feature", ["dropout", "conv"])
def test_a_loop_recorded_on_cuda_passes_the_self_check_and_replays(feature: str) -> None:
    # The self-check replays the step's gradient with the same kernels on the GPU (TF32
    # convolutions included, whatever cuDNN's setting), and exact unrolling replays the
    # dropout masks from the CUDA generator's recorded states, in float64.
    from torch import nn
    from torch.nn import functional as F

    from sourcekit import Examples, TrajectoryRecorder
    from sourcekit.trajectory._replay import replay

    g = torch.Generator().manual_seed(0)
    if feature == "conv":
        data = Examples(
            torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        )
        make = lambda: nn.Sequential(  # noqa: E731
            nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(256, 3)
        )
    else:
        data = Examples(torch.randn(32, 3, generator=g), torch.randint(0, 3, (32,), generator=g))
        make = _cases.make_dropout_mlp
    torch.manual_seed(0)
    model = make().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    recorder = TrajectoryRecorder(model, data, checkpoint_every=2)
    with recorder.stage(optimizer):
        for start in range(0, 64, 8):
            idx = torch.arange(start, start + 8) % 32
            optimizer.zero_grad()
            batch = data[idx].to("cuda")
            F.cross_entropy(model(batch.inputs), batch.targets).backward()
            optimizer.step()
            recorder.step(idx)
    trajectory = recorder.finish()
    assert trajectory.n_steps == 8  # the self-check passed at every step
    if feature == "conv":
        return  # (a float64 replay differs from TF32 convolutions by TF32's rounding)
    assert trajectory.random_states.device == "cuda"
    replayed, _ = replay(trajectory, device="cuda")
    # float64 replay of T = 8 float32 steps: within 8 T eps32 of the parameters' scale
    # (tests/trajectory/test_replay.py), with the same dropout masks.
    scale = max(1.0, max(float(p.abs().max()) for p in model.parameters()))
    tolerance = 8 * trajectory.n_steps * float(np.finfo(np.float32).eps) * scale
    for name, value in model.named_parameters():
        error = float((replayed[name].detach() - value.detach().double()).abs().max())
        assert error <= tolerance, (name, error, tolerance)


# --- devices this build cannot use -------------------------------------------------------------
@pytest.mark.parametrize("cls", ATTRIBUTORS, ids=lambda c: c.__name__)
def test_a_device_torch_does_not_know_is_refused_at_fit(cls: type[BaseAttributor]) -> None:
    with pytest.raises(ValueError, match=r"'device' parameter must be .*got 'gpu'\. Use device="):
        # (exact unrolling replays in transform; the others resolve the device in fit)
        _on(cls, "gpu").fit(_cases.trajectory(CASE)).transform(_cases.queries(CASE, 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_cuda_on_a_build_without_it_is_a_clear_error(device: object) -> None:
    from sourcekit._device import resolve_device

    with pytest.raises(
        ValueError,
        match=r"'device' parameter must be a device that this torch build can use; got 'cuda.*"
        r"sees no CUDA device\. Use device='auto'",
    ):
        resolve_device(device)
