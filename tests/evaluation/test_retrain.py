"""Retraining ground truth: exactness, seeds, parallelism, the cache and resuming."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import sourcekit
from sourcekit.evaluation import _recipe, make_subset_masks, retrain_measurements, retrain_model

from .. import _cases


def _measure(
    trajectory: sourcekit.Trajectory, model: torch.nn.Module, queries: sourcekit.Examples
) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return trajectory.measurement(model(queries.inputs), queries.targets).double().numpy()


@pytest.fixture
def count_trainings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls of sourcekit.train made by recipe replays (in this process)."""
    calls: list[int] = []
    original = _recipe.train

    def counted(*args: Any, **kwargs: Any) -> sourcekit.Trajectory:
        calls.append(kwargs["random_state"])
        return original(*args, **kwargs)

    monkeypatch.setattr(_recipe, "train", counted)
    return calls


def test_one_seed_matches_a_direct_call_of_train() -> None:
    trajectory = _cases.trajectory("linear_gd")
    queries = _cases.queries("linear_gd")
    masks = make_subset_masks(trajectory.n_train, n_subsets=3, random_state=1)
    result = retrain_measurements(trajectory, queries, masks, seeds=(5,), progress=False)
    recipe = _cases.CASES["linear_gd"].stages()
    for j, keep in enumerate(masks):
        direct = sourcekit.train(
            _cases.make_linear,
            trajectory.train,
            [replace(recipe[0], examples=np.flatnonzero(keep))],
            loss="squared_error",
            random_state=5,
            progress=False,
        )
        expected = _measure(trajectory, direct.build_model(), queries)
        np.testing.assert_array_equal(result.outputs[:, j], expected)
    again = retrain_measurements(trajectory, queries, masks, seeds=5, progress=False)
    np.testing.assert_array_equal(again.outputs, result.outputs)


def test_outputs_average_the_seeds() -> None:
    trajectory = _cases.trajectory("mlp_momentum")
    masks = make_subset_masks(12, n_subsets=3)
    result = retrain_measurements(
        trajectory, _cases.queries("mlp_momentum"), masks, seeds=(0, 1), progress=False
    )
    assert result.per_seed.shape == (2, 4, 3) and result.seeds == (0, 1)
    np.testing.assert_allclose(result.outputs, result.per_seed.mean(axis=0))
    assert not np.allclose(result.per_seed[0], result.per_seed[1])  # other initial weights
    single = retrain_measurements(
        trajectory, _cases.queries("mlp_momentum"), masks, seeds=1, progress=False
    )
    np.testing.assert_array_equal(single.outputs, result.per_seed[1])


def test_the_full_set_with_the_recorded_seed_gives_the_recorded_measurements() -> None:
    trajectory = _cases.trajectory("mlp_two_stage")
    queries = _cases.queries("mlp_two_stage")
    result = retrain_measurements(
        trajectory, queries, np.ones((1, 12), bool), seeds=0, progress=False
    )
    np.testing.assert_array_equal(
        result.outputs[:, 0], _measure(trajectory, trajectory.build_model(), queries)
    )


def test_parallel_workers_give_identical_results() -> None:
    trajectory = _cases.trajectory("mlp_adam")
    queries = _cases.queries("mlp_adam")
    masks = make_subset_masks(12, n_subsets=4)
    one = retrain_measurements(trajectory, queries, masks, seeds=(0, 1), n_jobs=1, progress=False)
    two = retrain_measurements(trajectory, queries, masks, seeds=(0, 1), n_jobs=2, progress=False)
    np.testing.assert_array_equal(one.per_seed, two.per_seed)


def test_bound_queries_are_accepted() -> None:
    trajectory = _cases.trajectory("mlp_sgd")
    queries = _cases.queries("mlp_sgd")
    masks = make_subset_masks(12, n_subsets=2)
    bound = retrain_measurements(
        trajectory, trajectory.bind(queries), masks, seeds=0, progress=False
    )
    plain = retrain_measurements(trajectory, queries, masks, seeds=0, progress=False)
    np.testing.assert_array_equal(bound.outputs, plain.outputs)


def test_identical_subsets_are_trained_once(count_trainings: list[int]) -> None:
    masks = make_subset_masks(12, n_subsets=2)
    masks = masks[[0, 1, 0]]
    result = retrain_measurements(
        _cases.trajectory("mlp_sgd"),
        _cases.queries("mlp_sgd"),
        masks,
        seeds=(0, 1),
        progress=False,
    )
    assert len(count_trainings) == 4
    np.testing.assert_array_equal(result.outputs[:, 0], result.outputs[:, 2])


