"""Exact Gauss-Newton-vector products: the curvature as an operator, through the model.

For the checkpoints c of a segment (or the final step) and the examples m of a curvature
subset, the Gauss-Newton matrix of the training objective over the attributed blocks is

    H̄ = mean_c (1/n) Σ_m J_mᵀ ∇²_z L_m J_m,

J_m the Jacobian of example m's outputs z with respect to the blocks' parameters at θ_c
and ∇²_z L_m the Hessian of its loss with respect to those outputs (for outputs with
positions, Σ_t w_t ∇²ℓ_t: the loss's own weights). :class:`GaussNewtonProducts` applies
it to a batch of Q vectors without forming it: per batch of examples, one forward-mode
pass carries the Q vectors as tangents (J x, ``torch.func.jvp``), the loss's output
Hessian is applied by differentiating its output gradient the same way, and one
reverse-mode pass brings the results back (Jᵀ u, ``torch.func.vjp``), all vectorised
over the Q vectors (``torch.func.vmap``). This is the matrix that ``curvature="exact"``
forms densely, at the cost of passes instead of P × P storage, for models of any size.

Vectors are flat: P numbers per vector, block by block, each block's (d_out, d_in)
matrix row-major (the bias as its last column), as in
:class:`~sourcekit.curvature.DenseCurvature`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._distributed import all_reduce_sum
from ..gradients._layers import LayerBlock, squared_gradient_sum
from ..gradients._per_example import FisherNoise, checkpoint_batches, model_at, position_weights
from ..trajectory import Trajectory
from ..trajectory._inputs import ModelInputs, call_model, functional_forward, n_rows
from ._objects import flatten_blocks, unflatten_blocks
from ._passes import fisher_seed, sum_over_ranks

__all__ = ["GaussNewtonProducts", "flatten_blocks", "unflatten_blocks"]


def _block_matrix(block: LayerBlock, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The block's (Q, d_out, d_in) matrices of per-parameter tensors with a leading axis of Q."""
    weight = tensors[block.weight]
    lead = weight.shape[:1]
    d_weight = block.d_in - (block.bias is not None)
    if block.transposed:
        w = weight.reshape(*lead, d_weight, block.d_out).transpose(-1, -2)
    else:
        w = weight.reshape(*lead, block.d_out, d_weight)
    if block.bias is None:
        return w
    return torch.cat([w, tensors[block.bias].reshape(*lead, block.d_out, 1)], dim=-1)


