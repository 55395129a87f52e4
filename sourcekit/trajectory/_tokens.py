"""One query per token: attribution of each predicted token of a sequence on its own.

A causal LM's measurement (:func:`~sourcekit.objectives.next_token_margin`, or the
next-token cross-entropy) averages over the tokens a query counts. Attributing each token
separately asks which training sequences made *that* token likely. :func:`token_queries`
expands each query into one query per counted token (the targets of the others set to
``IGNORE_INDEX``), so every attributor scores tokens with no change: a row of scores per
token. Because the measurement is the mean over the counted tokens and the scores are
linear in the query's measurement gradient, a query's score is the mean of its tokens'
scores.

It costs one query gradient per token: cheap for prompts and completions of tens of
tokens, where the training gradients (computed once per fit) dominate.
"""

from __future__ import annotations

import numpy as np
import torch

from ..objectives import IGNORE_INDEX
from ._examples import Examples
from ._inputs import map_inputs

__all__ = ["token_queries"]


def token_queries(queries: Examples, *, shifted: bool = True) -> tuple[Examples, np.ndarray]:
    """Queries of one counted token each, and which query and position each one is.

    Parameters
    ----------
    queries : Examples
        Sequences with targets of shape (n, T) (tokens, ``IGNORE_INDEX`` where a position
        does not count: padding, the prompt).
    shifted : bool, default=True
        The measurement predicts token t from position t-1
        (:func:`~sourcekit.objectives.next_token_margin`,
        ``"next_token_cross_entropy"``): the first token of a sequence is never a target.
        False for measurements that score each position against its own target.

    Returns
    -------
    tokens : Examples
        One query per counted target token, in order of queries then positions: the
        query's inputs, its targets with every other position set to ``IGNORE_INDEX``.
    positions : ndarray of int64, shape (len(tokens), 2)
        The query and the position of each token's target.

    Examples
    --------
    >>> import torch
    >>> from sourcekit import Examples
    >>> from sourcekit.trajectory import token_queries
    >>> tokens = torch.tensor([[3, 1, 4, -100], [1, 5, 9, 2]])
    >>> per_token, positions = token_queries(Examples(tokens.clamp_min(0), tokens))
    >>> positions.tolist()
    [[0, 1], [0, 2], [1, 1], [1, 2], [1, 3]]
    >>> per_token.targets[1].tolist()
    [-100, -100, 4, -100]
    """
    if not isinstance(queries, Examples):
        raise TypeError(
            f"token_queries needs an Examples object; got {type(queries).__name__}. Wrap the "
            "sequences as Examples(inputs, targets)."
        )
    targets = queries.targets
    if targets.ndim != 2 or targets.is_floating_point():
        raise ValueError(
            "token_queries needs integer targets of shape (n, T), one token per position; got "
            f"{str(targets.dtype).replace('torch.', '')} targets of shape {tuple(targets.shape)}."
        )
    counted = targets != IGNORE_INDEX
    if shifted:
        counted[:, 0] = False
    where = torch.nonzero(counted).cpu()
    rows = where[:, 0].to(targets.device)
    keep = torch.full((len(where), targets.shape[1]), IGNORE_INDEX, dtype=targets.dtype)
    keep = keep.to(targets.device)
    column = where[:, 1].to(targets.device)
    keep[torch.arange(len(where), device=targets.device), column] = targets[rows, column]
    inputs = map_inputs(lambda t: t[rows], queries.inputs)
    return Examples._of_checked(inputs, keep), where.numpy().astype(np.int64)
