"""One query per token: the rows a causal LM's query expands into, and their scores,
whose mean over a query's tokens is the query's own score (the measurement is the mean
over its counted tokens, and the scores are linear in the measurement's gradient)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sourcekit
from sourcekit import Examples, OptimizerSpec, TrainingStage
from sourcekit.objectives import IGNORE_INDEX
from sourcekit.trajectory import token_queries

from ..curvature.test_positions import causal_lm


def _sequences(n: int, seed: int) -> Examples:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 6, (n, 5), generator=g)
    labels = tokens.clone()
    labels[::2, 3:] = IGNORE_INDEX  # padding
    labels[1::3, :2] = IGNORE_INDEX  # a prompt
    return Examples(tokens, labels)


def test_token_queries_keep_one_counted_target_each() -> None:
    queries = _sequences(4, 1)
    tokens, positions = token_queries(queries)
    counted = (queries.targets != IGNORE_INDEX) & (torch.arange(5) >= 1)
    assert len(tokens) == int(counted.sum()) == len(positions)
    for row, (q, t) in enumerate(positions.tolist()):
        assert torch.equal(tokens.inputs[row], queries.inputs[q])
        assert tokens.targets[row, t] == queries.targets[q, t] != IGNORE_INDEX
        assert int((tokens.targets[row] != IGNORE_INDEX).sum()) == 1
    unshifted, where = token_queries(queries, shifted=False)
    assert len(unshifted) == int((queries.targets != IGNORE_INDEX).sum())
    assert (where[:, 1] == 0).any()
    with pytest.raises(ValueError, match=r"integer targets of shape \(n, T\)"):
        token_queries(Examples(torch.zeros(3, 2), torch.zeros(3)))


def test_a_querys_score_is_the_mean_of_its_tokens_scores() -> None:
    train = _sequences(12, 0)
    stage = TrainingStage(OptimizerSpec("sgd", lr=0.5), epochs=2, batch_size=4, n_checkpoints=2)
    trajectory = sourcekit.train(
        causal_lm,
        train,
        [stage],
        loss="next_token_cross_entropy",
        measurement="next_token_margin",
        progress=False,
    )
    attributor = sourcekit.SourceAttributor(n_segments=1, device="cpu").fit(trajectory)
    queries = _sequences(3, 5)
    whole = attributor.transform(queries)
    tokens, positions = token_queries(queries)
    per_token = attributor.transform(tokens)
    for q in range(3):
        mean = per_token[positions[:, 0] == q].mean(axis=0)
        # float32 sums of a few hundred products: rounding well below 1e-4 of the largest score
        np.testing.assert_allclose(mean, whole[q], rtol=0, atol=1e-4 * np.abs(whole).max())
    assert not np.allclose(per_token[0], per_token[1])  # the tokens differ