class GaussNewtonProducts:
    """x ↦ H̄ x for the exact Gauss-Newton matrix H̄ (see the module notes).

    Parameters
    ----------
    trajectory : Trajectory
        The run (its models are built through it; SOURCE's averaged-checkpoint view
        works too).
    blocks : sequence of LayerBlock
        The attributed blocks: the parameters the vectors live on.
    steps : sequence of int
        The checkpoints to average over.
    indices : ndarray of int, or dict of int to ndarray of int
        The examples to average over (this rank's shard under ``torch.distributed``:
        the products are then summed over the ranks): the same at every checkpoint, or
        a subset per checkpoint, keyed by step (each checkpoint then weighs 1/C, its
        examples equally within it: the estimate of H̄ from (checkpoint, example) pairs
        that ``refine_examples`` streams).
    batch_size : int
        Examples per pass.
    device : torch.device
    dtype : torch.dtype
        Precision of the passes; the vectors come and go in float64.
    memory_limit : int
        Bytes the tangents of one pass may take: the Q vectors are carried in chunks
        (and the examples in smaller batches) so that Q × batch × the model's
        activations fit.
    fisher : {"expected", "true", "empirical"}, default="expected"
        How :meth:`diagonal` forms the diagonal: exactly ("expected", one backward pass
        per output and position of each example) or estimated as the fitted curvatures
        estimate it (one backward pass per example, with Fisher targets drawn with
        ``random_state``).
    random_state : int or None, default=0
        Seed of the Fisher targets of :meth:`diagonal` (as in curvature fitting).

    Attributes
    ----------
    n_products : int
        Products applied so far (one pass over each checkpoint's examples each).

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> import sourcekit
    >>> from sourcekit.curvature._products import GaussNewtonProducts
    >>> from sourcekit.gradients._layers import find_blocks
    >>> data = sourcekit.Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    >>> trajectory = sourcekit.train(model, data, [stage], progress=False)
    >>> blocks = find_blocks(trajectory.build_model())
    >>> products = GaussNewtonProducts(
    ...     trajectory, blocks, [trajectory.n_steps], np.arange(20), batch_size=8,
    ...     device=torch.device("cpu"), dtype=torch.float64, memory_limit=2**26,
    ... )
    >>> x = torch.randn(3, 26, dtype=torch.float64)  # three vectors of the 26 parameters
    >>> products(x).shape
    torch.Size([3, 26])
    """

    def __init__(
        self,
        trajectory: Trajectory,
        blocks: Sequence[LayerBlock],
        steps: Sequence[int],
        indices: np.ndarray | dict[int, np.ndarray],
        *,
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype,
        memory_limit: int,
        fisher: str = "expected",
        random_state: int | None = 0,
    ) -> None:
        self.trajectory = trajectory
        self.fisher = fisher
        self.random_state = random_state
        self.blocks = list(blocks)
        self.steps = list(steps)
        self.indices = {
            step: np.asarray(
                indices[step] if isinstance(indices, dict) else indices, dtype=np.int64
            )
            for step in self.steps
        }
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.memory_limit = memory_limit
        self.n_products = 0
        self._models: dict[int, nn.Module] = {}
        self._activations: int | None = None
        self._diagonal: dict[str, torch.Tensor] | None = None
        counts = sum_over_ranks([], [len(self.indices[step]) for step in self.steps])
        self._n_examples = dict(zip(self.steps, counts, strict=True))

    def _model(self, step: int) -> nn.Module:
        if step not in self._models:
            self._models[step] = model_at(
                self.trajectory, step, self.blocks, device=self.device, dtype=self.dtype
            )
        return self._models[step]

    def _activation_numbers(self, model: nn.Module, inputs: ModelInputs) -> int:
        """Numbers the leaf modules output per example (measured once, on one batch)."""
        if self._activations is None:
            total = [0]

            def count(module: nn.Module, args: object, output: object) -> None:
                if isinstance(output, torch.Tensor):
                    total[0] += output.numel()

            leaves = [m for m in model.modules() if not list(m.children())]
            handles = [m.register_forward_hook(count) for m in leaves]
            try:
                with torch.no_grad():
                    call_model(model, inputs)
            finally:
                for h in handles:
                    h.remove()
            n = n_rows(inputs)
            self._activations = max(1, total[0] // max(1, n))
        return self._activations

    def diagonal(self) -> dict[str, torch.Tensor]:
        """The diagonal of H̄ per block (d_out, d_in), in float64, computed once, on first
        use (what :meth:`RefinedCurvature.diagonal` blends in; no scoring path reads it).

        With ``fisher="expected"`` exactly, Σ_m Σ_c (J_mᵀ M_m e_c)² from one backward
        pass per output (and position) of each example, M_m M_mᵀ the loss's output
        Hessian; otherwise the mean of the squared per-example gradients of the Fisher
        targets ``fisher`` draws (an unbiased estimate of it for ``"true"``), one
        backward pass per example."""
        if self._diagonal is None:
            total = {
                b.name: torch.zeros(b.d_out, b.d_in, dtype=torch.float64, device=self.device)
                for b in self.blocks
            }
            for step in self.steps:
                part = {b.name: torch.zeros_like(total[b.name]) for b in self.blocks}
                for batch in checkpoint_batches(
                    self._model(step),
                    self.blocks,
                    self.trajectory.train,
                    self.indices[step],
                    self.trajectory.loss,
                    fisher=self.fisher,
                    want_loss=False,
                    noise=FisherNoise(fisher_seed(self.random_state, step)),
                    batch_size=self.batch_size,
                    device=self.device,
                    dtype=self.dtype,
                    step=step,
                ):
                    for variant in batch.fisher:
                        for b in self.blocks:
                            s = variant[b.name].to(torch.float64)
                            part[b.name] += squared_gradient_sum(b, batch.a[b.name], s)
                all_reduce_sum(list(part.values()))
                weight = 1.0 / (max(self._n_examples[step], 1.0) * len(self.steps))
                for name, t in part.items():
                    total[name] += t * weight
            self._diagonal = total
        return self._diagonal

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """H̄ x for a batch of flat vectors x of shape (Q, P) (float64 in and out)."""
        self.n_products += 1
        total = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        tangents_by_block = unflatten_blocks(self.blocks, x.to(self.device, self.dtype))
        for step in self.steps:
            indices = self.indices[step]
            at_step = torch.zeros_like(total)
            model = self._model(step)
            params = {
                name: p.detach()
                for name, p in model.named_parameters()
                if any(name in (b.weight, b.bias) for b in self.blocks)
            }
            shapes = {name: p.shape for name, p in params.items()}
            fixed = {k: v.detach() for k, v in model.named_parameters() if k not in params}
            fixed.update(dict(model.named_buffers()))
            tangents: dict[str, torch.Tensor] = {}
            for b in self.blocks:
                tangents.update(b.split(tangents_by_block[b.name], shapes))
                _drop_padding_row(model, b, tangents)
            for start in range(0, len(indices), self.batch_size):
                idx = indices[start : start + self.batch_size]
                batch = self.trajectory.train[idx].to(self.device, self.dtype)
                per_pair = 4 * self.dtype.itemsize * self._activation_numbers(model, batch.inputs)
                pairs = max(1, self.memory_limit // per_pair)
                rows = min(len(idx), max(1, pairs // x.shape[0]))
                chunk = min(x.shape[0], max(1, pairs // rows))
                for first in range(0, len(idx), rows):
                    part = batch[first : first + rows]
                    for q in range(0, x.shape[0], chunk):
                        sub = {k: t[q : q + chunk] for k, t in tangents.items()}
                        out = _gauss_newton_batch(
                            model,
                            params,
                            fixed,
                            part.inputs,
                            part.targets,
                            sub,
                            self.trajectory.loss,
                        )
                        at_step[q : q + chunk] += torch.cat(
                            [
                                _block_matrix(b, out).reshape(out[b.weight].shape[0], -1)
                                for b in self.blocks
                            ],
                            dim=1,
                        ).to(device=x.device, dtype=torch.float64)
            all_reduce_sum([at_step])
            total += at_step / (max(self._n_examples[step], 1.0) * len(self.steps))
        return total


def _drop_padding_row(
    model: nn.Module, block: LayerBlock, tangents: dict[str, torch.Tensor]
) -> None:
    """Zero the tangent of an embedding's padding row: its backward pass gives that row no
    gradient (Jᵀ leaves it out), so the forward pass must not move it either, or the
    products would not be symmetric."""
    padding = getattr(model.get_submodule(block.name), "padding_idx", None)
    if block.one_hot and padding is not None:
        tangent = tangents[block.weight].clone()
        tangent[:, padding] = 0
        tangents[block.weight] = tangent


def _gauss_newton_batch(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    fixed: dict[str, torch.Tensor],
    inputs: ModelInputs,
    targets: torch.Tensor,
    tangents: dict[str, torch.Tensor],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Σ_m J_mᵀ ∇²_z L_m J_m x over one batch, for each of the vectors x in ``tangents``
    (per parameter, with a leading vector axis)."""

    def forward(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_forward(model, {**fixed, **p}, inputs)

    # Attention through its plain (math) kernel: the fused ones have no forward mode.
    with sdpa_kernel([SDPBackend.MATH]):
        pulled = vjp(forward, params)
        outputs, pullback = pulled[0], pulled[1]
        jx = vmap(lambda t: jvp(forward, (params,), (t,))[1])(tangents)
        hjx = _output_hessian_products(loss, outputs.detach(), targets, jx)
        (back,) = vmap(pullback)(hjx.to(outputs.dtype))
    return back


def _output_hessian_products(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    outputs: torch.Tensor,
    targets: torch.Tensor,
    u: torch.Tensor,
) -> torch.Tensor:
    """∇²_z L u per example for the vectors u (Q, *outputs.shape).

    With the loss's ``output_hessian_sqrt`` (M Mᵀ = ∇²ℓ_t per position) and position
    weights w_t (``per_position``), Σ_t w_t M_t M_tᵀ u_t: the Hessian ``curvature="exact"``
    uses, at a cost of Q·n·T·C² multiply-adds. Otherwise the loss's own Hessian by
    differentiating its output gradient along u (forward over reverse mode).
    """
    root = getattr(loss, "output_hessian_sqrt", None)
    if root is None:

        def loss_sum(z: torch.Tensor) -> torch.Tensor:
            widened = z.float() if z.dtype in (torch.bfloat16, torch.float16) else z
            return loss(widened, targets).sum()

        output_gradient = grad(loss_sum)
        return vmap(lambda x: jvp(output_gradient, (outputs,), (x.to(outputs.dtype),))[1])(u)
    n, c = outputs.shape[0], outputs.shape[-1]
    positions = int(np.prod(outputs.shape[1:-1], dtype=np.int64)) if outputs.ndim > 2 else 1
    m = root(outputs).to(u.dtype).reshape(n, positions, c, c)
    x = u.reshape(u.shape[0], n, positions, c)
    hx = torch.einsum("ntcd,qntd->qntc", m, torch.einsum("ntdc,qntd->qntc", m, x))
    weights = position_weights(loss, outputs, targets)
    if weights is not None:
        hx = hx * weights.to(hx.dtype)[None, :, :, None]
    return hx.reshape(u.shape)
