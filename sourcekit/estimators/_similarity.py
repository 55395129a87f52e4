"""Similarity baselines: ``GradientSimilarityAttributor`` and ``RepresentationSimilarityAttributor``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .._distributed import all_gather_columns
from .._validation import InstanceOf, Options
from ..base import DEVICE, DTYPE, POSITIVE_INT, BaseAttributor
from ..gradients._layers import find_blocks
from ..gradients._per_example import TrainingGradients
from ..scoring._similarity import (
    SIMILARITIES,
    default_layer,
    gradient_similarity_scores,
    layer_features,
    representation_similarity,
)
from ..trajectory import Examples, Trajectory
from ..trajectory._replay import resolve_device
from ._shared import (
    GRADIENT_CONSTRAINTS,
    cache_training_factors,
    local_examples,
    score_in_query_blocks,
)

__all__ = ["GradientSimilarityAttributor", "RepresentationSimilarityAttributor"]


class GradientSimilarityAttributor(BaseAttributor):
    """Gradient similarity at the final parameters θ_T.

    ``similarity="dot"`` (the default) follows sourcekit's sign and scale::

        scores[q, m] = −(1/N) ∇f(z_q, θ_T)ᵀ ∇L(z_m, θ_T)

    the first-order effect on f of including z_m in one full-batch gradient step of
    unit learning rate taken from θ_T (an influence function with the identity as
    curvature). ``similarity="cosine"`` gives −cos(∇f(z_q, θ_T), ∇L(z_m, θ_T)): the same
    sign (positive: a step on z_m pushes f up) but no counterfactual scale, a ranking
    that ignores how large each gradient is.

    Parameters
    ----------
    similarity : {"dot", "cosine"}, default="dot"
        The dot product with sourcekit's sign and scale, or the cosine (a ranking).
    modules : list of str, optional
        Attribute through these layers only (names from ``model.named_modules()``).
    batch_size : int, default=256
        Examples per batch while streaming the data.
    memory_limit : int or "auto", default="auto"
        Bytes for the training gradients' factors kept by ``fit`` and, separately, for
        the query gradients of one block of queries (as in
        :class:`~sourcekit.TracInAttributor`).
        ``"auto"``: half of the GPU's free memory, or a quarter of the memory
        available on a CPU up to 1 GiB, read when ``fit`` runs (``memory_limit_`` holds
        the bytes).
    memory : str, path or joblib.Memory, optional
        Also cache the fitted state on disk (see :class:`~sourcekit.SourceAttributor`).
    device : str or torch.device, default="auto"
        "auto" uses CUDA when available.
    dtype : {"float32", "float64"}, default="float32"
        Precision of gradients and scores.
    gradient_dtype : {"bfloat16", "float16", "float32", "float64"} or None, default=None
        Precision of the forward and backward passes that produce per-example
        gradients, and of the gradients kept between fitting and scoring (None: ``dtype``).
        "bfloat16" halves their memory and, on GPUs, speeds the passes up; they are
        widened to ``dtype`` before they are combined, so curvature and scores stay
        in ``dtype``. "Cost and memory" in the documentation measures the agreement.
    progress : bool, default=False
        Show progress bars.


    Attributes
    ----------
    state_ : dict
        ``blocks`` and the cached training factors at θ_T (``cache``).
    memory_limit_ : int
        The bytes ``memory_limit`` stood for in this fit.
    trajectory_, n_train_, fingerprint_
        The fitted run, its number of training examples and its content fingerprint
        (see :class:`~sourcekit.BaseAttributor`).

    Examples
    --------
    >>> import sourcekit
    >>> task = sourcekit.datasets.load_digits_task()
    >>> trajectory = task.record("early", progress=False)
    >>> cosine = sourcekit.GradientSimilarityAttributor(similarity="cosine").fit(trajectory)
    >>> scores = cosine.transform(task.test[:4])
    >>> scores.shape, bool(abs(scores).max() <= 1)
    ((4, 1437), True)
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "similarity": [Options(*SIMILARITIES)],
        **GRADIENT_CONSTRAINTS,
    }
    _state_parameters: ClassVar[tuple[str, ...]] = (
        "modules",
        "memory_limit",
        "device",
        "dtype",
        "gradient_dtype",
    )

    def __init__(
        self,
        similarity: str = "dot",
        *,
        modules: Sequence[str] | None = None,
        batch_size: int = 256,
        memory_limit: int | str = "auto",
        memory: Any = None,
        device: Any = "auto",
        dtype: str = "float32",
        gradient_dtype: str | None = None,
        progress: bool = False,
    ) -> None:
        self.similarity = similarity
        self.modules = modules
        self.batch_size = batch_size
        self.memory_limit = memory_limit
        self.memory = memory
        self.device = device
        self.dtype = dtype
        self.gradient_dtype = gradient_dtype
        self.progress = progress

    def _fit_state(self, trajectory: Trajectory) -> dict[str, Any]:
        blocks = find_blocks(
            trajectory.architecture.build(), self.modules, trajectory.trained_parameters
        )
        examples = local_examples(trajectory, np.arange(trajectory.n_train, dtype=np.int64))
        cache = cache_training_factors(
            trajectory,
            blocks,
            [(trajectory.n_steps, examples)],
            memory_limit=self.memory_limit_ // 2,
            batch_size=self.batch_size,
            device=resolve_device(self.device),
            dtype=self._pass_dtype(),
            progress=self.progress,
        )
        return {"blocks": blocks, "cache": cache}

    def _scores(self, queries: Examples) -> torch.Tensor:
        trajectory = self.trajectory_
        examples = local_examples(trajectory, np.arange(trajectory.n_train, dtype=np.int64))

        def score(grads: dict[str, torch.Tensor], training: TrainingGradients) -> torch.Tensor:
            return gradient_similarity_scores(
                grads,
                training,
                trajectory.n_steps,
                examples,
                n_train=trajectory.n_train,
                n_examples=trajectory.n_train,
                similarity=self.similarity,
                dtype=self._torch_dtype(),
            )

        return score_in_query_blocks(self, queries, len(examples), score)


