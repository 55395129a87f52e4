"""A tiny LightningModule for the Lightning callback's tests (importable by name, so a
recorded run rebuilds it from its hyperparameters)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("sourcekit.integrations.lightning").pl


class TinyClassifier(pl.LightningModule):
    """Linear, tanh, dropout, Linear: trained with SGD and momentum under a step schedule."""

    def __init__(self, n_features: int = 3, hidden: int = 6, n_classes: int = 3, lr: float = 0.2):
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Linear(n_features, hidden)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(torch.tanh(self.body(x))))

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step"},
        }
