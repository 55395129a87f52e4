"""Model inputs of every kind: one tensor, a dict of tensors, or a tuple of tensors.

A model is called with what an :class:`~sourcekit.Examples` holds as its inputs:

- a tensor ``x`` of shape (n, ...): ``model(x)``;
- a dict of tensors, each with the same leading examples axis (``input_ids`` with
  ``attention_mask``): ``model(**inputs)``, as Hugging Face models are called;
- a tuple of tensors (several positional inputs): ``model(*inputs)``.

The functions here are the one place that knows the three kinds: the container indexes,
moves, concatenates and fingerprints its inputs through them, and every pass that calls
the model (gradients, curvature, replay, training, retraining, representations) calls
:func:`call_model` or :func:`functional_forward`. What the model returns may be a tensor
or a Hugging Face ``ModelOutput`` (any mapping with ``"logits"``):
:func:`outputs_tensor` takes the logits, so that losses and measurements see a tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

__all__ = [
    "ModelInputs",
    "as_inputs",
    "call_model",
    "concat_inputs",
    "describe_inputs",
    "first_tensor",
    "functional_forward",
    "input_leaves",
    "map_inputs",
    "n_rows",
    "outputs_tensor",
    "take_rows",
]

ModelInputs = torch.Tensor | dict[str, torch.Tensor] | tuple[torch.Tensor, ...]
"""What a model is called with: a tensor, a dict of tensors or a tuple of tensors."""


def _as_tensor(value: Any, name: str) -> torch.Tensor:
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


def as_inputs(value: Any, name: str = "inputs") -> ModelInputs:
    """``value`` as model inputs: a tensor, a dict of tensors or a tuple of tensors.

    Arrays become tensors without a copy where possible. Every tensor must have a
    leading examples axis, the same length for all of them.

    Examples
    --------
    >>> import torch
    >>> from sourcekit.trajectory._inputs import as_inputs, n_rows
    >>> inputs = as_inputs({"input_ids": [[1, 2], [3, 4]], "attention_mask": [[1, 1], [1, 0]]})
    >>> sorted(inputs), n_rows(inputs)
    (['attention_mask', 'input_ids'], 2)
    >>> as_inputs({"input_ids": torch.zeros(2, 3), "mask": torch.zeros(3, 3)})
    Traceback (most recent call last):
    ...
    ValueError: The inputs['mask'] have 3 examples but inputs['input_ids'] have 2; every input tensor needs the same leading examples axis.
    """
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"The {name} are an empty dict; give at least one tensor.")
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(
                f"The {name} dict has keys {bad[:3]} that are not strings; the model is called "
                "as model(**inputs), so name every input by its keyword."
            )
        out: ModelInputs = {k: _as_tensor(v, f"{name}[{k!r}]") for k, v in value.items()}
    elif isinstance(value, tuple):
        if not value:
            raise ValueError(f"The {name} are an empty tuple; give at least one tensor.")
        out = tuple(_as_tensor(v, f"{name}[{i}]") for i, v in enumerate(value))
    else:
        out = _as_tensor(value, name)
    leaves = input_leaves(out, name)
    first_label, first = leaves[0]
    for label, tensor in leaves:
        if tensor.ndim == 0:
            raise ValueError(
                f"The {label} are a scalar; every input needs a leading examples axis. Add it "
                "with x[None]."
            )
        if tensor.shape[0] != first.shape[0]:
            raise ValueError(
                f"The {label} have {tensor.shape[0]} examples but {first_label} have "
                f"{first.shape[0]}; every input tensor needs the same leading examples axis."
            )
    return out


def input_leaves(inputs: ModelInputs, name: str = "inputs") -> list[tuple[str, torch.Tensor]]:
    """Every tensor of ``inputs`` with a label for messages (``inputs['input_ids']``)."""
    if isinstance(inputs, dict):
        return [(f"{name}[{k!r}]", t) for k, t in inputs.items()]
    if isinstance(inputs, tuple):
        return [(f"{name}[{i}]", t) for i, t in enumerate(inputs)]
    return [(name, inputs)]


def map_inputs(fn: Callable[[torch.Tensor], torch.Tensor], inputs: ModelInputs) -> ModelInputs:
    """``fn`` applied to every tensor of ``inputs``, keeping its kind and keys."""
    if isinstance(inputs, dict):
        return {k: fn(t) for k, t in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(fn(t) for t in inputs)
    return fn(inputs)


def take_rows(inputs: ModelInputs, rows: torch.Tensor) -> ModelInputs:
    """The examples ``rows`` (an index tensor) of every tensor of ``inputs``."""
    return map_inputs(lambda t: t[rows], inputs)


def n_rows(inputs: ModelInputs) -> int:
    """The number of examples: the length of the leading axis."""
    return int(input_leaves(inputs)[0][1].shape[0])


def first_tensor(inputs: ModelInputs) -> torch.Tensor:
    """The first tensor of ``inputs`` (its device is the inputs' device)."""
    return input_leaves(inputs)[0][1]


def concat_inputs(parts: list[ModelInputs]) -> ModelInputs:
    """Inputs of the same kind and keys concatenated along the examples axis."""
    first = parts[0]
    if isinstance(first, dict):
        keys = list(first)
        if any(not isinstance(p, dict) or list(p) != keys for p in parts):
            raise ValueError(
                "Examples.concat needs inputs of the same kind; the parts hold dicts with "
                "different keys, or dicts and other kinds."
            )
        return {k: torch.cat([p[k] for p in parts]) for k in keys}  # type: ignore[index,call-overload]
    if isinstance(first, tuple):
        if any(not isinstance(p, tuple) or len(p) != len(first) for p in parts):
            raise ValueError(
                "Examples.concat needs inputs of the same kind; the parts hold tuples of "
                "different lengths, or tuples and other kinds."
            )
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(first)))  # type: ignore[index]
    if any(not isinstance(p, torch.Tensor) for p in parts):
        raise ValueError(
            "Examples.concat needs inputs of the same kind; the parts hold tensors and dicts "
            "or tuples."
        )
    return torch.cat(parts)  # type: ignore[arg-type]


