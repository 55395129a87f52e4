"""A tiny next-token task on generated text: a sequence model in seconds on a CPU.

The "text" comes from a fixed second-order Markov source over a small vocabulary (each
pair of previous symbols allows a few next symbols), cut into sequences of varying length
and padded: the inputs are the tokens, the targets the next tokens, with
:data:`~sourcekit.objectives.IGNORE_INDEX` (-100) wherever there is no next token to
predict (padding and each sequence's last position). Nothing is downloaded.

The model predicts every next token from the current and the previous token (an
embedding table, a Linear layer on the two embeddings side by side, tanh, a Linear layer
to the vocabulary's logits): its outputs have shape (n, T, vocabulary), and its loss and
measurement are the mean next-token cross-entropy over the counted positions. It is the
sequence counterpart of the digits task: small enough for exact unrolling, dense
curvature and retraining ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..objectives import IGNORE_INDEX
from ..trajectory import Examples, OptimizerSpec, TrainingStage, Trajectory, train

__all__ = ["TEXT_RECIPES", "NextTokenModel", "TextTask", "load_text_task"]

TEXT_RECIPES = ("standard", "early")
"""The names :meth:`TextTask.record` and :meth:`TextTask.stages` accept."""


class NextTokenModel(nn.Module):
    """Next-token logits from the current and the previous token at every position.

    ``logits[:, t]`` depends on tokens t and t − 1 (the first position sees a zero vector
    for its missing predecessor): embedding → Linear on the two embeddings side by side
    → tanh → Linear to the vocabulary.

    Parameters
    ----------
    vocabulary : int, default=12
    width : int, default=8
        Embedding width.
    hidden : int, default=32

    Examples
    --------
    >>> import torch
    >>> from sourcekit.datasets import NextTokenModel
    >>> model = NextTokenModel(vocabulary=12)
    >>> model(torch.zeros(3, 10, dtype=torch.long)).shape
    torch.Size([3, 10, 12])
    """

    def __init__(self, vocabulary: int = 12, width: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.mix = nn.Linear(2 * width, hidden)
        self.out = nn.Linear(hidden, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens)
        previous = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
        return self.out(torch.tanh(self.mix(torch.cat([e, previous], dim=-1))))


def _markov_text(
    n: int, length: int, vocabulary: int, rng: np.random.Generator, table: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """n sequences of ``length`` tokens (some shorter, padded) and their next-token targets."""
    tokens = np.zeros((n, length), dtype=np.int64)
    targets = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
    for i in range(n):
        size = int(rng.integers(length // 2, length + 1))
        seq = list(rng.integers(0, vocabulary, size=2))
        while len(seq) < size + 1:
            options = table[seq[-2], seq[-1]]
            seq.append(int(options[rng.integers(0, len(options))]))
        tokens[i, :size] = seq[:size]
        targets[i, : size - 1] = seq[1:size]  # the last token of a sequence has no target
    return tokens, targets


@dataclass
class TextTask:
    """The next-token task: data, model, loss, measurement and recipes.

    Attributes
    ----------
    train, test : Examples
        Tokens (n, T) and next-token targets (n, T), -100 where nothing is predicted.
    vocabulary : int
    loss, measurement : str
        ``"cross_entropy"``: the mean next-token loss over the counted positions.
    architecture : str
        The importable model class, so that recorded runs can be saved and retrained.

    Examples
    --------
    >>> from sourcekit.datasets import load_text_task
    >>> task = load_text_task()
    >>> task.train.inputs.shape, task.test.targets.shape
    (torch.Size([256, 12]), torch.Size([64, 12]))
    >>> trajectory = task.record("early", progress=False)  # well under a second
    >>> trajectory.n_steps, len(trajectory.checkpoint_steps)
    (60, 6)
    """

    train: Examples
    test: Examples
    vocabulary: int = 12
    loss: str = "cross_entropy"
    measurement: str = "cross_entropy"
    architecture: str = field(default="sourcekit.datasets:NextTokenModel")

    @property
    def architecture_kwargs(self) -> dict:
        return {"vocabulary": self.vocabulary}

    def stages(self, recipe: str = "standard") -> list[TrainingStage]:
        """The :class:`TrainingStage` list of a recipe.

        ``"standard"``: SGD with momentum 0.9, learning rate 0.1, batch 32, 30 epochs
        (240 steps), which leaves the test loss still falling; ``"early"``: the same
        stopped after a quarter of its steps.
        """
        sgd = OptimizerSpec("sgd", lr=0.1, momentum=0.9)
        if recipe == "standard":
            return [TrainingStage(sgd, epochs=30, batch_size=32, n_checkpoints=6)]
        if recipe == "early":
            return [
                TrainingStage(sgd, epochs=30, batch_size=32, stop_fraction=0.25, n_checkpoints=6)
            ]
        raise ValueError(f"The 'recipe' parameter must be one of {TEXT_RECIPES}; got {recipe!r}.")

    def record(
        self, recipe: str = "standard", *, random_state: int = 0, progress: bool = True
    ) -> Trajectory:
        """Train the model with ``recipe`` and return its recorded :class:`Trajectory`."""
        return train(
            self.architecture,
            self.train,
            self.stages(recipe),
            loss=self.loss,
            measurement=self.measurement,
            architecture_kwargs=self.architecture_kwargs,
            random_state=random_state,
            progress=progress,
        )


def load_text_task(
    *,
    n_train: int = 256,
    n_test: int = 64,
    length: int = 12,
    vocabulary: int = 12,
    random_state: int = 0,
) -> TextTask:
    """Generate the next-token task.

    Parameters
    ----------
    n_train, n_test : int, default=256, 64
        Training and query sequences.
    length : int, default=12
        Positions per sequence; each sequence holds between ``length // 2`` and
        ``length`` tokens, the rest is padding (token 0, target -100).
    vocabulary : int, default=12
    random_state : int, default=0
        Seed of the source's transition table and of the sequences.

    Examples
    --------
    >>> from sourcekit.datasets import load_text_task
    >>> task = load_text_task(n_train=32, n_test=8)
    >>> task.train
    Examples(n=32, inputs=int64[12], targets=int64[12])
    >>> bool((task.train.targets == -100).any())  # padding and last positions
    True
    """
    for name, value, low in (
        ("n_train", n_train, 1),
        ("n_test", n_test, 1),
        ("length", length, 4),
        ("vocabulary", vocabulary, 3),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"The {name!r} parameter must be an int >= {low}; got {value!r}.")
    rng = np.random.default_rng([random_state, 17])
    # Every pair of previous symbols allows three next symbols: a learnable, noisy source.
    table = np.stack(
        [
            [rng.choice(vocabulary, size=3, replace=False) for _ in range(vocabulary)]
            for _ in range(vocabulary)
        ]
    )
    x_train, y_train = _markov_text(n_train, length, vocabulary, rng, table)
    x_test, y_test = _markov_text(n_test, length, vocabulary, rng, table)
    return TextTask(
        train=Examples(torch.from_numpy(x_train), torch.from_numpy(y_train)),
        test=Examples(torch.from_numpy(x_test), torch.from_numpy(y_test)),
        vocabulary=int(vocabulary),
    )
