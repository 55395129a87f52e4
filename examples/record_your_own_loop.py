"""Record your own PyTorch training loop, save it, load it back and attribute with it.

The loop below is ordinary PyTorch. Recording it takes three additions: a
``TrajectoryRecorder`` built before training, a ``with recorder.stage(optimizer):`` block
around the loop, and one ``recorder.step(indices)`` after every ``optimizer.step()``.

Saving a trajectory needs an architecture that can be rebuilt by name, so the model
comes from an importable factory (``sourcekit.datasets.make_digits_mlp``); a model class
or factory of your own works the same way once it lives in an importable module.
"""

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import sourcekit
from sourcekit import Trajectory, TrajectoryRecorder, UnrolledAttributor
from sourcekit.datasets import make_digits_mlp

started = time.perf_counter()
task = sourcekit.datasets.load_digits_task()
train, queries = task.train, task.test[:4]  # Examples: inputs (n, 64) float32, targets (n,)

# --- an ordinary training loop, recorded ------------------------------------------------
torch.manual_seed(0)
model = make_digits_mlp()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
recorder = TrajectoryRecorder(
    model,
    train,
    loss="cross_entropy",  # per-example loss; the loop minimises its batch mean
    measurement="margin",  # what attribution explains for a query
    architecture=make_digits_mlp,  # importable factory: needed to save the run
    checkpoint_every=50,  # states kept for SOURCE and the other approximate methods
)
generator = torch.Generator().manual_seed(0)
with recorder.stage(optimizer, name="train"):
    for _epoch in range(8):
        order = torch.randperm(len(train), generator=generator)
        for indices in order.split(64):
            optimizer.zero_grad()
            outputs = model(train.inputs[indices])
            F.cross_entropy(outputs, train.targets[indices]).backward()
            optimizer.step()
            recorder.step(indices)  # one call per step: the batch the update used
trajectory = recorder.finish()
print(trajectory.summary())

# --- save, load back, attribute -----------------------------------------------------------
with tempfile.TemporaryDirectory() as tmp:
    directory = trajectory.save(Path(tmp) / "digits-run")
    manifest = json.loads((directory / "manifest.json").read_text())
    first = manifest["checkpoints"][0]
    print(f"\nSaved to {directory.name}/ with {len(manifest['checkpoints'])} checkpoint files")
    print(f"  architecture: {manifest['architecture']}")
    print(f"  {first['file']}: sha256 {first['sha256'][:16]}...")

    loaded = Trajectory.load(directory)  # checkpoints are read (and verified) when used
    assert loaded.fingerprint == trajectory.fingerprint
    # Exact unrolling replays the recorded batches from the initial state; SOURCE would
    # use the checkpoints instead: SourceAttributor().fit(loaded) takes the same calls.
    scores = UnrolledAttributor().fit(loaded).transform(queries)  # (n_queries, n_train)

predictions = trajectory.build_model().eval()(queries.inputs).argmax(dim=1)
labels = train.targets.numpy()
print("\nscores[q, m]: first-order change of query q's margin from including training digit m")
for q, row in enumerate(scores):
    order = np.argsort(row)
    proponents, opponents = order[::-1][:5], order[:3]
    print(
        f"\nquery {q}: label {int(queries.targets[q])}, predicted {int(predictions[q])}, "
        f"sum of its scores {row.sum():+.3f}"
    )
    print(
        "  proponents:", ", ".join(f"#{m} (label {labels[m]}) {row[m]:+.4f}" for m in proponents)
    )
    print("  opponents: ", ", ".join(f"#{m} (label {labels[m]}) {row[m]:+.4f}" for m in opponents))
print(f"\nDone in {time.perf_counter() - started:.1f} s.")
