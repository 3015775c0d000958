"""What a training run measured: one :class:`EpochRecord` per epoch, in a :class:`History`.

Units: losses are mean cross-entropy per image (nats; the training loss is the objective
minimised: with a teacher the distillation loss of
:func:`convgap.train.losses.distillation_loss`, plus any extra loss), accuracies
are fractions in [0, 1], throughput is training images per second (all processes together),
times are seconds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..cache import write_atomic

__all__ = ["EpochRecord", "History"]


@dataclass(frozen=True)
class EpochRecord:
    """One epoch: ``epoch`` counts from 1; losses in nats per image; ``train_top1`` (on the
    augmented training batches, while the weights moved) and ``val_top1`` are fractions in
    [0, 1]; ``images_per_s`` is training images per second of the training phase (all
    processes); ``lr`` the learning rate at the epoch's end (the next step's); ``seconds``
    the epoch's wall time, validation included."""

    epoch: int
    train_loss: float
    train_top1: float
    val_loss: float
    val_top1: float
    images_per_s: float
    lr: float
    seconds: float


@dataclass
class History:
    """The rows of a run, first epoch first (a resumed run includes the epochs before it)."""

    epochs: list[EpochRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"epochs": [asdict(r) for r in self.epochs]}

    @classmethod
    def from_dict(cls, data: dict) -> "History":
        return cls([EpochRecord(**r) for r in data["epochs"]])

    def to_json(self, path: str | Path | None = None) -> str:
        """The history as JSON text; with ``path``, also written there atomically."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            write_atomic(path, lambda fh: fh.write(text.encode()))
        return text
