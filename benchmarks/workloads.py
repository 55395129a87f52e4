"""The larger workloads of the scale benchmarks, built from synthetic data (no downloads).

Imported by ``benchmarks/scale.py``, ``benchmarks/precision.py`` and
``benchmarks/gpu_check.py`` (run from the repository root, so that this directory is on
``sys.path`` and the model factories can be named in a saved trajectory).

- **conv net**: a ResNet-9-style network on 32 x 32 x 3 images (Conv2d + BatchNorm +
  ReLU, two residual blocks, max pooling, a Linear head), trained with SGD, momentum and
  weight decay on noisy images of ten random colour patterns. Its BatchNorm layers have
  parameters that sourcekit does not attribute through, so SOURCE is given
  ``modules=`` naming the convolutions and the head (:func:`attributed_modules`).
- **transformer**: a decoder-only language model (token embedding, learned positions,
  pre-norm blocks of causal self-attention whose projections are ``nn.Linear``, a GELU
  MLP, LayerNorm), trained with AdamW on sequences of a random second-order Markov
  source; the loss and the measurement are the mean next-token cross-entropy over a
  sequence, on outputs of shape (n, T, vocabulary). SOURCE runs over its Linear layers.

``SIZES`` holds a CPU size (the whole CPU benchmark runs in minutes) and a GPU size for
each; :func:`build` trains one and returns its trajectory and queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import sourcekit
from sourcekit import Examples, OptimizerSpec, TrainingStage

__all__ = [
    "SIZES",
    "TinyGPT",
    "Workload",
    "attributed_modules",
    "build",
    "describe",
    "make_resnet9",
    "markov_sequences",
    "pattern_images",
]


# --- the conv net ---------------------------------------------------------------------------
def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def make_resnet9(width: int = 8, n_classes: int = 10) -> nn.Sequential:
    """ResNet-9 (Page's CIFAR-10 design) with channels width x (1, 2, 4, 8); 64 is the original."""
    c = width
    return nn.Sequential(
        _conv_bn(3, c),
        _conv_bn(c, 2 * c),
        nn.MaxPool2d(2),
        _Residual(2 * c),
        _conv_bn(2 * c, 4 * c),
        nn.MaxPool2d(2),
        _conv_bn(4 * c, 8 * c),
        nn.MaxPool2d(2),
        _Residual(8 * c),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * c, n_classes),
    )


