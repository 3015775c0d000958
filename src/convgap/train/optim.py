"""The optimizer and the learning-rate schedule of a run, from PyTorch's own classes.

The schedule steps once per optimizer step (not per epoch): a linear warm-up
(:class:`~torch.optim.lr_scheduler.LinearLR` from ``lr / (warmup_steps + 1)`` up to ``lr``)
followed by the main schedule, joined by :class:`~torch.optim.lr_scheduler.SequentialLR`:
``"cosine"`` (:class:`~torch.optim.lr_scheduler.CosineAnnealingLR` from ``lr`` to 0 over the
remaining steps) or ``"constant"``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import lr_scheduler

from ..errors import ConvgapError
from ..transforms.select import enclosing

__all__ = ["OPTIMIZERS", "SCHEDULES", "make_optimizer", "make_schedule", "param_groups"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
# weight decay when the caller gives none: the usual values for each optimizer
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 1e-2}


def param_groups(model: torch.nn.Module, lr: float) -> list[dict]:
    """The model's parameters as optimizer groups: those of a module with an
    ``lr_scale`` attribute (a number; the nearest such module above a parameter counts) at
    ``lr`` times it, the rest at ``lr``. Schedules scale every group alike."""
    scales: dict[str, float] = {}
    for name, m in model.named_modules():
        scale = getattr(m, "lr_scale", None)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            if not scale > 0:
                raise ConvgapError(f"{name or 'the model'}.lr_scale must be positive, got "
                                   f"{scale}")
            scales[name] = float(scale)
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        owner = enclosing(name.rpartition(".")[0], scales)
        groups.setdefault(1.0 if owner is None else scales[owner], []).append(p)
    return [{"params": ps, "lr": lr * scale} for scale, ps in sorted(groups.items())]


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter] | list[dict], lr: float,
                   weight_decay: float | None, momentum: float) -> torch.optim.Optimizer:
    """``"sgd"`` (with ``momentum``, not Nesterov) or ``"adamw"`` (``momentum`` unused) at
    learning rate ``lr`` (``params`` may be groups with their own, :func:`param_groups`);
    ``weight_decay`` None takes :data:`DEFAULT_WEIGHT_DECAY`."""
    if name not in OPTIMIZERS:
        raise ConvgapError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise ConvgapError(f"the learning rate must be positive, got {lr}")
    decay = DEFAULT_WEIGHT_DECAY[name] if weight_decay is None else weight_decay
    if decay < 0:
        raise ConvgapError(f"weight_decay must be >= 0, got {decay}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=decay)


def make_schedule(optimizer: torch.optim.Optimizer, name: str, total_steps: int,
                  warmup_steps: int) -> lr_scheduler.LRScheduler:
    """The per-step schedule of ``total_steps`` optimizer steps, the first ``warmup_steps``
    of them warming up linearly."""
    if name not in SCHEDULES:
        raise ConvgapError(f"unknown schedule {name!r}: use one of {', '.join(SCHEDULES)}")
    if not 0 <= warmup_steps < total_steps:
        raise ConvgapError(f"the warm-up ({warmup_steps} steps) must be >= 0 and shorter than "
                           f"the run ({total_steps} steps): lower warmup or raise epochs")
    main_steps = total_steps - warmup_steps
    main: lr_scheduler.LRScheduler
    if name == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_steps)
    else:
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup_steps == 0:
        return main
    warm = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup_steps + 1),
                                 end_factor=1.0, total_iters=warmup_steps)
    return lr_scheduler.SequentialLR(optimizer, [warm, main], milestones=[warmup_steps])
