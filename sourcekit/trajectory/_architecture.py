"""The model architecture of a recorded run: how to build a fresh module.

A saved trajectory must be able to rebuild its model without unpickling code, so the
architecture is named by an importable factory, ``"package.module:make_model"``, with
JSON keyword arguments. In memory, a factory callable or a module used as a template
(deep-copied, never modified) work as well.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._imports import import_object, importable_name
from ..exceptions import TrajectoryError

__all__ = ["Architecture"]


def _import(spec: str) -> Any:
    try:
        return import_object(spec)
    except LookupError as err:
        raise TrajectoryError(
            f"The architecture factory {spec!r} cannot be imported ({err}). Name an importable "
            "callable that returns the model ('package.module:factory'), install or put on "
            "sys.path the module that defines it, or pass architecture=... to Trajectory.load."
        ) from err


class Architecture:
    """Builds fresh copies of a model.

    Parameters
    ----------
    source : str, callable or nn.Module
        ``"module:factory"`` (saved by name), a factory callable returning an
        ``nn.Module``, or a module used as a template (deep-copied at each build).
    kwargs : dict, optional
        Keyword arguments for the factory; must be JSON-serialisable to be saved.

    Examples
    --------
    >>> from sourcekit.trajectory import Architecture
    >>> architecture = Architecture("sourcekit.datasets:make_digits_mlp", {"hidden": [16]})
    >>> architecture.build()
    Sequential(
      (0): Linear(in_features=64, out_features=16, bias=True)
      (1): ReLU()
      (2): Linear(in_features=16, out_features=10, bias=True)
    )
    >>> architecture.spec()  # what a saved manifest records
    {'factory': 'sourcekit.datasets:make_digits_mlp', 'kwargs': {'hidden': [16]}}

    A factory without an importable name works in memory but cannot be saved:

    >>> import torch
    >>> Architecture(lambda: torch.nn.Linear(3, 2)).spec() is None
    True
    """

    def __init__(
        self, source: str | Callable[..., nn.Module] | nn.Module, kwargs: dict | None = None
    ) -> None:
        if isinstance(source, Architecture):
            source, kwargs = source.source, source.kwargs
        if not isinstance(source, (str, nn.Module)) and not callable(source):
            raise TypeError(
                "The 'architecture' must be a 'module:factory' string, a callable returning an "
                f"nn.Module, or an nn.Module; got {type(source).__name__}."
            )
        if isinstance(source, nn.Module):
            source = copy.deepcopy(source)
        self.source = source
        self.kwargs = dict(kwargs or {})

    def build(self) -> nn.Module:
        """A new module with the architecture (its initial weights are irrelevant).

        Building draws the factory's initial weights from torch's random state but leaves
        the caller's global random state as it was.
        """
        if isinstance(self.source, nn.Module):
            return copy.deepcopy(self.source)
        factory = _import(self.source) if isinstance(self.source, str) else self.source
        with torch.random.fork_rng(devices=[]):
            model = factory(**self.kwargs)
        if not isinstance(model, nn.Module):
            raise TrajectoryError(
                f"The architecture factory {self.describe()} returned a {type(model).__name__}, "
                "not an nn.Module. Make it return the model."
            )
        return model

    def spec(self) -> dict[str, Any] | None:
        """A JSON description for a manifest, or None if the architecture has no import name."""
        if isinstance(self.source, str):
            name: str | None = self.source
        elif isinstance(self.source, nn.Module):
            name = None
        else:
            name = importable_name(self.source)
        if name is None:
            return None
        try:
            json.dumps(self.kwargs)
        except TypeError:
            return None
        return {"factory": name, "kwargs": self.kwargs}

    def describe(self) -> str:
        if isinstance(self.source, str):
            return repr(self.source)
        if isinstance(self.source, nn.Module):
            return f"a {type(self.source).__name__} template"
        return getattr(self.source, "__qualname__", repr(self.source))

    def __repr__(self) -> str:
        return f"Architecture({self.describe()})"

    def __getstate__(self) -> dict[str, Any]:
        return {"source": self.source, "kwargs": self.kwargs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.source = state["source"]
        self.kwargs = state["kwargs"]


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the parameters and buffers of ``model``."""
    out = {name: tuple(p.shape) for name, p in model.named_parameters()}
    out.update({name: tuple(b.shape) for name, b in model.named_buffers()})
    return out


def shape_summary(shapes: dict[str, tuple[int, ...]]) -> str:
    """The first few ``name[shape]`` entries of ``shapes``, for error messages."""
    items = sorted(shapes.items())
    text = ", ".join(f"{k}{list(v)}" for k, v in items[:4])
    return "{" + text + (", ..." if len(items) > 4 else "") + "}"


def check_fits(
    params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], model: nn.Module, where: str
) -> None:
    """Raise a ``TrajectoryError`` unless the tensors match the model's parameters and buffers."""
    expected = state_shapes(model)
    given = {name: tuple(t.shape) for name, t in {**params, **buffers}.items()}
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    wrong = sorted(n for n in set(expected) & set(given) if expected[n] != given[n])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if extra:
            parts.append(f"unexpected {extra[:5]}")
        if wrong:
            parts.append(
                "wrong shapes " + ", ".join(f"{n}: {given[n]} vs {expected[n]}" for n in wrong[:5])
            )
        raise TrajectoryError(
            f"The checkpoint {where} does not fit the architecture ({'; '.join(parts)}). "
            "Check that the trajectory was recorded with this model, or pass the right "
            "architecture=... to Trajectory.load."
        )


def load_state(
    model: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]
) -> nn.Module:
    """Copy a checkpoint's tensors into ``model`` (a fresh module of the architecture).

    A checkpoint holds what ``named_parameters()`` and ``named_buffers()`` list: a tensor
    used under several names (tied weights: GPT-2's ``lm_head.weight`` is its
    ``transformer.wte.weight``) once, under its first name, and non-persistent buffers as
    well. The tensors are copied by those names, so the ties of the fresh module stay as
    they are: writing the shared tensor once sets every use. Returns ``model``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sourcekit.trajectory._architecture import load_state
    >>> model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    >>> model[1].weight = model[0].weight  # tied: listed once, as '0.weight'
    >>> [name for name, _ in model.named_parameters()]
    ['0.weight']
    >>> model = load_state(model, {"0.weight": torch.ones(5, 3)}, {})
    >>> float(model[1].weight.sum())
    15.0
    """
    check_fits(params, buffers, model, "being loaded")
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            tensor.copy_(params[name] if name in params else buffers[name])
    return model
