"""Find mislabelled training digits by their self-influence.

``load_digits_task(label_noise=0.1)`` replaces a tenth of the training labels with wrong
ones and marks them in ``task.flipped``, so we know the answer. A training example's
self-influence is its score on itself, τ[m, m]: how much including it in the run raised
its own margin, for its own recorded label. A correctly labelled digit looks like many
others of its class, which would have taught the model its label anyway; a mislabelled
one can only be fitted by memorising it, so its self-influence tends to be large.
``sourcekit.evaluation.self_influence`` computes the diagonal block by block, never the
full (n_train, n_train) matrix.

Two measures of how well the ranking finds the flipped labels:

- the ROC AUC (``mislabel_detection_auc``): the probability that a random flipped
  example ranks above a random clean one (0.5 is chance, 1 is perfect);
- how many of the 50 most self-influential examples were flipped, against the 10 %
  (5 of 50) that picking examples at random would find.

Both are computed for SOURCE and for the influence function, on two recipes: ``early``
(stopped after a quarter of its steps) and ``standard`` (trained until the loss has
plateaued). As a yardstick the script also ranks the examples by their training loss at
the final model, the simplest detector of all.

Run it with ``python examples/find_mislabelled_digits.py``.
"""

import time

import numpy as np
import torch

import sourcekit
from sourcekit import InfluenceAttributor, SourceAttributor
from sourcekit.evaluation import mislabel_detection_auc, self_influence

started = time.perf_counter()
task = sourcekit.datasets.load_digits_task(label_noise=0.1)
flipped = task.flipped  # bool, (1437,): True where the training label was replaced
top_k = 50
expected = top_k * flipped.mean()  # what ranking at random finds on average
print(
    f"{flipped.sum()} of {len(flipped)} training labels are wrong ({flipped.mean():.0%}); "
    f"a random pick of {top_k} holds {expected:.0f} of them on average.\n"
)


def report(name, values):
    """Print the ROC AUC and the flipped labels among the top-k of a ranking."""
    auc = mislabel_detection_auc(values, flipped)
    found = int(flipped[np.argsort(values)[::-1][:top_k]].sum())
    print(f"  {name:30s} ROC AUC {auc:.3f}   flipped among the top {top_k}: {found}")


for recipe in ("early", "standard"):
    trajectory = task.record(recipe, progress=False)
    print(f"recipe {recipe!r} ({trajectory.n_steps} steps):")
    report("SOURCE self-influence", self_influence(SourceAttributor(), trajectory))
    report("influence self-influence", self_influence(InfluenceAttributor(), trajectory))

    # The yardstick: a mislabelled digit is one the model finds hard to fit.
    model = trajectory.build_model().eval()
    with torch.no_grad():
        outputs = model(task.train.inputs)
    losses = sourcekit.objectives.cross_entropy(outputs, task.train.targets)
    report("training loss (yardstick)", losses.numpy())
    predicted = outputs.argmax(dim=1)
    wrong = (predicted == task.train.targets).numpy()[flipped].sum()
    true = (predicted == task.clean_train_targets).numpy()[flipped].sum()
    print(
        f"  of the {flipped.sum()} flipped digits, the final model predicts the wrong "
        f"recorded label for {wrong} and the true class for {true}\n"
    )

print(
    "Both methods find far more flipped labels than chance. Neither run memorised the\n"
    "wrong labels: the model predicts the true class of most flipped digits, and\n"
    "including a flipped digit is what pulls the model towards its wrong label, so its\n"
    "self-influence is high. The longer recipe let the wrong labels pull for longer, and\n"
    "both rankings sharpen. In the early-stopped run SOURCE, which measures what those 184\n"
    "steps actually did, ranks them less cleanly than the influence function, which scores\n"
    "what fitting each example from the final parameters would do, whatever the length of\n"
    "the run. On a task this small the plain training loss is the best detector of the\n"
    "three: compare with simple baselines before trusting a fancier score."
)
print(f"\nDone in {time.perf_counter() - started:.1f} s.")
