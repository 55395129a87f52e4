"""Record a PyTorch Lightning fit of a digits classifier, and attribute test digits with it.

An ordinary ``LightningModule`` (an MLP with dropout, AdamW under a cosine schedule
stepped every batch) is fitted by ``pytorch_lightning.Trainer`` with gradient
accumulation and norm clipping. Recording it takes a ``TrajectoryCallback`` given to the
trainer and a ``DataLoader`` over the callback's ``dataset``. SOURCE then attributes
four test digits; most of their proponents are training digits of the same class.

The module class is defined in this script, so the trajectory rebuilds it in memory
(from the class and its ``hparams``); a class defined in a module of yours is saved by
name, and ``trajectory.save(...)`` then works as for any run.

Needs ``pip install "sourcekit[lightning]"``.
"""

# requires: pytorch_lightning

import time

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

import sourcekit
from sourcekit.integrations.lightning import TrajectoryCallback

started = time.perf_counter()


class DigitsClassifier(pl.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 3e-3, steps: int = 24):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)  # the batch mean of loss="cross_entropy"

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step"},
        }


task = sourcekit.datasets.load_digits_task()
train, queries = task.train[:384], task.test[:4]

callback = TrajectoryCallback(
    train, loss="cross_entropy", measurement="margin", checkpoint_every=6
)
loader = torch.utils.data.DataLoader(callback.dataset, batch_size=32, shuffle=True)
trainer = pl.Trainer(
    max_epochs=4,
    accumulate_grad_batches=2,  # 12 batches of 32 per epoch: 6 steps of two
    gradient_clip_val=1.0,
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    callbacks=[callback],
)
torch.manual_seed(0)
trainer.fit(DigitsClassifier(), loader)
trajectory = callback.trajectory
print(trajectory.summary())

attributor = sourcekit.SourceAttributor(n_segments=2).fit(trajectory)
scores = attributor.transform(queries)
top = sourcekit.TopKProponents(k=10, kind="proponents").fit_transform(scores)
labels = train.targets.numpy()
for q, row in enumerate(top):
    digit = int(queries.targets[q])
    same = float(np.mean(labels[row] == digit))
    print(
        f"test digit {digit}: top-10 proponents are digits {labels[row].tolist()} ({same:.0%} its own)"
    )
print(f"done in {time.perf_counter() - started:.0f} s")
