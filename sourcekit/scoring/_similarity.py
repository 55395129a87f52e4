"""Similarity baselines (METHOD.md section 6): gradient and representation similarity.

Gradient similarity compares the measurement gradient of a query with the training-loss
gradient of each training example at the same parameters θ (the final ones), in
sourcekit's sign convention:

    "dot":     τ[q, m] = −(1/N) ∇f(z_q, θ)ᵀ ∇L(z_m, θ)
    "cosine":  τ[q, m] = −cos(∇f(z_q, θ), ∇L(z_m, θ))

"dot" is a counterfactual: one full-batch gradient step of unit learning rate on
J = (1/N) Σ_i w_i L(z_i, θ) moves θ by −(1/N) ∇L(z_m, θ) per unit of w_m, so f moves by
the score to first order. "cosine" drops both norms and the 1/N: a ranking only.

Representation similarity compares feature vectors h (the input of a chosen layer):

    "cosine":  τ[q, m] = cos(h_q, h_m)        "dot":  τ[q, m] = h_qᵀ h_m

a similarity only (positive: similar), with no counterfactual scale.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..gradients._training import GradientSource
from ..trajectory import Examples
from ..trajectory._inputs import call_model
from ._contraction import gradient_dot, squared_norms

__all__ = [
    "SIMILARITIES",
    "default_layer",
    "gradient_similarity_scores",
    "layer_features",
    "layer_inputs",
    "representation_similarity",
    "squared_norms",
]

SIMILARITIES = ("dot", "cosine")


def _cosine(dots: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """dots[i, j] / (‖left_i‖ ‖right_j‖), 0 where a vector is zero (its dots are zero too)."""
    denominator = torch.outer(left.sqrt(), right.sqrt())
    return dots / denominator.clamp_min(torch.finfo(dots.dtype).tiny)


def gradient_similarity_scores(
    query_gradients: dict[str, torch.Tensor],
    training_gradients: GradientSource,
    step: int,
    examples: np.ndarray,
    *,
    n_train: int,
    n_examples: int,
    similarity: str = "dot",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gradient-similarity scores of shape (n_queries, n_train) at checkpoint ``step``.

    Parameters
    ----------
    query_gradients : dict of block name to tensor (n_queries, d_out, d_in)
        ∇f(z_q, θ_step) per block.
    training_gradients : callable
        ``training_gradients(step, examples)`` yields ``(indices, {block: (n, d_out, d_in)})``.
    examples : int array
        The training examples scored (the others score 0).
    n_examples : int
        N in the "dot" score's 1/N.
    similarity : {"dot", "cosine"}
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"The similarity must be one of {SIMILARITIES}; got {similarity!r}.")
    query = {k: g.to(dtype) for k, g in query_gradients.items()}
    n_queries = next(iter(query.values())).shape[0]
    device = next(iter(query.values())).device
    query_norms = squared_norms(query, dtype) if similarity == "cosine" else None
    scores = torch.zeros(n_queries, n_train, dtype=dtype, device=device)
    for indices, grads in training_gradients(step, examples):
        dots = gradient_dot(query, grads, dtype)
        if query_norms is None:
            block = -dots / n_examples
        else:
            block = -_cosine(dots, query_norms, squared_norms(grads, dtype))
        scores[:, torch.from_numpy(indices).to(device)] = block
    return scores


def default_layer(model: nn.Module) -> str:
    """The name of the last nn.Linear or nn.Conv2d of ``model`` (in ``named_modules`` order)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not names:
        raise ValueError(
            "The model has no nn.Linear or nn.Conv2d layer whose input could serve as the "
            "representation. Name a module with layer='...' (a name from model.named_modules())."
        )
    return names[-1]


@contextmanager
def layer_inputs(model: nn.Module, layer: str) -> Iterator[list[torch.Tensor]]:
    """Record the input of module ``layer`` at every call, flattened to (n, d).

    The hook exists only inside the ``with`` block; the model is never modified.
    """
    calls: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple) -> None:
        calls.append(inputs[0].detach().reshape(inputs[0].shape[0], -1))

    handle = dict(model.named_modules())[layer].register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def layer_features(
    model: nn.Module,
    layer: str,
    examples: Examples,
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The input of ``layer`` for every example, shape (n, d), with ``model`` as it is.

    A layer called several times in one forward pass (shared weights) contributes the
    concatenation of its inputs.
    """
    parts = []
    with layer_inputs(model, layer) as calls, torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size].to(device, dtype)
            calls.clear()
            call_model(model, batch.inputs)
            if not calls:
                raise ValueError(
                    f"The layer {layer!r} was not called in the model's forward pass, so it has no "
                    "input to use as a representation. Name a module the forward pass uses."
                )
            parts.append(torch.cat(calls, dim=1))
    return torch.cat(parts)


def representation_similarity(
    query_features: torch.Tensor, train_features: torch.Tensor, similarity: str = "cosine"
) -> torch.Tensor:
    """cos(h_q, h_m) or h_qᵀ h_m for every pair, shape (n_queries, n_train)."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"The similarity must be one of {SIMILARITIES}; got {similarity!r}.")
    dots = query_features @ train_features.T
    if similarity == "dot":
        return dots
    return _cosine(dots, (query_features**2).sum(dim=1), (train_features**2).sum(dim=1))
