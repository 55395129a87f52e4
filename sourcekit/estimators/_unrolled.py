"""``UnrolledAttributor``: exact unrolled differentiation (the ground truth)."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch

from .._device import resolve_device
from .._distributed import is_distributed, world_size
from ..base import DEVICE, DTYPE, DTYPES, POSITIVE_INT, PROGRESS, BaseAttributor
from ..scoring._unrolled import unrolled_scores
from ..trajectory import Examples, Trajectory
from ..trajectory._replay import require_batches

__all__ = ["UnrolledAttributor"]


class UnrolledAttributor(BaseAttributor):
    """Exact first-order attribution by differentiating through the whole recorded run.

    Each training example m gets a weight w_m in the minibatch loss; replaying the
    recorded batches with the recorded optimiser (SGD with momentum and weight decay,
    Adam, AdamW; every stage) makes the final parameters a function of the weights, and

        scores[q, m] = ∂ f(z_q, θ_T) / ∂ w_m   at w = 1,

    the effect of including z_m for the recorded batch order (see the exact unrolling
    page of the documentation). One vectorised backward pass per block of queries gives
    the scores of all training examples.


    This is the reference every approximation is checked against, meant for small
    models: the autograd graph of every recorded step is kept in memory, so memory grows
    linearly with the number of steps (about the activations and parameters of each
    step, several times over). The trajectory must hold the batch indices of every step.
    Parameter groups, frozen parameters, clipping and per-step settings are replayed as
    recorded, and a forward pass that drew random numbers (dropout) draws the same ones
    from the recorded generator states, on the kind of device the run used.

    It does not shard across ``torch.distributed`` ranks: the replay is one sequential
    computation over the whole run, which does not split by training example. Under a
    process group of several ranks every rank replays the whole run and returns the
    same full matrix (no speed-up), and ``transform`` warns.

    Parameters
    ----------
    dtype : {"float64", "float32"}, default="float64"
        Precision of the replay and of the returned scores.
    device : str or torch.device, default="auto"
        "auto" uses CUDA when available.
    query_batch_size : int, default=16
        Queries differentiated together in one vectorised backward pass.
    progress : bool, default=False
        Show progress bars.

    Attributes
    ----------
    trajectory_ : Trajectory
    n_train_ : int
    fingerprint_ : str

    Examples
    --------
    >>> import sourcekit
    >>> task = sourcekit.datasets.load_digits_task()
    >>> trajectory = task.record("early", progress=False)
    >>> scores = sourcekit.UnrolledAttributor().fit(trajectory).transform(task.test[:2])
    >>> scores.shape
    (2, 1437)
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "dtype": [DTYPE],
        "device": [DEVICE],
        "query_batch_size": [POSITIVE_INT],
        "progress": [PROGRESS],
    }

    def __init__(
        self,
        *,
        dtype: str = "float64",
        device: Any = "auto",
        query_batch_size: int = 16,
        progress: bool = False,
    ) -> None:
        self.dtype = dtype
        self.device = device
        self.query_batch_size = query_batch_size
        self.progress = progress

    def _torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def _check_trajectory(self, trajectory: Trajectory) -> None:
        require_batches(trajectory, type(self).__name__)
        resolve_device(self.device)  # a device this build cannot use is refused now

    def _scores(self, queries: Examples) -> torch.Tensor:
        if is_distributed():
            warnings.warn(
                f"UnrolledAttributor does not shard across the {world_size()} ranks of "
                "torch.distributed: every rank replays the whole run and computes every score "
                "(the result is the single-process one, with no speed-up). Run it in one "
                "process, or on rank 0 only, to save the other ranks' time.",
                UserWarning,
                stacklevel=3,
            )
        return unrolled_scores(
            self.trajectory_,
            queries,
            dtype=self._torch_dtype(),
            device=self.device,
            query_batch_size=self.query_batch_size,
            progress=self.progress,
        )
