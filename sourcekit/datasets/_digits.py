"""The embedded task: scikit-learn's bundled 8x8 digits with a small MLP classifier.

Everything runs in seconds on a CPU and nothing is downloaded: the images ship with
scikit-learn. Three recorded recipes cover the settings SOURCE is built for:

- ``"standard"``: SGD with momentum 0.9, learning rate 0.01, weight decay 1e-3, batch
  64, 32 epochs (736 steps), by which point the training loss has plateaued;
- ``"early"``: the same recipe stopped after a quarter of its steps (184): a model far
  from convergence;
- ``"two_stage"``: pretraining on a random half of the training examples (32 epochs),
  then fine-tuning on the other half with learning rate 0.003 (10 epochs), so that the
  final model depends on both stages' data;
- ``"adamw"``: AdamW with learning rate 0.003, decoupled weight decay 0.1 and the default
  betas and eps, batch 64, 10 epochs (230 steps) on a cosine schedule: the adaptive
  optimiser most models are trained with, stopped while the test loss still falls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from ..trajectory import Examples, OptimizerSpec, TrainingStage, Trajectory, train

__all__ = ["RECIPES", "DigitsTask", "load_digits_task", "make_digits_mlp"]

RECIPES = ("standard", "early", "two_stage", "adamw")
"""The names :meth:`DigitsTask.record` and :meth:`DigitsTask.stages` accept."""


def make_digits_mlp(
    hidden: tuple[int, ...] | list[int] = (32, 32), n_inputs: int = 64, n_classes: int = 10
) -> nn.Sequential:
    """The digits classifier: an MLP with ReLU activations (Linear layers only).

    Parameters
    ----------
    hidden : sequence of int, default=(32, 32)
        Widths of the hidden layers.
    n_inputs : int, default=64
        Input features (the 8x8 pixels).
    n_classes : int, default=10
        Output logits.

    Returns
    -------
    nn.Sequential
        Freshly initialised from torch's global random state.

    Examples
    --------
    >>> from sourcekit.datasets import make_digits_mlp
    >>> model = make_digits_mlp(hidden=(16,))
    >>> model
    Sequential(
      (0): Linear(in_features=64, out_features=16, bias=True)
      (1): ReLU()
      (2): Linear(in_features=16, out_features=10, bias=True)
    )
    >>> sum(p.numel() for p in make_digits_mlp().parameters())  # the default (32, 32)
    3466
    """
    layers: list[nn.Module] = []
    width = n_inputs
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


@dataclass
class DigitsTask:
    """The digits task: data, model factory, loss, measurement and recipes.

    Attributes
    ----------
    train, test : Examples
        Standardised inputs (64 features, float32) and integer labels.
    train_images, test_images : ndarray of shape (n, 8, 8)
        The raw images (0..16), for plotting.
    flipped : ndarray of bool, shape (n_train,)
        Which training labels were replaced by a wrong label (``label_noise``).
    clean_train_targets : tensor
        The labels before any flipping.
    hidden : tuple of int
        Hidden widths of the MLP.
    loss : str
        ``"cross_entropy"``.
    measurement : str
        ``"margin"``: the correct class's logit minus the log-sum-exp of the others.
    architecture : str
        The importable factory of the model, so that recorded runs can be saved.

    Examples
    --------
    >>> from sourcekit.datasets import load_digits_task
    >>> task = load_digits_task()
    >>> task.train.inputs.shape, task.test.targets.shape, task.train_images.shape
    (torch.Size([1437, 64]), torch.Size([360]), (1437, 8, 8))
    >>> [(s.name, s.epochs, s.stop_fraction) for s in task.stages("early")]
    [('train', 32, 0.25)]
    >>> [(s.name, len(s.examples)) for s in task.stages("two_stage")]
    [('pretrain', 718), ('finetune', 719)]
    >>> trajectory = task.record("early", progress=False)  # about a second on a CPU
    >>> trajectory.n_steps, trajectory.checkpoint_steps
    (184, (15, 46, 76, 107, 138, 168))
    """

    train: Examples
    test: Examples
    train_images: np.ndarray
    test_images: np.ndarray
    flipped: np.ndarray
    clean_train_targets: torch.Tensor
    hidden: tuple[int, ...] = (32, 32)
    loss: str = "cross_entropy"
    measurement: str = "margin"
    architecture: str = field(default="sourcekit.datasets:make_digits_mlp")

    @property
    def architecture_kwargs(self) -> dict:
        return {"hidden": list(self.hidden)}

    def make_model(self) -> nn.Module:
        """A freshly initialised classifier."""
        return make_digits_mlp(self.hidden)

    def stages(self, recipe: str = "standard", random_state: int = 0) -> list[TrainingStage]:
        """The :class:`TrainingStage` list of a recipe."""
        n = len(self.train)
        sgd = OptimizerSpec("sgd", lr=0.01, momentum=0.9, weight_decay=1e-3)
        if recipe == "standard":
            return [TrainingStage(sgd, epochs=32, batch_size=64, n_checkpoints=6)]
        if recipe == "early":
            return [
                TrainingStage(sgd, epochs=32, batch_size=64, stop_fraction=0.25, n_checkpoints=6)
            ]
        if recipe == "two_stage":
            order = np.random.default_rng(random_state).permutation(n)
            half = n // 2
            finetune = OptimizerSpec("sgd", lr=0.003, momentum=0.9, weight_decay=1e-3)
            return [
                TrainingStage(
                    sgd,
                    epochs=32,
                    batch_size=64,
                    name="pretrain",
                    examples=np.sort(order[:half]),
                    n_checkpoints=3,
                ),
                TrainingStage(
                    finetune,
                    epochs=10,
                    batch_size=64,
                    name="finetune",
                    examples=np.sort(order[half:]),
                    n_checkpoints=3,
                ),
            ]
        if recipe == "adamw":
            adamw = OptimizerSpec("adamw", lr=0.003, weight_decay=0.1)
            return [
                TrainingStage(adamw, epochs=10, batch_size=64, schedule="cosine", n_checkpoints=6)
            ]
        raise ValueError(f"The 'recipe' parameter must be one of {RECIPES}; got {recipe!r}.")

    def record(
        self, recipe: str = "standard", *, random_state: int = 0, progress: bool = True
    ) -> Trajectory:
        """Train the classifier with ``recipe`` and return its recorded :class:`Trajectory`.

        Deterministic given ``random_state``.

        Examples
        --------
        >>> from sourcekit.datasets import load_digits_task
        >>> task = load_digits_task()
        >>> trajectory = task.record("early", progress=False)
        >>> trajectory.n_train, trajectory.n_steps
        (1437, 184)
        """
        return train(
            self.architecture,
            self.train,
            self.stages(recipe, random_state),
            loss=self.loss,
            measurement=self.measurement,
            architecture_kwargs=self.architecture_kwargs,
            random_state=random_state,
            progress=progress,
        )


def load_digits_task(
    *,
    test_size: float = 0.2,
    label_noise: float = 0.0,
    hidden: tuple[int, ...] = (32, 32),
    random_state: int = 0,
) -> DigitsTask:
    """Load the embedded digits task.

    Parameters
    ----------
    test_size : float, default=0.2
        Fraction of the 1797 images held out as test queries (stratified split).
    label_noise : float, default=0.0
        Fraction of training labels replaced by a different, random label (for
        mislabel-detection experiments); ``DigitsTask.flipped`` marks them.
    hidden : tuple of int, default=(32, 32)
        Hidden widths of the MLP.
    random_state : int, default=0
        Seed of the split and of the label noise; the default split is fixed.

    Examples
    --------
    >>> from sourcekit.datasets import load_digits_task
    >>> task = load_digits_task()
    >>> len(task.train), len(task.test), task.train.inputs.shape[1]
    (1437, 360, 64)
    """
    if not 0 < test_size < 1:
        raise ValueError(
            f"The 'test_size' parameter must be a float in (0, 1); got {test_size!r}."
        )
    if not 0 <= label_noise < 1:
        raise ValueError(
            f"The 'label_noise' parameter must be a float in [0, 1); got {label_noise!r}."
        )
    digits = load_digits()
    images = digits.images.astype(np.float32)
    labels = digits.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_size, random_state=random_state, stratify=labels
    )
    flat = images.reshape(len(images), -1).astype(np.float64)  # exact standardisation
    mean = flat[idx_train].mean(axis=0)
    std = flat[idx_train].std(axis=0)
    std[std == 0] = 1.0
    standardised = ((flat - mean) / std).astype(np.float32)
    y_train = labels[idx_train].copy()
    flipped = np.zeros(len(idx_train), dtype=bool)
    if label_noise > 0:
        rng = np.random.default_rng([random_state, 1])
        chosen = rng.choice(
            len(idx_train), size=round(label_noise * len(idx_train)), replace=False
        )
        shift = rng.integers(1, 10, size=chosen.size)
        y_train[chosen] = (y_train[chosen] + shift) % 10
        flipped[chosen] = True
    return DigitsTask(
        train=Examples(torch.from_numpy(standardised[idx_train]), torch.from_numpy(y_train)),
        test=Examples(
            torch.from_numpy(standardised[idx_test]), torch.from_numpy(labels[idx_test])
        ),
        train_images=images[idx_train],
        test_images=images[idx_test],
        flipped=flipped,
        clean_train_targets=torch.from_numpy(labels[idx_train]),
        hidden=tuple(int(h) for h in hidden),
    )