def describe_inputs(inputs: ModelInputs) -> str:
    """A short description of the kind, keys, per-example shapes and dtypes."""

    def one(t: torch.Tensor) -> str:
        return f"{str(t.dtype).replace('torch.', '')}{list(t.shape[1:])}"

    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k!r}: {one(t)}" for k, t in inputs.items()) + "}"
    if isinstance(inputs, tuple):
        return "(" + ", ".join(one(t) for t in inputs) + ")"
    return one(inputs)


def _arguments(inputs: ModelInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, tuple):
        return tuple(inputs), {}
    return (inputs,), {}


def outputs_tensor(result: Any) -> torch.Tensor:
    """The output tensor of a model's result: itself, or the ``logits`` of a ModelOutput.

    Hugging Face models return a ``ModelOutput`` (a mapping) whose ``logits`` are what a
    loss compares with the targets; any mapping with ``"logits"`` is read the same way.

    Examples
    --------
    >>> import torch
    >>> from sourcekit.trajectory._inputs import outputs_tensor
    >>> outputs_tensor({"logits": torch.ones(2, 3), "hidden": None}).shape
    torch.Size([2, 3])
    """
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, Mapping) and isinstance(result.get("logits"), torch.Tensor):
        return result["logits"]
    logits = getattr(result, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"The model returned a {type(result).__name__}; sourcekit needs its outputs as a tensor, "
        "or as a mapping or ModelOutput with 'logits' (as Hugging Face models return). Make "
        "forward return the outputs tensor (for tuples: the tensor the loss compares with the "
        "targets)."
    )


def call_model(model: nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """The model's outputs: ``model(x)``, ``model(**inputs)`` or ``model(*inputs)``."""
    args, kwargs = _arguments(inputs)
    return outputs_tensor(model(*args, **kwargs))


def functional_forward(
    model: nn.Module, tensors: dict[str, torch.Tensor], inputs: ModelInputs
) -> torch.Tensor:
    """:func:`call_model` with the parameters and buffers ``tensors`` in place of the model's.

    Tied parameters (one tensor under several names, such as an embedding table reused
    as the output layer) are given under one name and stay tied.
    """
    args, kwargs = _arguments(inputs)
    return outputs_tensor(functional_call(model, tensors, args, kwargs))