def pattern_images(n: int, seed: int, n_classes: int = 10) -> Examples:
    """Noisy 32 x 32 x 3 images of ``n_classes`` fixed smooth random patterns."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_classes, 3, 8, 8, generator=torch.Generator().manual_seed(1234))
    patterns = F.interpolate(base, size=32, mode="bilinear", align_corners=False)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    images = patterns[labels] + 1.0 * torch.randn(n, 3, 32, 32, generator=g)
    return Examples(images, labels)


# --- the transformer -------------------------------------------------------------------------
class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(n, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyGPT(nn.Module):
    """A decoder-only language model: logits (n, T, vocabulary) for tokens (n, T)."""

    def __init__(
        self,
        vocabulary: int = 128,
        width: int = 64,
        heads: int = 4,
        layers: int = 2,
        length: int = 64,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.positions = nn.Parameter(0.02 * torch.randn(length, width))
        self.blocks = nn.ModuleList([_Block(width, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.positions[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def markov_sequences(n: int, seed: int, vocabulary: int = 128, length: int = 64) -> Examples:
    """Token sequences of a fixed random Markov source; targets are the next tokens.

    Each token is followed by one of four preferred successors (90 %) or by a uniform
    random token (10 %), so a trained model's loss falls from log(vocabulary) towards
    the source's entropy (about 1.9 nats).
    """
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(
        0, vocabulary, (vocabulary, 4), generator=torch.Generator().manual_seed(4321)
    )
    tokens = torch.empty(n, length + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocabulary, (n,), generator=g)
    for t in range(1, length + 1):
        follow = successors[tokens[:, t - 1], torch.randint(0, 4, (n,), generator=g)]
        noise = torch.randint(0, vocabulary, (n,), generator=g)
        tokens[:, t] = torch.where(torch.rand(n, generator=g) < 0.1, noise, follow)
    return Examples(tokens[:, :-1], tokens[:, 1:])


# --- recipes ---------------------------------------------------------------------------------
@dataclass
class Workload:
    """A trained workload: its name, run, queries and the layers SOURCE attributes through."""

    name: str
    trajectory: sourcekit.Trajectory
    queries: Examples
    modules: list[str]
    details: dict[str, Any] = field(default_factory=dict)


SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        "conv": {"width": 8, "n_train": 1024, "epochs": 4},
        "transformer": {
            "vocabulary": 128,
            "width": 64,
            "heads": 4,
            "layers": 2,
            "length": 64,
            "n_train": 1024,
            "epochs": 2,
        },
    },
    "gpu": {
        "conv": {"width": 32, "n_train": 8192, "epochs": 4},
        "transformer": {
            "vocabulary": 512,
            "width": 256,
            "heads": 8,
            "layers": 4,
            "length": 128,
            "n_train": 8192,
            "epochs": 3,
        },
    },
    "tiny": {  # code paths only (dry runs, tests of the scripts)
        "conv": {"width": 2, "n_train": 192, "epochs": 2},
        "transformer": {
            "vocabulary": 16,
            "width": 8,
            "heads": 2,
            "layers": 1,
            "length": 8,
            "n_train": 192,
            "epochs": 1,
        },
    },
}


def attributed_modules(model: nn.Module) -> list[str]:
    """The names of the model's ``nn.Conv2d`` and ``nn.Linear`` layers (not BatchNorm,
    LayerNorm, the embedding table or the learned positions)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def build(
    kind: str,
    scale: str,
    n_queries: int,
    *,
    n_train: int | None = None,
    random_state: int = 0,
    device: str = "cpu",
) -> Workload:
    """Train the workload ``kind`` ("conv" or "transformer") at ``scale`` and record its run.

    Six checkpoints are kept (the paper's budget: three segments of two). Training runs
    on ``device`` (the CPU by default; the GPU sizes train in seconds on a GPU instead of
    minutes on a CPU). ``n_train`` overrides the scale's number of training examples.
    """
    size = dict(SIZES[scale][kind])
    default_n, epochs = size.pop("n_train"), size.pop("epochs")
    n_train = default_n if n_train is None else n_train
    if kind == "conv":
        data = pattern_images(n_train + n_queries, seed=random_state)
        optimizer = OptimizerSpec("sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
        stage = TrainingStage(optimizer, epochs=epochs, batch_size=64, schedule="linear")
        factory, kwargs, loss, measurement = make_resnet9, size, "cross_entropy", "margin"
    elif kind == "transformer":
        data = markov_sequences(
            n_train + n_queries,
            seed=random_state,
            vocabulary=size["vocabulary"],
            length=size["length"],
        )
        optimizer = OptimizerSpec("adamw", lr=3e-3, weight_decay=0.01)
        stage = TrainingStage(optimizer, epochs=epochs, batch_size=32, schedule="cosine")
        factory, kwargs, loss, measurement = TinyGPT, size, "cross_entropy", "cross_entropy"
    else:
        raise ValueError(f"The workload must be 'conv' or 'transformer'; got {kind!r}.")
    train, queries = data[:n_train], data[n_train:]
    trajectory = sourcekit.train(
        factory,
        train,
        [stage],
        loss=loss,
        measurement=measurement,
        architecture_kwargs=kwargs,
        random_state=random_state,
        device=device,
        progress=False,
    )
    model = trajectory.build_model()
    details = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "attributed": sum(
            p.numel()
            for name in attributed_modules(model)
            for p in model.get_submodule(name).parameters(recurse=False)
        ),
        "n_train": n_train,
        "checkpoints": len(trajectory.checkpoint_steps),
        **size,
    }
    label = "conv net" if kind == "conv" else "transformer"
    return Workload(label, trajectory, queries, attributed_modules(model), details)


def describe(workload: Workload) -> str:
    """One line: the model's size, the training set and the checkpoints."""
    d = workload.details
    millions = d["parameters"] / 1e6
    shape = (
        f"width {d['width']}"
        if "vocabulary" not in d
        else f"d={d['width']}, {d['layers']} block(s), T={d['length']}, V={d['vocabulary']}"
    )
    return (
        f"{workload.name}: {shape}, {millions:.2f}M parameters ({d['attributed'] / 1e6:.2f}M "
        f"attributed), {d['n_train']} training examples, C={d['checkpoints']}"
    )
