"""Recording a PyTorch Lightning fit: a tiny LightningModule with dropout, SGD with
momentum under a step-wise schedule, gradient accumulation and norm clipping. The
recorder's self-check replays the first steps, so a record that did not match the run
fails these tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import sourcekit

from .. import _cases

lightning = pytest.importorskip("sourcekit.integrations.lightning")
modules = pytest.importorskip("tests.integrations._lightning_modules")


def _fit(tmp_path: Path, **options: object) -> tuple:
    train = _cases.classification_data(16, 0)
    callback = lightning.TrajectoryCallback(train, checkpoint_every=2)
    loader = torch.utils.data.DataLoader(callback.dataset, batch_size=4, shuffle=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = modules.TinyClassifier()
    trainer = lightning.pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[callback],
        **options,
    )
    trainer.fit(module, loader)
    return callback.trajectory, module, train


def test_a_lightning_fit_is_recorded_as_it_ran(tmp_path: Path) -> None:
    trajectory, module, _ = _fit(tmp_path, accumulate_grad_batches=2, gradient_clip_val=0.5)
    # 16 examples in batches of 4, two per step, two epochs: 4 steps; each epoch is a
    # permutation drawn by the loader's shuffling sampler
    assert trajectory.n_steps == 4
    assert trajectory.batches is not None
    order = np.concatenate(trajectory.batches)
    for epoch in (order[:16], order[16:]):
        assert sorted(epoch.tolist()) == list(range(16))
    assert [trajectory.microbatches.of_step(s) for s in range(4)] == [(4, 4)] * 4
    assert trajectory.clipping is not None and trajectory.random_states is not None
    np.testing.assert_allclose(trajectory.learning_rates, [0.2, 0.2, 0.1, 0.1])
    rebuilt = trajectory.build_model()
    assert type(rebuilt).__name__ == "TinyClassifier"
    for name, tensor in module.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name
    trajectory.save(tmp_path / "run")
    loaded = sourcekit.Trajectory.load(tmp_path / "run")
    queries = _cases.classification_data(3, 1)
    scores = sourcekit.SourceAttributor(n_segments=1).fit(loaded).transform(queries)
    assert scores.shape == (3, 16) and np.isfinite(scores).all()


def test_a_lightning_fit_without_accumulation(tmp_path: Path) -> None:
    trajectory, _, _ = _fit(tmp_path)
    assert trajectory.n_steps == 8 and trajectory.microbatches is None
    assert trajectory.clipping is None


def test_the_callback_needs_norm_clipping(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"gradient_clip_algorithm='value'.*norm clipping only"):
        _fit(tmp_path, gradient_clip_val=0.5, gradient_clip_algorithm="value")
