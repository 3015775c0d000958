"""Accuracy lost to a rewrite of a model (factorization) and won back by fine-tuning.

:func:`finetune` evaluates the original model, then the rewritten one as it comes out of
:func:`convgap.factorize`, then trains the rewritten one for a few epochs with
distillation from the original (:func:`convgap.train.fit` with ``teacher=original``) and
evaluates it again: the three :class:`~convgap.train.Evaluation` s come back as a
:class:`Recovery`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..errors import ConvgapError
from .distributed import choose_device
from .evaluate import Evaluation, evaluate
from .fit import fit
from .history import History

__all__ = ["Recovery", "finetune", "FINETUNE_LR"]

# the peak learning rate of a fine-tuning run when the caller gives none: a tenth of a
# usual training run's, since the rewritten model starts close to a good solution
FINETUNE_LR = {"sgd": 0.01, "adamw": 1e-3}


@dataclass(frozen=True)
class Recovery:
    """Validation numbers of one rewrite (losses in nats per image, accuracies as fractions
    in [0, 1]; see :class:`~convgap.train.Evaluation`).

    ``original``: the model before the rewrite; ``factorized``: the rewritten model as it
    was made; ``finetuned``: the rewritten model after ``history``'s epochs of distilled
    fine-tuning (None, and ``history`` empty, when no epoch was asked for)."""

    original: Evaluation
    factorized: Evaluation
    finetuned: Evaluation | None
    history: History

    def stages(self) -> list[tuple[str, Evaluation]]:
        """``(stage, evaluation)`` in order: 'original', 'factorized' and, after
        fine-tuning, 'fine-tuned'."""
        rows = [("original", self.original), ("factorized", self.factorized)]
        if self.finetuned is not None:
            rows.append(("fine-tuned", self.finetuned))
        return rows

    def to_dict(self) -> dict:
        """The three evaluations and, under ``"epochs"``, the fine-tuning history (a
        superset of :meth:`History.to_dict`, so :meth:`History.from_dict` reads it)."""
        return {"original": asdict(self.original), "factorized": asdict(self.factorized),
                "finetuned": None if self.finetuned is None else asdict(self.finetuned),
                **self.history.to_dict()}


def finetune(original: nn.Module, factorized: nn.Module, train: Dataset, val: Dataset, *,
             epochs: int, batch_size: int = 64, lr: float | None = None,
             optimizer: str = "adamw", device: str | torch.device | None = None,
             **fit_options: Any) -> Recovery:
    """Evaluate ``original`` and ``factorized`` on ``val``, fine-tune ``factorized`` (in
    place) on ``train`` for ``epochs`` epochs with distillation from ``original``, and
    evaluate it again; return the three evaluations as a :class:`Recovery`.

    - ``original``: the model before the rewrite, with its trained weights; it is the
      teacher (frozen: in eval mode, under ``no_grad``) and is not changed (it is moved to
      ``device``). ``factorized``: the rewritten model, e.g. ``convgap.factorize(original,
      'cp', x)``; it must be another model, sharing no parameter with ``original`` (a
      :class:`ConvgapError` otherwise: training it would change the teacher). Both
      models' training modes are restored afterwards.
    - ``epochs``: epochs of fine-tuning; 0 evaluates the two models only (``finetuned`` is
      None).
    - ``batch_size`` (images per optimizer step, and per evaluation batch), ``optimizer``
      (``"adamw"``, the default: a CP-factorized resnet18 diverged under SGD at lr 0.01;
      with AdamW at 1e-3, Tucker and CP at 10x (the stem left dense) came back to within
      0.6 point of the original in 3 epochs, docs/2026-12-03-training.md; or ``"sgd"``) and ``lr`` (the peak learning rate; None takes :data:`FINETUNE_LR`) are
      :func:`fit`'s, as is every
      other keyword in ``fit_options`` (``schedule``, ``warmup``, ``weight_decay``,
      ``kd_alpha``, ``kd_temperature``, ``checkpoint``, ``log``, ``seed``, ``workers``,
      ``quiet``, ...), except ``teacher``, which is always ``original``.
    - ``device``: where all three runs happen (None: this process's GPU if CUDA is
      available, else the CPU). Under ``torchrun`` every process returns the whole
      validation set's numbers.

    Labels beyond the models' classes, an empty dataset and bad fit options are
    :class:`ConvgapError` s, raised before any training.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConvgapError(f"epochs must be a non-negative integer, got {epochs!r}")
    if "teacher" in fit_options:
        raise ConvgapError("finetune distils from the original model; it takes no teacher")
    if optimizer not in FINETUNE_LR:
        raise ConvgapError(f"unknown optimizer {optimizer!r}: use one of "
                           f"{', '.join(FINETUNE_LR)}")
    if factorized is original or not {id(p) for p in original.parameters()}.isdisjoint(
            id(p) for p in factorized.parameters()):
        raise ConvgapError("the factorized model shares parameters with the original; "
                           "fine-tune a copy (factorize without inplace=True)")
    dev = choose_device(device)
    before = evaluate(original, val, batch_size=batch_size, device=dev)
    made = evaluate(factorized, val, batch_size=batch_size, device=dev)
    if epochs == 0:
        return Recovery(before, made, None, History())
    modes = [(m, m.training) for m in (original, factorized)]
    try:
        history = fit(factorized, train, val, epochs=epochs, batch_size=batch_size,
                      lr=FINETUNE_LR[optimizer] if lr is None else lr, optimizer=optimizer,
                      teacher=original, device=dev, **fit_options)
    finally:
        for model, training in modes:
            model.train(training)
    # fit validated after its last epoch; evaluating again gives the full Evaluation (top-5)
    return Recovery(before, made, evaluate(factorized, val, batch_size=batch_size), history)
