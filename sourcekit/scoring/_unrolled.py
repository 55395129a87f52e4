"""Exact unrolled differentiation through a recorded run (METHOD.md section 3).

Every training example gets a weight w_m (all 1) in the minibatch loss. Replaying the
recorded updates with autograd keeping the graph makes θ_T a differentiable function of
w, and

    τ[q, m] = ∂ f(z_q, θ_T) / ∂ w_m
            = −∇f(z_q, θ_T)ᵀ Σ_k (Π_{k'>k} ∂θ_{k'+1}/∂θ_{k'}) (η_k/|B_k|) 1[m ∈ B_k] ∇L(z_m, θ_k)

(for plain SGD; momentum and Adam enter through the Jacobians of their updates). One
backward pass per query gives the scores of all training examples.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from .._device import resolve_device
from ..trajectory import Examples, Trajectory
from ..trajectory._inputs import functional_forward
from ..trajectory._replay import replay

__all__ = ["unrolled_scores"]


def unrolled_scores(
    trajectory: Trajectory,
    queries: Examples,
    *,
    dtype: torch.dtype = torch.float64,
    device: Any = "cpu",
    query_batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Exact first-order effect of including each training example on each query.

    Returns a tensor of shape (n_queries, n_train) on the CPU. Memory grows with the
    number of recorded steps (the whole graph of the run is kept).
    :class:`~sourcekit.UnrolledAttributor` is the estimator over this function.

    Parameters
    ----------
    trajectory : Trajectory
        A recorded run with the batches of every step.
    queries : Examples
        The queries, measured with the trajectory's measurement at the final model.
    dtype : torch.dtype, default=torch.float64
        Precision of the replay.
    device : str or torch.device, default="cpu"
        Where the replay runs ("auto": CUDA when available).
    query_batch_size : int, default=16
        Queries differentiated together in one vectorised backward pass.
    progress : bool, default=False
        Show progress bars.

    Returns
    -------
    tensor of shape (n_queries, n_train)
        ``scores[q, m] = ∂ f(z_q, θ_T) / ∂ w_m`` at w = 1: the effect of including
        training example m, for the recorded batch order.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> import sourcekit
    >>> from sourcekit.scoring import unrolled_scores
    >>> data = sourcekit.Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    >>> trajectory = sourcekit.train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> scores = unrolled_scores(trajectory, data[:4])
    >>> scores.shape, scores.dtype
    (torch.Size([4, 20]), torch.float64)
    >>> estimator = sourcekit.UnrolledAttributor().fit(trajectory).transform(data[:4])
    >>> np.allclose(estimator, scores.numpy())
    True
    """

    device = resolve_device(device)
    weights = torch.ones(trajectory.n_train, dtype=dtype, device=device, requires_grad=True)
    params, buffers = replay(
        trajectory,
        weights=weights,
        create_graph=True,
        dtype=dtype,
        device=device,
        progress=progress,
    )
    model = trajectory.architecture.build().to(device=device, dtype=dtype)
    model.eval()
    q = queries.to(device, dtype)
    values = trajectory.measurement(
        functional_forward(model, {**params, **buffers}, q.inputs), q.targets
    )
    n_queries = len(queries)
    rows = torch.empty(n_queries, trajectory.n_train, dtype=dtype)
    bar = tqdm(
        total=n_queries, desc="unrolling queries", disable=not progress, unit="query", leave=False
    )
    batched = True
    for start in range(0, n_queries, query_batch_size):
        stop = min(start + query_batch_size, n_queries)
        if batched:
            # One vectorised backward pass for the block (vmap over the graph).
            seeds = torch.zeros(stop - start, n_queries, dtype=dtype, device=device)
            seeds[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            try:
                (grad,) = torch.autograd.grad(
                    values, weights, grad_outputs=seeds, retain_graph=True, is_grads_batched=True
                )
                rows[start:stop] = grad.detach().cpu()
                bar.update(stop - start)
                continue
            except RuntimeError:
                batched = False  # some operation has no batching rule: one query at a time
        for i in range(start, stop):
            (grad,) = torch.autograd.grad(values[i], weights, retain_graph=True, allow_unused=True)
            rows[i] = 0.0 if grad is None else grad.detach().cpu()
        bar.update(stop - start)
    bar.close()
    return rows
