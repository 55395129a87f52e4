"""``Examples``: the container for training and query examples.

scikit-learn treats the queries as the samples axis, so this container follows the
conventions its indexing relies on: ``len()``, ``shape == (n,)`` and indexing that
returns another ``Examples`` (for integers, slices, integer or boolean arrays, and the
``(key, Ellipsis)`` tuples that ``sklearn.utils._safe_indexing`` passes). It has no
``__array__``, so scikit-learn never converts it to a list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["Examples", "as_tensor", "check_training_set"]


def as_tensor(value: Any, name: str) -> torch.Tensor:
    """Convert an array-like to a tensor without copying when possible."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(
                f"The {name!r} array has dtype object; pass a numeric array "
                "(e.g. np.asarray(values, dtype=np.float32))."
            )
        return torch.from_numpy(np.ascontiguousarray(value))
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"The {name!r} argument must be a tensor or an array-like of numbers; "
            f"got {type(value).__name__}. Convert it with torch.as_tensor(...) first."
        ) from err


def _check_finite(tensor: torch.Tensor, part: str) -> None:
    """Refuse NaN or infinity, naming the first example that holds one."""
    if not tensor.is_floating_point() and not tensor.is_complex():
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    rows = (~finite).reshape(tensor.shape[0], -1).any(dim=1)
    index = int(torch.nonzero(rows)[0, 0])
    value = tensor[index].reshape(-1)[~finite[index].reshape(-1)][0]
    raise ValueError(
        f"The {part} of example {index} hold {float(value)!r} ({int(rows.sum())} example(s) hold "
        "NaN or infinity). Training on them, or measuring them, would give NaN scores that are "
        "blamed on the model; remove or repair those examples first."
    )


def _normalise_key(key: Any, n: int) -> Any:
    if isinstance(key, tuple):
        # scikit-learn indexes arrays as ``X[key, ...]``.
        if len(key) == 2 and key[1] is Ellipsis:
            key = key[0]
        else:
            raise IndexError(
                f"Examples are indexed along the examples axis only; got the tuple {key!r}. "
                "Index with an int, a slice, or an array of indices or booleans."
            )
    if isinstance(key, (int, np.integer)):
        index = int(key)
        if not -n <= index < n:
            raise IndexError(f"Example index {index} is out of range for {n} examples.")
        return slice(index % n, index % n + 1)
    if isinstance(key, slice):
        if key.step is not None and key.step < 0:
            # torch tensors do not take negative slice steps; index with positions.
            return torch.arange(*key.indices(n), dtype=torch.long)
        return key
    if isinstance(key, torch.Tensor):
        key = key.cpu().numpy()
    array = np.asarray(key)
    if array.dtype == bool:
        if array.shape != (n,):
            raise IndexError(f"A boolean mask must have shape ({n},); got {array.shape}.")
        return torch.from_numpy(np.flatnonzero(array))
    if array.size == 0:
        return torch.zeros(0, dtype=torch.long)
    if not np.issubdtype(array.dtype, np.integer) or array.ndim != 1:
        raise IndexError(
            "Examples can be indexed with an int, a slice, or a 1-d array of ints or "
            f"booleans; got an array of dtype {array.dtype} and shape {array.shape}."
        )
    if array.min() < -n or array.max() >= n:
        raise IndexError(
            f"Example indices must lie in [{-n}, {n}); got values from {array.min()} to {array.max()}."
        )
    return torch.from_numpy(np.where(array < 0, array + n, array).astype(np.int64))


class Examples:
    """Inputs and targets of a set of examples, indexable along the first axis.

    Parameters
    ----------
    inputs : tensor or array-like, shape (n, ...)
        What the model is called with: ``model(inputs)``.
    targets : tensor or array-like, shape (n, ...)
        What the loss and the measurement compare the model's outputs with.

    Raises
    ------
    ValueError
        If the inputs or targets hold NaN or infinity (the error names the first such
        example), or their numbers of examples differ.

    Attributes
    ----------
    shape : tuple of int
        ``(n,)``: one sample per example, as scikit-learn expects.

    Examples
    --------
    >>> import torch
    >>> from sourcekit import Examples
    >>> ex = Examples(torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))
    >>> ex.shape, len(ex[1:3]), type(ex[[0, 4]]).__name__
    ((5,), 2, 'Examples')
    """

    def __init__(self, inputs: Any, targets: Any) -> None:
        inputs = as_tensor(inputs, "inputs")
        targets = as_tensor(targets, "targets")
        if inputs.ndim == 0 or targets.ndim == 0:
            raise ValueError(
                "Examples need inputs and targets with a leading examples axis; got shapes "
                f"{tuple(inputs.shape)} and {tuple(targets.shape)}. Add the axis with x[None]."
            )
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"Examples need as many targets as inputs; got {inputs.shape[0]} inputs and "
                f"{targets.shape[0]} targets. Pass matching arrays."
            )
        for part, tensor in (("inputs", inputs), ("targets", targets)):
            _check_finite(tensor, part)
        self.inputs = inputs
        self.targets = targets

    @classmethod
    def _of_checked(cls, inputs: torch.Tensor, targets: torch.Tensor) -> Examples:
        """Examples of tensors taken from checked ones (a slice, a copy): no new checks."""
        out = cls.__new__(cls)
        out.inputs = inputs
        out.targets = targets
        return out

    # --- the sample axis -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int]:
        return (int(self.inputs.shape[0]),)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, key: Any) -> Examples:
        key = _normalise_key(key, len(self))
        return Examples._of_checked(self.inputs[key], self.targets[key])

    # --- conveniences ----------------------------------------------------------------
    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Examples:
        """Return a copy on ``device``; ``dtype`` applies to floating-point tensors only."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return Examples._of_checked(move(self.inputs), move(self.targets))

    @classmethod
    def concat(cls, parts: Sequence[Examples]) -> Examples:
        """Concatenate several ``Examples`` along the examples axis."""
        if not parts:
            raise ValueError("Examples.concat needs at least one Examples object.")
        return cls(torch.cat([p.inputs for p in parts]), torch.cat([p.targets for p in parts]))

    def fingerprint(self) -> str:
        """A sha256 of the inputs and targets (values, shapes and dtypes)."""
        digest = hashlib.sha256()
        for tensor in (self.inputs, self.targets):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()

    def __repr__(self) -> str:
        def describe(t: torch.Tensor) -> str:
            dtype = str(t.dtype).replace("torch.", "")
            return f"{dtype}{list(t.shape[1:])}"

        return (
            f"Examples(n={len(self)}, inputs={describe(self.inputs)}, "
            f"targets={describe(self.targets)})"
        )


def check_training_set(train: Any) -> Examples:
    """Return ``train`` if it is a non-empty ``Examples``, else raise a clear error."""
    from ..exceptions import TrajectoryError

    if not isinstance(train, Examples):
        raise TypeError(
            f"The 'train' argument must be an Examples object; got {type(train).__name__}. "
            "Wrap arrays as Examples(inputs, targets)."
        )
    if len(train) == 0:
        raise TrajectoryError(
            "The training set is empty (0 examples). Pass the examples the model trains on: "
            "the full training set as train=Examples(inputs, targets)."
        )
    return train
