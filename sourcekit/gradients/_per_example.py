"""Per-example gradients of the training loss and of the query measurement.

Everything here works on a model of the trajectory's architecture loaded with one
checkpoint (:func:`model_at`), in evaluation mode, with hooks from
:func:`~sourcekit.gradients._layers.collect`. The training set is streamed in batches;
results are per block matrices of shape (n, d_out, d_in).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from ..exceptions import NonFiniteError, UnsupportedModuleError
from ..trajectory import Examples, Trajectory
from ._layers import LayerBlock, block_gradients, collect
from ._patches import Inputs

__all__ = [
    "FISHER",
    "BatchFactors",
    "FisherNoise",
    "checkpoint_batches",
    "measurement_gradients",
    "model_at",
    "position_weights",
]

FISHER = ("true", "empirical", "expected")


def model_at(
    trajectory: Trajectory,
    step: int,
    blocks: Sequence[LayerBlock],
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    """A fresh model with the checkpoint at ``step``, in eval mode, on ``device``.

    Only the parameters of ``blocks`` require gradients.
    """
    model = trajectory.build_model(step).to(device=device, dtype=dtype)
    model.eval()
    wanted = {b.weight for b in blocks} | {b.bias for b in blocks if b.bias}
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
    return model


class FisherNoise:
    """Uniform noise for sampling Fisher targets, fixed per example.

    The noise of example i depends only on (seed, i), never on how the examples are
    batched, so curvature estimated with sampled labels does not change with the batch
    size. Noise is generated in fixed chunks of examples.
    """

    def __init__(self, seed: int, chunk: int = 256) -> None:
        self.seed = int(seed)
        self.chunk = chunk
        self._cache: dict[int, torch.Tensor] = {}

    def uniforms(self, indices: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        """Noise of shape (len(indices), *shape) for the given example indices."""
        chunk_ids = indices // self.chunk
        wanted = set(np.unique(chunk_ids).tolist())
        for c in list(self._cache):
            if c not in wanted or tuple(self._cache[c].shape[1:]) != shape:
                del self._cache[c]
        out = torch.empty((len(indices), *shape), dtype=torch.float64)
        for c in wanted:
            if c not in self._cache:
                seed = int(np.random.SeedSequence([self.seed, int(c)]).generate_state(1)[0])
                g = torch.Generator().manual_seed(seed)
                self._cache[c] = torch.rand((self.chunk, *shape), generator=g, dtype=torch.float64)
            rows = np.flatnonzero(chunk_ids == c)
            out[torch.from_numpy(rows)] = self._cache[c][
                torch.from_numpy(indices[rows] % self.chunk)
            ]
        return out


_LOW = (torch.bfloat16, torch.float16)
_LOW_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _forward(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``model(inputs)``; a half-precision kernel missing on this device becomes a clear error.

    Some CPU builds of torch lack float16 kernels for common layers; the error then
    names the ``gradient_dtype`` parameter and what to use instead.
    """
    try:
        return model(inputs)
    except (RuntimeError, NotImplementedError) as err:
        dtype = inputs.dtype if inputs.is_floating_point() else None
        if dtype is None:
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if dtype not in _LOW or "not implemented for" not in str(err):
            raise
        raise ValueError(
            f"The 'gradient_dtype' parameter is {_LOW_NAMES[dtype]!r}, but a layer of the model "
            f"has no {_LOW_NAMES[dtype]} kernel on {inputs.device.type!r} ({err}). Use "
            "gradient_dtype='bfloat16' (supported by CPU builds of torch), or None for the "
            "working precision, or run on a GPU (device='cuda')."
        ) from err


