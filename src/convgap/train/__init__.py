"""Training: a fit loop with distillation, extra losses and exact resume, in one process or
several under ``torchrun`` (DistributedDataParallel).

- :func:`fit` -- train a classifier; returns a :class:`History` (per epoch: losses in nats
  per image, accuracies as fractions in [0, 1], images per second).
- :func:`evaluate` -- loss, top-1 and top-5 of a classifier on a dataset
  (:class:`Evaluation`).
- :func:`finetune` -- accuracy before and after a rewrite (factorization) and after
  distilled fine-tuning of the rewritten model (:class:`Recovery`).
- :func:`distillation_loss` -- the distillation objective ``fit`` uses with a teacher.
"""

from .evaluate import Evaluation, evaluate
from .finetune import FINETUNE_LR, Recovery, finetune
from .fit import fit
from .history import EpochRecord, History
from .losses import distillation_loss

__all__ = ["fit", "evaluate", "Evaluation", "History", "EpochRecord", "distillation_loss",
           "finetune", "Recovery", "FINETUNE_LR"]
