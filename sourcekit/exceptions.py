"""Exceptions raised by sourcekit.

Every exception subclasses a builtin so that callers who catch ``ValueError`` or
``AttributeError`` keep working; the sourcekit class lets them be more precise.
"""

from __future__ import annotations

from sklearn.exceptions import NotFittedError as _SklearnNotFittedError

__all__ = [
    "NonFiniteError",
    "NotFittedError",
    "PerformanceWarning",
    "TrajectoryError",
    "UnsupportedLayersWarning",
    "UnsupportedModuleError",
]


class NotFittedError(_SklearnNotFittedError):
    """An attributor was used before ``fit``.

    Subclasses scikit-learn's ``NotFittedError`` (itself a ``ValueError`` and an
    ``AttributeError``), so scikit-learn's own checks recognise it.

    Examples
    --------
    >>> import torch
    >>> from sourcekit import Examples, SourceAttributor
    >>> from sourcekit.exceptions import NotFittedError
    >>> try:
    ...     SourceAttributor().transform(Examples(torch.zeros(1, 3), torch.zeros(1)))
    ... except NotFittedError as err:
    ...     print(err)
    This SourceAttributor instance is not fitted yet. Call fit(trajectory) before transform.
    >>> issubclass(NotFittedError, ValueError), issubclass(NotFittedError, AttributeError)
    (True, True)
    """


class TrajectoryError(ValueError):
    """A recorded training run is incomplete, inconsistent or corrupt.

    Raised when a trajectory is built, recorded, saved or loaded, and when a method
    needs something the record lacks (a checkpoint, the batches, a recipe); the message
    says what is wrong and what to do.

    Examples
    --------
    >>> import torch
    >>> from sourcekit import Examples, OptimizerSpec, TrainingStage, train
    >>> from sourcekit.exceptions import TrajectoryError
    >>> data = Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> stage = TrainingStage(OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5, n_checkpoints=2)
    >>> trajectory = train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> try:
    ...     trajectory.checkpoint(4)
    ... except TrajectoryError as err:
    ...     print(err)
    No checkpoint is stored at step 4; stored steps are [0, 2, 6, 8].
    """


class UnsupportedModuleError(TypeError):
    """A layer with parameters that the chosen method cannot handle.

    Gradient-based attributors work through the layer types of sourcekit's registry:
    ``nn.Linear``, ``nn.Conv2d``, the ``Conv1D`` of GPT-2-style models, ``nn.Embedding``,
    and any added with :func:`sourcekit.gradients.register_layer_type`. Without
    ``modules=[...]``, layers of other types (normalisation...) are left out with an
    :class:`UnsupportedLayersWarning`; naming such a layer in ``modules=[...]`` raises
    this error, as does a model without any layer sourcekit reads.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import sourcekit
    >>> from sourcekit.exceptions import UnsupportedModuleError
    >>> data = sourcekit.Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    >>> trajectory = sourcekit.train(model, data, [stage], progress=False)
    >>> try:
    ...     sourcekit.InfluenceAttributor(modules=["0", "1"]).fit(trajectory)
    ... except UnsupportedModuleError as err:
    ...     print(err)
    The layer '1' (LayerNorm) has parameters but is not of a layer type sourcekit reads (nn.Linear, nn.Conv2d, GPT-2's Conv1D, nn.Embedding; registered kinds: linear, conv2d, conv1d, embedding). Name only supported layers in modules=[...] (e.g. modules=['0', '2']), or describe the layer with sourcekit.gradients.register_layer_type.
    >>> influence = sourcekit.InfluenceAttributor(modules=["0", "2"]).fit(trajectory)
    >>> influence.transform(data[:2]).shape
    (2, 20)
    """


class NonFiniteError(FloatingPointError):
    """NaN or infinity appeared in gradients, curvature or scores.

    Usually a run that diverged at some checkpoint, or a damping too small for an
    ill-conditioned curvature; the message names where it appeared.

    Examples
    --------
    A run whose learning rate is far too large diverges:

    >>> import torch
    >>> import sourcekit
    >>> from sourcekit.exceptions import NonFiniteError
    >>> data = sourcekit.Examples(1e3 * torch.randn(20, 3), torch.randn(20, 1))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=1e6), epochs=3, batch_size=20)
    >>> trajectory = sourcekit.train(torch.nn.Linear(3, 1), data, [stage], loss="squared_error",
    ...                              measurement="output", progress=False)
    >>> try:
    ...     sourcekit.InfluenceAttributor().fit(trajectory)
    ... except NonFiniteError as err:
    ...     print(type(err).__name__, isinstance(err, FloatingPointError))
    NonFiniteError True
    """


class UnsupportedLayersWarning(UserWarning):
    """Some layers with parameters are left out of attribution, their parameters fixed.

    Without ``modules=[...]``, the gradient-based attributors attribute through every
    layer sourcekit can read and leave out the others: layer types outside the registry
    (normalisation layers), unsupported configurations, layers whose input is shared by
    the examples of a batch (a position embedding looked up once per batch) and layers
    the forward pass does not call. One warning per fit lists them; passing
    ``modules=[...]`` chooses the layers explicitly and gives no warning.

    Examples
    --------
    >>> import warnings
    >>> import torch
    >>> from torch import nn
    >>> import sourcekit
    >>> from sourcekit.exceptions import UnsupportedLayersWarning
    >>> data = sourcekit.Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    >>> trajectory = sourcekit.train(model, data, [stage], progress=False)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always", UnsupportedLayersWarning)
    ...     influence = sourcekit.InfluenceAttributor().fit(trajectory)
    >>> print(caught[0].message)  # doctest: +NORMALIZE_WHITESPACE
    Attributing through 2 layer(s); 1 layer(s) with parameters are left out and their
    parameters treated as fixed: '1' (LayerNorm, not a layer type sourcekit reads). Pass
    modules=[...] to choose the layers yourself (no warning then), or describe a layer
    with sourcekit.gradients.register_layer_type.
    >>> [b.name for b in influence.state_.blocks]
    ['0', '2']
    """


class PerformanceWarning(UserWarning):
    """A setting makes the work slower than it needs to be (the results are unchanged).

    Raised, for example, when ``memory_limit`` holds the preconditioned gradients of only
    some of the queries, so that the training data is streamed once per block of queries.
    Filter it with ``warnings.filterwarnings("ignore", category=PerformanceWarning)``.

    Examples
    --------
    >>> import warnings
    >>> import torch
    >>> from sourcekit import Examples, OptimizerSpec, SourceAttributor, TrainingStage, train
    >>> from sourcekit.exceptions import PerformanceWarning
    >>> data = Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> stage = TrainingStage(OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5, n_checkpoints=2)
    >>> trajectory = train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> source = SourceAttributor(n_segments=2, memory_limit=100, device="cpu", progress=False)
    >>> source = source.fit(trajectory)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always", PerformanceWarning)
    ...     scores = source.transform(data[:3])
    >>> print(caught[0].message)  # doctest: +NORMALIZE_WHITESPACE
    memory_limit=100 holds the preconditioned gradients of 1 of the 3 queries at once
    (96 bytes each), so the training data is streamed 3 times, once per block of
    queries. Set memory_limit to at least 576 bytes to stream it once, or transform fewer
    queries per call.
    """