def _widened(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs and floating targets of a low-precision pass in float32, for the loss.

    The loss (a log-sum-exp, a squared error) is computed in float32; its gradient flows
    back into the network in the pass's precision.
    """
    if outputs.dtype not in _LOW:
        return outputs, targets
    return outputs.float(), targets.float() if targets.is_floating_point() else targets


_T = TypeVar("_T", torch.Tensor, Inputs)


def as_dtype(tensors: dict[str, _T], dtype: torch.dtype | None) -> dict[str, _T]:
    """The floating tensors of ``tensors`` in ``dtype`` (unchanged when None)."""
    if dtype is None:
        return tensors
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}


def _check_finite(tensor: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(
            f"NaN or infinity in the {what} at checkpoint step {step}. The run may have diverged "
            "there; choose other checkpoints (checkpoint_steps) or check the recorded data."
        )


def _check_per_example(a: Mapping[str, Inputs], n: int) -> None:
    """Every block's inputs must have one row per example of the batch."""
    for name, inputs in a.items():
        if inputs.shape[0] != n:
            raise UnsupportedModuleError(
                f"The layer {name!r} received inputs for {inputs.shape[0]} example(s) in a batch of "
                f"{n}: its input is shared by the examples (for instance position indices "
                "broadcast over the batch), so it has no per-example gradients. Exclude it with "
                "modules=[...] naming the layers to attribute through."
            )


@dataclass
class BatchFactors:
    """Layer inputs and output gradients of one batch of training examples.

    ``fisher`` holds one or more sets of output gradients whose outer products average to
    the Fisher (one set of sampled or recorded targets; T·C sets for the expected Fisher
    of outputs with T positions and C classes); ``loss`` holds the gradients of each
    example's own training loss (recorded targets). ``position_weights`` (n, T) are the
    loss's weights w_t of the output positions (:func:`position_weights`), or None for
    outputs without positions.
    """

    indices: np.ndarray
    a: dict[str, Inputs]
    fisher: list[dict[str, torch.Tensor]] = field(default_factory=list)
    loss: dict[str, torch.Tensor] | None = None
    position_weights: torch.Tensor | None = None

    def nbytes(self) -> int:
        tensors = list(self.a.values()) + [t for d in self.fisher for t in d.values()]
        tensors += list(self.loss.values()) if self.loss is not None else []
        tensors += [] if self.position_weights is None else [self.position_weights]
        return sum(t.numel() * t.element_size() for t in tensors)


def _n_positions(outputs: torch.Tensor) -> int:
    """The output positions of one example: the axes between the first and the last."""
    return int(np.prod(outputs.shape[1:-1], dtype=np.int64)) if outputs.ndim > 2 else 1


def position_weights(
    loss: Callable, outputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor | None:
    """The weights w (n, T) of a loss over T output positions, L = Σ_t w_t ℓ_t, or None.

    None when the loss does not describe its positions (``loss.per_position``): its
    per-example value then counts as one position; and None for outputs without
    positions (shape (n, C)) whose weights are all 1 (the plain losses), so that their
    passes stay as simple as before. Outputs without positions get their weights (n, 1)
    where they differ from 1: a class-weighted cross-entropy, or ``"mse_loss"``'s 2/D.
    """
    per_position = getattr(loss, "per_position", None)
    if per_position is None:
        return None
    with torch.no_grad():
        _, weights = per_position(outputs.detach(), targets)
    weights = weights.detach().to(torch.float64)
    if _n_positions(outputs) == 1 and bool((weights == 1).all()):
        return None
    return weights


def _fisher_totals(
    loss: Callable,
    fisher: str,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None,
    uniforms: Callable[[tuple[int, ...]], torch.Tensor],
) -> list[torch.Tensor]:
    """The scalars whose backward passes give the Fisher's output gradients.

    The objective's curvature is, per example, Σ_t w_t J_tᵀ ∇²ℓ_t J_t over the output
    positions t (weights w_t of the loss, ℓ_t a position's loss, J_t the Jacobian of its
    outputs). Each pass backpropagates Σ_t √w_t ψ_t, so that the outer products of the
    per-example gradients it yields average to that curvature:

    - ``"true"``: ψ_t = ℓ_t(y_t) with y_t drawn from the model at every position (ℓ from
      ``loss.fisher_loss`` where the loss names one). The
      draws of different positions are independent with zero-mean gradients, so the
      cross-position terms vanish in expectation and E[G Gᵀ] = Σ_t w_t J_tᵀ H_t J_t,
      the Gauss-Newton matrix (a whole-example gradient of the weighted loss would give
      Σ_t w_t² instead: T times too small for a mean over positions).
    - ``"empirical"``: ψ_t = ε_t ℓ_t(recorded y_t) with independent random signs ε_t,
      which cancel the cross-position terms in expectation: the per-position empirical
      Fisher Σ_t w_t J_tᵀ ∇ℓ_t ∇ℓ_tᵀ J_t. With one position it is the per-example
      gradient's outer product, exactly (no sign is drawn).
    - ``"expected"``: ψ = z_t · M_t[:, c] for every position t and column c of the
      Hessian's square root M_t M_tᵀ = ∇²ℓ_t, one pass each (T·C passes): the
      Gauss-Newton matrix exactly.
    """
    per_position = getattr(loss, "per_position", None)
    positions = _n_positions(outputs)
    if weights is None:
        root = None
    else:
        root = weights.sqrt().to(outputs.dtype)
    if fisher == "true":
        noise_shape = getattr(loss, "noise_shape", None) or (lambda shape: shape)
        u = uniforms(noise_shape(tuple(outputs.shape[1:])))
        sampled = loss.sample_targets(outputs, u)  # type: ignore[attr-defined]
        # Drawn targets are scored with the loss whose curvature per_position describes
        # (a label-smoothed cross-entropy names the plain one: loss.fisher_loss).
        scorer: Any = getattr(loss, "fisher_loss", loss)
        if root is None:
            return [scorer(outputs, sampled).sum()]
        values, _ = scorer.per_position(outputs, sampled)
        return [(values * root).sum()]
    if fisher == "empirical":
        if root is None:
            return [loss(outputs, targets).sum()]
        values, _ = per_position(outputs, targets)  # type: ignore[misc]
        signs = torch.where(uniforms((positions,)) < 0.5, -1.0, 1.0).to(root)
        return [(values * root * signs).sum()]
    # "expected"
    if outputs.ndim < 2:
        raise ValueError(
            "fisher='expected' needs outputs of shape (n, C) or (n, T, C); got "
            f"{tuple(outputs.shape)}. Use fisher='true'."
        )
    if positions > 1 and root is None:
        raise ValueError(
            f"fisher='expected' with outputs of shape {tuple(outputs.shape)} (positions) needs "
            "the weights the loss gives each position (loss.per_position); the trajectory's loss "
            "has none. Use a built-in loss, define per_position on the loss, or use "
            "fisher='true'."
        )
    n, c = outputs.shape[0], outputs.shape[-1]
    z = outputs.reshape(n, positions, c)
    hessian_root = loss.output_hessian_sqrt(outputs).to(outputs.dtype)  # type: ignore[attr-defined]
    hessian_root = hessian_root.reshape(n, positions, c, c)
    if root is None:
        root = torch.ones(n, positions, dtype=outputs.dtype, device=outputs.device)
    totals = []
    for t in range(positions):
        if not bool((root[:, t] != 0).any()):
            continue  # a position no example counts adds nothing
        for k in range(c):
            totals.append((z[:, t] * hessian_root[:, t, :, k] * root[:, t, None]).sum())
    return totals


def checkpoint_batches(
    model: nn.Module,
    blocks: Sequence[LayerBlock],
    data: Examples,
    indices: np.ndarray,
    loss: Callable,
    *,
    fisher: str | None,
    want_loss: bool | Callable[[], bool],
    noise: FisherNoise | None,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    step: int,
) -> Iterator[BatchFactors]:
    """Stream ``data[indices]`` in batches: one forward pass, then the backward passes asked for.

    ``fisher`` chooses the targets of the curvature's output gradients: ``"true"`` samples
    them from the model's predictive distribution (needs ``loss.sample_targets``),
    ``"empirical"`` uses the recorded targets, ``"expected"`` backpropagates the columns of
    a square root of the loss's output Hessian (the exact Gauss-Newton matrix; one
    backward pass per output and position), None skips them. Outputs with positions
    are weighted per position as :func:`_fisher_totals` derives, so that the Fisher has
    the scale of the objective the run minimised. ``want_loss`` adds the gradients of each
    example's training loss; given as a callable it is asked before every batch, so that
    a caller that stops keeping them stops paying for their backward pass. All gradients
    are per example (of a sum, not a mean).

    ``dtype`` is the precision of the passes (the model's, from :func:`model_at`): in
    bfloat16 or float16 the layer inputs and output gradients are kept in it, while the
    loss itself is computed in float32 from the outputs.
    """
    wants_loss = want_loss if callable(want_loss) else lambda: bool(want_loss)
    if fisher == "true" and getattr(loss, "sample_targets", None) is None:
        raise ValueError(
            "fisher='true' samples targets from the model's predictive distribution, but the "
            "trajectory's loss has no sample_targets method. Use fisher='empirical', or a built-in "
            "loss ('cross_entropy', 'squared_error')."
        )
    if fisher == "expected" and getattr(loss, "output_hessian_sqrt", None) is None:
        raise ValueError(
            "fisher='expected' needs the loss's output Hessian (loss.output_hessian_sqrt); the "
            "trajectory's loss has none. Use fisher='true' or 'empirical'."
        )
    with collect(model, blocks) as capture:
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            batch = data[idx].to(device, dtype)
            result = BatchFactors(idx, {})
            with torch.enable_grad():
                outputs, targets = _widened(_forward(model, batch.inputs), batch.targets)
                weights = position_weights(loss, outputs, targets)
                result.position_weights = weights
                passes: list[tuple[str, torch.Tensor]] = []
                loss_wanted = wants_loss()
                # With one position per example, the empirical Fisher's pass is the
                # training loss's own: its gradients serve both.
                shared = fisher == "empirical" and weights is None
                if loss_wanted or shared:
                    values = loss(outputs, targets)
                    _check_finite(values.detach(), "training losses", step)
                    passes.append(("loss", values.sum()))
                if fisher is not None and not shared:

                    def uniforms(shape: tuple[int, ...], idx: np.ndarray = idx) -> torch.Tensor:
                        return noise.uniforms(idx, shape).to(device)  # type: ignore[union-attr]

                    for total in _fisher_totals(loss, fisher, outputs, targets, weights, uniforms):
                        passes.append(("fisher", total))
                for i, (kind, total) in enumerate(passes):
                    keep_graph = i < len(passes) - 1
                    capture.backward(total, retain_graph=keep_graph)
                    grads = dict(capture.s)
                    if kind == "loss":
                        result.loss = grads if loss_wanted else None
                        if shared:
                            result.fisher.append(grads)
                    else:
                        result.fisher.append(grads)
                _check_per_example(capture.a, len(idx))
                result.a = dict(capture.a)
            capture.clear()
            yield result


def measurement_gradients(
    model: nn.Module,
    blocks: Sequence[LayerBlock],
    queries: Examples,
    measurement: Callable,
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    step: int,
    output_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """∇_θ f(z_q, θ) for every query, per block: {name: (n_queries, d_out, d_in)}.

    The passes run in ``dtype`` (the model's); the gradients are formed and returned in
    ``output_dtype`` (default: ``dtype``), so that a low-precision pass's layer inputs
    and output gradients are widened before their sum over positions.
    """
    parts: dict[str, list[torch.Tensor]] = {b.name: [] for b in blocks}
    with collect(model, blocks) as capture:
        for start in range(0, len(queries), batch_size):
            batch = queries[start : start + batch_size].to(device, dtype)
            with torch.enable_grad():
                values = measurement(*_widened(_forward(model, batch.inputs), batch.targets))
                capture.backward(values.sum())
            _check_per_example(capture.a, len(batch))
            a, s = as_dtype(capture.a, output_dtype), as_dtype(capture.s, output_dtype)
            for name, g in block_gradients(a, s, blocks).items():
                _check_finite(g, "query measurement gradients", step)
                parts[name].append(g)
            capture.clear()
    return {name: torch.cat(chunks) for name, chunks in parts.items()}
