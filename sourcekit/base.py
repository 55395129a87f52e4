"""``BaseAttributor``: the scikit-learn contract every attribution method follows.

- ``__init__`` stores its keyword arguments and nothing else.
- ``fit(X)`` takes a :class:`~sourcekit.Trajectory` or a bound
  :class:`~sourcekit.trajectory.AttributionTask`, validates the parameters declared in
  ``_parameter_constraints`` and computes the damping-independent state, which is
  cached under (class, trajectory fingerprint, the parameters that shape it, the
  state's format): in this process always, and on disk too when the attributor names
  a disk cache (``_disk_cache``: the gradient attributors' ``memory`` parameter), so
  that other processes reuse it.
- ``transform(X)`` validates the parameters again (``set_params`` may have changed
  those that only ``transform`` reads, such as ``damping``), takes
  :class:`~sourcekit.Examples` queries (or a bound task) and returns the
  (n_queries, n_train) score matrix as a NumPy array: τ[q, m] is the first-order
  effect of *including* training example m on the measurement of query q, with the
  1/N scale included (METHOD.md section 1).
- Fitted attributes end in ``_``; using an unfitted attributor raises
  :class:`~sourcekit.exceptions.NotFittedError`.
- ``fit`` and ``transform`` compute with subnormal numbers flushed to zero on the
  calling thread and restore its previous mode on return (``sourcekit._denormals``:
  subnormals slow a CPU's arithmetic many times, and flushing them moves no score by
  more than its rounding).

The behaviour that only some attributors have is not probed for here: it belongs to
a subclass (``sourcekit.estimators._gradient.GradientAttributor`` for the attributors
that stream per-example gradients), which overrides the hooks below.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar

import joblib
import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin

from ._denormals import flushing_denormals
from ._distributed import all_agree, is_distributed, rank, world_size
from ._memory import AUTO
from ._validation import InstanceOf, Interval, Options, validate_parameters
from .exceptions import NonFiniteError, NotFittedError
from .trajectory import AttributionTask, Examples, Trajectory

__version__ = "0.1.0"

__all__ = ["BaseAttributor", "FittedState", "clear_state_cache", "state_cache_info"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
GRADIENT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, **DTYPES}

# Shared constraints that most attributors declare.
DEVICE = InstanceOf((str, torch.device), "'auto', 'cpu', 'cuda' or a torch.device")
DTYPE = Options(*DTYPES)
GRADIENT_DTYPE = Options(*GRADIENT_DTYPES)
PROGRESS = InstanceOf((bool,), "a bool")
MEMORY_LIMIT = (Interval(int, 1, None), Options(AUTO))
POSITIVE_INT = Interval(int, 1, None)


@dataclasses.dataclass
class FittedState:
    """The base of an attributor's fitted state (``state_``): a small typed object.

    Subclasses are dataclasses. ``FORMAT`` is raised when the meaning of a field
    changes, so that a state cached on disk by another version of the class is never
    read as this one: the cache's key holds the class, ``FORMAT`` and the field names
    (:meth:`format_key`).

    Examples
    --------
    >>> import dataclasses
    >>> from sourcekit.base import FittedState
    >>> @dataclasses.dataclass
    ... class Means(FittedState):
    ...     means: list
    >>> Means.format_key()
    ('Means', 1, ('means',))
    """

    FORMAT: ClassVar[int] = 1

    @classmethod
    def format_key(cls) -> tuple[str, int, tuple[str, ...]]:
        """(class, ``FORMAT``, field names): what a cache key records of the format."""
        return (cls.__qualname__, cls.FORMAT, tuple(f.name for f in dataclasses.fields(cls)))


class _StateCache:
    """A small in-process LRU cache of damping-independent fitted state."""

    def __init__(self, max_entries: int = 8) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: tuple, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
        value = compute()
        with self._lock:
            self.misses += 1
            self._entries[key] = value
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0


_STATE_CACHE = _StateCache()


def state_cache_info() -> dict[str, int]:
    """Hits, misses and size of the in-process cache of fitted state."""
    return {
        "hits": _STATE_CACHE.hits,
        "misses": _STATE_CACHE.misses,
        "entries": len(_STATE_CACHE._entries),
    }


def clear_state_cache() -> None:
    """Empty the in-process cache of fitted state."""
    _STATE_CACHE.clear()


class BaseAttributor(TransformerMixin, BaseEstimator):
    """Base class of all attributors: the scikit-learn contract they share.

    - ``__init__`` stores its keyword arguments and nothing else.
    - ``fit(X)`` takes a :class:`~sourcekit.Trajectory` or a bound
      :class:`~sourcekit.AttributionTask`, validates the parameters and computes the
      damping-independent state, cached under (class, trajectory fingerprint, the
      parameters that shape it, the state's format): in this process always, and on
      disk too when the attributor has a ``memory`` parameter set.
    - ``transform(X)`` validates the parameters again, takes
      :class:`~sourcekit.Examples` queries (or a bound task) and returns the
      (n_queries, n_train) score matrix: ``scores[q, m]`` is the first-order effect of
      *including* training example m on the measurement of query q, with the 1/N
      scale included.
    - Fitted attributes end in ``_``; an unfitted attributor raises
      :class:`~sourcekit.exceptions.NotFittedError`.

    Subclasses declare ``_parameter_constraints``, ``_state_parameters`` (the
    constructor parameters the fitted state depends on) and ``_state_type`` (the
    :class:`FittedState` subclass ``_fit_state`` returns, if any), and implement
    ``_check_trajectory``, ``_fit_state`` and ``_scores``; the other hooks
    (``_prepare_fit``, ``_disk_cache``, ``_fresh_each_fit``, ``_torch_dtype``) have
    defaults for an attributor without those settings.

    Attributes
    ----------
    state_ : FittedState or None
        The fitted, damping-independent state (what ``_fit_state`` returned).
    trajectory_ : Trajectory
        The run the attributor was fitted to.
    n_train_ : int
        Number of training examples: the columns of the score matrix.
    fingerprint_ : str
        The trajectory's content fingerprint.

    Examples
    --------
    Every attributor is a ``BaseAttributor``; a new method implements ``_scores`` (and,
    if it has any, ``_fit_state``):

    >>> import torch
    >>> import sourcekit
    >>> from sourcekit import BaseAttributor
    >>> class Zero(BaseAttributor):
    ...     '''Scores every pair 0.'''
    ...     def _scores(self, queries):
    ...         return torch.zeros(len(queries), self.n_train_)
    >>> data = sourcekit.Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    >>> trajectory = sourcekit.train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> Zero().fit(trajectory).transform(data[:3]).shape
    (3, 20)
    >>> isinstance(sourcekit.SourceAttributor(), BaseAttributor)
    True
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {}
    _state_parameters: ClassVar[tuple[str, ...]] = ()
    _state_type: ClassVar[type[FittedState] | None] = None

    # --- hooks for subclasses ----------------------------------------------------------
    def _check_trajectory(self, trajectory: Trajectory) -> None:
        """Raise if ``trajectory`` lacks what the method needs."""

    def _prepare_fit(self) -> None:
        """Settings that depend on the machine, resolved once per fit (after validation,
        before the state): none here."""

    def _disk_cache(self) -> joblib.Memory | None:
        """Where the fitted state is also cached on disk: nowhere here."""
        return None

    def _fresh_each_fit(self) -> bool:
        """Whether every fit must compute its state afresh (no cache): with fresh
        randomness, scikit-learn's ``random_state=None``. Never here."""
        return False

    def _fit_state(self, trajectory: Trajectory) -> Any:
        """The expensive, damping-independent state (cached)."""
        return None

    def _scores(self, queries: Examples) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _torch_dtype(self) -> torch.dtype:
        """The precision of the scores: float32 here (attributors with a ``dtype``
        parameter return what it names)."""
        return torch.float32

    # --- the contract ------------------------------------------------------------------
    def fit(self, X: Trajectory | AttributionTask, y: Any = None) -> BaseAttributor:
        """Fit the attributor to a recorded run.

        Parameters
        ----------
        X : Trajectory or AttributionTask
            The recorded run (a bound task's queries are ignored by ``fit``).
        y : ignored
            Present for scikit-learn compatibility (e.g. LDS targets in a search).

        Returns
        -------
        self
        """
        validate_parameters(self, self._parameter_constraints)
        trajectory = _as_trajectory(X, type(self).__name__)
        self._check_trajectory(trajectory)
        self._prepare_fit()
        key = (
            type(self).__qualname__,
            None if self._state_type is None else self._state_type.format_key(),
            trajectory.fingerprint,
            tuple((name, repr(getattr(self, name))) for name in self._state_parameters),
            ("shard", rank(), world_size()),  # a rank's state holds its shard's data
        )
        memory = self._disk_cache()
        if memory is None:
            compute = lambda: self._fit_state(trajectory)  # noqa: E731
        else:
            on_disk = memory.cache(_compute_state, ignore=["attributor", "trajectory"])
            args = ((__version__, *key), self, trajectory)
            compute = lambda: on_disk(*args)  # noqa: E731
            # Fitting runs collectives: if any rank lacks the state on disk, all fit it.
            if is_distributed() and not all_agree(on_disk.check_call_in_cache(*args)):
                compute = lambda: on_disk.call(*args)[0]  # noqa: E731
        with flushing_denormals():
            if self._fresh_each_fit():
                self.state_ = self._fit_state(trajectory)
            else:
                self.state_ = _STATE_CACHE.get_or_compute(key, compute)
        self.trajectory_ = trajectory
        self.n_train_ = trajectory.n_train
        self.fingerprint_ = trajectory.fingerprint
        return self

    def transform(self, X: Examples | AttributionTask) -> np.ndarray:
        """Score every (query, training example) pair.

        Parameters
        ----------
        X : Examples or AttributionTask
            The queries (an ``AttributionTask`` must be bound to the fitted trajectory).

        Returns
        -------
        scores : ndarray of shape (n_queries, n_train)
            ``scores[q, m]``: first-order effect of including training example m on the
            measurement of query q (positive: m pushed the measurement up).
        """
        self._check_fitted()
        # ``set_params`` may have changed a parameter since fit (``damping`` is read only
        # here): the same checks, so that a bad value never reaches the arithmetic.
        validate_parameters(self, self._parameter_constraints)
        if isinstance(X, AttributionTask) and X.trajectory.fingerprint != self.fingerprint_:
            raise ValueError(
                "The queries are bound to a different trajectory than the one this attributor "
                "was fitted on. Bind them to the fitted trajectory (attributor.trajectory_.bind) "
                "or fit again."
            )
        if isinstance(X, Trajectory):
            raise TypeError(
                f"{type(self).__name__}.transform needs queries, not a Trajectory. Pass "
                "Examples(inputs, targets) or trajectory.bind(queries)."
            )
        queries = self.trajectory_.check_queries(X)
        if len(queries) == 0:
            return np.zeros((0, self.n_train_), dtype=self._numpy_dtype())
        with flushing_denormals():
            scores = self._scores(queries)
        if not torch.isfinite(scores).all():
            raise NonFiniteError(
                f"{type(self).__name__} produced NaN or infinite scores. The trajectory may hold "
                "diverged checkpoints; if the method is damped, increase 'damping'."
            )
        return scores.detach().cpu().numpy().astype(self._numpy_dtype(), copy=False)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Column names ``train0 .. train{n-1}`` (so ``set_output`` works)."""
        self._check_fitted()
        return np.asarray([f"train{i}" for i in range(self.n_train_)], dtype=object)

    # --- helpers -------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "state_"):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call fit(trajectory) "
                "before transform."
            )

    def _numpy_dtype(self) -> type:
        return np.float64 if self._torch_dtype() == torch.float64 else np.float32

    def __sklearn_tags__(self):  # type: ignore[no-untyped-def]
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.non_deterministic = False
        tags.input_tags.two_d_array = False
        return tags


def _compute_state(key: tuple, attributor: BaseAttributor, trajectory: Trajectory) -> Any:
    """The fitted state for ``key``; ``joblib.Memory`` caches it on disk by ``key`` alone."""
    return attributor._fit_state(trajectory)


def as_memory(memory: Any) -> joblib.Memory | None:
    """None, a directory path, or a ``joblib.Memory`` as a ``joblib.Memory`` (or None)."""
    if memory is None or isinstance(memory, joblib.Memory):
        return memory if memory is None or memory.location is not None else None
    return joblib.Memory(location=os.fspath(memory), verbose=0)


MEMORY = InstanceOf((str, os.PathLike, joblib.Memory), "a directory path or a joblib.Memory")


def _as_trajectory(X: Any, who: str) -> Trajectory:
    if isinstance(X, Trajectory):
        return X
    if isinstance(X, AttributionTask):
        return X.trajectory
    raise TypeError(
        f"{who}.fit needs a Trajectory or trajectory.bind(queries); got {type(X).__name__}. "
        "Record the run with TrajectoryRecorder or sourcekit.train, or load it with "
        "Trajectory.load."
    )
