"""Recording real training loops: how faithful the record is, and what the self-check costs.

Part 1, the training-loop features of the recording page's table. Each loop trains an
MLP on the digits (64-32-32-10, ReLU) with SGD at learning rate 0.1 and batches of 64 for four
epochs (92 steps) and is recorded twice:

- the old way (loss "cross_entropy" or "squared_error", torch's own clipping, ...) with
  ``verify=False``: the difference between a float64 replay of the record and the trained
  model is what every attribution method silently got wrong before the self-check;
- the supported way: the same difference, which is now rounding;

and the old way once more with the self-check on, which refuses it (the step and the
first line of the error are printed).

Part 2, the self-check's cost: the same loop, also with hidden layers of width 1024 (a
step then costs more than the self-check's fixed work), and the built-in trainer's digits
recipes,
timed with ``verify=True`` and ``verify=False``, alternately, best of seven runs each, in
this process and on one thread (so that the two compete for the same core).

    python benchmarks/recording.py
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import sourcekit
from sourcekit import Examples, TrajectoryRecorder
from sourcekit.exceptions import TrajectoryError
from sourcekit.objectives import CrossEntropy
from sourcekit.trajectory._replay import replay

TASK = sourcekit.datasets.load_digits_task()
ONE_HOT = Examples(TASK.train.inputs, F.one_hot(TASK.train.targets, 10).float())


def make_mlp(dropout: float = 0.0, width: int = 32) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(width, 10))


def run(
    row: str, supported: bool, verify: bool, epochs: int = 4, width: int = 32
) -> tuple[nn.Module, Any, float]:
    """Train and record one row's loop; return the model, the trajectory and the seconds."""
    torch.manual_seed(0)
    model = make_mlp(0.2 if row == "dropout" else 0.0, width)
    if row == "frozen layer":
        model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = ONE_HOT if row == "F.mse_loss" else TASK.train
    loss: Any = "cross_entropy"
    step_loss: Callable = F.cross_entropy
    if row == "label smoothing 0.2":
        loss = CrossEntropy(label_smoothing=0.2) if supported else "cross_entropy"
        step_loss = lambda z, y: F.cross_entropy(z, y, label_smoothing=0.2)  # noqa: E731
    if row == "F.mse_loss":
        loss = "mse_loss" if supported else "squared_error"
        step_loss = F.mse_loss
    recorder = TrajectoryRecorder(model, data, loss=loss, checkpoint_every=50, verify=verify)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    with recorder.stage(optimizer):
        for _ in range(epochs):
            for idx in torch.randperm(len(data), generator=generator).split(64):
                optimizer.zero_grad()
                step_loss(model(data.inputs[idx]), data.targets[idx]).backward()
                if row == "clip_grad_norm_ 0.1":
                    if supported:
                        recorder.clip_grad_norm_(0.1)
                    else:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
                optimizer.step()
                recorder.step(idx)
    trajectory = recorder.finish()
    return model, trajectory, time.perf_counter() - started


def replay_difference(model: nn.Module, trajectory: Any) -> float:
    replayed, _ = replay(trajectory)
    return max(
        float((replayed[n].detach() - p.detach().double()).abs().max())
        for n, p in model.named_parameters()
    )


def part1() -> None:
    rows = [
        "plain SGD",
        "frozen layer",
        "dropout",
        "clip_grad_norm_ 0.1",
        "label smoothing 0.2",
        "F.mse_loss",
    ]
    # Rows whose loop needs a change to be recorded (the others are recorded as they are).
    changed = {"clip_grad_norm_ 0.1", "label smoothing 0.2", "F.mse_loss"}
    print("Replayed final parameters vs trained: max abs difference (float64 replay, 92 steps)")
    print(
        f"{'training loop feature':22s} {'recorded now':>13s} {'old way, unchecked':>19s}  old way, checked"
    )
    for row in rows:
        now = replay_difference(*run(row, supported=True, verify=True)[:2])
        if row not in changed:
            print(f"{row:22s} {now:13.2g} {'(no change)':>19s}  -")
            continue
        old = replay_difference(*run(row, supported=False, verify=False)[:2])
        try:
            run(row, supported=False, verify=True)
            refused = "recorded"
        except TrajectoryError as err:
            first = str(err).replace("The record does not reproduce the training run: ", "")
            refused = "refused: " + first.split("; ")[0].split(" (")[0][:60]
        print(f"{row:22s} {now:13.2g} {old:19.2g}  {refused}")


def side_by_side(fn: Callable[[bool], float], repeats: int = 7) -> tuple[float, float]:
    """Best times of fn(True) and fn(False), run alternately."""
    on, off = [], []
    for _ in range(repeats):
        on.append(fn(True))
        off.append(fn(False))
    return min(on), min(off)


def part2() -> None:
    print("\nThe self-check's cost: seconds with verify=True / verify=False (best of 7)")
    for row, width in (
        ("plain SGD", 32),
        ("dropout", 32),
        ("label smoothing 0.2", 32),
        ("plain SGD", 1024),
        ("dropout", 1024),
    ):
        on, off = side_by_side(
            lambda verify, row=row, width=width: run(row, True, verify, epochs=8, width=width)[2]
        )
        print(
            f"  user loop, width {width:4d}, {row:20s} (184 steps): {on:6.2f} / {off:6.2f} "
            f"= {on / off:5.3f}"
        )
    for recipe in ("early", "standard"):

        def timed(verify: bool, recipe: str = recipe) -> float:
            started = time.perf_counter()
            sourcekit.train(
                TASK.architecture,
                TASK.train,
                TASK.stages(recipe),
                architecture_kwargs=TASK.architecture_kwargs,
                progress=False,
                verify=verify,
            )
            return time.perf_counter() - started

        on, off = side_by_side(timed)
        print(
            f"  sourcekit.train, digits {recipe!r:10s}: {on:6.2f} / {off:6.2f} = {on / off:5.3f}"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    part1()
    part2()