class RepresentationSimilarityAttributor(BaseAttributor):
    """Representation similarity: how alike the model sees a query and a training example.

        scores[q, m] = cos(h_q, h_m)   (similarity="cosine", the default)
        scores[q, m] = h_qᵀ h_m        (similarity="dot")

    with h the input of a layer of the final model θ_T (in evaluation mode), flattened
    per example. A similarity only: positive means similar, there is no counterfactual
    scale and the query's target is not used, so it cannot tell proponents from
    opponents of a prediction. Useful as a cheap sanity baseline and for finding near
    duplicates.

    Parameters
    ----------
    layer : str, optional
        Name of the module (from ``model.named_modules()``) whose *input* is the
        representation. None uses the input of the last nn.Linear or nn.Conv2d of the
        model (the penultimate features of a classifier).
    similarity : {"cosine", "dot"}, default="cosine"
        Cosine similarity (in [−1, 1]) or dot product of the representations.
    batch_size : int, default=256
        Examples per forward pass.
    device : str or torch.device, default="auto"
        "auto" uses CUDA when available.
    dtype : {"float32", "float64"}, default="float32"
        Precision of the representations and scores.

    Attributes
    ----------
    state_ : dict
        ``layer`` (the module used), ``features``, the training representations
        (n, d), and ``examples``, the training example of each row (all n_train of them
        in one process; this rank's shard under ``torch.distributed``).
    layer_ : str
        The module whose input is the representation.
    trajectory_, n_train_, fingerprint_
        The fitted run, its number of training examples and its content fingerprint
        (see :class:`~sourcekit.BaseAttributor`).

    Examples
    --------
    >>> import sourcekit
    >>> task = sourcekit.datasets.load_digits_task()
    >>> trajectory = task.record("early", progress=False)
    >>> similar = sourcekit.RepresentationSimilarityAttributor().fit(trajectory)
    >>> similar.layer_
    '4'
    >>> similar.transform(task.test[:4]).shape
    (4, 1437)
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "layer": [None, InstanceOf((str,), "a module name (str)")],
        "similarity": [Options("cosine", "dot")],
        "batch_size": [POSITIVE_INT],
        "device": [DEVICE],
        "dtype": [DTYPE],
    }
    _state_parameters: ClassVar[tuple[str, ...]] = ("layer", "device", "dtype")

    def __init__(
        self,
        layer: str | None = None,
        similarity: str = "cosine",
        *,
        batch_size: int = 256,
        device: Any = "auto",
        dtype: str = "float32",
    ) -> None:
        self.layer = layer
        self.similarity = similarity
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype

    def _model(self, trajectory: Trajectory) -> nn.Module:
        """The final model, built from the trajectory (never the user's), in eval mode."""
        model = trajectory.build_model(trajectory.n_steps)
        return model.to(resolve_device(self.device), self._torch_dtype()).eval()

    def _check_trajectory(self, trajectory: Trajectory) -> None:
        if self.layer is None:
            return
        names = [n for n, _ in trajectory.architecture.build().named_modules() if n]
        if self.layer not in names:
            raise ValueError(
                f"The 'layer' parameter of {type(self).__name__} names {self.layer!r}, which the "
                f"model does not have. Modules: {names[:16]}{' ...' if len(names) > 16 else ''}. "
                "Pass one of them, or layer=None for the input of the last nn.Linear / nn.Conv2d."
            )

    def _fit_state(self, trajectory: Trajectory) -> dict[str, Any]:
        model = self._model(trajectory)
        layer = default_layer(model) if self.layer is None else self.layer
        examples = local_examples(trajectory, np.arange(trajectory.n_train, dtype=np.int64))
        features = layer_features(
            model,
            layer,
            trajectory.train[examples if len(examples) else np.arange(1)],
            batch_size=self.batch_size,
            device=resolve_device(self.device),
            dtype=self._torch_dtype(),
        )[: len(examples)]  # an empty shard still needs the features' width
        return {"layer": layer, "features": features, "examples": examples}

    @property
    def layer_(self) -> str:
        self._check_fitted()
        return str(self.state_["layer"])

    def _scores(self, queries: Examples) -> torch.Tensor:
        features = layer_features(
            self._model(self.trajectory_),
            self.layer_,
            queries,
            batch_size=self.batch_size,
            device=resolve_device(self.device),
            dtype=self._torch_dtype(),
        )
        examples = self.state_["examples"]
        local = representation_similarity(features, self.state_["features"], self.similarity)
        scores = local.new_zeros(len(queries), self.n_train_)
        scores[:, torch.from_numpy(examples).to(scores.device)] = local
        return all_gather_columns(scores, examples).cpu()
