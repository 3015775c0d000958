"""The training objective: cross-entropy, or distillation from a teacher's softened outputs.

Distillation (Hinton et al., 2015), for student logits ``s``, teacher logits ``t``, labels
``y``, temperature ``T`` and weight ``alpha``::

    loss = (1 - alpha) * CE(s, y) + alpha * T**2 * KL(softmax(t / T) || softmax(s / T))

with both terms averaged over the batch (``KL`` summed over classes, then the batch mean);
the ``T**2`` keeps the soft term's gradient scale independent of ``T``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConvgapError

__all__ = ["check_labels", "distillation_loss"]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float) -> torch.Tensor:
    """The distillation objective above (nats per image); ``teacher`` carries no gradient."""
    if teacher.shape != student.shape:
        raise ConvgapError(
            f"the teacher gives {teacher.shape[-1]} class scores per image but the student "
            f"{student.shape[-1]} (outputs {tuple(teacher.shape)} vs {tuple(student.shape)}); "
            "use a teacher trained on the same classes")
    hard = F.cross_entropy(student, labels)
    soft = F.kl_div(F.log_softmax(student / temperature, dim=-1),
                    F.log_softmax(teacher / temperature, dim=-1),
                    reduction="batchmean", log_target=True)
    return (1 - alpha) * hard + alpha * temperature ** 2 * soft


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """:class:`ConvgapError` unless every label of the batch (an integer tensor, on the CPU:
    no device synchronisation) names one of the model's ``num_classes`` outputs."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.ndim != 1:
        raise ConvgapError(f"labels must be one integer class index per image, got a "
                           f"{labels.dtype} tensor of shape {tuple(labels.shape)}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = high if high >= num_classes else low
        raise ConvgapError(
            f"label {bad} is outside the model's {num_classes} classes (0..{num_classes - 1}); "
            f"build the model with num_classes equal to the data's class count")
