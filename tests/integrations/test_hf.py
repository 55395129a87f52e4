"""Recording a transformers.Trainer run: a tiny GPT-2 and a tiny BERT classifier built
from configs (nothing is downloaded), trained with the Trainer's defaults (AdamW with its
no-decay groups, a linear schedule, clipping at 1.0, dropout), with and without gradient
accumulation. The recorder's self-check replays the first steps, so a record that did
not match the run (wrong batches, loss, clipping or dropout masks) fails these tests."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import sourcekit
from sourcekit.exceptions import TrajectoryError, UnsupportedLayersWarning

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("sourcekit.integrations.hf")

N_TRAIN, LENGTH, VOCABULARY = 14, 6, 24


def _arguments(out: Path, **options: object) -> transformers.TrainingArguments:
    settings = {
        "per_device_train_batch_size": 4,
        "num_train_epochs": 2,
        "learning_rate": 5e-3,
        "weight_decay": 0.1,
        "warmup_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        **options,
    }
    return transformers.TrainingArguments(str(out), **settings)


def _tokens(seed: int = 0, n: int = N_TRAIN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCABULARY, (n, LENGTH), generator=g)


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCABULARY, n_positions=LENGTH, n_embd=8, n_layer=1, n_head=2
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config)
    # transformers counts a causal LM's tokens for gradient accumulation by its loss_type
    model.loss_type = "ForCausalLM"
    return model


def _epochs(trajectory: sourcekit.Trajectory) -> list[np.ndarray]:
    assert trajectory.batches is not None
    order = np.concatenate(trajectory.batches)
    return [order[i : i + N_TRAIN] for i in range(0, order.size, N_TRAIN)]


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    ids = _tokens()
    train = sourcekit.Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids)
    model = _gpt2()
    callback = hf.TrajectoryCallback(
        train,
        loss="next_token_cross_entropy",
        measurement="next_token_margin",
        checkpoint_every=2,
    )
    trainer = transformers.Trainer(
        model,
        _arguments(tmp_path_factory.mktemp("gpt2"), gradient_accumulation_steps=2),
        train_dataset=callback.dataset,
        callbacks=[callback],
    )
    trainer.train()
    return callback.trajectory, model, train


def test_a_gpt2_trainer_run_is_recorded_as_it_ran(gpt2_run: tuple) -> None:
    trajectory, model, _ = gpt2_run
    # 14 examples in micro-batches of 4 (the last of an epoch has 2), two per step, two
    # epochs: 4 steps, each epoch a permutation drawn by the trainer's own sampler
    assert trajectory.n_steps == 4
    for epoch in _epochs(trajectory):
        assert sorted(epoch.tolist()) == list(range(N_TRAIN))
    assert not np.array_equal(_epochs(trajectory)[0], np.arange(N_TRAIN))  # shuffled
    assert trajectory.microbatches is not None
    assert [trajectory.microbatches.of_step(s) for s in range(4)] == [(4, 4), (4, 2)] * 2
    assert trajectory.clipping is not None  # max_grad_norm=1.0, the default
    assert trajectory.random_states is not None  # dropout at GPT-2's default 0.1
    # AdamW with the Trainer's groups: biases and LayerNorm weights without weight decay
    (stage,) = trajectory.stages
    assert stage.groups is not None
    decay = {n: g.optimizer.weight_decay for g in stage.groups for n in g.parameters}
    assert decay["transformer.h.0.attn.c_attn.weight"] == pytest.approx(0.1)
    assert decay["transformer.h.0.attn.c_attn.bias"] == 0.0
    assert decay["transformer.ln_f.weight"] == 0.0
    # the scheduler's warmup and linear decay, step by step
    assert trajectory.learning_rates[0] < trajectory.learning_rates[1]
    assert trajectory.learning_rates[1] > trajectory.learning_rates[3]
    # the tied output layer rebuilds tied, with the trained weights
    rebuilt = trajectory.build_model()
    assert rebuilt.lm_head.weight is rebuilt.transformer.wte.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name


def test_a_recorded_gpt2_attributes_through_both_uses_of_its_tied_table(
    gpt2_run: tuple, tmp_path: Path
) -> None:
    trajectory, _, train = gpt2_run
    with pytest.warns(UnsupportedLayersWarning) as seen:
        attributor = sourcekit.SourceAttributor(n_segments=1).fit(trajectory)
    message = str(seen[0].message)
    assert "'transformer.wpe' (Embedding, receives an input shared" in message
    assert "'transformer.ln_f' (LayerNorm" in message
    tied = next(b for b in attributor.state_.blocks if b.uses)
    assert tied.name == "transformer.wte.weight"
    assert [u.name for u in tied.uses] == ["transformer.wte", "lm_head"]
    scores = attributor.transform(train[:3])
    assert scores.shape == (3, N_TRAIN) and np.isfinite(scores).all()
    # saved and loaded: the same scores
    trajectory.save(tmp_path / "run")
    loaded = sourcekit.Trajectory.load(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedLayersWarning)
        again = sourcekit.SourceAttributor(n_segments=1).fit(loaded).transform(train[:3])
    np.testing.assert_allclose(again, scores, rtol=1e-5, atol=1e-7 * np.abs(scores).max())


def test_a_bert_classifier_with_gradient_accumulation_is_recorded(tmp_path: Path) -> None:
    config = transformers.BertConfig(
        vocab_size=VOCABULARY,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=LENGTH,
        num_labels=3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = transformers.BertForSequenceClassification(config)
    ids = _tokens(1, n=16)
    mask = torch.ones_like(ids)
    mask[::3, -2:] = 0  # padding at the end of some sequences
    labels = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    train = sourcekit.Examples({"input_ids": ids, "attention_mask": mask}, labels)
    callback = hf.TrajectoryCallback(train, checkpoint_every=2)
    trainer = transformers.Trainer(
        model,
        _arguments(tmp_path, gradient_accumulation_steps=2, num_train_epochs=1),
        train_dataset=callback.dataset,
        callbacks=[callback],
    )
    # The classifier's forward takes **kwargs but its loss ignores num_items_in_batch, so the
    # Trainer would add the micro-batches' mean losses (twice the step's mean loss: the
    # self-check reports a 50% difference). Averaging them is the Trainer's other mode.
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    trajectory = callback.trajectory
    assert trajectory.n_steps == 2
    assert trajectory.microbatches is not None
    assert [trajectory.microbatches.of_step(s) for s in range(2)] == [(4, 4), (4, 4)]
    with pytest.warns(UnsupportedLayersWarning):
        scores = sourcekit.TracInAttributor().fit(trajectory).transform(train[:2])
    assert scores.shape == (2, 16) and np.isfinite(scores).all()


def test_the_callback_refuses_a_run_it_cannot_follow(tmp_path: Path) -> None:
    ids = _tokens()
    train = sourcekit.Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids)
    callback = hf.TrajectoryCallback(train, loss="next_token_cross_entropy", checkpoint_every=2)
    trainer = transformers.Trainer(
        _gpt2(),
        _arguments(tmp_path, dataloader_num_workers=1),
        train_dataset=callback.dataset,
        callbacks=[callback],
    )
    with pytest.raises(
        ValueError, match=r"dataloader_num_workers=1.*Set dataloader_num_workers=0"
    ):
        trainer.train()
    with pytest.raises(ValueError, match=r"checkpoint_every=k or checkpoint_steps"):
        hf.TrajectoryCallback(train)
    # a model trained on another dataset than the callback's
    other = hf.TrajectoryCallback(train, loss="next_token_cross_entropy", checkpoint_every=2)
    trainer = transformers.Trainer(
        _gpt2(), _arguments(tmp_path), train_dataset=callback.dataset, callbacks=[other]
    )
    with pytest.raises(TrajectoryError, match=r"did not come from the Hugging Face callback's"):
        trainer.train()
