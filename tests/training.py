"""Tiny models and datasets of the training tests, and the script that a ``torchrun`` test
launches (``python -m torch.distributed.run ... tests/training.py OUT_DIR``): it trains
:func:`tiny_net` on :func:`tiny_data` with :data:`RUN` and rank 0 saves the weights and the
history to OUT_DIR, for the test to compare with a run in one process."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset

# the settings of the multi-process comparison: 64 images, a global batch of 16
RUN = dict(epochs=2, batch_size=16, lr=0.05, warmup=0.5, device="cpu", quiet=True)


def tiny_net(classes: int = 4, batchnorm: bool = False, dropout: float = 0.0,
             seed: int = 0) -> nn.Module:
    """A small CNN on 3x8x8 images, initialised from ``seed``."""
    torch.manual_seed(seed)
    norm = [nn.BatchNorm2d(8)] if batchnorm else []
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *norm, nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(8, classes))


def tiny_data(n: int = 64, classes: int = 4, seed: int = 1) -> TensorDataset:
    """``n`` seeded random 3x8x8 images whose label is which quarter of the colour-sum
    range they fall in (learnable), ``classes`` labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    score = x[:, 0].mean(dim=(1, 2)) - x[:, 1].mean(dim=(1, 2))
    y = torch.bucketize(score, score.quantile(torch.linspace(0, 1, classes + 1)[1:-1]))
    return TensorDataset(x, y)


class Augmented(Dataset):
    """``data`` with a random flip and noise drawn from torch's global generator, as an
    augmentation in the loading process would (so exact resume must restore it)."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y = self.data[i]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x + 0.1 * torch.randn_like(x), y


def _main(out: Path) -> None:
    from convgap.train import fit
    net = tiny_net()
    history = fit(net, tiny_data(), tiny_data(seed=2), checkpoint=out / "checkpoint.pt",
                  log=out / "log.json", **RUN)
    if os.environ["RANK"] == "0":
        torch.save(net.state_dict(), out / "weights.pt")
        (out / "history.json").write_text(json.dumps(history.to_dict()))


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
