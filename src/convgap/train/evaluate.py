"""Accuracy and loss of a classifier on a dataset."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .. import hardware
from ..errors import ConvgapError
from .distributed import shard, sum_over
from .losses import check_labels

__all__ = ["Evaluation", "evaluate"]


@dataclass(frozen=True)
class Evaluation:
    """``loss``: mean cross-entropy per image (nats); ``top1`` / ``top5``: fractions in
    [0, 1] of images whose label is the best / among the five best scores (with five or
    fewer classes, top-5 is 1); ``images``: how many were evaluated."""

    loss: float
    top1: float
    top5: float
    images: int


def evaluate(model: nn.Module, data: Dataset, batch_size: int = 256,
             device: str | torch.device | None = None, workers: int = 0) -> Evaluation:
    """``model`` in eval mode under ``no_grad`` on every ``(image, label)`` of ``data``, in
    batches of ``batch_size`` images loaded by ``workers`` processes (0: this one). The
    model is moved to ``device`` if one is given (None: it stays where it is; the CPU for a
    model without parameters or buffers) and its training mode is restored afterwards.
    Inside a multi-process run each process evaluates its share and the sums are combined:
    every process returns the whole dataset's numbers."""
    if len(data) == 0:
        raise ConvgapError("the evaluation dataset is empty")
    if device is not None:
        model.to(hardware.check_device(device))
    held = next(itertools.chain(model.parameters(), model.buffers()), None)
    dev = torch.device("cpu") if held is None else held.device
    loader = DataLoader(shard(data), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=dev.type == "cuda")
    was_training = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    top1 = torch.zeros((), dtype=torch.int64, device=dev)
    top5 = torch.zeros((), dtype=torch.int64, device=dev)
    images = 0
    try:
        with torch.no_grad():
            for x, y in loader:
                x, y_dev = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                out = model(x)
                check_labels(y, out.shape[-1])
                loss += F.cross_entropy(out, y_dev, reduction="sum")
                best = out.topk(min(5, out.shape[-1]), dim=-1).indices == y_dev[:, None]
                top1 += best[:, 0].sum()
                top5 += best.any(dim=-1).sum()
                images += len(y)
    finally:
        model.train(was_training)
    total, n1, n5, count = sum_over([loss.item(), top1.item(), top5.item(), images], dev)
    return Evaluation(total / count, n1 / count, n5 / count, int(count))
