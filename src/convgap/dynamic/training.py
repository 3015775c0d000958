"""train_dynamic: a static classifier made dynamic and trained under a budget, with
distillation from the static model (LAUDNet's recipe through :func:`convgap.train.fit`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..errors import ConvgapError
from ..train import Evaluation, History, evaluate, fit
from .budget import Budget
from .report import densities
from .transform import make_dynamic

__all__ = ["train_dynamic", "DynamicTraining", "DYNAMIC_LR"]

DYNAMIC_LR = {"adamw": 1e-3, "sgd": 0.01}   # peak learning rate when none is given


@dataclass
class DynamicTraining:
    """What :func:`train_dynamic` did: the trained dynamic ``model``; the static model's
    and the dynamic model's validation :class:`~convgap.train.Evaluation` (the dynamic one
    run as deployed: eval, maskers deciding, sparse execution); the ``history`` of fit;
    per block the density over the validation images (``density``: name -> (mean, std),
    fractions of the block's output computed); the budget's last values (``budget``)."""

    model: nn.Module
    static: Evaluation
    dynamic: Evaluation
    history: History
    density: dict[str, tuple[float, float]] = field(default_factory=dict)
    budget: dict = field(default_factory=dict)

    @property
    def mean_density(self) -> float:
        """Mean over blocks of their mean density."""
        v = [m for m, _ in self.density.values()]
        return sum(v) / len(v) if v else float("nan")


def train_dynamic(static: nn.Module, train: Dataset, val: Dataset, *, epochs: int,
                  mode: str = "spatial", target: float = 0.5, budget: str = "latency",
                  granularity: int | Sequence[int] | str = "auto", groups: int = 4,
                  batch_size: int = 64, lr: float | None = None, optimizer: str = "adamw",
                  kd_alpha: float = 0.5, kd_temperature: float = 4.0,
                  budget_weight: float = 10.0, tau: tuple[float, float] = (5.0, 0.1),
                  example_batch: int = 1, device: str | torch.device | None = None,
                  quiet: bool = False, **fit_options: Any) -> DynamicTraining:
    """Make a copy of the trained ``static`` classifier dynamic (:func:`make_dynamic`,
    ``mode``, ``granularity``, ``groups``) and train it for ``epochs`` on ``train`` with
    cross-entropy, distillation from ``static`` (``kd_alpha``, ``kd_temperature``) and a
    ``budget`` ('latency', measured on this device at batch ``example_batch``;
    'predicted', the same from the device's latency predictor; or 'flops') at ``target`` (the fraction of the dynamic blocks' cost to keep;
    ``budget_weight``, Gumbel temperature ``tau`` from start to end). ``lr`` None takes
    :data:`DYNAMIC_LR`; other keywords go to :func:`convgap.train.fit`. Returns a
    :class:`DynamicTraining`; ``static`` is not changed."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConvgapError(f"epochs must be a positive integer, got {epochs!r}")
    if optimizer not in DYNAMIC_LR:
        raise ConvgapError(f"unknown optimizer {optimizer!r}: use one of "
                           f"{', '.join(DYNAMIC_LR)}")
    if "teacher" in fit_options or "extra_loss" in fit_options:
        raise ConvgapError("train_dynamic distils from the static model and adds the "
                           "budget itself; it takes no teacher or extra_loss")
    if len(train) == 0 or len(val) == 0:
        raise ConvgapError("empty dataset")
    image = train[0][0]
    example = torch.stack([image] * example_batch)
    static = static.eval()
    dyn = make_dynamic(copy.deepcopy(static).cpu().eval(), mode, example.cpu(),
                       granularity=granularity, groups=groups, target=target, quiet=quiet)
    steps = epochs * -(-len(train) // batch_size)   # batch_size is the global batch
    loss = Budget(dyn, target, steps=steps, kind=budget, example_input=example.cpu(),
                  weight=budget_weight, tau=tau, quiet=quiet)
    history = fit(dyn, train, val, epochs=epochs, batch_size=batch_size,
                  lr=DYNAMIC_LR[optimizer] if lr is None else lr, optimizer=optimizer,
                  teacher=static, kd_alpha=kd_alpha, kd_temperature=kd_temperature,
                  extra_loss=loss, device=device, quiet=quiet, **fit_options)
    dev = next(dyn.parameters()).device
    before = evaluate(static, val, batch_size=batch_size, device=dev)
    after = evaluate(dyn, val, batch_size=batch_size, device=dev)
    dens = densities(dyn, val, batch_size=batch_size)
    return DynamicTraining(dyn, before, after, history, dens, dict(loss.last))
