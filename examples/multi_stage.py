"""Pretraining, then fine-tuning: how much of a prediction comes from each stage's data?

A model is pretrained on two thirds of the digits training set and fine-tuned on the
remaining third with a smaller learning rate. For a few test digits we ask how much of
the fine-tuned model's margin was put there by the pretraining examples and how much by
the fine-tuning examples: the sum of the scores over each stage's examples, which is the
first-order effect of including that whole group in the run.

Three attributors answer:

- exact unrolling (``UnrolledAttributor``) differentiates through the whole recorded
  run; it is the reference, affordable because the model is tiny;
- SOURCE (``SourceAttributor``) follows each example from the steps where it was used to
  the end of training, segment by segment, so it knows that fine-tuning came after
  pretraining and how much of the pretraining effect survived it;
- an influence function (``InfluenceAttributor``) sees only the final parameters and
  one objective over all 1437 examples. Its formula has no place for the stages: given
  the final parameters, an example's score is the same whichever stage trained on it.

The 1/N_stage scale. Within a stage the training objective is the mean loss over that
stage's examples, so every step gives a fine-tuning example the weight 1/479 and a
pretraining example the weight 1/958. SOURCE multiplies the contribution of each segment
by 1/N of the segment's stage (METHOD.md section 4), so its scores are the change in the
margin itself, on the same scale as exact unrolling. An influence function divides by
the size of the whole training set, 1/1437, for every example.

Run it with ``python examples/multi_stage.py`` (about 10 s on a laptop CPU).
"""

import textwrap
import time

import numpy as np

import sourcekit
from sourcekit import (
    InfluenceAttributor,
    OptimizerSpec,
    SourceAttributor,
    TrainingStage,
    UnrolledAttributor,
)


def say(text):
    """Print a paragraph of plain words, wrapped, after a blank line."""
    print("\n" + textwrap.fill(text, width=88, break_on_hyphens=False))


started = time.perf_counter()
task = sourcekit.datasets.load_digits_task()
n_train = len(task.train)

# --- the run: pretraining, then fine-tuning on data the model has not seen ------------------
order = np.random.default_rng(0).permutation(n_train)
pretraining = np.sort(order[: 2 * n_train // 3])  # 958 training digits
finetuning = np.sort(order[2 * n_train // 3 :])  # the other 479
stages = [
    TrainingStage(
        OptimizerSpec("sgd", lr=0.01, momentum=0.9, weight_decay=1e-3),
        epochs=16,
        batch_size=64,
        name="pretrain",
        examples=pretraining,
        n_checkpoints=4,  # checkpoints kept for SOURCE inside this stage
    ),
    TrainingStage(
        OptimizerSpec("sgd", lr=0.003, momentum=0.9, weight_decay=1e-3),  # a smaller rate
        epochs=8,
        batch_size=64,
        name="finetune",
        examples=finetuning,
        n_checkpoints=4,
    ),
]
# sourcekit.train runs the stages one after the other on the same model and records every
# step (learning rate, batch, optimiser) and the checkpoints; random_state fixes the
# initial weights and the shuffling, so the run is the same every time.
trajectory = sourcekit.train(
    "sourcekit.datasets:make_digits_mlp", task.train, stages, random_state=0, progress=False
)
for stage in trajectory.stages:
    print(
        f"stage {stage.name!r}: steps {stage.start}..{stage.end - 1}, "
        f"{stage.n_examples} training digits"
    )

# --- three attributions of the same fine-tuned predictions ----------------------------------
queries = task.test[:12]
# Four segments: segments never cross a stage boundary, so each stage gets two, and each
# segment has its own curvature, averaged over its two checkpoints.
source = SourceAttributor(n_segments=4, damping=1e-3).fit(trajectory)
for segment in source.segments_:
    print(
        f"SOURCE segment {segment.index}: steps {segment.start}..{segment.end - 1} of "
        f"{trajectory.stages[segment.stage].name!r}, checkpoints {segment.checkpoints}"
    )

scores = {
    "exact unrolling": UnrolledAttributor().fit(trajectory).transform(queries),
    "SOURCE": source.transform(queries),
    "influence function": InfluenceAttributor().fit(trajectory).transform(queries),
}  # each of shape (n_queries, n_train) = (12, 1437)


def stage_sums(matrix):
    """Per query, the summed scores of the pretraining and of the fine-tuning examples."""
    return matrix[:, pretraining].sum(axis=1), matrix[:, finetuning].sum(axis=1)


# --- one fine-tuned prediction in detail ------------------------------------------------------
model = trajectory.build_model().eval()  # the final, fine-tuned model
outputs = model(queries.inputs)
margins = sourcekit.objectives.margin(outputs, queries.targets).detach().numpy()
predicted = outputs.argmax(dim=1).numpy()
q = 0
print(
    f"\nTest digit {q}: label {int(queries.targets[q])}, predicted {predicted[q]}, "
    f"margin {margins[q]:+.2f} after fine-tuning"
)
print(f"  {'summed scores of':20s} {'pretraining':>12s} {'fine-tuning':>12s}")
for name, matrix in scores.items():
    pre, fine = (s[q] for s in stage_sums(matrix))
    print(f"  {name:20s} {pre:+12.3f} {fine:+12.3f}")

# --- all twelve queries -----------------------------------------------------------------------
# The sums are first-order effects of including each group, so they do not add up to the
# margin itself. SOURCE's sums are larger than exact unrolling's here: EK-FAC, the default
# curvature, treats the layers as independent and underestimates the curvature of this
# small network. What to read is the split between the stages.
print(f"\nAveraged over {len(queries)} test digits:")
print(f"  {'':20s} {'pretraining':>12s} {'fine-tuning':>12s}   share of pretraining")
for name, matrix in scores.items():
    pre, fine = (s.mean() for s in stage_sums(matrix))
    print(f"  {name:20s} {pre:+12.3f} {fine:+12.3f}   {pre / (pre + fine):6.0%}")

say(
    f"The influence function's split is about {len(pretraining) / n_train:.0%} / "
    f"{len(finetuning) / n_train:.0%}, the two stages' shares of the training set: at the "
    "final parameters it treats the examples of both stages alike. Exact unrolling and "
    "SOURCE credit the pretraining data with most of the margin and the fine-tuning data, "
    "trained briefly at a small learning rate, with little."
)

# --- the scale of one example's score ---------------------------------------------------------
print("\nMean |score| of one example, by stage:")
for name, matrix in scores.items():
    pre, fine = np.abs(matrix[:, pretraining]).mean(), np.abs(matrix[:, finetuning]).mean()
    print(f"  {name:20s} pretraining {pre:.2e}, fine-tuning {fine:.2e}")
say(
    f"SOURCE weighs a pretraining example by 1/{len(pretraining)} and a fine-tuning example "
    f"by 1/{len(finetuning)}, as the two stages' objectives did; the influence function "
    f"weighs every example by 1/{n_train}."
)
print(f"\nDone in {time.perf_counter() - started:.1f} s.")
