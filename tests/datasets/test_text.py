"""The embedded next-token task: generated text, its model and its recipes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sourcekit
from sourcekit.datasets import NextTokenModel, load_text_task
from sourcekit.objectives import IGNORE_INDEX


def test_the_task_is_deterministic_given_its_seed() -> None:
    first, again = load_text_task(n_train=20, n_test=5), load_text_task(n_train=20, n_test=5)
    other = load_text_task(n_train=20, n_test=5, random_state=1)
    assert first.train.fingerprint() == again.train.fingerprint()
    assert first.train.fingerprint() != other.train.fingerprint()


def test_targets_are_the_next_tokens_and_padding_is_ignored() -> None:
    task = load_text_task(n_train=50, n_test=5, length=10, vocabulary=7)
    x, y = task.train.inputs, task.train.targets
    assert x.shape == y.shape == (50, 10)
    counted = y != IGNORE_INDEX
    # Where a target is counted, it is the token at the next position.
    assert torch.equal(y[:, :-1][counted[:, :-1]], x[:, 1:][counted[:, :-1]])
    assert not counted[:, -1].any()  # the last position never has a next token
    lengths = counted.sum(dim=1) + 1  # a sequence of k tokens has k - 1 targets
    assert int(lengths.min()) >= 5 and int(lengths.max()) <= 10
    assert int(x.max()) < 7 and int(x.min()) >= 0


def test_the_source_allows_three_next_symbols_per_context() -> None:
    task = load_text_task(n_train=400, n_test=1, vocabulary=5)
    x, y = task.train.inputs.numpy(), task.train.targets.numpy()
    seen: dict[tuple[int, int], set[int]] = {}
    for row_x, row_y in zip(x, y, strict=True):
        for t in range(1, len(row_x)):
            if row_y[t] != IGNORE_INDEX:
                seen.setdefault((row_x[t - 1], row_x[t]), set()).add(int(row_y[t]))
    assert max(len(v) for v in seen.values()) == 3


def test_the_model_reads_the_current_and_the_previous_token_only() -> None:
    torch.manual_seed(0)
    model = NextTokenModel(vocabulary=6).double()
    tokens = torch.randint(0, 6, (1, 8))
    changed = tokens.clone()
    changed[0, 4] = (changed[0, 4] + 1) % 6
    moved = (model(tokens) - model(changed)).abs().sum(dim=-1)[0]
    assert torch.equal(moved != 0, torch.tensor([0, 0, 0, 0, 1, 1, 0, 0], dtype=torch.bool))


@pytest.mark.parametrize(("recipe", "steps"), [("standard", 240), ("early", 60)])
def test_recipes_record_a_sequence_run(recipe: str, steps: int) -> None:
    task = load_text_task()
    stages = task.stages(recipe)
    assert len(stages) == 1 and stages[0].optimizer.momentum == 0.9
    if recipe == "early":
        trajectory = task.record(recipe, progress=False)
        assert trajectory.n_steps == steps
        assert trajectory.loss_spec == trajectory.measurement_spec == "cross_entropy"
        model = trajectory.build_model()
        with torch.no_grad():
            before = sourcekit.objectives.cross_entropy(
                trajectory.build_model(0)(task.train.inputs), task.train.targets
            )
            after = sourcekit.objectives.cross_entropy(
                model(task.train.inputs), task.train.targets
            )
        assert float(after.mean()) < float(before.mean())


def test_bad_settings_are_refused_with_the_parameter_named() -> None:
    with pytest.raises(ValueError, match="'length'"):
        load_text_task(length=2)
    with pytest.raises(ValueError, match="'recipe'"):
        load_text_task(n_train=4, n_test=1).stages("two_stage")


def test_attribution_runs_on_the_task() -> None:
    task = load_text_task(n_train=24, n_test=3, length=6)
    trajectory = sourcekit.train(
        task.architecture,
        task.train,
        [sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=1, batch_size=8)],
        loss=task.loss,
        measurement=task.measurement,
        architecture_kwargs=task.architecture_kwargs,
        progress=False,
    )
    scores = sourcekit.SourceAttributor(n_segments=1).fit(trajectory).transform(task.test)
    assert scores.shape == (3, 24) and np.isfinite(scores).all()