def test_the_cache_is_reused_and_extended(tmp_path: Path, count_trainings: list[int]) -> None:
    trajectory = _cases.trajectory("mlp_sgd")
    queries = _cases.queries("mlp_sgd")
    masks = make_subset_masks(12, n_subsets=3)
    first = retrain_measurements(
        trajectory, queries, masks, seeds=(0, 1), cache_dir=tmp_path, progress=False
    )
    assert len(count_trainings) == 6
    assert len(list(tmp_path.glob("*.npz"))) == 6
    again = retrain_measurements(
        trajectory, queries, masks, seeds=(0, 1), cache_dir=tmp_path, progress=False
    )
    assert len(count_trainings) == 6
    np.testing.assert_array_equal(again.per_seed, first.per_seed)
    # A new seed and a new subset train only what is new.
    more = np.concatenate([masks, make_subset_masks(12, n_subsets=1, random_state=9)])
    extended = retrain_measurements(
        trajectory, queries, more, seeds=(0, 1, 2), cache_dir=tmp_path, progress=False
    )
    assert len(count_trainings) == 6 + 6
    np.testing.assert_array_equal(extended.per_seed[:2, :, :3], first.per_seed)
    # Other queries are other results.
    retrain_measurements(
        trajectory, queries[:2], masks[:1], seeds=0, cache_dir=tmp_path, progress=False
    )
    assert len(count_trainings) == 13
    # Another run (another fingerprint) never reads these files.
    retrain_measurements(
        _cases.trajectory("mlp_momentum"),
        queries,
        masks[:1],
        seeds=0,
        cache_dir=tmp_path,
        progress=False,
    )
    assert len(count_trainings) == 14


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    trajectory = _cases.trajectory("mlp_sgd")
    queries = _cases.queries("mlp_sgd")
    masks = make_subset_masks(12, n_subsets=5)
    replay = _recipe.RecipeReplay.from_trajectory(trajectory)
    calls: list[int] = []
    budget = [3]  # trainings before the "interruption"

    def training(keep: np.ndarray, seed: int) -> torch.nn.Module:
        if budget[0] == 0:
            raise KeyboardInterrupt
        budget[0] -= 1
        calls.append(seed)
        return replay(keep, seed)

    def run() -> sourcekit.evaluation.RetrainingResult:
        return retrain_measurements(
            trajectory,
            queries,
            masks,
            seeds=0,
            cache_dir=tmp_path,
            progress=False,
            retrain=training,
        )

    with pytest.raises(KeyboardInterrupt):
        run()
    assert len(calls) == 3
    assert len(list(tmp_path.glob("*.npz"))) == 3
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".npz"]  # no partial files
    budget[0] = 100
    resumed = run()
    assert len(calls) == 5
    fresh = retrain_measurements(trajectory, queries, masks, seeds=0, progress=False)
    np.testing.assert_array_equal(resumed.outputs, fresh.outputs)


def test_a_damaged_cache_file_is_recomputed(tmp_path: Path, count_trainings: list[int]) -> None:
    trajectory = _cases.trajectory("mlp_sgd")
    queries = _cases.queries("mlp_sgd")
    masks = make_subset_masks(12, n_subsets=2)
    first = retrain_measurements(
        trajectory, queries, masks, seeds=0, cache_dir=tmp_path, progress=False
    )
    victim = sorted(tmp_path.glob("*.npz"))[0]
    victim.write_bytes(b"not a zip file")
    again = retrain_measurements(
        trajectory, queries, masks, seeds=0, cache_dir=tmp_path, progress=False
    )
    assert len(count_trainings) == 3
    np.testing.assert_array_equal(again.outputs, first.outputs)


def test_a_custom_retraining_function_serves_a_run_without_recipe() -> None:
    trajectory = _cases.trajectory("mlp_sgd")
    no_recipe = _cases.rebuild(
        trajectory, stages=[replace(s, recipe=None) for s in trajectory.stages]
    )
    masks = make_subset_masks(12, n_subsets=2)

    def my_training(keep: np.ndarray, seed: int) -> torch.nn.Module:
        assert keep.dtype == bool and keep.shape == (12,)
        return retrain_model(trajectory, keep, seed)

    queries = _cases.queries("mlp_sgd")
    custom = retrain_measurements(
        no_recipe, queries, masks, seeds=0, progress=False, retrain=my_training
    )
    recipe = retrain_measurements(trajectory, queries, masks, seeds=0, progress=False)
    np.testing.assert_array_equal(custom.outputs, recipe.outputs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"masks": np.ones((2, 5), bool)}, ValueError, "have 5 columns but the trajectory has 12"),
        ({"masks": np.ones(12, bool)}, ValueError, r"2-d array of shape \(n_subsets, 12\)"),
        ({"seeds": ()}, ValueError, "'seeds' parameter must be an int or a non-empty sequence"),
        ({"seeds": (1, 1)}, ValueError, "distinct"),
        ({"n_jobs": 0}, ValueError, "'n_jobs' parameter must be None or a non-zero int"),
        ({"retrain": "train"}, TypeError, r"retrain\(keep_mask, seed\) -> nn.Module"),
        ({"retrain": lambda keep, seed: None}, TypeError, "returned a NoneType"),
        ({"queries": _cases.queries("linear_gd")}, ValueError, "query targets have shape"),
    ],
)
def test_bad_arguments_are_reported(kwargs: dict, error: type, match: str) -> None:
    arguments = {
        "queries": _cases.queries("mlp_sgd"),
        "masks": make_subset_masks(12, n_subsets=2),
        "seeds": 0,
        "progress": False,
        **kwargs,
    }
    with pytest.raises(error, match=match):
        retrain_measurements(_cases.trajectory("mlp_sgd"), **arguments)
