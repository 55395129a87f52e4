"""Record a Hugging Face Trainer run of a tiny GPT-2, save it, and attribute its predictions.

The GPT-2 is built from a config (nothing is downloaded) and trained by an ordinary
``transformers.Trainer`` with its defaults: AdamW with its no-decay groups, a linear
schedule, clipping at 1.0 and dropout, here with gradient accumulation. Recording it
takes a ``TrajectoryCallback`` given to the Trainer, whose ``dataset`` the Trainer trains
on. The training sequences count upwards modulo 16 in steps of 1, 2, 3 or 5; for most
queries, attribution finds proponents that count in the query's own step. ``token_queries``
then attributes each predicted token of one query on its own.

Needs ``pip install "sourcekit[hf]"``.
"""

# requires: transformers

import tempfile
import time
import warnings

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import sourcekit
from sourcekit.exceptions import UnsupportedLayersWarning
from sourcekit.integrations.hf import TrajectoryCallback
from sourcekit.trajectory import token_queries

started = time.perf_counter()
VOCABULARY, LENGTH, STEPS = 16, 8, (1, 2, 3, 5)


def sequences(n: int, seed: int) -> tuple[sourcekit.Examples, np.ndarray]:
    """n counting sequences (start at random, add the step modulo 16) and their steps."""
    rng = np.random.default_rng(seed)
    steps = np.array(STEPS)[np.arange(n) % len(STEPS)]
    starts = rng.integers(0, VOCABULARY, n)
    tokens = torch.from_numpy((starts[:, None] + steps[:, None] * np.arange(LENGTH)) % VOCABULARY)
    inputs = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    return sourcekit.Examples(inputs, tokens.clone()), steps


train, train_steps = sequences(48, 0)
queries, query_steps = sequences(4, 1)

torch.manual_seed(0)
config = GPT2Config(vocab_size=VOCABULARY, n_positions=LENGTH, n_embd=32, n_layer=1, n_head=2)
model = GPT2LMHeadModel(config)
# With gradient accumulation the Trainer counts a causal LM's predicted tokens by its
# loss_type, unset for GPT-2 in transformers 5 (the self-check would report the difference).
model.loss_type = "ForCausalLM"

callback = TrajectoryCallback(
    train,
    loss="next_token_cross_entropy",  # what GPT-2's own loss is, per sequence
    measurement="next_token_margin",  # what attribution explains for a query
    checkpoint_every=5,
)
with tempfile.TemporaryDirectory() as scratch:
    args = TrainingArguments(
        scratch,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        num_train_epochs=5,
        learning_rate=3e-3,
        weight_decay=0.01,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model, args, train_dataset=callback.dataset, callbacks=[callback])
    trainer.train()
    trajectory = callback.trajectory
    print(trajectory.summary())

    # --- save, load (rebuilt from the class and config), attribute ---------------------------
    trajectory.save(f"{scratch}/gpt2-run")
    loaded = sourcekit.Trajectory.load(f"{scratch}/gpt2-run")
    rebuilt = loaded.build_model()
    print(
        f"rebuilt with lm_head tied to wte: {rebuilt.lm_head.weight is rebuilt.transformer.wte.weight}"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnsupportedLayersWarning)
        attributor = sourcekit.SourceAttributor(n_segments=2).fit(loaded)
    print(f"left out of attribution: {str(caught[0].message).split(': ', 1)[1][:160]}...")

    scores = attributor.transform(queries)
    top = sourcekit.TopKProponents(k=5, kind="proponents").fit_transform(scores)
    for q, row in enumerate(top):
        same = float(np.mean(train_steps[row] == query_steps[q]))
        print(
            f"query counting in steps of {query_steps[q]}: top-5 proponents count in steps of "
            f"{train_steps[row].tolist()} ({same:.0%} its own)"
        )

    # --- one query per predicted token -----------------------------------------------------
    per_token, positions = token_queries(queries[:1])
    token_scores = attributor.transform(per_token)
    best = token_scores.argmax(axis=1)
    print(
        "query 0, strongest proponent of each predicted token:",
        [int(i) for i in best],
        f"(steps {train_steps[best].tolist()})",
    )
    gap = np.abs(token_scores.mean(axis=0) - scores[0]).max() / np.abs(scores[0]).max()
    print(f"the mean over its tokens is the query's scores (largest difference {gap:.1e})")
print(f"done in {time.perf_counter() - started:.0f} s")
